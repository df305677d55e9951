/* test_model.c: 02_model.c against HF transformers (fixtures from tests/ref/make_model_fixtures.py).
 *
 * For each tiny random model (LLaMA-2-like MHA untied, SmolLM2-like GQA 3:1 tied, RoPE
 * linear factor 4 with 2 layers): logits within 1e-4 relative (max-norm), the loss within
 * 1e-5 relative, every parameter gradient with ||g - g_ref|| / ||g_ref|| <= 1e-4.
 * Also: --ctx stretching RoPE (linear factor 3) against HF with that rope_scaling; the
 * same model as bf16 shards against HF on the bf16-rounded weights (1e-4) and against
 * the fp32 logits (within bf16 rounding, 3e-2); evaluation buffers (layers sharing one
 * set) against training buffers (identical); attention with S2-Attn groups against an
 * explicit-mask attention in double, forward and backward, on fresh random inputs; the
 * LinearHook (a hook adding x D^T must act exactly like W + D, and grads_for_frozen_linears
 * = 0 must leave the projection gradients at zero while the others stay the same);
 * a second backward into the same Grads must double them (they accumulate).
 */
#define STAGE 0
#include "02_model.c"
#include "check.h"

#define FIXTURES "tests/fixtures/model"

/* ---- the fixture file: tests/fixture.h's format, magic "LLMF", named f32 / i32 arrays ---- */
#include "fixture.h"

/* the array `name` of dtype code (0 f32, 1 i32) with numel values (0: any), or the test dies */
static const FxTensor *ref_need(const Fixture *r, const char *name, int code, size_t numel) {
    const FxTensor *x = fx_get(r, name);
    if (!x) die("fixture has no record '%s'", name);
    if (x->code != code) die("fixture record '%s' has dtype %d, want %d", name, x->code, code);
    if (numel && x->numel != numel) die("fixture record '%s' has %zu values, want %zu", name, x->numel, numel);
    return x;
}
static const int32_t *ref_i32(const Fixture *r, const char *name, size_t numel) { return ref_need(r, name, 1, numel)->i; }
static const float *ref_f32(const Fixture *r, const char *name, size_t numel) { return ref_need(r, name, 0, numel)->f; }

/* ---- comparisons ---------------------------------------------------------------------- */
static double max_rel(const float *a, const float *ref, size_t n) { /* max|a - ref| / max|ref| */
    double md = 0, mr = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - ref[i]);
        if (d > md || d != d) md = d;
        if (fabs(ref[i]) > mr) mr = fabs(ref[i]);
    }
    return mr > 0 ? md / mr : md;
}
static double l2_rel(const float *a, const float *ref, size_t n) { /* ||a - ref|| / ||ref|| */
    double dd = 0, rr = 0;
    for (size_t i = 0; i < n; i++) { double d = (double)a[i] - ref[i]; dd += d * d; rr += (double)ref[i] * ref[i]; }
    return rr > 0 ? sqrt(dd / rr) : sqrt(dd);
}
static double l2_rel_d(const double *a, const double *ref, size_t n) {
    double dd = 0, rr = 0;
    for (size_t i = 0; i < n; i++) { double d = a[i] - ref[i]; dd += d * d; rr += ref[i] * ref[i]; }
    return rr > 0 ? sqrt(dd / rr) : sqrt(dd);
}

/* ---- 1. each fixture: logits, loss, every gradient ------------------------------------- */
static void check_fixture(const char *name) {
    char dir[512], path[600];
    snprintf(dir, sizeof dir, FIXTURES "/%s", name);
    Fixture ref;
    if (fx_load(&ref, path_join(path, sizeof path, dir, "ref.bin"), "LLMF") != 0) die("%s", last_error());
    Model m;
    if (model_try_load(&m, dir, 0) != 0) die("%s", last_error());
    const int32_t *meta = ref_i32(&ref, "meta", 3);
    size_t B = (size_t)meta[0], N = (size_t)meta[1], V = (size_t)m.cfg.vocab_size, T = B * N;
    const int32_t *tokens = ref_i32(&ref, "tokens", T);
    const int32_t *targets = ref_i32(&ref, "targets", T);
    const float *logits_ref = ref_f32(&ref, "logits", T * V);
    float loss_ref = *ref_f32(&ref, "loss", 1);

    Activations act;
    act_plan(&act, &m.cfg, B, N + 3, 1); /* planned larger than used, as the CLI's last window is */
    Grads g;
    grads_alloc(&g, &m.cfg);
    RunOptions opt = {0, 1, NULL};
    double t0 = now_seconds();
    float loss = model_forward(&m, &act, tokens, targets, B, N, &opt);
    double e_logits = max_rel(act.logits, logits_ref, T * V);
    double e_loss = fabs((double)loss - loss_ref) / fabs((double)loss_ref);
    EXPECT(e_logits <= 1e-4, "%s: logits differ from HF by %.3g (max-norm relative, limit 1e-4)", name, e_logits);
    EXPECT(e_loss <= 1e-5, "%s: loss %.7f, HF %.7f: relative %.3g (limit 1e-5)", name, loss, loss_ref, e_loss);

    /* evaluation buffers (layers share one set) give the same logits */
    Activations eval;
    act_plan(&eval, &m.cfg, B, N, 0);
    model_forward(&m, &eval, tokens, NULL, B, N, NULL);
    EXPECT(memcmp(eval.logits, act.logits, T * V * sizeof(float)) == 0, "%s: evaluation and training buffers give different logits", name);
    act_free(&eval);

    model_backward(&m, &act, &g, tokens, targets, B, N, &opt);
    size_t n = params_list(&g, &m.cfg, NULL);
    ParamRef *refs = (ParamRef *)xmalloc(n * sizeof(ParamRef));
    params_list(&g, &m.cfg, refs);
    double worst = 0;
    const char *worst_name = "";
    for (size_t i = 0; i < n; i++) {
        char key[160];
        snprintf(key, sizeof key, "grad.%s", refs[i].name);
        size_t numel = (size_t)refs[i].shape[0] * (size_t)refs[i].shape[1];
        const float *gref = ref_f32(&ref, key, numel);
        double e = l2_rel(refs[i].data, gref, numel);
        EXPECT(e <= 1e-4, "%s: gradient of %s differs from HF by %.3g (L2 relative, limit 1e-4)", name, refs[i].name, e);
        if (e > worst || e != e) { worst = e; worst_name = refs[i].name; }
    }
    /* gradients accumulate: a second forward + backward into the same Grads doubles them */
    model_forward(&m, &act, tokens, targets, B, N, &opt);
    model_backward(&m, &act, &g, tokens, targets, B, N, &opt);
    double worst2 = 0;
    for (size_t i = 0; i < n; i++) {
        char key[160];
        snprintf(key, sizeof key, "grad.%s", refs[i].name);
        size_t numel = (size_t)refs[i].shape[0] * (size_t)refs[i].shape[1];
        const float *gref = ref_f32(&ref, key, numel);
        float *twice = xmalloc(numel * sizeof(float));
        for (size_t k = 0; k < numel; k++) twice[k] = 2.0f * gref[k];
        double e = l2_rel(refs[i].data, twice, numel);
        if (e > worst2 || e != e) worst2 = e;
        free(twice);
    }
    EXPECT(worst2 <= 1e-4, "%s: a second backward did not add to the gradients (worst %.3g from 2 x HF)", name, worst2);
    EXPECT(n + 5 == ref.count - (fx_get(&ref, "logits_ctx") ? 1 : 0) - (fx_get(&ref, "logits_bf16") ? 1 : 0),
           "%s: the fixture has gradients for %zu tensors, the model %zu", name, ref.count - 5, n);
    printf("%s: B=%zu N=%zu logits %.2g loss %.2g (%.6f vs HF %.6f), worst gradient %.2g (%s), %zu tensors, %.2fs, act %.1f KiB\n",
           name, B, N, e_logits, e_loss, loss, loss_ref, worst, worst_name, n, now_seconds() - t0, act.bytes / 1024.0);

    /* RoPE stretched by a target context: against HF with rope_scaling linear, same weights */
    const float *lc = fx_get(&ref, "logits_ctx") ? ref_f32(&ref, "logits_ctx", T * V) : NULL;
    if (lc) {
        Model m2;
        if (model_try_load(&m2, dir, meta[2]) != 0) die("%s", last_error());
        EXPECT(m2.cfg.rope_factor == ceilf((float)meta[2] / (float)m2.cfg.max_pos), "%s: --ctx %d gave factor %g", name, meta[2], m2.cfg.rope_factor);
        Activations a2;
        act_plan(&a2, &m2.cfg, B, N, 0);
        model_forward(&m2, &a2, tokens, NULL, B, N, NULL);
        double e = max_rel(a2.logits, lc, T * V);
        double moved = max_rel(act.logits, lc, T * V);
        EXPECT(e <= 1e-4, "%s: logits with --ctx %d differ from HF by %.3g (limit 1e-4)", name, meta[2], e);
        EXPECT(moved > 1e-3, "%s: --ctx %d did not change the logits (%.3g)", name, meta[2], moved);
        printf("%s: --ctx %d (RoPE factor %g): logits %.2g\n", name, meta[2], m2.cfg.rope_factor, e);
        act_free(&a2);
        model_free(&m2);
    }
    /* the same model as bf16 shards */
    const float *lb = fx_get(&ref, "logits_bf16") ? ref_f32(&ref, "logits_bf16", T * V) : NULL;
    if (lb) {
        char dir16[600];
        snprintf(dir16, sizeof dir16, "%s_bf16", dir);
        Model m3;
        if (model_try_load(&m3, dir16, 0) != 0) die("%s", last_error());
        Activations a3;
        act_plan(&a3, &m3.cfg, B, N, 0);
        model_forward(&m3, &a3, tokens, NULL, B, N, NULL);
        double e = max_rel(a3.logits, lb, T * V);
        double e32 = max_rel(a3.logits, logits_ref, T * V);
        EXPECT(e <= 1e-4, "%s: bf16 shards: logits differ from HF's on the same bf16 weights by %.3g (limit 1e-4)", name, e);
        EXPECT(e32 <= 3e-2 && e32 > 0, "%s: bf16 shards: logits differ from the fp32 model's by %.3g (want bf16 rounding: (0, 3e-2])", name, e32);
        printf("%s_bf16 (sharded): logits %.2g vs HF on bf16 weights, %.2g vs the fp32 model\n", name, e, e32);
        act_free(&a3);
        model_free(&m3);
    }
    free(refs);
    params_free(&g);
    act_free(&act);
    model_free(&m);
    fx_free(&ref);
}

/* ---- 2. attention with S2 groups against an explicit mask, in double -------------------- */
/* The mask written from docs/DESIGN.md, independently of s2_first_key: heads h < H/2 group
 * positions by i / G; heads h >= H/2 by (i + G - S) / G with S = G / 2 (the first group
 * is [0, S)); G == 0 is plain causal attention. */
static int allowed(size_t i, size_t j, int h, int H, size_t G) {
    if (j > i) return 0;
    if (G == 0) return 1;
    if (h < H / 2) return i / G == j / G;
    size_t sh = G - G / 2;
    return (i + sh) / G == (j + sh) / G;
}
static void check_attention(size_t B, size_t N, int H, int Hk, int d, size_t G, uint64_t seed) {
    size_t T = B * N, qs = (size_t)H * d, ks = (size_t)Hk * d;
    Rng rng;
    rng_seed(&rng, seed);
    float *q = xmalloc(T * qs * 4), *k = xmalloc(T * ks * 4), *v = xmalloc(T * ks * 4), *dout = xmalloc(T * qs * 4);
    for (size_t i = 0; i < T * qs; i++) { q[i] = rng_normal(&rng); dout[i] = rng_normal(&rng); }
    for (size_t i = 0; i < T * ks; i++) { k[i] = rng_normal(&rng); v[i] = rng_normal(&rng); }
    float *out = xmalloc(T * qs * 4), *lse = xmalloc(B * H * N * 4), *scratch = xmalloc((size_t)max_threads() * N * 4);
    float *dq = xmalloc(T * qs * 4), *dk = xmalloc(T * ks * 4), *dv = xmalloc(T * ks * 4), *delta = xmalloc(B * H * N * 4);
    attention_forward(out, lse, q, k, v, B, N, H, Hk, d, G, scratch);
    attention_backward(dq, dk, dv, delta, dout, q, k, v, out, lse, B, N, H, Hk, d, G);
    /* reference: full N x N matrices in double */
    double *o_ref = xcalloc(T * qs, 8), *dq_ref = xcalloc(T * qs, 8), *dk_ref = xcalloc(T * ks, 8), *dv_ref = xcalloc(T * ks, 8);
    double *P = xmalloc(N * N * 8), *dP = xmalloc(N * N * 8);
    double scale = 1.0 / sqrt((double)d);
    for (size_t b = 0; b < B; b++)
        for (int h = 0; h < H; h++) {
            int kh = h / (H / Hk);
            for (size_t i = 0; i < N; i++) {
                double mx = -INFINITY, sum = 0;
                for (size_t j = 0; j < N; j++) {
                    double s = -INFINITY;
                    if (allowed(i, j, h, H, G)) {
                        s = 0;
                        for (int c = 0; c < d; c++) s += (double)q[(b * N + i) * qs + h * d + c] * k[(b * N + j) * ks + kh * d + c];
                        s *= scale;
                    }
                    P[i * N + j] = s;
                    if (s > mx) mx = s;
                }
                for (size_t j = 0; j < N; j++) { P[i * N + j] = allowed(i, j, h, H, G) ? exp(P[i * N + j] - mx) : 0; sum += P[i * N + j]; }
                for (size_t j = 0; j < N; j++) P[i * N + j] /= sum;
                for (size_t j = 0; j < N; j++)
                    for (int c = 0; c < d; c++) o_ref[(b * N + i) * qs + h * d + c] += P[i * N + j] * v[(b * N + j) * ks + kh * d + c];
            }
            for (size_t i = 0; i < N; i++) {
                double dl = 0;
                for (size_t j = 0; j < N; j++) {
                    double dp = 0;
                    for (int c = 0; c < d; c++) dp += (double)dout[(b * N + i) * qs + h * d + c] * v[(b * N + j) * ks + kh * d + c];
                    dP[i * N + j] = dp;
                    dl += P[i * N + j] * dp;
                }
                for (size_t j = 0; j < N; j++) {
                    double ds = P[i * N + j] * (dP[i * N + j] - dl) * scale;
                    for (int c = 0; c < d; c++) {
                        dq_ref[(b * N + i) * qs + h * d + c] += ds * k[(b * N + j) * ks + kh * d + c];
                        dk_ref[(b * N + j) * ks + kh * d + c] += ds * q[(b * N + i) * qs + h * d + c];
                        dv_ref[(b * N + j) * ks + kh * d + c] += P[i * N + j] * dout[(b * N + i) * qs + h * d + c];
                    }
                }
            }
        }
    double *tmp = xmalloc(T * qs * 8);
    double e[4];
    for (size_t i = 0; i < T * qs; i++) tmp[i] = out[i];
    e[0] = l2_rel_d(tmp, o_ref, T * qs);
    for (size_t i = 0; i < T * qs; i++) tmp[i] = dq[i];
    e[1] = l2_rel_d(tmp, dq_ref, T * qs);
    for (size_t i = 0; i < T * ks; i++) tmp[i] = dk[i];
    e[2] = l2_rel_d(tmp, dk_ref, T * ks);
    for (size_t i = 0; i < T * ks; i++) tmp[i] = dv[i];
    e[3] = l2_rel_d(tmp, dv_ref, T * ks);
    EXPECT(e[0] <= 1e-5 && e[1] <= 1e-5 && e[2] <= 1e-5 && e[3] <= 1e-5,
           "attention B=%zu N=%zu H=%d Hk=%d d=%d G=%zu: out %.3g dq %.3g dk %.3g dv %.3g vs explicit mask (limit 1e-5)", B, N, H, Hk, d, G, e[0], e[1], e[2], e[3]);
    printf("attention B=%zu N=%zu H=%d Hk=%d d=%d G=%zu vs explicit mask: out %.1e dq %.1e dk %.1e dv %.1e\n", B, N, H, Hk, d, G, e[0], e[1], e[2], e[3]);
    free(q); free(k); free(v); free(dout); free(out); free(lse); free(scratch); free(dq); free(dk); free(dv); free(delta);
    free(o_ref); free(dq_ref); free(dk_ref); free(dv_ref); free(P); free(dP); free(tmp);
}

/* ---- 3. the LinearHook: adding x D^T must be the same as running with W + D ------------- */
typedef struct {
    const Config *cfg;
    float *delta[N_PROJ]; /* [out, in] per projection (the same for every layer) */
} AddHook;
static void add_hook_forward(void *ctx, int layer, int which, const float *x, size_t T, float *y) {
    AddHook *a = (AddHook *)ctx;
    (void)layer;
    size_t in, out;
    proj_shape(a->cfg, which, &in, &out);
    float *tmp = xmalloc(T * out * sizeof(float));
    matmul_forward(tmp, x, a->delta[which], T, in, out);
    for (size_t i = 0; i < T * out; i++) y[i] += tmp[i];
    free(tmp);
}
static void add_hook_backward(void *ctx, int layer, int which, const float *x, const float *dy, size_t T, float *dx) {
    AddHook *a = (AddHook *)ctx;
    (void)layer; (void)x;
    size_t in, out;
    proj_shape(a->cfg, which, &in, &out);
    matmul_backward_dx(dx, dy, a->delta[which], T, in, out);
}
static void check_hook(uint64_t seed) {
    Config c = {0};
    c.dim = 48; c.ffn_dim = 70; c.n_layers = 2; c.n_heads = 4; c.n_kv_heads = 2; c.head_dim = 12; c.vocab_size = 50;
    c.rms_eps = 1e-5f; c.rope_theta = 10000.0f; c.rope_config_factor = 1; c.rope_factor = 2; c.max_pos = 64; c.tie_embeddings = 1;
    size_t B = 2, N = 18, T = B * N, G = 6;
    Model base, merged;
    model_init_random(&base, &c, seed, 0.15f);
    model_init_random(&merged, &c, seed, 0.15f);
    AddHook hook = {&c, {0}};
    Rng rng;
    rng_seed(&rng, seed + 1);
    for (int w = 0; w < N_PROJ; w++) {
        size_t in, out;
        proj_shape(&c, w, &in, &out);
        hook.delta[w] = xmalloc(in * out * sizeof(float));
        for (size_t i = 0; i < in * out; i++) hook.delta[w][i] = 0.05f * rng_normal(&rng);
        for (int l = 0; l < c.n_layers; l++)
            for (size_t i = 0; i < in * out; i++) proj_weight(&merged.w.layers[l], w)[i] += hook.delta[w][i];
    }
    int32_t tokens[36], targets[36];
    for (size_t t = 0; t < T; t++) { tokens[t] = (int32_t)rng_below(&rng, 50); targets[t] = rng_below(&rng, 5) ? (int32_t)rng_below(&rng, 50) : IGNORE_INDEX; }
    LinearHook lh = {&hook, add_hook_forward, add_hook_backward};
    RunOptions with_hook = {G, 0, &lh}, plain = {G, 1, NULL};
    Activations a1, a2;
    act_plan(&a1, &c, B, N, 1);
    act_plan(&a2, &c, B, N, 1);
    Grads g1, g2;
    grads_alloc(&g1, &c);
    grads_alloc(&g2, &c);
    float l1 = model_forward(&base, &a1, tokens, targets, B, N, &with_hook);
    float l2 = model_forward(&merged, &a2, tokens, targets, B, N, &plain);
    double e_logits = max_rel(a1.logits, a2.logits, T * c.vocab_size);
    model_backward(&base, &a1, &g1, tokens, targets, B, N, &with_hook);
    model_backward(&merged, &a2, &g2, tokens, targets, B, N, &plain);
    double e_dx = l2_rel(a1.d_resid, a2.d_resid, T * c.dim);
    double e_embed = l2_rel(g1.embed, g2.embed, (size_t)c.vocab_size * c.dim);
    double e_norm = l2_rel(g1.layers[0].attn_norm, g2.layers[0].attn_norm, (size_t)c.dim);
    double frozen = 0, merged_norm = 0;
    for (int l = 0; l < c.n_layers; l++)
        for (int w = 0; w < N_PROJ; w++) {
            size_t in, out;
            proj_shape(&c, w, &in, &out);
            for (size_t i = 0; i < in * out; i++) {
                frozen += fabs(proj_weight(&g1.layers[l], w)[i]);
                merged_norm += fabs(proj_weight(&g2.layers[l], w)[i]);
            }
        }
    EXPECT(e_logits <= 1e-5 && fabsf(l1 - l2) <= 1e-5f * fabsf(l2), "hook: logits %.3g, loss %.7f vs %.7f", e_logits, l1, l2);
    EXPECT(e_dx <= 1e-4 && e_embed <= 1e-4 && e_norm <= 1e-4, "hook: input gradient %.3g, embed %.3g, norm %.3g (limit 1e-4)", e_dx, e_embed, e_norm);
    EXPECT(frozen == 0 && merged_norm > 0, "hook: grads_for_frozen_linears = 0 left %.3g in the projection gradients", frozen);
    printf("hook (S2 G=%zu, tied, GQA 2:1): logits %.1e, d(input) %.1e, embed %.1e, norm %.1e vs the merged model; frozen dW %.1g\n",
           G, e_logits, e_dx, e_embed, e_norm, frozen);
    for (int w = 0; w < N_PROJ; w++) free(hook.delta[w]);
    params_free(&g1); params_free(&g2); act_free(&a1); act_free(&a2); model_free(&base); model_free(&merged);
}

int main(void) {
    if (!file_exists(FIXTURES "/llama2_like/ref.bin")) {
        printf("skip: the fixtures in " FIXTURES " are missing (run from the repository root)\n");
        return 77;
    }
    /* fresh random inputs each run for the attention and hook checks; TEST_SEED repeats a run */
    uint64_t seed = getenv("TEST_SEED") ? strtoull(getenv("TEST_SEED"), NULL, 10) : (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 20);
    printf("seed %llu (TEST_SEED=%llu repeats this run)\n", (unsigned long long)seed, (unsigned long long)seed);
    check_fixture("llama2_like");
    check_fixture("smollm2_like");
    check_fixture("rope_linear4");
    check_fixture("rope_dynamic"); /* the RoPE types and architectures of tests/ref/make_rope_arch_fixtures.py */
    check_fixture("rope_yarn");
    check_fixture("rope_llama3");
    check_fixture("mistral_like");
    check_fixture("qwen2_tied");
    check_fixture("qwen2_yarn");
    check_attention(2, 24, 4, 2, 20, 8, seed + 1);  /* S2: 3 groups, shift 4 */
    check_attention(1, 30, 6, 3, 16, 10, seed + 2); /* S2: 3 of 6 heads shifted by 5 */
    check_attention(2, 21, 3, 1, 8, 7, seed + 3);   /* S2: odd H (1 plain, 2 shifted), odd G, shift 3 */
    check_attention(1, 37, 2, 2, 24, 0, seed + 4);  /* full causal */
    check_hook(seed + 5);
    printf("%s: %d checks, %d failed (seed %llu)\n", g_failures ? "FAIL" : "ok", g_checks, g_failures, (unsigned long long)seed);
    return g_failures ? 1 : 0;
}
