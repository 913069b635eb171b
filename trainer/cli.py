"""`protoedge train`, `protoedge eval`, `protoedge bench fewshot` (torch imported lazily)."""
import click


def register(main: click.Group, bench: click.Group) -> None:
    @main.command()
    def train():
        """Meta-learn the encoder without labels (autoencoder, then ProtoNet on pseudo-tasks)."""
        raise click.ClickException("train: not implemented yet (issue 2)")

    @main.command(name="eval")
    def eval_():
        """Few-shot accuracy and clustering of novel classes for a checkpoint."""
        raise click.ClickException("eval: not implemented yet (issue 2)")
