"""Finding encoder weights: bundled files, local checkpoints, caches, and downloads.

:func:`resolve_weights` maps an (architecture, pretrained) pair onto one weights file
on disk, or raises :class:`~clipsearch.retrieval.errors.ModelNotFoundError` saying where it looked
and how to fix it. It never hangs offline: before any download it checks the local
caches, honours ``HF_HUB_OFFLINE``, and probes the host with a short connect timeout.

Pretrained values, in the order they are recognised:

* ``""``: random initialisation (no file; seeded, so two random encoders agree).
* ``"bundled"``: ``retrieval/models/<arch>.safetensors`` shipped inside the package.
* ``"hf-hub:org/name"`` (or an architecture given as such): an open_clip model repo
  on the HuggingFace hub; its ``open_clip_config.json`` names the architecture.
* a path to a ``.safetensors`` file or a torch state dict (``.pt``, ``.pth``, ``.bin``).
* a pretrained tag known to open_clip for this architecture (``laion2b_s34b_b79k``).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from clipsearch.retrieval.errors import ConfigError, ModelNotFoundError

log = logging.getLogger(__name__)

HF_PREFIX = "hf-hub:"
HF_HOST = "huggingface.co"
# Seconds to wait for a TCP connection before declaring the network unreachable. Short,
# because the alternative on a firewalled machine is a multi-minute hang.
CONNECT_TIMEOUT_S = 3.0
# Weight file names an open_clip hub repo may hold, safest first.
HF_WEIGHT_FILES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
)
HF_CONFIG_FILE = "open_clip_config.json"
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True, kw_only=True)
class ResolvedWeights:
    """Where an encoder's weights come from, ready for open_clip."""

    # Name handed to ``open_clip.create_model``: an architecture or ``local-dir:<path>``.
    model_name: str
    # Architecture recorded in the fingerprint (the hub id for hub models).
    arch: str
    # Recorded in the fingerprint: tag, absolute path, hub id, "bundled", or "" (random).
    label: str
    # The weights file, or None for random initialisation.
    path: Path | None
    # Preprocessing the weights were trained with (mean, std, interpolation, resize_mode).
    preprocess: dict[str, Any] = field(default_factory=dict)
    # Whether the weights were trained with QuickGELU activations.
    quick_gelu: bool = False


def resolve_weights(
    arch: str, pretrained: str, *, cache_dir: str | None = None, download: bool = True
) -> ResolvedWeights:
    """Locate (and, when allowed and online, download) the weights for ``arch``.

    Raises:
        ModelNotFoundError: the file is missing locally and cannot be downloaded.
        ConfigError: the architecture or the pretrained tag is unknown.
    """
    if arch.startswith(HF_PREFIX) and pretrained not in ("", arch):
        raise ConfigError(
            f"{arch} brings its own weights; drop --pretrained {pretrained!r}, or name an "
            "architecture (e.g. ViT-B-32) to load other weights into"
        )
    if arch.startswith(HF_PREFIX) or pretrained.startswith(HF_PREFIX):
        hub_id = arch if arch.startswith(HF_PREFIX) else pretrained
        return _resolve_hub(arch, hub_id, cache_dir=cache_dir, download=download)
    if pretrained == "bundled":
        return _resolve_bundled(arch)
    _check_arch(arch)
    if pretrained == "":
        return ResolvedWeights(model_name=arch, arch=arch, label="", path=None)
    path = Path(pretrained).expanduser()
    if path.is_file():
        return ResolvedWeights(model_name=arch, arch=arch, label=str(path.resolve()), path=path)
    if path.is_dir():
        raise ConfigError(
            f"--pretrained {path.resolve()} is a folder; pass the weights file inside it "
            "(.safetensors, .pt, .pth or .bin)"
        )
    if _looks_like_path(pretrained):
        raise ModelNotFoundError(
            f"checkpoint file not found: {path.resolve()} (for model {arch!r}); "
            "check the path given to --pretrained"
        )
    return _resolve_tag(arch, pretrained, cache_dir=cache_dir, download=download)


def is_available_offline(arch: str, pretrained: str, *, cache_dir: str | None = None) -> bool:
    """True when ``resolve_weights`` would succeed without any network access."""
    try:
        resolve_weights(arch, pretrained, cache_dir=cache_dir, download=False)
    except (ModelNotFoundError, ConfigError):
        return False
    return True


def _check_arch(arch: str) -> None:
    import open_clip

    from clipsearch.retrieval.models import register

    register()
    known = open_clip.list_models()
    if arch not in known:
        close = difflib.get_close_matches(arch, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"unknown open_clip architecture {arch!r}{hint} "
            "(`clipsearch models list` shows them all)"
        )


def _looks_like_path(value: str) -> bool:
    return (
        os.sep in value
        or value.startswith(("~", "."))
        or value.lower().endswith(CHECKPOINT_SUFFIXES)
    )


def _resolve_bundled(arch: str) -> ResolvedWeights:
    from clipsearch.retrieval.models import MODELS_DIR, bundled_configs, bundled_weights

    if arch not in bundled_configs():
        raise ModelNotFoundError(
            f"model {arch!r} is not bundled with this clipsearch: no {MODELS_DIR / (arch + '.json')}; "
            "reinstall clipsearch, or choose another model (`clipsearch models list`)"
        )
    _check_arch(arch)
    path = bundled_weights(arch)
    if path is None:
        raise ModelNotFoundError(
            f"bundled weights for model {arch!r} not found: expected {MODELS_DIR / (arch + '.safetensors')}; "
            "reinstall clipsearch (the package data is incomplete), or pass "
            "--pretrained /path/to/file.safetensors"
        )
    return ResolvedWeights(model_name=arch, arch=arch, label="bundled", path=path)


def _resolve_tag(arch: str, tag: str, *, cache_dir: str | None, download: bool) -> ResolvedWeights:
    import open_clip

    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        known = f"known tags: {', '.join(tags)}" if tags else "it has no known pretrained tags"
        raise ConfigError(
            f"{tag!r} is neither a pretrained tag of {arch!r} nor an existing file ({known}); "
            "pass a tag, a checkpoint path, or an hf-hub: id"
        )
    preprocess = {k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in cfg}
    # open_clip matches tags case- and dash-insensitively; record the canonical spelling
    # so that "LAION2B-S34B-B79K" and "laion2b_s34b_b79k" give one fingerprint.
    tag = tag.lower().replace("-", "_")
    path = _locate_tag_file(arch, tag, cfg, cache_dir=cache_dir, download=download)
    return ResolvedWeights(
        model_name=arch,
        arch=arch,
        label=tag,
        path=path,
        preprocess=preprocess,
        quick_gelu=bool(cfg.get("quick_gelu", False)),
    )


def _locate_tag_file(
    arch: str, tag: str, cfg: dict[str, Any], *, cache_dir: str | None, download: bool
) -> Path:
    if cfg.get("file"):
        return Path(cfg["file"])
    what = f"model {arch!r} with pretrained tag {tag!r}"
    hub = cfg.get("hf_hub", "")
    if hub:
        repo_id, filename = os.path.split(hub)
        names = [n for n in (_safe_alternative(filename), filename) if n] or list(HF_WEIGHT_FILES)
        where = _hf_repo_cache(repo_id, cache_dir)
        found = _hf_cached(repo_id, names, cache_dir)
        host = HF_HOST
    else:
        url = cfg.get("url", "")
        where = Path(cache_dir or Path.home() / ".cache" / "clip") / os.path.basename(url)
        found = where if where.is_file() else None
        host = urlparse(url).hostname or url
    if found is not None:
        return found
    reason = offline_reason(host) if download else None
    if not download or reason:
        raise _not_cached(what, where, arch, tag, reason=reason)
    if hub:
        return _hf_download(repo_id, names, cache_dir, what)
    return _url_download(url, str(where.parent), what)


def _resolve_hub(
    arch: str, hub_id: str, *, cache_dir: str | None, download: bool
) -> ResolvedWeights:
    repo_id = hub_id.removeprefix(HF_PREFIX)
    if not repo_id:
        raise ConfigError(f"empty hub id in {hub_id!r}; expected hf-hub:org/name")
    what = f"hub model {hub_id!r}"
    config = _hf_cached(repo_id, [HF_CONFIG_FILE], cache_dir)
    weights = _hf_cached(repo_id, list(HF_WEIGHT_FILES), cache_dir)
    if config is None or weights is None:
        reason = offline_reason(HF_HOST) if download else None
        fetch_arch = "" if arch.startswith(HF_PREFIX) else arch
        if not download or reason:
            where = _hf_repo_cache(repo_id, cache_dir)
            raise _not_cached(
                what, where, fetch_arch or hub_id, "" if not fetch_arch else hub_id, reason=reason
            )
        config = config or _hf_download(repo_id, [HF_CONFIG_FILE], cache_dir, what)
        weights = weights or _hf_download(repo_id, list(HF_WEIGHT_FILES), cache_dir, what)
    if arch.startswith(HF_PREFIX):
        # The snapshot folder holds both the config and the weights: open_clip's
        # local-dir: scheme builds the model (and its preprocessing) from it.
        return ResolvedWeights(
            model_name=f"local-dir:{config.parent}", arch=hub_id, label=hub_id, path=weights
        )
    _check_arch(arch)
    return ResolvedWeights(
        model_name=arch, arch=arch, label=hub_id, path=weights, preprocess=_hub_preprocess(config)
    )


def _hub_preprocess(config: Path) -> dict[str, Any]:
    """The preprocessing a hub repo declares (its weights were trained with it)."""
    try:
        cfg = json.loads(config.read_text(encoding="utf-8")).get("preprocess_cfg", {})
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read hub model config {config}: {e}") from e
    return {k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in cfg}


def _safe_alternative(filename: str) -> str | None:
    if filename.endswith((".bin", ".pth")):
        return filename[:-4] + ".safetensors"
    return None


def hf_cache_dir(cache_dir: str | None = None) -> str:
    """The HuggingFace hub cache in use: ``cache_dir`` or ``HF_HUB_CACHE`` (read now)."""
    from huggingface_hub import constants

    return cache_dir or str(constants.HF_HUB_CACHE)


def _hf_repo_cache(repo_id: str, cache_dir: str | None) -> Path:
    return Path(hf_cache_dir(cache_dir)) / ("models--" + repo_id.replace("/", "--"))


def _hf_cached(repo_id: str, filenames: list[str], cache_dir: str | None) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    for name in filenames:
        hit = try_to_load_from_cache(repo_id, name, cache_dir=hf_cache_dir(cache_dir))
        if isinstance(hit, str):
            return Path(hit)
    return None


def _hf_download(repo_id: str, filenames: list[str], cache_dir: str | None, what: str) -> Path:
    from huggingface_hub import hf_hub_download

    errors = []
    for name in filenames:
        try:
            log.info("downloading %s/%s", repo_id, name)
            path = hf_hub_download(
                repo_id, name, cache_dir=hf_cache_dir(cache_dir), etag_timeout=10
            )
            return Path(path)
        except Exception as e:  # the hub client raises many types; record and try the next
            errors.append(f"{name}: {type(e).__name__}: {e}")
    raise ModelNotFoundError(
        f"could not download weights for {what} from {HF_HOST}/{repo_id}: " + "; ".join(errors)
    )


def _url_download(url: str, cache_dir: str, what: str) -> Path:
    import open_clip

    try:
        return Path(open_clip.download_pretrained_from_url(url, cache_dir=cache_dir))
    except Exception as e:
        raise ModelNotFoundError(f"could not download weights for {what} from {url}: {e}") from e


def offline_reason(host: str) -> str | None:
    """Why ``host`` cannot be reached right now, or None when a connection succeeds."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") or getattr(
        constants, "HF_HUB_OFFLINE", False
    ):
        return "HF_HUB_OFFLINE is set"
    try:
        socket.create_connection((host, 443), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        return f"cannot reach {host} ({e})"
    return None


def _not_cached(
    what: str, where: Path, model: str, pretrained: str, *, reason: str | None
) -> ModelNotFoundError:
    fetch = f"clipsearch models fetch {model}" + (
        f" --pretrained {pretrained}" if pretrained else ""
    )
    because = f" and cannot be downloaded: {reason}" if reason else ""
    return ModelNotFoundError(
        f"weights for {what} are not in the local cache (looked in {where}){because}. "
        f"To fix: pass --pretrained /path/to/file.safetensors, or run `{fetch}` while online"
    )


_sha_cache: dict[tuple[str, int, int, int], str] = {}
_sha_lock = threading.Lock()


def file_sha256(path: Path) -> str:
    """sha256 hex of a file, streamed in 1 MiB chunks, memoised per (path, inode, size, mtime)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    with _sha_lock:
        if key in _sha_cache:
            return _sha_cache[key]
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    with _sha_lock:
        _sha_cache[key] = digest
    return digest
