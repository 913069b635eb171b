"""Runtime: pixels in, assignments out. Joins a verified bundle, an inference backend and a
StreamClusterer, and keeps the clusterer's state in a folder when asked to."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .backends import open_encoder
from .clustering import Assignment, StreamClusterer, model_identity
from .errors import StateError

log = logging.getLogger(__name__)


class Runtime:
    """``Runtime(bundle, backend="auto", state_dir=None, **clusterer_params)``.

    With ``state_dir`` the newest saved state is loaded if there is one (it must come from the same
    model) and ``save()`` writes a new generation. Clusterer parameters given here override the
    saved ones (None means "keep").
    """

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
        """Assign and learn (the stream path): ``clusterer.partial_fit(embed(pixels))``. The whole
        batch is embedded before anything is learned, so a batch that fails (bad pixels, an
        encoder error, NaN embeddings) leaves the state as it was.

        Clustering each piece of a split batch while the pool embedded the later ones was tried
        (sessions 5-11) and dropped: once the clusterer got fast, the extra pieces, calls and undo
        copy cost more than the overlap saved (batch 64 on 2 cores, paired against bare ONNX
        Runtime in one run: 0.81-0.83x overlapped against 0.85-0.86x in turn, 100 rounds)."""
        return self.clusterer.partial_fit(self.encoder.embed(pixels))

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
