"""Top-level test configuration.

Having this file in ``tests/`` makes pytest (default ``prepend`` import mode) put ``tests/`` on ``sys.path``, so test
modules in any sub-folder can ``import helpers`` (the shared tiny models, tokenizer and SAEs in tests/helpers.py).
"""

import os

import pytest

# Tests never touch the network: a hub lookup fails at once instead of retrying for ~50 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _empty_intervention_caches():
    """Each test starts with the shared tiny models' clean-pass and read caches empty, as a fresh process does: a
    batch assembled from rows that an earlier test's passes kept equals its own pass only up to float rounding
    (``Interventions.clean``), so a bit-equality check would otherwise depend on the tests run before it."""
    import helpers

    from saecircuits.models.interventions import _ATTR

    for model in helpers.BOOTED:
        for iv in model.__dict__.get(_ATTR, {}).values():
            iv.clear_cache()
