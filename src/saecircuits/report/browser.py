"""The feature browser's data: every feature with any evidence in a results dict, as one compact JSON payload that
the page embeds once and builds its cards from, lazily, in the browser (``assets/report/page.js``).

Payload (all numbers rounded to 4 significant digits; token strings are stored once, in ``strings``, already made
visible by :func:`saecircuits.report.tokens_html.visible_token`, and referred to by index)::

    {"strings": [str],
     "saes": [{"sid": "sae-0", "hook": str, "d_sae": int,
               "density_edges": [float], "density_counts": [int], "act_edges": [float],
               "rows": [[feature, effect, ci_lo, ci_hi, fraction_active, mean_activation, search_text]],
               "cards": {"<feature>": CARD}}]}

``rows`` lists every feature with any evidence, sorted by effect (the exact single-feature loss increase at P, nats,
largest first; features without one last). ``CARD`` holds what is known of one feature (every key optional):
``reading`` (one line), ``top`` (ranked-table entry), ``cs`` (corpus statistics), ``ex`` (top activating examples),
``bands`` (examples from lower bands of its maximum), ``task`` (activations at P on the task prompts), ``pb``/``wb``
(prompt- and weight-based boosts), ``lva`` (activation vs loss increase per prompt), ``dfa``, ``stories`` (ablation on
max-activating stories), ``modes`` (the three ablation modes), ``sdla`` (activation-scaled DLA), ``sub`` ([prompts
where it is active, the cap of the per-prompt views]), ``node`` (its circuit node). An example is ``{"d": doc, "t":
[string index], "k": "tcsw..." (text/continuation/special/blank per token: a blank token is a text token that is
whitespace only or shows no text, drawn as a marked box, see :func:`saecircuits.report.tokens_html.blank_token_note`),
"a": [value or null], "m": max}``; identical windows (same tokens and values) are kept once per feature.

:func:`embed_json` writes the payload into a ``<script type="application/json">`` element, gzip-compressed and
base64-encoded when it is large (the page inflates it with the browser's ``DecompressionStream``).
"""

from __future__ import annotations

import base64
import gzip
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from saecircuits.report.schema import ci_bounds
from saecircuits.report.summary import feature_reading
from saecircuits.report.tokens_html import blank_token_note, visible_token
from saecircuits.results import Results, SaeEntry

__all__ = ["browser_payload", "embed_json", "COMPRESS_ABOVE"]

COMPRESS_ABOVE = 200_000
"""Payloads whose JSON is longer than this many characters are embedded gzip-compressed (base64)."""

_KIND_CHAR = {"text": "t", "continuation": "c", "special": "s"}


def _r(v: Any) -> float | None:
    """A float rounded to 4 significant digits; None for missing or non-finite values."""
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        return None
    if v == 0:
        return 0.0
    return float(f"{v:.4g}")


def _rl(vs: Sequence[Any] | None) -> list:
    return [_r(v) for v in vs or []]


class _Strings:
    """The payload's string table: each visible token string stored once."""

    def __init__(self) -> None:
        self.index: dict[str, int] = {}
        self.items: list[str] = []

    def __call__(self, token: str) -> int:
        s = visible_token(token)
        j = self.index.get(s)
        if j is None:
            j = self.index[s] = len(self.items)
            self.items.append(s)
        return j


def _example(ex: Mapping, strings: _Strings) -> dict:
    kinds = ex.get("token_kinds") or ["text"] * len(ex["tokens"])
    return {
        "d": ex.get("doc_index"),
        "t": [strings(t) for t in ex["tokens"]],
        "k": "".join("w" if _KIND_CHAR.get(k, "t") == "t" and blank_token_note(t) else _KIND_CHAR.get(k, "t")
                     for t, k in zip(ex["tokens"], kinds, strict=True)),
        "a": [None if k == "special" else _r(a) for a, k in zip(ex["activations"], kinds, strict=True)],
        "m": _r(ex.get("max_activation")),
    }


def _dedup(examples: list[dict], seen: set) -> list[dict]:
    """Examples whose (tokens, values) window was not seen yet (``seen`` is updated)."""
    out = []
    for e in examples:
        key = (tuple(e["t"]), tuple(e["a"]))
        if key not in seen:
            seen.add(key)
            out.append(e)
    return out


def _pairs(pairs: Sequence, strings: _Strings) -> list:
    return [[strings(t), _r(v)] for t, v in pairs]


def _meanci(d: Mapping | None) -> list | None:
    """``[mean, lo, hi, n]`` of a MEANCI dict (None entries where undefined)."""
    if not d:
        return None
    lo, hi = ci_bounds(d.get("mean"), d.get("ci95"))
    return [_r(d.get("mean")), _r(lo), _r(hi), d.get("n")]


def _sae_payload(i: int, sae: Mapping, results: Mapping, strings: _Strings, reader: SaeEntry | Mapping) -> dict:
    cards: dict[int, dict] = {}

    def card(k: int) -> dict:
        return cards.setdefault(int(k), {})

    effects = {int(e["feature"]): e for e in sae.get("feature_effects") or []}
    for e in effects.values():
        card(e["feature"])
    for t in sae.get("top_features") or []:
        lo, hi = ci_bounds(t["loss_increase"], t.get("loss_increase_ci95"))
        card(t["feature"])["top"] = [_r(t["loss_increase"]), _r(lo), _r(hi), _r(t.get("mean_activation")),
                                     _r(t.get("fraction_active")), t.get("n_prompts")]
    seen: dict[int, set] = {}
    for fe in sae.get("examples") or []:
        k = int(fe["feature"])
        exs = _dedup([_example(x, strings) for x in fe["examples"]], seen.setdefault(k, set()))
        card(k).setdefault("ex", []).extend(exs)
    cs = sae.get("corpus_stats") or {}
    for fe in cs.get("features") or []:
        k = int(fe["feature"])
        c = card(k)
        c["cs"] = {
            "density": _r(fe["density"]), "max": _r(fe["max_activation"]), "mwa": _r(fe.get("mean_when_active")),
            "fire": fe.get("fire_count"), "share": _r(fe.get("top_token_share")),
            "tokens": [[strings(t), int(n)] for t, n in fe["top_tokens"][:12]],
            "hist": list(fe.get("activation_log10_counts") or []),
        }
        top = _dedup([_example(x, strings) for x in fe.get("top_examples") or []], seen.setdefault(k, set()))
        if top:
            c.setdefault("ex", []).extend(top)
        bands = {}
        for band, exs in (fe.get("band_examples") or {}).items():
            kept = _dedup([_example(x, strings) for x in exs], seen.setdefault(k, set()))
            if kept:
                bands[band] = kept
        if bands:
            c["bands"] = bands
    for ta in sae.get("task_activations") or []:
        card(ta["feature"])["task"] = _rl(ta["values"])
    for fd in sae.get("feature_details") or []:
        c = card(fd["feature"])
        pb, wb, lva, dfa = fd.get("prompt_boosts"), fd.get("weight_boosts"), fd.get("loss_vs_activation"), fd.get("dfa")
        if fd.get("n_active_prompts") is not None and fd.get("max_prompts") is not None:
            c["sub"] = [fd["n_active_prompts"], fd["max_prompts"]]  # [active prompts, cap of the views]
        if pb:
            c["pb"] = {"up": _pairs(pb["boosted"], strings), "down": _pairs(pb["deboosted"], strings),
                       "n": pb.get("n_prompts")}
        if wb:
            c["wb"] = {"up": _pairs(wb["top"], strings), "down": _pairs(wb["bottom"], strings)}
        if lva:
            c["lva"] = {"a": _rl(lva["activation"]), "l": _rl(lva["loss_increase"]), "r": _r(lva.get("pearson_r"))}
        if dfa:
            c["dfa"] = {"labels": list(dfa["labels"]), "mean": _rl(dfa["mean"]), "ci": _rl(dfa.get("ci95")),
                        "n": dfa.get("n_prompts")}
    for st in sae.get("max_activating_ablation") or []:
        card(st["feature"])["stories"] = {"global": _meanci(st["global"]), "pos": _meanci(st["per_position"]),
                                          "values": _rl(st.get("position_loss_increase")),
                                          "n": st.get("n_stories")}
    am = sae.get("ablation_modes") or {}
    for row in am.get("rows") or []:
        card(row["feature"])["modes"] = {m: _meanci(row.get(m)) for m in ("residual", "reconstruction",
                                                                          "clean_effect")}
    for e in sae.get("activation_scaled_dla") or []:
        card(e["feature"])["sdla"] = [_r(e["mean_activation"]), _r(e["dla_per_unit"]), _r(e["scaled"])]
    for n in (results.get("circuit") or {}).get("nodes") or []:
        if n.get("kind") == "feature" and n.get("sae") == i:
            k = int(str(n["label"]).rsplit("f", 1)[-1]) if str(n["label"]).rsplit("f", 1)[-1].isdigit() else None
            if k is not None:
                card(k)["node"] = [_r(n.get("effect")), _r(n.get("effect_ci95")), _r(n.get("atp")), _r(n.get("ig")),
                                   bool(n.get("in_circuit"))]
    rows = []
    for k, c in cards.items():
        reading = feature_reading(reader, k)
        if reading:
            c["reading"] = reading
        e = effects.get(k)
        if e is not None:
            eff, (lo, hi) = e["mean_loss_increase"], ci_bounds(e["mean_loss_increase"], e.get("ci95"))
            frac, act = e.get("fraction_active"), e.get("mean_activation")
        elif "top" in c:
            eff, lo, hi, act, frac = c["top"][0], c["top"][1], c["top"][2], c["top"][3], c["top"][4]
        else:
            eff = lo = hi = frac = act = None
        toks = " ".join(visible_token(t) for t, _ in next(
            (fe["top_tokens"][:5] for fe in cs.get("features") or [] if fe["feature"] == k), []))
        rows.append([k, _r(eff), _r(lo), _r(hi), _r(frac), _r(act), toks])
    rows.sort(key=lambda r: (r[1] is None, -(r[1] or 0.0), r[0]))
    out = {
        "sid": f"sae-{i}", "hook": sae["hook_point"], "d_sae": sae["d_sae"], "rows": rows,
        "cards": {str(k): c for k, c in cards.items() if c},
        "density_edges": _rl(cs.get("density_log10_edges")), "density_counts": list(cs.get("density_log10_counts") or []),
        "act_edges": _rl(cs.get("activation_log10_edges")),
    }
    return out


def browser_payload(results: Results | Mapping) -> dict:
    """The feature browser's payload (layout in the module docstring) from the typed results, or a validated results
    dict (or a feature card, which holds one partial SAE entry)."""
    strings = _Strings()
    if isinstance(results, Results):  # the payload is built from the plain JSON; the readings from the typed entries
        readers, results = results.saes, results.to_json_dict()
    else:
        readers = results["saes"]
    saes = [_sae_payload(i, sae, results, strings, reader)
            for i, (sae, reader) in enumerate(zip(results["saes"], readers, strict=True))]
    return {"strings": strings.items, "saes": saes}


def embed_json(element_id: str, obj: Any, *, compress_above: int = COMPRESS_ABOVE) -> str:
    """``obj`` as a ``<script type="application/json">`` element the page reads once.

    Short JSON is embedded as is, with every ``<`` written ``\\u003c`` (so no ``</script>`` can end the element);
    JSON longer than ``compress_above`` characters is gzip-compressed (mtime 0: the same input gives the same page)
    and base64-encoded, marked ``data-encoding="gzip-base64"``.
    """
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    if len(text) > compress_above:
        blob = base64.b64encode(gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0)).decode("ascii")
        return f'<script type="application/json" id="{element_id}" data-encoding="gzip-base64">{blob}</script>'
    text = text.replace("<", "\\u003c").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    return f'<script type="application/json" id="{element_id}">{text}</script>'
