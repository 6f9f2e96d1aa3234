"""Stages ``sae_files``, ``model`` and ``corpus``: the inputs of a run, loaded (SAE files first: a broken one fails
in a second, not after the model loads)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from saecircuits.pipeline.config import PipelineError
from saecircuits.pipeline.stages import RunContext, Stage


def _file_digest(path: Path) -> str:
    """sha256 of a file, or of the sorted files of a folder (their paths relative to it, and contents).

    Symbolic links are followed (a Hugging Face cache snapshot links its files to blobs); hidden files and folders
    (``.cache/`` of ``huggingface-cli download --local-dir``, ``.git``) are left out, so bookkeeping does not
    change the digest of the same weights."""
    h = hashlib.sha256()
    path = Path(path)
    if path.is_dir():
        files = sorted((p for p in path.rglob("*")
                        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)),
                       key=lambda p: p.relative_to(path).as_posix())
    else:
        files = [path]
    for p in files:
        h.update((p.relative_to(path).as_posix() if path.is_dir() else p.name).encode())
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _load_saes(paths: list[Path], device: str, hooks: list[str | None] | None = None,
               model_name: str | None = None) -> list:
    """The SAEs of ``--sae`` (any family, hub names included; :func:`saecircuits.saes.formats.load_sae`), with
    ``hooks[i]`` the hook of ``paths[i]`` where its files do not say it (``None``/``"auto"``: from the files).

    Raises:
        SAEError: unrecognised or broken files, or an SAE whose hook is unknown (the message names the fix).
    """
    hooks = list(hooks) if hooks else [None] * len(paths)
    return [load_sae_arg(p, None if h in (None, "auto") else h, device, model_name=model_name)
            for p, h in zip(paths, hooks, strict=True)]


def load_sae_arg(path: str | Path, hook: str | None, device: str, *, model_name: str | None = None):
    """One ``--sae`` value loaded by :func:`saecircuits.saes.formats.load_sae` (any family, hub names included).

    Raises:
        SAEError: as ``load_sae``; for a folder that holds SAE folders below it rather than one SAE, the message
            lists them (:func:`saecircuits.saes.io.load_sae` says so).
    """
    from saecircuits.saes.base import SAEError
    from saecircuits.saes.formats import detect_family, load_sae
    from saecircuits.saes.hub import is_hub_name
    from saecircuits.saes.io import find_sae_folders
    from saecircuits.saes.io import load_sae as load_saelens_folder

    if not is_hub_name(path) and Path(path).is_dir():
        try:
            detect_family(Path(path))
        except SAEError:
            if find_sae_folders(path):
                load_saelens_folder(path)  # raises, listing the SAE folders below it
            raise
    return load_sae(path, hook=hook, device=device, model_name=model_name)


def _sae_files(ctx: RunContext) -> dict:
    """The SAEs of ``--sae`` (None: new SAEs are trained by the ``saes`` stage).

    Raises:
        SAEError: as :func:`_load_saes`.
        PipelineError: with the circuit on, two of them write the same hook (the circuit takes one SAE per hook).
    """
    cfg = ctx.cfg
    if not cfg.sae_paths:
        return {"given_saes": None}
    ctx.say(f"loading {len(cfg.sae_paths)} SAE(s)")
    saes = _load_saes(list(cfg.sae_paths), cfg.device, cfg.sae_hooks)
    if cfg.circuit:  # said now, not as a traceback from the circuit stage after every other analysis has run
        first: dict[str, Path] = {}
        for path, sae in zip(cfg.sae_paths, saes, strict=True):
            if sae.hook_point_out in first:
                raise PipelineError(f"--sae {first[sae.hook_point_out]} and --sae {path} both write "
                                    f"{sae.hook_point_out}; the circuit takes at most one SAE per hook: drop one, or "
                                    "pass --no-circuit to analyse each alone")
            first[sae.hook_point_out] = path
    return {"given_saes": saes}


def _model(ctx: RunContext, *, given_saes: list | None = None) -> dict:
    """The model (``ctx.model`` when one was given), its provenance, the digest that keys the SAE cache, and every
    name it goes by (the model an SAE records is compared with these).

    The model is loaded in ``cfg.dtype`` (None: float32); a given model keeps its own dtype. The given SAEs
    (``--sae``) are checked against it here, before the task and any analysis run (stage ``saes`` puts them in the
    model's basis later; the check is one forward of one token per SAE).

    Raises:
        PipelineError: ``--layers`` names a layer the model does not have, the given model's dtype is not
            ``cfg.dtype``, or a given SAE's hook point is not in the model or has another width
            (:func:`saecircuits.pipeline.saes._check_sae_fits`).
        SAEError: a given SAE was trained under other weight-processing switches.
    """
    import torch

    from saecircuits.models.load import load_model, model_dtype, model_provenance

    cfg, model = ctx.cfg, ctx.model
    if model is None:
        ctx.say(f"loading model {cfg.model}" + (f" in {cfg.dtype}" if cfg.dtype not in (None, "float32") else ""))
        model = load_model(cfg.model, tokenizer=cfg.tokenizer, device=cfg.device,
                           dtype=getattr(torch, cfg.dtype or "float32"),
                           cache_dir=Path(cfg.workspace) / "models", fold_ln=cfg.fold_ln,
                           center_writing_weights=cfg.center_writing_weights, center_unembed=cfg.center_unembed)
    elif cfg.dtype is not None and model_dtype(model) != cfg.dtype:
        raise PipelineError(f"the model given is in {model_dtype(model)} but dtype={cfg.dtype!r}: leave dtype None "
                            f"(the model's own), or convert the model (load_model(..., dtype=torch.{cfg.dtype}))")
    try:
        prov = model_provenance(model).to_dict()
    except Exception:  # noqa: BLE001 - injected bridges carry no provenance
        prov = {"source": cfg.model}
    # The SAE cache key: the weights themselves (not the path), so retraining a model in place is noticed.
    model_key = prov.get("weights_sha256") or cfg.model
    if prov.get("hf_folder") and Path(prov["hf_folder"]).is_dir():
        model_key = _file_digest(Path(prov["hf_folder"]))
    # every name the loaded model goes by: the model an SAE records is compared with these
    model_names = {str(n) for n in (model_key, prov.get("model_name"), prov.get("source"), cfg.model, cfg.model_label,
                                    getattr(model.cfg, "model_name", None)) if n}
    if cfg.layers is not None and cfg.layers != "auto":
        n_layers = int(model.cfg.n_layers)
        bad = [layer for layer in cfg.layers if not 0 <= layer < n_layers]
        if bad:
            raise PipelineError(f"--layers {bad} out of range: the model has layers 0..{n_layers - 1}")
    if given_saes:
        from saecircuits.pipeline.saes import _check_sae_fits

        for sae in given_saes:
            _check_sae_fits(sae, model)
    return {"model": model, "provenance": prov, "model_key": str(model_key), "model_names": sorted(model_names)}


def _corpus(ctx: RunContext) -> dict:
    """The documents of ``--data`` and of ``--train-data`` (default: the same)."""
    from saecircuits.data.corpus import read_documents

    cfg = ctx.cfg
    ctx.say(f"reading corpus {cfg.data}")
    docs = read_documents(cfg.data)
    train_docs = read_documents(cfg.train_data) if cfg.train_data is not None else docs
    return {"docs": docs, "train_docs": train_docs}


SAE_FILES = Stage("sae_files", _sae_files, writes=("given_saes",), codecs={"given_saes": "saes"})
MODEL = Stage("load_model", _model, reads=("given_saes",), writes=("model", "provenance", "model_key", "model_names"),
              codecs={"model": "memory"}, check=("model_key",))
# the corpora are read again on resume rather than copied into the checkpoint (the checkpoint is keyed by their
# contents, so they are the same documents)
CORPUS = Stage("corpus", _corpus, writes=("docs", "train_docs"), codecs={"docs": "memory", "train_docs": "memory"})
