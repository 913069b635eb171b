"""`protoedge report RUN_DIR`: a self-contained HTML page (PNG figures embedded as data URIs, and
also written to RUN_DIR/figures/) from the files of a run directory (see protoedge.rundir).

Every number printed on the page is a value of run.json, rendered by format_value() inside an
element that names its JSON path (data-key), so a test can parse the page back and compare.
"""
from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import rundir
from .metrics import contingency
from .streamstats import stream_sections

# Sections in reading order; anything else in run.json follows alphabetically.
SECTION_ORDER = ("summary", "latency_ms", "timings_s", "training", "clusters", "settings", "bundle")
SECTION_TITLES = {"summary": "Summary", "latency_ms": "Latency per image (ms)", "timings_s": "Timings (s)",
                  "training": "Training", "clusters": "Largest clusters", "settings": "Settings",
                  "bundle": "Bundle"}
HEAD_SECTIONS = ("summary", "latency_ms")  # shown above the figures: the headline numbers
KEY_LABELS = {"acc": "Hungarian ACC", "ari": "ARI", "nmi": "NMI", "clusters_found": "clusters found",
              "clusters_true": "true classes", "images_per_s": "images per second",
              "acc_as_assigned": "Hungarian ACC, as assigned online", "ari_as_assigned": "ARI, as assigned online"}
HIDDEN = {"format", "class_names"}  # bookkeeping, not findings
HEADER_KEYS = ("kind", "name", "created")
MAX_TABLE_ROWS = 25
MAX_LIST_ITEMS = 20
MONTAGE_ROWS, MONTAGE_PER_ROW = 60, 12  # the 60 largest clusters; further rows are mostly singletons


def format_value(value) -> str:
    """The one way a JSON value is written on the page (and in the demo's summary)."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)  # "nan", "inf": JSON written by Python may hold them
        if value == int(value) and abs(value) < 1e15:
            return str(int(value)) if abs(value) >= 1000 else f"{value:.4g}"
        return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        shown = ", ".join(format_value(v) for v in value[:MAX_LIST_ITEMS])
        return shown + (", ..." if len(value) > MAX_LIST_ITEMS else "")
    return str(value)


@dataclass
class Figure:
    name: str
    title: str
    caption: str
    path: Path


# ----------------------------------------------------------------------------- figures

def _montage(run: dict, stream: dict, out: Path) -> Path:
    from .runtime.montage import MontageRow, cluster_montage_png

    cluster, labels = stream["cluster"], stream.get("labels")
    rows = []
    for entry in run.get("clusters", [])[:MONTAGE_ROWS]:
        members = np.flatnonzero(cluster == entry["id"])[:MONTAGE_PER_ROW]
        mismatched = None
        if labels is not None:
            all_labels = labels[cluster == entry["id"]]
            majority = np.bincount(all_labels - all_labels.min()).argmax() + all_labels.min()
            mismatched = labels[members] != majority
        label = entry.get("majority")
        rows.append(MontageRow(int(entry["id"]), int(entry["size"]), stream["images"][members],
                               purity=entry.get("purity"), label=None if label is None else str(label),
                               mismatched=mismatched))
    title = "largest clusters, biggest first" + ("; red frame: not the cluster's majority class"
                                                 if labels is not None else "")
    out.write_bytes(cluster_montage_png(rows, per_row=MONTAGE_PER_ROW, max_rows=MONTAGE_ROWS, title=title))
    return out


def figure_jobs(run_dir: Path, run: dict, records: list[dict], stream: dict | None) -> list[tuple]:
    """(name, title, caption, make) for every figure this run's files allow; make() -> PNG path."""
    from . import figures as fg

    out = run_dir / rundir.FIGURES
    jobs = []
    if stream is not None and run.get("clusters"):
        jobs.append(("montage", "Discovered clusters",
                     "Each row is one cluster (largest first) with its first members in stream order; "
                     "the caption gives its size and, when labels are known, its purity and majority class.",
                     lambda: _montage(run, stream, out / "montage.png")))
    if records:
        jobs.append(("curves", "Training curves", "Losses and held-out few-shot accuracy during training.",
                     lambda: fg.training_curves(records, out / "curves.png")))
    if stream is not None and "embedding" in stream and len(stream["embedding"]) > 2:
        distance = run.get("settings", {}).get("distance", "sqeuclidean")
        jobs.append(("projection", "Embeddings", "PCA of the streamed images' embeddings.",
                     lambda: fg.projection(stream["embedding"], stream["cluster"], out / "projection.png",
                                           stream.get("labels"), distance)))
    if stream is not None and "labels" in stream:
        jobs.append(("contingency", "Clusters against true classes",
                     "Rows are true classes, columns discovered clusters; a perfect clustering is a "
                     "filled diagonal and nothing else.",
                     lambda: fg.contingency(contingency(stream["labels"], stream["cluster"]),
                                            out / "contingency.png")))
    if stream is not None and "latency_ms" in stream:
        lat = run.get("latency_ms", {})
        marks = {f"{k} {format_value(lat[k])} ms": lat[k] for k in ("p50", "p99")
                 if isinstance(lat.get(k), (int, float))}
        jobs.append(("latency", "Latency", "Per-image latency of the runtime over the stream.",
                     lambda: fg.latency_histogram(stream["latency_ms"], out / "latency.png", marks)))
    return jobs


def make_figures(run_dir: Path, run: dict, records: list[dict], stream: dict | None,
                 progress: bool = True) -> list[Figure]:
    from tqdm import tqdm

    (run_dir / rundir.FIGURES).mkdir(exist_ok=True)
    made = []
    for name, title, caption, make in tqdm(figure_jobs(run_dir, run, records, stream), desc="report",
                                           unit="figure", disable=not progress, leave=False):
        made.append(Figure(name, title, caption, make()))
    return made


# ----------------------------------------------------------------------------- HTML

def _value_cell(path: list, value, tag: str = "td") -> str:
    key = html.escape(json.dumps(path), quote=True)
    return f'<{tag} class="v" data-key="{key}">{html.escape(format_value(value))}</{tag}>'


def _name_cell(name: str) -> str:
    shown = KEY_LABELS.get(str(name), str(name))
    return f'<th class="k" data-name="{html.escape(str(name), quote=True)}">{html.escape(shown)}</th>'


def _flatten(obj: dict, prefix: list) -> tuple[list[tuple[list, object]], list[tuple[list, list]]]:
    """Scalars (and lists of scalars) by path, and the lists of objects found on the way (tables)."""
    items, tables = [], []
    for k, v in obj.items():
        if isinstance(v, dict):
            sub_items, sub_tables = _flatten(v, prefix + [k])
            items += sub_items
            tables += sub_tables
        elif isinstance(v, list) and v and all(isinstance(e, dict) for e in v):
            tables.append((prefix + [k], v))
        else:
            items.append((prefix + [k], v))
    return items, tables


def _dict_table(name: str, section: dict) -> str:
    items, tables = _flatten(section, [name])
    rows = [f"<tr>{_name_cell('.'.join(map(str, path[1:])))}{_value_cell(path, value)}</tr>"
            for path, value in items]
    html_out = "<table>" + "".join(rows) + "</table>" if rows else ""
    for path, entries in tables:
        name = '.'.join(map(str, path[1:]))
        html_out += (f'<h3 data-name="{html.escape(name, quote=True)}">{html.escape(name)}</h3>'
                     + _list_table(path, entries))
    return html_out


def _list_table(path: list, entries: list[dict]) -> str:
    columns = []
    for e in entries:
        columns += [k for k, v in e.items() if k not in columns and not isinstance(v, (dict, list))]
    head = "<tr>" + "".join(_name_cell(c) for c in columns) + "</tr>"
    body = []
    for i, e in enumerate(entries[:MAX_TABLE_ROWS]):
        body.append("<tr>" + "".join(_value_cell([*path, i, c], e.get(c)) if c in e else "<td></td>"
                                     for c in columns) + "</tr>")
    more = ('<p class="note">The rest are in run.json.</p>' if len(entries) > MAX_TABLE_ROWS else "")
    return "<table>" + head + "".join(body) + "</table>" + more


def _sections_html(run: dict, head: bool) -> str:
    """The head sections (head=True) or all the others, each value in its own tagged cell."""
    keys = [k for k in run if k not in HIDDEN and k not in HEADER_KEYS and (k in HEAD_SECTIONS) == head]
    ordered = [k for k in SECTION_ORDER if k in keys] + sorted(k for k in keys if k not in SECTION_ORDER)
    loose = [k for k in ordered if not isinstance(run[k], (dict, list))]
    parts = []
    if loose:
        parts.append("<section><h2>Run</h2><table>" + "".join(
            f"<tr>{_name_cell(k)}{_value_cell([k], run[k])}</tr>" for k in loose) + "</table></section>")
    for k in ordered:
        v = run[k]
        if isinstance(v, dict) and v:
            table = _dict_table(k, v)
        elif isinstance(v, list) and v and all(isinstance(e, dict) for e in v):
            table = _list_table([k], v)
        elif isinstance(v, list):
            table = f"<table><tr>{_name_cell(k)}{_value_cell([k], v)}</tr></table>"
        else:
            continue
        parts.append(f"<section><h2>{html.escape(SECTION_TITLES.get(k, k))}</h2>{table}</section>")
    return "\n".join(parts)


def _figure_html(fig: Figure) -> str:
    data = base64.b64encode(fig.path.read_bytes()).decode()
    return (f'<figure id="{fig.name}"><h2>{html.escape(fig.title)}</h2>'
            f'<img src="data:image/png;base64,{data}" alt="{html.escape(fig.title)}" '
            f'data-file="{rundir.FIGURES}/{fig.path.name}">'
            f"<figcaption>{html.escape(fig.caption)}</figcaption></figure>")


STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1080px;color:#222}
h1{font-size:1.5em} h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.4em 0} th,td{padding:.2em .8em;border-bottom:1px solid #eee;text-align:left}
td.v{font-variant-numeric:tabular-nums} th.k{font-weight:500;color:#555}
figure{margin:1em 0} img{max-width:100%;border:1px solid #ddd} figcaption,.note{color:#666;font-size:.9em}
"""


def render_html(run: dict, figs: list[Figure]) -> str:
    header = " ".join(_value_cell([k], run[k], "span") for k in HEADER_KEYS if k in run)
    return ("<!DOCTYPE html><html><head><meta charset=\"utf-8\">"
            f"<title>protoedge report: {html.escape(str(run.get('name', 'run')))}</title>"
            f"<style>{STYLE}</style></head><body>"
            f"<h1>protoedge report</h1><p class=\"note\">{header}</p>"
            + _sections_html(run, head=True)
            + "\n".join(_figure_html(f) for f in figs)
            + _sections_html(run, head=False) + "</body></html>\n")


def complete_run(run_dir: Path, run: dict, stream: dict | None) -> dict:
    """Add the stream's numbers to run.json when its writer left them out, so the page still only
    prints what the JSON holds."""
    if stream is None or "clusters" in run:
        return run
    sections = stream_sections(stream["cluster"], stream.get("labels"), run.get("class_names"),
                               stream.get("latency_ms"))
    for key, value in sections.items():
        run.setdefault(key, value)
    rundir.write_run_json(run_dir, run)
    return run


def write_report(run_dir, progress: bool = True) -> Path:
    """Figures into RUN_DIR/figures/, the page into RUN_DIR/report.html; returns the page's path."""
    run_dir = Path(run_dir)
    run = rundir.read_run_json(run_dir)
    records = rundir.read_metrics(run_dir)
    stream = rundir.read_stream(run_dir)
    run = complete_run(run_dir, run, stream)
    figs = make_figures(run_dir, run, records, stream, progress)
    path = run_dir / rundir.REPORT
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render_html(run, figs))
    tmp.replace(path)
    return path
