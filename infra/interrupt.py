"""Ctrl-C that always stops a run at the next round.

Python raises KeyboardInterrupt wherever the main thread is when the signal arrives; raised inside
a finalizer (a `__del__`, a weakref callback) or after a Prefect flow run's code has finished
(Prefect then logs it at debug level and goes on), it is lost, and a run went on to its last round
after Ctrl-C. `install` keeps the usual KeyboardInterrupt and also remembers the request;
`stop_if_requested`, called between rounds, raises it again where nothing can swallow it.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

_requested = threading.Event()


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    _requested.set()
    raise KeyboardInterrupt


def install() -> None:
    """Handle SIGINT as above, from now on in this process (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is threading.main_thread():
        _requested.clear()
        signal.signal(signal.SIGINT, _on_sigint)


def stop_if_requested() -> None:
    """Raise KeyboardInterrupt if Ctrl-C was pressed since `install`.

    Raises:
        KeyboardInterrupt: it was.
    """
    if _requested.is_set():
        raise KeyboardInterrupt("Ctrl-C (raised again at a round boundary)")
