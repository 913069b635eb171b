"""`protoedge state export|import|merge|show`: move cluster state between devices and merge a fleet's.
Only click is imported here; the commands import runtime/fleet.py when they run."""
import json
from pathlib import Path

import click


def register(main: click.Group, bench: click.Group) -> None:
    @main.group()
    def state():
        """Move cluster state between devices and merge the states of a fleet.

        \b
        On each device:       protoedge state export STATE_DIR device1.npz
        On the workstation:   protoedge state merge merged/ device1.npz device2.npz ...
                              protoedge state export merged/ fleet.npz
        Back on each device:  protoedge state import fleet.npz STATE_DIR
        """

    @state.command(name="export")
    @click.argument("state_dir", type=click.Path(path_type=Path))
    @click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
    def export_cmd(state_dir, out):
        """Write the newest verified state in STATE_DIR to the single file OUT (.npz, no pickle)."""
        from .fleet import export_state

        with _user_errors():
            st = export_state(state_dir, out)
        _notes(st)
        s = st.summary()
        click.echo(f"exported generation {st.generation} of {state_dir}: {s['clusters']} clusters "
                   f"({len(s['labelled'])} labelled) -> {out}")

    @state.command(name="import")
    @click.argument("file", type=click.Path(path_type=Path))
    @click.argument("state_dir", type=click.Path(file_okay=False, path_type=Path))
    @click.option("--keep", type=click.IntRange(1), default=3, show_default=True,
                  help="State generations to keep (older ones are the fallback).")
    @click.option("--force", is_flag=True, help="Import even if STATE_DIR holds a state of another model.")
    def import_cmd(file, state_dir, keep, force):
        """Make the state in FILE (an exported file or a state folder) the newest generation of STATE_DIR."""
        from .fleet import import_state

        with _user_errors():
            path, st = import_state(file, state_dir, keep=keep, force=force)
        _notes(st)
        click.echo(f"imported {st.summary()['clusters']} clusters from {file} -> {path}")

    @state.command(name="merge")
    @click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
    @click.argument("sources", nargs=-1, required=True, type=click.Path(path_type=Path))
    @click.option("--match-threshold", type=click.FloatRange(min=0), default=None,
                  help="Largest prototype distance at which clusters of different devices are joined "
                       "[default: the clusterer's merge_threshold of the first state].")
    @click.option("--max-clusters", type=click.IntRange(1), default=None,
                  help="Cluster cap of the merged state [default: the first state's].")
    @click.option("--keep", type=click.IntRange(1), default=3, show_default=True)
    @click.option("--force", is_flag=True, help="Write even if OUT_DIR holds a state of another model.")
    @click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
                  help="Also write the merge report (incl. old id -> new id per source) as JSON.")
    def merge_cmd(out_dir, sources, match_threshold, max_clusters, keep, force, report_path):
        """Merge the states in SOURCES (state folders or exported files) into a new state in OUT_DIR.

        Clusters are matched across devices by prototype distance (one-to-one, closest first);
        matched clusters become their count-weighted mean; same labels are always joined, different
        labels never. All sources must come from the same model.
        """
        from .fleet import merge_into
        from .state import atomic_write

        with _user_errors():
            path, report, states = merge_into(out_dir, sources, match_threshold=match_threshold,
                                              max_clusters=max_clusters, keep=keep, force=force)
        for st in states:
            _notes(st)
        if report_path:
            atomic_write(report_path, json.dumps(report.to_dict(), indent=1).encode())
        click.echo(f"merged {len(sources)} states ({' + '.join(map(str, report.clusters_in))} clusters) -> "
                   f"{report.clusters_out} clusters: {report.matched} joined by distance "
                   f"(<= {report.match_threshold:.4g}), {report.joined_by_label} by label, "
                   f"{report.label_conflicts} kept apart by conflicting labels, {report.dropped} dropped "
                   f"for the cap; the repair over {report.repaired['samples']} remembered samples split "
                   f"{report.repaired['split']}, merged {report.repaired['merged']} -> {path}")

    @state.command(name="show")
    @click.argument("source", type=click.Path(path_type=Path))
    def show_cmd(source):
        """Print what a state folder or exported file holds (JSON)."""
        from .fleet import read_state

        with _user_errors():
            st = read_state(source)
        _notes(st)
        click.echo(json.dumps(st.summary(), indent=1))

    @bench.command(name="fleet")
    @click.option("--bundle", type=click.Path(path_type=Path), default=Path("models/omniglot/bundle"),
                  show_default=True)
    @click.option("--results", type=click.Path(file_okay=False, path_type=Path),
                  default=Path("benchmarks/results"), show_default=True)
    @click.option("--streams", type=click.IntRange(1), default=10, show_default=True,
                  help="Random 30-character streams per case.")
    def bench_fleet(bundle, results, streams):
        """Merging two devices' states: ACC of each device, the merged state and baselines."""
        from protoedge.bench_scripts import load_bench_script

        with _user_errors():
            md = load_bench_script("fleet").run(bundle=bundle, results=results, streams=streams)
        click.echo(Path(md).read_text())


class _user_errors:
    """StateError (and other user errors) become a one-line message and exit status 1."""

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        from .errors import InputError, StateError

        if value is not None and isinstance(value, (StateError, InputError, OSError)):
            raise click.ClickException(str(value)) from None
        return False


def _notes(st) -> None:
    for note in st.notes:
        click.echo(f"note: {st.source}: {note}", err=True)
