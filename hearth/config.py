"""Configuration dataclasses shared by the loader, models, engine and planner.

`ModelConfig` holds architecture facts read from `config.json` or GGUF metadata. `KVSpec` describes the KV cache a
model needs per token and per layer; the engine allocates from it and the planner does its arithmetic from it, so
both always agree. Stdlib only: `hearth plan` must work without torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any

# HF architecture name for each model_type; GGUF `general.architecture` maps to model_type in loader/inspect.py.
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gpt_oss": "GptOssForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}


@dataclass(slots=True)
class ModelConfig:
    """Architecture facts of one checkpoint, named as in HF `config.json`."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: q/k/v biases
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    torch_dtype: str = "float32"
    # mixture of experts (gpt-oss, DeepSeek)
    num_local_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    # sliding-window attention (gpt-oss); layer_types[i] in {"full_attention", "sliding_attention"}
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    # MLA (DeepSeek-V3): the cache holds kv_lora_rank + qk_rope_head_dim values per token per layer
    kv_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0
    q_lora_rank: int | None = None
    # everything else from the source, kept for family-specific code
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def architecture(self) -> str:
        return ARCHITECTURES.get(self.model_type, self.model_type)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"model config: num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Build from an HF `config.json` dict (transformers 4.x or 5.x naming)."""
        model_type = cfg.get("model_type", "")
        if model_type not in ARCHITECTURES:
            archs = cfg.get("architectures") or [model_type]
            raise ValueError(f"unsupported architecture {archs[0]!r} (supported: {', '.join(ARCHITECTURES.values())})")
        heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        rope_scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters")
        rope_theta = cfg.get("rope_theta") or (rope_scaling or {}).get("rope_theta") or 10000.0
        if rope_scaling is not None:
            kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
            rope_scaling = None if kind in (None, "default") else {**rope_scaling, "rope_type": kind}
        eos = cfg.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        known = set(cls.__slots__)
        return cls(
            model_type=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg.get("intermediate_size", 0),
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or hidden // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
            hidden_act=cfg.get("hidden_act", "silu"),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
            num_local_experts=cfg.get("num_local_experts") or cfg.get("n_routed_experts") or 0,
            num_experts_per_tok=cfg.get("num_experts_per_tok") or 0,
            moe_intermediate_size=cfg.get("moe_intermediate_size") or 0,
            sliding_window=cfg.get("sliding_window"),
            layer_types=cfg.get("layer_types") or _default_layer_types(model_type, cfg),
            kv_lora_rank=cfg.get("kv_lora_rank") or 0,
            qk_rope_head_dim=cfg.get("qk_rope_head_dim") or 0,
            qk_nope_head_dim=cfg.get("qk_nope_head_dim") or 0,
            v_head_dim=cfg.get("v_head_dim") or 0,
            q_lora_rank=cfg.get("q_lora_rank"),
            extra={k: v for k, v in cfg.items() if k not in known},
        )


def _default_layer_types(model_type: str, cfg: dict[str, Any]) -> list[str] | None:
    """gpt-oss configs without layer_types: even layers slide (the model's rule), known before the model is built."""
    if model_type != "gpt_oss":
        return None
    return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(cfg["num_hidden_layers"])]


@dataclass(slots=True, frozen=True)
class LayerKV:
    """What one layer keeps per cached token.

    For standard attention, K and V of `num_kv_heads` × `head_size`. For MLA (`is_latent`), one shared latent vector of
    `latent_size` values (kv_lora_rank + rope dims) and no separate V. `sliding_window`: the layer only ever attends to
    the last `sliding_window` tokens, so it needs no more than that many slots.
    """

    num_kv_heads: int
    head_size: int
    head_size_v: int
    sliding_window: int | None = None
    is_latent: bool = False
    latent_size: int = 0

    @property
    def values_per_token(self) -> int:
        if self.is_latent:
            return self.latent_size
        return self.num_kv_heads * (self.head_size + self.head_size_v)

    @property
    def shape(self) -> tuple:
        """What must match for two layers to share cache storage."""
        return (self.num_kv_heads, self.head_size, self.head_size_v, self.is_latent, self.latent_size)


@dataclass(slots=True, frozen=True)
class KVGroup:
    """Layers whose cache is paged by one block table: all full attention, or all with the same window."""

    sliding_window: int | None
    layers: tuple[int, ...]


@dataclass(slots=True, frozen=True)
class KVSpec:
    layers: tuple[LayerKV, ...]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def groups(self) -> tuple[KVGroup, ...]:
        """Layers grouped by window, full attention first. Each group has its own block table per sequence, so a
        sliding group can give back the blocks that fall out of its window (vLLM's hybrid KV-cache manager)."""
        windows = sorted({layer.sliding_window for layer in self.layers}, key=lambda w: (w is not None, w or 0))
        return tuple(KVGroup(w, tuple(i for i, layer in enumerate(self.layers) if layer.sliding_window == w))
                     for w in windows)  # fmt: skip

    def storage_slots(self) -> list[int]:
        """Per layer, the cache tensor it uses. A block id belongs to one group at a time, so the j-th layer of one group
        and the j-th of another (same shape) can share a tensor: with gpt-oss's 12 sliding + 12 full layers a block id
        costs 12 layers' worth of memory, not 24."""
        slots: list[tuple[tuple, set[int]]] = []  # (shape, groups using it)
        result = [0] * self.num_layers
        for g, group in enumerate(self.groups):
            for i in group.layers:
                shape = self.layers[i].shape
                j = next((j for j, (s, used) in enumerate(slots) if s == shape and g not in used), None)
                if j is None:
                    j = len(slots)
                    slots.append((shape, set()))
                slots[j][1].add(g)
                result[i] = j
        return result

    def block_bytes(self, block_size: int, dtype: str = "bfloat16") -> int:
        """Bytes one block id costs: block_size tokens in every storage slot (see storage_slots)."""
        first = {}
        for i, j in enumerate(self.storage_slots()):
            first.setdefault(j, self.layers[i])
        return sum(layer.values_per_token for layer in first.values()) * block_size * DTYPE_BYTES[dtype]


def kv_spec(cfg: ModelConfig) -> KVSpec:
    """The KV-cache layout a model of this config needs, one `LayerKV` per decoder layer (and DeepSeek's MTP layer
    when the model builds it, `extra["mtp"]`: it pages its cache with the decoder layers' block tables)."""
    if cfg.kv_lora_rank:
        latent = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        layer = LayerKV(cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim,
                        is_latent=True, latent_size=latent)  # fmt: skip
        return KVSpec(tuple(layer for _ in range(cfg.num_hidden_layers + (1 if cfg.extra.get("mtp") else 0))))
    layers = []
    for i in range(cfg.num_hidden_layers):
        sliding = cfg.layer_types is not None and cfg.layer_types[i] == "sliding_attention"
        window = cfg.sliding_window if sliding else None
        layers.append(LayerKV(cfg.num_key_value_heads, cfg.head_dim, cfg.head_dim, sliding_window=window))
    return KVSpec(tuple(layers))


# tensor parallel: how a model's heads and rows split over ranks (the layers, the engine and the planner share these)


def split_range(total: int, rank: int, size: int) -> tuple[int, int]:
    """[start, end) of part `rank` when `total` items are split into `size` contiguous parts as evenly as possible."""
    return total * rank // size, total * (rank + 1) // size


def head_partition(num_heads: int, num_kv_heads: int, rank: int, size: int) -> tuple[int, int, int, int]:
    """(first query head, query heads, first KV head, KV heads) of `rank`'s attention shard.

    With at least as many KV heads as ranks, each rank takes a contiguous run of KV heads (as evenly as the count
    allows: 3 KV heads over 2 ranks are 1 + 2) with their query heads. With fewer, every rank holds one KV head, a copy
    of the one its query heads read, and the query heads split evenly."""
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads do not group over {num_kv_heads} KV heads")
    group = num_heads // num_kv_heads
    if num_kv_heads >= size:
        kv_start, kv_end = split_range(num_kv_heads, rank, size)
        return kv_start * group, (kv_end - kv_start) * group, kv_start, kv_end - kv_start
    per_rank = num_heads // size
    if num_heads % size or group % per_rank:
        raise ValueError(f"{num_heads} query heads over {num_kv_heads} KV heads cannot be split over {size} ranks "
                         "(use a tensor-parallel size that divides the heads)")  # fmt: skip
    q_start = rank * per_rank
    return q_start, per_rank, q_start // group, 1


def tensor_parallel_config(cfg: ModelConfig, rank: int, size: int) -> ModelConfig:
    """`cfg` as one tensor-parallel rank's KV cache sees it: that rank's query and KV heads (MLA: its query heads, and
    the whole latent cache, which is not divided)."""
    if size == 1:
        return cfg
    if cfg.kv_lora_rank:  # MLA: the query heads split evenly; the latent cache (one vector per token) is every rank's
        start, end = split_range(cfg.num_attention_heads, rank, size)
        return replace(cfg, num_attention_heads=end - start, num_key_value_heads=end - start)
    _, num_heads, _, num_kv_heads = head_partition(cfg.num_attention_heads, cfg.num_key_value_heads, rank, size)
    return replace(cfg, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads)


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1, "fp8": 1}


def kv_bytes_per_token(spec: KVSpec, dtype: str = "bfloat16") -> int:
    """Bytes of KV cache per token of context, counting every layer in full (no window)."""
    return sum(layer.values_per_token for layer in spec.layers) * DTYPE_BYTES[dtype]


def kv_bytes(spec: KVSpec, num_tokens: int, dtype: str = "bfloat16") -> int:
    """Bytes to hold `num_tokens` of one sequence's context; sliding-window layers hold at most their window."""
    total = 0
    for layer in spec.layers:
        held = num_tokens if layer.sliding_window is None else min(num_tokens, layer.sliding_window)
        total += held * layer.values_per_token
    return total * DTYPE_BYTES[dtype]


def kv_blocks_needed(spec: KVSpec, num_tokens: int, block_size: int, max_num_batched_tokens: int,
                     num_seqs: int = 1) -> int:  # fmt: skip
    """Blocks a paged pool needs for `num_seqs` sequences of `num_tokens` tokens at once. A full-attention group holds
    every token of each. A sliding group holds, per sequence, its window and one more block (a window straddles a
    block boundary), and also the step's new tokens, at most `max_num_batched_tokens`, which may all be one
    sequence's prefill chunk. The engine's check (one sequence must fit), its default pool and its default context
    length all come from this one count."""
    total = 0
    for group in spec.groups:
        window = group.sliding_window
        if window is None:
            total += num_seqs * -(-num_tokens // block_size)
        else:
            total += -(-min(num_tokens, window + max_num_batched_tokens) // block_size) + 1
            total += (num_seqs - 1) * (-(-min(num_tokens, window) // block_size) + 1)
    return total


DEFAULT_MAX_MODEL_LEN = 8192  # the context a model gets when no --max-model-len is given, if its file allows it
MIN_DEFAULT_MODEL_LEN = 512  # a default context shrunk below this (too little memory) is an error instead
GIB = 1 << 30


@dataclass(slots=True, frozen=True)
class KVPlan:
    """What the engine allocates, decided from the config and tensor metadata before any weight is read."""

    max_model_len: int
    num_blocks: int
    block_bytes: int
    budget_bytes: int  # the most the pool may use: --kv-cache-memory, or a quarter of the memory after the weights
    note: str  # how max_model_len was chosen, for the log


def plan_kv_cache(spec: KVSpec, engine_config: EngineConfig, context_length: int, free_bytes: int,
                  dtype: str = "bfloat16") -> KVPlan:  # fmt: skip
    """max_model_len and the block pool from the memory budget, never from the context length a file declares.

    `free_bytes`: memory left once the weights are in. The budget is `kv_cache_memory`, or by default a quarter of
    `free_bytes`. An explicit max_model_len that does not fit is a ValueError naming the budget and the flags to
    change; the default is min(context_length, DEFAULT_MAX_MODEL_LEN), lowered to what the budget holds. With no
    explicit budget the pool is what max_num_seqs such sequences need, within the budget."""
    ec, bs = engine_config, engine_config.block_size
    chunk = ec.max_num_batched_tokens
    block_bytes = spec.block_bytes(bs, dtype)
    free_bytes = max(free_bytes, 0)
    if ec.kv_cache_memory is None:
        budget, source = free_bytes // 4, f"a quarter of the {free_bytes / GIB:.2f} GiB free after the weights"
    else:
        budget, source = kv_budget_bytes(ec.kv_cache_memory, free_bytes), "--kv-cache-memory"
        if budget > free_bytes:
            raise ValueError(f"--kv-cache-memory {budget / GIB:.2f} GiB is more than the {free_bytes / GIB:.2f} GiB "
                             "of memory free after the weights: lower --kv-cache-memory")  # fmt: skip
    limit = budget // block_bytes

    def need(n: int) -> int:
        return kv_blocks_needed(spec, n, bs, chunk)

    def largest_fit(hi: int) -> int:
        lo = 0
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if need(mid) <= limit else (lo, mid - 1)
        return lo if lo < 2 * bs else lo // bs * bs

    held = f"the KV-cache budget of {budget / GIB:.2f} GiB ({source}) holds {limit} blocks of {bs} tokens"
    if ec.max_model_len is not None:
        length = min(ec.max_model_len, context_length)
        note = f"max_model_len {length}" + (f" (the model's context; {ec.max_model_len} was asked)"
                                            if length < ec.max_model_len else "")  # fmt: skip
        if need(length) > limit:
            raise ValueError(f"max_model_len={length} needs {need(length)} KV-cache blocks, but {held}: lower "
                             f"--max-model-len (at most {largest_fit(length)} fits) or raise --kv-cache-memory")  # fmt: skip
    else:
        length = min(context_length, DEFAULT_MAX_MODEL_LEN)
        note = f"max_model_len {length} (the model's context is {context_length}; default cap {DEFAULT_MAX_MODEL_LEN}"
        if need(length) > limit:
            fitted = largest_fit(length)
            if fitted < min(length, MIN_DEFAULT_MODEL_LEN):
                raise ValueError(f"{held}, too few for even a {min(length, MIN_DEFAULT_MODEL_LEN)}-token context: "
                                 "raise --kv-cache-memory or free some memory")  # fmt: skip
            note += f"; {held}, so lowered from {length}"
            length = fitted
        note += "; --max-model-len changes it)"
    if ec.kv_cache_memory is None:
        num_blocks = min(kv_blocks_needed(spec, length, bs, chunk, ec.max_num_seqs), limit)
    else:
        num_blocks = limit
    return KVPlan(length, num_blocks, block_bytes, budget, note)


SCHEDULING_POLICIES = ("fcfs", "shortest")  # which waiting request the scheduler admits first
SPECULATIVE_METHODS = (None, "ngram", "draft", "mtp")  # how draft tokens are proposed (EngineConfig.speculative)


@dataclass(slots=True)
class EngineConfig:
    """Engine limits, named as vLLM's flags (--max-model-len, --max-num-seqs, ...)."""

    # None: the model's context length, at most DEFAULT_MAX_MODEL_LEN and what the KV budget holds (plan_kv_cache)
    max_model_len: int | None = None
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 512  # per step: chunked prefill token budget
    # GiB (a number >= 1), a fraction of the memory free after the weights (< 1), or a size with a unit ("2GiB");
    # None: enough for max_num_seqs full-length sequences, at most a quarter of the memory free after the weights
    kv_cache_memory: float | str | None = None
    block_size: int = 16
    dtype: str = "auto"  # compute dtype: auto | float32 | bfloat16
    max_waiting: int = 256  # queue depth before new requests are refused (HTTP 429)
    enable_prefix_caching: bool = True
    scheduling_policy: str = "fcfs"  # which waiting request is admitted first: fcfs | shortest (prompt, with aging)
    # GGUF weights in prefill with int8 activations, as llama.cpp computes (and as decode steps already do): faster
    # prefill, a little less exact than bf16 activations
    int8_prefill: bool = False
    # an untied LM head held in bf16 (gpt-oss's) is requantized once to Q8_0 blocks and read with int8 activations:
    # about half the bytes a decode step reads for it, at a small logit error (docs/performance.md)
    lm_head_int8: bool = False
    # every dense bf16 projection (attention's and the LM head; not a router) requantized once to Q8_0 and read with
    # int8 activations: gpt-oss's attention and head are about 60% of the bytes a decode step reads (docs/performance.md)
    int8_weights: bool = False
    # after a step that finished a request while prefill work waits (so the next step is a long one), the server's
    # engine thread waits up to this long for new requests before starting it: a client that answers a finished
    # request with its next one (a chat turn, an agent's tool loop) then joins that step instead of waiting a whole
    # step (hundreds of ms on a CPU) behind it
    admission_wait_ms: float = 20.0
    seed: int = 0
    # speculative decoding (engine/speculative.py, docs/speculative.md): None (off) | "ngram" (prompt lookup) |
    # "draft" (a smaller model with the same tokenizer, `draft_model`; setting draft_model alone implies it) |
    # "mtp" (DeepSeek-V3/R1's multi-token-prediction layer, from the model's own checkpoint)
    speculative: str | None = None
    num_speculative_tokens: int = 4  # the most draft tokens per sequence and step (each sequence adapts below it)
    prompt_lookup_min: int = 2  # n-gram sizes the prompt-lookup proposer matches, longest first
    prompt_lookup_max: int = 5
    draft_model: str | None = None  # a model reference, as for the target
    # no drafts in a step where more sequences decode than this: verification then costs more than it saves
    speculative_max_batch: int = 2  # measured: docs/speculative.md
    # tensor parallelism: ranks in all (over `nnodes` machines, the same number on each); rank 0 runs the scheduler and
    # the API, the others run the same forward on their shard of the weights (engine/parallel.py)
    tensor_parallel_size: int = 1
    nnodes: int = 1
    node_rank: int = 0  # this machine's place among the nnodes (0: the one that serves)
    master_addr: str = "127.0.0.1"  # where rank 0 listens for the others
    master_port: int = 0  # 0: a free port (one machine only)
    distributed_timeout_s: float = 120.0  # a collective that waits longer means a rank hung: the engine stops
    # MoE models under tensor parallelism: each rank holds E/N whole experts, the router runs on every rank and one
    # all-reduce sums the experts' outputs
    enable_expert_parallel: bool = False

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "max_waiting"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.admission_wait_ms <= 1000:
            raise ValueError(f"admission_wait_ms must be between 0 and 1000, got {self.admission_wait_ms}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be at least 1, got {self.max_model_len}")
        if self.kv_cache_memory is not None:
            kv_budget_bytes(self.kv_cache_memory, 1 << 30)  # validates
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling_policy must be one of {', '.join(SCHEDULING_POLICIES)}, "
                             f"got {self.scheduling_policy!r}")  # fmt: skip
        if self.draft_model is not None and self.speculative is None:
            self.speculative = "draft"
        if self.speculative not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative must be one of {', '.join(m for m in SPECULATIVE_METHODS if m)} or None, "
                             f"got {self.speculative!r}")  # fmt: skip
        if self.speculative == "draft" and self.draft_model is None:
            raise ValueError("speculative='draft' needs a draft_model")
        if self.speculative != "draft" and self.draft_model is not None:
            raise ValueError(f"a draft_model is for speculative='draft', not {self.speculative!r}")
        if not 1 <= self.num_speculative_tokens <= 16:
            raise ValueError(f"num_speculative_tokens must be between 1 and 16, got {self.num_speculative_tokens}")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError(f"need 1 <= prompt_lookup_min <= prompt_lookup_max, got {self.prompt_lookup_min} and "
                             f"{self.prompt_lookup_max}")  # fmt: skip
        if self.speculative_max_batch < 1:
            raise ValueError(f"speculative_max_batch must be at least 1, got {self.speculative_max_batch}")
        if self.speculative is not None and self.tensor_parallel_size > 1:
            raise ValueError("speculative decoding does not run under tensor parallelism yet: use one or the other")
        if self.tensor_parallel_size < 1 or self.nnodes < 1 or self.tensor_parallel_size % self.nnodes:
            raise ValueError(f"tensor_parallel_size ({self.tensor_parallel_size}) must be a positive multiple of nnodes "
                             f"({self.nnodes})")  # fmt: skip
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node_rank must be between 0 and {self.nnodes - 1}, got {self.node_rank}")
        if self.nnodes > 1 and not self.master_port:
            raise ValueError("several nodes need an explicit master_port (the same on every node)")
        if self.distributed_timeout_s <= 0:
            raise ValueError(f"distributed_timeout_s must be positive, got {self.distributed_timeout_s}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")


_UNITS = {"": 1 << 30, "b": 1, "k": 1 << 10, "kb": 10**3, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6, "mib": 1 << 20,
          "g": 1 << 30, "gb": 10**9, "gib": 1 << 30, "t": 1 << 40, "tb": 10**12, "tib": 1 << 40}  # fmt: skip


def kv_budget_bytes(value: float | str, available_bytes: int) -> int:
    """--kv-cache-memory in bytes: a bare number >= 1 is GiB, below 1 a fraction of `available_bytes`; strings may
    carry a unit ("512MiB", "2GiB", "1.5G")."""
    text = str(value).strip().lower().replace(" ", "")
    number = text.rstrip("kmgtib")
    unit = text[len(number) :]
    try:
        amount = float(number)
    except ValueError:
        raise ValueError(f"kv_cache_memory: cannot read {value!r} (try 4, 0.5, 512MiB or 2GiB)") from None
    if amount <= 0 or unit not in _UNITS:
        raise ValueError(f"kv_cache_memory: {value!r} must be positive, with a unit among MiB, GiB, MB, GB")
    if not unit and amount < 1:
        return int(amount * available_bytes)
    return int(amount * _UNITS[unit])


def hearth_home() -> str:
    """`$HEARTH_HOME`, default `~/.hearth`: models/, keys, audit/, usage.db, config.toml."""
    return os.environ.get("HEARTH_HOME") or os.path.join(os.path.expanduser("~"), ".hearth")


# Every HEARTH_* environment variable, for --help texts (name, default, help).
ENV = [
    ("HEARTH_HOME", "~/.hearth", "data home: keys, audit log, usage ledger, config"),
    ("HEARTH_NUM_THREADS", "physical cores", "CPU threads for torch"),
    ("HEARTH_LOG_LEVEL", "INFO", "log level"),
    ("HEARTH_REPACK_CACHE", "0", "1: keep weights repacked at load (gpt-oss's MXFP4 experts) in a file that later loads map"),
]
