"""The bf16 elementwise kernels (hearth/kernels/elementwise_cpu.c) against their plain-torch refs and the layers' paths.

Tolerances, and why:
- the residual sum of add + RMSNorm, and the rotary embedding: bit-exact. Both are the refs' steps in the same order
  (rope: x * cos rounded to bf16, then the other product, exact in float32, added with one rounding), rounded to bf16
  to nearest even, denormals included.
- RMSNorm's output: the float32 sum of squares is added in another order than ATen's, which moves 1 / rms by a float32
  ulp or so; the output may then round the other way: at most one bf16 step (2^-7 of the value, bf16 keeping 8
  significant bits) and in a small fraction of elements.
- SiLU-and-mul: the vectorised exp differs from torch's by a few float32 ulps, so bf16(silu) may round the other way
  (one bf16 step), which the product rounding can carry to two: 2^-6 of the value, in a small fraction of elements.
The plain-C fallback (a build without -march flags) is held to the same bounds.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F

from hearth.kernels import elementwise_cpu as ew
from hearth.layers.activation import SiluAndMul
from hearth.layers.norm import RMSNorm
from hearth.layers.rotary import RotaryEmbedding, apply_rotary_emb, apply_rotary_emb_

pytestmark = pytest.mark.skipif(not ew.available(), reason="no C compiler")
ROWS = [1, 7, 513]


@pytest.fixture(scope="module")
def plain_c_lib(tmp_path_factory) -> ctypes.CDLL:
    """The library built without -m flags: the scalar fallback."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    path = str(tmp_path_factory.mktemp("elementwise") / "elementwise_plain.so")
    subprocess.run([compiler, "-O3", "-fopenmp", "-shared", "-fPIC", "-std=c11", ew.SOURCE, "-o", path, "-lm"],
                   check=True, capture_output=True)  # fmt: skip
    lib = ctypes.CDLL(path)
    ew._declare(lib)
    assert lib.ew_vectorized() == 0
    return lib


@pytest.fixture(params=["native", "plain C"])
def lib(request, monkeypatch):
    """Each test runs on the library as hearth builds it (-march=native) and on the scalar fallback in its place."""
    if request.param == "plain C":
        plain = request.getfixturevalue("plain_c_lib")
        monkeypatch.setattr(ew, "_get", lambda: plain)
    return request.param


def bf16_randn(*shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).bfloat16()


def assert_within(ours: torch.Tensor, ref: torch.Tensor, rel: float, max_fraction: float) -> None:
    """Elementwise |ours - ref| <= rel * |ref|, and at most `max_fraction` of the elements differ at all."""
    diff = (ours.double() - ref.double()).abs()
    assert (diff <= rel * ref.double().abs()).all(), diff.max().item()
    assert (ours != ref).float().mean().item() <= max_fraction


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("h", [576, 100, 33])  # not multiples of 16: masked tails
def test_add_rms_norm(lib, m, h):
    x, residual, weight = bf16_randn(m, h, seed=m), bf16_randn(m, h, seed=h), bf16_randn(h, seed=1, scale=0.5)
    ref, ref_sum = ew.rms_norm_ref(x, weight, 1e-5, residual)
    assert ew.can_rms_norm(x, weight, residual)
    res = residual.clone()
    out = ew.rms_norm(x, weight, 1e-5, res)
    assert torch.equal(res, ref_sum) and torch.equal(res, x + residual)  # in place, torch's bf16 add bit for bit
    assert_within(out, ref, 2**-7, 0.01)
    assert_within(ew.rms_norm(x, weight, 1e-5), ew.rms_norm_ref(x, weight, 1e-5), 2**-7, 0.01)


def test_rms_norm_strided_rows_and_denormals(lib):
    wide, wide_res = bf16_randn(64, 700, seed=2), bf16_randn(64, 650, seed=3)
    x, residual = wide[:, 100:676], wide_res[:, 10:586]  # rows 700 and 650 apart
    x[:4] = x[:4] * 1e-38  # sums in the denormal range: rounded as torch does, not flushed to zero
    residual[:4] = residual[:4] * 1e-38
    weight = bf16_randn(576, seed=4)
    ref, ref_sum = ew.rms_norm_ref(x, weight, 1e-6, residual)
    before = wide_res.clone()
    out = ew.rms_norm(x, weight, 1e-6, residual)
    assert torch.equal(residual, ref_sum) and (ref_sum[:4] != 0).any()
    assert torch.equal(wide_res[:, :10], before[:, :10]) and torch.equal(wide_res[:, 586:], before[:, 586:])
    assert_within(out, ref, 2**-7, 0.01)


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("inter", [1536, 100, 7])
def test_silu_and_mul(lib, m, inter):
    x = bf16_randn(m, 2 * inter, seed=m + inter, scale=3.0)
    assert ew.can_silu_and_mul(x)
    assert_within(ew.silu_and_mul(x), ew.silu_and_mul_ref(x), 2**-6, 0.001)


def test_silu_and_mul_strided_and_extremes(lib):
    wide = bf16_randn(9, 300, seed=5, scale=4.0)
    x = wide[:, 20:276]  # [gate | up] of 128 each, rows 300 apart
    gate = torch.tensor([-1e4, -100.0, -88.7, -87.5, -87.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 87.0, 88.7, 100.0, 1e4,
                         float("inf"), float("-inf"), float("nan"), 1e-38])  # fmt: skip
    x[0, : len(gate)] = gate.bfloat16()
    x[0, 128 : 128 + len(gate)] = 1.5
    ours, ref = ew.silu_and_mul(x), ew.silu_and_mul_ref(x)
    torch.testing.assert_close(ours[0, : len(gate)], ref[0, : len(gate)], atol=0, rtol=0, equal_nan=True)
    assert_within(ours[1:], ref[1:], 2**-6, 0.001)


def rope_tables(positions: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 tables a bf16 model's rows come from (RotaryEmbedding.forward rounds the float32 rows the same way)."""
    rotary = RotaryEmbedding(d, positions, 10000.0)
    return rotary.cos.bfloat16(), rotary.sin.bfloat16()


@pytest.mark.parametrize("t", ROWS)
@pytest.mark.parametrize("d", [64, 40, 128])  # d / 2 = 20: masked tails
def test_rotary_in_place_on_qkv_view(lib, t, d):
    heads, kv_heads = 9, 3
    cos, sin = rope_tables(2048, d)
    positions = torch.randint(0, 2048, (t,), generator=torch.Generator().manual_seed(t))
    qkv = bf16_randn(t, (heads + 2 * kv_heads) * d, seed=d, scale=2.0)
    v_before = qkv[:, (heads + kv_heads) * d :].clone()
    qk = qkv[:, : (heads + kv_heads) * d].view(t, heads + kv_heads, d)  # rows (heads + 2 kv_heads) * d apart
    cos, sin = cos[positions], sin[positions]  # the rows of the tokens' positions, as the Llama layers pass them
    x = qk.clone()
    ref = ew.rotary_ref(x, cos, sin)
    assert ew.can_rotary(qk, cos, sin)
    assert ew.rotary_(qk, cos, sin) is qk
    assert torch.equal(qk, ref) and torch.equal(qkv[:, (heads + kv_heads) * d :], v_before)
    # the same through the layer function, and the layers' torch path (HF's bf16 rope), bit for bit
    rows = x.clone()
    assert torch.equal(apply_rotary_emb_(rows, cos, sin), ref)
    assert torch.equal(apply_rotary_emb(x, cos, sin), ref)


@pytest.mark.parametrize("t", [1, 5])
def test_rotary_on_rope_dims_of_each_head(lib, t):
    """MLA's rope parts: the last 64 of each head's 192 query dims ([T, H, 64], heads 192 apart) and the last 64 of
    the 576-dim latent row ([T, 1, 64]); the other dims stay as they were."""
    cos, sin = rope_tables(256, 64)
    positions = torch.randint(0, 256, (t,), generator=torch.Generator().manual_seed(t))
    cos, sin = cos[positions], sin[positions]
    q = bf16_randn(t, 16 * 192, seed=22, scale=2.0).view(t, 16, 192)
    kv = bf16_randn(t, 576, seed=23, scale=2.0)
    for full, part in ((q, q[..., 128:]), (kv, kv[:, 512:][:, None])):
        before = full.clone()
        ref = ew.rotary_ref(part.clone(), cos, sin)
        assert ew.can_rotary(part, cos, sin)
        assert torch.equal(apply_rotary_emb_(part, cos, sin), ref)
        changed = (full != before).flatten(0, -2).any(0)
        assert not changed[: full.shape[-1] - 64].any()


def test_rotary_denormals(lib):
    cos, sin = rope_tables(64, 64)
    x = bf16_randn(5, 1, 64, seed=6) * 1e-37  # products near and below 2^-126
    ref = ew.rotary_ref(x, cos[:5], sin[:5])
    assert torch.equal(ew.rotary_(x.clone(), cos[:5], sin[:5]), ref) and (ref.abs() < 1.2e-38).any()


def test_guards():
    x, w = bf16_randn(4, 64, seed=7), bf16_randn(64, seed=8)
    assert ew.can_rms_norm(x, w) and ew.can_rms_norm(x, w, bf16_randn(4, 64, seed=9))
    assert not ew.can_rms_norm(x.float(), w)
    assert not ew.can_rms_norm(x, w.float())
    assert not ew.can_rms_norm(x.t(), bf16_randn(4, seed=10))  # columns not contiguous
    assert not ew.can_rms_norm(x[None], w)  # 2-D only
    assert not ew.can_rms_norm(x, w, bf16_randn(4, 32, seed=11))
    # the residual is written in place: rows that overlap each other or x would race or read what was just written
    assert not ew.can_rms_norm(x, w, bf16_randn(64, seed=19).expand(4, 64))
    buf = bf16_randn(5, 64, seed=20)
    assert not ew.can_rms_norm(buf[1:], w, buf[:4]) and ew.can_rms_norm(buf[:4], w, buf[:4].clone())
    assert ew.can_rms_norm(x, w, x)  # the very same tensor: x + x, each row read before it is written
    assert ew.can_silu_and_mul(x) and not ew.can_silu_and_mul(x[:, :63]) and not ew.can_silu_and_mul(x.float())
    cos, sin = rope_tables(16, 64)
    q = bf16_randn(4, 3, 64, seed=12)
    assert ew.can_rotary(q, cos[:4], sin[:4])
    assert not ew.can_rotary(q, cos, sin)  # 16 rows for 4 tokens
    assert not ew.can_rotary(q, cos[:4].float(), sin[:4].float())  # float32 rows: the torch path
    assert not ew.can_rotary(q.float(), cos[:4], sin[:4])
    assert not ew.can_rotary(q.transpose(0, 1), cos[:3], sin[:3])  # tokens between one token's heads
    overlapping_heads = bf16_randn(4, 160, seed=21).as_strided((4, 3, 64), (160, 32, 1))
    assert not ew.can_rotary(overlapping_heads, cos[:4], sin[:4])
    assert not ew.can_rotary(q[:1].expand(4, 3, 64), cos[:4], sin[:4])  # tokens overlapping: rotated twice
    assert not ew.can_rotary(q[..., :63], cos[:4, :63].contiguous(), sin[:4, :63].contiguous())  # odd head_dim


def test_layers_use_the_kernels_in_bf16_and_torch_in_float32():
    norm = RMSNorm(100, 1e-5)
    norm.weight.data = torch.randn(100, generator=torch.Generator().manual_seed(13))
    x, residual = bf16_randn(7, 100, seed=14), bf16_randn(7, 100, seed=15)
    # float32: the exact torch path
    xf, rf = x.float(), residual.float()
    out, new_res = norm(xf, rf)
    assert torch.equal(new_res, xf + rf) and torch.equal(out, F.rms_norm(xf + rf, (100,), norm.weight, 1e-5))
    # bf16: the kernel, the sum written into the residual it was given
    norm.weight.data = norm.weight.data.bfloat16()
    res = residual.clone()
    out, new_res = norm(x, res)
    assert new_res is res and torch.equal(res, x + residual)
    assert torch.equal(out, ew.rms_norm(x, norm.weight, 1e-5, residual.clone()))
    assert torch.equal(norm(x), ew.rms_norm(x, norm.weight, 1e-5))
    gpt_oss_norm = RMSNorm(100, 1e-5, scale_in_float32=True)  # gpt-oss's order stays torch's
    gpt_oss_norm.weight.data = norm.weight.data.clone()
    ref = F.rms_norm(x.float(), (100,), norm.weight.float(), 1e-5).bfloat16()
    assert torch.equal(gpt_oss_norm(x), ref)

    act, g = SiluAndMul(), bf16_randn(7, 64, seed=16)
    assert torch.equal(act(g), ew.silu_and_mul(g))
    assert torch.equal(act(g.float()), F.silu(g.float()[:, :32]) * g.float()[:, 32:])

    positions = torch.tensor([3, 0, 9])
    rope = RotaryEmbedding(64, 16, 10000.0)
    cos, sin = rope(positions, torch.bfloat16)
    q = bf16_randn(3, 4, 64, seed=18)
    assert torch.equal(apply_rotary_emb_(q.clone(), cos, sin), apply_rotary_emb(q, cos, sin))
    cos, sin = rope(positions, torch.float32)
    assert torch.equal(apply_rotary_emb_(q.float(), cos, sin), apply_rotary_emb(q.float(), cos, sin))  # torch path


def test_bf16_llama_uses_the_kernels_and_matches_the_torch_path(tiny_llama3, monkeypatch):
    from conftest import prefill_logits

    from hearth import LLM

    folder, _ = tiny_llama3
    model = LLM(folder, dtype="bfloat16", max_model_len=128).engine.runner.model
    ids = torch.randint(0, 256, (70,), generator=torch.Generator().manual_seed(17))
    calls = {}
    for name in ("rms_norm", "silu_and_mul", "rotary_"):
        fn = getattr(ew, name)
        monkeypatch.setattr(ew, name, lambda *a, _fn=fn, _name=name: calls.update({_name: True}) or _fn(*a))
    ours = prefill_logits(model, ids)
    assert set(calls) == {"rms_norm", "silu_and_mul", "rotary_"}
    for guard in ("can_rms_norm", "can_silu_and_mul", "can_rotary"):
        monkeypatch.setattr(ew, guard, lambda *a: False)
    torch_path = prefill_logits(model, ids)
    assert (ours - torch_path).abs().max().item() <= 0.01 * torch_path.abs().max().item()  # equal here
