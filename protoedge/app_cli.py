"""`protoedge demo` and `protoedge report`: the whole pipeline end to end."""
import click


def register(main: click.Group, bench: click.Group) -> None:
    @main.command()
    def demo():
        """Train briefly, export, verify, and cluster never-seen alphabets; writes a report."""
        raise click.ClickException("demo: not implemented yet (issue 6)")

    @main.command()
    def report():
        """Write an HTML report with figures for a run directory."""
        raise click.ClickException("report: not implemented yet (issue 6)")
