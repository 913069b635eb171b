"""Runtime: pixels in, assignments out. Joins a verified bundle, an inference backend and a
StreamClusterer, and keeps the clusterer's state in a folder when asked to."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .backends import open_encoder
from .clustering import Assignment, StreamClusterer, model_identity, one_blas_thread
from .errors import StateError

log = logging.getLogger(__name__)


class Runtime:
    """``Runtime(bundle, backend="auto", state_dir=None, **clusterer_params)``.

    With ``state_dir`` the newest saved state is loaded if there is one (it must come from the same
    model) and ``save()`` writes a new generation. Clusterer parameters given here override the
    saved ones (None means "keep").
    """

    # Smaller batches are embedded, then clustered: with 2-4 pieces there is little to overlap,
    # and the undo copy plus one partial_fit per piece cost more (batch 8 on 2 cores: 0.52x bare
    # overlapped vs 0.56x; batch 32: 190 vs 205 us/image, batch 64: 168 vs 183, measured).
    overlap_min = 32

    def __init__(self, bundle, backend: str = "auto", precision: str = "fp32", threads: int | None = None,
                 state_dir=None, cache_dir=None, keep: int = 3, **clusterer_params):
        if isinstance(bundle, (str, Path)):
            from .bundle import load_bundle

            bundle = load_bundle(bundle)
        self.bundle = bundle
        self.keep = keep
        self.state_dir = Path(state_dir) if state_dir else None
        params = {k: v for k, v in clusterer_params.items() if v is not None}
        self.clusterer = self._load_or_create(params)
        self.encoder = open_encoder(bundle, backend=backend, precision=precision, threads=threads,
                                    cache_dir=cache_dir)

    def _load_or_create(self, params: dict) -> StreamClusterer:
        from .state import generations

        if self.state_dir is None or not generations(self.state_dir):
            return StreamClusterer.from_bundle(self.bundle, **params)
        clusterer = StreamClusterer.load(self.state_dir, **params)
        expected = model_identity(self.bundle)
        if clusterer.model != expected:
            raise StateError(f"{self.state_dir}: state was learned with model {clusterer.model}, but the "
                             f"bundle is {expected}; embeddings differ, so use a fresh state folder")
        log.info("resumed state generation %d from %s: %d clusters, %d samples seen",
                 clusterer.generation, self.state_dir, clusterer.n_clusters, clusterer.n_seen)
        return clusterer

    @property
    def backend(self) -> str:
        return self.encoder.backend

    @property
    def providers(self) -> list[str]:
        return self.encoder.providers

    def validate(self, pixels) -> np.ndarray:
        """uint8 [N, C, H, W] for this bundle, or InputError."""
        return self.encoder.validate(pixels)

    def embed(self, pixels) -> np.ndarray:
        return self.encoder.embed(pixels)

    def cluster(self, pixels) -> list[Assignment]:
        """Assign and learn (the stream path): the same as ``clusterer.partial_fit(embed(pixels))``,
        but on the CPU backend each piece of a batch of ``overlap_min`` or more images is clustered
        as soon as it is embedded, while the pool embeds the later pieces (clustering takes about a
        sixth of the CPU time of a batch; overlapped, it fills the gaps between the pieces rather
        than following the whole batch: batch 64 at 0.81x bare ONNX Runtime against 0.71x in turn).
        Pixels are checked before anything is embedded, and a piece that fails later undoes the
        pieces learned before it."""
        x = self.encoder.validate(pixels)
        splits = getattr(self.encoder, "splits", None)  # TensorRT, GPUs, one thread: no pool to overlap
        if splits is None or len(x) < self.overlap_min or not splits(len(x)):
            return self.clusterer.partial_fit(self.encoder.embed_valid(x))
        out = []
        with self.clusterer.atomic(), one_blas_thread():  # once, not for every piece
            self.encoder.embed_each(x, lambda e: out.extend(self.clusterer.partial_fit(e)))
        return out

    def assign(self, pixels) -> list[Assignment]:
        """Assign only; the state is unchanged."""
        return self.clusterer.predict(self.embed(pixels))

    def add_examples(self, pixels, labels) -> dict[str, int]:
        """Labelled examples become (or refine) known-class prototypes."""
        x = self.embed(pixels)
        return self.clusterer.learn_examples(x, labels)

    def save(self):
        if self.state_dir is None:
            raise StateError("this Runtime has no state_dir to save to")
        return self.clusterer.save(self.state_dir, keep=self.keep)

    def describe(self) -> dict:
        return {"encoder": self.encoder.describe(), "clusterer": self.clusterer.get_params(),
                "clusterer_loop": "c" if self.clusterer.compiled else "numpy",
                "clusters": self.clusterer.n_clusters, "seen": self.clusterer.n_seen,
                "model": model_identity(self.bundle)}
