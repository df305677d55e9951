/* 04_layers.cu: the layer kernels of the GPU stage (everything except attention).
 *
 * Teaches: how each piece of a LLaMA layer becomes a GPU kernel for bf16 training and
 * inference, and what makes such kernels fast: they move bytes, so they read and write
 * every byte once, 16 bytes per thread at a time, and do their arithmetic in fp32.
 *   - embedding forward (a gather) and backward (a scatter-add into the fp32 gradient of
 *     the trainable table),
 *   - RMSNorm forward and backward (dx and the weight gradient), as HF LLaMA computes it:
 *     y = x * rsqrt(mean(x^2) + eps) * w, all in fp32, rounded once,
 *   - RoPE forward and backward with linear position interpolation (pos / scale), in HF's
 *     rotate-half layout, applied in place to q or k,
 *   - SwiGLU forward and backward: h = silu(gate) * up,
 *   - residual adds,
 *   - a chunked fused cross-entropy: the lm_head logits are computed a chunk of rows at a
 *     time (cuBLAS), one kernel per chunk takes max, logsumexp, the loss and writes
 *     dlogits = (softmax - onehot) * dloss / n_valid, and two more products turn them into
 *     dh (and dW for a tied head). The N x V logits never exist at once,
 *   - AdamW on fp32 master weights with fp32 moments, writing the bf16 copy in the same pass,
 *   - LoRA's low-rank path y += (alpha/r) (x A^T) B^T and its backward, as cuBLAS products,
 *   - one row-major wrapper around cublasGemmEx (bf16 in, fp32 accumulation), which the
 *     training stage also uses for the frozen base projections.
 * Runs on: NVIDIA GPUs with bf16 (sm_80 and newer), through the extern "C" API declared in
 * 04_gpu.h. Activations are bf16 [N, D] row-major; every size and offset is size_t.
 * Everything runs on the default stream and returns before the GPU is done, except the
 * functions that hand a number back to the host (they wait for it).
 * Leaves out: attention (04_s2attn.cu), dropout (LongLoRA uses none), fp16, multi-GPU.
 *
 * Inputs are trusted to be device pointers of the stated sizes; the values in them are not:
 * a token id outside [0, V) gives a NaN row (forward) and no gradient, a target outside
 * [0, V) that is not -100 gives a NaN loss, so a bad id is loud, never a stray write.
 * Floating-point sums that use atomics (the embedding and RMSNorm weight gradients, the
 * sum of squares) may differ in the last bits from run to run; the loss sum does not.
 */
#include "04_gpu.h" /* the API this file implements (and common.h) */

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <limits.h>

/* After every launch: a bad configuration shows here, a fault at the next synchronising call. */
#define LAUNCH_CHECK() CUDA_CHECK(cudaGetLastError())

/* ---------------------------------------------------------------------------------------
 * Shared pieces: the cuBLAS handle, workspaces, bf16 <-> fp32 in registers, reductions
 * ------------------------------------------------------------------------------------- */

static cublasHandle_t g_cublas = NULL;
static int g_sm_count = 0;

/* The handle every product uses. Split-K products with bf16 output may otherwise reduce
 * their partial sums in bf16, which adds a rounding of each partial sum (seen as rare
 * outliers in dh of the cross-entropy against the CPU stage); we ask for fp32 reductions. */
static cublasHandle_t cublas_handle(void) {
    if (!g_cublas) {
        CUBLAS_CHECK(cublasCreate(&g_cublas));
        CUBLAS_CHECK(cublasSetMathMode(g_cublas, (cublasMath_t)(CUBLAS_DEFAULT_MATH | CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION)));
    }
    return g_cublas;
}
static int sm_count(void) {
    if (!g_sm_count) {
        int dev;
        CUDA_CHECK(cudaGetDevice(&dev));
        CUDA_CHECK(cudaDeviceGetAttribute(&g_sm_count, cudaDevAttrMultiProcessorCount, dev));
    }
    return g_sm_count;
}

/* A device buffer that grows when a call needs more; freed by gpu_layers_free(). */
typedef struct {
    void *ptr;
    size_t bytes;
} Workspace;
static Workspace g_ce_logits, g_ce_dlogits, g_ce_rowloss, g_ce_scalars, g_lora_dxa, g_sumsq;

static void *workspace(Workspace *w, size_t bytes) {
    if (bytes > w->bytes) {
        if (w->ptr) CUDA_CHECK(cudaFree(w->ptr));
        w->ptr = NULL;
        cudaError_t err = cudaMalloc(&w->ptr, bytes);
        if (err != cudaSuccess)
            die("out of GPU memory: a %.2f GiB workspace does not fit (%s)", (double)bytes / (1u << 30), cudaGetErrorString(err));
        w->bytes = bytes;
    }
    return w->ptr;
}

static int aligned(const void *p, size_t bytes) { return ((uintptr_t)p % bytes) == 0; }
static unsigned blocks_for(size_t work, unsigned threads) {
    size_t b = (work + threads - 1) / threads, cap = (size_t)sm_count() * 16;
    if (b > cap) b = cap; /* grid-stride loops do the rest */
    return (unsigned)(b ? b : 1);
}

__device__ __forceinline__ float bf16_bits_to_f32(uint32_t bits16) { return __uint_as_float(bits16 << 16); }
__device__ __forceinline__ uint32_t f32_to_bf16_bits(float f) { return __bfloat16_as_ushort(__float2bfloat16_rn(f)); }

/* VEC consecutive bf16 to fp32: one 16-byte load when VEC == 8 (the caller checked alignment). */
template <int VEC>
__device__ __forceinline__ void load_bf16(const uint16_t *p, float *v) {
    if constexpr (VEC == 8) {
        bf16x8_to_float(*reinterpret_cast<const uint4 *>(p), v);
    } else {
#pragma unroll
        for (int k = 0; k < VEC; k++) v[k] = bf16_bits_to_f32(p[k]);
    }
}
template <int VEC>
__device__ __forceinline__ void store_bf16(uint16_t *p, const float *v) {
    if constexpr (VEC == 8) {
        uint32_t w[4];
#pragma unroll
        for (int k = 0; k < 4; k++) w[k] = f32_to_bf16_bits(v[2 * k]) | (f32_to_bf16_bits(v[2 * k + 1]) << 16);
        *reinterpret_cast<uint4 *>(p) = make_uint4(w[0], w[1], w[2], w[3]);
    } else if constexpr (VEC == 4) {
        uint32_t w0 = f32_to_bf16_bits(v[0]) | (f32_to_bf16_bits(v[1]) << 16);
        uint32_t w1 = f32_to_bf16_bits(v[2]) | (f32_to_bf16_bits(v[3]) << 16);
        *reinterpret_cast<uint2 *>(p) = make_uint2(w0, w1);
    } else {
#pragma unroll
        for (int k = 0; k < VEC; k++) p[k] = (uint16_t)f32_to_bf16_bits(v[k]);
    }
}
template <int VEC>
__device__ __forceinline__ void load_f32(const float *p, float *v) {
    if constexpr (VEC == 4) {
        float4 u = *reinterpret_cast<const float4 *>(p);
        v[0] = u.x; v[1] = u.y; v[2] = u.z; v[3] = u.w;
    } else {
#pragma unroll
        for (int k = 0; k < VEC; k++) v[k] = p[k];
    }
}
template <int VEC>
__device__ __forceinline__ void store_f32(float *p, const float *v) {
    if constexpr (VEC == 4) {
        *reinterpret_cast<float4 *>(p) = make_float4(v[0], v[1], v[2], v[3]);
    } else {
#pragma unroll
        for (int k = 0; k < VEC; k++) p[k] = v[k];
    }
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
/* Sum over the whole block; every thread gets the result. Safe to call repeatedly. */
template <typename T>
__device__ T block_sum(T v) {
    __shared__ T partial[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads(); /* the previous call's readers are done with partial[] */
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = lane < warps ? partial[lane] : (T)0;
    return warp_sum(v);
}

/* Maximum over the whole block (NaN-blind, like fmaxf); every thread gets the result. */
__device__ float block_max(float v) {
    __shared__ float partial[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = lane < warps ? partial[lane] : -INFINITY;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* ---------------------------------------------------------------------------------------
 * Row-major matrix products through cuBLAS (which is column-major)
 *
 * A row-major X [r, c] is, read column-major, X^T [c, r]. So for C = op(A) op(B) we ask
 * cuBLAS for C^T = op(B)^T op(A)^T, which it returns column-major: that is C row-major.
 * ------------------------------------------------------------------------------------- */

extern "C" void gpu_matmul_bf16(int trans_a, int trans_b, size_t M, size_t N, size_t K, float alpha,
                                const uint16_t *A /* [M, K], or [K, M] if trans_a */,
                                const uint16_t *B /* [K, N], or [N, K] if trans_b */, float beta,
                                void *C /* [M, N] bf16, or fp32 if c_fp32 */, int c_fp32) {
    if (M == 0 || N == 0) return;
    CHECK(M <= INT_MAX && N <= INT_MAX && K <= INT_MAX, "matrix product %zu x %zu x %zu exceeds cuBLAS's int sizes", M, N, K);
    int lda = (int)(trans_a ? M : K), ldb = (int)(trans_b ? K : N);
    CUBLAS_CHECK(cublasGemmEx(cublas_handle(), trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N,
                              (int)N, (int)M, (int)K, &alpha, B, CUDA_R_16BF, ldb, A, CUDA_R_16BF, lda, &beta, C,
                              c_fp32 ? CUDA_R_32F : CUDA_R_16BF, (int)N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

/* ---------------------------------------------------------------------------------------
 * fp32 -> bf16 (the bf16 working copy of fp32 master weights)
 * ------------------------------------------------------------------------------------- */

template <int VEC>
__global__ void f32_to_bf16_kernel(uint16_t *dst, const float *src, size_t count) {
    size_t stride = (size_t)gridDim.x * blockDim.x, tid = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    size_t pieces = count / VEC;
    for (size_t p = tid; p < pieces; p += stride) {
        float v[VEC];
        load_f32<VEC>(src + p * VEC, v);
        store_bf16<VEC>(dst + p * VEC, v);
    }
    for (size_t i = pieces * VEC + tid; i < count; i += stride) dst[i] = (uint16_t)f32_to_bf16_bits(src[i]);
}
extern "C" void gpu_f32_to_bf16(uint16_t *dst /* [count] */, const float *src /* [count] */, size_t count) {
    if (count == 0) return;
    if (aligned(dst, 8) && aligned(src, 16))
        f32_to_bf16_kernel<4><<<blocks_for(count / 4 + 1, 256), 256>>>(dst, src, count);
    else
        f32_to_bf16_kernel<1><<<blocks_for(count, 256), 256>>>(dst, src, count);
    LAUNCH_CHECK();
}

/* ---------------------------------------------------------------------------------------
 * Embedding: x[n] = table[token[n]]; backward dtable[token[n]] += dx[n]
 * One block per row; VEC = 8 when every row starts 16-byte aligned.
 * ------------------------------------------------------------------------------------- */

template <int VEC>
__global__ void embedding_forward_kernel(uint16_t *__restrict__ x, const int32_t *__restrict__ tokens,
                                         const uint16_t *__restrict__ table, size_t D, size_t V) {
    size_t row = blockIdx.x;
    int32_t tok = tokens[row];
    uint16_t *xr = x + row * D;
    int ok = tok >= 0 && (size_t)tok < V;
    const uint16_t *tr = table + (ok ? (size_t)tok : 0) * D;
    for (size_t c = threadIdx.x * (size_t)VEC; c < D; c += (size_t)blockDim.x * VEC) {
        float v[VEC];
        load_bf16<VEC>(tr + c, v);
        if (!ok)
            for (int k = 0; k < VEC; k++) v[k] = __int_as_float(0x7fffffff); /* NaN: the id was out of range */
        store_bf16<VEC>(xr + c, v);
    }
}
extern "C" void gpu_embedding_forward(uint16_t *x /* [N, D] */, const int32_t *tokens /* [N] */,
                                      const uint16_t *table /* [V, D] */, size_t N, size_t D, size_t V) {
    if (N == 0 || D == 0) return;
    CHECK(N <= INT_MAX, "embedding: %zu rows is too many for one launch", N);
    /* a thread per 16 bytes of the row where that fits in one block (D = 4096: 512 threads) */
    int vec = D % 8 == 0 && aligned(x, 16) && aligned(table, 16);
    size_t pieces = vec ? D / 8 : D, threads = (pieces + 31) / 32 * 32;
    if (threads > 1024) threads = 1024;
    if (vec)
        embedding_forward_kernel<8><<<(unsigned)N, (unsigned)threads>>>(x, tokens, table, D, V);
    else
        embedding_forward_kernel<1><<<(unsigned)N, (unsigned)threads>>>(x, tokens, table, D, V);
    LAUNCH_CHECK();
}

template <int VEC>
__global__ void embedding_backward_kernel(float *dtable, const int32_t *tokens, const uint16_t *dx, size_t D, size_t V) {
    size_t row = blockIdx.x;
    int32_t tok = tokens[row];
    if (tok < 0 || (size_t)tok >= V) return;
    const uint16_t *g = dx + row * D;
    float *t = dtable + (size_t)tok * D;
    for (size_t c = threadIdx.x * (size_t)VEC; c < D; c += (size_t)blockDim.x * VEC) {
        float v[VEC];
        load_bf16<VEC>(g + c, v);
        /* a token may appear many times: atomics. Hopper adds four floats in one (rows are 16-byte aligned) */
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
        constexpr bool wide = VEC % 4 == 0;
#else
        constexpr bool wide = false;
#endif
        if constexpr (wide) {
#pragma unroll
            for (int k = 0; k < VEC; k += 4) atomicAdd(reinterpret_cast<float4 *>(t + c + k), make_float4(v[k], v[k + 1], v[k + 2], v[k + 3]));
        } else {
#pragma unroll
            for (int k = 0; k < VEC; k++) atomicAdd(t + c + k, v[k]);
        }
    }
}
extern "C" void gpu_embedding_backward(float *dtable /* [V, D] += */, const int32_t *tokens /* [N] */,
                                       const uint16_t *dx /* [N, D] */, size_t N, size_t D, size_t V) {
    if (N == 0 || D == 0) return;
    CHECK(N <= INT_MAX, "embedding: %zu rows is too many for one launch", N);
    if (D % 8 == 0 && aligned(dx, 16) && aligned(dtable, 16))
        embedding_backward_kernel<8><<<(unsigned)N, 256>>>(dtable, tokens, dx, D, V);
    else
        embedding_backward_kernel<1><<<(unsigned)N, 256>>>(dtable, tokens, dx, D, V);
    LAUNCH_CHECK();
}

/* ---------------------------------------------------------------------------------------
 * RMSNorm: y = x * r * w with r = rsqrt(mean(x^2) + eps), per row, in fp32.
 * Backward, with g = w * dy:
 *   dx = r * g - x * r^3 * sum(g * x) / D
 *   dw = sum over rows of dy * x * r
 * ------------------------------------------------------------------------------------- */

template <int VEC>
__global__ void rmsnorm_forward_kernel(uint16_t *y, float *rstd, const uint16_t *x, const uint16_t *w, size_t D, float eps) {
    size_t row = blockIdx.x;
    const uint16_t *xr = x + row * D;
    float ss = 0.f;
    for (size_t c = threadIdx.x * (size_t)VEC; c < D; c += (size_t)blockDim.x * VEC) {
        float v[VEC];
        load_bf16<VEC>(xr + c, v);
#pragma unroll
        for (int k = 0; k < VEC; k++) ss += v[k] * v[k];
    }
    ss = block_sum(ss);
    float r = rsqrtf(ss / (float)D + eps);
    if (rstd && threadIdx.x == 0) rstd[row] = r;
    uint16_t *yr = y + row * D;
    for (size_t c = threadIdx.x * (size_t)VEC; c < D; c += (size_t)blockDim.x * VEC) {
        float v[VEC], wv[VEC];
        load_bf16<VEC>(xr + c, v); /* this block just read it: an L1/L2 hit */
        load_bf16<VEC>(w + c, wv);
#pragma unroll
        for (int k = 0; k < VEC; k++) v[k] = v[k] * r * wv[k];
        store_bf16<VEC>(yr + c, v);
    }
}
extern "C" void gpu_rmsnorm_forward(uint16_t *y /* [N, D] */, float *rstd /* [N] or NULL */, const uint16_t *x /* [N, D] */,
                                    const uint16_t *w /* [D] */, size_t N, size_t D, float eps) {
    if (N == 0 || D == 0) return;
    CHECK(N <= INT_MAX, "rmsnorm: %zu rows is too many for one launch", N);
    if (D % 8 == 0 && aligned(y, 16) && aligned(x, 16) && aligned(w, 16))
        rmsnorm_forward_kernel<8><<<(unsigned)N, 256>>>(y, rstd, x, w, D, eps);
    else
        rmsnorm_forward_kernel<1><<<(unsigned)N, 256>>>(y, rstd, x, w, D, eps);
    LAUNCH_CHECK();
}

/* A fixed grid of blocks walks the rows; each block keeps its share of dw in shared memory
 * (every thread owns the same columns in every row, so no two threads touch one entry) and
 * adds it to dw once at the end: N*D atomics become grid*D. */
template <int VEC>
__global__ void rmsnorm_backward_kernel(uint16_t *dx, float *dw, const uint16_t *dy, const uint16_t *x, const uint16_t *w,
                                        const float *rstd, size_t N, size_t D, float eps, int accumulate) {
    extern __shared__ float dw_block[]; /* [D] when dw != NULL */
    if (dw)
        for (size_t c = threadIdx.x; c < D; c += blockDim.x) dw_block[c] = 0.f;
    __syncthreads();
    for (size_t row = blockIdx.x; row < N; row += gridDim.x) {
        const uint16_t *xr = x + row * D, *gr = dy + row * D;
        float dot = 0.f, ss = 0.f;
        for (size_t c = threadIdx.x * (size_t)VEC; c < D; c += (size_t)blockDim.x * VEC) {
            float xv[VEC], gv[VEC], wv[VEC];
            load_bf16<VEC>(xr + c, xv);
            load_bf16<VEC>(gr + c, gv);
            load_bf16<VEC>(w + c, wv);
#pragma unroll
            for (int k = 0; k < VEC; k++) {
                dot += wv[k] * gv[k] * xv[k];
                ss += xv[k] * xv[k];
            }
        }
        dot = block_sum(dot);
        float r;
        if (rstd) r = rstd[row];
        else r = rsqrtf(block_sum(ss) / (float)D + eps);
        float coef = r * r * r * dot / (float)D;
        uint16_t *dxr = dx + row * D;
        for (size_t c = threadIdx.x * (size_t)VEC; c < D; c += (size_t)blockDim.x * VEC) {
            float xv[VEC], gv[VEC], wv[VEC], out[VEC];
            load_bf16<VEC>(xr + c, xv);
            load_bf16<VEC>(gr + c, gv);
            load_bf16<VEC>(w + c, wv);
            if (accumulate) load_bf16<VEC>(dxr + c, out);
#pragma unroll
            for (int k = 0; k < VEC; k++) {
                float d = r * wv[k] * gv[k] - coef * xv[k];
                out[k] = accumulate ? out[k] + d : d;
            }
            store_bf16<VEC>(dxr + c, out);
            if (dw) {
                if constexpr (VEC == 8) { /* 16-byte shared accesses: 2-way bank conflicts, not 8-way */
                    float4 *acc = reinterpret_cast<float4 *>(dw_block + c);
                    float4 lo = acc[0], hi = acc[1];
                    lo.x += gv[0] * xv[0] * r; lo.y += gv[1] * xv[1] * r; lo.z += gv[2] * xv[2] * r; lo.w += gv[3] * xv[3] * r;
                    hi.x += gv[4] * xv[4] * r; hi.y += gv[5] * xv[5] * r; hi.z += gv[6] * xv[6] * r; hi.w += gv[7] * xv[7] * r;
                    acc[0] = lo;
                    acc[1] = hi;
                } else {
                    for (int k = 0; k < VEC; k++) dw_block[c + k] += gv[k] * xv[k] * r;
                }
            }
        }
    }
    __syncthreads();
    if (dw)
        for (size_t c = threadIdx.x; c < D; c += blockDim.x) atomicAdd(dw + c, dw_block[c]);
}
extern "C" void gpu_rmsnorm_backward(uint16_t *dx /* [N, D], = or += */, float *dw /* [D] += , or NULL */,
                                     const uint16_t *dy /* [N, D] */, const uint16_t *x /* [N, D] */,
                                     const uint16_t *w /* [D] */, const float *rstd /* [N] from the forward, or NULL */,
                                     size_t N, size_t D, float eps, int accumulate_dx) {
    if (N == 0 || D == 0) return;
    size_t smem = dw ? D * sizeof(float) : 0;
    int vec = D % 8 == 0 && aligned(dx, 16) && aligned(dy, 16) && aligned(x, 16) && aligned(w, 16);
    void (*kernel)(uint16_t *, float *, const uint16_t *, const uint16_t *, const uint16_t *, const float *, size_t, size_t,
                   float, int) = vec ? rmsnorm_backward_kernel<8> : rmsnorm_backward_kernel<1>;
    if (smem > 48 * 1024) { /* beyond the default limit: ask for it (fails clearly past the chip's) */
        CHECK(smem <= 227 * 1024, "rmsnorm backward: D = %zu is too wide for the weight gradient in shared memory", D);
        CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    }
    /* exactly as many blocks as fit on the chip at once: one wave, each walking N / grid rows */
    int per_sm = 0;
    CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, 512, smem));
    CHECK(per_sm > 0, "rmsnorm backward: the kernel does not fit on this GPU with D = %zu", D);
    size_t grid = (size_t)per_sm * (size_t)sm_count();
    if (grid > N) grid = N;
    kernel<<<(unsigned)grid, 512, smem>>>(dx, dw, dy, x, w, rstd, N, D, eps, accumulate_dx);
    LAUNCH_CHECK();
}

/* ---------------------------------------------------------------------------------------
 * RoPE, HF rotate-half layout: for i < d/2, with angle = pos * inv_freq[i] (fp32, as HF),
 *   out_i       = (x_i * cos - x_{i+d/2} * sin) * attention
 *   out_{i+d/2} = (x_{i+d/2} * cos + x_i * sin) * attention
 * inv_freq [d/2] (device) and attention (yarn's scale, else 1) come from 02's
 * rope_inv_freq, the one place every RoPE type's frequencies are made; pos = pos_offset + n.
 * The backward is the transposed rotation (sin -> -sin, same scale). In place on [N, heads, d]
 * rows that are row_stride elements apart (q, k inside a fused qkv buffer work too).
 * Each thread owns VEC frequencies of one position and walks all heads: the sincos is
 * paid once per position and frequency, not per head.
 * ------------------------------------------------------------------------------------- */

template <int VEC>
__global__ void rope_kernel(uint16_t *x, size_t N, size_t heads, size_t d, size_t row_stride, size_t pos_offset,
                            const float *inv_freq, float attention, float sin_sign) {
    size_t half = d / 2, groups = half / VEC;
    size_t total = N * groups;
    for (size_t t = blockIdx.x * (size_t)blockDim.x + threadIdx.x; t < total; t += (size_t)gridDim.x * blockDim.x) {
        size_t n = t / groups, i0 = (t % groups) * VEC;
        float pos = (float)(pos_offset + n);
        float cs[VEC], sn[VEC];
#pragma unroll
        for (int k = 0; k < VEC; k++) {
            sincosf(pos * inv_freq[i0 + k], &sn[k], &cs[k]);
            cs[k] *= attention;
            sn[k] *= sin_sign * attention;
        }
        uint16_t *row = x + n * row_stride;
        /* two heads at a time: all four loads are issued before the first store (in place,
         * the compiler may not move a load of head h+1 above a store to head h) */
        size_t h = 0;
        for (; h + 2 <= heads; h += 2) {
            uint16_t *p[4] = {row + h * d + i0, row + h * d + i0 + half, row + (h + 1) * d + i0, row + (h + 1) * d + i0 + half};
            float v[4][VEC], o[4][VEC];
#pragma unroll
            for (int q = 0; q < 4; q++) load_bf16<VEC>(p[q], v[q]);
#pragma unroll
            for (int q = 0; q < 4; q += 2)
#pragma unroll
                for (int k = 0; k < VEC; k++) {
                    o[q][k] = v[q][k] * cs[k] - v[q + 1][k] * sn[k];
                    o[q + 1][k] = v[q + 1][k] * cs[k] + v[q][k] * sn[k];
                }
#pragma unroll
            for (int q = 0; q < 4; q++) store_bf16<VEC>(p[q], o[q]);
        }
        for (; h < heads; h++) {
            uint16_t *p1 = row + h * d + i0, *p2 = p1 + half;
            float a[VEC], b[VEC], o1[VEC], o2[VEC];
            load_bf16<VEC>(p1, a);
            load_bf16<VEC>(p2, b);
#pragma unroll
            for (int k = 0; k < VEC; k++) {
                o1[k] = a[k] * cs[k] - b[k] * sn[k];
                o2[k] = b[k] * cs[k] + a[k] * sn[k];
            }
            store_bf16<VEC>(p1, o1);
            store_bf16<VEC>(p2, o2);
        }
    }
}
static void rope(uint16_t *x, size_t N, size_t heads, size_t d, size_t row_stride, size_t pos_offset, const float *inv_freq,
                 float attention, float sin_sign) {
    if (N == 0 || heads == 0 || d == 0) return;
    CHECK(d % 2 == 0, "rope: head dim %zu is odd", d);
    CHECK(row_stride >= heads * d, "rope: row stride %zu is shorter than %zu heads of %zu", row_stride, heads, d);
    CHECK(inv_freq && attention > 0, "rope: no frequency table, or a scale (%g) that is not positive", attention);
    size_t half = d / 2;
    if (half % 8 == 0 && row_stride % 8 == 0 && aligned(x, 16))
        rope_kernel<8><<<blocks_for(N * (half / 8), 256), 256>>>(x, N, heads, d, row_stride, pos_offset, inv_freq, attention, sin_sign);
    else
        rope_kernel<1><<<blocks_for(N * half, 256), 256>>>(x, N, heads, d, row_stride, pos_offset, inv_freq, attention, sin_sign);
    LAUNCH_CHECK();
}
extern "C" void gpu_rope_forward(uint16_t *x /* [N, row_stride], heads*d used */, size_t N, size_t heads, size_t d,
                                 size_t row_stride, size_t pos_offset, const float *inv_freq /* [d/2] */, float attention) {
    rope(x, N, heads, d, row_stride, pos_offset, inv_freq, attention, 1.0f);
}
extern "C" void gpu_rope_backward(uint16_t *dx /* [N, row_stride], in place */, size_t N, size_t heads, size_t d,
                                  size_t row_stride, size_t pos_offset, const float *inv_freq /* [d/2] */, float attention) {
    rope(dx, N, heads, d, row_stride, pos_offset, inv_freq, attention, -1.0f);
}

/* y [T, out] += b [out] on every row (Qwen2's q, k, v biases). */
template <int VEC>
__global__ void add_bias_kernel(uint16_t *y, const uint16_t *b, size_t T, size_t out) {
    size_t groups = out / VEC, total = T * groups;
    for (size_t t = blockIdx.x * (size_t)blockDim.x + threadIdx.x; t < total; t += (size_t)gridDim.x * blockDim.x) {
        size_t row = t / groups, i0 = (t % groups) * VEC;
        float v[VEC], w[VEC];
        load_bf16<VEC>(y + row * out + i0, v);
        load_bf16<VEC>(b + i0, w);
#pragma unroll
        for (int k = 0; k < VEC; k++) v[k] += w[k];
        store_bf16<VEC>(y + row * out + i0, v);
    }
}
extern "C" void gpu_add_bias(uint16_t *y, const uint16_t *b, size_t T, size_t out) {
    if (T == 0 || out == 0) return;
    if (out % 8 == 0 && aligned(y, 16) && aligned(b, 16))
        add_bias_kernel<8><<<blocks_for(T * (out / 8), 256), 256>>>(y, b, T, out);
    else
        add_bias_kernel<1><<<blocks_for(T * out, 256), 256>>>(y, b, T, out);
    LAUNCH_CHECK();
}

/* ---------------------------------------------------------------------------------------
 * Elementwise: SwiGLU and the residual add. Grid-stride loops over VEC-wide pieces, then
 * the few elements past the last whole piece one at a time.
 * silu(g) = g * s with s = 1 / (1 + exp(-g));  d silu / dg = s * (1 + g * (1 - s)).
 * ------------------------------------------------------------------------------------- */

template <int VEC>
__global__ void swiglu_forward_kernel(uint16_t *h, const uint16_t *gate, const uint16_t *up, size_t count) {
    size_t stride = (size_t)gridDim.x * blockDim.x, tid = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    size_t pieces = count / VEC;
    for (size_t p = tid; p < pieces; p += stride) {
        float g[VEC], u[VEC], o[VEC];
        load_bf16<VEC>(gate + p * VEC, g);
        load_bf16<VEC>(up + p * VEC, u);
#pragma unroll
        for (int k = 0; k < VEC; k++) o[k] = g[k] / (1.0f + expf(-g[k])) * u[k];
        store_bf16<VEC>(h + p * VEC, o);
    }
    for (size_t i = pieces * VEC + tid; i < count; i += stride) {
        float g = bf16_bits_to_f32(gate[i]), u = bf16_bits_to_f32(up[i]);
        h[i] = (uint16_t)f32_to_bf16_bits(g / (1.0f + expf(-g)) * u);
    }
}
extern "C" void gpu_swiglu_forward(uint16_t *h /* [N, F] */, const uint16_t *gate /* [N, F] */, const uint16_t *up /* [N, F] */,
                                   size_t count) {
    if (count == 0) return;
    if (aligned(h, 16) && aligned(gate, 16) && aligned(up, 16))
        swiglu_forward_kernel<8><<<blocks_for(count / 8 + 1, 256), 256>>>(h, gate, up, count);
    else
        swiglu_forward_kernel<1><<<blocks_for(count, 256), 256>>>(h, gate, up, count);
    LAUNCH_CHECK();
}

__device__ __forceinline__ void swiglu_grad(float dh, float g, float u, float *dg, float *du) {
    float s = 1.0f / (1.0f + expf(-g));
    *dg = dh * u * s * (1.0f + g * (1.0f - s));
    *du = dh * g * s;
}
template <int VEC>
__global__ void swiglu_backward_kernel(uint16_t *dgate, uint16_t *dup, const uint16_t *dh, const uint16_t *gate,
                                       const uint16_t *up, size_t count) {
    size_t stride = (size_t)gridDim.x * blockDim.x, tid = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    size_t pieces = count / VEC;
    for (size_t p = tid; p < pieces; p += stride) {
        float d[VEC], g[VEC], u[VEC], dg[VEC], du[VEC];
        load_bf16<VEC>(dh + p * VEC, d);
        load_bf16<VEC>(gate + p * VEC, g);
        load_bf16<VEC>(up + p * VEC, u);
#pragma unroll
        for (int k = 0; k < VEC; k++) swiglu_grad(d[k], g[k], u[k], &dg[k], &du[k]);
        store_bf16<VEC>(dgate + p * VEC, dg);
        store_bf16<VEC>(dup + p * VEC, du);
    }
    for (size_t i = pieces * VEC + tid; i < count; i += stride) {
        float dg, du;
        swiglu_grad(bf16_bits_to_f32(dh[i]), bf16_bits_to_f32(gate[i]), bf16_bits_to_f32(up[i]), &dg, &du);
        dgate[i] = (uint16_t)f32_to_bf16_bits(dg);
        dup[i] = (uint16_t)f32_to_bf16_bits(du);
    }
}
/* dgate may be gate and dup may be up (each element is read before it is written). */
extern "C" void gpu_swiglu_backward(uint16_t *dgate /* [N, F] */, uint16_t *dup /* [N, F] */, const uint16_t *dh /* [N, F] */,
                                    const uint16_t *gate /* [N, F] */, const uint16_t *up /* [N, F] */, size_t count) {
    if (count == 0) return;
    if (aligned(dgate, 16) && aligned(dup, 16) && aligned(dh, 16) && aligned(gate, 16) && aligned(up, 16))
        swiglu_backward_kernel<8><<<blocks_for(count / 8 + 1, 256), 256>>>(dgate, dup, dh, gate, up, count);
    else
        swiglu_backward_kernel<1><<<blocks_for(count, 256), 256>>>(dgate, dup, dh, gate, up, count);
    LAUNCH_CHECK();
}

template <int VEC>
__global__ void add_kernel(uint16_t *out, const uint16_t *a, const uint16_t *b, size_t count) {
    size_t stride = (size_t)gridDim.x * blockDim.x, tid = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    size_t pieces = count / VEC;
    for (size_t p = tid; p < pieces; p += stride) {
        float x[VEC], y[VEC];
        load_bf16<VEC>(a + p * VEC, x);
        load_bf16<VEC>(b + p * VEC, y);
#pragma unroll
        for (int k = 0; k < VEC; k++) x[k] += y[k];
        store_bf16<VEC>(out + p * VEC, x);
    }
    for (size_t i = pieces * VEC + tid; i < count; i += stride)
        out[i] = (uint16_t)f32_to_bf16_bits(bf16_bits_to_f32(a[i]) + bf16_bits_to_f32(b[i]));
}
/* out = a + b (the residual add); out may be a or b. */
extern "C" void gpu_add(uint16_t *out /* [count] */, const uint16_t *a /* [count] */, const uint16_t *b /* [count] */, size_t count) {
    if (count == 0) return;
    if (aligned(out, 16) && aligned(a, 16) && aligned(b, 16))
        add_kernel<8><<<blocks_for(count / 8 + 1, 256), 256>>>(out, a, b, count);
    else
        add_kernel<1><<<blocks_for(count, 256), 256>>>(out, a, b, count);
    LAUNCH_CHECK();
}

/* ---------------------------------------------------------------------------------------
 * Cross-entropy. The fused row kernel: one block per row of logits reads the row once for
 * an online max and sum of exponentials (logsumexp), writes the row's loss, then reads it
 * again (from cache) to write dlogits = (softmax - onehot) * grad_scale in bf16.
 * ------------------------------------------------------------------------------------- */

/* Merges the running (max m, sum s of exp(x - m)) with another such pair. */
__device__ __forceinline__ void lse_merge(float &m, float &s, float m2, float s2) {
    float mx = fmaxf(m, m2);
    if (mx == -INFINITY) return; /* both empty */
    s = s * expf(m - mx) + s2 * expf(m2 - mx);
    m = mx;
}
__device__ __forceinline__ void lse_add(float &m, float &s, float x) {
    if (x > m) {
        s = s * expf(m - x) + 1.0f;
        m = x;
    } else {
        s += expf(x - m); /* a NaN x lands here and poisons s: loud */
    }
}

template <int VEC>
__global__ void cross_entropy_rows_kernel(float *row_loss, uint16_t *dlogits, const float *logits, const int32_t *targets,
                                          size_t V, float grad_scale) {
    size_t row = blockIdx.x, pieces = V / VEC;
    const float *lr = logits + row * V;
    float m = -INFINITY, s = 0.f;
    for (size_t p = threadIdx.x; p < pieces; p += blockDim.x) {
        float v[VEC];
        load_f32<VEC>(lr + p * VEC, v);
#pragma unroll
        for (int k = 0; k < VEC; k++) lse_add(m, s, v[k]);
    }
    for (size_t j = pieces * VEC + threadIdx.x; j < V; j += blockDim.x) lse_add(m, s, lr[j]);
    /* block-wide merge of the (m, s) pairs */
    __shared__ float part_m[32], part_s[32];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) lse_merge(m, s, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, s, o));
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    if (lane == 0) { part_m[warp] = m; part_s[warp] = s; }
    __syncthreads();
    m = lane < warps ? part_m[lane] : -INFINITY;
    s = lane < warps ? part_s[lane] : 0.f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) lse_merge(m, s, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, s, o));
    float lse = m + logf(s);

    int32_t t = targets[row];
    int ignored = t == -100, valid = t >= 0 && (size_t)t < V;
    if (threadIdx.x == 0) row_loss[row] = ignored ? 0.f : valid ? lse - lr[t] : __int_as_float(0x7fffffff);
    if (!dlogits) return;
    float scale = ignored ? 0.f : valid ? grad_scale : __int_as_float(0x7fffffff);
    uint16_t *dr = dlogits + row * V;
    for (size_t p = threadIdx.x; p < pieces; p += blockDim.x) {
        float v[VEC];
        load_f32<VEC>(lr + p * VEC, v);
#pragma unroll
        for (int k = 0; k < VEC; k++) v[k] = (expf(v[k] - lse) - (p * VEC + k == (size_t)t ? 1.0f : 0.0f)) * scale;
        store_bf16<VEC>(dr + p * VEC, v);
    }
    for (size_t j = pieces * VEC + threadIdx.x; j < V; j += blockDim.x)
        dr[j] = (uint16_t)f32_to_bf16_bits((expf(lr[j] - lse) - (j == (size_t)t ? 1.0f : 0.0f)) * scale);
}
/* The same for rows of up to CE_CACHED_MAX_V logits (LLaMA-2's 32000): the block holds its
 * row in registers (CE_ITEMS float4 per thread), so the row is read from memory once, not
 * twice, and with the max known first the sum needs no rescaling. */
#define CE_THREADS 1024
#define CE_ITEMS 8
#define CE_CACHED_MAX_V ((size_t)CE_THREADS * CE_ITEMS * 4)
__global__ void __launch_bounds__(CE_THREADS) cross_entropy_rows_cached_kernel(float *row_loss, uint16_t *dlogits,
                                                                              const float *logits, const int32_t *targets,
                                                                              size_t V, float grad_scale) {
    size_t row = blockIdx.x, pieces = V / 4;
    const float4 *lr = reinterpret_cast<const float4 *>(logits + row * V);
    float4 cache[CE_ITEMS];
    float m = -INFINITY;
#pragma unroll
    for (int k = 0; k < CE_ITEMS; k++) { /* every load issued before any is used */
        size_t p = threadIdx.x + (size_t)k * CE_THREADS;
        cache[k] = p < pieces ? lr[p] : make_float4(-INFINITY, -INFINITY, -INFINITY, -INFINITY);
    }
#pragma unroll
    for (int k = 0; k < CE_ITEMS; k++) m = fmaxf(m, fmaxf(fmaxf(cache[k].x, cache[k].y), fmaxf(cache[k].z, cache[k].w)));
    m = block_max(m);
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < CE_ITEMS; k++) /* padding is -inf: exp gives 0; a NaN logit makes s NaN */
        s += expf(cache[k].x - m) + expf(cache[k].y - m) + expf(cache[k].z - m) + expf(cache[k].w - m);
    s = block_sum(s);
    float lse = m + logf(s);

    int32_t t = targets[row];
    int ignored = t == -100, valid = t >= 0 && (size_t)t < V;
    if (threadIdx.x == 0) row_loss[row] = ignored ? 0.f : valid ? lse - logits[row * V + (size_t)t] : __int_as_float(0x7fffffff);
    if (!dlogits) return;
    float scale = ignored ? 0.f : valid ? grad_scale : __int_as_float(0x7fffffff);
    uint16_t *dr = dlogits + row * V;
#pragma unroll
    for (int k = 0; k < CE_ITEMS; k++) {
        size_t p = threadIdx.x + (size_t)k * CE_THREADS;
        if (p >= pieces) break;
        float v[4] = {cache[k].x, cache[k].y, cache[k].z, cache[k].w};
#pragma unroll
        for (int j = 0; j < 4; j++) v[j] = (expf(v[j] - lse) - (4 * p + j == (size_t)t ? 1.0f : 0.0f)) * scale;
        store_bf16<4>(dr + 4 * p, v);
    }
}

extern "C" void gpu_cross_entropy_logits(float *row_loss /* [rows] */, uint16_t *dlogits /* [rows, V] or NULL */,
                                         const float *logits /* [rows, V] */, const int32_t *targets /* [rows] */,
                                         size_t rows, size_t V, float grad_scale) {
    if (rows == 0) return;
    CHECK(V > 0, "cross-entropy: the vocabulary is empty");
    CHECK(rows <= INT_MAX, "cross-entropy: %zu rows is too many for one launch", rows);
    int vec = V % 4 == 0 && aligned(logits, 16) && (!dlogits || aligned(dlogits, 8));
    if (vec && V <= CE_CACHED_MAX_V)
        cross_entropy_rows_cached_kernel<<<(unsigned)rows, CE_THREADS>>>(row_loss, dlogits, logits, targets, V, grad_scale);
    else if (vec)
        cross_entropy_rows_kernel<4><<<(unsigned)rows, 512>>>(row_loss, dlogits, logits, targets, V, grad_scale);
    else
        cross_entropy_rows_kernel<1><<<(unsigned)rows, 512>>>(row_loss, dlogits, logits, targets, V, grad_scale);
    LAUNCH_CHECK();
}

/* scalars[0] (as unsigned long long) = number of targets != -100 */
__global__ void count_valid_kernel(unsigned long long *count, const int32_t *targets, size_t N) {
    unsigned long long c = 0;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < N; i += (size_t)gridDim.x * blockDim.x)
        c += targets[i] != -100;
    c = block_sum(c);
    if (threadIdx.x == 0) atomicAdd(count, c);
}
/* sum[0] = sum of x in double, one block, fixed order: the loss sum is reproducible. */
__global__ void sum_one_block_kernel(double *sum, const float *x, size_t count) {
    double acc = 0.0;
    for (size_t i = threadIdx.x; i < count; i += blockDim.x) acc += (double)x[i];
    acc = block_sum(acc);
    if (threadIdx.x == 0) *sum = acc;
}

extern "C" void gpu_cross_entropy(double *loss_sum /* host: sum over valid targets */, size_t *n_valid /* host */,
                                  uint16_t *dh /* [N, D] or NULL */, float *dW /* [V, D] += , or NULL */,
                                  const uint16_t *h /* [N, D] */, const uint16_t *W /* [V, D] */,
                                  const int32_t *targets /* [N], -100 = ignore */, size_t N, size_t D, size_t V,
                                  size_t chunk_rows, float dloss) {
    *loss_sum = 0.0;
    *n_valid = 0;
    if (N == 0) return;
    CHECK(V > 0 && D > 0, "cross-entropy: V = %zu and D = %zu must be positive", V, D);
    if (chunk_rows == 0 || chunk_rows > N) chunk_rows = N < 4096 ? N : 4096;
    int want_grad = dh || dW;
    /* workspaces: logits_chunk fp32 [chunk, V], dlogits_chunk bf16 [chunk, V], row_loss [N] */
    float *logits = (float *)workspace(&g_ce_logits, chunk_rows * V * sizeof(float));
    uint16_t *dlogits = want_grad ? (uint16_t *)workspace(&g_ce_dlogits, chunk_rows * V * sizeof(uint16_t)) : NULL;
    float *row_loss = (float *)workspace(&g_ce_rowloss, N * sizeof(float));
    unsigned long long *scalars = (unsigned long long *)workspace(&g_ce_scalars, 2 * sizeof(unsigned long long));

    CUDA_CHECK(cudaMemset(scalars, 0, sizeof(unsigned long long)));
    count_valid_kernel<<<blocks_for(N, 256), 256>>>(scalars, targets, N);
    LAUNCH_CHECK();
    unsigned long long valid = 0;
    CUDA_CHECK(cudaMemcpy(&valid, scalars, sizeof valid, cudaMemcpyDeviceToHost));
    float grad_scale = valid ? dloss / (float)valid : 0.0f;

    for (size_t r0 = 0; r0 < N; r0 += chunk_rows) {
        size_t rows = N - r0 < chunk_rows ? N - r0 : chunk_rows;
        const uint16_t *h_chunk = h + r0 * D; /* [rows, D] */
        /* logits [rows, V] = h_chunk [rows, D] W^T */
        gpu_matmul_bf16(0, 1, rows, V, D, 1.0f, h_chunk, W, 0.0f, logits, 1);
        gpu_cross_entropy_logits(row_loss + r0, dlogits, logits, targets + r0, rows, V, grad_scale);
        if (dh) /* dh_chunk [rows, D] = dlogits [rows, V] W [V, D] */
            gpu_matmul_bf16(0, 0, rows, D, V, 1.0f, dlogits, W, 0.0f, dh + r0 * D, 0);
        if (dW) /* dW [V, D] += dlogits^T [V, rows] h_chunk [rows, D] */
            gpu_matmul_bf16(1, 0, V, D, rows, 1.0f, dlogits, h_chunk, 1.0f, dW, 1);
    }
    double *sum = (double *)(scalars + 1);
    sum_one_block_kernel<<<1, 1024>>>(sum, row_loss, N);
    LAUNCH_CHECK();
    CUDA_CHECK(cudaMemcpy(loss_sum, sum, sizeof(double), cudaMemcpyDeviceToHost));
    *n_valid = (size_t)valid;
}

/* ---------------------------------------------------------------------------------------
 * AdamW (PyTorch's form), fp32 master p, fp32 moments m and v, per element:
 *   g = grad * grad_scale
 *   m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
 *   p = p (1 - lr wd) - (lr / (1 - b1^t)) m / (sqrt(v) / sqrt(1 - b2^t) + eps)
 * and the bf16 copy the forward pass reads, written in the same pass.
 * ------------------------------------------------------------------------------------- */

template <int VEC>
__global__ void adamw_kernel(float *p, uint16_t *p_bf16, const float *grad, float *m, float *v, size_t count, float beta1,
                             float beta2, float eps, float decay, float step_size, float sqrt_bc2, float grad_scale) {
    size_t stride = (size_t)gridDim.x * blockDim.x, tid = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    size_t pieces = count / VEC;
    for (size_t q = tid; q < pieces + (count - pieces * VEC); q += stride) {
        /* pieces of VEC, then the leftover elements one by one */
        size_t at = q < pieces ? q * VEC : pieces * VEC + (q - pieces);
        float pv[VEC], gv[VEC], mv[VEC], vv[VEC];
        if (q < pieces) {
            load_f32<VEC>(p + at, pv); load_f32<VEC>(grad + at, gv); load_f32<VEC>(m + at, mv); load_f32<VEC>(v + at, vv);
        } else {
            pv[0] = p[at]; gv[0] = grad[at]; mv[0] = m[at]; vv[0] = v[at];
        }
        int n = q < pieces ? VEC : 1;
#pragma unroll
        for (int k = 0; k < VEC; k++) {
            if (k >= n) break;
            float g = gv[k] * grad_scale;
            mv[k] = beta1 * mv[k] + (1.0f - beta1) * g;
            vv[k] = beta2 * vv[k] + (1.0f - beta2) * g * g;
            pv[k] = pv[k] * decay - step_size * mv[k] / (sqrtf(vv[k]) / sqrt_bc2 + eps);
        }
        if (q < pieces) {
            store_f32<VEC>(p + at, pv); store_f32<VEC>(m + at, mv); store_f32<VEC>(v + at, vv);
            if (p_bf16) store_bf16<VEC>(p_bf16 + at, pv);
        } else {
            p[at] = pv[0]; m[at] = mv[0]; v[at] = vv[0];
            if (p_bf16) p_bf16[at] = (uint16_t)f32_to_bf16_bits(pv[0]);
        }
    }
}
extern "C" void gpu_adamw(float *param /* [count] */, uint16_t *param_bf16 /* [count] or NULL */, const float *grad /* [count] */,
                          float *m /* [count] */, float *v /* [count] */, size_t count, float lr, float beta1, float beta2,
                          float eps, float weight_decay, int step, float grad_scale) {
    if (count == 0) return;
    CHECK(step >= 1, "adamw: step %d must count from 1", step);
    double bc1 = 1.0 - pow((double)beta1, step), bc2 = 1.0 - pow((double)beta2, step);
    float decay = (float)(1.0 - (double)lr * weight_decay), step_size = (float)(lr / bc1), sqrt_bc2 = (float)sqrt(bc2);
    if (aligned(param, 16) && aligned(grad, 16) && aligned(m, 16) && aligned(v, 16) && (!param_bf16 || aligned(param_bf16, 8)))
        adamw_kernel<4><<<blocks_for(count / 4 + 4, 256), 256>>>(param, param_bf16, grad, m, v, count, beta1, beta2, eps, decay,
                                                                 step_size, sqrt_bc2, grad_scale);
    else
        adamw_kernel<1><<<blocks_for(count, 256), 256>>>(param, param_bf16, grad, m, v, count, beta1, beta2, eps, decay,
                                                         step_size, sqrt_bc2, grad_scale);
    LAUNCH_CHECK();
}

/* Sum of squares in double (for the gradient norm when clipping is on). Waits for the result. */
__global__ void sum_squares_kernel(double *out, const float *x, size_t count) {
    double acc = 0.0;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < count; i += (size_t)gridDim.x * blockDim.x)
        acc += (double)x[i] * (double)x[i];
    acc = block_sum(acc);
    if (threadIdx.x == 0) atomicAdd(out, acc);
}
extern "C" double gpu_sum_squares(const float *x /* [count] */, size_t count) {
    if (count == 0) return 0.0;
    double *dev = (double *)workspace(&g_sumsq, sizeof(double)), host = 0.0;
    CUDA_CHECK(cudaMemset(dev, 0, sizeof(double)));
    sum_squares_kernel<<<blocks_for(count, 256), 256>>>(dev, x, count);
    LAUNCH_CHECK();
    CUDA_CHECK(cudaMemcpy(&host, dev, sizeof(double), cudaMemcpyDeviceToHost));
    return host;
}

/* ---------------------------------------------------------------------------------------
 * LoRA's low-rank path, as four small cuBLAS products (R is 8: the products are thin).
 *   forward:  xa = x A^T;  y += scaling * xa B^T
 *   backward: dxa = scaling * dy B;  dB += scaling * dy^T xa;  dA += dxa^T x;  dx += dxa A
 * xa and dxa are bf16 (as PEFT has them in a bf16 model); dA, dB are fp32 for the masters.
 * ------------------------------------------------------------------------------------- */

extern "C" void gpu_lora_forward(uint16_t *y /* [T, out] += */, uint16_t *xa /* [T, R] out, kept for backward */,
                                 const uint16_t *x /* [T, in] */, const uint16_t *A /* [R, in] */, const uint16_t *B /* [out, R] */,
                                 size_t T, size_t in, size_t out, size_t R, float scaling) {
    if (T == 0) return;
    gpu_matmul_bf16(0, 1, T, R, in, 1.0f, x, A, 0.0f, xa, 0);
    gpu_matmul_bf16(0, 1, T, out, R, scaling, xa, B, 1.0f, y, 0);
}

extern "C" void gpu_lora_backward(uint16_t *dx /* [T, in] += , or NULL */, float *dA /* [R, in] += */, float *dB /* [out, R] += */,
                                  const uint16_t *dy /* [T, out] */, const uint16_t *x /* [T, in] */, const uint16_t *xa /* [T, R] */,
                                  const uint16_t *A /* [R, in] */, const uint16_t *B /* [out, R] */, size_t T, size_t in, size_t out,
                                  size_t R, float scaling) {
    if (T == 0) return;
    uint16_t *dxa = (uint16_t *)workspace(&g_lora_dxa, T * R * sizeof(uint16_t)); /* [T, R] */
    gpu_matmul_bf16(0, 0, T, R, out, scaling, dy, B, 0.0f, dxa, 0);
    gpu_matmul_bf16(1, 0, out, R, T, scaling, dy, xa, 1.0f, dB, 1);
    gpu_matmul_bf16(1, 0, R, in, T, 1.0f, dxa, x, 1.0f, dA, 1);
    if (dx) gpu_matmul_bf16(0, 0, T, in, R, 1.0f, dxa, A, 1.0f, dx, 0);
}

/* Frees the cuBLAS handle and the workspaces (the next call makes them again). */
extern "C" void gpu_layers_free(void) {
    Workspace *all[] = {&g_ce_logits, &g_ce_dlogits, &g_ce_rowloss, &g_ce_scalars, &g_lora_dxa, &g_sumsq};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) {
        if (all[i]->ptr) CUDA_CHECK(cudaFree(all[i]->ptr));
        all[i]->ptr = NULL;
        all[i]->bytes = 0;
    }
    if (g_cublas) CUBLAS_CHECK(cublasDestroy(g_cublas));
    g_cublas = NULL;
}
