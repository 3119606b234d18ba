"""Fast CPU paths against their plain references (docs/architecture.md: kernels against *_ref), and the bf16 engine path against
the float32 one by greedy agreement.

| fast path                          | reference                         | tolerance (max |err| / max |ref|)          |
|------------------------------------|-----------------------------------|--------------------------------------------|
| int4_mm (packed int4, bf16 act.)   | int4_mm_ref (dequantize, fp32 mm) | 1e-2: bf16 activations and accumulation    |
| int4_mm_dense (dequant → bf16 mm)  | int4_mm_ref                       | 1e-2: bf16 weights and activations         |
| dequantize_int4 (unpack)           | (q - 8) * scale + zero, float32   | exact nibbles; values within 1 bf16 ulp    |
| int8_mm (per-row int8, bf16 act.)  | int8_mm_ref                       | 1e-2                                       |
| gguf_cpu kernels                   | see test_gguf_kernels.py          |                                            |
| Linear on real SmolLM2 Q4_1 / Q8_0 | GGUF dequantize(), fp32 matmul    | 2e-2; 3e-2 for Q8_0 (per-row int8 requant) |
|   (C kernels on the file's blocks) |                                   | 2e-2                                       |
| single-sequence decode attention   | the batched decode path           | 1e-5 in float32                            |
| bf16 engine, greedy 16 tokens      | float32 engine                    | equal, or each token in the other's top-5  |
"""

from __future__ import annotations

import pytest
import torch

from hearth.kernels.int4_mm import (
    can_dequantize,
    dequantize_int4,
    int4_mm,
    int4_mm_dense,
    int4_mm_ref,
    pack_int4,
    unpack_int4,
)
from hearth.kernels.int8_mm import int8_mm, int8_mm_ref, quantize_per_row


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def random_int4(n: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    nibbles = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    scales = torch.rand(n, k // 32, generator=g) * 0.02 + 0.001
    zeros = torch.randn(n, k // 32, generator=g) * 0.02
    # the kernel holds scales and zeros in bf16: give the reference the same values
    return nibbles, scales.bfloat16().float(), zeros.bfloat16().float()


@pytest.mark.parametrize("n,k", [(960, 576), (3072, 576), (576, 1536), (64, 64)])
@pytest.mark.parametrize("m", [1, 7, 96])
def test_int4_mm_matches_reference(n, k, m):
    nibbles, scales, zeros = random_int4(n, k)
    packed, scales_and_zeros = pack_int4(nibbles, scales, zeros)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1))
    ref = int4_mm_ref(x, nibbles, scales, zeros, 32)
    assert rel_err(int4_mm(x.bfloat16(), packed, scales_and_zeros, 32), ref) <= 1e-2
    assert rel_err(int4_mm(x, packed, scales_and_zeros, 32), ref) <= 1e-2  # float32 in, float32 out
    if can_dequantize(n, k):
        assert rel_err(int4_mm_dense(x.bfloat16(), packed, scales_and_zeros, 32), ref) <= 1e-2


@pytest.mark.parametrize("n,k", [(960, 576), (576, 1536), (128, 64)])
def test_unpack_and_dequantize_int4(n, k):
    if not can_dequantize(n, k):
        pytest.skip("this CPU's int4 packing differs from the AVX-512 layout; the dense path is off")
    nibbles, scales, zeros = random_int4(n, k, seed=2)
    packed, scales_and_zeros = pack_int4(nibbles, scales, zeros)
    assert torch.equal(unpack_int4(packed, n, k), nibbles.t())
    w = (nibbles.float() - 8) * scales.repeat_interleave(32, 1) + zeros.repeat_interleave(32, 1)
    w_t = dequantize_int4(packed, scales_and_zeros, n, k, 32, torch.float32)
    torch.testing.assert_close(w_t, w.t(), atol=1e-6, rtol=1e-6)
    bf16 = dequantize_int4(packed, scales_and_zeros, n, k, 32)
    torch.testing.assert_close(bf16.float(), w.t(), atol=0, rtol=2**-8)


def test_can_dequantize_refuses_unsupported_shapes():
    assert not can_dequantize(48, 64)  # not a whole number of 64-row blocks


@pytest.mark.parametrize("m", [1, 5, 64])
def test_int8_mm_matches_reference(m):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(1000, 576, generator=g)
    q, scales = quantize_per_row(w)
    assert (q.float() * scales[:, None] - w).abs().max() <= scales.max() / 2 + 1e-6
    x = torch.randn(m, 576, generator=g)
    ref = int8_mm_ref(x, q, scales)
    assert rel_err(int8_mm(x.bfloat16(), q, scales.bfloat16()), ref) <= 1e-2


@pytest.fixture(scope="module")
def smollm2_tensors(smollm2_path):
    from hearth.loader.gguf import open_gguf

    wanted = {"blk.0.attn_q.weight", "blk.0.ffn_down.weight", "blk.5.ffn_gate.weight", "token_embd.weight"}
    return {name: t for name, t in open_gguf(smollm2_path).iter_tensors() if name in wanted}


@pytest.mark.parametrize("c_kernels", [True, False])
@pytest.mark.parametrize("name", ["blk.0.attn_q.weight", "blk.0.ffn_down.weight", "blk.5.ffn_gate.weight",
                                  "token_embd.weight"])  # fmt: skip
def test_linear_on_real_smollm2_layers(smollm2_tensors, name, c_kernels, monkeypatch):
    """A GGUF Linear against the dequantized float32 product, with the C kernels (the file's blocks) and without
    them (PyTorch's packed int4 / per-row int8)."""
    from hearth.kernels import gguf_cpu
    from hearth.layers.linear import DENSE_MIN_TOKENS, Linear

    if c_kernels and not gguf_cpu.available():
        pytest.skip("no C compiler")
    if not c_kernels:
        monkeypatch.setattr(gguf_cpu, "available", lambda: False)
    qt = smollm2_tensors[name]
    n, k = qt.shape
    layer = Linear(k, n)
    layer.weight_loader(qt)
    layer.finalize(torch.bfloat16)
    if c_kernels:
        assert layer.blocks is not None and layer.blocks.qtype == qt.qtype and layer.packed is None
    else:
        assert layer.blocks is None and (layer.packed is not None) == (qt.type_name in ("Q4_0", "Q4_1"))
    w = qt.dequantize().float()
    for m in (1, DENSE_MIN_TOKENS + 1):  # the few-rows kernel, then (where the layout allows) the dense path
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
        tol = 2e-2 if layer.packed is not None or c_kernels else 3e-2
        assert rel_err(layer(x.bfloat16()), x @ w.t()) <= tol, (name, m)


def test_single_decode_attention_matches_batched_path():
    from hearth.layers.attention import Attention
    from hearth.layers.context import Context, reset_context, set_context

    torch.manual_seed(0)
    heads, kv_heads, dim, bs = 6, 2, 16, 4
    for window in (None, 5):
        attn = Attention(heads, dim, kv_heads, dim**-0.5, window)
        attn.k_cache = torch.randn(12, bs, kv_heads, dim)
        attn.v_cache = torch.randn(12, bs, kv_heads, dim)
        table = torch.tensor([7, 2, 9, 4])  # scattered blocks
        length = 14
        slots = (table[:, None] * bs + torch.arange(bs)).view(-1)[:length]
        q, k, v = torch.randn(1, heads, dim), torch.randn(1, kv_heads, dim), torch.randn(1, kv_heads, dim)
        common = dict(q_starts=[0, 1], context_lens=[length], slot_mapping=slots[-1:], block_tables=table[None],
                      block_size=bs, decode_seq_idx=[0], decode_rows=torch.tensor([0]),
                      decode_context_lens=torch.tensor([length]), decode_block_tables=table[None],
                      decode_mask=(torch.arange(16) < length).view(1, 1, 1, -1))  # fmt: skip
        outs = []
        for single in (None, slots):
            set_context(Context(**common, single_decode_slots=single))
            try:
                outs.append(attn(q, k, v))
            finally:
                reset_context()
        torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


def greedy(llm, prompt: list[int], n: int):
    from hearth.sampling_params import SamplingParams

    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=5))[0]
    return out.token_ids, [{t for t, _ in lp.top} for lp in out.logprobs]


@pytest.mark.slow
def test_bf16_quantized_greedy_agrees_with_float32():
    """The default bf16 path (packed int4, int8 LM head, dense prefill, single-decode attention) against float32:
    the same greedy tokens, or at the first difference each side's token in the other's top-5."""
    from hearth import LLM

    fast = LLM("smollm2", max_model_len=256, max_num_seqs=1)
    ref = LLM("smollm2", dtype="float32", max_model_len=256, max_num_seqs=1)
    assert fast.engine.runner.dtype == torch.bfloat16
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village by the sea,"]
    filler = " The quick brown fox jumps over the lazy dog." * 12  # a long prompt goes through the dense prefill
    for text in prompts + [filler + " In summary,"]:
        ids = fast.tokenizer.encode(text)
        ours, our_top = greedy(fast, ids, 16)
        theirs, their_top = greedy(ref, ids, 16)
        for i, (a, b) in enumerate(zip(ours, theirs)):
            if a != b:
                assert a in their_top[i] and b in our_top[i], (text, i, a, b)
                break


def test_cpu_linear_pads_rows_to_few_shapes():
    """oneDNN keeps kernels for every matmul shape it sees, so CPU matmuls pad their rows to a few bucket sizes: the
    padded product's rows equal the unpadded ones (within bf16 rounding), and a 512-token budget sees ≤ 20 sizes."""
    from hearth.layers.linear import cpu_linear, row_bucket

    sizes = {row_bucket(m) for m in range(16, 513)}
    assert len(sizes) <= 20 and all(row_bucket(m) >= m for m in range(1, 5000))
    assert all(row_bucket(m) == m for m in range(1, 16))  # decode batches keep their shape
    assert all(row_bucket(m) - m < (16 if m <= 128 else 32 if m <= 512 else 64) for m in range(1, 2049))
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 64, generator=g).bfloat16()
    bias = torch.randn(96, generator=g).bfloat16()
    for m in (1, 17, 130, 333):
        x = torch.randn(m, 64, generator=g).bfloat16()
        out = cpu_linear(x, w, bias)
        assert out.shape == (m, 96)
        ref = x.double() @ w.double().t() + bias.double()
        assert (out.double() - ref).abs().max() <= 2**-7 * ref.abs().max()
