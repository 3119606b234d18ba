"""bf16 matrix-vector products for decode steps (bf16_cpu.c), built by `cbuild.load_library`, called via ctypes.

PyTorch's bf16 matmul reads a [N, K] weight well below the memory's bandwidth at one to eight rows; this
kernel (vdpbf16ps with AVX-512 BF16; bf16 widened to float32 and fmadd with AVX2; float32 sums) streams it near the
memory's bandwidth. `fast()` is True where it was built with either; elsewhere callers keep torch. `gemv_ref` is the
same arithmetic in float64.
"""

from __future__ import annotations

import ctypes
import os

import torch

from hearth.kernels.cbuild import Library

SOURCE = os.path.join(os.path.dirname(__file__), "bf16_cpu.c")
MAX_M = 4  # rows of x up to which the kernel beats torch's matmul (docs/performance.md)


def _declare(lib: ctypes.CDLL) -> None:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.bf16_gemv.argtypes = [i64, i64, i64, ptr, ptr, ptr, ptr, ctypes.c_int]
    lib.bf16_gemv.restype = None
    lib.bf16_gemv_heads.argtypes = [i64, i64, i64, i64, ptr, ptr, ptr, ctypes.c_int]
    lib.bf16_gemv_heads.restype = None
    lib.bf16_gemv_fast.restype = ctypes.c_int


_get = Library(SOURCE, "bf16 matrix-vector products", _declare)


def fast() -> bool:
    """The kernel is built and uses AVX-512 BF16."""
    lib = _get()
    return lib is not None and bool(lib.bf16_gemv_fast())


def can_run(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """A bf16 Linear on CPU with at most MAX_M rows, where the fast kernel exists."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (x.dtype == weight.dtype == torch.bfloat16 and x.device.type == "cpu" and 0 < rows <= MAX_M
            and weight.dim() == 2 and weight.is_contiguous() and fast())  # fmt: skip


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] bf16 @ weight [N, K]^T (+ bias [N]) -> [M, N] bf16, summed in float32."""
    m, k = x.shape
    n = weight.shape[0]
    assert weight.shape == (n, k) and weight.dtype == x.dtype == torch.bfloat16 and weight.is_contiguous()
    x = x.contiguous()
    if bias is not None:
        bias = bias.to(torch.bfloat16).contiguous()
    out = torch.empty(m, n, dtype=torch.bfloat16)
    _get().bf16_gemv(m, n, k, x.data_ptr(), weight.data_ptr(), None if bias is None else bias.data_ptr(),
                     out.data_ptr(), torch.get_num_threads())  # fmt: skip
    return out


def gemv_heads(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """One product per head: x [H, M, K] bf16 @ weight [H, N, K]^T -> [H, M, N] bf16, summed in float32 (MLA's
    absorbed decode, where torch's batched matmul reads the heads' small matrices far below the memory's speed)."""
    h, m, k = x.shape
    n = weight.shape[1]
    assert weight.shape == (h, n, k) and weight.dtype == x.dtype == torch.bfloat16 and weight.is_contiguous()
    x = x.contiguous()
    out = torch.empty(h, m, n, dtype=torch.bfloat16)
    _get().bf16_gemv_heads(h, m, n, k, x.data_ptr(), weight.data_ptr(), out.data_ptr(), torch.get_num_threads())
    return out


def gemv_heads_ref(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The exact per-head products of the bf16 values in float64, not rounded."""
    return torch.bmm(x.double(), weight.double().transpose(1, 2))


def gemv_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The exact product of the bf16 values in float64 (+ bias), not rounded."""
    out = x.double() @ weight.double().t()
    return out if bias is None else out + bias.double()
