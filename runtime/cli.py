"""`protoedge cluster`, `protoedge serve`, `protoedge bench runtime|daemon` (torch-free)."""
import click


def register(main: click.Group, bench: click.Group) -> None:
    @main.command()
    def cluster():
        """Cluster an image stream with a bundle; writes JSONL assignments."""
        raise click.ClickException("cluster: not implemented yet (issue 4)")

    @main.command()
    def serve():
        """Run the local clustering daemon."""
        raise click.ClickException("serve: not implemented yet (issue 5)")
