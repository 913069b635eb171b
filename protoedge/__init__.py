"""protoedge: meta-learn an image encoder without labels, export it, adapt and cluster on the edge.

Layers (dependencies point one way): protoedge.trainer -> protoedge.export -> protoedge.runtime.
The runtime never imports torch.
"""
__version__ = "0.1.0"
