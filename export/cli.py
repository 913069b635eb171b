"""`protoedge export`, `protoedge info`."""
import click


def register(main: click.Group, bench: click.Group) -> None:
    @main.command()
    def export():
        """Compile a checkpoint to ONNX (FP32/FP16/INT8) in a verifiable bundle."""
        raise click.ClickException("export: not implemented yet (issue 3)")

    @main.command()
    def info():
        """Verify a bundle and print its manifest."""
        raise click.ClickException("info: not implemented yet (issue 3)")
