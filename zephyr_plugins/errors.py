"""Exceptions raised by zephyr-plugins.

All of them subclass :class:`ValueError` so that callers that already guard
against bad input with ``except ValueError`` keep working.
"""


class ZephyrError(ValueError):
    """Base class of the package's errors."""


class CheckpointError(ZephyrError):
    """A checkpoint (folder, file, tensor or config) is missing, malformed or inconsistent."""


class KernelUnavailableError(ZephyrError):
    """No kernel backend can serve a layer; the message lists every backend's reason."""
