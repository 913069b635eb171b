"""`protoedge bench export`: one run that exports a checkpoint and measures every precision variant.

Parity against torch, file size, Protocol A 5-way 1-shot accuracy (same episodes for every variant)
and ONNX Runtime CPU latency at batch 1 and 64. Timed runs are interleaved across variants in
rounds, so load from other processes on a shared machine hits every variant alike; ratios are
against FP32 measured in the same run.
"""
from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path

from .measure import interleaved_latency
from .pipeline import ExportOptions, export_bundle

BATCHES = (1, 64)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_export_benchmark(checkpoint: Path, results_dir: Path, episodes: int = 1000, repeats: int = 200,
                         threads: int = 1) -> tuple[Path, Path]:
    from protoedge.datasets import load_split

    checkpoint, results_dir = Path(checkpoint), Path(results_dir)
    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="protoedge-bench-export-") as tmp:
        result = export_bundle(checkpoint, Path(tmp) / "bundle", ExportOptions(episodes=episodes))
        export_s = time.perf_counter() - started
        b = result.bundle
        m = b.manifest
        paths = {p: b.onnx_path(p) for p in b.precisions}
        images = load_split("omniglot-a", "test").images[:512]
        speed = {batch: interleaved_latency(paths, images, batch, repeats, threads) for batch in BATCHES}
    rows = {}
    for p in paths:
        v = m["variants"][p]
        rows[p] = {
            "file": v["file"], "bytes": m["files"][v["file"]]["bytes"],
            "max_abs_diff_vs_torch": v["max_abs_diff"], "min_cosine_vs_torch": v["min_cosine"],
            "acc_5w1s": v["acc_5w1s"], "acc_ci95": v["acc_ci95"],
            "acc_drop_vs_fp32": v.get("acc_drop_vs_fp32", 0.0),
            **{f"b{batch}": speed[batch][p] for batch in BATCHES},
            **{f"b{batch}_speedup_vs_fp32": speed[batch][p]["images_per_s"] / speed[batch]["fp32"]["images_per_s"]
               for batch in BATCHES},
        }
    report = {
        "checkpoint": str(checkpoint), "checkpoint_sha256": m["provenance"]["checkpoint_sha256"],
        "model": m["model"], "distance": m["output"]["distance"],
        "evaluation": m["evaluation"], "calibration": m["calibration"], "rejected_variants": m["rejected_variants"],
        "export_seconds": export_s, "variants": rows,
        "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "onnxruntime_threads": threads,
                    "load_average_at_start": load_start, "load_average_at_end": os.getloadavg()[0],
                    "python": platform.python_version(), **m["provenance"]["export"]},
    }
    results_dir.mkdir(parents=True, exist_ok=True)
    json_path = results_dir / "export.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path = results_dir / "export.md"
    md_path.write_text(render_markdown(report))
    return md_path, json_path


def render_markdown(r: dict) -> str:
    mach, ev, cal = r["machine"], r["evaluation"], r["calibration"]
    lines = [
        "# Export benchmark",
        "",
        f"Checkpoint `{r['checkpoint']}` (sha256 `{r['checkpoint_sha256'][:12]}`), model {r['model']['name']} "
        f"{r['model']['version']}, distance {r['distance']}. One run of `protoedge bench export`: export "
        f"({r['export_seconds']:.0f} s), then every measurement below.",
        "",
        f"Machine: {mach['cpu']}, {mach['cores']} cores shared with other jobs (load average "
        f"{mach['load_average_at_start']:.1f} at start, {mach['load_average_at_end']:.1f} at end); "
        f"ONNX Runtime {mach['onnxruntime']} CPUExecutionProvider, {mach['onnxruntime_threads']} intra-op "
        f"thread(s); torch {mach['torch']}, onnx {mach['onnx']}, opset {mach['opset']}.",
        "",
        "## Parity with the torch model",
        "",
        f"On {ev['parity_images']} real test images. The export refuses FP32 above 1e-4 max |difference|. "
        "int8 (the TensorRT form) is scored with its Q/DQ pairs run as written, TensorRT's arithmetic; "
        "ONNX Runtime's fused CPU kernels for it saturate on x86 without VNNI (export/onnx_export.py).",
        "",
        "| variant | max abs diff vs torch | worst cosine vs torch |",
        "|---|---:|---:|",
    ]
    for p, v in r["variants"].items():
        lines.append(f"| {p} | {v['max_abs_diff_vs_torch']:.3g} | {v['min_cosine_vs_torch']:.6f} |")
    lines += [
        "",
        "## Size, accuracy, CPU speed",
        "",
        f"Accuracy: {ev['protocol']}, {ev['episodes']} episodes on {ev['source']} ({ev['classes']} classes), "
        "the same episodes for every variant (mean and 95% CI, %). Speed: median and p99 of per-call wall time "
        "over interleaved rounds; speed-up is images/s against FP32 in this run.",
        "",
        "| variant | file | size KiB | 5w1s acc % | drop vs fp32 | b1 median ms | b1 p99 ms | b1 img/s | b1 x fp32 "
        "| b64 median ms | b64 p99 ms | b64 img/s | b64 x fp32 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p, v in r["variants"].items():
        b1, b64 = v["b1"], v["b64"]
        lines.append(
            f"| {p} | {v['file']} | {v['bytes'] / 1024:.0f} | {v['acc_5w1s']:.2f} ± {v['acc_ci95']:.2f} | "
            f"{v['acc_drop_vs_fp32']:+.2f} | {b1['median_ms']:.3f} | {b1['p99_ms']:.3f} | {b1['images_per_s']:.0f} | "
            f"{v['b1_speedup_vs_fp32']:.2f} | {b64['median_ms']:.2f} | {b64['p99_ms']:.2f} | "
            f"{b64['images_per_s']:.0f} | {v['b64_speedup_vs_fp32']:.2f} |")
    why = {"fp16": "ONNX Runtime's CPU provider has few float16 kernels and inserts casts around them",
           "int8": "the file uses symmetric signed int8 activations (the Q/DQ form TensorRT needs), whose extra "
                   "Quantize/Dequantize work does not pay off on this CPU for a network this small",
           "int8-cpu": "its uint8 activations suit ONNX Runtime's INT8 kernels on CPUs with VNNI or Arm dot "
                       "products; this CPU gains nothing from them"}
    others = [p for p in r["variants"] if p != "fp32"]
    slower = [p for p in others if r["variants"][p]["b64_speedup_vs_fp32"] < 0.95]
    faster = [p for p in others if r["variants"][p]["b64_speedup_vs_fp32"] >= 1.05]
    if slower:
        lines += ["", "On this CPU, at batch 64: " + "; ".join(
            f"{p} ran at {r['variants'][p]['b64_speedup_vs_fp32']:.2f}x FP32's throughput ({why[p]})" for p in slower)
            + ". fp16 and int8 are meant for TensorRT on the device."]
    if faster:
        lines += ["", "Faster than FP32 on this CPU: " + "; ".join(
            f"{p} {r['variants'][p]['b1_speedup_vs_fp32']:.2f}x at batch 1 and "
            f"{r['variants'][p]['b64_speedup_vs_fp32']:.2f}x at batch 64" for p in faster)
            + " (int8-cpu: asymmetric uint8 activations, the form ONNX Runtime's CPU INT8 kernels run fastest; "
              "`--precision int8-cpu` in `protoedge cluster` and `protoedge serve`)."]
    if r["rejected_variants"]:
        lines += ["", "Refused variants:", ""] + [f"- {p}: {why}" for p, why in r["rejected_variants"].items()]
    sq, dq = cal["same_item_quantiles"], cal["different_item_quantiles"]
    lines += [
        "",
        "## Distance calibration written to the manifest",
        "",
        f"{cal['n_items']} unlabelled items from {cal['source']}, {cal['views']}; distance {cal['distance']}.",
        "",
        "| | q0.01 | q0.05 | q0.1 | q0.5 | q0.9 | q0.95 | q0.99 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        "| same item | | | | " + " | ".join(f"{sq[q]:.4f}" for q in ("0.5", "0.9", "0.95", "0.99")) + " |",
        "| different items | " + " | ".join(f"{dq[q]:.4f}" for q in ("0.01", "0.05", "0.1", "0.5")) + " | | | |",
        "",
        f"new_cluster_threshold = {cal['new_cluster_threshold']:.4f} ({cal['threshold_rule']}): it would call "
        f"{100 * cal['same_item_above_threshold']:.1f}% of same-item pairs new and merge "
        f"{100 * cal['different_item_below_threshold']:.1f}% of different-item pairs.",
        "",
        "CPU numbers only: no GPU and no TensorRT on this machine, so nothing here was measured on a Jetson.",
        "",
    ]
    return "\n".join(lines)
