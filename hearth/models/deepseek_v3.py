"""DeepSeek-V3 / R1 (and V2-style MLA models): multi-head latent attention over a latent paged KV cache, YaRN rope with
the mscale² softmax correction, the first dense layers, and MoE with shared experts and grouped routing (V3's sigmoid
noaux_tc, or V2's softmax).

Reference: transformers' modeling_deepseek_v3.py and DeepSeek-V3's inference/model.py; facts in docs/models.md §2.
The cache holds one vector per token per layer, [c_kv (kv_lora_rank, after kv_a_layernorm) | k_pe (rope dims, after
rope)]. Prefill attends in the naive form (keys and values expanded through kv_b_proj); decode in the absorbed form
(W_UK folded into the query, W_UV applied after attending over the latents), which never expands the cache. Both read
kv_b_proj as its per-head W_UK^T and W_UV (copies made at load; the loaded weight is then dropped), except that a
GGUF file's Q8_0 attn_k_b / attn_v_b stay in the file: decode's kernel reads them there, prefill dequantizes them per step.
Weights: HF bf16/fp32, DeepSeek's FP8 128×128 blocks (`weight_scale_inv`, quant/fp8.py) and GGUF `deepseek2`.

NOTE: DeepSeek's rope pairs adjacent dims (2i, 2i+1): the rope values out of q_b_proj / q_proj / kv_a_proj_with_mqa
are put in [even | odd] order at run time so the shared rotate_half rope applies, as HF `rope_interleave=True` does.
(Reordering the weights' rows once at load instead copied them: a GGUF file's Q8_0 q_proj could not stay in the map.)

The MTP (multi-token prediction) layer, `model.layers.{num_hidden_layers}` in the checkpoint, is built only when the
config asks for it (`extra["mtp"]`, set for speculative decoding with it: engine/speculative.py, docs/speculative.md);
otherwise the loader skips its tensors. Row i of it reads the model's final (normed) hidden state at position i and
the embedding of token i + 1, runs one more MoE decoder layer at position i on a latent cache of its own (paged by the
decoder layers' block tables) and predicts token i + 2.

Tensor parallel (docs/architecture.md): MLA splits by query heads. q_a_proj / kv_a_proj_with_mqa and their norms are
replicated, so every rank writes and reads the whole latent cache (it is not divided); q_b_proj (q_proj), kv_b_proj
(GGUF's attn_k_b / attn_v_b) keep the rank's heads and o_proj its heads' input columns, with one all-reduce. Dense MLPs
and the shared experts split the intermediate dim; routed experts either split it too or, with expert parallel, live
whole on one rank each (E/N per rank, the router on every rank). An MoE layer sums its routed and shared partial
outputs in float32 and all-reduces once.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hearth.config import ModelConfig
from hearth.layers.activation import SiluAndMul
from hearth.layers.attention import cache_zeros, latent_blocks, latent_decode_attention, latent_weight
from hearth.layers.context import get_context
from hearth.layers.decoder import DecoderLayer, DecoderModel
from hearth.layers.distributed import all_reduce, get_tensor_parallel, split_range
from hearth.layers.fp8_linear import Fp8ColumnParallelLinear, Fp8Linear, Fp8RowParallelLinear, fp8_mode, set_fp8_mode
from hearth.layers.linear import ParallelLMHead, VocabParallelEmbedding, heads_mm, matmul_dtype
from hearth.layers.moe import SCORING_FUNCS, BlocksMoE, grouped_topk
from hearth.layers.norm import RMSNorm
from hearth.layers.rotary import RotaryEmbedding, apply_rotary_emb_, deinterleave_pairs
from hearth.layers.weights import dense, stacked_part

MLA_MODES = ("auto", "naive", "absorbed")  # auto: naive for prefill, absorbed for decode


def softmax_scale(config: ModelConfig) -> float:
    """qk_head_dim^-1/2, times mscale² when YaRN sets mscale_all_dim (HF's rule; docs/models.md §2.2)."""
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    scaling = config.rope_scaling or {}
    mscale_all_dim = scaling.get("mscale_all_dim")
    factor = scaling.get("factor", 1.0)
    if scaling.get("rope_type") == "yarn" and mscale_all_dim and factor > 1:
        mscale = 0.1 * mscale_all_dim * math.log(factor) + 1.0
        scale *= mscale * mscale
    return scale


def rope_scaling(config: ModelConfig) -> dict | None:
    """DeepSeek's YaRN leaves cos/sin unscaled: HF gets that from mscale / mscale_all_dim (both 1 in V3), but GGUF
    metadata carries only mscale_all_dim (yarn_log_multiplier), which alone would scale cos/sin by mscale(factor)."""
    scaling = config.rope_scaling
    if scaling and scaling.get("rope_type") == "yarn" and not scaling.get("mscale") and scaling.get("mscale_all_dim"):
        return {**scaling, "attention_factor": scaling.get("attention_factor") or 1.0}
    return scaling


class KvBProj(Fp8ColumnParallelLinear):
    """kv_b_proj [H·(nope+v), kv_lora_rank], held dense (the absorbed form takes per-head views of it). Also accepts
    newer GGUF `deepseek2` files that store it split: k_b [H, c, nope] (transposed) and v_b [H, v, c]; a Q8_0 pair
    that one rank holds whole stays in the file as `file_blocks` (layers.attention.latent_blocks), read in place.
    Under tensor parallelism a rank keeps the rows of its heads [head_start, head_start + num_heads)."""

    def __init__(self, kv_lora_rank: int, num_heads: int, nope_dim: int, v_dim: int,
                 heads: tuple[int, int] | None = None):  # fmt: skip
        head_start, head_end = heads or (0, num_heads)
        per_head = nope_dim + v_dim
        super().__init__(kv_lora_rank, [num_heads * per_head], shard_ranges=[(head_start * per_head, head_end * per_head)])
        self.total_heads, self.head_start = num_heads, head_start
        self.num_heads, self.nope_dim, self.v_dim = head_end - head_start, nope_dim, v_dim
        self._split: dict[str, torch.Tensor] = {}
        self.file_blocks = None  # W_UK^T and W_UV read where they lie in the file (latent_blocks), or None

    def weight_loader(self, tensor, kind: str = "weight", shard_id: int = 0) -> None:
        if kind not in ("k_b", "v_b"):
            return super().weight_loader(tensor, kind, shard_id)
        c, heads = self.in_features, self.total_heads
        want = (heads, c, self.nope_dim) if kind == "k_b" else (heads, self.v_dim, c)
        if tuple(tensor.shape) != want:
            raise ValueError(f"{kind}: expected shape {want}, got {tuple(tensor.shape)}")
        self._split[kind] = tensor
        if len(self._split) == 2:
            k_b, v_b = self._split.pop("k_b"), self._split.pop("v_b")
            self.file_blocks = latent_blocks(k_b, v_b) if self.num_heads == heads else None
            if self.file_blocks is None:
                mine = slice(self.head_start, self.head_start + self.num_heads)
                k_b, v_b = dense(k_b)[mine], dense(v_b)[mine]
                w = torch.cat([k_b.transpose(1, 2).to(v_b.dtype), v_b], dim=1)  # [this rank's H, nope + v, c]
                Fp8Linear.weight_loader(self, w.reshape(-1, c), "weight", 0)  # already this rank's rows

    def finalize(self, dtype: torch.dtype, keep_quantized: bool = True) -> None:
        if self._split:
            raise ValueError(f"GGUF split kv_b: only {sorted(self._split)} present")
        if self.file_blocks is None:
            super().finalize(dtype, keep_quantized=False)


class DeepseekV3Attention(nn.Module):
    """MLA. Owns its latent cache: [num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]. Under tensor parallelism
    `num_heads` is this rank's share of the query heads; the latent projections and the cache are whole on every rank."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        hidden = config.hidden_size
        tp = get_tensor_parallel()
        total_heads = config.num_attention_heads
        h0, h1 = split_range(total_heads, tp.rank, tp.size)  # this rank's query heads (as config.tensor_parallel_config)
        self.num_heads = h1 - h0
        self.nope_dim, self.rope_dim, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.kv_lora_rank = c = config.kv_lora_rank
        self.q_lora_rank = config.q_lora_rank
        q_head_dim = self.nope_dim + self.rope_dim
        q_rows = [(h0 * q_head_dim, h1 * q_head_dim)]
        bias = config.attention_bias
        if self.q_lora_rank:
            self.q_a_proj = Fp8Linear(hidden, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, 1e-6)
            self.q_b_proj = Fp8ColumnParallelLinear(self.q_lora_rank, [total_heads * q_head_dim], shard_ranges=q_rows)
        else:
            self.q_proj = Fp8ColumnParallelLinear(hidden, [total_heads * q_head_dim], shard_ranges=q_rows)
        self.kv_a_proj_with_mqa = Fp8Linear(hidden, c + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(c, 1e-6)
        self.kv_b_proj = KvBProj(c, total_heads, self.nope_dim, self.v_dim, heads=(h0, h1))
        self.o_proj = Fp8RowParallelLinear(total_heads * self.v_dim, hidden, bias=bias,
                                           input_range=(h0 * self.v_dim, h1 * self.v_dim))  # fmt: skip
        self.scale = softmax_scale(config)
        self.mode = "auto"
        self.kv_cache: torch.Tensor | None = None  # set by the model runner
        # per-head W_UK^T [H, c, nope] and W_UV [H, v, c] from kv_b_proj, set in finalize: both [H, out, in] as
        # heads_mm takes them, or the file's blocks (KvBProj.file_blocks; the torch forms get them from latent_weights)
        self.w_uk_t = None
        self.w_uv = None

    def allocate_cache(self, num_blocks: int, block_size: int, layer_spec, dtype: torch.dtype, device) -> None:
        """Called by the model runner with this layer's (latent) LayerKV."""
        if not layer_spec.is_latent or layer_spec.latent_size != self.kv_lora_rank + self.rope_dim:
            raise ValueError(f"MLA needs a latent cache of {self.kv_lora_rank + self.rope_dim}, got {layer_spec}")
        self.kv_cache = cache_zeros((num_blocks, block_size, layer_spec.latent_size), dtype, device)

    def finalize(self, dtype: torch.dtype, keep_quantized: bool = True) -> None:
        """After the projections: the per-head W_UK / W_UV views the absorbed form multiplies by. The file's blocks
        stay where they are in bf16 (the decode kernel reads them); other dtypes take dense copies."""
        blocks = self.kv_b_proj.file_blocks
        if blocks is not None:
            self.w_uk_t, self.w_uv = blocks if dtype == torch.bfloat16 else (latent_weight(w, self.num_heads, dtype)
                                                                            for w in blocks)  # fmt: skip
            return
        w = self.kv_b_proj.dense_weight(dtype).view(self.num_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        # contiguous per-head matrices: batched matmuls on strided views of kv_b copy them on every call
        self.w_uk_t = w[:, : self.nope_dim].transpose(1, 2).contiguous()
        self.w_uv = w[:, self.nope_dim :].contiguous()
        self.kv_b_proj.method = None  # both forms read only these copies: the weight is not held twice

    def forward(self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        num_tokens = hidden_states.shape[0]
        c, heads = self.kv_lora_rank, self.num_heads
        if self.q_lora_rank:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
        else:
            q = self.q_proj(hidden_states)
        q_nope, q_pe = q.view(num_tokens, heads, -1).split([self.nope_dim, self.rope_dim], dim=-1)
        # the checkpoint's rope dims come as interleaved pairs: put in rotate-half order (copies of the few rope
        # values; the weights stay as the file has them), then rotated in place (one C pass each in bf16)
        q_pe = apply_rotary_emb_(deinterleave_pairs(q_pe), cos, sin)  # [num_tokens, H, rope]
        c_kv, k_pe = self.kv_a_proj_with_mqa(hidden_states).split([c, self.rope_dim], dim=-1)
        k_pe = apply_rotary_emb_(deinterleave_pairs(k_pe[:, None]), cos, sin)[:, 0]
        latent = torch.cat([self.kv_a_layernorm(c_kv), k_pe], dim=-1)  # [num_tokens, c + rope]: what the cache holds

        ctx = get_context()
        cache = self.kv_cache if ctx.slot_mapping is not None else None
        if cache is not None:
            cache.view(-1, cache.shape[-1]).index_copy_(0, ctx.slot_mapping, latent.to(cache.dtype))
        out = hidden_states.new_empty(num_tokens, heads, self.v_dim)
        # prefill attends in float32 where bf16 matmuls are slow (an AVX2 CPU), else in the model's dtype
        pdt = matmul_dtype(latent)
        weights = self.latent_weights(pdt) if ctx.prefill_seq_idx else None
        for i in ctx.prefill_seq_idx:
            start, end = ctx.q_starts[i], ctx.q_starts[i + 1]
            length, num_new = ctx.context_lens[i], end - start
            if cache is None or length == num_new:
                seq_latent = latent[start:end]
            else:
                seq_latent = gather_latent(cache, ctx.block_tables[i], length)
            seq_latent, qn, qp = seq_latent.to(pdt), q_nope[start:end].to(pdt), q_pe[start:end].to(pdt)
            k_pos = torch.arange(length, device=q.device)
            mask = k_pos[None, :] <= k_pos[length - num_new :, None]  # [num_new, length], causal after the cached part
            if self.mode == "absorbed":
                out[start:end] = self.absorbed(qn[None], qp[None], seq_latent[None], mask[None, None], weights)[0]
            else:
                out[start:end] = self.naive(qn, qp, seq_latent, mask, weights)
        if ctx.decode_seq_idx:
            rows = ctx.decode_rows
            # all heads and rows in one C call, written into out's decode rows, where it runs (CPU, bf16 cache)
            if self.mode != "naive" and latent_decode_attention(q_nope, q_pe, self.w_uk_t, self.w_uv, cache,
                                                                ctx.decode_block_tables, ctx.decode_context_lens,
                                                                self.scale, rows, out) is not None:  # fmt: skip
                return self.o_proj(out.flatten(1))
            keys = cache[ctx.decode_block_tables].flatten(1, 2).to(latent.dtype)  # [B, max_len, c + rope]
            weights = self.latent_weights(latent.dtype)
            if self.mode == "naive":
                for b, row in enumerate(rows.tolist()):
                    length = int(ctx.decode_context_lens[b])
                    out[row] = self.naive(q_nope[row : row + 1], q_pe[row : row + 1], keys[b, :length], None,
                                          weights)[0]  # fmt: skip
            else:
                out[rows] = self.absorbed(q_nope[rows, None], q_pe[rows, None], keys, ctx.decode_mask, weights)[:, 0]
        return self.o_proj(out.flatten(1))

    def latent_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK^T and W_UV for the torch forms: the held copies, or for this step from the file's blocks."""
        return latent_weight(self.w_uk_t, self.num_heads, dtype), latent_weight(self.w_uv, self.num_heads, dtype)

    def naive(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, mask: torch.Tensor | None,
              weights: tuple[torch.Tensor, torch.Tensor]):  # fmt: skip
        """HF's form: expand the latents to per-head keys and values. q_*: [n, H, d]; latent: [L, c + rope];
        mask: [n, L] bool or None (attend to all); weights: (W_UK^T, W_UV). Returns [n, H, v]."""
        c_kv, k_pe = latent.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        w_uk_t, w_uv = weights
        # kv_b_proj's keys (nope part) and values per head, through its rows W_UK and W_UV: [H, L, nope], [H, L, v]
        k_nope = torch.matmul(c_kv, w_uk_t)
        v = torch.matmul(c_kv, w_uv.transpose(1, 2))
        k = torch.cat([k_nope, k_pe[None].expand(self.num_heads, -1, -1)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(0, 1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale).transpose(0, 1)

    def absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, mask: torch.Tensor,
                 weights: tuple[torch.Tensor, torch.Tensor]):  # fmt: skip
        """Attention in latent space: q̃ = W_UK^T q_nope per head scores against c_kv, q_pe against k_pe, the context
        is a mix of latents, and W_UV maps it to each head's values. q_*: [B, n, H, d]; latent: [B, L, c + rope];
        mask: bool broadcastable to [B, H, n, L]; weights: (W_UK^T, W_UV). Returns [B, n, H, v]."""
        b, n, heads, _ = q_nope.shape
        w_uk_t, w_uv = weights
        length = latent.shape[1]
        # per head: [B·n, nope] @ W_UK [nope, c], as one batched matmul over the heads
        q_lat = heads_mm(q_nope.permute(2, 0, 1, 3).reshape(heads, b * n, -1), w_uk_t)
        q_lat = q_lat.view(heads, b, n, -1).transpose(0, 1)  # [B, H, n, c]
        q_full = torch.cat([q_lat, q_pe.transpose(1, 2)], dim=-1).reshape(b, heads * n, -1)  # [B, H·n, c + rope]
        scores = torch.bmm(q_full, latent.transpose(1, 2)).view(b, heads, n, length) * self.scale
        scores = scores.float().masked_fill(~mask, float("-inf"))
        p = torch.softmax(scores, dim=-1).to(latent.dtype).view(b, heads * n, length)
        ctx_lat = torch.bmm(p, latent[..., : self.kv_lora_rank]).view(b, heads, n, -1)  # [B, H, n, c]
        out = heads_mm(ctx_lat.transpose(0, 1).reshape(heads, b * n, -1), w_uv)  # [H, B·n, v]
        return out.view(heads, b, n, -1).permute(1, 2, 0, 3)  # [B, n, H, v]


def gather_latent(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    # cache: [num_blocks, block_size, latent] -> [length, latent]
    num_blocks = (length + cache.shape[1] - 1) // cache.shape[1]
    return cache[block_table[:num_blocks]].flatten(0, 1)[:length]


class DeepseekV3MLP(nn.Module):
    """SwiGLU: dense layers, each routed expert and the shared experts. `split` (the default): under tensor parallelism
    gate/up are column-parallel and down row-parallel over the intermediate dim; `forward` all-reduces, `partial` does
    not. Unsplit (a routed expert under expert parallel): whole on this rank."""

    def __init__(self, hidden_size: int, intermediate_size: int, split: bool = True):
        super().__init__()
        if split:
            self.gate_up_proj = Fp8ColumnParallelLinear(hidden_size, [intermediate_size] * 2)
            self.down_proj = Fp8RowParallelLinear(intermediate_size, hidden_size)
        else:
            self.gate_up_proj = Fp8Linear(hidden_size, 2 * intermediate_size, output_sizes=[intermediate_size] * 2)
            self.down_proj = Fp8Linear(intermediate_size, hidden_size)
        self.act_fn = SiluAndMul()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(hidden_states)))

    def partial(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """This rank's part of the output in float32 (summed over the ranks by the caller); the whole output for an
        unsplit MLP or without tensor parallelism."""
        h = self.act_fn(self.gate_up_proj(hidden_states))
        if getattr(self.down_proj, "tp_size", 1) > 1:
            return self.down_proj.method.apply_wide(h)  # DeepSeek's MLPs have no bias
        return self.down_proj(h).float()


class RemoteExpert(nn.Module):
    """A routed expert that lives on another rank (expert parallel): its tensors are passed over at load."""

    def __init__(self):
        super().__init__()
        self.gate_up_proj, self.down_proj = _Dropped(), _Dropped()


class _Dropped(nn.Module):
    drops_weights = True  # the loader does not even read them (safetensors)

    def weight_loader(self, tensor, kind: str = "weight", shard_id: int = 0) -> None:
        pass


class DeepseekV3Experts(nn.ModuleList):
    """Routed experts, one DeepseekV3MLP each (HF names `experts.{e}.gate_proj`); GGUF stores them stacked
    ([E, out, in], kinds `gate_proj_weight` / `up_proj_weight` / `down_proj_weight`) and they are split here."""

    STACKED = {"gate_proj_weight": ("gate_up_proj", 0), "up_proj_weight": ("gate_up_proj", 1),
               "down_proj_weight": ("down_proj", 0)}  # fmt: skip

    def weight_loader(self, tensor, kind: str = "weight", shard_id: int = 0) -> None:
        if kind not in self.STACKED or tensor.shape[0] != len(self):
            raise ValueError(f"expected stacked experts ({len(self)}, out, in) as {sorted(self.STACKED)}")
        proj, shard = self.STACKED[kind]
        for e, expert in enumerate(self):
            if not isinstance(expert, RemoteExpert):
                getattr(expert, proj).weight_loader(stacked_part(tensor, e), "weight", shard)


class MoEGate(nn.Module):
    """Router weight [E, hidden] and e_score_correction_bias [E], both kept in float32 whatever the model dtype."""

    def __init__(self, hidden_size: int, num_experts: int):
        super().__init__()
        self.weight: torch.Tensor | None = None
        self.e_score_correction_bias: torch.Tensor | None = None
        self.shape = (num_experts, hidden_size)

    def weight_loader(self, tensor, kind: str = "weight", shard_id: int = 0) -> None:
        want = self.shape if kind == "weight" else self.shape[:1]
        if kind not in ("weight", "e_score_correction_bias") or tuple(tensor.shape) != want:
            raise ValueError(f"router {kind}: expected shape {want}, got {tuple(tensor.shape)}")
        t = dense(tensor)
        setattr(self, kind, t.float().contiguous())

    def finalize(self, dtype: torch.dtype, keep_quantized: bool = True) -> None:
        if self.weight is None:
            raise ValueError("missing router weight")
        if self.e_score_correction_bias is None:  # older (V2-style) checkpoints have none
            self.e_score_correction_bias = torch.zeros(self.shape[0], device=self.weight.device)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden_states.float(), self.weight)


class DeepseekV3MoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        extra = config.extra
        self.top_k = config.num_experts_per_tok
        self.num_groups = extra.get("n_group") or 1
        self.topk_group = extra.get("topk_group") or 1
        self.norm_topk_prob = bool(extra.get("norm_topk_prob", True))
        self.routed_scaling_factor = float(extra.get("routed_scaling_factor", 1.0))
        # HF configs say `scoring_func` (V3 checkpoints: sigmoid); GGUF's expert_gating_func is read into it
        self.scoring_func = extra.get("scoring_func", "sigmoid")
        if self.scoring_func not in SCORING_FUNCS:
            raise ValueError(f"scoring_func {self.scoring_func!r} is not supported (supported: {', '.join(SCORING_FUNCS)})")
        num_experts, inter = config.num_local_experts, config.moe_intermediate_size
        if num_experts % self.num_groups or num_experts // self.num_groups < 2:
            raise ValueError(f"{num_experts} experts do not split into {self.num_groups} groups of at least 2")
        self.gate = MoEGate(config.hidden_size, num_experts)  # the router: whole on every rank
        tp = get_tensor_parallel()
        self.tp_size = tp.size
        if tp.size > 1 and tp.expert_parallel:  # whole experts [expert_start, expert_end) here, the others elsewhere
            self.expert_start, self.expert_end = split_range(num_experts, tp.rank, tp.size)
            local = range(self.expert_start, self.expert_end)
            self.experts = DeepseekV3Experts(DeepseekV3MLP(config.hidden_size, inter, split=False) if e in local
                                             else RemoteExpert() for e in range(num_experts))  # fmt: skip
        else:  # each expert's intermediate dim split over the ranks (whole at tp=1)
            self.expert_start, self.expert_end = 0, num_experts
            self.experts = DeepseekV3Experts(DeepseekV3MLP(config.hidden_size, inter) for _ in range(num_experts))
        num_shared = extra.get("n_shared_experts") or 0
        self.shared_experts = DeepseekV3MLP(config.hidden_size, inter * num_shared) if num_shared else None
        self._blocks_moe: BlocksMoE | None | bool = False  # built on the first call (False: not yet tried)

    def route(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return grouped_topk(self.gate(hidden_states), self.gate.e_score_correction_bias, self.top_k, self.num_groups,
                            self.topk_group, self.norm_topk_prob, self.routed_scaling_factor,
                            self.scoring_func)  # fmt: skip

    def blocks_moe(self) -> BlocksMoE | None:
        """The experts (routed and shared) as one GGUF-blocks kernel call, where they are held that way."""
        if self._blocks_moe is False:
            shared = [self.shared_experts] if self.shared_experts is not None else []
            self._blocks_moe = BlocksMoE.build(list(self.experts), shared)
        return self._blocks_moe

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.tp_size > 1:
            return self.forward_parallel(hidden_states)
        weights, ids = self.route(hidden_states)
        if (fused := self.blocks_moe()) is not None:  # GGUF blocks: all experts in one call, int8 activations
            return fused(hidden_states, weights, ids)
        num_tokens, top_k = ids.shape
        flat_ids = ids.reshape(-1)
        # each (token, slot) pair's expert output in its own row, then one weighted sum over the slots: no scatter-add
        # per expert (index_add_ opens a parallel region even for one row)
        ys = hidden_states.new_empty(num_tokens * top_k, hidden_states.shape[-1])
        for expert_id in torch.unique(flat_ids).tolist():
            pairs = torch.nonzero(flat_ids == expert_id).squeeze(1)
            ys[pairs] = self.experts[expert_id](hidden_states[pairs // top_k])
        out = (ys.view(num_tokens, top_k, -1) * weights.unsqueeze(-1).to(ys.dtype)).sum(1)
        if self.shared_experts is not None:
            out = out + self.shared_experts(hidden_states)
        return out

    def forward_parallel(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Every rank routes all tokens; each runs its experts' (token, slot) pairs (expert parallel: whole experts,
        the pairs of other ranks' experts stay zero; otherwise its slice of every expert), adds its part of the shared
        experts, and one all-reduce sums the ranks' float32 partials."""
        weights, ids = self.route(hidden_states)
        num_tokens, top_k = ids.shape
        flat_ids = ids.reshape(-1)
        ys = hidden_states.new_zeros(num_tokens * top_k, hidden_states.shape[-1], dtype=torch.float32)
        for expert_id in torch.unique(flat_ids).tolist():
            if self.expert_start <= expert_id < self.expert_end:
                pairs = torch.nonzero(flat_ids == expert_id).squeeze(1)
                ys[pairs] = self.experts[expert_id].partial(hidden_states[pairs // top_k])
        out = (ys.view(num_tokens, top_k, -1) * weights.unsqueeze(-1)).sum(1)
        if self.shared_experts is not None:
            out += self.shared_experts.partial(hidden_states)
        return all_reduce(out).to(hidden_states.dtype)


class DeepseekV3DecoderLayer(DecoderLayer):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = DeepseekV3Attention(config, layer_idx)
        if layer_idx < (config.extra.get("first_k_dense_replace") or 0) or not config.num_local_experts:
            self.mlp = DeepseekV3MLP(config.hidden_size, config.intermediate_size)
        else:
            self.mlp = DeepseekV3MoE(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class DeepseekV3MTP(DeepseekV3DecoderLayer):
    """The multi-token-prediction layer: a decoder layer (MoE, like the model's later layers) whose input is
    eh_proj([enorm(embedding of token i + 1) | hnorm(the model's hidden state at i)]), and whose output, through
    shared_head.norm and shared_head.head, is the distribution of token i + 2. `parts` (loader/inspect.py mtp_parts)
    says whether the checkpoint gives it its own embedding and head; without them the model's are used."""

    def __init__(self, config: ModelConfig, parts: dict):
        super().__init__(config, config.num_hidden_layers)
        hidden = config.hidden_size
        self.enorm = RMSNorm(hidden, config.rms_norm_eps)
        self.hnorm = RMSNorm(hidden, config.rms_norm_eps)
        self.eh_proj = Fp8Linear(2 * hidden, hidden)
        self.shared_head = nn.Module()
        self.shared_head.norm = RMSNorm(hidden, config.rms_norm_eps)
        self.shared_head.head = Fp8Linear(hidden, config.vocab_size) if parts.get("head") else None
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, hidden) if parts.get("embed_tokens") else None

    def share_copies(self, embed_tokens: nn.Module, lm_head: nn.Module | None) -> None:
        """Drop an own embedding or head that holds exactly the model's (DeepSeek-V3 checkpoints repeat both in the
        MTP layer): the model's are used instead, and the copies' memory goes."""

        def same(a, b) -> bool:
            for name in ("weight", "qweight"):
                x, y = getattr(a, name, None), getattr(b, name, None)
                if x is not None or y is not None:
                    if x is None or y is None or getattr(x, "qtype", None) != getattr(y, "qtype", None):
                        return False
                    x, y = getattr(x, "data", x), getattr(y, "data", y)
                    return x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y)
            return False

        if self.embed_tokens is not None and same(self.embed_tokens, embed_tokens):
            self.embed_tokens = None
        if self.shared_head.head is not None and lm_head is not None and same(self.shared_head.head, lm_head):
            self.shared_head.head = None

    def forward(self, embeds: torch.Tensor, previous: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """embeds: [n, hidden] embeddings of tokens i + 1; previous: [n, hidden] the model's hidden states at i.
        Returns the layer's output before shared_head.norm."""
        hidden_states = self.eh_proj(torch.cat([self.enorm(embeds), self.hnorm(previous)], dim=-1))
        hidden_states, residual = super().forward(hidden_states, None, cos, sin)
        return hidden_states + residual


class DeepseekV3Model(DecoderModel):
    def __init__(self, config: ModelConfig):
        rotary = RotaryEmbedding(config.qk_rope_head_dim, config.max_position_embeddings, config.rope_theta,
                                 rope_scaling(config))  # fmt: skip
        super().__init__(config, DeepseekV3DecoderLayer, RMSNorm, rotary)


class DeepseekV3ForCausalLM(nn.Module):
    supports_tensor_parallel = True  # MLA by heads, MLPs by intermediate dim, experts split or expert-parallel
    supports_mtp = True  # builds its MTP layer when config.extra["mtp"] is set (speculative decoding)
    # HF checkpoint module name -> (fused module name, shard id)
    packed_modules_mapping = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def __init__(self, config: ModelConfig):
        super().__init__()
        if not config.kv_lora_rank:
            raise ValueError("DeepSeek-V3 needs kv_lora_rank (MLA) in its config")
        self.config = config
        self.model = DeepseekV3Model(config)
        self.lm_head = None if config.tie_word_embeddings else ParallelLMHead(config.hidden_size, config.vocab_size)
        mtp = config.extra.get("mtp")
        self.mtp = DeepseekV3MTP(config, mtp) if mtp else None  # registered last: its cache comes after the layers'
        self.fp8_mode = set_fp8_mode(self)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def checkpoint_name(self, name: str) -> str:
        """The MTP layer's checkpoint names (`model.layers.{num_hidden_layers}.*`) are its module's when it is built."""
        prefix = f"model.layers.{self.config.num_hidden_layers}."
        if self.mtp is not None and name.startswith(prefix):
            return "mtp." + name[len(prefix) :]
        return name

    def mtp_forward(self, input_ids: torch.Tensor, positions: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """The MTP layer over rows (token i + 1 at position i, the model's hidden state at i) under the step's context;
        its output before shared_head.norm ([n, hidden])."""
        embed = self.mtp.embed_tokens if self.mtp.embed_tokens is not None else self.model.embed_tokens
        embeds = embed(input_ids)
        cos, sin = self.model.rotary_emb(positions, embeds.dtype)
        return self.mtp(embeds, previous.to(embeds.dtype), cos, sin)

    def compute_mtp_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Logits of the MTP layer's rows (the token two past each row's hidden state)."""
        normed = self.mtp.shared_head.norm(hidden_states)
        if self.mtp.shared_head.head is not None:
            return self.mtp.shared_head.head(normed)
        return self.compute_logits(normed)

    def finalize(self, dtype: torch.dtype, keep_quantized: bool = True) -> None:
        if self.lm_head is None:
            self.model.embed_tokens.tie_lm_head()
        if self.mtp is not None:
            self.mtp.share_copies(self.model.embed_tokens, self.lm_head)
        self.fp8_mode = fp8_mode(self, dtype)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """Logits [rows, vocab]; under tensor parallelism rank 0 gets them whole, other ranks None."""
        if self.lm_head is None:
            return self.model.embed_tokens.as_lm_head(hidden_states)
        return self.lm_head(hidden_states)

    def set_mla_mode(self, mode: str) -> None:
        """ "auto" (naive prefill, absorbed decode), "naive" or "absorbed" everywhere; for tests and comparisons."""
        if mode not in MLA_MODES:
            raise ValueError(f"MLA mode must be one of {MLA_MODES}, got {mode!r}")
        for layer in self.model.layers:
            layer.self_attn.mode = mode
        if self.mtp is not None:
            self.mtp.self_attn.mode = mode
