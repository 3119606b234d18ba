"""MLA's absorbed decode attention over the paged latent cache in C (attention_cpu.mla_decode) against the float64
reference on gathered latents, and DeepseekV3Attention's decode rows through it against its torch absorbed form.

The kernel works in float32 on bf16 weights and latents (the query projection through W_UK, scores, an exp accurate
to 2e-7, the latent mix, W_UV), so against float64 on the same bf16 inputs it agrees to ~1e-5 of the output's scale."""

from __future__ import annotations

import pytest
import torch

from hearth.kernels import attention_cpu

pytestmark = pytest.mark.skipif(attention_cpu._get() is None, reason="needs a C compiler")


def latent_cache(lengths, size, block_size, seed):
    """A random bf16 latent cache with each row's blocks scattered over the pool (not in order); cache, tables, lens."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // block_size) for n in lengths]
    num_blocks = sum(need) + 3
    cache = torch.randn(num_blocks, block_size, size, generator=g).bfloat16()
    order = torch.randperm(num_blocks, generator=g).tolist()
    tables = torch.zeros(len(lengths), max(need), dtype=torch.int32)
    for b, n in enumerate(need):
        tables[b, :n] = torch.tensor(order[:n])
        order = order[n:]
    return cache, tables, torch.tensor(lengths)


@pytest.mark.parametrize("heads", [1, 16, 3])
@pytest.mark.parametrize(("c", "rope", "nope", "v", "block_size"), [(64, 16, 32, 32, 16), (512, 64, 128, 128, 16),
                                                                    (40, 8, 24, 20, 5)])  # fmt: skip
def test_mla_decode_vs_float64(heads, c, rope, nope, v, block_size):
    lengths = [1, 17, 130, 64, 7]
    cache, tables, lens = latent_cache(lengths, c + rope, block_size, seed=heads + c)
    g = torch.Generator().manual_seed(c * heads)
    w_uk_t = (torch.randn(heads, c, nope, generator=g) * nope**-0.5).bfloat16()
    w_uv = (torch.randn(heads, v, c, generator=g) * c**-0.5).bfloat16()
    q_nope = torch.randn(len(lengths), heads, nope, generator=g).bfloat16()
    q_pe = torch.randn(len(lengths), heads, rope, generator=g).bfloat16()
    scale = (nope + rope) ** -0.5
    assert attention_cpu.can_mla_decode(cache, w_uk_t, w_uv)
    out = attention_cpu.mla_decode(q_nope, q_pe, w_uk_t, w_uv, cache, tables, lens, scale)
    ref = attention_cpu.mla_decode_ref(q_nope, q_pe, w_uk_t, w_uv, cache, tables, lens, scale)
    assert out.dtype == torch.float32 and out.shape == (len(lengths), heads, v)
    err = (out.double() - ref).abs().max().item()
    assert err <= 2e-5 * ref.abs().max().item(), err


def q8_0_blocks(w: torch.Tensor) -> torch.Tensor:
    """w [..., cols] quantized by gguf-py to Q8_0 as a GGUF file holds it: uint8 [..., cols / 32 · 34]."""
    from gguf import GGMLQuantizationType, quants

    blocks = quants.quantize(w.float().numpy(), GGMLQuantizationType.Q8_0)
    return torch.from_numpy(blocks).view(*w.shape[:-1], -1)


@pytest.mark.parametrize("heads", [1, 16, 3])
@pytest.mark.parametrize("threads", [1, 2])
def test_mla_decode_q8_0_weights_in_place(heads, threads):
    """W_UK^T / W_UV as a GGUF file's Q8_0 blocks (attn_k_b, attn_v_b), read where they lie: against the float64
    reference on the same blocks (which dequantizes them as gguf-py does), heads grouped 16/8/4 and odd."""
    from gguf import GGMLQuantizationType, quants

    c, rope, nope, v, lengths = 512, 64, 128, 128, [1, 40, 129]
    cache, tables, lens = latent_cache(lengths, c + rope, 16, seed=heads)
    g = torch.Generator().manual_seed(heads + 100)
    w_uk_t = q8_0_blocks(torch.randn(heads, c, nope, generator=g) * nope**-0.5)
    w_uv = q8_0_blocks(torch.randn(heads, v, c, generator=g) * c**-0.5)
    assert w_uk_t.shape == (heads, c, nope // 32 * 34) and w_uv.shape == (heads, v, c // 32 * 34)
    dequantized = quants.dequantize(w_uv.numpy(), GGMLQuantizationType.Q8_0)
    assert torch.equal(attention_cpu.q8_0_ref(w_uv), torch.from_numpy(dequantized).double())
    q_nope = torch.randn(len(lengths), heads, nope, generator=g).bfloat16()
    q_pe = torch.randn(len(lengths), heads, rope, generator=g).bfloat16()
    scale = (nope + rope) ** -0.5
    assert attention_cpu.can_mla_decode(cache, w_uk_t, w_uv)
    assert not attention_cpu.can_mla_decode(cache, w_uk_t, w_uv[..., :-1])  # not whole blocks
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = attention_cpu.mla_decode(q_nope, q_pe, w_uk_t, w_uv, cache, tables, lens, scale)
    finally:
        torch.set_num_threads(old)
    ref = attention_cpu.mla_decode_ref(q_nope, q_pe, w_uk_t, w_uv, cache, tables, lens, scale)
    err = (out.double() - ref).abs().max().item()
    assert err <= 2e-5 * ref.abs().max().item(), err
    with pytest.raises(ValueError, match="both be bf16 or both Q8_0"):
        attention_cpu.mla_decode(q_nope, q_pe, w_uk_t, attention_cpu.q8_0_ref(w_uv).bfloat16(), cache, tables, lens,
                                 scale)  # fmt: skip


def test_mla_decode_peaked_softmax_and_threads():
    """Large scores (a near one-hot softmax) and 1, 2 or 3 threads: the split over rows and heads changes nothing."""
    lengths = [33, 200]
    cache, tables, lens = latent_cache(lengths, 72, 8, seed=5)
    g = torch.Generator().manual_seed(9)
    w_uk_t = torch.randn(4, 64, 16, generator=g).bfloat16()
    w_uv = torch.randn(4, 24, 64, generator=g).bfloat16()
    q_nope = (torch.randn(2, 4, 16, generator=g) * 4).bfloat16()
    q_pe = (torch.randn(2, 4, 8, generator=g) * 4).bfloat16()
    ref = attention_cpu.mla_decode_ref(q_nope, q_pe, w_uk_t, w_uv, cache, tables, lens, 0.5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = attention_cpu.mla_decode(q_nope, q_pe, w_uk_t, w_uv, cache, tables, lens, 0.5)
        torch.set_num_threads(2)
        two = attention_cpu.mla_decode(q_nope, q_pe, w_uk_t, w_uv, cache, tables, lens, 0.5)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    assert (one.double() - ref).abs().max().item() <= 2e-5 * ref.abs().max().item()
    # one row: its 4 heads split into groups for the threads (2 and 2 at two threads, 4 at one): the same values
    try:
        single = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            single.append(attention_cpu.mla_decode(q_nope[1:], q_pe[1:], w_uk_t, w_uv, cache, tables[1:], lens[1:], 0.5))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single[0], single[1]) and torch.equal(single[0], single[2]) and torch.equal(single[0], one[1:])


def test_mla_decode_rejects_short_block_table():
    cache, tables, lens = latent_cache([20], 24, 8, seed=1)
    w_uk_t, w_uv = torch.zeros(2, 16, 8).bfloat16(), torch.zeros(2, 8, 16).bfloat16()
    with pytest.raises(ValueError, match="block table"):
        attention_cpu.mla_decode(torch.zeros(1, 2, 8), torch.zeros(1, 2, 8), w_uk_t, w_uv, cache, tables,
                                 torch.tensor([25]), 1.0)  # fmt: skip


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_mla_decode_rows_of_strided_views_into_out(out_dtype):
    """As the model calls it: q_nope / q_pe are views of the q projection's [T, H, nope + rope] rows, the decode rows
    are some of the T (in any order), and the result lands in those rows of `out` (rounded once to bf16); the other
    rows of `out` are left alone."""
    heads, c, rope, nope, v = 4, 64, 16, 32, 24
    lengths = [40, 3, 17]
    cache, tables, lens = latent_cache(lengths, c + rope, 8, seed=11)
    g = torch.Generator().manual_seed(12)
    w_uk_t = (torch.randn(heads, c, nope, generator=g) * nope**-0.5).bfloat16()
    w_uv = (torch.randn(heads, v, c, generator=g) * c**-0.5).bfloat16()
    q = torch.randn(6, heads, nope + rope, generator=g).bfloat16()
    q_nope, q_pe = q.split([nope, rope], dim=-1)
    rows = torch.tensor([4, 0, 2])
    out = torch.full((6, heads, v), 7.0, dtype=out_dtype)
    got = attention_cpu.mla_decode(q_nope, q_pe, w_uk_t, w_uv, cache, tables, lens, 0.3, rows, out)
    assert got is out
    ref = attention_cpu.mla_decode_ref(q_nope[rows], q_pe[rows], w_uk_t, w_uv, cache, tables, lens, 0.3)
    tol = 2e-5 * ref.abs().max().item() + (ref.abs() * 2**-8 if out_dtype == torch.bfloat16 else 0)
    assert ((out[rows].double() - ref).abs() <= tol).all()
    assert (out[[1, 3, 5]] == 7.0).all()
    with pytest.raises(ValueError, match="rows within q"):
        attention_cpu.mla_decode(q_nope, q_pe, w_uk_t, w_uv, cache, tables, lens, 0.3, torch.tensor([4, 0, 6]), out)


@pytest.mark.parametrize("threads", [1, 2, 4, 3])
def test_mla_decode_one_row_head_groups(threads):
    """One decode row at DeepSeek's shapes: its 16 heads run as 1, 2, 4 or 3 groups (16, 8, 4 or 6 heads sharing each
    latent's load; the first three through the register-blocked passes) and all agree with float64."""
    heads, c, rope, nope, v = 16, 512, 64, 128, 128
    cache, tables, lens = latent_cache([75], c + rope, 16, seed=threads)
    g = torch.Generator().manual_seed(threads)
    w_uk_t = (torch.randn(heads, c, nope, generator=g) * nope**-0.5).bfloat16()
    w_uv = (torch.randn(heads, v, c, generator=g) * c**-0.5).bfloat16()
    q_nope = torch.randn(1, heads, nope, generator=g).bfloat16()
    q_pe = torch.randn(1, heads, rope, generator=g).bfloat16()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        out = attention_cpu.mla_decode(q_nope, q_pe, w_uk_t, w_uv, cache, tables, lens, 0.07)
    finally:
        torch.set_num_threads(before)
    ref = attention_cpu.mla_decode_ref(q_nope, q_pe, w_uk_t, w_uv, cache, tables, lens, 0.07)
    assert (out.double() - ref).abs().max().item() <= 2e-5 * ref.abs().max().item()
