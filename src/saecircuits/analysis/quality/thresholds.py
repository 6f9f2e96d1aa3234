"""Thresholds below which a number has no meaning, in a module without torch so the report's words share them.

Used by :func:`saecircuits.analysis.quality.reconstruction.loss_recovered` (the one rule for when loss recovered is undefined)
and by :mod:`saecircuits.report.summary` (which reads results.json and must not import torch).
"""

from __future__ import annotations

__all__ = ["MIN_ABLATION_EFFECT"]

MIN_ABLATION_EFFECT = 0.01
"""Smallest mean loss increase (nats) an ablation must cause for loss recovered to be defined (see
:func:`saecircuits.analysis.quality.reconstruction.loss_recovered`): 0.01 nats is a 1% change of the answer's probability."""
