"""saecircuits: find and test the sparse-autoencoder features behind a language-model behaviour."""

__version__ = "0.1.0"

__all__ = ["load_sae"]


def __getattr__(name: str):
    # torch is imported on first use, so `import saecircuits` (and the CLI's --help) stays fast
    if name == "load_sae":
        from saecircuits.saes.formats import load_sae

        return load_sae
    raise AttributeError(f"module 'saecircuits' has no attribute {name!r}")
