"""CPU MXFP4 kernels (mxfp4_cpu.c), built by `cbuild.load_library` and called via ctypes.

`available()` is False when no compiler is found or the build fails; callers then use the plain-torch path. Set
HEARTH_MXFP4_KERNEL=0 (or HEARTH_C_KERNELS=0) to disable.
"""

from __future__ import annotations

import ctypes
import os

import torch

from hearth.kernels.cbuild import load_library

SOURCE = os.path.join(os.path.dirname(__file__), "mxfp4_cpu.c")
MAX_M = 16  # rows of x per mxfp4_gemv call (MAX_M in the C source)

_lib: ctypes.CDLL | None = None
_tried = False


def _build() -> ctypes.CDLL | None:
    lib = load_library(SOURCE, "MXFP4 matmuls")
    if lib is None:
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.mxfp4_gemv.argtypes = [i64, i64, i64, ptr, ptr, ptr, ptr, ctypes.c_int]
    lib.mxfp4_gemv.restype = None
    lib.mxfp4_dequant.argtypes = [i64, i64, ptr, ptr, ptr, ctypes.c_int]
    lib.mxfp4_dequant.restype = None
    return lib


def _get() -> ctypes.CDLL | None:
    global _lib, _tried
    if not _tried:
        _tried = True
        if os.environ.get("HEARTH_MXFP4_KERNEL", "1") != "0":
            _lib = _build()
    return _lib


def available() -> bool:
    return _get() is not None


def _check(blocks: torch.Tensor, scales: torch.Tensor) -> None:
    assert blocks.device.type == "cpu" and blocks.dtype == torch.uint8 and blocks.is_contiguous()
    assert scales.dtype == torch.uint8 and scales.is_contiguous()


def gemv(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M ≤ 16, K] float → [M, N] float32; blocks [N, K/32, 16], scales [N, K/32] uint8, contiguous."""
    lib = _get()
    _check(blocks, scales)
    n, groups = scales.shape
    m = x.shape[0]
    assert m <= MAX_M and x.shape[1] == groups * 32
    # per group: [values 0, 2, .., 30 | 1, 3, .., 31], to meet the low / high nibbles of the 16 bytes
    xp = x.float().reshape(m, groups, 16, 2).transpose(-1, -2).contiguous()
    out = torch.empty(m, n, dtype=torch.float32)
    lib.mxfp4_gemv(m, n, groups, xp.data_ptr(), blocks.data_ptr(), scales.data_ptr(), out.data_ptr(),
                   torch.get_num_threads())  # fmt: skip
    return out


def dequant(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """blocks [N, G, 16], scales [N, G] → float32 [N, G*32] (exact)."""
    lib = _get()
    _check(blocks, scales)
    n, groups = scales.shape
    out = torch.empty(n, groups * 32, dtype=torch.float32)
    lib.mxfp4_dequant(n, groups, blocks.data_ptr(), scales.data_ptr(), out.data_ptr(), torch.get_num_threads())
    return out
