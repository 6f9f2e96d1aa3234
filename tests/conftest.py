"""Top-level test configuration.

Having this file in ``tests/`` makes pytest (default ``prepend`` import mode) put ``tests/`` on ``sys.path``, so test
modules in any sub-folder can ``import helpers`` (the shared tiny models, tokenizer and SAEs in tests/helpers.py).
"""

import os
import weakref

import pytest

# Tests never touch the network: a hub lookup fails at once instead of retrying for ~50 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


_LIVE_INTERVENTIONS: "weakref.WeakSet" = weakref.WeakSet()
"""Every :class:`~saecircuits.models.interventions.Interventions` built in this process (the models that tests
cache, by ``functools.cache`` or module fixtures, keep theirs between tests)."""


def pytest_configure(config):
    from saecircuits.models.interventions import Interventions

    init = Interventions.__init__

    def registering_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        _LIVE_INTERVENTIONS.add(self)

    Interventions.__init__ = registering_init


@pytest.fixture(autouse=True)
def _empty_intervention_caches():
    """Each test starts with every cached model's clean-pass and read caches empty, as a fresh process does: a
    batch assembled from rows that an earlier test's passes kept, or read at P from a kept key/value cache, equals
    its own full pass only up to float rounding (``Interventions.clean``), so a bit-equality check would otherwise
    depend on the tests run before it."""
    for iv in list(_LIVE_INTERVENTIONS):
        iv.clear_cache()
