/* test_gpu_layers.c: every layer kernel of 04_layers.cu against a plain C reference.
 *
 * The reference computes in double from the same bf16 inputs; each check states its
 * tolerance. Where the GPU rounds a result to bf16 once, the allowance is 2^-8 relative
 * (half a bf16 step is at most 2^-8 of the value) plus what fp32 arithmetic can add; where
 * the kernel rounds an intermediate to bf16 (dlogits, LoRA's x A^T and dy B), the allowance
 * adds 2^-8 times the sum of the magnitudes of the terms, computed beside the reference.
 * Inputs are fresh random numbers, sizes include odd ones (scalar paths, tails, pointers
 * one element off 16-byte alignment), outputs are filled with NaN bytes before each launch
 * so an element the kernel forgot shows, and accumulating outputs start from random values.
 *
 * Without a GPU it exits 77. With --bench [file.json] it measures instead the bandwidth
 * of each memory-bound kernel at a LLaMA-2-7B shape against a device-to-device copy.
 */
#define STAGE 0
#include "04_gpu.h" /* the kernels under test (and common.h) */
#include "gpu_mem.h"
#include "check.h"


static Rng g_rng;

/* ---- random inputs ------------------------------------------------------------------- */

/* n bf16 values ~ N(mean, scale^2): bits for the GPU, the same values as float for the reference. */
static void rand_bf16(uint16_t *bits /* [n] */, float *vals /* [n] */, size_t n, float mean, float scale) {
    for (size_t i = 0; i < n; i++) {
        bits[i] = f32_to_bf16(mean + scale * rng_normal(&g_rng));
        vals[i] = bf16_to_f32(bits[i]);
    }
}
static void rand_f32(float *v, size_t n, float scale) {
    for (size_t i = 0; i < n; i++) v[i] = scale * rng_normal(&g_rng);
}
static void bf16_to_f32_array(float *out, const uint16_t *bits, size_t n) {
    for (size_t i = 0; i < n; i++) out[i] = bf16_to_f32(bits[i]);
}
static double rms(const double *x, size_t n) {
    double s = 0;
    for (size_t i = 0; i < n; i++) s += x[i] * x[i];
    return n ? sqrt(s / (double)n) : 0.0;
}

/* ---- comparison ---------------------------------------------------------------------- */

/* Passes when |got - want| <= atol + rtol * |want| + (extra ? extra[i] : 0) everywhere; NaN fails. */
static void check(const char *what, const float *got, const double *want, size_t n, double atol, double rtol, const double *extra) {
    size_t bad = 0, first = 0;
    double max_err = 0, max_ratio = 0;
    for (size_t i = 0; i < n; i++) {
        double err = fabs((double)got[i] - want[i]);
        double tol = atol + rtol * fabs(want[i]) + (extra ? extra[i] : 0.0);
        if (!(err <= tol)) { /* also catches NaN */
            if (!bad) first = i;
            bad++;
        }
        if (err > max_err || err != err) max_err = err;
        if (tol > 0 && err / tol > max_ratio) max_ratio = err / tol;
    }
    if (!check_counted(!bad)) {
        printf("FAIL %-58s %zu of %zu wrong; first [%zu] got %.7g want %.7g\n", what, bad, n, first, (double)got[first], want[first]);
    } else {
        printf("ok   %-58s n=%-8zu max|err| %.3g (%.2f of tolerance)\n", what, n, max_err, max_ratio);
    }
}
static void check_true(const char *what, int ok) {
    check_counted(ok);
    printf("%s %s\n", ok ? "ok  " : "FAIL", what);
}

/* ---- matrix products ------------------------------------------------------------------ */

static void test_matmul(size_t M, size_t N, size_t K, int ta, int tb, int c_fp32) {
    size_t na = M * K, nb = K * N, nc = M * N;
    uint16_t *a_bits = xmalloc(na * 2), *b_bits = xmalloc(nb * 2);
    float *a = xmalloc(na * 4), *b = xmalloc(nb * 4), *c0 = xmalloc(nc * 4), *got = xmalloc(nc * 4);
    double *want = xmalloc(nc * 8), *bound = xmalloc(nc * 8);
    rand_bf16(a_bits, a, na, 0, 1);
    rand_bf16(b_bits, b, nb, 0, 1);
    rand_f32(c0, nc, 1);
    float alpha = 0.75f, beta = c_fp32 ? 0.5f : 0.0f;
    for (size_t i = 0; i < M; i++)
        for (size_t j = 0; j < N; j++) {
            double s = 0, sa = 0;
            for (size_t k = 0; k < K; k++) {
                double x = ta ? a[k * M + i] : a[i * K + k], y = tb ? b[j * K + k] : b[k * N + j];
                s += x * y;
                sa += fabs(x * y);
            }
            want[i * N + j] = alpha * s + beta * c0[i * N + j];
            bound[i * N + j] = 1e-5 * (alpha * sa + fabs(beta * c0[i * N + j])); /* fp32 accumulation */
        }
    void *A = to_dev(a_bits, na * 2), *B = to_dev(b_bits, nb * 2), *C = dev_alloc(nc * 4);
    if (c_fp32) upload(C, c0, nc * 4);
    else poison(C, nc * 2);
    gpu_matmul_bf16(ta, tb, M, N, K, alpha, A, B, beta, C, c_fp32);
    if (c_fp32) download(got, C, nc * 4);
    else {
        uint16_t *bits = xmalloc(nc * 2);
        download(bits, C, nc * 2);
        bf16_to_f32_array(got, bits, nc);
        free(bits);
    }
    char what[128];
    snprintf(what, sizeof what, "matmul %zux%zux%zu trans %d%d out %s", M, N, K, ta, tb, c_fp32 ? "fp32 beta=.5" : "bf16");
    check(what, got, want, nc, 0, c_fp32 ? 1e-6 : 4e-3, bound);
    cudaFree(A); cudaFree(B); cudaFree(C);
    free(a_bits); free(b_bits); free(a); free(b); free(c0); free(got); free(want); free(bound);
}

static void test_f32_to_bf16(size_t n, int offset) {
    float *src = xmalloc(n * 4), *got = xmalloc(n * 4);
    double *want = xmalloc(n * 8);
    uint16_t *bits = xmalloc(n * 2);
    for (size_t i = 0; i < n; i++) {
        float specials[] = {0.0f, -0.0f, 1e-40f, -3e-39f, 3.4e38f, INFINITY, -INFINITY, 1.00390625f /* a tie */};
        src[i] = (i % 7 == 3) ? specials[(i / 7) % 8] : rng_normal(&g_rng) * powf(2.0f, (float)((int)rng_below(&g_rng, 60) - 30));
        want[i] = bf16_to_f32(f32_to_bf16(src[i]));
    }
    float *s = dev_alloc((n + offset) * 4);
    uint16_t *d = dev_alloc((n + offset) * 2);
    upload(s + offset, src, n * 4);
    poison(d, (n + offset) * 2);
    gpu_f32_to_bf16(d + offset, s + offset, n);
    download(bits, d + offset, n * 2);
    bf16_to_f32_array(got, bits, n);
    /* exact (round to nearest even on both sides); infinities compare equal with zero error */
    size_t bad = 0;
    for (size_t i = 0; i < n; i++) bad += bits[i] != f32_to_bf16(src[i]);
    char what[96];
    snprintf(what, sizeof what, "f32_to_bf16 n=%zu%s bit-exact with common.h's rounding", n, offset ? " unaligned" : "");
    check_true(what, bad == 0);
    cudaFree(s); cudaFree(d);
    free(src); free(got); free(want); free(bits);
}

/* ---- embedding ----------------------------------------------------------------------- */

static void test_embedding(size_t N, size_t D, size_t V, int bad_token) {
    uint16_t *table_bits = xmalloc(V * D * 2), *dx_bits = xmalloc(N * D * 2), *x_bits = xmalloc(N * D * 2);
    float *table = xmalloc(V * D * 4), *dx = xmalloc(N * D * 4), *got = xmalloc((N + V) * D * 4), *dt0 = xmalloc(V * D * 4);
    double *want = xmalloc((N + V) * D * 8);
    int32_t *tok = xmalloc(N * 4);
    rand_bf16(table_bits, table, V * D, 0, 1);
    rand_bf16(dx_bits, dx, N * D, 0, 1);
    rand_f32(dt0, V * D, 1);
    for (size_t n = 0; n < N; n++) tok[n] = (int32_t)rng_below(&g_rng, V); /* V small: ids repeat */
    size_t bad_row = N / 2;
    if (bad_token) tok[bad_row] = (bad_row % 2) ? (int32_t)V : -7;

    void *T = to_dev(table_bits, V * D * 2), *TOK = to_dev(tok, N * 4), *X = dev_alloc(N * D * 2);
    void *DX = to_dev(dx_bits, N * D * 2), *DT = to_dev(dt0, V * D * 4);
    poison(X, N * D * 2);
    gpu_embedding_forward(X, TOK, T, N, D, V);
    download(x_bits, X, N * D * 2);
    bf16_to_f32_array(got, x_bits, N * D);
    size_t good_rows = 0;
    for (size_t n = 0; n < N; n++) {
        int ok = tok[n] >= 0 && (size_t)tok[n] < V;
        if (!ok) { /* the bad id's row must be NaN, and is left out of the exact comparison */
            int all_nan = 1;
            for (size_t c = 0; c < D; c++) all_nan &= got[n * D + c] != got[n * D + c];
            check_true("embedding forward: a token id outside [0, V) gives a NaN row", all_nan);
            continue;
        }
        for (size_t c = 0; c < D; c++) {
            got[good_rows * D + c] = got[n * D + c];
            want[good_rows * D + c] = table[(size_t)tok[n] * D + c];
        }
        good_rows++;
    }
    char what[128];
    snprintf(what, sizeof what, "embedding forward N=%zu D=%zu V=%zu (exact)", N, D, V);
    check(what, got, want, good_rows * D, 0, 0, NULL);

    gpu_embedding_backward(DT, TOK, DX, N, D, V);
    download(got, DT, V * D * 4);
    double *bound = xcalloc(V * D, 8);
    for (size_t i = 0; i < V * D; i++) want[i] = dt0[i], bound[i] = fabs(dt0[i]);
    for (size_t n = 0; n < N; n++) {
        if (tok[n] < 0 || (size_t)tok[n] >= V) continue;
        for (size_t c = 0; c < D; c++) {
            want[(size_t)tok[n] * D + c] += dx[n * D + c];
            bound[(size_t)tok[n] * D + c] += fabs(dx[n * D + c]);
        }
    }
    for (size_t i = 0; i < V * D; i++) bound[i] *= 1e-6; /* fp32 atomics in any order */
    snprintf(what, sizeof what, "embedding backward N=%zu D=%zu V=%zu (scatter-add)", N, D, V);
    check(what, got, want, V * D, 0, 0, bound);
    cudaFree(T); cudaFree(TOK); cudaFree(X); cudaFree(DX); cudaFree(DT);
    free(table_bits); free(dx_bits); free(x_bits); free(table); free(dx); free(got); free(dt0); free(want); free(tok); free(bound);
}

/* ---- RMSNorm ------------------------------------------------------------------------- */

static void test_rmsnorm(size_t N, size_t D, float eps, int offset /* elements off alignment */) {
    size_t nd = N * D;
    uint16_t *x_bits = xmalloc((nd + offset) * 2), *w_bits = xmalloc((D + offset) * 2), *dy_bits = xmalloc((nd + offset) * 2);
    uint16_t *dx0_bits = xmalloc((nd + offset) * 2), *out_bits = xmalloc((nd + offset) * 2);
    float *x = xmalloc(nd * 4), *w = xmalloc(D * 4), *dy = xmalloc(nd * 4), *dx0 = xmalloc(nd * 4), *got = xmalloc(nd * 4);
    float *dw0 = xmalloc(D * 4), *rstd_got = xmalloc(N * 4);
    double *want = xmalloc(nd * 8), *r = xmalloc(N * 8), *bound = xmalloc(nd * 8), *dwant = xmalloc(D * 8), *dbound = xmalloc(D * 8);
    rand_bf16(x_bits + offset, x, nd, 0.1f, 1.5f);
    rand_bf16(w_bits + offset, w, D, 1.0f, 0.2f);
    rand_bf16(dy_bits + offset, dy, nd, 0, 1);
    rand_bf16(dx0_bits + offset, dx0, nd, 0, 1);
    rand_f32(dw0, D, 1);
    for (size_t n = 0; n < N; n++) {
        double ss = 0;
        for (size_t c = 0; c < D; c++) ss += (double)x[n * D + c] * x[n * D + c];
        r[n] = 1.0 / sqrt(ss / (double)D + eps);
        for (size_t c = 0; c < D; c++) want[n * D + c] = x[n * D + c] * r[n] * w[c];
    }
    void *X = to_dev(x_bits, (nd + offset) * 2), *W = to_dev(w_bits, (D + offset) * 2), *DY = to_dev(dy_bits, (nd + offset) * 2);
    void *Y = dev_alloc((nd + offset) * 2), *DX = dev_alloc((nd + offset) * 2), *DW = dev_alloc(D * 4);
    float *R = dev_alloc(N * 4);
    uint16_t *x_d = (uint16_t *)X + offset, *w_d = (uint16_t *)W + offset, *dy_d = (uint16_t *)DY + offset;
    uint16_t *y_d = (uint16_t *)Y + offset, *dx_d = (uint16_t *)DX + offset;
    poison(Y, (nd + offset) * 2);
    poison(R, N * 4);
    gpu_rmsnorm_forward(y_d, R, x_d, w_d, N, D, eps);
    download(out_bits, y_d, nd * 2);
    bf16_to_f32_array(got, out_bits, nd);
    char what[128];
    snprintf(what, sizeof what, "rmsnorm forward N=%zu D=%zu%s", N, D, offset ? " unaligned" : "");
    check(what, got, want, nd, 1e-30, 5e-3, NULL);
    download(rstd_got, R, N * 4);
    snprintf(what, sizeof what, "rmsnorm forward rstd N=%zu D=%zu", N, D);
    /* r comes from an fp32 sum of D squares, split over at least 32 threads: its relative error
     * stays under (D/32 + 16) fp32 roundings (rsqrtf adds 2 ulp) */
    double r_rel = ((double)D / 32.0 + 16.0) * 0x1p-24;
    check(what, rstd_got, r, N, 0, r_rel, NULL);

    /* backward, three ways: rstd given + overwrite; rstd recomputed + accumulate; no dw */
    for (int mode = 0; mode < 3; mode++) {
        int accumulate = mode == 1;
        float *dw_ptr = mode == 2 ? NULL : (float *)DW;
        for (size_t c = 0; c < D; c++) dwant[c] = dw0[c], dbound[c] = fabs(dw0[c]) * 1e-7;
        for (size_t n = 0; n < N; n++) {
            double dot = 0, mag = 0, rn = r[n];
            for (size_t c = 0; c < D; c++) {
                dot += (double)w[c] * dy[n * D + c] * x[n * D + c];
                mag += fabs((double)w[c] * dy[n * D + c] * x[n * D + c]);
            }
            for (size_t c = 0; c < D; c++) {
                size_t i = n * D + c;
                double d = rn * w[c] * dy[i] - x[i] * rn * rn * rn * dot / (double)D;
                want[i] = accumulate ? dx0[i] + d : d;
                /* fp32 terms r*w*dy and x*r^3*dot/D (dot sums D products), each carrying r's error */
                bound[i] = (1e-6 + r_rel) * fabs(rn * w[c] * dy[i]) + (1e-6 + 3 * r_rel) * fabs(x[i]) * rn * rn * rn * mag / (double)D +
                           (accumulate ? 1e-6 * fabs(d) : 0);
                dwant[c] += (double)dy[i] * x[i] * rn;
                dbound[c] += (1e-6 + r_rel) * fabs((double)dy[i] * x[i] * rn);
            }
        }
        if (accumulate) upload(DX, dx0_bits, (nd + offset) * 2);
        else poison(DX, (nd + offset) * 2);
        upload(DW, dw0, D * 4);
        gpu_rmsnorm_backward(dx_d, dw_ptr, dy_d, x_d, w_d, mode == 0 ? R : NULL, N, D, eps, accumulate);
        download(out_bits, dx_d, nd * 2);
        bf16_to_f32_array(got, out_bits, nd);
        snprintf(what, sizeof what, "rmsnorm backward dx N=%zu D=%zu %s", N, D,
                 mode == 0 ? "(rstd saved)" : mode == 1 ? "(rstd recomputed, +=)" : "(no dw)");
        check(what, got, want, nd, 1e-30, 5e-3, bound);
        if (dw_ptr) {
            float *dw_got = xmalloc(D * 4);
            download(dw_got, DW, D * 4);
            snprintf(what, sizeof what, "rmsnorm backward dw N=%zu D=%zu", N, D);
            check(what, dw_got, dwant, D, 0, 1e-6, dbound);
            free(dw_got);
        } else {
            float *dw_got = xmalloc(D * 4);
            download(dw_got, DW, D * 4);
            check_true("rmsnorm backward with dw = NULL leaves dw alone", memcmp(dw_got, dw0, D * 4) == 0);
            free(dw_got);
        }
    }
    cudaFree(X); cudaFree(W); cudaFree(DY); cudaFree(Y); cudaFree(DX); cudaFree(DW); cudaFree(R);
    free(x_bits); free(w_bits); free(dy_bits); free(dx0_bits); free(out_bits); free(x); free(w); free(dy); free(dx0);
    free(got); free(dw0); free(rstd_got); free(want); free(r); free(bound); free(dwant); free(dbound);
}

/* ---- RoPE ---------------------------------------------------------------------------- */

/* The rope'd heads sit at column col0 of rows row_stride wide; every other element must stay.
 * The kernel gets a table inv_freq = theta^(-2i/d) / scale (fp32) and a cos/sin scale
 * `attention` (yarn's); the reference rotates in double from the same table. */
static void test_rope(size_t N, size_t heads, size_t d, size_t row_stride, size_t col0, size_t pos_offset, float theta,
                      float scale, float attention, int backward) {
    size_t total = N * row_stride, half = d / 2;
    float *table = xmalloc(half * sizeof(float));
    for (size_t i = 0; i < half; i++) table[i] = (float)(pow((double)theta, -2.0 * (double)i / (double)d) / scale);
    uint16_t *bits = xmalloc(total * 2), *out_bits = xmalloc(total * 2);
    float *v = xmalloc(total * 4), *got = xmalloc(total * 4);
    double *want = xmalloc(total * 8), *bound = xmalloc(total * 8);
    rand_bf16(bits, v, total, 0, 1);
    for (size_t i = 0; i < total; i++) want[i] = v[i], bound[i] = 0;
    double sign = backward ? -1.0 : 1.0;
    for (size_t n = 0; n < N; n++)
        for (size_t i = 0; i < half; i++) {
            double angle = (double)(pos_offset + n) * table[i], c = attention * cos(angle), s = attention * sign * sin(angle);
            /* the kernel's fp32 angle: inv_freq and the product, a few fp32 roundings */
            double angle_err = angle * 8e-7 + 1e-6;
            for (size_t h = 0; h < heads; h++) {
                size_t i1 = n * row_stride + col0 + h * d + i, i2 = i1 + half;
                double a = v[i1], b = v[i2];
                want[i1] = a * c - b * s;
                want[i2] = b * c + a * s;
                bound[i1] = bound[i2] = (fabs(a) + fabs(b)) * attention * (angle_err + 1e-6);
            }
        }
    void *X = to_dev(bits, total * 2), *TAB = to_dev(table, half * sizeof(float));
    if (backward) gpu_rope_backward((uint16_t *)X + col0, N, heads, d, row_stride, pos_offset, (const float *)TAB, attention);
    else gpu_rope_forward((uint16_t *)X + col0, N, heads, d, row_stride, pos_offset, (const float *)TAB, attention);
    download(out_bits, X, total * 2);
    bf16_to_f32_array(got, out_bits, total);
    char what[160];
    snprintf(what, sizeof what, "rope %s N=%zu heads=%zu d=%zu stride=%zu col=%zu pos0=%zu theta=%g s=%g att=%g", backward ? "bwd" : "fwd", N,
             heads, d, row_stride, col0, pos_offset, theta, scale, attention);
    check(what, got, want, total, 0, 4e-3, bound);
    size_t changed = 0; /* elements outside the rope'd heads must keep their exact bits */
    for (size_t n = 0; n < N; n++)
        for (size_t c = 0; c < row_stride; c++)
            if ((c < col0 || c >= col0 + heads * d) && out_bits[n * row_stride + c] != bits[n * row_stride + c]) changed++;
    snprintf(what, sizeof what, "rope %s leaves the rest of each row alone (stride=%zu col=%zu)", backward ? "bwd" : "fwd", row_stride, col0);
    check_true(what, changed == 0);
    cudaFree(X); cudaFree(TAB);
    free(bits); free(out_bits); free(v); free(got); free(want); free(bound); free(table);
}

/* ---- SwiGLU and add ------------------------------------------------------------------ */

static void test_swiglu(size_t count, int offset, int in_place) {
    size_t n = count + offset;
    uint16_t *g_bits = xmalloc(n * 2), *u_bits = xmalloc(n * 2), *dh_bits = xmalloc(n * 2), *out_bits = xmalloc(n * 2);
    float *g = xmalloc(count * 4), *u = xmalloc(count * 4), *dh = xmalloc(count * 4), *got = xcalloc(count, 4);
    double *want = xcalloc(count, 8), *want_du = xcalloc(count, 8);
    rand_bf16(g_bits + offset, g, count, 0, 3);
    rand_bf16(u_bits + offset, u, count, 0, 1);
    rand_bf16(dh_bits + offset, dh, count, 0, 1);
    for (size_t i = 0; i < count; i++) {
        double s = 1.0 / (1.0 + exp(-(double)g[i]));
        want[i] = g[i] * s * u[i];
    }
    uint16_t *G = to_dev(g_bits, n * 2), *U = to_dev(u_bits, n * 2), *DH = to_dev(dh_bits, n * 2), *H = dev_alloc(n * 2);
    poison(H, n * 2);
    gpu_swiglu_forward(H + offset, G + offset, U + offset, count);
    download(out_bits, H + offset, count * 2);
    bf16_to_f32_array(got, out_bits, count);
    char what[128];
    snprintf(what, sizeof what, "swiglu forward n=%zu%s", count, offset ? " unaligned" : "");
    check(what, got, want, count, 1e-30, 5e-3, NULL);

    for (size_t i = 0; i < count; i++) {
        double s = 1.0 / (1.0 + exp(-(double)g[i]));
        want[i] = dh[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
        want_du[i] = dh[i] * g[i] * s;
    }
    uint16_t *DG = G, *DU = U; /* in place: the gradients overwrite gate and up */
    if (!in_place) {
        DG = dev_alloc(n * 2), DU = dev_alloc(n * 2);
        poison(DG, n * 2);
        poison(DU, n * 2);
    }
    gpu_swiglu_backward(DG + offset, DU + offset, DH + offset, G + offset, U + offset, count);
    download(out_bits, DG + offset, count * 2);
    bf16_to_f32_array(got, out_bits, count);
    snprintf(what, sizeof what, "swiglu backward dgate n=%zu%s%s", count, offset ? " unaligned" : "", in_place ? " in place" : "");
    check(what, got, want, count, 1e-30, 5e-3, NULL);
    download(out_bits, DU + offset, count * 2);
    bf16_to_f32_array(got, out_bits, count);
    snprintf(what, sizeof what, "swiglu backward dup n=%zu%s%s", count, offset ? " unaligned" : "", in_place ? " in place" : "");
    check(what, got, want_du, count, 1e-30, 5e-3, NULL);
    if (!in_place) { cudaFree(DG); cudaFree(DU); }
    cudaFree(G); cudaFree(U); cudaFree(DH); cudaFree(H);
    free(g_bits); free(u_bits); free(dh_bits); free(out_bits); free(g); free(u); free(dh); free(got); free(want); free(want_du);
}

static void test_add(size_t count, int offset, int alias) {
    size_t n = count + offset;
    uint16_t *a_bits = xmalloc(n * 2), *b_bits = xmalloc(n * 2), *out_bits = xmalloc(n * 2);
    float *a = xmalloc(count * 4), *b = xmalloc(count * 4), *got = xmalloc(count * 4);
    double *want = xmalloc(count * 8);
    rand_bf16(a_bits + offset, a, count, 0, 1);
    rand_bf16(b_bits + offset, b, count, 0, 0.01f);
    /* fp32 sum rounded to bf16, the same on both sides: exact */
    for (size_t i = 0; i < count; i++) want[i] = bf16_to_f32(f32_to_bf16(a[i] + b[i]));
    uint16_t *A = to_dev(a_bits, n * 2), *B = to_dev(b_bits, n * 2), *O = alias ? A : dev_alloc(n * 2);
    if (!alias) poison(O, n * 2);
    gpu_add(O + offset, A + offset, B + offset, count);
    download(out_bits, O + offset, count * 2);
    bf16_to_f32_array(got, out_bits, count);
    char what[128];
    snprintf(what, sizeof what, "add n=%zu%s%s (exact)", count, offset ? " unaligned" : "", alias ? " out=a" : "");
    check(what, got, want, count, 0, 0, NULL);
    if (!alias) cudaFree(O);
    cudaFree(A); cudaFree(B);
    free(a_bits); free(b_bits); free(out_bits); free(a); free(b); free(got); free(want);
}

/* ---- cross-entropy ------------------------------------------------------------------- */

static int32_t random_target(size_t V, double ignore_frac) {
    return rng_uniform(&g_rng) < ignore_frac ? -100 : (int32_t)rng_below(&g_rng, V);
}

static void test_ce_logits(size_t rows, size_t V, int with_bad_target) {
    float *logits = xmalloc(rows * V * 4), *loss_got = xmalloc(rows * 4), *dl_got = xmalloc(rows * V * 4);
    uint16_t *dl_bits = xmalloc(rows * V * 2);
    int32_t *tgt = xmalloc(rows * 4);
    double *loss_want = xmalloc(rows * 8), *dl_want = xmalloc(rows * V * 8);
    rand_f32(logits, rows * V, 3);
    for (size_t r = 0; r < rows; r++) tgt[r] = random_target(V, 0.25);
    if (with_bad_target) tgt[rows - 1] = (int32_t)V + 3;
    float grad_scale = 0.37f;
    size_t checked = 0;
    for (size_t r = 0; r < rows; r++) {
        const float *l = logits + r * V;
        double m = -INFINITY, s = 0;
        for (size_t j = 0; j < V; j++) m = fmax(m, l[j]);
        for (size_t j = 0; j < V; j++) s += exp(l[j] - m);
        double lse = m + log(s);
        int32_t t = tgt[r];
        loss_want[r] = t == -100 ? 0.0 : (t >= 0 && (size_t)t < V) ? lse - l[t] : NAN;
        for (size_t j = 0; j < V; j++)
            dl_want[r * V + j] = t == -100 ? 0.0 : (exp(l[j] - lse) - (j == (size_t)t)) * grad_scale;
    }
    void *L = to_dev(logits, rows * V * 4), *T = to_dev(tgt, rows * 4), *RL = dev_alloc(rows * 4), *DL = dev_alloc(rows * V * 2);
    poison(RL, rows * 4);
    poison(DL, rows * V * 2);
    gpu_cross_entropy_logits(RL, DL, L, T, rows, V, grad_scale);
    download(loss_got, RL, rows * 4);
    download(dl_bits, DL, rows * V * 2);
    bf16_to_f32_array(dl_got, dl_bits, rows * V);
    size_t good = with_bad_target ? rows - 1 : rows;
    if (with_bad_target) {
        int nan_loss = loss_got[rows - 1] != loss_got[rows - 1], nan_grad = 1;
        for (size_t j = 0; j < V; j++) nan_grad &= dl_got[(rows - 1) * V + j] != dl_got[(rows - 1) * V + j];
        check_true("cross-entropy: a target outside [0, V) and not -100 gives a NaN loss and NaN dlogits", nan_loss && nan_grad);
    }
    checked = good;
    char what[128];
    snprintf(what, sizeof what, "cross-entropy row kernel loss rows=%zu V=%zu", rows, V);
    check(what, loss_got, loss_want, checked, 2e-5, 2e-5, NULL);
    snprintf(what, sizeof what, "cross-entropy row kernel dlogits rows=%zu V=%zu", rows, V);
    check(what, dl_got, dl_want, checked * V, 1e-6 * grad_scale, 5e-3, NULL);
    /* without dlogits (evaluation) the loss is the same */
    poison(RL, rows * 4);
    gpu_cross_entropy_logits(RL, NULL, L, T, rows, V, grad_scale);
    download(loss_got, RL, rows * 4);
    snprintf(what, sizeof what, "cross-entropy row kernel loss only rows=%zu V=%zu", rows, V);
    check(what, loss_got, loss_want, checked, 2e-5, 2e-5, NULL);
    cudaFree(L); cudaFree(T); cudaFree(RL); cudaFree(DL);
    free(logits); free(loss_got); free(dl_got); free(dl_bits); free(tgt); free(loss_want); free(dl_want);
}

static void test_cross_entropy(size_t N, size_t D, size_t V, size_t chunk, double ignore_frac, int with_grads) {
    uint16_t *h_bits = xmalloc(N * D * 2), *w_bits = xmalloc(V * D * 2), *dh_bits = xmalloc(N * D * 2);
    float *h = xmalloc(N * D * 4), *w = xmalloc(V * D * 4), *dw0 = xmalloc(V * D * 4), *got = xmalloc((N + V) * D * 4);
    int32_t *tgt = xmalloc(N * 4);
    double *dl = xmalloc(N * V * 8), *dh_want = xmalloc(N * D * 8), *dh_bound = xmalloc(N * D * 8);
    double *dw_want = xmalloc(V * D * 8), *dw_bound = xmalloc(V * D * 8);
    rand_bf16(h_bits, h, N * D, 0, 1);
    rand_bf16(w_bits, w, V * D, 0, 0.3f);
    rand_f32(dw0, V * D, 0.01f);
    for (size_t n = 0; n < N; n++) tgt[n] = random_target(V, ignore_frac);
    float dloss = 0.5f;
    size_t valid = 0;
    for (size_t n = 0; n < N; n++) valid += tgt[n] != -100;
    double loss_want = 0;
#pragma omp parallel for reduction(+ : loss_want)
    for (size_t n = 0; n < N; n++) {
        double *row = dl + n * V, m = -INFINITY, s = 0;
        for (size_t j = 0; j < V; j++) {
            double z = 0;
            for (size_t c = 0; c < D; c++) z += (double)h[n * D + c] * w[j * D + c];
            row[j] = z;
            m = fmax(m, z);
        }
        for (size_t j = 0; j < V; j++) s += exp(row[j] - m);
        double lse = m + log(s);
        if (tgt[n] != -100) loss_want += lse - row[tgt[n]];
        for (size_t j = 0; j < V; j++)
            row[j] = tgt[n] == -100 ? 0.0 : (exp(row[j] - lse) - (j == (size_t)tgt[n])) * dloss / (double)valid;
    }
    /* dh = dl W, dW = dW0 + dl^T h; bounds: 2^-8 of the term magnitudes (dlogits are rounded to bf16) */
#pragma omp parallel for
    for (size_t n = 0; n < N; n++)
        for (size_t c = 0; c < D; c++) {
            double s = 0, a = 0;
            for (size_t j = 0; j < V; j++) {
                s += dl[n * V + j] * w[j * D + c];
                a += fabs(dl[n * V + j] * w[j * D + c]);
            }
            dh_want[n * D + c] = s;
            dh_bound[n * D + c] = a / 256.0 + 1e-30;
        }
#pragma omp parallel for
    for (size_t j = 0; j < V; j++)
        for (size_t c = 0; c < D; c++) {
            double s = dw0[j * D + c], a = 0;
            for (size_t n = 0; n < N; n++) {
                s += dl[n * V + j] * h[n * D + c];
                a += fabs(dl[n * V + j] * h[n * D + c]);
            }
            dw_want[j * D + c] = s;
            dw_bound[j * D + c] = a / 256.0 + 1e-6 * fabs(dw0[j * D + c]) + 1e-30;
        }
    void *H = to_dev(h_bits, N * D * 2), *W = to_dev(w_bits, V * D * 2), *T = to_dev(tgt, N * 4);
    void *DH = dev_alloc(N * D * 2), *DW = to_dev(dw0, V * D * 4);
    poison(DH, N * D * 2);
    double loss_sum = -1;
    size_t n_valid = 12345;
    gpu_cross_entropy(&loss_sum, &n_valid, with_grads ? DH : NULL, with_grads ? DW : NULL, H, W, T, N, D, V, chunk, dloss);
    char what[160];
    snprintf(what, sizeof what, "cross-entropy N=%zu D=%zu V=%zu chunk=%zu: n_valid %zu (want %zu)", N, D, V, chunk, n_valid, valid);
    check_true(what, n_valid == valid);
    float lg = (float)loss_sum;
    snprintf(what, sizeof what, "cross-entropy N=%zu D=%zu V=%zu chunk=%zu%s loss sum", N, D, V, chunk, with_grads ? "" : " (no grads)");
    check(what, &lg, &loss_want, 1, 1e-6, 2e-5, NULL);
    if (with_grads) {
        download(dh_bits, DH, N * D * 2);
        bf16_to_f32_array(got, dh_bits, N * D);
        snprintf(what, sizeof what, "cross-entropy N=%zu D=%zu V=%zu chunk=%zu dh", N, D, V, chunk);
        check(what, got, dh_want, N * D, 0, 5e-3, dh_bound);
        download(got, DW, V * D * 4);
        snprintf(what, sizeof what, "cross-entropy N=%zu D=%zu V=%zu chunk=%zu dW +=", N, D, V, chunk);
        check(what, got, dw_want, V * D, 0, 1e-5, dw_bound);
    }
    cudaFree(H); cudaFree(W); cudaFree(T); cudaFree(DH); cudaFree(DW);
    free(h_bits); free(w_bits); free(dh_bits); free(h); free(w); free(dw0); free(got); free(tgt);
    free(dl); free(dh_want); free(dh_bound); free(dw_want); free(dw_bound);
}

/* ---- AdamW --------------------------------------------------------------------------- */

static void test_adamw(size_t count, int offset, float weight_decay, int with_bf16) {
    size_t n = count + offset;
    float *p = xmalloc(n * 4), *g = xmalloc(n * 4), *m = xmalloc(n * 4), *v = xmalloc(n * 4), *got = xmalloc(count * 4);
    uint16_t *pb = xmalloc(n * 2);
    double *pw = xmalloc(count * 8), *mw = xmalloc(count * 8), *vw = xmalloc(count * 8);
    rand_f32(p, n, 0.5f);
    rand_f32(m, n, 0.01f);
    for (size_t i = 0; i < n; i++) v[i] = 1e-4f * fabsf(rng_normal(&g_rng));
    for (size_t i = 0; i < count; i++) pw[i] = p[offset + i], mw[i] = m[offset + i], vw[i] = v[offset + i];
    float *P = to_dev(p, n * 4), *G = dev_alloc(n * 4), *M = to_dev(m, n * 4), *Vd = to_dev(v, n * 4);
    uint16_t *PB = with_bf16 ? dev_alloc(n * 2) : NULL;
    float lr = 2e-3f, b1 = 0.9f, b2 = 0.95f, eps = 1e-8f, gs = 0.5f;
    for (int step = 1; step <= 3; step++) {
        rand_f32(g, n, 0.02f);
        upload(G, g, n * 4);
        if (PB) poison(PB, n * 2);
        gpu_adamw(P + offset, PB ? PB + offset : NULL, G + offset, M + offset, Vd + offset, count, lr, b1, b2, eps, weight_decay, step, gs);
        double bc1 = 1 - pow(b1, step), bc2 = 1 - pow(b2, step);
        for (size_t i = 0; i < count; i++) {
            double gg = (double)g[offset + i] * gs;
            mw[i] = b1 * mw[i] + (1 - b1) * gg;
            vw[i] = b2 * vw[i] + (1 - b2) * gg * gg;
            pw[i] = pw[i] * (1 - (double)lr * weight_decay) - (lr / bc1) * mw[i] / (sqrt(vw[i]) / sqrt(bc2) + eps);
        }
        char what[128];
        download(got, P + offset, count * 4);
        snprintf(what, sizeof what, "adamw step %d n=%zu wd=%g%s param", step, count, weight_decay, offset ? " unaligned" : "");
        check(what, got, pw, count, 1e-5 * lr, 1e-6, NULL); /* ~1.5 fp32 roundings of p per step; the step (~lr) to ~1e-6 */
        if (PB) {
            download(pb, PB + offset, count * 2);
            size_t bad = 0;
            for (size_t i = 0; i < count; i++) bad += pb[i] != f32_to_bf16(got[i]);
            snprintf(what, sizeof what, "adamw step %d n=%zu bf16 copy == round(fp32 param)", step, count);
            check_true(what, bad == 0);
        }
        download(got, M + offset, count * 4);
        snprintf(what, sizeof what, "adamw step %d n=%zu m", step, count);
        check(what, got, mw, count, 2e-6 * rms(mw, count), 1e-6, NULL); /* m = b1 m + (1-b1) g may cancel */
        download(got, Vd + offset, count * 4);
        snprintf(what, sizeof what, "adamw step %d n=%zu v", step, count);
        check(what, got, vw, count, 1e-15, 1e-6, NULL);
    }
    cudaFree(P); cudaFree(G); cudaFree(M); cudaFree(Vd);
    if (PB) cudaFree(PB);
    free(p); free(g); free(m); free(v); free(got); free(pb); free(pw); free(mw); free(vw);
}

static void test_sum_squares(size_t count) {
    float *x = xmalloc(count * 4);
    rand_f32(x, count, 2);
    double want = 0;
    for (size_t i = 0; i < count; i++) want += (double)x[i] * x[i];
    float *X = to_dev(x, count * 4);
    double got = gpu_sum_squares(X, count);
    float gf = (float)got;
    char what[96];
    snprintf(what, sizeof what, "sum of squares n=%zu", count);
    check(what, &gf, &want, 1, 0, 1e-6, NULL);
    cudaFree(X);
    free(x);
}

/* ---- LoRA ---------------------------------------------------------------------------- */

static void test_lora(size_t T, size_t in, size_t out, size_t R, float scaling) {
    uint16_t *x_bits = xmalloc(T * in * 2), *a_bits = xmalloc(R * in * 2), *b_bits = xmalloc(out * R * 2);
    uint16_t *y_bits = xmalloc(T * out * 2), *dy_bits = xmalloc(T * out * 2), *dx_bits = xmalloc(T * in * 2);
    uint16_t *xa_bits = xmalloc(T * R * 2), *tmp_bits = xmalloc((T * (in > out ? in : out)) * 2);
    float *x = xmalloc(T * in * 4), *a = xmalloc(R * in * 4), *b = xmalloc(out * R * 4), *y0 = xmalloc(T * out * 4);
    float *dy = xmalloc(T * out * 4), *dx0 = xmalloc(T * in * 4), *xa = xmalloc(T * R * 4);
    float *dA0 = xmalloc(R * in * 4), *dB0 = xmalloc(out * R * 4), *got = xmalloc((T * (in > out ? in : out) + R * in + out * R) * 4);
    double *want = xmalloc((T * (in > out ? in : out) + R * in + out * R) * 8), *bound = xmalloc((T * (in > out ? in : out) + R * in + out * R) * 8);
    double *dxa = xmalloc(T * R * 8), *dxa_abs = xmalloc(T * R * 8);
    rand_bf16(x_bits, x, T * in, 0, 1);
    rand_bf16(a_bits, a, R * in, 0, 0.1f);
    rand_bf16(b_bits, b, out * R, 0, 0.1f); /* B is zero at PEFT's init; after training it is not */
    rand_bf16(y_bits, y0, T * out, 0, 1);
    rand_bf16(dy_bits, dy, T * out, 0, 1);
    rand_bf16(dx_bits, dx0, T * in, 0, 1);
    rand_f32(dA0, R * in, 0.1f);
    rand_f32(dB0, out * R, 0.1f);
    void *X = to_dev(x_bits, T * in * 2), *A = to_dev(a_bits, R * in * 2), *B = to_dev(b_bits, out * R * 2);
    void *Y = to_dev(y_bits, T * out * 2), *XA = dev_alloc(T * R * 2), *DY = to_dev(dy_bits, T * out * 2);
    void *DX = to_dev(dx_bits, T * in * 2), *DA = to_dev(dA0, R * in * 4), *DB = to_dev(dB0, out * R * 4);
    poison(XA, T * R * 2);
    gpu_lora_forward(Y, XA, X, A, B, T, in, out, R, scaling);
    char what[128];
    /* xa = x A^T, rounded once to bf16 */
    for (size_t t = 0; t < T; t++)
        for (size_t r = 0; r < R; r++) {
            double s = 0, m = 0;
            for (size_t i = 0; i < in; i++) s += (double)x[t * in + i] * a[r * in + i], m += fabs((double)x[t * in + i] * a[r * in + i]);
            want[t * R + r] = s;
            bound[t * R + r] = 1e-6 * m;
        }
    download(xa_bits, XA, T * R * 2);
    bf16_to_f32_array(xa, xa_bits, T * R);
    snprintf(what, sizeof what, "lora forward xa T=%zu in=%zu R=%zu", T, in, R);
    check(what, xa, want, T * R, 0, 5e-3, bound);
    /* y = y0 + scaling * xa B^T, with the kernel's own bf16 xa as input */
    for (size_t t = 0; t < T; t++)
        for (size_t o = 0; o < out; o++) {
            double s = 0, m = 0;
            for (size_t r = 0; r < R; r++) s += (double)xa[t * R + r] * b[o * R + r], m += fabs((double)xa[t * R + r] * b[o * R + r]);
            want[t * out + o] = y0[t * out + o] + scaling * s;
            bound[t * out + o] = 1e-6 * (scaling * m + fabs(y0[t * out + o]));
        }
    download(tmp_bits, Y, T * out * 2);
    bf16_to_f32_array(got, tmp_bits, T * out);
    snprintf(what, sizeof what, "lora forward y += T=%zu out=%zu R=%zu scaling=%g", T, out, R, scaling);
    check(what, got, want, T * out, 0, 5e-3, bound);

    gpu_lora_backward(DX, DA, DB, DY, X, XA, A, B, T, in, out, R, scaling);
    for (size_t t = 0; t < T; t++)
        for (size_t r = 0; r < R; r++) {
            double s = 0, m = 0;
            for (size_t o = 0; o < out; o++) s += (double)dy[t * out + o] * b[o * R + r], m += fabs((double)dy[t * out + o] * b[o * R + r]);
            dxa[t * R + r] = scaling * s;
            dxa_abs[t * R + r] = scaling * m; /* the kernel rounds dxa to bf16: 2^-8 of this */
        }
    /* dB = dB0 + scaling * dy^T xa */
    for (size_t o = 0; o < out; o++)
        for (size_t r = 0; r < R; r++) {
            double s = 0, m = 0;
            for (size_t t = 0; t < T; t++) s += (double)dy[t * out + o] * xa[t * R + r], m += fabs((double)dy[t * out + o] * xa[t * R + r]);
            want[o * R + r] = dB0[o * R + r] + scaling * s;
            bound[o * R + r] = 1e-6 * (scaling * m + fabs(dB0[o * R + r]));
        }
    download(got, DB, out * R * 4);
    snprintf(what, sizeof what, "lora backward dB += T=%zu out=%zu R=%zu", T, out, R);
    check(what, got, want, out * R, 0, 1e-6, bound);
    /* dA = dA0 + dxa^T x */
    for (size_t r = 0; r < R; r++)
        for (size_t i = 0; i < in; i++) {
            double s = 0, m = 0;
            for (size_t t = 0; t < T; t++) s += dxa[t * R + r] * x[t * in + i], m += (dxa_abs[t * R + r] / 256.0 + 1e-6 * fabs(dxa[t * R + r])) * fabs(x[t * in + i]);
            want[r * in + i] = dA0[r * in + i] + s;
            bound[r * in + i] = m + 1e-6 * fabs(dA0[r * in + i]);
        }
    download(got, DA, R * in * 4);
    snprintf(what, sizeof what, "lora backward dA += T=%zu in=%zu R=%zu", T, in, R);
    check(what, got, want, R * in, 0, 1e-6, bound);
    /* dx = dx0 + dxa A */
    for (size_t t = 0; t < T; t++)
        for (size_t i = 0; i < in; i++) {
            double s = 0, m = 0;
            for (size_t r = 0; r < R; r++) s += dxa[t * R + r] * a[r * in + i], m += (dxa_abs[t * R + r] / 256.0 + 1e-6 * fabs(dxa[t * R + r])) * fabs(a[r * in + i]);
            want[t * in + i] = dx0[t * in + i] + s;
            bound[t * in + i] = m + 1e-6 * fabs(dx0[t * in + i]);
        }
    download(tmp_bits, DX, T * in * 2);
    bf16_to_f32_array(got, tmp_bits, T * in);
    snprintf(what, sizeof what, "lora backward dx += T=%zu in=%zu R=%zu", T, in, R);
    check(what, got, want, T * in, 0, 5e-3, bound);
    cudaFree(X); cudaFree(A); cudaFree(B); cudaFree(Y); cudaFree(XA); cudaFree(DY); cudaFree(DX); cudaFree(DA); cudaFree(DB);
    free(x_bits); free(a_bits); free(b_bits); free(y_bits); free(dy_bits); free(dx_bits); free(xa_bits); free(tmp_bits);
    free(x); free(a); free(b); free(y0); free(dy); free(dx0); free(xa); free(dA0); free(dB0); free(got); free(want); free(bound);
    free(dxa); free(dxa_abs);
}

/* ---- bandwidth at a LLaMA-2-7B shape ---------------------------------------------------- */

/* Fills a device buffer with random bits of the given kind by copying a random host block
 * and doubling it on the device (fast; the values only need to be realistic, not unique). */
static void fill_random(void *dev, size_t bytes, int is_f32, float scale, int positive) {
    size_t block = (size_t)32 << 20;
    if (block > bytes) block = bytes;
    uint8_t *host = xmalloc(block);
    if (is_f32) {
        for (size_t i = 0; i + 4 <= block; i += 4) {
            float f = scale * rng_normal(&g_rng);
            if (positive) f = fabsf(f);
            memcpy(host + i, &f, 4);
        }
    } else {
        for (size_t i = 0; i + 2 <= block; i += 2) {
            uint16_t h = f32_to_bf16(scale * rng_normal(&g_rng));
            memcpy(host + i, &h, 2);
        }
    }
    upload(dev, host, block);
    for (size_t done = block; done < bytes;) {
        size_t n = done < bytes - done ? done : bytes - done;
        CUDA_CHECK(cudaMemcpy((uint8_t *)dev + done, dev, n, cudaMemcpyDeviceToDevice));
        done += n;
    }
    free(host);
}

typedef struct {
    const char *name;
    double ms, bytes, flops;
} BenchRow;

static int cmp_float(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return x < y ? -1 : x > y;
}
/* Median of reps timed runs (after 2 warm-ups), CUDA events around each. */
#define TIME_MS(out_ms, reps, ...)                                                               \
    do {                                                                                         \
        cudaEvent_t e0_, e1_;                                                                    \
        float t_[64];                                                                            \
        CUDA_CHECK(cudaEventCreate(&e0_));                                                          \
        CUDA_CHECK(cudaEventCreate(&e1_));                                                          \
        for (int w_ = 0; w_ < 2; w_++) { __VA_ARGS__; }                                          \
        for (int r_ = 0; r_ < (reps); r_++) {                                                    \
            CUDA_CHECK(cudaEventRecord(e0_, 0));                                                    \
            __VA_ARGS__;                                                                         \
            CUDA_CHECK(cudaEventRecord(e1_, 0));                                                    \
            CUDA_CHECK(cudaEventSynchronize(e1_));                                                  \
            CUDA_CHECK(cudaEventElapsedTime(&t_[r_], e0_, e1_));                                    \
        }                                                                                        \
        qsort(t_, (size_t)(reps), sizeof(float), cmp_float);                                     \
        (out_ms) = t_[(reps) / 2];                                                               \
        CUDA_CHECK(cudaEventDestroy(e0_));                                                          \
        CUDA_CHECK(cudaEventDestroy(e1_));                                                          \
    } while (0)

static int bench(const char *json_path) {
    const size_t N = 32768, D = 4096, F = 11008, V = 32000, H = 32, d = 128, R = 8, chunk = 4096;
    const size_t ND = N * D, NF = N * F, VD = V * D;
    const int reps = 10;
    BenchRow rows[40];
    int nrows = 0;
    uint16_t *x = dev_alloc(ND * 2), *y = dev_alloc(ND * 2), *z = dev_alloc(ND * 2), *w = dev_alloc(D * 2);
    uint16_t *gate = dev_alloc(NF * 2), *up = dev_alloc(NF * 2), *hbuf = dev_alloc(NF * 2), *table = dev_alloc(VD * 2);
    float *rstd = dev_alloc(N * 4), *dw = dev_alloc(D * 4), *dtable = dev_alloc(VD * 4);
    float *p = dev_alloc(VD * 4), *g = dev_alloc(VD * 4), *m = dev_alloc(VD * 4), *v = dev_alloc(VD * 4);
    float *logits = dev_alloc(chunk * V * 4), *row_loss = dev_alloc(N * 4);
    uint16_t *dlogits = dev_alloc(chunk * V * 2), *pb = dev_alloc(VD * 2);
    int32_t *tok = dev_alloc(N * 4);
    int32_t *tok_host = xmalloc(N * 4);
    for (size_t i = 0; i < N; i++) tok_host[i] = (int32_t)rng_below(&g_rng, V);
    upload(tok, tok_host, N * 4);
    fill_random(x, ND * 2, 0, 1, 0); fill_random(y, ND * 2, 0, 1, 0); fill_random(z, ND * 2, 0, 1, 0);
    fill_random(w, D * 2, 0, 1, 0); fill_random(gate, NF * 2, 0, 2, 0); fill_random(up, NF * 2, 0, 1, 0);
    fill_random(hbuf, NF * 2, 0, 1, 0); fill_random(table, VD * 2, 0, 0.02f, 0); fill_random(dtable, VD * 4, 1, 0.01f, 0);
    fill_random(p, VD * 4, 1, 0.02f, 0); fill_random(g, VD * 4, 1, 1e-3f, 0); fill_random(m, VD * 4, 1, 1e-4f, 0);
    fill_random(v, VD * 4, 1, 1e-6f, 1); fill_random(logits, chunk * V * 4, 1, 3, 0);
    CUDA_CHECK(cudaMemset(dw, 0, D * 4));
    double ms;
    /* the ceiling: a device-to-device copy of 2 GiB (read + write counted) */
    size_t copy_bytes = (size_t)2 << 30;
    void *c0 = dev_alloc(copy_bytes), *c1 = dev_alloc(copy_bytes);
    CUDA_CHECK(cudaMemset(c0, 1, copy_bytes));
    TIME_MS(ms, reps, CUDA_CHECK(cudaMemcpyAsync(c1, c0, copy_bytes, cudaMemcpyDeviceToDevice, 0)));
    rows[nrows++] = (BenchRow){"copy (cudaMemcpy D2D, 2 GiB)", ms, 2.0 * copy_bytes, 0};
    cudaFree(c0); cudaFree(c1);

    TIME_MS(ms, reps, gpu_embedding_forward(y, tok, table, N, D, V));
    rows[nrows++] = (BenchRow){"embedding forward [N,D]", ms, 2.0 * ND * 2 + N * 4, 0};
    TIME_MS(ms, reps, gpu_embedding_backward(dtable, tok, x, N, D, V));
    rows[nrows++] = (BenchRow){"embedding backward (atomics, fp32)", ms, ND * 2.0 + 2.0 * ND * 4 + N * 4, 0};
    TIME_MS(ms, reps, gpu_rmsnorm_forward(y, rstd, x, w, N, D, 1e-5f));
    rows[nrows++] = (BenchRow){"rmsnorm forward", ms, 2.0 * ND * 2 + N * 4, 0};
    TIME_MS(ms, reps, gpu_rmsnorm_backward(z, dw, y, x, w, rstd, N, D, 1e-5f, 0));
    rows[nrows++] = (BenchRow){"rmsnorm backward (dx, dw)", ms, 3.0 * ND * 2 + N * 4, 0};
    TIME_MS(ms, reps, gpu_rmsnorm_backward(z, dw, y, x, w, rstd, N, D, 1e-5f, 1));
    rows[nrows++] = (BenchRow){"rmsnorm backward (dx +=, dw)", ms, 4.0 * ND * 2 + N * 4, 0};
    float rope_table[64];
    for (int i = 0; i < 64; i++) rope_table[i] = (float)(pow(10000.0, -2.0 * i / 128.0) / 4.0);
    float *rope_dev = to_dev(rope_table, sizeof rope_table);
    TIME_MS(ms, reps, gpu_rope_forward(y, N, H, d, H * d, 0, rope_dev, 1.0f));
    rows[nrows++] = (BenchRow){"rope forward (q, in place)", ms, 2.0 * ND * 2, 0};
    TIME_MS(ms, reps, gpu_rope_backward(y, N, H, d, H * d, 0, rope_dev, 1.0f));
    rows[nrows++] = (BenchRow){"rope backward (in place)", ms, 2.0 * ND * 2, 0};
    TIME_MS(ms, reps, gpu_add(z, x, y, ND));
    rows[nrows++] = (BenchRow){"residual add [N,D]", ms, 3.0 * ND * 2, 0};
    TIME_MS(ms, reps, gpu_swiglu_forward(hbuf, gate, up, NF));
    rows[nrows++] = (BenchRow){"swiglu forward [N,F]", ms, 3.0 * NF * 2, 0};
    /* backward writes dgate/dup into separate buffers so repeated runs see the same inputs */
    uint16_t *dgate = dev_alloc(NF * 2), *dup = dev_alloc(NF * 2);
    TIME_MS(ms, reps, gpu_swiglu_backward(dgate, dup, hbuf, gate, up, NF));
    rows[nrows++] = (BenchRow){"swiglu backward [N,F]", ms, 5.0 * NF * 2, 0};
    cudaFree(dgate); cudaFree(dup);
    TIME_MS(ms, reps, gpu_cross_entropy_logits(row_loss, dlogits, logits, tok, chunk, V, 1.0f / N));
    rows[nrows++] = (BenchRow){"cross-entropy row kernel [4096,V]", ms, chunk * V * 6.0 + chunk * 8.0, 0};
    TIME_MS(ms, reps, gpu_adamw(p, pb, g, m, v, VD, 1e-5f, 0.9f, 0.95f, 1e-8f, 0.0f, 3, 1.0f));
    rows[nrows++] = (BenchRow){"adamw (embed table, 131M params)", ms, VD * 30.0, 0};
    TIME_MS(ms, reps, gpu_f32_to_bf16(pb, p, VD));
    rows[nrows++] = (BenchRow){"f32_to_bf16 (131M)", ms, VD * 6.0, 0};
    /* GEMM-bound pieces, for scale: the whole chunked cross-entropy and the LoRA path */
    double loss;
    size_t nv;
    TIME_MS(ms, 3, gpu_cross_entropy(&loss, &nv, z, NULL, x, table, tok, N, D, V, chunk, 1.0f));
    rows[nrows++] = (BenchRow){"cross-entropy full, N=32k (fwd + dh)", ms, 0, 2.0 * 2.0 * N * D * V};
    TIME_MS(ms, 3, gpu_cross_entropy(&loss, &nv, z, dtable, x, table, tok, N, D, V, chunk, 1.0f));
    rows[nrows++] = (BenchRow){"cross-entropy full, tied (+ dW)", ms, 0, 3.0 * 2.0 * N * D * V};
    uint16_t *A = dev_alloc(R * D * 2), *B = dev_alloc(D * R * 2), *xa = dev_alloc(N * R * 2);
    float *dA = dev_alloc(R * D * 4), *dB = dev_alloc(D * R * 4);
    fill_random(A, R * D * 2, 0, 0.02f, 0); fill_random(B, D * R * 2, 0, 0.02f, 0);
    CUDA_CHECK(cudaMemset(dA, 0, R * D * 4)); CUDA_CHECK(cudaMemset(dB, 0, D * R * 4));
    TIME_MS(ms, reps, gpu_lora_forward(y, xa, x, A, B, N, D, D, R, 2.0f));
    rows[nrows++] = (BenchRow){"lora forward 4096->4096 r=8", ms, 2.0 * ND * 2 + ND * 2, 2.0 * 2.0 * N * D * R};
    TIME_MS(ms, reps, gpu_lora_backward(z, dA, dB, y, x, xa, A, B, N, D, D, R, 2.0f));
    rows[nrows++] = (BenchRow){"lora backward 4096->4096 r=8", ms, 2.0 * ND * 2 + 2.0 * ND * 2, 4.0 * 2.0 * N * D * R};
    cudaFree(A); cudaFree(B); cudaFree(xa); cudaFree(dA); cudaFree(dB);

    struct cudaDeviceProp prop;
    CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    double copy_gbs = rows[0].bytes / (rows[0].ms * 1e6);
    FILE *f = json_path ? fopen(json_path, "w") : NULL;
    if (json_path && !f) die("cannot write %s: %s", json_path, strerror(errno));
    if (f) fprintf(f, "{\"device\": \"%s\", \"N\": %zu, \"D\": %zu, \"F\": %zu, \"V\": %zu, \"rows\": [\n", prop.name, N, D, F, V);
    printf("\n%s, N=%zu D=%zu F=%zu V=%zu (median of %d)\n", prop.name, N, D, F, V, reps);
    printf("%-40s %9s %9s %8s %9s\n", "kernel", "ms", "GB/s", "of copy", "TFLOP/s");
    for (int i = 0; i < nrows; i++) {
        double gbs = rows[i].bytes / (rows[i].ms * 1e6), tf = rows[i].flops / (rows[i].ms * 1e9);
        printf("%-40s %9.3f %9.0f %7.0f%% %9.1f\n", rows[i].name, rows[i].ms, gbs, 100.0 * gbs / copy_gbs, tf);
        if (f) fprintf(f, "  {\"kernel\": \"%s\", \"ms\": %.4f, \"bytes\": %.0f, \"GBps\": %.1f, \"of_copy\": %.3f, \"TFLOPs\": %.2f}%s\n", rows[i].name,
                       rows[i].ms, rows[i].bytes, gbs, gbs / copy_gbs, tf, i + 1 < nrows ? "," : "");
    }
    if (f) { fprintf(f, "]}\n"); fclose(f); }
    cudaFree(x); cudaFree(y); cudaFree(z); cudaFree(w); cudaFree(gate); cudaFree(up); cudaFree(hbuf); cudaFree(table);
    cudaFree(rstd); cudaFree(dw); cudaFree(dtable); cudaFree(p); cudaFree(g); cudaFree(m); cudaFree(v); cudaFree(logits);
    cudaFree(row_loss); cudaFree(dlogits); cudaFree(pb); cudaFree(tok);
    free(tok_host);
    gpu_layers_free();
    printf("bench done: %d kernels timed\n", nrows);
    return 0;
}

/* ---- main ---------------------------------------------------------------------------- */

int main(int argc, char **argv) {
    int devices = 0;
    cudaError_t err = cudaGetDeviceCount(&devices);
    if (err != cudaSuccess || devices == 0) {
        printf("skip: no CUDA GPU here (%s)\n", err != cudaSuccess ? cudaGetErrorString(err) : "0 devices");
        return 77;
    }
    uint64_t seed = (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32);
    if (getenv("SEED")) seed = strtoull(getenv("SEED"), NULL, 10);
    rng_seed(&g_rng, seed);
    if (argc > 1 && strcmp(argv[1], "--bench") == 0) return bench(argc > 2 ? argv[2] : NULL);
    printf("seed %llu (SEED=... repeats a run)\n", (unsigned long long)seed);

    /* LAYERS_TEST_NO_CUBLAS=1 leaves out every check that runs a cuBLAS product, so that
     * compute-sanitizer's racecheck sees only this file's kernels (it reports hazards inside
     * cuBLAS's own Hopper GEMM kernels, whose barriers it does not follow). */
    int with_cublas = !(getenv("LAYERS_TEST_NO_CUBLAS") && atoi(getenv("LAYERS_TEST_NO_CUBLAS")));
    if (!with_cublas) printf("LAYERS_TEST_NO_CUBLAS: leaving out the matmul, full cross-entropy and LoRA checks\n");
    for (int t = 0; with_cublas && t < 8; t++) {
        test_matmul(37, 53, 71, t & 1, (t >> 1) & 1, t >> 2);
        test_matmul(128, 96, 64, t & 1, (t >> 1) & 1, t >> 2);
    }
    if (with_cublas) test_matmul(1, 5, 3, 0, 1, 0);
    test_f32_to_bf16(1, 0);
    test_f32_to_bf16(100003, 0);
    test_f32_to_bf16(1001, 1);

    test_embedding(37, 40, 11, 0);
    test_embedding(300, 1000, 50, 1);
    test_embedding(64, 4096, 100, 0);
    test_embedding(5, 37, 7, 1);

    test_rmsnorm(1, 8, 1e-5f, 0);
    test_rmsnorm(7, 40, 1e-6f, 0);
    test_rmsnorm(33, 1000, 1e-5f, 0);
    test_rmsnorm(64, 4096, 1e-5f, 0);
    test_rmsnorm(5, 37, 1e-5f, 0);
    test_rmsnorm(9, 64, 1e-5f, 1);
    test_rmsnorm(3, 13000, 1e-5f, 0); /* the weight gradient needs > 48 KiB of shared memory */
    test_rmsnorm(1100, 520, 1e-5f, 0); /* more rows than blocks: the grid walks the rows */

    for (int bwd = 0; bwd < 2; bwd++) {
        test_rope(37, 3, 16, 3 * 16, 0, 0, 10000.0f, 1.0f, 1.0f, bwd);
        test_rope(20, 2, 128, 5 * 128, 128, 7, 10000.0f, 2.0f, 1.0f, bwd); /* k inside a fused [q | k | v] row */
        test_rope(9, 4, 6, 4 * 6 + 2, 1, 3, 10000.0f, 1.0f, 1.0f, bwd);     /* d/2 odd, unaligned: the scalar path */
        test_rope(50, 32, 128, 32 * 128, 0, 100000, 10000.0f, 4.0f, 1.0f, bwd); /* far positions, interpolated */
        test_rope(11, 2, 64, 2 * 64, 0, 30000, 1000000.0f, 8.0f, 1.0f, bwd);
        test_rope(23, 3, 64, 3 * 64, 0, 5, 10000.0f, 2.0f, 1.1386294f, bwd); /* yarn's cos/sin scale (0.1 ln 4 + 1) */
    }

    size_t counts[] = {1, 7, 1000, 4099, 65539};
    for (size_t i = 0; i < sizeof counts / sizeof counts[0]; i++) {
        test_swiglu(counts[i], 0, 0);
        test_add(counts[i], 0, 0);
    }
    test_swiglu(4099, 1, 0);
    test_swiglu(65536, 0, 1);
    test_add(4099, 3, 0);
    test_add(4096, 0, 1);

    test_ce_logits(5, 1003, 1);
    test_ce_logits(17, 4096, 0);
    test_ce_logits(3, 1, 0);
    test_ce_logits(3, 32000, 1);  /* LLaMA-2's vocabulary: the row held in registers */
    test_ce_logits(2, 32768, 0);  /* the largest row the register path takes */
    test_ce_logits(2, 32772, 0);  /* one float4 more: the two-pass path */
    if (with_cublas) {
        test_cross_entropy(37, 64, 1003, 10, 0.2, 1);
        test_cross_entropy(300, 128, 4096, 64, 0.2, 1);
        test_cross_entropy(50, 40, 515, 0, 0.1, 1);
        test_cross_entropy(50, 40, 515, 16, 0.1, 0);
        test_cross_entropy(20, 16, 100, 7, 1.0, 1); /* every target ignored: loss 0, gradients 0 */
    }

    test_adamw(1, 0, 0.0f, 1);
    test_adamw(1003, 0, 0.1f, 1);
    test_adamw(4098, 0, 0.0f, 0);
    test_adamw(4099, 1, 0.1f, 1);
    test_sum_squares(1);
    test_sum_squares(1 << 20);

    if (with_cublas) {
        test_lora(45, 70, 53, 8, 2.0f);
        test_lora(200, 256, 384, 4, 4.0f);
        test_lora(1, 8, 8, 1, 1.0f);
    }

    gpu_layers_free();
    CUDA_CHECK(cudaDeviceSynchronize());
    printf("%d of %d layer-kernel checks passed (seed %llu)\n", g_checks - g_failures, g_checks, (unsigned long long)seed);
    return g_failures ? 1 : 0;
}
