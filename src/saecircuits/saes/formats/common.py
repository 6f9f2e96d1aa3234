"""Reading SAE files safely, and building an SAE from tensors in SAELens orientation: shared by every family.

Nothing here unpickles code: ``.pt``/``.pth`` go through ``torch.load(weights_only=True)``, ``.npz`` through
``np.load(allow_pickle=False)``; safetensors files are memory-mapped (``safe_open``), so a 16-bit file is never
copied to float32 on the way in.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from saecircuits.saes.base import SAE, SAEConfig, SAEError
from saecircuits.saes.io import build_empty_sae, check_weights

__all__ = ["read_json", "read_safetensors", "read_torch", "read_npz", "build_from_tensors", "check_shapes",
           "check_floating", "one_dtype"]


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``.

    Raises:
        SAEError: missing, not JSON, or not an object.
    """
    if not path.is_file():
        raise SAEError(f"{path} is missing")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SAEError(f"{path} is not valid JSON ({e}); the file is corrupt") from e
    if not isinstance(d, dict):
        raise SAEError(f"{path} must hold a JSON object")
    return d


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, in its stored dtype, on the CPU (memory-mapped while read).

    Raises:
        SAEError: missing, truncated or corrupt file.
    """
    if not path.is_file():
        raise SAEError(f"{path} is missing")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no items()
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise SAEError(f"{path} cannot be read as safetensors ({e}); the file is truncated or corrupt") from e


def read_torch(path: Path) -> Any:
    """A ``.pt``/``.pth`` file read with ``torch.load(weights_only=True, map_location="cpu")`` (no code is run).

    Raises:
        SAEError: missing, corrupt, or holding objects a weights-only load refuses (the message says so).
    """
    if not path.is_file():
        raise SAEError(f"{path} is missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt / non-weights-only files
        # torch's message goes on to advise weights_only=False ("will likely succeed"): the one thing never done
        # here, so only its first sentence is kept
        reason = str(e).split(". ", 1)[0].strip()
        raise SAEError(f"{path} cannot be loaded as weights only ({type(e).__name__}: {reason}): it is not a torch "
                       "weights file, it is truncated, or it holds pickled objects; saecircuits never unpickles code "
                       "from SAE files") from e


def read_npz(path: Path) -> dict[str, torch.Tensor]:
    """Every array of an ``.npz`` file (compressed or not) as CPU tensors, without pickles.

    Raises:
        SAEError: missing or corrupt file, or an object array.
    """
    if not path.is_file():
        raise SAEError(f"{path} is missing")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise SAEError(f"{path} cannot be read as an .npz of arrays ({e}); the file is truncated or corrupt") from e
    for k, a in arrays.items():
        if a.dtype.kind not in "biufc":  # strings, bytes, dates: torch has no tensor of them
            raise SAEError(f"{path}: array {k!r} holds {a.dtype} values, not numbers; the file is not an SAE's weights")
    return {k: torch.from_numpy(np.ascontiguousarray(a)) for k, a in arrays.items()}


def check_floating(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Every tensor of ``tensors`` (name in the file -> tensor) is floating point, before a family casts or folds
    them (a cast would turn an integer or boolean tensor into weights silently).

    Raises:
        SAEError: naming the tensor and its dtype.
    """
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise SAEError(f"{path}: {name} has dtype {t.dtype}, expected floating point; the file is not an SAE's "
                           "weights (or is corrupt)")


def one_dtype(tensors: dict[str, torch.Tensor], path: Path) -> torch.dtype:
    """The one floating dtype of ``tensors`` (name in the file -> tensor), for families whose own code keeps one.

    Raises:
        SAEError: a tensor that is not floating point (:func:`check_floating`), or mixed dtypes (naming them).
    """
    check_floating(tensors, path)
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) != 1:
        raise SAEError(f"{path}: the tensors have mixed dtypes {sorted(str(t) for t in dtypes)}")
    return dtypes.pop()


def check_shapes(sae: SAE, weights: dict[str, torch.Tensor], path: Path) -> None:
    """Every tensor the SAE needs is there, with the right shape, a floating dtype and finite values; nothing else is
    (:func:`saecircuits.saes.io.check_weights`, the one check of every family).

    Raises:
        SAEError: naming the tensor, its shape and the expected one.
    """
    check_weights(sae, weights, path)


def build_from_tensors(cfg: SAEConfig, weights: dict[str, torch.Tensor], path: Path,
                       device: str | torch.device = "cpu") -> SAE:
    """An SAE of ``cfg`` holding ``weights`` (SAELens names and orientation: ``W_enc [d_in, d_sae]``, ``W_dec
    [d_sae, d_out]``, ``b_enc``, ``b_dec``, ``threshold``, ``W_skip [d_out, d_in]``, ...), in eval mode.

    Raises:
        SAEError: the tensors do not fit ``cfg`` (see :func:`check_shapes`), or the architecture refuses them.
    """
    try:
        sae = build_empty_sae(cfg)  # matrices unwritten until the weights are copied in (no zero-filled copy)
    except SAEError as e:  # e.g. a topk k outside 1..d_sae: say which file holds it
        raise SAEError(f"{path}: {e}") from None
    check_shapes(sae, weights, path)
    try:
        sae.import_weights_(weights)
    except SAEError as e:
        raise SAEError(f"{path}: {e}") from None
    return sae.to(device).eval()
