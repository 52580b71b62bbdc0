/* loraplex's C kernels for float32 activations on the CPU (built and loaded by kernels/cpu_native.py; torch
 * references in kernels/ref_attention.py, kernels/ref_ops.py and kernels/ref_lora.py). All take a thread count and use OpenMP, which shares
 * torch's thread pool (torch has already loaded the same libgomp). Compiled with -ffast-math (vectorised expf),
 * linked without it (no process-wide flush-to-zero).
 *
 * Paged decode attention: one query token per sequence attends to its cached context,
 * reading the KV blocks in place (the torch path first gathers them into a padded copy, so it moves the bytes
 * three times; this moves them once). One online-softmax pass per sequence over its blocks, all query heads
 * together (a token's K/V row is read once for every head); the next block is prefetched while this one is
 * computed, since blocks lie anywhere in the cache.
 *
 * Layouts as kernels/ref_attention.py: q [S, Hq, D] (row stride q_stride, heads contiguous), caches
 * [NB, BS, Hkv, D] contiguous, block_tables [S, bt_stride] int32, seq_lens [S] int32, out [S, Hq, D] contiguous. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define MAX_HEADS 64
#define MAX_DIM 256
#define MAX_BLOCK 64
#define MAX_RANK 256

void lp_limits(int *max_heads, int *max_dim, int *max_block, int *max_rank) {
    *max_rank = MAX_RANK;
    *max_heads = MAX_HEADS;
    *max_dim = MAX_DIM;
    *max_block = MAX_BLOCK;
}

/* KV caches of float32 or bfloat16 (the engine's dtype: bfloat16 halves the bytes the decode step reads);
 * either is widened to float32 as it is read, all arithmetic in float32. */
static inline float ld_f32(const float *p, int64_t i) { return p[i]; }
static inline float ld_bf16(const uint16_t *p, int64_t i) {
    union { uint32_t u; float f; } v = {.u = (uint32_t)p[i] << 16};
    return v.f;
}
#define PAGED_DECODE(NAME, KT, LD)                                                                                   \
void NAME(const float *q, int64_t q_stride, const KT *k_cache, const KT *v_cache,                                    \
                         const int32_t *block_tables, int64_t bt_stride, const int32_t *seq_lens, float *out,        \
                         int S, int Hq, int Hkv, int D, int BS, float scale, int nthreads) {                         \
    const int G = Hq / Hkv;                                                                                          \
    const int64_t tok_stride = (int64_t)Hkv * D, blk_stride = (int64_t)BS * Hkv * D;                             \
    const int64_t row_bytes = tok_stride * (int64_t)sizeof(KT);                                                   \
_Pragma("omp parallel for schedule(dynamic, 1) num_threads(nthreads)")                                               \
    for (int s = 0; s < S; s++) {                                                                                    \
        const int len = seq_lens[s];                                                                                 \
        float qv[MAX_HEADS][MAX_DIM], acc[MAX_HEADS][MAX_DIM], p[MAX_HEADS][MAX_BLOCK], m[MAX_HEADS], l[MAX_HEADS];  \
        for (int h = 0; h < Hq; h++) {                                                                               \
            const float *src = q + s * q_stride + (int64_t)h * D;                                                    \
            for (int d = 0; d < D; d++) {                                                                            \
                qv[h][d] = src[d] * scale;                                                                           \
                acc[h][d] = 0.f;                                                                                     \
            }                                                                                                        \
            m[h] = -1e30f;  /* finite: under -ffast-math, -inf and its arithmetic are not safe */                    \
            l[h] = 0.f;                                                                                              \
        }                                                                                                            \
        for (int start = 0; start < len; start += BS) {                                                              \
            const int n = len - start < BS ? len - start : BS;                                                       \
            const int64_t blk = block_tables[s * bt_stride + start / BS];                                            \
            const int64_t nxt = start + BS < len ? block_tables[s * bt_stride + start / BS + 1] : blk;               \
            const KT *kb = k_cache + blk * blk_stride, *vb = v_cache + blk * blk_stride;                             \
            const char *nk = (const char *)(k_cache + nxt * blk_stride);                                          \
            const char *nv = (const char *)(v_cache + nxt * blk_stride);                                          \
            for (int t = 0; t < n; t++) {  /* scores; prefetch the next block's row t meanwhile */                   \
                for (int64_t off = t * row_bytes; off < (t + 1) * row_bytes; off += 64) {                            \
                    __builtin_prefetch(nk + off);                                                                    \
                    __builtin_prefetch(nv + off);                                                                    \
                }                                                                                                    \
                for (int h = 0; h < Hq; h++) {                                                                       \
                    const KT *kr = kb + t * tok_stride + (h / G) * D;                                                \
                    float dot = 0.f;                                                                                 \
_Pragma("omp simd reduction(+ : dot)")                                                                               \
                    for (int d = 0; d < D; d++) dot += qv[h][d] * LD(kr, d);                                         \
                    p[h][t] = dot;                                                                                   \
                }                                                                                                    \
            }                                                                                                        \
            for (int h = 0; h < Hq; h++) {  /* online softmax: rescale what was accumulated to the new max */        \
                float bmax = m[h];                                                                                   \
                for (int t = 0; t < n; t++) bmax = p[h][t] > bmax ? p[h][t] : bmax;                                  \
                const float corr = expf(m[h] - bmax);                                                                \
                float sum = 0.f;                                                                                     \
_Pragma("omp simd reduction(+ : sum)")                                                                               \
                for (int t = 0; t < n; t++) {                                                                        \
                    p[h][t] = expf(p[h][t] - bmax);                                                                  \
                    sum += p[h][t];                                                                                  \
                }                                                                                                    \
                l[h] = l[h] * corr + sum;                                                                            \
                m[h] = bmax;                                                                                         \
                if (corr != 1.f)                                                                                     \
                    for (int d = 0; d < D; d++) acc[h][d] *= corr;                                                   \
            }                                                                                                        \
            for (int t = 0; t < n; t++) {                                                                            \
                for (int h = 0; h < Hq; h++) {                                                                       \
                    const KT *vr = vb + t * tok_stride + (h / G) * D;                                                \
                    const float pt = p[h][t];                                                                        \
_Pragma("omp simd")                                                                                                  \
                    for (int d = 0; d < D; d++) acc[h][d] += pt * LD(vr, d);                                         \
                }                                                                                                    \
            }                                                                                                        \
        }                                                                                                            \
        for (int h = 0; h < Hq; h++) {                                                                               \
            float *dst = out + ((int64_t)s * Hq + h) * D;                                                            \
            const float inv = l[h] > 0.f ? 1.f / l[h] : 0.f;                                                         \
            for (int d = 0; d < D; d++) dst[d] = acc[h][d] * inv;                                                    \
        }                                                                                                            \
    }                                                                                                                \
}
PAGED_DECODE(lp_paged_decode_f32, float, ld_f32)
PAGED_DECODE(lp_paged_decode_bf16kv_any, uint16_t, ld_bf16) /* lp_paged_decode_bf16kv, below, for other shapes */

/* RMSNorm over rows of H, optionally after adding delta into the residual stream in place (the decoder layer's
 * "x = x + sublayer(x); h = norm(x)" in one pass): out = w * x / sqrt(mean(x^2) + eps). Rows may be strided. */
void lp_add_rms_norm_f32(float *x, int64_t x_stride, const float *delta, int64_t delta_stride, const float *w,
                         float *out, int64_t T, int64_t H, float eps, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads) if (T * H > 32768)
    for (int64_t t = 0; t < T; t++) {
        float *xr = x + t * x_stride, *o = out + t * H;
        if (delta) {
            const float *dr = delta + t * delta_stride;
#pragma omp simd
            for (int64_t i = 0; i < H; i++) xr[i] += dr[i];
        }
        float ss = 0.f;
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < H; i++) ss += xr[i] * xr[i];
        const float inv = 1.f / sqrtf(ss / (float)H + eps);
#pragma omp simd
        for (int64_t i = 0; i < H; i++) o[i] = w[i] * (xr[i] * inv);
    }
}

/* SwiGLU: out[t, i] = silu(gu[t, i]) * gu[t, I + i] for the fused gate/up projection's output. The exponent
 * is capped: under -ffast-math the division becomes an approximate reciprocal, which gives NaN for 1/inf. */
void lp_silu_mul_f32(const float *gu, float *out, int64_t T, int64_t I, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads) if (T * I > 32768)
    for (int64_t t = 0; t < T; t++) {
        const float *g = gu + t * 2 * I, *u = g + I;
        float *o = out + t * I;
#pragma omp simd
        for (int64_t i = 0; i < I; i++) o[i] = g[i] / (1.f + expf(fminf(-g[i], 80.f))) * u[i];
    }
}

/* Rotary embedding in place (HF's rotate-half form) on nheads heads of D per row: x [T, row_stride] holding the
 * heads first, cos/sin [T, D] (the table's rows for each token's position). */
void lp_rope_f32(float *x, int64_t row_stride, const float *cos_t, const float *sin_t, int64_t T, int64_t nheads,
                 int64_t D, int nthreads) {
    const int64_t half = D / 2;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (T * nheads * D > 32768)
    for (int64_t t = 0; t < T; t++) {
        const float *c = cos_t + t * D, *sn = sin_t + t * D;
        for (int64_t h = 0; h < nheads; h++) {
            float *x1 = x + t * row_stride + h * D, *x2 = x1 + half;
#pragma omp simd
            for (int64_t i = 0; i < half; i++) {
                const float a = x1[i], b = x2[i];
                x1[i] = a * c[i] - b * sn[i];
                x2[i] = b * c[half + i] + a * sn[half + i];
            }
        }
    }
}

/* Multi-LoRA for decode-shaped batches: for every token t with a slot s >= 0 and each of M modules that read
 * the same input x (q/k/v, or gate/up): y_m[t] += B_m[s] @ (A_m[s] @ x[t]), over the first r ranks. The adapter
 * weights are read in place from the stacked slot buffers: A_m [slots, r, in] (slot stride a_ss[m], rows of in),
 * B_m [slots, out_m, r] with slot stride b_ss[m], output stride b_os[m] and rank stride b_ks[m]: rank-major B
 * (b_os 1) is expanded by streaming its rows, y += t[k] * B[:, k]; otherwise by a dot product per output.
 * y_m rows of y_strides[m]. Work items are (token, module) pairs in token order, chunked statically so
 * consecutive tokens of one slot (the scheduler orders decodes by slot) reuse the weights from cache.
 * Weights are float32 (lp_lora_apply_f32) or bfloat16 (lp_lora_apply_bf16w: the engine's lora_dtype, half the
 * bytes; widened to float32 as they are read, all arithmetic in float32). */

#define LORA_APPLY(NAME, WT, LD)                                                                                  \
void NAME(const float *x, int64_t x_stride, int64_t T, int64_t in, const int32_t *token_slot, int M,              \
          const int64_t *a_ptrs, const int64_t *a_ss, const int64_t *b_ptrs, const int64_t *b_ss,                \
          const int64_t *b_os, const int64_t *b_ks, const int64_t *outs, const int64_t *y_ptrs,                  \
          const int64_t *y_strides, int r, int nthreads) {                                                        \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads)")                                           \
    for (int64_t w = 0; w < T * M; w++) {                                                                         \
        const int64_t t = w / M;                                                                                  \
        const int m = (int)(w % M), s = token_slot[t];                                                            \
        if (s < 0) continue;                                                                                      \
        const WT *a = (const WT *)a_ptrs[m] + s * a_ss[m], *b = (const WT *)b_ptrs[m] + s * b_ss[m];              \
        float tmp[MAX_RANK];                                                                                      \
        const float *xr = x + t * x_stride;                                                                       \
        for (int k = 0; k < r; k++) {                                                                             \
            const WT *ar = a + k * in;                                                                            \
            float dot = 0.f;                                                                                      \
            _Pragma("omp simd reduction(+ : dot)")                                                                \
            for (int64_t i = 0; i < in; i++) dot += LD(ar, i) * xr[i];                                            \
            tmp[k] = dot;                                                                                         \
        }                                                                                                         \
        float *y = (float *)y_ptrs[m] + t * y_strides[m];                                                         \
        const int64_t out = outs[m], os = b_os[m], ks = b_ks[m];                                                  \
        if (os == 1) {                                                                                            \
            for (int k = 0; k < r; k++) {                                                                         \
                const WT *bk = b + k * ks;                                                                        \
                const float tk = tmp[k];                                                                          \
                _Pragma("omp simd")                                                                               \
                for (int64_t o = 0; o < out; o++) y[o] += tk * LD(bk, o);                                         \
            }                                                                                                     \
        } else {                                                                                                  \
            for (int64_t o = 0; o < out; o++) {                                                                   \
                const WT *bo = b + o * os;                                                                        \
                float dot = 0.f;                                                                                  \
                _Pragma("omp simd reduction(+ : dot)")                                                            \
                for (int k = 0; k < r; k++) dot += LD(bo, k * ks) * tmp[k];                                       \
                y[o] += dot;                                                                                      \
            }                                                                                                     \
        }                                                                                                         \
    }                                                                                                             \
}

LORA_APPLY(lp_lora_apply_f32, float, ld_f32)
LORA_APPLY(lp_lora_apply_bf16w, uint16_t, ld_bf16)

/* Multi-LoRA for runs of tokens on one slot (prefill chunks; one adapter for a whole batch; several decodes per
 * adapter), B rank-major: blocks of up to 4 consecutive tokens of one slot share every weight load, shrink as
 * 4 tokens x 2 ranks and expand as 4 tokens x 16 outputs held in registers (the per-token kernel above loads a
 * weight for each multiply-add): 1.3-2.2x torch's GEMMs on prefill-length runs, 2-8x on short ones, on the
 * 2-core CPU. Work items are (block, module) pairs in token order, statically chunked, so a thread's
 * consecutive blocks reuse their slot's A and B from cache. Arguments as lp_lora_apply_f32; b_os must be 1.
 * Weights float32 (lp_lora_runs_f32) or bfloat16 (lp_lora_runs_bf16w), widened 8 at a time as they are read. */
typedef float lp_v8 __attribute__((vector_size(32), aligned(4)));
typedef uint16_t lp_v8h __attribute__((vector_size(16), aligned(2)));
typedef uint32_t lp_v8u __attribute__((vector_size(32)));

static inline float lp_hsum8(lp_v8 v) {
    return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}
static inline lp_v8 ld8_f32(const float *p) { return *(const lp_v8 *)p; }
static inline lp_v8 ld8_bf16(const uint16_t *p) {
    return (lp_v8)(__builtin_convertvector(*(const lp_v8h *)p, lp_v8u) << 16);
}

#define RUN_BLOCK 4

#define LORA_RUNS(NAME, WT, LD8, LD)                                                                              \
static void NAME##_block(const float *const xr[RUN_BLOCK], float *const yr[RUN_BLOCK], int n, const WT *a,        \
                         int64_t in, const WT *b, int64_t ks, int64_t out, int r) {                               \
    float tmp[RUN_BLOCK][MAX_RANK];                                                                               \
    for (int k = 0; k < r; k += 2) {                                                                              \
        const int k2 = k + 1 < r ? k + 1 : k;                                                                     \
        const WT *a0 = a + k * in, *a1 = a + k2 * in;                                                             \
        lp_v8 acc0[RUN_BLOCK] = {0}, acc1[RUN_BLOCK] = {0};                                                       \
        int64_t i = 0;                                                                                            \
        for (; i + 8 <= in; i += 8) {                                                                             \
            const lp_v8 va0 = LD8(a0 + i), va1 = LD8(a1 + i);                                                     \
            for (int j = 0; j < RUN_BLOCK; j++) {                                                                 \
                const lp_v8 xv = *(const lp_v8 *)(xr[j] + i);                                                     \
                acc0[j] += va0 * xv;                                                                              \
                acc1[j] += va1 * xv;                                                                              \
            }                                                                                                     \
        }                                                                                                         \
        for (int j = 0; j < RUN_BLOCK; j++) {                                                                     \
            float s0 = lp_hsum8(acc0[j]), s1 = lp_hsum8(acc1[j]);                                                 \
            for (int64_t ii = i; ii < in; ii++) {                                                                 \
                s0 += LD(a0, ii) * xr[j][ii];                                                                     \
                s1 += LD(a1, ii) * xr[j][ii];                                                                     \
            }                                                                                                     \
            tmp[j][k] = s0;                                                                                       \
            tmp[j][k2] = s1;                                                                                      \
        }                                                                                                         \
    }                                                                                                             \
    int64_t o = 0;                                                                                                \
    for (; o + 16 <= out; o += 16) {                                                                              \
        lp_v8 acc0[RUN_BLOCK] = {0}, acc1[RUN_BLOCK] = {0};                                                       \
        for (int k = 0; k < r; k++) {                                                                             \
            const WT *bk = b + k * ks + o;                                                                        \
            const lp_v8 b0 = LD8(bk), b1 = LD8(bk + 8);                                                           \
            for (int j = 0; j < RUN_BLOCK; j++) {                                                                 \
                acc0[j] += tmp[j][k] * b0;                                                                        \
                acc1[j] += tmp[j][k] * b1;                                                                        \
            }                                                                                                     \
        }                                                                                                         \
        for (int j = 0; j < n; j++) {                                                                             \
            *(lp_v8 *)(yr[j] + o) += acc0[j];                                                                     \
            *(lp_v8 *)(yr[j] + o + 8) += acc1[j];                                                                 \
        }                                                                                                         \
    }                                                                                                             \
    for (; o < out; o++)                                                                                          \
        for (int j = 0; j < n; j++) {                                                                             \
            float sum = 0.f;                                                                                      \
            for (int k = 0; k < r; k++) sum += tmp[j][k] * LD(b, k * ks + o);                                     \
            yr[j][o] += sum;                                                                                      \
        }                                                                                                         \
}                                                                                                                 \
                                                                                                                  \
void NAME(const float *x, int64_t x_stride, int64_t T, int64_t in, const int32_t *token_slot, int M,              \
          const int64_t *a_ptrs, const int64_t *a_ss, const int64_t *b_ptrs, const int64_t *b_ss,                \
          const int64_t *b_os, const int64_t *b_ks, const int64_t *outs, const int64_t *y_ptrs,                  \
          const int64_t *y_strides, int r, int nthreads) {                                                        \
    (void)b_os;                                                                                                   \
    int64_t nb = 0;                                                                                               \
    int64_t *starts = (int64_t *)malloc((size_t)(T + 1) * sizeof(int64_t));                                      \
    if (!starts) return;                                                                                          \
    for (int64_t t = 0; t < T;) {                                                                                 \
        int64_t e = t + 1;                                                                                        \
        while (e < T && e - t < RUN_BLOCK && token_slot[e] == token_slot[t]) e++;                                 \
        starts[nb++] = t;                                                                                         \
        t = e;                                                                                                    \
    }                                                                                                             \
    starts[nb] = T;                                                                                               \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads)")                                           \
    for (int64_t w = 0; w < nb * M; w++) {                                                                        \
        const int64_t t0 = starts[w / M];                                                                         \
        const int m = (int)(w % M), n = (int)(starts[w / M + 1] - t0), s = token_slot[t0];                        \
        if (s < 0) continue;                                                                                      \
        const float *xr[RUN_BLOCK];                                                                               \
        float *yr[RUN_BLOCK];                                                                                     \
        for (int j = 0; j < RUN_BLOCK; j++) { /* a short block repeats its last token; only n rows are written */ \
            const int64_t t = t0 + (j < n ? j : n - 1);                                                           \
            xr[j] = x + t * x_stride;                                                                             \
            yr[j] = (float *)y_ptrs[m] + t * y_strides[m];                                                        \
        }                                                                                                         \
        NAME##_block(xr, yr, n, (const WT *)a_ptrs[m] + s * a_ss[m], in, (const WT *)b_ptrs[m] + s * b_ss[m],     \
                     b_ks[m], outs[m], r);                                                                        \
    }                                                                                                             \
    free(starts);                                                                                                 \
}

LORA_RUNS(lp_lora_runs_f32, float, ld8_f32, ld_f32)
LORA_RUNS(lp_lora_runs_bf16w, uint16_t, ld8_bf16, ld_bf16)

/* The bfloat16 projections, y[m, :] = x[m, :] @ w^T (+ bias): lp_linear_bf16 over a weight packed by lp_pack_bf16
 * (see there), and the int8 / int4 kernels (lp_linear_i8, lp_linear_q4), which widen their weight rows into a
 * bf16 scratch and meet x there through the row tiles (gemv_tile_*). x is rounded to bfloat16 once (round to
 * nearest even, as oneDNN does); products accumulate in float32 with AVX512-BF16's vdpbf16ps where the compiler
 * targets it, else widened scalar loops. K must be a multiple of 32. */
#if defined(__AVX512BF16__)
#include <immintrin.h>
#define LP_HAVE_BF16 1
#define LP_HAVE_AVX2 0
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LP_HAVE_BF16 0
#define LP_HAVE_AVX2 1 /* AVX2 + FMA without AVX512-BF16 (Zen 2/3, most laptops): bf16 widened, float32 FMAs */
#else
#define LP_HAVE_BF16 0
#define LP_HAVE_AVX2 0
#endif

static inline uint16_t to_bf16(float f) {
    union { float f; uint32_t u; } v = {.f = f};
    return (uint16_t)((v.u + 0x7FFFu + ((v.u >> 16) & 1u)) >> 16);
}

static inline float round_bf16(float f) {
    union { uint32_t u; float f; } v = {.u = (uint32_t)to_bf16(f) << 16};
    return v.f;
}

/* the code path this build took: 2 AVX512-BF16, 1 AVX2 + FMA, 0 scalar loops (kernels.cpu_native.ISA) */
int lp_isa(void) { return LP_HAVE_BF16 ? 2 : LP_HAVE_AVX2 ? 1 : 0; }

/* The widened formats' scratch element (int8 / int4 rows widened once per step, and x): bfloat16 where
 * vdpbf16ps multiplies it, else float32 holding the same bf16 values (AVX2 FMAs then read it as is: widening
 * bf16 in the tile cost 1.5 vector ops per FMA). */
#if LP_HAVE_AVX2
typedef float lp_wide;
static inline lp_wide to_wide(float f) { return round_bf16(f); }
#else
typedef uint16_t lp_wide;
static inline lp_wide to_wide(float f) { return to_bf16(f); }
#endif

/* x [M, K] (row stride x_stride) rounded to bf16 once, as lp_wide, for every bf16 / widened-format kernel; the
 * caller frees it. NULL if out of memory. */
static lp_wide *widen_x(const float *x, int64_t x_stride, int M, int64_t K) {
    lp_wide *xb = (lp_wide *)malloc((size_t)M * (size_t)K * sizeof(lp_wide));
    if (xb)
        for (int m = 0; m < M; m++)
            for (int64_t k = 0; k < K; k++) xb[m * K + k] = to_wide(x[m * x_stride + k]);
    return xb;
}

/* A tile: MB rows of x against NB consecutive rows of w (NB independent accumulator chains per x row, so the
 * vdpbf16ps latency is hidden even at M = 1); out[m * NB + j]. Each weight load prefetches the line 8 KB
 * ahead: the hardware prefetcher alone fed one core ~6 GB/s here, with it the 2-core step reads ~1.7x faster
 * (near the measured DRAM bandwidth). Prefetches never fault, so running past the weight's end is harmless. */
#define GEMV_PREFETCH 4096 /* bfloat16 elements */
#if LP_HAVE_BF16
/* out[i] = the sum of v[i]'s 16 lanes, for i < n (n <= 16; the rest of v is ignored): a transposing tree, 45 vector
 * ops for 16 sums where one _mm512_reduce_add_ps each takes ~9. Every tile reduces through it (fewer sums pad with
 * zeros, which add exactly), so a row's result does not depend on the tile that computed it. */
static inline void lp_hsum16(const __m512 *v, int n, float *out) {
    __m512 a[16], b[8], c[4];
    for (int i = 0; i < 16; i++) a[i] = i < n ? v[i] : _mm512_setzero_ps();
    for (int i = 0; i < 8; i++)  /* per 128-bit lane: [x0+x2, y0+y2, x1+x3, y1+y3] of x = a[2i], y = a[2i+1] */
        b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 4; i++) {  /* per 128-bit lane: the partial sums of 4 consecutive vectors */
        __m512d x = _mm512_castps_pd(b[2 * i]), y = _mm512_castps_pd(b[2 * i + 1]);
        c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    __m512 w0 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
    __m512 w1 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], 0x88), _mm512_shuffle_f32x4(c[2], c[3], 0xDD));
    __m512 r = _mm512_add_ps(_mm512_shuffle_f32x4(w0, w1, 0x88), _mm512_shuffle_f32x4(w0, w1, 0xDD));
    if (n == 16) _mm512_storeu_ps(out, r);
    else _mm512_mask_storeu_ps(out, (__mmask16)((1u << n) - 1u), r);
}

/* lp_paged_decode_bf16kv for heads of 64 with AVX-512 (SmolLM2's and Llama 3.2's): each K and V row is widened once
 * for its whole group of query heads (the generic loop widens it once per head), a block's scores are reduced 16 at
 * a time through lp_hsum16, a head's block of scores is gathered and maxed in one vector, and the output
 * accumulates in registers across a block's tokens, 4 heads at a time. 30 layers x 32 sequences of ~190 tokens on
 * the 2-core VM, interleaved with the generic kernel: 7.2-7.7 -> 5.2 ms (136 MiB of KV: 19 -> 27 GB/s); with the
 * KV in cache 5.4 -> 2.7 ms. Same float32 arithmetic and online softmax; scores are summed in another order. */
static inline __m512 lp_widen16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* acc[j * 64 ..] += sum over a block's n tokens of p[j][t] * V row t, for NJ heads sharing one KV head (NJ a
 * constant, so the 4 * NJ accumulators stay in registers) */
#define LP_PV64(NJ)                                                                                                 \
static inline void lp_pv64_##NJ(float *acc, const uint16_t *v, int64_t tok_stride, int n,                          \
                                const float (*p)[MAX_BLOCK]) {                                                    \
    __m512 ra[4 * NJ];                                                                                            \
    for (int i = 0; i < 4 * NJ; i++) ra[i] = _mm512_load_ps(acc + 16 * i);                                        \
    for (int t = 0; t < n; t++) {                                                                                 \
        const uint16_t *vr = v + t * tok_stride;                                                                  \
        const __m512 v0 = lp_widen16(vr), v1 = lp_widen16(vr + 16), v2 = lp_widen16(vr + 32),                     \
                     v3 = lp_widen16(vr + 48);                                                                    \
        for (int j = 0; j < NJ; j++) {                                                                            \
            const __m512 pt = _mm512_set1_ps(p[j][t]);                                                            \
            ra[4 * j] = _mm512_fmadd_ps(pt, v0, ra[4 * j]);                                                       \
            ra[4 * j + 1] = _mm512_fmadd_ps(pt, v1, ra[4 * j + 1]);                                               \
            ra[4 * j + 2] = _mm512_fmadd_ps(pt, v2, ra[4 * j + 2]);                                               \
            ra[4 * j + 3] = _mm512_fmadd_ps(pt, v3, ra[4 * j + 3]);                                               \
        }                                                                                                         \
    }                                                                                                             \
    for (int i = 0; i < 4 * NJ; i++) _mm512_store_ps(acc + 16 * i, ra[i]);                                        \
}
LP_PV64(1)
LP_PV64(2)
LP_PV64(3)
LP_PV64(4)

static void lp_paged_decode_bf16kv_d64(const float *q, int64_t q_stride, const uint16_t *k_cache,
                                       const uint16_t *v_cache, const int32_t *block_tables, int64_t bt_stride,
                                       const int32_t *seq_lens, float *out, int S, int Hq, int Hkv, int BS,
                                       float scale, int nthreads) {
    enum { D = 64 };
    const int G = Hq / Hkv;
    const int64_t tok_stride = (int64_t)Hkv * D, blk_stride = (int64_t)BS * Hkv * D, row_bytes = tok_stride * 2;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int s = 0; s < S; s++) {
        const int len = seq_lens[s];
        float qv[MAX_HEADS * D] __attribute__((aligned(64))), acc[MAX_HEADS * D] __attribute__((aligned(64)));
        float sc[MAX_BLOCK * MAX_HEADS + 16], p[MAX_HEADS][MAX_BLOCK], m[MAX_HEADS], l[MAX_HEADS];
        const __m512 vscale = _mm512_set1_ps(scale);
        for (int h = 0; h < Hq; h++) {
            const float *src = q + s * q_stride + (int64_t)h * D;
            for (int c = 0; c < D; c += 16) {
                _mm512_store_ps(qv + h * D + c, _mm512_mul_ps(_mm512_loadu_ps(src + c), vscale));
                _mm512_store_ps(acc + h * D + c, _mm512_setzero_ps());
            }
            m[h] = -1e30f;  /* finite: under -ffast-math, -inf and its arithmetic are not safe */
            l[h] = 0.f;
        }
        for (int start = 0; start < len; start += BS) {
            const int n = len - start < BS ? len - start : BS;
            const int64_t blk = block_tables[s * bt_stride + start / BS];
            const int64_t nxt = start + BS < len ? block_tables[s * bt_stride + start / BS + 1] : blk;
            const uint16_t *kb = k_cache + blk * blk_stride, *vb = v_cache + blk * blk_stride;
            const char *nk = (const char *)(k_cache + nxt * blk_stride);
            const char *nv = (const char *)(v_cache + nxt * blk_stride);
            __m512 pend[16];
            int np = 0, done = 0;
            for (int t = 0; t < n; t++) {  /* scores sc[t * Hq + h]; prefetch the next block's row t meanwhile */
                for (int64_t off = t * row_bytes; off < (t + 1) * row_bytes; off += 64) {
                    __builtin_prefetch(nk + off);
                    __builtin_prefetch(nv + off);
                }
                for (int g = 0; g < Hkv; g++) {
                    const uint16_t *kr = kb + t * tok_stride + g * D;
                    const __m512 k0 = lp_widen16(kr), k1 = lp_widen16(kr + 16), k2 = lp_widen16(kr + 32),
                                 k3 = lp_widen16(kr + 48);
                    for (int j = 0; j < G; j++) {
                        const float *qh = qv + (g * G + j) * D;
                        __m512 a = _mm512_mul_ps(_mm512_load_ps(qh), k0);
                        a = _mm512_fmadd_ps(_mm512_load_ps(qh + 16), k1, a);
                        a = _mm512_fmadd_ps(_mm512_load_ps(qh + 32), k2, a);
                        pend[np++] = _mm512_fmadd_ps(_mm512_load_ps(qh + 48), k3, a);
                        if (np == 16) {
                            lp_hsum16(pend, 16, sc + done);
                            done += 16;
                            np = 0;
                        }
                    }
                }
            }
            if (np) lp_hsum16(pend, np, sc + done);
            for (int h = 0; h < Hq; h++) {  /* online softmax: rescale what was accumulated to the new max */
                float bmax = m[h];
                if (n <= 16) {  /* head h's scores in one gather and one max (a scalar max chain cost ~64 cycles) */
                    const __m512i idx = _mm512_mullo_epi32(
                        _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi32(Hq));
                    const __m512 v = _mm512_mask_i32gather_ps(_mm512_set1_ps(-1e30f), (__mmask16)((1u << n) - 1u), idx,
                                                              sc + h, 4);
                    _mm512_storeu_ps(p[h], v);
                    const float vmax = _mm512_reduce_max_ps(v);
                    bmax = vmax > bmax ? vmax : bmax;
                } else {
                    for (int t = 0; t < n; t++) {
                        p[h][t] = sc[t * Hq + h];
                        bmax = p[h][t] > bmax ? p[h][t] : bmax;
                    }
                }
                const float corr = expf(m[h] - bmax);
                float sum = 0.f;
#pragma omp simd reduction(+ : sum)
                for (int t = 0; t < n; t++) {
                    p[h][t] = expf(p[h][t] - bmax);
                    sum += p[h][t];
                }
                l[h] = l[h] * corr + sum;
                m[h] = bmax;
                if (corr != 1.f) {
                    const __m512 vc = _mm512_set1_ps(corr);
                    for (int c = 0; c < D; c += 16)
                        _mm512_store_ps(acc + h * D + c, _mm512_mul_ps(_mm512_load_ps(acc + h * D + c), vc));
                }
            }
            for (int g = 0; g < Hkv; g++)  /* acc += p * V, up to 4 heads of a group in registers */
                for (int j0 = 0; j0 < G; j0 += 4) {
                    const int nj = G - j0 < 4 ? G - j0 : 4, h0 = g * G + j0;
                    const uint16_t *vg = vb + g * D;
                    if (nj == 4) lp_pv64_4(acc + h0 * D, vg, tok_stride, n, p + h0);
                    else if (nj == 3) lp_pv64_3(acc + h0 * D, vg, tok_stride, n, p + h0);
                    else if (nj == 2) lp_pv64_2(acc + h0 * D, vg, tok_stride, n, p + h0);
                    else lp_pv64_1(acc + h0 * D, vg, tok_stride, n, p + h0);
                }
        }
        for (int h = 0; h < Hq; h++) {
            float *dst = out + ((int64_t)s * Hq + h) * D;
            const float inv = l[h] > 0.f ? 1.f / l[h] : 0.f;
            for (int d = 0; d < D; d++) dst[d] = acc[h * D + d] * inv;
        }
    }
}

#define GEMV_TILE(MB, NB)                                                                                         \
static inline void gemv_tile_##MB##x##NB(const lp_wide *xb, int64_t K, const lp_wide *wr, float *out) {          \
    __m512 acc[MB * NB];                                                                                          \
    for (int i = 0; i < MB * NB; i++) acc[i] = _mm512_setzero_ps();                                               \
    for (int64_t k = 0; k < K; k += 32) {                                                                         \
        __m512bh wv[NB];                                                                                          \
        for (int j = 0; j < NB; j++) {                                                                            \
            _mm_prefetch((const char *)(wr + j * K + k + GEMV_PREFETCH), _MM_HINT_T0);                            \
            wv[j] = (__m512bh)_mm512_loadu_si512((const void *)(wr + j * K + k));                                 \
        }                                                                                                         \
        for (int m = 0; m < MB; m++) {                                                                            \
            __m512bh xv = (__m512bh)_mm512_loadu_si512((const void *)(xb + m * K + k));                           \
            for (int j = 0; j < NB; j++) acc[m * NB + j] = _mm512_dpbf16_ps(acc[m * NB + j], xv, wv[j]);          \
        }                                                                                                         \
    }                                                                                                             \
    lp_hsum16(acc, MB * NB, out);                                                                                 \
}
#elif LP_HAVE_AVX2
/* AVX2 tiles: at most 2 x 4 accumulators (16 ymm registers), so 4 x 4 runs as two 2 x 4 halves over L1 */
#define GEMV_TILE_AVX2(MB, NB)                                                                                    \
static inline void gemv_tile_##MB##x##NB(const lp_wide *xb, int64_t K, const lp_wide *wr, float *out) {          \
    __m256 acc[MB * NB];                                                                                          \
    for (int i = 0; i < MB * NB; i++) acc[i] = _mm256_setzero_ps();                                               \
    for (int64_t k = 0; k < K; k += 8) {                                                                          \
        __m256 wv[NB];                                                                                            \
        for (int j = 0; j < NB; j++) wv[j] = _mm256_loadu_ps(wr + j * K + k); /* the scratch, in L1 */             \
        for (int m = 0; m < MB; m++) {                                                                            \
            const __m256 xv = _mm256_loadu_ps(xb + m * K + k);                                                    \
            for (int j = 0; j < NB; j++) acc[m * NB + j] = _mm256_fmadd_ps(xv, wv[j], acc[m * NB + j]);           \
        }                                                                                                         \
    }                                                                                                             \
    for (int i = 0; i < MB * NB; i++) out[i] = lp_hsum8((lp_v8)acc[i]);                                           \
}
#define GEMV_TILE(MB, NB) GEMV_TILE_##MB##x##NB
#define GEMV_TILE_1x4 GEMV_TILE_AVX2(1, 4)
#define GEMV_TILE_2x4 GEMV_TILE_AVX2(2, 4)
#define GEMV_TILE_1x1 GEMV_TILE_AVX2(1, 1)
#define GEMV_TILE_4x4                                                                                             \
static inline void gemv_tile_4x4(const lp_wide *xb, int64_t K, const lp_wide *wr, float *out) {                  \
    gemv_tile_2x4(xb, K, wr, out);                                                                                \
    gemv_tile_2x4(xb + 2 * K, K, wr, out + 8);                                                                    \
}
#else
#define GEMV_TILE(MB, NB)                                                                                         \
static inline void gemv_tile_##MB##x##NB(const lp_wide *xb, int64_t K, const lp_wide *wr, float *out) {          \
    for (int m = 0; m < MB; m++)                                                                                  \
        for (int j = 0; j < NB; j++) {                                                                            \
            float s = 0.f;                                                                                        \
            _Pragma("omp simd reduction(+ : s)")                                                                  \
            for (int64_t k = 0; k < K; k++) s += ld_bf16(xb + m * K, k) * ld_bf16(wr + j * K, k);                 \
            out[m * NB + j] = s;                                                                                  \
        }                                                                                                         \
}
#endif
GEMV_TILE(1, 4)
GEMV_TILE(2, 4)
GEMV_TILE(4, 4)
GEMV_TILE(1, 1)

void lp_paged_decode_bf16kv(const float *q, int64_t q_stride, const uint16_t *k_cache, const uint16_t *v_cache,
                            const int32_t *block_tables, int64_t bt_stride, const int32_t *seq_lens, float *out,
                            int S, int Hq, int Hkv, int D, int BS, float scale, int nthreads) {
#if LP_HAVE_BF16
    if (D == 64 && BS <= MAX_BLOCK && Hq <= MAX_HEADS && Hq % Hkv == 0) {
        lp_paged_decode_bf16kv_d64(q, q_stride, k_cache, v_cache, block_tables, bt_stride, seq_lens, out, S, Hq, Hkv,
                                   BS, scale, nthreads);
        return;
    }
#endif
    lp_paged_decode_bf16kv_any(q, q_stride, k_cache, v_cache, block_tables, bt_stride, seq_lens, out, S, Hq, Hkv, D,
                               BS, scale, nthreads);
}

/* one output of a widened-format tile: o * scale[n] + bias[n] as one fma, so every tile rounds it alike. The
 * empty asm makes o opaque: under -ffast-math the compiler may otherwise fold the bias into o's horizontal sum
 * in one inlining context and not in another (a row's bits would then depend on its tile). */
static inline float lp_out(float o, const float *scale, const float *bias, int64_t n) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    __asm__("" : "+x"(o));
#elif defined(__GNUC__) && defined(__aarch64__)
    __asm__("" : "+w"(o));
#endif
    const float b = bias ? bias[n] : 0.f;
    return scale ? fmaf(o, scale[n], b) : o + b;
}

/* A 4 x 4 tile of the widened formats (every tile of a 32-row step) stored from vector registers: out * scale
 * (per output) + bias in one fma, as lp_out computes it, the same bits without
 * 16 scalar stores a tile (a step's 32-row GEMMs, cold weights: 4-5% faster on the 2-core VM). */
static inline void store_tile_4x4(float *y, int64_t N, int m, int64_t n0, const float *out, const float *scale,
                                  const float *bias) {
#if LP_HAVE_BF16
    __m512 v = _mm512_loadu_ps(out);
    const __m512 b = bias ? _mm512_broadcast_f32x4(_mm_loadu_ps(bias + n0)) : _mm512_setzero_ps();
    if (scale)
        v = _mm512_fmadd_ps(v, _mm512_broadcast_f32x4(_mm_loadu_ps(scale + n0)), b);
    else if (bias)
        v = _mm512_add_ps(v, b);
    _mm_storeu_ps(y + (int64_t)m * N + n0, _mm512_extractf32x4_ps(v, 0));
    _mm_storeu_ps(y + (int64_t)(m + 1) * N + n0, _mm512_extractf32x4_ps(v, 1));
    _mm_storeu_ps(y + (int64_t)(m + 2) * N + n0, _mm512_extractf32x4_ps(v, 2));
    _mm_storeu_ps(y + (int64_t)(m + 3) * N + n0, _mm512_extractf32x4_ps(v, 3));
#else
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 4; j++) y[(int64_t)(m + i) * N + n0 + j] = lp_out(out[i * 4 + j], scale, bias, n0 + j);
#endif
}

/* lp_linear_bf16's weight layout: w [N, K] row-major -> wp [ceil(N / 32)][K / 2][32][2], a group of 32 outputs
 * with each pair of inputs (k, k + 1) of its 32 rows side by side (the pairs vdpbf16ps multiplies), so one 64-byte
 * load holds a k pair of 16 outputs and a row of x needs no horizontal sums. Columns past N are zero. wp holds
 * lp_packed_bf16_len(N, K) elements; the engine keeps only this copy (serving.engine.linear.BF16Linear). */
int64_t lp_packed_bf16_len(int64_t N, int64_t K) { return (N + 31) / 32 * 32 * K; }

void lp_pack_bf16(const uint16_t *w, int64_t N, int64_t K, uint16_t *wp) {
    for (int64_t g = 0; g < (N + 31) / 32; g++)
        for (int c = 0; c < 32; c++) {
            const int64_t n = g * 32 + c;
            for (int64_t p = 0; p < K / 2; p++) {
                uint16_t *d = wp + ((g * (K / 2) + p) * 32 + c) * 2;
                d[0] = n < N ? w[n * K + 2 * p] : 0;
                d[1] = n < N ? w[n * K + 2 * p + 1] : 0;
            }
        }
}

#if LP_HAVE_BF16
static inline __m512 lp_round_bf16_16(__m512 v) { /* round_bf16 on 16 lanes: the same integer arithmetic */
    const __m512i u = _mm512_castps_si512(v), one = _mm512_set1_epi32(1);
    const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF),
                                                           _mm512_and_si512(_mm512_srli_epi32(u, 16), one)));
    return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32((int)0xFFFF0000u)));
}

/* MB rows of x against one packed group (32 outputs): acc[2m], acc[2m + 1] = row m's outputs 0-15, 16-31; x pairs
 * broadcast, 2 weight loads per 2 * MB vdpbf16ps. PF: how the group's k loop prefetches (a constant, so each
 * variant compiles without a branch): 1, 2 KB ahead in this group (a row tile that reads the weight alone);
 * 2 and 3, the next group at a line per k step or per 2 (every row tile of a multi-tile group, spread so the next
 * group arrives while this one is computed: a 32-row step's GEMMs 17.0 -> 10.4 ms against prefetching only in the
 * first row tile, 12.0). *pfp: where the spread prefetch has got to. */
#define PK_TILE(MB, PF)                                                                                           \
static inline void pk_tile_##MB##_##PF(const uint16_t *xb, int64_t K, const uint16_t *wg, __m512 *acc,            \
                                       const char **pfp) {                                                        \
    const int32_t *xi = (const int32_t *)xb;                                                                      \
    const char *q = *pfp;                                                                                         \
    for (int i = 0; i < 2 * MB; i++) acc[i] = _mm512_setzero_ps();                                                \
    for (int64_t p = 0; p < K / 2; p++) {                                                                         \
        if (PF == 1) {                                                                                            \
            _mm_prefetch((const char *)(wg + p * 64 + 1024), _MM_HINT_T0);                                        \
            _mm_prefetch((const char *)(wg + p * 64 + 1056), _MM_HINT_T0);                                        \
        }                                                                                                         \
        if (PF == 2 || (PF == 3 && (p & 1) == 0)) {                                                               \
            _mm_prefetch(q, _MM_HINT_T0);                                                                         \
            q += 64;                                                                                              \
        }                                                                                                         \
        const __m512bh w0 = (__m512bh)_mm512_loadu_si512((const void *)(wg + p * 64));                           \
        const __m512bh w1 = (__m512bh)_mm512_loadu_si512((const void *)(wg + p * 64 + 32));                      \
        for (int m = 0; m < MB; m++) {                                                                            \
            const __m512bh xv = (__m512bh)_mm512_set1_epi32(xi[m * (K / 2) + p]);                                 \
            acc[2 * m] = _mm512_dpbf16_ps(acc[2 * m], xv, w0);                                                    \
            acc[2 * m + 1] = _mm512_dpbf16_ps(acc[2 * m + 1], xv, w1);                                            \
        }                                                                                                         \
    }                                                                                                             \
    *pfp = q;                                                                                                     \
}                                                                                                                 \

#define PK_TILES(MB)                                                                                              \
PK_TILE(MB, 0) PK_TILE(MB, 1) PK_TILE(MB, 2) PK_TILE(MB, 3)                                                       \
static inline void pk_tile_##MB(const uint16_t *xb, int64_t K, const uint16_t *wg, __m512 *acc, const char **pfp, \
                                int pf) {                                                                         \
    if (pf == 1) pk_tile_##MB##_1(xb, K, wg, acc, pfp);                                                           \
    else if (pf == 2) pk_tile_##MB##_2(xb, K, wg, acc, pfp);                                                      \
    else if (pf == 3) pk_tile_##MB##_3(xb, K, wg, acc, pfp);                                                      \
    else pk_tile_##MB##_0(xb, K, wg, acc, pfp);                                                                   \
}
PK_TILES(8)
PK_TILES(4)
PK_TILES(2)
PK_TILES(1)

/* rows m0.. m0 + MB - 1 of the group at column n0: + bias, rounded to bf16 values; columns past N not written */
static inline void pk_store(float *y, int64_t N, int64_t m0, int MB, int64_t n0, const __m512 *acc,
                            const float *bias) {
    const int64_t left = N - n0;
    const __mmask16 k0 = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
    const __mmask16 k1 = left >= 32 ? (__mmask16)0xFFFF : left <= 16 ? 0 : (__mmask16)((1u << (left - 16)) - 1u);
    const __m512 b0 = bias ? _mm512_maskz_loadu_ps(k0, bias + n0) : _mm512_setzero_ps();
    const __m512 b1 = bias ? _mm512_maskz_loadu_ps(k1, bias + n0 + 16) : _mm512_setzero_ps();
    for (int m = 0; m < MB; m++) {
        float *row = y + (m0 + m) * N + n0;
        _mm512_mask_storeu_ps(row, k0, lp_round_bf16_16(_mm512_add_ps(acc[2 * m], b0)));
        _mm512_mask_storeu_ps(row + 16, k1, lp_round_bf16_16(_mm512_add_ps(acc[2 * m + 1], b1)));
    }
}

/* one group, rows m0.. m0 + M - 1: tiles of 8 rows (16 accumulators), then 4, 2, 1 */
static void pk_group(const uint16_t *xb, int64_t K, const uint16_t *wg, int64_t m0, int M, int64_t n0, int64_t N,
                     const float *bias, float *y) {
    __m512 acc[16];
    const int tiles = M / 8 + (M % 8) / 4 + (M % 4) / 2 + M % 2;
    const int pf = tiles == 1 ? 1 : tiles <= 3 ? 2 : 3;
    const char *pfp = (const char *)(wg + K * 32); /* the next group */
    int m = 0;
    for (; m + 8 <= M; m += 8) {
        pk_tile_8(xb + m * K, K, wg, acc, &pfp, pf);
        pk_store(y, N, m0 + m, 8, n0, acc, bias);
    }
    for (; m + 4 <= M; m += 4) {
        pk_tile_4(xb + m * K, K, wg, acc, &pfp, pf);
        pk_store(y, N, m0 + m, 4, n0, acc, bias);
    }
    for (; m + 2 <= M; m += 2) {
        pk_tile_2(xb + m * K, K, wg, acc, &pfp, pf);
        pk_store(y, N, m0 + m, 2, n0, acc, bias);
    }
    for (; m < M; m++) {
        pk_tile_1(xb + m * K, K, wg, acc, &pfp, pf);
        pk_store(y, N, m0 + m, 1, n0, acc, bias);
    }
}
#elif LP_HAVE_AVX2
/* AVX2: MB rows of x (float32 values already rounded to bf16) against NC chunks of 8 outputs of a packed group,
 * from chunk c0: a 32-byte load holds 8 outputs' k pairs, widened as (pair << 16) and (pair & 0xFFFF0000); each
 * row adds x[2p] * even + x[2p + 1] * odd, in that order, whatever the tile (a row's result does not depend on
 * the other rows). MB x NC <= 8 accumulators of 16 ymm registers. pf: lines of the next group prefetched per k
 * step (*pfp, up to end). */
#define PK2_TILE(MB, NC)                                                                                          \
static inline void pk2_tile_##MB##x##NC(const float *xf, int64_t K, const uint16_t *wg, int c0, __m256 *acc,     \
                                        const char **pfp, const char *end, int pf) {                             \
    const char *q = *pfp;                                                                                         \
    const __m256i hi = _mm256_set1_epi32((int)0xFFFF0000u);                                                       \
    for (int i = 0; i < MB * NC; i++) acc[i] = _mm256_setzero_ps();                                               \
    for (int64_t p = 0; p < K / 2; p++) {                                                                         \
        for (int i = 0; i < pf && q < end; i++, q += 64) _mm_prefetch(q, _MM_HINT_T0);                            \
        __m256 we[NC], wo[NC];                                                                                    \
        for (int c = 0; c < NC; c++) {                                                                            \
            const __m256i v = _mm256_loadu_si256((const __m256i *)(wg + p * 64 + (c0 + c) * 16));                 \
            we[c] = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));                                                \
            wo[c] = _mm256_castsi256_ps(_mm256_and_si256(v, hi));                                                 \
        }                                                                                                         \
        for (int m = 0; m < MB; m++) {                                                                            \
            const __m256 xe = _mm256_broadcast_ss(xf + m * K + 2 * p);                                            \
            const __m256 xo = _mm256_broadcast_ss(xf + m * K + 2 * p + 1);                                        \
            for (int c = 0; c < NC; c++)                                                                          \
                acc[m * NC + c] = _mm256_fmadd_ps(xo, wo[c], _mm256_fmadd_ps(xe, we[c], acc[m * NC + c]));        \
        }                                                                                                         \
    }                                                                                                             \
    *pfp = q;                                                                                                     \
}
PK2_TILE(4, 2)
PK2_TILE(2, 4)
PK2_TILE(1, 4)

/* rows m0.. of chunks c0.. c0 + NC - 1 of the group at column n0: + bias, rounded to bf16 values */
static inline void pk2_store(float *y, int64_t N, int64_t m0, int MB, int64_t n0, int c0, int NC, const __m256 *acc,
                             const float *bias) {
    for (int m = 0; m < MB; m++)
        for (int c = 0; c < NC; c++) {
            float o[8];
            _mm256_storeu_ps(o, acc[m * NC + c]);
            const int64_t n = n0 + (c0 + c) * 8;
            for (int j = 0; j < 8 && n + j < N; j++)
                y[(m0 + m) * N + n + j] = round_bf16(o[j] + (bias ? bias[n + j] : 0.f));
        }
}

static void pk_group(const float *xf, int64_t K, const uint16_t *wg, int64_t m0, int M, int64_t n0, int64_t N,
                     const float *bias, float *y) {
    __m256 acc[8];
    const int tiles = 2 * (M / 4) + (M % 4) / 2 + M % 2;
    const char *pfp = (const char *)(wg + K * 32), *end = pfp + K * 64; /* the next group */
    const int pf = tiles == 1 ? 2 : 1;
    int m = 0;
    for (; m + 4 <= M; m += 4)
        for (int c0 = 0; c0 < 4; c0 += 2) {
            pk2_tile_4x2(xf + m * K, K, wg, c0, acc, &pfp, end, pf);
            pk2_store(y, N, m0 + m, 4, n0, c0, 2, acc, bias);
        }
    for (; m + 2 <= M; m += 2) {
        pk2_tile_2x4(xf + m * K, K, wg, 0, acc, &pfp, end, pf);
        pk2_store(y, N, m0 + m, 2, n0, 0, 4, acc, bias);
    }
    for (; m < M; m++) {
        pk2_tile_1x4(xf + m * K, K, wg, 0, acc, &pfp, end, pf);
        pk2_store(y, N, m0 + m, 1, n0, 0, 4, acc, bias);
    }
}
#else
static void pk_group(const uint16_t *xb, int64_t K, const uint16_t *wg, int64_t m0, int M, int64_t n0, int64_t N,
                     const float *bias, float *y) {
    for (int m = 0; m < M; m++)
        for (int c = 0; c < 32 && n0 + c < N; c++) {
            float s = 0.f;
            for (int64_t p = 0; p < K / 2; p++)
                s += ld_bf16(xb + m * K, 2 * p) * ld_bf16(wg, (p * 32 + c) * 2)
                     + ld_bf16(xb + m * K, 2 * p + 1) * ld_bf16(wg, (p * 32 + c) * 2 + 1);
            y[(m0 + m) * N + n0 + c] = round_bf16(s + (bias ? bias[n0 + c] : 0.f));
        }
}
#endif

/* y = x @ w^T + bias over the packed weight, any number of rows (decode steps and prefill alike: SmolLM2's 30
 * layers on the 2-core VM, 32 rows 17.0 -> 10.4 ms against the row-layout tiles this replaced, 1 row 4.5 -> 3.9,
 * 64 rows 6.4 ms against oneDNN's 13.8 for 10 layers, 512 rows 49.9 vs 51.7). Each dynamic chunk of 4 groups
 * (128 outputs) is long enough for the prefetch stream to pay; rows go in blocks of 256, so a block's x (bf16)
 * stays in L2 while the weight streams past it. y is rounded to bfloat16 values (kept in float32), as oneDNN's
 * bf16 GEMM rounds its output; a row's result does not depend on the other rows. */
#define PK_ROW_BLOCK 256
void lp_linear_bf16(const float *x, int64_t x_stride, int M, int64_t K, const uint16_t *wp, int64_t N,
                    const float *bias, float *y, int nthreads) {
    lp_wide *xb = widen_x(x, x_stride, M, K);
    if (!xb) return;
    const int64_t NG = (N + 31) / 32;
    for (int m0 = 0; m0 < M; m0 += PK_ROW_BLOCK) {
        const int mb = M - m0 < PK_ROW_BLOCK ? M - m0 : PK_ROW_BLOCK;
#pragma omp parallel for schedule(dynamic, 4) num_threads(nthreads)
        for (int64_t g = 0; g < NG; g++)
            pk_group(xb + (int64_t)m0 * K, K, wp + g * 32 * K, m0, mb, g * 32, N, bias, y);
    }
    free(xb);
}

/* Weight-only int8 (per output row scale): y = (bf16(x) . w[n]) * scale[n] + bias[n]. Each group of 4 weight rows
 * is widened once into a bfloat16 scratch (int8 values are exact in bf16) and then meets every row of x there, from
 * L1, through the same tiles as lp_linear_bf16: a step reads the int8 bytes (half of bf16's) from memory once,
 * whatever M is. torch's _weight_int8pack_mm reads them once per row block instead (300 ms for a 32-row step
 * against bf16's 86 ms on the 2-core VM). K must be a multiple of 32. */
#if LP_HAVE_AVX2
/* AVX2: the 32 weights of a row's group g (inputs 32g.. 32g + 31) widened to float32 in v[0..3], as the scratch
 * holds them and as the 1-3 row path (LP_DIRECT) multiplies them without a scratch */
static inline void ld32_i8(const int8_t *row, const float *sm, int64_t g, __m256 v[4]) {
    (void)sm;
    for (int h = 0; h < 4; h++)
        v[h] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(row + g * 32 + h * 8))));
}
static inline void ld32_q4(const uint8_t *row, const float *sm, int64_t g, __m256 v[4]) { /* sm: (scale, min) */
    const __m128i b = _mm_loadu_si128((const __m128i *)(row + g * 16)), low = _mm_set1_epi8(0x0F);
    const __m128i nib[2] = {_mm_and_si128(b, low), _mm_and_si128(_mm_srli_epi16(b, 4), low)}; /* q[0..15], [16..31] */
    const __m256 vs = _mm256_set1_ps(sm[2 * g]), vm = _mm256_set1_ps(sm[2 * g + 1]);
    const __m256i rnd = _mm256_set1_epi32(0x7FFF), one = _mm256_set1_epi32(1);
    const __m256i keep = _mm256_set1_epi32((int)0xFFFF0000u);
    for (int h = 0; h < 4; h++) {
        const __m128i q8 = h & 1 ? _mm_srli_si128(nib[h >> 1], 8) : nib[h >> 1];
        const __m256 f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q8)), vs, vm);
        const __m256i u = _mm256_castps_si256(f); /* round_bf16 on 8 lanes */
        const __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(rnd, _mm256_and_si256(_mm256_srli_epi32(u, 16), one)));
        v[h] = _mm256_castsi256_ps(_mm256_and_si256(r, keep));
    }
}
#endif

static inline void widen_i8(const int8_t *w, int64_t K, lp_wide *wb) {
#if LP_HAVE_BF16
    for (int64_t k = 0; k < K; k += 32) {
        _mm_prefetch((const char *)(w + k + 2 * GEMV_PREFETCH), _MM_HINT_T0);
        __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + k))));
        __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + k + 16))));
        _mm512_storeu_si512((void *)(wb + k), (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
#elif LP_HAVE_AVX2
    for (int64_t g = 0; g < K / 32; g++) {
        __m256 v[4];
        if ((g & 1) == 0) _mm_prefetch((const char *)(w + g * 32 + 2 * GEMV_PREFETCH), _MM_HINT_T0);
        ld32_i8(w, NULL, g, v);
        for (int h = 0; h < 4; h++) _mm256_storeu_ps(wb + g * 32 + h * 8, v[h]);
    }
#else
    for (int64_t k = 0; k < K; k++) wb[k] = to_wide((float)w[k]);
#endif
}

/* Rows of a quantized weight widened to bf16 one at a time: row n of w (and of its scales s) into wb[K]. */
typedef void (*lp_widen_fn)(const void *w, const float *s, int64_t n, int64_t K, lp_wide *wb);

static void widen_i8_row(const void *w, const float *s, int64_t n, int64_t K, lp_wide *wb) {
    (void)s;
    widen_i8((const int8_t *)w + n * K, K, wb);
}

/* y = (bf16(x) . widen(w)[n]) * (out_scale ? out_scale[n] : 1) + bias[n], each group of 4 weight rows widened once
 * into a per-thread scratch and met by every row of x there (see lp_linear_i8 and lp_linear_q4). */
static void lp_linear_widened(const float *x, int64_t x_stride, int M, int64_t K, const void *w, const float *s,
                              lp_widen_fn widen, const float *out_scale, int64_t N, const float *bias, float *y,
                              int nthreads) {
    lp_wide *xb = widen_x(x, x_stride, M, K);
    if (!xb) return;
    const int64_t NQ = (N + 3) / 4;
#pragma omp parallel num_threads(nthreads)
    {
        lp_wide *wb = (lp_wide *)malloc((size_t)4 * (size_t)K * sizeof(lp_wide));
#pragma omp for schedule(dynamic, 32)
        for (int64_t q = 0; q < NQ; q++) {
            const int64_t n0 = q * 4;
            const int nb = N - n0 < 4 ? (int)(N - n0) : 4;
            float out[16];
            if (!wb) continue;
            for (int j = 0; j < nb; j++) widen(w, s, n0 + j, K, wb + j * K);
            for (int m = 0; m < M;) {
                const int mb = nb < 4 ? 1 : m + 4 <= M ? 4 : m + 2 <= M ? 2 : 1;
                if (nb == 4 && mb == 4) gemv_tile_4x4(xb + m * K, K, wb, out);
                else if (nb == 4 && mb == 2) gemv_tile_2x4(xb + m * K, K, wb, out);
                else if (nb == 4) gemv_tile_1x4(xb + m * K, K, wb, out);
                else
                    for (int j = 0; j < nb; j++) gemv_tile_1x1(xb + m * K, K, wb + j * K, out + j);
                if (nb == 4 && mb == 4) {
                    store_tile_4x4(y, N, m, n0, out, out_scale, bias);
                    m += mb;
                    continue;
                }
                for (int i = 0; i < mb; i++)
                    for (int j = 0; j < nb; j++) {
                        y[(int64_t)(m + i) * N + n0 + j] = lp_out(out[i * nb + j], out_scale, bias, n0 + j);
                    }
                m += mb;
            }
        }
        free(wb);
    }
    free(xb);
}

#if LP_HAVE_AVX2
/* AVX2, 1-3 rows (decode of 1-3 streams): no scratch; each block of 8 weight rows is widened as it is multiplied,
 * 8 independent accumulators per row of x. The same FMAs in the same order as the scratch tiles (one chain per
 * output over k, then lp_hsum8), so a row's result does not depend on M. SmolLM2's 30 layers on the 2-core AVX2
 * VM, one row: int8 9.0 -> 4.4 ms against the scratch (2 rows 11.8 -> 7.2), int4 19.4 -> 13.2. RB: a row's bytes. */
#define LP_DIRECT(NAME, WT, LD32, RB, SM_ROW)                                                                     \
static void NAME(const float *x, int64_t x_stride, int M, int64_t K, const WT *w, const float *sm,                 \
                 const float *out_scale, int64_t N, const float *bias, float *y, int nthreads) {                  \
    float *xb = widen_x(x, x_stride, M, K);                                                                       \
    const int64_t rb = RB;                                                                                        \
    if (!xb) return;                                                                                              \
_Pragma("omp parallel for schedule(dynamic, 8) num_threads(nthreads)")                                           \
    for (int64_t q = 0; q < (N + 7) / 8; q++) {                                                                   \
        const int64_t n0 = q * 8;                                                                                 \
        const int nb = N - n0 < 8 ? (int)(N - n0) : 8;                                                            \
        const WT *rows[8];                                                                                        \
        const float *sms[8];                                                                                      \
        for (int j = 0; j < 8; j++) { /* rows past N repeat the last one (computed, not stored) */                \
            const int64_t n = n0 + (j < nb ? j : nb - 1);                                                         \
            rows[j] = w + n * rb;                                                                                 \
            sms[j] = SM_ROW;                                                                                      \
        }                                                                                                         \
        const char *pf = (const char *)(w + (n0 + 8) * rb);                                                       \
        for (int m = 0; m < M; m++) {                                                                             \
            __m256 acc[8];                                                                                        \
            for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();                                             \
            for (int64_t g = 0; g < K / 32; g++) {                                                                \
                if (m == 0) { /* the next block, 4 lines per group */                                              \
                    for (int i = 0; i < 4; i++) _mm_prefetch(pf + g * 256 + i * 64, _MM_HINT_T0);                 \
                }                                                                                                 \
                const float *xg = xb + m * K + g * 32;                                                            \
                for (int j = 0; j < 8; j++) {                                                                     \
                    __m256 v[4];                                                                                  \
                    LD32(rows[j], sms[j], g, v);                                                                  \
                    for (int h = 0; h < 4; h++) acc[j] = _mm256_fmadd_ps(_mm256_loadu_ps(xg + h * 8), v[h], acc[j]); \
                }                                                                                                 \
            }                                                                                                     \
            for (int j = 0; j < nb; j++)                                                                          \
                y[(int64_t)m * N + n0 + j] = lp_out(lp_hsum8((lp_v8)acc[j]), out_scale, bias, n0 + j);            \
        }                                                                                                         \
    }                                                                                                             \
    free(xb);                                                                                                     \
}
LP_DIRECT(lp_direct_i8, int8_t, ld32_i8, K, NULL)
LP_DIRECT(lp_direct_q4, uint8_t, ld32_q4, K / 2, sm + n * (K / 16))
#define LP_DIRECT_ROWS 3 /* int8; at 4 rows the scratch tiles (each widened weight read 4 times, from L1) win */
#endif

void lp_linear_i8(const float *x, int64_t x_stride, int M, int64_t K, const int8_t *w, const float *scale,
                  int64_t N, const float *bias, float *y, int nthreads) {
#if LP_HAVE_AVX2
    if (M <= LP_DIRECT_ROWS) {
        lp_direct_i8(x, x_stride, M, K, w, NULL, scale, N, bias, y, nthreads);
        return;
    }
#endif
    lp_linear_widened(x, x_stride, M, K, w, NULL, widen_i8_row, scale, N, bias, y, nthreads);
}

/* Weight-only 4-bit as GGUF's Q4_1: per group of 32 inputs, w = q * scale + min with q in [0, 15]; a group is 16
 * bytes, byte i holding q[i] (low nibble) and q[i + 16] (high nibble), and sm holds (scale, min) per group as
 * float32. Like lp_linear_i8, each group of 4 weight rows is widened once into a bfloat16 scratch (q * scale + min
 * in float32, rounded to bf16) and meets every row of x there through the same tiles, so a step reads the 4-bit
 * bytes (a quarter of bf16's) from memory once, whatever M is. K must be a multiple of 32. */
static inline void widen_q4(const uint8_t *w, const float *sm, int64_t K, lp_wide *wb) {
#if LP_HAVE_AVX2
    for (int64_t g = 0; g < K / 32; g++) {
        __m256 v[4];
        if ((g & 3) == 0) _mm_prefetch((const char *)(w + g * 16 + GEMV_PREFETCH), _MM_HINT_T0);
        ld32_q4(w, sm, g, v);
        for (int h = 0; h < 4; h++) _mm256_storeu_ps(wb + g * 32 + h * 8, v[h]);
    }
#else
    for (int64_t g = 0; g < K / 32; g++) {
        const float s = sm[2 * g], mn = sm[2 * g + 1];
#if LP_HAVE_BF16
        _mm_prefetch((const char *)(w + g * 16 + GEMV_PREFETCH), _MM_HINT_T0);
        const __m128i b = _mm_loadu_si128((const __m128i *)(w + g * 16)), low = _mm_set1_epi8(0x0F);
        const __m512 vs = _mm512_set1_ps(s), vm = _mm512_set1_ps(mn);
        __m512 lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(b, low))), vs, vm);
        __m512 hi = _mm512_fmadd_ps(
            _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), low))), vs, vm);
        _mm512_storeu_si512((void *)(wb + g * 32), (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
#else
        for (int i = 0; i < 16; i++) {
            wb[g * 32 + i] = to_wide((float)(w[g * 16 + i] & 15) * s + mn);
            wb[g * 32 + 16 + i] = to_wide((float)(w[g * 16 + i] >> 4) * s + mn);
        }
#endif
    }
#endif
}

static void widen_q4_row(const void *w, const float *s, int64_t n, int64_t K, lp_wide *wb) {
    widen_q4((const uint8_t *)w + n * (K / 2), s + n * (K / 16), K, wb);
}

void lp_linear_q4(const float *x, int64_t x_stride, int M, int64_t K, const uint8_t *w, const float *sm,
                  int64_t N, const float *bias, float *y, int nthreads) {
#if LP_HAVE_AVX2
    if (M == 1) { /* at 2 rows, widening each q4 weight twice (and rounding it to bf16) costs more than the scratch */
        lp_direct_q4(x, x_stride, M, K, w, sm, NULL, N, bias, y, nthreads);
        return;
    }
#endif
    lp_linear_widened(x, x_stride, M, K, w, sm, widen_q4_row, NULL, N, bias, y, nthreads);
}

/* Projection j (qkv, o, gate_up, down) of a fused-step layer row p: its weight p[j], its float32 scales p[12 + j]
 * (int8: per row; int4: (scale, min) per group) and its kind p[16 + j] (0 bf16, 1 int8, 2 int4). */
static void lp_proj(const float *x, int64_t x_stride, int M, int64_t K, const int64_t *p, int j, int64_t N,
                    const float *bias, float *y, int nthreads) {
    if (p[16 + j] == 2)
        lp_linear_q4(x, x_stride, M, K, (const uint8_t *)p[j], (const float *)p[12 + j], N, bias, y, nthreads);
    else if (p[16 + j] == 1)
        lp_linear_i8(x, x_stride, M, K, (const int8_t *)p[j], (const float *)p[12 + j], N, bias, y, nthreads);
    else
        lp_linear_bf16(x, x_stride, M, K, (const uint16_t *)p[j], N, bias, y, nthreads);
}

/* One LoRA group of a fused-step layer (serving.engine.fused_decode): the address of the LoRA kernel the per-op
 * path would call this step (any of lp_lora_apply_* / lp_lora_runs_*, one signature), then M, in, r and the
 * addresses of that kernel's per-module arrays (a_ptrs, a_ss, b_ptrs, b_ss, b_os, b_ks, outs), then each
 * module's first column in y (kernels.cpu_lora.Group builds it). */
typedef void (*lp_lora_fn)(const float *, int64_t, int64_t, int64_t, const int32_t *, int, const int64_t *,
                           const int64_t *, const int64_t *, const int64_t *, const int64_t *, const int64_t *,
                           const int64_t *, const int64_t *, const int64_t *, int, int);
#define LP_MAX_LORA_MODULES 3

static void lp_lora_group(const int64_t *g, const float *x, int64_t x_stride, int M, const int32_t *token_slot,
                          float *y, int64_t y_stride, int nthreads) {
    const int mods = (int)g[1];
    const int64_t *cols = (const int64_t *)g[11];
    int64_t y_ptrs[LP_MAX_LORA_MODULES], y_strides[LP_MAX_LORA_MODULES];
    for (int m = 0; m < mods; m++) {
        y_ptrs[m] = (int64_t)(y + cols[m]);
        y_strides[m] = y_stride;
    }
    ((lp_lora_fn)g[0])(x, x_stride, M, g[2], token_slot, mods, (const int64_t *)g[4], (const int64_t *)g[5],
                       (const int64_t *)g[6], (const int64_t *)g[7], (const int64_t *)g[8], (const int64_t *)g[9],
                       (const int64_t *)g[10], y_ptrs, y_strides, (int)g[3], nthreads);
}

/* Every decoder layer of a decode-only step (M <= BF16Linear.GEMV_ROWS tokens) over bfloat16, int8 or int4
 * weights, in one call: the same kernels the per-op path calls (lp_add_rms_norm_f32, lp_linear_bf16,
 * lp_linear_i8 or lp_linear_q4, lp_rope_f32, the
 * paged decode attention, lp_silu_mul_f32), in the same order, with the same thread counts, so the tokens are
 * bitwise those of the per-op path. What it removes is ~15 Python-level calls per layer (~8 ms of a ~25 ms
 * step on 2 cores).
 *
 * layers: L rows of LP_LAYER_PTRS addresses (serving.engine.fused_decode builds them once): the qkv, o, gate_up
 * and down weights [N, K] (bf16, or int8), their float32 biases or 0, the two norms' weights, the layer's K and V
 * caches, then the four projections' float32 scales (int8, int4) or 0 (bf16), then their kinds (see lp_proj).
 * r [M, H]: the residual stream, the embeddings on entry, updated in place; d [M, H]: the last MLP output on
 * return (the caller's final norm adds it into r, as the per-op path does). cos/sin [M, D]: the tokens' rows;
 * slots [M]: where each token's K/V goes; block_tables [M, bt_stride], seq_lens [M]: attention's context.
 * The KV caches are bfloat16 (kv_bf16) or float32, [blocks, BS, Hkv, D]. lora: NULL, or L rows of 4 addresses
 * (0: none), each projection's LoRA group (lp_lora_group), added after the projection as the per-op path adds
 * it; token_slot [M]: each token's adapter slot. Returns 0, or -1 if out of memory. */
#define LP_LAYER_PTRS 20
int lp_decode_layers(const int64_t *layers, int L, float *r, float *d, int M, int64_t H, int64_t I,
                     int Hq, int Hkv, int D, const float *cos_t, const float *sin_t, const int64_t *slots,
                     const int32_t *block_tables, int64_t bt_stride, const int32_t *seq_lens, int BS,
                     int kv_bf16, float eps, float scale, const int64_t *lora, const int32_t *token_slot,
                     int nthreads) {
    const int64_t QS = (int64_t)Hq * D, KVS = (int64_t)Hkv * D, QKV = QS + 2 * KVS;
    float *buf = (float *)malloc(sizeof(float) * (size_t)M * (size_t)(H + QKV + QS + 2 * I + I));
    if (!buf) return -1;
    float *h = buf, *qkv = h + M * H, *att = qkv + M * QKV, *gu = att + M * QS, *act = gu + M * 2 * I;
    const int small = M < 4 ? 1 : nthreads; /* kernels.cpu_native.threads(rows): a team costs more than 1-3 rows */
#define LP_LORA(J, X, XS, Y, YS)                                                                                  \
    if (lora && lora[4 * l + J])                                                                                  \
    lp_lora_group((const int64_t *)lora[4 * l + J], X, XS, M, token_slot, Y, YS, nthreads)
    for (int l = 0; l < L; l++) {
        const int64_t *p = layers + (int64_t)l * LP_LAYER_PTRS;
        const float *b_qkv = (const float *)p[4], *b_o = (const float *)p[5];
        const float *b_gu = (const float *)p[6], *b_down = (const float *)p[7];
        const float *ln1 = (const float *)p[8], *ln2 = (const float *)p[9];
        void *kc = (void *)p[10], *vc = (void *)p[11];
        lp_add_rms_norm_f32(r, H, l ? d : NULL, H, ln1, h, M, H, eps, small);
        lp_proj(h, H, M, H, p, 0, QKV, b_qkv, qkv, nthreads);
        LP_LORA(0, h, H, qkv, QKV);
        lp_rope_f32(qkv, QKV, cos_t, sin_t, M, Hq + Hkv, D, small);
        for (int m = 0; m < M; m++) {  /* this token's K and V into its cache slot */
            const float *k = qkv + m * QKV + QS, *v = k + KVS;
            if (kv_bf16) {
                uint16_t *kd = (uint16_t *)kc + slots[m] * KVS, *vd = (uint16_t *)vc + slots[m] * KVS;
                for (int64_t i = 0; i < KVS; i++) { kd[i] = to_bf16(k[i]); vd[i] = to_bf16(v[i]); }
            } else {
                float *kd = (float *)kc + slots[m] * KVS, *vd = (float *)vc + slots[m] * KVS;
                for (int64_t i = 0; i < KVS; i++) { kd[i] = k[i]; vd[i] = v[i]; }
            }
        }
        if (kv_bf16)
            lp_paged_decode_bf16kv(qkv, QKV, (const uint16_t *)kc, (const uint16_t *)vc, block_tables, bt_stride,
                                   seq_lens, att, M, Hq, Hkv, D, BS, scale, small);
        else
            lp_paged_decode_f32(qkv, QKV, (const float *)kc, (const float *)vc, block_tables, bt_stride, seq_lens,
                                att, M, Hq, Hkv, D, BS, scale, small);
        lp_proj(att, QS, M, QS, p, 1, H, b_o, d, nthreads);
        LP_LORA(1, att, QS, d, H);
        lp_add_rms_norm_f32(r, H, d, H, ln2, h, M, H, eps, small);
        lp_proj(h, H, M, H, p, 2, 2 * I, b_gu, gu, nthreads);
        LP_LORA(2, h, H, gu, 2 * I);
        lp_silu_mul_f32(gu, act, M, I, small);
        lp_proj(act, I, M, I, p, 3, H, b_down, d, nthreads);
        LP_LORA(3, act, I, d, H);
    }
#undef LP_LORA
    free(buf);
    return 0;
}
