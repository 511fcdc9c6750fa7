/* The C API of moeserve's native CPU kernels (the .c files here), for ops.cpp and the kernel files themselves.
 *
 * Every entry point takes raw pointers and a thread count and keeps no state between calls except
 * thread-local scratch buffers (each calling thread has its own): the ops in ops.cpp build the
 * structs below on their stack per call. Return codes: 0, or nonzero when the kernel declines
 * (unsupported type or shape, a bad table entry, allocation failure), as documented per function.
 */
#ifndef MOESERVE_KERNELS_H
#define MOESERVE_KERNELS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* One weight matrix of a multi-matrix product: y[m, N] = x @ W.T */
typedef struct {
    int32_t qtype, pad;
    const uint8_t *w;
    int64_t row_bytes, N;
    float *y;
} mk_mat_t;

typedef struct {
    int32_t qtype[3]; /* gate, up, down */
    int32_t pad;
    const uint8_t *base[3];
    int64_t expert_stride[3]; /* bytes from one expert's matrix to the next */
    int64_t row_bytes[3];
    int64_t n_experts, H, I;
    const float *router; /* [n_experts, H] float32 router weights (mk_moe_routed), or NULL */
    int64_t renormalize; /* top-k weights renormalised to sum to 1 (else: full-softmax probs) */
} mk_moe_t;

/* quant.c */
int mk_matmul_multi(const mk_mat_t *mats, int64_t nm, int64_t K, const float *x, int64_t m, int nthreads);
int mk_matmul(int qtype, const uint8_t *w, int64_t row_bytes, int64_t N, int64_t K, const float *x, int64_t m,
              float *y, int nthreads);
int mk_dequant(int qtype, const uint8_t *w, int64_t row_bytes, int64_t N, int64_t K, float *out, int nthreads);
int mk_gemm_f32(int qtype, const uint8_t *w, int64_t row_bytes, int64_t N, int64_t K, const float *x, int64_t m,
                float *y, int nthreads);
int mk_gemm_i16(int qtype, const uint8_t *w, int64_t row_bytes, int64_t N, int64_t K, const float *x, int64_t m,
                float *y, int nthreads);
int mk_gemm(int qtype, const uint8_t *w, int64_t row_bytes, int64_t N, int64_t K, const float *x, int64_t m,
            float *y, int nthreads);

/* attention.c */
int mk_attn_decode(const float *q, const float *k, const float *v, int64_t B, int64_t Lmax, const int64_t *lens,
                   int64_t nh, int64_t nkv, int64_t hd, float scale, int64_t window, const int64_t *table,
                   int64_t tstride, int64_t block, int64_t nslots, float *out, int nthreads);

/* moe.c */
int mk_moe(const mk_moe_t *L, int64_t T, int64_t k, const float *x, const float *w, const int64_t *ids, float *out,
           int nthreads);
int mk_moe_routed(const mk_moe_t *L, int64_t T, int64_t k, const float *x, float *w, int64_t *ids, float *out,
                  int nthreads);

/* small.c */
int mk_rms_norm(const float *x, float *o, int64_t T, int64_t n, const float *w, float eps);
int mk_norm_rope(float *x, int64_t T, int64_t nh, int64_t hd, const float *w, float eps, int64_t rope_dim, int neox,
                 const float *cos_t, const float *sin_t, const int64_t *pos);
int mk_qkv_rope(const mk_mat_t *mats, int64_t K, const float *x, int64_t T, int64_t nh, int64_t nkv, int64_t hd,
                const float *qw, const float *kw, float eps, int64_t rope_dim, int neox, const float *cos_t,
                const float *sin_t, const int64_t *pos, int nthreads);
int mk_argmax(const float *x, int64_t R, int64_t V, int64_t *out, int nthreads);

#ifdef __cplusplus
}
#endif

#endif
