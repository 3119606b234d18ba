"""One logging format for library, server and CLI. Called once by cli/ or api/, never at import time."""

from __future__ import annotations

import logging
import os
import sys


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of the record (it may be replaced after setup)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(level: str | None = None) -> None:
    level = level or os.environ.get("HEARTH_LOG_LEVEL", "INFO")
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger("hearth")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
