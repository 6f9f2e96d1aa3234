"""A hub name that cannot be reached fails in seconds with one message naming HF_HUB_OFFLINE, without the offline
variables set (issue 7, item 9: it used to take ~51 s of retries and print the retry log twice).

The hub is pointed at a closed local port (HF_ENDPOINT, huggingface_hub's documented setting) and HF_HOME at an
empty folder, so the test behaves the same with or without a network and never downloads anything.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

HUB_NAME = "roneneldan/TinyStories-1M"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: connecting is refused at once


def _env(tmp_path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}", HF_HOME=str(tmp_path / "hf-home"),
               PYTHONPATH=os.pathsep.join(sys.path))
    return env


def test_unreachable_hub_fails_fast_with_one_message(tmp_path):
    code = (
        "import time\n"
        "from saecircuits.models.load import ModelLoadError, load_model\n"
        "t = time.perf_counter()\n"
        "try:\n"
        f"    load_model({HUB_NAME!r})\n"
        "except ModelLoadError as e:\n"
        "    print('ERROR', e)\n"
        "print('SECONDS', time.perf_counter() - t)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=_env(tmp_path))
    out = proc.stdout.splitlines()
    (error,) = [line for line in out if line.startswith("ERROR")]
    seconds = float(next(line for line in out if line.startswith("SECONDS")).split()[1])
    assert seconds < 15, seconds  # was ~51 s (5 retries with back-off, twice)
    assert HUB_NAME in error and "cannot be reached" in error and error.count("HF_HUB_OFFLINE") == 1
    assert "Retrying" not in proc.stderr and "Retry" not in proc.stdout, proc.stderr


def test_cli_unreachable_hub_is_one_line_exit_2(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text('Tom said, "Hi."\n', encoding="utf-8")
    code = "import sys; from saecircuits.cli import main; sys.argv[0] = 'saecircuits'; main()"
    proc = subprocess.run(
        [sys.executable, "-c", code, "run", "--model", HUB_NAME, "--data", str(corpus), "--out",
         str(tmp_path / "out"), "--workspace", str(tmp_path / "ws")],
        capture_output=True, text=True, timeout=120, env=_env(tmp_path))
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == proc.stderr.splitlines()[-1], proc.stderr
    assert "HF_HUB_OFFLINE" in errors[0] and "Retrying" not in proc.stderr
    assert proc.stderr.count("HF_HUB_OFFLINE") == 1  # the warning is printed once, not per file
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("offline_var", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_offline_variable_names_itself(tmp_path, offline_var):
    code = (
        "from saecircuits.models.load import ModelLoadError, load_model\n"
        "try:\n"
        f"    load_model({HUB_NAME!r})\n"
        "except ModelLoadError as e:\n"
        "    print(e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**_env(tmp_path), offline_var: "1"})
    assert "HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set" in proc.stdout, proc.stdout + proc.stderr
