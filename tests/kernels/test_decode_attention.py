"""Decode attention over the paged cache in C (attention_cpu.decode: the decode rows of mixed prefill/decode steps)
against the float64 reference on gathered keys, and Attention.forward's mixed step against its torch path.

The kernel works in float32 (scores, an exp accurate to 2e-7, sums) on bf16 keys and values, so against float64 on
the same bf16 inputs it must agree to ~1e-5 of the output's scale."""

from __future__ import annotations

import pytest
import torch

from hearth.kernels import attention_cpu

pytestmark = pytest.mark.skipif(attention_cpu._get() is None, reason="needs a C compiler")


def paged(lengths, num_kv_heads, head_dim, block_size, seed):
    """Random bf16 caches with each sequence's blocks scattered over the pool; returns caches, tables, lens."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // block_size) for n in lengths]
    num_blocks = sum(need) + 3
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).bfloat16()
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).bfloat16()
    order = torch.randperm(num_blocks, generator=g).tolist()
    tables = torch.zeros(len(lengths), max(need), dtype=torch.long)
    for b, n in enumerate(need):
        tables[b, :n] = torch.tensor(order[:n])
        order = order[n:]
    return k_cache, v_cache, tables, torch.tensor(lengths)


@pytest.mark.parametrize("head_dim", [64, 128, 32])
@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("window", [None, 40, 1])
def test_decode_vs_float64(head_dim, group, window):
    lengths = [1, 17, 128, 129, 300]
    num_kv_heads = 2
    k_cache, v_cache, tables, lens = paged(lengths, num_kv_heads, head_dim, 16, seed=head_dim + group)
    q = torch.randn(len(lengths), num_kv_heads * group, head_dim).bfloat16()
    scale = head_dim**-0.5
    out = attention_cpu.decode(q, k_cache, v_cache, tables, lens, scale, window)
    ref = attention_cpu.decode_ref(q, k_cache, v_cache, tables, lens, scale, window)
    assert out.dtype == torch.float32 and out.shape == q.shape
    assert (out.double() - ref).abs().max().item() <= 1e-5 * ref.abs().max().item() + 1e-6


def test_decode_checks_tables():
    k_cache, v_cache, tables, lens = paged([20, 40], 2, 64, 16, seed=0)
    q = torch.randn(2, 4, 64).bfloat16()
    with pytest.raises(ValueError):  # a table that stops short of the context
        attention_cpu.decode(q, k_cache, v_cache, tables[:, :2], lens + 30, 0.125)
    assert attention_cpu.can_decode(q, k_cache, v_cache)
    assert not attention_cpu.can_decode(q, k_cache.float(), v_cache.float())


@pytest.mark.parametrize("with_sinks", [False, True])
@pytest.mark.parametrize("window", [None, 24])
def test_mixed_step_decode_rows(window, with_sinks, monkeypatch):
    # one sequence prefilling 9 tokens after 20 cached, three decoding: the C kernels against the torch path (with
    # gpt-oss's sinks too), both against the float64 references
    from hearth.layers.attention import Attention
    from hearth.layers.context import Context, reset_context, set_context

    torch.manual_seed(2)
    bs, heads, kv_heads, d = 8, 6, 2, 64
    lengths = [29, 50, 8, 70]  # context after this step; sequence 0 prefills its last 9
    k_cache, v_cache, tables, lens = paged(lengths, kv_heads, d, bs, seed=5)
    layer = Attention(heads, d, kv_heads, 0.125, sliding_window=window)
    num_new = [9, 1, 1, 1]
    q_starts = [0, 9, 10, 11, 12]
    slots = torch.cat([tables[i, torch.arange(n - k, n) // bs] * bs + torch.arange(n - k, n) % bs
                       for i, (n, k) in enumerate(zip(lengths, num_new))])  # fmt: skip
    q = torch.randn(12, heads, d).bfloat16()
    k = torch.randn(12, kv_heads, d).bfloat16()
    v = torch.randn(12, kv_heads, d).bfloat16()
    sinks = (torch.randn(heads) * 4).bfloat16() if with_sinks else None
    decode_idx = [1, 2, 3]
    dec_lens = lens[decode_idx]
    k_pos = torch.arange(tables.shape[1] * bs)
    outs = {}
    for name in ("kernel", "torch"):
        if name == "torch":
            monkeypatch.setattr(attention_cpu, "can_decode", lambda *args: False)
            monkeypatch.setattr(attention_cpu, "can_run", lambda *args: False)
        layer.k_cache, layer.v_cache = k_cache.clone(), v_cache.clone()
        set_context(Context(q_starts=q_starts, context_lens=lengths, slot_mapping=slots, block_tables=tables,
                            block_size=bs, prefill_seq_idx=[0], decode_seq_idx=decode_idx,
                            decode_rows=torch.tensor([9, 10, 11]), decode_context_lens=dec_lens,
                            decode_block_tables=tables[decode_idx],
                            decode_mask=(k_pos[None, :] < dec_lens[:, None])[:, None, None, :]))  # fmt: skip
        try:
            outs[name] = layer(q, k, v, sinks=sinks).view(12, heads, d)
        finally:
            reset_context()
    ref = attention_cpu.decode_ref(q[9:], layer.k_cache, layer.v_cache, tables[decode_idx], dec_lens, 0.125, window,
                                   sinks)  # fmt: skip
    seq0 = (tables[0][:, None] * bs + torch.arange(bs)).flatten()[: lengths[0]]
    keys, values = layer.k_cache.flatten(0, 1)[seq0], layer.v_cache.flatten(0, 1)[seq0]
    prefill_ref = attention_cpu.prefill_ref(q[:9], keys, values, 0.125, window, sinks)
    for name in outs:  # both round the float32 result to bf16 once (the C prefill also rounds P to bf16)
        assert (outs[name][9:].double() - ref).abs().max().item() <= 2**-8 * ref.abs().max().item(), name
        tol = 2**-8 * prefill_ref.abs().max().item() + 2**-8
        assert (outs[name][:9].double() - prefill_ref).abs().max().item() <= tol, name


@pytest.mark.parametrize("window", [None, 40])
@pytest.mark.parametrize("sink_scale", [1.0, 8.0])
def test_decode_with_sinks(window, sink_scale):
    """gpt-oss's per-head sinks join the denominator of the merged chunks (one chunk or several)."""
    lengths = [1, 17, 300, 700]
    num_kv_heads, group, head_dim = 2, 8, 64
    k_cache, v_cache, tables, lens = paged(lengths, num_kv_heads, head_dim, 16, seed=7)
    q = torch.randn(len(lengths), num_kv_heads * group, head_dim).bfloat16()
    sinks = torch.randn(num_kv_heads * group) * sink_scale
    scale = head_dim**-0.5
    out = attention_cpu.decode(q, k_cache, v_cache, tables, lens, scale, window, sinks)
    ref = attention_cpu.decode_ref(q, k_cache, v_cache, tables, lens, scale, window, sinks)
    assert (out.double() - ref).abs().max().item() <= 1e-5 * ref.abs().max().item() + 1e-6
    plain = attention_cpu.decode_ref(q, k_cache, v_cache, tables, lens, scale, window)
    assert (plain - ref).abs().max().item() > 1e-2
