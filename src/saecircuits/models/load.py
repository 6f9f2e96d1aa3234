"""Load a language model as a TransformerLens ``TransformerBridge``, from one of three sources.

``load_model(source)`` accepts

(a) a Hugging Face hub name (``roneneldan/TinyStories-2Layers-33M``): needs the network or a filled HF cache;
(b) a local Hugging Face folder (``config.json`` + weights + tokenizer files);
(c) a llama2.c legacy checkpoint ``.bin`` with its ``tok*.bin`` beside it (or given as ``tokenizer=``), converted
    once to an HF Llama folder (:mod:`saecircuits.models.llama2c`) and cached by content hash.

All three end in :func:`load_hf_model`, which puts the HF model in eval mode on the requested device/dtype, wraps it
with ``TransformerBridge.boot_transformers`` and applies TransformerLens' weight processing through
``enable_compatibility_mode`` (which also turns on the legacy hook names, e.g. ``blocks.1.mlp.hook_post``):

- ``fold_ln``: LayerNorm/RMSNorm gains (and LN biases) are folded into the following weights; the norms become
  "LNPre"/"RMSPre" (centre and/or divide by the scale only).
- ``center_writing_weights``: W_E, W_pos, W_O, W_out (and b_O, b_out) are made zero-mean over d_model (residual
  writes lose their mean component, which the next LayerNorm removes anyway).
- ``center_unembed``: W_U columns are made zero-mean over the vocabulary (logits shift by a per-position constant;
  log-softmax is unchanged).
- ``fold_value_biases``: b_V is moved into b_O (attention patterns sum to 1), as HookedTransformer did.

None of these changes the model's log-probabilities (checked in tests/models/test_load.py to ~1e-4). They equal
HookedTransformer.from_pretrained's defaults, which the reference notebook used.

Where the model came from is recorded on the bridge: :func:`model_provenance` returns a :class:`ModelProvenance`
(source string, ``model_name``, kind, weight hash for llama2.c, the processing switches); ``bridge.cfg.model_name``
is set to the same ``model_name``.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from saecircuits.models.errors import ModelLoadError
from saecircuits.models.norms import norm_params, readout_of

logger = logging.getLogger(__name__)


class _OfflineKernelNotice(logging.Filter):
    """Drops the ``kernels`` package's "Skipping publisher trust check for '...' because Hugging Face Hub is in
    offline mode." warnings: transformers probes three optional attention kernels on every model load, so every
    offline command printed three warnings about kernels it never uses. Other messages of that logger pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.startswith("Skipping publisher trust check") and "offline mode" in msg)


logging.getLogger("kernels._internals.hf_hub").addFilter(_OfflineKernelNotice())

_PROVENANCE_ATTR = "saecircuits_provenance"
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$|^[A-Za-z0-9][\w.-]*$")
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
GPT2_EOT = "<|endoftext|>"
GPT2_EOT_ID = 50256


@dataclass(frozen=True)
class ModelProvenance:
    """Where a loaded model came from and how its weights were processed.

    Attributes:
        source: the string given to :func:`load_model` (or ``"<injected>"`` for :func:`load_hf_model`).
        model_name: short name (hub name, folder name, or checkpoint file stem) also set as ``bridge.cfg.model_name``.
        kind: ``"hub"``, ``"hf_folder"``, ``"llama2c"`` or ``"injected"``.
        architecture: the HF architecture class name, e.g. ``GPTNeoForCausalLM``.
        weights_sha256: sha256 of the llama2.c checkpoint file (None for other kinds).
        hf_folder: the local HF folder the weights were read from (the llama2.c conversion cache, or the folder).
        processing: the weight-processing switches applied (fold_ln, center_writing_weights, center_unembed,
            fold_value_biases).
        dtype, device: as loaded.
    """

    source: str
    model_name: str
    kind: Literal["hub", "hf_folder", "llama2c", "injected"]
    architecture: str = ""
    weights_sha256: str | None = None
    hf_folder: str | None = None
    processing: dict[str, bool] = field(default_factory=dict)
    dtype: str = "float32"
    device: str = "cpu"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_dtype(model: Any) -> str:
    """The name (``"float32"``, ``"bfloat16"``, ``"float16"``) of a model's weight dtype, which its activations
    come out in: the dtype of its token embedding ``W_E``."""
    return str(model.W_E.dtype).removeprefix("torch.")


def model_provenance(bridge: Any) -> ModelProvenance:
    """The :class:`ModelProvenance` recorded by :func:`load_model` / :func:`load_hf_model`.

    Raises:
        ModelLoadError: the bridge was not loaded through this module.
    """
    prov = getattr(bridge, "__dict__", {}).get(_PROVENANCE_ATTR)
    if prov is None:
        raise ModelLoadError("this model was not loaded with saecircuits.models.load; no provenance recorded")
    return prov


# ----------------------------------------------------------------------------------------------------------------
# Tokenizers


_RESTORED_ROLES = ("bos_token", "eos_token")


def _private_tokenizer(tokenizer: Any) -> Any:
    """An independent copy of ``tokenizer`` whose ``name_or_path`` is a local folder it can be reloaded from.

    TransformerLens reloads the tokenizer by ``name_or_path`` (a ``PreTrainedTokenizerFast(tokenizer_object=...)`` has
    none and fails with ``KeyError: 'name_or_path'``) and edits it in place (a missing BOS/EOS/PAD becomes
    ``<|endoftext|>``). The copy (saved to a temporary folder and reloaded) takes those edits, so the caller's
    tokenizer object is never modified.
    """
    from transformers import AutoTokenizer

    folder = tempfile.mkdtemp(prefix="saecircuits-tokenizer-")
    tokenizer.save_pretrained(folder)
    copy = AutoTokenizer.from_pretrained(folder)
    copy.padding_side = getattr(tokenizer, "padding_side", "right")
    return copy


def _restore_special_tokens(bridge_tokenizer: Any, original: Any, vocab_size: int) -> None:
    """Undo the stand-in special tokens TransformerLens gives a tokenizer that lacks them.

    TransformerLens sets a missing BOS/EOS/PAD to ``<|endoftext|>``; in a vocabulary without that string its id is
    the unknown token's, so every prompt would start with UNK (a phantom BOS), or a new id past the model's
    vocabulary. The bridge's (private) tokenizer gets back the BOS and EOS of the tokenizer it was given: no BOS
    stays no BOS. A stand-in PAD is kept when it is a real id of the model (``bridge.to_tokens`` needs one to batch
    text; with right padding its id never reaches a result) and removed when it lies past the vocabulary.
    """
    for role in _RESTORED_ROLES:
        if getattr(original, role, None) is None and getattr(bridge_tokenizer, role, None) is not None:
            setattr(bridge_tokenizer, role, None)
    pad = getattr(bridge_tokenizer, "pad_token_id", None)
    if getattr(original, "pad_token", None) is None and pad is not None and int(pad) >= vocab_size:
        bridge_tokenizer.pad_token = None


def gpt2_bpe_tokenizer(folder: str | os.PathLike[str], save_dir: str | os.PathLike[str] | None = None):
    """Build the GPT-2 byte-level BPE tokenizer (as used by GPT-Neo and the TinyStories models) from local files.

    Reads ``vocab.json`` and ``merges.txt`` from ``folder`` with ``tokenizers.models.BPE.from_file`` (which, unlike
    transformers' slow ``GPT2Tokenizer``, does not skip the first merges line, so a merges.txt without the
    ``#version`` header keeps its first merge ``Ġ t``; a header line, if present, is skipped by tokenizers too).
    ByteLevel pre-tokenizer (no prefix space), decoder and post-processor, as GPT-2's ``tokenizer.json``.
    BOS = EOS = PAD = UNK = ``<|endoftext|>`` (id 50256). The tokenizer adds no BOS itself (GPT-2 convention);
    TransformerLens' ``to_tokens`` prepends it.

    Args:
        folder: folder holding ``vocab.json`` and ``merges.txt`` (e.g. ``../shared/data/gpt2-bpe-tokenizer``).
        save_dir: where to save the HF tokenizer files; a fresh temporary folder if None.

    Returns:
        ``PreTrainedTokenizerFast`` reloaded from ``save_dir`` (so TransformerLens can use it).

    Raises:
        FileNotFoundError: a file is missing.
        ModelLoadError: ``<|endoftext|>`` is not id 50256 in ``vocab.json``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    folder = Path(folder)
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    for f in (vocab, merges):
        if not f.is_file():
            raise FileNotFoundError(
                f"GPT-2 BPE file not found: {f} (need vocab.json and merges.txt in {folder})"
            )
    tok = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    if tok.token_to_id(GPT2_EOT) != GPT2_EOT_ID:
        raise ModelLoadError(
            f"{vocab}: {GPT2_EOT!r} has id {tok.token_to_id(GPT2_EOT)}, expected {GPT2_EOT_ID}"
        )
    tok.add_special_tokens([GPT2_EOT])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=GPT2_EOT,
        eos_token=GPT2_EOT,
        unk_token=GPT2_EOT,
        pad_token=GPT2_EOT,
        padding_side="right",
        model_max_length=2048,
    )
    out = Path(save_dir) if save_dir is not None else Path(tempfile.mkdtemp(prefix="saecircuits-gpt2bpe-"))
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return PreTrainedTokenizerFast.from_pretrained(out)


# ----------------------------------------------------------------------------------------------------------------
# Loading


def _check_norms(bridge) -> None:
    """Refuse, right after loading, a model whose norms the attributions cannot read (a norm that is neither
    LayerNorm nor RMSNorm), instead of failing after the first analyses have run. Gemma's ``(1 + weight)`` norms are
    read with their effective weight (:func:`saecircuits.models.norms.module_norm_params`)."""

    readout_of(bridge)
    for i in range(int(bridge.cfg.n_layers)):
        for name in (f"blocks.{i}.ln1", f"blocks.{i}.ln2", f"blocks.{i}.ln1_post", f"blocks.{i}.ln2_post"):
            try:
                bridge.get_submodule(name)
            except AttributeError:  # a block without this norm (GPT-J's parallel block; OLMo 2's post-norm block)
                continue
            norm_params(bridge, name)


def _drop_unsupported_switches(bridge, processing: dict[str, bool]) -> None:
    """Turn off, in ``processing``, the weight-processing switches TransformerLens cannot apply to this
    architecture, and say so in one line (no traceback, no TransformerLens UserWarning).

    Today that is ``fold_ln`` for adapters that declare ``supports_fold_ln = False`` (OLMo 2's norms come after
    attention and the MLP, so there is no following weight to fold them into). The norms then keep their trained
    weights, which the engine and the attributions apply explicitly (:mod:`saecircuits.models.norms`), so every
    number means the same; :func:`model_provenance` records the switches actually applied.
    """
    adapter = getattr(bridge, "adapter", None)
    if processing.get("fold_ln") and not getattr(adapter, "supports_fold_ln", True):
        processing["fold_ln"] = False
        logger.warning("%s: TransformerLens cannot fold this architecture's norms into the next weights; loaded "
                       "with fold_ln off (the norms keep their weights, applied explicitly), other switches as asked",
                       type(adapter).__name__.removesuffix("ArchitectureAdapter") or "model")


def _softcap_switches(hf_model: Any, center_unembed: bool) -> bool:
    """``center_unembed`` as it can apply: off for a model whose final logits are soft-capped (Gemma 2:
    ``final_logit_softcapping``), where shifting every logit of a position by a constant changes the capped logits'
    log-softmax (TransformerLens turns it off too, with a bare warning); said once, in one line."""
    cap = getattr(hf_model.config, "final_logit_softcapping", None)
    if center_unembed and cap is not None:
        logger.warning("center_unembed is off for this model: its final logits are soft-capped (cap %s), and "
                       "centring W_U would change its log-probabilities", cap)
        return False
    return center_unembed


def load_hf_model(
    hf_model: Any,
    hf_tokenizer: Any,
    *,
    model_name: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    fold_ln: bool = True,
    center_writing_weights: bool = True,
    center_unembed: bool = True,
    fold_value_biases: bool = True,
    provenance: ModelProvenance | None = None,
):
    """Wrap an in-memory Hugging Face causal LM as a processed ``TransformerBridge``.

    The HF model is moved to ``device``/``dtype``, put in eval mode (dropout off) and modified in place by the
    bridge. Weight processing follows the switches (see the module docstring); with all of them False the bridge
    keeps the raw HF weights (``enable_compatibility_mode(no_processing=True)``, legacy hook names still on).
    Parameters are frozen (``requires_grad=False``); gradients with respect to activations still work.

    Args:
        hf_model: a ``PreTrainedModel`` for causal LM (GPT-Neo, GPT-2, Llama, ...).
        hf_tokenizer: its tokenizer; the bridge gets a private copy (the caller's object is never modified), with
            the BOS and EOS of ``hf_tokenizer``: a tokenizer without BOS gets no stand-in BOS.
        model_name: recorded as ``bridge.cfg.model_name``; defaults to ``hf_model.config._name_or_path`` or
            ``"injected-model"``.
        provenance: used by :func:`load_model`; leave None.

    Returns:
        ``TransformerBridge`` whose logits ``[batch, pos, d_vocab]`` have the HF model's log-softmax.

    Raises:
        ModelLoadError: no tokenizer was given (TransformerLens would try the hub).
    """
    from transformer_lens import TransformerBridge

    if hf_tokenizer is None:
        raise ModelLoadError("load_hf_model needs the model's tokenizer (hf_tokenizer=...); none was given")
    name = model_name or getattr(hf_model.config, "_name_or_path", "") or "injected-model"
    hf_model = hf_model.to(device=device, dtype=dtype).eval()
    if not getattr(hf_model.config, "architectures", None):
        # a model built from its config in memory names no architecture; TransformerLens picks its adapter by it
        hf_model.config.architectures = [type(hf_model).__name__]
    center_unembed = _softcap_switches(hf_model, center_unembed)
    tokenizer = _private_tokenizer(hf_tokenizer)
    bridge = TransformerBridge.boot_transformers(
        name, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype
    )
    _restore_special_tokens(bridge.tokenizer, hf_tokenizer, int(bridge.cfg.d_vocab))
    processing = {
        "fold_ln": fold_ln,
        "center_writing_weights": center_writing_weights,
        "center_unembed": center_unembed,
        "fold_value_biases": fold_value_biases,
    }
    _drop_unsupported_switches(bridge, processing)
    fold_ln = processing["fold_ln"]
    bridge.enable_compatibility_mode(
        disable_warnings=True,
        no_processing=not any(processing.values()),
        fold_ln=fold_ln,
        center_writing_weights=center_writing_weights,
        center_unembed=center_unembed,
        fold_value_biases=fold_value_biases,
    )
    bridge.eval()
    for p in bridge.parameters():
        p.requires_grad_(False)
    _check_norms(bridge)
    bridge.cfg.model_name = name
    architectures = getattr(hf_model.config, "architectures", None) or [type(hf_model).__name__]
    base = provenance or ModelProvenance(source="<injected>", model_name=name, kind="injected")
    prov = ModelProvenance(
        source=base.source,
        model_name=name,
        kind=base.kind,
        architecture=architectures[0],
        weights_sha256=base.weights_sha256,
        hf_folder=base.hf_folder,
        processing=processing,
        dtype=str(dtype).removeprefix("torch."),
        device=str(device),
    )
    setattr(bridge, _PROVENANCE_ATTR, prov)
    logger.info("loaded %s (%s) with processing %s", name, prov.kind, processing)
    return bridge


DEFAULT_MODEL_NAMES = ("default", "saecircuits-default")
"""Names of the embedded default model (a 2-layer GPT-Neo trained on generated dialogue stories, the demo's) for
``--model``; a folder of that name in the working directory wins."""


def default_model_folder(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The embedded default model's folder: the workspace copy (``models.default.ensure_default_model``, as the demo
    makes it) when ``cache_dir`` (``WORKSPACE/models``) is given, else the checkpoint shipped with the package.

    Raises:
        ModelLoadError: no ``cache_dir`` and no shipped checkpoint of the current recipe.
    """
    from saecircuits.models.default import DEFAULT_CONFIG, _matches, ensure_default_model, shipped_model_dir

    if cache_dir is not None:
        return ensure_default_model(Path(cache_dir).parent, progress=False)
    shipped = shipped_model_dir()
    if shipped is None or not _matches(shipped, DEFAULT_CONFIG):
        raise ModelLoadError("the embedded default model is not shipped with this install; run `saecircuits demo` "
                             "once (it trains it into the workspace), then --model default")
    return shipped


def looks_like_path(source: str) -> bool:
    """True when ``source`` cannot be a hub id (``name`` or ``owner/name``), so it must have been meant as a path."""
    if source.startswith((".", "/", "~", "\\")) or not _HUB_NAME.match(source):
        return True
    return Path(source).suffix.lower() in {".bin", ".pt", ".safetensors", ".json", ".gguf", ".txt"}


HUB_PROBE_TIMEOUT_S = 3.0


def hub_offline_requested() -> bool:
    """True when ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` is set (now, or when huggingface_hub was imported)."""
    from huggingface_hub import is_offline_mode

    env = (os.environ.get(v, "").strip().upper() for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return is_offline_mode() or any(v in {"1", "ON", "YES", "TRUE"} for v in env)


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """One HEAD request to the hub endpoint (``HF_ENDPOINT``), no retries, through huggingface_hub's own HTTP client
    (so its proxy settings apply). Any answer, even an HTTP error status, counts as reachable.

    Why: without it, a hub name on a machine without network fails only after huggingface_hub's five retries with
    back-off, once for the tokenizer and once for the model (about 50 s), with the retry log printed twice.
    """
    from huggingface_hub import constants, get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception:  # noqa: BLE001 - DNS, refused, timeout, proxy, TLS: all mean "cannot reach the hub"
        return False
    return True


def _hub_failure(name: str, what: str, exc: BaseException, *, offline: bool, reachable: bool) -> ModelLoadError:
    from huggingface_hub import constants

    first = (str(exc).splitlines() or [""])[0]
    if offline:
        why = ("HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, so only the local Hugging Face cache was searched, "
               "and it is not there. Unset HF_HUB_OFFLINE to download it once")
    elif not reachable:
        why = (f"the Hugging Face hub ({constants.ENDPOINT}) cannot be reached and it is not in the local cache. "
               "Connect to the network once so it is cached (later runs may set HF_HUB_OFFLINE=1 to skip the hub)")
    else:
        why = f"loading it from the hub failed ({exc.__class__.__name__}: {first}). Check the name and your access"
    return ModelLoadError(f"{what} {name!r} is not a local folder or file; {why}, or download it and pass the local "
                          "folder instead.")


def _load_tokenizer_arg(tokenizer: Any, default_folder: str | None, *, local_files_only: bool | None = None) -> Any:
    """The tokenizer object for ``tokenizer`` (an object, a folder, or a hub name), else ``default_folder``'s.

    ``local_files_only=None`` decides for a hub name: the local cache only when offline or the hub is unreachable.
    """
    from transformers import AutoTokenizer

    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    where = str(tokenizer) if tokenizer is not None else default_folder
    is_local = where is not None and Path(where).expanduser().exists()
    if not is_local and local_files_only is None:
        offline = hub_offline_requested()
        reachable = not offline and hub_reachable()
        try:
            return AutoTokenizer.from_pretrained(where, local_files_only=not reachable)
        except (OSError, ValueError) as exc:
            raise _hub_failure(str(where), "tokenizer", exc, offline=offline, reachable=reachable) from exc
    try:
        return AutoTokenizer.from_pretrained(where, local_files_only=bool(local_files_only))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"could not load a tokenizer from {where!r}: {exc}. Put tokenizer files (tokenizer.json, or "
            "vocab.json + merges.txt) in the folder or pass tokenizer=<folder or tokenizer object>."
        ) from exc


def load_model(
    source: str | os.PathLike[str],
    *,
    tokenizer: Any = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    fold_ln: bool = True,
    center_writing_weights: bool = True,
    center_unembed: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
):
    """Load a causal LM from a hub name, a local HF folder or a llama2.c ``.bin`` as a processed TransformerBridge.

    Args:
        source: (a) hub name ``owner/name``; (b) folder with ``config.json``, weights and tokenizer files;
            (c) llama2.c legacy checkpoint ``.bin`` (its ``tok*.bin`` must sit beside it unless ``tokenizer`` is
            given).
        tokenizer: None (use the source's own), a tokenizer object, a folder (HF tokenizer files), or for
            llama2.c the path of its ``tok*.bin``.
        device, dtype: where the weights go (float32 recommended on CPU).
        fold_ln, center_writing_weights, center_unembed: TransformerLens weight processing (module docstring);
            value biases are folded whenever any of them is on.
        cache_dir: where llama2.c conversions are cached (``llama2c-<sha>`` subfolders); a temporary folder if None.

    Returns:
        ``TransformerBridge`` with legacy hook names; :func:`model_provenance` tells where it came from.

    Raises:
        FileNotFoundError: ``source`` looks like a path that does not exist.
        ModelLoadError: a folder without ``config.json``/weights/tokenizer or whose model cannot be loaded
            (bad config, corrupt weights), an unsupported file type, or a hub name that cannot be fetched (offline,
            hub unreachable and not cached, unknown name; fails within seconds, see :func:`hub_reachable`).
        saecircuits.models.llama2c.Llama2cError: corrupt or truncated llama2.c files.
    """
    from transformers import AutoModelForCausalLM

    text = str(source)
    path = Path(text).expanduser()
    switches = dict(
        fold_ln=fold_ln, center_writing_weights=center_writing_weights, center_unembed=center_unembed
    )
    default = text in DEFAULT_MODEL_NAMES and not path.exists()
    if default:
        path = default_model_folder(cache_dir)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{path} is a folder but has no config.json; it is not a Hugging Face model folder"
            )
        if not any((path / w).is_file() for w in _WEIGHT_FILES):
            raise ModelLoadError(f"{path} has no weights ({' / '.join(_WEIGHT_FILES)})")
        tok = _load_tokenizer_arg(tokenizer, str(path))
        from safetensors import SafetensorError

        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        except (OSError, ValueError, RuntimeError, SafetensorError) as exc:  # bad config, corrupt or mismatched weights
            raise ModelLoadError(
                f"{path}: the Hugging Face model cannot be loaded ({exc.__class__.__name__}: "
                f"{(str(exc).splitlines() or [''])[0]}); check config.json and the weight files"
            ) from exc
        prov = ModelProvenance(
            source=text, model_name=DEFAULT_MODEL_NAMES[-1] if default else path.resolve().name, kind="hf_folder",
            hf_folder=str(path.resolve()),
        )
        return load_hf_model(
            model, tok, model_name=prov.model_name, device=device, dtype=dtype, provenance=prov, **switches
        )
    if path.is_file():
        if path.suffix.lower() != ".bin":
            raise ModelLoadError(
                f"{path} is a file of an unsupported type; give a llama2.c checkpoint (.bin) or a Hugging Face folder"
            )
        from saecircuits.models.llama2c import load_llama2c_hf, sha256_file

        tok_path = tokenizer if isinstance(tokenizer, (str, os.PathLike)) else None
        model, tok, folder = load_llama2c_hf(path, tok_path, cache_dir)
        if tokenizer is not None and tok_path is None:
            tok = tokenizer
        prov = ModelProvenance(
            source=text,
            model_name=path.stem,
            kind="llama2c",
            weights_sha256=sha256_file(path),
            hf_folder=str(folder),
        )
        return load_hf_model(
            model, tok, model_name=path.stem, device=device, dtype=dtype, provenance=prov, **switches
        )
    if looks_like_path(text):
        raise FileNotFoundError(
            f"model source {text!r} is neither an existing folder/file nor a hub name ('owner/name'); check the path"
        )
    # A hub name: probe the hub once (seconds), then read only the local cache if it cannot be reached, so a machine
    # without network fails at once with one message instead of retrying for ~50 s.
    offline = hub_offline_requested()
    reachable = not offline and hub_reachable()
    try:
        tok = _load_tokenizer_arg(tokenizer, text, local_files_only=not reachable)
        model = AutoModelForCausalLM.from_pretrained(text, dtype=dtype, local_files_only=not reachable)
    except (OSError, ModelLoadError) as exc:
        raise _hub_failure(text, "model", exc, offline=offline, reachable=reachable) from exc
    if not offline and not reachable:
        logger.warning("the Hugging Face hub cannot be reached; %r was loaded from the local cache "
                       "(set HF_HUB_OFFLINE=1 to skip the hub check)", text)
    prov = ModelProvenance(source=text, model_name=text, kind="hub")
    return load_hf_model(model, tok, model_name=text, device=device, dtype=dtype, provenance=prov, **switches)
