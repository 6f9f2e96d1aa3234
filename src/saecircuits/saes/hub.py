"""SAEs named on the Hugging Face Hub: ``hf://owner/repo[@revision][/path/in/repo]`` and SAELens ``release/sae_id``.

:func:`resolve` turns such a name into a local path inside ``huggingface_hub``'s cache, which
:func:`saecircuits.saes.formats.load_sae` then reads like any folder or file:

* ``hf://owner/repo/path`` fetches only ``path`` (a file, or every file below a folder; ``snapshot_download`` with
  ``allow_patterns``). ``hf://owner/repo`` alone fetches the whole repository, so name the sub-folder of one SAE in
  repositories that hold many (most releases hold dozens to thousands).
* Files are downloaded only when online. With ``HF_HUB_OFFLINE`` set, or when the Hub cannot be reached, the cache
  alone is read (``local_files_only=True``); a name that is not cached is then refused with one line naming the
  repository and the two ways to get it (unset ``HF_HUB_OFFLINE``, or ``hf download``).
* ``HF_HUB_CACHE`` (read at each call) chooses the cache folder, as for ``huggingface_hub`` itself.

Release names (:data:`RELEASES`) are a small table written for saecircuits, not SAELens' registry: each entry says
which repository a release lives in and how an ``sae_id`` maps to a path in it. Releases outside the table are given
as ``hf://`` names (the repository and the folder of the SAE; the Hub page lists them). SAELens' ``*-canonical``
aliases (e.g. ``layer_20/width_16k/canonical``) are not resolved: they name a folder SAELens chose, so give the
folder itself (``layer_20/width_16k/average_l0_71``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from saecircuits.saes.base import SAEError

__all__ = ["HF_PREFIX", "Release", "RELEASES", "HubName", "parse_hf_name", "release_name", "is_release_name",
           "is_hub_name",
           "resolve"]

HF_PREFIX = "hf://"

#: file suffixes of single-file SAEs (an ``hf://`` path ending in one is fetched as that file alone).
_FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".npz", ".json", ".yaml")


@dataclass(frozen=True)
class Release:
    """A published set of SAEs: where it lives on the Hub and what its ``sae_id`` names.

    Attributes:
        repo: the Hugging Face repository (``owner/name``).
        model: the model its SAEs read (provenance, shown in errors).
        id_pattern: a regular expression every ``sae_id`` of the release matches; the folder in the repository is
            the ``sae_id`` itself (true of every release in :data:`RELEASES`).
        id_example: an ``sae_id``, for error messages.
    """

    repo: str
    model: str
    id_pattern: str
    id_example: str

    def path(self, sae_id: str, release: str) -> str:
        """The folder of ``sae_id`` in :attr:`repo`.

        Raises:
            SAEError: ``sae_id`` is not of this release's form (the message gives an example).
        """
        if not re.fullmatch(self.id_pattern, sae_id):
            raise SAEError(f"{sae_id!r} is not an SAE id of the release {release!r} (ids look like "
                           f"{self.id_example!r}); or give the SAE as hf://{self.repo}/<folder>")
        return sae_id


_GEMMA_SCOPE_1_ID = r"layer_\d+/width_\d+[km]/average_l0_\d+"


def _gemma_scope_1(size: str, variant: str, site: str, d_example: str) -> Release:
    model = f"gemma-2-{size}" + ("-it" if variant == "it" else "")
    return Release(f"google/gemma-scope-{size}-{variant}-{site}", model,
                   _GEMMA_SCOPE_1_ID, d_example)


def _sparsify(name: str, model: str) -> Release:
    # folders are named by the Hugging Face module path the SAE reads: layers.N, layers.N.mlp, layers.N.attention
    return Release(f"EleutherAI/{name}", model, r"(layers\.\d+(\.mlp|\.attention)?|embed_in|embed_tokens)",
                   "layers.3")


#: release name -> where it lives. Facts: gpt2-small-res-jb (Joseph Bloom's GPT-2 small residual-stream SAEs,
#: ``blocks.L.hook_resid_pre`` for L in 0..11 and ``blocks.11.hook_resid_post``, one folder per hook name);
#: Gemma Scope 1 (``layer_L/width_W/average_l0_N/params.npz``); EleutherAI's sparsify Pythia SAEs, named here by
#: their repository (one folder per module path).
RELEASES: dict[str, Release] = {
    "gpt2-small-res-jb": Release("jbloom/GPT2-Small-SAEs-Reformatted", "gpt2-small",
                                 r"blocks\.\d+\.hook_resid_(pre|post)", "blocks.6.hook_resid_pre"),
    **{f"gemma-scope-{size}-{variant}-{site}": _gemma_scope_1(size, variant, site, "layer_20/width_16k/average_l0_71")
       for size, variant, site in (("2b", "pt", "res"), ("2b", "pt", "mlp"), ("2b", "pt", "att"),
                                   ("2b", "pt", "transcoders"), ("9b", "pt", "res"), ("9b", "pt", "mlp"),
                                   ("9b", "pt", "att"), ("27b", "pt", "res"), ("9b", "it", "res"))},
    **{name: _sparsify(name, model) for name, model in (
        ("sae-pythia-70m-32k", "EleutherAI/pythia-70m"),
        ("sae-pythia-70m-deduped-32k", "EleutherAI/pythia-70m-deduped"),
        ("sae-pythia-160m-32k", "EleutherAI/pythia-160m"),
        ("sae-pythia-160m-deduped-32k", "EleutherAI/pythia-160m-deduped"))},
}


@dataclass(frozen=True)
class HubName:
    """A place in a Hub repository: ``repo`` (``owner/name``), ``revision`` (None = the default branch) and
    ``path`` (``""`` = the whole repository; else a file or folder, POSIX separators, no leading slash)."""

    repo: str
    revision: str | None
    path: str

    @property
    def text(self) -> str:
        """The ``hf://`` form of the name."""
        rev = f"@{self.revision}" if self.revision else ""
        return f"{HF_PREFIX}{self.repo}{rev}" + (f"/{self.path}" if self.path else "")

    @property
    def is_file(self) -> bool:
        """The path names one file (by its suffix), not a folder."""
        return self.path.lower().endswith(_FILE_SUFFIXES)


_REPO_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def parse_hf_name(text: str) -> HubName:
    """``hf://owner/repo[@revision][/path]`` as a :class:`HubName`.

    Raises:
        SAEError: not of that form (the message shows it), or the path climbs out of the repository (``..``).
    """
    if not text.startswith(HF_PREFIX):
        raise SAEError(f"{text!r} is not an hf:// name; write hf://owner/repo[/path/in/repo]")
    parts = text[len(HF_PREFIX):].strip("/").split("/")
    if len(parts) < 2:
        raise SAEError(f"{text!r} names no repository; write hf://owner/repo[/path/in/repo]")
    owner, name = parts[0], parts[1]
    revision = None
    if "@" in name:
        name, revision = name.split("@", 1)
        if not revision:
            raise SAEError(f"{text!r} has an empty revision after '@'; write hf://owner/repo@revision/path")
    if not (_REPO_PART.fullmatch(owner) and _REPO_PART.fullmatch(name)):
        raise SAEError(f"{text!r}: {owner}/{name} is not a Hugging Face repository name; write "
                       "hf://owner/repo[/path/in/repo]")
    rest = [p for p in parts[2:] if p not in ("", ".")]
    if ".." in rest:
        raise SAEError(f"{text!r}: '..' is not allowed in a path inside a repository")
    return HubName(f"{owner}/{name}", revision, "/".join(rest))


def release_name(text: str) -> HubName | None:
    """``release/sae_id`` (a release of :data:`RELEASES`) as a :class:`HubName`; None when ``text`` does not start
    with a known release.

    Raises:
        SAEError: the release is known but ``sae_id`` is missing or not of its form.
    """
    release, _, sae_id = str(text).partition("/")
    entry = RELEASES.get(release)
    if entry is None:
        return None
    sae_id = sae_id.strip("/")
    if not sae_id:
        raise SAEError(f"{text!r} names the release {release!r} but no SAE in it; write {release}/"
                       f"{entry.id_example}")
    return HubName(entry.repo, None, entry.path(sae_id, release))


def is_release_name(text: str) -> bool:
    """Whether ``text`` is ``release/sae_id`` for a release of :data:`RELEASES` (the id is checked by
    :func:`resolve`, which then says what is wrong with it)."""
    release, sep, _ = str(text).partition("/")
    return bool(sep) and release in RELEASES


def is_hub_name(text: str | os.PathLike) -> bool:
    """Whether an ``--sae`` value names an SAE on the Hub (``hf://...``, or ``release/sae_id`` that is not a local
    path) rather than a local file or folder."""
    text = os.fspath(text)
    return isinstance(text, str) and (text.startswith(HF_PREFIX) or (is_release_name(text) and not Path(text).exists()))


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _offline() -> bool:
    """HF_HUB_OFFLINE is set (read now, and as ``huggingface_hub`` read it when imported)."""
    from huggingface_hub import constants

    return _truthy(os.environ.get("HF_HUB_OFFLINE")) or bool(constants.HF_HUB_OFFLINE)


def _cache_dir() -> str | None:
    return os.environ.get("HF_HUB_CACHE") or None


def _shown_cache() -> str:
    from huggingface_hub import constants

    return _cache_dir() or constants.HF_HUB_CACHE


def _download_hint(name: HubName) -> str:
    include = "" if not name.path else (f" {name.path}" if name.is_file else f" --include '{name.path}/*'")
    rev = f" --revision {name.revision}" if name.revision else ""
    return f"hf download {name.repo}{include}{rev}"


def resolve(name: str | HubName) -> Path:
    """The local path of an ``hf://`` or ``release/sae_id`` name, read through the Hugging Face cache.

    Online, the named file or folder is downloaded into the cache (only what is missing); offline (``HF_HUB_OFFLINE``
    set) or when the Hub cannot be reached, the cached copy is used.

    Returns:
        the path of the file or folder inside the cache's snapshot of the repository.

    Raises:
        SAEError: a malformed name; the repository, revision or path does not exist on the Hub; or it is not cached
            and cannot be downloaded (offline or unreachable): one line naming the repository and how to get it.
    """
    if isinstance(name, str):
        hub = release_name(name) if not name.startswith(HF_PREFIX) else parse_hf_name(name)
        if hub is None:
            raise SAEError(f"{name!r} is neither an hf:// name nor a release saecircuits knows ({', '.join(RELEASES)});"
                           " give other releases as hf://owner/repo/path/of/the/sae")
    else:
        hub = name
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import snapshot_download, try_to_load_from_cache

    patterns = None if not hub.path else [hub.path] if hub.is_file else [f"{hub.path}/*"]
    offline = _offline()
    kwargs = dict(repo_id=hub.repo, revision=hub.revision, allow_patterns=patterns, cache_dir=_cache_dir())
    if offline and hub.is_file:  # one file: the cache alone says whether it is there
        cached = try_to_load_from_cache(hub.repo, hub.path, cache_dir=_cache_dir(), revision=hub.revision)
        if isinstance(cached, str):
            return Path(cached)
    unreachable = None
    try:
        folder = Path(snapshot_download(**kwargs, local_files_only=offline))
    except (hf_errors.RepositoryNotFoundError, hf_errors.RevisionNotFoundError) as err:
        # GatedRepoError is a RepositoryNotFoundError: say what the Hub said
        raise SAEError(f"{hub.text}: {type(err).__name__}: {_first_line(err)}; check the repository name and your "
                       "access to it (hf auth login for gated repositories)") from err
    except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled, hf_errors.HfHubHTTPError,
            OSError) as err:
        # not cached and offline, or the Hub unreachable: snapshot_download has already tried the cache
        unreachable = err
        folder = None
    if folder is None:
        why = "HF_HUB_OFFLINE is set" if offline else f"the Hub could not be reached ({_first_line(unreachable)})"
        raise SAEError(f"{hub.text} is not in the Hugging Face cache ({_shown_cache()}) and "
                       f"{why}; {'unset HF_HUB_OFFLINE to download it, or ' if offline else ''}fetch it with "
                       f"`{_download_hint(hub)}`")
    local = folder / PurePosixPath(hub.path) if hub.path else folder
    if not local.exists():
        if offline:
            raise SAEError(f"{hub.text} is not in the Hugging Face cache ({_shown_cache()}) "
                           f"and HF_HUB_OFFLINE is set; unset HF_HUB_OFFLINE to download it, or fetch it with "
                           f"`{_download_hint(hub)}`")
        raise SAEError(f"{hub.text}: the repository {hub.repo} has no file or folder {hub.path!r} (or it is not cached "
                       f"and the Hub could not be reached); check the path on https://huggingface.co/{hub.repo}, or "
                       f"fetch it with `{_download_hint(hub)}`")
    return local


def _first_line(err: BaseException | None) -> str:
    text = str(err or "").strip()
    return text.splitlines()[0] if text else type(err).__name__
