"""The C prefill attention (hearth/kernels/attention_cpu.c) against a float64 materialised softmax, and against SDPA.

Tolerance: the output is rounded to bf16 once (relative 2^-9, at most 2^-8 of the largest |out|) and P is rounded to
bf16 before P·V (relative 2^-9 per weight, averaging out over keys); scores and sums are float32. With values ~N(0, 1)
outputs are below ~4 in magnitude, so |err| <= 2^-8 * max|ref| + 2^-8 covers both with a margin; SDPA (the same
arithmetic in another order) must land in the same band, and the kernel's error must be no worse than 1.5x SDPA's.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hearth.kernels import attention_cpu

pytestmark = pytest.mark.skipif(not attention_cpu.fast(), reason="needs the C kernel built with AVX-512 BF16")


def sdpa(q, keys, values, scale, window):
    n, length = q.shape[0], keys.shape[0]
    q_pos = torch.arange(length - n, length)[:, None]
    k_pos = torch.arange(length)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys.transpose(0, 1)[None], values.transpose(0, 1)[None],
                                       attn_mask=mask, scale=scale, enable_gqa=True)  # fmt: skip
    return o[0].transpose(0, 1)


CASES = [  # (new tokens n, keys L, window)
    (1, 1, None), (7, 7, None), (33, 33, None), (200, 200, None), (513, 513, None),  # fresh prompts
    (1, 200, None), (7, 33, None), (33, 513, None), (200, 513, None),  # chunked prefill / prefix hits
    (200, 200, 16), (513, 513, 100), (33, 513, 64), (7, 200, 1),  # sliding window
]  # fmt: skip


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [3, 1])
@pytest.mark.parametrize("n,length,window", CASES)
def test_prefill_vs_float64(n, length, window, group, head_dim):
    torch.manual_seed(n * 1000 + length + group)
    num_kv_heads = 3 if group == 3 else 2
    q = torch.randn(n, num_kv_heads * group, head_dim).bfloat16()
    keys = torch.randn(length, num_kv_heads, head_dim).bfloat16()
    values = torch.randn(length, num_kv_heads, head_dim).bfloat16()
    scale = head_dim**-0.5
    ref = attention_cpu.prefill_ref(q, keys, values, scale, window)
    out = attention_cpu.prefill(q, keys, values, scale, window)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    tol = 2**-8 * ref.abs().max().item() + 2**-8
    err = (out.double() - ref).abs().max().item()
    sdpa_err = (sdpa(q, keys, values, scale, window).double() - ref).abs().max().item()
    assert err <= tol, (err, tol)
    assert sdpa_err <= tol  # the band holds for torch's own kernel too
    assert err <= 1.5 * sdpa_err + 1e-6, (err, sdpa_err)


def test_strided_inputs_and_out():
    # q/k/v as views of one fused qkv projection, out as a slice of a larger buffer (as in Attention.forward)
    torch.manual_seed(0)
    n, num_heads, num_kv_heads, d = 45, 9, 3, 64
    qkv = torch.randn(n, (num_heads + 2 * num_kv_heads) * d).bfloat16()
    q, k, v = qkv.split([num_heads * d, num_kv_heads * d, num_kv_heads * d], dim=-1)
    q, k, v = q.view(n, num_heads, d), k.view(n, num_kv_heads, d), v.view(n, num_kv_heads, d)
    out = torch.zeros(n + 10, num_heads, d, dtype=torch.bfloat16)
    attention_cpu.prefill(q[5:], k, v, 0.125, out=out[10:50])
    ref = attention_cpu.prefill_ref(q[5:], k, v, 0.125)
    assert (out[10:50].double() - ref).abs().max().item() <= 2**-8 * ref.abs().max().item() + 2**-8
    assert out[:10].abs().sum() == 0 and out[50:].abs().sum() == 0


def test_can_run():
    q, kv = torch.zeros(4, 9, 64, dtype=torch.bfloat16), torch.zeros(4, 3, 64, dtype=torch.bfloat16)
    assert attention_cpu.can_run(q, kv, kv)
    assert not attention_cpu.can_run(q.float(), kv.float(), kv.float())
    assert not attention_cpu.can_run(q[..., :32], kv[..., :32], kv[..., :32])
    with pytest.raises(ValueError):  # more queries than keys: no causal layout fits
        attention_cpu.prefill(q, kv[:2], kv[:2], 0.125)


@pytest.mark.parametrize("window", [None, 40])
def test_attention_layer_prefix_hit(window, monkeypatch):
    # Attention.forward with 70 tokens already cached and 30 new ones: the kernel sees keys from the first block the
    # window reaches (position 16 with window 40), as SDPA does
    from hearth.layers.attention import Attention
    from hearth.layers.context import Context, reset_context, set_context

    torch.manual_seed(1)
    cached, new, block_size = 70, 30, 16
    length = cached + new
    layer = Attention(9, 64, 3, 0.125, sliding_window=window)
    layer.k_cache = torch.zeros(10, block_size, 3, 64, dtype=torch.bfloat16)
    layer.v_cache = torch.zeros(10, block_size, 3, 64, dtype=torch.bfloat16)
    keys, values = torch.randn(length, 3, 64).bfloat16(), torch.randn(length, 3, 64).bfloat16()
    q = torch.randn(new, 9, 64).bfloat16()
    table = torch.tensor([[2, 5, 1, 7, 3, 9, 4]])  # block ids of positions 0-15, 16-31, ...
    slots = table[0, torch.arange(length) // block_size] * block_size + torch.arange(length) % block_size
    layer.k_cache.view(-1, 3, 64)[slots[:cached]] = keys[:cached]
    layer.v_cache.view(-1, 3, 64)[slots[:cached]] = values[:cached]
    ref = attention_cpu.prefill_ref(q, keys, values, 0.125, window)
    outs = {}
    for name in ("kernel", "sdpa"):
        if name == "sdpa":
            monkeypatch.setattr(attention_cpu, "can_run", lambda *args: False)
        set_context(Context(q_starts=[0, new], context_lens=[length], slot_mapping=slots[cached:], block_tables=table,
                            block_size=block_size, prefill_seq_idx=[0]))  # fmt: skip
        try:
            outs[name] = layer(q, keys[cached:], values[cached:]).view(new, 9, 64)
        finally:
            reset_context()
    err = (outs["kernel"].double() - ref).abs().max().item()
    sdpa_err = (outs["sdpa"].double() - ref).abs().max().item()
    assert err <= 2**-8 * ref.abs().max().item() + 2**-8
    assert err <= 1.5 * sdpa_err + 1e-6, (err, sdpa_err)


@pytest.mark.parametrize("n,length,window", [(1, 1, None), (33, 33, None), (513, 513, None), (33, 513, 64), (200, 513, 128)])
@pytest.mark.parametrize("sink_scale", [1.0, 8.0])
def test_prefill_with_sinks(n, length, window, sink_scale):
    """gpt-oss's sinks (a value-less logit per head; 8.0 makes some heads put most of the mass on it) against the float64
    reference and against the plain-torch path the layer used before (attention_with_sinks, float32 throughout)."""
    from hearth.layers.attention import attention_with_sinks

    torch.manual_seed(n + length)
    num_kv_heads, group, head_dim = 2, 8, 64
    q = torch.randn(n, num_kv_heads * group, head_dim).bfloat16()
    keys = torch.randn(length, num_kv_heads, head_dim).bfloat16()
    values = torch.randn(length, num_kv_heads, head_dim).bfloat16()
    sinks = (torch.randn(num_kv_heads * group) * sink_scale).bfloat16()
    scale = head_dim**-0.5
    ref = attention_cpu.prefill_ref(q, keys, values, scale, window, sinks=sinks)
    out = attention_cpu.prefill(q, keys, values, scale, window, sinks=sinks)
    tol = 2**-8 * ref.abs().max().item() + 2**-8
    assert (out.double() - ref).abs().max().item() <= tol
    q_pos, k_pos = torch.arange(length - n, length)[:, None], torch.arange(length)[None, :]
    mask = (k_pos <= q_pos) & ((k_pos > q_pos - window) if window else True)
    torch_path = attention_with_sinks(q[None].transpose(1, 2), keys[None].transpose(1, 2), values[None].transpose(1, 2),
                                      mask, sinks, scale)[0].transpose(0, 1)  # fmt: skip
    assert (torch_path.double() - ref).abs().max().item() <= tol
    no_sink = attention_cpu.prefill_ref(q, keys, values, scale, window)
    if sink_scale > 1:  # large sinks take visible mass from every head's keys
        assert (no_sink - ref).abs().max().item() > 3 * tol
