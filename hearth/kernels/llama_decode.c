// A Llama-family decode step in one call, through ctypes from hearth/kernels/llama_decode.py.
//
// llama_decode: a whole Llama-family forward (pre-norm attention + SwiGLU MLP, rotate-half RoPE, GQA, optional q/k/v
// bias, sliding window) for M sequences decoding one token each, over Hearth's paged bf16 KV cache, in one OpenMP
// parallel region. Every projection and the LM head are R16 weights (r16_gemm.h: int8 activations, as gguf_cpu.c's
// r16_gemm); attention is paged_attention.h's decode_attention. Everything between the matmuls is float32.
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernel_common.h"
#include "paged_attention.h"
#include "r16_gemm.h"

typedef struct {
    const float *input_norm, *post_norm;                 // [H]
    R16 qkv, o, gate_up, down;                           // [(Hq+2Hkv)*D, H], [H, Hq*D], [2I, H], [H, I]
    const float *qkv_bias;                               // [(Hq+2Hkv)*D] or NULL
    uint16_t *k_cache, *v_cache;                         // bf16 [slots, Hkv, D]
    int64_t window;                                      // 0: full attention
} LayerWeights;

typedef struct {
    int64_t num_layers, hidden, num_heads, num_kv_heads, head_dim, intermediate;
    float eps, scale;
    const LayerWeights *layers;
    const float *final_norm;     // [H]
    const float *cos, *sin;      // [max_pos, D] (rotate-half tables, D values per position)
    R16 lm_head;                 // [V, H]; qs and raw[0] NULL: logits are not computed
    int64_t vocab;
} ModelWeights;

static void rms_norm(const float *x, const float *w, float eps, int64_t n, float *out) {
    float ss = 0.0f;
    for (int64_t i = 0; i < n; i++) ss += x[i] * x[i];
    const float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (int64_t i = 0; i < n; i++) out[i] = w[i] * (x[i] * r);
}

static void rope(float *x, const float *cos, const float *sin, int64_t d) {
    const int64_t h = d / 2;
    for (int64_t i = 0; i < h; i++) {
        const float a = x[i], b = x[i + h];
        x[i] = a * cos[i] - b * sin[i];
        x[i + h] = b * cos[i + h] + a * sin[i + h];
    }
}

// sizeof the structs ctypes mirrors (R16, LayerWeights, ModelWeights), for a layout check from Python
void llama_decode_struct_sizes(int64_t *out) {
    out[0] = (int64_t)sizeof(R16);
    out[1] = (int64_t)sizeof(LayerWeights);
    out[2] = (int64_t)sizeof(ModelWeights);
}

// The step as ops: op 2l is layer l's attention block, 2l + 1 its MLP block, 2L the final norm and the LM head.
// llama_decode_ops runs ops [op0, op1). part NULL: each block adds its output projection into h; otherwise (tensor
// parallel: o and down hold this rank's input columns) one block per call writes its partial output [M, H] into
// part, for the caller to sum over the ranks and add into h before the next call.
// h: [M, H] float32 embeddings in, final-normed hidden states out; logits: [M, V] when the model has an LM head.
// positions, context_lens: [M]; block_tables: [M, max_blocks]; the new token of row m goes to slot_mapping[m].
void llama_decode_ops(const ModelWeights *mw, int64_t M, float *h, const int64_t *positions,
                      const int64_t *slot_mapping, const int64_t *block_tables, int64_t max_blocks, int64_t block_size,
                      const int64_t *context_lens, float *logits, int nthreads, int64_t op0, int64_t op1, float *part) {
    const int64_t H = mw->hidden, D = mw->head_dim, Hq = mw->num_heads, Hkv = mw->num_kv_heads, I = mw->intermediate;
    const int64_t qsz = Hq * D, kvsz = Hkv * D, nqkv = qsz + 2 * kvsz;
    const int64_t kmax = I > qsz ? (I > H ? I : H) : (qsz > H ? qsz : H);
    int64_t max_len = 1;
    for (int64_t m = 0; m < M; m++) max_len = context_lens[m] > max_len ? context_lens[m] : max_len;
    float *xn = malloc(sizeof(float) * (size_t)(M * H));
    float *qkv = malloc(sizeof(float) * (size_t)(M * nqkv));
    float *att = malloc(sizeof(float) * (size_t)(M * qsz));
    float *gu = malloc(sizeof(float) * (size_t)(M * 2 * I));
    const int64_t G = Hq / Hkv, nchunks = decode_chunks(max_len), pstride = G * (2 + D);
    float *abuf = malloc(sizeof(float) * (size_t)(nthreads * decode_scratch_floats(G, D)));
    float *parts = malloc(sizeof(float) * (size_t)(M * Hkv * nchunks * pstride));
    QX qx = qx_alloc(M, kmax);
#pragma omp parallel num_threads(nthreads)
    {
        const int tid = TID, nth = NTH;
        QX lx = qx;  // this thread's view: the buffers are shared, the row width K is set per matmul
        for (int64_t op = op0; op < op1 && op < 2 * mw->num_layers; op++) {
            const LayerWeights *L = &mw->layers[op / 2];
            float *out = part ? part : h;  // where the block's output projection goes (added into h, or written)
            if (op % 2 == 0) {
                // attention block: xn = norm(h) -> int8; qkv = xn W^T (+ b)
#pragma omp for schedule(static)
                for (int64_t m = 0; m < M; m++) rms_norm(h + m * H, L->input_norm, mw->eps, H, xn + m * H);
                lx.K = H;
#pragma omp for schedule(static)
                for (int64_t i = 0; i < M * (H / QK); i++) qx_block(&lx, xn, H, H, i / (H / QK), i % (H / QK));
                qx_gemm(&lx, M, &L->qkv, tid, nth, qkv, nqkv, 0);
#pragma omp barrier
                // bias, rope on q and k heads, the new k and v into the cache
#pragma omp for schedule(static)
                for (int64_t i = 0; i < M * (Hq + 2 * Hkv); i++) {
                    const int64_t m = i / (Hq + 2 * Hkv), hh = i % (Hq + 2 * Hkv);
                    float *r = qkv + m * nqkv + hh * D;
                    if (L->qkv_bias)
                        for (int64_t j = 0; j < D; j++) r[j] += L->qkv_bias[hh * D + j];
                    if (hh < Hq + Hkv) rope(r, mw->cos + positions[m] * D, mw->sin + positions[m] * D, D);
                    if (hh >= Hq) {
                        uint16_t *dst = (hh < Hq + Hkv ? L->k_cache : L->v_cache) + slot_mapping[m] * kvsz +
                                        ((hh - Hq) % Hkv) * D;
                        for (int64_t j = 0; j < D; j++) dst[j] = float_to_bf16(r[j]);
                    }
                }
                decode_attention(M, qkv, nqkv, Hq, Hkv, D, L->k_cache, L->v_cache, kvsz, block_tables, max_blocks,
                                 block_size, context_lens, L->window, mw->scale, NULL, nchunks, abuf, parts, att, qsz,
                                 tid);
                lx.K = qsz;
#pragma omp for schedule(static)
                for (int64_t i = 0; i < M * (qsz / QK); i++)
                    qx_block(&lx, att, qsz, qsz, i / (qsz / QK), i % (qsz / QK));
                qx_gemm(&lx, M, &L->o, tid, nth, out, H, part == NULL);  // h += attn W_o^T (part = attn W_o^T)
#pragma omp barrier
            } else {
                // MLP block: h += down(silu(gate) * up)
#pragma omp for schedule(static)
                for (int64_t m = 0; m < M; m++) rms_norm(h + m * H, L->post_norm, mw->eps, H, xn + m * H);
                lx.K = H;
#pragma omp for schedule(static)
                for (int64_t i = 0; i < M * (H / QK); i++) qx_block(&lx, xn, H, H, i / (H / QK), i % (H / QK));
                qx_gemm(&lx, M, &L->gate_up, tid, nth, gu, 2 * I, 0);
#pragma omp barrier
                lx.K = I;
#pragma omp for schedule(static)
                for (int64_t i = 0; i < M * (I / QK); i++) {
                    const int64_t m = i / (I / QK), b = i % (I / QK);
                    float *g = gu + m * 2 * I + b * QK;
                    const float *u = g + I;
                    for (int j = 0; j < QK; j++) g[j] = g[j] / (1.0f + expf(-g[j])) * u[j];  // in place: gate -> act
                    qx_block(&lx, gu, 2 * I, I, m, b);
                }
                qx_gemm(&lx, M, &L->down, tid, nth, out, H, part == NULL);
#pragma omp barrier
            }
        }
        if (op1 > 2 * mw->num_layers) {
#pragma omp for schedule(static)
            for (int64_t m = 0; m < M; m++) {
                rms_norm(h + m * H, mw->final_norm, mw->eps, H, xn + m * H);
                memcpy(h + m * H, xn + m * H, sizeof(float) * (size_t)H);
            }
        }
        if (op1 > 2 * mw->num_layers && (mw->lm_head.qs || mw->lm_head.raw[0]) && logits) {
            lx.K = H;
#pragma omp for schedule(static)
            for (int64_t i = 0; i < M * (H / QK); i++) qx_block(&lx, h, H, H, i / (H / QK), i % (H / QK));
            qx_gemm(&lx, M, &mw->lm_head, tid, nth, logits, mw->vocab, 0);
        }
    }
    free(xn);
    free(qkv);
    free(att);
    free(gu);
    free(abuf);
    free(parts);
    qx_free(&qx);
}

void llama_decode(const ModelWeights *mw, int64_t M, float *h, const int64_t *positions, const int64_t *slot_mapping,
                  const int64_t *block_tables, int64_t max_blocks, int64_t block_size, const int64_t *context_lens,
                  float *logits, int nthreads) {
    llama_decode_ops(mw, M, h, positions, slot_mapping, block_tables, max_blocks, block_size, context_lens, logits,
                     nthreads, 0, 2 * mw->num_layers + 1, NULL);
}
