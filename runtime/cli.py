"""`protoedge cluster`, `protoedge serve`, `protoedge bench runtime|daemon` (torch-free)."""
import click


def register(main: click.Group, bench: click.Group) -> None:
    @main.command()
    def cluster():
        """Cluster an image stream with a bundle; writes JSONL assignments."""
        raise click.ClickException("cluster: not implemented yet (issue 4)")

    from . import serve_cli  # `serve` and `bench daemon` live with the daemon (issue 5)

    serve_cli.register(main, bench)
