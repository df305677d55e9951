/* 04_s2attn.cu: attention on the GPU. Flash attention forward and backward (causal, bf16 in
 * and out, fp32 accumulation), S2-Attn as the same kernels with per-head segment bounds, and
 * decode attention (one new token against a long KV cache) split over the key axis.
 *
 * Teaches: how flash attention is laid out on tensor cores without a library, starting from
 * the naive kernel it replaces (version 1 of the ladder below: one warp per query row, fp32;
 * the reference the tests check the fast versions against). Each flash kernel
 * is written with mma.sync m16n8k16 (bf16 in, fp32 accumulate), ldmatrix from XOR-swizzled
 * shared memory, cp.async double buffering of the tiles that stream, an online softmax in
 * base 2 (exp2 with log2(e) folded into the scale), and tile skipping: a tile whose keys are
 * all outside every query's window [s2_first_key(i), i] is never loaded, and the mask is
 * applied only on tiles that straddle a window edge. S2-Attn needs no roll, copy or padding:
 * the window comes from s2_first_key (common.h), so its cost follows the segment length.
 * On Hopper (code built for sm_90a) the forward and the backward run second versions of the
 * same kernels on warpgroup MMAs (wgmma), the tensor cores' asynchronous Hopper instruction,
 * which reads its operands straight from shared memory through descriptors; the Hopper
 * forward is warp-specialised: a producer warpgroup copies K and V with the tensor memory
 * accelerator (TMA) into a ring of shared-memory stages guarded by mbarriers, and two
 * consumer warpgroups overlap one tile's softmax with the next tile's products. The backward
 * has the same warp-specialised form and is persistent (version 3b: one block an SM walks
 * the key blocks in grid order, the next one's tiles loading while one ends; the Hopper
 * default adds each tile's dQ into the fp32 accumulator with one bulk tensor reduce-add per
 * warpgroup).
 * Runs on: NVIDIA GPUs with bf16 tensor cores (sm_80 and later; the Makefile builds sm_80 and
 * sm_90a code).
 * Leaves out: a persistent forward, dropout,
 * non-causal attention, head dims other than 64 and 128 in the flash kernels, fp16, a naive
 * backward.
 *
 * Layout (every buffer row-major; bf16 passed as its raw uint16_t bits):
 *   q, o, dout, dq  [B, N, H, d]     as the q/o projections produce them
 *   k, v, dk, dv    [B, N, Hk, d]    query head h uses kv head h / (H / Hk)
 *   lse             [B, H, N] fp32   natural log-sum-exp of query i's scaled scores
 *   KV cache        [B, n_cap, Hk, d] for decoding; the new query q is [B, H, d]
 * The program built from this file with -DS2ATTN_MAIN (`make 04_s2attn`) runs the benchmark
 * (--bench [--d 64]) and the tile-shape sweep (--variants); the kernel checks are tests/test_gpu_attention.c.
 */
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cudaTypedefs.h> /* CUtensorMap and the driver's cuTensorMapEncodeTiled type (found at run time) */
#include <float.h>
#include <stdint.h>
#include <type_traits> /* std::true_type / false_type: a compile-time flag for a lambda */

#include "04_gpu.h" /* the API this file implements (and common.h) */

typedef __nv_bfloat16 bf16;

#define LAUNCH_OK() CUDA_CHECK(cudaGetLastError())

static const float LOG2E = 1.4426950408889634f;
static const float LN2 = 0.6931471805599453f;

/* =======================================================================================
 * The ladder, version 1: naive attention (llm.c's dev/cuda habit: the simplest kernel that
 * is right comes first, is checked against the CPU stage, and then checks the fast ones).
 *   version 1  attn_forward_naive (here): one warp per query row, fp32 on CUDA cores;
 *   version 2  flash_fwd_kernel (below): a tile of queries per block, K/V tiles through
 *              shared memory, mma.sync tensor cores, online softmax over tiles;
 *   version 3  flash_fwd_wgmma_kernel (below): version 2 on Hopper's warpgroup MMA;
 *   version 3b flash_fwd_tma_kernel (below): version 3 with a TMA producer warpgroup and the
 *              next tile's S overlapping the softmax (the Hopper default).
 * The backward climbs the same ladder: flash_bwd_kernel (2), flash_bwd_wgmma_kernel (3),
 * flash_bwd_tma_kernel (3b).
 * tests/test_gpu_attention.c checks version 1 against 02_model.c's attention_forward (fp32)
 * and then versions 2, 3 and 3b against version 1 on sizes the CPU reference is too slow for,
 * printing each one's time.
 * ===================================================================================== */

/* Which arguments every attention entry point needs (the head dim and GQA limits are each
 * version's own): positive sizes that fit the grid, whole GQA groups, S2 groups dividing N.
 * 0, or -1 with the sentence in last_error(). */
static int check_attn_args(int B, int N, int H, int Hk, int G) {
    if (B <= 0 || N <= 0 || H <= 0 || Hk <= 0) return set_error("attention: B=%d N=%d H=%d Hk=%d must all be positive", B, N, H, Hk);
    if (H % Hk != 0) return set_error("attention: H=%d is not a multiple of Hk=%d", H, Hk);
    if (H > 65535 || Hk > 65535 || B > 65535) return set_error("attention: B=%d or H=%d is too large for the grid", B, H);
    if (G < 0 || (G > 0 && N % G != 0)) return set_error("attention: S2 group %d does not divide N=%d", G, N);
    return 0;
}

#define NAIVE_MAX_D 256     /* head dims up to this, in multiples of 32 (one column per lane per step) */
#define NAIVE_ROWS_PER_BLOCK 4 /* warps per block, one query row each */

__device__ __forceinline__ float warp_sum(float x) { /* every lane ends with the same sum */
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
    return x;
}
__device__ __forceinline__ float round_to_bf16(float x) { return __bfloat162float(__float2bfloat16(x)); }

/* Warp (row i, head h, batch b). Lane `lane` holds columns lane, lane+32, ... of q_i and of
 * its share of o_i. For each key j of the window the lanes multiply their columns of q_i and
 * k_j and warp_sum adds the 32 partial dot products: s_j = q_i . k_j / sqrt(d).
 *   pass 1: m = max_j s_j and l = sum_j exp(s_j - m), kept as a running pair (when a larger
 *           score arrives, the sum so far is rescaled by exp(old m - new m)); lse = m + ln l;
 *   pass 2: o_i = sum_j (exp(s_j - m) / l) v_j, the scores computed again.
 * Two passes keep the probabilities final before they multiply V, so bf16_math can round
 * them as PyTorch's bf16 math path does. Every K and V row of the window is read from global
 * memory by every query row (twice): that traffic is what the flash kernels' tiles remove. */
__global__ void __launch_bounds__(NAIVE_ROWS_PER_BLOCK * 32)
naive_attn_fwd_kernel(const bf16 *__restrict__ Q, /* [B, N, H, d] */
                      const bf16 *__restrict__ K, /* [B, N, Hk, d] */
                      const bf16 *__restrict__ V, /* [B, N, Hk, d] */
                      float *__restrict__ O,      /* [B, N, H, d] */
                      float *__restrict__ LSE,    /* [B, H, N] */
                      int N, int H, int Hk, int d, int G, float scale, int bf16_math) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int i = blockIdx.x * NAIVE_ROWS_PER_BLOCK + warp, h = blockIdx.y, b = blockIdx.z;
    if (i >= N) return; /* the whole warp leaves together */
    const int kh = h / (H / Hk), cols = d / 32; /* columns per lane */
    const size_t kv_stride = (size_t)Hk * d;    /* from key row j to j+1 */
    const bf16 *q = Q + (((size_t)b * N + i) * H + h) * d;
    const bf16 *Kb = K + (size_t)b * N * kv_stride + (size_t)kh * d;
    const bf16 *Vb = V + (size_t)b * N * kv_stride + (size_t)kh * d;
    float q_reg[NAIVE_MAX_D / 32], o_acc[NAIVE_MAX_D / 32];
#pragma unroll
    for (int t = 0; t < NAIVE_MAX_D / 32; t++) {
        q_reg[t] = t < cols ? __bfloat162float(q[lane + 32 * t]) : 0.f;
        o_acc[t] = 0.f;
    }
    const int first = (int)s2_first_key((size_t)i, h, H, (size_t)G); /* keys first..i */
    auto score = [&](int j) {
        const bf16 *kj = Kb + (size_t)j * kv_stride;
        float part = 0.f;
#pragma unroll
        for (int t = 0; t < NAIVE_MAX_D / 32; t++)
            if (t < cols) part += q_reg[t] * __bfloat162float(kj[lane + 32 * t]);
        const float s = warp_sum(part) * scale;
        return bf16_math ? round_to_bf16(s) : s;
    };
    float m = -INFINITY, l = 0.f; /* pass 1: running max and sum of exp */
    for (int j = first; j <= i; j++) {
        const float s = score(j);
        if (s > m) { l = l * expf(m - s) + 1.f; m = s; }
        else l += expf(s - m);
    }
    for (int j = first; j <= i; j++) { /* pass 2: the probability-weighted sum of V */
        float p = expf(score(j) - m) / l;
        if (bf16_math) p = round_to_bf16(p);
        const bf16 *vj = Vb + (size_t)j * kv_stride;
#pragma unroll
        for (int t = 0; t < NAIVE_MAX_D / 32; t++)
            if (t < cols) o_acc[t] += p * __bfloat162float(vj[lane + 32 * t]);
    }
    float *o = O + (((size_t)b * N + i) * H + h) * d;
#pragma unroll
    for (int t = 0; t < NAIVE_MAX_D / 32; t++)
        if (t < cols) o[lane + 32 * t] = bf16_math ? round_to_bf16(o_acc[t]) : o_acc[t];
    if (lane == 0) LSE[((size_t)b * H + h) * N + i] = m + logf(l);
}

extern "C" int attn_forward_naive(const uint16_t *q, const uint16_t *k, const uint16_t *v, float *o, float *lse,
                                  int B, int N, int H, int Hk, int d, int G, int bf16_math) {
    if (check_attn_args(B, N, H, Hk, G) != 0) return -1;
    if (d <= 0 || d % 32 != 0 || d > NAIVE_MAX_D)
        return set_error("attention (naive): head dim %d is not supported (a multiple of 32 up to %d)", d, NAIVE_MAX_D);
    dim3 grid((unsigned)((N + NAIVE_ROWS_PER_BLOCK - 1) / NAIVE_ROWS_PER_BLOCK), (unsigned)H, (unsigned)B);
    naive_attn_fwd_kernel<<<grid, NAIVE_ROWS_PER_BLOCK * 32>>>((const bf16 *)q, (const bf16 *)k, (const bf16 *)v, o, lse, N, H, Hk, d,
                                                               G, 1.f / sqrtf((float)d), bf16_math);
    LAUNCH_OK();
    return 0;
}

/* ---------------------------------------------------------------------------------------
 * Tensor-core and copy primitives (inline PTX, sm_80+)
 * ------------------------------------------------------------------------------------- */

__device__ __forceinline__ uint32_t smem_addr(const void *p) { return (uint32_t)__cvta_generic_to_shared(p); }

/* 16-byte asynchronous copy global -> shared; when !valid the 16 bytes are zero-filled. */
__device__ __forceinline__ void cp_async16(uint32_t dst, const void *src, bool valid) {
    int bytes = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}
/* 4 bytes, zero-filled where !valid (src must still be a mapped address) */
__device__ __forceinline__ void cp_async4(uint32_t dst, const void *src, bool valid) {
    const int bytes = valid ? 4 : 0;
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int n> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(n)); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
/* c[16x8] += a[16x16] * b[16x8]; the fragment layouts are the PTX ISA's for m16n8k16. */
__device__ __forceinline__ void mma_bf16(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi); /* lo goes to the lower address */
    return *(uint32_t *)&v;
}
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

/* Shared-memory tiles hold rows of W bf16 (W = 64 or 128: 8 or 16 chunks of 16 bytes). The
 * chunk index is XORed with (row & 7), so the 8 rows that one ldmatrix phase reads at the
 * same logical chunk land in 8 different bank groups: no conflicts, no padding. */
template <int W> __device__ __forceinline__ uint32_t swz(uint32_t base, int row, int chunk) {
    return base + (uint32_t)(row * (W * 2) + ((chunk ^ (row & 7)) << 4));
}

/* Starts the copy of ROWS rows x D columns (rows r0.. of a [N, row_stride] matrix) into a
 * swizzled tile; rows at or past N are zero-filled. */
template <int D, int ROWS, int NTHR, bool CHECK_ROWS = true>
__device__ __forceinline__ void load_tile_async(uint32_t tile, const bf16 *src, size_t row_stride, int r0, int N, int tid) {
    constexpr int CH = D / 8, ROWS_PER_PASS = NTHR / CH;
    static_assert(NTHR % CH == 0 && ROWS % ROWS_PER_PASS == 0, "copy shape");
    const int ch = tid % CH, row0 = tid / CH; /* each thread copies one 16-byte column chunk */
    const bf16 *p = src + (size_t)(r0 + row0) * row_stride + (size_t)ch * 8;
    const uint32_t dst = swz<D>(tile, row0, ch); /* (row & 7) is the same in every pass */
#pragma unroll
    for (int pass = 0; pass < ROWS / ROWS_PER_PASS; pass++) {
        const int row = row0 + pass * ROWS_PER_PASS;
        const bool valid = !CHECK_ROWS || r0 + row < N;
        cp_async16(dst + pass * ROWS_PER_PASS * D * 2, valid ? p + (size_t)pass * ROWS_PER_PASS * row_stride : src, valid);
    }
}

/* ---------------------------------------------------------------------------------------
 * Flash attention forward
 * One block = BM queries of one (batch, head); NW warps, each owning BM/NW query rows (MT
 * m16 tiles). K/V tiles of BN keys stream through two shared-memory buffers while the
 * previous tile is multiplied. Tiles are visited from the diagonal downwards.
 * ------------------------------------------------------------------------------------- */
template <int D, int BM, int BN, int NW>
__global__ void __launch_bounds__(NW * 32, NW <= 4 ? 2 : 1)
flash_fwd_kernel(const bf16 *__restrict__ Q,  /* [B, N, H, d] */
                 const bf16 *__restrict__ K,  /* [B, N, Hk, d] */
                 const bf16 *__restrict__ V,  /* [B, N, Hk, d] */
                 bf16 *__restrict__ O,        /* [B, N, H, d] */
                 float *__restrict__ LSE,     /* [B, H, N] */
                 int N, int H, int Hk, int G, float scale_log2) {
    constexpr int MT = BM / (16 * NW); /* m16 tiles per warp */
    constexpr int NTHR = NW * 32;
    static_assert(BM % (16 * NW) == 0 && BN % 16 == 0 && (D == 64 || D == 128), "tile shape");
    extern __shared__ __align__(128) unsigned char smem[];
    const uint32_t sQ = smem_addr(smem);                 /* [BM, D] */
    const uint32_t sK = sQ + BM * D * 2;                 /* [2, BN, D] */
    const uint32_t sV = sK + 2 * BN * D * 2;             /* [2, BN, D] */

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3; /* mma fragment row group and column pair */
    const int m_block = gridDim.x - 1 - blockIdx.x; /* longest rows first */
    const int h = blockIdx.y, b = blockIdx.z;
    const int kh = h / (H / Hk);
    const size_t q_stride = (size_t)H * D, kv_stride = (size_t)Hk * D;
    const bf16 *Qb = Q + (size_t)b * N * q_stride + (size_t)h * D;
    const bf16 *Kb = K + (size_t)b * N * kv_stride + (size_t)kh * D;
    const bf16 *Vb = V + (size_t)b * N * kv_stride + (size_t)kh * D;

    const int m0 = m_block * BM;
    const int m_last = min(m0 + BM, N) - 1;
    const int key_lo = (int)s2_first_key((size_t)m0, h, H, (size_t)G);  /* window start of the first row */
    const int fk_last = (int)s2_first_key((size_t)m_last, h, H, (size_t)G);
    const int tile_lo = key_lo / BN, tile_hi = m_last / BN;
    const int n_tiles = tile_hi - tile_lo + 1;

    /* this warp's rows: the first, its window start, the last */
    const int wrow0 = m0 + warp * 16 * MT; /* first row of this warp */
    const int warp_fk0 = (int)s2_first_key((size_t)wrow0, h, H, (size_t)G);
    const int warp_row_last = wrow0 + 16 * MT - 1;

    load_tile_async<D, BM, NTHR>(sQ, Qb, q_stride, m0, N, tid);
    load_tile_async<D, BN, NTHR>(sK, Kb, kv_stride, tile_hi * BN, N, tid);
    load_tile_async<D, BN, NTHR>(sV, Vb, kv_stride, tile_hi * BN, N, tid);
    cp_async_commit();

    float o_acc[MT][D / 8][4];
    float m_run[MT][2], l_run[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
#pragma unroll
        for (int dn = 0; dn < D / 8; dn++)
#pragma unroll
            for (int e = 0; e < 4; e++) o_acc[mt][dn][e] = 0.f;
        m_run[mt][0] = m_run[mt][1] = -INFINITY;
        l_run[mt][0] = l_run[mt][1] = 0.f;
    }
    uint32_t q_frag[MT == 1 ? D / 16 : 1][4]; /* with one m-tile per warp, Q stays in registers */

    for (int it = 0; it < n_tiles; it++) {
        const int tile = tile_hi - it, n0 = tile * BN, buf = it & 1;
        /* one barrier per tile: it publishes tile `it` and tells that every warp is done
         * with tile it-1, whose buffer the next copy then refills while this tile is used */
        cp_async_wait<0>();
        __syncthreads();
        if (it + 1 < n_tiles) {
            /* tiles below the first one lie wholly before row N: no row test */
            load_tile_async<D, BN, NTHR, false>(sK + (buf ^ 1) * BN * D * 2, Kb, kv_stride, (tile - 1) * BN, N, tid);
            load_tile_async<D, BN, NTHR, false>(sV + (buf ^ 1) * BN * D * 2, Vb, kv_stride, (tile - 1) * BN, N, tid);
        }
        cp_async_commit();
        if (MT == 1 && it == 0) {
#pragma unroll
            for (int kc = 0; kc < D / 16; kc++) ldmatrix_x4(q_frag[kc], swz<D>(sQ, warp * 16 + (lane & 15), kc * 2 + (lane >> 4)));
        }
        const uint32_t kt = sK + buf * BN * D * 2, vt = sV + buf * BN * D * 2;
        /* a warp whose rows all lie outside this tile's keys has nothing to do here */
        const bool warp_active = n0 <= warp_row_last && n0 + BN - 1 >= warp_fk0;
        if (warp_active) {
            /* S = Q K^T for this warp's rows: [16*MT, BN] */
            float s[MT][BN / 8][4];
#pragma unroll
            for (int mt = 0; mt < MT; mt++)
#pragma unroll
                for (int nt = 0; nt < BN / 8; nt++)
#pragma unroll
                    for (int e = 0; e < 4; e++) s[mt][nt][e] = 0.f;
#pragma unroll
            for (int kc = 0; kc < D / 16; kc++) {
                uint32_t a[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    if (MT == 1) {
#pragma unroll
                        for (int e = 0; e < 4; e++) a[mt][e] = q_frag[MT == 1 ? kc : 0][e];
                    } else {
                        ldmatrix_x4(a[mt], swz<D>(sQ, warp * 16 * MT + mt * 16 + (lane & 15), kc * 2 + (lane >> 4)));
                    }
                }
#pragma unroll
                for (int np = 0; np < BN / 16; np++) {
                    uint32_t bk[4];
                    ldmatrix_x4(bk, swz<D>(kt, np * 16 + (lane & 7) + ((lane >> 4) << 3), kc * 2 + ((lane >> 3) & 1)));
#pragma unroll
                    for (int mt = 0; mt < MT; mt++) {
                        mma_bf16(s[mt][2 * np], a[mt], bk[0], bk[1]);
                        mma_bf16(s[mt][2 * np + 1], a[mt], bk[2], bk[3]);
                    }
                }
            }
            /* mask, online softmax and O += P V, compiled twice (masked: std::true_type) so that
             * the tiles inside every row's window, most of them, run straight-line code: no
             * branch between the exponentials and the products, which ptxas then interleaves
             * (bench/NOTES.md step 22) */
            auto softmax_pv = [&](auto masked) {
                if (decltype(masked)::value) {
                    int row_fk[MT][2]; /* window starts: computed here, not held in registers over the loop */
#pragma unroll
                    for (int mt = 0; mt < MT; mt++)
#pragma unroll
                        for (int hf = 0; hf < 2; hf++) row_fk[mt][hf] = (int)s2_first_key((size_t)(wrow0 + mt * 16 + g + 8 * hf), h, H, (size_t)G);
#pragma unroll
                    for (int mt = 0; mt < MT; mt++)
#pragma unroll
                        for (int nt = 0; nt < BN / 8; nt++)
#pragma unroll
                            for (int e = 0; e < 4; e++) {
                                int row = wrow0 + mt * 16 + g + 8 * (e >> 1), col = n0 + nt * 8 + 2 * t + (e & 1);
                                if (col > row || col < row_fk[mt][e >> 1]) s[mt][nt][e] = -INFINITY;
                            }
                }
                /* online softmax in base 2: m is kept in scaled units */
#pragma unroll
                for (int mt = 0; mt < MT; mt++)
#pragma unroll
                    for (int hf = 0; hf < 2; hf++) {
                        float mx = -INFINITY;
#pragma unroll
                        for (int nt = 0; nt < BN / 8; nt++) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * hf], s[mt][nt][2 * hf + 1]));
                        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                        float m_new = fmaxf(m_run[mt][hf], mx * scale_log2);
                        float base = m_new == -INFINITY ? 0.f : m_new;
                        float alpha = fast_exp2(m_run[mt][hf] - base);
                        m_run[mt][hf] = m_new;
                        float rs = 0.f;
#pragma unroll
                        for (int nt = 0; nt < BN / 8; nt++)
#pragma unroll
                            for (int e = 0; e < 2; e++) {
                                float p = fast_exp2(fmaf(s[mt][nt][2 * hf + e], scale_log2, -base));
                                s[mt][nt][2 * hf + e] = p;
                                rs += p;
                            }
                        l_run[mt][hf] = l_run[mt][hf] * alpha + rs;
#pragma unroll
                        for (int dn = 0; dn < D / 8; dn++) { /* always: a vote and a branch here cost more */
                            o_acc[mt][dn][2 * hf] *= alpha;
                            o_acc[mt][dn][2 * hf + 1] *= alpha;
                        }
                    }
                /* O += P V: P goes from accumulator layout straight into A fragments */
#pragma unroll
                for (int kc = 0; kc < BN / 16; kc++) {
                    uint32_t a[MT][4];
#pragma unroll
                    for (int mt = 0; mt < MT; mt++) {
                        a[mt][0] = pack_bf16(s[mt][2 * kc][0], s[mt][2 * kc][1]);
                        a[mt][1] = pack_bf16(s[mt][2 * kc][2], s[mt][2 * kc][3]);
                        a[mt][2] = pack_bf16(s[mt][2 * kc + 1][0], s[mt][2 * kc + 1][1]);
                        a[mt][3] = pack_bf16(s[mt][2 * kc + 1][2], s[mt][2 * kc + 1][3]);
                    }
#pragma unroll
                    for (int dp = 0; dp < D / 16; dp++) {
                        uint32_t bv[4];
                        ldmatrix_x4_trans(bv, swz<D>(vt, kc * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, dp * 2 + (lane >> 4)));
#pragma unroll
                        for (int mt = 0; mt < MT; mt++) {
                            mma_bf16(o_acc[mt][2 * dp], a[mt], bv[0], bv[1]);
                            mma_bf16(o_acc[mt][2 * dp + 1], a[mt], bv[2], bv[3]);
                        }
                    }
                }
            };
            /* mask only where the tile straddles a window edge */
            if (n0 + BN - 1 > wrow0 || n0 < fk_last) softmax_pv(std::true_type{});
            else softmax_pv(std::false_type{});
        }
    }

    /* epilogue: normalise, write LSE, stage O through shared memory for 16-byte stores (into
     * this warp's own Q rows: once all its lanes are past their last ldmatrix of them) */
    __syncwarp();
    float *lse_row = LSE + ((size_t)b * H + h) * N;
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int hf = 0; hf < 2; hf++) {
            float l = l_run[mt][hf];
            l += __shfl_xor_sync(0xffffffffu, l, 1);
            l += __shfl_xor_sync(0xffffffffu, l, 2);
            float inv = l > 0.f ? 1.f / l : 0.f;
            int row_local = warp * 16 * MT + mt * 16 + g + 8 * hf;
            if (t == 0 && m0 + row_local < N) lse_row[m0 + row_local] = (m_run[mt][hf] + log2f(l)) * LN2;
#pragma unroll
            for (int dn = 0; dn < D / 8; dn++) {
                uint32_t v = pack_bf16(o_acc[mt][dn][2 * hf] * inv, o_acc[mt][dn][2 * hf + 1] * inv);
                asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(swz<D>(sQ, row_local, dn) + 4 * t), "r"(v));
            }
        }
    __syncthreads();
    bf16 *Ob = O + (size_t)b * N * q_stride + (size_t)h * D;
    const unsigned char *sQp = smem;
    for (int c = tid; c < BM * D / 8; c += NTHR) {
        int row = c / (D / 8), ch = c % (D / 8);
        if (m0 + row < N)
            *(uint4 *)(Ob + (size_t)(m0 + row) * q_stride + ch * 8) = *(const uint4 *)(sQp + (swz<D>(0, row, ch)));
    }
}

/* ---------------------------------------------------------------------------------------
 * Flash attention forward on Hopper's warpgroup MMA (wgmma, sm_90a only)
 * The same algorithm as flash_fwd_kernel, with the two products issued as asynchronous
 * warpgroup MMAs: each of the two warpgroups owns 64 query rows; S = Q K^T takes Q from
 * registers and K from shared memory, O += P V takes P from registers and V from shared
 * memory (read N-major, i.e. transposed by the tensor core). K and V tiles are stored in the
 * hardware's 128-byte-swizzle layout: [d/64 atoms][rows][64], row r's 16-byte chunk c at
 * chunk (c ^ (r & 7)), tile base 1024-byte aligned, described to the MMA by a 64-bit
 * descriptor (start address, leading / stride byte offsets, swizzle mode).
 * ------------------------------------------------------------------------------------- */
template <int TRANS_B>
__device__ __forceinline__ void wgmma_m64n64k16(float d[8][4], const uint32_t a[4], uint64_t desc_b, int accumulate) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, {%32,%33,%34,%35}, %36, p, 1, 1, %38;\n}\n"
                 : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate), "n"(TRANS_B));
}
template <int TRANS_B>
__device__ __forceinline__ void wgmma_m64n128k16(float d[16][4], const uint32_t a[4], uint64_t desc_b, int accumulate) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, {%64,%65,%66,%67}, %68, p, 1, 1, %70;\n}\n"
                 : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]), "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]), "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate), "n"(TRANS_B));
}

/* shared-memory matrix descriptor, 128-byte swizzle (PTX ISA, "matrix descriptor") */
__device__ __forceinline__ uint64_t wgmma_desc(uint32_t addr, uint32_t lead_bytes, uint32_t stride_bytes) {
    return (uint64_t)((addr >> 4) & 0x3FFF) | ((uint64_t)((lead_bytes >> 4) & 0x3FFF) << 16) |
           ((uint64_t)((stride_bytes >> 4) & 0x3FFF) << 32) | (1ull << 62);
}
/* the descriptor of addr + bytes from addr's: its low 14 bits are addr >> 4, and a shared
 * address stays under 2^18, so the sum never carries out of that field. One add of the low
 * word per product, where building each descriptor anew took ~5 uniform instructions
 * (bench/NOTES.md step 13). */
__device__ __forceinline__ uint64_t desc_plus(uint64_t desc, uint32_t bytes) {
    return (desc & 0xFFFFFFFF00000000ull) | (uint32_t)((uint32_t)desc + (bytes >> 4));
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
/* waits until at most N committed groups of this warpgroup are still running */
template <int N> __device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }
/* The compiler sees a wgmma's accumulators as written when it is issued; this empty asm
 * pins them after wgmma.wait (and pins A fragments before wgmma.fence), so no read or
 * write of them moves across the asynchronous window. */
template <int R, int C> __device__ __forceinline__ void pin_regs(float (&x)[R][C]) {
#pragma unroll
    for (int i = 0; i < R; i++)
#pragma unroll
        for (int j = 0; j < C; j++) asm volatile("" : "+f"(x[i][j])::"memory");
}
template <int R, int C> __device__ __forceinline__ void pin_regs(uint32_t (&x)[R][C]) {
#pragma unroll
    for (int i = 0; i < R; i++)
#pragma unroll
        for (int j = 0; j < C; j++) asm volatile("" : "+r"(x[i][j])::"memory");
}
/* makes this thread's generic-proxy writes to shared memory (cp.async) visible to wgmma */
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

/* Starts the copy of ROWS x D (rows r0..) into the 128B-swizzle atom layout; rows >= N zero. */
template <int D, int ROWS, int NTHR>
__device__ __forceinline__ void load_tile_atoms_async(uint32_t tile, const bf16 *src, size_t row_stride, int r0, int N, int tid) {
    constexpr int CH = D / 8, ROWS_PER_PASS = NTHR / CH;
    static_assert(NTHR % CH == 0 && ROWS % ROWS_PER_PASS == 0 && ROWS_PER_PASS % 8 == 0, "copy shape");
    const int ch = tid % CH, row0 = tid / CH;
    const bf16 *p = src + (size_t)(r0 + row0) * row_stride + (size_t)ch * 8;
    const uint32_t dst = tile + (uint32_t)((ch / 8) * ROWS * 128 + row0 * 128 + (((ch % 8) ^ (row0 & 7)) << 4));
#pragma unroll
    for (int pass = 0; pass < ROWS / ROWS_PER_PASS; pass++) {
        const int row = row0 + pass * ROWS_PER_PASS;
        const bool valid = r0 + row < N;
        cp_async16(dst + pass * ROWS_PER_PASS * 128, valid ? p + (size_t)pass * ROWS_PER_PASS * row_stride : src, valid);
    }
}

template <int D, int BN>
__device__ __forceinline__ void wgmma_qk(float s[BN / 8][4], const uint32_t q_frag[D / 16][4], uint32_t kt) {
    const uint64_t k_desc = wgmma_desc(kt, 16, 1024);
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) {
        /* K is K-major: 16 more head dims = 32 bytes further inside the 128-byte atom */
        const uint64_t desc = desc_plus(k_desc, (kk / 4) * BN * 128 + (kk % 4) * 32);
        if constexpr (BN == 128) wgmma_m64n128k16<0>(s, q_frag[kk], desc, kk > 0);
        else wgmma_m64n64k16<0>(s, q_frag[kk], desc, kk > 0);
    }
}
template <int D, int BN>
__device__ __forceinline__ void wgmma_pv(float o[D / 8][4], const uint32_t p_frag[BN / 16][4], uint32_t vt) {
    const uint64_t v_desc = wgmma_desc(vt, BN * 128, 1024);
#pragma unroll
    for (int kk = 0; kk < BN / 16; kk++) {
        const uint32_t *a = p_frag[kk];
        /* V is N-major: 16 more keys = 16 rows of 128 bytes; the next 64 head dims are the
         * next atom (BN rows further) */
        const uint64_t desc = desc_plus(v_desc, kk * 16 * 128);
        if constexpr (D == 128) wgmma_m64n128k16<1>(o, a, desc, 1);
        else wgmma_m64n64k16<1>(o, a, desc, 1);
    }
}

template <int D, int BN>
__global__ void __launch_bounds__(256, 1)
flash_fwd_wgmma_kernel(const bf16 *__restrict__ Q, const bf16 *__restrict__ K, const bf16 *__restrict__ V,
                       bf16 *__restrict__ O, float *__restrict__ LSE, int N, int H, int Hk, int G, float scale_log2) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    constexpr int BM = 128, NTHR = 256;
    extern __shared__ __align__(128) unsigned char smem[];
    const uint32_t base = (smem_addr(smem) + 1023u) & ~1023u;  /* swizzle atoms need 1024-byte alignment */
    const uint32_t sK = base;                                   /* [2][D/64][BN][64] */
    const uint32_t sV = sK + 2 * BN * D * 2;                    /* [2][D/64][BN][64] */
    const uint32_t sQ = sV + 2 * BN * D * 2;                    /* [BM, D] (ldmatrix layout) */

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, wg = warp >> 2;
    const int g = lane >> 2, t = lane & 3;
    const int m_block = gridDim.x - 1 - blockIdx.x;
    const int h = blockIdx.y, b = blockIdx.z;
    const int kh = h / (H / Hk);
    const size_t q_stride = (size_t)H * D, kv_stride = (size_t)Hk * D;
    const bf16 *Qb = Q + (size_t)b * N * q_stride + (size_t)h * D;
    const bf16 *Kb = K + (size_t)b * N * kv_stride + (size_t)kh * D;
    const bf16 *Vb = V + (size_t)b * N * kv_stride + (size_t)kh * D;

    const int m0 = m_block * BM;
    const int m_last = min(m0 + BM, N) - 1;
    const int key_lo = (int)s2_first_key((size_t)m0, h, H, (size_t)G);
    const int fk_last = (int)s2_first_key((size_t)m_last, h, H, (size_t)G);
    const int tile_lo = key_lo / BN, tile_hi = m_last / BN;
    const int n_tiles = tile_hi - tile_lo + 1;

    const int wrow0 = m0 + warp * 16;           /* this warp's 16 rows */
    const int wg_row0 = m0 + wg * 64, wg_row_last = wg_row0 + 63;
    const int wg_fk0 = (int)s2_first_key((size_t)wg_row0, h, H, (size_t)G);
    int row_fk[2];
#pragma unroll
    for (int hf = 0; hf < 2; hf++) row_fk[hf] = (int)s2_first_key((size_t)(wrow0 + g + 8 * hf), h, H, (size_t)G);

    load_tile_async<D, BM, NTHR>(sQ, Qb, q_stride, m0, N, tid);
    load_tile_atoms_async<D, BN, NTHR>(sK, Kb, kv_stride, tile_hi * BN, N, tid);
    load_tile_atoms_async<D, BN, NTHR>(sV, Vb, kv_stride, tile_hi * BN, N, tid);
    cp_async_commit();

    float o_acc[D / 8][4];
#pragma unroll
    for (int dn = 0; dn < D / 8; dn++)
#pragma unroll
        for (int e = 0; e < 4; e++) o_acc[dn][e] = 0.f;
    float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
    /* Defined before the loop although loaded in its first pass: with its value undefined on
     * the way into the loop, ptxas 13.0 took these registers as free once a wgmma had read
     * them and reused them (for P's fragments where both products have the same width, the
     * "equal widths" defect of bench/NOTES.md step 7), so every tile after the first used a
     * wrong Q. */
    uint32_t q_frag[D / 16][4] = {};

    for (int it = 0; it < n_tiles; it++) {
        const int tile = tile_hi - it, n0 = tile * BN, buf = it & 1;
        cp_async_wait<0>();
        fence_proxy_async();
        __syncthreads();
        if (it + 1 < n_tiles) {
            load_tile_atoms_async<D, BN, NTHR>(sK + (buf ^ 1) * BN * D * 2, Kb, kv_stride, (tile - 1) * BN, N, tid);
            load_tile_atoms_async<D, BN, NTHR>(sV + (buf ^ 1) * BN * D * 2, Vb, kv_stride, (tile - 1) * BN, N, tid);
        }
        cp_async_commit();
        if (it == 0) {
#pragma unroll
            for (int kc = 0; kc < D / 16; kc++) ldmatrix_x4(q_frag[kc], swz<D>(sQ, warp * 16 + (lane & 15), kc * 2 + (lane >> 4)));
            pin_regs(q_frag);
        }
        const uint32_t kt = sK + buf * BN * D * 2, vt = sV + buf * BN * D * 2;
        /* wgmma is issued by the whole warpgroup: skip only tiles all 64 of its rows skip */
        if (n0 <= wg_row_last && n0 + BN - 1 >= wg_fk0) {
            float s[BN / 8][4];
            pin_regs(s);
            wgmma_fence();
            wgmma_qk<D, BN>(s, q_frag, kt);
            wgmma_commit();
            wgmma_wait_all();
            pin_regs(s);
            if (n0 + BN - 1 > wrow0 || n0 < fk_last) {
#pragma unroll
                for (int nt = 0; nt < BN / 8; nt++)
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        int row = wrow0 + g + 8 * (e >> 1), col = n0 + nt * 8 + 2 * t + (e & 1);
                        if (col > row || col < row_fk[e >> 1]) s[nt][e] = -INFINITY;
                    }
            }
#pragma unroll
            for (int hf = 0; hf < 2; hf++) {
                float mx = -INFINITY;
#pragma unroll
                for (int nt = 0; nt < BN / 8; nt++) mx = fmaxf(mx, fmaxf(s[nt][2 * hf], s[nt][2 * hf + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                float m_new = fmaxf(m_run[hf], mx * scale_log2);
                float base_m = m_new == -INFINITY ? 0.f : m_new;
                float alpha = fast_exp2(m_run[hf] - base_m);
                m_run[hf] = m_new;
                float rs = 0.f;
#pragma unroll
                for (int nt = 0; nt < BN / 8; nt++)
#pragma unroll
                    for (int e = 0; e < 2; e++) {
                        float pv = fast_exp2(fmaf(s[nt][2 * hf + e], scale_log2, -base_m));
                        s[nt][2 * hf + e] = pv;
                        rs += pv;
                    }
                l_run[hf] = l_run[hf] * alpha + rs;
#pragma unroll
                for (int dn = 0; dn < D / 8; dn++) {
                    o_acc[dn][2 * hf] *= alpha;
                    o_acc[dn][2 * hf + 1] *= alpha;
                }
            }
            uint32_t p_frag[BN / 16][4]; /* P as bf16 A fragments, all written before the fence */
#pragma unroll
            for (int kk = 0; kk < BN / 16; kk++) {
                p_frag[kk][0] = pack_bf16(s[2 * kk][0], s[2 * kk][1]);
                p_frag[kk][1] = pack_bf16(s[2 * kk][2], s[2 * kk][3]);
                p_frag[kk][2] = pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]);
                p_frag[kk][3] = pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3]);
            }
            pin_regs(p_frag);
            pin_regs(o_acc);
            wgmma_fence();
            wgmma_pv<D, BN>(o_acc, p_frag, vt);
            wgmma_commit();
            wgmma_wait_all();
            pin_regs(o_acc);
        }
    }

    __syncwarp();
    float *lse_row = LSE + ((size_t)b * H + h) * N;
#pragma unroll
    for (int hf = 0; hf < 2; hf++) {
        float l = l_run[hf];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        float inv = l > 0.f ? 1.f / l : 0.f;
        int row_local = warp * 16 + g + 8 * hf;
        if (t == 0 && m0 + row_local < N) lse_row[m0 + row_local] = (m_run[hf] + log2f(l)) * LN2;
#pragma unroll
        for (int dn = 0; dn < D / 8; dn++) {
            uint32_t v = pack_bf16(o_acc[dn][2 * hf] * inv, o_acc[dn][2 * hf + 1] * inv);
            asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(swz<D>(sQ, row_local, dn) + 4 * t), "r"(v));
        }
    }
    __syncthreads();
    bf16 *Ob = O + (size_t)b * N * q_stride + (size_t)h * D;
    for (int c = tid; c < BM * D / 8; c += NTHR) {
        int row = c / (D / 8), ch = c % (D / 8);
        if (m0 + row < N)
            *(uint4 *)(Ob + (size_t)(m0 + row) * q_stride + ch * 8) = *(const uint4 *)(smem + (sQ - smem_addr(smem)) + swz<D>(0, row, ch));
    }
#else
    __trap(); /* built without sm_90a: the host never launches this */
#endif
}

/* ---------------------------------------------------------------------------------------
 * Forward, version 3b: the wgmma forward with the next tile's S = Q K^T overlapping this
 * tile's softmax (sm_90a only; forward variants 6-9)
 * Version 3 runs S, softmax, P V one after another in each warpgroup, and the tensor pipe
 * waits while the warpgroup does its softmax. Here a warpgroup issues S(j+1) = Q K(j+1)^T
 * and O += P(j) V(j) back to back, waits only for S(j+1) (wgmma.wait_group 1), computes
 * its softmax while P(j) V(j) runs, then waits for P V and rescales O. This costs a second
 * set of P fragments (P(j) feeds the running product while P(j+1) is being written), so Q
 * is read from shared memory by the MMA (both operands through descriptors) instead of
 * holding 32 registers of fragments. Per block: 128 queries of one head, 64 per warpgroup.
 *   flash_fwd_wgmma_ovl_kernel   every thread copies K/V with cp.async, one block barrier
 *                                per tile (as version 3); measured slower than version 3,
 *                                kept as the step between the two (bench/NOTES.md step 10).
 *   flash_fwd_tma_kernel         warp-specialised: a producer warpgroup, one thread of which
 *                                issues tensor-memory-accelerator copies (cp.async.bulk.
 *                                tensor) of Q once and of K and V into a
 *                                ring of ST stages; full/empty mbarriers per stage replace
 *                                the block barrier; the two consumer warpgroups only compute,
 *                                with registers moved to them by setmaxnreg (the producer
 *                                warpgroup keeps 24, each consumer thread gets 240; the launch
 *                                gives 168 to each of the 384 threads). PINGPONG orders
 *                                the two warpgroups' MMA issues with named barriers, so the
 *                                softmax of one runs while the other's products run. With
 *                                3 stages, ping-pong and the mask's code only on the tiles
 *                                it cuts (variant 10, step 13) it is the default.
 * ------------------------------------------------------------------------------------- */

/* d[64 x 128] (+)= A B^T with A (64 rows, K-major) and B (128 rows, K-major) in shared memory */
__device__ __forceinline__ void wgmma_ss_m64n128k16(float d[16][4], uint64_t desc_a, uint64_t desc_b, int accumulate) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
                 : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]), "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]), "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
                 : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}
/* s[64 x 128] = Q K^T over D: q_rows = the warpgroup's first row in a [D/64][BM][64] Q tile */
template <int D, int BM>
__device__ __forceinline__ void wgmma_qk_ss(float s[16][4], uint32_t q_rows, uint32_t kt) {
    const uint64_t q_desc = wgmma_desc(q_rows, 16, 1024), k_desc = wgmma_desc(kt, 16, 1024);
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) {
        const uint64_t da = desc_plus(q_desc, (kk / 4) * BM * 128 + (kk % 4) * 32);
        const uint64_t db = desc_plus(k_desc, (kk / 4) * 128 * 128 + (kk % 4) * 32);
        wgmma_ss_m64n128k16(s, da, db, kk > 0);
    }
}

/* The online softmax of one S tile for this thread's two rows (row0 and row0 + 8; the
 * accumulator layout: s[nt][e] is row row0 + 8 * (e >> 1), key n0 + nt * 8 + 2t + (e & 1)):
 * masks keys outside [row_fk, row] when `mask` (MASK = false: an instance without the mask's
 * code, for tiles the caller knows no mask touches), updates the running max (base 2, scaled) and
 * sum, returns in alpha what the O accumulated so far is to be multiplied by, and P as bf16
 * A fragments in p. S is only read: ptxas serialises every wgmma of the kernel when ordinary
 * code writes a wgmma accumulator while another wgmma group is running (warning C7513). */
template <int BN, bool MASK = true>
__device__ __forceinline__ void softmax_tile(const float (&s)[BN / 8][4], uint32_t (&p)[BN / 16][4], float alpha[2], float m_run[2], float l_run[2],
                                             bool mask, int n0, int row0, const int row_fk[2], int t, float scale_log2) {
    auto score = [&](int nt, int e) {
        if (!MASK) return s[nt][e]; /* an instance for tiles no mask touches */
        const int row = row0 + 8 * (e >> 1), col = n0 + nt * 8 + 2 * t + (e & 1);
        return mask & ((col > row) | (col < row_fk[e >> 1])) ? -INFINITY : s[nt][e]; /* no short circuit: a select, not a branch */
    };
#pragma unroll
    for (int hf = 0; hf < 2; hf++) {
        float mx = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < BN / 8; nt++) mx = fmaxf(mx, fmaxf(score(nt, 2 * hf), score(nt, 2 * hf + 1)));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m_run[hf], mx * scale_log2);
        const float base_m = m_new == -INFINITY ? 0.f : m_new; /* a row with no key yet */
        alpha[hf] = fast_exp2(m_run[hf] - base_m);
        m_run[hf] = m_new;
        float rs = 0.f;
#pragma unroll
        for (int nt = 0; nt < BN / 8; nt++) {
            const float p0 = fast_exp2(fmaf(score(nt, 2 * hf), scale_log2, -base_m));
            const float p1 = fast_exp2(fmaf(score(nt, 2 * hf + 1), scale_log2, -base_m));
            rs += p0 + p1;
            p[nt >> 1][(nt & 1) * 2 + hf] = pack_bf16(p0, p1); /* the m16n8k16 A fragment order */
        }
        l_run[hf] = l_run[hf] * alpha[hf] + rs;
    }
}
template <int D> __device__ __forceinline__ void rescale_rows(float (&o)[D / 8][4], const float alpha[2]) {
#pragma unroll
    for (int dn = 0; dn < D / 8; dn++) {
        o[dn][0] *= alpha[0];
        o[dn][1] *= alpha[0];
        o[dn][2] *= alpha[1];
        o[dn][3] *= alpha[1];
    }
}
/* O / l as bf16 into rows row_local, row_local + 8 of a [BM, D] staging tile (ldmatrix
 * layout), and the natural-log LSE of those rows (one lane of four writes it) */
template <int D>
__device__ __forceinline__ void store_o_rows(uint32_t stage, float (&o)[D / 8][4], const float m_run[2], const float l_run[2],
                                             float *lse_row, int m0, int row_local, int N, int t) {
#pragma unroll
    for (int hf = 0; hf < 2; hf++) {
        float l = l_run[hf];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        const float inv = l > 0.f ? 1.f / l : 0.f;
        const int r = row_local + 8 * hf;
        if (t == 0 && m0 + r < N) lse_row[m0 + r] = (m_run[hf] + log2f(l)) * LN2;
#pragma unroll
        for (int dn = 0; dn < D / 8; dn++) {
            const uint32_t v = pack_bf16(o[dn][2 * hf] * inv, o[dn][2 * hf + 1] * inv);
            asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(swz<D>(stage, r, dn) + 4 * t), "r"(v) : "memory");
        }
    }
}

template <int D, int BN>
__global__ void __launch_bounds__(256, 1)
flash_fwd_wgmma_ovl_kernel(const bf16 *__restrict__ Q, const bf16 *__restrict__ K, const bf16 *__restrict__ V,
                           bf16 *__restrict__ O, float *__restrict__ LSE, int N, int H, int Hk, int G, float scale_log2) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    static_assert(BN == 128, "the S product is m64n128");
    constexpr int BM = 128, NTHR = 256, TILE = BN * D * 2; /* bytes of one K or V tile */
    extern __shared__ __align__(128) unsigned char smem[];
    const uint32_t base = (smem_addr(smem) + 1023u) & ~1023u;
    const uint32_t sQ = base;                /* [D/64][BM][64], then O's staging [BM, D] */
    const uint32_t sK = sQ + BM * D * 2;     /* [2][D/64][BN][64] */
    const uint32_t sV = sK + 2 * TILE;       /* [2][D/64][BN][64] */

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int wg = __shfl_sync(0xffffffffu, warp >> 2, 0); /* warp-uniform, visibly */
    const int g = lane >> 2, t = lane & 3;
    const int m_block = gridDim.x - 1 - blockIdx.x;
    const int h = blockIdx.y, b = blockIdx.z, kh = h / (H / Hk);
    const size_t q_stride = (size_t)H * D, kv_stride = (size_t)Hk * D;
    const bf16 *Qb = Q + (size_t)b * N * q_stride + (size_t)h * D;
    const bf16 *Kb = K + (size_t)b * N * kv_stride + (size_t)kh * D;
    const bf16 *Vb = V + (size_t)b * N * kv_stride + (size_t)kh * D;
    const int m0 = m_block * BM, m_last = min(m0 + BM, N) - 1;
    const int fk_last = (int)s2_first_key((size_t)m_last, h, H, (size_t)G);
    const int tile_hi = m_last / BN, n_tiles = tile_hi - (int)s2_first_key((size_t)m0, h, H, (size_t)G) / BN + 1;
    const int wrow0 = m0 + warp * 16, row0 = wrow0 + g;
    int row_fk[2];
#pragma unroll
    for (int hf = 0; hf < 2; hf++) row_fk[hf] = (int)s2_first_key((size_t)(row0 + 8 * hf), h, H, (size_t)G);
    const uint32_t q_rows = sQ + wg * 64 * 128;

    /* tile j of the loop is key tile tile_hi - j; K(j) and V(j) live in buffer j & 1 */
    load_tile_atoms_async<D, BM, NTHR>(sQ, Qb, q_stride, m0, N, tid);
    load_tile_atoms_async<D, BN, NTHR>(sK, Kb, kv_stride, tile_hi * BN, N, tid);
    cp_async_commit();
    load_tile_atoms_async<D, BN, NTHR>(sV, Vb, kv_stride, tile_hi * BN, N, tid);
    if (n_tiles > 1) load_tile_atoms_async<D, BN, NTHR>(sK + TILE, Kb, kv_stride, (tile_hi - 1) * BN, N, tid);
    cp_async_commit();

    float o_acc[D / 8][4];
#pragma unroll
    for (int dn = 0; dn < D / 8; dn++)
#pragma unroll
        for (int e = 0; e < 4; e++) o_acc[dn][e] = 0.f;
    float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f}, alpha[2];
    float s[BN / 8][4];
    uint32_t p[BN / 16][4];

    cp_async_wait<1>(); /* Q, K(0) */
    fence_proxy_async();
    __syncthreads();
    pin_regs(s);
    wgmma_fence();
    wgmma_qk_ss<D, BM>(s, q_rows, sK);
    wgmma_commit();
    wgmma_wait<0>();
    pin_regs(s);
    softmax_tile<BN>(s, p, alpha, m_run, l_run, true, tile_hi * BN, row0, row_fk, t, scale_log2);

    for (int j = 0; j + 1 < n_tiles; j++) {
        const int n1 = (tile_hi - j - 1) * BN; /* tile j+1's first key */
        cp_async_wait<0>();                     /* V(j), K(j+1) */
        fence_proxy_async();
        __syncthreads(); /* also: every warpgroup is done with S(j) and P(j-1) V(j-1) */
        load_tile_atoms_async<D, BN, NTHR>(sV + ((j + 1) & 1) * TILE, Vb, kv_stride, n1, N, tid);
        if (j + 2 < n_tiles) load_tile_atoms_async<D, BN, NTHR>(sK + (j & 1) * TILE, Kb, kv_stride, n1 - BN, N, tid);
        cp_async_commit();
        pin_regs(p);
        pin_regs(o_acc);
        wgmma_fence();
        wgmma_qk_ss<D, BM>(s, q_rows, sK + ((j + 1) & 1) * TILE);
        wgmma_commit();
        wgmma_pv<D, BN>(o_acc, p, sV + (j & 1) * TILE);
        wgmma_commit();
        wgmma_wait<1>(); /* S(j+1) is done, P(j) V(j) runs on */
        pin_regs(s);
        uint32_t p_next[BN / 16][4];
        softmax_tile<BN>(s, p_next, alpha, m_run, l_run, n1 + BN - 1 > wrow0 || n1 < fk_last, n1, row0, row_fk, t, scale_log2);
        wgmma_wait<0>();
        pin_regs(o_acc);
        pin_regs(p); /* P(j) stays live until its product is done, so P(j+1) gets registers of its own */
        rescale_rows<D>(o_acc, alpha);
#pragma unroll
        for (int kk = 0; kk < BN / 16; kk++)
#pragma unroll
            for (int e = 0; e < 4; e++) p[kk][e] = p_next[kk][e];
    }
    cp_async_wait<0>();
    fence_proxy_async();
    __syncthreads();
    pin_regs(p);
    pin_regs(o_acc);
    wgmma_fence();
    wgmma_pv<D, BN>(o_acc, p, sV + ((n_tiles - 1) & 1) * TILE);
    wgmma_commit();
    wgmma_wait<0>();
    pin_regs(o_acc);

    __syncthreads(); /* every warpgroup's reads of Q are done: its space stages O */
    store_o_rows<D>(sQ, o_acc, m_run, l_run, LSE + ((size_t)b * H + h) * N, m0, warp * 16 + g, N, t);
    __syncthreads();
    bf16 *Ob = O + (size_t)b * N * q_stride + (size_t)h * D;
    for (int c = tid; c < BM * D / 8; c += NTHR) {
        const int row = c / (D / 8), ch = c % (D / 8);
        if (m0 + row < N)
            *(uint4 *)(Ob + (size_t)(m0 + row) * q_stride + ch * 8) = *(const uint4 *)(smem + (swz<D>(sQ, row, ch) - smem_addr(smem)));
    }
#else
    __trap(); /* built without sm_90a: the host never launches this */
#endif
}

/* mbarrier, tensor-memory-accelerator and named-barrier primitives (sm_90; the TMA forward's
 * and backward's) */
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) { asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory"); }
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
/* one arrival from the warp where `arrive` (the caller passes it true in one lane), predicated
 * inside the asm so no branch is made */
__device__ __forceinline__ void mbar_arrive_if(uint32_t bar, bool arrive) {
    asm volatile("{\n.reg .pred pa;\nsetp.ne.u32 pa, %1, 0;\n@pa mbarrier.arrive.shared::cta.b64 _, [%0];\n}\n" ::"r"(bar), "r"((int)arrive) : "memory");
}
/* waits until the phase of parity `parity` has completed (sm_80 has only the test, which
 * does not suspend the thread; sm_90 the try_wait, which does for a while) */
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
    uint32_t done;
    do {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
        asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
                     : "=r"(done) : "r"(bar), "r"(parity) : "memory");
#else
        asm volatile("{\n.reg .pred p;\nmbarrier.test_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
                     : "=r"(done) : "r"(bar), "r"(parity) : "memory");
#endif
    } while (!done);
}
/* box {64 columns, 1 head, rows, 1 batch} at (col, head, row, batch) of a tensor map into dst */
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const void *tmap, uint32_t bar, int col, int head, int row, int batch) {
    asm volatile("cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], [%6];\n"
                 ::"r"(dst), "l"(tmap), "r"(col), "r"(head), "r"(row), "r"(batch), "r"(bar) : "memory");
}
__device__ __forceinline__ void named_bar_sync(int id, int n) { asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(n) : "memory"); }
__device__ __forceinline__ void named_bar_arrive(int id, int n) { asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(n) : "memory"); }

template <int D, int BN, int ST, int PINGPONG, int EDGE_MASK>
__global__ void __launch_bounds__(384, 1)
flash_fwd_tma_kernel(const __grid_constant__ CUtensorMap tm_q, const __grid_constant__ CUtensorMap tm_k, const __grid_constant__ CUtensorMap tm_v,
                     bf16 *__restrict__ O, float *__restrict__ LSE, int N, int H, int Hk, int G, float scale_log2) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    static_assert(BN == 128, "the S product is m64n128");
    constexpr int BM = 128, TILE = BN * D * 2; /* bytes of one K or V stage */
    extern __shared__ __align__(128) unsigned char smem[];
    const uint32_t base = (smem_addr(smem) + 1023u) & ~1023u;
    const uint32_t sQ = base;                 /* [D/64][BM][64]; then O's staging, per warpgroup */
    const uint32_t sK = sQ + BM * D * 2;      /* [ST][D/64][BN][64] */
    const uint32_t sV = sK + ST * TILE;       /* [ST][D/64][BN][64] */
    const uint32_t bars = sV + ST * TILE;     /* q_full, k_full[ST], k_empty[ST], v_full[ST], v_empty[ST] */
    const uint32_t q_full = bars, k_full = bars + 8, k_empty = k_full + 8 * ST, v_full = k_empty + 8 * ST, v_empty = v_full + 8 * ST;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int wg = __shfl_sync(0xffffffffu, warp >> 2, 0); /* 0: producer; 1, 2: consumers */
    const int m_block = gridDim.x - 1 - blockIdx.x;
    const int h = blockIdx.y, b = blockIdx.z, kh = h / (H / Hk);
    const int m0 = m_block * BM, m_last = min(m0 + BM, N) - 1;
    const int fk_last = (int)s2_first_key((size_t)m_last, h, H, (size_t)G);
    const int tile_hi = m_last / BN, n_tiles = tile_hi - (int)s2_first_key((size_t)m0, h, H, (size_t)G) / BN + 1;

    if (tid == 0) {
        mbar_init(q_full, 1);
        for (int st = 0; st < ST; st++) {
            mbar_init(k_full + 8 * st, 1);
            mbar_init(v_full + 8 * st, 1);
            mbar_init(k_empty + 8 * st, 8); /* one arrival per consumer warp */
            mbar_init(v_empty + 8 * st, 8);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads(); /* the last block-wide barrier: the producer's warps leave early */

    if (wg == 0) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n");
        if (warp == 0 && lane == 0) {
            mbar_expect_tx(q_full, BM * D * 2);
            for (int a = 0; a < D / 64; a++) tma_load_4d(sQ + a * BM * 128, &tm_q, q_full, a * 64, h, m0, b);
            for (int j = 0; j < n_tiles; j++) {
                const int st = j % ST, n0 = (tile_hi - j) * BN;
                const uint32_t parity = ((j / ST) & 1) ^ 1; /* the first pass finds the ring empty */
                mbar_wait(k_empty + 8 * st, parity);
                mbar_expect_tx(k_full + 8 * st, TILE);
                for (int a = 0; a < D / 64; a++) tma_load_4d(sK + st * TILE + a * BN * 128, &tm_k, k_full + 8 * st, a * 64, kh, n0, b);
                mbar_wait(v_empty + 8 * st, parity);
                mbar_expect_tx(v_full + 8 * st, TILE);
                for (int a = 0; a < D / 64; a++) tma_load_4d(sV + st * TILE + a * BN * 128, &tm_v, v_full + 8 * st, a * 64, kh, n0, b);
            }
        }
        return;
    }
    asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n");
    const int cwg = wg - 1, cwarp = warp - 4; /* consumer warpgroup 0/1, consumer warp 0..7 */
    const int g = lane >> 2, t = lane & 3;
    const int wrow0 = m0 + cwarp * 16, row0 = wrow0 + g;
    int row_fk[2];
#pragma unroll
    for (int hf = 0; hf < 2; hf++) row_fk[hf] = (int)s2_first_key((size_t)(row0 + 8 * hf), h, H, (size_t)G);
    const uint32_t q_rows = sQ + cwg * 64 * 128;
    /* ping-pong: warpgroup w issues its products after bar.sync on barrier 3 + w, which the
     * other warpgroup arrives at once it has issued its own (the second starts one ahead) */
    const int my_turn = 3 + cwg, their_turn = 4 - cwg;

    float o_acc[D / 8][4];
#pragma unroll
    for (int dn = 0; dn < D / 8; dn++)
#pragma unroll
        for (int e = 0; e < 4; e++) o_acc[dn][e] = 0.f;
    float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f}, alpha[2];
    float s[BN / 8][4];
    uint32_t p[BN / 16][4];

    if (PINGPONG && cwg == 1) named_bar_arrive(3, 256);
    mbar_wait(q_full, 0);
    mbar_wait(k_full, 0);
    if (PINGPONG) named_bar_sync(my_turn, 256);
    pin_regs(s);
    wgmma_fence();
    wgmma_qk_ss<D, BM>(s, q_rows, sK);
    wgmma_commit();
    if (PINGPONG) named_bar_arrive(their_turn, 256);
    wgmma_wait<0>();
    pin_regs(s);
    mbar_arrive_if(k_empty, lane == 0);
    softmax_tile<BN>(s, p, alpha, m_run, l_run, true, tile_hi * BN, row0, row_fk, t, scale_log2);

    /* one pass: S(j+1) and P(j) V(j) issued, S(j+1)'s softmax under P(j) V(j); MASK = false
     * leaves the mask's code out (edge_tile: std::true_type or std::false_type) */
    auto pass = [&](int j, auto edge_tile) {
        const int n1 = (tile_hi - j - 1) * BN; /* tile j+1's first key */
        const int st0 = j % ST, st1 = (j + 1) % ST;
        mbar_wait(k_full + 8 * st1, ((j + 1) / ST) & 1);
        mbar_wait(v_full + 8 * st0, (j / ST) & 1);
        if (PINGPONG) named_bar_sync(my_turn, 256);
        pin_regs(p);
        pin_regs(o_acc);
        wgmma_fence();
        wgmma_qk_ss<D, BM>(s, q_rows, sK + st1 * TILE);
        wgmma_commit();
        wgmma_pv<D, BN>(o_acc, p, sV + st0 * TILE);
        wgmma_commit();
        if (PINGPONG) named_bar_arrive(their_turn, 256);
        wgmma_wait<1>(); /* S(j+1) is done, P(j) V(j) runs on */
        pin_regs(s);
        /* K(j+1) is read; V(j-1) was read by the end of the previous pass (releasing it
         * there, after wgmma.wait_group 0, made ptxas serialise the wgmma: C7513) */
        mbar_arrive_if(k_empty + 8 * st1, lane == 0);
        mbar_arrive_if(v_empty + 8 * ((j + ST - 1) % ST), lane == 0 && j > 0);
        uint32_t p_next[BN / 16][4];
        softmax_tile<BN, decltype(edge_tile)::value>(s, p_next, alpha, m_run, l_run, n1 + BN - 1 > wrow0 || n1 < fk_last, n1, row0,
                                                     row_fk, t, scale_log2);
        wgmma_wait<0>();
        pin_regs(o_acc);
        pin_regs(p); /* as in flash_fwd_wgmma_ovl_kernel */
        rescale_rows<D>(o_acc, alpha);
#pragma unroll
        for (int kk = 0; kk < BN / 16; kk++)
#pragma unroll
            for (int e = 0; e < 4; e++) p[kk][e] = p_next[kk][e];
    };
    /* EDGE_MASK: two loops, so that each pass stays one straight block (a branch around the
     * softmax made ptxas serialise the wgmma, C7513). Past tile 0 the causal diagonal is
     * behind every row (BM == BN and tiles aligned to BN), so only S2's window starts mask,
     * and they fall on the last tiles: j < j_edge have n1 >= fk_last, no mask at all. */
    const int j_edge = EDGE_MASK ? min(n_tiles - 1, max(0, tile_hi - (fk_last + BN - 1) / BN)) : 0;
    for (int j = 0; j < j_edge; j++) pass(j, std::false_type{});
    for (int j = j_edge; j + 1 < n_tiles; j++) pass(j, std::true_type{});
    const int st_last = (n_tiles - 1) % ST;
    mbar_wait(v_full + 8 * st_last, ((n_tiles - 1) / ST) & 1);
    if (PINGPONG) named_bar_sync(my_turn, 256);
    pin_regs(p);
    pin_regs(o_acc);
    wgmma_fence();
    wgmma_pv<D, BN>(o_acc, p, sV + st_last * TILE);
    wgmma_commit();
    if (PINGPONG && cwg == 0) named_bar_arrive(their_turn, 256); /* the second warpgroup's last turn */
    wgmma_wait<0>();
    pin_regs(o_acc);

    /* O through this warpgroup's own 64 rows of a [BM, D] staging tile over Q's space (both
     * warpgroups' Q reads are over: the staging rows of one are Q rows of the other) */
    named_bar_sync(1, 256);
    const int ctid = tid - 128;
    store_o_rows<D>(sQ, o_acc, m_run, l_run, LSE + ((size_t)b * H + h) * N, m0, cwarp * 16 + g, N, t);
    named_bar_sync(5 + cwg, 128); /* this warpgroup's staging rows are written */
    const size_t q_stride = (size_t)H * D;
    bf16 *Ob = O + (size_t)b * N * q_stride + (size_t)h * D;
    for (int c = ctid % 128; c < 64 * D / 8; c += 128) {
        const int row = cwg * 64 + c / (D / 8), ch = c % (D / 8);
        if (m0 + row < N)
            *(uint4 *)(Ob + (size_t)(m0 + row) * q_stride + ch * 8) = *(const uint4 *)(smem + (swz<D>(sQ, row, ch) - smem_addr(smem)));
    }
#else
    __trap(); /* built without sm_90a: the host never launches this */
#endif
}

/* 1 where this binary carries the sm_90a code of the wgmma kernel */
__global__ void wgmma_probe_kernel(int *out) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    *out = 1;
#else
    *out = 0;
#endif
}

/* ---------------------------------------------------------------------------------------
 * Flash attention backward
 *   1. preprocess: Delta_i = sum_d dO_i * O_i, and dQ's fp32 accumulator set to zero
 *   2. main: one block per BN keys of one kv head (all its query heads); K, V stay in shared
 *      memory, Q/dO tiles of BM queries stream through two buffers. Each pair of warps owns
 *      32 keys. Each warp of the pair computes, for its half of the tile's queries,
 *      S^T = K Q^T, P^T = exp2(S^T*c - lse), dP^T = V dO^T, dS^T = P^T (dP^T - Delta); the
 *      pair swaps halves of P^T and dS^T through shared memory, and each warp then adds
 *      dV += P^T dO and dK += dS^T Q over all the queries for its half of the columns, in
 *      registers. The warps then re-split for dQ += dS K, read from dS^T in shared memory,
 *      and add it to the fp32 accumulator straight from their registers: the accumulator
 *      is kept in fragment order (DQF_ROWS below), so that each atomic instruction of a warp
 *      adds 32 consecutive floats, as FlashAttention-2's does (bench/NOTES.md step 28; it
 *      replaced a staging of the adds through the pair's rows of P^T, steps 18-19). dQ waits
 *      on an mbarrier that counts every thread's dS^T stores, not on a block barrier after
 *      dV and dK, which made every warp wait for the slowest one's products (bench/NOTES.md
 *      step 26: 1.02-1.03x). 16 keys a warp with dS^T in two buffers and one block barrier
 *      a tile measured 0.91-0.94x the pairs (step 21): its shared-memory waits cost more
 *      than the barriers.
 *   3. convert: dQ = bf16(scale * accumulator), in [B, N, H, d]
 * ------------------------------------------------------------------------------------- */
template <int D>
__global__ void bwd_preprocess_kernel(const bf16 *__restrict__ O, const bf16 *__restrict__ dO, /* [B, N, H, d] */
                                      float *__restrict__ Delta, /* [B, H, N] */ int N, int H, size_t rows) {
    size_t row = (size_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; /* row = (b*N + i)*H + h */
    int lane = threadIdx.x & 31;
    if (row >= rows) return;
    constexpr int PER = D / 32; /* elements per lane: 2 or 4 */
    const bf16 *o = O + row * D + lane * PER, *d = dO + row * D + lane * PER;
    float acc = 0.f;
#pragma unroll
    for (int e = 0; e < PER; e += 2) {
        float2 a = __bfloat1622float2(*(const __nv_bfloat162 *)(o + e));
        float2 c = __bfloat1622float2(*(const __nv_bfloat162 *)(d + e));
        acc += a.x * c.x + a.y * c.y;
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0) {
        size_t h = row % H, bi = row / H, i = bi % N, b = bi / N;
        Delta[(b * H + h) * N + i] = acc;
    }
}

__global__ void dq_convert_kernel(const float *__restrict__ acc, bf16 *__restrict__ dQ, size_t n4, float scale) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n4) return;
    float4 v = ((const float4 *)acc)[i];
    __nv_bfloat162 lo = __floats2bfloat162_rn(v.x * scale, v.y * scale), hi = __floats2bfloat162_rn(v.z * scale, v.w * scale);
    ((__nv_bfloat162 *)dQ)[2 * i] = lo;
    ((__nv_bfloat162 *)dQ)[2 * i + 1] = hi;
}

/* The mma.sync backward's dQ accumulator in fragment order: each warp adds its dQ fragments
 * straight from registers, and every add instruction of a warp covers 32 consecutive floats
 * (one 128-byte line), with no staging through shared memory. For batch b, head h and strip
 * s of 32 query rows (rows padded to a multiple of DQF_ROWS), D / 8 blocks of 256 floats, one
 * per 8 columns; in a block, value (mi * 4 + e) of lane 4 g + t at [(mi * 4 + e) * 32 + lane]
 * holds row 16 mi + 8 (e / 2) + g, column 2 t + e % 2: the m16n8 accumulator's own layout.
 * dq_frag_convert_kernel reads it back into [B, N, H, d] bf16 (a strip's 8 row groups of
 * the fragment, rq = 2 mi + e / 2, hold rows 8 rq .. 8 rq + 7). */
#define DQF_ROWS 64 /* the mma.sync backward's query tile */
__host__ __device__ __forceinline__ size_t dqf_padded_rows(int N) { return (size_t)(N + DQF_ROWS - 1) / DQF_ROWS * DQF_ROWS; }
__device__ __forceinline__ size_t dqf_strip_offset(int b, int h, int strip, int H, int N, int D) { /* floats */
    return (((size_t)b * H + h) * (dqf_padded_rows(N) / 32) + strip) * 32 * D;
}
/* one block a strip (blockIdx.x) of head blockIdx.y of batch blockIdx.z: its 32 x D floats
 * read once, 16 bytes a thread, into shared memory; then each thread writes 8 columns of one
 * row as one 16-byte store, 8 threads in a row reading one 128-byte line of shared memory
 * (no conflict) and a warp writing 64 contiguous bytes of each of 8 rows */
template <int D>
__global__ void __launch_bounds__(256) dq_frag_convert_kernel(const float *__restrict__ acc, /* [B, H, padded N / 32, D / 8, 8, 32] */
                                                              bf16 *__restrict__ dQ,         /* [B, N, H, d] */
                                                              int N, int H, float scale) {
    __shared__ __align__(16) float strip[32 * D]; /* [D / 8, 8, 32] */
    const int s = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const float4 *src = (const float4 *)(acc + dqf_strip_offset(b, h, s, H, N, D));
#pragma unroll
    for (int i = threadIdx.x; i < 8 * D; i += 256) ((float4 *)strip)[i] = src[i];
    __syncthreads();
#pragma unroll
    for (int j = threadIdx.x; j < 4 * D; j += 256) {
        const int g = j & 7, cb = (j >> 3) % (D / 8), rq = j / D; /* rq = 2 mi + hf: row 8 rq + g */
        const int row = s * 32 + 8 * rq + g;
        if (row >= N) continue;
        const float4 c0 = *(const float4 *)(strip + cb * 256 + (2 * rq) * 32 + 4 * g);     /* columns 0, 2, 4, 6 */
        const float4 c1 = *(const float4 *)(strip + cb * 256 + (2 * rq + 1) * 32 + 4 * g); /* columns 1, 3, 5, 7 */
        uint4 out;
        out.x = pack_bf16(c0.x * scale, c1.x * scale);
        out.y = pack_bf16(c0.y * scale, c1.y * scale);
        out.z = pack_bf16(c0.z * scale, c1.z * scale);
        out.w = pack_bf16(c0.w * scale, c1.w * scale);
        *(uint4 *)(dQ + (((size_t)b * N + row) * H + h) * D + cb * 8) = out;
    }
}

/* The query tiles a backward block visits. The block holds keys n0..n_last of kv head kh;
 * the query tiles of BM queries that reach them are, head by head of the GQA group of R query
 * heads, tiles lo..hi(r) of head kh * R + r: lo = n0 / BM (no earlier query sees these keys,
 * causal) and hi(r) the last tile with a query whose window holds key n_last. Every backward
 * kernel walks them in this order, (r, mt) and the head's hi in registers. */
struct BwdTiles {
    int R, kh, lo, n_last, BM, H, G, N;
    __device__ __forceinline__ int hi(int r) const {
        return ((int)s2_segment_end((size_t)n_last, kh * R + r, H, (size_t)G, (size_t)N) - 1) / BM;
    }
    __device__ __forceinline__ int total() const {
        int n = 0;
        for (int r = 0; r < R; r++) n += hi(r) - lo + 1;
        return n;
    }
    /* the first tile: head 0's first */
    __device__ __forceinline__ void first(int &r, int &mt, int &hi_r) const { r = 0, mt = lo, hi_r = hi(0); }
    /* (r, mt) -> the tile that follows it (past the last: r == R) */
    __device__ __forceinline__ void next(int &r, int &mt, int &hi_r) const {
        if (++mt > hi_r && ++r < R) mt = lo, hi_r = hi(r);
    }
};
/* query i's values for the backward: lse * log2(e), Delta, its window's first key; past N
 * +inf, 0 and N, so that every P there is 0 */
__device__ __forceinline__ void bwd_row_values(float &l2, float &dl, int &fk, const float *LSE, const float *Delta, int b, int H, int h, int N, int G, int i) {
    const size_t li = ((size_t)b * H + h) * N + i;
    l2 = i < N ? LSE[li] * LOG2E : INFINITY;
    dl = i < N ? Delta[li] : 0.f;
    fk = i < N ? (int)s2_first_key((size_t)i, h, H, (size_t)G) : N;
}

template <int D, int BM, int BN, int NW>
__global__ void __launch_bounds__(NW * 32, NW <= 4 ? 2 : 1)
flash_bwd_kernel(const bf16 *__restrict__ Q, const bf16 *__restrict__ K, const bf16 *__restrict__ V,
                 const bf16 *__restrict__ dO,     /* [B, N, H, d] */
                 const float *__restrict__ LSE,   /* [B, H, N] */
                 const float *__restrict__ Delta, /* [B, H, N] */
                 float *__restrict__ dQacc,       /* [B, H, padded N / 32, D / 8, 8, 32] fp32 in fragment order, zeroed */
                 bf16 *__restrict__ dK, bf16 *__restrict__ dV, /* [B, N, Hk, d] */
                 int N, int H, int Hk, int G, float scale_log2, float scale) {
    constexpr int NTHR = NW * 32;
    static_assert(BN == 16 * NW, "each warp pair owns 32 keys");
    constexpr int QH = BM / 2;            /* queries of one warp's S^T (a half tile) */
    constexpr int DH = D / 2;             /* columns of one warp's dK and dV (a half row) */
    constexpr int MTQ = BM / 32;          /* strips of 32 queries in the dQ product */
    constexpr int DSPLIT = NW / MTQ;      /* warps sharing one strip of dQ */
    constexpr int DW = D / DSPLIT;        /* dQ columns per warp */
    static_assert(NW % MTQ == 0 && DW % 16 == 0 && QH % 16 == 0 && DH % 16 == 0, "warp split");
    static_assert(BM % 32 == 0 && DQF_ROWS % BM == 0, "query tiles are whole strips of the fragment-order dQ");
    extern __shared__ __align__(128) unsigned char smem[];
    const uint32_t sK = smem_addr(smem);          /* [BN, D] */
    const uint32_t sV = sK + BN * D * 2;          /* [BN, D] */
    const uint32_t sQ = sV + BN * D * 2;          /* [2, BM, D] */
    const uint32_t sdO = sQ + 2 * BM * D * 2;     /* [2, BM, D] */
    const uint32_t sP = sdO + 2 * BM * D * 2;     /* [BN, BM]  P^T */
    const uint32_t sdS = sP + BN * BM * 2;        /* [BN, BM]  dS^T */
    float *sL = (float *)(smem + (size_t)(2 * BN * D + 4 * BM * D + 2 * BN * BM) * 2); /* [2, BM] lse (0 past N) */
    float *sDl = sL + 2 * BM;                     /* [2, BM] Delta */
    int *sFk = (int *)(sDl + 2 * BM);             /* [2, BM] s2_first_key of each query */
    const uint32_t ds_full = smem_addr(sFk + 2 * BM); /* mbarrier: every thread's P^T, dS^T stores of the tile are in */

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int pair = warp >> 1, half = warp & 1; /* warps 2p and 2p + 1 share keys 32p..32p+31 */
    const int n_block = blockIdx.x, kh = blockIdx.y, b = blockIdx.z;
    const int R = H / Hk;
    const size_t q_stride = (size_t)H * D, kv_stride = (size_t)Hk * D;
    const int n0 = n_block * BN, n_last = min(n0 + BN, N) - 1;

    const BwdTiles tiles = {R, kh, n0 / BM, n_last, BM, H, G, N};
    if (tid == 0) mbar_init(ds_full, NTHR);
    load_tile_async<D, BN, NTHR>(sK, K + (size_t)b * N * kv_stride + (size_t)kh * D, kv_stride, n0, N, tid);
    load_tile_async<D, BN, NTHR>(sV, V + (size_t)b * N * kv_stride + (size_t)kh * D, kv_stride, n0, N, tid);
    __syncthreads(); /* the mbarrier visible */
    const int total = tiles.total();

    /* queues the Q / dO / lse / Delta tile of (head h, query tile mt) into buffer buf, all
     * by cp.async (lse and Delta 4 bytes a row, zeros past N, where the mask clears P), so
     * that no warp waits on a global load inside the loop; the window starts need no load */
    auto load_q_tile = [&](int h, int mt, int buf) {
        const size_t off = (size_t)b * N * q_stride + (size_t)h * D;
        if (N - mt * BM >= BM) { /* a whole tile, every tile but perhaps the last: no row test */
            load_tile_async<D, BM, NTHR, false>(sQ + buf * BM * D * 2, Q + off, q_stride, mt * BM, N, tid);
            load_tile_async<D, BM, NTHR, false>(sdO + buf * BM * D * 2, dO + off, q_stride, mt * BM, N, tid);
        } else {
            load_tile_async<D, BM, NTHR>(sQ + buf * BM * D * 2, Q + off, q_stride, mt * BM, N, tid);
            load_tile_async<D, BM, NTHR>(sdO + buf * BM * D * 2, dO + off, q_stride, mt * BM, N, tid);
        }
        static_assert(BM <= NTHR, "one thread a row");
        if (tid < BM) { /* not a loop: ptxas unrolled one into four copies and a remainder */
            const int r = tid, i = mt * BM + r;
            const size_t li = ((size_t)b * H + h) * N + min(i, N - 1);
            cp_async4(smem_addr(sL + buf * BM + r), LSE + li, i < N);
            cp_async4(smem_addr(sDl + buf * BM + r), Delta + li, i < N);
            sFk[buf * BM + r] = i < N ? (int)s2_first_key((size_t)i, h, H, (size_t)G) : N;
        }
    };
    int cur_r, cur_mt, cur_hi;
    tiles.first(cur_r, cur_mt, cur_hi);
    load_q_tile(kh * R, cur_mt, 0);
    cp_async_commit();

    /* dK, dV of this warp's 32 keys (two m16 tiles) x its half of the columns */
    float dk_acc[2][DH / 8][4], dv_acc[2][DH / 8][4];
#pragma unroll
    for (int mi = 0; mi < 2; mi++)
#pragma unroll
        for (int dn = 0; dn < DH / 8; dn++)
#pragma unroll
            for (int e = 0; e < 4; e++) dk_acc[mi][dn][e] = dv_acc[mi][dn][e] = 0.f;

    /* dQ[BM, D] += dS K for the tile whose dS^T sits in sdS, warps re-split as BM / 32 strips
     * of 32 queries x DSPLIT column slices (each dS and K fragment feeds two or more MMAs);
     * the sum goes to the fp32 accumulator atomically */
    auto dq_tile = [&](int h, int m0) {
        const int mrow = (warp % MTQ) * 32, dcol0 = (warp / MTQ) * DW;
        float dq[2][DW / 8][4];
#pragma unroll
        for (int mi = 0; mi < 2; mi++)
#pragma unroll
            for (int dn = 0; dn < DW / 8; dn++)
#pragma unroll
                for (int e = 0; e < 4; e++) dq[mi][dn][e] = 0.f;
#pragma unroll
        for (int kc = 0; kc < BN / 16; kc++) {
            uint32_t a[2][4];
#pragma unroll
            for (int mi = 0; mi < 2; mi++)
                ldmatrix_x4_trans(a[mi], swz<BM>(sdS, kc * 16 + (lane & 7) + ((lane >> 4) & 1) * 8, (mrow + mi * 16) / 8 + ((lane >> 3) & 1)));
#pragma unroll
            for (int dp = 0; dp < DW / 16; dp++) {
                uint32_t bk[4];
                ldmatrix_x4_trans(bk, swz<D>(sK, kc * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, dcol0 / 8 + dp * 2 + (lane >> 4)));
#pragma unroll
                for (int mi = 0; mi < 2; mi++) {
                    mma_bf16(dq[mi][2 * dp], a[mi], bk[0], bk[1]);
                    mma_bf16(dq[mi][2 * dp + 1], a[mi], bk[2], bk[3]);
                }
            }
        }
        /* the adds, straight from the accumulators: the accumulator is in fragment order
         * (DQF_ROWS above), so lane l's value (mi, dn, e) goes to float (mi * 4 + e) * 32 + l
         * of block dcol0 / 8 + dn of this strip, and each add instruction of the warp covers
         * one 128-byte line; one address a tile, every other an immediate offset. Rows past N
         * hold zeros (P = 0 there) and go to the padding. */
        float *dq_lane = dQacc + dqf_strip_offset(b, h, (m0 + mrow) / 32, H, N, D) + (dcol0 / 8) * 256 + lane;
#pragma unroll
        for (int mi = 0; mi < 2; mi++)
#pragma unroll
            for (int dn = 0; dn < DW / 8; dn++)
#pragma unroll
                for (int e = 0; e < 4; e++)
                    asm volatile("red.global.add.f32 [%0], %1;\n" ::"l"(dq_lane + dn * 256 + (mi * 4 + e) * 32), "f"(dq[mi][dn][e]));
    };

    const int key0 = n0 + pair * 32; /* first key of this warp pair */
    const int ql0 = half * QH;       /* first query (within the tile) of this warp's S^T */
    const int dc0 = half * DH;       /* first column of this warp's dK and dV */
    /* KV_REGS (d = 64, where the registers allow): the A fragments of this pair's 32 keys of K
     * and V, the same for every query tile, are loaded once (after barrier A of the first
     * tile, which publishes the K/V copy) and kept in 2 x D / 4 registers, instead of 4 x D / 16
     * ldmatrix a tile */
    constexpr bool KV_REGS = D == 64;
    uint32_t k_frag[KV_REGS ? D / 16 : 1][2][4], v_frag[KV_REGS ? D / 16 : 1][2][4]; /* [D/16 k-steps][2 m16][4] */
    for (int it = 0; it < total; it++) {
        const int buf = it & 1;
        const int h = kh * R + cur_r, m0 = cur_mt * BM;
        /* barrier A publishes this tile's Q/dO, and tells that every warp is done with the
         * previous tile's P^T, dS^T and the buffers the next copy refills */
        cp_async_wait<0>();
        __syncthreads();
        if constexpr (KV_REGS) {
            if (it == 0) {
#pragma unroll
                for (int kc = 0; kc < D / 16; kc++)
#pragma unroll
                    for (int mi = 0; mi < 2; mi++) {
                        ldmatrix_x4(k_frag[kc][mi], swz<D>(sK, pair * 32 + mi * 16 + (lane & 15), kc * 2 + (lane >> 4)));
                        ldmatrix_x4(v_frag[kc][mi], swz<D>(sV, pair * 32 + mi * 16 + (lane & 15), kc * 2 + (lane >> 4)));
                    }
            }
        }
        int nxt_r = cur_r, nxt_mt = cur_mt, nxt_hi = cur_hi; /* the next (head, query tile) */
        tiles.next(nxt_r, nxt_mt, nxt_hi);
        if (it + 1 < total) load_q_tile(kh * R + nxt_r, nxt_mt, buf ^ 1);
        cp_async_commit();

        const uint32_t qt = sQ + buf * BM * D * 2, dot = sdO + buf * BM * D * 2;
        const float *lse_t = sL + buf * BM, *dl = sDl + buf * BM;
        const int *fk = sFk + buf * BM;
        const int m_last = min(m0 + BM, N) - 1;
        /* this warp: S^T, dP^T of its pair's 32 keys x its half of the queries, qa..qb */
        const int qa = m0 + ql0, qb = min(qa + QH, N) - 1;
        const bool warp_active = qa < N && key0 <= qb && key0 + 31 >= fk[ql0];
        const bool pair_active = key0 <= m_last && key0 + 31 >= fk[0];
        /* P^T and dS^T packed to bf16 as soon as each pair is computed: the A fragments (m16
         * keys x k16 queries) of dV and dK for this warp's own half of the queries */
        uint32_t p_frag[2][QH / 16][4], ds_frag[2][QH / 16][4];
        if (warp_active) {
            float st[2][QH / 8][4], dpt[2][QH / 8][4];
#pragma unroll
            for (int mi = 0; mi < 2; mi++)
#pragma unroll
                for (int nt = 0; nt < QH / 8; nt++)
#pragma unroll
                    for (int e = 0; e < 4; e++) st[mi][nt][e] = dpt[mi][nt][e] = 0.f;
            /* S^T = K Q^T and dP^T = V dO^T */
#pragma unroll
            for (int kc = 0; kc < D / 16; kc++) {
                uint32_t ak[2][4], av[2][4];
#pragma unroll
                for (int mi = 0; mi < 2; mi++) {
                    if constexpr (KV_REGS) {
#pragma unroll
                        for (int e = 0; e < 4; e++) ak[mi][e] = k_frag[kc][mi][e], av[mi][e] = v_frag[kc][mi][e];
                    } else {
                        ldmatrix_x4(ak[mi], swz<D>(sK, pair * 32 + mi * 16 + (lane & 15), kc * 2 + (lane >> 4)));
                        ldmatrix_x4(av[mi], swz<D>(sV, pair * 32 + mi * 16 + (lane & 15), kc * 2 + (lane >> 4)));
                    }
                }
#pragma unroll
                for (int np = 0; np < QH / 16; np++) {
                    uint32_t bq[4], bo[4];
                    const int row = ql0 + np * 16 + (lane & 7) + ((lane >> 4) << 3), ch = kc * 2 + ((lane >> 3) & 1);
                    ldmatrix_x4(bq, swz<D>(qt, row, ch));
                    ldmatrix_x4(bo, swz<D>(dot, row, ch));
#pragma unroll
                    for (int mi = 0; mi < 2; mi++) {
                        mma_bf16(st[mi][2 * np], ak[mi], bq[0], bq[1]);
                        mma_bf16(st[mi][2 * np + 1], ak[mi], bq[2], bq[3]);
                        mma_bf16(dpt[mi][2 * np], av[mi], bo[0], bo[1]);
                        mma_bf16(dpt[mi][2 * np + 1], av[mi], bo[2], bo[3]);
                    }
                }
            }
            const bool need_mask = key0 + 31 > qa || fk[qb - m0] > key0 || qa + QH > N;
            /* accumulator (mi, nt, e) -> fragment [mi][nt / 2][2 * (nt % 2) + e / 2], pairs e, e + 1;
             * compiled twice (masked: std::true_type), so that the tiles that need no mask, most
             * of them, run no test and no branch an element (bench/NOTES.md step 20) */
            auto softmax = [&](auto masked) {
#pragma unroll
                for (int mi = 0; mi < 2; mi++)
#pragma unroll
                    for (int nt = 0; nt < QH / 8; nt++)
#pragma unroll
                        for (int hf = 0; hf < 2; hf++) {
                            float p2[2], ds2[2];
#pragma unroll
                            for (int e1 = 0; e1 < 2; e1++) {
                                const int e = 2 * hf + e1, ql = ql0 + nt * 8 + 2 * t + e1; /* query within the tile */
                                float p = fast_exp2(fmaf(st[mi][nt][e], scale_log2, -LOG2E * lse_t[ql]));
                                if (decltype(masked)::value) {
                                    const int q = m0 + ql, key = key0 + mi * 16 + g + 8 * hf;
                                    p = key > q || q >= N || key < fk[ql] ? 0.f : p;
                                }
                                p2[e1] = p;
                                ds2[e1] = p * (dpt[mi][nt][e] - dl[ql]);
                            }
                            p_frag[mi][nt / 2][2 * (nt % 2) + hf] = pack_bf16(p2[0], p2[1]);
                            ds_frag[mi][nt / 2][2 * (nt % 2) + hf] = pack_bf16(ds2[0], ds2[1]);
                        }
            };
            if (need_mask) softmax(std::true_type{});
            else softmax(std::false_type{});
        } else {
#pragma unroll
            for (int mi = 0; mi < 2; mi++)
#pragma unroll
                for (int kc = 0; kc < QH / 16; kc++)
#pragma unroll
                    for (int e = 0; e < 4; e++) p_frag[mi][kc][e] = ds_frag[mi][kc][e] = 0u;
        }
        /* P^T and dS^T -> shared memory [BN, BM]: the partner warp's half of dV and dK, and dQ */
#pragma unroll
        for (int mi = 0; mi < 2; mi++)
#pragma unroll
            for (int nt = 0; nt < QH / 8; nt++)
#pragma unroll
                for (int hf = 0; hf < 2; hf++) {
                    const int row = pair * 32 + mi * 16 + g + 8 * hf, ch = ql0 / 8 + nt;
                    asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(swz<BM>(sP, row, ch) + 4 * t), "r"(p_frag[mi][nt / 2][2 * (nt % 2) + hf]));
                    asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(swz<BM>(sdS, row, ch) + 4 * t), "r"(ds_frag[mi][nt / 2][2 * (nt % 2) + hf]));
                }
        /* this thread's share of dS^T is in (the dQ product waits for all of it below, so a
         * warp that is done with dV and dK need not wait for the slowest one's, as a block
         * barrier would make it); then the pair's named barrier (1 + pair, 64 threads): the
         * partner's half is in place */
        mbar_arrive_if(ds_full, true);
        named_bar_sync(1 + pair, 64);
        if (pair_active) {
            /* dV += P^T dO, dK += dS^T Q: 32 keys x this warp's DH columns, over all BM queries
             * (own half from registers, the partner's from shared memory) */
#pragma unroll
            for (int kk = 0; kk < BM / 16; kk++) {
                /* own half first (kk < QH / 16), then the partner's: a compile-time choice, no
                 * branch; kc is the k16 step over the tile's queries */
                const bool own = kk < QH / 16;
                const int kc = (own ? half : 1 - half) * (QH / 16) + kk % (QH / 16);
                uint32_t pa[2][4], dsa[2][4];
#pragma unroll
                for (int mi = 0; mi < 2; mi++) {
                    if (own) {
#pragma unroll
                        for (int e = 0; e < 4; e++) pa[mi][e] = p_frag[mi][kk % (QH / 16)][e], dsa[mi][e] = ds_frag[mi][kk % (QH / 16)][e];
                    } else {
                        ldmatrix_x4(pa[mi], swz<BM>(sP, pair * 32 + mi * 16 + (lane & 15), kc * 2 + (lane >> 4)));
                        ldmatrix_x4(dsa[mi], swz<BM>(sdS, pair * 32 + mi * 16 + (lane & 15), kc * 2 + (lane >> 4)));
                    }
                }
#pragma unroll
                for (int dp = 0; dp < DH / 16; dp++) {
                    uint32_t bo[4], bq[4];
                    const int row = kc * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, ch = dc0 / 8 + dp * 2 + (lane >> 4);
                    ldmatrix_x4_trans(bo, swz<D>(dot, row, ch));
                    ldmatrix_x4_trans(bq, swz<D>(qt, row, ch));
#pragma unroll
                    for (int mi = 0; mi < 2; mi++) {
                        mma_bf16(dv_acc[mi][2 * dp], pa[mi], bo[0], bo[1]);
                        mma_bf16(dv_acc[mi][2 * dp + 1], pa[mi], bo[2], bo[3]);
                        mma_bf16(dk_acc[mi][2 * dp], dsa[mi], bq[0], bq[1]);
                        mma_bf16(dk_acc[mi][2 * dp + 1], dsa[mi], bq[2], bq[3]);
                    }
                }
            }
        }
        mbar_wait(ds_full, it & 1); /* all of dS^T is in place (bench/NOTES.md step 26) */
        dq_tile(h, m0);
        cur_r = nxt_r, cur_mt = nxt_mt, cur_hi = nxt_hi;
    }

    /* dK = scale * dS^T Q summed, dV: straight from registers */
#pragma unroll
    for (int mi = 0; mi < 2; mi++)
#pragma unroll
        for (int hf = 0; hf < 2; hf++) {
            const int key = key0 + mi * 16 + g + 8 * hf;
            if (key < N) {
                const size_t off = ((size_t)b * N + key) * kv_stride + (size_t)kh * D + dc0 + 2 * t;
#pragma unroll
                for (int dn = 0; dn < DH / 8; dn++) {
                    *(uint32_t *)(dK + off + dn * 8) = pack_bf16(dk_acc[mi][dn][2 * hf] * scale, dk_acc[mi][dn][2 * hf + 1] * scale);
                    *(uint32_t *)(dV + off + dn * 8) = pack_bf16(dv_acc[mi][dn][2 * hf], dv_acc[mi][dn][2 * hf + 1]);
                }
            }
        }
}

/* ---------------------------------------------------------------------------------------
 * Flash attention backward on Hopper's warpgroup MMA (wgmma, sm_90a only)
 * The algorithm of flash_bwd_kernel with all five products as asynchronous warpgroup MMAs.
 * One block = BN = 128 keys of one kv head, two warpgroups of 64 keys each; K and V stay in
 * shared memory, tiles of BM = 64 queries stream through two buffers. Per query tile each
 * warpgroup computes, for its 64 keys:
 *   S^T = K Q^T, dP^T = V dO^T        A = K or V, B = Q or dO, both from shared memory
 *   P^T, dS^T = P^T (dP^T - Delta)    in registers, in the accumulators' layout
 *   dV += P^T dO, dK += dS^T Q        A = P^T or dS^T from registers, B read N-major
 * and writes dS^T to shared memory for dQ[64, d] += dS K (A = dS^T read N-major, i.e.
 * transposed by the tensor core; B = K), which the two warpgroups split by columns at
 * d = 128 and by keys at d = 64 (each its own 64). A tile's dQ runs after the next tile's
 * barrier, issued before that tile's products, so that its fp32 atomics go out while they
 * run (ptxas places them after S^T's wait, among the exp2 of P, while dP^T runs).
 * Tiles are in the wgmma forward's 128-byte-swizzle layout; Q and dO serve as K-major B in
 * one product and as N-major B in another, from the same bytes.
 * ptxas serialises every wgmma of a kernel (warning C7515) when a non-wgmma instruction
 * writes an accumulator in place (P over S, say): P and dS go straight into new registers.
 * ------------------------------------------------------------------------------------- */
#define WG_ACC4(d, i) "+f"(d[i][0]), "+f"(d[i][1]), "+f"(d[i][2]), "+f"(d[i][3])
#define WG_ACC_N64(d) WG_ACC4(d, 0), WG_ACC4(d, 1), WG_ACC4(d, 2), WG_ACC4(d, 3), WG_ACC4(d, 4), WG_ACC4(d, 5), WG_ACC4(d, 6), WG_ACC4(d, 7)
/* d[64 x 64] (+)= A B with both operands in shared memory; TA / TB: operand stored N-major */
template <int TA, int TB>
__device__ __forceinline__ void wgmma_ss_m64n64k16(float d[8][4], uint64_t desc_a, uint64_t desc_b, int accumulate) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, %32, %33, p, 1, 1, %35, %36;\n}\n"
                 : WG_ACC_N64(d)
                 : "l"(desc_a), "l"(desc_b), "r"(accumulate), "n"(TA), "n"(TB));
}

/* acc[64, 64] = X Y^T over D: X = 64 rows (from x_row0) of a K-major [D/64][BN][64] tile,
 * Y = a K-major [D/64][64][64] tile */
template <int D, int BN>
__device__ __forceinline__ void wgmma_xyt(float acc[8][4], uint32_t x_tile, int x_row0, uint32_t y_tile) {
    const uint64_t x_desc = wgmma_desc(x_tile + x_row0 * 128, 16, 1024), y_desc = wgmma_desc(y_tile, 16, 1024);
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) {
        const uint64_t da = desc_plus(x_desc, (kk / 4) * BN * 128 + (kk % 4) * 32);
        const uint64_t db = desc_plus(y_desc, (kk / 4) * 64 * 128 + (kk % 4) * 32);
        wgmma_ss_m64n64k16<0, 0>(acc, da, db, kk > 0);
    }
}
/* acc[64, D] += A Y: A [64, 64] as register fragments, Y = [D/64][64][64] read N-major */
template <int D>
__device__ __forceinline__ void wgmma_ay(float acc[D / 8][4], const uint32_t a_frag[4][4], uint32_t y_tile) {
    const uint64_t y_desc = wgmma_desc(y_tile, 64 * 128, 1024);
#pragma unroll
    for (int kk = 0; kk < 4; kk++) {
        const uint64_t db = desc_plus(y_desc, kk * 16 * 128);
        if constexpr (D == 128) wgmma_m64n128k16<1>(acc, a_frag[kk], db, 1);
        else wgmma_m64n64k16<1>(acc, a_frag[kk], db, 1);
    }
}
/* the bf16 A fragment of a [64, 64] accumulator's 16-column slice kk: a[kk][0..3] hold
 * (row g, cols 16kk+2t..), (row g+8, same), (row g, cols 16kk+8+2t..), (row g+8, same);
 * f(nt, e) gives accumulator element e of n8 chunk nt */
template <typename F> __device__ __forceinline__ void pack_a_frags(uint32_t a[4][4], F f) {
#pragma unroll
    for (int kk = 0; kk < 4; kk++) {
        a[kk][0] = pack_bf16(f(2 * kk, 0), f(2 * kk, 1));
        a[kk][1] = pack_bf16(f(2 * kk, 2), f(2 * kk, 3));
        a[kk][2] = pack_bf16(f(2 * kk + 1, 0), f(2 * kk + 1, 1));
        a[kk][3] = pack_bf16(f(2 * kk + 1, 2), f(2 * kk + 1, 3));
    }
}

/* The per-tile pieces both wgmma backward kernels run (flash_bwd_wgmma_kernel, every thread
 * copying, and flash_bwd_tma_kernel, warp-specialised). A thread of warp wi (of its
 * warpgroup), lane (g, t), holds keys key_row = (the warpgroup's first key) + 16 wi + g and
 * key_row + 8 of a 64-query tile starting at m0. */

/* does this warpgroup's [64 keys from key0] x [64 queries from m0] tile straddle a window
 * edge or N (fk = window starts of the tile's queries)? */
__device__ __forceinline__ bool bwd_tile_needs_mask(int m0, int key0, const int *fk, int N) {
    const int m_last = min(m0 + 64, N) - 1;
    return m0 < key0 + 63 || fk[m_last - m0] > key0 || m0 + 64 > N;
}
/* P^T = exp2(S^T * scale_log2 - lse2[query]), zero outside each query's window and past N;
 * into new registers (see the head of this section) */
__device__ __forceinline__ void bwd_p_tile(float (&pt)[8][4], const float (&st)[8][4], const float *lse2, const int *fk, bool need_mask, int m0,
                                           int key_row, int N, int t, float scale_log2) {
#pragma unroll
    for (int nt = 0; nt < 8; nt++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int ql = nt * 8 + 2 * t + (e & 1); /* query within the tile */
            float p = fast_exp2(fmaf(st[nt][e], scale_log2, -lse2[ql]));
            if (need_mask) {
                const int q = m0 + ql, key = key_row + 8 * (e >> 1);
                if (key > q || q >= N || key < fk[ql]) p = 0.f;
            }
            pt[nt][e] = p;
        }
}
/* dS^T = P^T (dP^T - Delta) as bf16 A fragments, also stored to the [BN keys][64 queries]
 * dS^T tile ds_t (128-byte rows, swizzled): fragment kk holds query columns 16kk + 2t (+1)
 * and 16kk + 8 + 2t (+1) of key rows r0 and r0 + 8 (r0 = the tile row of key_row, r0 & 7 == g) */
__device__ __forceinline__ void bwd_ds_tile(uint32_t (&ds_frag)[4][4], const float (&pt)[8][4], const float (&dpt)[8][4], const float *dl,
                                            uint32_t ds_t, int r0, int g, int t) {
    pack_a_frags(ds_frag, [&](int nt, int e) { return pt[nt][e] * (dpt[nt][e] - dl[nt * 8 + 2 * t + (e & 1)]); });
#pragma unroll
    for (int kk = 0; kk < 4; kk++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int row = r0 + 8 * (e & 1), chunk = 2 * kk + (e >> 1);
            asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(ds_t + row * 128 + ((chunk ^ g) << 4) + 4 * t), "r"(ds_frag[kk][e]));
        }
}
/* The middle of a tile, once S^T and dP^T have been issued as the last two groups: waits for
 * S^T, computes P^T, issues dV += P^T dO as a new group (A = p_frag, which stays untouched
 * while it runs), waits for dP^T, and computes dS^T into ds_frag and the dS^T tile ds_t
 * (bwd_ds_tile; r0 = the tile row of key_row). */
template <int D>
__device__ __forceinline__ void bwd_p_dv_ds(float (&st)[8][4], float (&dpt)[8][4], float (&dv_acc)[D / 8][4], uint32_t (&p_frag)[4][4],
                                            uint32_t (&ds_frag)[4][4], const float *lse2, const float *dl, const int *fk, bool need_mask, int m0,
                                            int key_row, int N, uint32_t dot, uint32_t ds_t, int r0, int g, int t, float scale_log2) {
    wgmma_wait<1>();
    pin_regs(st);
    float pt[8][4];
    bwd_p_tile(pt, st, lse2, fk, need_mask, m0, key_row, N, t, scale_log2);
    pack_a_frags(p_frag, [&](int nt, int e) { return pt[nt][e]; });
    pin_regs(p_frag);
    pin_regs(dv_acc);
    wgmma_fence();
    wgmma_ay<D>(dv_acc, p_frag, dot);
    wgmma_commit();
    wgmma_wait<1>(); /* dP^T is done; dV runs on */
    pin_regs(dpt);
    bwd_ds_tile(ds_frag, pt, dpt, dl, ds_t, r0, g, t);
}
/* dQ[64, d] (=) dS K for the tile whose dS^T is ds_t ([BN = 128 keys][64 queries]). Warpgroup
 * wg's share: d = 128, columns 64wg.. over all 128 keys; d = 64, all columns over its own 64
 * keys. Either way 64 queries x 64 columns, starting at column bwd_dq_col0<D>(wg). */
template <int D> __device__ __forceinline__ int bwd_dq_col0(int wg) { return D == 64 ? 0 : 64 * wg; }
template <int D> __device__ __forceinline__ void bwd_dq_issue(float (&dq)[8][4], uint32_t ds_t, uint32_t sK, int wg) {
    constexpr bool BY_KEYS = D == 64;
    constexpr int BN = 128;
    const int key0 = BY_KEYS ? 64 * wg : 0, col_atom = BY_KEYS ? 0 : wg;
    const uint32_t a_t = ds_t + key0 * 128, k_t = sK + col_atom * BN * 128 + key0 * 128;
    const uint64_t a_desc = wgmma_desc(a_t, BN * 128, 1024), k_desc = wgmma_desc(k_t, BN * 128, 1024);
#pragma unroll
    for (int kk = 0; kk < (BY_KEYS ? 4 : 8); kk++)
        wgmma_ss_m64n64k16<1, 1>(dq, desc_plus(a_desc, kk * 16 * 128), desc_plus(k_desc, kk * 16 * 128), kk > 0);
}
/* dQacc rows m0.. of head h += this thread's share of bwd_dq_issue's product, by float2
 * atomics; rows past N hold zeros (P = 0 there) and go to row N-1, with no branch */
template <int D>
__device__ __forceinline__ void bwd_dq_atomic_add(const float (&dq)[8][4], float *dQacc, int b, int N, int H, int h, int m0, int wg, int wi, int g, int t) {
#pragma unroll
    for (int hf = 0; hf < 2; hf++) {
        const int q = min(m0 + 16 * wi + g + 8 * hf, N - 1);
        float *dst = dQacc + ((size_t)b * N + q) * H * D + (size_t)h * D + bwd_dq_col0<D>(wg) + 2 * t;
#pragma unroll
        for (int dn = 0; dn < 8; dn++) atomicAdd((float2 *)(dst + dn * 8), make_float2(dq[dn][2 * hf], dq[dn][2 * hf + 1]));
    }
}
/* dK = scale * (sum of dS^T Q), dV = sum of P^T dO: this thread's two key rows, from registers */
template <int D>
__device__ __forceinline__ void bwd_store_dkdv(const float (&dk_acc)[D / 8][4], const float (&dv_acc)[D / 8][4], bf16 *dK, bf16 *dV, int b, int N,
                                               int Hk, int kh, int key_row, int t, float scale) {
#pragma unroll
    for (int hf = 0; hf < 2; hf++) {
        const int key = key_row + 8 * hf;
        if (key < N) {
            const size_t off = ((size_t)b * N + key) * Hk * D + (size_t)kh * D + 2 * t;
#pragma unroll
            for (int dn = 0; dn < D / 8; dn++) {
                *(uint32_t *)(dK + off + dn * 8) = pack_bf16(dk_acc[dn][2 * hf] * scale, dk_acc[dn][2 * hf + 1] * scale);
                *(uint32_t *)(dV + off + dn * 8) = pack_bf16(dv_acc[dn][2 * hf], dv_acc[dn][2 * hf + 1]);
            }
        }
    }
}

template <int D>
__global__ void __launch_bounds__(256, 1)
flash_bwd_wgmma_kernel(const bf16 *__restrict__ Q, const bf16 *__restrict__ K, const bf16 *__restrict__ V,
                       const bf16 *__restrict__ dO,     /* [B, N, H, d] */
                       const float *__restrict__ LSE,   /* [B, H, N] */
                       const float *__restrict__ Delta, /* [B, H, N] */
                       float *__restrict__ dQacc,       /* [B, N, H, d] fp32, zeroed */
                       bf16 *__restrict__ dK, bf16 *__restrict__ dV, /* [B, N, Hk, d] */
                       int N, int H, int Hk, int G, float scale_log2, float scale) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    constexpr int BN = 128, BM = 64, NTHR = 256;
    extern __shared__ __align__(128) unsigned char smem[];
    const uint32_t base = (smem_addr(smem) + 1023u) & ~1023u;
    const uint32_t sK = base;                        /* [D/64][BN][64] */
    const uint32_t sV = sK + BN * D * 2;             /* [D/64][BN][64] */
    const uint32_t sQ = sV + BN * D * 2;             /* [2][D/64][BM][64] */
    const uint32_t sdO = sQ + 2 * BM * D * 2;        /* [2][D/64][BM][64] */
    const uint32_t sdS = sdO + 2 * BM * D * 2;       /* [2][BN][BM]  dS^T, keys as rows, swizzled */
    float *sL = (float *)(smem + (sdS + 2 * BN * BM * 2 - smem_addr(smem))); /* [2, BM] lse * log2(e) */
    float *sDl = sL + 2 * BM;                        /* [2, BM] Delta */
    int *sFk = (int *)(sDl + 2 * BM);                /* [2, BM] s2_first_key of each query */

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, wi = warp & 3;
    const int wg = __shfl_sync(0xffffffffu, warp >> 2, 0); /* known warp-uniform: descriptors stay uniform */
    const int g = lane >> 2, t = lane & 3;
    const int n_block = blockIdx.x, kh = blockIdx.y, b = blockIdx.z;
    const int R = H / Hk;
    const size_t q_stride = (size_t)H * D, kv_stride = (size_t)Hk * D;
    const int n0 = n_block * BN, n_last = min(n0 + BN, N) - 1;
    const int wg_key0 = n0 + 64 * wg;                /* this warpgroup's 64 keys: rows of dK, dV */
    const int key_row = wg_key0 + 16 * wi + g;       /* this thread's keys: key_row, key_row + 8 */

    const BwdTiles tiles = {R, kh, n0 / BM, n_last, BM, H, G, N};
    load_tile_atoms_async<D, BN, NTHR>(sK, K + (size_t)b * N * kv_stride + (size_t)kh * D, kv_stride, n0, N, tid);
    load_tile_atoms_async<D, BN, NTHR>(sV, V + (size_t)b * N * kv_stride + (size_t)kh * D, kv_stride, n0, N, tid);
    const int total = tiles.total();

    auto load_q_tile = [&](int h, int mt, int buf) {
        const size_t off = (size_t)b * N * q_stride + (size_t)h * D;
        load_tile_atoms_async<D, BM, NTHR>(sQ + buf * BM * D * 2, Q + off, q_stride, mt * BM, N, tid);
        load_tile_atoms_async<D, BM, NTHR>(sdO + buf * BM * D * 2, dO + off, q_stride, mt * BM, N, tid);
    };
    /* the per-query values of (head h, tile mt), thread tid < BM holding query tid: read into
     * registers after a barrier, stored to shared memory before the next, so that their
     * latency hides behind the tile's products */
    float row_l = 0.f, row_dl = 0.f;
    int row_fk = 0;
    auto fetch_row = [&](int h, int mt) {
        if (tid < BM) bwd_row_values(row_l, row_dl, row_fk, LSE, Delta, b, H, h, N, G, mt * BM + tid);
    };
    auto store_row = [&](int buf) {
        if (tid < BM) { sL[buf * BM + tid] = row_l; sDl[buf * BM + tid] = row_dl; sFk[buf * BM + tid] = row_fk; }
    };
    int cur_r, cur_mt, cur_hi;
    tiles.first(cur_r, cur_mt, cur_hi);
    load_q_tile(kh * R, cur_mt, 0);
    cp_async_commit();
    fetch_row(kh * R, cur_mt);
    store_row(0);

    float dk_acc[D / 8][4], dv_acc[D / 8][4];
#pragma unroll
    for (int dn = 0; dn < D / 8; dn++)
#pragma unroll
        for (int e = 0; e < 4; e++) dk_acc[dn][e] = dv_acc[dn][e] = 0.f;

    auto dq_issue = [&](float (&dq)[8][4], int sbuf) { bwd_dq_issue<D>(dq, sdS + sbuf * BN * BM * 2, sK, wg); };
    auto dq_add = [&](const float (&dq)[8][4], int h, int m0) { bwd_dq_atomic_add<D>(dq, dQacc, b, N, H, h, m0, wg, wi, g, t); };

    /* the dQ of "tile -1" adds nothing: the other dS^T buffer starts as zeros */
    for (int c = tid; c < BN * BM / 8; c += NTHR)
        asm volatile("st.shared.v4.b32 [%0], {%1, %1, %1, %1};\n" ::"r"(sdS + BN * BM * 2 + c * 16), "r"(0));
    int prev_h = kh * R, prev_m0 = cur_mt * BM;
    /* Each tile's work is one straight run of code, every warpgroup doing all of it (a
     * warpgroup whose 64 keys the tile skips gets P = 0): ptxas keeps the wgmma pipeline
     * only when it can follow which commit group each wait retires. */
    for (int it = 0; it < total; it++) {
        const int buf = it & 1;
        const int h = kh * R + cur_r, m0 = cur_mt * BM;
        /* One barrier per tile: it publishes this tile's Q/dO/row values and the previous
         * tile's dS^T, and tells that every warp is done with the buffers refilled next. */
        cp_async_wait<0>();
        fence_proxy_async(); /* this thread's cp.async and st.shared writes -> wgmma reads */
        __syncthreads();
        int nxt_r = cur_r, nxt_mt = cur_mt, nxt_hi = cur_hi;
        tiles.next(nxt_r, nxt_mt, nxt_hi);
        if (it + 1 < total) {
            load_q_tile(kh * R + nxt_r, nxt_mt, buf ^ 1);
            fetch_row(kh * R + nxt_r, nxt_mt);
        }
        cp_async_commit();

        const uint32_t qt = sQ + buf * BM * D * 2, dot = sdO + buf * BM * D * 2;
        const float *lse2 = sL + buf * BM, *dl = sDl + buf * BM;
        const int *fk = sFk + buf * BM;

        /* group 1: the previous tile's dQ; groups 2, 3: S^T and dP^T */
        float dq[8][4], st[8][4], dpt[8][4];
        pin_regs(dq);
        pin_regs(st);
        pin_regs(dpt);
        wgmma_fence();
        dq_issue(dq, buf ^ 1);
        wgmma_commit();
        wgmma_xyt<D, BN>(st, sK, 64 * wg, qt);
        wgmma_commit();
        wgmma_xyt<D, BN>(dpt, sV, 64 * wg, dot);
        wgmma_commit();
        wgmma_wait<2>();
        pin_regs(dq);
        dq_add(dq, prev_h, prev_m0); /* while the products run */

        /* group 4: dV += P^T dO; dS^T to buffer buf */
        uint32_t p_frag[4][4], ds_frag[4][4];
        bwd_p_dv_ds<D>(st, dpt, dv_acc, p_frag, ds_frag, lse2, dl, fk, bwd_tile_needs_mask(m0, wg_key0, fk, N), m0, key_row, N, dot,
                       sdS + buf * BN * BM * 2, 64 * wg + 16 * wi + g, g, t, scale_log2);
        pin_regs(ds_frag);
        pin_regs(dk_acc);
        wgmma_fence();
        wgmma_ay<D>(dk_acc, ds_frag, qt); /* group 5: dK += dS^T Q */
        wgmma_commit();
        wgmma_wait<0>();
        pin_regs(dv_acc);
        pin_regs(dk_acc);

        store_row(buf ^ 1); /* the next tile's row values (that buffer was last read in tile it-1) */
        prev_h = h;
        prev_m0 = m0;
        cur_r = nxt_r, cur_mt = nxt_mt, cur_hi = nxt_hi;
    }
    fence_proxy_async();
    __syncthreads();
    {
        float dq[8][4];
        pin_regs(dq);
        wgmma_fence();
        dq_issue(dq, (total - 1) & 1);
        wgmma_commit();
        wgmma_wait<0>();
        pin_regs(dq);
        dq_add(dq, prev_h, prev_m0);
    }

    bwd_store_dkdv<D>(dk_acc, dv_acc, dK, dV, b, N, Hk, kh, key_row, t, scale);
#else
    __trap(); /* built without sm_90a: the host never launches this */
#endif
}

/* ---------------------------------------------------------------------------------------
 * Backward, version 3b: the wgmma backward warp-specialised and persistent (sm_90a only;
 * backward variants 4-7). Same work item (128 keys of one kv head, two consumer
 * warpgroups of 64 keys) and the same five products per query tile as
 * flash_bwd_wgmma_kernel; what changes is how the tiles arrive, how the warpgroups wait
 * for each other, and that one block an SM walks item after item (bench/NOTES.md step 30):
 *   - persistent: the items are handed out in the order a one-item-a-block grid would
 *     start them, by a counter in the workspace; the next item's first query tiles and (at
 *     d = 64, two K/V buffers) its K and V load while this one ends;
 *   - a producer warpgroup (registers cut to 56 by setmaxnreg, the consumers' raised to 224)
 *     loads K and V once an item and then, for every query tile, Q and dO by TMA (one thread) and
 *     the tile's lse, Delta and window starts (one warp, plain loads) into a ring of ST
 *     stages; q_full[st] (the TMA's bytes and the warp's 32 arrivals) and q_empty[st] (every
 *     consumer thread's arrival once its products are done: an arrival releases only the
 *     arriving thread's reads, so one per warp would let the next row values overwrite what
 *     another lane may still read; compute-sanitizer's racecheck reports exactly that)
 *     replace the block barrier;
 *   - the warpgroups meet only through ds_full[buf], one of three dS^T buffers: every
 *     consumer thread arrives once its dS^T entries of tile j are in shared memory, and at
 *     the start of tile j+1 a warpgroup waits for both halves; it issues dQ(j) = dS(j) K
 *     after its dK product of tile j+1 (not beside S^T and dP^T, where the 32 accumulators
 *     of dQ would make 224 live with dK, dV, S^T, dP^T: more than the 240 registers allow,
 *     and ptxas serialises every wgmma, C7512). A warpgroup starts tile j+1 once the other
 *     is past the middle of tile j, so either may run up to a tile and a half ahead (the
 *     block barrier of version 3 kept them within one phase); dS(j+1) goes over
 *     dS(j-2), whose last readers (the dQ products issued in tile j-1) are then done in both
 *     warpgroups, which two buffers would not guarantee;
 *   - DQ_BULK: each warpgroup's 64 x 64 share of dQ goes through its own 16 KB shared-memory
 *     staging buffer and one bulk tensor reduce-add (cp.reduce.async.bulk.tensor .add.f32)
 *     per 32-column atom into the fp32 accumulator, issued by one thread, instead of 16
 *     float2 atomics (REDG.E.ADD.F32x2) per thread; rows past N are clipped by the TMA.
 *     Two warpgroup barriers per tile: the buffer is free (the issuing thread has waited
 *     for the previous reduce-add to read it), the buffer is written.
 *   - KV_REGS (variant 7, d = 64 only): S^T = K Q^T and dP^T = V dO^T take this warpgroup's
 *     K and V rows as register A fragments, loaded once by ldmatrix, instead of reading them
 *     from shared memory for every query tile. At d = 64 a 64 x 64 x 16 product with both
 *     operands in shared memory reads 4 KB in the 32 clocks it takes: shared memory's whole
 *     128 bytes a clock, which the dQ staging and its bulk reduce-add also need. At d = 128
 *     the fragments would take 64 registers that dK and dV hold.
 * ------------------------------------------------------------------------------------- */
/* dst's box at (col, head, row, batch) += the fp32 tile at src (one thread, `issue`),
 * through the bulk-async group of the issuing thread; predicated inside the asm, no branch */
__device__ __forceinline__ void tma_reduce_add_4d_if(const void *tmap, uint32_t src, int col, int head, int row, int batch, bool issue) {
    asm volatile("{\n.reg .pred pi;\nsetp.ne.u32 pi, %6, 0;\n"
                 "@pi cp.reduce.async.bulk.tensor.4d.global.shared::cta.add.tile.bulk_group [%0, {%1, %2, %3, %4}], [%5];\n}\n"
                 ::"l"(tmap), "r"(col), "r"(head), "r"(row), "r"(batch), "r"(src), "r"((int)issue) : "memory");
}
/* the same box copied from shared memory over the global rows (rows past the tensor's end are
 * not written) */
__device__ __forceinline__ void tma_store_4d_if(const void *tmap, uint32_t src, int col, int head, int row, int batch, bool issue) {
    asm volatile("{\n.reg .pred pi;\nsetp.ne.u32 pi, %6, 0;\n"
                 "@pi cp.async.bulk.tensor.4d.global.shared::cta.tile.bulk_group [%0, {%1, %2, %3, %4}], [%5];\n}\n"
                 ::"l"(tmap), "r"(col), "r"(head), "r"(row), "r"(batch), "r"(src), "r"((int)issue) : "memory");
}
/* commit the issuing thread's bulk copies as one group / wait until its groups have finished
 * reading shared memory (READ) or finished altogether */
__device__ __forceinline__ void bulk_commit_if(bool issue) {
    asm volatile("{\n.reg .pred pi;\nsetp.ne.u32 pi, %0, 0;\n@pi cp.async.bulk.commit_group;\n}\n" ::"r"((int)issue) : "memory");
}
template <int READ> __device__ __forceinline__ void bulk_wait_all_if(bool issue) {
    if constexpr (READ) asm volatile("{\n.reg .pred pi;\nsetp.ne.u32 pi, %0, 0;\n@pi cp.async.bulk.wait_group.read 0;\n}\n" ::"r"((int)issue) : "memory");
    else asm volatile("{\n.reg .pred pi;\nsetp.ne.u32 pi, %0, 0;\n@pi cp.async.bulk.wait_group 0;\n}\n" ::"r"((int)issue) : "memory");
}

#define BWD_TMA_PRODUCER_REGS 56 /* 128 x 56 + 256 x 224 = 64,512 registers: all the block holds (384 threads x 168, launch_bounds(384, 1)); the producer's item walk spills with 24 or 40, the consumers do not with 224, and asking for more than the block holds makes setmaxnreg.inc wait forever */
#define BWD_TMA_CONSUMER_REGS 224
/* K/V buffers of the persistent backward: two where shared memory holds them (d = 64), so
 * that the next key block's K and V land while this one runs; one at d = 128 */
__host__ __device__ constexpr int bwd_kv_buffers(int D) { return D == 64 ? 2 : 1; }

template <int D, int ST, int DQ_BULK, int KV_REGS>
__global__ void __launch_bounds__(384, 1)
flash_bwd_tma_kernel(const __grid_constant__ CUtensorMap tm_q, const __grid_constant__ CUtensorMap tm_do, /* [B, N, H, d] bf16, boxes of 64 rows */
                     const __grid_constant__ CUtensorMap tm_k, const __grid_constant__ CUtensorMap tm_v, /* [B, N, Hk, d] bf16, boxes of 128 rows */
                     const __grid_constant__ CUtensorMap tm_dq, /* dQacc as [B, N, H, d] fp32, boxes of 32 columns x 64 rows */
                     const __grid_constant__ CUtensorMap tm_dk, const __grid_constant__ CUtensorMap tm_dv, /* [B, N, Hk, d] bf16, boxes of 64 rows */
                     const float *__restrict__ LSE,   /* [B, H, N] */
                     const float *__restrict__ Delta, /* [B, H, N] */
                     float *__restrict__ dQacc,       /* [B, N, H, d] fp32, zeroed */
                     int *__restrict__ item_next,     /* zeroed: items handed out past the first gridDim.x */
                     int B, int N, int H, int Hk, int G, float scale_log2, float scale) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    constexpr int BN = 128, BM = 64, NTHR = 384, KVB = bwd_kv_buffers(D);
    constexpr int KT = BN * D * 2, QT = BM * D * 2; /* bytes of a K or V tile, of a Q or dO tile */
    constexpr int DQT = 64 * 64 * 4;                /* bytes of a warpgroup's dQ share: [2 atoms][64 rows][32] fp32 */
    extern __shared__ __align__(128) unsigned char smem[];
    const uint32_t base = (smem_addr(smem) + 1023u) & ~1023u;
    const uint32_t sKV = base;                      /* [KVB][K, V]: each [D/64][BN][64]; then dK, dV's staging */
    const uint32_t sQ = sKV + KVB * 2 * KT;         /* [ST][D/64][BM][64] */
    const uint32_t sdO = sQ + ST * QT;              /* [ST][D/64][BM][64] */
    const uint32_t sdS = sdO + ST * QT;             /* [3][BN][BM]  dS^T, keys as rows, swizzled */
    const uint32_t sdQ = sdS + 3 * BN * BM * 2;     /* DQ_BULK: [2 warpgroups][2 atoms][BM][32] fp32, swizzled */
    float *sL = (float *)(smem + (sdQ + (DQ_BULK ? 2 * DQT : 0) - smem_addr(smem))); /* [ST][BM] lse * log2(e) */
    float *sDl = sL + ST * BM;                      /* [ST][BM] Delta */
    int *sFk = (int *)(sDl + ST * BM);              /* [ST][BM] s2_first_key of each query */
    int *s_item = sFk + ST * BM;                    /* [2] the items handed out, a ring */
    const uint32_t bars = smem_addr(s_item + 2);    /* kv_full[KVB], kv_empty[KVB], q_full[ST], q_empty[ST], ds_full[3], item_full[2], item_empty[2] */
    const uint32_t kv_full = bars, kv_empty = kv_full + 8 * KVB, q_full = kv_empty + 8 * KVB, q_empty = q_full + 8 * ST, ds_full = q_empty + 8 * ST;
    const uint32_t item_full = ds_full + 8 * 3, item_empty = item_full + 8 * 2;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int wg = __shfl_sync(0xffffffffu, warp >> 2, 0); /* 0: producer; 1, 2: consumers */
    const int R = H / Hk, n_blocks = (N + BN - 1) / BN, n_items = n_blocks * Hk * B;

    /* The items: key block n_block of kv head kh of sequence b, item = (b * Hk + kh) *
     * n_blocks + n_block, the order the blocks of a one-item-a-block grid start in (a head's
     * longest causal blocks first, and the blocks running at one time on a few heads, whose
     * dQ accumulator, Q and dO stay in L2; a static share of every gridDim.x-th item spread
     * them over all heads and ran 1.25-1.8x slower). Block i's first item is i; the producer
     * thread takes each next one from the counter item_next (+ gridDim.x) and hands it to
     * the others through s_item, a ring of two (item_full: its one arrival; item_empty: the
     * row warp's 32 lanes and the 256 consumer threads, each once it has read the slot). An
     * item >= n_items ends every role's walk. Every role walks the same items and, in each,
     * the same query tiles (BwdTiles: head by head of the kv group, tiles lo..hi(r));
     * j counts the tiles over all of this block's items, so the Q/dO ring and the dS^T
     * buffers run on from one item into the next. */
    auto take_item = [&](int it_n) { /* the readers' side: item number it_n of this block */
        const int slot = it_n & 1;
        mbar_wait(item_full + 8 * slot, (it_n >> 1) & 1);
        const int item = s_item[slot];
        mbar_arrive_if(item_empty + 8 * slot, true);
        return item;
    };
    int kh = 0, b = 0, n0 = 0, total = 0;
    BwdTiles tiles = {R, 0, 0, 0, BM, H, G, N}; /* this item's query tiles */
    auto item_start = [&](int item) {
        const int n_block = item % n_blocks;
        kh = (item / n_blocks) % Hk;
        b = item / (n_blocks * Hk);
        n0 = n_block * BN;
        tiles.kh = kh, tiles.lo = n0 / BM, tiles.n_last = min(n0 + BN, N) - 1;
        total = tiles.total();
    };

    /* the dQ of the first tile's "previous tile" is discarded (see dq_out), but reads buffer 2 */
    for (int c = tid; c < BN * BM / 8; c += NTHR)
        asm volatile("st.shared.v4.b32 [%0], {%1, %1, %1, %1};\n" ::"r"(sdS + 2 * BN * BM * 2 + c * 16), "r"(0));
    fence_proxy_async();
    if (tid == 0) {
        for (int k = 0; k < KVB; k++) {
            mbar_init(kv_full + 8 * k, 1);
            mbar_init(kv_empty + 8 * k, 2); /* the elected thread of each consumer warpgroup */
        }
        for (int st = 0; st < ST; st++) {
            mbar_init(q_full + 8 * st, 33); /* the TMA thread's expect_tx, each lane of the row warp */
            mbar_init(q_empty + 8 * st, 256); /* every consumer thread */
        }
        for (int i = 0; i < 3; i++) mbar_init(ds_full + 8 * i, 256); /* every consumer thread */
        for (int i = 0; i < 2; i++) {
            mbar_init(item_full + 8 * i, 1);
            mbar_init(item_empty + 8 * i, 32 + 256);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads(); /* the only block-wide barrier: the zeros and the mbarriers */

    if (wg == 0) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(BWD_TMA_PRODUCER_REGS));
        /* warp 0 (one thread): K and V once an item, after its first query tile, and Q and dO
         * of every tile by TMA; warp 1: the row values */
        if ((warp == 0 && lane == 0) || warp == 1) {
            int j = 0;
            for (int it_n = 0;; it_n++) {
                int item;
                if (warp == 0) {
                    const int slot = it_n & 1;
                    mbar_wait(item_empty + 8 * slot, ((it_n >> 1) & 1) ^ 1); /* the first pass finds the ring empty */
                    item = it_n == 0 ? (int)blockIdx.x : atomicAdd(item_next, 1) + (int)gridDim.x;
                    s_item[slot] = item;
                    mbar_arrive_if(item_full + 8 * slot, true); /* releases the store */
                } else {
                    item = take_item(it_n);
                }
                if (item >= n_items) break;
                item_start(item);
                int r, mt, hi;
                tiles.first(r, mt, hi);
                for (int t = 0; t < total; t++, j++) {
                    const int st = j % ST, h = kh * R + r;
                    mbar_wait(q_empty + 8 * st, ((j / ST) & 1) ^ 1); /* the first pass finds the ring empty */
                    if (warp == 0) {
                        mbar_expect_tx(q_full + 8 * st, 2 * QT);
                        for (int a = 0; a < D / 64; a++) {
                            tma_load_4d(sQ + st * QT + a * BM * 128, &tm_q, q_full + 8 * st, a * 64, h, mt * BM, b);
                            tma_load_4d(sdO + st * QT + a * BM * 128, &tm_do, q_full + 8 * st, a * 64, h, mt * BM, b);
                        }
                        if (t == 0) {
                            const int k = it_n % KVB;
                            const uint32_t sK = sKV + k * 2 * KT, sV = sK + KT;
                            mbar_wait(kv_empty + 8 * k, ((it_n / KVB) & 1) ^ 1);
                            mbar_expect_tx(kv_full + 8 * k, 2 * KT);
                            for (int a = 0; a < D / 64; a++) {
                                tma_load_4d(sK + a * BN * 128, &tm_k, kv_full + 8 * k, a * 64, kh, n0, b);
                                tma_load_4d(sV + a * BN * 128, &tm_v, kv_full + 8 * k, a * 64, kh, n0, b);
                            }
                        }
                    } else {
                        for (int l = lane; l < BM; l += 32)
                            bwd_row_values(sL[st * BM + l], sDl[st * BM + l], sFk[st * BM + l], LSE, Delta, b, H, h, N, G, mt * BM + l);
                        mbar_arrive_if(q_full + 8 * st, true); /* releases this lane's stores */
                    }
                    tiles.next(r, mt, hi);
                }
            }
        }
        return;
    }
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(BWD_TMA_CONSUMER_REGS));
    const int cwg = wg - 1, wi = warp & 3, g = lane >> 2, t = lane & 3;
    const bool elected = wi == 0 && lane == 0;  /* issues this warpgroup's bulk copies */
    int wg_key0 = 0, key_row = 0;               /* this warpgroup's 64 keys (rows of dK, dV); this thread's keys key_row, key_row + 8 */
    uint32_t sK = sKV, sV = sKV + KT;           /* this item's K and V */

    float dk_acc[D / 8][4], dv_acc[D / 8][4];

    /* adds a finished dQ share (bwd_dq_issue's) to rows m0.. of head h, unless `issue` is
     * false (the first tile of an item, whose "previous tile" belongs to no one): by atomics,
     * or through this warpgroup's staging buffer and the bulk reduce-add (the elected thread
     * first waits until its earlier bulk copies have read their buffers) */
    auto dq_out = [&](const float (&dq)[8][4], int h, int m0, bool issue) {
        if constexpr (DQ_BULK) {
            const uint32_t stage = sdQ + cwg * DQT;
            bulk_wait_all_if<1>(elected);
            named_bar_sync(1 + cwg, 128);
#pragma unroll
            for (int hf = 0; hf < 2; hf++)
#pragma unroll
                for (int dn = 0; dn < 8; dn++) {
                    /* row 16wi + g + 8hf (row & 7 == g), columns 8dn + 2t, +1 of atom dn / 4 */
                    const int row = 16 * wi + g + 8 * hf, chunk = (dn & 3) * 2 + (t >> 1);
                    asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(stage + (dn >> 2) * 64 * 128 + row * 128 + ((chunk ^ g) << 4) + (t & 1) * 8),
                                 "f"(dq[dn][2 * hf]), "f"(dq[dn][2 * hf + 1]));
                }
            fence_proxy_async(); /* these st.shared -> the TMA's reads */
            named_bar_sync(1 + cwg, 128);
#pragma unroll
            for (int a = 0; a < 2; a++) tma_reduce_add_4d_if(&tm_dq, stage + a * 64 * 128, bwd_dq_col0<D>(cwg) + 32 * a, h, m0, b, elected && issue);
            bulk_commit_if(elected && issue);
        } else {
            if (issue) bwd_dq_atomic_add<D>(dq, dQacc, b, N, H, h, m0, cwg, wi, g, t);
        }
    };

    /* KV_REGS (d = 64, where the registers allow): this warpgroup's 64 keys of K and V as
     * wgmma A fragments, loaded once an item, so that S^T and dP^T read only Q and dO from
     * shared memory (two 64 x 64 products with both operands there read 128 bytes a clock,
     * all that shared memory gives) */
    uint32_t k_frag[KV_REGS ? D / 16 : 1][4], v_frag[KV_REGS ? D / 16 : 1][4]; /* [D/16 k-steps][4] */
    /* The tile steps: tile j sits in stage j % ST, its dS^T in buffer j % 3; cur_* is tile
     * j's head and row, prev_* tile j-1's (dQ(j-1) leaves with tile j) */
    int cur_r = 0, cur_mt = 0, cur_hi = 0, cur_h = 0, cur_m0 = 0, prev_h = 0, prev_m0 = 0;
    float st_acc[8][4], dpt[8][4];  /* S^T, dP^T: [64 keys][64 queries] of this warpgroup */
    uint32_t p_frag[4][4], ds_frag[4][4]; /* P^T, dS^T as bf16 A fragments */
    float dq[8][4];                 /* [64 queries][64 columns]: this warpgroup's share of dQ(j-1) */
    /* groups 1, 2: S^T and dP^T of tile j, once its stage has arrived */
    auto issue_s_dp = [&](int j) {
        mbar_wait(q_full + 8 * (j % ST), (j / ST) & 1);
        pin_regs(st_acc);
        pin_regs(dpt);
        wgmma_fence();
        if constexpr (KV_REGS) wgmma_qk<D, BM>(st_acc, k_frag, sQ + (j % ST) * QT);
        else wgmma_xyt<D, BN>(st_acc, sK, 64 * cwg, sQ + (j % ST) * QT);
        wgmma_commit();
        if constexpr (KV_REGS) wgmma_qk<D, BM>(dpt, v_frag, sdO + (j % ST) * QT);
        else wgmma_xyt<D, BN>(dpt, sV, 64 * cwg, sdO + (j % ST) * QT);
        wgmma_commit();
    };
    /* group 3: dV += P^T dO; dS^T of tile j to its buffer, which the other warpgroup is told */
    auto middle = [&](int j) {
        const int st = j % ST;
        const int *fk = sFk + st * BM;
        bwd_p_dv_ds<D>(st_acc, dpt, dv_acc, p_frag, ds_frag, sL + st * BM, sDl + st * BM, fk, bwd_tile_needs_mask(cur_m0, wg_key0, fk, N), cur_m0,
                       key_row, N, sdO + st * QT, sdS + (j % 3) * BN * BM * 2, 64 * cwg + 16 * wi + g, g, t, scale_log2);
        fence_proxy_async(); /* this thread's dS^T stores -> the wgmma reads of both warpgroups */
        mbar_arrive_if(ds_full + 8 * (j % 3), true);
    };
    /* group 4: dK += dS^T(j) Q(j); group 5: dQ(j-1), issued here rather than with S^T and
     * dP^T so that its 32 accumulators are not live beside theirs (both halves of dS^T(j-1)
     * must be in; at an item's first tile it reads whatever buffer (j+2) % 3 holds, which
     * no one writes then, and is discarded) */
    auto issue_dk_dq = [&](int j) {
        pin_regs(ds_frag);
        pin_regs(dk_acc);
        pin_regs(dq);
        wgmma_fence();
        wgmma_ay<D>(dk_acc, ds_frag, sQ + (j % ST) * QT);
        wgmma_commit();
        bwd_dq_issue<D>(dq, sdS + ((j + 2) % 3) * BN * BM * 2, sK, cwg);
        wgmma_commit();
    };
    /* once groups 3-5 are done: stage j is free, dQ(j-1) leaves (not at an item's first
     * tile), tile j+1 comes up */
    auto finish = [&](int j, bool first) {
        pin_regs(dv_acc);
        pin_regs(dk_acc);
        pin_regs(dq);
        mbar_arrive_if(q_empty + 8 * (j % ST), true);
        dq_out(dq, prev_h, prev_m0, !first);
        prev_h = cur_h;
        prev_m0 = cur_m0;
        tiles.next(cur_r, cur_mt, cur_hi);
        cur_h = kh * R + cur_r;
        cur_m0 = cur_mt * BM;
    };
    /* both halves of dS^T(j) are in (and so both warpgroups are past tile j-1, whose dQ
     * was the last reader of buffer (j+1) % 3) */
    auto wait_ds = [&](int j) { mbar_wait(ds_full + 8 * (j % 3), (j / 3) & 1); };

    int j = 0;
    for (int it_n = 0;; it_n++) {
        const int item = take_item(it_n);
        if (item >= n_items) break;
        item_start(item);
        const int kb = it_n % KVB;
        sK = sKV + kb * 2 * KT;
        sV = sK + KT;
        wg_key0 = n0 + 64 * cwg;
        key_row = wg_key0 + 16 * wi + g;
        tiles.first(cur_r, cur_mt, cur_hi);
        cur_h = prev_h = kh * R, cur_m0 = prev_m0 = cur_mt * BM;
#pragma unroll
        for (int dn = 0; dn < D / 8; dn++)
#pragma unroll
            for (int e = 0; e < 4; e++) dk_acc[dn][e] = dv_acc[dn][e] = 0.f;
        mbar_wait(kv_full + 8 * kb, (it_n / KVB) & 1);
        if constexpr (KV_REGS) {
#pragma unroll
            for (int kk = 0; kk < D / 16; kk++) {
                const int row = 64 * cwg + 16 * wi + (lane & 15), chunk = 2 * (kk % 4) + (lane >> 4);
                ldmatrix_x4(k_frag[kk], swz<64>(sK + (kk / 4) * BN * 128, row, chunk));
                ldmatrix_x4(v_frag[kk], swz<64>(sV + (kk / 4) * BN * 128, row, chunk));
            }
        }
        /* each tile's products are one straight run of code after the mbarrier waits at its
         * start (see flash_bwd_wgmma_kernel); issuing tile j+1's S^T and dP^T before tile j's
         * dQ leaves gained nothing at d = 64 (bench/NOTES.md step 14) */
        for (int tt = 0; tt < total; tt++, j++) {
            if (tt > 0) wait_ds(j - 1);
            issue_s_dp(j);
            middle(j);
            issue_dk_dq(j);
            wgmma_wait<0>();
            finish(j, tt == 0);
            if (KVB > 1 && tt == 0 && it_n > 0) { /* the previous item's dK, dV have been read out of its K/V buffer */
                bulk_wait_all_if<1>(elected);
                mbar_arrive_if(kv_empty + 8 * ((it_n - 1) % KVB), elected);
            }
        }
        wait_ds(j - 1);
        pin_regs(dq);
        wgmma_fence();
        bwd_dq_issue<D>(dq, sdS + ((j - 1) % 3) * BN * BM * 2, sK, cwg);
        wgmma_commit();
        wgmma_wait<0>();
        pin_regs(dq);
        dq_out(dq, prev_h, prev_m0, true);
        /* dK and dV leave by TMA from shared memory, where 4-byte stores from the
         * accumulators kept the global store queue full (Nsight, bench/NOTES.md step 27):
         * this warpgroup's 64 rows of each over its own rows of this item's K and V, in the
         * 128-byte-swizzled box layout. Its own products were the last readers of those rows
         * of V, and at d = 64 of K; at d = 128 the other warpgroup's dQ products read all of
         * K, so both meet first. */
        if constexpr (D == 128) named_bar_sync(3, 256);
        const uint32_t dk_t = sK + 64 * cwg * 128, dv_t = sV + 64 * cwg * 128; /* atom a at + a * BN * 128 */
#pragma unroll
        for (int hf = 0; hf < 2; hf++) {
            const int row = 16 * wi + g + 8 * hf; /* row & 7 == g */
#pragma unroll
            for (int dn = 0; dn < D / 8; dn++) {
                const uint32_t in_atom = (dn >> 3) * BN * 128 + row * 128 + (((dn & 7) ^ g) << 4) + 4 * t;
                asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(dk_t + in_atom), "r"(pack_bf16(dk_acc[dn][2 * hf] * scale, dk_acc[dn][2 * hf + 1] * scale)));
                asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(dv_t + in_atom), "r"(pack_bf16(dv_acc[dn][2 * hf], dv_acc[dn][2 * hf + 1])));
            }
        }
        fence_proxy_async(); /* these st.shared -> the TMA's reads */
        named_bar_sync(1 + cwg, 128);
#pragma unroll
        for (int a = 0; a < D / 64; a++) {
            tma_store_4d_if(&tm_dk, dk_t + a * BN * 128, 64 * a, kh, wg_key0, b, elected);
            tma_store_4d_if(&tm_dv, dv_t + a * BN * 128, 64 * a, kh, wg_key0, b, elected);
        }
        bulk_commit_if(elected);
        if (KVB == 1) { /* the producer waits for this buffer before the next item's K and V */
            bulk_wait_all_if<1>(elected);
            mbar_arrive_if(kv_empty, elected);
        }
    }
    bulk_wait_all_if<1>(elected); /* the block's shared memory stays until every bulk copy has read it */
#else
    __trap(); /* built without sm_90a: the host never launches this */
#endif
}

/* ---------------------------------------------------------------------------------------
 * Decode attention: one query token per sequence against n_keys cached keys.
 * Block (split s, kv head, batch) scores its chunk of DEC_CHUNK keys for all R query heads
 * of the kv head (a GQA group shares each K/V load), keeps the scores in shared memory,
 * and writes an unnormalised partial output with its max and sum; a second kernel merges
 * the splits. Memory-bound: every cached K/V byte is read once.
 * ------------------------------------------------------------------------------------- */
#define DEC_CHUNK 256
#define DEC_THREADS 128
#define DEC_MAX_R 8

/* a lane's 16-byte slices of cache rows j0, j0 + step, j0 + 2 step, j0 + 3 step; zeros from row c1 on */
__device__ __forceinline__ void load_rows4(const bf16 *base, size_t row_stride, int j0, int step, int c1, uint4 rows[4]) {
#pragma unroll
    for (int u = 0; u < 4; u++) {
        int j = j0 + u * step;
        rows[u] = j < c1 ? *(const uint4 *)(base + (size_t)j * row_stride) : make_uint4(0, 0, 0, 0);
    }
}

template <int D, int RMAX> /* RMAX: query heads per kv head the registers are sized for */
__global__ void __launch_bounds__(DEC_THREADS)
decode_split_kernel(const bf16 *__restrict__ Qn,   /* [B, H, d] */
                    const bf16 *__restrict__ Kc,   /* [B, n_cap, Hk, d] */
                    const bf16 *__restrict__ Vc,   /* [B, n_cap, Hk, d] */
                    float *__restrict__ part_o,    /* [B, H, n_split, d] */
                    float *__restrict__ part_ml,   /* [B, H, n_split, 2] max (base 2) and sum */
                    int H, int Hk, int n_cap, int n_keys, float scale_log2) {
    constexpr int LPK = D / 8;             /* lanes per key: each holds 8 dims (16 bytes) */
    constexpr int KPW = 32 / LPK;          /* keys per warp step */
    constexpr int KPB = KPW * (DEC_THREADS / 32);
    __shared__ float s_p[RMAX][DEC_CHUNK];          /* scores, then probabilities */
    __shared__ float s_o[DEC_THREADS / 32][RMAX][D]; /* per-warp partial outputs */
    __shared__ float s_m[RMAX], s_l[RMAX];
    const int split = blockIdx.x, kh = blockIdx.y, b = blockIdx.z, n_split = gridDim.x;
    const int R = H / Hk;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int sub = lane / LPK, part = lane % LPK;
    const int c0 = split * DEC_CHUNK, c1 = min(c0 + DEC_CHUNK, n_keys);
    const size_t kv_stride = (size_t)Hk * D;
    const bf16 *Kb = Kc + (size_t)b * n_cap * kv_stride + (size_t)kh * D + part * 8;
    const bf16 *Vb = Vc + (size_t)b * n_cap * kv_stride + (size_t)kh * D + part * 8;

    float q[RMAX][8];
#pragma unroll
    for (int r = 0; r < RMAX; r++) {
        if (r < R) {
            bf16x8_to_float(*(const uint4 *)(Qn + ((size_t)b * H + kh * R + r) * D + part * 8), q[r]);
#pragma unroll
            for (int e = 0; e < 8; e++) q[r][e] *= scale_log2;
        }
    }
    /* pass 1: scores */
    /* the loop bound is warp-uniform (jb), so every lane reaches the shuffles */
    for (int jb = c0 + warp * KPW; jb < c1; jb += 4 * KPB) {
        const int j0 = jb + sub;
        uint4 kr[4];
        load_rows4(Kb, kv_stride, j0, KPB, c1, kr);
#pragma unroll
        for (int u = 0; u < 4; u++) {
            float kf[8];
            bf16x8_to_float(kr[u], kf);
#pragma unroll
            for (int r = 0; r < RMAX; r++) {
                if (r < R) {
                    float dot = 0.f;
#pragma unroll
                    for (int e = 0; e < 8; e++) dot = fmaf(q[r][e], kf[e], dot);
#pragma unroll
                    for (int off = LPK / 2; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
                    int j = j0 + u * KPB;
                    if (part == 0 && j < c1) s_p[r][j - c0] = dot;
                }
            }
        }
    }
    __syncthreads();
    /* softmax statistics per head: one warp per head */
    for (int r = warp; r < R; r += DEC_THREADS / 32) {
        float mx = -INFINITY;
        for (int j = lane; j < c1 - c0; j += 32) mx = fmaxf(mx, s_p[r][j]);
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
        float sum = 0.f;
        for (int j = lane; j < c1 - c0; j += 32) { float p = fast_exp2(s_p[r][j] - mx); s_p[r][j] = p; sum += p; }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
        if (lane == 0) { s_m[r] = mx; s_l[r] = sum; }
    }
    __syncthreads();
    /* pass 2: o = sum_j p_j v_j */
    float acc[RMAX][8];
#pragma unroll
    for (int r = 0; r < RMAX; r++)
#pragma unroll
        for (int e = 0; e < 8; e++) acc[r][e] = 0.f;
    for (int jb = c0 + warp * KPW; jb < c1; jb += 4 * KPB) {
        const int j0 = jb + sub;
        uint4 vr[4];
        load_rows4(Vb, kv_stride, j0, KPB, c1, vr);
#pragma unroll
        for (int u = 0; u < 4; u++) {
            int j = j0 + u * KPB;
            if (j >= c1) break;
            float vf[8];
            bf16x8_to_float(vr[u], vf);
#pragma unroll
            for (int r = 0; r < RMAX; r++) {
                if (r < R) {
                    float p = s_p[r][j - c0];
#pragma unroll
                    for (int e = 0; e < 8; e++) acc[r][e] = fmaf(p, vf[e], acc[r][e]);
                }
            }
        }
    }
    /* reduce the KPW keys of a warp step, then the warps */
#pragma unroll
    for (int r = 0; r < RMAX; r++) {
        if (r < R) {
#pragma unroll
            for (int e = 0; e < 8; e++) {
                float v = acc[r][e];
#pragma unroll
                for (int off = LPK; off < 32; off <<= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
                acc[r][e] = v;
            }
            if (sub == 0) {
#pragma unroll
                for (int e = 0; e < 8; e++) s_o[warp][r][part * 8 + e] = acc[r][e];
            }
        }
    }
    __syncthreads();
    for (int x = tid; x < R * D; x += DEC_THREADS) {
        int r = x / D, dd = x % D;
        float v = 0.f;
#pragma unroll
        for (int w = 0; w < DEC_THREADS / 32; w++) v += s_o[w][r][dd];
        size_t row = ((size_t)b * H + kh * R + r) * n_split + split;
        part_o[row * D + dd] = v;
        if (dd == 0) { part_ml[row * 2] = s_m[r]; part_ml[row * 2 + 1] = s_l[r]; }
    }
}

__global__ void decode_merge_kernel(const float *__restrict__ part_o, const float *__restrict__ part_ml,
                                    bf16 *__restrict__ On, /* [B, H, d] */ int n_split, int D) {
    const size_t bh = (size_t)blockIdx.y * gridDim.x + blockIdx.x; /* b * H + h */
    const float *ml = part_ml + bh * n_split * 2;
    float M = -INFINITY;
    for (int s = 0; s < n_split; s++) M = fmaxf(M, ml[2 * s]);
    for (int dd = threadIdx.x; dd < D; dd += blockDim.x) {
        float L = 0.f, acc = 0.f;
        for (int s = 0; s < n_split; s++) {
            float w = fast_exp2(ml[2 * s] - M);
            L += ml[2 * s + 1] * w;
            acc += part_o[(bh * n_split + s) * D + dd] * w;
        }
        On[bh * D + dd] = __float2bfloat16(acc / L);
    }
}

/* ---------------------------------------------------------------------------------------
 * Host API (declared in 04_gpu.h)
 * ------------------------------------------------------------------------------------- */

/* Tile shapes: each variant is one template instance; the library uses variant 0 of each,
 * the fastest measured (bench/NOTES.md). `04_s2attn --variants [--d 64]` times them all. */
static int g_fwd_variant = 0, g_bwd_variant = 0;
#define FWD_WGMMA_DEFAULT(D) 10 /* TMA producer, 3 stages, overlap, ping-pong, mask on edge tiles only (bench/NOTES.md step 13) */
#define N_FWD_VARIANTS 12
#define N_BWD_VARIANTS 8
#define BWD_WGMMA_DEFAULT(D) ((D) == 64 ? 7 : 5) /* TMA producer, 2 stages, dQ bulk reduce-add (bench/NOTES.md step 12); K, V in registers at d = 64 (step 14) */
/* Forward variant 0 picks the fastest wgmma kernel where the binary and the GPU have it
 * (sm_90a), else variant 1; variants 4 to 11 fall back to 1 the same way. Variants 4 and 5
 * are version 3 with 64- and 128-key tiles; 6-9 its overlapped form (step 10); 10 and 11 are 9
 * with the mask's code only on the tiles it touches, 11 with 4 stages at d = 64 (step 13;
 * 10 is the faster at both head dims). */
[[maybe_unused]] static const char *fwd_variant_name[N_FWD_VARIANTS] = {"default", "mma.sync BM128 BN64 4 warps (32 rows each)", "mma.sync BM128 BN64 8 warps (16 rows each)",
                                                                     "mma.sync BM64 BN64 4 warps (16 rows each)", "wgmma BM128 BN64 (d=128) / BN128 (d=64), 2 warpgroups",
                                                                     "wgmma BM128 BN128 (d=128) / BN64 (d=64), 2 warpgroups",
                                                                     "wgmma BM128 BN128, next S overlaps softmax, cp.async",
                                                                     "wgmma BM128 BN128, overlap, TMA producer, 2 stages",
                                                                     "wgmma BM128 BN128, overlap, TMA producer, 2 stages, ping-pong",
                                                                     "wgmma BM128 BN128, overlap, TMA producer, 3 stages, ping-pong",
                                                                     "wgmma BM128 BN128, overlap, TMA producer, 3 stages, ping-pong, mask on edge tiles only",
                                                                     "as 10 with 4 stages at d=64 (3 at d=128, where 4 do not fit)"};

/* does this binary hold the sm_90a (wgmma) kernels for the current device? asked once */
static int wgmma_available(void) {
    static int available = -1;
    if (available < 0) {
        int *flag;
        CUDA_CHECK(cudaMalloc(&flag, sizeof(int)));
        CUDA_CHECK(cudaMemset(flag, 0, sizeof(int)));
        cudaDeviceProp prop;
        int dev;
        CUDA_CHECK(cudaGetDevice(&dev));
        CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
        available = 0;
        if (prop.major == 9 && prop.minor == 0) {
            wgmma_probe_kernel<<<1, 1>>>(flag);
            LAUNCH_OK();
            CUDA_CHECK(cudaMemcpy(&available, flag, sizeof(int), cudaMemcpyDeviceToHost));
        }
        CUDA_CHECK(cudaFree(flag));
    }
    return available;
}
/* Backward variant 0 picks the fastest wgmma kernel where available (variant 5, version 3b
 * with the bulk dQ reduce-add: 1.28-1.32x variant 3's backward at d = 128, bench/NOTES.md
 * step 12; at d = 64 variant 7, 5 with K and V in registers: 1.04-1.06x 5's, step 14),
 * else variant 1; 3 to 7 fall back to 1 the same way. */
[[maybe_unused]] static const char *bwd_variant_name[N_BWD_VARIANTS] = {"default", "mma.sync BN128 BM64 8 warps", "mma.sync BN64 BM64 4 warps",
                                                                     "wgmma BN128 BM64, 2 warpgroups",
                                                                     "wgmma BN128 BM64, TMA producer, 2 stages, dQ atomics",
                                                                     "wgmma BN128 BM64, TMA producer, 2 stages, dQ bulk reduce-add",
                                                                     "wgmma BN128 BM64, TMA producer, 3 stages, dQ atomics",
                                                                     "as 5, K and V as register A operands (d=64; 5 at d=128, where they do not fit)"};

extern "C" void attn_tile_variants(int *n_fwd, int *n_bwd) { *n_fwd = N_FWD_VARIANTS; *n_bwd = N_BWD_VARIANTS; }
extern "C" int attn_set_tile_variant(int fwd, int bwd) {
    if (fwd < 0 || fwd >= N_FWD_VARIANTS || bwd < 0 || bwd >= N_BWD_VARIANTS)
        return set_error("attention: tile variant (%d, %d) does not exist", fwd, bwd);
    g_fwd_variant = fwd;
    g_bwd_variant = bwd;
    return 0;
}

/* the flash kernels' arguments: check_attn_args's, head dim 64 or 128 */
static int check_shape(int B, int N, int H, int Hk, int d, int G) {
    if (check_attn_args(B, N, H, Hk, G) != 0) return -1;
    if (d != 64 && d != 128) return set_error("attention: head dim %d is not supported (64 or 128)", d);
    return 0;
}

template <int D, int BM, int BN, int NW>
static void launch_fwd_tiles(const bf16 *q, const bf16 *k, const bf16 *v, bf16 *o, float *lse, int B, int N, int H, int Hk, int G) {
    constexpr size_t smem = (size_t)(BM * D + 4 * BN * D) * 2; /* Q + two K/V stages */
    auto kern = flash_fwd_kernel<D, BM, BN, NW>;
    CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    dim3 grid((unsigned)((N + BM - 1) / BM), (unsigned)H, (unsigned)B);
    kern<<<grid, NW * 32, smem>>>(q, k, v, o, lse, N, H, Hk, G, LOG2E / sqrtf((float)D));
    LAUNCH_OK();
}
template <int D, int BN>
static void launch_fwd_wgmma(const bf16 *q, const bf16 *k, const bf16 *v, bf16 *o, float *lse, int B, int N, int H, int Hk, int G) {
    constexpr int BM = 128;
    constexpr size_t smem = (size_t)(4 * BN * D + BM * D) * 2 + 1024; /* two K/V stages, Q, alignment */
    auto kern = flash_fwd_wgmma_kernel<D, BN>;
    CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    dim3 grid((unsigned)((N + BM - 1) / BM), (unsigned)H, (unsigned)B);
    kern<<<grid, 256, smem>>>(q, k, v, o, lse, N, H, Hk, G, LOG2E / sqrtf((float)D));
    LAUNCH_OK();
}
template <int D>
static void launch_fwd_wgmma_ovl(const bf16 *q, const bf16 *k, const bf16 *v, bf16 *o, float *lse, int B, int N, int H, int Hk, int G) {
    constexpr int BM = 128, BN = 128;
    constexpr size_t smem = (size_t)(4 * BN * D + BM * D) * 2 + 1024; /* Q, two K/V stages, alignment */
    auto kern = flash_fwd_wgmma_ovl_kernel<D, BN>;
    CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    dim3 grid((unsigned)((N + BM - 1) / BM), (unsigned)H, (unsigned)B);
    kern<<<grid, 256, smem>>>(q, k, v, o, lse, N, H, Hk, G, LOG2E / sqrtf((float)D));
    LAUNCH_OK();
}

/* The driver's cuTensorMapEncodeTiled, found through the runtime (no -lcuda); NULL if absent. */
static PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder(void) {
    static PFN_cuTensorMapEncodeTiled_v12000 fn = NULL;
    static int asked = 0;
    if (!asked) {
        asked = 1;
        void *p = NULL;
        cudaDriverEntryPointQueryResult res;
        if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &res) == cudaSuccess &&
            res == cudaDriverEntryPointSuccess)
            fn = (PFN_cuTensorMapEncodeTiled_v12000)p;
    }
    return fn;
}
/* A [B, N, heads, D] tensor as the TMA sees it: dims (D, heads, N, B) innermost first,
 * boxes of 128 bytes of columns (64 bf16 or 32 fp32) x 1 head x `rows` rows x 1 batch, stored
 * with the 128-byte swizzle the MMA descriptors expect; rows past N read as zeros (and are
 * not written by a store or reduce). 0, or -1 if the driver refuses it. */
static int make_tensor_map_typed(CUtensorMap *map, const void *base, int fp32, int D, int heads, int N, int B, int rows) {
    PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
    if (!encode) return -1;
    const cuuint64_t el = fp32 ? 4 : 2;
    const cuuint64_t dims[4] = {(cuuint64_t)D, (cuuint64_t)heads, (cuuint64_t)N, (cuuint64_t)B};
    const cuuint64_t strides[3] = {(cuuint64_t)D * el, (cuuint64_t)heads * D * el, (cuuint64_t)N * heads * D * el}; /* bytes, dims 1..3 */
    const cuuint32_t box[4] = {(cuuint32_t)(128 / el), 1, (cuuint32_t)rows, 1}, elem_strides[4] = {1, 1, 1, 1};
    CUresult r = encode(map, fp32 ? CU_TENSOR_MAP_DATA_TYPE_FLOAT32 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 4, (void *)base, dims, strides, box, elem_strides,
                        CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    return r == CUDA_SUCCESS ? 0 : -1;
}
static int make_tensor_map(CUtensorMap *map, const bf16 *base, int D, int heads, int N, int B, int rows) {
    return make_tensor_map_typed(map, base, 0, D, heads, N, B, rows);
}
/* 0, or -1 where no tensor map could be made (the caller falls back to the cp.async kernel) */
template <int D, int ST, int PINGPONG, int EDGE_MASK = 0>
static int launch_fwd_tma(const bf16 *q, const bf16 *k, const bf16 *v, bf16 *o, float *lse, int B, int N, int H, int Hk, int G) {
    constexpr int BM = 128, BN = 128;
    constexpr size_t smem = (size_t)(BM * D + 2 * ST * BN * D) * 2 + 1024 + 8 * (1 + 4 * ST); /* Q, K/V ring, alignment, mbarriers */
    static_assert(smem <= 227 * 1024, "shared memory per block");
    CUtensorMap tm_q, tm_k, tm_v;
    if (make_tensor_map(&tm_q, q, D, H, N, B, BM) || make_tensor_map(&tm_k, k, D, Hk, N, B, BN) || make_tensor_map(&tm_v, v, D, Hk, N, B, BN)) return -1;
    auto kern = flash_fwd_tma_kernel<D, BN, ST, PINGPONG, EDGE_MASK>;
    CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    dim3 grid((unsigned)((N + BM - 1) / BM), (unsigned)H, (unsigned)B);
    kern<<<grid, 384, smem>>>(tm_q, tm_k, tm_v, o, lse, N, H, Hk, G, LOG2E / sqrtf((float)D));
    LAUNCH_OK();
    return 0;
}
template <int D>
static void launch_fwd(const bf16 *q, const bf16 *k, const bf16 *v, bf16 *o, float *lse, int B, int N, int H, int Hk, int G) {
    int variant = g_fwd_variant;
    if (variant == 0) variant = wgmma_available() ? FWD_WGMMA_DEFAULT(D) : 1;
    if (variant >= 4 && !wgmma_available()) variant = 1; /* no sm_90a code or not a Hopper GPU */
    switch (variant) {
    case 4: launch_fwd_wgmma<D, D == 128 ? 64 : 128>(q, k, v, o, lse, B, N, H, Hk, G); break;
    case 5: launch_fwd_wgmma<D, D>(q, k, v, o, lse, B, N, H, Hk, G); break;
    case 6: launch_fwd_wgmma_ovl<D>(q, k, v, o, lse, B, N, H, Hk, G); break;
    case 7: case 8: case 9: case 10: case 11: {
        const int r = variant == 7    ? launch_fwd_tma<D, 2, 0>(q, k, v, o, lse, B, N, H, Hk, G)
                      : variant == 8  ? launch_fwd_tma<D, 2, 1>(q, k, v, o, lse, B, N, H, Hk, G)
                      : variant == 9  ? launch_fwd_tma<D, 3, 1>(q, k, v, o, lse, B, N, H, Hk, G)
                      : variant == 10 ? launch_fwd_tma<D, 3, 1, 1>(q, k, v, o, lse, B, N, H, Hk, G)
                                      : launch_fwd_tma<D, D == 64 ? 4 : 3, 1, 1>(q, k, v, o, lse, B, N, H, Hk, G);
        if (r != 0) launch_fwd_wgmma<D, 128>(q, k, v, o, lse, B, N, H, Hk, G); /* no tensor map: version 3, 128-key tiles */
        break;
    }
    case 1: launch_fwd_tiles<D, 128, 64, 4>(q, k, v, o, lse, B, N, H, Hk, G); break;
    case 2: launch_fwd_tiles<D, 128, 64, 8>(q, k, v, o, lse, B, N, H, Hk, G); break;
    default: launch_fwd_tiles<D, 64, 64, 4>(q, k, v, o, lse, B, N, H, Hk, G); break;
    }
}

extern "C" int attn_forward(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *o, float *lse,
                            int B, int N, int H, int Hk, int d, int G) {
    if (check_shape(B, N, H, Hk, d, G) != 0) return -1;
    if (d == 64) launch_fwd<64>((const bf16 *)q, (const bf16 *)k, (const bf16 *)v, (bf16 *)o, lse, B, N, H, Hk, G);
    else launch_fwd<128>((const bf16 *)q, (const bf16 *)k, (const bf16 *)v, (bf16 *)o, lse, B, N, H, Hk, G);
    return 0;
}

#define BWD_SCHED_BYTES 256 /* the workspace's head: the persistent backward's item counter, zeroed with the dQ accumulator */
extern "C" size_t attn_backward_workspace_bytes(int B, int N, int H, int d) {
    /* dQ accumulator: [B, N, H, d] for the Hopper kernels, [B, H, padded N, d] in fragment order for the mma.sync one */
    size_t dq = (size_t)B * dqf_padded_rows(N) * H * d * sizeof(float);
    size_t delta = (size_t)B * H * N * sizeof(float);  /* Delta [B, H, N] */
    return BWD_SCHED_BYTES + dq + ((delta + 255) / 256) * 256;
}

template <int D, int BM, int BN, int NW>
static void launch_bwd_tiles(const bf16 *q, const bf16 *k, const bf16 *v, const bf16 *dout, const float *lse, const float *delta,
                             float *dq_acc, bf16 *dk, bf16 *dv, int B, int N, int H, int Hk, int G, float scale) {
    /* K, V, two Q/dO stages, P^T and dS^T; lse, Delta and window starts per query; an mbarrier */
    constexpr size_t smem = (size_t)(2 * BN * D + 4 * BM * D + 2 * BN * BM) * 2 + 4 * BM * sizeof(float) + 2 * BM * sizeof(int) + 8;
    auto kern = flash_bwd_kernel<D, BM, BN, NW>;
    CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    dim3 grid((unsigned)((N + BN - 1) / BN), (unsigned)Hk, (unsigned)B);
    kern<<<grid, NW * 32, smem>>>(q, k, v, dout, lse, delta, dq_acc, dk, dv, N, H, Hk, G, scale * LOG2E, scale);
    LAUNCH_OK();
}
template <int D>
static void launch_bwd_wgmma(const bf16 *q, const bf16 *k, const bf16 *v, const bf16 *dout, const float *lse, const float *delta,
                             float *dq_acc, bf16 *dk, bf16 *dv, int B, int N, int H, int Hk, int G, float scale) {
    constexpr int BN = 128, BM = 64;
    /* K, V, two Q/dO stages, two dS^T stages, alignment; lse, Delta, window starts */
    constexpr size_t smem = (size_t)(2 * BN * D + 4 * BM * D + 2 * BN * BM) * 2 + 1024 + 6 * BM * sizeof(float);
    auto kern = flash_bwd_wgmma_kernel<D>;
    CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    dim3 grid((unsigned)((N + BN - 1) / BN), (unsigned)Hk, (unsigned)B);
    kern<<<grid, 256, smem>>>(q, k, v, dout, lse, delta, dq_acc, dk, dv, N, H, Hk, G, scale * LOG2E, scale);
    LAUNCH_OK();
}
/* 0, or -1 where no tensor map could be made (the caller falls back to version 3) */
template <int D, int ST, int DQ_BULK, int KV_REGS>
static int launch_bwd_tma(const bf16 *q, const bf16 *k, const bf16 *v, const bf16 *dout, const float *lse, const float *delta,
                          float *dq_acc, int *item_next, bf16 *dk, bf16 *dv, int B, int N, int H, int Hk, int G, float scale) {
    constexpr int BN = 128, BM = 64;
    constexpr int KVB = bwd_kv_buffers(D);
    /* alignment; the K/V buffers, the Q/dO ring, three dS^T buffers; dQ staging; lse, Delta, window starts per stage; mbarriers */
    constexpr size_t smem = 1024 + (size_t)(KVB * 2 * BN * D + 2 * ST * BM * D + 3 * BN * BM) * 2 + (DQ_BULK ? 2 * 64 * 64 * 4 : 0) +
                            3 * ST * BM * 4 + 8 + 8 * (2 * KVB + 2 * ST + 3 + 4);
    static_assert(smem <= 227 * 1024, "shared memory per block");
    CUtensorMap tm_q, tm_do, tm_k, tm_v, tm_dq, tm_dk, tm_dv;
    if (make_tensor_map(&tm_q, q, D, H, N, B, BM) || make_tensor_map(&tm_do, dout, D, H, N, B, BM) || make_tensor_map(&tm_k, k, D, Hk, N, B, BN) ||
        make_tensor_map(&tm_v, v, D, Hk, N, B, BN) || make_tensor_map_typed(&tm_dq, dq_acc, 1, D, H, N, B, BM) ||
        make_tensor_map(&tm_dk, dk, D, Hk, N, B, 64) || make_tensor_map(&tm_dv, dv, D, Hk, N, B, 64))
        return -1;
    auto kern = flash_bwd_tma_kernel<D, ST, DQ_BULK, KV_REGS>;
    CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    /* persistent: one block per SM (the registers allow no more), each walking its share of
     * the key blocks */
    const long long n_items = (long long)((N + BN - 1) / BN) * Hk * B;
    if (n_items > INT_MAX) return -1;
    int dev = 0, n_sm = 0;
    CUDA_CHECK(cudaGetDevice(&dev));
    CUDA_CHECK(cudaDeviceGetAttribute(&n_sm, cudaDevAttrMultiProcessorCount, dev));
    const unsigned grid = (unsigned)(n_items < n_sm ? n_items : n_sm);
    kern<<<grid, 384, smem>>>(tm_q, tm_do, tm_k, tm_v, tm_dq, tm_dk, tm_dv, lse, delta, dq_acc, item_next, B, N, H, Hk, G, scale * LOG2E, scale);
    LAUNCH_OK();
    return 0;
}
template <int D>
static void launch_bwd(const bf16 *q, const bf16 *k, const bf16 *v, const bf16 *o, const bf16 *dout, const float *lse,
                       bf16 *dq, bf16 *dk, bf16 *dv, void *workspace, int B, int N, int H, int Hk, int G) {
    const size_t rows = (size_t)B * N * H, acc_floats = (size_t)B * dqf_padded_rows(N) * H * D;
    int *item_next = (int *)workspace;  /* the persistent backward's next item, less gridDim.x */
    float *dq_acc = (float *)((char *)workspace + BWD_SCHED_BYTES); /* [B, N, H, d], or [B, H, padded N / 32, D / 8, 8, 32] in fragment order */
    float *delta = dq_acc + acc_floats; /* [B, H, N] */
    CUDA_CHECK(cudaMemsetAsync(workspace, 0, BWD_SCHED_BYTES + acc_floats * sizeof(float)));
    bwd_preprocess_kernel<D><<<(unsigned)((rows + 7) / 8), 256>>>(o, dout, delta, N, H, rows);
    LAUNCH_OK();
    const float scale = 1.f / sqrtf((float)D);
    int variant = g_bwd_variant;
    if (variant == 0) variant = wgmma_available() ? BWD_WGMMA_DEFAULT(D) : 1;
    if (variant >= 3 && !wgmma_available()) variant = 1; /* no sm_90a code or not a Hopper GPU */
    bool frag_order = false; /* the accumulator's layout: [B, N, H, d], or fragment order */
    switch (variant) {
    case 3: launch_bwd_wgmma<D>(q, k, v, dout, lse, delta, dq_acc, dk, dv, B, N, H, Hk, G, scale); break;
    case 4: case 5: case 6: case 7: {
        if (D != 64 && variant == 7) variant = 5; /* d = 128: K and V fragments would take 64 of the 240 registers */
        const int r = variant == 4   ? launch_bwd_tma<D, 2, 0, 0>(q, k, v, dout, lse, delta, dq_acc, item_next, dk, dv, B, N, H, Hk, G, scale)
                      : variant == 5 ? launch_bwd_tma<D, 2, 1, 0>(q, k, v, dout, lse, delta, dq_acc, item_next, dk, dv, B, N, H, Hk, G, scale)
                      : variant == 6 ? launch_bwd_tma<D, 3, 0, 0>(q, k, v, dout, lse, delta, dq_acc, item_next, dk, dv, B, N, H, Hk, G, scale)
                                     : launch_bwd_tma<D, 2, 1, D == 64>(q, k, v, dout, lse, delta, dq_acc, item_next, dk, dv, B, N, H, Hk, G, scale);
        if (r != 0) launch_bwd_wgmma<D>(q, k, v, dout, lse, delta, dq_acc, dk, dv, B, N, H, Hk, G, scale); /* no tensor map: version 3 */
        break;
    }
    case 1: launch_bwd_tiles<D, 64, 128, 8>(q, k, v, dout, lse, delta, dq_acc, dk, dv, B, N, H, Hk, G, scale); frag_order = true; break;
    default: launch_bwd_tiles<D, 64, 64, 4>(q, k, v, dout, lse, delta, dq_acc, dk, dv, B, N, H, Hk, G, scale); frag_order = true; break;
    }
    if (frag_order) { /* the mma.sync kernels' accumulator */
        dq_frag_convert_kernel<D><<<dim3((unsigned)(dqf_padded_rows(N) / 32), (unsigned)H, (unsigned)B), 256>>>(dq_acc, dq, N, H, scale);
    } else {
        const size_t n4 = rows * D / 4;
        dq_convert_kernel<<<(unsigned)((n4 + 255) / 256), 256>>>(dq_acc, dq, n4, scale);
    }
    LAUNCH_OK();
}

extern "C" int attn_backward(const uint16_t *q, const uint16_t *k, const uint16_t *v, const uint16_t *o,
                             const uint16_t *dout, const float *lse, uint16_t *dq, uint16_t *dk, uint16_t *dv,
                             void *workspace, int B, int N, int H, int Hk, int d, int G) {
    if (check_shape(B, N, H, Hk, d, G) != 0) return -1;
    if (!workspace) return set_error("attention backward: no workspace (attn_backward_workspace_bytes bytes)");
    if (d == 64)
        launch_bwd<64>((const bf16 *)q, (const bf16 *)k, (const bf16 *)v, (const bf16 *)o, (const bf16 *)dout, lse,
                       (bf16 *)dq, (bf16 *)dk, (bf16 *)dv, workspace, B, N, H, Hk, G);
    else
        launch_bwd<128>((const bf16 *)q, (const bf16 *)k, (const bf16 *)v, (const bf16 *)o, (const bf16 *)dout, lse,
                        (bf16 *)dq, (bf16 *)dk, (bf16 *)dv, workspace, B, N, H, Hk, G);
    return 0;
}

static int decode_splits(int n_keys) { return (n_keys + DEC_CHUNK - 1) / DEC_CHUNK; }

extern "C" size_t attn_decode_workspace_bytes(int B, int H, int d, int n_keys) {
    if (B <= 0 || H <= 0 || d <= 0 || n_keys <= 0) return 0;
    return (size_t)B * H * decode_splits(n_keys) * (size_t)(d + 2) * sizeof(float);
}

extern "C" int attn_decode(const uint16_t *q, const uint16_t *k_cache, const uint16_t *v_cache, uint16_t *o,
                           void *workspace, int B, int H, int Hk, int d, int n_cap, int n_keys) {
    if (check_shape(B, n_keys > 0 ? n_keys : 1, H, Hk, d, 0) != 0) return -1;
    if (n_keys <= 0 || n_keys > n_cap) return set_error("attention decode: %d keys do not fit a cache of %d", n_keys, n_cap);
    if (H / Hk > DEC_MAX_R) return set_error("attention decode: %d query heads per kv head is more than %d", H / Hk, DEC_MAX_R);
    if (!workspace) return set_error("attention decode: no workspace (attn_decode_workspace_bytes bytes)");
    const int n_split = decode_splits(n_keys);
    float *part_o = (float *)workspace;                         /* [B, H, n_split, d] */
    float *part_ml = part_o + (size_t)B * H * n_split * d;      /* [B, H, n_split, 2] */
    dim3 grid((unsigned)n_split, (unsigned)Hk, (unsigned)B);
    const float scale_log2 = LOG2E / sqrtf((float)d);
    const bf16 *qb = (const bf16 *)q, *kb = (const bf16 *)k_cache, *vb = (const bf16 *)v_cache;
    const int R = H / Hk;
#define DECODE_LAUNCH(DD, RR) decode_split_kernel<DD, RR><<<grid, DEC_THREADS>>>(qb, kb, vb, part_o, part_ml, H, Hk, n_cap, n_keys, scale_log2)
    if (d == 64) {
        if (R == 1) DECODE_LAUNCH(64, 1); else if (R == 2) DECODE_LAUNCH(64, 2); else if (R <= 4) DECODE_LAUNCH(64, 4); else DECODE_LAUNCH(64, 8);
    } else {
        if (R == 1) DECODE_LAUNCH(128, 1); else if (R == 2) DECODE_LAUNCH(128, 2); else if (R <= 4) DECODE_LAUNCH(128, 4); else DECODE_LAUNCH(128, 8);
    }
#undef DECODE_LAUNCH
    LAUNCH_OK();
    decode_merge_kernel<<<dim3((unsigned)H, (unsigned)B), 128>>>(part_o, part_ml, (bf16 *)o, n_split, d);
    LAUNCH_OK();
    return 0;
}

/* ---------------------------------------------------------------------------------------
 * The stage's program: ./04_s2attn --bench writes bench/results/attn_ours.json
 * ------------------------------------------------------------------------------------- */
#ifdef S2ATTN_MAIN

static void fill_random_bf16(uint16_t *dev, size_t n, uint64_t seed, float scale) {
    Rng rng;
    rng_seed(&rng, seed);
    uint16_t *host = (uint16_t *)xmalloc(n * sizeof(uint16_t));
    for (size_t i = 0; i < n; i++) host[i] = f32_to_bf16(rng_normal(&rng) * scale);
    CUDA_CHECK(cudaMemcpy(dev, host, n * sizeof(uint16_t), cudaMemcpyHostToDevice));
    free(host);
}

static int cmp_float(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

typedef struct {
    int N, G;
    float fwd_ms, fwdbwd_ms;
    double fwd_tflops, fwdbwd_tflops;
} BenchRow;

/* The benchmark's device buffers: random bf16 q, k, v, dout [tokens, H, d]; outputs and
 * gradients of the same shape; lse [H * tokens]; the backward's workspace. */
typedef struct {
    uint16_t *q, *k, *v, *o, *dout, *dq, *dk, *dv;
    float *lse;
    void *ws;
} BenchBuffers;

static BenchBuffers bench_buffers_alloc(size_t n_el, size_t n_rows, size_t ws_bytes) {
    BenchBuffers b;
    uint16_t **bf[8] = {&b.q, &b.k, &b.v, &b.o, &b.dout, &b.dq, &b.dk, &b.dv};
    for (int i = 0; i < 8; i++) *bf[i] = (uint16_t *)gpu_malloc(n_el * 2, "an attention benchmark tensor");
    b.lse = (float *)gpu_malloc(n_rows * sizeof(float), "the benchmark's lse");
    b.ws = gpu_malloc(ws_bytes, "the backward workspace");
    fill_random_bf16(b.q, n_el, 1, 1.f); fill_random_bf16(b.k, n_el, 2, 1.f); fill_random_bf16(b.v, n_el, 3, 1.f);
    fill_random_bf16(b.dout, n_el, 4, 1.f);
    return b;
}

static void bench_buffers_free(BenchBuffers *b) {
    uint16_t *bf[8] = {b->q, b->k, b->v, b->o, b->dout, b->dq, b->dk, b->dv};
    for (int i = 0; i < 8; i++) CUDA_CHECK(cudaFree(bf[i]));
    CUDA_CHECK(cudaFree(b->lse)); CUDA_CHECK(cudaFree(b->ws));
}

/* One timed forward and one timed forward+backward of the shape (B, N, H) with S2 group G
 * (0: full causal), on the benchmark's buffers; CUDA events around each, ms into *fwd_ms and
 * *fwdbwd_ms. */
static void time_attention_once(const BenchBuffers *b, cudaEvent_t e0, cudaEvent_t e1, int B, int N, int H, int d, int G, float *fwd_ms,
                                float *fwdbwd_ms) {
    CUDA_CHECK(cudaEventRecord(e0));
    if (attn_forward(b->q, b->k, b->v, b->o, b->lse, B, N, H, H, d, G) != 0) die("%s", last_error());
    CUDA_CHECK(cudaEventRecord(e1));
    CUDA_CHECK(cudaEventSynchronize(e1));
    CUDA_CHECK(cudaEventElapsedTime(fwd_ms, e0, e1));
    CUDA_CHECK(cudaEventRecord(e0));
    if (attn_forward(b->q, b->k, b->v, b->o, b->lse, B, N, H, H, d, G) != 0) die("%s", last_error());
    if (attn_backward(b->q, b->k, b->v, b->o, b->dout, b->lse, b->dq, b->dk, b->dv, b->ws, B, N, H, H, d, G) != 0) die("%s", last_error());
    CUDA_CHECK(cudaEventRecord(e1));
    CUDA_CHECK(cudaEventSynchronize(e1));
    CUDA_CHECK(cudaEventElapsedTime(fwdbwd_ms, e0, e1));
}

/* forward FLOPs of B sequences of N tokens, H heads, S2 group G: 4 * B * pairs * d */
static double attention_flop(int B, int N, int H, int d, int G) {
    double pairs = 0;
    for (int h = 0; h < H; h++) pairs += s2_head_pairs((size_t)N, h, H, (size_t)G, 0); /* N^2/2 a segment, the flash-attention convention */
    return 4.0 * B * pairs * d; /* 4*B*H*N^2*d/2 for full causal */
}

/* Runs the largest case, untimed, for at least `seconds` of GPU time, so that the table
 * starts at the clock the card holds under load: an idle card starts fast, and its power
 * cap's controller then overshoots for a second or so, which would land on whichever rows
 * run then (bench/NOTES.md step 31). */
static void warm_to_steady_clock(const BenchBuffers *b, cudaEvent_t e0, cudaEvent_t e1, int tokens, int H, int d, float seconds) {
    float total_ms = 0.f;
    while (total_ms < seconds * 1e3f) {
        float f_ms, fb_ms;
        time_attention_once(b, e0, e1, 1, tokens, H, d, 0, &f_ms, &fb_ms);
        total_ms += f_ms + fb_ms;
    }
}

static void bench(const char *json_path, int d) {
    const int H = 32, tokens = 32768, reps = 10;
    const int cases[][2] = {{1024, 0}, {4096, 0}, {8192, 0}, {16384, 0}, {32768, 0}, {4096, 1024}, {16384, 4096}, {32768, 8192}};
    const int n_cases = (int)(sizeof cases / sizeof cases[0]);
    const size_t n_el = (size_t)tokens * H * d;
    BenchBuffers buf = bench_buffers_alloc(n_el, (size_t)tokens * H, attn_backward_workspace_bytes(1, tokens, H, d));
    uint16_t *q = buf.q, *o = buf.o;
    cudaEvent_t e0, e1;
    CUDA_CHECK(cudaEventCreate(&e0)); CUDA_CHECK(cudaEventCreate(&e1));
    BenchRow rows[16];
    warm_to_steady_clock(&buf, e0, e1, tokens, H, d, 3.f);
    printf("attention benchmark: causal, H=%d, d=%d, B*N=%d tokens, bf16, median of %d, after 3 s of warm-up\n", H, d, tokens, reps);
    printf("%-8s %-6s %10s %10s %12s %12s\n", "N", "G", "fwd ms", "fwd TF/s", "fwd+bwd ms", "f+b TF/s");
    for (int c = 0; c < n_cases; c++) {
        const int N = cases[c][0], G = cases[c][1], B = tokens / N;
        const double fwd_flop = attention_flop(B, N, H, d, G);
        float t_f[32], t_fb[32];
        for (int r = -2; r < reps; r++) {
            float f_ms, fb_ms;
            time_attention_once(&buf, e0, e1, B, N, H, d, G, &f_ms, &fb_ms);
            if (r >= 0) t_f[r] = f_ms, t_fb[r] = fb_ms;
        }
        qsort(t_f, reps, sizeof(float), cmp_float);
        qsort(t_fb, reps, sizeof(float), cmp_float);
        BenchRow *row = &rows[c];
        row->N = N; row->G = G;
        row->fwd_ms = t_f[reps / 2];
        row->fwdbwd_ms = t_fb[reps / 2];
        row->fwd_tflops = fwd_flop / (row->fwd_ms * 1e-3) / 1e12;
        row->fwdbwd_tflops = 3.5 * fwd_flop / (row->fwdbwd_ms * 1e-3) / 1e12;
        printf("%-8d %-6d %10.3f %10.1f %12.3f %12.1f\n", N, G, row->fwd_ms, row->fwd_tflops, row->fwdbwd_ms, row->fwdbwd_tflops);
        fflush(stdout);
    }
    /* S2 against the full kernel at its segment length (N = G, the same B*N tokens), timed in
     * alternation, rep by rep: the table above runs the cases one after another, so a ratio
     * read from it also carries whatever the clock did between two cases minutes apart (the
     * short full case runs first, on a cool card, the S2 cases after the longest ones). */
    double s2_ratio[16][2];
    int n_s2 = 0;
    printf("S2 against the full kernel at N = G, alternating rep by rep (TFLOP/s ratio, medians of %d):\n", reps);
    for (int c = 0; c < n_cases; c++) {
        const int N = cases[c][0], G = cases[c][1];
        if (G == 0) continue;
        const double flop_s2 = attention_flop(tokens / N, N, H, d, G), flop_full = attention_flop(tokens / G, G, H, d, 0);
        float s2_f[32], s2_fb[32], full_f[32], full_fb[32];
        for (int r = -2; r < reps; r++) {
            float a, b2, x, y;
            time_attention_once(&buf, e0, e1, tokens / N, N, H, d, G, &a, &b2);
            time_attention_once(&buf, e0, e1, tokens / G, G, H, d, 0, &x, &y);
            if (r >= 0) s2_f[r] = a, s2_fb[r] = b2, full_f[r] = x, full_fb[r] = y;
        }
        qsort(s2_f, reps, sizeof(float), cmp_float); qsort(s2_fb, reps, sizeof(float), cmp_float);
        qsort(full_f, reps, sizeof(float), cmp_float); qsort(full_fb, reps, sizeof(float), cmp_float);
        s2_ratio[n_s2][0] = (flop_s2 / s2_f[reps / 2]) / (flop_full / full_f[reps / 2]);
        s2_ratio[n_s2][1] = (flop_s2 / s2_fb[reps / 2]) / (flop_full / full_fb[reps / 2]);
        printf("  N=%d G=%d: forward %.3f ms vs %.3f ms at N=%d, %.2fx; forward+backward %.3f vs %.3f ms, %.2fx\n", N, G, s2_f[reps / 2],
               full_f[reps / 2], G, s2_ratio[n_s2][0], s2_fb[reps / 2], full_fb[reps / 2], s2_ratio[n_s2][1]);
        fflush(stdout);
        n_s2++;
    }
    /* decode: one token against a long cache, B=1 */
    printf("%-8s %-6s %10s %10s\n", "decode", "Hk", "ms", "GB/s");
    const int dec_cases[][2] = {{32768, 32}, {100000, 32}, {100000, 8}};
    double dec_ms[3], dec_gbs[3];
    for (int c = 0; c < 3; c++) {
        const int n_keys = dec_cases[c][0], dHk = dec_cases[c][1];
        uint16_t *kc, *vc; /* [1, n_keys, Hk, d] */
        const size_t n_kv = (size_t)n_keys * dHk * d;
        CUDA_CHECK(cudaMalloc(&kc, n_kv * 2)); CUDA_CHECK(cudaMalloc(&vc, n_kv * 2));
        fill_random_bf16(kc, n_kv, 5, 1.f); fill_random_bf16(vc, n_kv, 6, 1.f);
        void *dws;
        CUDA_CHECK(cudaMalloc(&dws, attn_decode_workspace_bytes(1, H, d, n_keys)));
        float ts[32];
        for (int r = -2; r < reps; r++) {
            float ms;
            CUDA_CHECK(cudaEventRecord(e0));
            if (attn_decode(q, kc, vc, o, dws, 1, H, dHk, d, n_keys, n_keys) != 0) die("%s", last_error());
            CUDA_CHECK(cudaEventRecord(e1));
            CUDA_CHECK(cudaEventSynchronize(e1));
            CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
            if (r >= 0) ts[r] = ms;
        }
        qsort(ts, reps, sizeof(float), cmp_float);
        dec_ms[c] = ts[reps / 2];
        dec_gbs[c] = 2.0 * n_keys * dHk * d * 2 / (dec_ms[c] * 1e-3) / 1e9;
        printf("%-8d %-6d %10.4f %10.0f\n", n_keys, dHk, dec_ms[c], dec_gbs[c]);
        CUDA_CHECK(cudaFree(dws)); CUDA_CHECK(cudaFree(kc)); CUDA_CHECK(cudaFree(vc));
    }
    cudaDeviceProp prop;
    CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    FILE *f = fopen(json_path, "w");
    if (!f) die("cannot write %s: %s", json_path, strerror(errno));
    fprintf(f, "{\n  \"device\": \"%s\",\n  \"command\": \"%s\",\n  \"H\": %d, \"d\": %d, \"tokens\": %d, \"reps\": %d,\n", prop.name, d == 128 ? "make bench" : "./04_s2attn --bench --d 64", H, d, tokens, reps);
    fprintf(f, "  \"flops\": \"forward 4*B*pairs*d (pairs = N^2/2 per head causal, in-segment pairs for S2); fwd+bwd 3.5x\",\n  \"attention\": [\n");
    for (int c = 0; c < n_cases; c++)
        fprintf(f, "    {\"N\": %d, \"B\": %d, \"G\": %d, \"fwd_ms\": %.4f, \"fwd_tflops\": %.1f, \"fwdbwd_ms\": %.4f, \"fwdbwd_tflops\": %.1f}%s\n",
                rows[c].N, tokens / rows[c].N, rows[c].G, rows[c].fwd_ms, rows[c].fwd_tflops, rows[c].fwdbwd_ms, rows[c].fwdbwd_tflops, c + 1 < n_cases ? "," : "");
    fprintf(f, "  ],\n  \"s2_vs_full_alternating\": [\n");
    for (int c = 0, k = 0; c < n_cases; c++)
        if (cases[c][1] > 0) {
            fprintf(f, "    {\"N\": %d, \"G\": %d, \"fwd_ratio\": %.3f, \"fwdbwd_ratio\": %.3f}%s\n", cases[c][0], cases[c][1], s2_ratio[k][0], s2_ratio[k][1],
                    k + 1 < n_s2 ? "," : "");
            k++;
        }
    fprintf(f, "  ],\n  \"decode\": [\n");
    for (int c = 0; c < 3; c++)
        fprintf(f, "    {\"B\": 1, \"H\": %d, \"Hk\": %d, \"n_keys\": %d, \"ms\": %.4f, \"kv_GBps\": %.0f}%s\n", H, dec_cases[c][1], dec_cases[c][0], dec_ms[c], dec_gbs[c], c < 2 ? "," : "");
    fprintf(f, "  ]\n}\n");
    CHECK(fclose(f) == 0, "closing %s failed", json_path);
    printf("wrote %s\n", json_path);
    bench_buffers_free(&buf);
}

/* times every tile variant on a few shapes (the sweep behind bench/NOTES.md) */
static void sweep_variants(int d) {
    const int H = 32, tokens = 32768, reps = 10;
    const int cases[][2] = {{4096, 0}, {16384, 0}, {16384, 4096}};
    const size_t n_el = (size_t)tokens * H * d;
    BenchBuffers buf = bench_buffers_alloc(n_el, (size_t)tokens * H, attn_backward_workspace_bytes(1, tokens, H, d));
    uint16_t *q = buf.q, *k = buf.k, *v = buf.v, *o = buf.o, *dout = buf.dout, *dq = buf.dq, *dk = buf.dk, *dv = buf.dv;
    float *lse = buf.lse;
    void *ws = buf.ws;
    cudaEvent_t e0, e1;
    CUDA_CHECK(cudaEventCreate(&e0)); CUDA_CHECK(cudaEventCreate(&e1));
    printf("tile variants: causal, H=%d, d=%d, B*N=%d tokens, bf16, median of %d\n", H, d, tokens, reps);
    for (int pass = 0; pass < 2; pass++) {
        const int n_var = pass == 0 ? N_FWD_VARIANTS : N_BWD_VARIANTS;
        for (int var = 0; var < n_var; var++) {
            if (pass == 0) attn_set_tile_variant(var, 0); else attn_set_tile_variant(0, var);
            printf("%s variant %d (%s):", pass == 0 ? "forward" : "backward", var, pass == 0 ? fwd_variant_name[var] : bwd_variant_name[var]);
            for (int c = 0; c < 3; c++) {
                const int N = cases[c][0], G = cases[c][1], B = tokens / N;
                const double flop = attention_flop(B, N, H, d, G) * (pass == 0 ? 1.0 : 2.5);
                float ts[32];
                for (int r = -2; r < reps; r++) {
                    float ms;
                    if (pass == 1 && attn_forward(q, k, v, o, lse, B, N, H, H, d, G) != 0) die("%s", last_error());
                    CUDA_CHECK(cudaEventRecord(e0));
                    if (pass == 0 && attn_forward(q, k, v, o, lse, B, N, H, H, d, G) != 0) die("%s", last_error());
                    if (pass == 1 && attn_backward(q, k, v, o, dout, lse, dq, dk, dv, ws, B, N, H, H, d, G) != 0) die("%s", last_error());
                    CUDA_CHECK(cudaEventRecord(e1));
                    CUDA_CHECK(cudaEventSynchronize(e1));
                    CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
                    if (r >= 0) ts[r] = ms;
                }
                qsort(ts, reps, sizeof(float), cmp_float);
                printf("  N=%d G=%d %.1f TF/s", N, G, flop / (ts[reps / 2] * 1e-3) / 1e12);
            }
            printf("\n");
            fflush(stdout);
        }
    }
    attn_set_tile_variant(0, 0);
    bench_buffers_free(&buf);
}

int main(int argc, char **argv) {
    const char *out = "bench/results/attn_ours.json";
    int do_bench = 0, do_variants = 0, head_dim = 128, fwd_variant = 0, bwd_variant = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--bench")) do_bench = 1;
        else if (!strcmp(argv[i], "--variants")) do_variants = 1;
        else if (!strcmp(argv[i], "--out") && i + 1 < argc) out = argv[++i];
        else if (!strcmp(argv[i], "--d") && i + 1 < argc) head_dim = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--fwd-variant") && i + 1 < argc) fwd_variant = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--bwd-variant") && i + 1 < argc) bwd_variant = atoi(argv[++i]);
        else die("usage: %s --bench [--d 64|128] [--fwd-variant V] [--bwd-variant V] [--out results.json] | --variants [--d 64|128]", argv[0]);
    }
    if (!do_bench && !do_variants) die("usage: %s --bench [--d 64|128] [--out results.json] | --variants [--d 64|128]   (kernel checks: make test)", argv[0]);
    if (head_dim != 64 && head_dim != 128) die("--d %d: the kernels support head dims 64 and 128", head_dim);
    int n_dev = 0;
    if (cudaGetDeviceCount(&n_dev) != cudaSuccess || n_dev == 0) die("no CUDA GPU found: the benchmark needs one");
    if (do_variants) sweep_variants(head_dim);
    if (do_bench) {
        if (attn_set_tile_variant(fwd_variant, bwd_variant) != 0) die("--fwd-variant %d --bwd-variant %d: %s", fwd_variant, bwd_variant, last_error());
        bench(out, head_dim);
    }
    return 0;
}
#endif /* S2ATTN_MAIN */
