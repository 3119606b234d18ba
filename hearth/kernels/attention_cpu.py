"""Attention kernels on bf16 CPU tensors (attention_cpu.c), built by `cbuild.load_library`, called via ctypes.

PyTorch's CPU flash SDPA runs SmolLM2's 512-token causal prefill attention at about 67 GFLOP/s; this kernel (the same
arithmetic: float32 scores and online softmax, P rounded to bf16 for P·V, vdpbf16ps) shares each K/V load across the
query heads of a KV head. `can_run()` is False where it was not built with AVX-512 BF16; callers then keep SDPA.
`prefill_ref` is the attention in float64 with a materialised softmax.

`decode` attends one new query token per sequence over the paged bf16 KV cache through the block tables, without
gathering the keys (paged_attention.h, the fused decode step's attention): the decode rows of mixed prefill/decode
steps. It needs only a C compiler (AVX-512 where present); `decode_ref` is the same in float64 on gathered keys.

Both take optional per-head `sinks` (gpt-oss): one more logit per head in the softmax denominator with no value.

`mla_decode` is DeepSeek's multi-head latent attention for decode rows in the absorbed form, over the paged latent
cache [blocks, block_size, c + rope]: W_UK folded into each head's query, scores against the cached latents, softmax,
the latent mix, then W_UV, all heads and rows in one C call (the torch form is about ten ops and a cache gather per
layer). W_UK^T and W_UV are bf16, or the GGUF file's Q8_0 blocks read where they lie (half the bytes of a bf16 copy,
and no copy held). `mla_decode_ref` is the same in float64 on gathered latents.
"""

from __future__ import annotations

import ctypes
import os

import torch

from hearth.kernels.cbuild import Library

SOURCE = os.path.join(os.path.dirname(__file__), "attention_cpu.c")
MAX_GROUP = 16  # query heads per KV head the kernel handles


def _declare(lib: ctypes.CDLL) -> None:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.attn_prefill.argtypes = [i64, i64, i64, i64, i64, i64, i64, ctypes.c_float,
                                 ptr, i64, ptr, i64, ptr, i64, ptr, i64, ptr, ctypes.c_int]  # fmt: skip
    lib.attn_prefill.restype = ctypes.c_int
    lib.attn_prefill_fast.restype = ctypes.c_int
    lib.attn_decode.argtypes = [i64, i64, i64, i64, ptr, ptr, ptr, ptr, i64, i64, ptr, i64, ctypes.c_float, ptr,
                                ptr, ctypes.c_int]  # fmt: skip
    lib.attn_decode.restype = None
    lib.mla_decode.argtypes = [i64, i64, i64, i64, i64, i64, i64, ptr, i64, i64, ptr, i64, i64, ctypes.c_int, ptr, ptr,
                               ptr, ctypes.c_int, ptr, ptr, i64, i64, ptr, ctypes.c_float, ptr, i64, i64, ctypes.c_int,
                               ctypes.c_int]  # fmt: skip
    lib.mla_decode.restype = ctypes.c_int


_get = Library(SOURCE, "prefill attention", _declare)


def available() -> bool:
    """The library is built (a C compiler was found): `decode` and `mla_decode` run."""
    return _get() is not None


def fast() -> bool:
    """The kernel is built and uses AVX-512 BF16."""
    lib = _get()
    return lib is not None and bool(lib.attn_prefill_fast())


def _rows_ok(x: torch.Tensor) -> bool:  # [N, heads, D] with heads D apart and contiguous dims
    return x.dim() == 3 and x.stride(2) == 1 and x.stride(1) == x.shape[2]


def can_run(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> bool:
    """bf16 CPU q [n, H, D], keys/values [L, Hkv, D] with D 64 or 128, where the fast kernel exists."""
    return (q.device.type == "cpu" and q.dtype == keys.dtype == values.dtype == torch.bfloat16
            and q.dim() == keys.dim() == values.dim() == 3 and q.shape[-1] in (64, 128)
            and keys.shape == values.shape and keys.shape[-1] == q.shape[-1] and q.shape[1] % keys.shape[1] == 0
            and q.shape[1] // keys.shape[1] <= MAX_GROUP and fast())  # fmt: skip


def _sinks(sinks: torch.Tensor | None, num_heads: int) -> torch.Tensor | None:
    if sinks is None:
        return None
    if sinks.shape != (num_heads,):
        raise ValueError(f"sinks: expected shape {(num_heads,)}, got {tuple(sinks.shape)}")
    return sinks.float().contiguous()


def prefill(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float, window: int | None = None,
            out: torch.Tensor | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Causal attention of q [n, H, D] (the last n of L positions) over keys/values [L, Hkv, D] -> [n, H, D] bf16.

    Query i attends key j when j <= L - n + i and, with `window`, j > L - n + i - window. `out` ([n, H, D], heads
    D apart) receives the result in place when given. `sinks` [H]: a value-less logit per head in the denominator.
    """
    n, num_heads, d = q.shape
    length, num_kv_heads = keys.shape[0], keys.shape[1]
    sinks = _sinks(sinks, num_heads)
    q, keys, values = (x if _rows_ok(x) else x.contiguous() for x in (q, keys, values))
    if out is None or not _rows_ok(out):
        result = torch.empty(n, num_heads, d, dtype=torch.bfloat16)
    else:
        result = out
    ok = _get().attn_prefill(n, num_heads, num_kv_heads, d, length, length - n, window or 0, scale,
                             q.data_ptr(), q.stride(0), keys.data_ptr(), keys.stride(0), values.data_ptr(),
                             values.stride(0), result.data_ptr(), result.stride(0),
                             None if sinks is None else sinks.data_ptr(), torch.get_num_threads())  # fmt: skip
    if not ok:
        raise ValueError(f"attn_prefill cannot run q {tuple(q.shape)} over keys {tuple(keys.shape)}")
    if out is not None and result is not out:
        out.copy_(result)
    return result if out is None else out


def prefill_ref(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float, window: int | None = None,
                sinks: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """The same attention in float64 with the softmax materialised (and the sink column dropped after it):
    [n, H, D] float64."""
    n, num_heads, _ = q.shape
    length, num_kv_heads = keys.shape[0], keys.shape[1]
    group = num_heads // num_kv_heads
    k = keys.double().repeat_interleave(group, dim=1).transpose(0, 1)  # [H, L, D]
    v = values.double().repeat_interleave(group, dim=1).transpose(0, 1)
    scores = q.double().transpose(0, 1) @ k.transpose(1, 2) * scale  # [H, n, L]
    q_pos = torch.arange(length - n, length)[:, None]
    k_pos = torch.arange(length)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        sink = sinks.double().view(num_heads, 1, 1).expand(num_heads, n, 1)
        p = torch.cat([scores, sink], dim=-1).softmax(-1)[..., :-1]
    else:
        p = scores.softmax(-1)
    return (p @ v).transpose(0, 1)


def can_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """q [B, H, D] over CPU bf16 caches [blocks, block_size, Hkv, D] (contiguous), where the library is built."""
    return (q.device.type == "cpu" and q.dim() == 3 and k_cache.dtype == v_cache.dtype == torch.bfloat16
            and k_cache.dim() == 4 and k_cache.shape == v_cache.shape and k_cache.shape[-1] == q.shape[-1]
            and k_cache.is_contiguous() and v_cache.is_contiguous() and q.shape[1] % k_cache.shape[2] == 0
            and q.shape[1] // k_cache.shape[2] <= MAX_GROUP and _get() is not None)  # fmt: skip


def decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
           context_lens: torch.Tensor, scale: float, window: int | None = None,
           sinks: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Sequence b's query heads q[b] [H, D] attend the keys of positions [0, context_lens[b]) (the last `window` of
    them with a window), found through block_tables[b] in the caches [blocks, block_size, Hkv, D]. -> float32 [B, H, D]
    (scores, softmax and the weighted sum in float32). `sinks` [H]: a value-less logit per head in the denominator."""
    batch, num_heads, d = q.shape
    sinks = _sinks(sinks, num_heads)
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    qf = q.float().contiguous()
    tables = block_tables.to(torch.long).contiguous()
    lens = context_lens.to(torch.long).contiguous()
    if tables.shape[0] != batch or lens.shape != (batch,) or int(lens.max()) > tables.shape[1] * block_size:
        raise ValueError("attn_decode: each sequence needs a block table covering its context")
    out = torch.empty(batch, num_heads, d, dtype=torch.float32)
    _get().attn_decode(batch, num_heads, num_kv_heads, d, qf.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                       tables.data_ptr(), tables.shape[1], block_size, lens.data_ptr(), window or 0, scale,
                       None if sinks is None else sinks.data_ptr(), out.data_ptr(), torch.get_num_threads())  # fmt: skip
    return out


def decode_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
               context_lens: torch.Tensor, scale: float, window: int | None = None,
               sinks: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """`decode` in float64, one sequence at a time on its gathered keys: [B, H, D] float64."""
    block_size = k_cache.shape[1]
    outs = []
    for b in range(q.shape[0]):
        length = int(context_lens[b])
        first = max(0, length - window) if window else 0
        slots = (block_tables[b][:, None] * block_size + torch.arange(block_size)).flatten()[first:length]
        keys = k_cache.flatten(0, 1)[slots]
        values = v_cache.flatten(0, 1)[slots]
        outs.append(prefill_ref(q[b][None], keys, values, scale, sinks=sinks)[0])
    return torch.stack(outs)


Q8_0_BLOCK = 34  # bytes of a GGUF Q8_0 block: an f16 scale, 32 int8 codes


def q8_0_cols(w: torch.Tensor) -> int:
    """Values per row of W_UK^T / W_UV: its last dim, or for Q8_0 blocks (uint8) 32 per 34 bytes."""
    return w.shape[-1] // Q8_0_BLOCK * 32 if w.dtype == torch.uint8 else w.shape[-1]


def can_mla_decode(cache: torch.Tensor, w_uk_t: torch.Tensor, w_uv: torch.Tensor) -> bool:
    """A CPU bf16 latent cache [blocks, block_size, c + rope] and per-head W_UK^T [H, c, nope], W_UV [H, v, c], both
    bf16 or both GGUF Q8_0 blocks (uint8 [H, rows, cols / 32 · 34]), all contiguous, where the library is built."""
    q8 = w_uk_t.dtype == w_uv.dtype == torch.uint8
    return (cache.device.type == "cpu" and cache.dtype == torch.bfloat16
            and (q8 or w_uk_t.dtype == w_uv.dtype == torch.bfloat16)
            and (not q8 or (w_uk_t.shape[-1] % Q8_0_BLOCK == 0 and w_uv.shape[-1] % Q8_0_BLOCK == 0))
            and cache.dim() == 3 and w_uk_t.dim() == 3 and w_uv.dim() == 3 and w_uk_t.shape[0] == w_uv.shape[0]
            and w_uk_t.shape[1] == q8_0_cols(w_uv) and cache.shape[2] > w_uk_t.shape[1] and cache.is_contiguous()
            and w_uk_t.is_contiguous() and w_uv.is_contiguous() and _get() is not None)  # fmt: skip


def _dims_contiguous(x: torch.Tensor) -> torch.Tensor:  # bf16 or float32 [T, H, d] with contiguous dims
    if x.dtype not in (torch.bfloat16, torch.float32):
        x = x.float()
    return x if x.stride(2) == 1 else x.contiguous()


def mla_decode(q_nope: torch.Tensor, q_pe: torch.Tensor, w_uk_t: torch.Tensor, w_uv: torch.Tensor,
               cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
               rows: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Absorbed MLA for one query token per decode row b: q_nope[r] [H, nope] and q_pe[r] [H, rope] (rope applied;
    r = rows[b], or b without `rows`) attend the latents of positions [0, context_lens[b]) found through
    block_tables[b] in `cache` [blocks, block_size, c + rope] ([c_kv | k_pe] per token). scores = (W_UK^T[h]
    q_nope . c_kv + q_pe . k_pe) * scale, softmax, the mix of c_kv, then W_UV[h]. q_* bf16 or float32, any row and
    head strides. W_UK^T [H, c, nope] and W_UV [H, v, c] bf16, or both GGUF Q8_0 blocks (uint8 [H, c, nope / 32 · 34]
    and [H, v, c / 32 · 34]). Written into out[r] ([T, H, v], bf16 or float32, rounded once) when `out` is given and
    returned; else a new float32 [B, H, v]."""
    q_nope, q_pe = _dims_contiguous(q_nope), _dims_contiguous(q_pe)
    if q_pe.dtype != q_nope.dtype:
        q_pe = q_pe.to(q_nope.dtype)
    heads, nope = q_nope.shape[1], q_nope.shape[2]
    c, v = w_uk_t.shape[1], w_uv.shape[1]
    rope = cache.shape[2] - c
    q8 = w_uk_t.dtype == torch.uint8
    if q8 != (w_uv.dtype == torch.uint8) or q8_0_cols(w_uv) != c:
        raise ValueError("mla_decode: W_UK^T and W_UV must both be bf16 or both Q8_0 blocks, W_UV [H, v, c]")
    if q_pe.shape[1:] != (heads, rope) or (heads, c, nope) != (w_uk_t.shape[0], c, q8_0_cols(w_uk_t)):
        raise ValueError(f"mla_decode: q_nope {tuple(q_nope.shape)} / q_pe {tuple(q_pe.shape)} do not fit "
                         f"w_uk_t {tuple(w_uk_t.shape)} and a cache of {cache.shape[2]}")  # fmt: skip
    tables = block_tables.to(torch.long).contiguous()
    lens = context_lens.to(torch.long).contiguous()
    batch = lens.shape[0]
    if rows is not None:
        rows = rows.to(torch.long).contiguous()
        if rows.shape != (batch,):
            raise ValueError("mla_decode: one query row per context length")
    elif q_nope.shape[0] != batch or q_pe.shape[0] != batch:
        raise ValueError("mla_decode: one query row per context length")
    if tables.shape[0] != batch:
        raise ValueError("mla_decode: one block table per row")
    if out is None:
        if rows is not None:
            raise ValueError("mla_decode: `rows` needs `out` (the rows are written there)")
        out = torch.empty(batch, heads, v, dtype=torch.float32)
    elif (out.dtype not in (torch.bfloat16, torch.float32) or out.stride(2) != 1 or out.shape[1:] != (heads, v)
          or out.shape[0] != q_nope.shape[0] or q_pe.shape[0] != q_nope.shape[0]):  # fmt: skip
        raise ValueError(f"mla_decode: out must be bf16 or float32 [T, {heads}, {v}] (q's T) with contiguous dims")
    ok = _get().mla_decode(batch, q_nope.shape[0], heads, c, rope, nope, v, q_nope.data_ptr(), q_nope.stride(0),
                           q_nope.stride(1),
                           q_pe.data_ptr(), q_pe.stride(0), q_pe.stride(1), int(q_nope.dtype == torch.bfloat16),
                           None if rows is None else rows.data_ptr(), w_uk_t.data_ptr(), w_uv.data_ptr(), int(q8),
                           cache.data_ptr(), tables.data_ptr(), tables.shape[1], cache.shape[1], lens.data_ptr(),
                           scale, out.data_ptr(), out.stride(0), out.stride(1), int(out.dtype == torch.bfloat16),
                           torch.get_num_threads())  # fmt: skip
    if not ok:
        raise ValueError("mla_decode: each row needs a block table covering its context (and rows within q)")
    return out


def mla_decode_ref(q_nope: torch.Tensor, q_pe: torch.Tensor, w_uk_t: torch.Tensor, w_uv: torch.Tensor,
                   cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                   scale: float) -> torch.Tensor:  # fmt: skip
    """`mla_decode` in float64, one row at a time on its gathered latents: [B, H, v] float64."""
    block_size, c = cache.shape[1], w_uk_t.shape[1]
    w_uk_t, w_uv = q8_0_ref(w_uk_t), q8_0_ref(w_uv)
    outs = []
    for b in range(q_nope.shape[0]):
        length = int(context_lens[b])
        slots = (block_tables[b].long()[:, None] * block_size + torch.arange(block_size)).flatten()[:length]
        latent = cache.flatten(0, 1)[slots].double()  # [L, c + rope]
        q_lat = torch.einsum("hcn,hn->hc", w_uk_t.double(), q_nope[b].double())
        scores = (q_lat @ latent[:, :c].T + q_pe[b].double() @ latent[:, c:].T) * scale  # [H, L]
        ctx = scores.softmax(-1) @ latent[:, :c]  # [H, c]
        outs.append(torch.einsum("hvc,hc->hv", w_uv.double(), ctx))
    return torch.stack(outs)


def q8_0_ref(w: torch.Tensor) -> torch.Tensor:
    """GGUF Q8_0 blocks (uint8 [..., cols / 32 · 34]) -> float64 [..., cols], scale times code; other tensors as given."""
    if w.dtype != torch.uint8:
        return w
    blocks = w.reshape(*w.shape[:-1], -1, Q8_0_BLOCK)
    scale = blocks[..., :2].contiguous().view(torch.float16).double()
    return (scale * blocks[..., 2:].contiguous().view(torch.int8).double()).flatten(-2)
