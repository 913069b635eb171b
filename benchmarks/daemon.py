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


def worker_latency(url: str, n: int, warmup: int = 100) -> dict:
    """One client, sequential single-image requests on one keep-alive connection."""
    from protoedge.client import Client

    bodies = _image_bodies()
    lat = []
    with Client(url, timeout=30) as c:
        for i in range(warmup):
            c.request("POST", "/v1/cluster", bodies[i % len(bodies)], "application/x-npy")
        cpu0 = _cpu_seconds()
        for i in range(n):
            t0 = time.perf_counter()
            status, _, _ = c.request("POST", "/v1/cluster", bodies[i % len(bodies)], "application/x-npy")
            lat.append(time.perf_counter() - t0)
            if status != 200:
                raise RuntimeError(f"status {status}")
    return {"latencies_s": lat, "client_cpu_s": _cpu_seconds() - cpu0}


def worker_load(url: str, clients: int, seconds: float) -> dict:
    """`clients` concurrent keep-alive connections sending single images for `seconds`."""
    import asyncio

    import aiohttp

    bodies = _image_bodies()
    headers = {"Content-Type": "application/x-npy"}

    async def main():
        ok = [0] * clients
        rejected = [0] * clients
        lat: list[float] = []
        conn = aiohttp.TCPConnector(limit=clients, force_close=False)
        async with aiohttp.ClientSession(url, connector=conn) as session:
            async def one(k: int, until: float, record: bool):
                i = k * 7919
                while time.perf_counter() < until:
                    t0 = time.perf_counter()
                    async with session.post("/v1/cluster", data=bodies[i % len(bodies)], headers=headers) as r:
                        await r.read()
                        if r.status == 200:
                            if record:
                                ok[k] += 1
                                lat.append(time.perf_counter() - t0)
                        elif r.status == 503:
                            rejected[k] += 1
                            await asyncio.sleep(float(r.headers.get("Retry-After", "1")) / 100)
                        else:
                            raise RuntimeError(f"status {r.status}")
                    i += 1

            # Warm-up (connections, batch sizes), then the measured window.
            await asyncio.gather(*(one(k, time.perf_counter() + 0.5, False) for k in range(clients)))
            cpu0, t0 = _cpu_seconds(), time.perf_counter()
            await asyncio.gather(*(one(k, t0 + seconds, True) for k in range(clients)))
            elapsed = time.perf_counter() - t0
        return {"images": sum(ok), "rejected": sum(rejected), "elapsed_s": elapsed,
                "client_cpu_s": _cpu_seconds() - cpu0, "latencies_s": lat}

    return asyncio.run(main())


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
    rt = Runtime(bundle_path, backend="cpu", threads=threads)
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
            "single_images_per_s": single_rate, "batched_images_per_s": rates, "backend": rt.backend}


# ----------------------------------------------------------------------------- the run

def _proc_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
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


def run_benchmark(bundle: str, out_dir: str = "benchmarks/results", seconds: float = 6.0, n_latency: int = 2000,
                  threads: int | None = None, fsync: str = "always") -> dict:
    from protoedge.client import Client

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    state = tempfile.mkdtemp(prefix="protoedge-bench-daemon-")
    cmd = [sys.executable, "-m", "protoedge.cli", "serve", bundle, "--port", str(port), "--state", state,
           "--fsync", fsync, "--backend", "cpu"]
    if threads:
        cmd += ["--threads", str(threads)]
    load_before = os.getloadavg()
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    results: dict = {}
    try:
        with Client(url) as c:
            c.wait_ready(120)
            meta = c.model()
        rss_idle = _metric(Client(url).metrics(), "protoedge_resident_memory_bytes")
        print("daemon ready; measuring single-client latency", file=sys.stderr)
        cpu0 = _proc_cpu_seconds(server.pid)
        lat = _run_worker("latency", url=url, n=n_latency)
        ms = 1e3 * np.asarray(lat["latencies_s"])
        results["latency_1_client"] = {
            "requests": len(ms), "p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "max_ms": float(ms.max()),
            "images_per_s": float(len(ms) / (ms.sum() / 1e3)),
            "server_cpu_s": _proc_cpu_seconds(server.pid) - cpu0, "client_cpu_s": lat["client_cpu_s"]}
        results["throughput"] = {}
        for clients in (1, 4, 16):
            print(f"measuring throughput with {clients} clients", file=sys.stderr)
            cpu0 = _proc_cpu_seconds(server.pid)
            r = _run_worker("load", url=url, clients=clients, seconds=seconds)
            lms = 1e3 * np.asarray(r["latencies_s"]) if r["latencies_s"] else np.zeros(1)
            results["throughput"][str(clients)] = {
                "images_per_s": r["images"] / r["elapsed_s"], "images": r["images"], "rejected_503": r["rejected"],
                "seconds": r["elapsed_s"], "p50_ms": float(np.percentile(lms, 50)),
                "p99_ms": float(np.percentile(lms, 99)),
                "server_cpu_s": _proc_cpu_seconds(server.pid) - cpu0, "client_cpu_s": r["client_cpu_s"]}
        metrics = Client(url).metrics()
        results["daemon_memory"] = {"rss_idle_mb": rss_idle / 2**20,
                                    "rss_after_mb": _metric(metrics, "protoedge_resident_memory_bytes") / 2**20}
        results["daemon_batches"] = {
            "count": _metric(metrics, "protoedge_batch_images_count"),
            "mean_images": _metric(metrics, "protoedge_batch_images_sum") / max(_metric(metrics, "protoedge_batch_images_count"), 1)}
        results["clusters_at_end"] = _metric(metrics, "protoedge_clusters")
        results["backend"] = meta["parameters"]["backend"]
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)
        import shutil

        shutil.rmtree(state, ignore_errors=True)
    print("measuring the runtime in-process", file=sys.stderr)
    inproc = in_process(bundle, threads, n_latency, seconds)
    results["in_process"] = inproc
    t16 = results["throughput"]["16"]["images_per_s"]
    t1 = results["throughput"]["1"]["images_per_s"]
    results["ratios"] = {
        "daemon_1_client_vs_in_process_single": t1 / inproc["single_images_per_s"],
        "daemon_16_clients_vs_in_process_single": t16 / inproc["single_images_per_s"],
        "daemon_16_clients_vs_in_process_batch64": t16 / inproc["batched_images_per_s"][64],
    }
    results["setup"] = {"bundle": bundle, "fsync": fsync, "server_threads": threads or os.cpu_count(),
                        "cpus": os.cpu_count(), "loadavg_before": load_before, "python": platform.python_version(),
                        "machine": platform.machine(), "seconds_per_throughput_run": seconds,
                        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    results["targets"] = {
        "p50_ms_le_3": results["latency_1_client"]["p50_ms"] <= 3.0,
        "p99_ms_le_15": results["latency_1_client"]["p99_ms"] <= 15.0,
        "16_clients_ge_3000_images_per_s": t16 >= 3000.0}
    (out / "daemon.json").write_text(json.dumps(results, indent=1))
    (out / "daemon.md").write_text(render_markdown(results))
    print((out / "daemon.md").read_text())
    return results


def render_markdown(r: dict) -> str:
    lat, thr, ip, s = r["latency_1_client"], r["throughput"], r["in_process"], r["setup"]
    ok = lambda b: "met" if b else "NOT met"  # noqa: E731
    lines = [
        "# Daemon benchmark (`protoedge bench daemon`)",
        "",
        f"{s['date_utc']} UTC, {s['machine']}, {s['cpus']} CPUs shared with everything else running "
        f"(load average before: {', '.join(f'{x:.2f}' for x in s['loadavg_before'])}), Python {s['python']}. "
        f"Bundle `{s['bundle']}`, backend {r['backend'].get('backend')} with {s['server_threads']} inference "
        f"threads, `--fsync {s['fsync']}` (an fsync before every answer that changes state). "
        "Requests: one Omniglot test image (1x28x28 uint8 .npy) each, `POST /v1/cluster` (assign + update) on "
        "loopback TCP with keep-alive. Load generators run in separate processes on the same cores.",
        "",
        "## Single client, sequential requests",
        "",
        "| requests | p50 ms | p90 ms | p99 ms | max ms | images/s | server CPU s | client CPU s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {lat['requests']} | {lat['p50_ms']:.2f} | {lat['p90_ms']:.2f} | {lat['p99_ms']:.2f} | {lat['max_ms']:.1f} | "
        f"{lat['images_per_s']:.0f} | {lat['server_cpu_s']:.2f} | {lat['client_cpu_s']:.2f} |",
        "",
        "## Throughput with concurrent clients (single image per request)",
        "",
        "| clients | images/s | p50 ms | p99 ms | 503s | server CPU s | client CPU s | seconds |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for k, t in thr.items():
        lines.append(f"| {k} | {t['images_per_s']:.0f} | {t['p50_ms']:.2f} | {t['p99_ms']:.2f} | {t['rejected_503']} | "
                     f"{t['server_cpu_s']:.2f} | {t['client_cpu_s']:.2f} | {t['seconds']:.1f} |")
    b = r["daemon_batches"]
    lines += [
        "",
        f"Micro-batches: {b['count']:.0f} encoder calls, {b['mean_images']:.1f} images each on average over the "
        "whole run. Daemon resident memory: "
        f"{r['daemon_memory']['rss_idle_mb']:.0f} MB idle, {r['daemon_memory']['rss_after_mb']:.0f} MB after the run "
        f"({r['clusters_at_end']:.0f} clusters).",
        "",
        "## The same work in-process (`Runtime.cluster`, same backend and threads)",
        "",
        "| mode | images/s | p50 ms | p99 ms |",
        "|---|---:|---:|---:|",
        f"| one image per call | {ip['single_images_per_s']:.0f} | {ip['single_p50_ms']:.3f} | {ip['single_p99_ms']:.3f} |",
    ]
    for batch, rate in ip["batched_images_per_s"].items():
        lines.append(f"| {batch} images per call | {rate:.0f} | | |")
    ra = r["ratios"]
    lines += [
        "",
        "Ratios (daemon / in-process): "
        f"1 client vs one image per call **{ra['daemon_1_client_vs_in_process_single']:.2f}**, "
        f"16 clients vs one image per call **{ra['daemon_16_clients_vs_in_process_single']:.2f}**, "
        f"16 clients vs 64 images per call **{ra['daemon_16_clients_vs_in_process_batch64']:.2f}**.",
        "",
        "## Against the issue's targets",
        "",
        f"- one client p50 <= 3 ms: {lat['p50_ms']:.2f} ms, {ok(r['targets']['p50_ms_le_3'])}",
        f"- one client p99 <= 15 ms: {lat['p99_ms']:.2f} ms, {ok(r['targets']['p99_ms_le_15'])}",
        f"- 16 clients >= 3,000 images/s: {thr['16']['images_per_s']:.0f}, "
        f"{ok(r['targets']['16_clients_ge_3000_images_per_s'])}",
        "",
        "The client CPU column is the load generator's own cost; on this machine it runs on the same cores as "
        "the daemon, so throughput numbers are a lower bound of what the daemon does with the cores to itself.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "worker":
        kwargs = json.loads(sys.argv[3])
        result = worker_latency(**kwargs) if sys.argv[2] == "latency" else worker_load(**kwargs)
        print(json.dumps(result))
    else:
        sys.exit("usage: protoedge bench daemon (this file's worker mode is started by the benchmark itself)")
