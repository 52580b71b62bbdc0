/* Paged decode attention for float32 on the CPU: one query token per sequence attends to its cached context,
 * reading the KV blocks in place (the torch path first gathers them into a padded copy, so it moves the bytes
 * three times; this moves them once). One online-softmax pass per sequence over its blocks, all query heads
 * together (a token's K/V row is read once for every head); the next block is prefetched while this one is
 * computed, since blocks lie anywhere in the cache. OpenMP over sequences shares torch's thread pool (torch has
 * already loaded the same libgomp).
 *
 * Layouts as kernels/ref_attention.py: q [S, Hq, D] (row stride q_stride, heads contiguous), caches
 * [NB, BS, Hkv, D] contiguous, block_tables [S, bt_stride] int32, seq_lens [S] int32, out [S, Hq, D] contiguous.
 * Compiled with -ffast-math (vectorised expf), linked without it (no process-wide flush-to-zero). */
#include <float.h>
#include <math.h>
#include <stdint.h>

#define MAX_HEADS 64
#define MAX_DIM 256
#define MAX_BLOCK 64

void lp_limits(int *max_heads, int *max_dim, int *max_block) {
    *max_heads = MAX_HEADS;
    *max_dim = MAX_DIM;
    *max_block = MAX_BLOCK;
}

void lp_paged_decode_f32(const float *q, int64_t q_stride, const float *k_cache, const float *v_cache,
                         const int32_t *block_tables, int64_t bt_stride, const int32_t *seq_lens, float *out,
                         int S, int Hq, int Hkv, int D, int BS, float scale, int nthreads) {
    const int G = Hq / Hkv;
    const int64_t tok_stride = (int64_t)Hkv * D, blk_stride = (int64_t)BS * Hkv * D, row_bytes = tok_stride * 4;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int s = 0; s < S; s++) {
        const int len = seq_lens[s];
        float qv[MAX_HEADS][MAX_DIM], acc[MAX_HEADS][MAX_DIM], p[MAX_HEADS][MAX_BLOCK], m[MAX_HEADS], l[MAX_HEADS];
        for (int h = 0; h < Hq; h++) {
            const float *src = q + s * q_stride + (int64_t)h * D;
            for (int d = 0; d < D; d++) {
                qv[h][d] = src[d] * scale;
                acc[h][d] = 0.f;
            }
            m[h] = -FLT_MAX;
            l[h] = 0.f;
        }
        for (int start = 0; start < len; start += BS) {
            const int n = len - start < BS ? len - start : BS;
            const int64_t blk = block_tables[s * bt_stride + start / BS];
            const int64_t nxt = start + BS < len ? block_tables[s * bt_stride + start / BS + 1] : blk;
            const float *kb = k_cache + blk * blk_stride, *vb = v_cache + blk * blk_stride;
            const char *nk = (const char *)(k_cache + nxt * blk_stride), *nv = (const char *)(v_cache + nxt * blk_stride);
            for (int t = 0; t < n; t++) {  /* scores; prefetch the next block's row t meanwhile */
                for (int64_t off = t * row_bytes; off < (t + 1) * row_bytes; off += 64) {
                    __builtin_prefetch(nk + off);
                    __builtin_prefetch(nv + off);
                }
                for (int h = 0; h < Hq; h++) {
                    const float *kr = kb + t * tok_stride + (h / G) * D;
                    float dot = 0.f;
#pragma omp simd reduction(+ : dot)
                    for (int d = 0; d < D; d++) dot += qv[h][d] * kr[d];
                    p[h][t] = dot;
                }
            }
            for (int h = 0; h < Hq; h++) {  /* online softmax: rescale what was accumulated to the new max */
                float bmax = m[h];
                for (int t = 0; t < n; t++) bmax = p[h][t] > bmax ? p[h][t] : bmax;
                const float corr = expf(m[h] - bmax);
                float sum = 0.f;
#pragma omp simd reduction(+ : sum)
                for (int t = 0; t < n; t++) {
                    p[h][t] = expf(p[h][t] - bmax);
                    sum += p[h][t];
                }
                l[h] = l[h] * corr + sum;
                m[h] = bmax;
                if (corr != 1.f)
                    for (int d = 0; d < D; d++) acc[h][d] *= corr;
            }
            for (int t = 0; t < n; t++) {
                for (int h = 0; h < Hq; h++) {
                    const float *vr = vb + t * tok_stride + (h / G) * D;
                    const float pt = p[h][t];
#pragma omp simd
                    for (int d = 0; d < D; d++) acc[h][d] += pt * vr[d];
                }
            }
        }
        for (int h = 0; h < Hq; h++) {
            float *dst = out + ((int64_t)s * Hq + h) * D;
            const float inv = l[h] > 0.f ? 1.f / l[h] : 0.f;
            for (int d = 0; d < D; d++) dst[d] = acc[h][d] * inv;
        }
    }
}
