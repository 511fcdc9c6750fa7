#include "common.h"

/* ---------------------------------------------------------------------------------------
 * RMSNorm and the attention prologue (per-head RMSNorm, as Qwen3's q_norm / k_norm, then RoPE)
 *
 * One call replaces the ~6 small torch ops of an RMSNorm (~30 us at decode, dominated by dispatch
 * and allocation) or the ~15 of norm + RoPE; at 48 layers that is several ms of every token.
 * ------------------------------------------------------------------------------------- */

static inline void rms_row(const float *x, float *o, int64_t n, const float *w, float eps) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(x + i), acc);
    float ss = hsum8(acc);
    for (; i < n; i++) ss += x[i] * x[i];
    const float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (i = 0; i < n; i++) o[i] = x[i] * r * w[i];
}

/* o[T, n] = x * rsqrt(mean(x^2) + eps) * w, row by row (o may equal x) */
int mk_rms_norm(const float *x, float *o, int64_t T, int64_t n, const float *w, float eps) {
    for (int64_t t = 0; t < T; t++) rms_row(x + t * n, o + t * n, n, w, eps);
    return 0;
}

/* x [T, nh, hd] in place: per-head RMSNorm with w [hd] (skipped when w is NULL), then the first
 * rope_dim dims of every head rotate by the angles of the token's position (tables [P, rope_dim/2]):
 * NEOX pairs (i, i + rope_dim/2), otherwise (2i, 2i + 1). */
int mk_norm_rope(float *x, int64_t T, int64_t nh, int64_t hd, const float *w, float eps, int64_t rope_dim, int neox,
                 const float *cos_t, const float *sin_t, const int64_t *pos) {
    if (rope_dim > hd || rope_dim % 2) return -1;
    const int64_t half = rope_dim / 2;
    for (int64_t t = 0; t < T; t++) {
        const float *c = cos_t + pos[t] * half, *s = sin_t + pos[t] * half;
        for (int64_t h = 0; h < nh; h++) {
            float *v = x + (t * nh + h) * hd;
            if (w) rms_row(v, v, hd, w, eps);
            if (neox)
                for (int64_t i = 0; i < half; i++) {
                    const float a = v[i], b = v[i + half];
                    v[i] = a * c[i] - b * s[i];
                    v[i + half] = b * c[i] + a * s[i];
                }
            else
                for (int64_t i = 0; i < half; i++) {
                    const float a = v[2 * i], b = v[2 * i + 1];
                    v[2 * i] = a * c[i] - b * s[i];
                    v[2 * i + 1] = b * c[i] + a * s[i];
                }
        }
    }
    return 0;
}

/* An attention layer's prologue at decode in one call: q, k, v = x @ {Wq, Wk, Wv}.T (mk_matmul_multi;
 * mats[0..2] = q, k, v), then per-head RMSNorm (weights qw / kw, or none) and RoPE on q and k in place.
 * Saves the two separate norm + RoPE calls of every layer (~20 us each from Python). */
int mk_qkv_rope(const mk_mat_t *mats, int64_t K, const float *x, int64_t T, int64_t nh, int64_t nkv, int64_t hd,
                const float *qw, const float *kw, float eps, int64_t rope_dim, int neox, const float *cos_t,
                const float *sin_t, const int64_t *pos, int nthreads) {
    if (mats[0].N != nh * hd || mats[1].N != nkv * hd || mats[2].N != nkv * hd || rope_dim > hd || rope_dim % 2)
        return -1;
    int rc = mk_matmul_multi(mats, 3, K, x, T, nthreads);
    if (!rc) rc = mk_norm_rope(mats[0].y, T, nh, hd, qw, eps, rope_dim, neox, cos_t, sin_t, pos);
    if (!rc) rc = mk_norm_rope(mats[1].y, T, nkv, hd, kw, eps, rope_dim, neox, cos_t, sin_t, pos);
    return rc;
}

/* out[r] = index of the largest x[r, :] (the first one on ties; the first NaN if there is one), as
 * torch.argmax. Why: torch reduces one 151936-wide row on one thread in ~150 us; this takes ~15. */
int mk_argmax(const float *x, int64_t R, int64_t V, int64_t *out, int nthreads) {
    if (V < 1) return -1;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1 && R > 1)
    for (int64_t r = 0; r < R; r++) {
        const float *row = x + r * V;
        __m256 vmax = _mm256_set1_ps(-INFINITY), vnan = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 8 <= V; i += 8) {
            const __m256 v = _mm256_loadu_ps(row + i);
            vmax = _mm256_max_ps(vmax, v);
            vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        }
        float mx = -INFINITY, lanes[8];
        int nan = _mm256_movemask_ps(vnan) != 0;
        _mm256_storeu_ps(lanes, vmax);
        for (int l = 0; l < 8; l++) mx = lanes[l] > mx ? lanes[l] : mx;
        for (; i < V; i++) {
            nan |= row[i] != row[i];
            mx = row[i] > mx ? row[i] : mx;
        }
        int64_t best = 0;
        for (int64_t j = 0; j < V; j++)
            if (nan ? row[j] != row[j] : row[j] == mx) {
                best = j;
                break;
            }
        out[r] = best;
    }
    return 0;
}
