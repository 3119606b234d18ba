"""The fused Llama-family decode step (llama_decode.c): a whole forward for sequences decoding one token each, in one
C call over R16 weights (gguf_cpu.R16Weight) and the paged bf16 KV cache.

Hand-written because a small model's CPU decode step is mostly per-op overhead: here the whole step is one OpenMP
parallel region instead of a dispatch and a thread fork per op. Its plain-torch reference is the model's own forward
on the same weights, which tests/test_gguf_kernels.py compares it with on SmolLM2. `available()` is False without
a C compiler; the engine then decodes through the model.
"""

from __future__ import annotations

import ctypes
import os

import torch

from hearth.kernels.cbuild import Library
from hearth.kernels.gguf_cpu import R16, R16Weight

SOURCE = os.path.join(os.path.dirname(__file__), "llama_decode.c")
MAX_GROUP = 16  # query heads per KV head (MAX_GROUP in paged_attention.h)
i64, ptr, c_int, c_float = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_float


class LayerWeights(ctypes.Structure):
    _fields_ = [
        ("input_norm", ptr), ("post_norm", ptr), ("qkv", R16), ("o", R16), ("gate_up", R16), ("down", R16),
        ("qkv_bias", ptr), ("k_cache", ptr), ("v_cache", ptr), ("window", i64),
    ]  # fmt: skip


class ModelWeights(ctypes.Structure):
    _fields_ = [
        ("num_layers", i64), ("hidden", i64), ("num_heads", i64), ("num_kv_heads", i64), ("head_dim", i64),
        ("intermediate", i64), ("eps", c_float), ("scale", c_float), ("layers", ctypes.POINTER(LayerWeights)),
        ("final_norm", ptr), ("cos", ptr), ("sin", ptr), ("lm_head", R16), ("vocab", i64),
    ]  # fmt: skip


def _declare(lib: ctypes.CDLL) -> None:
    lib.llama_decode_struct_sizes.argtypes = [ptr]
    lib.llama_decode.argtypes = [ctypes.POINTER(ModelWeights), i64, ptr, ptr, ptr, ptr, i64, i64, ptr, ptr, c_int]
    lib.llama_decode_ops.argtypes = lib.llama_decode.argtypes + [i64, i64, ptr]
    for name in ("llama_decode_struct_sizes", "llama_decode", "llama_decode_ops"):
        getattr(lib, name).restype = None


_get = Library(SOURCE, "the fused decode", _declare)


def available() -> bool:
    return _get() is not None


def struct_sizes() -> tuple[int, int, int]:
    """sizeof(R16), sizeof(LayerWeights), sizeof(ModelWeights) as the C compiler laid them out."""
    out = torch.zeros(3, dtype=torch.int64)
    _get().llama_decode_struct_sizes(out.data_ptr())
    return tuple(out.tolist())


def _addr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def decoder_supports(hidden: int, num_heads: int, num_kv_heads: int, head_dim: int, intermediate: int) -> bool:
    """Shapes the fused decode handles: int8 activation blocks need every matmul input a multiple of 32."""
    return (num_heads % num_kv_heads == 0 and num_heads // num_kv_heads <= MAX_GROUP and head_dim % 2 == 0
            and all(k % 32 == 0 for k in (hidden, num_heads * head_dim, intermediate)))  # fmt: skip


class LlamaDecoder:
    """The fused decode step over one model's weights (layers as dicts of tensors), as
    hearth.engine.fused_decode.build_fused_decode gathers them.

    Under tensor parallelism (`reduce` given) the weights are one rank's shard: the step runs as one call per
    attention or MLP block, whose partial output `reduce` sums over the ranks in place (float32) before it is added
    into the float32 hidden states, as the whole step adds it; `gather` turns this rank's logits (its vocabulary
    rows) into the whole logits (rank 0) or None.

    Holds references to every tensor whose address it passes to C, so they outlive the calls."""

    def __init__(self, *, layers: list[dict], final_norm: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 lm_head: R16Weight, hidden: int, num_heads: int, num_kv_heads: int,
                 head_dim: int, intermediate: int, eps: float, scale: float, vocab: int, embed,
                 reduce=None, gather=None):  # fmt: skip
        self._keep: list[torch.Tensor] = []
        self.embed = embed  # token ids [M] -> embeddings [M, hidden]
        self.reduce, self.gather = reduce, gather

        def f32(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            t = t.detach().float().contiguous()
            self._keep.append(t)
            return t

        arr = (LayerWeights * len(layers))()
        for i, lw in enumerate(layers):
            for name in ("qkv", "o", "gate_up", "down"):
                self._keep.append(lw[name])
                setattr(arr[i], name, lw[name].struct())
            for cache in (lw["k_cache"], lw["v_cache"]):
                assert cache.dtype == torch.bfloat16 and cache.is_contiguous()
            arr[i].input_norm = _addr(f32(lw["input_norm"]))
            arr[i].post_norm = _addr(f32(lw["post_norm"]))
            arr[i].qkv_bias = _addr(f32(lw.get("qkv_bias")))
            arr[i].k_cache, arr[i].v_cache = lw["k_cache"].data_ptr(), lw["v_cache"].data_ptr()
            arr[i].window = lw.get("window") or 0
        self._layers = arr
        self.vocab = vocab
        self._keep.append(lm_head)
        self.weights = ModelWeights(
            num_layers=len(layers), hidden=hidden, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
            intermediate=intermediate, eps=eps, scale=scale, layers=arr, final_norm=_addr(f32(final_norm)),
            cos=_addr(f32(cos)), sin=_addr(f32(sin)), lm_head=lm_head.struct(), vocab=vocab,
        )  # fmt: skip

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
        args = (ctypes.byref(self.weights), m, h.data_ptr(), positions.data_ptr(), slot_mapping.data_ptr(),
                block_tables.data_ptr(), block_tables.shape[1], block_size, context_lens.data_ptr(), logits.data_ptr(),
                torch.get_num_threads())  # fmt: skip
        if self.reduce is None:
            _get().llama_decode(*args)
            return logits
        part = torch.empty_like(h)
        ops = 2 * self.weights.num_layers
        for op in range(ops):
            _get().llama_decode_ops(*args, op, op + 1, part.data_ptr())
            h.add_(self.reduce(part))
        _get().llama_decode_ops(*args, ops, ops + 1, None)
        return self.gather(logits)
