/* test_gpu_attention.c: the attention kernels of 04_s2attn.cu against a CPU reference.
 *
 * For every shape (odd sizes, GQA, S2 groups that do and do not line up with the tiles):
 * fresh random bf16 inputs; an fp64 reference of causal / S2 attention with an explicit mask
 * (forward and backward); and a "PyTorch-like bf16" baseline, the same math with every
 * matrix product and the softmax rounded to bf16 as PyTorch's bf16 math path rounds them.
 * Criterion (the flash-attention project's): for O, dQ, dK, dV the largest error of the GPU
 * kernel against fp64 is at most 2x the largest error of the bf16 baseline, plus 1e-5.
 * LSE (fp32) must be within 1e-3 of fp64. Decode attention: the same criterion on its output,
 * with the cache past n_keys filled with NaN so a read beyond it shows. Outputs are filled
 * with NaN bytes before every launch, so an element the kernel does not write fails.
 * Every tile variant of the forward and backward kernels is checked. The CPU stage's fp32
 * attention (02_model.c) must agree with the fp64 reference (1e-4 of the largest value), and
 * the kernels must meet the same criterion with the stage as the reference.
 * The ladder's version 1 (attn_forward_naive, fp32) is checked against 02_model.c's attention
 * (1e-4) and its bf16-rounding mode against the CPU's bf16 baseline; then, as the reference,
 * it checks every flash forward variant at 4k-32k tokens (same criterion on O, LSE within
 * 5e-5), and both are timed. Exit 77 without a GPU.
 */
#ifndef STAGE
#define STAGE 0
#endif
#include "02_model.c" /* the CPU stage's attention_forward/backward: the reference the kernels stand on */
#include "check.h"

#include "04_gpu.h" /* the kernels under test */
#include "gpu_mem.h"


static const double ERR_FACTOR = 2.0, ERR_FLOOR = 1e-5, LSE_TOL = 1e-3;

static float bfr(float x) { return bf16_to_f32(f32_to_bf16(x)); } /* round to bf16 */

/* the window of query i of head h: s2_first_key(i) <= j <= i */
static size_t first_key(size_t i, int h, int H, int G) { return s2_first_key(i, h, H, (size_t)G); }

typedef struct {
    int B, N, H, Hk, d, G;
} Shape;

/* fp64 reference (mode 0) or PyTorch-like bf16 baseline (mode 1) of forward and backward for
 * one (batch, head); x_f32 are the bf16 inputs widened. Outputs: o, lse [N], dq [N, d] for
 * this head, and dk, dv accumulated (fp64) into [N, d] of its kv head. */
static void ref_head(const Shape *s, int b, int h, int mode, const float *q, const float *k, const float *v,
                     const float *dout, double *o, double *lse, double *dq, double *dk_acc, double *dv_acc) {
    const int N = s->N, H = s->H, Hk = s->Hk, d = s->d, kh = h / (H / Hk);
    const double scale = 1.0 / sqrt((double)d);
    double *p = (double *)xmalloc((size_t)N * sizeof(double));  /* one row of P */
    double *dp = (double *)xmalloc((size_t)N * sizeof(double)); /* one row of dP */
#define QX(i, c) q[(((size_t)b * N + (i)) * H + h) * d + (c)]
#define KX(j, c) k[(((size_t)b * N + (j)) * Hk + kh) * d + (c)]
#define VX(j, c) v[(((size_t)b * N + (j)) * Hk + kh) * d + (c)]
#define DOX(i, c) dout[(((size_t)b * N + (i)) * H + h) * d + (c)]
    for (int i = 0; i < N; i++) {
        const size_t lo = first_key((size_t)i, h, H, s->G);
        double mx = -INFINITY;
        for (size_t j = lo; j <= (size_t)i; j++) {
            double acc = 0;
            for (int c = 0; c < d; c++) acc += (double)QX(i, c) * KX(j, c);
            p[j] = mode ? bfr((float)(acc * scale)) : acc * scale;
            if (p[j] > mx) mx = p[j];
        }
        double sum = 0;
        for (size_t j = lo; j <= (size_t)i; j++) { p[j] = exp(p[j] - mx); sum += p[j]; }
        for (size_t j = lo; j <= (size_t)i; j++) { p[j] /= sum; if (mode) p[j] = bfr((float)p[j]); }
        lse[i] = mx + log(sum);
        double *orow = o + (size_t)i * d;
        for (int c = 0; c < d; c++) {
            double acc = 0;
            for (size_t j = lo; j <= (size_t)i; j++) acc += p[j] * VX(j, c);
            orow[c] = mode ? bfr((float)acc) : acc;
        }
        /* backward of this row */
        double dsum = 0;
        for (size_t j = lo; j <= (size_t)i; j++) {
            double acc = 0;
            for (int c = 0; c < d; c++) acc += (double)DOX(i, c) * VX(j, c);
            dp[j] = mode ? bfr((float)acc) : acc;
            dsum += p[j] * dp[j];
        }
        double *dqrow = dq + (size_t)i * d;
        for (int c = 0; c < d; c++) dqrow[c] = 0;
        for (size_t j = lo; j <= (size_t)i; j++) {
            double ds = p[j] * (dp[j] - dsum);
            if (mode) ds = bfr((float)ds);
            for (int c = 0; c < d; c++) {
                dqrow[c] += ds * KX(j, c) * scale;
                dk_acc[j * d + c] += ds * QX(i, c) * scale;
                dv_acc[j * d + c] += p[j] * DOX(i, c);
            }
        }
        if (mode)
            for (int c = 0; c < d; c++) dqrow[c] = bfr((float)dqrow[c]);
    }
#undef QX
#undef KX
#undef VX
#undef DOX
    free(p);
    free(dp);
}

typedef struct {
    double *o, *lse, *dq, *dk, *dv; /* [B,N,H,d], [B,H,N], [B,N,H,d], [B,N,Hk,d], [B,N,Hk,d] */
} Result;

static Result reference(const Shape *s, int mode, const float *q, const float *k, const float *v, const float *dout) {
    const size_t nq = (size_t)s->B * s->N * s->H * s->d, nk = (size_t)s->B * s->N * s->Hk * s->d;
    Result r;
    r.o = (double *)xcalloc(nq, sizeof(double));
    r.lse = (double *)xcalloc((size_t)s->B * s->H * s->N, sizeof(double));
    r.dq = (double *)xcalloc(nq, sizeof(double));
    r.dk = (double *)xcalloc(nk, sizeof(double));
    r.dv = (double *)xcalloc(nk, sizeof(double));
    const int R = s->H / s->Hk, N = s->N, d = s->d;
#pragma omp parallel for schedule(dynamic)
    for (int bk = 0; bk < s->B * s->Hk; bk++) { /* one (batch, kv head): its R query heads */
        const int b = bk / s->Hk, kh = bk % s->Hk;
        double *o = (double *)xmalloc((size_t)N * d * sizeof(double)), *dq = (double *)xmalloc((size_t)N * d * sizeof(double));
        double *lse = (double *)xmalloc((size_t)N * sizeof(double));
        double *dk = (double *)xcalloc((size_t)N * d, sizeof(double)), *dv = (double *)xcalloc((size_t)N * d, sizeof(double));
        for (int h = kh * R; h < (kh + 1) * R; h++) {
            ref_head(s, b, h, mode, q, k, v, dout, o, lse, dq, dk, dv);
            for (int i = 0; i < N; i++) {
                r.lse[((size_t)b * s->H + h) * N + i] = lse[i];
                for (int c = 0; c < d; c++) {
                    size_t at = (((size_t)b * N + i) * s->H + h) * d + c;
                    r.o[at] = o[(size_t)i * d + c];
                    r.dq[at] = dq[(size_t)i * d + c];
                }
            }
        }
        for (int j = 0; j < N; j++)
            for (int c = 0; c < d; c++) {
                size_t at = (((size_t)b * N + j) * s->Hk + kh) * d + c;
                r.dk[at] = mode ? bfr((float)dk[(size_t)j * d + c]) : dk[(size_t)j * d + c];
                r.dv[at] = mode ? bfr((float)dv[(size_t)j * d + c]) : dv[(size_t)j * d + c];
            }
        free(o); free(dq); free(lse); free(dk); free(dv);
    }
    return r;
}
static void free_result(Result *r) { free(r->o); free(r->lse); free(r->dq); free(r->dk); free(r->dv); }

static double max_err_d(const double *a, const double *ref, size_t n) {
    double m = 0;
    for (size_t i = 0; i < n; i++) {
        double e = fabs(a[i] - ref[i]);
        if (!(e <= m)) m = e; /* NaN wins */
    }
    return m;
}
static double max_err_bf16(const uint16_t *a, const double *ref, size_t n) {
    double m = 0;
    for (size_t i = 0; i < n; i++) {
        double e = fabs((double)bf16_to_f32(a[i]) - ref[i]);
        if (!(e <= m)) m = e;
    }
    return m;
}

static uint16_t *random_bf16(Rng *rng, size_t n, float **widened) {
    uint16_t *x = (uint16_t *)xmalloc(n * sizeof(uint16_t));
    float *f = (float *)xmalloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) { x[i] = f32_to_bf16(rng_normal(rng)); f[i] = bf16_to_f32(x[i]); }
    *widened = f;
    return x;
}

/* 02_model.c's fp32 attention forward and backward on the same (widened bf16) inputs,
 * widened to double so the same error measures apply. */
static Result stage02_reference(const Shape *s, const float *q, const float *k, const float *v, const float *dout) {
    const size_t nq = (size_t)s->B * s->N * s->H * s->d, nk = (size_t)s->B * s->N * s->Hk * s->d;
    const size_t nl = (size_t)s->B * s->H * s->N;
    float *o = (float *)xmalloc(nq * sizeof(float)), *lse = (float *)xmalloc(nl * sizeof(float));
    float *dq = (float *)xmalloc(nq * sizeof(float)), *dk = (float *)xmalloc(nk * sizeof(float));
    float *dv = (float *)xmalloc(nk * sizeof(float)), *delta = (float *)xmalloc(nl * sizeof(float));
    float *scratch = (float *)xmalloc((size_t)max_threads() * s->N * sizeof(float));
    attention_forward(o, lse, q, k, v, (size_t)s->B, (size_t)s->N, s->H, s->Hk, s->d, (size_t)s->G, scratch);
    attention_backward(dq, dk, dv, delta, dout, q, k, v, o, lse, (size_t)s->B, (size_t)s->N, s->H, s->Hk, s->d, (size_t)s->G);
    Result r;
    r.o = (double *)xmalloc(nq * sizeof(double)); r.dq = (double *)xmalloc(nq * sizeof(double));
    r.dk = (double *)xmalloc(nk * sizeof(double)); r.dv = (double *)xmalloc(nk * sizeof(double));
    r.lse = (double *)xmalloc(nl * sizeof(double));
    for (size_t i = 0; i < nq; i++) { r.o[i] = o[i]; r.dq[i] = dq[i]; }
    for (size_t i = 0; i < nk; i++) { r.dk[i] = dk[i]; r.dv[i] = dv[i]; }
    for (size_t i = 0; i < nl; i++) r.lse[i] = lse[i];
    free(o); free(lse); free(dq); free(dk); free(dv); free(delta); free(scratch);
    return r;
}

static double max_abs_d(const double *a, size_t n) {
    double m = 0;
    for (size_t i = 0; i < n; i++) m = fabs(a[i]) > m ? fabs(a[i]) : m;
    return m;
}

static int check(const char *what, double ours, double base) {
    double limit = ERR_FACTOR * base + ERR_FLOOR;
    int ok = check_counted(ours <= limit);
    printf("    %-4s err %.3e  bf16-baseline err %.3e  limit %.3e  %s\n", what, ours, base, limit, ok ? "ok" : "FAIL");
    return ok;
}

static void test_attention(const Shape *s, Rng *rng) {
    const size_t nq = (size_t)s->B * s->N * s->H * s->d, nk = (size_t)s->B * s->N * s->Hk * s->d;
    const size_t nl = (size_t)s->B * s->H * s->N;
    printf("attention B=%d N=%d H=%d Hk=%d d=%d G=%d\n", s->B, s->N, s->H, s->Hk, s->d, s->G);
    float *qf, *kf, *vf, *df;
    uint16_t *q = random_bf16(rng, nq, &qf), *k = random_bf16(rng, nk, &kf), *v = random_bf16(rng, nk, &vf);
    uint16_t *dout = random_bf16(rng, nq, &df);
    Result ref = reference(s, 0, qf, kf, vf, df), base = reference(s, 1, qf, kf, vf, df);
    Result stage = stage02_reference(s, qf, kf, vf, df);
    { /* the CPU stage agrees with the fp64 reference */
        const double *st[5] = {stage.o, stage.dq, stage.dk, stage.dv, stage.lse}, *rf[5] = {ref.o, ref.dq, ref.dk, ref.dv, ref.lse};
        const size_t n[5] = {nq, nq, nk, nk, nl};
        const char *name[5] = {"O", "dQ", "dK", "dV", "LSE"};
        for (int t = 0; t < 5; t++) {
            double e = max_err_d(st[t], rf[t], n[t]), lim = 1e-4 * max_abs_d(rf[t], n[t]) + 1e-6;
            if (!check_counted(e <= lim)) printf("    02_model %s differs from fp64 by %.3e (limit %.3e) FAIL\n", name[t], e, lim);
        }
    }

    uint16_t *d_q = (uint16_t *)to_dev(q, nq * 2), *d_k = (uint16_t *)to_dev(k, nk * 2), *d_v = (uint16_t *)to_dev(v, nk * 2);
    uint16_t *d_do = (uint16_t *)to_dev(dout, nq * 2);
    uint16_t *o = (uint16_t *)xmalloc(nq * 2), *dq = (uint16_t *)xmalloc(nq * 2), *dk = (uint16_t *)xmalloc(nk * 2), *dv = (uint16_t *)xmalloc(nk * 2);
    float *lse = (float *)xmalloc(nl * 4);
    int n_fwd, n_bwd;
    attn_tile_variants(&n_fwd, &n_bwd);
    for (int var = 0; var < n_fwd || var < n_bwd; var++) { /* every tile variant of both kernels */
    const int fv = var < n_fwd ? var : 0, bv = var < n_bwd ? var : 0;
    if (attn_set_tile_variant(fv, bv) != 0) die("%s", last_error());
    printf("  tile variant forward %d, backward %d\n", fv, bv);
    uint16_t *d_o = (uint16_t *)dev_poisoned(nq * 2), *d_dq = (uint16_t *)dev_poisoned(nq * 2);
    uint16_t *d_dk = (uint16_t *)dev_poisoned(nk * 2), *d_dv = (uint16_t *)dev_poisoned(nk * 2);
    float *d_lse = (float *)dev_poisoned(nl * 4);
    void *ws = dev_poisoned(attn_backward_workspace_bytes(s->B, s->N, s->H, s->d));
    if (attn_forward(d_q, d_k, d_v, d_o, d_lse, s->B, s->N, s->H, s->Hk, s->d, s->G) != 0) die("%s", last_error());
    if (attn_backward(d_q, d_k, d_v, d_o, d_do, d_lse, d_dq, d_dk, d_dv, ws, s->B, s->N, s->H, s->Hk, s->d, s->G) != 0) die("%s", last_error());
    CUDA_CHECK(cudaDeviceSynchronize());
    CUDA_CHECK(cudaMemcpy(o, d_o, nq * 2, cudaMemcpyDeviceToHost));
    CUDA_CHECK(cudaMemcpy(dq, d_dq, nq * 2, cudaMemcpyDeviceToHost));
    CUDA_CHECK(cudaMemcpy(dk, d_dk, nk * 2, cudaMemcpyDeviceToHost));
    CUDA_CHECK(cudaMemcpy(dv, d_dv, nk * 2, cudaMemcpyDeviceToHost));
    CUDA_CHECK(cudaMemcpy(lse, d_lse, nl * 4, cudaMemcpyDeviceToHost));

    check("O", max_err_bf16(o, ref.o, nq), max_err_d(base.o, ref.o, nq));
    check("dQ", max_err_bf16(dq, ref.dq, nq), max_err_d(base.dq, ref.dq, nq));
    check("dK", max_err_bf16(dk, ref.dk, nk), max_err_d(base.dk, ref.dk, nk));
    check("dV", max_err_bf16(dv, ref.dv, nk), max_err_d(base.dv, ref.dv, nk));
    /* the same criterion with the CPU stage (02_model.c, fp32) as the reference */
    check("O/02", max_err_bf16(o, stage.o, nq), max_err_d(base.o, stage.o, nq));
    check("dQ/02", max_err_bf16(dq, stage.dq, nq), max_err_d(base.dq, stage.dq, nq));
    check("dK/02", max_err_bf16(dk, stage.dk, nk), max_err_d(base.dk, stage.dk, nk));
    check("dV/02", max_err_bf16(dv, stage.dv, nk), max_err_d(base.dv, stage.dv, nk));
    double lse_err = 0;
    for (size_t i = 0; i < nl; i++) {
        double e = fabs((double)lse[i] - ref.lse[i]);
        if (!(e <= lse_err)) lse_err = e;
    }
    printf("    LSE err %.3e  limit %.1e  %s\n", lse_err, LSE_TOL, check_counted(lse_err <= LSE_TOL) ? "ok" : "FAIL");
    CUDA_CHECK(cudaFree(d_o)); CUDA_CHECK(cudaFree(d_dq)); CUDA_CHECK(cudaFree(d_dk)); CUDA_CHECK(cudaFree(d_dv));
    CUDA_CHECK(cudaFree(d_lse)); CUDA_CHECK(cudaFree(ws));
    }
    if (attn_set_tile_variant(0, 0) != 0) die("%s", last_error());

    free_result(&ref); free_result(&base); free_result(&stage);
    free(q); free(k); free(v); free(dout); free(qf); free(kf); free(vf); free(df);
    free(o); free(dq); free(dk); free(dv); free(lse);
    CUDA_CHECK(cudaFree(d_q)); CUDA_CHECK(cudaFree(d_k)); CUDA_CHECK(cudaFree(d_v)); CUDA_CHECK(cudaFree(d_do));
}

/* decode: q [B, H, d] against keys [0, n_keys) of a [B, n_cap, Hk, d] cache */
static void test_decode(int B, int H, int Hk, int d, int n_cap, int n_keys, Rng *rng) {
    printf("decode B=%d H=%d Hk=%d d=%d n_keys=%d (cache %d)\n", B, H, Hk, d, n_keys, n_cap);
    const size_t nq = (size_t)B * H * d, nc = (size_t)B * n_cap * Hk * d;
    float *qf, *kf, *vf;
    uint16_t *q = random_bf16(rng, nq, &qf), *kc = random_bf16(rng, nc, &kf), *vc = random_bf16(rng, nc, &vf);
    for (int b = 0; b < B; b++) /* past n_keys: NaN, so reading it shows */
        for (size_t x = (((size_t)b * n_cap + n_keys) * Hk) * d; x < ((size_t)(b + 1) * n_cap * Hk) * d; x++) kc[x] = vc[x] = 0xffff;
    double *ref = (double *)xmalloc(nq * sizeof(double)), *base = (double *)xmalloc(nq * sizeof(double));
    double *p = (double *)xmalloc((size_t)n_keys * sizeof(double)), *pb = (double *)xmalloc((size_t)n_keys * sizeof(double));
    const double scale = 1.0 / sqrt((double)d);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++) {
            const int kh = h / (H / Hk);
            const float *qr = qf + ((size_t)b * H + h) * d;
            double mx = -INFINITY, mxb = -INFINITY, sum = 0, sumb = 0;
            for (int j = 0; j < n_keys; j++) {
                const float *kr = kf + (((size_t)b * n_cap + j) * Hk + kh) * d;
                double acc = 0;
                for (int c = 0; c < d; c++) acc += (double)qr[c] * kr[c];
                p[j] = acc * scale;
                pb[j] = bfr((float)(acc * scale));
                if (p[j] > mx) mx = p[j];
                if (pb[j] > mxb) mxb = pb[j];
            }
            for (int j = 0; j < n_keys; j++) { p[j] = exp(p[j] - mx); sum += p[j]; pb[j] = exp(pb[j] - mxb); sumb += pb[j]; }
            for (int j = 0; j < n_keys; j++) { p[j] /= sum; pb[j] = bfr((float)(pb[j] / sumb)); }
            for (int c = 0; c < d; c++) {
                double acc = 0, accb = 0;
                for (int j = 0; j < n_keys; j++) {
                    double vv = vf[(((size_t)b * n_cap + j) * Hk + kh) * d + c];
                    acc += p[j] * vv;
                    accb += pb[j] * vv;
                }
                ref[((size_t)b * H + h) * d + c] = acc;
                base[((size_t)b * H + h) * d + c] = bfr((float)accb);
            }
        }
    uint16_t *d_q = (uint16_t *)to_dev(q, nq * 2), *d_k = (uint16_t *)to_dev(kc, nc * 2), *d_v = (uint16_t *)to_dev(vc, nc * 2);
    uint16_t *d_o = (uint16_t *)dev_poisoned(nq * 2);
    void *ws = dev_poisoned(attn_decode_workspace_bytes(B, H, d, n_keys));
    if (attn_decode(d_q, d_k, d_v, d_o, ws, B, H, Hk, d, n_cap, n_keys) != 0) die("%s", last_error());
    uint16_t *o = (uint16_t *)xmalloc(nq * 2);
    CUDA_CHECK(cudaMemcpy(o, d_o, nq * 2, cudaMemcpyDeviceToHost));
    check("O", max_err_bf16(o, ref, nq), max_err_d(base, ref, nq));
    free(q); free(kc); free(vc); free(qf); free(kf); free(vf); free(ref); free(base); free(p); free(pb); free(o);
    CUDA_CHECK(cudaFree(d_q)); CUDA_CHECK(cudaFree(d_k)); CUDA_CHECK(cudaFree(d_v)); CUDA_CHECK(cudaFree(d_o)); CUDA_CHECK(cudaFree(ws));
}

/* ---------------------------------------------------------------------------------------
 * The ladder's version 1, attn_forward_naive: checked against the CPU stage here, then the
 * reference of the flash forward on sizes the CPU references are too slow for.
 * ------------------------------------------------------------------------------------- */

static double max_err_fd(const float *a, const double *ref, size_t n) {
    double m = 0;
    for (size_t i = 0; i < n; i++) {
        double e = fabs((double)a[i] - ref[i]);
        if (!(e <= m)) m = e; /* NaN wins */
    }
    return m;
}
static double max_err_ff(const float *a, const float *ref, size_t n) {
    double m = 0;
    for (size_t i = 0; i < n; i++) {
        double e = fabs((double)a[i] - (double)ref[i]);
        if (!(e <= m)) m = e;
    }
    return m;
}

static const double NAIVE_TOL = 1e-4;     /* version 1 vs 02_model.c (both fp32): of the largest |O|; absolute on LSE */
static const double NAIVE_BASE_FACTOR = 1.5; /* its bf16 baseline's error vs fp64, against the CPU baseline's */
/* flash LSE vs version 1 (both fp32 sums; 7e-6 seen at 32k on the H200): a key missing from
 * or added to a window of n keys moves its row's LSE by about 1/n, so this sees such a slip
 * in windows up to ~20k keys, which LSE_TOL (1e-3) would let through past 1k */
static const double NAIVE_LSE_TOL = 5e-5;

/* Version 1 on the GPU: fp32 o [B, N, H, d] and lse [B, H, N] from poisoned buffers. */
static void run_naive(const Shape *s, const uint16_t *d_q, const uint16_t *d_k, const uint16_t *d_v, int bf16_math, float *o, float *lse) {
    const size_t nq = (size_t)s->B * s->N * s->H * s->d, nl = (size_t)s->B * s->H * s->N;
    float *d_o = (float *)dev_poisoned(nq * 4), *d_lse = (float *)dev_poisoned(nl * 4);
    if (attn_forward_naive(d_q, d_k, d_v, d_o, d_lse, s->B, s->N, s->H, s->Hk, s->d, s->G, bf16_math) != 0) die("%s", last_error());
    CUDA_CHECK(cudaMemcpy(o, d_o, nq * 4, cudaMemcpyDeviceToHost));
    CUDA_CHECK(cudaMemcpy(lse, d_lse, nl * 4, cudaMemcpyDeviceToHost));
    CUDA_CHECK(cudaFree(d_o)); CUDA_CHECK(cudaFree(d_lse));
}

/* Version 1 against the CPU. Its fp32 output against 02_model.c's attention_forward on the
 * same (widened bf16) inputs: O within NAIVE_TOL of the largest |O|, LSE within NAIVE_TOL.
 * Its bf16_math output must be the baseline the fp64 test above uses: its error against the
 * fp64 reference at most NAIVE_BASE_FACTOR x the CPU's PyTorch-like baseline's, plus 1e-5.
 * Head dims the flash kernels do not take (32, 96, 256) are here too. */
static void test_naive(const Shape *s, Rng *rng) {
    const size_t nq = (size_t)s->B * s->N * s->H * s->d, nk = (size_t)s->B * s->N * s->Hk * s->d;
    const size_t nl = (size_t)s->B * s->H * s->N;
    printf("naive attention B=%d N=%d H=%d Hk=%d d=%d G=%d\n", s->B, s->N, s->H, s->Hk, s->d, s->G);
    float *qf, *kf, *vf, *df;
    uint16_t *q = random_bf16(rng, nq, &qf), *k = random_bf16(rng, nk, &kf), *v = random_bf16(rng, nk, &vf);
    uint16_t *dout = random_bf16(rng, nq, &df); /* the references run the backward too; unused here */
    Result ref = reference(s, 0, qf, kf, vf, df), base = reference(s, 1, qf, kf, vf, df);
    Result stage = stage02_reference(s, qf, kf, vf, df);
    uint16_t *d_q = (uint16_t *)to_dev(q, nq * 2), *d_k = (uint16_t *)to_dev(k, nk * 2), *d_v = (uint16_t *)to_dev(v, nk * 2);
    float *o = (float *)xmalloc(nq * 4), *lse = (float *)xmalloc(nl * 4);
    float *o_b = (float *)xmalloc(nq * 4), *lse_b = (float *)xmalloc(nl * 4);
    run_naive(s, d_q, d_k, d_v, 0, o, lse);
    run_naive(s, d_q, d_k, d_v, 1, o_b, lse_b);
    const double e_o = max_err_fd(o, stage.o, nq), lim_o = NAIVE_TOL * max_abs_d(stage.o, nq);
    const double e_lse = max_err_fd(lse, stage.lse, nl);
    printf("    O   vs 02_model err %.3e  limit %.3e  %s\n", e_o, lim_o, check_counted(e_o <= lim_o) ? "ok" : "FAIL");
    printf("    LSE vs 02_model err %.3e  limit %.1e  %s\n", e_lse, NAIVE_TOL, check_counted(e_lse <= NAIVE_TOL) ? "ok" : "FAIL");
    const double e_gpu_base = max_err_fd(o_b, ref.o, nq), e_cpu_base = max_err_d(base.o, ref.o, nq);
    const double lim_b = NAIVE_BASE_FACTOR * e_cpu_base + ERR_FLOOR;
    printf("    bf16 baseline vs fp64: GPU %.3e  CPU %.3e  limit %.3e  %s\n", e_gpu_base, e_cpu_base, lim_b,
           check_counted(e_gpu_base <= lim_b) ? "ok" : "FAIL");
    free_result(&ref); free_result(&base); free_result(&stage);
    free(q); free(k); free(v); free(dout); free(qf); free(kf); free(vf); free(df);
    free(o); free(lse); free(o_b); free(lse_b);
    CUDA_CHECK(cudaFree(d_q)); CUDA_CHECK(cudaFree(d_k)); CUDA_CHECK(cudaFree(d_v));
}

/* milliseconds of one call of attn_forward_naive (which < 0) or attn_forward, after a warm-up */
static double time_forward(const Shape *s, int which, const uint16_t *d_q, const uint16_t *d_k, const uint16_t *d_v, void *d_o, float *d_lse) {
    cudaEvent_t ev[2];
    CUDA_CHECK(cudaEventCreate(&ev[0])); CUDA_CHECK(cudaEventCreate(&ev[1]));
    float ms = 0;
    for (int rep = 0; rep < 2; rep++) {
        CUDA_CHECK(cudaEventRecord(ev[0], 0));
        int rc = which < 0 ? attn_forward_naive(d_q, d_k, d_v, (float *)d_o, d_lse, s->B, s->N, s->H, s->Hk, s->d, s->G, 0)
                           : attn_forward(d_q, d_k, d_v, (uint16_t *)d_o, d_lse, s->B, s->N, s->H, s->Hk, s->d, s->G);
        if (rc != 0) die("%s", last_error());
        CUDA_CHECK(cudaEventRecord(ev[1], 0));
        CUDA_CHECK(cudaEventSynchronize(ev[1]));
        CUDA_CHECK(cudaEventElapsedTime(&ms, ev[0], ev[1]));
    }
    CUDA_CHECK(cudaEventDestroy(ev[0])); CUDA_CHECK(cudaEventDestroy(ev[1]));
    return ms;
}

/* The flash forward, every tile variant, against version 1 where the CPU references would
 * take minutes: the fp64 test's criterion with version 1 (fp32) as the reference and version
 * 1 with bf16_math as the baseline: max |O - O_v1| <= 2 x max |O_v1,bf16 - O_v1| + 1e-5, and
 * |LSE - LSE_v1| <= NAIVE_LSE_TOL. Prints the time of version 1 and of the default flash forward. */
static void test_flash_vs_naive(const Shape *s, Rng *rng) {
    const size_t nq = (size_t)s->B * s->N * s->H * s->d, nk = (size_t)s->B * s->N * s->Hk * s->d;
    const size_t nl = (size_t)s->B * s->H * s->N;
    printf("flash vs naive B=%d N=%d H=%d Hk=%d d=%d G=%d\n", s->B, s->N, s->H, s->Hk, s->d, s->G);
    float *qf, *kf, *vf;
    uint16_t *q = random_bf16(rng, nq, &qf), *k = random_bf16(rng, nk, &kf), *v = random_bf16(rng, nk, &vf);
    free(qf); free(kf); free(vf);
    uint16_t *d_q = (uint16_t *)to_dev(q, nq * 2), *d_k = (uint16_t *)to_dev(k, nk * 2), *d_v = (uint16_t *)to_dev(v, nk * 2);
    float *o_ref = (float *)xmalloc(nq * 4), *lse_ref = (float *)xmalloc(nl * 4);
    float *o_base = (float *)xmalloc(nq * 4), *lse_base = (float *)xmalloc(nl * 4);
    run_naive(s, d_q, d_k, d_v, 0, o_ref, lse_ref);
    run_naive(s, d_q, d_k, d_v, 1, o_base, lse_base);
    const double e_base = max_err_ff(o_base, o_ref, nq);
    uint16_t *o = (uint16_t *)xmalloc(nq * 2);
    float *o_wide = (float *)xmalloc(nq * 4), *lse = (float *)xmalloc(nl * 4);
    int n_fwd, n_bwd;
    attn_tile_variants(&n_fwd, &n_bwd);
    for (int var = 0; var < n_fwd; var++) {
        if (attn_set_tile_variant(var, 0) != 0) die("%s", last_error());
        uint16_t *d_o = (uint16_t *)dev_poisoned(nq * 2);
        float *d_lse = (float *)dev_poisoned(nl * 4);
        if (attn_forward(d_q, d_k, d_v, d_o, d_lse, s->B, s->N, s->H, s->Hk, s->d, s->G) != 0) die("%s", last_error());
        CUDA_CHECK(cudaMemcpy(o, d_o, nq * 2, cudaMemcpyDeviceToHost));
        CUDA_CHECK(cudaMemcpy(lse, d_lse, nl * 4, cudaMemcpyDeviceToHost));
        CUDA_CHECK(cudaFree(d_o)); CUDA_CHECK(cudaFree(d_lse));
        for (size_t i = 0; i < nq; i++) o_wide[i] = bf16_to_f32(o[i]);
        const double e_o = max_err_ff(o_wide, o_ref, nq), e_lse = max_err_ff(lse, lse_ref, nl);
        const double lim = ERR_FACTOR * e_base + ERR_FLOOR;
        const int ok = check_counted(e_o <= lim && e_lse <= NAIVE_LSE_TOL);
        printf("  forward variant %d: O err %.3e  bf16-baseline err %.3e  limit %.3e;  LSE err %.3e  limit %.1e  %s\n", var, e_o, e_base, lim,
               e_lse, NAIVE_LSE_TOL, ok ? "ok" : "FAIL");
    }
    if (attn_set_tile_variant(0, 0) != 0) die("%s", last_error());
    { /* the ladder, measured: one call of each */
        void *d_o = dev_poisoned(nq * 4);
        float *d_lse = (float *)dev_poisoned(nl * 4);
        const double ms_naive = time_forward(s, -1, d_q, d_k, d_v, d_o, d_lse), ms_flash = time_forward(s, 0, d_q, d_k, d_v, d_o, d_lse);
        printf("  time: version 1 (naive) %.3f ms, flash forward (default variant) %.3f ms: %.0fx\n", ms_naive, ms_flash, ms_naive / ms_flash);
        CUDA_CHECK(cudaFree(d_o)); CUDA_CHECK(cudaFree(d_lse));
    }
    free(q); free(k); free(v); free(o_ref); free(lse_ref); free(o_base); free(lse_base); free(o); free(o_wide); free(lse);
    CUDA_CHECK(cudaFree(d_q)); CUDA_CHECK(cudaFree(d_k)); CUDA_CHECK(cudaFree(d_v));
}

int main(int argc, char **argv) {
    int n_dev = 0;
    if (cudaGetDeviceCount(&n_dev) != cudaSuccess || n_dev == 0) {
        printf("skip: no CUDA GPU on this machine\n");
        return 77;
    }
    const int quick = argc > 1 && !strcmp(argv[1], "--quick"); /* smaller set, for the sanitizers */
    Rng rng;
    rng_seed(&rng, (uint64_t)time(NULL)); /* fresh inputs every run; the seed is printed */
    uint64_t seed = rng.s[0];
    printf("seed state %llu\n", (unsigned long long)seed);
    const Shape shapes[] = {
        {2, 200, 4, 2, 64, 0},     /* GQA, N not a tile multiple */
        {1, 333, 4, 4, 128, 0},    /* odd N */
        {1, 77, 8, 1, 128, 0},     /* 8 query heads per kv head, less than one tile */
        {1, 384, 4, 2, 128, 96},   /* S2, segments not aligned to tiles */
        {2, 130, 2, 1, 64, 26},    /* S2, odd half-shift (13) */
        {1, 1024, 4, 4, 128, 256}, /* S2, aligned segments */
        {1, 1000, 2, 1, 128, 0},   /* many tiles: the copy pipeline */
        {1, 1000, 2, 2, 64, 200},  /* S2 d=64, many tiles */
        {2, 256, 4, 2, 128, 256},  /* S2 with G = N: a shifted head is its two half groups, one block (paired) */
        {2, 1536, 8, 4, 64, 512},  /* S2, GQA 2:1, half groups of two tiles paired in the forward and backward */
        {1, 150, 40, 1, 64, 30},   /* S2, 40 query heads per kv head: a backward block walks 40 heads' tiles */
    };
    const int n_shapes = (int)(sizeof shapes / sizeof shapes[0]);
    int run = 0;
    for (int i = 0; i < n_shapes; i++) {
        if (quick && shapes[i].N > 400) continue;
        test_attention(&shapes[i], &rng);
        run++;
    }
    /* the ladder's version 1 against the CPU stage (head dims the flash kernels do not take too) */
    const Shape naive_shapes[] = {
        {2, 200, 4, 2, 64, 0},     /* GQA, N not a multiple of 4 rows */
        {1, 333, 6, 2, 96, 0},     /* d=96, 3 query heads per kv head */
        {1, 130, 2, 1, 32, 26},    /* S2, odd half-shift (13), d=32 */
        {1, 384, 4, 4, 256, 96},   /* S2, d=256 */
        {1, 77, 8, 1, 128, 0},     /* 8 query heads per kv head */
        {1, 1000, 2, 2, 64, 200},  /* S2, longer windows */
    };
    for (size_t i = 0; i < sizeof naive_shapes / sizeof naive_shapes[0]; i++) {
        if (quick && naive_shapes[i].N > 400) continue;
        test_naive(&naive_shapes[i], &rng);
    }
    /* then the flash forward against it, at sizes the CPU references are too slow for */
    const Shape large_shapes[] = {
        {1, 8192, 8, 2, 128, 0},      /* causal, GQA 4:1 */
        {1, 6000, 4, 4, 64, 0},       /* causal, N not a tile multiple */
        {2, 4096, 4, 1, 128, 1024},   /* S2, two sequences */
        {1, 16384, 8, 8, 64, 4096},   /* S2 with LongLoRA's group of N/4 */
        {1, 32768, 4, 1, 128, 8192},  /* S2 at 32k */
    };
    if (!quick)
        for (size_t i = 0; i < sizeof large_shapes / sizeof large_shapes[0]; i++) test_flash_vs_naive(&large_shapes[i], &rng);
    test_decode(2, 8, 2, 128, 1100, 1000, &rng);
    test_decode(1, 4, 4, 64, 80, 77, &rng);
    test_decode(2, 4, 2, 128, 600, 513, &rng);
    test_decode(1, 16, 2, 64, 300, 260, &rng);
    if (!quick) test_decode(1, 32, 8, 128, 5000, 4999, &rng);
    /* unsupported arguments are refused with a sentence, not run */
    EXPECT(attn_forward(NULL, NULL, NULL, NULL, NULL, 1, 100, 4, 4, 96, 0) != 0, "head dim 96 was accepted");
    EXPECT(attn_forward(NULL, NULL, NULL, NULL, NULL, 1, 100, 4, 4, 64, 30) != 0, "N %% G != 0 was accepted");
    EXPECT(attn_forward(NULL, NULL, NULL, NULL, NULL, 1, 100, 6, 4, 64, 0) != 0, "H %% Hk != 0 was accepted");
    CUDA_CHECK(cudaDeviceSynchronize());
    printf("%s: %d attention shapes and %d decode shapes, %d of %d checks failed\n", g_failures ? "FAIL" : "ok", run, quick ? 4 : 5, g_failures, g_checks);
    return g_failures ? 1 : 0;
}
