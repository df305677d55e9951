/* test_gpu_layers_stages.c: the GPU layer kernels agree with the CPU stages they replace.
 *
 * test_gpu_layers.c checks every kernel tightly against a double-precision reference; this
 * test holds them to the semantics of the fp32 functions of 02_model.c (RMSNorm, RoPE with
 * its HF tables, SwiGLU, cross-entropy through the head) and 03_lora.c (the LoRA linear,
 * AdamW), which the training stage is checked against: same inputs (bf16 values), same
 * outputs. Both sides round differently (the GPU to bf16 once, the CPU in fp32 all along),
 * so a bf16 output may differ by 2^-8 of itself plus 1e-3 of the tensor's rms (sums that
 * cancel), and an fp32 output by 1e-5 of itself plus 1e-5 of the rms. Where the GPU rounds
 * an intermediate to bf16, dh and dW of the head may be off by 2^-8 of the sum of the
 * magnitudes of their terms (computed beside the reference), and LoRA's results (through
 * x A^T and dy B) carry a random error of about 2^-9 of their rms: those checks allow 8e-3
 * (outputs that add to a base value) or 1.5e-2 (gradients) of the rms, and 1e-2 of the value;
 * an output added to a base value may also be off by one bf16 ulp of the base and of the term.
 * Without a GPU it exits 77.
 */
#define STAGE 0
#include "03_lora.c"
#include "check.h"

#include "04_gpu.h" /* the kernels under test */
#include "gpu_mem.h"


static Rng g_rng;

/* n random bf16 values: bits for the GPU, the same values as float for the CPU stage. */
static void rand_bf16(uint16_t *bits, float *vals, size_t n, float mean, float scale) {
    for (size_t i = 0; i < n; i++) {
        bits[i] = f32_to_bf16(mean + scale * rng_normal(&g_rng));
        vals[i] = bf16_to_f32(bits[i]);
    }
}
/* A bf16 device buffer [n] read back as floats. */
static float *download_bf16(const void *dev, size_t n) {
    uint16_t *bits = xmalloc(n * 2);
    float *out = xmalloc(n * 4);
    download(bits, dev, n * 2);
    for (size_t i = 0; i < n; i++) out[i] = bf16_to_f32(bits[i]);
    free(bits);
    return out;
}

/* |got - want| <= rtol |want| + arms * rms(want) (+ extra[i]) everywhere (NaN fails). */
static void agree_extra(const char *what, const float *got, const float *want, size_t n, double rtol, double arms, const float *extra) {
    double ss = 0, max_ratio = 0;
    for (size_t i = 0; i < n; i++) ss += (double)want[i] * want[i];
    double atol = arms * sqrt(ss / (double)(n ? n : 1));
    size_t bad = 0, first = 0;
    for (size_t i = 0; i < n; i++) {
        double err = fabs((double)got[i] - want[i]), tol = rtol * fabs(want[i]) + atol + (extra ? extra[i] : 0.0);
        if (!(err <= tol)) { if (!bad) first = i; bad++; }
        if (tol > 0 && err / tol > max_ratio) max_ratio = err / tol;
    }
    if (!check_counted(!bad)) {
        printf("FAIL %-52s %zu of %zu differ; first [%zu] gpu %.7g stage %.7g\n", what, bad, n, first, (double)got[first], (double)want[first]);
    } else {
        printf("ok   %-52s n=%-7zu (%.2f of tolerance)\n", what, n, max_ratio);
    }
}

static void agree(const char *what, const float *got, const float *want, size_t n, double rtol, double arms) {
    agree_extra(what, got, want, n, rtol, arms, NULL);
}

static void rmsnorm_vs_stage(size_t T, size_t D) {
    float eps = 1e-5f;
    uint16_t *xb = xmalloc(T * D * 2), *wb = xmalloc(D * 2), *gb = xmalloc(T * D * 2);
    float *x = xmalloc(T * D * 4), *w = xmalloc(D * 4), *g = xmalloc(T * D * 4);
    float *y = xmalloc(T * D * 4), *rstd = xmalloc(T * 4), *dx = xcalloc(T * D, 4), *dw = xcalloc(D, 4);
    rand_bf16(xb, x, T * D, 0, 1);
    rand_bf16(wb, w, D, 1, 0.1f);
    rand_bf16(gb, g, T * D, 0, 1);
    rmsnorm_forward(y, rstd, x, w, T, D, eps);
    rmsnorm_backward(dx, dw, g, x, w, rstd, T, D);
    void *X = to_dev(xb, T * D * 2), *W = to_dev(wb, D * 2), *G = to_dev(gb, T * D * 2), *Y = dev_alloc(T * D * 2);
    void *DX = dev_alloc(T * D * 2), *R = dev_alloc(T * 4);
    float *DW = dev_alloc(D * 4);
    poison(Y, T * D * 2); poison(R, T * 4); poison(DX, T * D * 2);
    CUDA_CHECK(cudaMemset(DW, 0, D * 4));
    gpu_rmsnorm_forward(Y, R, X, W, T, D, eps);
    gpu_rmsnorm_backward(DX, DW, G, X, W, R, T, D, eps, 0);
    float *y_gpu = download_bf16(Y, T * D), *dx_gpu = download_bf16(DX, T * D), *r_gpu = xmalloc(T * 4), *dw_gpu = xmalloc(D * 4);
    download(r_gpu, R, T * 4);
    download(dw_gpu, DW, D * 4);
    char what[96];
    snprintf(what, sizeof what, "rmsnorm forward T=%zu D=%zu", T, D);
    agree(what, y_gpu, y, T * D, 1.0 / 256, 1e-3);
    snprintf(what, sizeof what, "rmsnorm rstd T=%zu D=%zu", T, D);
    agree(what, r_gpu, rstd, T, 1e-5, 1e-5);
    snprintf(what, sizeof what, "rmsnorm backward dx T=%zu D=%zu", T, D);
    agree(what, dx_gpu, dx, T * D, 1.0 / 256, 1e-3);
    snprintf(what, sizeof what, "rmsnorm backward dw T=%zu D=%zu", T, D);
    agree(what, dw_gpu, dw, D, 1e-5, 1e-5);
    cudaFree(X); cudaFree(W); cudaFree(G); cudaFree(Y); cudaFree(DX); cudaFree(R); cudaFree(DW);
    free(xb); free(wb); free(gb); free(x); free(w); free(g); free(y); free(rstd); free(dx); free(dw);
    free(y_gpu); free(dx_gpu); free(r_gpu); free(dw_gpu);
}

/* 04's RoPE kernel with 02's table for config c (every RoPE type) against 02's rope_apply;
 * and 04's bias add against adding in fp32. */
static void rope_vs_stage(const Config *c, size_t N, int nh, size_t pos_offset, size_t seq_len) {
    int d = c->head_dim;
    size_t n = N * (size_t)nh * (size_t)d, half = (size_t)d / 2;
    uint16_t *xb = xmalloc(n * 2);
    float *x = xmalloc(n * 4), *ref = xmalloc(n * 4), *inv_freq = xmalloc(half * 4);
    float *cos_t = xmalloc(N * half * 4), *sin_t = xmalloc(N * half * 4);
    float attention = rope_inv_freq(c, seq_len, inv_freq);
    rope_tables(cos_t, sin_t, pos_offset, N, inv_freq, d, attention);
    void *TAB = to_dev(inv_freq, half * 4);
    rand_bf16(xb, x, n, 0, 1);
    for (int backward = 0; backward < 2; backward++) {
        memcpy(ref, x, n * 4);
        rope_apply(ref, cos_t, sin_t, 1, N, nh, d, backward ? -1.0f : 1.0f);
        void *X = to_dev(xb, n * 2);
        if (backward) gpu_rope_backward(X, N, (size_t)nh, (size_t)d, (size_t)nh * d, pos_offset, TAB, attention);
        else gpu_rope_forward(X, N, (size_t)nh, (size_t)d, (size_t)nh * d, pos_offset, TAB, attention);
        float *got = download_bf16(X, n);
        char what[128];
        snprintf(what, sizeof what, "rope %s %s N=%zu d=%d pos0=%zu factor=%g", ROPE_TYPE_NAMES[c->rope_type], backward ? "backward" : "forward", N, d,
                 pos_offset, (double)c->rope_factor);
        agree(what, got, ref, n, 1.0 / 256, 1e-3);
        cudaFree(X);
        free(got);
    }
    cudaFree(TAB);
    free(xb); free(x); free(ref); free(cos_t); free(sin_t); free(inv_freq);
}
static Config rope_config(RopeType type, int d, float theta, float factor, int max_pos) {
    Config c;
    memset(&c, 0, sizeof c);
    c.head_dim = d; c.rope_theta = theta; c.rope_type = c.rope_config_type = type;
    c.rope_factor = c.rope_config_factor = factor; c.max_pos = max_pos;
    if (type == ROPE_LLAMA3) { c.rope.low_freq_factor = 1; c.rope.high_freq_factor = 4; c.rope.orig_max_pos = max_pos / 16; }
    return c;
}

static void bias_vs_stage(size_t T, size_t out) {
    uint16_t *yb = xmalloc(T * out * 2), *bb = xmalloc(out * 2);
    float *y = xmalloc(T * out * 4), *b = xmalloc(out * 4);
    rand_bf16(yb, y, T * out, 0, 1);
    rand_bf16(bb, b, out, 0, 1);
    for (size_t t = 0; t < T; t++)
        for (size_t i = 0; i < out; i++) y[t * out + i] += b[i];
    void *Y = to_dev(yb, T * out * 2), *Bd = to_dev(bb, out * 2);
    gpu_add_bias(Y, Bd, T, out);
    float *got = download_bf16(Y, T * out);
    char what[64];
    snprintf(what, sizeof what, "bias add T=%zu out=%zu", T, out);
    agree(what, got, y, T * out, 1.0 / 256, 1e-3);
    cudaFree(Y); cudaFree(Bd);
    free(yb); free(bb); free(y); free(b); free(got);
}

static void swiglu_vs_stage(size_t n) {
    uint16_t *gb = xmalloc(n * 2), *ub = xmalloc(n * 2), *db = xmalloc(n * 2);
    float *g = xmalloc(n * 4), *u = xmalloc(n * 4), *dh = xmalloc(n * 4), *h = xmalloc(n * 4), *dg = xmalloc(n * 4), *du = xmalloc(n * 4);
    rand_bf16(gb, g, n, 0, 2);
    rand_bf16(ub, u, n, 0, 1);
    rand_bf16(db, dh, n, 0, 1);
    swiglu_forward(h, g, u, n);
    swiglu_backward(dg, du, dh, g, u, n);
    void *G = to_dev(gb, n * 2), *U = to_dev(ub, n * 2), *DH = to_dev(db, n * 2), *H = dev_alloc(n * 2);
    void *DG = dev_alloc(n * 2), *DU = dev_alloc(n * 2);
    poison(H, n * 2); poison(DG, n * 2); poison(DU, n * 2);
    gpu_swiglu_forward(H, G, U, n);
    gpu_swiglu_backward(DG, DU, DH, G, U, n);
    float *h_gpu = download_bf16(H, n), *dg_gpu = download_bf16(DG, n), *du_gpu = download_bf16(DU, n);
    agree("swiglu forward", h_gpu, h, n, 1.0 / 256, 1e-3);
    agree("swiglu backward dgate", dg_gpu, dg, n, 1.0 / 256, 1e-3);
    agree("swiglu backward dup", du_gpu, du, n, 1.0 / 256, 1e-3);
    cudaFree(G); cudaFree(U); cudaFree(DH); cudaFree(H); cudaFree(DG); cudaFree(DU);
    free(gb); free(ub); free(db); free(g); free(u); free(dh); free(h); free(dg); free(du); free(h_gpu); free(dg_gpu); free(du_gpu);
}

/* The head: logits = h W^T, the stage's mean cross-entropy and its dlogits, then dh and dW. */
static void cross_entropy_vs_stage(size_t T, size_t D, size_t V, size_t chunk) {
    uint16_t *hb = xmalloc(T * D * 2), *wb = xmalloc(V * D * 2);
    float *h = xmalloc(T * D * 4), *w = xmalloc(V * D * 4), *logits = xmalloc(T * V * 4);
    float *dh = xcalloc(T * D, 4), *dw = xcalloc(V * D, 4);
    int32_t *tgt = xmalloc(T * 4);
    rand_bf16(hb, h, T * D, 0, 1);
    rand_bf16(wb, w, V * D, 0, 0.3f);
    for (size_t t = 0; t < T; t++) tgt[t] = rng_uniform(&g_rng) < 0.2f ? IGNORE_INDEX : (int32_t)rng_below(&g_rng, V);
    size_t count = 0;
    matmul_forward(logits, h, w, T, D, V);
    float mean = cross_entropy_forward(logits, tgt, T, V, &count);
    cross_entropy_backward(logits, logits, tgt, T, V, count); /* in place: now dlogits */
    matmul_backward_dx(dh, logits, w, T, D, V);
    matmul_backward_dw(dw, logits, h, T, D, V);
    /* the GPU rounds dlogits to bf16: each term of dh and dW may be off by 2^-9 of itself,
     * so the allowance is 2^-8 of the sums of |terms|, made by the same products on |values| */
    float *abs_dl = xmalloc(T * V * 4), *abs_h = xmalloc(T * D * 4), *abs_w = xmalloc(V * D * 4);
    float *dh_bound = xcalloc(T * D, 4), *dw_bound = xcalloc(V * D, 4);
    for (size_t i = 0; i < T * V; i++) abs_dl[i] = fabsf(logits[i]);
    for (size_t i = 0; i < T * D; i++) abs_h[i] = fabsf(h[i]);
    for (size_t i = 0; i < V * D; i++) abs_w[i] = fabsf(w[i]);
    matmul_backward_dx(dh_bound, abs_dl, abs_w, T, D, V);
    matmul_backward_dw(dw_bound, abs_dl, abs_h, T, D, V);
    for (size_t i = 0; i < T * D; i++) dh_bound[i] /= 256.0f;
    for (size_t i = 0; i < V * D; i++) dw_bound[i] /= 256.0f;

    void *H = to_dev(hb, T * D * 2), *W = to_dev(wb, V * D * 2), *TG = to_dev(tgt, T * 4), *DH = dev_alloc(T * D * 2);
    float *DW = dev_alloc(V * D * 4);
    poison(DH, T * D * 2);
    CUDA_CHECK(cudaMemset(DW, 0, V * D * 4));
    double loss_sum = 0;
    size_t n_valid = 0;
    gpu_cross_entropy(&loss_sum, &n_valid, DH, DW, H, W, TG, T, D, V, chunk, 1.0f);
    float *dh_gpu = download_bf16(DH, T * D), *dw_gpu = xmalloc(V * D * 4);
    download(dw_gpu, DW, V * D * 4);
    char what[96];
    int same_count = check_counted(n_valid == count);
    printf("%s cross-entropy T=%zu V=%zu: %zu targets counted (stage %zu)\n", same_count ? "ok  " : "FAIL", T, V, n_valid, count);
    float mean_gpu = n_valid ? (float)(loss_sum / (double)n_valid) : 0.0f;
    snprintf(what, sizeof what, "cross-entropy T=%zu D=%zu V=%zu chunk=%zu mean loss", T, D, V, chunk);
    agree(what, &mean_gpu, &mean, 1, 1e-5, 0);
    snprintf(what, sizeof what, "cross-entropy T=%zu D=%zu V=%zu dh", T, D, V);
    agree_extra(what, dh_gpu, dh, T * D, 1.0 / 256, 1e-5, dh_bound);
    snprintf(what, sizeof what, "cross-entropy T=%zu D=%zu V=%zu dW", T, D, V);
    agree_extra(what, dw_gpu, dw, V * D, 1e-5, 1e-5, dw_bound);
    cudaFree(H); cudaFree(W); cudaFree(TG); cudaFree(DH); cudaFree(DW);
    free(hb); free(wb); free(h); free(w); free(logits); free(dh); free(dw); free(tgt); free(dh_gpu); free(dw_gpu);
    free(abs_dl); free(abs_h); free(abs_w); free(dh_bound); free(dw_bound);
}

static void lora_vs_stage(size_t T, size_t in, size_t out, size_t R, float scale) {
    uint16_t *xb = xmalloc(T * in * 2), *ab = xmalloc(R * in * 2), *bb = xmalloc(out * R * 2);
    uint16_t *yb = xmalloc(T * out * 2), *gb = xmalloc(T * out * 2), *dxb = xmalloc(T * in * 2);
    float *x = xmalloc(T * in * 4), *a = xmalloc(R * in * 4), *b = xmalloc(out * R * 4), *y = xmalloc(T * out * 4);
    float *dy = xmalloc(T * out * 4), *dx = xmalloc(T * in * 4), *dA = xcalloc(R * in, 4), *dB = xcalloc(out * R, 4);
    rand_bf16(xb, x, T * in, 0, 1);
    rand_bf16(ab, a, R * in, 0, 0.1f);
    rand_bf16(bb, b, out * R, 0, 0.1f);
    rand_bf16(yb, y, T * out, 0, 1);
    rand_bf16(gb, dy, T * out, 0, 1);
    rand_bf16(dxb, dx, T * in, 0, 1);
    lora_linear_forward(x, T, in, out, R, a, b, scale, y);
    lora_linear_backward(x, dy, T, in, out, R, a, b, scale, dA, dB, dx);
    /* y and dx add the adapter's term to a base value (yb, dxb): allow one bf16 ulp (at most
     * 2^-7 of a value) of the base and of the term, for elements where the two nearly cancel
     * and the GPU rounded either before adding (a seed gave 0.0469 for 0.0565 in dx, 1.14x the
     * rms-based tolerance alone). Since |base| + |term| >= |result|, this also holds one ulp of
     * the result, so no relative tolerance is added on top. */
    float *y_ulp = xmalloc(T * out * 4), *dx_ulp = xmalloc(T * in * 4);
    for (size_t i = 0; i < T * out; i++) {
        float base = bf16_to_f32(yb[i]);
        y_ulp[i] = (fabsf(base) + fabsf(y[i] - base)) / 128.0f;
    }
    for (size_t i = 0; i < T * in; i++) {
        float base = bf16_to_f32(dxb[i]);
        dx_ulp[i] = (fabsf(base) + fabsf(dx[i] - base)) / 128.0f;
    }
    void *X = to_dev(xb, T * in * 2), *A = to_dev(ab, R * in * 2), *B = to_dev(bb, out * R * 2), *Y = to_dev(yb, T * out * 2);
    void *DY = to_dev(gb, T * out * 2), *DX = to_dev(dxb, T * in * 2), *XA = dev_alloc(T * R * 2);
    float *DA = dev_alloc(R * in * 4), *DB = dev_alloc(out * R * 4);
    CUDA_CHECK(cudaMemset(DA, 0, R * in * 4));
    CUDA_CHECK(cudaMemset(DB, 0, out * R * 4));
    poison(XA, T * R * 2);
    gpu_lora_forward(Y, XA, X, A, B, T, in, out, R, scale);
    gpu_lora_backward(DX, DA, DB, DY, X, XA, A, B, T, in, out, R, scale);
    float *y_gpu = download_bf16(Y, T * out), *dx_gpu = download_bf16(DX, T * in), *da_gpu = xmalloc(R * in * 4), *db_gpu = xmalloc(out * R * 4);
    download(da_gpu, DA, R * in * 4);
    download(db_gpu, DB, out * R * 4);
    /* xa and dy B pass through bf16 on the GPU, as in a bf16 PEFT model; y and dx are bf16
     * sums that cuBLAS may form from bf16 partial sums (reduced-precision reduction, which
     * PyTorch allows by default too): one bf16 ulp of the result (y_ulp, dx_ulp) rather than
     * the half ulp of a single rounding (a seed gave 2.125 for 2.1071, 1.1x the half-ulp bound) */
    agree_extra("lora forward y += s (x A^T) B^T", y_gpu, y, T * out, 0.0, 8e-3, y_ulp);
    agree_extra("lora backward dx +=", dx_gpu, dx, T * in, 0.0, 8e-3, dx_ulp);
    agree("lora backward dA (fp32)", da_gpu, dA, R * in, 1e-2, 1.5e-2);
    agree("lora backward dB (fp32)", db_gpu, dB, out * R, 1e-2, 1.5e-2);
    cudaFree(X); cudaFree(A); cudaFree(B); cudaFree(Y); cudaFree(DY); cudaFree(DX); cudaFree(XA); cudaFree(DA); cudaFree(DB);
    free(y_ulp); free(dx_ulp);
    free(xb); free(ab); free(bb); free(yb); free(gb); free(dxb); free(x); free(a); free(b); free(y); free(dy); free(dx);
    free(dA); free(dB); free(y_gpu); free(dx_gpu); free(da_gpu); free(db_gpu);
}

static void adamw_vs_stage(size_t n, float weight_decay) {
    AdamW opt;
    memset(&opt, 0, sizeof opt);
    opt.cfg = adamw_default_config();
    opt.cfg.weight_decay = weight_decay;
    float *p = xmalloc(n * 4), *g = xmalloc(n * 4), *got = xmalloc(n * 4);
    for (size_t i = 0; i < n; i++) p[i] = 0.5f * rng_normal(&g_rng);
    adamw_add(&opt, "w", p, g, n);
    float *P = to_dev(p, n * 4), *G = dev_alloc(n * 4), *M = dev_alloc(n * 4), *Vd = dev_alloc(n * 4);
    uint16_t *PB = dev_alloc(n * 2);
    CUDA_CHECK(cudaMemset(M, 0, n * 4));
    CUDA_CHECK(cudaMemset(Vd, 0, n * 4));
    float lr = 1e-3f;
    for (int step = 1; step <= 3; step++) {
        for (size_t i = 0; i < n; i++) g[i] = 0.01f * rng_normal(&g_rng);
        CUDA_CHECK(cudaMemcpy(G, g, n * 4, cudaMemcpyHostToDevice));
        adamw_step(&opt, lr);
        gpu_adamw(P, PB, G, M, Vd, n, lr, opt.cfg.beta1, opt.cfg.beta2, opt.cfg.eps, weight_decay, step, 1.0f);
        download(got, P, n * 4);
        char what[96];
        snprintf(what, sizeof what, "adamw step %d n=%zu wd=%g (03_lora's adamw_step)", step, n, weight_decay);
        agree(what, got, p, n, 1e-6, 2e-5 * lr); /* the step is ~lr; lerp vs. mul-add forms of m differ in the last bits */
    }
    adamw_free(&opt);
    cudaFree(P); cudaFree(G); cudaFree(M); cudaFree(Vd); cudaFree(PB);
    free(p); free(g); free(got);
}

int main(void) {
    int devices = 0;
    cudaError_t err = cudaGetDeviceCount(&devices);
    if (err != cudaSuccess || devices == 0) {
        printf("skip: no CUDA GPU here (%s)\n", err != cudaSuccess ? cudaGetErrorString(err) : "0 devices");
        return 77;
    }
    uint64_t seed = getenv("SEED") ? strtoull(getenv("SEED"), NULL, 10) : (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32);
    rng_seed(&g_rng, seed);
    printf("seed %llu\n", (unsigned long long)seed);
    rmsnorm_vs_stage(37, 1000);
    rmsnorm_vs_stage(5, 37);
    Config rc = rope_config(ROPE_LINEAR, 64, 10000.0f, 1.0f, 4096);
    rope_vs_stage(&rc, 40, 4, 0, 40);
    rc = rope_config(ROPE_LINEAR, 128, 10000.0f, 4.0f, 4096);
    rope_vs_stage(&rc, 33, 3, 4000, 4033);
    rc = rope_config(ROPE_DYNAMIC, 64, 10000.0f, 2.0f, 1024); /* NTK's base at seq_len 3000 */
    rope_vs_stage(&rc, 37, 2, 2963, 3000);
    rc = rope_config(ROPE_YARN, 128, 500000.0f, 8.0f, 4096); /* blended dimensions, cos/sin scaled */
    rope_vs_stage(&rc, 29, 4, 20000, 0);
    rc = rope_config(ROPE_LLAMA3, 128, 500000.0f, 8.0f, 131072); /* LLaMA-3.1's: original 8192 */
    rope_vs_stage(&rc, 31, 2, 100000, 0);
    bias_vs_stage(37, 3 * 128);
    bias_vs_stage(5, 3 * 64 + 7); /* odd width: the scalar path */
    swiglu_vs_stage(4099);
    cross_entropy_vs_stage(70, 64, 1003, 16);
    cross_entropy_vs_stage(45, 96, 4096, 0);
    lora_vs_stage(33, 96, 80, 8, 2.0f);
    adamw_vs_stage(1003, 0.0f);
    adamw_vs_stage(4096, 0.1f);
    gpu_layers_free();
    printf("%d of %d checks agree with the CPU stages (seed %llu)\n", g_checks - g_failures, g_checks, (unsigned long long)seed);
    return g_failures ? 1 : 0;
}
