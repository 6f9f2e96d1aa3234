"""saecircuits: find and test the sparse-autoencoder features behind a language-model behaviour."""

__version__ = "0.1.0"
