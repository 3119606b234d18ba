"""ModelRunner: owns the model and its paged KV cache, turns a Batch into tensors and runs one forward per step.

All scheduled sequences share one forward: their new tokens are laid out one sequence after another, with the
positions, cache slots and block tables the attention layers read from the forward Context.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import os

import torch

from hearth.config import EngineConfig, KVPlan, ModelConfig, kv_spec, plan_kv_cache
from hearth.config import tensor_parallel_config as rank_config
from hearth.engine.fused_decode import build_fused_decode
from hearth.engine.scheduler import Batch
from hearth.layers.context import Context, get_context, reset_context, set_context
from hearth.layers.distributed import set_tensor_parallel
from hearth.layers.linear import requantize_dense
from hearth.layers.rejection_sampler import token_logprobs, verify
from hearth.layers.sampler import Sampler
from hearth.loader.load import checkpoint_weight_bytes, load_model
from hearth.loader.resolve import ModelRef
from hearth.models.registry import model_class

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GIB = 1 << 30


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * GIB


def release_freed_memory() -> None:
    """Hand the load-time temporaries (dequantized float copies) back to the OS; glibc keeps freed heap otherwise."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def resolve_dtype(name: str, ref: ModelRef, config: ModelConfig) -> torch.dtype:
    """auto: bf16 for GGUF (the int4 kernels want bf16 activations) and bf16/fp16 checkpoints, else float32."""
    if name != "auto":
        return DTYPES[name]
    if ref.format == "gguf" or config.torch_dtype in ("bfloat16", "float16"):
        return torch.bfloat16
    return torch.float32


def is_decode(seq, num_new: int) -> bool:
    """One new token after the prompt: a decode row. A prompt's last token alone (the tail after a prefix-cache hit or a
    chunk boundary) is prefill, so that it is computed exactly as a whole-prompt prefill computes it."""
    return num_new == 1 and seq.num_computed_tokens + 1 == seq.num_tokens and seq.num_computed_tokens >= seq.num_prompt_tokens


def plan_memory(ref: ModelRef, config: ModelConfig, engine_config: EngineConfig, dtype: torch.dtype,
                keep_quantized: bool, available: int, tp_size: int = 1) -> KVPlan:  # fmt: skip
    """The weights' memory and the KV plan (max_model_len, blocks), from metadata alone; ValueError with one line
    naming the budget and the flag to change when something does not fit. Under tensor parallelism `config` is the
    rank's (its KV heads) and a rank holds about 1/tp_size of the weights."""
    weights = checkpoint_weight_bytes(ref, keep_quantized, torch.finfo(dtype).bits // 8) // tp_size
    if weights > available:
        raise ValueError(f"{ref.name}: the weights need about {weights / GIB:.2f} GiB, but only "
                         f"{available / GIB:.2f} GiB of memory is available")  # fmt: skip
    dtype_name = str(dtype).removeprefix("torch.")
    return plan_kv_cache(kv_spec(config), engine_config, config.max_position_embeddings, available - weights, dtype_name)


def mtp_config(ref: ModelRef, config: ModelConfig) -> ModelConfig:
    """`config` with DeepSeek's multi-token-prediction layer built (speculative decoding with it); ValueError (one
    line) for a model or checkpoint without one."""
    from hearth.loader.inspect import mtp_parts

    if not getattr(model_class(config), "supports_mtp", False):
        raise ValueError(f"--speculative mtp: {ref.name} ({config.architecture}) has no multi-token-prediction layer "
                         "(DeepSeek-V3/R1 checkpoints have one)")  # fmt: skip
    parts = mtp_parts(ref.path, ref.format, config)
    if parts is None:
        raise ValueError(f"--speculative mtp: {ref.name} has no MTP layer (layer {config.num_hidden_layers}'s eh_proj "
                         "is not in the checkpoint)")  # fmt: skip
    return dataclasses.replace(config, extra={**config.extra, "mtp": parts})


def runtime_config(config: ModelConfig, max_model_len: int) -> ModelConfig:
    """The config the model is built from: rope tables cover max_model_len positions, not the file's context length
    (a file may declare millions). YaRN without an original length falls back to the declared one, as before."""
    scaling = config.rope_scaling
    if scaling and scaling.get("rope_type") == "yarn" and not scaling.get("original_max_position_embeddings"):
        scaling = {**scaling, "original_max_position_embeddings": config.max_position_embeddings}
    return dataclasses.replace(config, max_position_embeddings=max_model_len, rope_scaling=scaling)


class ModelRunner:
    """`rank`: this process's tensor-parallel rank (engine_config.tensor_parallel_size ranks in a process group that
    engine/parallel.py set up); rank 0 samples, the others run `worker_loop`."""

    def __init__(self, ref: ModelRef, config: ModelConfig, engine_config: EngineConfig, device: str = "cpu",
                 rank: int = 0):  # fmt: skip
        if engine_config.speculative == "mtp":
            config = mtp_config(ref, config)
        self.config = config
        self.engine_config = engine_config
        self.device = torch.device(device)
        self.rank, self.tp_size = rank, engine_config.tensor_parallel_size
        self._saved_threads = torch.get_num_threads()
        if os.environ.get("HEARTH_NUM_THREADS"):
            torch.set_num_threads(int(os.environ["HEARTH_NUM_THREADS"]))
        elif self.tp_size > 1 and self.device.type == "cpu":  # the machine's cores shared among its ranks
            local_ranks = self.tp_size // engine_config.nnodes
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))
        if self.tp_size > 1 and not getattr(model_class(config), "supports_tensor_parallel", False):
            raise ValueError(f"tensor parallelism is not supported for {config.architecture} yet (Llama family, "
                             "gpt-oss and DeepSeek-V3 only)")  # fmt: skip
        self.kv_config = rank_config(config, rank, self.tp_size)  # this rank's heads
        self.dtype = resolve_dtype(engine_config.dtype, ref, config)
        keep_quantized = self.dtype != torch.float32
        # every check that can fail runs here, from the config and the tensor table, before any weight is read
        plan = plan_memory(ref, self.kv_config, engine_config, self.dtype, keep_quantized,
                           available_memory(self.device), self.tp_size)  # fmt: skip
        if self.tp_size > 1:  # every rank holds the same block ids: the smallest pool and context any rank can hold
            agreed = torch.tensor([plan.max_model_len, plan.num_blocks])
            torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN)
            plan = dataclasses.replace(plan, max_model_len=int(agreed[0]), num_blocks=int(agreed[1]))
        self.max_model_len = plan.max_model_len
        self.block_size = engine_config.block_size
        logger.info("%s", plan.note)
        set_tensor_parallel(rank, self.tp_size, engine_config.enable_expert_parallel)  # the layers read it when built
        with torch.device(self.device):
            self.model = model_class(config)(runtime_config(config, self.max_model_len))
        load_model(self.model, ref, self.dtype, keep_quantized=keep_quantized)
        self.model.eval()
        if engine_config.int8_weights:
            count = requantize_dense(self.model)
            logger.info("%d dense bf16 projections requantized to Q8_0 (--int8-weights)", count)
        elif engine_config.lm_head_int8:
            head = getattr(self.model, "lm_head", None)
            if head is not None and hasattr(head, "requantize_q8_0") and head.requantize_q8_0():
                logger.info("LM head requantized to Q8_0 (--lm-head-int8)")
            else:
                logger.info("--lm-head-int8: no bf16 LM head of its own here (a tied or quantized head is already read "
                            "in its packed form by decode steps)")  # fmt: skip
        if engine_config.int8_prefill:
            held = [m for m in self.model.modules() if getattr(m, "blocks", None) is not None]
            for module in held:
                module.int8_activations = True
            logger.info("int8 activations for the %d GGUF-quantized projections, in prefill as in decode", len(held))
        self.sampler = Sampler(engine_config.seed)
        # the final hidden states of the rows each sequence computed in its last step, {seq_id: (first position,
        # [rows, hidden])}, kept while `keep_hidden` (set by the MTP proposer, which consumes them)
        self.keep_hidden = False
        self.hidden_rows: dict[int, tuple[int, torch.Tensor]] = {}
        self._last_hidden: torch.Tensor | None = None
        self.grammars = None  # engine/structured.py's Grammars, once a request has a grammar
        self.num_kvcache_blocks = self.allocate_kv_cache(plan.num_blocks)
        # the one-call decode step over the allocated cache (CPU, GGUF blocks), where the model's family has one
        self.fused_decode = None
        # it reads one block table per sequence; under tensor parallelism every rank runs it, or none
        fused_ok = self.device.type == "cpu" and len(self.kv_windows) == 1
        if fused_ok and os.environ.get("HEARTH_FUSED_DECODE", "1") != "0":
            self.fused_decode = build_fused_decode(self.model)
        if self.tp_size > 1:
            everywhere = torch.tensor([int(self.fused_decode is not None)])
            torch.distributed.all_reduce(everywhere, op=torch.distributed.ReduceOp.MIN)
            if not int(everywhere[0]):
                self.fused_decode = None
        release_freed_memory()

    def allocate_kv_cache(self, num_blocks: int) -> int:
        """Allocate the block pool plan_memory sized (KVSpec arithmetic, the planner's too).

        Layers are paged in KV groups (KVSpec.groups: full attention, and one group per sliding window). A block id
        belongs to one group at a time, so layers of different groups share cache tensors (KVSpec.storage_slots)."""
        spec = kv_spec(rank_config(self.config, self.rank, self.tp_size))  # the config as the model completed it
        self.kv_windows = tuple(group.sliding_window for group in spec.groups)
        block_bytes = spec.block_bytes(self.block_size, str(self.dtype).removeprefix("torch."))
        # every cache-holding layer (Attention, or a model's own such as MLA) has allocate_cache(), in layer order
        cache_layers = [m for m in self.model.modules() if hasattr(m, "allocate_cache")]
        if len(cache_layers) != spec.num_layers:
            raise ValueError(f"model has {len(cache_layers)} cache layers but its KVSpec has {spec.num_layers}")
        owners: dict[int, torch.nn.Module] = {}
        group_of = {i: g for g, group in enumerate(spec.groups) for i in group.layers}
        for i, (layer, layer_spec, slot) in enumerate(zip(cache_layers, spec.layers, spec.storage_slots())):
            layer.kv_group = group_of[i]
            if slot in owners:
                layer.share_cache(owners[slot])
            else:
                layer.allocate_cache(num_blocks, self.block_size, layer_spec, self.dtype, self.device)
                owners[slot] = layer
        logger.info(
            "KV cache: %d blocks of %d tokens (%.2f GiB), at most %d tokens in flight%s",
            num_blocks, self.block_size, num_blocks * block_bytes / GIB, num_blocks * self.block_size,
            "" if len(self.kv_windows) == 1 else
            f" per KV group ({', '.join('full' if w is None else f'window {w}' for w in self.kv_windows)}; "
            "a sliding group holds only its window per sequence)",
        )  # fmt: skip
        return num_blocks

    def prepare_single_decode(self, seq) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """The common CPU case, one sequence decoding one token: a handful of small tensors, no per-token lists."""
        bs, pos = self.block_size, seq.num_computed_tokens
        length = pos + 1
        num_blocks = (length + bs - 1) // bs
        table = torch.tensor(seq.block_table[:num_blocks], dtype=torch.long).clamp_(min=0)  # -1: out of the window
        k_pos = torch.arange(num_blocks * bs)
        slots = (table[:, None] * bs + k_pos[:bs]).view(-1)[:length]
        tables = table[None]
        # the batched-decode fields too, for attention layers without a single-decode path
        ctx = Context(q_starts=[0, 1], context_lens=[length], slot_mapping=slots[pos:], block_tables=tables,
                      block_size=bs, decode_seq_idx=[0], decode_rows=torch.zeros(1, dtype=torch.long),
                      decode_context_lens=torch.tensor([length]), decode_block_tables=tables,
                      decode_mask=(k_pos < length).view(1, 1, 1, -1), single_decode_slots=slots)  # fmt: skip
        set_context(ctx)
        return torch.tensor([seq.token_ids[pos]]), torch.tensor([pos]), [0]

    def prepare(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Build input ids, positions and the forward Context; return the rows whose logits are sampled."""
        seq = batch.seqs[0]
        if (len(batch.seqs) == 1 and batch.num_scheduled_tokens[0] == 1 and self.device.type == "cpu"
                and len(self.kv_windows) == 1 and is_decode(seq, 1)):  # fmt: skip
            self.last_rows = [0]
            return self.prepare_single_decode(seq)
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        self.last_rows: list[int] = []  # each sequence's last row (logits)
        ctx = Context(q_starts=[0], block_size=self.block_size)
        sample_rows: list[int] = []
        bs = self.block_size
        for i, (seq, num_new) in enumerate(zip(batch.seqs, batch.num_scheduled_tokens)):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + num_new
            if seq.spec_tokens:  # the last token and its drafts: a short chunk on the cache, every row scored
                input_ids.extend(seq.token_ids[start:] + seq.spec_tokens)
                sample_rows.extend(range(len(input_ids) - num_new, len(input_ids)))
                ctx.num_spec_seqs += 1
            else:
                input_ids.extend(seq.token_ids[start:end])
                if end == seq.num_tokens:
                    sample_rows.append(len(input_ids) - 1)
            positions.extend(range(start, end))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            ctx.q_starts.append(len(input_ids))
            self.last_rows.append(len(input_ids) - 1)
            ctx.context_lens.append(end)
            (ctx.decode_seq_idx if is_decode(seq, num_new) else ctx.prefill_seq_idx).append(i)
        dev = self.device
        ctx.block_tables = self.block_tables_tensor(batch.seqs, 0)
        ctx.slot_mapping = torch.tensor(slots, dtype=torch.long, device=dev)
        if ctx.decode_seq_idx:
            ctx.decode_block_tables = ctx.block_tables[ctx.decode_seq_idx]
            ctx.decode_rows = torch.tensor([ctx.q_starts[i] for i in ctx.decode_seq_idx], device=dev)
            lens = [ctx.context_lens[i] for i in ctx.decode_seq_idx]
            ctx.decode_context_lens = torch.tensor(lens, dtype=torch.long, device=dev)
            k_pos = torch.arange(ctx.decode_block_tables.shape[1] * bs, device=dev)
            ctx.decode_mask = (k_pos[None, :] < ctx.decode_context_lens[:, None])[:, None, None, :]
        if len(self.kv_windows) > 1:  # the other KV groups: the same step through their own block tables
            ctx.kv_groups = [ctx] + [self.group_context(ctx, batch, g) for g in range(1, len(self.kv_windows))]
        set_context(ctx)
        ids = torch.tensor(input_ids, dtype=torch.long, device=dev)
        return ids, torch.tensor(positions, dtype=torch.long, device=dev), sample_rows

    def block_tables_tensor(self, seqs: list, group: int) -> torch.Tensor:
        """[num_seqs, max_blocks] block ids of one KV group, 0-padded; blocks a sliding group gave back (-1) read as
        block 0, which attention masks (those positions are outside the window)."""
        tables = [seq.block_tables[group] for seq in seqs]
        max_blocks = max(len(t) for t in tables)
        padded = torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables], dtype=torch.long, device=self.device)
        return padded.clamp_(min=0)

    def group_context(self, ctx: Context, batch: Batch, group: int) -> Context:
        """`ctx` for the layers of KV group `group`: its slots and block tables, the rest shared."""
        bs = self.block_size
        slots: list[int] = []
        for seq, num_new in zip(batch.seqs, batch.num_scheduled_tokens):
            table, start = seq.block_tables[group], seq.num_computed_tokens
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + num_new))
        tables = self.block_tables_tensor(batch.seqs, group)
        return dataclasses.replace(
            ctx, slot_mapping=torch.tensor(slots, dtype=torch.long, device=self.device), block_tables=tables,
            decode_block_tables=tables[ctx.decode_seq_idx] if ctx.decode_seq_idx else None, kv_groups=[],
        )  # fmt: skip

    def run_fused_decode(self, seqs: list) -> torch.Tensor:
        """Every sequence decodes its one next token, or verifies its drafts: logits [rows, vocab] from the fused
        decode step. A sequence with k drafts has 1 + k rows, each computed as the decode of that token at its
        position (the step writes every row's KV before any row attends), so a verification computes exactly what
        decoding those tokens one by one would."""
        bs = self.block_size
        tables = self.block_tables_tensor(seqs, 0)
        positions, slots, input_ids, table_rows = [], [], [], []
        for i, seq in enumerate(seqs):
            start = seq.num_computed_tokens
            for j, token in enumerate(seq.token_ids[start:] + seq.spec_tokens):
                p = start + j
                positions.append(p)
                slots.append(seq.block_table[p // bs] * bs + p % bs)
                input_ids.append(token)
                table_rows.append(i)
        if len(table_rows) > len(seqs):
            tables = tables[torch.tensor(table_rows)]
        step = (torch.tensor(input_ids), torch.tensor(positions), torch.tensor(slots), tables, bs)
        if self.tp_size > 1:  # the other ranks run the same step (worker_loop)
            from hearth.engine.parallel import broadcast_step

            broadcast_step(("fused", *step))
        return self.fused_step(*step)

    def fused_step(self, input_ids, positions, slots, tables, block_size) -> torch.Tensor | None:
        return self.fused_decode(input_ids, positions, slots, tables, block_size, positions + 1)

    @torch.inference_mode()
    def run(self, batch: Batch) -> tuple[list, list[int], list]:
        """One forward for the batch; returns (sequences sampled this step, their tokens, their logprobs).

        While some sequence has a grammar (`self.grammars`, engine/structured.py's Grammars, set by the engine), the
        masks of the constrained rows are computed on its thread during the forward and applied by the sampler. A
        sequence with draft tokens (never one with a grammar: engine/speculative.py) is verified on its 1 + k rows."""
        all_decode = all(is_decode(s, n) or (s.spec_tokens and n == 1 + len(s.spec_tokens))
                         for s, n in zip(batch.seqs, batch.num_scheduled_tokens))  # fmt: skip
        fused = self.fused_decode is not None and all_decode and not self.keep_hidden
        if fused:
            sampled = list(batch.seqs)
        else:
            sampled = [s for s, n in zip(batch.seqs, batch.num_scheduled_tokens)
                       if s.spec_tokens or s.num_computed_tokens + n == len(s)]  # fmt: skip
        grammars = self.grammars
        masks = grammars.start(sampled, self.config.vocab_size) if grammars is not None and grammars.live else None
        if fused:
            logits = self.run_fused_decode(sampled)
        else:
            input_ids, positions, sample_rows = self.prepare(batch)
            if self.tp_size > 1:  # the other ranks run the same forward
                self.send_step(input_ids, positions, sample_rows if sampled else [])
            logits = self.forward(input_ids, positions, sample_rows if sampled else [])
            if self.keep_hidden:
                self.keep_rows(batch)
            if not sampled:
                return [], [], []
        banned = None if masks is None else masks.result()
        if any(s.spec_tokens for s in sampled):
            return self.sample_with_drafts(logits, sampled, banned)
        generators = [s.generator for s in sampled]
        if banned is None:  # the sampler's plain call (also what tests that replace the sampler take)
            token_ids, logprobs = self.sampler(logits, sampled, generators)
        else:
            token_ids, logprobs = self.sampler(logits, sampled, generators, banned)
        return sampled, token_ids, logprobs

    @torch.inference_mode()
    def logits(self, batch: Batch) -> torch.Tensor:
        """One forward for the batch, no sampling: logits [len(batch.seqs), vocab] of each sequence's last scheduled
        token (a draft model's step; every sequence computes up to its last token)."""
        if self.fused_decode is not None and all(is_decode(s, n) for s, n in zip(batch.seqs, batch.num_scheduled_tokens)):
            return self.run_fused_decode(list(batch.seqs))
        input_ids, positions, _ = self.prepare(batch)
        return self.forward(input_ids, positions, self.last_rows)

    def sample_with_drafts(self, logits: torch.Tensor, sampled: list,
                           banned: tuple[list[int], torch.Tensor] | None = None) -> tuple[list, list, list]:  # fmt: skip
        """`logits` has one row per plain sequence and 1 + k rows per sequence with k drafts, in order. Plain rows go
        through the sampler together (with the grammar masks `banned`, whose rows index `sampled` and are all plain
        ones); each sequence with drafts is verified on its rows (layers/rejection_sampler.py) and gets a list of
        tokens and a list of logprobs."""
        row, plain_rows, spans = 0, [], []
        for seq in sampled:
            n = 1 + len(seq.spec_tokens)
            if seq.spec_tokens:
                spans.append((row, n))
            else:
                plain_rows.append(row)
                spans.append(None)
            row += n
        logits = logits.float()
        bad = ~(logits < float("inf")).all(-1)
        if bool(bad.any()):
            raise ValueError(f"the model produced NaN or infinite logits for rows {bad.nonzero().flatten().tolist()}")
        plain = [s for s, span in zip(sampled, spans) if span is None]
        if banned is not None:  # rows of `sampled` -> rows of `plain`
            position = {id(s): j for j, s in enumerate(plain)}
            banned = ([position[id(sampled[i])] for i in banned[0]], banned[1])
        plain_ids, plain_lps = [], []
        if plain:
            generators = [s.generator for s in plain]
            plain_ids, plain_lps = (self.sampler(logits[plain_rows], plain, generators) if banned is None
                                    else self.sampler(logits[plain_rows], plain, generators, banned))  # fmt: skip
        token_ids, logprobs, j = [], [], 0
        for seq, span in zip(sampled, spans):
            if span is None:
                token_ids.append(plain_ids[j])
                logprobs.append(plain_lps[j])
                j += 1
                continue
            rows = logits[span[0] : span[0] + span[1]]
            tokens = verify(rows, seq.token_ids, seq.num_prompt_tokens, seq.params, seq.spec_tokens, seq.spec_probs,
                            seq.generator or self.sampler.generator)  # fmt: skip
            token_ids.append(tokens)
            logprobs.append(token_logprobs(rows, tokens, seq.params.logprobs))
        return sampled, token_ids, logprobs

    def keep_rows(self, batch: Batch) -> None:
        """Keep each sequence's rows of the last forward's hidden states (laid out as `prepare` lays out `batch`)."""
        row = 0
        for seq, n in zip(batch.seqs, batch.num_scheduled_tokens):
            self.hidden_rows[seq.seq_id] = (seq.num_computed_tokens, self._last_hidden[row : row + n])
            row += n
        self._last_hidden = None

    @torch.inference_mode()
    def run_mtp(self, batch: Batch, previous: torch.Tensor) -> torch.Tensor:
        """DeepSeek's MTP layer over `batch`, whose sequences are MtpRows (engine/speculative.py), with the target's
        hidden states `previous` for its rows (in `prepare`'s layout); its output at each sequence's last row."""
        input_ids, positions, _ = self.prepare(batch)
        try:
            out = self.model.mtp_forward(input_ids, positions, previous)
            return out[torch.tensor(self.last_rows, device=out.device)]
        finally:
            reset_context()

    @torch.inference_mode()
    def mtp_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.model.compute_mtp_logits(hidden_states)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, sample_rows: list[int]) -> torch.Tensor | None:
        """The model under the step's context (set by prepare): logits of `sample_rows` (None on ranks other than 0)."""
        try:
            hidden_states = self.model(input_ids, positions)
            if self.keep_hidden:
                self._last_hidden = hidden_states
            # under the step's context: a decode-only step's LM head reads its packed weight (layers/linear.py)
            return self.model.compute_logits(hidden_states[sample_rows]) if sample_rows else None
        finally:
            reset_context()

    def send_step(self, input_ids: torch.Tensor, positions: torch.Tensor, sample_rows: list[int]) -> None:
        """Rank 0: the step's inputs and forward Context to the other ranks (engine/parallel.py)."""
        from hearth.engine.parallel import broadcast_step

        broadcast_step((_to(input_ids, "cpu"), _to(positions, "cpu"), sample_rows, _context_to(get_context(), "cpu")))

    @torch.inference_mode()
    def worker_loop(self) -> None:
        """Ranks other than 0: run each step rank 0 sends, until it sends None."""
        from hearth.engine.parallel import broadcast_step

        while (step := broadcast_step(None)) is not None:
            if isinstance(step[0], str):  # ("fused", ...): a decode step of the fused decode (run_fused_decode)
                self.fused_step(*step[1:])
                continue
            input_ids, positions, sample_rows, ctx = step
            set_context(_context_to(ctx, self.device))
            self.forward(_to(input_ids, self.device), _to(positions, self.device), sample_rows)

    def close(self) -> None:
        """Rank 0: tell the other ranks to stop; every rank: leave the process group and the tensor-parallel state."""
        if self.tp_size == 1 or not torch.distributed.is_initialized():
            return
        if self.rank == 0:
            from hearth.engine.parallel import broadcast_step

            with contextlib.suppress(Exception):  # a rank already gone: nothing to stop
                broadcast_step(None)
        with contextlib.suppress(Exception):
            torch.distributed.destroy_process_group()
        set_tensor_parallel(0, 1)
        torch.set_num_threads(self._saved_threads)


def _to(t, device):
    return t.to(device) if isinstance(t, torch.Tensor) else t


def _context_to(ctx: Context, device) -> Context:
    """`ctx` with its tensors on `device` (the step travels between ranks on the CPU)."""
    fields = {f.name: _to(getattr(ctx, f.name), device) for f in dataclasses.fields(ctx) if f.name != "kv_groups"}
    moved = Context(**fields)
    moved.kv_groups = [moved] + [_context_to(g, device) for g in ctx.kv_groups[1:]] if ctx.kv_groups else []
    return moved
