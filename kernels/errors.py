"""The one exception type for user mistakes.

It lives in `kernels` because every layer may raise it and `kernels` imports nothing of
the others; the CLI prints its message as one line and exits 2. Anything else is a bug.
"""


class FeatscopeError(Exception):
    """A user mistake (bad input, bad config, missing prerequisite), not a bug."""
