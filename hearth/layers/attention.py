"""Attention over the paged KV cache, on any torch device, for mixed prefill and decode batches.

New keys/values are written to their cache slots, then prefill sequences attend one by one (causal, offset by the
tokens already cached) and all single-token decode sequences attend in one batched call over their block tables.
Sliding-window layers mask keys older than the window. With learned per-head sinks (gpt-oss, docs/models.md §1.3) the
softmax denominator gains one extra logit per head; SDPA cannot do that, so those layers attend through the C kernels
(which take the sinks) where they run, else in plain torch (`attention_with_sinks`).
"""

from __future__ import annotations

import math
import mmap

import torch
import torch.nn.functional as F
from torch import nn

from hearth.kernels import attention_cpu, gguf_cpu
from hearth.layers.context import get_context
from hearth.quant.gguf_types import QuantizedTensor


def cache_zeros(shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """A zero-filled cache tensor whose pages become resident only as they are written. On CPU torch.zeros writes
    every byte (a 3 GB default cache would be resident at start); an anonymous mapping is zero-filled lazily, 4 KiB
    at a time. (Not numpy's zeros: it asks for transparent huge pages, so the first token written to each layer's
    cache would make 2 MiB resident.)"""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    buf = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # private, not shmem
    return torch.frombuffer(buf, dtype=torch.uint8)[:nbytes].view(dtype).view(shape)


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    # cache: [num_blocks, block_size, kv_heads, head_dim] -> [length, kv_heads, head_dim]
    block_size = cache.shape[1]
    num_blocks = (length + block_size - 1) // block_size
    return cache[block_table[:num_blocks]].flatten(0, 1)[:length]


def attention_with_sinks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                         sinks: torch.Tensor, scale: float) -> torch.Tensor:  # fmt: skip
    """softmax([q·k * scale, sink_h]) over keys plus one sink column that has no value; computed in float32.

    q: [B, H, n, D]; k, v: [B, Hkv, L, D] (query head h uses kv head h // (H/Hkv)); mask: bool, True = attend,
    broadcastable to [B, H, n, L]; sinks: [H]. Returns [B, H, n, D] in q's dtype.
    """
    b, num_heads, n, d = q.shape
    num_kv_heads, length = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    qf = q.float().reshape(b, num_kv_heads, group * n, d)
    scores = (qf @ k.float().transpose(-1, -2)).view(b, num_heads, n, length) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    sink = sinks.float().view(1, num_heads, 1, 1)
    m = torch.maximum(scores.amax(-1, keepdim=True), sink)
    p = torch.exp(scores - m)
    denom = p.sum(-1, keepdim=True) + torch.exp(sink - m)
    p = (p / denom).view(b, num_kv_heads, group * n, length)
    return (p @ v.float()).view(b, num_heads, n, -1).to(q.dtype)


def latent_blocks(k_b, v_b) -> tuple[gguf_cpu.R16Weight, gguf_cpu.R16Weight] | None:
    """MLA's per-head W_UK^T [H, c, nope] and W_UV [H, v, c] from a GGUF file's Q8_0 attn_k_b / attn_v_b, kept where
    they lie in the file (R16Weight in place, [H·c, nope] and [H·v, c]): decode reads them there (latent_decode_attention,
    1.06 bytes a value against a bf16 copy's 2, and no copy held), prefill dequantizes them in C when it runs
    (`latent_weight`). None for other types, or where the C kernels are not built: the caller keeps dense copies."""
    if not all(isinstance(t, QuantizedTensor) and t.qtype == gguf_cpu.Q8_0 and len(t.shape) == 3 for t in (k_b, v_b)):
        return None
    if not (attention_cpu.available() and gguf_cpu.available() and k_b.data.is_contiguous() and v_b.data.is_contiguous()):
        return None
    return tuple(gguf_cpu.in_place(t.data, t.qtype, t.shape[0] * t.shape[1], t.shape[2]) for t in (k_b, v_b))


def latent_weight(w: torch.Tensor | gguf_cpu.R16Weight, heads: int, dtype: torch.dtype) -> torch.Tensor:
    """A per-head latent weight ([H, rows, cols]) as the torch forms multiply it, in `dtype`: as held, or dequantized
    from the file's blocks (`latent_blocks`; in C over both cores, about a millisecond for DeepSeek-V2-Lite's layer)."""
    if isinstance(w, gguf_cpu.R16Weight):
        return gguf_cpu.dequant(w, dtype).view(heads, -1, w.k)
    return w.to(dtype)


def latent_decode_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, w_uk_t: torch.Tensor, w_uv: torch.Tensor,
                            cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                            scale: float, rows: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:  # fmt: skip
    """MLA's absorbed attention for the decode rows `rows` of q_* [T, H, d] over the paged latent cache [blocks,
    block_size, c + rope] through the block tables, in one C call (attention_cpu.mla_decode), written into those rows
    of `out` [T, H, v] and returned; None where the kernel cannot run it (not CPU bf16, or no C compiler): the caller
    keeps its torch form. W_UK^T / W_UV dense, or `latent_blocks` (read in place)."""
    heads = q_nope.shape[1]
    if isinstance(w_uk_t, gguf_cpu.R16Weight):
        w_uk_t = w_uk_t.raw[0].view(heads, -1, w_uk_t.raw[0].shape[-1])
    if isinstance(w_uv, gguf_cpu.R16Weight):
        w_uv = w_uv.raw[0].view(heads, -1, w_uv.raw[0].shape[-1])
    if not attention_cpu.can_mla_decode(cache, w_uk_t, w_uv):
        return None
    return attention_cpu.mla_decode(q_nope, q_pe, w_uk_t, w_uv, cache, block_tables, context_lens, scale, rows, out)


def batched_decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                             scale: float) -> torch.Tensor:  # fmt: skip
    """One new token per sequence against its padded context, in float32 with the query heads grouped per KV head.

    q: [B, H, D]; keys, values: [B, L, KVH, D]; mask: bool [B, 1, 1, L] (True: in the context) -> [B, H, 1, D].
    NOTE: CPU SDPA with a mask on these shapes takes its slow path, in bf16 and float32; two batched matmuls over
    [B, KVH, H/KVH, L] are faster than either.
    """
    batch, num_heads, head_dim = q.shape
    num_kv_heads = keys.shape[2]
    qg = q.float().view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = qg @ keys.float().permute(0, 2, 3, 1)  # [B, KVH, G, L]
    scores = scores.mul_(scale).masked_fill_(~mask.view(batch, 1, 1, -1), float("-inf"))
    out = scores.softmax(-1) @ values.float().transpose(1, 2)  # [B, KVH, G, D]
    return out.view(batch, num_heads, 1, head_dim).to(q.dtype)


class Attention(nn.Module):
    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int, scale: float, sliding_window: int | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads
        self.scale = scale
        self.sliding_window = sliding_window
        self.k_cache: torch.Tensor | None = None  # set by the model runner
        self.v_cache: torch.Tensor | None = None
        self.kv_group = 0  # which of the step's block tables this layer reads (Context.kv_groups)

    def allocate_cache(self, num_blocks: int, block_size: int, layer_spec, dtype: torch.dtype, device) -> None:
        """Called by the model runner with this layer's LayerKV; zeros whose pages only become resident as used."""
        shape = (num_blocks, block_size, layer_spec.num_kv_heads, layer_spec.head_size)
        self.k_cache = cache_zeros(shape, dtype, device)
        self.v_cache = cache_zeros(shape[:-1] + (layer_spec.head_size_v,), dtype, device)

    def share_cache(self, other: Attention) -> None:
        """Use `other`'s cache tensors: a layer of another KV group, so the two never hold the same block id."""
        self.k_cache, self.v_cache = other.k_cache, other.v_cache

    def _mask(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        mask = k_pos[None, :] <= q_pos[:, None]
        if self.sliding_window is not None:
            mask &= k_pos[None, :] > q_pos[:, None] - self.sliding_window
        return mask

    def _single_decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       slots: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """One sequence, one new token: gather exactly its context's keys (no padding, no mask) and attend."""
        if self.sliding_window is not None:
            slots = slots[-self.sliding_window :]
        # float32: CPU SDPA on these tiny shapes is faster in float32 than in bf16, and the upcast of L keys is cheap
        keys = k_cache.view(-1, self.num_kv_heads, self.head_dim).index_select(0, slots).float()  # [L, kv_heads, D]
        values = v_cache.view(-1, self.num_kv_heads, self.head_dim).index_select(0, slots).float()
        o = F.scaled_dot_product_attention(q.float().view(1, 1, self.num_heads, self.head_dim).transpose(1, 2),
                                           keys.unsqueeze(0).transpose(1, 2), values.unsqueeze(0).transpose(1, 2),
                                           scale=self.scale, enable_gqa=True)  # fmt: skip
        return o.view(1, self.num_heads * self.head_dim).to(q.dtype)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor | None = None) -> torch.Tensor:
        # q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim]; sinks: [num_heads] or None
        ctx = get_context()
        if self.kv_group and ctx.kv_groups:
            ctx = ctx.kv_groups[self.kv_group]
        k_cache, v_cache = self.k_cache, self.v_cache
        if ctx.slot_mapping is None:  # no cache this step (a plain forward over whole sequences)
            k_cache = v_cache = None
        if k_cache is not None:
            k_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, ctx.slot_mapping, k.to(k_cache.dtype))
            v_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, ctx.slot_mapping, v.to(v_cache.dtype))
            if ctx.single_decode_slots is not None and sinks is None:
                return self._single_decode(q, k_cache, v_cache, ctx.single_decode_slots)
        out = torch.empty_like(q)
        for i in ctx.prefill_seq_idx:
            start, end = ctx.q_starts[i], ctx.q_starts[i + 1]
            length = ctx.context_lens[i]
            num_new = end - start
            first = 0  # position of the first key read
            if k_cache is None or length == num_new:
                keys, values = k[start:end], v[start:end]
            else:
                if self.sliding_window is not None:  # from the first block the window reaches (older ones are gone)
                    first = max(0, length - num_new - self.sliding_window + 1) // ctx.block_size
                table = ctx.block_tables[i][first:]
                first *= ctx.block_size
                keys = gather_kv(k_cache, table, length - first).to(q.dtype)
                values = gather_kv(v_cache, table, length - first).to(q.dtype)
            k_pos = torch.arange(first, length, device=q.device)
            q_pos = torch.arange(length - num_new, length, device=q.device)
            if attention_cpu.can_run(q, keys, values):  # bf16 on AVX-512 BF16 CPUs, faster than SDPA
                attention_cpu.prefill(q[start:end], keys, values, self.scale, self.sliding_window, out=out[start:end],
                                      sinks=sinks)  # fmt: skip
                continue
            if sinks is not None:
                o = attention_with_sinks(
                    q[None, start:end].transpose(1, 2),
                    keys[None].transpose(1, 2),
                    values[None].transpose(1, 2),
                    self._mask(q_pos, k_pos),
                    sinks,
                    self.scale,
                )
                out[start:end] = o[0].transpose(0, 1)
                continue
            if self.sliding_window is None and length == num_new:
                mask, causal = None, True
            else:
                mask, causal = self._mask(q_pos, k_pos), False
            # 4-D inputs: with 3-D ones CPU SDPA takes its slow "math" path
            o = F.scaled_dot_product_attention(
                q[start:end].transpose(0, 1)[None], keys.transpose(0, 1)[None], values.transpose(0, 1)[None],
                attn_mask=mask, is_causal=causal, scale=self.scale, enable_gqa=True,
            )  # fmt: skip
            out[start:end] = o[0].transpose(0, 1)
        if ctx.decode_seq_idx:
            rows = ctx.decode_rows
            lens = ctx.decode_context_lens  # [B]
            tables = ctx.decode_block_tables  # [B, max_blocks]
            if attention_cpu.can_decode(q, k_cache, v_cache):  # through the block tables, in C
                o = attention_cpu.decode(q[rows], k_cache, v_cache, tables, lens, self.scale, self.sliding_window,
                                         sinks)  # fmt: skip
                out[rows] = o.to(out.dtype)
                return out.flatten(1)
            if self.sliding_window is None:
                mask = ctx.decode_mask
            else:  # only the blocks the window reaches: per sequence from its first such block
                bs, window = ctx.block_size, self.sliding_window
                idx = (lens - window).clamp(min=0).div(bs, rounding_mode="floor")[:, None]
                idx = idx + torch.arange(min(-(-window // bs) + 1, tables.shape[1]), device=q.device)
                k_pos = (idx[:, :, None] * bs + torch.arange(bs, device=q.device)).flatten(1)
                tables = tables.gather(1, idx.clamp(max=tables.shape[1] - 1))
                mask = (k_pos < lens[:, None]) & (k_pos >= lens[:, None] - window)
                mask = mask[:, None, None, :]
            keys = k_cache[tables].flatten(1, 2).to(q.dtype)  # [B, max_len, kv_heads, head_dim]
            values = v_cache[tables].flatten(1, 2).to(q.dtype)
            if sinks is not None:
                o = attention_with_sinks(q[rows].unsqueeze(2), keys.transpose(1, 2), values.transpose(1, 2), mask,
                                         sinks, self.scale)  # fmt: skip
            else:
                o = batched_decode_attention(q[rows], keys, values, mask, self.scale)
            out[rows] = o.squeeze(2)
        return out.flatten(1)
