/* bench/attn_ab.cu: two or more builds of the attention stage timed against each other in one
 * process (bench/attn_ab.sh builds them and this driver).
 *
 * Why: a kernel change worth 2% is inside the spread between two runs (clocks, the card's
 * temperature), so "04_s2attn --bench before, then after" cannot see it. Here every build of
 * 04_s2attn.cu is a shared library loaded with dlopen, and the builds take turns: a round is
 * REPS forward launches and REPS backward launches of each build, five rounds, and each
 * figure is the median over its rounds, so slow drift falls on all builds alike.
 * Before any timing the gradients of each build are compared with the first build's on the
 * same inputs (largest absolute difference, to stderr): a change in the sum order moves a
 * bf16 output by a rounding step; anything larger is a bug to look at before the times.
 *
 * Cases: causal, H = Hk = 32, d = 128 (or --d 64), B * N = 32k tokens; N = 1k, 4k, 16k, 32k,
 * and S2 at N = 16k with G = 4k, or the N:G pairs of --cases (G = 0: full causal), e.g.
 * --cases 1024:0,4096:1024 for S2 at G = 1k beside the full kernel at N = G. FLOPs: the
 * forward 4 B d times the attended pairs, counted as 04_s2attn --bench counts them
 * (common.h's s2_head_pairs without the diagonal: N^2 / 2 a causal head; results written
 * before this counted N (N + 1) / 2, 0.1% more at 1k, and ratios between builds do not
 * depend on it), the backward 2.5x the forward.
 * Output: JSON on stdout, one entry a build and case: {"case", "lib", "fwd_ms", "bwd_ms",
 * "fwd_tflops", "bwd_tflops", "fb_tflops"}.
 * Leaves out: GQA, odd N (tests/test_gpu_attention checks those; this only times).
 */
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <dlfcn.h>
#include <vector>

#include "04_gpu.h"
#include "common.h"

typedef decltype(&attn_forward) forward_fn;
typedef decltype(&attn_backward) backward_fn;
typedef decltype(&attn_backward_workspace_bytes) workspace_fn;

struct build {
    const char *path;
    forward_fn forward;
    backward_fn backward;
    workspace_fn workspace_bytes;
};

/* deterministic values in [-1, 1) as bf16 bits, from a hash of the index */
__global__ void fill_bf16(uint16_t *x, size_t n, uint32_t seed) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        uint32_t h = (uint32_t)i * 2654435761u ^ seed;
        h ^= h >> 13, h *= 0x5bd1e995u, h ^= h >> 15;
        const float f = ((h & 0xffff) / 65536.f - 0.5f) * 2.f;
        x[i] = (uint16_t)(__float_as_uint(f) >> 16);
    }
}

/* *out = max |a - b| over n bf16 values (*out zeroed before; floats >= 0 order as ints) */
__global__ void max_abs_diff(const uint16_t *a, const uint16_t *b, size_t n, float *out) {
    float m = 0.f;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float d = fabsf(__uint_as_float((uint32_t)a[i] << 16) - __uint_as_float((uint32_t)b[i] << 16));
        if (!(d <= m)) m = d; /* a NaN wins */
    }
    atomicMax((int *)out, __float_as_int(m));
}

static void check(cudaError_t e, const char *what) {
    if (e != cudaSuccess) {
        fprintf(stderr, "attn_ab: %s: %s\n", what, cudaGetErrorString(e));
        exit(1);
    }
}

/* the (query, key) pairs the B * H heads attend, counted as 04_s2attn --bench counts them
 * (s2_head_pairs without the diagonal: L^2 / 2 a segment of L queries) */
static double attended_pairs(int B, int N, int H, int G) {
    double pairs = 0;
    for (int h = 0; h < H; h++) pairs += s2_head_pairs((size_t)N, h, H, (size_t)G, 0);
    return pairs * B;
}

static float median(std::vector<float> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}

int main(int argc, char **argv) {
    int d = 128, first = 1;
    std::vector<int> Ns = {1024, 4096, 16384, 32768, 16384}, Gs = {0, 0, 0, 0, 4096};
    for (;;) {
        if (argc > first + 1 && !strcmp(argv[first], "--d")) {
            d = atoi(argv[first + 1]), first += 2;
        } else if (argc > first + 1 && !strcmp(argv[first], "--cases")) {
            Ns.clear(), Gs.clear();
            for (const char *c = argv[first + 1]; *c;) {
                int n_case = 0, g_case = 0, used = 0;
                if (sscanf(c, "%d:%d%n", &n_case, &g_case, &used) != 2 || n_case <= 0 || 32768 % n_case || g_case < 0 ||
                    (g_case && (n_case % g_case || g_case % 2))) {
                    fprintf(stderr, "attn_ab: --cases takes N:G pairs (N divides 32768, G = 0 or an even divisor of N), not '%s'\n", c);
                    return 1;
                }
                Ns.push_back(n_case), Gs.push_back(g_case);
                c += used;
                if (*c == ',') c++;
            }
            first += 2;
        } else {
            break;
        }
    }
    if (argc - first < 1 || (d != 64 && d != 128)) {
        fprintf(stderr, "usage: attn_ab [--d 64|128] [--cases N:G,...] libA.so [libB.so ...]\n");
        return 1;
    }
    std::vector<build> builds;
    for (int i = first; i < argc; i++) {
        void *h = dlopen(argv[i], RTLD_NOW | RTLD_LOCAL);
        if (!h) {
            fprintf(stderr, "attn_ab: cannot load %s: %s\n", argv[i], dlerror());
            return 1;
        }
        build b = {argv[i], (forward_fn)dlsym(h, "attn_forward"), (backward_fn)dlsym(h, "attn_backward"),
                   (workspace_fn)dlsym(h, "attn_backward_workspace_bytes")};
        if (!b.forward || !b.backward || !b.workspace_bytes) {
            fprintf(stderr, "attn_ab: %s does not export the attention API (04_gpu.h)\n", argv[i]);
            return 1;
        }
        builds.push_back(b);
    }
    const int nb = (int)builds.size(), H = 32, TOKENS = 32768;
    const size_t n = (size_t)TOKENS * H * d;
    /* q, k, v, o, dout, and the gradients: [B, N, H, d] bf16, B * N = TOKENS; the first
     * build's gradients kept apart for the comparison; lse [B, H, N] fp32 */
    uint16_t *q, *k, *v, *o, *dout, *dq, *dk, *dv, *dq_first, *dk_first, *dv_first;
    uint16_t **all[] = {&q, &k, &v, &o, &dout, &dq, &dk, &dv, &dq_first, &dk_first, &dv_first};
    for (uint16_t **p : all) check(cudaMalloc(p, n * 2), "cudaMalloc");
    float *lse, *diff;
    check(cudaMalloc(&lse, (size_t)TOKENS * H * 4), "cudaMalloc");
    check(cudaMalloc(&diff, 4), "cudaMalloc");
    size_t ws_bytes = 0; /* the largest any build asks for at any N (B * N is fixed) */
    for (const build &b : builds) ws_bytes = std::max(ws_bytes, b.workspace_bytes(1, TOKENS, H, d));
    void *workspace;
    check(cudaMalloc(&workspace, ws_bytes), "cudaMalloc");
    fill_bf16<<<1024, 256>>>(q, n, 1), fill_bf16<<<1024, 256>>>(k, n, 2);
    fill_bf16<<<1024, 256>>>(v, n, 3), fill_bf16<<<1024, 256>>>(dout, n, 4);
    check(cudaGetLastError(), "fill");
    cudaEvent_t start, stop;
    cudaEventCreate(&start), cudaEventCreate(&stop);
    cudaDeviceProp prop;
    check(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");

    printf("{\"device\": \"%s\", \"d\": %d, \"H\": %d, \"tokens\": %d, \"results\": [\n", prop.name, d, H, TOKENS);
    const char *sep = "";
    for (size_t c = 0; c < Ns.size(); c++) {
        const int N = Ns[c], B = TOKENS / N, G = Gs[c];
        const double fwd_flops = 4.0 * d * attended_pairs(B, N, H, G);
        char name[32];
        if (G) snprintf(name, sizeof name, "S2 %dk G%dk", N / 1024, G / 1024);
        else snprintf(name, sizeof name, "%dk", N / 1024);
        /* the gradients of each build against the first's (each runs its own forward first) */
        for (int i = 0; i < nb; i++) {
            const build &b = builds[i];
            uint16_t *gq = i ? dq : dq_first, *gk = i ? dk : dk_first, *gv = i ? dv : dv_first;
            if (b.forward(q, k, v, o, lse, B, N, H, H, d, G) || b.backward(q, k, v, o, dout, lse, gq, gk, gv, workspace, B, N, H, H, d, G)) {
                fprintf(stderr, "attn_ab: %s refused %s\n", b.path, name);
                return 1;
            }
            if (!i) continue;
            float m[3];
            const uint16_t *mine[3] = {dq, dk, dv}, *theirs[3] = {dq_first, dk_first, dv_first};
            for (int j = 0; j < 3; j++) {
                check(cudaMemset(diff, 0, 4), "cudaMemset");
                max_abs_diff<<<512, 256>>>(mine[j], theirs[j], n, diff);
                check(cudaMemcpy(&m[j], diff, 4, cudaMemcpyDeviceToHost), "max_abs_diff");
            }
            fprintf(stderr, "%s: %s against %s: max |diff| dq %.3g dk %.3g dv %.3g\n", name, b.path, builds[0].path, m[0], m[1], m[2]);
        }
        /* timing: five rounds, each build REPS forward and REPS backward launches a round */
        const int reps = N <= 4096 ? 20 : 6;
        std::vector<std::vector<float>> fwd_ms(nb), bwd_ms(nb);
        for (int round = 0; round < 5; round++)
            for (int i = 0; i < nb; i++)
                for (int r = 0; r < reps; r++) {
                    const build &b = builds[i];
                    float ms;
                    cudaEventRecord(start);
                    b.forward(q, k, v, o, lse, B, N, H, H, d, G);
                    cudaEventRecord(stop);
                    check(cudaEventSynchronize(stop), "forward");
                    cudaEventElapsedTime(&ms, start, stop);
                    fwd_ms[i].push_back(ms);
                    cudaEventRecord(start);
                    b.backward(q, k, v, o, dout, lse, dq, dk, dv, workspace, B, N, H, H, d, G);
                    cudaEventRecord(stop);
                    check(cudaEventSynchronize(stop), "backward");
                    cudaEventElapsedTime(&ms, start, stop);
                    bwd_ms[i].push_back(ms);
                }
        for (int i = 0; i < nb; i++) {
            const double f = median(fwd_ms[i]), b = median(bwd_ms[i]);
            printf("%s {\"case\": \"%s\", \"lib\": \"%s\", \"fwd_ms\": %.4f, \"bwd_ms\": %.4f, \"fwd_tflops\": %.1f, "
                   "\"bwd_tflops\": %.1f, \"fb_tflops\": %.1f}",
                   sep, name, builds[i].path, f, b, fwd_flops / f / 1e9, 2.5 * fwd_flops / b / 1e9, 3.5 * fwd_flops / (f + b) / 1e9);
            sep = ",\n";
        }
        fflush(stdout);
    }
    printf("\n]}\n");
    check(cudaDeviceSynchronize(), "the last launch");
    return 0;
}
