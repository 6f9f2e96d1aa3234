"""``--dtype``: a whole run in bfloat16 agrees with the float32 run within bf16's accuracy; the setting is checked,
reaches the model loader from the CLI, and is recorded in results.json."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from helpers import NO_CUDA, STORIES, tiny_neo_hf, tiny_tokenizer
from torch.overrides import TorchFunctionMode

from saecircuits.pipeline import PipelineError, RunConfig, run_pipeline

N_TOP = 5  # results.json's top_features per SAE


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """The tiny random GPT-Neo of the pipeline tests as a Hugging Face folder, so ``--dtype`` goes through
    ``load_model``."""
    folder = tmp_path_factory.mktemp("tiny-neo")
    tiny_neo_hf().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


class Low16Reductions(TorchFunctionMode):
    """Records where an analysis reduces 16-bit tensors: every sum, mean, log-sum-exp, softmax, matmul ... whose
    operand is bfloat16/float16, called from saecircuits code outside :mod:`saecircuits.models` (the forward, its
    hooks and the metrics, which upcast themselves) and outside a library forward (transformers, TransformerLens),
    as ``{"file.py:line op"}``. Elementwise edits (``x * (1 - m) + m * mu``) are not reductions: they write back
    into the 16-bit stream."""

    REDUCTIONS = frozenset({
        "sum", "mean", "nansum", "nanmean", "logsumexp", "log_softmax", "softmax", "std", "var", "cumsum", "prod",
        "einsum", "matmul", "__matmul__", "mm", "bmm", "addmm", "dot", "norm", "linalg_vector_norm", "index_add_",
        "index_add", "scatter_add_", "scatter_add", "quantile"})

    def __init__(self):
        super().__init__()
        self.sites: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in self.REDUCTIONS and any(
                isinstance(t, torch.Tensor) and t.dtype in (torch.bfloat16, torch.float16)
                for t in (*args, *kwargs.values(), *(x for a in args if isinstance(a, (list, tuple)) for x in a))):
            frame = sys._getframe(1)
            while frame is not None and "/torch/" in frame.f_code.co_filename:
                frame = frame.f_back
            name = frame.f_code.co_filename if frame is not None else ""
            if "/saecircuits/" in name and "/saecircuits/models/" not in name:
                self.sites.add(f"{name.split('/saecircuits/')[-1]}:{frame.f_lineno} {func.__name__}")
        return func(*args, **kwargs)


def _cfg(tmp_path, model_folder, name: str, **kw) -> RunConfig:
    corpus = tmp_path / "stories.txt"
    if not corpus.exists():
        corpus.write_text("".join(f"{s}\n<|endoftext|>\n" for s in STORIES * 3), encoding="utf-8")
    base = dict(model=str(model_folder), data=corpus, out=tmp_path / name, workspace=tmp_path / "ws",
                closings=('."', '!"', '?"'), sae_tokens=2048, sae_batch_size=256, seq_len=32, expansion_factor=4,
                max_candidates=5, n_example_features=2, n_examples=2, seed=0)  # 4 x d_in: the tiny SAEs' size
    return RunConfig(**(base | kw))


def _max_abs_logit(model_folder, results: dict) -> float:
    """The largest |logit| of the float32 model at P over the run's prompts (the scale of bf16's rounding)."""
    from saecircuits.models.load import load_model
    from saecircuits.tasks.closing_quote import closing_quote_task

    model = load_model(str(model_folder))
    task = closing_quote_task(STORIES * 3, model.tokenizer, closings=('."', '!"', '?"'))
    assert task.n_prompts == results["task"]["n_prompts"]
    with torch.no_grad():
        return max(float(model(torch.tensor([ids]))[0, -1].abs().max()) for ids in task.token_ids)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason=NO_CUDA))])
def test_a_bf16_run_agrees_with_the_float32_run_within_bf16_accuracy(tmp_path, model_folder, device):
    """The same SAEs (trained by the float32 run) analysed on the model loaded in bfloat16: the whole run completes
    and its headline numbers (the DLA of every component, each SAE's clean, spliced, zero- and mean-ablated loss,
    the top features' loss increases) are the float32 run's to within one bf16 rounding step of the largest logit,
    ``tol = eps_bf16 * max |logit|`` (2**-7 * 17 = 0.13 nats here), and the top features are the same set.

    One step, not the engine's worst case for a single value (:func:`rounding_tolerance`, 2 (L + 1) steps): these
    are means over prompts, and effects are differences taken on one path, whose rounding errors do not add up in
    one direction (measured: at most 0.18 of a step, the SAE-spliced loss). A bf16 run that trains its own SAEs
    keys them apart from the float32 ones. No analysis reduces the bf16 activations in bf16
    (:class:`Low16Reductions`)."""
    f32 = run_pipeline(_cfg(tmp_path, model_folder, "f32", device=device), progress=False)
    cache = f32["saes"][0]["training"]["cache"]
    folders = [f"{cache}/{s['hook_point']}/sae" for s in f32["saes"]]
    with Low16Reductions() as low:
        bf16 = run_pipeline(_cfg(tmp_path, model_folder, "bf16", device=device, dtype="bfloat16", sae_paths=folders),
                            progress=False)
    assert not low.sites, sorted(low.sites)
    a = json.loads((tmp_path / "f32" / "results.json").read_text())
    b = json.loads((tmp_path / "bf16" / "results.json").read_text())
    assert (a["model_info"]["dtype"], b["model_info"]["dtype"]) == ("float32", "bfloat16")
    assert b["model_info"]["device"].startswith(device) and b["config"]["dtype"] == "bfloat16"
    assert b["provenance"]["dtype"] == "bfloat16" and bf16["saes"][0]["clean_loss"] == b["saes"][0]["clean_loss"]

    tol = torch.finfo(torch.bfloat16).eps * _max_abs_logit(model_folder, a)
    diffs = {"dla": max(abs(x - y) for x, y in zip(a["dla"]["mean"], b["dla"]["mean"], strict=True))}
    largest_effect = 0.0
    for i, (sa, sb) in enumerate(zip(a["saes"], b["saes"], strict=True)):
        for key in ("clean_loss", "sae_loss", "zero_ablation_loss", "mean_ablation_loss"):
            diffs[f"{i}.{key}"] = abs(sa[key] - sb[key])
        top_a = {t["feature"]: t["loss_increase"] for t in sa["top_features"]}
        top_b = {t["feature"]: t["loss_increase"] for t in sb["top_features"]}
        assert len(top_a) == N_TOP and set(top_a) == set(top_b), (sa["hook_point"], sorted(top_a), sorted(top_b))
        diffs[f"{i}.top_features"] = max(abs(top_a[k] - top_b[k]) for k in top_a)
        largest_effect = max(largest_effect, *(abs(v) for v in top_a.values()))
    assert largest_effect > 2 * tol  # the top effects are well above the bound: an ablation lost in bf16 shows
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= tol, f"{worst}: {diffs[worst]:.3g} > {tol:.3g} ({diffs})"

    # SAEs trained on the bf16 model's activations are another cache entry than the float32 ones
    own = run_pipeline(_cfg(tmp_path, model_folder, "bf16-own", device=device, dtype="bfloat16", circuit=False,
                            n_evidence_features=0), progress=False)
    assert own["saes"][0]["training"]["reused"] is False and own["saes"][0]["training"]["cache"] != cache


def test_the_dtype_setting_is_checked_before_any_work(tmp_path, monkeypatch):
    corpus = tmp_path / "c.txt"
    with pytest.raises(PipelineError, match=r"--dtype 'float64' is not one of float32, bfloat16, float16"):
        RunConfig(model="m", data=corpus, out=tmp_path / "o", dtype="float64")
    RunConfig(model="m", data=corpus, out=tmp_path / "o", dtype="float16")  # this torch computes float16 on CPUs

    def no_half(*args, **kwargs):
        raise RuntimeError('"LayerNormKernelImpl" not implemented for \'Half\'')

    monkeypatch.setattr(torch.nn.functional, "layer_norm", no_half)  # a torch build without CPU float16 kernels
    with pytest.raises(PipelineError, match="--dtype float16 does not compute on the CPU.*use --dtype bfloat16"):
        RunConfig(model="m", data=corpus, out=tmp_path / "o", dtype="float16")


def test_a_given_model_of_another_dtype_is_refused(tmp_path):
    from saecircuits.models.load import load_hf_model

    corpus = tmp_path / "c.txt"
    corpus.write_text('Tom said, "Hi."\n', encoding="utf-8")
    model = load_hf_model(tiny_neo_hf(), tiny_tokenizer(), dtype=torch.bfloat16)
    cfg = RunConfig(model="tiny", data=corpus, out=tmp_path / "o", workspace=tmp_path / "ws", dtype="float32")
    with pytest.raises(PipelineError, match="the model given is in bfloat16 but dtype='float32'"):
        run_pipeline(cfg, model=model, progress=False)


def test_dtype_flags_reach_the_run_config_and_the_feature_card(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import saecircuits.cli.feature  # noqa: F401 - registers the feature command
    import saecircuits.cli.run as cli_run
    import saecircuits.feature_card as card_module
    from saecircuits.cli import app

    seen, cards = [], []
    monkeypatch.setattr(cli_run, "_execute", lambda cfg, export, resume=False: seen.append(cfg))
    monkeypatch.setattr(cli_run, "_threads", lambda n: None)
    monkeypatch.setattr(card_module, "feature_card", lambda *a, **kw: cards.append(kw) or {"saes": []})
    corpus = tmp_path / "stories.txt"
    corpus.write_text('Tom said, "Hi."\n', encoding="utf-8")
    argv = ["run", "--model", str(tmp_path), "--data", str(corpus), "--out", str(tmp_path / "o"),
            "--workspace", str(tmp_path / "ws")]
    assert CliRunner().invoke(app, argv).exit_code == 0 and seen[-1].dtype == "float32"
    assert CliRunner().invoke(app, [*argv, "--dtype", "bfloat16"]).exit_code == 0 and seen[-1].dtype == "bfloat16"
    bad = CliRunner().invoke(app, [*argv, "--dtype", "fp8"])
    assert bad.exit_code == 2 and "float32, bfloat16, float16" in bad.output
    CliRunner().invoke(app, ["feature", "3", "--sae", str(tmp_path), "--dtype", "bfloat16"])  # the card is empty
    assert cards[-1]["dtype"] == "bfloat16"


def test_a_float16_overflow_stops_the_run_naming_the_cause(tmp_path):
    """float16's largest value is 65,504: a model whose activations pass it gives inf/NaN logits, and the run stops
    at the first number (the clean answer loss) instead of reporting NaN effects."""
    from saecircuits.models.load import load_hf_model

    corpus = tmp_path / "stories.txt"
    corpus.write_text("".join(f"{s}\n<|endoftext|>\n" for s in STORIES * 3), encoding="utf-8")
    hf = tiny_neo_hf()
    with torch.no_grad():
        hf.transformer.h[0].mlp.c_proj.weight.mul_(1e5)  # the first MLP writes values past 65,504
    model = load_hf_model(hf, tiny_tokenizer(), dtype=torch.float16)
    cfg = RunConfig(model="tiny", data=corpus, out=tmp_path / "o", workspace=tmp_path / "ws", sae_tokens=256,
                    sae_batch_size=256, closings=('."', '!"', '?"'), dtype="float16", circuit=False)
    with pytest.raises(PipelineError, match=r"not finite on \d+ of \d+ prompts in float16: its activations overflow "
                                            r"float16 \(largest value 65504\); use --dtype bfloat16"):
        run_pipeline(cfg, model=model, progress=False)
    assert not (tmp_path / "o" / "results.json").exists()
