"""``build`` and ``add`` on a Ray cluster: the same ingest, with embedding and shard writes
spread over the cluster.

The local ingest (:mod:`clipsearch.indexer.build`) stays in charge: it scans the sources,
keeps the journal under ``.staging/<key>/``, cuts the rows into shards, resumes after a
kill and commits the manifest. This module replaces two of its stages through the hooks
``embedder`` and ``shard_writer``:

* **embed** (:class:`RayEmbedder`): a Ray Data pipeline over the items still to do.
  Read, hash, skip-check and decode run as CPU tasks (``decode_items``); the encoders
  run in an actor pool (:class:`EncodeActor`, one GPU each with fp16 when the cluster
  has GPUs, CPU actors otherwise). Outcomes come back to the driver in item order
  (``preserve_order``), so the rows, their order, the shard cuts and the row ids are
  those of a single-process build.
* **write** (:class:`RayShardWriter`): each full shard is written (FAISS index trained,
  every file fsynced and renamed) by a Ray task on some node, straight into the index's
  ``shards/`` folder; the driver only journals the returned record. This needs the index
  path to be one shared filesystem seen at the same path by every node (NFS, a Lustre /
  GPFS / CephFS mount, EFS / Filestore / Azure Files); the driver checks that it sees the
  files a worker wrote and says so when it does not.

Failures: a dead encoder actor is restarted by Ray Data and its lost batches retried
(Ray Data's actor-pool policy: ``max_restarts=-1``, ``max_task_retries=-1``); a decode
task lost with its worker is retried by Ray (3 times by default), a shard-write task
``write_retries`` times.
A killed driver leaves the journal of the local build: running the same command again
resumes after the last journaled checkpoint, like a local build, and ends with the same
index. Ray is imported only here, inside the functions that need it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clipsearch.indexer.build import BuildOptions, IngestSummary, add, build
from clipsearch.indexer.pipeline import Embedded, ReadLimits
from clipsearch.indexer.sources import Item, Problem
from clipsearch.retrieval.encoders.base import Encoder, EncoderFingerprint
from clipsearch.retrieval.errors import ConfigError, IndexWriteError
from clipsearch.retrieval.manifest import ShardRecord
from clipsearch.retrieval.progress import Progress, ProgressCallback

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

# What a decode task hands an encoder actor for a row without an image to encode.
_NO_IMAGE = np.zeros((0, 0, 3), np.uint8)


@dataclass(frozen=True, kw_only=True)
class RayOptions:
    """How a build or add uses the Ray cluster."""

    # Cluster to join: "local" starts a private one in this process (stopped after the
    # build), "auto" joins the one started on this machine by `ray start`, or an
    # address ("10.0.0.5:6379", "ray://head:10001"). Ignored when Ray is already
    # initialised in this process.
    address: str = "local"
    # Encoder actors. None: one per GPU of the cluster, or one CPU actor without GPUs.
    encoders: int | None = None
    # GPUs per encoder actor. None: 1 when the cluster has GPUs (fp16), else 0 (CPU).
    gpus_per_encoder: float | None = None
    # CPUs each CPU encoder actor reserves (GPU actors reserve one for their feeder).
    cpus_per_encoder: float = 1.0
    # ONNX Runtime threads per encoder actor (None: its default, every core of the node;
    # set it to cores / actors when several CPU actors share a node).
    threads_per_encoder: int | None = None
    # Items per decode task; a block is also the unit Ray retries after a failure.
    block_items: int = 256
    # Retries of a shard-write task lost with its worker (-1: unlimited). Encoder actors
    # and decode tasks use Ray Data's own policy: a dead encoder actor is restarted and
    # its lost batches retried without limit; a decode task lost with its worker is
    # retried (Ray's default, 3 times).
    write_retries: int = 3
    # Write shards on cluster workers (needs the shared filesystem above); False writes
    # them on the driver, as a local build does.
    remote_writes: bool = True
    # Builds the encoder inside each actor; None re-creates the driver's encoder from its
    # fingerprint (same backend; fp16 on GPU actors). Must be picklable (module level).
    encoder_factory: Callable[[], Encoder] | None = None

    def __post_init__(self) -> None:
        if not self.address:
            raise ConfigError('the Ray address is empty; use "local", "auto" or host:port')
        if self.encoders is not None and self.encoders < 1:
            raise ConfigError(f"encoders must be >= 1, got {self.encoders}")
        if self.gpus_per_encoder is not None and self.gpus_per_encoder < 0:
            raise ConfigError(f"gpus_per_encoder must be >= 0, got {self.gpus_per_encoder}")
        if self.cpus_per_encoder <= 0 or self.block_items < 1:
            raise ConfigError("cpus_per_encoder must be > 0 and block_items >= 1")
        if self.threads_per_encoder is not None and self.threads_per_encoder < 1:
            raise ConfigError(f"threads_per_encoder must be >= 1, got {self.threads_per_encoder}")
        if self.write_retries < -1:
            raise ConfigError(
                f"write_retries must be >= -1 (-1: unlimited), got {self.write_retries}"
            )


def build_on_ray(
    sources: list[str | Path],
    out: str | Path,
    *,
    encoder: Encoder,
    options: BuildOptions | None = None,
    ray_options: RayOptions | None = None,
    progress: ProgressCallback | None = None,
) -> IngestSummary:
    """:func:`clipsearch.indexer.build.build` with embedding and shard writes on Ray.

    Same arguments and result; the index it commits equals a local build's (same rows
    and row ids, vectors within the encoder's float tolerance). Raises what ``build``
    raises, plus ConfigError when the cluster cannot be joined.
    """
    ray_options = ray_options or RayOptions()
    with ray_session(ray_options.address):
        return build(
            sources,
            out,
            encoder=encoder,
            options=options,
            progress=progress,
            **_on_ray(encoder, ray_options),
        )


def _on_ray(encoder: Encoder, ray_options: RayOptions) -> dict[str, Any]:
    """The ``embedder`` / ``shard_writer`` arguments that put a build's or add's work on
    Ray (shards are written by the driver unless ``remote_writes``)."""
    return {
        "embedder": RayEmbedder(encoder, ray_options),
        "shard_writer": RayShardWriter(ray_options) if ray_options.remote_writes else None,
    }


def add_on_ray(
    root: str | Path,
    sources: list[str | Path],
    *,
    encoder: Encoder | None = None,
    options: BuildOptions | None = None,
    ray_options: RayOptions | None = None,
    progress: ProgressCallback | None = None,
) -> IngestSummary:
    """:func:`clipsearch.indexer.build.add` with embedding and shard writes on Ray."""
    from clipsearch.retrieval.encoders import encoder_from_fingerprint
    from clipsearch.retrieval.manifest import read_current

    ray_options = ray_options or RayOptions()
    if encoder is None:
        encoder = encoder_from_fingerprint(read_current(Path(root)).encoder)
    with ray_session(ray_options.address):
        return add(
            root,
            sources,
            encoder=encoder,
            options=options,
            progress=progress,
            **_on_ray(encoder, ray_options),
        )


@contextlib.contextmanager
def ray_session(address: str) -> Iterator[None]:
    """Ray initialised for the body: an existing session is used as it is; otherwise
    ``address`` is joined ("local": a private cluster), and left again afterwards."""
    ray = import_ray()

    if ray.is_initialized():
        yield
        return
    try:
        # "local" is Ray's own spelling for "start a new cluster here", even when one
        # already runs on this machine (a bare ray.init() would join that one).
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ConfigError(
            f"cannot join the Ray cluster at {address!r}: {e}; start one with `ray start "
            "--head` (then --ray auto), pass its address, or use --ray local"
        ) from e
    try:
        yield
    finally:
        ray.shutdown()


def import_ray() -> Any:
    """The ``ray`` module, or ConfigError saying how to install it."""
    try:
        import ray
        import ray.data  # the build needs Ray Data, not only Ray core
    except ImportError as e:
        raise ConfigError(
            f"running on Ray needs the ray extra ({e}); install it with "
            "`pip install 'clipsearch[ray]'` (ray[data])"
        ) from e
    return ray


# ---------------------------------------------------------------------------- encoders


@dataclass(frozen=True)
class EncoderRecipe:
    """How an actor re-creates the driver's encoder (picklable; no weights inside)."""

    fingerprint: EncoderFingerprint
    # "torch", "onnx" or "auto" (the fake).
    backend: str
    # "cpu" or "cuda".
    device: str
    # Torch precision on the actor: "fp16" on GPUs, the driver's on CPUs.
    precision: str
    batch_size: int | None
    factory: Callable[[], Encoder] | None = None
    # ONNX intra-op threads (None: onnxruntime's default).
    threads: int | None = None

    def create(self) -> Encoder:
        if self.factory is not None:
            encoder = self.factory()
        else:
            from clipsearch.retrieval.encoders import encoder_from_fingerprint

            encoder = encoder_from_fingerprint(
                self.fingerprint,
                device=self.device,
                precision=self.precision,
                backend=self.backend,
                threads=self.threads,
            )
        diff = self.fingerprint.diff(encoder.fingerprint)
        if diff:
            raise ConfigError(f"the encoder actor's encoder differs from the driver's: {diff}")
        return encoder


def encoder_recipe(encoder: Encoder, options: RayOptions, gpus: float) -> EncoderRecipe:
    backend = encoder.fingerprint.backend
    precision = "fp16" if gpus > 0 else str(getattr(encoder, "precision", "auto"))
    if precision not in ("fp32", "fp16", "bf16", "bf16-weights", "auto"):
        precision = "auto"  # e.g. an ONNX int8 export: its own precision
    return EncoderRecipe(
        fingerprint=encoder.fingerprint,
        backend=backend if backend in ("torch", "onnx") else "auto",
        device="cuda" if gpus > 0 else "cpu",
        precision=precision,
        batch_size=getattr(encoder, "batch_size", None),
        factory=options.encoder_factory,
        threads=options.threads_per_encoder,
    )


class EncodeActor:
    """One encoder in the Ray Data actor pool: decoded images and texts -> vectors.

    A batch (numpy columns) holds the rows of :func:`decode_items`; rows with an image
    are prepared (``encoder.prepare_image``) and encoded together, texts likewise; rows
    whose decode failed or that are unchanged pass through without a vector.
    """

    def __init__(self, recipe: EncoderRecipe) -> None:
        _quiet_worker_logs()
        self.encoder = recipe.create()
        self.dim = recipe.fingerprint.dim

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["position"])
        vectors = np.zeros((n, self.dim), np.float32)
        has_vector = np.zeros(n, bool)
        stage = [str(s) for s in batch["stage"]]
        reason = [str(r) for r in batch["reason"]]
        action = [str(a) for a in batch["action"]]
        todo = [i for i in range(n) if not stage[i] and not batch["unchanged"][i]]
        images = [i for i in todo if batch["modality"][i] == "image"]
        texts = [i for i in todo if batch["modality"][i] != "image"]
        prepared, ok = [], []
        for i in images:
            try:
                prepared.append(self._prepare(batch["image"][i]))
                ok.append(i)
            except Exception as e:  # one image's preprocessing must not abort the build
                stage[i], action[i] = "decode", "skipped"
                reason[i] = f"preprocessing failed: {type(e).__name__}: {e}"
        if ok:
            vectors[ok] = self.encoder.encode_prepared(np.stack(prepared))
            has_vector[ok] = True
        if texts:
            enc = self.encoder.encode_texts_detailed([str(batch["text"][i]) for i in texts])
            vectors[texts] = enc.vectors
            has_vector[texts] = True
            for j, i in enumerate(texts):
                if bool(enc.truncated[j]):
                    stage[i], action[i] = "text", "kept"
                    reason[i] = (
                        f"text of {int(enc.n_tokens[j])} tokens truncated to the encoder's "
                        "context length; indexed from its beginning"
                    )
        return {
            "position": np.asarray(batch["position"], np.int64),
            "content_hash": np.asarray(batch["content_hash"], object),
            "vector": vectors,
            "has_vector": has_vector,
            "unchanged": np.asarray(batch["unchanged"], bool),
            "stage": np.asarray(stage, object),
            "reason": np.asarray(reason, object),
            "action": np.asarray(action, object),
        }

    def _prepare(self, pixels: np.ndarray) -> np.ndarray:
        from PIL import Image

        return self.encoder.prepare_image(Image.fromarray(np.asarray(pixels, np.uint8), "RGB"))


def _quiet_worker_logs() -> None:
    # Workers inherit no logging setup; keep library warnings, drop per-batch info.
    logging.getLogger("clipsearch").setLevel(logging.WARNING)


# ------------------------------------------------------------------------------ decode

# Per worker process: the skip test of an add, fetched once from the object store.
_SKIP_CACHE: dict[str, Any] = {}


@dataclass(frozen=True)
class DecodeSettings:
    """What a decode task needs (picklable)."""

    # The encoder's fingerprint (its image size sets ``decode_side``).
    fingerprint: EncoderFingerprint
    max_bytes: int
    max_pixels: int
    # FetchOptions of the build when URLs are fetched; None: URL items are skipped.
    fetch: Any
    # [ObjectRef of the add's UnchangedRows] (wrapped so Ray does not resolve it per
    # task), or None for a build.
    skip_ref: list[Any] | None


class DecodeOnly:
    """Stands in for the encoder in :func:`clipsearch.indexer.pipeline._prepare_one` on a
    CPU worker: it decodes exactly as the local pipeline (same ``decode_side``, limits,
    problems and reasons), and its "prepared" image is the decoded RGB pixels, which the
    encoder actor prepares. The local pipeline's code runs unchanged."""

    def __init__(self, fingerprint: EncoderFingerprint) -> None:
        self.fingerprint = fingerprint

    def prepare_image(self, image: Any) -> np.ndarray:
        return np.asarray(image, np.uint8)


def decode_items(batch: dict[str, np.ndarray], settings: DecodeSettings) -> dict[str, np.ndarray]:
    """Ray Data task: read, hash, skip-check and decode a block of items.

    Input columns: position, doc_id, modality, source, origin. Output adds content_hash,
    image (RGB uint8 ``[h, w, 3]``, empty when there is nothing to encode), text, and
    stage / reason / action of a problem ("" when none) and unchanged. Never raises for
    a bad item: the problem is recorded, as in :mod:`clipsearch.indexer.pipeline`.
    """
    from clipsearch.indexer.pipeline import _prepare_one

    skip = _skip_test(settings)
    limits = _limits(settings)
    decoder: Any = DecodeOnly(settings.fingerprint)
    n = len(batch["position"])
    columns: dict[str, list[Any]] = {
        k: [] for k in ("content_hash", "image", "text", "stage", "reason", "action", "unchanged")
    }
    for i in range(n):
        item = Item(
            doc_id=str(batch["doc_id"][i]),
            modality=str(batch["modality"][i]),
            source=str(batch["source"][i]),
            origin=str(batch["origin"][i]),
        )
        image, text, problem, unchanged = _NO_IMAGE, "", None, False
        if item.modality == "image":
            p = _prepare_one(int(batch["position"][i]), item, decoder, skip, limits)
            digest, problem, unchanged = p.content_hash, p.problem, p.unchanged
            if p.array is not None:
                image = p.array
        else:  # as pipeline._embed_texts
            digest = hashlib.sha256(item.source.encode("utf-8")).hexdigest()
            if not item.source.strip():
                problem = Problem(
                    source=item.origin or item.source,
                    doc_id=item.doc_id,
                    stage="text",
                    reason="empty text",
                )
            elif skip is not None and skip(item, digest):
                unchanged = True
            else:
                text = item.source
        columns["content_hash"].append(digest)
        columns["image"].append(image)
        columns["text"].append(text)
        columns["stage"].append(problem.stage if problem else "")
        columns["reason"].append(problem.reason if problem else "")
        columns["action"].append(problem.action if problem else "")
        columns["unchanged"].append(unchanged)
    result: dict[str, np.ndarray] = {k: np.asarray(batch[k]) for k in batch}
    for k, values in columns.items():
        if k == "image":
            arr = np.empty(n, object)
            arr[:] = values
            result[k] = arr
        else:
            result[k] = np.asarray(values, bool if k == "unchanged" else object)
    return result


def _skip_test(settings: DecodeSettings) -> Any:
    if settings.skip_ref is None:
        return None
    import ray

    key = settings.skip_ref[0].hex()
    if key not in _SKIP_CACHE:
        _SKIP_CACHE.clear()
        _SKIP_CACHE[key] = ray.get(settings.skip_ref[0])
    return _SKIP_CACHE[key]


def _limits(settings: DecodeSettings) -> ReadLimits:
    fetcher = None
    if settings.fetch is not None:
        from clipsearch.indexer.fetch import UrlFetcher

        fetcher = UrlFetcher(settings.fetch, max_bytes=settings.max_bytes)
    return ReadLimits(max_bytes=settings.max_bytes, max_pixels=settings.max_pixels, fetcher=fetcher)


# ------------------------------------------------------------------------------- embed


class RayEmbedder:
    """The ``embedder`` hook of ``build``/``add``: :func:`~clipsearch.indexer.pipeline.embed_items`
    on a Ray Data pipeline (decode tasks -> encoder actor pool), outcomes in item order."""

    def __init__(self, encoder: Encoder, options: RayOptions) -> None:
        self.encoder = encoder
        self.options = options

    def __call__(
        self,
        items: list[Item],
        encoder: Encoder,
        *,
        start: int = 0,
        batch_size: int = 64,
        workers: int = 2,
        skip: Any = None,
        limits: ReadLimits | None = None,
    ) -> Generator[Embedded, None, None]:
        del workers  # the cluster's CPUs decode
        if start >= len(items):
            return
        limits = limits or ReadLimits()
        ctx = _data_context()
        # Ordered outcomes are what make the shards equal a local build's; the setting is
        # the process's, so it is put back when the stream ends.
        saved = ctx.execution_options.preserve_order, ctx.enable_progress_bars
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = True, False
        expected = start
        try:
            ds = self._dataset(items, start, batch_size, skip, limits)
            for batch in ds.iter_batches(batch_format="numpy", batch_size=None, prefetch_batches=2):
                for i, position in enumerate(batch["position"]):
                    position = int(position)
                    if position != expected:  # never write shuffled rows
                        raise RuntimeError(
                            f"Ray returned item {position} where {expected} was due; the "
                            "build needs ordered results (execution_options.preserve_order)"
                        )
                    expected += 1
                    yield _outcome(items[position], position, batch, i)
        finally:
            ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved
        if expected != len(items):
            raise RuntimeError(f"Ray returned {expected - start} of {len(items) - start} items")

    def _dataset(
        self, items: list[Item], start: int, batch_size: int, skip: Any, limits: ReadLimits
    ) -> Any:
        import ray

        gpus = self._gpus_per_encoder()
        n_encoders = self.options.encoders or (
            max(1, int(ray.cluster_resources().get("GPU", 0) // gpus)) if gpus else 1
        )
        rows = [
            {
                "position": p,
                "doc_id": items[p].doc_id,
                "modality": items[p].modality,
                "source": items[p].source,
                "origin": items[p].origin,
            }
            for p in range(start, len(items))
        ]
        n_blocks = max(1, -(-len(rows) // self.options.block_items))
        settings = DecodeSettings(
            fingerprint=self.encoder.fingerprint,
            max_bytes=limits.max_bytes,
            max_pixels=limits.max_pixels,
            fetch=None if limits.fetcher is None else limits.fetcher.options,
            skip_ref=None if skip is None else [ray.put(skip)],
        )
        log.info(
            "embedding %d items on Ray: %d decode blocks, %d encoder actor(s) x %s GPU",
            len(rows),
            n_blocks,
            n_encoders,
            gpus,
        )
        decode: Any = decode_items
        ds: Any = ray.data.from_items(rows, override_num_blocks=n_blocks)
        ds = ds.map_batches(
            decode,
            fn_kwargs={"settings": settings},
            batch_size=None,
            batch_format="numpy",
            num_cpus=1,
        )
        return ds.map_batches(
            EncodeActor,
            fn_constructor_kwargs={"recipe": encoder_recipe(self.encoder, self.options, gpus)},
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=n_encoders),
            num_gpus=gpus or None,
            num_cpus=1 if gpus else self.options.cpus_per_encoder,
        )

    def _gpus_per_encoder(self) -> float:
        import ray

        if self.options.gpus_per_encoder is not None:
            return self.options.gpus_per_encoder
        return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


def _data_context() -> Any:
    import warnings

    import ray.data

    with warnings.catch_warnings():
        # Ray 2.60's DataContext() sets its own deprecated fields while being created.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray\.data")
        return ray.data.DataContext.get_current()


def _outcome(item: Item, position: int, batch: dict[str, np.ndarray], i: int) -> Embedded:
    stage = str(batch["stage"][i])
    problem = None
    if stage:
        problem = Problem(
            source=item.origin or item.source,
            doc_id=item.doc_id,
            stage=stage,
            reason=str(batch["reason"][i]),
            action=str(batch["action"][i]),
        )
    vector = np.array(batch["vector"][i], np.float32) if batch["has_vector"][i] else None
    return Embedded(
        position=position,
        item=item,
        content_hash=str(batch["content_hash"][i]),
        vector=vector,
        problem=problem,
        unchanged=bool(batch["unchanged"][i]),
    )


# ------------------------------------------------------------------------------- write


def _write_shard_remote(root: str, kwargs: dict[str, Any]) -> ShardRecord:
    from clipsearch.indexer.writer import write_shard

    _quiet_worker_logs()
    return write_shard(Path(root), **kwargs)


@dataclass
class RayShardWriter:
    """The ``shard_writer`` hook: one Ray task per shard writes its files (FAISS training
    included) into ``<root>/shards`` on whichever node runs it; the driver checks it can
    see what was written (the shared-filesystem requirement)."""

    options: RayOptions
    _remote: Any = field(default=None, repr=False)

    def __call__(
        self, root: Path, *, progress: ProgressCallback | None = None, **kwargs: Any
    ) -> ShardRecord:
        """``write_shard(root, **kwargs)`` in a Ray task; ``progress`` stays here (the
        task reports nothing until the shard is written)."""
        import ray

        from clipsearch.retrieval.store import check_file

        if self._remote is None:
            self._remote = ray.remote(num_cpus=1, max_retries=self.options.write_retries)(
                _write_shard_remote
            )
        name = str(kwargs["name"])
        detail: dict[str, int | str] = {"shard": name, "rows": len(kwargs["vectors"])}
        if progress:
            progress(Progress("write shard", 0, 3, "files", detail=detail))
        record: ShardRecord = ray.get(self._remote.remote(str(root), kwargs))
        problems = [p for f in record.files if (p := check_file(root, f, verify_hash=False))]
        if problems:
            raise IndexWriteError(
                code=errno.ENOENT,
                path=root / "shards",
                message=f"shard {name} was written by a Ray worker but the driver does not see it at "
                f"{root} ({'; '.join(problems)}); the index must live on a filesystem every "
                "node mounts at the same path (NFS, CephFS, EFS...), or build with "
                "remote_writes=False",
            )
        if progress:
            progress(Progress("write shard", 3, 3, "files", detail=detail))
        return record
