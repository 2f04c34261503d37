"""A request to stop (Ctrl-C), kept as a flag as well as raised as an exception.

Python raises KeyboardInterrupt in whatever the main thread is running when the signal's handler
gets its turn. When that is a finalizer or a callback made from compiled code, the exception is
printed and dropped, and a run would go on to its end. The command line therefore also sets
:data:`requested` (from a thread that sees the signal at once), and the training loop calls
:func:`raise_if_requested` between its compiled pieces.
"""

import threading

requested = threading.Event()


def raise_if_requested() -> None:
    """Raise KeyboardInterrupt if a stop was requested."""
    if requested.is_set():
        raise KeyboardInterrupt
