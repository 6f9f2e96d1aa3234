"""``saecircuits feature --sae DIR K [--model ... --data ...]``: one feature's card, printed or written as a page."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from saecircuits.cli import InputError, SaeCommand, app, num, user_errors
from saecircuits.cli.run import DEFAULT_WORKSPACE, DTYPE_HELP, THREADS_HELP, _dtype, _say, _threads
from saecircuits.display import percent

_WORKSPACE_SHOWN = "$SAECIRCUITS_WORKSPACE, else ~/.cache/saecircuits"


def _print_card(card: dict) -> None:
    """The card as text on stdout: what is known of the feature, in the report's words."""
    from rich.console import Console
    from rich.markup import escape

    from saecircuits.report.summary import feature_reading, quoted_token
    from saecircuits.report.tokens_html import visible_token

    console = Console(soft_wrap=True, highlight=False)
    sae, k = card["saes"][0], card["feature"]
    so = sae.get("sae_only") or {}
    console.print(f"[bold]Feature {k}[/] of {escape(sae['hook_point'])} (d_sae {sae['d_sae']}; {escape(card['sae_dir'])})")
    console.print(f"  encoder bias {so.get('b_enc')}, decoder norm {so.get('decoder_norm')}")
    reading = feature_reading(sae, k)
    eff = (sae.get("feature_effects") or [None])[0]
    if eff:
        ci = eff.get("ci95")
        console.print(f"  ablating it at P raises the answer loss by {num(eff['mean_loss_increase'], '.4f')} nats"
                      + (f" ± {num(ci, '.4f')} (95% CI)" if ci is not None else " (no interval: one prompt)")
                      + f", on the {eff['n_active_prompts']} prompts where it is active "
                      f"({percent(eff['fraction_active'])} of {card['task']['n_prompts']})")
    if reading:
        console.print(f"  {escape(reading)}")
    cs = ((sae.get("corpus_stats") or {}).get("features") or [None])[0]
    if cs:
        console.print(f"  corpus density {num(cs['density'], '.2e')}, max activation "
                      f"{num(cs['max_activation'], '.3f')}; fires on "
                      + escape(", ".join(f"{quoted_token(t)} ({c})" for t, c in cs["top_tokens"][:8])))
    fd = (sae.get("feature_details") or [None])[0] or {}
    for key, label, unit in (("prompt_boosts", "log-prob boosts", "nats"), ("weight_boosts", "logit boosts", "logits")):
        b = fd.get(key)
        if b:
            up = b.get("boosted") or b.get("top") or []
            console.print(f"  {label} ({unit}): up "
                          + escape(", ".join(f"{quoted_token(t)} {num(v, '+.3f')}" for t, v in up[:6])))
    for ex in ((sae.get("examples") or [{}])[0].get("examples") or [])[:5]:
        acts = [a if a is not None else float("-inf") for a in ex["activations"]]
        j = max(range(len(acts)), key=acts.__getitem__)
        text = "".join(f"[[{visible_token(t)}]]" if i == j else visible_token(t) for i, t in enumerate(ex["tokens"]))
        console.print(f"  doc {ex['doc_index']} (max {num(ex['max_activation'], '.3f')}): {escape(text)}")
    for note in card.get("notes") or []:
        console.print(f"  [yellow]note:[/] {escape(note)}")
    if not card.get("model"):
        console.print("  (add --model for its logit boosts, and --data for corpus statistics, examples and its "
                      "effect on the task)")


@app.command("feature", cls=SaeCommand, short_help="One feature's card: print it, or write it as a page.")
def feature(
    k: Annotated[int, typer.Argument(metavar="K", help="The feature index.", show_default=False)],
    sae: Annotated[str, typer.Option(
        "--sae", metavar="PATH", help="The SAE: a folder or file of any family saecircuits reads, hf://owner/repo/path "
                                      "or a SAELens release/sae_id.")],
    hook: Annotated[str | None, typer.Option(
        "--hook", metavar="HOOK", show_default="what the SAE's files say",
        help="The TransformerLens hook the SAE reads, for SAEs whose files do not say it.")] = None,
    model: Annotated[str | None, typer.Option(
        metavar="NAME|DIR|FILE", show_default="none: the SAE alone",
        help="The model the SAE was trained on: adds the logit boosts.")] = None,
    data: Annotated[Path | None, typer.Option(
        metavar="FILE", show_default="none", help="A corpus (needs --model): adds the corpus statistics, examples "
                                                  "and the feature's effect on the task built from it.")] = None,
    task: Annotated[str, typer.Option(
        metavar="TASK", help="'closing-quote', or a JSONL task file ({prompt, answer} per line).")] = "closing-quote",
    tokenizer: Annotated[str | None, typer.Option(
        metavar="FILE|DIR", show_default="the model's own", help="Tokenizer for a llama2.c checkpoint.")] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", metavar="FILE.html", show_default="print the card",
        help="Write the card as a self-contained page instead of printing it.")] = None,
    max_prompts: Annotated[int, typer.Option(metavar="N", min=1, help="Use at most this many task prompts.")] = 1000,
    workspace: Annotated[Path, typer.Option(
        metavar="DIR", show_default=_WORKSPACE_SHOWN, help="Cache folder (converted models).")] = DEFAULT_WORKSPACE,
    device: Annotated[str, typer.Option(metavar="DEVICE", help="cpu, cuda, cuda:1, mps.")] = "cpu",
    dtype: Annotated[str, typer.Option(
        metavar="float32|bfloat16|float16", callback=_dtype, help=DTYPE_HELP)] = "float32",
    threads: Annotated[int | None, typer.Option(
        metavar="N", min=1, show_default="all cores", help=THREADS_HELP)] = None,
) -> None:
    """One feature's card: the SAE alone, with --model its logit boosts, with --data also its corpus statistics,
    top and lower-band examples, and its activation and exact ablation effect on the task prompts."""
    from saecircuits.feature_card import feature_card
    from saecircuits.pipeline import sae_path
    from saecircuits.report.schema import write_text_atomic

    if out is not None and out.suffix.lower() not in (".html", ".htm"):
        raise InputError(f"--out {out}: give a file name ending in .html")
    if out is not None:  # before the work; they failed after it with a bare OSError naming a temporary file
        if out.is_dir():
            raise InputError(f"--out {out} is a folder; give a file name ending in .html")
        above = out.parent
        while not above.exists() and above.parent != above:
            above = above.parent
        if not above.is_dir():
            raise InputError(f"--out {out}: {above} is a file, so the page cannot be written below it")
    if data is not None and model is None:
        raise InputError("--data needs --model: the corpus statistics run the model; add --model NAME|DIR|FILE")
    # options the card would otherwise ignore without a word (found by trying them)
    if task != "closing-quote" and data is None:
        raise InputError(f"--task {task} needs --data (and --model): the feature's effect on the task is measured "
                         "beside the corpus statistics; add --data FILE, or drop --task")
    if tokenizer is not None and model is None:
        raise InputError("--tokenizer needs --model: it is the tokenizer of a llama2.c --model checkpoint")
    _threads(threads)
    with user_errors():
        card = feature_card(sae_path(sae), k, hook=hook, model=model, data=data, task=task, tokenizer=tokenizer,
                            workspace=workspace, device=device, dtype=dtype, max_prompts=max_prompts,
                            log=_say)
        if out is None:
            _print_card(card)
            return
        from saecircuits.report.render import build_card_page

        path = write_text_atomic(out, build_card_page(card))
    typer.echo(f"Wrote {path}")
