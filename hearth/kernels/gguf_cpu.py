"""CPU kernels on GGUF blocks (gguf_cpu.c): matmuls straight from Q4_0 / Q4_1 / Q8_0 rows, and a fused Llama decode.

Weights are the file's own blocks ([N, K/32 * block bytes] uint8), so memory holds exactly what the GGUF holds. As in
llama.cpp, activations are quantized per 32 values to int8 for integer dot products; `gemm_ref` is that computation
in plain torch (quantize x the same way, dequantize W, float64 matmul), and `quantize_q8_ref` the activation step.
Other GGUF types are requantized once to Q8_0 blocks (`quantize_q8_0`). `available()` is False without a C compiler;
callers then use PyTorch's int4 / int8 kernels.
"""

from __future__ import annotations

import ctypes
import os

import torch

from hearth.kernels.cbuild import load_library
from hearth.quant.gguf_types import dequantize

SOURCE = os.path.join(os.path.dirname(__file__), "gguf_cpu.c")
Q4_0, Q4_1, Q8_0 = 2, 3, 8  # GGML type ids
BLOCK_BYTES = {Q4_0: 18, Q4_1: 20, Q8_0: 34}
i64, ptr, c_int, c_float = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_float


class LayerWeights(ctypes.Structure):
    _fields_ = [
        ("input_norm", ptr), ("post_norm", ptr),
        ("qkv", ptr), ("o", ptr), ("gate_up", ptr), ("down", ptr),
        ("qkv_type", c_int), ("o_type", c_int), ("gate_up_type", c_int), ("down_type", c_int),
        ("qkv_bias", ptr), ("k_cache", ptr), ("v_cache", ptr), ("window", i64),
    ]  # fmt: skip


class ModelWeights(ctypes.Structure):
    _fields_ = [
        ("num_layers", i64), ("hidden", i64), ("num_heads", i64), ("num_kv_heads", i64), ("head_dim", i64),
        ("intermediate", i64), ("eps", c_float), ("scale", c_float), ("layers", ctypes.POINTER(LayerWeights)),
        ("final_norm", ptr), ("cos", ptr), ("sin", ptr), ("lm_head", ptr), ("lm_head_type", c_int), ("vocab", i64),
    ]  # fmt: skip


_lib: ctypes.CDLL | None = None
_tried = False


def _get() -> ctypes.CDLL | None:
    global _lib, _tried
    if not _tried:
        _tried = True
        lib = load_library(SOURCE, "GGUF matmuls")
        if lib is not None:
            lib.gguf_gemm.argtypes = [i64, i64, i64, c_int, ptr, ptr, ptr, c_int, c_int]
            lib.gguf_dequant.argtypes = [i64, i64, c_int, ptr, ptr, c_int, c_int]
            lib.gguf_gemm_f32.argtypes = [i64, i64, i64, c_int, ptr, ptr, ptr, c_int]
            lib.gguf_quantize_q8.argtypes = [i64, i64, ptr, ptr, ptr, ptr]
            lib.llama_decode.argtypes = [ctypes.POINTER(ModelWeights), i64, ptr, ptr, ptr, ptr, i64, i64, ptr, ptr, c_int]
            for f in (lib.gguf_gemm, lib.gguf_gemm_f32, lib.gguf_dequant, lib.gguf_quantize_q8, lib.llama_decode):
                f.restype = None
        _lib = lib
    return _lib


def available() -> bool:
    return _get() is not None


def supports(qtype: int, k: int) -> bool:
    return qtype in BLOCK_BYTES and k % 32 == 0


def _check(blocks: torch.Tensor, qtype: int, n: int, k: int) -> None:
    if not supports(qtype, k):
        raise ValueError(f"GGUF kernel: unsupported type {qtype} or K={k}")
    if blocks.dtype != torch.uint8 or not blocks.is_contiguous() or blocks.numel() != n * k // 32 * BLOCK_BYTES[qtype]:
        raise ValueError(f"GGUF kernel: blocks must be contiguous uint8 holding {n}x{k} values of type {qtype}")


def gemm(x: torch.Tensor, blocks: torch.Tensor, qtype: int, n: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] -> x W^T [M, N] float32 (added into `out` when given). blocks: W's GGUF rows."""
    lib = _get()
    m, k = x.shape
    _check(blocks, qtype, n, k)
    x = x.float().contiguous()
    accumulate = out is not None
    if out is None:
        out = torch.empty(m, n, dtype=torch.float32)
    assert out.dtype == torch.float32 and out.is_contiguous() and out.shape == (m, n)
    lib.gguf_gemm(m, n, k, qtype, blocks.data_ptr(), x.data_ptr(), out.data_ptr(), int(accumulate),
                  torch.get_num_threads())  # fmt: skip
    return out


F32_MAX_M = 16  # rows per gemm_f32 call (F32_MAX_M in the C source)


def gemm_f32(x: torch.Tensor, blocks: torch.Tensor, qtype: int, n: int) -> torch.Tensor:
    """x [M <= 16, K] -> x W^T [M, N] float32 with float activations and W dequantized then rounded to bf16, products
    summed in float32: the dense bf16 path's arithmetic (give it bf16-valued x), in another order. For a few rows
    where results should match the dense path's, e.g. a prompt's last tokens after a prefix-cache hit."""
    lib = _get()
    m, k = x.shape
    _check(blocks, qtype, n, k)
    if m > F32_MAX_M:
        raise ValueError(f"gemm_f32 takes at most {F32_MAX_M} rows, got {m}")
    x = x.float().contiguous()
    out = torch.empty(m, n, dtype=torch.float32)
    lib.gguf_gemm_f32(m, n, k, qtype, blocks.data_ptr(), x.data_ptr(), out.data_ptr(), torch.get_num_threads())
    return out


def gemm_f32_ref(x: torch.Tensor, blocks: torch.Tensor, qtype: int, n: int) -> torch.Tensor:
    w = dequantize(blocks.reshape(-1), qtype, (n, x.shape[1])).bfloat16()
    return (x.double() @ w.double().t()).float()


def dequant(blocks: torch.Tensor, qtype: int, n: int, k: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """W's GGUF rows -> [N, K] in bfloat16 or float32 (each value computed in float32, then rounded once)."""
    lib = _get()
    _check(blocks, qtype, n, k)
    assert dtype in (torch.bfloat16, torch.float32)
    out = torch.empty(n, k, dtype=dtype)
    lib.gguf_dequant(n, k, qtype, blocks.data_ptr(), out.data_ptr(), int(dtype == torch.bfloat16),
                     torch.get_num_threads())  # fmt: skip
    return out


def quantize_q8_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' activation step in torch: x [M, K] -> (int values [M, K/32, 32], scales [M, K/32, 1])."""
    xb = x.float().reshape(x.shape[0], -1, 32)
    d = xb.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    return torch.round(xb * inv), d


def gemm_ref(x: torch.Tensor, blocks: torch.Tensor, qtype: int, n: int) -> torch.Tensor:
    """What `gemm` computes, in plain torch: int8-quantized x times the dequantized W, summed in float64."""
    k = x.shape[1]
    q, d = quantize_q8_ref(x)
    xr = (q.double() * d.double()).reshape(x.shape[0], k)
    w = dequantize(blocks.reshape(-1), qtype, (n, k)).double()
    return (xr @ w.t()).float()


def quantize_q8_0(rows, num_rows: int, k: int, chunk: int = 4096) -> torch.Tensor:
    """float rows -> Q8_0 blocks [num_rows, K/32*34] (d = amax/127 in f16, q = round(x/d)), as llama.cpp writes them.

    `rows(a, b)` returns rows a..b as float (e.g. dequantizing another GGUF type), so a large table is converted a
    chunk at a time."""
    out = torch.empty(num_rows, k // 32, 34, dtype=torch.uint8)
    for a in range(0, num_rows, chunk):
        b = min(a + chunk, num_rows)
        xb = rows(a, b).float().reshape(b - a, k // 32, 32)
        d = xb.abs().amax(-1, keepdim=True) / 127
        inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
        out[a:b, :, :2] = d.half().view(torch.uint8).reshape(b - a, k // 32, 2)
        out[a:b, :, 2:] = torch.round(xb * inv).clamp(-127, 127).to(torch.int8).view(torch.uint8)
    return out.reshape(num_rows, -1)


def _addr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


MAX_GROUP = 16  # query heads per KV head (MAX_GROUP in the C source)


def decoder_supports(hidden: int, num_heads: int, num_kv_heads: int, head_dim: int, intermediate: int) -> bool:
    """Shapes the fused decode handles: int8 activation blocks need every matmul input a multiple of 32."""
    return (num_heads % num_kv_heads == 0 and num_heads // num_kv_heads <= MAX_GROUP and head_dim % 2 == 0
            and all(k % 32 == 0 for k in (hidden, num_heads * head_dim, intermediate)))  # fmt: skip


class LlamaDecoder:
    """The fused decode step over one model's weights (layers given as dicts of tensors, see `from_layers`).

    Holds references to every tensor whose address it passes to C, so they outlive the calls."""

    def __init__(self, *, layers: list[dict], final_norm: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 lm_head: tuple[torch.Tensor, int] | None, hidden: int, num_heads: int, num_kv_heads: int,
                 head_dim: int, intermediate: int, eps: float, scale: float, vocab: int, embed):  # fmt: skip
        self._keep: list[torch.Tensor] = []
        self.embed = embed  # token ids [M] -> embeddings [M, hidden]

        def f32(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            t = t.detach().float().contiguous()
            self._keep.append(t)
            return t

        arr = (LayerWeights * len(layers))()
        for i, lw in enumerate(layers):
            for name in ("qkv", "o", "gate_up", "down"):
                blocks, qtype = lw[name]
                self._keep.append(blocks)
                setattr(arr[i], name, blocks.data_ptr())
                setattr(arr[i], name + "_type", qtype)
            for cache in (lw["k_cache"], lw["v_cache"]):
                assert cache.dtype == torch.bfloat16 and cache.is_contiguous()
            arr[i].input_norm = _addr(f32(lw["input_norm"]))
            arr[i].post_norm = _addr(f32(lw["post_norm"]))
            arr[i].qkv_bias = _addr(f32(lw.get("qkv_bias")))
            arr[i].k_cache, arr[i].v_cache = lw["k_cache"].data_ptr(), lw["v_cache"].data_ptr()
            arr[i].window = lw.get("window") or 0
        self._layers = arr
        self.hidden, self.vocab = hidden, vocab
        self.weights = ModelWeights(
            num_layers=len(layers), hidden=hidden, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
            intermediate=intermediate, eps=eps, scale=scale, layers=arr, final_norm=_addr(f32(final_norm)),
            cos=_addr(f32(cos)), sin=_addr(f32(sin)), vocab=vocab,
        )  # fmt: skip
        if lm_head is not None:
            self._keep.append(lm_head[0])
            self.weights.lm_head, self.weights.lm_head_type = lm_head[0].data_ptr(), lm_head[1]

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                 block_tables: torch.Tensor, block_size: int, context_lens: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """The new tokens [M] of M sequences decoding one token each -> logits [M, vocab] float32. Row m's token sits
        at positions[m], goes to cache slot slot_mapping[m], and attends to its context_lens[m] cached tokens
        through block_tables[m]."""
        m = input_ids.shape[0]
        h = self.embed(input_ids).float().contiguous()
        logits = torch.empty(m, self.vocab, dtype=torch.float32)
        positions, slot_mapping, context_lens = (
            t.to(torch.int64).contiguous() for t in (positions, slot_mapping, context_lens)
        )
        block_tables = block_tables.to(torch.int64).contiguous()
        _get().llama_decode(ctypes.byref(self.weights), m, h.data_ptr(), positions.data_ptr(), slot_mapping.data_ptr(),
                            block_tables.data_ptr(), block_tables.shape[1], block_size, context_lens.data_ptr(),
                            logits.data_ptr(), torch.get_num_threads())  # fmt: skip
        return logits
