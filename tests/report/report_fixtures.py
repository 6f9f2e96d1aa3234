"""A hand-written results dict (results.json schema version 2) for the report tests; no model, no torch.

A uniquely named module (not conftest.py) so `from report_fixtures import ...` cannot pick up another conftest.
"""

from __future__ import annotations

import copy

import pytest

HOSTILE = "<script>alert(1)</script>"

_RESULTS = {
    "schema_version": 2,
    "saecircuits_version": "0.1.0",
    "model": "roneneldan/TinyStories-1Layer-21M",
    "model_info": {
        "n_layers": 1,
        "d_model": 1024,
        "d_mlp": 4096,
        "d_vocab": 50257,
        "n_heads": 16,
        "architecture": "GPTNeoForCausalLM",
    },
    "task": {
        "name": "closing_quote",
        "n_prompts": 120,
        "answer_token_ids": [526],
        "answer_tokens": ['."'],
        "example_prompts": ['Tom said, "I like the dog', 'Mom said, "Go to bed'],
    },
    "dla": {
        "labels": ["embed", "pos_embed", "L0H0", "L0H1", "MLP0", "bias"],
        "mean": [0.5, -0.25, 1.75, 0.125, 6.5, -0.0625],
        "ci95": [0.1, 0.05, 0.3, 0.02, 0.9, 0.0],
        "answer_logit_mean": 8.5625,
        "completeness_max_abs_error": 3.2e-5,
    },
    "saes": [
        {
            "hook_point": "blocks.0.mlp.hook_post",
            "d_in": 4096,
            "d_sae": 16384,
            "architecture": "relu",
            "l0": 23.75,
            "explained_variance_at_p": 0.8123,
            "clean_loss": 0.4321,
            "sae_loss": 0.5678,
            "zero_ablation_loss": 3.9876,
            "mean_ablation_loss": 2.3456,
            "loss_ci95": {"clean": 0.05, "sae": 0.06, "zero": 0.2, "mean": 0.15},
            "loss_recovered": 0.9619,
            "loss_recovered_ci95": [0.9412, 0.9788],
            "loss_recovered_mean_ablation": 0.9321,
            "loss_recovered_mean_ablation_ci95": [0.9011, 0.9555],
            "n_active_features": 311,
            # Deliberately not sorted by loss increase: the report sorts.
            "top_features": [
                {
                    "feature": 2077,
                    "loss_increase": 0.0123,
                    "loss_increase_ci95": 0.02,
                    "mean_activation": 0.31,
                    "fraction_active": 0.25,
                    "n_prompts": 120,
                },
                {
                    "feature": 12345,
                    "loss_increase": 0.8765,
                    "loss_increase_ci95": 0.1,
                    "mean_activation": 2.5,
                    "fraction_active": 0.9833,
                    "n_prompts": 120,
                },
                {
                    "feature": 9001,
                    "loss_increase": 0.2468,
                    "loss_increase_ci95": [0.2, 0.3],
                    "mean_activation": 1.1,
                    "fraction_active": 0.5,
                    "n_prompts": 120,
                },
            ],
            "multi_ablation": {
                "features": [12345, 9001, 2077],
                "n_prompts": 120,
                "logprob_diff": {"mean": 1.2345, "ci95": 0.11},
                "logit_diff": {"mean": 2.3456, "ci95": 0.22},
                "rank_diff": {"mean": -3.5, "ci95": 1.25},
            },
            "examples": [
                {
                    "feature": 12345,
                    "examples": [
                        {
                            "doc_index": 17,
                            "tokens": ["<|endoftext|>", "He", " said", ",", ' "', "Hi", '."', "\n"],
                            "activations": [0.0, 0.0, 0.1, 0.2, 1.0, 2.0, 4.0, 0.0],
                            "max_activation": 4.0,
                        },
                        {
                            "doc_index": 3,
                            "tokens": ["<|endoftext|>", "A", "&", '"', HOSTILE],
                            "activations": [0.0, 0.5, 1.0, 2.0, 3.0],
                            "max_activation": 3.0,
                        },
                    ],
                },
                {
                    "feature": 9001,
                    "examples": [
                        {
                            "doc_index": 8,
                            "tokens": ["<|endoftext|>", "The", "  ", "end"],
                            "activations": [0.0, -0.5, 0.25, 1.0],
                            "max_activation": 1.0,
                        },
                    ],
                },
            ],
            "training": {"tokens": 100_000_000, "steps": 24414, "final_l0": 23.75, "final_mse": 0.0123},
        },
        {
            # A second SAE with only the required keys.
            "hook_point": "blocks.0.hook_resid_post",
            "d_in": 1024,
            "d_sae": 8192,
            "l0": 40.5,
            "clean_loss": 0.4321,
            "sae_loss": 0.61,
            "zero_ablation_loss": 5.1,
            "mean_ablation_loss": 3.0,
            "loss_recovered": 0.9617,
            "loss_recovered_mean_ablation": 0.9306,
            "top_features": [
                {"feature": 77, "loss_increase": 0.05, "mean_activation": 0.7, "fraction_active": 0.1},
            ],
        },
    ],
    "timings": {"load_model": 3.2, "train_sae": 1234.5},
    "config": {"seed": 0, "batch_size": 32},
    "notes": ["Synthetic results for the report tests."],
}

# Plotly figures the report draws for _RESULTS: DLA 1; SAE 0: losses, features, multi-ablation = 3; SAE 1: losses,
# features = 2 (no multi_ablation).
N_FIGURES = 6


@pytest.fixture
def results() -> dict:
    """A fresh deep copy of the synthetic results (tests may mutate it)."""
    return copy.deepcopy(_RESULTS)
