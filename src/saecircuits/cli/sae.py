"""``saecircuits sae inspect PATH`` and ``saecircuits sae convert PATH OUT``: what an SAE of any family is, and the
same SAE written in the SAELens 6 layout.

``PATH`` is anything :func:`saecircuits.saes.formats.load_sae` reads: a folder or file of a family saecircuits
knows, ``hf://owner/repo/path`` or a SAELens ``release/sae_id`` (from the Hugging Face cache; downloaded only when
online). ``--hook`` gives the TransformerLens hook where the files do not say it.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from saecircuits.cli import InputError, SaeCommand, app, user_errors

PATH_HELP = ("The SAE: a folder or file of any family saecircuits reads, hf://owner/repo/path, or a SAELens "
             "release/sae_id.")
HOOK_HELP = "The TransformerLens hook the SAE reads, for SAEs whose files do not say it (e.g. Gemma Scope .npz)."


class _Group(TyperGroup):
    context_class = SaeCommand.context_class  # the project's plain help (see saecircuits.cli)


sae_app = typer.Typer(name="sae", cls=_Group, help="Inspect or convert an SAE of any family saecircuits reads.",
                      no_args_is_help=True, rich_markup_mode=None, add_completion=False)
app.add_typer(sae_app, name="sae")


def _load(path: str, hook: str | None):
    from saecircuits.pipeline import load_sae_arg, sae_path

    return load_sae_arg(sae_path(path), hook, "cpu")


#: ``cfg.extra`` keys that change encode/decode, shown under "maths" (the others are provenance).
_MATHS = ("skip_connection", "input_normalization", "input_normalization_eps", "reshape_activations", "topk_relu",
          "k", "folded_activation_scale")


def describe(sae, given: str) -> dict[str, Any]:
    """What ``saecircuits sae inspect`` prints, as a JSON-ready dict: family, site, basis, sizes, architecture, the
    settings that change its maths, dtype and where it came from (``given``: the name on the command line)."""
    from saecircuits.saes.formats import families

    extra = sae.cfg.extra
    source = dict(extra.get("source") or {})
    titles = {f.name: f.title for f in families()}
    maths: dict[str, Any] = {"apply_b_dec_to_input": bool(sae.cfg.apply_b_dec_to_input)}
    for key in _MATHS:
        if key in extra:
            maths[key] = extra[key]
    if (extra.get("saelens") or {}).get("folded_decoder_norms"):
        maths["folded_decoder_norms"] = True
    thresholds = {}
    for name in ("threshold",):
        t = getattr(sae, name, None)
        if t is not None and hasattr(t, "numel") and t.numel() == sae.d_sae:
            thresholds = {"threshold_min": float(t.detach().min()), "threshold_max": float(t.detach().max())}
    return {
        "given": given,
        "family": source.get("family"),
        "family_title": titles.get(source.get("family"), source.get("family")),
        "site": {"family_site": source.get("site"), "hook_point": sae.hook_point,
                 "hook_point_out": sae.hook_point_out if sae.is_transcoder else None},
        "basis": {"model_processing": extra.get("model_processing"), "basis": extra.get("basis")},
        "d_in": int(sae.d_in), "d_out": int(sae.d_out), "d_sae": int(sae.d_sae),
        "architecture": sae.cfg.architecture,
        "transcoder": bool(sae.is_transcoder),
        "maths": {**maths, **thresholds},
        "dtype": sae.cfg.dtype,
        "model_name": sae.cfg.model_name or None,
        "source": source,
    }


def _text(value: Any) -> str:
    if value is None:
        return "not recorded"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_text(v)}" for k, v in value.items()) or "none"
    return str(value)


def _print(info: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    site = info["site"]
    hooks = site["hook_point"] + (f" -> {site['hook_point_out']}" if site["hook_point_out"] else "")
    basis = info["basis"]
    rows = [
        ("family", f"{info['family_title']} ({info['family']})"),
        ("site", f"{site['family_site'] or 'not recorded'} (TransformerLens: {hooks})"),
        ("basis", f"model processing: {_text(basis['model_processing'])}; input: {_text(basis['basis'])}"),
        ("d_in / d_out / d_sae", f"{info['d_in']} / {info['d_out']} / {info['d_sae']}"),
        ("architecture", info["architecture"] + (" (transcoder)" if info["transcoder"] else "")),
        ("maths", _text(info["maths"])),
        ("dtype", info["dtype"]),
        ("model", info["model_name"] or "not recorded"),
        ("source", f"{info['given']}" + (f" -> {info['source'].get('path')}"
                                         if info["source"].get("path") not in (None, info["given"]) else "")),
    ]
    table = Table(title=f"SAE {escape(info['given'])}", show_header=False)
    table.add_column("", style="bold", no_wrap=True)
    table.add_column("")
    for key, value in rows:
        table.add_row(key, escape(str(value)))
    Console(soft_wrap=True, highlight=False).print(table)


@sae_app.command("inspect", cls=SaeCommand, short_help="What an SAE is: family, site, basis, sizes, maths, dtype.")
def inspect(
    path: Annotated[str, typer.Argument(metavar="PATH", help=PATH_HELP, show_default=False)],
    hook: Annotated[str | None, typer.Option(
        "--hook", metavar="HOOK", show_default="what the SAE's files say", help=HOOK_HELP)] = None,
    as_json: Annotated[bool, typer.Option("--json", show_default="off", help="Print JSON instead of a table.")] = False,
) -> None:
    """Load an SAE of any family and print its family, site (the family's own name and the TransformerLens
    hooks), basis, d_in, d_out, d_sae, architecture, the settings that change its maths, dtype and origin."""
    with user_errors():
        info = describe(_load(path, hook), path)
    if as_json:
        typer.echo(json.dumps(info, indent=2, default=str))
    else:
        _print(info)


def _saelens6_refusal(sae) -> str | None:
    """Why SAELens 6 could not read ``sae`` with the same maths and input, or None when it can."""
    basis = sae.cfg.extra.get("basis") or {}
    if isinstance(basis, dict) and basis.get("norm_weight_applied"):
        return ("the SAE reads its hook with the norm's learned weight applied, which a SAELens 6 config cannot say "
                "(SAELens reads ln2.hook_normalized without it)")
    if sae.cfg.extra.get("topk_relu") is False:
        return "its TopK keeps negative values (topk_relu=False), and SAELens 6's TopK applies ReLU"
    return None


@sae_app.command("convert", cls=SaeCommand, short_help="Write an SAE of any family in the SAELens 6 layout.")
def convert(
    path: Annotated[str, typer.Argument(metavar="PATH", help=PATH_HELP, show_default=False)],
    out: Annotated[Path, typer.Argument(
        metavar="OUT", help="The new folder (must not exist): cfg.json + sae_weights.safetensors.",
        show_default=False)],
    hook: Annotated[str | None, typer.Option(
        "--hook", metavar="HOOK", show_default="what the SAE's files say", help=HOOK_HELP)] = None,
) -> None:
    """Write the SAE at PATH as a SAELens 6 folder (``SAE.load_from_disk`` reads it; saecircuits reads it back
    exactly). The folder appears whole or not at all; an SAE whose maths or input SAELens 6 cannot express is
    refused, saying what."""
    if out.exists():
        raise InputError(f"OUT {out} already exists; give a new folder name (convert never overwrites)")
    with user_errors():
        sae = _load(path, hook)
        why = _saelens6_refusal(sae)
        if why:
            raise InputError(f"{path} cannot be written in the SAELens 6 layout: {why}; keep the source files "
                             "(saecircuits reads them directly)")
        written = _write_atomically(sae, out)
    typer.echo(f"Wrote {written} (SAELens 6 layout: cfg.json + sae_weights.safetensors)")


def _write_atomically(sae, out: Path) -> Path:
    """``save_sae`` into a temporary folder beside ``out``, check that it reads back as the same SAE, then rename
    it to ``out``; on any error the temporary folder is removed and nothing is left at ``out``.

    The TransformerLens weight-processing switches the SAE expects (``cfg.extra["model_processing"]``) are written
    as ``metadata.model_from_pretrained_kwargs`` too, where SAELens users look for them.

    Raises:
        SAEError: the SAE cannot be written in the SAELens 6 layout (``save_sae`` says what), or it does not read
            back identically.
    """
    import torch

    from saecircuits.atomic import atomic_write
    from saecircuits.saes.base import SAEError
    from saecircuits.saes.io import CFG_FILE, load_sae, save_sae

    out = Path(out)
    from saecircuits.pipeline.outputs import make_out_folder

    make_out_folder(out.parent, "OUT")
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:12]}.tmp"
    tmp.mkdir()  # (not mkdtemp: the folder gets the umask's permissions, as any folder the user makes)
    try:
        save_sae(sae, tmp)
        processing = sae.cfg.extra.get("model_processing")
        if processing:
            cfg = json.loads((tmp / CFG_FILE).read_text())
            cfg["metadata"]["model_from_pretrained_kwargs"] = dict(processing)
            atomic_write(tmp / CFG_FILE, lambda p: Path(p).write_text(json.dumps(cfg, indent=2) + "\n"))
        back = load_sae(tmp)
        x = torch.randn(4, sae.d_in, generator=torch.Generator().manual_seed(0)).to(sae.dtype)
        with torch.no_grad():
            f, f_back = sae.encode(x), back.encode(x)
            same = torch.equal(f, f_back) and torch.equal(sae.decode(f, x), back.decode(f_back, x))
        if not same:
            raise SAEError(f"the SAE written for {out} does not read back identically; not written (a bug: please "
                           "report it)")
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


@sae_app.command("families", cls=SaeCommand, short_help="The SAE families saecircuits reads, and their files.")
def families_command() -> None:
    """List every SAE family ``--sae`` and ``saecircuits sae inspect`` recognise, in the order they are tried, with
    the files each one reads. The maths of each is checked against the family's own formula in
    ``tests/saes/formats/test_<family>.py``."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from saecircuits.saes.formats import families

    table = Table(title="SAE families")
    for col in ("family", "what it is", "files"):
        table.add_column(col)
    for fam in families():
        table.add_row(fam.name, escape(fam.title), escape(fam.files))
    Console(soft_wrap=True, highlight=False).print(table)
