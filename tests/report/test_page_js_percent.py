"""The feature browser's percentages (assets/report/page.js ``pct``), run under node when it is installed: a
fraction active that rounds to 0 or 100 is shown as "<0.1%" / ">99%", as the summaries' ``display.percent`` says it
(the browser showed 1 prompt in 3000 as "0.0%")."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

PAGE_JS = Path(__file__).resolve().parents[2] / "src" / "saecircuits" / "assets" / "report" / "page.js"


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node to run the page's JavaScript")
def test_browser_percent_never_rounds_to_a_claim():
    source = re.search(r"  function pct\(x\) \{.*?\n  \}\n", PAGE_JS.read_text(encoding="utf-8"), re.S).group(0)
    # by hand: 1/3000 = 0.033% rounds to 0.0 at one decimal; 0.0006 = 0.06% rounds to 0.1; 0.05 -> 5.0%;
    # 0.62 -> 62%; 0.996 rounds to 100 at no decimal; 1 -> 100%
    xs = [0, 1 / 3000, 0.0006, 0.05, 0.62, 0.996, 1]
    out = subprocess.run(["node", "-e", source + f"console.log(JSON.stringify({json.dumps(xs)}.map(pct)));"],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    assert json.loads(out) == ["0.0%", "<0.1%", "0.1%", "5.0%", "62%", ">99%", "100%"]
