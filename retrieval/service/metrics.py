"""Request metrics in the Prometheus text exposition format (version 0.0.4).

Small on purpose: counters, one gauge callback family, and fixed-bucket histograms,
guarded by one lock. Writing the format ourselves avoids a dependency for ~100 lines.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable

# Latency buckets (seconds): dense around the 5-200 ms a search takes on a CPU.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 1.0, 2.5, 5.0, 10.0)
# Batch size buckets (queries per encoder/search call).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)

Labels = tuple[tuple[str, str], ...]


class Histogram:
    """Cumulative-bucket histogram with sum and count, as Prometheus expects."""

    def __init__(self, buckets: Iterable[float]) -> None:
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * (len(self.buckets) + 1)  # the last slot is +Inf
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.n += 1

    def quantile(self, q: float) -> float:
        """Upper bucket bound below which a share ``q`` of observations fall (inf if none)."""
        if self.n == 0:
            return math.inf
        target, running = q * self.n, 0
        for bound, count in zip((*self.buckets, math.inf), self.counts, strict=True):
            running += count
            if running >= target:
                return bound
        return math.inf


class Metrics:
    """Thread-safe registry of the service's counters and histograms."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[Labels, int] = defaultdict(int)
        self._latency: dict[Labels, Histogram] = {}
        self._rejected: dict[Labels, int] = defaultdict(int)
        self._batch_sizes = Histogram(BATCH_BUCKETS)
        self._reloads: dict[Labels, int] = defaultdict(int)
        self._gauges: dict[str, tuple[str, Callable[[], float]]] = {}
        self._info: dict[str, tuple[str, Callable[[], dict[str, str]]]] = {}

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        key: Labels = (("route", route), ("method", method))
        with self._lock:
            self._requests[(*key, ("status", str(status)))] += 1
            hist = self._latency.get(key)
            if hist is None:
                hist = self._latency[key] = Histogram(LATENCY_BUCKETS)
            hist.observe(seconds)

    def observe_rejection(self, reason: str) -> None:
        with self._lock:
            self._rejected[(("reason", reason),)] += 1

    def observe_batch(self, size: int) -> None:
        with self._lock:
            self._batch_sizes.observe(size)

    def observe_reload(self, outcome: str) -> None:
        with self._lock:
            self._reloads[(("outcome", outcome),)] += 1

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        """Register a gauge whose value is read at exposition time."""
        self._gauges[name] = (help_text, read)

    def info(self, name: str, help_text: str, read: Callable[[], dict[str, str]]) -> None:
        """Register an info metric: a constant 1 whose labels are read at exposition time."""
        self._info[name] = (help_text, read)

    @property
    def batches(self) -> int:
        """Number of batches run so far."""
        with self._lock:
            return self._batch_sizes.n

    def render(self) -> str:
        """The whole registry in Prometheus text format."""
        out: list[str] = []
        with self._lock:
            _counter(out, "clipsearch_requests_total", "HTTP requests answered.", self._requests)
            out.append("# HELP clipsearch_request_duration_seconds Request latency by route.")
            out.append("# TYPE clipsearch_request_duration_seconds histogram")
            for key, hist in sorted(self._latency.items()):
                _histogram(out, "clipsearch_request_duration_seconds", key, hist)
            _counter(
                out,
                "clipsearch_rejected_total",
                "Requests refused by admission control (queue_full, deadline).",
                self._rejected,
            )
            out.append("# HELP clipsearch_batch_size Queries per micro-batch.")
            out.append("# TYPE clipsearch_batch_size histogram")
            _histogram(out, "clipsearch_batch_size", (), self._batch_sizes)
            _counter(out, "clipsearch_reloads_total", "Index reload attempts.", self._reloads)
        for name, (help_text, read) in sorted(self._gauges.items()):
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} gauge")
            out.append(f"{name} {_number(read())}")
        for name, (help_text, read_labels) in sorted(self._info.items()):
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} gauge")
            out.append(f"{name}{_labels(tuple(sorted(read_labels().items())))} 1")
        return "\n".join(out) + "\n"


def _counter(out: list[str], name: str, help_text: str, values: dict[Labels, int]) -> None:
    out.append(f"# HELP {name} {help_text}")
    out.append(f"# TYPE {name} counter")
    for key, value in sorted(values.items()):
        out.append(f"{name}{_labels(key)} {value}")


def _histogram(out: list[str], name: str, key: Labels, hist: Histogram) -> None:
    running = 0
    for bound, count in zip((*hist.buckets, math.inf), hist.counts, strict=True):
        running += count
        le = "+Inf" if math.isinf(bound) else _number(bound)
        out.append(f"{name}_bucket{_labels((*key, ('le', le)))} {running}")
    out.append(f"{name}_sum{_labels(key)} {_number(hist.total)}")
    out.append(f"{name}_count{_labels(key)} {hist.n}")


def _labels(key: Labels) -> str:
    if not key:
        return ""
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in key)
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))
