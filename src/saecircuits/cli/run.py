"""``saecircuits run`` (any model and corpus) and ``saecircuits demo`` (the embedded default)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from saecircuits.cli import SaeCommand, app, num, user_errors
from saecircuits.display import percent

DEFAULT_WORKSPACE = Path(os.environ.get("SAECIRCUITS_WORKSPACE", Path.home() / ".cache" / "saecircuits"))


def _setup_logging(verbose: bool) -> None:
    """Stage logs on stderr: rich on a terminal; plain lines (never wrapped) in a log file or pipe."""
    level = logging.INFO if verbose else logging.WARNING
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(show_path=False, show_time=False)
        fmt = "%(message)s"
    else:
        handler, fmt = logging.StreamHandler(sys.stderr), "%(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt, handlers=[handler], force=True)


def _say(line: str) -> None:
    """One status line on stderr; soft_wrap: a long path is never folded at the console width (80 in a log)."""
    from rich.console import Console
    from rich.markup import escape  # "[0, 1]" or a path with brackets is text, not rich markup

    Console(stderr=True, soft_wrap=True).print(f"[bold cyan]saecircuits[/] {escape(line)}", highlight=False)


def _ratio_text(sae: dict, key: str) -> str:
    """A ratio for the console (loss recovered, faithfulness): 'value [lo, hi]' from ``key`` and ``key_ci95``, or
    'undefined' (its reason is in the checks block or the circuit's record)."""
    value = sae.get(key)
    if value is None or value != value:  # null or NaN: undefined, so no interval either
        return "undefined"
    lo, hi = sae.get(f"{key}_ci95") or (None, None)
    return num(value, '.3f') + (f" [{num(lo, '.3f')}, {num(hi, '.3f')}]" if lo is not None and hi is not None else "")


def _seq_text(sae: dict) -> str:
    """'; over every position of the prompts: ...' (explained variance and loss recovered), or '' (not computed)."""
    q = sae.get("whole_sequence")
    if not q:
        return ""
    return (f"; over every position of the prompts: explained variance {num(q.get('explained_variance'), '.3f')}, "
            f"loss recovered {_ratio_text(q, 'loss_recovered')}")


def _checks_block(console, results: dict) -> None:
    """Every failed check with what to try, or one line saying all passed."""
    from rich.markup import escape

    checks = results.get("checks")
    if checks is None:
        return
    if not checks:
        console.print("[green]checks:[/] all passed (the model performs the behaviour; every SAE reconstructs "
                      "the hook at P better than mean ablation, with defined loss recovered, explained variance at P "
                      "and loss recovered over every position not low, and records no other model)")
        return
    console.print(f"[bold yellow]checks: {len(checks)} warning(s)[/]")
    for c in checks:
        console.print(f"  [yellow]WARNING[/] {escape('[' + c['scope'] + ']')} {escape(c['message'])}")
        console.print(f"    try: {escape(c['what_to_try'])}")


def _summary(results: dict) -> None:
    """Print whether the model performs the behaviour, each SAE's quality and top features, and the checks."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(soft_wrap=True)  # lines are not folded at 80 columns when written to a log file
    task = results["task"]
    console.print(
        f"[bold]{escape(str(results['model']))}[/] | task {escape(str(task['name']))}: {task['n_prompts']} prompts | "
        f"DLA completeness error {num(results['dla']['completeness_max_abs_error'], '.2e')} logits"
    )
    b = results.get("behaviour")
    if b:
        console.print(
            ("[green]the model performs the behaviour:[/] " if b["performs"] else
             "[bold red]WARNING: the model does NOT perform the behaviour:[/] ")
            + f"clean top-1 accuracy {percent(b['top1_accuracy'], 1)}, mean p(answer) "
            f"{num(b['mean_p_answer'], '.3f')}, "
            f"mean loss at P {num(b['mean_loss'], '.3f')} nats"
        )
    for sae in results["saes"]:
        failed = sae.get("failed_checks") or []
        task_failed = [c for c in results.get("checks") or [] if c["scope"] == "task"]
        if failed or task_failed:
            console.print(
                f"[bold red]WARNING {escape(sae['hook_point'])}:[/] {len(failed) + len(task_failed)} check(s) "
                f"failed ({', '.join([c['id'] for c in task_failed] + failed)}); its feature ranking below cannot "
                "support a conclusion as it stands (see the checks)"
            )
        ev = sae.get("explained_variance_at_p")
        table = Table(title=(
            f"{escape(sae['hook_point'])}  (d_sae {sae['d_sae']}, L0 at P {num(sae['l0'], '.1f')}, explained "
            f"variance at P {'undefined' if ev is None else num(ev, '.3f')}, loss recovered "
            f"{_ratio_text(sae, 'loss_recovered')} vs zero / {_ratio_text(sae, 'loss_recovered_mean_ablation')} "
            f"vs mean ablation at P{_seq_text(sae)})"))
        for col in ("feature", "loss increase (nats)", "±95%", "mean act", "frac active"):
            table.add_column(col, justify="right")
        for f in sae["top_features"][:8]:
            table.add_row(str(f["feature"]), num(f["loss_increase"], ".4f"), num(f.get("loss_increase_ci95"), ".4f"),
                          num(f["mean_activation"], ".3f"), num(f["fraction_active"], ".3f"))
        console.print(table)
        console.print(
            f"  answer loss at P (nats): clean {num(sae['clean_loss'], '.4f')}, SAE spliced "
            f"{num(sae['sae_loss'], '.4f')}, zero "
            f"ablation {num(sae['zero_ablation_loss'], '.4f')}, mean ablation {num(sae['mean_ablation_loss'], '.4f')}"
        )
        if "multi_ablation" in sae:
            m = sae["multi_ablation"]
            console.print(
                f"  ablating {m['features']} together, original - ablated: answer logprob "
                f"{num(m['logprob_diff']['mean'], '+.3f')} ± {num(m['logprob_diff'].get('ci95'), '.3f')} nats, "
                f"logit {num(m['logit_diff']['mean'], '+.3f')}, rank {num(m['rank_diff']['mean'], '+.2f')} "
                "(positive logprob/logit: the ablation hurts the answer)"
            )
    _study_summary(console, results)
    _checks_block(console, results)
    for note in results.get("notes", []):
        console.print(f"[yellow]note:[/] {escape(note)}")


CONSOLE_FEATURES = 8
"""Features per SAE in the console's corpus table (the report and results.json hold every listed feature)."""


def _study_summary(console, results: dict) -> None:
    """The five-way loss comparison of every SAE and the top features' corpus density and top tokens."""
    from rich.markup import escape
    from rich.table import Table

    from saecircuits.report.summary import quoted_token

    for sae in results["saes"]:
        lc = sae.get("loss_comparison")
        if lc:
            table = Table(title=f"{escape(sae['hook_point'])}: answer loss at P (nats), {lc.get('n_prompts')} prompts")
            for col in ("run", "loss", "±95%", "run - clean", "±95% (paired)"):
                table.add_column(col, justify="right")
            for j, label in enumerate(lc["labels"]):
                cells = [lc["mean"][j], lc["ci95"][j], lc["diff_vs_clean"][j], lc["diff_vs_clean_ci95"][j]]
                table.add_row(escape(label), *("n/a" if v is None else num(v, '.4f') for v in cells))
            console.print(table)
        cs = sae.get("corpus_stats")
        if cs and cs["features"]:
            table = Table(title=f"{escape(sae['hook_point'])}: top features over {cs['n_docs']} corpus documents "
                                f"(L0 {num(cs['l0'], '.1f')}, {cs.get('n_dead', 0)} dead)")
            for col in ("feature", "density", "max", "top tokens (count)"):
                table.add_column(col, justify="right" if col != "top tokens (count)" else "left")
            for fe in cs["features"][:CONSOLE_FEATURES]:
                toks = ", ".join(f"{quoted_token(t)} ({c})" for t, c in fe["top_tokens"][:5])
                table.add_row(str(fe["feature"]), num(fe["density"], ".2e"), num(fe["max_activation"], ".3f"),
                              escape(toks))
            console.print(table)
            if len(cs["features"]) > CONSOLE_FEATURES:
                console.print(f"  ... and {len(cs['features']) - CONSOLE_FEATURES} more features: the report's "
                              "feature browser and results.json have every one")
    _circuit_summary(console, results)


def _circuit_summary(console, results: dict) -> None:
    """The circuit in two lines: its size and faithfulness at P, and where across positions the evidence comes from
    (the words of circuit.json's positions summary)."""
    from rich.markup import escape

    c = results.get("circuit")
    if not c:
        return
    sel = c.get("selection") or {}
    if sel.get("n_nodes") is not None:
        console.print(f"circuit at P: {sel['n_nodes']} nodes ({escape(str(sel.get('rule', '')))}), faithfulness "
                      f"{_ratio_text(sel, 'faithfulness')}, completeness {_ratio_text(sel, 'completeness')}; "
                      f"the whole graph is in {escape(str(c.get('file', 'circuit.json')))}")
    pos = c.get("positions")
    if pos and pos.get("summary"):
        console.print(f"circuit across positions: {escape(pos['summary'])}")


def _threads(n: int | None) -> None:
    """Set torch's intra-op thread count once for the whole run (default: every core this process may use; under
    torchrun its share, the cores over the ranks of this machine, ``LOCAL_WORLD_SIZE``).

    Two processes that each take every core slow each other several times over; give each its share."""
    import torch

    from saecircuits.cli import check_threads, usable_cores

    check_threads(n)
    if n is None:
        n = usable_cores() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch.set_num_threads(max(1, n))


def _feature_selection(value: str) -> str | int:
    """``--feature-selection``: 'all' or a positive int N (per prompt, the N features with the largest |act x DLA|)."""
    if value == "all":
        return value
    if value.isdigit() and int(value) >= 1:
        return int(value)
    raise typer.BadParameter(f"must be 'all' or a positive integer, got {value!r}")


def _layers(values: list[str] | None) -> list[int] | str | None:
    """``--layers``: layer numbers, or the single word 'auto'."""
    from saecircuits.cli import InputError

    if not values:
        return None
    if values == ["auto"]:
        return "auto"
    try:
        return [int(v) for v in values]
    except ValueError:
        raise InputError(f"--layers takes layer numbers (e.g. --layers 0 1) or the word auto, got "
                         f"{' '.join(values)}") from None


def _sae_recipe(value: str) -> str:
    """``--sae-recipe``: topk or reference (saes.presets.pipeline_recipe)."""
    from saecircuits.saes.presets import SAE_RECIPES

    if value not in SAE_RECIPES:
        raise typer.BadParameter(f"must be one of {', '.join(SAE_RECIPES)}, got {value!r}")
    return value


def _ablation_mode(value: str) -> str:
    """``--ablation-mode``: residual, reconstruction or clean_effect (analysis.ablation_modes)."""
    from saecircuits.analysis.ablations.modes import ABLATION_MODES

    if value not in ABLATION_MODES:
        raise typer.BadParameter(f"must be one of {', '.join(ABLATION_MODES)}, got {value!r}")
    return value


ABLATION_MODE_HELP = ("How features are ablated: 'residual' (remove their decoded part, keep the SAE error), "
                      "'reconstruction' (SAE reconstruction without them) or 'clean_effect' (that, vs the plain "
                      "reconstruction).")
SAE_HELP = ("Analyse existing SAEs instead: folders or files of any family saecircuits reads (SAELens, sparsify, "
            "dictionary_learning, Gemma Scope, OpenAI, Goodfire, Llama Scope, circuit-tracer; see 'saecircuits sae "
            "inspect'), hf://owner/repo/path or a SAELens release/sae_id (read from the Hugging Face cache; "
            "downloaded only when online).")
HOOK_HELP = ("The TransformerLens hook each --sae reads (one per --sae, in order; 'auto' = what its files say), for "
             "SAEs whose files do not say it (e.g. Gemma Scope .npz, Goodfire .pth).")
THREADS_HELP = "torch threads for the whole run, at most the cores this process may use (default: all of them)."
EXPORT_HELP = ("Also write every figure of the report as PNG (figures/, needs kaleido and Chrome or Chromium) and "
               "every table as CSV (tables/) beside it.")
# Shown defaults are RunConfig's and saes.presets' (DEFAULT_SAE_RECIPE, DEFAULT_TOPK_K); importing them here would
# load torch for every --help. tests/cli/test_cli_help.py checks that they agree.
SAE_RECIPE_HELP = ("How new SAEs are trained: 'topk' (TopK with --sae-k active features per token, AuxK against dead "
                   "features: the same sparsity on any model) or 'reference' (the reference notebook's ReLU SAE with "
                   "an L1 penalty, --l1-coefficient; its sparsity depends on the model).")
SAE_K_HELP = "Active features per token of the topk recipe."
SELECTION_HELP = ("Features whose exact ablation effect is computed on each prompt: 'all' active ones, or the N "
                  "with the largest |activation x DLA|.")


def _execute(cfg, model=None, export: bool = False, resume: bool = False) -> None:
    from saecircuits.distributed import ShardError, launch_rank
    from saecircuits.pipeline import run_pipeline

    try:
        with user_errors():
            results = run_pipeline(cfg, model=model, log=_say, resume=resume)
    except ShardError as err:  # another rank of a sharded run died: one line, no traceback
        typer.echo(f"Error: {err}", err=True)
        raise typer.Exit(1) from None
    if launch_rank() != 0:  # a sharded run: rank 0 prints and writes
        return
    _summary(results)
    typer.echo(f"report: {Path(cfg.out) / 'report.html'}")
    if export:
        from saecircuits.cli.report import run_export

        run_export(results, Path(cfg.out))


_WORKSPACE_SHOWN = "$SAECIRCUITS_WORKSPACE, else ~/.cache/saecircuits"
RESUME_HELP = ("Go on from where a failed run into the same --out stopped: the stages it finished are read back from "
               "its checkpoint, not run again (refused when a setting differs).")
CIRCUIT_HELP = ("Build the feature circuit across the SAEs' layers: exact node and edge effects, attribution "
                "patching and integrated gradients checked against them, faithfulness and completeness "
                "(circuit.json).")
POSITION_CIRCUIT_HELP = ("With the circuit: also build it across positions (nodes at every position of the prompts, "
                        "exact effects, edges, head loadings), most of the circuit stage's time. --no-position-circuit "
                        "keeps only the circuit at the answer position; circuit.json then says why it has no "
                        "\"positions\".")
TASK_HELP = ("'closing-quote', or a JSONL task file, one {\"prompt\": ..., \"answer\": ...} per line; a line may add "
             "\"anchors\": {\"name\": char_offset} (0-based character offsets into the prompt) to align the named "
             "tokens across prompts in the circuit across positions (a prompt without anchors is aligned by "
             "distance from P).")
DTYPE_HELP = ("dtype the model is loaded and run in: float32, bfloat16 or float16 (the 16-bit ones are meant for "
              "GPUs). SAEs keep their own dtype (new ones float32); every reported number is reduced in float32 or "
              "float64. results.json records it (model_info.dtype).")


def _dtype(value: str) -> str:
    """``--dtype``: one of pipeline.config.MODEL_DTYPES (float16 on a CPU is checked by RunConfig)."""
    from saecircuits.pipeline.config import MODEL_DTYPES

    if value not in MODEL_DTYPES:
        raise typer.BadParameter(f"must be one of {', '.join(MODEL_DTYPES)}, got {value!r}")
    return value


def _unused_options(ctx: typer.Context, *, sae_given: bool, recipe: str, circuit: bool) -> None:
    """Refuse options given on the command line that this run would not use (they were silently ignored: a user
    who sets --l1-coefficient with the topk recipe, or --sae-k beside --sae, believes it changed something).

    Raises:
        InputError: naming each such option and why it does nothing here.
    """
    from saecircuits.cli import InputError

    def given(name: str) -> bool:  # by name: typer may carry its own copy of click's ParameterSource enum
        return getattr(ctx.get_parameter_source(name), "name", None) == "COMMANDLINE"

    training = ("sae_tokens", "expansion_factor", "sae_recipe", "sae_k", "l1_coefficient", "train_data")
    unused = []
    if sae_given:
        unused += [(n, "no SAE is trained when --sae gives them") for n in training if given(n)]
    elif recipe == "topk" and given("l1_coefficient"):
        unused.append(("l1_coefficient", "it is the reference recipe's penalty; add --sae-recipe reference"))
    elif recipe == "reference" and given("sae_k"):
        unused.append(("sae_k", "it is the topk recipe's sparsity; the reference recipe's is --l1-coefficient"))
    if not circuit:
        unused += [(n, "--no-circuit builds no circuit") for n in ("circuit_ig_steps",)
                   if given(n)]
    if unused:
        raise InputError("; ".join(f"--{n.replace('_', '-')} does nothing here ({why}): drop it"
                                   for n, why in unused))


@app.command("run", cls=SaeCommand, short_help="Find the SAE features behind a behaviour of any model.")
def run(
    ctx: typer.Context,
    model: Annotated[str, typer.Option(
        metavar="NAME|DIR|FILE", help="Hub name, local Hugging Face folder, llama2.c .bin checkpoint, or 'default' "
                                      "(the embedded 2-layer GPT-Neo the demo uses).")],
    data: Annotated[Path, typer.Option(
        metavar="FILE", help="Corpus for prompts and statistics: text (<|endoftext|> or blank-line separated), "
                             "JSONL with 'text', or Parquet with a 'text' column.")],
    out: Annotated[Path, typer.Option(metavar="DIR", help="Output folder for results.json and report.html.")],
    task: Annotated[str, typer.Option(
        metavar="TASK", help=TASK_HELP)] = "closing-quote",
    train_data: Annotated[Path | None, typer.Option(
        metavar="FILE", show_default="the --data corpus", help="Corpus the SAEs are trained on.")] = None,
    tokenizer: Annotated[str | None, typer.Option(
        metavar="FILE|DIR", show_default="the model's own",
        help="Tokenizer: a llama2.c tok*.bin or a Hugging Face tokenizer folder.")] = None,
    layers: Annotated[list[str] | None, typer.Option(
        metavar="L...|auto", show_default="every layer",
        help="Layers whose MLP output gets a new SAE (space-separated or repeated), or 'auto': the 2 MLP layers "
             "whose mean ablation at the answer position raises the answer's loss the most.")] = None,
    sae: Annotated[list[str] | None, typer.Option(
        "--sae", metavar="PATH...", show_default="none: train new SAEs", help=SAE_HELP)] = None,
    hook: Annotated[list[str] | None, typer.Option(
        "--hook", metavar="HOOK...", show_default="what each SAE's files say", help=HOOK_HELP)] = None,
    sae_tokens: Annotated[int, typer.Option(
        metavar="N", min=1, help="Activations each new SAE is trained on.")] = 400_000,
    expansion_factor: Annotated[int | None, typer.Option(
        metavar="N", min=1, show_default="max(4 x d_in, 2048) features",
        help="d_sae = expansion_factor * d_in.")] = None,
    sae_recipe: Annotated[str, typer.Option(
        metavar="topk|reference", callback=_sae_recipe, help=SAE_RECIPE_HELP)] = "topk",
    sae_k: Annotated[int, typer.Option(metavar="K", min=1, help=SAE_K_HELP)] = 32,
    l1_coefficient: Annotated[float, typer.Option(
        metavar="X", min=0.0,
        help="Reference recipe only: per-token L1 coefficient on activations normalised to mean norm "
             "sqrt(d_in).")] = 0.3,
    all_closings: Annotated[bool, typer.Option(
        "--all-closings", show_default="off: only .\" closes",
        help='Also accept !" and ?" as the closing.')] = False,
    max_prompts: Annotated[int, typer.Option(metavar="N", min=1, help="Use at most this many task prompts.")] = 1000,
    fold_ln: Annotated[bool, typer.Option(
        "--fold-ln/--no-fold-ln", help="Fold LayerNorm weights into the next layer.")] = True,
    center_writing_weights: Annotated[bool, typer.Option(
        "--center-writing-weights/--no-center-writing-weights",
        help="Remove the mean over d_model from every weight that writes to the residual stream.")] = True,
    center_unembed: Annotated[bool, typer.Option(
        "--center-unembed/--no-center-unembed",
        help="Remove the mean over the vocabulary from the unembedding (log-probs unchanged).")] = True,
    include_bos: Annotated[bool, typer.Option(
        "--include-bos", show_default="off",
        help="Keep BOS positions in SAE training and in the mean activation.")] = False,
    device: Annotated[str, typer.Option(metavar="DEVICE", help="cpu, cuda, cuda:1, mps.")] = "cpu",
    dtype: Annotated[str, typer.Option(
        metavar="float32|bfloat16|float16", callback=_dtype, help=DTYPE_HELP)] = "float32",
    seed: Annotated[int, typer.Option(metavar="N", min=0, help="Seed of SAE training and bootstraps.")] = 0,
    workspace: Annotated[Path, typer.Option(
        metavar="DIR", show_default=_WORKSPACE_SHOWN,
        help="Cache folder (converted models, trained SAEs).")] = DEFAULT_WORKSPACE,
    feature_selection: Annotated[str, typer.Option(
        metavar="all|N", callback=_feature_selection, help=SELECTION_HELP)] = "all",
    ablation_mode: Annotated[str, typer.Option(
        metavar="MODE", callback=_ablation_mode, help=ABLATION_MODE_HELP)] = "residual",
    circuit: Annotated[bool, typer.Option(
        "--circuit/--no-circuit", help=CIRCUIT_HELP)] = True,
    circuit_ig_steps: Annotated[int, typer.Option(
        metavar="N", min=1, help="Integrated-gradients steps of the circuit's gradient estimates.")] = 10,
    position_circuit: Annotated[bool, typer.Option(
        "--position-circuit/--no-position-circuit", help=POSITION_CIRCUIT_HELP)] = True,
    threads: Annotated[int | None, typer.Option(
        metavar="N", min=1, show_default="all cores", help=THREADS_HELP)] = None,
    export: Annotated[bool, typer.Option("--export", show_default="off", help=EXPORT_HELP)] = False,
    resume: Annotated[bool, typer.Option("--resume", show_default="off", help=RESUME_HELP)] = False,
    verbose: Annotated[bool, typer.Option(
        "--verbose", "-v", show_default="off", help="Log each stage.")] = False,
) -> None:
    """Find the SAE features behind a behaviour of any model: train SAEs, attribute, ablate, report.

    Under torchrun (torchrun --nproc_per_node N --no-python saecircuits run ...) the exact effects, the circuit at P and
    the corpus passes are split over the ranks, with the numbers of one process; rank 0 writes.
    """
    from saecircuits.pipeline import RunConfig, sae_path

    _setup_logging(verbose)
    _unused_options(ctx, sae_given=bool(sae), recipe=sae_recipe, circuit=circuit)
    with user_errors():  # settings are checked here, where a bad one becomes a one-line error
        cfg = RunConfig(
            model=model, data=data, out=out, train_data=train_data, tokenizer=tokenizer, task=task,
            closings=('."', '!"', '?"') if all_closings else ('."',),
            layers=_layers(layers), sae_paths=[sae_path(s) for s in sae or []], sae_hooks=list(hook) if hook else None,
            sae_tokens=sae_tokens,
            expansion_factor=expansion_factor, sae_recipe=sae_recipe, sae_k=sae_k, l1_coefficient=l1_coefficient,
            max_prompts=max_prompts,
            device=device, dtype=dtype, seed=seed, workspace=workspace, exclude_bos=not include_bos,
            fold_ln=fold_ln, center_writing_weights=center_writing_weights, center_unembed=center_unembed,
            feature_selection=feature_selection, ablation_mode=ablation_mode, circuit=circuit,
            circuit_ig_steps=circuit_ig_steps, position_circuit=position_circuit,
        )
    _threads(threads)
    _execute(cfg, export=export, resume=resume)


@app.command("demo", cls=SaeCommand, short_help="The whole pipeline on the embedded default model.")
def demo(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(metavar="DIR", help="Output folder for results.json and report.html.")] = Path(
        "runs/demo"),
    workspace: Annotated[Path, typer.Option(
        metavar="DIR", show_default=_WORKSPACE_SHOWN,
        help="Cache folder (default model, corpora, trained SAEs).")] = DEFAULT_WORKSPACE,
    sae_tokens: Annotated[int, typer.Option(metavar="N", min=1, help="Activations each SAE is trained on.")] = 400_000,
    sae_recipe: Annotated[str, typer.Option(
        metavar="topk|reference", callback=_sae_recipe, help=SAE_RECIPE_HELP)] = "topk",
    sae_k: Annotated[int, typer.Option(metavar="K", min=1, help=SAE_K_HELP)] = 32,
    l1_coefficient: Annotated[float, typer.Option(
        metavar="X", min=0.0,
        help="Reference recipe only: per-token L1 coefficient on normalised activations, tuned for the embedded "
             "default (run's default, 0.3, leaves its features dense).")] = 3.0,
    max_prompts: Annotated[int, typer.Option(metavar="N", min=1, help="Use at most this many task prompts.")] = 300,
    device: Annotated[str, typer.Option(metavar="DEVICE", help="cpu, cuda, cuda:1, mps.")] = "cpu",
    dtype: Annotated[str, typer.Option(
        metavar="float32|bfloat16|float16", callback=_dtype, help=DTYPE_HELP)] = "float32",
    seed: Annotated[int, typer.Option(metavar="N", min=0, help="Seed of SAE training and bootstraps.")] = 0,
    circuit: Annotated[bool, typer.Option(
        "--circuit/--no-circuit", help=CIRCUIT_HELP)] = True,
    circuit_ig_steps: Annotated[int, typer.Option(
        metavar="N", min=1, help="Integrated-gradients steps of the circuit's gradient estimates.")] = 10,
    position_circuit: Annotated[bool, typer.Option(
        "--position-circuit/--no-position-circuit", help=POSITION_CIRCUIT_HELP)] = True,
    threads: Annotated[int | None, typer.Option(
        metavar="N", min=1, show_default="all cores", help=THREADS_HELP)] = None,
    export: Annotated[bool, typer.Option("--export", show_default="off", help=EXPORT_HELP)] = False,
    resume: Annotated[bool, typer.Option("--resume", show_default="off", help=RESUME_HELP)] = False,
    verbose: Annotated[bool, typer.Option(
        "--verbose", "-v", show_default="off", help="Log each stage.")] = False,
) -> None:
    """The whole pipeline on the embedded default: a 2-layer GPT-Neo trained on generated dialogue stories."""
    import dataclasses

    from saecircuits.data.storygen import write_corpus
    from saecircuits.models.default import DEFAULT_CONFIG, ensure_default_model
    from saecircuits.pipeline import RunConfig

    _setup_logging(verbose)
    _unused_options(ctx, sae_given=False, recipe=sae_recipe, circuit=circuit)
    corpora = Path(workspace) / "data"
    heldout = corpora / f"default-heldout-seed{DEFAULT_CONFIG.heldout_seed}-n{DEFAULT_CONFIG.n_heldout_stories}.txt"
    # SAEs train on a fresh stream (its own seed), the prompts come from the LM's held-out stories.
    sae_train = corpora / "default-sae-train-seed7-n4000.txt"
    _threads(threads)
    from saecircuits import distributed

    distributed.init_from_env(device)  # under torchrun: rank 0 prepares the workspace, the others wait for it
    with user_errors():
        # The settings are checked before the default model is copied or trained (the model is filled in below).
        cfg = RunConfig(
            model="saecircuits-default", data=heldout, train_data=sae_train, out=out, sae_tokens=sae_tokens,
            device=device, dtype=dtype, seed=seed, workspace=workspace, max_prompts=max_prompts, circuit=circuit,
            sae_recipe=sae_recipe, sae_k=sae_k, l1_coefficient=l1_coefficient,
            circuit_ig_steps=circuit_ig_steps, position_circuit=position_circuit,
        )
        if distributed.is_writer():
            _say(f"workspace {workspace}")
            ensure_default_model(workspace, progress=True)
            if not heldout.is_file():
                write_corpus(heldout, DEFAULT_CONFIG.n_heldout_stories, seed=DEFAULT_CONFIG.heldout_seed)
            if not sae_train.is_file():
                write_corpus(sae_train, 4000, seed=7)
        distributed.barrier("the workspace rank 0 prepares")
        folder = ensure_default_model(workspace, progress=False)
    cfg = dataclasses.replace(
        cfg, model=str(folder), model_label="saecircuits default (2-layer GPT-Neo)")
    _execute(cfg, export=export, resume=resume)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
