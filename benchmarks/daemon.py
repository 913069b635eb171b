"""`protoedge bench daemon`: the local daemon on loopback vs the runtime in-process, in one run.

Measures, with real Omniglot test images sent one per request to POST /v1/cluster:
  * single-image request latency p50/p99 with one client (keep-alive, sequential);
  * images/s with 1, 4 and 16 concurrent clients (micro-batching does the rest);
  * the same work in-process through protoedge.runtime.Runtime (one image per call, and batches),
    and the daemon/in-process ratios;
  * the daemon's resident memory, and the CPU seconds used by server and load generator.

The load generators run in separate processes (this file, `worker` mode) so their CPU use is
visible: on a small machine they compete with the server for the same cores, and the report says
how much. Writes benchmarks/results/daemon.md and daemon.json.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from protoedge.hostcpu import cpu_ticks, format_steal, steal_percent

N_IMAGES = 512  # distinct images cycled through by every client


# ----------------------------------------------------------------------------- load generators

def _image_bodies() -> list[bytes]:
    import io

    from protoedge import datasets

    test = datasets.load_split("omniglot-a", "test")
    rng = np.random.default_rng(0)
    idx = rng.choice(len(test.images), N_IMAGES, replace=False)
    out = []
    for i in idx:
        buf = io.BytesIO()
        np.save(buf, test.images[i:i + 1], allow_pickle=False)
        out.append(buf.getvalue())
    return out


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def _request_bytes(url: str, bodies: list[bytes]) -> list[bytes]:
    """Whole HTTP/1.1 requests, built once: the load generator only sends bytes and reads answers."""
    import urllib.parse

    host = urllib.parse.urlsplit(url).netloc
    return [(f"POST /v1/cluster HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/x-npy\r\n"
             f"Content-Length: {len(b)}\r\n\r\n").encode() + b for b in bodies]


def _connect(url: str):
    import socket
    import urllib.parse

    u = urllib.parse.urlsplit(url)
    sock = socket.create_connection((u.hostname, u.port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class _Answer:
    """Incremental reader of HTTP/1.1 responses with a Content-Length (what the daemon sends)."""

    __slots__ = ("buf",)

    def __init__(self):
        self.buf = b""

    def feed(self, data: bytes):
        """Add received bytes; returns the status code once a whole response is in, else None."""
        buf = self.buf = self.buf + data
        head_end = buf.find(b"\r\n\r\n")
        if head_end < 0:
            return None
        head = buf[:head_end].lower()
        i, length = head.find(b"\r\ncontent-length:"), 0
        if i >= 0:
            j = head.find(b"\r\n", i + 2)
            length = int(head[i + 17:j if j >= 0 else len(head)])
        end = head_end + 4 + length
        if len(buf) < end:
            return None
        if len(buf) > end:
            raise RuntimeError("more bytes than one response: the daemon answered something not asked")
        self.buf = b""
        return int(buf[9:12])


def worker_latency(url: str, n: int, warmup: int = 100) -> dict:
    """One client, sequential single-image requests on one keep-alive connection (raw socket,
    requests built beforehand, so the client adds as little as possible to the latency)."""
    reqs = _request_bytes(url, _image_bodies())
    sock = _connect(url)
    lat = []
    cpu0 = 0.0
    for i in range(warmup + n):
        if i == warmup:
            cpu0 = _cpu_seconds()
        ans = _Answer()
        t0 = time.perf_counter()
        sock.sendall(reqs[i % len(reqs)])
        status = None
        while status is None:
            data = sock.recv(65536)
            if not data:
                raise RuntimeError("the daemon closed the connection")
            status = ans.feed(data)
        if i >= warmup:
            lat.append(time.perf_counter() - t0)
        if status != 200:
            raise RuntimeError(f"status {status}")
    cpu = _cpu_seconds() - cpu0
    sock.close()
    return {"latencies_s": lat, "client_cpu_s": cpu}


def worker_client_latency(url: str, n: int, warmup: int = 50) -> dict:
    """The same with protoedge.client.Client (http.client), for comparison."""
    from protoedge.client import Client

    bodies = _image_bodies()
    lat = []
    with Client(url, timeout=30) as c:
        for i in range(warmup + n):
            t0 = time.perf_counter()
            status, _, _ = c.request("POST", "/v1/cluster", bodies[i % len(bodies)], "application/x-npy")
            if i >= warmup:
                lat.append(time.perf_counter() - t0)
            if status != 200:
                raise RuntimeError(f"status {status}")
    return {"latencies_s": lat}


def worker_load(url: str, clients: int, seconds: float) -> dict:
    """`clients` concurrent keep-alive connections, each sending one single-image request and
    waiting for its answer before sending the next (no pipelining), for `seconds`. One process,
    one epoll loop over raw sockets and prebuilt requests: the generator's own CPU per request is
    a few tens of microseconds, so it takes as little as possible from the daemon's cores."""
    import select

    reqs = _request_bytes(url, _image_bodies())
    socks = [_connect(url) for _ in range(clients)]
    ep = select.epoll()
    by_fd = {}
    for k, s in enumerate(socks):
        s.setblocking(False)
        ep.register(s.fileno(), select.EPOLLIN)
        by_fd[s.fileno()] = k
    answers = [_Answer() for _ in range(clients)]
    sent_at = [0.0] * clients
    nxt = [k * 7919 for k in range(clients)]
    retry: list[tuple[float, int]] = []  # (when, client) after a 503

    def send(k: int) -> None:
        req = reqs[nxt[k] % len(reqs)]
        nxt[k] += 1
        sent_at[k] = time.perf_counter()
        n = socks[k].send(req)
        if n != len(req):  # the socket buffer is far larger than one request; be correct anyway
            socks[k].setblocking(True)
            socks[k].sendall(req[n:])
            socks[k].setblocking(False)

    def run(until: float, record: bool) -> tuple[int, int, list[float]]:
        ok = rejected = 0
        lat: list[float] = []
        active = set(range(clients))
        for k in range(clients):
            send(k)
        while active:
            now = time.perf_counter()
            for when, k in [r for r in retry if r[0] <= now]:
                retry.remove((when, k))
                send(k)
            events = ep.poll(0.01 if retry else 1.0)
            for fd, _ in events:
                k = by_fd[fd]
                data = socks[k].recv(65536)
                if not data:
                    raise RuntimeError("the daemon closed a connection")
                status = answers[k].feed(data)
                if status is None:
                    continue
                t1 = time.perf_counter()
                if status == 200:
                    if record:
                        ok += 1
                        lat.append(t1 - sent_at[k])
                elif status == 503:
                    rejected += 1
                else:
                    raise RuntimeError(f"status {status}")
                if t1 >= until:
                    active.discard(k)  # this client is done; the others finish their requests
                elif status == 503:
                    retry.append((t1 + 0.01, k))
                else:
                    send(k)
            if retry and time.perf_counter() >= until:
                for r in list(retry):
                    retry.remove(r)
                    active.discard(r[1])
        return ok, rejected, lat

    run(time.perf_counter() + 0.5, False)  # warm-up: connections, batch sizes
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    ok, rejected, lat = run(t0 + seconds, True)
    elapsed = time.perf_counter() - t0
    cpu = _cpu_seconds() - cpu0
    for s in socks:
        s.close()
    return {"images": ok, "rejected": rejected, "elapsed_s": elapsed, "client_cpu_s": cpu, "latencies_s": lat}


def _run_worker(mode: str, **kw) -> dict:
    """Run a load generator in its own interpreter; it prints one JSON document."""
    out = subprocess.run([sys.executable, __file__, "worker", mode, json.dumps(kw)], capture_output=True,
                         text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if out.returncode != 0:
        raise RuntimeError(f"load generator {mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout)


# ----------------------------------------------------------------------------- in-process baseline

def in_process(bundle_path: str, threads: int | None, n_single: int, seconds: float) -> dict:
    from protoedge import datasets
    from protoedge.runtime import Runtime

    test = datasets.load_split("omniglot-a", "test")
    rng = np.random.default_rng(0)
    imgs = test.images[rng.choice(len(test.images), N_IMAGES, replace=False)]
    rt = Runtime(bundle_path, backend="cpu", precision="auto", threads=threads)  # the daemon's encoder
    for i in range(100):
        rt.cluster(imgs[i:i + 1])
    lat = []
    t_start = time.perf_counter()
    for i in range(n_single):
        t0 = time.perf_counter()
        rt.cluster(imgs[i % N_IMAGES][None])
        lat.append(time.perf_counter() - t0)
    single_rate = n_single / (time.perf_counter() - t_start)
    rates = {}
    for batch in (16, 64):
        done, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 2:
            start = (done % N_IMAGES)
            chunk = np.take(imgs, range(start, start + batch), axis=0, mode="wrap")
            rt.cluster(chunk)
            done += batch
        rates[batch] = done / (time.perf_counter() - t0)
    return {"single_p50_ms": 1e3 * float(np.percentile(lat, 50)), "single_p99_ms": 1e3 * float(np.percentile(lat, 99)),
            "single_images_per_s": single_rate, "batched_images_per_s": rates, "backend": rt.backend,
            "precision": rt.encoder.precision}


# ----------------------------------------------------------------------------- the run

def _proc_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _thread_cpu_seconds(pid: int, tid: int) -> float:
    """CPU seconds of one thread of a process (the daemon's event loop is its main thread)."""
    with open(f"/proc/{pid}/task/{tid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return float("nan")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A window in which the host stole less than this share of the CPU counts as quiet.
QUIET_STEAL_PCT = 3.0


def measure_daemon(bundle: str, fsync: str, seconds: float, n_latency: int, threads: int | None,
                   clients: tuple[int, ...] = (1, 4, 16), latency: bool = True, extra: tuple[str, ...] = (),
                   env: dict | None = None, windows_16: int = 1, quiet_windows: int = 0,
                   max_windows: int = 0) -> dict:
    """Start `protoedge serve` with this fsync policy, measure it from separate processes, stop it.
    The 16-client load runs as ``windows_16`` consecutive windows of ``seconds`` on the same daemon
    (throughput that holds, not one burst), each with the host's CPU steal during it; then more
    windows, up to ``max_windows`` in all, until ``quiet_windows`` of them ran with the host taking
    less than QUIET_STEAL_PCT of the CPU."""
    import shutil

    from protoedge.client import Client

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    state = tempfile.mkdtemp(prefix="protoedge-bench-daemon-")
    cmd = [sys.executable, "-m", "protoedge.cli", "serve", bundle, "--port", str(port), "--state", state,
           "--fsync", fsync, "--backend", "cpu", *extra]
    if threads:
        cmd += ["--threads", str(threads)]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, **(env or {})})
    r: dict = {"fsync": fsync, "threads": threads, "extra_args": list(extra), "env": dict(env or {})}
    try:
        with Client(url) as c:
            c.wait_ready(120)
            params = c.model()["parameters"]
            r["backend"], r["event_loop"] = params["backend"], params.get("event_loop")
            r["pipeline"] = params.get("pipeline")
            rss_idle = _metric(c.metrics(), "protoedge_resident_memory_bytes")
        if latency:
            print(f"[fsync {fsync}] single-client latency", file=sys.stderr)
            cpu0 = _proc_cpu_seconds(server.pid)
            lat = _run_worker("latency", url=url, n=n_latency)
            ms = 1e3 * np.asarray(lat["latencies_s"])
            r["latency_1_client"] = {
                "requests": len(ms), "p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
                "p99_ms": float(np.percentile(ms, 99)), "max_ms": float(ms.max()),
                "images_per_s": float(len(ms) / (ms.sum() / 1e3)),
                "server_cpu_s": _proc_cpu_seconds(server.pid) - cpu0, "client_cpu_s": lat["client_cpu_s"]}
            # The same through protoedge.client.Client (http.client): what a Python caller sees.
            cl = 1e3 * np.asarray(_run_worker("client_latency", url=url, n=max(100, n_latency // 4))["latencies_s"])
            r["latency_1_client_python_client"] = {"requests": len(cl), "p50_ms": float(np.percentile(cl, 50)),
                                                   "p99_ms": float(np.percentile(cl, 99))}
        r["throughput"] = {}
        for k in clients:
            print(f"[fsync {fsync}] throughput with {k} clients", file=sys.stderr)
            cpu0, loop0 = _proc_cpu_seconds(server.pid), _thread_cpu_seconds(server.pid, server.pid)
            b0, ticks0 = _batch_counters(url), cpu_ticks()
            runs, n_quiet = [], 0
            while (len(runs) < (windows_16 if k == 16 else 1)
                   or (k == 16 and n_quiet < quiet_windows and len(runs) < max_windows)):
                w0 = cpu_ticks()
                runs.append(_run_worker("load", url=url, clients=k, seconds=seconds))
                runs[-1]["steal_pct"] = steal_percent(w0, cpu_ticks())
                n_quiet += runs[-1]["steal_pct"] < QUIET_STEAL_PCT  # NaN (no /proc/stat): never quiet
            b1, steal = _batch_counters(url), steal_percent(ticks0, cpu_ticks())
            t = {"images": sum(w["images"] for w in runs), "rejected": sum(w["rejected"] for w in runs),
                 "elapsed_s": sum(w["elapsed_s"] for w in runs), "client_cpu_s": sum(w["client_cpu_s"] for w in runs),
                 "latencies_s": [x for w in runs for x in w["latencies_s"]]}
            loop_cpu = _thread_cpu_seconds(server.pid, server.pid) - loop0
            lms = 1e3 * np.asarray(t["latencies_s"]) if t["latencies_s"] else np.zeros(1)
            calls = b1[0] - b0[0]
            r["throughput"][str(k)] = {
                "images_per_s": t["images"] / t["elapsed_s"], "images": t["images"], "rejected_503": t["rejected"],
                "seconds": t["elapsed_s"], "p50_ms": float(np.percentile(lms, 50)),
                "p99_ms": float(np.percentile(lms, 99)),
                "server_cpu_s": _proc_cpu_seconds(server.pid) - cpu0, "client_cpu_s": t["client_cpu_s"],
                "event_loop_cpu_s": loop_cpu, "encoder_calls": calls, "images_per_call": (b1[1] - b0[1]) / max(calls, 1),
                "batch_ms": 1e3 * (b1[2] - b0[2]) / max(calls, 1), "fsync_ms_per_batch": 1e3 * (b1[3] - b0[3]) / max(calls, 1),
                "host_steal_pct": steal}
            if len(runs) > 1:
                r["throughput"][str(k)]["windows"] = [
                    {"images_per_s": w["images"] / w["elapsed_s"], "steal_pct": w["steal_pct"]} for w in runs]
        with Client(url) as c:
            metrics = c.metrics()
        batches = _metric(metrics, "protoedge_batch_images_count")
        r["memory"] = {"rss_idle_mb": rss_idle / 2**20,
                       "rss_after_mb": _metric(metrics, "protoedge_resident_memory_bytes") / 2**20}
        r["batches"] = {"count": batches, "mean_images": _metric(metrics, "protoedge_batch_images_sum") / max(batches, 1),
                        "fsyncs": _metric(metrics, "protoedge_update_log_fsyncs")}
        r["clusters_at_end"] = _metric(metrics, "protoedge_clusters")
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)
        shutil.rmtree(state, ignore_errors=True)
    return r


def _batch_counters(url: str) -> tuple[float, float, float, float]:
    """(encoder calls, images, seconds in batches, seconds in fdatasync) so far, from /metrics."""
    from protoedge.client import Client

    with Client(url) as c:
        m = c.metrics()
    names = ("protoedge_batch_images_count", "protoedge_batch_images_sum", "protoedge_batch_duration_seconds_sum",
             "protoedge_update_log_fsync_seconds")
    values = [_metric(m, n) for n in names]
    return tuple(0.0 if v != v else v for v in values)  # NaN: no batch yet


def run_benchmark(bundle: str, out_dir: str = "benchmarks/results", seconds: float = 6.0, n_latency: int = 2000,
                  threads: int | None = None, fsync: str = "both", windows: int = 5, quiet_windows: int = 3,
                  max_windows: int = 20) -> dict:
    from protoedge.runtime.server import default_inference_threads

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    threads = threads or default_inference_threads()  # the daemon's default, used in-process too
    load_before = os.getloadavg()
    policies = ("always", "interval") if fsync == "both" else (fsync,)
    print("the runtime in-process", file=sys.stderr)
    inproc_before = in_process(bundle, threads, n_latency, seconds)
    daemons = {p: measure_daemon(bundle, p, seconds, n_latency, threads, windows_16=windows,
                                 quiet_windows=quiet_windows, max_windows=max(windows, max_windows))
               for p in policies}
    # Other settings, 16 clients only: inference threads, pipeline, FP32, batch size, GIL switch interval,
    # event loop, inline fast path, HTTP fast path, sync thread.
    variants = {}
    other_threads = 2 if threads != 2 else 1
    settings = [(f"{other_threads} inference threads", other_threads, (), False),
                ("the event loop applies each batch while the next is embedded (--pipeline)", threads,
                 ("--pipeline",), False),
                ("FP32 encoder (--precision fp32)", threads, ("--precision", "fp32"), False),
                ("the clusterer's numpy loop instead of the C one (PROTOEDGE_CLUSTER_LOOP=numpy)", threads, (), False,
                 {"PROTOEDGE_CLUSTER_LOOP": "numpy"}),
                ("micro-batches of up to 64 images (--max-batch 64)", threads, ("--max-batch", "64"), False),
                ("GIL switch interval 5 ms (Python's default)", threads, ("--switch-interval-ms", "5"), False),
                ("asyncio event loop (no uvloop)", threads, ("--event-loop", "asyncio"), False),
                ("no inline fast path (--no-inline-idle)", threads, ("--no-inline-idle",), True),
                ("every request through aiohttp (--no-fast-path)", threads, ("--no-fast-path",), False)]
    if policies[0] == "always":
        settings.append(("fdatasync on the worker thread (--no-sync-thread)", threads, ("--no-sync-thread",), False))
    for name, n_threads, extra, latency, *env in settings:
        # The defaults again right before each setting: the machine is shared and its speed drifts
        # over minutes, so each setting is compared with its own neighbour.
        print(f"[fsync {policies[0]}] 16 clients, defaults (pair for: {name})", file=sys.stderr)
        paired = measure_daemon(bundle, policies[0], seconds, n_latency, threads, clients=(16,), latency=False)
        print(f"[fsync {policies[0]}] 16 clients, {name}", file=sys.stderr)
        variants[name] = measure_daemon(bundle, policies[0], seconds, n_latency, n_threads, clients=(16,),
                                        latency=latency, extra=extra, env=env[0] if env else None)
        variants[name]["paired_default_16"] = paired["throughput"]["16"]
    print("the runtime in-process, again", file=sys.stderr)
    inproc_after = in_process(bundle, threads, n_latency, seconds)
    inproc = {**inproc_before, "after": inproc_after}
    # Ratios against the mean of the two in-process runs (before and after the daemons).
    inproc["single_images_per_s_mean"] = (inproc_before["single_images_per_s"]
                                          + inproc_after["single_images_per_s"]) / 2
    inproc["batch64_images_per_s_mean"] = (inproc_before["batched_images_per_s"][64]
                                           + inproc_after["batched_images_per_s"][64]) / 2
    for d in daemons.values():
        t1, t16 = d["throughput"]["1"]["images_per_s"], d["throughput"]["16"]["images_per_s"]
        d["ratios"] = {"1_client_vs_in_process_single": t1 / inproc["single_images_per_s_mean"],
                       "16_clients_vs_in_process_single": t16 / inproc["single_images_per_s_mean"],
                       "16_clients_vs_in_process_batch64": t16 / inproc["batch64_images_per_s_mean"]}
        d["targets"] = {"p50_ms_le_3": d["latency_1_client"]["p50_ms"] <= 3.0,
                        "p99_ms_le_15": d["latency_1_client"]["p99_ms"] <= 15.0,
                        "16_clients_ge_3000_images_per_s": t16 >= 3000.0}
        quiet = _quiet_windows(d["throughput"]["16"].get("windows", []), QUIET_STEAL_PCT)
        d["targets"]["16_clients_quiet_windows_median_ge_3000"] = (
            bool(np.median(quiet) >= 3000.0) if quiet else None)
    results = {
        "daemon": daemons, "variants": variants, "in_process": inproc,
        "setup": {"bundle": bundle, "server_threads": threads, "cpus": os.cpu_count(),
                  "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                  "python": platform.python_version(), "machine": platform.machine(),
                  "seconds_per_throughput_run": seconds, "windows_16_clients": windows,
                  "quiet_windows_wanted": quiet_windows, "quiet_steal_pct": QUIET_STEAL_PCT, "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}}
    notes = _kept_notes(out / "daemon.md")
    (out / "daemon.json").write_text(json.dumps(results, indent=1))
    (out / "daemon.md").write_text(render_markdown(results) + notes)
    print((out / "daemon.md").read_text())
    return results


NOTES_HEADING = "## Notes"


def _kept_notes(path: Path) -> str:
    """The hand-written '## Notes' section of the previous daemon.md, kept across runs."""
    try:
        text = path.read_text()
    except OSError:
        return ""
    i = text.find("\n" + NOTES_HEADING + "\n")
    return "\n" + text[i + 1:] if i >= 0 else ""


def _quiet_windows(windows: list[dict], limit: float) -> list[float]:
    return [x["images_per_s"] for x in windows if x["steal_pct"] < limit]


def _quiet_summary(windows: list[dict], setup: dict) -> str:
    limit = setup.get("quiet_steal_pct", QUIET_STEAL_PCT)
    q = _quiet_windows(windows, limit)
    text = (f"The {len(q)} window{'s' if len(q) > 1 else ''} with under {limit:g}% steal: slowest {min(q):.0f}, median "
            f"{float(np.median(q)):.0f} images/s." if q else f"No window ran with under {limit:g}% steal.")
    steal = np.array([x["steal_pct"] for x in windows])
    rate = np.array([x["images_per_s"] for x in windows])
    if len(windows) >= 5 and np.isfinite(steal).all() and np.ptp(steal) >= 2.0:
        # an estimate, not a measurement: what the windows say the daemon does when the host takes nothing
        slope, at_zero = np.polyfit(steal, rate, 1)
        text += (f" A straight line through the {len(windows)} windows' images/s against their steal: "
                 f"{at_zero:.0f} images/s at 0% steal, {slope:.0f} per point of steal "
                 f"(correlation {np.corrcoef(steal, rate)[0, 1]:.2f}; an extrapolation, not a measurement).")
    return text


def _steal(t: dict, key: str = "host_steal_pct") -> str:
    return format_steal(t.get(key))


def render_markdown(r: dict) -> str:
    ip, s, daemons = r["in_process"], r["setup"], r["daemon"]
    ok = lambda b: "met" if b else "**not met**"  # noqa: E731
    any_d = next(iter(daemons.values()))
    lines = [
        "# Daemon benchmark (`protoedge bench daemon`)",
        "",
        f"{s['date_utc']} UTC, {s['machine']}, {s['cpus']} CPUs shared with the rest of the machine "
        f"(load average {', '.join(f'{x:.2f}' for x in s['loadavg_before'])} before, "
        f"{', '.join(f'{x:.2f}' for x in s['loadavg_after'])} after), Python {s['python']}. "
        f"Bundle `{Path(s['bundle']).name}` ({s['bundle']}), backend {any_d['backend'].get('backend')} with "
        f"{s['server_threads']} inference threads, precision {any_d['backend'].get('precision')} (in-process too), "
        f"{'the event loop applying each batch (--pipeline)' if any_d.get('pipeline') else 'the worker thread embedding and applying each batch (--no-pipeline)'}, "
        f"event loop {any_d.get('event_loop')}. Each request carries one "
        "Omniglot test image "
        "(1x28x28 uint8 .npy) to `POST /v1/cluster` (assign + update, answered once logged) on loopback TCP "
        "with keep-alive. Load generators are separate processes on the same cores (their CPU is listed).",
        "",
        "`--fsync always`: the answer waits for the fdatasync of its batch's log record (group commit: one per "
        "micro-batch). `--fsync interval`: the record reaches the kernel before the answer (kill -9 loses "
        "nothing), fdatasync once a second.",
        "",
        "## Single client, sequential requests",
        "",
        "| fsync | requests | p50 ms | p90 ms | p99 ms | max ms | images/s | server CPU s | client CPU s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p, d in daemons.items():
        lat = d["latency_1_client"]
        lines.append(f"| {p} | {lat['requests']} | {lat['p50_ms']:.2f} | {lat['p90_ms']:.2f} | {lat['p99_ms']:.2f} | "
                     f"{lat['max_ms']:.1f} | {lat['images_per_s']:.0f} | {lat['server_cpu_s']:.2f} | "
                     f"{lat['client_cpu_s']:.2f} |")
    lines += ["", "The client is a raw socket sending prebuilt requests. Through `protoedge.client.Client` "
              "(http.client, what a Python caller uses) the same requests took: " + "; ".join(
                  f"{p} p50 {d['latency_1_client_python_client']['p50_ms']:.2f} ms, p99 "
                  f"{d['latency_1_client_python_client']['p99_ms']:.2f} ms" for p, d in daemons.items()) + "."]
    lines += ["", "## Throughput with concurrent clients (one image per request)", "",
              "Each client is one keep-alive connection that sends one single-image request and waits for its "
              "answer before sending the next (no pipelining); all clients run in one load-generator process "
              "(an epoll loop over raw sockets).", "",
              "| fsync | clients | images/s | p50 ms | p99 ms | 503s | images per batch | ms per batch (of it fdatasync) "
              "| server CPU s | client CPU s | server CPU ms/image (of it event loop) | seconds | host steal % |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def cpu_per_image(t):
        n = max(t["images"], 1)
        loop = f" ({1e3 * t['event_loop_cpu_s'] / n:.2f})" if "event_loop_cpu_s" in t else ""
        return f"{1e3 * t['server_cpu_s'] / n:.2f}{loop}"

    def row(label, k, t):
        per_image = cpu_per_image(t)
        return (f"| {label} | {k} | {t['images_per_s']:.0f} | {t['p50_ms']:.2f} | {t['p99_ms']:.2f} | "
                f"{t['rejected_503']} | {t.get('images_per_call', float('nan')):.1f} | "
                f"{t.get('batch_ms', float('nan')):.2f} ({t.get('fsync_ms_per_batch', float('nan')):.2f}) | {t['server_cpu_s']:.2f} | "
                f"{t['client_cpu_s']:.2f} | {per_image} | {t['seconds']:.1f} | {_steal(t)} |")

    for p, d in daemons.items():
        for k, t in d["throughput"].items():
            lines.append(row(p, k, t))
    lines.append("")
    for p, d in daemons.items():
        w = d["throughput"].get("16", {}).get("windows")
        if w:
            rates = [x["images_per_s"] for x in w]
            lines.append(f"- fsync {p}, 16 clients: {len(w)} consecutive windows of {s['seconds_per_throughput_run']:g} s "
                         "on the same daemon (the row above is all of them): "
                         + ", ".join(f"{x['images_per_s']:.0f} ({_steal(x, 'steal_pct')}% steal)" for x in w)
                         + f"; slowest {min(rates):.0f}, median {float(np.median(rates)):.0f} images/s. "
                         + _quiet_summary(w, s))
    lines.append("")
    if r.get("variants"):
        lines += ["Other daemon settings, 16 clients (same policy as the first rows above). Each setting "
                  "follows a run of the defaults made just before it (the machine's speed drifts over "
                  "minutes): compare a setting with its own pair.", "",
                  "| setting | fsync | images/s | defaults just before | ratio | p50 ms | p99 ms "
                  "| images per encoder call | server CPU ms/image (of it event loop) | defaults: CPU ms/image "
                  "| host steal % (setting, defaults) |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, v in r["variants"].items():
            t = v["throughput"]["16"]
            pd = v.get("paired_default_16")
            pair = (f"{pd['images_per_s']:.0f} | {t['images_per_s'] / pd['images_per_s']:.2f}" if pd else " | ")
            lines.append(f"| {name} | {v['fsync']} | {t['images_per_s']:.0f} | {pair} | {t['p50_ms']:.2f} | "
                         f"{t['p99_ms']:.2f} | {t.get('images_per_call', float('nan')):.1f} | "
                         f"{cpu_per_image(t)} | {cpu_per_image(pd) if pd else ''} | "
                         f"{_steal(t)}, {_steal(pd) if pd else ''} |")
        lines.append("")
        for name, v in r["variants"].items():
            if "latency_1_client" in v:
                lat = v["latency_1_client"]
                lines.append(f"Single client with {name}: p50 {lat['p50_ms']:.2f} ms, p99 {lat['p99_ms']:.2f} ms "
                             f"({lat['requests']} requests; compare the first table).")
        lines.append("")
    for p, d in daemons.items():
        b, m = d["batches"], d["memory"]
        lines.append(f"- fsync {p}: {b['count']:.0f} encoder calls averaging {b['mean_images']:.1f} images "
                     f"(whole run), {b['fsyncs']:.0f} fsyncs; resident memory {m['rss_idle_mb']:.0f} MB idle, "
                     f"{m['rss_after_mb']:.0f} MB after ({d['clusters_at_end']:.0f} clusters).")
    lines += ["", "## The same work in-process (`Runtime.cluster`, same backend and threads)", "",
              "Measured before the daemon runs and again after them.", "",
              "| mode | images/s before | images/s after | p50 ms (before, after) | p99 ms (before, after) |",
              "|---|---:|---:|---:|---:|"]
    runs = [ip] + ([ip["after"]] if "after" in ip else [])
    lines.append("| one image per call | " + " | ".join(f"{x['single_images_per_s']:.0f}" for x in runs)
                 + (" | " if len(runs) == 1 else "") + " | "
                 + ", ".join(f"{x['single_p50_ms']:.3f}" for x in runs) + " | "
                 + ", ".join(f"{x['single_p99_ms']:.3f}" for x in runs) + " |")
    for batch in ip["batched_images_per_s"]:
        lines.append(f"| {batch} images per call | " + " | ".join(f"{x['batched_images_per_s'][batch]:.0f}" for x in runs)
                     + (" | " if len(runs) == 1 else "") + " | | |")
    lines += ["", "Ratios, daemon images/s over in-process images/s (mean of the two in-process runs):", ""]
    for p, d in daemons.items():
        ra = d["ratios"]
        lines.append(f"- fsync {p}: 1 client / one image per call **{ra['1_client_vs_in_process_single']:.2f}**, "
                     f"16 clients / one image per call **{ra['16_clients_vs_in_process_single']:.2f}**, "
                     f"16 clients / 64 images per call **{ra['16_clients_vs_in_process_batch64']:.2f}**")
    lines += ["", "## Against the issue's targets", ""]
    for p, d in daemons.items():
        lat, t16, tg = d["latency_1_client"], d["throughput"]["16"]["images_per_s"], d["targets"]
        lines.append(f"- fsync {p}: one-client p50 {lat['p50_ms']:.2f} ms (<= 3: {ok(tg['p50_ms_le_3'])}), "
                     f"p99 {lat['p99_ms']:.2f} ms (<= 15: {ok(tg['p99_ms_le_15'])}); 16 clients {t16:.0f} images/s "
                     f"over {d['throughput']['16']['seconds']:.0f} s (>= 3,000: {ok(tg['16_clients_ge_3000_images_per_s'])}; "
                     f"host steal {_steal(d['throughput']['16'])}%)"
                     + (f". {_quiet_summary(d['throughput']['16']['windows'], s)}"
                        if d["throughput"]["16"].get("windows") else ""))
    budget = 1e3 * s["cpus"] / 3000.0
    for p, d in daemons.items():
        t = d["throughput"]["16"]
        n = max(t["images"], 1)
        server, client = 1e3 * t["server_cpu_s"] / n, 1e3 * t["client_cpu_s"] / n
        lines.append(f"- CPU budget, fsync {p}, 16 clients: the daemon used {server:.2f} ms of CPU per image "
                     f"and the load generator {client:.2f}, {server + client:.2f} ms in all; 3,000 images/s on "
                     f"{s['cpus']} cores leaves {budget:.2f} ms per image for both, with nothing else running "
                     f"and every core busy all the time ({3000 * (server + client) / 1e3:.2f} cores at this "
                     "cost).")
    ceiling = max(x for run in runs for x in (run["single_images_per_s"], *run["batched_images_per_s"].values()))
    lines += ["", "On this machine the load generators share the daemon's two cores (and other jobs may be "
              "running: see the load average), so the throughput rows are lower bounds of what the daemon "
              "does with the cores to itself. The in-process runtime (one thread calling `Runtime.cluster`, "
              f"no HTTP) reached at most {ceiling:.0f} images/s in this run. It is a reference, not a bound: "
              "it runs encoder and clusterer in turn, while the daemon overlaps the encoder with HTTP, the "
              "log and fdatasync on other threads, and it ran minutes apart from the daemon rows on a machine "
              "whose load changes, so a ratio near or above 1 says that the daemon's path adds little, not "
              "that HTTP is free.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "worker":
        kwargs = json.loads(sys.argv[3])
        result = {"latency": worker_latency, "client_latency": worker_client_latency,
                  "load": worker_load}[sys.argv[2]](**kwargs)
        print(json.dumps(result))
    else:
        sys.exit("usage: protoedge bench daemon (this file's worker mode is started by the benchmark itself)")
