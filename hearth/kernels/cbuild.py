"""Build a kernel's C source once with the system C compiler into a per-machine cache and load it with ctypes.

The libraries are tuned with -march=native, so the cache key covers the source, the flags and the CPU's flags. A
missing compiler or a failed build returns None: callers then use their plain-torch path. `HEARTH_C_KERNELS=0`
turns every C kernel off.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)

FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]


def _cpu_key() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "hearth", "kernels")


def load_library(source: str, what: str) -> ctypes.CDLL | None:
    """Compile `source` (a .c path) unless cached, then load it; None (with a warning) when that cannot be done."""
    if os.environ.get("HEARTH_C_KERNELS", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.warning("no C compiler found: %s use the slower torch path", what)
        return None
    with open(source, "rb") as f:
        text = f.read()
    folder = os.path.dirname(os.path.abspath(source))
    for header in sorted(n for n in os.listdir(folder) if n.endswith(".h")):  # what the source may #include
        with open(os.path.join(folder, header), "rb") as f:
            text += f.read()
    key = hashlib.sha256(text + " ".join(FLAGS).encode() + _cpu_key().encode()).hexdigest()[:16]
    name = os.path.splitext(os.path.basename(source))[0]
    path = os.path.join(cache_dir(), f"{name}-{key}.so")
    if not os.path.isfile(path):
        os.makedirs(cache_dir(), exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache_dir())
        os.close(fd)
        try:
            subprocess.run([compiler, *FLAGS, source, "-o", tmp, "-lm"], check=True, capture_output=True, timeout=120)
            os.replace(tmp, path)
        except (OSError, subprocess.SubprocessError) as e:
            detail = getattr(e, "stderr", b"") or b""
            logger.warning("building %s failed (%s): using the torch path", name, detail.decode()[-300:] or e)
            if os.path.exists(tmp):
                os.unlink(tmp)
            return None
    try:
        return ctypes.CDLL(path)
    except OSError as e:
        logger.warning("loading %s failed (%s): using the torch path", path, e)
        return None


class Library:
    """A kernel library built and loaded on its first call: `lib()` returns the CDLL, with the argument types
    `declare(cdll)` set, or None (no compiler, a failed build, HEARTH_C_KERNELS=0 or the `disable_env` variable = 0)."""

    def __init__(self, source: str, what: str, declare: Callable[[ctypes.CDLL], None], disable_env: str | None = None):
        self.source, self.what, self.declare, self.disable_env = source, what, declare, disable_env
        self._lib: ctypes.CDLL | None = None
        self._tried = False
        self._lock = threading.Lock()

    def __call__(self) -> ctypes.CDLL | None:
        if not self._tried:
            with self._lock:  # a second caller waits for the build instead of seeing None
                if not self._tried:
                    if self.disable_env is None or os.environ.get(self.disable_env, "1") != "0":
                        lib = load_library(self.source, self.what)
                        if lib is not None:
                            self.declare(lib)
                        self._lib = lib
                    self._tried = True
        return self._lib
