"""The CLI makes torch's OpenMP threads sleep while they wait, unless the user chose a wait policy (issue 17, item 4:
beside one CPU-bound process, spinning threads made the cached demo 6x slower on 2 cores)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from saecircuits.cli import WAIT_POLICY_VARS, threading_defaults

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in WAIT_POLICY_VARS}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (SRC, env.get("PYTHONPATH")) if p)
    return env | extra


def test_wait_policy_defaults_to_passive_and_keeps_the_users_choice():
    env: dict[str, str] = {}
    threading_defaults(env)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}
    for name, value in (("OMP_WAIT_POLICY", "ACTIVE"), ("GOMP_SPINCOUNT", "10000"), ("KMP_BLOCKTIME", "0")):
        env = {name: value}
        threading_defaults(env)
        assert env == {name: value}  # any wait setting of the user's: nothing added, nothing changed
    env = {"OMP_WAIT_POLICY": ""}  # set but empty is not a choice
    threading_defaults(env)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}


# The console entry point, in a fresh process: which policy the environment holds when a command runs, and whether
# torch had been imported when the CLI set it (OpenMP reads it once, when torch loads).
_ENTRY = """
import atexit, os, sys
import saecircuits.cli as cli
seen = {}
original = cli.threading_defaults
def spy(environ=None):
    seen["torch_loaded"] = "torch" in sys.modules
    original(environ)
cli.threading_defaults = spy
atexit.register(lambda: print(os.environ.get("OMP_WAIT_POLICY"), seen.get("torch_loaded")))
cli.main(["demo", "--help"])
"""


@pytest.mark.parametrize(("user", "expected"), [(None, "PASSIVE"), ("active", "active")])
def test_the_console_entry_point_sets_the_policy_before_torch_loads(user, expected):
    env = _env() if user is None else _env(OMP_WAIT_POLICY=user)
    proc = subprocess.run([sys.executable, "-c", _ENTRY], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == f"{expected} False"


# CPU time a process burns while its only thread sleeps, after each of 20 two-thread matmuls: OpenMP's waiting
# thread spins through that sleep under libgomp's default wait, and sleeps at once under the CLI's setting.
_IDLE_BURN = """
import sys, time
if sys.argv[1] == "cli":
    from saecircuits.cli import threading_defaults
    threading_defaults()
import torch
if "OpenMP" not in torch.__config__.parallel_info().split("ATen parallel backend:")[-1]:
    print("no-openmp"); sys.exit()
torch.set_num_threads(2)
a = torch.randn(512, 512)
burnt = 0.0
for _ in range(20):
    a @ a
    c0 = time.process_time()
    time.sleep(0.05)
    burnt += time.process_time() - c0
print(burnt)
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2 if hasattr(os, "sched_getaffinity") else True,
                    reason="needs 2 cores (a second OpenMP thread)")
def test_the_cli_setting_stops_openmp_threads_spinning_while_idle():
    def burnt(mode: str) -> float:
        proc = subprocess.run([sys.executable, "-c", _IDLE_BURN, mode], env=_env(OMP_NUM_THREADS="2"),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        out = proc.stdout.strip().splitlines()[-1]
        if out == "no-openmp":
            pytest.skip("torch's parallel backend is not OpenMP")
        return float(out)

    spinning, sleeping = burnt("default"), burnt("cli")
    assert spinning > 0.02  # libgomp's default: the idle thread spins (about 7 ms after each matmul here)
    assert sleeping < spinning / 4
