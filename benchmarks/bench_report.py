"""Report page size and load time in headless Chromium: a real results.json, and a synthetic large run.

    python benchmarks/bench_report.py                                  # synthetic: 16,384-feature SAE, 200 cards
    python benchmarks/bench_report.py --results runs/demo/results.json # a real run (e.g. the demo's)
    python benchmarks/bench_report.py --screenshots DIR                # also save the summary and one card

The synthetic run has one SAE with d_sae = 16,384, ``--active`` features with an exact ablation effect (the
browser's list), and ``--cards`` features with full evidence: 5 top examples and 6 band examples of 64 tokens,
corpus statistics with a 70-bin histogram, activations at P, boosts, activation vs loss increase over 100 prompts and
DFA over 30 components. Load time is the time from navigation start until the page says it is ready (figures and
the browser's data read, the browser's list drawn), measured in the page (``performance.now()``), median of
``--repeat`` loads, each in a fresh browser profile. Card time is the time to build and draw one card.
Needs selenium and the Debian packages chromium and chromium-driver.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from saecircuits.report.render import build_report
from saecircuits.report.schema import validate_results, write_text_atomic

WORDS = [" the", " said", " Tom", " Lily", ".", ",", ' "', '."', " happy", " dog", " ran", " to", " park", " and",
         " she", " he", " was", " very", "\n", " ball", " mom", " play", " big", " red", " !", "?", " it", " on"]


def _example(rng, n_tok: int = 64) -> dict:
    toks = [WORDS[i] for i in rng.integers(0, len(WORDS), n_tok)]
    toks[0] = "<s>"
    acts = np.maximum(rng.normal(0, 1, n_tok), 0).round(4).tolist()
    acts[0] = None
    kinds = ["special"] + ["text"] * (n_tok - 1)
    return {"doc_index": int(rng.integers(0, 1000)), "tokens": toks, "token_kinds": kinds, "activations": acts,
            "max_activation": max(a for a in acts if a is not None)}


def synthetic_results(d_sae: int = 16_384, n_active: int = 4_000, n_cards: int = 200, seed: int = 0) -> dict:
    """A results dict (schema version 1) shaped like a large run; numbers are random, shapes are real."""
    rng = np.random.default_rng(seed)
    active = rng.choice(d_sae, n_active, replace=False)
    eff = rng.gamma(0.5, 0.02, n_active)
    order = np.argsort(-eff)
    effects = [{"feature": int(active[j]), "n_active_prompts": int(rng.integers(5, 300)),
                "fraction_active": float(rng.uniform(0.01, 1)), "mean_activation": float(rng.uniform(0.1, 3)),
                "mean_loss_increase": float(eff[j]), "ci95": float(eff[j] * 0.5), "logprob_diff": float(eff[j]),
                "logit_diff": float(eff[j] * 5), "rank_diff": 0.0} for j in order]
    cards = [e["feature"] for e in effects[:n_cards]]
    top = [{"feature": e["feature"], "loss_increase": e["mean_loss_increase"], "loss_increase_ci95": e["ci95"],
            "mean_activation": e["mean_activation"], "fraction_active": e["fraction_active"],
            "n_prompts": e["n_active_prompts"]} for e in effects[:n_cards]]
    edges = [round(x, 4) for x in np.linspace(-4, 3, 71).tolist()]
    sae = {
        "hook_point": "blocks.6.mlp.hook_post", "d_in": 4096, "d_sae": d_sae, "architecture": "standard",
        "l0": 40.0, "explained_variance": 0.8, "clean_loss": 0.2, "sae_loss": 0.25, "zero_ablation_loss": 3.0,
        "mean_ablation_loss": 2.0, "loss_recovered": 0.98, "loss_recovered_ci95": [0.97, 0.99],
        "loss_recovered_mean_ablation": 0.97, "loss_recovered_mean_ablation_ci95": [0.96, 0.98],
        "n_active_features": n_active, "top_features": top, "feature_effects": effects,
        "feature_effects_info": {"selection": "all_active", "n_pairs": n_active * 30},
        "examples": [{"feature": k, "examples": [_example(rng) for _ in range(5)]} for k in cards],
        "task_activations": [{"feature": k, "values": rng.uniform(0, 3, 100).round(4).tolist()} for k in cards],
        "corpus_stats": {
            "n_docs": 1000, "n_tokens": 200_000, "l0": 38.0, "n_dead": 120,
            "density_log10_edges": [round(x, 4) for x in np.linspace(-7, 0, 29).tolist()],
            "density_log10_counts": rng.integers(0, 2000, 28).tolist(), "activation_log10_edges": edges,
            "token_fraction": 0.25,
            "features": [{"feature": k, "density": float(rng.uniform(1e-4, 0.1)), "max_activation": 5.0,
                          "mean_when_active": 1.0, "fire_count": 500, "above_count": 100,
                          "top_tokens": [[WORDS[i], int(rng.integers(1, 100))] for i in range(10)],
                          "top_token_share": 0.3, "activation_log10_counts": rng.integers(0, 500, 70).tolist(),
                          "band_examples": {b: [_example(rng) for _ in range(2)] for b in ("upper", "middle", "lower")}}
                         for k in cards]},
        "feature_details": [{
            "feature": k,
            "prompt_boosts": {"boosted": [[WORDS[i], 0.5] for i in range(15)],
                              "deboosted": [[WORDS[i], -0.5] for i in range(15)], "n_prompts": 100},
            "weight_boosts": {"top": [[WORDS[i], 1.0] for i in range(15)], "bottom": [[WORDS[i], -1.0] for i in range(15)]},
            "loss_vs_activation": {"activation": rng.uniform(0, 3, 100).round(4).tolist(),
                                   "loss_increase": rng.normal(0.05, 0.05, 100).round(4).tolist(), "pearson_r": 0.4},
            "dfa": {"labels": [f"L{i // 8}H{i % 8}" for i in range(30)], "mean": rng.normal(0, 1, 30).round(4).tolist(),
                    "ci95": [0.1] * 30, "n_prompts": 100}} for k in cards],
    }
    results = {
        "schema_version": 1, "model": "synthetic-16k", "task": {"name": "closing-quote", "n_prompts": 300,
                                                                  "answer_token_ids": [526], "answer_tokens": ['."']},
        "dla": {"labels": ["embed", "MLP0", "MLP6"], "mean": [0.1, 1.0, 4.0], "ci95": [0.1, 0.1, 0.2],
                "completeness_max_abs_error": 1e-5},
        "saes": [sae], "notes": [],
    }
    validate_results(results)
    return results


def _driver(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync", "--window-size=1400,1000",
                 f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)


def _wait(driver, script: str, timeout: float = 60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = driver.execute_script(f"return {script}")
        if v:
            return v
        time.sleep(0.02)
    raise TimeoutError(script)


def measure(page: Path, repeat: int, screenshots: Path | None = None) -> dict:
    """Median load time (ms, in the page) and one card's build-and-draw time (ms) over ``repeat`` fresh loads."""
    loads, cards = [], []
    for r in range(repeat):
        with tempfile.TemporaryDirectory() as prof:
            driver = _driver(Path(prof))
            try:
                driver.get(page.as_uri())
                _wait(driver, "document.documentElement.getAttribute('data-ready')")
                loads.append(float(driver.execute_script("return window.scReport.readyAt")))
                if r == 0 and screenshots is not None:
                    driver.save_screenshot(str(screenshots / f"{page.stem}-summary.png"))
                first = driver.execute_script(
                    "const r = document.querySelector('#feature-browser tbody tr[data-f]'); return r && r.dataset.f")
                if first is not None:
                    ms = driver.execute_script(
                        "const t = performance.now(); window.scReport.open(0, +arguments[0]);"
                        "return performance.now() - t;", first)
                    cards.append(float(ms))
                    if r == 0 and screenshots is not None:
                        driver.execute_script("document.getElementById('fb-card').scrollIntoView()")
                        time.sleep(0.5)
                        driver.save_screenshot(str(screenshots / f"{page.stem}-card.png"))
            finally:
                driver.quit()
    return {"load_ms": statistics.median(loads), "load_ms_all": [round(x) for x in loads],
            "card_ms": statistics.median(cards) if cards else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", type=Path, help="a results.json to measure instead of the synthetic run")
    ap.add_argument("--d-sae", type=int, default=16_384)
    ap.add_argument("--active", type=int, default=4_000, help="features with an exact effect (the browser's list)")
    ap.add_argument("--cards", type=int, default=200, help="features with full evidence")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--screenshots", type=Path)
    args = ap.parse_args()
    if args.results:
        results, name = json.loads(args.results.read_text()), args.results.parent.name or "results"
    else:
        results, name = synthetic_results(args.d_sae, args.active, args.cards), f"synthetic-{args.d_sae}"
    t = time.perf_counter()
    rep = build_report(results)
    build_s = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        page = write_text_atomic(Path(tmp) / f"{name}.html", rep.html)
        if args.screenshots:
            args.screenshots.mkdir(parents=True, exist_ok=True)
        m = measure(page, args.repeat, args.screenshots)
    size = len(rep.html.encode("utf-8"))
    print(f"{name}: page {size / 1e6:.2f} MB (plotly.js bundle: {rep.bundle}), {len(rep.figures)} figures, "
          f"built in {build_s:.1f} s")
    print(f"  load until ready in headless Chromium: median {m['load_ms']:.0f} ms (runs: {m['load_ms_all']})")
    if m["card_ms"] is not None:
        print(f"  one feature card built and drawn: median {m['card_ms']:.0f} ms")


if __name__ == "__main__":
    main()
