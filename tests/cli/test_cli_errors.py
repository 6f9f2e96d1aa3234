"""Every bad setting of every command is ONE line on stderr, ``error: ...`` naming the problem, with exit status 2:
no traceback, no exit 1, no half-made output (issue 7, item 10)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from saecircuits.cli import _register, app, expand_multi_value_options
from saecircuits.models.default import shipped_model_dir

MODEL = str(shipped_model_dir())


@pytest.fixture()
def corpus(tmp_path) -> Path:
    path = tmp_path / "stories.txt"
    path.write_text('Tom said, "Hi."\n<|endoftext|>\nSue said, "Yes."\n', encoding="utf-8")
    return path


def _refused(args: list[str], expected: str, *, only_line: bool = True) -> str:
    """Run the CLI in-process; assert exit status 2 and one ``error:`` line containing ``expected``."""
    _register()
    res = CliRunner().invoke(app, args)
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2, (args, res.output, res.exception)
    assert isinstance(res.exception, SystemExit), res.exception  # not an exception escaping the command
    assert "Traceback" not in res.output
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0] == lines[-1], res.output
    if only_line:  # refused before any work: nothing else was printed
        assert lines == errors, res.output
    assert expected in errors[0], (expected, errors[0])
    return errors[0]


def _file(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_run_bad_settings(tmp_path, corpus):
    out = tmp_path / "out"
    base = ["run", "--model", MODEL, "--data", str(corpus), "--out", str(out), "--workspace", str(tmp_path / "ws")]
    sae_dir = tmp_path / "sae"
    sae_dir.mkdir()
    cases = [
        (["--sae", str(sae_dir), "--layers", "0"], "--layers chooses where NEW SAEs are trained"),  # the report
        # options this run would not use were silently ignored (found by trying them): refused, named
        (["--sae", str(sae_dir), "--sae-k", "16", "--train-data", str(corpus)],
         "--sae-k does nothing here (no SAE is trained when --sae gives them): drop it; --train-data does nothing"),
        (["--l1-coefficient", "1"], "--l1-coefficient does nothing here (it is the reference recipe's penalty"),
        (["--sae-recipe", "reference", "--sae-k", "8"], "--sae-k does nothing here (it is the topk recipe's"),
        (["--no-circuit", "--circuit-ig-steps", "3"], "--circuit-ig-steps does nothing here (--no-circuit builds"),
        (["--max-prompts", "0"], "--max-prompts"),
        (["--sae-tokens", "-5"], "--sae-tokens"),
        (["--expansion-factor", "0"], "--expansion-factor"),
        (["--sae-recipe", "reference", "--l1-coefficient", "-1"], "--l1-coefficient"),
        (["--sae-recipe", "reference", "--l1-coefficient", "inf"], "--l1-coefficient must be a finite number >= 0 (got inf)"),
        (["--seed", "-1"], "--seed"),
        (["--seed", "x"], "--seed"),
        (["--layers", "0", "0"], "names a layer twice"),
        (["--layers", "0", "-1"], "numbered from 0"),
        (["--device", "gpu7"], "--device 'gpu7' is not a torch device"),
        (["--task", "bogus"], "unknown task 'bogus'"),
        (["--task", str(tmp_path / "none.jsonl")], "no such task file"),
        (["--tokenizer", str(tmp_path / "nope" / "tok512.bin")], "--tokenizer"),
        (["--sae", str(sae_dir)], "not an SAE folder (no cfg.json)"),
        (["--bogus"], "No such option: --bogus"),
    ]
    for extra, expected in cases:
        _refused(base + extra, expected)
    _refused(["run", "--model", MODEL, "--data", str(tmp_path / "absent.txt"), "--out", str(out)], "--data")
    _refused(["run", "--model", str(tmp_path / "no-model"), "--data", _file(tmp_path, "empty.txt", ""), "--out",
              str(out)], "--data " + str(tmp_path / "empty.txt") + ": the file is empty")  # before the model loads
    _refused(["run", "--data", str(corpus), "--out", str(out)], "Missing option '--model'")
    _refused(["run", "--model", MODEL, "--data", str(corpus), "--out", str(corpus)], "is a file")
    _refused(["run", "--model", str(tmp_path / "no-model"), "--data", str(corpus), "--out", str(out)],
             "neither an existing folder/file", only_line=False)
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00junk")
    _refused(["run", "--model", MODEL, "--data", str(binary), "--out", str(out)], "is not UTF-8 text",
             only_line=False)
    broken = tmp_path / "broken-model"
    shutil.copytree(MODEL, broken)
    (broken / "model.safetensors").write_bytes(b"not weights")
    _refused(["run", "--model", str(broken), "--data", str(corpus), "--out", str(out)],
             "the Hugging Face model cannot be loaded", only_line=False)
    # Found once the model is loaded (it has layers 0..1): still one line, exit 2.
    _refused(base + ["--layers", "7"], "out of range: the model has layers 0..1", only_line=False)
    assert not out.exists() and not (tmp_path / "ws" / "saes").exists()


def test_run_refuses_a_bad_task_file_before_the_model_loads(tmp_path, corpus):
    """A new user's report: a bad --task file failed only after the model and corpus loaded. What needs no tokenizer
    is checked first: the model named here does not exist, so reaching it would be a different error."""
    base = ["run", "--model", str(tmp_path / "no-model"), "--data", str(corpus), "--out", str(tmp_path / "out")]
    ok = '{"prompt": "Tom said, \\"Hi", "answer": "."}'
    cases = [
        ("notjson.jsonl", ok + "\n{prompt: 1}\n", "notjson.jsonl:2: not valid JSON"),
        ("nokey.jsonl", '{"prompt": "Tom said"}\n', 'nokey.jsonl:1: each line must be an object with string fields'),
        ("type.jsonl", '{"prompt": "Tom", "answer": 5}\n', "type.jsonl:1: each line must be an object"),
        ("empty.jsonl", '\n{"prompt": "", "answer": "."}\n', 'empty.jsonl:2: "prompt" is empty'),
        ("blank.jsonl", "\n\n", "holds no prompts"),
        # "Tom" has 3 characters: offsets 0-2
        ("anchor.jsonl", '{"prompt": "Tom", "answer": ".", "anchors": {"subject": 3}}\n',
         "anchor.jsonl:1: anchor 'subject' at character 3 is outside the prompt (3 characters, offsets 0-2)"),
        ("offset.jsonl", '{"prompt": "Tom", "answer": ".", "anchors": {"subject": "T"}}\n',
         "anchor 'subject' must be an integer character offset"),
        ("reserved.jsonl", '{"prompt": "Tom", "answer": ".", "anchors": {"P-1": 0}}\n', "is reserved"),
    ]
    for name, text, expected in cases:
        _refused(base + ["--task", _file(tmp_path, name, text)], expected)
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\xff\xfe\x00junk")
    _refused(base + ["--task", str(binary)], "is not UTF-8 text")
    # a good file passes the early check: the run goes on to the (missing) model
    _refused(base + ["--task", _file(tmp_path, "good.jsonl", ok + "\n")], "neither an existing folder/file",
             only_line=False)
    assert not (tmp_path / "out").exists()


def test_an_empty_argument_is_refused_not_read_as_the_current_folder(tmp_path, corpus, monkeypatch):
    """`--out ""` wrote results.json and report.html into the current folder, `--sae ""` listed every SAE below it
    (an empty path is "."; found by trying it): refused before any work, naming the option."""
    monkeypatch.chdir(tmp_path)
    run = ["run", "--model", MODEL, "--data", str(corpus)]
    _refused([*run, "--out", ""], "--out is given an empty value")
    _refused([*run, "--out="], "--out is given an empty value")
    _refused(["feature", "3", "--sae", ""], "--sae is given an empty value")
    _refused(["sae", "inspect", ""], "an argument is given an empty value")
    _refused(["report", ""], "an argument is given an empty value")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stories.txt"]


def test_demo_bad_settings_are_refused_before_the_model_is_made(tmp_path):
    ws = tmp_path / "ws"
    base = ["demo", "--workspace", str(ws), "--out", str(tmp_path / "out")]
    for extra, expected in [(["--max-prompts", "0"], "--max-prompts"), (["--sae-tokens", "0"], "--sae-tokens"),
                            (["--seed", "-2"], "--seed"), (["--device", "nope"], "not a torch device"),
                            (["--out", _file(tmp_path, "f.txt", "x")], "is a file"),
                            # options the demo would not use were silently ignored (as run's, now refused)
                            (["--l1-coefficient", "1"], "--l1-coefficient does nothing here (it is the reference"),
                            (["--sae-recipe", "reference", "--sae-k", "8"], "--sae-k does nothing here"),
                            (["--no-circuit", "--circuit-ig-steps", "3"], "--circuit-ig-steps does nothing here")]:
        _refused(base + extra, expected)
    assert not ws.exists()  # nothing copied, trained or generated


def test_train_lm_bad_settings(tmp_path):
    small = ["--steps", "1", "--n-train-stories", "20", "--n-tokenizer-stories", "20", "--n-heldout-stories", "5"]
    out = ["--out", str(tmp_path / "m")]
    _refused(["train-lm"], "give exactly one of --out DIR or --workspace DIR")
    _refused(["train-lm", *out, "--workspace", str(tmp_path / "ws")], "give exactly one")
    _refused(["train-lm", *out, "--n-heads", "0"], "--n-heads")
    _refused(["train-lm", *out, "--d-model", "15", "--n-heads", "2"], "not divisible")
    _refused(["train-lm", *out, "--lr", "-1"], "lr must be a positive finite number")
    # NaN passed `lr <= 0` and reached torch's bare "ValueError: Invalid learning rate" (found by trying it)
    _refused(["train-lm", *out, "--lr", "nan"], "lr must be a positive finite number, got nan")
    _refused(["train-lm", *out, "--lr", "inf"], "lr must be a positive finite number, got inf")
    _refused(["train-lm", *out, "--vocab-size", "10"], "--vocab-size")
    _refused(["train-lm", *out, "--threads", "0"], "--threads")
    _refused(["train-lm", *out, *small, "--n-tokenizer-stories", "50"], "n_tokenizer_stories must be <=")
    _refused(["train-lm", "--workspace", _file(tmp_path, "ws.txt", "x")], "is a file")
    # a file as --out was told to "pass --overwrite", which then refused it as a file (found by trying it)
    _refused(["train-lm", "--out", _file(tmp_path, "m.txt", "x")], "m.txt is a file; give a folder name")
    (tmp_path / "m").mkdir()
    _refused(["train-lm", *out], "--overwrite")


def test_train_sae_bad_settings(tmp_path, corpus):
    out = tmp_path / "run"
    base = ["train-sae", "--out", str(out)]
    flags = [*base, "--model", MODEL, "--data", str(corpus), "--no-progress"]
    cases = [
        ([*base, "--config", _file(tmp_path, "bad.json", "{")], "is not valid JSON"),
        ([*base, "--config", str(tmp_path / "absent.json")], "does not exist"),
        ([*base, "--config", _file(tmp_path, "list.json", "[1, 2]")], "must hold one JSON object"),
        ([*base, "--config", _file(tmp_path, "keys.json", '{"epochs": 3}')], "unknown train-sae config keys"),
        ([*base, "--config", _file(tmp_path, "type.json", '{"seq_len": "long"}')], "wrong type"),
        ([*base, "--config", _file(tmp_path, "type2.json", '{"train": {"batch_size": "x"}}')], "wrong type"),
        ([*base, "--config", _file(tmp_path, "ok.json", "{}"), "--preset", "54_serene_plasma"], "not both"),
        ([*base, "--preset", "nope"], "unknown preset 'nope'"),
        (base, "give --model and --data"),
        ([*base, "--model", MODEL, "--data", str(tmp_path / "absent.txt")], "--data"),
        ([*base, "--model", str(tmp_path / "absent-model"), "--data", str(corpus)], "--model"),
        ([*flags, "--architecture", "foo"], "unknown SAE architecture 'foo'"),
        ([*flags, "--architecture", "topk"], "needs an integer cfg.extra['k']"),
        # k was recorded in a ReLU SAE's cfg.json and ignored (found by looking for options like demo's)
        ([*flags, "--k", "8"], "k=8 does nothing for a standard SAE"),
        ([*flags, "--architecture", "jumprelu", "--k", "8"], "k=8 does nothing for a jumprelu SAE"),
        ([*flags, "--device", "nope"], "not a torch device"),
        ([*flags, "--regularizer", "foo"], "unknown regularizer 'foo'"),
        ([*flags, "--regularizer", "combined_hoyer_sqrt", "--coefficient", "1"], "takes 2 coefficient(s)"),
        ([*flags, "--coefficient", "-1"], "coefficients must be finite and >= 0"),
        ([*flags, "--batch-reduction", "max"], "batch_reduction must be 'mean' or 'sum'"),
        ([*flags, "--bos-policy", "some"], "bos_policy must be include"),
        ([*flags, "--activation-dtype", "int8"], "activation_dtype must be"),
        ([*flags, "--autocast", "fp8"], "autocast_dtype must be"),
        ([*flags, "--autocast", "float16"], "'float16' is refused"),
        ([*flags, "--steps", "0"], "--steps"),
        ([*flags, "--lr", "0"], "lr must be a positive finite number"),
        ([*flags, "--lr", "nan"], "lr must be a positive finite number (got nan)"),
        ([*flags, "--seq-len", "1"], "--seq-len"),
        ([*flags, "--threads", "0"], "--threads"),
        ([*base, "--activation-cache", str(tmp_path)], "no manifest.json"),
    ]
    for args, expected in cases:
        _refused(args, expected)
    assert not out.exists()
    # Found once the model is loaded: one line, exit 2, and no half-made run left behind (a corrected command
    # must not be refused with "already holds a run").
    line = _refused([*flags, "--hook-point", "blocks.9.mlp.hook_post"], "no hook 'blocks.9.mlp.hook_post'",
                    only_line=False)
    assert "valid hooks include blocks.1.mlp.hook_post" in line and "--hook-point NAME" in line
    assert not out.exists()
    out.mkdir()
    (out / "train_sae_job.json").write_text(json.dumps({}))
    _refused(flags, "already holds a run; pass --resume")


def test_report_bad_settings(tmp_path):
    _refused(["report", str(tmp_path / "absent.json")], "does not exist")
    _refused(["report", _file(tmp_path, "bad.json", "{")], "is not valid JSON")
    _refused(["report", _file(tmp_path, "old.json", '{"schema_version": 0}')], "old.json")
    _refused(["report", "--bogus"], "No such option")


def test_an_out_folder_that_cannot_be_created_says_why(tmp_path):
    # /proc takes no new entries (ENOENT): the folder cannot be created there, said before any training
    line = _refused(["train-lm", "--out", "/proc/saecircuits-x", "--steps", "1"],
                    "the folder cannot be created: /proc does not accept new files")
    assert "No such file" not in line
    from saecircuits.cli.report import report_path
    from saecircuits.pipeline import PipelineError

    for out in ("/proc/saecircuits-x", "/proc/saecircuits-x/r.html"):  # report --out, a folder or a file in one
        with pytest.raises(PipelineError, match="--out /proc/saecircuits-x: the folder cannot be created: /proc"):
            report_path(out)


def test_negative_numbers_after_a_multi_value_option_are_values():
    assert expand_multi_value_options(["run", "--layers", "0", "-1", "-v"]) == [
        "run", "--layers", "0", "--layers", "-1", "-v"]


def test_console_entry_point_prints_one_line_and_exits_2(tmp_path, corpus):
    # The real `saecircuits` entry point (a fresh process): the example of the issue.
    code = "import sys; from saecircuits.cli import main; sys.argv[0] = 'saecircuits'; main()"
    args = ["run", "--sae", str(tmp_path), "--layers", "0", "--model", MODEL, "--data", str(corpus),
            "--out", str(tmp_path / "out")]
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "error: --layers chooses where NEW SAEs are trained; with --sae the SAEs' own hook points are used. "
        "Drop --layers, or drop --sae to train SAEs on those layers"]


def test_a_model_with_offset_norms_loads_on_the_engine(tmp_path):
    """Gemma-style (1 + weight) RMSNorms were refused at load (issue 7 audit, gap 6); they are now read with their
    effective weight (issue 15): a tiny Gemma loads, and the engine passes its self-check against the Hugging Face
    forward, which would fail on a norm read without its offset."""
    from helpers import tiny_tokenizer
    from transformers import GemmaConfig, GemmaForCausalLM

    from saecircuits.models.interventions import interventions_for
    from saecircuits.models.load import load_model

    tok = tiny_tokenizer()
    cfg = GemmaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    hf = GemmaForCausalLM(cfg)
    with torch.no_grad():  # offsets far from 0, so reading w instead of 1 + w would show
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p))
    folder = tmp_path / "tiny-gemma"
    hf.save_pretrained(folder)
    tok.save_pretrained(folder)
    model = load_model(str(folder))
    assert interventions_for(model, backend="engine").backend == "engine"


def test_more_threads_than_cores_is_refused_by_every_command(tmp_path, corpus):
    # `run --threads 1000` on 2 cores ran 4x slower than --threads 1 and loaded the shared machine, without a word
    from saecircuits.cli import check_threads

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    too_many = ["--threads", str(cores + 1)]
    expected = f"--threads {cores + 1} is more than the {cores} core(s) this process may use; pass --threads {cores}"
    out, ws = tmp_path / "out", tmp_path / "ws"
    for args in (["run", "--model", MODEL, "--data", str(corpus), "--out", str(out), "--workspace", str(ws)],
                 ["demo", "--out", str(out), "--workspace", str(ws)],
                 ["feature", "--sae", str(tmp_path / "absent"), "0"],
                 ["train-lm", "--out", str(tmp_path / "m")],
                 ["train-sae", "--out", str(tmp_path / "run"), "--model", MODEL, "--data", str(corpus)]):
        _refused(args + too_many, expected)
    assert not out.exists() and not ws.exists() and not (tmp_path / "m").exists()
    check_threads(cores)  # as many threads as cores, and the default, are fine
    check_threads(None)


def test_two_saes_on_one_hook_with_the_circuit_are_refused_before_the_model_loads(tmp_path, corpus):
    # this was a ValueError traceback (exit 1) from the circuit stage, after every other analysis had run
    from saecircuits.saes.base import SAEConfig
    from saecircuits.saes.io import save_sae
    from saecircuits.saes.registry import build_sae

    paths = [save_sae(build_sae(SAEConfig("standard", 512, 64, "blocks.0.mlp.hook_post"), seed=s), tmp_path / f"s{s}")
             for s in (1, 2)]
    out = tmp_path / "out"
    line = _refused(["run", "--model", MODEL, "--data", str(corpus), "--out", str(out), "--workspace",
                     str(tmp_path / "ws"), "--sae", str(paths[0]), "--sae", str(paths[1])],
                    "both write blocks.0.mlp.hook_post; the circuit takes at most one SAE per hook", only_line=False)
    assert f"--sae {paths[0]} and --sae {paths[1]}" in line and "--no-circuit" in line
    assert not out.exists()
