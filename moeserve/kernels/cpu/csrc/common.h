/* Native CPU kernels on GGUF blocks as they are stored (no repack), for moeserve: what the kernel
 * files share (includes, type ids, inline helpers, the quantized-activation type, thread-local
 * buffers, cross-file declarations). Kernel families: quant.c (activation quantization, dot
 * products, matmuls, dequantization, GEMMs), moe.c, attention.c, small.c (norms, RoPE, argmax);
 * ops.cpp registers them as torch operators (torch.ops.moeserve.*).
 *
 * Why: on AVX2-only CPUs torch's int4 kernel spends ~0.35 cycles per weight at m = 1 (it is
 * instruction-bound, not bandwidth-bound), and its bf16 activations/outputs cost ~4e-3 relative
 * error. These kernels read the file's bytes directly (zero load time, zero extra memory) and
 * use integer dot products with 16-bit activations:
 *
 *   x (float32) is quantized per 256 values to x16 = round(x / s), |x16| <= 32512, then split
 *   into two int8 planes x16 = 255 * hi + lo (both in -127..127), so that pmaddubsw
 *   (u8 weights x s8 activations) never saturates. Sum(q * x16) = 255 * Sum(q * hi) + Sum(q * lo)
 *   is exact in int32; the block scales are applied in float32. Relative activation error is
 *   ~2^-16 of the block maximum (llama.cpp uses 8 bits; bf16 has 8 significant bits).
 *
 * Offsets (Q4_0's -8, Q6_K's -32, Q4_1/Q4_K mins) are applied with exact integer sums of x16
 * per 16 values (`bsum`).
 *
 * For larger m, `mk_gemm` decodes tiles of weight rows once and multiplies them with all the rows:
 * the integer GEMM (`mk_gemm_i16`) for the K-quants, else a float32 GEMM on tiles of exact float32
 * weights (`mk_dequant`'s values, same arithmetic order as the reference dequantizer).
 *
 * `mk_moe` / `mk_moe_routed`: a whole MoE layer for a few tokens (decode) in one call, with the
 * same dot products (moe.c).
 *
 * Threads: OpenMP over weight rows, only for matrices of >= PAR_MIN weights: a fork/join costs
 * microseconds (tens on a busy machine), more than a small matmul. The library links
 * libgomp.so.1, the same soname torch loads, so the process keeps one OpenMP pool.
 */
#ifndef MOESERVE_COMMON_H
#define MOESERVE_COMMON_H

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { QT_Q4_0 = 2, QT_Q4_1 = 3, QT_Q5_0 = 6, QT_Q5_1 = 7, QT_Q8_0 = 8, QT_Q2_K = 10, QT_Q3_K = 11, QT_Q4_K = 12,
       QT_Q5_K = 13, QT_Q6_K = 14, QT_IQ4_NL = 20, QT_IQ4_XS = 23 };

#define QK 256
#define XMAX 32512.0f /* 255 * 127 + 127 */
#define PAR_MIN (1 << 18) /* weights (x rows) below which a matmul runs on the calling thread */
/* Software prefetch distance (bytes ahead in the weight stream; rows are contiguous, and a
 * prefetch past the end of the mapping is harmless): with the hardware prefetcher alone one core
 * streams ~6 GB/s through these kernels, with it ~9 GB/s. */
#define PF_DIST 8192
#define PREFETCH(p) _mm_prefetch((const char *)(p) + PF_DIST, _MM_HINT_T0)

static inline float h2f(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

/* acc + madd(a, b): the int16 pair products summed into int32 lanes. The AVX-512 VNNI variant (built with
 * -mavx512vnni -mavx512vl, see build.py) does it in one vpdpwssd instead of pmaddwd + paddd: the same sums, wrapping
 * alike (mod 2^32), so every integer result is bit-identical to the AVX2 build's. */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define MOESERVE_VNNI 1
static inline __m256i madd_add(__m256i acc, __m256i a, __m256i b) { return _mm256_dpwssd_epi32(acc, a, b); }
#else
static inline __m256i madd_add(__m256i acc, __m256i a, __m256i b) { return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b)); }
#endif

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

typedef struct {
    int8_t *hi, *lo; /* [K] each */
    float *s;        /* [K / 256] */
    int32_t *bsum;   /* [K / 16]: Sum(x16) per 16 values */
    float *fb;       /* [K / 32]: s * Sum(x16) per 32 values (Q4_K/Q5_K mins: one float multiply per block) */
} xq_t;

static inline int32_t hsum_i32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(s);
}

/* a thread-local buffer of at least n bytes, 64-byte aligned (grown on demand, never shrunk); NULL on failure */
static inline void *grow_bytes(void **buf, int64_t *have, int64_t n) {
    if (n > *have) {
        free(*buf);
        *buf = aligned_alloc(64, ((n + 63) / 64) * 64);
        *have = *buf ? n : 0;
    }
    return *buf;
}

#include "kernels.h"

/* quant.c, shared with moe.c */
typedef float (*dot_fn)(const uint8_t *, int64_t, const xq_t *);
void quant_row(const float *x, int64_t K, xq_t q);
int dot_multi(int qtype, const uint8_t *w, int64_t K, const xq_t *const *x, int64_t n, float *out);
dot_fn pick_dot(int qtype);

#endif
