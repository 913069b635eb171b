"""Optional dependencies, imported only by the commands that need them."""
import click


def require_torch():
    try:
        import torch
    except ImportError:
        raise click.ClickException(
            "this command needs PyTorch, which the device install leaves out: "
            "pip install 'protoedge[train]'") from None
    return torch
