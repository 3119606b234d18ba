"""The C kernels on GGUF blocks (hearth/kernels/gguf_cpu.c, llama_decode.c) against plain-torch references.

| fast path                                 | reference                                        | tolerance            |
|-------------------------------------------|--------------------------------------------------|----------------------|
| activation quantization (int8 per 32)     | quantize_q8_ref                                  | exact                |
| repack + gemm, Q4_0/Q4_1/Q8_0, any M,N,K | gemm_ref on the original blocks: same int8 x,    | 1e-5 of max |ref|    |
|                                           | dequantized W, float64 mm                        |                      |
| repack in C (also of parts stacked by row) | repack_ref (torch), edge f16 scales included    | bit for bit          |
| repack + dequant to float32 / bf16        | gguf_types.dequantize (/ .to(bfloat16))          | exact                |
| quantize_q8_0 (other types -> Q8_0)       | the float rows                                   | half a step per value |
| fused decode, M sequences at once         | the same rows one at a time                      | exact                |
| fused decode on SmolLM2                   | float32 model (dequantized weights), same cache  | no worse than the    |
|                                           |                                                  | bf16 torch path      |
"""

from __future__ import annotations

import ctypes
import threading

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants

from hearth.engine.fused_decode import build_fused_decode
from hearth.kernels import gguf_cpu, llama_decode
from hearth.quant.gguf_types import dequantize

pytestmark = pytest.mark.skipif(not gguf_cpu.available(), reason="no C compiler for the GGUF kernels")

TYPES = [gguf_cpu.Q4_0, gguf_cpu.Q4_1, gguf_cpu.Q8_0]


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def random_blocks(qtype: int, n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Real GGUF blocks (written by gguf-py's quantizer) of random weights with a few outliers, [n, row bytes]."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32) * 0.05
    w[rng.random((n, k)) < 0.01] *= 20
    return torch.from_numpy(quants.quantize(w, T(qtype)).copy()).reshape(n, -1)


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("n,k", [(37, 96), (64, 64), (130, 576), (8, 1536)])  # odd block counts, N % 4 != 0
@pytest.mark.parametrize("m", [1, 2, 3, 5, 17])
def test_gemm_matches_reference(qtype, n, k, m):
    blocks = random_blocks(qtype, n, k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    x[:, 3] *= 30  # an outlier channel, as real activations have
    ref = gguf_cpu.gemm_ref(x, blocks, qtype, n)
    w = gguf_cpu.repack(blocks, qtype, n, k)
    assert rel_err(gguf_cpu.gemm(x, w), ref) <= 1e-5
    out = torch.randn(m, n)
    expected = out.double() + ref.double()
    assert rel_err(gguf_cpu.gemm(x, w, out=out), expected) <= 1e-5  # accumulate into `out`


@pytest.mark.parametrize("qtype", TYPES)
def test_gemm_takes_and_gives_bf16_as_torch_converts_it(qtype):
    blocks = random_blocks(qtype, 37, 96)
    for w in (gguf_cpu.repack(blocks, qtype, 37, 96), gguf_cpu.in_place(blocks, qtype, 37, 96)):
        for m in (1, 5):
            x = torch.randn(m, 96, generator=torch.Generator().manual_seed(m)).bfloat16()
            want = gguf_cpu.gemm(x.float(), w)
            assert torch.equal(gguf_cpu.gemm(x, w), want)  # bf16 x read as .float() gives it
            got = gguf_cpu.gemm(x, w, dtype=torch.bfloat16)
            assert got.dtype == torch.bfloat16 and torch.equal(got, want.bfloat16())  # rounded once, as .to() does


def random_experts(ffns: list[int], hidden: int, qtypes: list[int]):
    """SwiGLU experts of intermediate sizes `ffns`: (gate/up, down) as (blocks, qtype, rows) and as R16Experts."""
    gate_up, down = [], []
    for e, ffn in enumerate(ffns):
        qtype = qtypes[e % len(qtypes)]
        gate_up.append((random_blocks(qtype, 2 * ffn, hidden, seed=2 * e), qtype, 2 * ffn))
        down.append((random_blocks(qtype, hidden, ffn, seed=2 * e + 1), qtype, hidden))
    r16 = gguf_cpu.R16Experts([gguf_cpu.repack(b, q, n, hidden) for b, q, n in gate_up],
                              [gguf_cpu.repack(b, q, hidden, ffn) for (b, q, _), ffn in zip(down, ffns)])  # fmt: skip
    return gate_up, down, r16


@pytest.mark.parametrize("qtypes", [[gguf_cpu.Q8_0], [gguf_cpu.Q4_0, gguf_cpu.Q8_0, gguf_cpu.Q4_1]])
@pytest.mark.parametrize("tokens", [1, 3, 40])
def test_moe_matches_reference(qtypes, tokens):
    # 6 routed experts of 64 (one of them wider, as a shared expert listed last would be), hidden 80 (not a multiple
    # of 16 rows per group in the down projection's output), several tokens sharing experts
    ffns = [64] * 6 + [128]
    gate_up, down, experts = random_experts(ffns, 80 * 2, qtypes)
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 160, generator=gen)
    x[:, 5] *= 20
    routed = torch.stack([torch.randperm(6, generator=gen)[:3] for _ in range(tokens)])
    ids = torch.cat([routed, torch.full((tokens, 1), 6)], dim=1)  # 3 routed + the "shared" one
    weights = torch.cat([torch.rand(tokens, 3, generator=gen), torch.ones(tokens, 1)], dim=1)
    ref = gguf_cpu.moe_ref(x, gate_up, down, ids, weights)
    got = gguf_cpu.moe(x, experts, ids, weights)
    # the SwiGLU outputs are requantized: a rounding step may flip one int8 value there
    assert got.shape == ref.shape and rel_err(got, ref) <= 5e-3
    for t in range(tokens):  # each token's result is its own (batch-invariant)
        assert torch.equal(gguf_cpu.moe(x[t : t + 1], experts, ids[t : t + 1], weights[t : t + 1]), got[t : t + 1])
    xb = x.bfloat16()  # bf16 in and out: as converting with torch before and after
    got_bf16 = gguf_cpu.moe(xb, experts, ids, weights, torch.bfloat16)
    want_bf16 = gguf_cpu.moe(xb.float(), experts, ids, weights).bfloat16()
    assert got_bf16.dtype == torch.bfloat16 and torch.equal(got_bf16, want_bf16)


def test_moe_rejects_bad_input():
    _, _, experts = random_experts([32, 32], 64, [gguf_cpu.Q8_0])
    x = torch.randn(1, 64)
    with pytest.raises(ValueError, match="outside"):
        gguf_cpu.moe(x, experts, torch.tensor([[0, 2]]), torch.ones(1, 2))
    with pytest.raises(ValueError):
        gguf_cpu.moe(torch.randn(1, 32), experts, torch.tensor([[0, 1]]), torch.ones(1, 2))
    w = gguf_cpu.repack(random_blocks(gguf_cpu.Q8_0, 64, 64), gguf_cpu.Q8_0, 64, 64)
    with pytest.raises(ValueError, match="SwiGLU"):
        gguf_cpu.R16Experts([w], [w])


def test_gemm_zero_rows_and_blocks():
    w = gguf_cpu.repack(random_blocks(gguf_cpu.Q4_1, 16, 64), gguf_cpu.Q4_1, 16, 64)
    x = torch.zeros(2, 64)  # all-zero activation blocks: scale 0, no division by zero
    assert torch.equal(gguf_cpu.gemm(x, w), torch.zeros(2, 16))


def test_activation_quantization_matches_reference():
    lib = gguf_cpu._get()
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(0)) * 4
    x[1, 32:64] = 0
    q = torch.empty(3, 128, dtype=torch.int8)
    d, s = torch.empty(3, 4), torch.empty(3, 4)
    lib.gguf_quantize_q8(3, 128, x.data_ptr(), q.data_ptr(), d.data_ptr(), s.data_ptr())
    q_ref, d_ref = gguf_cpu.quantize_q8_ref(x)
    assert torch.equal(q.float(), q_ref.reshape(3, 128)) and torch.equal(d, d_ref.reshape(3, 4))
    torch.testing.assert_close(s, d * q.float().reshape(3, 4, 32).sum(-1))


@pytest.mark.parametrize("qtype", TYPES)
def test_dequant_is_exact(qtype):
    blocks = random_blocks(qtype, 70, 160, seed=2)
    ref = dequantize(blocks.reshape(-1), qtype, (70, 160))
    w = gguf_cpu.repack(blocks, qtype, 70, 160)
    assert torch.equal(gguf_cpu.dequant(w, torch.float32), ref)
    assert torch.equal(gguf_cpu.dequant(w, torch.bfloat16), ref.bfloat16())
    chunked = gguf_cpu.repack_ref(blocks, qtype, 70, 160, chunk_rows=16)  # 4 full chunks and a 6-row one
    assert torch.equal(chunked.qs, w.qs) and torch.equal(chunked.sc, w.sc)


def with_edge_scales(blocks: torch.Tensor, qtype: int) -> torch.Tensor:
    """`blocks` with some f16 scales d (and Q4_1 mins) set to edge values: subnormal, the largest finite, values whose
    -8d / -128d overflow f16 or are just below that, infinity, zero and negative zero."""
    nb = blocks.shape[1] // gguf_cpu.BLOCK_BYTES[qtype]
    blk = blocks.clone().reshape(-1, gguf_cpu.BLOCK_BYTES[qtype])
    edges = torch.tensor([1e-7, -6e-8, 65504.0, -8000.0, 8188.0, 511.0, 512.0, float("inf"), 0.0, -0.0, 6.1e-5],
                         dtype=torch.float16).view(torch.uint8).reshape(-1, 2)  # fmt: skip
    idx = torch.randperm(blk.shape[0], generator=torch.Generator().manual_seed(5))[: 3 * len(edges)]
    for i, j in enumerate(idx.tolist()):
        blk[j, :2] = edges[i % len(edges)]
        if qtype == gguf_cpu.Q4_1:
            blk[j, 2:4] = edges[(i + 3) % len(edges)]
    return blk.reshape(-1, nb * gguf_cpu.BLOCK_BYTES[qtype])


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("n,k", [(1, 32), (37, 96), (70, 160), (16, 64), (133, 576)])  # n % 16 != 0 but one
def test_repack_in_c_equals_the_torch_reference(qtype, n, k):
    blocks = with_edge_scales(random_blocks(qtype, n, k, seed=n), qtype)
    w, ref = gguf_cpu.repack(blocks, qtype, n, k), gguf_cpu.repack_ref(blocks, qtype, n, k)
    assert w.qs.shape == ref.qs.shape and w.sc.shape == ref.sc.shape
    assert torch.equal(w.qs, ref.qs) and torch.equal(w.sc.view(torch.int16), ref.sc.view(torch.int16))  # bit for bit


@pytest.mark.parametrize("qtype", TYPES)
def test_repack_of_parts_equals_repack_of_their_concatenation(qtype):
    """Shards stacked by row (gate and up of a fused gate_up, separate tensors in the file), read where they lie."""
    sizes, k = [37, 5, 64, 1], 96
    parts = [random_blocks(qtype, r, k, seed=i) for i, r in enumerate(sizes)]
    whole = gguf_cpu.repack(torch.cat(parts), qtype, sum(sizes), k)
    for repack in (gguf_cpu.repack, gguf_cpu.repack_ref):
        w = repack(parts, qtype, sum(sizes), k)
        assert torch.equal(w.qs, whole.qs) and torch.equal(w.sc.view(torch.int16), whole.sc.view(torch.int16))
    strided = torch.cat([parts[0], parts[0]], dim=1)[:, : parts[0].shape[1]]  # a view that is not contiguous
    assert torch.equal(gguf_cpu.repack([strided], qtype, 37, k).qs, gguf_cpu.repack(parts[0], qtype, 37, k).qs)


@pytest.mark.parametrize("qtype", TYPES)
def test_dequant_row_ranges_into_a_buffer(qtype):
    blocks = random_blocks(qtype, 70, 160, seed=3)
    w = gguf_cpu.repack(blocks, qtype, 70, 160)
    full = gguf_cpu.dequant(w)
    buf = torch.full((70 * 160 + 5,), float("nan"), dtype=torch.bfloat16)
    for a, b in ((0, 70), (16, 48), (64, 70), (0, 16)):
        out = gguf_cpu.dequant(w, rows=(a, b), out=buf)
        assert out.shape == (b - a, 160) and out.data_ptr() == buf.data_ptr() and torch.equal(out, full[a:b])
    # streamed stores (64-byte aligned lines only: a buffer 2 bytes off is stored plainly) write the same values
    shifted = torch.full((70 * 160 + 1,), float("nan"), dtype=torch.bfloat16)[1:]
    assert shifted.data_ptr() % 64 != 0
    for stream in (False, True):
        assert torch.equal(gguf_cpu.dequant(w, stream=stream), full)
        assert torch.equal(gguf_cpu.dequant(w, out=shifted, stream=stream), full)
    for bad in ((8, 32), (16, 40), (48, 16), (0, 71)):  # unaligned start, end inside a group, empty, past the end
        with pytest.raises(ValueError):
            gguf_cpu.dequant(w, rows=bad)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit, NaN where the other is NaN (edge scales make some)."""
    return a.shape == b.shape and torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0), b.nan_to_num(0))


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("sizes,k", [([37], 96), ([16], 64), ([1], 32), ([130], 576), ([21, 5, 40], 160)])
def test_in_place_computes_what_the_repacked_form_does(qtype, sizes, k):
    """Blocks read where they lie (packed a row group at a time inside the kernels) give the repacked weight's
    results bit for bit: gemm at decode and prefill row counts, accumulate, dequant to bf16/float32 and row ranges;
    edge f16 scales, a short last group, and a fused weight's shards (read from each part in turn)."""
    parts = [with_edge_scales(random_blocks(qtype, r, k, seed=i + r), qtype) for i, r in enumerate(sizes)]
    n = sum(sizes)
    packed, raw = gguf_cpu.repack(parts, qtype, n, k), gguf_cpu.in_place(parts, qtype, n, k)
    assert raw.qs.numel() == 0 and raw.nbytes == sum(p.numel() for p in parts)
    for m in (1, 3, 5, 40):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
        want = gguf_cpu.gemm(x, packed)
        assert same(gguf_cpu.gemm(x, raw), want)
        out = torch.randn(m, n)
        assert same(gguf_cpu.gemm(x, raw, out=out.clone()), gguf_cpu.gemm(x, packed, out=out.clone()))
    for dtype in (torch.float32, torch.bfloat16):
        assert same(gguf_cpu.dequant(raw, dtype), gguf_cpu.dequant(packed, dtype))
    if n > 16:
        assert same(gguf_cpu.dequant(raw, rows=(16, n)), gguf_cpu.dequant(packed, rows=(16, n)))
    ref = dequantize(torch.cat(parts).reshape(-1), qtype, (n, k))
    finite = torch.isfinite(ref).all(dim=1)
    assert torch.equal(gguf_cpu.dequant(raw, torch.float32)[finite], ref[finite])


def test_in_place_experts_compute_what_repacked_ones_do():
    ffns, hidden = [64, 64, 128], 96
    gate_up, down, packed = random_experts(ffns, hidden, [gguf_cpu.Q8_0, gguf_cpu.Q4_0])
    # gate and up as two parts, as the file holds them
    raw = gguf_cpu.R16Experts([gguf_cpu.in_place([b[: n // 2], b[n // 2 :]], q, n, hidden) for b, q, n in gate_up],
                              [gguf_cpu.in_place(b, q, hidden, f) for (b, q, _), f in zip(down, ffns)])  # fmt: skip
    for tokens in (1, 7):
        gen = torch.Generator().manual_seed(tokens)
        x = torch.randn(tokens, hidden, generator=gen)
        ids = torch.stack([torch.randperm(3, generator=gen)[:2] for _ in range(tokens)])
        weights = torch.rand(tokens, 2, generator=gen)
        assert torch.equal(gguf_cpu.moe(x, raw, ids, weights), gguf_cpu.moe(x, packed, ids, weights))


def test_in_place_rejects_what_it_cannot_read():
    blocks = random_blocks(gguf_cpu.Q8_0, 32, 64)
    with pytest.raises(ValueError, match="at most"):
        gguf_cpu.in_place([blocks[i : i + 8] for i in range(0, 32, 8)], gguf_cpu.Q8_0, 32, 64)
    with pytest.raises(ValueError, match="contiguous"):
        gguf_cpu.in_place(torch.cat([blocks, blocks], dim=1)[:, : blocks.shape[1]], gguf_cpu.Q8_0, 32, 64)


def test_store_picker_follows_the_cheaper_stores():
    picker = gguf_cpu.StorePicker(probe_every=4, margin=1.3, decay=0.5)
    assert picker.pick() is False  # plain first
    picker.record(False, 3e-3, 10**6)
    assert picker.pick() is True  # then streamed once, to compare
    picker.record(True, 1e-3, 10**6)
    assert picker.best() is True  # plain cost 3x streamed
    assert [picker.pick() for _ in range(4)] == [True, False, True, True]  # every 4th call tries the other
    for _ in range(3):  # plain becomes as cheap as streamed: back to plain, which leaves the weight in cache
        picker.record(False, 1e-3, 10**6)
    assert picker.best() is False
    picker.record(False, 1.2e-3, 10**6)  # within the margin
    assert picker.best() is False


def test_dequant_linear_in_tiles_equals_whole(monkeypatch):
    # a weight larger than the scratch buffer is dequantized and multiplied a tile of rows at a time: same result
    from hearth.layers import linear

    blocks = random_blocks(gguf_cpu.Q4_1, 200, 160, seed=4)
    w = gguf_cpu.repack(blocks, gguf_cpu.Q4_1, 200, 160)
    x = torch.randn(40, 160, generator=torch.Generator().manual_seed(5)).bfloat16()
    whole = linear.dequant_linear(x, w)
    assert torch.equal(whole, torch.nn.functional.linear(x, gguf_cpu.dequant(w)))
    monkeypatch.setattr(linear, "DEQUANT_SCRATCH_BYTES", 48 * 160 * 2)  # tiles of 48 rows: 4 and a 8-row one
    monkeypatch.setattr(linear, "_scratch", threading.local())
    tiled = linear.dequant_linear(x, w)
    assert tiled.shape == (40, 200)
    assert torch.equal(tiled, whole)  # each output is one dot product over K in either case


def test_quantize_q8_0_requantizes_within_half_a_step():
    w = torch.randn(50, 96, generator=torch.Generator().manual_seed(4))
    blocks = gguf_cpu.quantize_q8_0(lambda a, b: w[a:b], 50, 96, chunk=16)
    back = dequantize(blocks.reshape(-1), gguf_cpu.Q8_0, (50, 96))
    step = (w.reshape(50, 3, 32).abs().amax(-1, keepdim=True) / 127).expand(50, 3, 32).reshape(50, 96)
    assert ((back - w).abs() <= step * (0.5 + 127 * 2**-11)).all()  # half a step, + 127 x the f16 rounding of it


def test_unsupported_inputs_raise():
    blocks = random_blocks(gguf_cpu.Q4_0, 4, 64)
    with pytest.raises(ValueError):
        gguf_cpu.repack(blocks, 12, 4, 64)  # Q4_K: not read by the kernel
    with pytest.raises(ValueError):
        gguf_cpu.repack(blocks[:2], gguf_cpu.Q4_0, 4, 64)  # fewer bytes than 4 rows
    with pytest.raises(ValueError):
        gguf_cpu.repack([blocks[:1, :10], blocks.reshape(-1)[10:]], gguf_cpu.Q4_0, 4, 64)  # parts not whole rows
    with pytest.raises(ValueError):
        gguf_cpu.repack(blocks.view(torch.int8), gguf_cpu.Q4_0, 4, 64)  # not bytes


# ---- the fused decode step on SmolLM2 ----


@pytest.fixture(scope="module")
def engines():
    from hearth import LLM

    fast = LLM("smollm2", max_model_len=512, max_num_seqs=4, kv_cache_memory="64MiB")
    ref = LLM("smollm2", dtype="float32", max_model_len=512, max_num_seqs=4, kv_cache_memory="128MiB")
    assert fast.engine.runner.fused_decode is not None and ref.engine.runner.fused_decode is None
    return fast, ref


def caches(runner):
    return [(m.k_cache, m.v_cache) for m in runner.model.modules() if getattr(m, "k_cache", None) is not None]


TEXT = (
    "The history of the city begins with a small settlement on the river, where traders met to exchange salt, "
    "grain and wool. Over the centuries the market grew into a town with walls, a cathedral and a university, and "
    "its printers, bankers and engineers became known across the continent. "
) * 3


def prefilled_sequences(fast, ref, lengths: list[int], seed: int = 1):
    """Sequences of real text whose first `length - 1` tokens are cached, in scattered blocks, and that decode their
    last token next. The float32 model fills the cache; both engines then hold the same bf16 values."""
    from hearth.engine.scheduler import Batch
    from hearth.engine.sequence import Sequence
    from hearth.layers.context import reset_context
    from hearth.sampling_params import SamplingParams

    g = torch.Generator().manual_seed(seed)
    ids = fast.tokenizer.encode(TEXT)
    free_blocks = torch.randperm(170, generator=g).tolist()  # scattered, none shared
    seqs = []
    for i, length in enumerate(lengths):
        seq = Sequence(ids[i * 7 : i * 7 + length], SamplingParams())
        seq.block_table = [free_blocks.pop() for _ in range((length + 15) // 16)]
        seqs.append(seq)
    runner = ref.engine.runner
    with torch.inference_mode():
        try:
            runner.model(*runner.prepare(Batch(seqs, [len(s) - 1 for s in seqs]))[:2])
        finally:
            reset_context()
    for seq in seqs:
        seq.num_computed_tokens = len(seq) - 1
    for (k, v), (rk, rv) in zip(caches(fast.engine.runner), caches(ref.engine.runner)):
        k.copy_(rk)
        v.copy_(rv)
        rk.copy_(k.float())
        rv.copy_(v.float())
    return seqs


@torch.inference_mode()
def torch_path_logits(runner, seqs) -> torch.Tensor:
    from hearth.engine.scheduler import Batch
    from hearth.layers.context import reset_context

    ids, positions, rows = runner.prepare(Batch(list(seqs), [1] * len(seqs)))
    try:
        hidden = runner.model(ids, positions)
    finally:
        reset_context()
    return runner.model.compute_logits(hidden[rows]).float()


def test_fused_decode_batched_equals_one_at_a_time(engines):
    fast, ref = engines
    runner = fast.engine.runner
    seqs = prefilled_sequences(fast, ref, [5, 40, 130, 17])
    together = runner.run_fused_decode(seqs)
    for i, seq in enumerate(seqs):
        assert torch.equal(runner.run_fused_decode([seq])[0], together[i])


def test_build_fused_decode_applies_only_where_it_can(engines):
    """The transform: a decoder for the GGUF-quantized Llama model over its bf16 cache, the same logits as the one the
    runner built; None for the float32 model (no GGUF blocks) and for a module of another kind."""
    fast, ref = engines
    runner = fast.engine.runner
    decoder = build_fused_decode(runner.model)
    assert isinstance(decoder, llama_decode.LlamaDecoder)
    assert build_fused_decode(ref.engine.runner.model) is None
    assert build_fused_decode(torch.nn.Linear(32, 32)) is None
    seqs = prefilled_sequences(fast, ref, [12, 70], seed=3)
    expected = runner.run_fused_decode(seqs)
    saved, runner.fused_decode = runner.fused_decode, decoder
    try:
        assert torch.equal(runner.run_fused_decode(seqs), expected)
    finally:
        runner.fused_decode = saved


def test_fused_decode_is_no_less_exact_than_the_torch_path(engines):
    """Logits of 4 decoding sequences of real text: the fused C step and the bf16 torch path, each against the float32
    model (dequantized weights, float activations) on the same cache contents."""
    fast, ref = engines
    seqs = prefilled_sequences(fast, ref, [9, 33, 200, 64, 20, 50, 120, 6], seed=5)
    exact = torch_path_logits(ref.engine.runner, seqs)
    torch_bf16 = torch_path_logits(fast.engine.runner, seqs)
    fused = fast.engine.runner.run_fused_decode(seqs)
    err_fused = [rel_err(fused[i], exact[i]) for i in range(len(seqs))]
    err_torch = [rel_err(torch_bf16[i], exact[i]) for i in range(len(seqs))]
    # measured: both ~2.5% of the largest logit per row (int8 activations in both, bf16 residuals in the torch path)
    assert max(err_fused) <= 0.06, err_fused
    assert sum(err_fused) <= 1.5 * sum(err_torch), (err_fused, err_torch)
    # the same top token wherever the exact logits have a clear winner
    top2 = exact.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.5
    assert torch.equal(fused.argmax(-1)[clear], exact.argmax(-1)[clear])


def test_int8_prefill_is_nearly_as_exact_and_batch_invariant(engines):
    """--int8-prefill: prefill logits of real text against the float32 model, next to the bf16 path's; and a prompt's
    greedy continuation is the same alone and batched with others (each row's int8 arithmetic is its own)."""
    from conftest import prefill_logits

    from hearth import LLM
    from hearth.sampling_params import SamplingParams

    fast, ref = engines
    ids = torch.tensor(fast.tokenizer.encode(TEXT)[:200])
    exact = prefill_logits(ref.engine.runner.model, ids)
    bf16 = prefill_logits(fast.engine.runner.model, ids)
    int8 = LLM("smollm2", max_model_len=512, max_num_seqs=4, kv_cache_memory="64MiB", int8_prefill=True)
    assert all(m.int8_activations for m in int8.engine.runner.model.modules() if getattr(m, "blocks", None) is not None)
    q8 = prefill_logits(int8.engine.runner.model, ids)

    def err(logits):  # per position, relative to the largest exact logit
        return ((logits - exact).abs().amax(-1) / exact.abs().amax(-1)).mean().item()

    # measured on 300 tokens of this README: bf16 1.8%, int8 2.9% mean per position
    assert err(q8) <= 2 * err(bf16), (err(q8), err(bf16))
    top2 = exact.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.5
    assert torch.equal(q8.argmax(-1)[clear], exact.argmax(-1)[clear])
    prompts = [ids[:40].tolist(), ids[50:170].tolist(), ids[7:20].tolist()]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    together = [o.token_ids for o in int8.generate(prompts, params)]
    assert together == [int8.generate([p], params)[0].token_ids for p in prompts]


def test_fused_decode_sliding_window_matches_torch_path(engines):
    """A sliding window (Mistral / Qwen2 layer types) in the C attention against the torch attention's mask."""
    fast, ref = engines
    window = 24
    models = [fast.engine.runner.model, ref.engine.runner.model]
    for model in models:
        for layer in model.model.layers:
            layer.self_attn.attn.sliding_window = window
    try:
        decoder = build_fused_decode(fast.engine.runner.model)
        seqs = prefilled_sequences(fast, ref, [10, 100], seed=9)
        exact = torch_path_logits(ref.engine.runner, seqs)
        runner = fast.engine.runner
        saved, runner.fused_decode = runner.fused_decode, decoder
        try:
            fused = runner.run_fused_decode(seqs)
        finally:
            runner.fused_decode = saved
        assert rel_err(fused, exact) <= 0.05
        # and the window matters: without it the long sequence's logits move
        full = runner.run_fused_decode(seqs)
        assert rel_err(full[1:], exact[1:]) > 2 * rel_err(fused[1:], exact[1:])
    finally:
        for model in models:
            for layer in model.model.layers:
                layer.self_attn.attn.sliding_window = None


def test_decoder_struct_matches_c_layout():
    # the ctypes mirrors against the C compiler's layout
    sizes = (ctypes.sizeof(gguf_cpu.R16), ctypes.sizeof(llama_decode.LayerWeights), ctypes.sizeof(llama_decode.ModelWeights))
    assert llama_decode.struct_sizes() == sizes
    assert llama_decode.decoder_supports(576, 9, 3, 64, 1536)
    assert not llama_decode.decoder_supports(576, 9, 3, 64, 1530)  # intermediate not a multiple of 32
    assert not llama_decode.decoder_supports(576, 64, 2, 9, 1536)  # 32 query heads per KV head
