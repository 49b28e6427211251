"""Exceptions that carry a message meant for the user.

The ``cam-vllm`` command line prints a :class:`CamVllmError` as one clear message (no traceback) and
exits non-zero, so the message must say what went wrong and what to do about it.
"""


class CamVllmError(RuntimeError):
    """An error whose message tells the user what to do; the CLI prints it without a traceback."""
