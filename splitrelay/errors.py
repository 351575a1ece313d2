"""The one exception base of the project.

Every error the library raises on purpose derives from ``SplitrelayError`` and
carries a one-line reason, so the CLI can print ``str(exc)`` and exit with one
code, and a caller can catch the whole library with one ``except``.
"""


class SplitrelayError(Exception):
    """A failure with a one-line reason meant for a person (no traceback needed)."""
