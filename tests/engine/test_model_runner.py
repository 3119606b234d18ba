"""ModelRunner on a tiny random Llama (float32): the layout `prepare` builds for a mixed batch (positions, cache slots,
sampled rows, decode rows), greedy tokens against the transformers model for a whole prompt and a chunked one followed
by decodes, and the pure helpers (dtype choice, decode rows, runtime config, the memory check)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hearth.config import EngineConfig
from hearth.engine.model_runner import ModelRunner, is_decode, plan_memory, resolve_dtype, runtime_config
from hearth.engine.scheduler import Scheduler
from hearth.engine.sequence import Sequence
from hearth.layers.context import get_context, reset_context
from hearth.loader.inspect import read_hf_config
from hearth.loader.resolve import resolve_model
from hearth.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def setup(tiny_llama3):
    path, hf_model = tiny_llama3
    ref = resolve_model(path)
    config = read_hf_config(ref.path)
    engine_config = EngineConfig(max_model_len=128, max_num_batched_tokens=64, dtype="float32", block_size=16)
    runner = ModelRunner(ref, config, engine_config)
    return runner, hf_model, engine_config, ref


def scheduler_for(runner: ModelRunner, engine_config: EngineConfig) -> Scheduler:
    return Scheduler(engine_config, runner.num_kvcache_blocks, runner.kv_windows, runner.max_model_len)


def hf_greedy(hf_model, ids: list[int], n: int) -> list[int]:
    out = []
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            token = int(hf_model(torch.tensor([ids])).logits[0, -1].argmax())
            out.append(token)
            ids.append(token)
    return out


def generate(runner: ModelRunner, sched: Scheduler, seqs: list[Sequence], steps: int) -> None:
    for s in seqs:
        sched.add(s)
    for _ in range(steps):
        batch = sched.schedule()
        if not batch:
            break
        sampled, token_ids, logprobs = runner.run(batch)
        sched.postprocess(batch, sampled, token_ids, logprobs)


def test_prepare_lays_out_a_mixed_batch(setup):
    runner, _, engine_config, _ = setup
    sched = scheduler_for(runner, engine_config)
    decoding = Sequence(list(range(1, 21)), GREEDY)
    generate(runner, sched, [decoding], 1)  # its prompt is in the cache; one token to compute
    chunked = Sequence(list(range(30, 130)), GREEDY)  # 100 tokens: more than the 64-token budget
    sched.add(chunked)
    batch = sched.schedule()
    assert batch.seqs == [decoding, chunked] and batch.num_scheduled_tokens == [1, 63]
    try:
        ids, positions, sample_rows = runner.prepare(batch)
        ctx = get_context()
        bs = runner.block_size
        assert ids.tolist() == [decoding.token_ids[20], *range(30, 93)]
        assert positions.tolist() == [20, *range(63)]
        expected_slots = [decoding.block_table[20 // bs] * bs + 20 % bs]
        expected_slots += [chunked.block_table[p // bs] * bs + p % bs for p in range(63)]
        assert ctx.slot_mapping.tolist() == expected_slots
        assert ctx.q_starts == [0, 1, 64] and ctx.context_lens == [21, 63]
        assert ctx.decode_seq_idx == [0] and ctx.prefill_seq_idx == [1]
        assert sample_rows == [0]  # the chunked prompt is not done: nothing sampled for it
    finally:
        reset_context()
    sched.finish(decoding, "abort")
    sched.finish(chunked, "abort")


def test_greedy_tokens_match_transformers(setup):
    runner, hf_model, engine_config, _ = setup
    sched = scheduler_for(runner, engine_config)
    whole = Sequence([5, 17, 99, 3, 42, 8, 64, 200, 11], GREEDY)
    chunked = Sequence([(7 * i + 3) % 250 for i in range(90)], GREEDY)  # prefilled over two steps, with decodes
    generate(runner, sched, [whole, chunked], 20)
    assert whole.output_token_ids == hf_greedy(hf_model, whole.token_ids[:9], 4)
    assert chunked.output_token_ids == hf_greedy(hf_model, chunked.token_ids[:90], 4)
    assert whole.is_finished and chunked.is_finished
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks


def test_logprobs_come_back_for_the_rows_that_ask(setup):
    runner, hf_model, engine_config, _ = setup
    sched = scheduler_for(runner, engine_config)
    asks = Sequence([1, 2, 3, 4], SamplingParams(temperature=0, max_tokens=1, logprobs=3))
    plain = Sequence([9, 8, 7], SamplingParams(temperature=0, max_tokens=1))
    for s in (asks, plain):
        sched.add(s)
    sampled, token_ids, logprobs = runner.run(sched.schedule())
    assert sampled == [asks, plain] and logprobs[1] is None
    with torch.no_grad():
        expected = hf_model(torch.tensor([[1, 2, 3, 4]])).logits[0, -1].log_softmax(-1)
    lp = logprobs[0]
    assert lp.token_id == token_ids[0] == int(expected.argmax())
    assert lp.logprob == pytest.approx(float(expected.max()), abs=1e-4) and len(lp.top) == 3
    for s in (asks, plain):
        sched.finish(s, "abort")


def test_block_tables_tensor_pads_and_masks_given_back_blocks(setup):
    runner, _, _, _ = setup
    a, b = Sequence([1], GREEDY), Sequence([2], GREEDY)
    a.block_tables, b.block_tables = [[3, 4, 5]], [[-1, 7]]
    assert runner.block_tables_tensor([a, b], 0).tolist() == [[3, 4, 5], [0, 7, 0]]


def test_is_decode_only_for_a_generated_token():
    s = Sequence([1, 2, 3], GREEDY)
    s.num_computed_tokens = 2
    assert not is_decode(s, 1)  # the prompt's last token: prefill
    s.append_token(9)
    s.num_computed_tokens = 3
    assert is_decode(s, 1) and not is_decode(s, 2)


def test_resolve_dtype_and_runtime_config(setup):
    runner, _, _, hf_ref = setup
    config = runner.config
    gguf_ref = dataclasses.replace(hf_ref, format="gguf")
    assert resolve_dtype("auto", gguf_ref, config) == torch.bfloat16
    assert resolve_dtype("float16", hf_ref, config) == torch.float16
    assert resolve_dtype("auto", hf_ref, dataclasses.replace(config, torch_dtype="float32")) == torch.float32
    assert resolve_dtype("auto", hf_ref, dataclasses.replace(config, torch_dtype="bfloat16")) == torch.bfloat16
    yarn = dataclasses.replace(config, max_position_embeddings=4096, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    rt = runtime_config(yarn, 128)
    assert rt.max_position_embeddings == 128 and rt.rope_scaling["original_max_position_embeddings"] == 4096


def test_plan_memory_refuses_weights_larger_than_memory(setup):
    runner, _, engine_config, ref = setup
    with pytest.raises(ValueError, match="GiB of memory is available"):
        plan_memory(ref, runner.config, engine_config, torch.float32, False, available=1000)
    plan = plan_memory(ref, runner.config, engine_config, torch.float32, False, available=1 << 30)
    assert plan.max_model_len == 128 and plan.num_blocks > 0


def test_batch_layout_is_independent_of_which_sequence_comes_first(setup):
    # the same two prompts in either order sample the same tokens for each
    runner, _, engine_config, _ = setup
    results = []
    for order in ((0, 1), (1, 0)):
        sched = scheduler_for(runner, engine_config)
        seqs = [Sequence([4, 5, 6, 7, 8], GREEDY), Sequence([200, 100, 50], GREEDY)]
        generate(runner, sched, [seqs[i] for i in order], 10)
        results.append([s.output_token_ids for s in seqs])
    assert results[0] == results[1]
