/* 04_gpu.h: the GPU stage's C API, what 04_s2attn.cu (attention) and 04_layers.cu (every
 * other layer kernel) export to the C stages (05_train_gpu.c, 06_infer.c) and the GPU tests.
 *
 * Teaches: the seam between CUDA C++ and C: extern "C" functions on device pointers, bf16
 * passed as its raw uint16_t bits (C has no bf16 type), every size a size_t or int, and
 * errors in two kinds: arguments a kernel does not support are refused with -1 and one
 * sentence in last_error() (common.h: one buffer for the whole program, so the sentence
 * set in a .cu object is the one the C caller reads); CUDA and cuBLAS failures end the
 * program with file:line (CUDA_CHECK, CUBLAS_CHECK below).
 * Runs on: programs built with -DUSE_CUDA and linked with build/04_*.o (the Makefile).
 * Leaves out: streams (all work goes on the default stream), fp16.
 *
 * Shape legend: common.h's (B batch, N sequence, D model width, H heads, Hk kv heads,
 * d head dim, F ffn width, V vocab, G S2 group, R LoRA rank), and T tokens.
 */
#ifndef GPU_04_H
#define GPU_04_H

/* common.h is the helpers every stage shares; a .cu object uses a few of them, so its unused
 * ones are not reported here (the objects' own code is built with -Wunused-function). */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#include "common.h"
#pragma GCC diagnostic pop

#include <cublas_v2.h>
#include <cuda_runtime.h>

/* Every CUDA and cuBLAS call is checked; a failure ends the program with file:line. */
#define CUDA_CHECK(call)                                                                         \
    do {                                                                                         \
        cudaError_t cuda_err_ = (call);                                                          \
        CHECK(cuda_err_ == cudaSuccess, "%s failed: %s", #call, cudaGetErrorString(cuda_err_));  \
    } while (0)
#define CUBLAS_CHECK(call)                                                                       \
    do {                                                                                         \
        cublasStatus_t cublas_st_ = (call);                                                      \
        CHECK(cublas_st_ == CUBLAS_STATUS_SUCCESS, "%s failed: %s", #call,                       \
              cublasGetStatusString(cublas_st_));                                                \
    } while (0)

/* Checked device allocation: when the GPU cannot hold `what`, one sentence with the sizes.
 * (inline: not every program that includes this header allocates) */
static inline void *gpu_malloc(size_t bytes, const char *what) {
    void *p = NULL;
    cudaError_t err = cudaMalloc(&p, bytes ? bytes : 16);
    if (err != cudaSuccess) {
        size_t free_b = 0, total_b = 0;
        cudaGetLastError();
        cudaMemGetInfo(&free_b, &total_b);
        const double gib = 1024.0 * 1024.0 * 1024.0;
        die("the GPU cannot hold %s (%.2f GiB; %.2f GiB of %.2f GiB free): %s", what, (double)bytes / gib,
            (double)free_b / gib, (double)total_b / gib, cudaGetErrorString(err));
    }
    return p;
}

#ifdef __CUDACC__
/* Device code shared by the two .cu files: 8 consecutive bf16 (one 16-byte word) as fp32. A
 * bf16 is the top half of an fp32, so each is a shift or a mask of the word holding two. The
 * layer kernels (04_layers.cu load_bf16) and the decode kernel (04_s2attn.cu) unpack with it. */
__device__ __forceinline__ void bf16x8_to_float(uint4 word, float out[8]) {
    const uint32_t w[4] = {word.x, word.y, word.z, word.w};
#pragma unroll
    for (int k = 0; k < 4; k++) {
        out[2 * k] = __uint_as_float(w[k] << 16);
        out[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
    }
}
#endif

#ifdef __cplusplus
extern "C" {
#endif
/* ---------------------------------------------------------------------------------------
 * Attention (04_s2attn.cu)
 * Device pointers; work goes on the default stream.
 *   q, o, dout, dq  [B, N, H, d] bf16    k, v, dk, dv  [B, N, Hk, d] bf16
 *   lse             [B, H, N] fp32: natural log-sum-exp of each query's scores * d^-1/2
 * H % Hk == 0 (query head h uses kv head h / (H/Hk)). G == 0: causal attention; G > 0:
 * S2-Attn with group G (N % G == 0), query i of head h seeing keys s2_first_key(i, h, H, G)
 * <= j <= i (common.h). Each returns 0, or -1 with last_error() for arguments it does not
 * support; CUDA failures end the program with file:line.
 * ------------------------------------------------------------------------------------- */

/* Version 1 of the ladder, the naive kernel (a reference, not a fast path): one warp per
 * query row, fp32 throughout. o [B, N, H, d] and lse [B, H, N] are fp32. d is a multiple of
 * 32 up to 256; any H/Hk. bf16_math != 0 rounds the scores, the probabilities and the output
 * to bf16 where PyTorch's bf16 math path rounds them (the baseline the flash kernels' error
 * is measured against in tests/test_gpu_attention.c). */
int attn_forward_naive(const uint16_t *q, const uint16_t *k, const uint16_t *v, float *o, float *lse,
                       int B, int N, int H, int Hk, int d, int G, int bf16_math);

/* The flash kernels: d is 64 or 128; H/Hk <= 32. */
int attn_forward(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *o, float *lse,
                 int B, int N, int H, int Hk, int d, int G);
/* bytes of device scratch attn_backward needs for these B and N (an fp32 dQ accumulator of
 * B * H * d rows of N rounded up to 64, + row sums [B, H, N], + 256 bytes for the Hopper
 * kernel's item counter): it serves a call with B' <= B
 * sequences of N' <= N tokens, not any split of B * N tokens */
size_t attn_backward_workspace_bytes(int B, int N, int H, int d);
/* o and lse from attn_forward; dq [B, N, H, d], dk, dv [B, N, Hk, d] are overwritten. */
int attn_backward(const uint16_t *q, const uint16_t *k, const uint16_t *v, const uint16_t *o,
                  const uint16_t *dout, const float *lse, uint16_t *dq, uint16_t *dk, uint16_t *dv,
                  void *workspace, int B, int N, int H, int Hk, int d, int G);
/* Generation: q [B, H, d] (one new token per sequence) attends to keys [0, n_keys) of the
 * cache k_cache, v_cache [B, n_cap, Hk, d] (the new token's k/v already written); o [B, H, d].
 * H/Hk <= 8. */
size_t attn_decode_workspace_bytes(int B, int H, int d, int n_keys);
int attn_decode(const uint16_t *q, const uint16_t *k_cache, const uint16_t *v_cache, uint16_t *o,
                void *workspace, int B, int H, int Hk, int d, int n_cap, int n_keys);
/* Tile-shape variants of the forward and backward kernels, for tests and benchmarks (the
 * default, 0 and 0, is the fastest measured). */
void attn_tile_variants(int *n_fwd, int *n_bwd);
int attn_set_tile_variant(int fwd, int bwd);

/* ---------------------------------------------------------------------------------------
 * Layer kernels (04_layers.cu)
 * bf16 tensors are uint16_t (raw bf16 bits); all pointers are device memory unless marked host.
 * Row-major. "+=" outputs accumulate into what is there; the rest are overwritten. All run on the
 * default stream and return early, except gpu_cross_entropy and gpu_sum_squares (they wait).
 * ------------------------------------------------------------------------------------- */
void gpu_layers_free(void); /* the cuBLAS handle and workspaces */
/* C [M, N] = alpha * op(A) op(B) + beta * C; A is [M, K] ([K, M] if trans_a), B is [K, N] ([N, K]
 * if trans_b); bf16 inputs, fp32 accumulation, C bf16 or (c_fp32) fp32. */
void gpu_matmul_bf16(int trans_a, int trans_b, size_t M, size_t N, size_t K, float alpha, const uint16_t *A,
                     const uint16_t *B, float beta, void *C, int c_fp32);
void gpu_f32_to_bf16(uint16_t *dst /* [count] */, const float *src /* [count] */, size_t count);
/* x [N, D] = table [V, D] rows at tokens [N]; an id outside [0, V) gives a NaN row. */
void gpu_embedding_forward(uint16_t *x, const int32_t *tokens, const uint16_t *table, size_t N, size_t D, size_t V);
/* dtable [V, D] (fp32) += dx [N, D] scattered by tokens [N]. */
void gpu_embedding_backward(float *dtable, const int32_t *tokens, const uint16_t *dx, size_t N, size_t D, size_t V);
/* y [N, D] = x * rsqrt(mean(x^2) + eps) * w [D]; rstd [N] (may be NULL) keeps the rsqrt. */
void gpu_rmsnorm_forward(uint16_t *y, float *rstd, const uint16_t *x, const uint16_t *w, size_t N, size_t D, float eps);
/* dx [N, D] = (or += if accumulate_dx) the input gradient; dw [D] fp32 += (may be NULL);
 * rstd [N] from the forward, or NULL to recompute it with eps. */
void gpu_rmsnorm_backward(uint16_t *dx, float *dw, const uint16_t *dy, const uint16_t *x, const uint16_t *w,
                          const float *rstd, size_t N, size_t D, float eps, int accumulate_dx);
/* In place on x [N, row_stride] holding heads x d per row: rotate-half RoPE at positions
 * pos_offset + n with the frequencies inv_freq [d/2] (device, from 02's rope_inv_freq) and cos,
 * sin scaled by attention (yarn's; 1 otherwise). Backward applies the transposed rotation. */
void gpu_rope_forward(uint16_t *x, size_t N, size_t heads, size_t d, size_t row_stride, size_t pos_offset,
                      const float *inv_freq, float attention);
void gpu_rope_backward(uint16_t *dx, size_t N, size_t heads, size_t d, size_t row_stride, size_t pos_offset,
                       const float *inv_freq, float attention);
void gpu_add_bias(uint16_t *y, const uint16_t *b, size_t T, size_t out); /* y [T, out] += b [out] per row */
/* h [count] = silu(gate) * up over count elements (h may be gate or up); backward may write
 * dgate over gate and dup over up. */
void gpu_swiglu_forward(uint16_t *h, const uint16_t *gate, const uint16_t *up, size_t count);
void gpu_swiglu_backward(uint16_t *dgate, uint16_t *dup, const uint16_t *dh, const uint16_t *gate, const uint16_t *up,
                         size_t count);
void gpu_add(uint16_t *out, const uint16_t *a, const uint16_t *b, size_t count); /* out = a + b [count], may alias */
/* Chunked cross-entropy of the head: logits = h [N, D] W [V, D]^T, chunk_rows rows at a time
 * (0: 4096), targets [N] with -100 ignored. Host gets the loss sum and the count of valid targets;
 * dh [N, D] = dL/dh and dW [V, D] fp32 += dL/dW (either may be NULL), for L = dloss * mean loss. */
void gpu_cross_entropy(double *loss_sum, size_t *n_valid, uint16_t *dh, float *dW, const uint16_t *h,
                       const uint16_t *W, const int32_t *targets, size_t N, size_t D, size_t V, size_t chunk_rows,
                       float dloss);
/* Its fused row kernel on given logits [rows, V] fp32: row_loss [rows] = lse - logit[target] (0 if
 * ignored), dlogits [rows, V] bf16 (may be NULL) = (softmax - onehot) * grad_scale. */
void gpu_cross_entropy_logits(float *row_loss, uint16_t *dlogits, const float *logits, const int32_t *targets,
                              size_t rows, size_t V, float grad_scale);
/* AdamW step `step` (from 1) on fp32 param/m/v [count] with grad [count] * grad_scale; writes
 * param_bf16 [count] too. */
void gpu_adamw(float *param, uint16_t *param_bf16, const float *grad, float *m, float *v, size_t count, float lr,
               float beta1, float beta2, float eps, float weight_decay, int step, float grad_scale);
double gpu_sum_squares(const float *x /* [count] */, size_t count); /* in double, for gradient clipping */
/* LoRA: xa [T, R] = x [T, in] A [R, in]^T; y [T, out] += scaling * xa B [out, R]^T. */
void gpu_lora_forward(uint16_t *y, uint16_t *xa, const uint16_t *x, const uint16_t *A, const uint16_t *B, size_t T,
                      size_t in, size_t out, size_t R, float scaling);
/* dA [R, in] fp32 +=, dB [out, R] fp32 +=, dx [T, in] += (may be NULL), from dy [T, out]. */
void gpu_lora_backward(uint16_t *dx, float *dA, float *dB, const uint16_t *dy, const uint16_t *x, const uint16_t *xa,
                       const uint16_t *A, const uint16_t *B, size_t T, size_t in, size_t out, size_t R, float scaling);

#ifdef __cplusplus
}
#endif

#endif /* GPU_04_H */
