"""The one exception type users see: a clear, one-line message naming the problem and the fix."""

from __future__ import annotations


class OvssError(Exception):
    """A user-facing error (bad input, missing weights, wrong dataset layout).

    The CLI prints ``str(error)`` on one line and exits with status 2, without a traceback.
    Library callers can catch it to distinguish bad input from programming errors.
    """
