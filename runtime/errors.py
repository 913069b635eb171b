"""Errors a user can act on. All are ValueErrors so callers can catch bad input in one place;
BundleError lives with the bundle format in bundle.py."""


class InputError(ValueError):
    """Pixels or embeddings that cannot be used (shape, dtype, size, empty, NaN, unreadable)."""


class StateError(ValueError):
    """A state directory that cannot be read or does not fit the model."""


class BackendUnavailable(RuntimeError):
    """The requested inference backend cannot run on this machine."""
