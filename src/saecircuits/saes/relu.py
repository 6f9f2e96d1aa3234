"""ReLU ("standard") SAE: ``f = ReLU((x - b_dec) @ W_enc + b_enc)``.

The reference notebook's ``AutoEncoder`` (``sparse_coding/autoencoder.py``); SAELens calls it ``"standard"``.
Sparsity comes from a penalty in the loss (:mod:`saecircuits.saes.losses`).
"""

from __future__ import annotations

from saecircuits.saes.base import SAE


class StandardSAE(SAE):
    """ReLU SAE; all behaviour is the base class's (ReLU encode, linear decode)."""

    architecture = "standard"
