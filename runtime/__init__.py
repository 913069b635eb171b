"""The torch-free device runtime: bundles, backends, prototypes, streaming clustering, daemon."""
