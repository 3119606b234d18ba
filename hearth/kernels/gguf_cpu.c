// GGUF-quantized CPU matmuls, called through ctypes from hearth/kernels/gguf_cpu.py; the R16 weight form and the
// int8-activation matmul they share with llama_decode.c are in r16_gemm.h.
//
// gguf_quantize_q8: activations -> int8 blocks. r16_gemm: out[m, n] (+)= sum_k x[m, k] * W[n, k] (int8
// activations). r16_dequant: rows -> float32 or bf16 (exact, as gguf-py dequantizes), for the dense bf16 matmuls of
// non-fused steps. r16_repack: GGUF blocks -> R16, once at load.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "kernel_common.h"
#include "r16_gemm.h"

void gguf_quantize_q8(int64_t M, int64_t K, const float *x, int8_t *q, float *d, float *s) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t b = 0; b < K / QK; b++)
            quantize_block(x + m * K + b * QK, q + m * K + b * QK, d + m * (K / QK), s + m * (K / QK), b);
}

// Row groups per dynamically scheduled chunk (16 x 16 rows: about 0.6 MB of Q8_0 at K = 2048). Threads take chunks as
// they finish, so on a shared machine a thread that lost its core for a while does not hold the other one up, as a
// static split would; each chunk is still one contiguous stream.
#define DYN_GROUPS 16

// W's row groups against the M rows of x, in chunks taken by the threads of the enclosing region as they come (no
// barrier at the end)
static inline void qx_gemm_dyn(const QX *x, int64_t M, const R16 *w, float *out, int64_t ldo, int accumulate) {
    const int64_t G = (w->N + 15) / 16;
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t c = 0; c < (G + DYN_GROUPS - 1) / DYN_GROUPS; c++) {
        const int64_t g0 = c * DYN_GROUPS, g1 = g0 + DYN_GROUPS < G ? g0 + DYN_GROUPS : G;
        r16_groups(w, g0, g1, M, x, out, ldo, accumulate);
    }
}

// x float32 or (x_bf16) bf16 [M, K]; out float32 or (out_bf16, not with accumulate) bf16 [M, N], rounded once as
// torch's .to(torch.bfloat16): a decode step's projections take and give the model's bf16 without torch conversions.
void r16_gemm(int64_t M, const R16 *w, const void *x, int x_bf16, void *out, int out_bf16, int accumulate,
              int nthreads) {
    const int64_t K = w->K, N = w->N, nb = K / QK;
    QX qx = qx_alloc(M, K);
    qx.K = K;
    float *of = out_bf16 ? malloc(sizeof(float) * (size_t)(M * N)) : (float *)out;
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(static)
        for (int64_t i = 0; i < M * nb; i++) qx_block_any(&qx, x, x_bf16, K, i / nb, i % nb);
        qx_gemm_dyn(&qx, M, w, of, N, accumulate && !out_bf16);
        if (out_bf16) {
#pragma omp barrier
#pragma omp for schedule(static)
            for (int64_t i = 0; i < M * N; i++) ((uint16_t *)out)[i] = float_to_bf16(of[i]);
        }
    }
    if (out_bf16) free(of);
    qx_free(&qx);
}

// row r of group g, block b -> 32 floats, exactly as gguf-py dequantizes the original block
static inline void r16_dequant_block(const R16 *w, int64_t g, int64_t b, int r, float *row) {
    const int64_t nb = w->K / QK;
    const uint8_t *qb = w->qs + (g * nb + b) * r16_chunk_bytes(w) + 4 * r;
    const float d = half_to_float(w->sc[(g * nb + b) * 32 + r]);
    if (w->qtype == T_Q8_0) {
        for (int c = 0; c < 8; c++)
            for (int j = 0; j < 4; j++) row[4 * c + j] = (float)(qb[64 * c + j] - 128) * d;
        return;
    }
    int q[QK];
    for (int c = 0; c < 4; c++)
        for (int j = 0; j < 4; j++) {
            q[8 * c + j] = qb[64 * c + j] & 15;
            q[8 * c + 4 + j] = qb[64 * c + j] >> 4;
        }
    if (w->qtype == T_Q4_1) {
        const float m = half_to_float(w->sc[(g * nb + b) * 32 + 16 + r]);
        for (int k = 0; k < QK; k++) row[k] = d * (float)q[k] + m;
    } else {
        for (int k = 0; k < QK; k++) row[k] = d * (float)(q[k] - 8);
    }
}

// W -> [N, K] float32 (out_bf16 = 0) or bf16 (out_bf16 = 1)
#ifdef HAVE_ZMM
// 32 values of a row to dst: bf16 (streamed when asked and dst starts a 64-byte line; see r16_dequant) or float32
static inline void store_row32(void *dst, __m512 v0, __m512 v1, int out_bf16, int stream) {
    if (out_bf16 && stream && ((uintptr_t)dst & 63) == 0) {
        _mm512_stream_si512((__m512i *)dst, _mm512_inserti64x4(_mm512_castsi256_si512(bf16x16_round(v0)), bf16x16_round(v1), 1));
    } else if (out_bf16) {
        _mm256_storeu_si256((__m256i *)dst, bf16x16_round(v0));
        _mm256_storeu_si256((__m256i *)((uint16_t *)dst + 16), bf16x16_round(v1));
    } else {
        _mm512_storeu_ps((float *)dst, v0);
        _mm512_storeu_ps((float *)dst + 16, v1);
    }
}

// Rows 16g.. (`rows` of them) of block b, as r16_dequant_block computes them: the chunk's 64-byte pieces (a dword per
// row each: Q4 nibbles of 8 values, or Q8 bytes of 4) are loaded whole and put back in value order per 128-bit lane,
// four rows to a register (unpacks of dwords, then of qwords), and the 16 scales are converted at once.
static void r16_dequant_group(const R16 *w, int64_t g, int64_t b, int rows, uint8_t *dst, int64_t row_bytes,
                              int out_bf16, int stream) {
    const int64_t nb = w->K / QK;
    const uint8_t *qb = w->qs + (g * nb + b) * r16_chunk_bytes(w);
    const uint16_t *sc = w->sc + (g * nb + b) * 32;
    float d[16], m[16];
    _mm512_storeu_ps(d, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)sc)));
    _mm512_storeu_ps(m, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sc + 16))));
    __m512i t[8];  // per lane L, pairs of pieces interleaved: t[2i] rows 4L, 4L+1 and t[2i+1] rows 4L+2, 4L+3
    if (w->qtype == T_Q8_0) {  // pieces c = 0..7: values 4c..4c+3 of each row
        for (int i = 0; i < 4; i++) {
            const __m512i a = _mm512_loadu_si512(qb + 128 * i), e = _mm512_loadu_si512(qb + 128 * i + 64);
            t[2 * i] = _mm512_unpacklo_epi32(a, e), t[2 * i + 1] = _mm512_unpackhi_epi32(a, e);
        }
    } else {  // pieces c = 0..3: values 8c..8c+3 in the low nibbles, 8c+4..8c+7 in the high ones
        const __m512i m4 = _mm512_set1_epi8(0x0F);
        for (int c = 0; c < 4; c++) {
            const __m512i z = _mm512_loadu_si512(qb + 64 * c);
            const __m512i lo = _mm512_and_si512(z, m4), hi = _mm512_and_si512(_mm512_srli_epi16(z, 4), m4);
            t[2 * c] = _mm512_unpacklo_epi32(lo, hi), t[2 * c + 1] = _mm512_unpackhi_epi32(lo, hi);
        }
    }
    // values 0..15 and 16..31 of row 4L + k in lane L of q[k][0] and q[k][1]
    const __m512i q[4][2] = {{_mm512_unpacklo_epi64(t[0], t[2]), _mm512_unpacklo_epi64(t[4], t[6])},
                             {_mm512_unpackhi_epi64(t[0], t[2]), _mm512_unpackhi_epi64(t[4], t[6])},
                             {_mm512_unpacklo_epi64(t[1], t[3]), _mm512_unpacklo_epi64(t[5], t[7])},
                             {_mm512_unpackhi_epi64(t[1], t[3]), _mm512_unpackhi_epi64(t[5], t[7])}};
    const __m512 eight = _mm512_set1_ps(8.0f);
    const __m512i c128 = _mm512_set1_epi32(128);
#define R16_GROUP_LANE(L)                                                                                             \
    for (int k = 0; k < 4; k++) {                                                                                     \
        const int r = 4 * (L) + k;                                                                                    \
        if (r >= rows) break;                                                                                         \
        const __m512i i0 = _mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(q[k][0], L));                               \
        const __m512i i1 = _mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(q[k][1], L));                               \
        const __m512 dr = _mm512_set1_ps(d[r]);                                                                       \
        __m512 v0, v1;                                                                                                \
        if (w->qtype == T_Q4_1) {                                                                                     \
            const __m512 mr = _mm512_set1_ps(m[r]);                                                                   \
            v0 = _mm512_add_ps(_mm512_mul_ps(dr, _mm512_cvtepi32_ps(i0)), mr);                                        \
            v1 = _mm512_add_ps(_mm512_mul_ps(dr, _mm512_cvtepi32_ps(i1)), mr);                                        \
        } else if (w->qtype == T_Q4_0) {                                                                              \
            v0 = _mm512_mul_ps(dr, _mm512_sub_ps(_mm512_cvtepi32_ps(i0), eight));                                     \
            v1 = _mm512_mul_ps(dr, _mm512_sub_ps(_mm512_cvtepi32_ps(i1), eight));                                     \
        } else {                                                                                                      \
            v0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(i0, c128)), dr);                                   \
            v1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(i1, c128)), dr);                                   \
        }                                                                                                             \
        store_row32(dst + r * row_bytes, v0, v1, out_bf16, stream);                                                   \
    }
    R16_GROUP_LANE(0)
    R16_GROUP_LANE(1)
    R16_GROUP_LANE(2)
    R16_GROUP_LANE(3)
#undef R16_GROUP_LANE
}
#endif

// rows [16 g0, min(16 g1, N)) of W into out (row 16 g0 first). With `stream`, bf16 rows that start a 64-byte line
// (all of them in torch's buffers: K is a multiple of 32) go out with non-temporal stores, which skip the cache: the
// caller picks whichever has lately been faster (gguf_cpu.py, StorePicker).
void r16_dequant(const R16 *w, int64_t g0, int64_t g1, void *out, int out_bf16, int stream, int nthreads) {
    const int64_t nb = w->K / QK, esize = out_bf16 ? 2 : 4;
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(static) nowait
        for (int64_t gb = g0 * nb; gb < g1 * nb; gb++) {
            const int64_t g = gb / nb, b = gb % nb;
            const int rows = (int)(w->N - 16 * g < 16 ? w->N - 16 * g : 16);
            uint8_t *dst = (uint8_t *)out + (16 * (g - g0) * w->K + b * QK) * esize;
            // a weight read in place: this block of the group's rows packed first, then dequantized as a repacked one
            uint8_t one_qs[512] __attribute__((aligned(64)));
            uint16_t one_sc[32];
            R16 one = {one_qs, one_sc, w->qtype, rows, QK, {NULL}, {0}};
            const R16 *v = w;
            int64_t vg = g, vb = b;
            if (w->raw[0]) {
                const uint8_t *rp[16];
                raw_group_rows(w, g, rp);
                raw_pack_block(w->qtype, rp, b, one_qs, one_sc);
                v = &one, vg = vb = 0;
            }
#ifdef HAVE_ZMM
            r16_dequant_group(v, vg, vb, rows, dst, w->K * esize, out_bf16, stream);
#else
            (void)stream;
            for (int r = 0; r < rows; r++) {
                float row[QK];
                r16_dequant_block(v, vg, vb, r, row);
                if (out_bf16)
                    for (int k = 0; k < QK; k++) ((uint16_t *)(dst + r * w->K * esize))[k] = float_to_bf16(row[k]);
                else
                    memcpy(dst + r * w->K * esize, row, sizeof(row));
            }
#endif
        }
#ifdef HAVE_ZMM
        _mm_sfence();  // this thread's streamed lines are visible before the region's closing barrier
#endif
    }
}

// ---- a step's experts in one call (MoE) ----
//
// r16_moe: out[t] = sum_s wts[t, s] * down_e(silu(gate_e x_t) * up_e x_t) with e = ids[t, s], for T tokens of S
// slots each (routed experts, and shared ones as slots of weight 1), int8 activations throughout. gu[e]: gate and up
// rows stacked [2 F_e, H] (gate first), dn[e]: [H, F_e]; experts may differ in F_e (the shared experts' is wider).
// The (token, slot) pairs are sorted by expert, so an expert hit by several tokens reads its weight once for all of
// them. One OpenMP region: (0) x quantized once per token, copied to the sorted rows; (1) chunks of the hit experts'
// gate row groups with the up rows they pair with, taken by the threads as they come, each chunk's SwiGLU quantized
// at once (its rows are whole blocks of 32); (2) chunks of the H output rows: that slice of every hit expert's down
// projection, then each token's pairs summed into out in slot order with their weights (no reduction across threads;
// a token's result does not depend on the other tokens). The gate/up and down results of a chunk go to a buffer of
// the thread's (a 512-token prefill's [pairs, 2 F] and [pairs, H] floats were ~80 MB at DeepSeek-V2-Lite's shape).
// Output row groups per chunk of the down projections (H = 2048: 32 chunks); a decode step's few tokens take longer
// runs, which a weight read in place streams better (each run's first group is fetched before it is read).
#define DOWN_GROUPS 4
#define DOWN_GROUPS_DECODE 16

// x and out float32, or (x_bf16, out_bf16) bf16, out rounded once as torch's .to(torch.bfloat16). Returns 0, or -1
// (nothing done) when an id is outside [0, num_experts).
int r16_moe(int64_t T, int64_t S, int64_t num_experts, const R16 *gu, const R16 *dn, const int64_t *ids,
            const float *wts, const void *x, int x_bf16, void *out, int out_bf16, int nthreads) {
    const int64_t P = T * S, dg = T <= RAW_REGISTER_ROWS ? DOWN_GROUPS_DECODE : DOWN_GROUPS;
    int64_t E = 0;
    for (int64_t i = 0; i < P; i++) {
        if (ids[i] < 0 || ids[i] >= num_experts) return -1;
        E = ids[i] + 1 > E ? ids[i] + 1 : E;
    }
    const int64_t H = gu[ids[0]].K, nbh = H / QK;
    // the pairs sorted by expert: sorted row r holds pair perm[r]; expert run u is rows [ustart[u], ustart[u+1])
    int64_t *perm = malloc(sizeof(int64_t) * (size_t)P), *rank = malloc(sizeof(int64_t) * (size_t)P);
    int64_t *uexp = malloc(sizeof(int64_t) * (size_t)(E + 1)), *ustart = malloc(sizeof(int64_t) * (size_t)(E + 1));
    int64_t *ucost = malloc(sizeof(int64_t) * (size_t)(E + 1)), *foff = malloc(sizeof(int64_t) * (size_t)(P + 1));
    const int64_t U = moe_sort_pairs(P, E, ids, perm, rank, uexp, ustart);
    // per sorted row: its SwiGLU's F values at foff; ucost: gate/up chunks (DYN_GROUPS gate row groups) before run u
    int64_t maxrun = 0;
    foff[0] = ucost[0] = 0;
    for (int64_t u = 0; u < U; u++) {
        const int64_t F = gu[uexp[u]].N / 2;
        for (int64_t r = ustart[u]; r < ustart[u + 1]; r++) foff[r + 1] = foff[r] + F;
        ucost[u + 1] = ucost[u] + (F / 16 + DYN_GROUPS - 1) / DYN_GROUPS;
        maxrun = ustart[u + 1] - ustart[u] > maxrun ? ustart[u + 1] - ustart[u] : maxrun;
    }
    QX qt = qx_alloc(T, H), qx = qx_alloc(P, H), qh = qx_alloc(1, foff[P]);
#pragma omp parallel num_threads(nthreads)
    {
        // this thread's results of one chunk: a run's gate and up rows (1), or every pair's slice of out (2)
        const int64_t gcols = 16 * DYN_GROUPS, ycols = 16 * dg;
        float *buf = malloc(sizeof(float) * (size_t)(maxrun * 2 * gcols > P * ycols ? maxrun * 2 * gcols : P * ycols));
        // (0) quantize each token once, then copy it to its pairs' sorted rows
#pragma omp for schedule(static)
        for (int64_t i = 0; i < T * nbh; i++) qx_block_any(&qt, x, x_bf16, H, i / nbh, i % nbh);
#pragma omp for schedule(static)
        for (int64_t r = 0; r < P; r++) {
            const int64_t t = perm[r] / S;
            memcpy(qx.q + r * H, qt.q + t * H, (size_t)H);
            memcpy(qx.d + r * nbh, qt.d + t * nbh, sizeof(float) * (size_t)nbh);
            memcpy(qx.s + r * nbh, qt.s + t * nbh, sizeof(float) * (size_t)nbh);
        }
        // (1) gate rows [16 g0, 16 g1) of a hit expert and its up rows F + those, then their SwiGLU per 32 values,
        // quantized (block b of sorted row r: values at foff[r] + 32 b, scales at foff[r] / 32 + b)
#pragma omp for schedule(dynamic, 1)
        for (int64_t c = 0; c < ucost[U]; c++) {
            int64_t u = 0;
            while (ucost[u + 1] <= c) u++;
            const int64_t r0 = ustart[u], rows = ustart[u + 1] - r0;
            const R16 *w = &gu[uexp[u]];
            const int64_t FG = w->N / 32, g0 = (c - ucost[u]) * DYN_GROUPS, g1 = g0 + DYN_GROUPS < FG ? g0 + DYN_GROUPS : FG;
            const int64_t cw = 16 * (g1 - g0);
            const QX xu = {qx.q + r0 * H, qx.d + r0 * nbh, qx.s + r0 * nbh, H};
            const R16 gate = r16_rows(w, g0, g1), up = r16_rows(w, FG + g0, FG + g1);
            float *gb = buf, *ub = buf + rows * cw;
            r16_groups(&gate, 0, g1 - g0, rows, &xu, gb, cw, 0);
            r16_groups(&up, 0, g1 - g0, rows, &xu, ub, cw, 0);
            for (int64_t i = 0; i < rows; i++) {
                const int64_t r = r0 + i;
                for (int64_t b = 0; b < cw / QK; b++) {
                    const float *g = gb + i * cw + b * QK, *v = ub + i * cw + b * QK;
                    float h[QK];
                    for (int k = 0; k < QK; k++) h[k] = g[k] / (1.0f + expf(-g[k])) * v[k];
                    const int64_t blk = 16 * g0 / QK + b;
                    quantize_block(h, qh.q + foff[r] + blk * QK, qh.d + foff[r] / QK, qh.s + foff[r] / QK, blk);
                }
            }
        }
        // (2) down: chunks of `dg` output row groups, each of every hit expert, then their weighted sums
        const int64_t OG = (H + 15) / 16;
#pragma omp for schedule(dynamic, 1) nowait
        for (int64_t oc = 0; oc < (OG + dg - 1) / dg; oc++) {
            const int64_t o0 = oc * dg, o1 = o0 + dg < OG ? o0 + dg : OG;
            const int64_t c0 = 16 * o0, c1 = 16 * o1 < H ? 16 * o1 : H, cw = c1 - c0;
            for (int64_t u = 0; u < U; u++) {
                const int64_t r0 = ustart[u];
                const R16 w = r16_rows(&dn[uexp[u]], o0, o1);
                const QX hu = {qh.q + foff[r0], qh.d + foff[r0] / QK, qh.s + foff[r0] / QK, w.K};
                r16_groups(&w, 0, o1 - o0, ustart[u + 1] - r0, &hu, buf + r0 * cw, cw, 0);
            }
            float sum[16 * DOWN_GROUPS_DECODE];  // this chunk's columns of one token, for a bf16 out
            for (int64_t t = 0; t < T; t++) {
                float *o = out_bf16 ? sum : (float *)out + t * H + c0;
                for (int64_t c = 0; c < cw; c++) o[c] = 0.0f;
                for (int64_t p = t * S; p < (t + 1) * S; p++) {  // slot order
                    const float wt = wts[p], *y = buf + rank[p] * cw;
                    for (int64_t c = 0; c < cw; c++) o[c] += wt * y[c];
                }
                if (out_bf16)
                    for (int64_t c = 0; c < cw; c++) ((uint16_t *)out)[t * H + c0 + c] = float_to_bf16(o[c]);
            }
        }
        free(buf);
    }
    qx_free(&qt), qx_free(&qx), qx_free(&qh);
    free(perm), free(rank), free(uexp), free(ustart), free(ucost), free(foff);
    return 0;
}

// ---- load-time repack: GGUF blocks -> R16 ----

// GGUF blocks (Q4_0 18 bytes: f16 d, 16 bytes of nibbles; Q4_1 20: d, f16 m, nibbles; Q8_0 34: d, 32 int8) -> R16 qs
// [G][K/32][chunk bytes] and sc [G][K/32][2][16] (rows past N zero). The N rows come from P parts stacked by row:
// part p (srcs[p], [rows][K/32 blocks]) holds rows [ends[p-1], ends[p]) (e.g. gate and up, separate in the file, into
// one gate_up weight). Threads take row groups; a group's output (K/32 * 576 bytes at most) stays in cache while its
// 16 rows are read in turn.
void r16_repack(int64_t qtype, int64_t N, int64_t K, int64_t P, const int64_t *srcs, const int64_t *ends, uint8_t *qs,
                uint16_t *sc, int nthreads) {
    const int64_t nb = K / QK, G = (N + 15) / 16;
    const int64_t cb = qtype == T_Q8_0 ? 512 : 256, bb = block_bytes(qtype);
#pragma omp parallel for schedule(dynamic, 4) num_threads(nthreads)
    for (int64_t g = 0; g < G; g++) {
        const int rows = N - 16 * g < 16 ? (int)(N - 16 * g) : 16;
        uint8_t *qg = qs + g * nb * cb;
        uint16_t *sg = sc + g * nb * 32;
        if (rows < 16) {
            memset(qg, 0, (size_t)(nb * cb));
            memset(sg, 0, sizeof(uint16_t) * (size_t)(nb * 32));
        }
        int64_t p = 0;
        for (int r = 0; r < rows; r++) {
            const int64_t row = 16 * g + r;
            while (row >= ends[p]) p++;
            const uint8_t *src = (const uint8_t *)(intptr_t)srcs[p] + (row - (p ? ends[p - 1] : 0)) * nb * bb;
            for (int64_t b = 0; b < nb; b++) repack_block(qtype, src + b * bb, qg + b * cb + 4 * r, sg + b * 32, r);
        }
    }
}
