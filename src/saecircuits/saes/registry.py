"""Architecture registry: name in ``cfg.json`` -> SAE class, and :func:`build_sae`.

Names follow SAELens: ``"standard"`` (ReLU), ``"topk"``, ``"batchtopk"``, ``"jumprelu"``, ``"gated"`` (inference
only).
"""

from __future__ import annotations

from saecircuits.saes.base import SAE, SAEConfig, SAEError
from saecircuits.saes.batchtopk import BatchTopKSAE
from saecircuits.saes.gated import GatedSAE
from saecircuits.saes.jumprelu import JumpReLUSAE
from saecircuits.saes.relu import StandardSAE
from saecircuits.saes.topk import TopKSAE

_REGISTRY: dict[str, type[SAE]] = {}


def register_architecture(cls: type[SAE]) -> type[SAE]:
    """Register an :class:`SAE` subclass under ``cls.architecture`` (usable as a class decorator).

    Raises:
        SAEError: the name is already taken by another class.
    """
    name = cls.architecture
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise SAEError(f"architecture {name!r} is already registered to {_REGISTRY[name].__name__}")
    _REGISTRY[name] = cls
    return cls


def architectures() -> list[str]:
    """Registered architecture names, sorted."""
    return sorted(_REGISTRY)


def trainable_architectures() -> list[str]:
    """Registered architectures :mod:`saecircuits.saes.trainer` can train (gated SAEs are loaded, not trained)."""
    return sorted(name for name, cls in _REGISTRY.items() if cls.trainable)


def get_architecture(name: str) -> type[SAE]:
    """The SAE class registered under ``name``.

    Raises:
        SAEError: unknown name (the message lists the known ones).
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise SAEError(f"unknown SAE architecture {name!r}; choose one of {architectures()}") from None


def build_sae(cfg: SAEConfig, *, seed: int | None = None, initialize: bool = True) -> SAE:
    """Construct the SAE named by ``cfg.architecture`` on the CPU.

    Args:
        cfg: the configuration (architecture-specific keys such as ``k`` live in ``cfg.extra``).
        seed: initialisation seed; default ``cfg.extra["seed"]`` or 47 (the reference notebook's). A local
            ``torch.Generator`` is used: the global RNG is not touched.
        initialize: ``False`` leaves all parameters zero (for loading weights right after).

    Raises:
        SAEError: unknown architecture, bad sizes or missing architecture settings.
    """
    sae = get_architecture(cfg.architecture)(cfg)
    if initialize:
        sae.initialize_(seed)
    return sae


for _cls in (StandardSAE, TopKSAE, BatchTopKSAE, JumpReLUSAE, GatedSAE):
    register_architecture(_cls)
