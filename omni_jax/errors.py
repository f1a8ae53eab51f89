"""The error types a user can cause.

Every error that bad input, a bad path or a bad checkpoint can cause is an
:class:`OmniError` (a ``ValueError``) with a message that names the file, tensor,
argument or limit involved. The CLI prints ``error: <message>`` and exits with 2.
"""


class OmniError(ValueError):
    """Base class of every error a user can cause."""


class CheckpointError(OmniError):
    """A checkpoint directory, file or tensor is missing, corrupt or inconsistent."""


class InputError(OmniError):
    """An argument, prompt or media input is invalid or beyond a limit."""
