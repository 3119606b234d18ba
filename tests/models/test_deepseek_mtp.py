"""DeepSeek-V3's MTP layer as a speculative proposer (`speculative="mtp"`), on tiny random checkpoints that carry one:
its logits against a reference written here (transformers does not run the MTP layer), greedy output identical to
plain decoding through continuous batching, preemption and prefix hits (HF and GGUF), acceptance when the layer
predicts well, no block leaked after random requests with aborts, and the errors for models without the layer."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch
from engine.test_speculative import run
from safetensors import safe_open
from safetensors.torch import save_file
from test_deepseek_v3 import build_hf, one_thread, write_deepseek2_gguf  # noqa: F401 (one_thread: autouse)

from hearth.config import EngineConfig
from hearth.engine.llm_engine import LLMEngine
from hearth.loader.resolve import resolve_model
from hearth.sampling_params import SamplingParams

LAYERS = 3  # decoder layers of the tiny model; its MTP layer is layer 3


def mtp_tensors(hidden: int, vocab: int, seed: int, own_head: bool) -> dict[str, torch.Tensor]:
    """The MTP layer's own tensors (besides its decoder block), random."""
    gen = torch.Generator().manual_seed(seed)
    out = {
        "enorm.weight": 1 + 0.1 * torch.randn(hidden, generator=gen),
        "hnorm.weight": 1 + 0.1 * torch.randn(hidden, generator=gen),
        "eh_proj.weight": torch.randn(hidden, 2 * hidden, generator=gen) * 0.05,
        "shared_head.norm.weight": 1 + 0.1 * torch.randn(hidden, generator=gen),
    }
    if own_head:
        out["shared_head.head.weight"] = torch.randn(vocab, hidden, generator=gen) * 0.05
    return out


def write_mtp_checkpoint(folder: str, seed: int = 0, own_head: bool = True, prepare=None):
    """A tiny DeepSeek-V3 folder with LAYERS decoder layers and an MTP layer (`model.layers.{LAYERS}.*`), the way V3
    ships one: a model of LAYERS + 1 layers is saved, its last layer becomes the MTP layer's decoder block and the
    MTP tensors are added. Returns (the full HF model, whose last layer is the MTP block, the MTP tensors)."""
    from conftest import save_tiny

    hf = build_hf(seed=seed, num_hidden_layers=LAYERS + 1)
    if prepare is not None:
        prepare(hf)
    save_tiny(hf, folder)
    path = os.path.join(folder, "model.safetensors")
    with safe_open(path, "pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    extra = mtp_tensors(hf.config.hidden_size, hf.config.vocab_size, seed + 100, own_head)
    if prepare is not None:
        prepare(hf, extra)
    tensors |= {f"model.layers.{LAYERS}.{name}": t for name, t in extra.items()}
    save_file(tensors, path, metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    config |= {"num_hidden_layers": LAYERS, "num_nextn_predict_layers": 1}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    return hf, extra


@pytest.fixture(scope="module")
def mtp_folder(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("tiny-deepseek-mtp"))
    hf, extra = write_mtp_checkpoint(folder)
    return folder, hf, extra


def rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def reference_mtp_logits(hf, extra: dict, ids: torch.Tensor) -> torch.Tensor:
    """Row i: the logits the MTP layer gives for token i + 2 from the first LAYERS layers' final (normed) hidden state
    at i and token i + 1, in plain torch around transformers' own decoder layer (the MTP block) and rotary tables."""
    eps = hf.config.rms_norm_eps
    model = hf.model
    with torch.inference_mode():
        x = model.embed_tokens(ids[None])
        positions = torch.arange(len(ids))[None]
        cos_sin = model.rotary_emb(x, positions)
        causal = torch.full((len(ids), len(ids)), float("-inf")).triu(1)[None, None]
        for layer in model.layers[:LAYERS]:
            x = layer(x, attention_mask=causal, position_ids=positions, position_embeddings=cos_sin)
        h = model.norm(x)[0]  # the hidden state the LM head reads
        n = len(ids) - 1
        e = model.embed_tokens(ids[1:])
        u = torch.cat([rms(e, extra["enorm.weight"], eps), rms(h[:n], extra["hnorm.weight"], eps)], -1)
        u = u @ extra["eh_proj.weight"].t()
        cos_sin = model.rotary_emb(u[None], positions[:, :n])
        u = model.layers[LAYERS](u[None], attention_mask=causal[..., :n, :n], position_ids=positions[:, :n],
                                 position_embeddings=cos_sin)[0]  # fmt: skip
        head = extra.get("shared_head.head.weight", hf.lm_head.weight)
        return rms(u, extra["shared_head.norm.weight"], eps) @ head.t()


def mtp_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Hearth's MTP logits for every row of one sequence, without a cache."""
    from hearth.layers.context import Context, reset_context, set_context

    n = len(ids)
    with torch.inference_mode():
        set_context(Context(q_starts=[0, n], context_lens=[n], prefill_seq_idx=[0]))
        try:
            hidden = model(ids, torch.arange(n))
        finally:
            reset_context()
        set_context(Context(q_starts=[0, n - 1], context_lens=[n - 1], prefill_seq_idx=[0]))
        try:
            return model.compute_mtp_logits(model.mtp_forward(ids[1:], torch.arange(n - 1), hidden[:-1])).float()
        finally:
            reset_context()


@pytest.mark.parametrize("own_head", [True, False], ids=["own_head", "shared_head"])
def test_mtp_logits_match_the_reference(tmp_path, own_head):
    from hearth import LLM

    folder = str(tmp_path / "m")
    hf, extra = write_mtp_checkpoint(folder, seed=3, own_head=own_head)
    llm = LLM(folder, dtype="float32", block_size=4, max_model_len=64, speculative="mtp")
    model = llm.engine.runner.model
    assert model.mtp is not None and (model.mtp.shared_head.head is not None) == own_head
    ids = torch.randint(0, 256, (20,), generator=torch.Generator().manual_seed(1))
    expected = reference_mtp_logits(hf, extra, ids)
    for mode in ("naive", "absorbed"):
        model.set_mla_mode(mode)
        torch.testing.assert_close(mtp_logits(model, ids), expected, atol=1e-4, rtol=1e-4)
    model.set_mla_mode("auto")
    # the embedding goes first in eh_proj's input: the other order gives other logits
    swapped = dict(extra, **{"eh_proj.weight": extra["eh_proj.weight"].roll(64, dims=1)})
    assert (reference_mtp_logits(hf, swapped, ids) - expected).abs().max() > 1e-3


def test_an_fp8_checkpoint_with_v3_layout_loads_its_mtp_layer(tmp_path):
    """DeepSeek's FP8 layout: the MTP layer's projections (eh_proj too) as float8 blocks with weight_scale_inv, its
    embedding and head repeated in bf16: loaded dequantized, and the copies identical to the model's are dropped."""
    from safetensors.torch import load_file
    from test_deepseek_v3 import write_fp8_checkpoint

    from hearth import LLM
    from hearth.quant.fp8 import dequantize_fp8_block

    hf = build_hf(hidden_size=136, q_lora_rank=144, intermediate_size=264, moe_intermediate_size=40)
    folder = str(tmp_path / "fp8")
    write_fp8_checkpoint(hf, folder, str(tmp_path / "ref"))
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    tensors[f"model.layers.{LAYERS}.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, path, metadata={"format": "pt"})
    llm = LLM(folder, dtype="float32", block_size=4, max_model_len=64, speculative="mtp")
    mtp = llm.engine.runner.model.mtp
    name = f"model.layers.{LAYERS}.eh_proj.weight"
    assert torch.equal(mtp.eh_proj.weight, dequantize_fp8_block(tensors[name], tensors[name + "_scale_inv"]))
    assert mtp.embed_tokens is None and mtp.shared_head.head is not None  # the head in the file is its own
    out = llm.generate([[5, 6, 7, 8, 9]], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    assert len(out[0].token_ids) == 6 and llm.engine.scheduler.num_draft_tokens > 0


def test_the_mtp_layer_is_skipped_unless_asked_for(mtp_folder):
    from hearth import LLM

    folder, _, _ = mtp_folder
    llm = LLM(folder, dtype="float32", block_size=4, max_model_len=64)
    assert llm.engine.runner.model.mtp is None and llm.engine.speculator is None


# ------------------------------------------------------------------------------------------------- the engine


def prompts(n: int, seed: int) -> list[list[int]]:
    """Byte prompts, every other one behind a shared 20-token prefix (prefix-cache hits)."""
    rng = random.Random(seed)
    shared = [rng.randrange(32, 127) for _ in range(20)]
    return [(shared if i % 2 else []) + [rng.randrange(32, 127) for _ in range(rng.randint(3, 14))] for i in range(n)]


def engine(ref: str, **kwargs) -> LLMEngine:
    config = dict(max_model_len=64, max_num_seqs=6, max_num_batched_tokens=64, dtype="float32", block_size=4)
    config.update(kwargs)
    return LLMEngine(resolve_model(ref), EngineConfig(**config))


def check_greedy_equals_plain(ref: str, kv: str = "28KiB") -> LLMEngine:
    """Greedy outputs with the MTP proposer are plain decoding's, in a pool small enough to preempt; returns the
    speculating engine."""
    plain = engine(ref, kv_cache_memory=kv)
    spec = engine(ref, kv_cache_memory=kv, speculative="mtp", speculative_max_batch=8)
    rng = random.Random(0)
    requests = [(p, SamplingParams(temperature=0, max_tokens=rng.randint(6, 30), ignore_eos=True)) for p in prompts(12, 1)]
    expected = run(plain, requests, arrivals=3)
    seqs: list = []
    assert run(spec, requests, arrivals=3, seqs=seqs) == expected
    sched = spec.scheduler
    assert sched.num_draft_tokens > 20  # drafts were scored (a random MTP layer rarely guesses right)
    assert sum(s.num_preemptions for s in seqs) > 0 and any(s.num_preemptions and s.num_draft_tokens for s in seqs)
    assert sum(s.num_cached_tokens for s in seqs) > 0
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks
    assert not spec.runner.hidden_rows and not spec.speculator.proposer.last
    return spec


def test_greedy_with_mtp_equals_plain_decoding(mtp_folder):
    check_greedy_equals_plain(mtp_folder[0])


def test_the_mtp_cache_follows_the_sequence_through_rejections_preemption_and_prefix_hits(mtp_folder):
    """After every step, each decoding sequence's MTP output at its last position gives the logits a from-scratch
    reference computes on its tokens: the MTP cache rows the engine wrote one step at a time (verifications whose
    draft was rejected, recomputation after preemption, prefix-cache hits) are the right ones."""
    folder, hf, extra = mtp_folder
    spec = engine(folder, kv_cache_memory="28KiB", speculative="mtp", speculative_max_batch=8)
    proposer = spec.speculator.proposer
    requests = [(p, SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)) for p in prompts(6, 7)]
    seqs = [spec.add_request(p, params, f"c{i}") for i, (p, params) in enumerate(requests)]
    checked = 0
    while spec.has_unfinished():
        spec.step()
        spec.speculator.proposer.retain(spec.scheduler.running)  # what the next step starts with
        for seq in spec.scheduler.running:
            position, row = proposer.last.get(seq.seq_id, (None, None))
            if position is None or position != seq.num_computed_tokens - 1:
                continue
            expected = reference_mtp_logits(hf, extra, torch.tensor(seq.token_ids[: seq.num_computed_tokens + 1]))[-1]
            torch.testing.assert_close(spec.runner.mtp_logits(row[None])[0].float(), expected, atol=1e-4, rtol=1e-4)
            checked += 1
    assert checked > 30
    assert sum(s.num_preemptions for s in seqs) > 0 and sum(s.num_cached_tokens for s in seqs) > 0
    assert spec.scheduler.num_draft_tokens > 0


def copying_mtp(hf, extra=None) -> None:
    """Weights under which both the model and its MTP layer repeat the last token: the decoder layers and the MTP
    block add nothing (output projections zero), the LM head is the embedding table, and eh_proj passes the
    embedding half through."""
    hidden = hf.config.hidden_size
    if extra is not None:
        extra["eh_proj.weight"] = torch.cat([torch.eye(hidden), torch.zeros(hidden, hidden)], dim=1)
        extra["enorm.weight"] = torch.ones(hidden)
        extra["shared_head.norm.weight"] = torch.ones(hidden)
        extra.pop("shared_head.head.weight", None)
        return
    with torch.no_grad():
        hf.lm_head.weight.copy_(hf.model.embed_tokens.weight)
        for layer in hf.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            mlp = layer.mlp
            if hasattr(mlp, "experts"):
                mlp.experts.down_proj.zero_()
                mlp.shared_experts.down_proj.weight.zero_()
            else:
                mlp.down_proj.weight.zero_()


def test_a_layer_that_predicts_well_gets_its_drafts_kept(tmp_path):
    folder = str(tmp_path / "copy")
    write_mtp_checkpoint(folder, seed=5, own_head=False, prepare=copying_mtp)
    plain, spec = engine(folder), engine(folder, speculative="mtp", speculative_max_batch=8)
    requests = [(p, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)) for p in prompts(4, 2)]
    expected = run(plain, requests)
    assert all(len(set(out)) == 1 for out in expected)  # the model repeats the prompt's last token
    assert run(spec, requests) == expected
    sched = spec.scheduler
    assert sched.num_draft_tokens > 0 and sched.num_accepted_tokens == sched.num_draft_tokens
    assert spec.stats.num_accepted_tokens == sched.num_accepted_tokens
    # one draft per step without chaining: fewer drafts (and more steps) for the same text
    single = engine(folder, speculative="mtp", speculative_max_batch=8, num_speculative_tokens=1)
    assert run(single, requests) == expected
    assert 0 < single.scheduler.num_accepted_tokens == single.scheduler.num_draft_tokens < sched.num_draft_tokens
    assert single.scheduler.num_steps > sched.num_steps
    # sampling: every draft is the only likely token, and is kept
    sampled = [(p, SamplingParams(temperature=0.5, max_tokens=8, seed=i, ignore_eos=True)) for i, (p, _) in
               enumerate(requests)]  # fmt: skip
    drafted, kept = sched.num_draft_tokens, sched.num_accepted_tokens
    assert run(spec, sampled) == run(spec, sampled)
    assert sched.num_accepted_tokens - kept > 0.9 * (sched.num_draft_tokens - drafted) > 0


def test_no_block_leaks_with_random_requests_and_aborts(mtp_folder):
    spec = engine(mtp_folder[0], kv_cache_memory="32KiB", speculative="mtp", speculative_max_batch=8)
    bm = spec.scheduler.block_manager
    rng = random.Random(3)
    pool = prompts(20, seed=4)
    live: list[str] = []
    aborted_with_drafts = 0
    for i in range(120):
        params = SamplingParams(temperature=rng.choice([0, 0.8]), max_tokens=rng.randint(1, 20),
                                seed=rng.choice([None, i]), ignore_eos=True)  # fmt: skip
        spec.add_request(rng.choice(pool), params, f"q{i}")
        live.append(f"q{i}")
        for _ in range(rng.randint(0, 3)):
            for delta in spec.step():
                if delta.finished:
                    live.remove(delta.request_id)
        if live and rng.random() < 0.3:
            victim = rng.choice(live)
            aborted_with_drafts += spec.seqs[victim].num_draft_tokens > 0
            spec.abort(victim)
            live.remove(victim)
    while spec.has_unfinished():
        spec.step()
    assert aborted_with_drafts > 3 and spec.scheduler.num_draft_tokens > 0
    assert bm.num_free_blocks == bm.num_blocks and not spec.seqs
    assert not spec.runner.hidden_rows and not spec.speculator.proposer.last


# ------------------------------------------------------------------------------------------------------ GGUF


def test_gguf_nextn_tensors_load_and_give_plain_greedy_output(tmp_path):
    from hearth.loader import ModelLoadError
    from hearth.loader.inspect import read_gguf_config

    hf = build_hf(seed=11, num_hidden_layers=LAYERS + 1)
    extra = mtp_tensors(hf.config.hidden_size, hf.config.vocab_size, 12, own_head=True)
    path = tmp_path / "tiny-deepseek2-mtp.gguf"
    nextn = {"eh_proj": extra["eh_proj.weight"], "enorm": extra["enorm.weight"], "hnorm": extra["hnorm.weight"],
             "shared_head_norm": extra["shared_head.norm.weight"], "shared_head_head": extra["shared_head.head.weight"],
             "embed_tokens": hf.model.embed_tokens.weight.detach()}  # fmt: skip
    write_deepseek2_gguf(hf, path, nextn=nextn)
    config = read_gguf_config(str(path))
    assert config.num_hidden_layers == LAYERS and config.extra["num_nextn_predict_layers"] == 1
    spec = check_greedy_equals_plain(str(path))
    mtp = spec.runner.model.mtp
    assert torch.equal(mtp.eh_proj.weight, extra["eh_proj.weight"])
    assert torch.equal(mtp.shared_head.head.weight, extra["shared_head.head.weight"])
    assert mtp.embed_tokens is None  # the file's nextn.embed_tokens is the model's table: shared, not kept twice
    # a nextn tensor of the wrong shape is refused when the file is read
    bad = dict(nextn, eh_proj=extra["eh_proj.weight"][:, :64].contiguous())
    write_deepseek2_gguf(hf, tmp_path / "bad.gguf", nextn=bad)
    with pytest.raises(ModelLoadError, match="nextn.eh_proj"):
        read_gguf_config(str(tmp_path / "bad.gguf"))


# ------------------------------------------------------------------------------------------------------ errors


def test_a_checkpoint_without_mtp_layer_is_refused_in_one_line(tmp_path, tiny_llama3):
    from conftest import save_tiny

    folder = save_tiny(build_hf(seed=1), str(tmp_path / "no-mtp"))
    with pytest.raises(ValueError, match=r"^--speculative mtp: .* has no MTP layer") as info:
        engine(folder, speculative="mtp")
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="has no multi-token-prediction layer"):
        engine(tiny_llama3[0], speculative="mtp")
    with pytest.raises(ValueError, match="draft_model is for speculative='draft'"):
        EngineConfig(speculative="mtp", draft_model="x")
