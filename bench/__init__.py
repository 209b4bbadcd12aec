"""ovseg-bench: side-by-side benchmark of open-vocabulary semantic segmenters."""

__version__ = "0.1.0"


class BenchError(Exception):
    """An error the user can fix: its message is one line naming the file/value and the fix.

    Raised anywhere in the package, caught once at the entry point (printed, non-zero exit), and written
    into a status=error record by the cell runner so a sweep goes on.
    """
