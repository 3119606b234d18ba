"""LLMEngine: add_request / abort / step. step = schedule → run → postprocess → outputs. Works in token ids; the
scheduler advances and finishes sequences (stop tokens, length), the detokenizer turns each sequence's new tokens into
text and applies stop strings.

A step that raises fails only the sequence that caused it: the batch is run again in halves, down to single
sequences, and a sequence that fails alone is finished with an error Delta (its blocks freed); the others keep their
KV state and go on (a retried forward recomputes and rewrites the same cache slots, and seeded generators are put
back to their state before the step). When every sequence of a batch of several fails alone, the fault is the
engine's, not a request's: step raises EngineFatalError.

Not thread-safe: one thread owns an engine (AsyncEngine's engine thread, or the caller of LLM.generate).
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from hearth.config import EngineConfig
from hearth.engine.detokenizer import IncrementalDetokenizer
from hearth.engine.model_runner import ModelRunner
from hearth.engine.protocol import Delta, EngineError, EngineFatalError, EngineStats, ModelInfo
from hearth.engine.scheduler import Batch, Scheduler
from hearth.engine.sequence import Sequence
from hearth.engine.speculative import build_speculator
from hearth.loader.inspect import read_gguf_config, read_hf_config
from hearth.loader.resolve import ModelRef
from hearth.sampling_params import SamplingParams
from hearth.tokenizer import Tokenizer, load_tokenizer

logger = logging.getLogger(__name__)


def read_model_config(ref: ModelRef):
    if ref.format == "gguf":
        from hearth.loader.gguf import open_gguf

        return read_gguf_config(open_gguf(ref.path))
    return read_hf_config(ref.path)


class LLMEngine:
    def __init__(self, ref: ModelRef, engine_config: EngineConfig | None = None, device: str = "cpu",
                 tokenizer: Tokenizer | None = None):  # fmt: skip
        """`tokenizer`: the one the server already built for this model (None: loaded from `ref`).
        With tensor_parallel_size > 1 this is rank 0: it starts this machine's other ranks (engine/parallel.py)."""
        self.ref = ref
        self.engine_config = engine_config = engine_config or EngineConfig()
        self.model_config = read_model_config(ref)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(ref.path)
        self.ranks = None
        if engine_config.tensor_parallel_size > 1:
            from hearth.engine import parallel

            if engine_config.node_rank != 0:
                raise ValueError("node_rank > 0 serves no API: start it headless (hearth serve ... --headless)")
            if not engine_config.master_port:
                engine_config = self.engine_config = dataclasses.replace(engine_config, master_port=parallel.free_port())
            if parallel.torchrun_rank() is None:  # under torchrun every rank is already running
                self.ranks = parallel.LocalRanks(ref, engine_config, device, first_rank=0)
            try:
                parallel.init_group(0, engine_config, device, ref)
            except BaseException:
                if self.ranks is not None:
                    self.ranks.stop(0)
                raise
        try:
            self.runner = ModelRunner(ref, self.model_config, engine_config, device)
        except BaseException:
            self.close()
            raise
        self.max_model_len = self.runner.max_model_len
        self.eos_token_ids = set(self.tokenizer.eos_token_ids) | set(self.model_config.eos_token_ids)
        self.scheduler = Scheduler(engine_config, self.runner.num_kvcache_blocks, self.runner.kv_windows,
                                   self.max_model_len, self.eos_token_ids)  # fmt: skip
        self.speculator = build_speculator(engine_config, self.max_model_len, self)
        self.seqs: dict[str, Sequence] = {}
        self.detokenizers: dict[str, IncrementalDetokenizer] = {}
        quant = sorted({m.quant_type for m in self.runner.model.modules() if getattr(m, "quant_type", None)})
        self.model_info = ModelInfo(ref.name, self.max_model_len, self.model_config.architecture, ",".join(quant) or None)
        self._step_finished = False  # the last step finished a request (admission_wait_s)
        self.grammars = None  # structured.Grammars, built with the first request that has a grammar

    @property
    def stats(self) -> EngineStats:
        bm = self.scheduler.block_manager
        used = bm.num_blocks - bm.num_free_blocks
        sched = self.scheduler
        return EngineStats(len(sched.running), len(sched.waiting), used / bm.num_blocks, bm.num_blocks,
                           sched.num_draft_tokens, sched.num_accepted_tokens)  # fmt: skip

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
        generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        seq = Sequence(prompt_ids, params, request_id, generator)
        if params.grammar is not None:
            seq.grammar = self._sequence_grammar(params)
        detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens, params.stop)
        self.seqs[request_id] = seq  # registered only once nothing above can raise
        self.detokenizers[request_id] = detokenizer
        if seq.grammar is not None:
            self.grammars.live.add(request_id)
        self.scheduler.add(seq)
        return seq

    def _unconstrain(self, request_id: str) -> None:
        if self.grammars is not None:
            self.grammars.live.discard(request_id)

    def _sequence_grammar(self, params: SamplingParams):
        """The sequence's matcher (its grammar compiled once per engine and kept); EngineError (400) for a grammar
        that does not compile (the API checks before it submits; this is for direct callers)."""
        from hearth.engine.structured import GrammarError, Grammars

        try:
            if self.grammars is None:
                self.grammars = self.runner.grammars = Grammars(self.tokenizer, self.eos_token_ids)
            return self.grammars.sequence_grammar(params.grammar)
        except GrammarError as e:
            raise EngineError(f"the grammar cannot be used: {e}", 400, "response_format") from None

    def abort(self, request_id: str) -> Delta | None:
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return None
        self.detokenizers.pop(request_id, None)
        self._unconstrain(request_id)
        self.scheduler.finish(seq, "abort")
        if self.speculator is not None:
            self.speculator.release(seq)
        return self._delta(seq, [], "", None)

    def close(self) -> None:
        """Stop the other tensor-parallel ranks (nothing to do on one rank)."""
        runner = getattr(self, "runner", None)
        if runner is not None:
            runner.close()
        elif self.ranks is not None and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        if self.ranks is not None:
            self.ranks.stop()
            self.ranks = None

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def admission_wait_s(self) -> float:
        """How long the caller should wait for new requests before the next step (0: step at once).

        After a step that finished a request, when the next step will prefill (a long step on CPU), up to
        `admission_wait_ms` (EngineConfig): clients that send their next request as soon as one finishes then join
        that step rather than wait the whole of it."""
        if not self._step_finished or not self.scheduler.has_prefill_work():
            return 0.0
        return self.engine_config.admission_wait_ms / 1000

    def _delta(self, seq: Sequence, token_ids: list[int], text: str, logprobs) -> Delta:
        return Delta(
            seq.request_id, token_ids, text, logprobs, seq.is_finished, seq.finish_reason,
            seq.num_prompt_tokens, seq.num_cached_tokens, seq.num_output_tokens,
        )  # fmt: skip

    def step(self) -> list[Delta]:
        """Run one scheduled batch and return a Delta for every sequence that produced a token or failed."""
        if self.speculator is not None:  # drafts for the decoding sequences, which the scheduler then schedules
            self.speculator.propose(self.scheduler.running)
        batch = self.scheduler.schedule()
        self._step_finished = False
        if not batch:
            return []
        sampled: list[tuple[Sequence, int, object]] = []  # (sequence, token id, TokenLogprob or None)
        failed: list[tuple[Sequence, BaseException]] = []
        self._run_isolating(batch, self._generator_states(batch), sampled, failed)  # run + scheduler.postprocess
        deltas: list[Delta] = []
        for seq, token_id, lp in sampled:
            try:
                deltas.append(self._output(seq, token_id, lp))
            except Exception as e:
                failed.append((seq, e))
        if failed and len(failed) == len(batch.seqs) > 1:
            raise EngineFatalError(f"all {len(batch.seqs)} sequences of the step failed on their own") from failed[0][1]
        deltas.extend(self._fail(seq, error) for seq, error in failed)
        if self.speculator is not None:
            for seq in batch.seqs:
                if seq.is_finished:
                    self.speculator.release(seq)
        self._step_finished = any(delta.finished for delta in deltas)
        return deltas

    @staticmethod
    def _generator_states(batch: Batch) -> dict[int, torch.Tensor]:
        """The seeded generators as they are before the step, so that a retried sequence draws what it would have."""
        return {seq.seq_id: seq.generator.get_state() for seq in batch.seqs if seq.generator is not None}

    def _run_isolating(self, batch: Batch, saved: dict, sampled: list, failed: list) -> None:
        """Run `batch` and postprocess it, adding (sequence, token, logprob) to `sampled`; when the run raises, run
        each half of the batch on its own, down to single sequences, and put those that fail alone in `failed`."""
        try:
            seqs, token_ids, logprobs = self.runner.run(batch)
        except Exception as e:
            if self.engine_config.tensor_parallel_size > 1:  # a collective failed, or the ranks now disagree: no retry
                from hearth.engine.parallel import fault

                error = fault(e, self.ranks, self.engine_config.distributed_timeout_s)
                self.close()
                raise error from e
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
                self._run_isolating(sub, saved, sampled, failed)
            return
        self.scheduler.postprocess(batch, seqs, token_ids, logprobs)
        sampled.extend(zip(seqs, token_ids, logprobs))

    def _fail(self, seq: Sequence, error: BaseException) -> Delta:
        """Finish `seq` with an error (its blocks freed); the Delta carries the EngineError for its client."""
        logger.error("request %s failed in an engine step (%s); the others go on", seq.request_id, type(error).__name__,
                     exc_info=error)  # fmt: skip
        self.scheduler.finish(seq, "error")
        self.seqs.pop(seq.request_id, None)
        self.detokenizers.pop(seq.request_id, None)
        self._unconstrain(seq.request_id)
        delta = self._delta(seq, [], "", None)
        delta.error = EngineError("internal error while generating this request", 500)
        return delta

    def _output(self, seq: Sequence, token_id: int | list[int], lp) -> Delta:
        """The Delta for the token `seq` got this step: its text (a stop token's text is not shown; the token that
        completed a grammar is text); a stop string in the text finishes the sequence ("stop", over "length"); a
        finished sequence's detokenizer is flushed.

        After a verification of draft tokens `token_id` and `lp` are lists: the tokens go through one at a time, as
        decoding would have produced them, and those after a stop string are taken back."""
        ids = token_id if isinstance(token_id, list) else [token_id]
        lps = lp if isinstance(lp, list) else [lp]
        detok = self.detokenizers[seq.request_id]
        text = ""
        for i, tid in enumerate(ids):
            last = i == len(ids) - 1
            # a stop or eos token (postprocess ends the list there); not the token that completed a grammar
            if last and seq.finish_reason == "stop" and not (seq.grammar is not None and seq.grammar.complete):
                text += detok.flush()
                break
            chunk, hit_stop = detok.step([tid])
            text += chunk
            if hit_stop:
                dropped = len(ids) - 1 - i
                if dropped:
                    del seq.token_ids[-dropped:], ids[i + 1 :], lps[i + 1 :]
                    if seq.params.logprobs is not None:
                        del seq.logprobs[-dropped:]
                self.scheduler.finish(seq, "stop")
                break
            if last and seq.is_finished:
                text += detok.flush()
        if seq.is_finished:
            del self.seqs[seq.request_id], self.detokenizers[seq.request_id]
            self._unconstrain(seq.request_id)
        logprobs = None if lps[0] is None else lps
        return self._delta(seq, ids, text, logprobs)
