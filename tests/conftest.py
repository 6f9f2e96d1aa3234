"""Top-level test configuration.

Having this file in ``tests/`` makes pytest (default ``prepend`` import mode) put ``tests/`` on ``sys.path``, so test
modules in any sub-folder can ``import helpers`` (the shared tiny models, tokenizer and SAEs in tests/helpers.py).
"""
