"""Feature co-occurrence at P: hand-worked counts and normalisations."""

from __future__ import annotations

import math

import pytest
import torch

from saecircuits.analysis.ablations.feature_effects import FeatureActs
from saecircuits.analysis.corpus.cooccurrence import feature_cooccurrence

# 6 prompts x 5 features; the features used are 1, 3, 4 (4 never active)
ACTS = torch.tensor(
    [
        [0.0, 2.0, 0.0, 1.0, 0.0],
        [0.0, 0.5, 0.0, 0.0, 0.0],
        [0.0, 3.0, 0.0, 0.2, 0.0],
        [0.0, 0.0, 0.0, 4.0, 0.0],
        [0.0, 1.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.0, 0.0],
    ]
)


@pytest.mark.parametrize("sparse", [False, True])
def test_hand_worked_counts_and_normalisations(sparse):
    acts = FeatureActs.from_dense(ACTS) if sparse else ACTS
    co = feature_cooccurrence(acts, [1, 3, 4])
    # feature 1 active on prompts {0,1,2,4} (4), feature 3 on {0,2,3} (3), both on {0,2} (2), feature 4 never
    assert co.counts.tolist() == [[4, 2, 0], [2, 3, 0], [0, 0, 0]]
    assert co.by_min[0, 1].item() == pytest.approx(2 / 3) and co.by_max[0, 1].item() == pytest.approx(2 / 4)
    assert co.by_min[0, 0].item() == 1.0 and co.by_max[1, 1].item() == 1.0
    assert all(math.isnan(co.by_min[2, j].item()) for j in range(3))  # min count 0: undefined
    assert co.by_max[0, 2].item() == 0.0 and math.isnan(co.by_max[2, 2].item())
    assert co.n_prompts == 6


def test_per_feature_thresholds():
    # feature 1 above 1.5 on {0, 2}; feature 3 above 0.5 on {0, 3}: both on {0}
    co = feature_cooccurrence(ACTS, [1, 3], threshold=[1.5, 0.5])
    assert co.counts.tolist() == [[2, 1], [1, 2]]
    assert co.by_min[0, 1].item() == 0.5 and co.by_max[0, 1].item() == 0.5
    with pytest.raises(ValueError, match="one per feature"):
        feature_cooccurrence(ACTS, [1, 3], threshold=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="indices"):
        feature_cooccurrence(ACTS, [5])
