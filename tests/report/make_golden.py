"""Write ``tests/report/data/report_golden.json``: what the report shows for the fixture results, for
``test_report_templates.py``.

For each input (:func:`inputs`: the fixture results of ``report_fixtures.py``, a fuller one with the study,
evidence, failed checks and a circuit, and one taking the page's other branches), the page is reduced by
:func:`extract` to:

- ``events``: the page as a stream of start tags (with every attribute, ``data-*`` included), end tags and text
  nodes, each text whitespace-normalised, whitespace-only text dropped, character references resolved, the contents
  of ``<script>`` and ``<style>`` left out (so the page's markup and visible text, apart from whitespace and the
  spelling of character references);
- ``data``: every plotly figure's JSON (``sc-figs``; the shared plotly template, which belongs to the installed
  plotly, only as a hash) and the feature browser's data (``sc-browser``, decoded when compressed);
- ``style``: the SHA-256 of the page's CSS.

Run from the repository root, ONLY when a change of the page is intended (the golden is the page as it should be):

    PYTHONPATH=src python tests/report/make_golden.py

It was generated from the f-string renderer at commit 196d82c, before the report moved to Jinja2 templates (this
script, run with that commit's ``src`` on PYTHONPATH). The inputs include ``STUDY``, ``EVIDENCE``, ``LAYERS`` and
``_flagged`` of the study, evidence and checks tests: a change there needs the golden regenerated too.

Intended changes since: the summary table's "explained variance at P" column reads ``explained_variance_at_p``
(it showed n/a for every schema-2 file); regenerated with that one cell changed in each input. The circuit at P is
drawn by ``report/circuit_graph.py`` (layers up, a legend) instead of the plotly graph that put every node of a stage
on one line; regenerated with the circuit section changed (and the later figures renumbered) in the inputs that have
a circuit. The summary's sentence for an SAE none of whose features has an interval (each on fewer than 2 prompts)
says so instead of "every 95% CI includes 0"; regenerated with that sentence changed.
"""

from __future__ import annotations

import base64
import copy
import gzip
import hashlib
import json
import sys
from html.parser import HTMLParser
from pathlib import Path

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "data" / "report_golden.json"

_VOID = {"meta", "br", "hr", "img", "input", "link", "wbr"}


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.events: list[str] = []
        self.scripts: dict[str, tuple[dict, str]] = {}
        self.style: list[str] = []
        self._raw: tuple[str, dict] | None = None  # inside <script> or <style>

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.events.append("<" + " ".join([tag] + [f"{k}={v!r}" if v is not None else k for k, v in attrs]) + ">")
        if tag in ("script", "style"):
            self._raw = (tag, a)

    def handle_endtag(self, tag: str) -> None:
        self._raw = None
        if tag not in _VOID:
            self.events.append(f"</{tag}>")

    def handle_data(self, data: str) -> None:
        if self._raw is not None:
            tag, a = self._raw
            if tag == "style":
                self.style.append(data)
            elif "id" in a:  # embedded JSON (the parser may hand its text over in pieces)
                self.scripts[a["id"]] = (a, self.scripts.get(a["id"], ({}, ""))[1] + data)
            return
        text = " ".join(data.split())
        if text:
            if self.events and self.events[-1].startswith("#"):  # one text node even when the parser splits it
                self.events[-1] += " " + text
            else:
                self.events.append("#" + text)


def _json_script(attrs: dict, text: str):
    if attrs.get("data-encoding") == "gzip-base64":
        text = gzip.decompress(base64.b64decode(text)).decode("utf-8")
    return json.loads(text)


def extract(page: str) -> dict:
    """The page's markup and text (whitespace-normalised), its embedded data and its CSS's hash (see the module)."""
    p = _Page()
    p.feed(page)
    p.close()
    figures = {k: _json_script(*v) for k, v in p.scripts.items()}
    figs = figures.get("sc-figs")
    if figs is not None:
        figs["template"] = hashlib.sha256(json.dumps(figs["template"], sort_keys=True).encode()).hexdigest()
    return {"events": p.events, "data": figures, "style": hashlib.sha256("".join(p.style).encode()).hexdigest()}


def inputs() -> dict[str, dict]:
    """The fixture results; the same with every optional part (study, evidence, checks, circuit); and that with
    the other branches of the page (checks passed, no DLA components, a soft cap, no supported feature for the
    multi-feature ablation, capped feature details, an undefined faithfulness, more hostile strings)."""
    sys.path.insert(0, str(HERE))
    import report_fixtures
    from test_report_checks import _flagged
    from test_report_evidence import EVIDENCE
    from test_report_study import LAYERS, STUDY

    base = copy.deepcopy(report_fixtures._RESULTS)
    full = _flagged(copy.deepcopy(base))
    full["saes"][0].update(copy.deepcopy(STUDY))
    full["saes"][0].update(copy.deepcopy(EVIDENCE))
    full["layer_comparison"] = copy.deepcopy(LAYERS)
    full["circuit"] = copy.deepcopy(CIRCUIT)
    edges = copy.deepcopy(full)
    edges["checks"] = []
    edges["behaviour"]["performs"] = True
    s0 = edges["saes"][0]
    s0.update(loss_recovered=0.9, failed_checks=[])
    del s0["loss_recovered_undefined_reason"]
    edges["dla"].update(labels=[], mean=[], ci95=[], logit_soft_cap=30.0)
    del edges["dla"]["answer_logit_mean"]
    del s0["multi_ablation"]
    s0["multi_ablation_selection"] = {"n_supported": 0, "n_ranked": 7, "rule": HOSTILE}
    detail = s0["feature_details"][0]
    detail.update(n_active_prompts=50, max_prompts=20)
    detail["prompt_boosts"].update(boosted=[], deboosted=[])
    s0["feature_details"] = [dict(copy.deepcopy(detail), feature=k) for k in range(12)]
    edges["circuit"]["selection"]["undefined_reason"] = HOSTILE
    edges["task"].update(name=HOSTILE, example_prompts=[HOSTILE + " 'q' &", "a\tb\nc \u202e"], n_dropped_too_long=3)
    edges["model"] = HOSTILE
    return {"fixture": base, "full": full, "edges": edges}


HOSTILE = "<script>alert(1)</script>"
CIRCUIT = {
    "file": "circuit.json", "n_nodes_total": 5, "n_edges_total": 3,
    "selection": {"rule": "smallest size with faithfulness >= 0.8 " + HOSTILE, "n_nodes": 3,
                  "mean_ablation": "each node's mean over 300 documents", "faithfulness": 0.8307,
                  "completeness": -0.0103, "edge_rule": "|exact edge| >= 0.1 x the largest"},
    "agreement": {"nodes": {"atp": {"n": 5, "top": 20, "spearman": 0.94, "sign_agreement": 0.98, "top_overlap": 0.8,
                                    "top_sign_agreement": 0.7},
                            "ig": {"n": 5, "top": 20, "spearman": 0.95, "sign_agreement": 0.95, "top_overlap": 0.9,
                                   "top_sign_agreement": 0.95}},
                  "edges": {"atp": {"n": 3, "top": 20, "spearman": None, "sign_agreement": 0.9, "top_overlap": 0.35}}},
    "faithfulness": [{"n_nodes": 1, "faithfulness": -0.038, "completeness": 0.349},
                     {"n_nodes": 3, "faithfulness": 0.8307, "completeness": -0.0103}],
    "virtual_weights": [{"source": "S0:f12345", "target": HOSTILE, "exact": 1.5794, "n_prompts": 285,
                         "virtual_raw": 0.1814, "virtual_cosine": 0.3178}],
    "nodes": [
        {"id": 0, "label": "embed", "kind": "embed", "layer": -1, "effect": 1.9416, "effect_ci95": 0.238,
         "atp": 0.0743, "ig": 1.9414, "n_active_prompts": 120, "top_tokens": [], "in_circuit": True},
        {"id": 1, "label": "L0H3 " + HOSTILE, "kind": "head", "layer": 0, "effect": -0.5, "effect_ci95": 0.1,
         "atp": -0.4, "ig": -0.45, "n_active_prompts": 120, "top_tokens": [HOSTILE, " the"], "in_circuit": True},
        {"id": 2, "label": "S0:f12345", "kind": "feature", "layer": 0, "effect": 0.8765, "effect_ci95": 0.1,
         "atp": 0.7, "ig": None, "n_active_prompts": 118, "top_tokens": ['."'], "in_circuit": True},
        {"id": 3, "label": "S0:error", "kind": "error", "layer": 0, "effect": 0.01, "effect_ci95": 0.02,
         "atp": 0.02, "ig": 0.01, "in_circuit": False},
        {"id": 4, "label": "S0:f9001", "kind": "feature", "layer": 0, "effect": None, "in_circuit": False},
    ],
    "edges": [{"source": 0, "target": 2, "exact": 2.04, "atp": 1.08, "ig": 1.77, "n_prompts": 118},
              {"source": 1, "target": 2, "exact": -0.3, "atp": -0.2, "ig": None, "n_prompts": 100},
              {"source": 0, "target": 3, "exact": 0.1, "atp": 0.1, "ig": 0.1, "n_prompts": 100}],
}


def golden() -> dict:
    from saecircuits.report.render import build_report_html

    return {name: extract(build_report_html(r)) for name, r in inputs().items()}


def dump(g: dict) -> str:
    """The golden as JSON, one event per line and each embedded data element on one line (readable diffs)."""
    def one(v) -> str:
        return json.dumps(v, ensure_ascii=False, sort_keys=True, separators=(",", ":"))

    parts = []
    for name, x in sorted(g.items()):
        events = ",\n".join(one(e) for e in x["events"])
        data = ",\n".join(f"{one(k)}: {one(v)}" for k, v in sorted(x["data"].items()))
        parts.append(f'{one(name)}: {{"style": {one(x["style"])},\n"data": {{\n{data}}},\n"events": [\n{events}]}}')
    return "{\n" + ",\n".join(parts) + "}\n"


if __name__ == "__main__":
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    text = dump(golden())
    GOLDEN.write_text(text, encoding="utf-8")
    print(f"wrote {GOLDEN} ({len(text) / 1e3:.0f} kB)")
