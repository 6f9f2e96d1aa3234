"""One loader for every public SAE family: :func:`load_sae` recognises the family from its files and returns an
:class:`~saecircuits.saes.base.SAE` whose ``encode``/``decode`` reproduce that family's own forward exactly.

Each family lives in its own module and registers a :class:`Family` (how to recognise its files, how to load them).
What every family's files hold and the maths its own code runs are described in each module's docstring; the test
of each family (``tests/saes/formats/``) checks ``encode``/``decode`` against a plain numpy forward of its formula
on hand-made files.

A loaded SAE records where it came from in ``cfg.extra["source"]`` (``family``, ``path``, the family's own name of
the site) and what activations it expects in ``cfg.extra["model_processing"]`` (the TransformerLens weight-processing
switches; checked against the model by :mod:`saecircuits.saes.processing`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from saecircuits.saes.base import SAE, SAEError

__all__ = ["Family", "LoadOptions", "families", "register_family", "detect_family", "load_sae", "resolve_hook",
           "missing_weights"]


@dataclass(frozen=True)
class LoadOptions:
    """What the caller knows that the files may not say.

    Attributes:
        hook: the TransformerLens hook the SAE reads (needed where the files do not say it, e.g. Gemma Scope 1 from
            a folder that is not named ``layer_L/...`` inside a ``gemma-scope-*-res`` repository, Goodfire); when the
            files do say it, the two must agree.
        device: where the SAE's tensors go.
        model_name: the model the SAE is for (decides ambiguous Hugging Face module names; recorded).
    """

    hook: str | None = None
    device: str | torch.device = "cpu"
    model_name: str | None = None


@dataclass(frozen=True)
class Family:
    """A public SAE family.

    Attributes:
        name: short name (``"saelens"``, ``"sparsify"``, ...), written to ``cfg.extra["source"]["family"]``.
        title: what users call it.
        detect: ``detect(path) -> bool``, from file names and, at most, small config files (never the weights).
        load: ``load(path, options) -> SAE`` (on ``options.device``, eval mode).
        files: the files it reads, for error messages (e.g. ``"cfg.json + sae.safetensors"``).
        pairs: its folder layouts as ``(config file, weights file)`` paths inside the folder, so that a folder with
            the config but not the weights is told which weights file is missing (rather than that no family
            recognises it).
    """

    name: str
    title: str
    detect: Callable[[Path], bool]
    load: Callable[[Path, LoadOptions], SAE]
    files: str
    pairs: tuple[tuple[str, str], ...] = ()


_FAMILIES: list[Family] = []


def register_family(family: Family) -> Family:
    """Add ``family`` to the families :func:`detect_family` tries (in registration order; the first match wins).

    Raises:
        SAEError: the name is taken.
    """
    if any(f.name == family.name for f in _FAMILIES):
        raise SAEError(f"an SAE family named {family.name!r} is already registered")
    _FAMILIES.append(family)
    return family


def families() -> list[Family]:
    """The registered families, in the order they are tried."""
    _register_builtin()
    return list(_FAMILIES)


def detect_family(path: str | os.PathLike) -> Family:
    """The family whose files ``path`` (a folder or a single file) holds.

    Raises:
        SAEError: ``path`` does not exist, or no family recognises it (the message lists what each family needs).
    """
    p = Path(path)
    if not p.exists():
        raise SAEError(f"SAE path {p} does not exist; pass an SAE folder or file (or an hf:// name)")
    for family in families():
        if family.detect(p):
            return family
    missing = missing_weights(p)
    if missing:
        raise SAEError(missing)
    known = "; ".join(f"{f.title}: {f.files}" for f in families())
    raise SAEError(f"{p} is not an SAE saecircuits recognises. It reads: {known}")


def missing_weights(p: Path) -> str | None:
    """The one-line error for a folder that holds a family's config file but not its weights file (naming the
    weights file of every family whose config file it holds), or None when it holds no family's config file."""
    if not p.is_dir():
        return None
    found: dict[str, list[str]] = {}
    for family in families():
        for config, weights in family.pairs:
            if (p / config).is_file() and not (p / weights).exists():
                found.setdefault(config, []).append(f"{weights} ({family.title})")
    if not found:
        return None
    config, expected = next(iter(found.items()))
    return (f"{p} has {config} but no weights file beside it: expected {' or '.join(expected)}. Put the weights "
            f"file saved with {config} into {p} (a download or copy that stopped half-way leaves only the config), "
            "or pass the folder that holds both")


#: what a TransformerLens hook name looks like: ``blocks.L.<...>.hook_<name>``, or a top-level ``hook_<name>`` /
#: ``ln_final.hook_<name>`` (a hook the model lacks is caught when the SAE meets the model).
_HOOK_NAME = re.compile(r"^(blocks\.\d+\.([a-z0-9_]+\.)*hook_[a-z0-9_]+|hook_[a-z0-9_]+|ln_final\.hook_[a-z0-9_]+)$")


def resolve_hook(found: str | None, given: str | None, path: Path, *, what: str = "the files") -> str:
    """The hook an SAE reads: what its files say (``found``) or what the caller gave (``given``).

    Raises:
        SAEError: neither is known, both are and differ (naming both), or ``given`` is not a TransformerLens hook
            name.
    """
    if given is not None and not _HOOK_NAME.match(given):
        raise SAEError(f"--hook / hook= {given!r} is not a TransformerLens hook name; give one such as "
                       "blocks.12.hook_resid_post, blocks.3.mlp.hook_post or blocks.5.attn.hook_z")
    if found and given and found != given:
        raise SAEError(f"{path}: the SAE reads {found!r} according to {what}, but hook={given!r} was given; drop "
                       "--hook/hook= or pass the SAE of that hook")
    hook = found or given
    if not hook:
        raise SAEError(f"{path}: which hook the SAE reads is not recorded in {what}; pass it with --hook / hook= (a "
                       "TransformerLens hook name such as blocks.12.hook_resid_post)")
    return hook


def load_sae(path: str | os.PathLike, hook: str | None = None, *, device: str | torch.device = "cpu",
             model_name: str | None = None) -> SAE:
    """Load an SAE of any family saecircuits knows (see :func:`families`), exactly.

    Args:
        path: a folder or file of one SAE, an ``hf://owner/repo[/path]`` name or a SAELens ``release/sae_id`` name
            (read from the Hugging Face cache; downloaded only when online, see :mod:`saecircuits.saes.hub`).
        hook: the TransformerLens hook the SAE reads, where its files do not say (they must agree where they do).
        device: where the tensors go.
        model_name: the model it is for (recorded; decides ambiguous module names).

    Returns:
        the SAE in eval mode, with ``cfg.extra["source"]`` saying its family and path.

    Raises:
        SAEError: unrecognised files, files whose maths saecircuits cannot reproduce (the message names the key and
            why), corrupt or mis-shaped tensors.
    """
    p = _resolve(path)
    family = detect_family(p)
    sae = family.load(p, LoadOptions(hook=hook, device=device, model_name=model_name))
    source = dict(sae.cfg.extra.get("source") or {})
    source.setdefault("family", family.name)
    source.setdefault("path", str(p))
    sae.cfg.extra["source"] = source
    return sae.eval()


def _resolve(path: str | os.PathLike) -> Path:
    text = os.fspath(path)
    if isinstance(text, str) and (text.startswith("hf://") or _looks_like_release(text)):
        from saecircuits.saes import hub

        return hub.resolve(text)
    return Path(text)


def _looks_like_release(text: str) -> bool:
    """``release/sae_id`` that is not a local path (SAELens names, e.g. ``gpt2-small-res-jb/blocks.6.hook_resid_pre``)."""
    try:
        from saecircuits.saes import hub
    except ImportError:  # pragma: no cover - hub is part of the package
        return False
    return not Path(text).exists() and hub.is_release_name(text)


_REGISTERED = False


def _register_builtin() -> None:
    """Import the family modules (each registers itself), most specific first."""
    global _REGISTERED
    if _REGISTERED:
        return
    _REGISTERED = True
    import importlib

    for module in _BUILTIN:
        try:
            importlib.import_module(f"saecircuits.saes.formats.{module}")
        except ModuleNotFoundError as err:  # a family module not written yet in this checkout
            if err.name != f"saecircuits.saes.formats.{module}":
                raise


#: family modules in the order their families are tried (a file set that two could match goes to the first).
_BUILTIN = ("saelens", "sparsify", "dictionary_learning", "gemma_scope", "openai", "goodfire", "llama_scope",
            "circuit_tracer")
