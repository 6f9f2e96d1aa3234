"""Top-level test configuration.

Having this file in ``tests/`` makes pytest (default ``prepend`` import mode) put ``tests/`` on ``sys.path``, so test
modules in any sub-folder can ``import helpers`` (the shared tiny models, tokenizer and SAEs in tests/helpers.py).
"""

import os

# Tests never touch the network: a hub lookup fails at once instead of retrying for ~50 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
