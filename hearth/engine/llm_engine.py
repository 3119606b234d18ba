"""LLMEngine: add_request / abort / step. step = schedule → run → postprocess. Works in token ids; the
detokenizer turns each sequence's new tokens into text and applies stop strings.

A step that raises fails only the sequence that caused it: the batch is run again in halves, down to single
sequences, and a sequence that fails alone is finished with an error Delta (its blocks freed); the others keep their
KV state and go on (a retried forward recomputes and rewrites the same cache slots, and seeded generators are put
back to their state before the step). When every sequence of a batch of several fails alone, the fault is the
engine's, not a request's: step raises EngineFatalError.

Not thread-safe: one thread owns an engine (AsyncEngine's engine thread, or the caller of LLM.generate).
"""

from __future__ import annotations

import logging

import torch

from hearth.config import EngineConfig
from hearth.engine.block_manager import BlockManager
from hearth.engine.detokenizer import IncrementalDetokenizer
from hearth.engine.model_runner import ModelRunner
from hearth.engine.protocol import Delta, EngineError, EngineFatalError, EngineStats, ModelInfo
from hearth.engine.scheduler import Batch, Scheduler
from hearth.engine.sequence import Sequence
from hearth.loader.inspect import read_gguf_config, read_hf_config
from hearth.loader.resolve import ModelRef
from hearth.sampling_params import SamplingParams
from hearth.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, ref: ModelRef, engine_config: EngineConfig | None = None, device: str = "cpu"):
        self.ref = ref
        self.engine_config = engine_config = engine_config or EngineConfig()
        if ref.format == "gguf":
            from hearth.loader.gguf import open_gguf

            self.model_config = read_gguf_config(open_gguf(ref.path))
        else:
            self.model_config = read_hf_config(ref.path)
        self.tokenizer = load_tokenizer(ref.path)
        self.runner = ModelRunner(ref, self.model_config, engine_config, device)
        self.max_model_len = self.runner.max_model_len
        self.block_manager = BlockManager(self.runner.num_kvcache_blocks, engine_config.block_size,
                                          engine_config.enable_prefix_caching, self.runner.kv_windows)  # fmt: skip
        self.scheduler = Scheduler(self.block_manager, engine_config.max_num_seqs, engine_config.max_num_batched_tokens,
                                   engine_config.scheduling_policy)  # fmt: skip
        self.seqs: dict[str, Sequence] = {}
        self.detokenizers: dict[str, IncrementalDetokenizer] = {}
        eos = set(self.tokenizer.eos_token_ids) | set(self.model_config.eos_token_ids)
        self.eos_token_ids = eos

    @property
    def model_info(self) -> ModelInfo:
        quant = sorted({m.quant_type for m in self.runner.model.modules() if getattr(m, "quant_type", None)})
        return ModelInfo(self.ref.name, self.max_model_len, self.model_config.architecture, ",".join(quant) or None)

    @property
    def stats(self) -> EngineStats:
        bm = self.block_manager
        used = bm.num_blocks - bm.num_free_blocks
        return EngineStats(len(self.scheduler.running), len(self.scheduler.waiting), used / bm.num_blocks, bm.num_blocks)

    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> Sequence:
        """Queue a request; raises EngineError (400) when it cannot fit the context, (429) when the queue is full."""
        if not prompt_ids:
            raise EngineError("the prompt is empty", 400, "prompt")
        if request_id in self.seqs:
            raise EngineError(f"duplicate request id {request_id!r}", 400)
        if len(prompt_ids) >= self.max_model_len:
            raise EngineError(
                f"the prompt has {len(prompt_ids)} tokens, but this model's context is {self.max_model_len} tokens "
                "(the prompt must leave room for at least one generated token)", 400, "messages")  # fmt: skip
        if len(self.scheduler.waiting) >= self.engine_config.max_waiting:
            raise EngineError("the server is busy: too many requests are waiting", 429)
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise EngineError(f"prompt token ids must be between 0 and {vocab - 1}", 400, "prompt")
        seq = Sequence(prompt_ids, params, request_id)
        if params.seed is not None:
            seq.generator = torch.Generator().manual_seed(params.seed)
        detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens, params.stop)
        self.seqs[request_id] = seq  # registered only once nothing above can raise
        self.detokenizers[request_id] = detokenizer
        self.scheduler.add(seq)
        return seq

    def abort(self, request_id: str) -> Delta | None:
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return None
        self.detokenizers.pop(request_id, None)
        self.scheduler.finish(seq, "abort")
        return self._delta(seq, [], "", None)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def _delta(self, seq: Sequence, token_ids: list[int], text: str, logprobs) -> Delta:
        return Delta(
            seq.request_id, token_ids, text, logprobs, seq.is_finished, seq.finish_reason,
            seq.num_prompt_tokens, seq.num_cached_tokens, seq.num_output_tokens,
        )  # fmt: skip

    def step(self) -> list[Delta]:
        """Run one scheduled batch and return a Delta for every sequence that produced a token or failed."""
        batch = self.scheduler.schedule()
        if not batch:
            return []
        # seeded generators as they were, so that a retried sequence draws what it would have drawn
        saved = {seq.seq_id: seq.generator.get_state() for seq in batch.seqs if getattr(seq, "generator", None)}
        deltas: list[Delta] = []
        failed: list[tuple[Sequence, BaseException]] = []
        self._run_isolating(batch, saved, deltas, failed)
        if failed and len(failed) == len(batch.seqs) > 1:
            raise EngineFatalError(f"all {len(batch.seqs)} sequences of the step failed on their own") from failed[0][1]
        deltas.extend(self._fail(seq, error) for seq, error in failed)
        return deltas

    def _run_isolating(self, batch: Batch, saved: dict, deltas: list[Delta], failed: list) -> None:
        """Run `batch` and postprocess it into `deltas`; when the run raises, run each half of the batch on its own,
        down to single sequences, and put those that fail alone in `failed`."""
        try:
            sampled, token_ids, logprobs = self.runner.run(batch)
        except Exception as e:
            if len(batch.seqs) == 1:
                failed.append((batch.seqs[0], e))
                return
            logger.warning("a step over %d sequences raised %s; running them again in smaller groups",
                           len(batch.seqs), type(e).__name__)  # fmt: skip
            half = len(batch.seqs) // 2
            for part in (slice(None, half), slice(half, None)):
                sub = Batch(batch.seqs[part], batch.num_scheduled_tokens[part])
                for seq in sub.seqs:
                    if seq.seq_id in saved:
                        seq.generator.set_state(saved[seq.seq_id])
                self._run_isolating(sub, saved, deltas, failed)
            return
        for seq, num_new in zip(batch.seqs, batch.num_scheduled_tokens):
            start = seq.num_computed_tokens
            seq.num_computed_tokens = start + num_new
            self.block_manager.commit(seq, start)
        for seq, token_id, lp in zip(sampled, token_ids, logprobs):
            seq.append_token(token_id)
            if lp is not None:
                seq.logprobs.append(lp)
            try:
                deltas.append(self._postprocess(seq, token_id, lp))
            except Exception as e:
                failed.append((seq, e))

    def _fail(self, seq: Sequence, error: BaseException) -> Delta:
        """Finish `seq` with an error (its blocks freed); the Delta carries the EngineError for its client."""
        logger.error("request %s failed in an engine step (%s); the others go on", seq.request_id, type(error).__name__,
                     exc_info=error)  # fmt: skip
        self.scheduler.finish(seq, "error")
        self.seqs.pop(seq.request_id, None)
        self.detokenizers.pop(seq.request_id, None)
        delta = self._delta(seq, [], "", None)
        delta.error = EngineError("internal error while generating this request", 500)
        return delta

    def _postprocess(self, seq: Sequence, token_id: int, lp) -> Delta:
        params = seq.params
        detok = self.detokenizers[seq.request_id]
        reason = None
        if token_id in params.stop_token_ids or (token_id in self.eos_token_ids and not params.ignore_eos):
            reason, text = "stop", detok.flush()
        else:
            text, hit_stop = detok.step([token_id])
            if hit_stop:
                reason = "stop"
            elif (params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens) or (
                seq.num_tokens >= self.max_model_len
            ):
                reason, text = "length", text + detok.flush()
        if reason is not None:
            self.scheduler.finish(seq, reason)
            del self.seqs[seq.request_id], self.detokenizers[seq.request_id]
        return self._delta(seq, [token_id], text, None if lp is None else [lp])
