"""The embedded default model: configuration, cache folder, and the shipped checkpoint.

``ensure_default_model(workspace)`` returns a folder holding the 2-layer GPT-Neo trained on generated dialogue
stories by :func:`saecircuits.models.train_lm.train_lm_to_folder` with :data:`DEFAULT_CONFIG`. The folder lives at
``<workspace>/models/default-<hash>`` where ``<hash>`` is :meth:`LMConfig.config_hash` of the full recipe
(story generator version and seeds, tokenizer, model and training settings), so changing any field gives a new
folder and never reuses a stale model. On the first call the folder is filled, in order of preference, from

1. the checkpoint shipped in the package (``saecircuits/assets/default/``) when its recorded ``config_hash``
   equals the requested one (a copy, no training), or
2. a fresh training run (a few CPU minutes for the default recipe).

Both paths write into a temporary sibling folder and rename it into place, so a folder at the final path is
always complete; two processes racing keep whichever finished first.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

from saecircuits.atomic import remove_dead_temps
from saecircuits.models.train_lm import (
    TRAIN_INFO,
    LMConfig,
    TrainLMError,
    load_lm,
    make_readable,
    read_train_info,
    train_lm_to_folder,
)

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = LMConfig()

DEMO_L1_COEFFICIENT = 3.0
"""L1 coefficient of the demo's SAEs on the embedded default with ``--sae-recipe reference`` (``saecircuits demo``;
the default recipe, TopK, needs no coefficient). The cross-model default of
``run`` (0.3) leaves this model's SAEs dense: about 200 of 2,048 features per token, and top features firing on
20-36% of corpus tokens (the ``dense_top_features`` check). At 3.0 the demo's two SAEs have an L0 of 15-20 per
corpus token, loss recovered 1.00 vs zero and mean ablation, and pass every check; 1.0 and 2.0 still leave dense
top features on layer 0 (measured with the demo's settings, 400k training activations per SAE)."""
"""The recipe of the embedded default model (see :class:`LMConfig` for each field)."""

_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", TRAIN_INFO)


def shipped_model_dir() -> Path | None:
    """The checkpoint folder shipped inside the package, or None when the package carries none."""
    path = Path(str(resources.files("saecircuits") / "assets" / "default"))
    if all((path / f).is_file() for f in _REQUIRED):
        return path
    return None


def default_model_dir(workspace: str | os.PathLike, config: LMConfig = DEFAULT_CONFIG) -> Path:
    """``<workspace>/models/default-<config hash>``: where the model of ``config`` is cached (may not exist yet)."""
    return Path(workspace) / "models" / f"default-{config.config_hash()}"


def _matches(folder: Path, config: LMConfig) -> bool:
    if not all((folder / f).is_file() for f in _REQUIRED):
        return False
    try:
        return read_train_info(folder).get("config_hash") == config.config_hash()
    except (OSError, ValueError):
        return False


def _publish(tmp: Path, final: Path) -> Path:
    """Rename the complete folder ``tmp`` onto ``final``; if another process got there first, keep theirs."""
    try:
        os.replace(tmp, final)
    except OSError:
        if _matches(final, _config_of(tmp)):
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            raise
    return final


def _config_of(folder: Path) -> LMConfig:
    return LMConfig(**read_train_info(folder)["config"])


def ensure_default_model(
    workspace: str | os.PathLike, config: LMConfig = DEFAULT_CONFIG, progress: bool = True
) -> Path:
    """Return the folder of the default model for ``config``, creating it if needed (see the module docstring).

    Args:
        workspace: the project workspace folder (created if missing).
        config: the recipe; :data:`DEFAULT_CONFIG` unless you study another one.
        progress: show training progress (a tqdm bar on a terminal, plain lines in a log).

    Returns:
        A folder loadable with :func:`saecircuits.models.train_lm.load_lm` (``GPTNeoForCausalLM`` +
        ``PreTrainedTokenizerFast``), containing ``train_info.json``.

    Raises:
        TrainLMError: the cache folder exists but records another configuration or is incomplete (it was
            edited by hand); delete it and call again.
    """
    final = default_model_dir(workspace, config)
    if final.exists():
        if _matches(final, config):
            logger.info("reusing the default model at %s", final)
            return final
        raise TrainLMError(
            f"{final} exists but is incomplete or was trained with another configuration; delete it and retry"
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temps(final.parent)  # copies and trainings of killed runs
    shipped = shipped_model_dir()
    if shipped is not None and _matches(shipped, config):
        logger.info("copying the shipped default model to %s", final)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.copy-{os.getpid()}-"))
        try:
            shutil.copytree(shipped, tmp, dirs_exist_ok=True)
            make_readable(tmp)
            return _publish(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    logger.info("training the default model into %s (no matching shipped checkpoint)", final)
    tmp = final.parent / f".{final.name}.train-{os.getpid()}-{os.urandom(4).hex()}"
    try:
        train_lm_to_folder(tmp, config, progress=progress)
        return _publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_default_model(workspace: str | os.PathLike, config: LMConfig = DEFAULT_CONFIG, progress: bool = True):
    """``(GPTNeoForCausalLM in eval mode, PreTrainedTokenizerFast)`` of :func:`ensure_default_model`."""
    return load_lm(ensure_default_model(workspace, config, progress=progress))
