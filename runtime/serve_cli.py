"""`protoedge serve` and `protoedge bench daemon`. Only click at import time; the server (aiohttp,
onnxruntime) loads when the command runs."""
from __future__ import annotations

from pathlib import Path

import click

from .bundle import PRECISIONS  # stdlib only

DEFAULT_PORT = 8470  # also in server.py; repeated so that this module imports only click and the stdlib
REPO = Path(__file__).resolve().parent.parent
DEFAULT_BUNDLE = REPO / "models" / "omniglot" / "bundle"


def register(main: click.Group, bench: click.Group) -> None:
    main.add_command(serve)
    bench.add_command(bench_daemon)


@click.command()
@click.argument("bundle", type=click.Path(exists=True))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="TCP address. Non-loopback addresses need --token-file.")
@click.option("--port", type=int, default=None,
              help=f"TCP port [default: {DEFAULT_PORT}, or none when --socket is given].")
@click.option("--socket", "socket_path", type=click.Path(dir_okay=False), default=None,
              help="Also (or only) listen on this Unix socket, created with mode 0600.")
@click.option("--state", "state_dir", type=click.Path(file_okay=False), default=None,
              help="Folder for snapshots and the update log. Without it the clusters live in memory only.")
@click.option("--backend", type=click.Choice(["auto", "cpu", "cuda", "tensorrt", "ort-tensorrt"]), default="auto",
              show_default=True)
@click.option("--precision", type=click.Choice(("auto",) + PRECISIONS), default="auto", show_default=True,
              help="Bundle variant. auto: int8-cpu (the fast INT8 for ONNX Runtime on CPUs) on the CPU backend "
                   "when the bundle has it, else fp32; int8 is the one for TensorRT.")
@click.option("--threads", type=click.IntRange(1, 256), default=None,
              help="CPU inference threads [default: all cores but one, which the event loop uses].")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Engine cache (TensorRT plans) [default: $PROTOEDGE_CACHE_DIR or ~/.cache/protoedge].")
@click.option("--token-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Require 'Authorization: Bearer <token>' (file content) on every route but the health probes.")
@click.option("--max-batch", type=click.IntRange(1, 4096), default=None,
              help="Most images per micro-batch and per encoder call [default: 8 on the CPU backend, where "
                   "small batches keep two in flight (one embedded while the other is applied and answered) "
                   "and cost no more per image; 64 on a GPU].")
@click.option("--max-wait-ms", type=click.FloatRange(0, 1000), default=0.0, show_default=True,
              help="Longest a micro-batch waits for requests whose bodies are still being read (0: the "
                   "worker starts on whatever is queued as soon as it is free).")
@click.option("--max-queue", type=click.IntRange(1, 1 << 20), default=256, show_default=True,
              help="Requests waiting or being read; beyond it the answer is 503 + Retry-After.")
@click.option("--max-queue-mb", type=click.FloatRange(0.001, 65536), default=64.0, show_default=True,
              help="Request bodies held at once (queued or being read); beyond it the answer is 503.")
@click.option("--max-body-mb", type=click.FloatRange(0.001, 1024), default=8.0, show_default=True,
              help="Largest request body.")
@click.option("--max-images", type=click.IntRange(1, 1 << 20), default=1024, show_default=True,
              help="Most images in one request.")
@click.option("--fsync", type=click.Choice(["always", "interval"]), default="always", show_default=True,
              help="always: an answered update is on disk. interval: on disk within --fsync-interval "
                   "(a process crash loses nothing, a power loss up to that window).")
@click.option("--fsync-interval", type=click.FloatRange(0.01, 60), default=1.0, show_default=True,
              help="Seconds between fsyncs with --fsync interval.")
@click.option("--snapshot-every", type=click.IntRange(1, None), default=20000, show_default=True,
              help="Snapshot after this many logged updates (keeps the replay short).")
@click.option("--event-loop", type=click.Choice(["auto", "asyncio", "uvloop"]), default="auto", show_default=True,
              help="auto: uvloop if it is installed (optional; cheaper per request), else asyncio's own loop.")
@click.option("--switch-interval-ms", type=click.FloatRange(0.01, 100), default=0.5, show_default=True,
              help="Python GIL hand-over interval between the event loop and the worker thread.")
@click.option("--pipeline/--no-pipeline", default=None,
              help="The worker thread only embeds; the event loop applies, logs and answers each micro-batch "
                   "while the next one is embedded (--no-pipeline: the worker thread does both in turn) "
                   "[default: --pipeline on GPU backends, --no-pipeline on the CPU].")
@click.option("--inline-idle/--no-inline-idle", default=True, show_default=True,
              help="A request that arrives alone, with the worker idle, runs on the event loop (saves two "
                   "thread wake-ups; under load requests queue for the worker as usual).")
@click.option("--fast-path/--no-fast-path", default=True, show_default=True,
              help="Serve POST /v1/cluster and /v1/assign with .npy bodies on a lean HTTP path in front of "
                   "aiohttp (--no-fast-path: every request through aiohttp's handler).")
@click.option("--sync-thread/--no-sync-thread", default=True, show_default=True,
              help="With --fsync always, fdatasync each applied micro-batch and answer it on a thread of its "
                   "own while the worker goes on with the next batch (--no-sync-thread: the worker waits).")
@click.option("--threshold", type=float, default=None,
              help="New-cluster distance [default: from the bundle's calibration].")
@click.option("--max-clusters", type=click.IntRange(1, None), default=1000, show_default=True)
@click.option("--recluster/--no-recluster", default=None,
              help="The clusterer's repair also redraws clusters by a Ward cut chosen by silhouette (README, "
                   "Runtime; better on streams of few look-alike classes, ~1.3 ms a repair) [default: off]. "
                   "Like --threshold, fixed for a state folder by its first snapshot.")
def serve(bundle, host, port, socket_path, state_dir, backend, precision, threads, cache_dir, token_file,
          max_batch, max_wait_ms, max_queue, max_queue_mb, max_body_mb, max_images, fsync, fsync_interval,
          snapshot_every, event_loop, switch_interval_ms, pipeline, inline_idle, fast_path, sync_thread,
          threshold, max_clusters, recluster):
    """Run the local clustering daemon on BUNDLE (HTTP on loopback and/or a Unix socket).

    \b
    Routes: /v2/health/live|ready, /v2/models/encoder, /v1/embed|cluster|assign|examples,
    /v1/clusters[/ID[/label]], /v1/clusters/merge, /v1/state/snapshot, /metrics, /openapi.json.
    SIGTERM stops accepting, drains, snapshots and exits 0. Under systemd (Type=notify) READY=1 is
    sent after the engine is built and warmed up.
    """
    import logging
    import os

    # The clusterer's matrix products are tiny (clusters x 64): BLAS worker threads only add
    # hand-offs and spinning next to the inference threads. Set before numpy loads; an explicit
    # environment setting wins.
    for var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    from .server import ServerConfig, run_server

    logging.getLogger("protoedge").setLevel(min(logging.getLogger().level, logging.INFO))
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if port is None and socket_path is None:
        port = DEFAULT_PORT
    clusterer = {"max_clusters": max_clusters}
    if threshold is not None:
        clusterer["threshold"] = threshold
    if recluster is not None:
        clusterer["recluster"] = recluster
    config = ServerConfig(bundle=bundle, host=host, port=port, socket_path=socket_path, state_dir=state_dir,
                          backend=backend, precision=precision, threads=threads, cache_dir=cache_dir,
                          token_file=token_file, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue,
                          max_queue_bytes=int(max_queue_mb * 1024 * 1024),
                          max_body_bytes=int(max_body_mb * 1024 * 1024), max_images_per_request=max_images,
                          fsync=fsync, fsync_interval_s=fsync_interval, snapshot_every=snapshot_every,
                          event_loop=event_loop, switch_interval_ms=switch_interval_ms, pipeline=pipeline,
                          inline_idle=inline_idle, fast_path=fast_path, sync_thread=sync_thread,
                          clusterer=clusterer)
    raise SystemExit(run_server(config))


@click.command("daemon")
@click.argument("bundle", type=click.Path(exists=True), default=str(DEFAULT_BUNDLE))
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="benchmarks/results", show_default=True)
@click.option("--seconds", type=click.FloatRange(0.5, 120), default=6.0, show_default=True,
              help="Length of each throughput measurement.")
@click.option("--requests", "n_latency", type=click.IntRange(100, 100000), default=2000, show_default=True,
              help="Single-image requests for the one-client latency.")
@click.option("--threads", type=int, default=None,
              help="Inference threads, daemon and in-process alike [default: the daemon's, all cores but one].")
@click.option("--fsync", type=click.Choice(["both", "always", "interval"]), default="both", show_default=True,
              help="Measure the daemon with this fsync policy, or with each in turn.")
@click.option("--windows", type=click.IntRange(1, 100), default=5, show_default=True,
              help="The main 16-client load runs this many consecutive windows of --seconds on one daemon.")
@click.option("--quiet-windows", type=click.IntRange(0, 100), default=3, show_default=True,
              help="Then more windows (up to --max-windows in all) until this many ran with the host "
                   "stealing under 3% of the CPU (read from /proc/stat).")
@click.option("--max-windows", type=click.IntRange(1, 200), default=20, show_default=True)
def bench_daemon(bundle, out_dir, seconds, n_latency, threads, fsync, windows, quiet_windows, max_windows):
    """Daemon latency/throughput on loopback vs the runtime in-process; writes daemon.md/.json."""
    from protoedge.bench_scripts import load_bench_script

    module = load_bench_script("daemon")
    module.run_benchmark(bundle=bundle, out_dir=out_dir, seconds=seconds, n_latency=n_latency, threads=threads, fsync=fsync,
                         windows=windows, quiet_windows=quiet_windows, max_windows=max_windows)
