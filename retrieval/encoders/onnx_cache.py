"""What the ONNX backend remembers between processes: file hashes and optimised graphs.

A cold ``clipsearch search`` creates one ONNX Runtime session, and creating it from an
export costs more than the query: the graph is parsed, the fp16 initializers cast back
and folded, nodes fused (~140 ms CPU for the demo text tower, plus ~35 ms to read the
tower's linked weights). ONNX Runtime can save the graph it ends up with
(``SessionOptions.optimized_model_filepath``); loading that copy with optimisation off
takes ~50 ms and runs exactly as fast. So the first session of a tower on a machine
saves its optimised graph, and later processes load it:

    $CLIPSEARCH_CACHE/onnx/optimized/<arch>-<tower>-<key>/
        model.onnx      # the optimised graph (small: weights live in model.data)
        model.data      # its initializers, float32 as the session uses them
        probe.json      # the key's parts and the graph's output for a fixed probe input

``key`` hashes what the optimised graph depends on: the sha256 of the tower's ``.onnx``
file and of the weights file it links, the onnxruntime version, the CPU (model and
flags: ``ORT_ENABLE_ALL`` graphs may use instructions of the machine that made them)
and this module's format. A changed export, onnxruntime upgrade or other CPU gives
another key; nothing is ever read from a folder that does not match.

Correctness: the folder is written under a temporary name and renamed into place once
the saved graph, loaded back, gave the same probe output as the session made from the
export. Each load runs the probe again (one forward pass, which also warms the session
the first query then uses, ~2 ms net) and drops the folder if the output differs
(a damaged file) or the graph does not load: the session is then made from the export.
Only CPU sessions use the cache. ``CLIPSEARCH_ONNX_GRAPH_CACHE=0`` turns it off.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# Where exports and what is derived from them are cached (see onnx_cache_root).
CACHE_ENV = "CLIPSEARCH_CACHE"
# sha256 of weights files and graphs, in the cache root (see cached_sha256).
SHA_CACHE_FILE = "sha256.json"
# "0" turns the optimised-graph cache off.
GRAPH_CACHE_ENV = "CLIPSEARCH_ONNX_GRAPH_CACHE"
GRAPH_CACHE_DIR = "optimized"
# Bump when the folder layout or the probe changes: old folders are then never read.
GRAPH_CACHE_FORMAT = 1
MODEL_FILE, DATA_FILE, PROBE_FILE = "model.onnx", "model.data", "probe.json"
# Initializers of at least this many bytes go to model.data (smaller stay in the graph).
EXTERNAL_MIN_BYTES = 1024
# A loaded graph must reproduce the probe output to this cosine and norm ratio. The
# same graph on the same CPU and onnxruntime gives the same numbers up to summation
# order (thread count); a damaged weight moves them far more.
PROBE_MIN_COSINE = 0.99999
PROBE_NORM_TOLERANCE = 1e-4


def onnx_cache_root() -> Path:
    """``$CLIPSEARCH_CACHE/onnx``, else ``$XDG_CACHE_HOME/clipsearch/onnx`` (~/.cache)."""
    base = os.environ.get(CACHE_ENV)
    if base:
        return Path(base) / "onnx"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "clipsearch" / "onnx"


def _file_identity(path: Path) -> list[int]:
    """What changes whenever a file's bytes may have: inode, size, mtime and ctime (ns).

    ctime cannot be set back by a user (``os.utime`` sets mtime only), so a file
    rewritten in place with the same size and a restored mtime still looks changed.
    """
    st = path.stat()
    return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def cached_sha256(path: Path) -> str:
    """sha256 of ``path``, remembered in ``$CLIPSEARCH_CACHE/onnx/sha256.json``.

    Hashing the 51 MB bundled weights costs every cold query process ~45 ms; the entry
    (keyed by the resolved path, valid while inode, size, mtime and ctime are unchanged)
    makes it a stat. A cache that cannot be written (read-only home) means hashing
    every time, nothing worse.
    """
    from clipsearch.retrieval.encoders.weights import file_sha256

    cache_file = onnx_cache_root() / SHA_CACHE_FILE
    key, identity = str(path.resolve()), _file_identity(path)
    try:
        entries = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        entries = {}
    if not isinstance(entries, dict):
        entries = {}
    entry = entries.get(key)
    if isinstance(entry, dict) and entry.get("identity") == identity:
        digest = entry.get("sha256")
        if isinstance(digest, str) and len(digest) == 64:
            return digest
    digest = file_sha256(path)
    if _file_identity(path) != identity:  # changed while hashing: do not remember
        return digest
    entries[key] = {"identity": identity, "sha256": digest}
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".sha256-", dir=cache_file.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(entries, f, indent=1)
            os.replace(tmp, cache_file)
        except OSError:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        log.debug("cannot remember the sha256 of %s in %s: %s", path, cache_file, e)
    return digest


def graph_cache_enabled() -> bool:
    """False when ``CLIPSEARCH_ONNX_GRAPH_CACHE=0``."""
    return os.environ.get(GRAPH_CACHE_ENV, "1").strip() not in ("0", "false", "no", "off")


class OptimizedGraphs:
    """The optimised-graph cache of one export's towers (see the module docstring).

    ``open(tower, options, create)`` returns a session: from the cached graph when one
    matches and passes its probe, else from ``create(options)`` (the export), saving
    the optimised graph for next time on the way.
    """

    def __init__(
        self,
        *,
        arch: str,
        graphs: dict[str, Path],
        linked: Path | None,
        probes: dict[str, np.ndarray],
        root: Path | None = None,
    ) -> None:
        """
        Args:
            arch: the model's architecture (names the folders).
            graphs: each tower's ``.onnx`` file in the export.
            linked: the weights file the towers read initializers from, if any.
            probes: each tower's probe input (batch of one), e.g. a fixed token row.
            root: the cache folder; None is ``onnx_cache_root()/optimized``.
        """
        self.arch = arch
        self.graphs = graphs
        self.linked = linked
        self.probes = probes
        self.root = root or onnx_cache_root() / GRAPH_CACHE_DIR

    def key(self, tower: str) -> dict[str, Any]:
        """What the optimised graph of ``tower`` depends on (hashed into its folder)."""
        import onnxruntime as ort

        from clipsearch.retrieval.encoders.precision import machine_id

        return {
            "format": GRAPH_CACHE_FORMAT,
            "graph_sha256": cached_sha256(self.graphs[tower]),
            "linked_sha256": cached_sha256(self.linked) if self.linked is not None else None,
            "onnxruntime": ort.__version__,
            "cpu": machine_id(),
            "level": "ORT_ENABLE_ALL",
        }

    def folder(self, tower: str, key: dict[str, Any]) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.arch)
        return self.root / f"{safe}-{tower}-{digest}"

    def open(self, tower: str, options: Any, create: Callable[[Any], Any]) -> Any:
        """A CPU session of ``tower``: cached graph if valid, else ``create(options)``.

        ``options`` are the caller's SessionOptions (threads, logging); ``create`` makes
        the session from the export with them (and with optimised-graph saving set when
        the cache is to be filled).
        """
        try:
            key = self.key(tower)
        except OSError as e:
            log.debug("no optimised-graph cache for %s %s: %s", self.arch, tower, e)
            return create(options)
        folder = self.folder(tower, key)
        if (folder / PROBE_FILE).is_file():
            sess = self._load(tower, folder, options)
            if sess is not None:
                return sess
        return self._create_and_save(tower, folder, key, options, create)

    def _load(self, tower: str, folder: Path, options: Any) -> Any:
        import onnxruntime as ort

        try:
            record = json.loads((folder / PROBE_FILE).read_text())
            expected = np.asarray(record["output"], dtype=np.float32)
            opts = _copy_options(options)
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            sess = ort.InferenceSession(
                str(folder / MODEL_FILE), sess_options=opts, providers=["CPUExecutionProvider"]
            )
            got = _run_probe(sess, self.probes[tower])
        except Exception as e:  # onnxruntime raises its own types for a damaged file
            log.warning(
                "optimised %s graph in %s is unusable (%s); rebuilding it", tower, folder, e
            )
            _remove(folder)
            return None
        if not _same_output(got, expected):
            log.warning(
                "optimised %s graph in %s no longer gives its recorded output; rebuilding it",
                tower,
                folder,
            )
            _remove(folder)
            return None
        log.debug("loaded the optimised %s graph from %s", tower, folder)
        return sess

    def _create_and_save(
        self,
        tower: str,
        folder: Path,
        key: dict[str, Any],
        options: Any,
        create: Callable[[Any], Any],
    ) -> Any:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=self.root))
        except OSError as e:
            log.debug("cannot cache optimised graphs in %s: %s", self.root, e)
            return create(options)
        opts = _copy_options(options)
        opts.optimized_model_filepath = str(tmp / MODEL_FILE)
        opts.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", DATA_FILE
        )
        opts.add_session_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes",
            str(EXTERNAL_MIN_BYTES),
        )
        try:
            sess = create(opts)
        except BaseException:
            _remove(tmp)
            raise
        try:
            output = _run_probe(sess, self.probes[tower])
            reloaded = self._load_unchecked(tmp, options)
            if not _same_output(_run_probe(reloaded, self.probes[tower]), output):
                raise ValueError("the saved graph gives other vectors than the session")
            record = {"key": key, "output": output.tolist()}
            (tmp / PROBE_FILE).write_text(json.dumps(record))
            os.rename(tmp, folder)
            log.info("cached the optimised %s graph of %s in %s", tower, self.arch, folder)
        except Exception as e:  # a full disk, a lost race, a graph onnxruntime cannot save
            log.debug("optimised %s graph not cached in %s: %s", tower, folder, e)
            _remove(tmp)
        return sess

    def _load_unchecked(self, folder: Path, options: Any) -> Any:
        import onnxruntime as ort

        opts = _copy_options(options)
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return ort.InferenceSession(
            str(folder / MODEL_FILE), sess_options=opts, providers=["CPUExecutionProvider"]
        )


def _copy_options(options: Any) -> Any:
    """A fresh SessionOptions with the caller's threads and logging (they cannot be
    copied, and one with external initializers added must not be reused)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.inter_op_num_threads = options.inter_op_num_threads
    opts.intra_op_num_threads = options.intra_op_num_threads
    opts.log_severity_level = options.log_severity_level
    return opts


def _run_probe(sess: Any, probe: np.ndarray) -> np.ndarray:
    (y,) = sess.run(None, {sess.get_inputs()[0].name: probe})
    return np.asarray(y, dtype=np.float32).reshape(-1)


def _same_output(got: np.ndarray, expected: np.ndarray) -> bool:
    if got.shape != expected.shape or not np.isfinite(got).all():
        return False
    norm_g, norm_e = float(np.linalg.norm(got)), float(np.linalg.norm(expected))
    if norm_e == 0.0:
        return norm_g == 0.0
    cosine = float(got @ expected) / max(norm_g * norm_e, 1e-30)
    return cosine >= PROBE_MIN_COSINE and abs(norm_g / norm_e - 1.0) <= PROBE_NORM_TOLERANCE


def _remove(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
