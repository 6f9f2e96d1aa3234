"""How the pipeline writes numbers and analysis results into ``results.json`` (rounded; null with a reason when
undefined)."""

from __future__ import annotations

import math
from typing import Any


def _round(x: float, nd: int = 6) -> float:
    return float(round(float(x), nd))


def _loss_recovered_keys(key: str, lr) -> dict[str, Any]:
    """results.json keys of one loss recovered: the value (null when undefined), its interval only when defined,
    and the reason when undefined (the raw losses are always in the entry)."""
    if not lr.defined:
        return {key: None, f"{key}_undefined_reason": lr.reason}
    return {key: _round(lr.value), f"{key}_ci95": [_round(lr.low), _round(lr.high)]}


def _whole_sequence_json(seq: dict) -> dict:
    """The ``whole_sequence`` entry of an SAE from one result of :func:`~saecircuits.analysis.quality.reconstruction.
    sequence_loss_recovered` on the prompts (loss recovered null with its reason when undefined)."""
    defined = seq["loss_recovered_undefined_reason"] is None
    ev = seq["explained_variance"]
    out = {"loss_recovered": _round(seq["loss_recovered"]) if defined else None,
           "explained_variance": _round(ev) if math.isfinite(ev) else None,
           "ce_clean": _round(seq["ce_clean"]), "ce_sae": _round(seq["ce_spliced"]), "ce_zero": _round(seq["ce_zero"]),
           "n_tokens": int(seq["n_tokens"]), "n_prompts": int(seq["n_rows"])}
    if defined:
        out["loss_recovered_ci95"] = [_round(v) for v in seq["loss_recovered_ci95"]]
    else:
        out["loss_recovered_undefined_reason"] = seq["loss_recovered_undefined_reason"]
    return out


def _off_range_json(off) -> dict | None:
    """An :class:`~saecircuits.analysis.ablations.modes.OffRange` as results.json values (None: not counted)."""
    if off is None:
        return None
    d = off.to_dict()
    return {k: (_round(v) if isinstance(v, float) else v) for k, v in d.items()}


def _mean_ci(m) -> dict:
    """A :class:`~saecircuits.analysis.statistics.MeanCI` as ``{"mean", "ci95" (half-width), "n"}``."""
    return {"mean": _round(m.mean), "ci95": _round(m.half_width), "n": int(m.n)}


def _token_str(model, token_id: int) -> str:
    from saecircuits.models.tokens import token_string

    return token_string(model.tokenizer, token_id)
