"""Errors of the models stage, in a module of their own so :mod:`load` and :mod:`norms` need not import each other."""


class ModelLoadError(ValueError):
    """A model source cannot be loaded (unknown path, incomplete folder, hub unreachable, bad tokenizer)."""
