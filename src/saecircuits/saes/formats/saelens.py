"""SAELens folders (``cfg.json`` + ``sae_weights.safetensors``), every version, and saecircuits' own SAEs (the same
layout with a ``"saecircuits"`` block): read by :func:`saecircuits.saes.io.load_sae` (its docstring has the keys and
maths of each version)."""

from __future__ import annotations

from pathlib import Path

from saecircuits.saes import io
from saecircuits.saes.base import SAE
from saecircuits.saes.formats import Family, LoadOptions, register_family, resolve_hook


def _detect(path: Path) -> bool:
    return path.is_dir() and (path / io.CFG_FILE).is_file() and (path / io.WEIGHTS_FILE).is_file()


def _load(path: Path, options: LoadOptions) -> SAE:
    sae = io.load_sae(path, device=options.device)
    resolve_hook(sae.hook_point, options.hook, path, what="cfg.json's hook name")
    return sae


register_family(Family("saelens", "SAELens (v1 to v6) and saecircuits", _detect, _load,
                       "a folder with cfg.json + sae_weights.safetensors"))
