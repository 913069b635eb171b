"""`protoedge serve`: the local clustering daemon's life cycle.

    listen (live) -> build + warm the engine, load snapshot, replay log -> ready (READY=1 to systemd)
    -> serve -> SIGTERM/SIGINT: stop accepting, finish in-flight requests, drain the queue,
       snapshot, exit 0

A worker thread runs the encoder on micro-batches back to back (continuous batching:
server_batcher.py); the asyncio loop (aiohttp, and the fast path of server_fast.py) parses HTTP,
and with --pipeline (the default on GPU backends) also applies each embedded batch to the
clusterer, writes its log record and answers it, while the worker embeds the next batch; on the CPU
backend (--no-pipeline, its default) the worker thread embeds and applies each batch in turn. One fdatasync per batch (group
commit, on a sync thread) precedes its answers. State changes are totally ordered and the update
log replays them exactly.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import logging
import os
import signal
import socket
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from aiohttp import web

from .server_batcher import Worker
from .server_codec import parse_image
from .server_metrics import DaemonMetrics
from .server_notify import notify, watchdog_interval
from .server_state import DaemonState, PersistError

log = logging.getLogger("protoedge.daemon")

DEFAULT_PORT = 8470
# Default images per micro-batch. On the CPU, ONNX Runtime's cost per image is flat from 8 images
# on, and small batches keep two in flight with 16 closed-loop clients (one embedded while the
# event loop applies and answers the other); a GPU wants larger calls.
CPU_MAX_BATCH, GPU_MAX_BATCH = 8, 64


class ConfigError(ValueError):
    pass


@dataclass
class ServerConfig:
    bundle: str
    host: str | None = "127.0.0.1"
    port: int | None = DEFAULT_PORT      # None: no TCP listener (Unix socket only)
    socket_path: str | None = None
    state_dir: str | None = None
    backend: str = "auto"
    precision: str = "auto"              # auto: int8-cpu on the CPU backend if the bundle has it, else fp32
    threads: int | None = None
    cache_dir: str | None = None
    token_file: str | None = None
    max_batch: int | None = None         # None: CPU_MAX_BATCH on the CPU backend, else GPU_MAX_BATCH
    max_wait_ms: float = 0.0
    max_queue: int = 256
    max_queue_bytes: int = 64 * 1024 * 1024
    max_body_bytes: int = 8 * 1024 * 1024
    max_images_per_request: int = 1024
    fsync: str = "always"
    fsync_interval_s: float = 1.0
    snapshot_every: int = 20000          # updates
    snapshot_interval_s: float = 600.0
    shutdown_timeout_s: float = 30.0
    event_loop: str = "auto"             # auto: uvloop when it is installed, else asyncio's own
    switch_interval_ms: float = 0.5      # GIL hand-over between the event loop and the worker
    pipeline: bool | None = None         # the worker thread only embeds; the event loop applies and answers
                                         # (None: on unless the encoder runs on the CPU)
    inline_idle: bool = True             # a lone request runs on the event loop (no thread hand-offs)
    fast_path: bool = True               # POST /v1/cluster|assign (.npy) skip aiohttp's request machinery
    sync_thread: bool = True             # fsync always: fdatasync + answers on their own thread
    clusterer: dict = field(default_factory=dict)

    def check(self) -> None:
        if self.port is None and not self.socket_path:
            raise ConfigError("nothing to listen on: give --port and/or --socket")
        if self.port is not None and not 0 <= self.port <= 65535:
            raise ConfigError(f"--port {self.port} is not a TCP port")
        if self.port is not None and not _is_loopback(self.host) and not self.token_file:
            raise ConfigError(f"--host {self.host} is not a loopback address: anyone on that network could "
                              "change the clusters; add --token-file (and a firewall), or bind 127.0.0.1")
        if self.max_batch is not None and self.max_batch < 1:
            raise ConfigError("max_batch must be >= 1")
        for name in ("max_queue", "max_queue_bytes", "max_body_bytes", "max_images_per_request"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1")
        if self.max_wait_ms < 0:
            raise ConfigError("max_wait_ms must be >= 0")
        if self.event_loop not in ("auto", "asyncio", "uvloop"):
            raise ConfigError(f"event loop must be auto, asyncio or uvloop, not {self.event_loop!r}")
        if self.event_loop == "uvloop" and loop_factory("uvloop") is None:
            raise ConfigError("--event-loop uvloop: uvloop is not installed (pip install uvloop)")
        if not 0 < self.switch_interval_ms <= 100:
            raise ConfigError("switch_interval_ms must be in (0, 100]")


def default_inference_threads() -> int:
    """All cores but one: the event loop parses HTTP on its own core while the encoder runs
    (measured on 2 cores: 1 inference thread serves more images/s than 2)."""
    return max(1, (os.cpu_count() or 1) - 1)


def loop_factory(kind: str):
    """uvloop's event loop factory for "auto"/"uvloop" when uvloop is installed, else None (asyncio's
    own loop). uvloop is optional: it only makes the per-request work of the event loop cheaper."""
    if kind == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _is_loopback(host: str | None) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token(path: str) -> bytes:
    p = Path(path)
    try:
        token = p.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--token-file {path}: unreadable ({e})") from None
    if len(token) < 16:
        raise ConfigError(f"--token-file {path}: the token must be at least 16 characters")
    if p.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("token file %s is readable by group/others; chmod 600 it", path)
    return token.encode()


def unix_listener(path: str) -> socket.socket:
    """A listening Unix socket with mode 0600 from the first instant (umask during bind)."""
    p = Path(path)
    if p.exists() or p.is_symlink():
        if not stat.S_ISSOCK(p.lstat().st_mode):
            raise ConfigError(f"--socket {path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            p.unlink()  # stale socket of a daemon that died
        else:
            raise ConfigError(f"--socket {path}: another daemon is listening there")
        finally:
            probe.close()
    p.parent.mkdir(parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(256)
    sock.setblocking(False)
    return sock


class Daemon:
    def __init__(self, config: ServerConfig):
        config.check()
        self.config = config
        self.token = read_token(config.token_file) if config.token_file else None
        from .bundle import load_bundle

        self.bundle = load_bundle(config.bundle)
        self.encoder = None
        self.state: DaemonState | None = None
        self.ready = False
        self.draining = False
        self.exit_code = 0
        self._runner = None
        self.fast = None  # server_fast.FastConnections when config.fast_path
        # One thread owns the model state (created with the event loop); a second decodes
        # PNG/JPEG off the event loop.
        self.worker: Worker | None = None
        self.decoder = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="protoedge-decode")
        self.metrics = DaemonMetrics(queue_depth=lambda: self.worker.depth if self.worker else 0,
                                     clusters=lambda: self.state.clusterer.n_clusters
                                     if self.state and self.state.clusterer else 0,
                                     log_bytes=lambda: self.state.log.size_bytes()
                                     if self.state and self.state.log else 0,
                                     fsyncs=lambda: self.state.log.fsyncs if self.state and self.state.log else 0,
                                     fsync_seconds=lambda: self.state.log.fsync_seconds
                                     if self.state and self.state.log else 0.0)
        self._stop = None
        self._loop = None
        self._last_snapshot = time.monotonic()
        # On the CPU the clusterer and the encoder compete for the same cores, and applying on the
        # worker thread after each embed costs less CPU per image than handing every batch to the
        # event loop (docs/daemon.md: 1.21-1.27x images/s with int8-cpu, 16 clients). A GPU embeds
        # without the cores, so there the event loop applies one batch while the next is embedded.
        if config.pipeline is None:
            from .backends import gpu_backend_possible

            self.pipeline = config.backend not in ("cpu",) and (config.backend != "auto" or gpu_backend_possible())
        else:
            self.pipeline = config.pipeline
        # Known once the engine is built when the backend is "auto".
        self.max_batch = config.max_batch or (CPU_MAX_BATCH if config.backend == "cpu" else GPU_MAX_BATCH)

    # ------------------------------------------------------------------ worker-thread helpers

    async def call(self, fn):
        """Run fn(state) on the worker thread (ordered with every batch and mutation)."""
        return await self.worker.call(lambda: fn(self.state))

    async def call_mutation(self, fn):
        """fn(state) on the worker thread, where the state method logs and commits (fsync with
        policy always) before returning; answers (result, seq) once the update is durable."""
        def run():
            try:
                return fn(self.state), self.state.seq
            except PersistError:
                self.fail("the update log cannot be written")
                raise
        return await self.worker.call(run)

    async def in_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.decoder, fn, *args)

    async def decode_image(self, body: bytes, content_type: str) -> np.ndarray:
        s = self.bundle.input_spec
        return await self.in_thread(parse_image, body, s["channels"], s["height"], s["width"])

    def _embed(self, jobs):
        """Encoder stage (the worker thread)."""
        return self.state.embed_jobs(jobs, self.max_batch)

    def _apply(self, jobs, emb):
        """Worker thread (the event loop with --pipeline): one micro-batch -> one result per job.
        apply_batch writes the batch's log records; with --fsync always the worker's sync thread
        commits them (_commit: fdatasync, one for every batch applied meanwhile) before any of them
        is answered, otherwise apply_batch commits as the policy says."""
        try:
            return self.state.apply_batch(jobs, emb, commit=not self._sync_thread)
        except (PersistError, OSError) as e:
            self.fail("the update log cannot be written")
            return [e if isinstance(e, PersistError) else PersistError(str(e))] * len(jobs)

    def _commit(self) -> None:
        """The worker's sync thread: make every applied batch durable (PersistError if not)."""
        try:
            self.state.commit()
        except PersistError:
            self.fail("the update log cannot be written")
            raise

    @property
    def _sync_thread(self) -> bool:
        cfg = self.config
        return cfg.sync_thread and cfg.fsync == "always" and cfg.state_dir is not None

    def _on_batch(self, n_images: int, seconds: float) -> None:
        self.metrics.batch_size.observe(n_images)
        self.metrics.batch_seconds.observe(seconds)
        if self.state and self.state.log:
            self.metrics.log_seq.set(self.state.seq)

    def fail(self, why: str) -> None:
        """Stop without a final snapshot: the in-memory state may hold an update that is not logged."""
        log.error("fatal: %s; stopping (the log holds every acknowledged update)", why)
        self.exit_code = 1
        if self._stop is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)

    def model_metadata(self) -> dict:
        i, o = self.bundle.input_spec, self.bundle.output_spec
        enc = self.encoder.describe() if self.encoder is not None and hasattr(self.encoder, "describe") else {}
        return {"name": "encoder", "versions": [str(self.bundle.manifest["model"].get("version", "1"))],
                "platform": f"protoedge_{enc.get('backend', 'pending')}",
                "inputs": [{"name": i["name"], "datatype": "UINT8",
                            "shape": [-1, i["channels"], i["height"], i["width"]]}],
                "outputs": [{"name": o["name"], "datatype": "FP32", "shape": [-1, o["dim"]]}],
                "parameters": {"distance": o["distance"], "model": self.bundle.manifest.get("model", {}),
                               "backend": enc, "max_batch": self.max_batch,
                               "max_wait_ms": self.config.max_wait_ms, "fsync": self.config.fsync,
                               "pipeline": self.pipeline,
                               "clusterer_loop": "c" if self.state and self.state.clusterer.compiled else "numpy",
                               "inline_idle": self.config.inline_idle,
                               "fast_path": self.config.fast_path, "sync_thread": self._sync_thread,
                               "event_loop": type(self._loop).__module__.split(".")[0] if self._loop else None}}

    # ------------------------------------------------------------------ start-up (worker thread)

    def _build(self) -> float:
        from .backends import open_encoder

        t0 = time.perf_counter()
        cfg = self.config
        self.encoder = open_encoder(self.bundle, backend=cfg.backend, precision=cfg.precision,
                                    threads=cfg.threads or default_inference_threads(),
                                    cache_dir=cfg.cache_dir, max_batch=cfg.max_batch or GPU_MAX_BATCH)
        if cfg.max_batch is None and self.encoder.backend == "cpu":  # ("auto" found no GPU)
            self.max_batch = self.worker.max_batch = CPU_MAX_BATCH  # (no batch runs before the engine is built)
        s = self.bundle.input_spec
        # Warm-up at the sizes the batcher will use: the first calls allocate and (TensorRT) tune.
        for n in sorted({1, self.max_batch}):
            self.encoder.embed(np.zeros((n, s["channels"], s["height"], s["width"]), np.uint8))
        built = time.perf_counter() - t0
        state = DaemonState(self.bundle, self.encoder, cfg.state_dir, fsync=cfg.fsync,
                            fsync_interval_s=cfg.fsync_interval_s, **cfg.clusterer)
        state.open()
        self.state = state
        return built

    # ------------------------------------------------------------------ main

    async def run(self) -> int:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        cfg = self.config
        self.worker = Worker(self._loop, self._embed, self._apply, self.max_batch, cfg.max_wait_ms, cfg.max_queue,
                             cfg.max_queue_bytes, on_batch=self._on_batch, pipeline=self.pipeline,
                             inline_idle=cfg.inline_idle, commit=self._commit if self._sync_thread else None)
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._loop.add_signal_handler(sig, self._stop.set)
        from .server_routes import build_app

        runner = web.AppRunner(build_app(self), access_log=None, shutdown_timeout=self.config.shutdown_timeout_s)
        await runner.setup()
        self._runner = runner
        if cfg.fast_path:
            from .server_fast import FastConnections

            self.fast = FastConnections(self, runner.server)
        try:
            where = await self._listen(runner)
        except (ConfigError, OSError) as e:
            print(f"protoedge serve: cannot listen: {e}", file=sys.stderr, flush=True)
            await runner.cleanup()
            return 2
        notify("STATUS=building the encoder engine")
        watchdog = watchdog_interval()
        tasks = [self._loop.create_task(self._watchdog(watchdog))] if watchdog else []
        log.info("listening on %s; building the engine (backend %s)", ", ".join(where), self.config.backend)
        t0 = time.perf_counter()
        try:
            built = await self.worker.call(self._build)
        except Exception as e:
            for t in tasks:
                t.cancel()
            log.error("could not start: %s", e)
            print(f"protoedge serve: could not start: {e}", file=sys.stderr, flush=True)
            await runner.cleanup()
            await self.worker.stop()
            self._unlink_socket()
            return 1
        self.metrics.engine_build.set(built)
        self.ready = True
        self.metrics.ready.set(1)
        self.metrics.log_seq.set(self.state.seq)
        msg = (f"ready in {time.perf_counter() - t0:.2f} s on {', '.join(where)}: backend "
               f"{self.encoder.backend}, {self.state.clusterer.n_clusters} clusters, "
               f"{self.state.replayed} updates replayed")
        log.info(msg)
        print(f"protoedge serve: {msg}", file=sys.stderr, flush=True)
        notify("READY=1\nSTATUS=" + msg)
        tasks.append(self._loop.create_task(self._housekeeping()))
        await self._stop.wait()
        return await self._shutdown(runner, tasks)

    async def _listen(self, runner) -> list[str]:
        cfg, where = self.config, []
        tcp_site, sock_site, kw = web.TCPSite, web.SockSite, {}
        if self.fast is not None:
            from .server_fast import sites

            (tcp_site, sock_site), kw = sites(web), {"fast": self.fast}
        if cfg.port is not None:
            site = tcp_site(runner, cfg.host, cfg.port, backlog=256, **kw)
            await site.start()
            port = runner.addresses[0][1] if cfg.port == 0 else cfg.port  # 0: the kernel picked one
            where.append(f"http://{cfg.host}:{port}")
        if cfg.socket_path:
            site = sock_site(runner, unix_listener(cfg.socket_path), **kw)
            await site.start()
            where.append(f"unix:{cfg.socket_path}")
        return where

    async def _shutdown(self, runner, tasks) -> int:
        notify("STOPPING=1")
        log.info("stopping: no new requests, finishing in-flight ones")
        self.draining = True
        for t in tasks:
            t.cancel()
        await runner.cleanup()          # stops listening, waits for handlers still running
        if self.fast is not None:       # the same for the fast path's connections
            await self.fast.shutdown(self.config.shutdown_timeout_s)
        # The worker's queue is FIFO: the snapshot comes after every batch still queued.
        if self.exit_code == 0 and self.state.log is not None:
            info = await self.call(lambda s: s.snapshot())
            log.info("final snapshot at sequence %d: %s", info["seq"], info["path"])
        await self.call(lambda s: s.close())
        await self.worker.stop()
        self.decoder.shutdown(wait=True)
        self._unlink_socket()
        print(f"protoedge serve: stopped (exit {self.exit_code})", file=sys.stderr, flush=True)
        return self.exit_code

    def _unlink_socket(self) -> None:
        if self.config.socket_path:
            try:
                os.unlink(self.config.socket_path)
            except FileNotFoundError:
                pass

    async def _housekeeping(self) -> None:
        """Interval fsync (policy 'interval') and periodic snapshots that keep the log short."""
        cfg = self.config
        tick = min(cfg.fsync_interval_s, 1.0) if cfg.fsync == "interval" else 1.0
        while True:
            await asyncio.sleep(tick)
            st = self.state
            if st.log is None:
                continue
            if cfg.fsync == "interval":
                await self.call(lambda s: s.log.sync())
            due = st.seq - st.snapshot_seq >= cfg.snapshot_every or (
                st.seq > st.snapshot_seq and time.monotonic() - self._last_snapshot >= cfg.snapshot_interval_s)
            if due:
                try:
                    await self.call(lambda s: s.snapshot())
                    self.metrics.snapshots.inc()
                except OSError as e:
                    log.error("periodic snapshot failed (the log still holds everything): %s", e)
                self._last_snapshot = time.monotonic()

    async def _watchdog(self, interval: float) -> None:
        # While the engine builds (minutes with TensorRT) the loop itself pings. Once ready, the
        # ping goes through the worker thread, so a hung engine, not only a dead loop, stops it.
        while True:
            if self.ready:
                await self.call(lambda s: None)
            notify("WATCHDOG=1")
            await asyncio.sleep(interval)


def run_server(config: ServerConfig) -> int:
    """Run until SIGTERM/SIGINT; returns the process exit code."""
    try:
        daemon = Daemon(config)
    except ValueError as e:  # ConfigError, BundleError, ...
        print(f"protoedge serve: {e}", file=sys.stderr, flush=True)
        return 2
    # The event loop and the worker thread share the GIL: the worker gets it back after each ORT
    # call or fdatasync, the loop between requests. Python's default hand-over interval (5 ms) lets
    # either side hold the other up for a whole encoder call; a shorter one keeps both moving.
    sys.setswitchinterval(config.switch_interval_ms / 1000.0)
    factory = loop_factory(config.event_loop)
    if factory is None:
        return asyncio.run(daemon.run())
    if sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(daemon.run())
    loop = factory()  # Python 3.10 (JetPack 6): no asyncio.Runner
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(daemon.run())
    finally:
        loop.close()
        asyncio.set_event_loop(None)
