"""The example notebook runs top to bottom on the embedded default (executed with nbclient)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "closing_quote.ipynb"


@pytest.mark.slow
def test_example_notebook_runs_top_to_bottom(tmp_path):
    nbformat = pytest.importorskip("nbformat", reason="nbformat is in the dev extra: pip install -e '.[dev]'")
    nbclient = pytest.importorskip("nbclient", reason="nbclient is in the dev extra: pip install -e '.[dev]'")
    pytest.importorskip("ipykernel", reason="ipykernel is in the dev extra: pip install -e '.[dev]'")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    env_ws = tmp_path / "workspace"
    os.environ["SAECIRCUITS_WORKSPACE"] = str(env_ws)  # inherited by the kernel
    try:
        client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                         resources={"metadata": {"path": str(tmp_path)}})
        client.execute()
    finally:
        os.environ.pop("SAECIRCUITS_WORKSPACE", None)
    outputs = {i: c.get("outputs", []) for i, c in enumerate(nb.cells) if c.cell_type == "code"}
    errors = [o for outs in outputs.values() for o in outs if o.get("output_type") == "error"]
    assert not errors
    # the result objects rendered themselves as HTML tables, and the Task as its short summary
    html = [o["data"]["text/html"] for outs in outputs.values() for o in outs
            if o.get("output_type") == "execute_result" and "text/html" in o.get("data", {})]
    assert any("Direct logit attribution to the answer" in h and "<table" in h for h in html)
    assert any("Exact single-feature ablation at P" in h for h in html)
    assert any("loss recovered vs zero ablation" in h for h in html)
    plain = [o["data"].get("text/plain", "") for outs in outputs.values() for o in outs
             if o.get("output_type") == "execute_result"]
    assert any(p.startswith("Task('closing-quote': ") and "prompts" in p for p in plain)
    # figures came back as plotly figures
    assert sum("application/vnd.plotly.v1+json" in o.get("data", {}) for outs in outputs.values() for o in outs) >= 2
