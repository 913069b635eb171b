"""Prometheus text exposition (format 0.0.4) for the daemon.

Written by hand because the format is a few lines of text and the device install should not grow
another dependency for it; only what the daemon exports is supported (counters, gauges,
histograms with fixed buckets, optional labels).
"""
from __future__ import annotations

import bisect
import os
import threading

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(x: float) -> str:
    if x == float("inf"):
        return "+Inf"
    return repr(float(x)) if isinstance(x, float) else str(x)


class _Metric:
    kind = ""

    def __init__(self, name: str, help_: str, labelnames: tuple[str, ...] = ()):
        self.name, self.help, self.labelnames = name, help_, tuple(labelnames)
        self._lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        # An unlabelled counter exists from the start, so a scrape shows 0 rather than nothing.
        self.values: dict[tuple, float] = {} if self.labelnames else {(): 0.0}

    def inc(self, *labels: str, by: float = 1.0) -> None:
        with self._lock:
            self.values[labels] = self.values.get(labels, 0.0) + by

    def render(self) -> list[str]:
        return self.header() + [f"{self.name}{_labels(self.labelnames, k)} {_num(v)}"
                                for k, v in sorted(self.values.items())]


class Gauge(_Metric):
    """A gauge whose value is read when scraped (a callable), or set explicitly."""

    kind = "gauge"

    def __init__(self, name, help_, fn=None):
        super().__init__(name, help_)
        self.fn, self.value = fn, 0.0

    def set(self, v: float) -> None:
        self.value = float(v)

    def render(self) -> list[str]:
        v = self.fn() if self.fn is not None else self.value
        return self.header() + [f"{self.name} {_num(float(v))}"]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name, help_, buckets, labelnames=()):
        super().__init__(name, help_, labelnames)
        self.buckets = tuple(float(b) for b in buckets)
        self.series: dict[tuple, list] = {}  # labels -> [bucket counts..., sum, count]

    def observe(self, value: float, *labels: str) -> None:
        i = bisect.bisect_left(self.buckets, value)
        with self._lock:
            s = self.series.get(labels)
            if s is None:
                s = self.series[labels] = [0] * (len(self.buckets) + 1) + [0.0, 0]
            s[i] += 1
            s[-2] += value
            s[-1] += 1

    def render(self) -> list[str]:
        out = self.header()
        for labels, s in sorted(self.series.items()):
            cum = 0
            for b, n in zip(self.buckets + (float("inf"),), s[:-2]):
                cum += n
                le = 'le="' + _num(b) + '"'
                out.append(f"{self.name}_bucket{_labels(self.labelnames, labels, le)} {cum}")
            out.append(f"{self.name}_sum{_labels(self.labelnames, labels)} {_num(s[-2])}")
            out.append(f"{self.name}_count{_labels(self.labelnames, labels)} {s[-1]}")
        return out


def resident_memory_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource  # not Linux: peak instead of current, better than nothing

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Registry:
    def __init__(self):
        self.metrics: list[_Metric] = []

    def add(self, metric):
        self.metrics.append(metric)
        return metric

    def render(self) -> str:
        lines: list[str] = []
        for m in self.metrics:
            lines.extend(m.render())
        return "\n".join(lines) + "\n"


class DaemonMetrics:
    """Every metric the daemon exports, in one place so /metrics and the docs agree."""

    def __init__(self, queue_depth, clusters, log_bytes, fsyncs=lambda: 0, fsync_seconds=lambda: 0.0):
        r = self.registry = Registry()
        self.requests = r.add(Counter("protoedge_requests_total", "HTTP requests by route and status.",
                                      ("route", "status")))
        self.latency = r.add(Histogram("protoedge_request_duration_seconds",
                                       "Request handling time (headers parsed to response ready), by route.",
                                       LATENCY_BUCKETS, ("route",)))
        self.batch_size = r.add(Histogram("protoedge_batch_images", "Images per encoder call (micro-batch).",
                                          BATCH_BUCKETS))
        self.batch_seconds = r.add(Histogram("protoedge_batch_duration_seconds",
                                             "Encoder + clusterer + log time of one micro-batch.",
                                             LATENCY_BUCKETS))
        self.images = r.add(Counter("protoedge_images_total", "Images processed, by operation.", ("op",)))
        self.rejected = r.add(Counter("protoedge_overload_rejections_total",
                                      "Requests answered 503 because the queue was full."))
        r.add(Gauge("protoedge_queue_depth", "Requests waiting for the encoder.", queue_depth))
        r.add(Gauge("protoedge_clusters", "Clusters currently known.", clusters))
        r.add(Gauge("protoedge_resident_memory_bytes", "Resident set size of the daemon.", resident_memory_bytes))
        r.add(Gauge("protoedge_update_log_bytes", "Bytes in the update log since the last snapshot.", log_bytes))
        r.add(Gauge("protoedge_update_log_fsyncs", "fdatasyncs of the update log since start (group commit: "
                    "one per micro-batch with --fsync always).", fsyncs))
        r.add(Gauge("protoedge_update_log_fsync_seconds", "Seconds spent waiting for those fdatasyncs.",
                    fsync_seconds))
        self.engine_build = r.add(Gauge("protoedge_engine_build_seconds",
                                        "Seconds spent building/loading and warming the encoder engine."))
        self.ready = r.add(Gauge("protoedge_ready", "1 when the engine is built and warmed up."))
        self.log_seq = r.add(Gauge("protoedge_update_log_sequence", "Sequence number of the last logged update."))
        self.snapshots = r.add(Counter("protoedge_snapshots_total", "State snapshots written."))

    def render(self) -> str:
        return self.registry.render()
