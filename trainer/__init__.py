"""Unsupervised meta-learning of the encoder (PyTorch). Import submodules explicitly."""
