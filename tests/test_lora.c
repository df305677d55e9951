/* tests/test_lora.c: checks 03_lora.c against peft + transformers and against definitions.
 *
 *  1. the LoRA linear on plain arrays: forward against a naive double-precision sum,
 *     backward against central finite differences (odd sizes, fresh random inputs), and the
 *     dropout path through the hook (mask kept from forward to backward);
 *  2. one (and three) AdamW steps against torch.optim.AdamW (1e-6 relative), the learning
 *     rate schedule against transformers' get_constant_schedule_with_warmup;
 *  3. on two tiny models (GQA untied; 3 heads MHA tied, all 7 targets), with an adapter saved
 *     by peft: logits (1e-4 relative max-norm), loss (1e-5 relative) and the gradient of every
 *     LoRA A/B, embed and norm weight (||g - g_ref|| / ||g_ref|| <= 1e-4), with S2-Attn off and
 *     on (the reference builds the explicit per-head mask), N = 20 and 12;
 *  4. the adapter we save: byte-identical to the committed one that peft loaded, and our
 *     logits equal the logits peft computed with it;
 *  5. merge: running the merged model equals running with the adapter (1e-5), unmerge restores;
 *  6. S2-Attn: ratio 1 is full attention; a query sees exactly the keys of its segment
 *     (perturbing one value row, the attention outputs that move are exactly those allowed by
 *     docs/DESIGN.md's rule written out here, independent of s2_first_key);
 *  7. bad adapters (rank, targets, shapes, layers, malformed files) end with a clear error
 *     and leave the model unchanged; a few training steps lower the loss;
 *  8. ./03_lora: three S2-Attn training steps print their losses; the adapter it saves on the
 *     base equals the merged folder it writes (1e-5, RoPE factor kept); user errors exit non-zero.
 *
 *  test_lora --write-ours-adapter CFG DIR writes the deterministic adapter of check 4
 *  (tests/ref/make_lora_fixtures.py --ours runs it, then records peft's logits).
 */
#define STAGE 0
#include "../03_lora.c"
#include <sys/wait.h>

#include "check.h"
#include "fixture.h"

#define FIXTURES "tests/fixtures/lora"

/* max|a - b| / max|b| */
static double rel_maxnorm(const float *a, const float *b, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - (double)b[i]);
        if (d > num || d != d) num = d != d ? INFINITY : d;
        if (fabs((double)b[i]) > den) den = fabs((double)b[i]);
    }
    return den > 0 ? num / den : num;
}
/* ||a - b|| / ||b|| */
static double rel_l2(const float *a, const float *b, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) { double d = (double)a[i] - (double)b[i]; num += d * d; den += (double)b[i] * b[i]; }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

/* ---- 1. the LoRA linear on plain arrays ---------------------------------------------------- */

static void fill_normal(float *x, size_t n, Rng *r, float s) { for (size_t i = 0; i < n; i++) x[i] = s * rng_normal(r); }

/* L = sum(c * (x W^T + s (x A^T) B^T)) evaluated in double (W = 0: only the LoRA path). */
static double lora_objective(const float *x, const float *A, const float *B, const float *c, size_t T, size_t in, size_t out, size_t R, float s) {
    double L = 0;
    for (size_t t = 0; t < T; t++)
        for (size_t o = 0; o < out; o++) {
            double y = 0;
            for (size_t r = 0; r < R; r++) {
                double xa = 0;
                for (size_t i = 0; i < in; i++) xa += (double)x[t * in + i] * A[r * in + i];
                y += (double)B[o * R + r] * xa;
            }
            L += (double)c[t * out + o] * s * y;
        }
    return L;
}

static void test_lora_linear(void) {
    Rng rng;
    rng_seed(&rng, (uint64_t)time(NULL) ^ 0x1234);
    size_t T = 7, in = 13, out = 11, R = 3;
    float s = 16.0f / 3.0f;
    float *x = xmalloc(T * in * 4), *A = xmalloc(R * in * 4), *B = xmalloc(out * R * 4), *c = xmalloc(T * out * 4);
    float *y = xcalloc(T * out, 4), *dA = xcalloc(R * in, 4), *dB = xcalloc(out * R, 4), *dx = xcalloc(T * in, 4);
    fill_normal(x, T * in, &rng, 1); fill_normal(A, R * in, &rng, 0.5f); fill_normal(B, out * R, &rng, 0.5f); fill_normal(c, T * out, &rng, 1);
    /* forward against a naive double sum, on top of a non-zero y (the hook adds) */
    float *y0 = xmalloc(T * out * 4);
    fill_normal(y0, T * out, &rng, 1);
    memcpy(y, y0, T * out * 4);
    lora_linear_forward(x, T, in, out, R, A, B, s, y);
    double worst = 0;
    for (size_t t = 0; t < T; t++)
        for (size_t o = 0; o < out; o++) {
            double ref = y0[t * out + o];
            for (size_t r = 0; r < R; r++) {
                double xa = 0;
                for (size_t i = 0; i < in; i++) xa += (double)x[t * in + i] * A[r * in + i];
                ref += s * (double)B[o * R + r] * xa;
            }
            double e = fabs(ref - y[t * out + o]) / (1 + fabs(ref));
            if (e > worst) worst = e;
        }
    EXPECT(worst < 1e-5, "LoRA forward differs from the naive sum by %g (tolerance 1e-5)", worst);
    /* backward: dy = c gives dL/dA, dL/dB, dL/dx of L = sum(c * y); check by central differences */
    lora_linear_backward(x, c, T, in, out, R, A, B, s, dA, dB, dx);
    struct { float *p, *g; size_t n; const char *name; } sets[3] = {{A, dA, R * in, "A"}, {B, dB, out * R, "B"}, {x, dx, T * in, "x"}};
    for (int k = 0; k < 3; k++) {
        double num = 0, den = 0;
        for (size_t i = 0; i < sets[k].n; i++) {
            float keep = sets[k].p[i], h = 1e-2f;
            sets[k].p[i] = keep + h;
            double lp = lora_objective(x, A, B, c, T, in, out, R, s);
            sets[k].p[i] = keep - h;
            double lm = lora_objective(x, A, B, c, T, in, out, R, s);
            sets[k].p[i] = keep;
            double fd = (lp - lm) / (2.0 * ((double)(keep + h) - (double)keep));
            num += (fd - sets[k].g[i]) * (fd - sets[k].g[i]);
            den += fd * fd;
        }
        double rel = sqrt(num / den);
        EXPECT(rel < 1e-4, "LoRA backward d%s vs finite differences: relative error %g (tolerance 1e-4)", sets[k].name, rel);
    }
    free(y0);
    free(x); free(A); free(B); free(c); free(y); free(dA); free(dB); free(dx);
}

/* Dropout through the hook: the backward uses the forward's mask (checked against the
 * definition: the LoRA path of x * mask), and about p of the inputs are dropped. */
static void test_lora_dropout(void) {
    Config c = {0};
    c.dim = 20; c.ffn_dim = 28; c.n_layers = 1; c.n_heads = 2; c.n_kv_heads = 1; c.head_dim = 10; c.vocab_size = 10;
    LoraConfig lc = lora_default_config();
    lc.rank = 4; lc.dropout = 0.3f; lc.seed = (uint64_t)time(NULL);
    LoraAdapter ad;
    EXPECT(lora_init(&ad, &c, &lc) == 0, "lora_init: %s", last_error());
    LoraPair *p = lora_pair(&ad, 0, PROJ_Q);
    Rng rng;
    rng_seed(&rng, 99);
    fill_normal(p->B, p->out * 4, &rng, 0.5f);
    size_t T = 9;
    float *x = xmalloc(T * p->in * 4), *dy = xmalloc(T * p->out * 4), *y = xcalloc(T * p->out, 4), *dx = xcalloc(T * p->in, 4);
    fill_normal(x, T * p->in, &rng, 1); fill_normal(dy, T * p->out, &rng, 1);
    lora_hook_forward(&ad, 0, PROJ_Q, x, T, y);
    size_t dropped = 0;
    float *xm = xmalloc(T * p->in * 4), *y_ref = xcalloc(T * p->out, 4), *dx_ref = xcalloc(T * p->in, 4);
    float *dA_ref = xcalloc(4 * p->in, 4), *dB_ref = xcalloc(p->out * 4, 4);
    for (size_t i = 0; i < T * p->in; i++) { xm[i] = x[i] * p->drop_mask[i]; dropped += p->drop_mask[i] == 0.0f; }
    double frac = (double)dropped / (double)(T * p->in);
    EXPECT(frac > 0.15 && frac < 0.45, "dropout p=0.3 dropped %.3f of the inputs", frac);
    lora_linear_forward(xm, T, p->in, p->out, 4, p->A, p->B, ad.scale, y_ref);
    EXPECT(rel_maxnorm(y, y_ref, T * p->out) < 1e-6, "dropout forward is not the LoRA path of x * mask");
    lora_hook_backward(&ad, 0, PROJ_Q, x, dy, T, dx);
    float *dxm = xcalloc(T * p->in, 4);
    lora_linear_backward(xm, dy, T, p->in, p->out, 4, p->A, p->B, ad.scale, dA_ref, dB_ref, dxm);
    for (size_t i = 0; i < T * p->in; i++) dx_ref[i] = dxm[i] * p->drop_mask[i];
    EXPECT(rel_maxnorm(dx, dx_ref, T * p->in) < 1e-6 && rel_maxnorm(p->dA, dA_ref, 4 * p->in) < 1e-6 && rel_maxnorm(p->dB, dB_ref, p->out * 4) < 1e-6,
           "dropout backward does not use the forward's mask");
    free(dxm); free(xm); free(y_ref); free(dx_ref); free(dA_ref); free(dB_ref);
    free(x); free(dy); free(y); free(dx);
    lora_free(&ad);
}

/* ---- 2. AdamW and the schedule against torch / transformers -------------------------------- */

static void test_adamw(void) {
    Fixture fx;
    if (fx_load(&fx, FIXTURES "/adamw.bin", "LRFX") != 0) { EXPECT(0, "%s", last_error()); return; }
    const FxTensor *p0 = fx_get(&fx, "p0");
    size_t n = p0->numel;
    float *p = xmalloc(n * 4), *g = xmalloc(n * 4);
    memcpy(p, p0->f, n * 4);
    AdamW opt = {0};
    AdamWConfig oc = {1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 0, LR_CONSTANT, 0};
    opt.cfg = oc;
    adamw_add(&opt, "p", p, g, n);
    for (int step = 0; step < 3; step++) {
        char name[16];
        snprintf(name, sizeof name, "grad%d", step);
        memcpy(g, fx_get(&fx, name)->f, n * 4);
        adamw_step(&opt, 1e-3f);
        snprintf(name, sizeof name, "p%d", step + 1);
        const FxTensor *want = fx_get(&fx, name);
        double worst = 0;
        for (size_t i = 0; i < n; i++) {
            double e = fabs((double)p[i] - want->f[i]) / fmax(fabs((double)want->f[i]), 1e-30);
            if (e > worst) worst = e;
        }
        EXPECT(worst <= 1e-6, "AdamW step %d differs from torch.optim.AdamW by %g relative (tolerance 1e-6)", step + 1, worst);
    }
    adamw_free(&opt);
    /* a no_decay tensor (a norm) under weight decay moves exactly as one without decay */
    float *q1 = xmalloc(n * 4), *q2 = xmalloc(n * 4);
    memcpy(q1, p0->f, n * 4);
    memcpy(q2, p0->f, n * 4);
    memcpy(g, fx_get(&fx, "grad0")->f, n * 4);
    AdamW o1 = {0}, o2 = {0};
    o1.cfg = oc;
    o2.cfg = oc;
    o2.cfg.weight_decay = 0.0f;
    adamw_add(&o1, "norm", q1, g, n);
    o1.params[0].no_decay = 1;
    adamw_add(&o2, "plain", q2, g, n);
    adamw_step(&o1, 1e-3f);
    adamw_step(&o2, 1e-3f);
    EXPECT(memcmp(q1, q2, n * 4) == 0, "a no_decay tensor was decayed");
    adamw_free(&o1); adamw_free(&o2);
    free(q1); free(q2);
    free(p); free(g);
    /* transformers' schedules (lr 2e-5, warmup 20): constant after it; cosine and linear decay
     * over 100 steps, 20 more past the end */
    const struct { const char *name; LrSchedule kind; size_t n; } sched[3] = {
        {"warmup20_lr2e-5", LR_CONSTANT, 30}, {"cosine_warmup20_total100_lr2e-5", LR_COSINE, 120}, {"linear_warmup20_total100_lr2e-5", LR_LINEAR, 120}};
    for (int s = 0; s < 3; s++) {
        const FxTensor *lrs = fx_get(&fx, sched[s].name);
        CHECK(lrs, "adamw.bin has no %s (tests/ref/make_lora_fixtures.py --adamw writes it)", sched[s].name);
        AdamWConfig sc = adamw_default_config();
        sc.schedule = sched[s].kind;
        sc.total_steps = 100;
        double worst = 0;
        for (size_t k = 0; k < lrs->numel; k++) worst = fmax(worst, fabs((double)adamw_lr_at(&sc, (long)k) - lrs->f[k]) / sc.lr);
        EXPECT(lrs->numel == sched[s].n && worst < 1e-6, "the %s schedule differs from transformers' by %g relative (%zu values)",
               LR_SCHEDULE_NAMES[sched[s].kind], worst, lrs->numel);
    }
    fx_free(&fx);
}

/* ---- 3. against peft on the tiny models ---------------------------------------------------- */

typedef struct { const char *name; long target_ctx; } TinyCfg;
static const TinyCfg TINY[2] = {{"gqa_untied", 32}, {"mha3_tied", 64}};

static int load_tiny(Model *m, const TinyCfg *tc) {
    char dir[512];
    snprintf(dir, sizeof dir, FIXTURES "/%s", tc->name);
    if (model_try_load(m, dir, tc->target_ctx) != 0) { EXPECT(0, "%s", last_error()); return -1; }
    return 0;
}

/* The gradient our run holds for an optimizer tensor name. */
static void check_against_peft(const TinyCfg *tc) {
    char path[512];
    Fixture fx;
    snprintf(path, sizeof path, FIXTURES "/%s/ref.bin", tc->name);
    if (fx_load(&fx, path, "LRFX") != 0) { EXPECT(0, "%s", last_error()); return; }
    Model m;
    if (load_tiny(&m, tc) != 0) { fx_free(&fx); return; }
    LoraAdapter ad;
    snprintf(path, sizeof path, FIXTURES "/%s/adapter_peft", tc->name);
    if (lora_load_adapter(&ad, &m, path) != 0) { EXPECT(0, "loading peft's adapter: %s", last_error()); model_free(&m); fx_free(&fx); return; }
    EXPECT(ad.cfg.train_embed && ad.cfg.train_norms, "%s: the adapter's embed and norms were not recognised", tc->name);
    const FxTensor *tok = fx_get(&fx, "tokens"), *tgt = fx_get(&fx, "targets");
    size_t B = tok->dims[0], N = tok->dims[1], V = (size_t)m.cfg.vocab_size;
    for (int s2 = 0; s2 < 2; s2++) {
        const char *tag = s2 ? "s2" : "full";
        size_t G = 0;
        if (s2) EXPECT(s2_group_size(N, 0.25, &G) == 0 && G == N / 4, "S2 group of N=%zu", N);
        LoraTrainer tr;
        AdamWConfig oc = adamw_default_config();
        lora_trainer_init(&tr, &m, &ad, &oc, B, N, G);
        grads_zero(&tr.grads);
        lora_zero_grads(&ad);
        float loss = model_forward(&m, &tr.act, tok->i, tgt->i, B, N, &tr.run);
        char name[256];
        snprintf(name, sizeof name, "%s.logits", tag);
        double e = rel_maxnorm(tr.act.logits, fx_get(&fx, name)->f, B * N * V);
        EXPECT(e <= 1e-4, "%s %s: logits differ from peft's by %g relative max-norm (tolerance 1e-4)", tc->name, tag, e);
        snprintf(name, sizeof name, "%s.loss", tag);
        double want = fx_get(&fx, name)->f[0];
        EXPECT(fabs(loss - want) / fabs(want) <= 1e-5, "%s %s: loss %.8f vs peft's %.8f (tolerance 1e-5 relative)", tc->name, tag, loss, want);
        model_backward(&m, &tr.act, &tr.grads, tok->i, tgt->i, B, N, &tr.run);
        size_t n_grads = 0;
        double worst = 0;
        for (size_t k = 0; k < tr.opt.count; k++) {
            const TrainParam *p = &tr.opt.params[k];
            snprintf(name, sizeof name, "%s.grad.%s", tag, p->name);
            const FxTensor *ref = fx_get(&fx, name);
            if (!ref) { EXPECT(0, "%s: no reference gradient for %s", tc->name, p->name); continue; }
            EXPECT(ref->numel == p->numel, "%s: %s has %zu elements, reference %zu", tc->name, p->name, p->numel, ref->numel);
            if (ref->numel != p->numel) continue;
            double r = rel_l2(p->grad, ref->f, p->numel);
            EXPECT(r <= 1e-4, "%s %s: gradient of %s differs by %g (tolerance 1e-4)", tc->name, tag, p->name, r);
            if (r > worst) worst = r;
            n_grads++;
        }
        size_t n_ref = 0;
        for (size_t k = 0; k < fx.count; k++) n_ref += strncmp(fx.t[k].name, tag, strlen(tag)) == 0 && strstr(fx.t[k].name, ".grad.") != NULL;
        EXPECT(n_grads == n_ref, "%s %s: checked %zu gradients, peft has %zu", tc->name, tag, n_grads, n_ref);
        printf("%s %s: logits %.2g, loss %.6f, %zu gradients (worst %.2g) match peft\n", tc->name, tag, e, loss, n_grads, worst);
        lora_trainer_free(&tr);
    }
    lora_free(&ad);
    model_free(&m);
    fx_free(&fx);
}

/* ---- 4. the adapter we save, as peft loaded it --------------------------------------------- */

/* A deterministic adapter (mixed attention/MLP targets, odd rank choices), every tensor
 * non-trivial: B random, embed perturbed, norms random. Writes into m (embed, norms). */
static int make_ours_adapter(const TinyCfg *tc, Model *m, LoraAdapter *ad) {
    LoraConfig lc = lora_default_config();
    int tied = m->cfg.tie_embeddings;
    lc.rank = tied ? 8 : 4;
    lc.alpha = tied ? 16.0f : 8.0f;
    lc.targets = tied ? LORA_DEFAULT_TARGETS : ((1u << PROJ_Q) | (1u << PROJ_V) | (1u << PROJ_O) | (1u << PROJ_DOWN));
    lc.seed = 4242;
    (void)tc;
    if (lora_init(ad, &m->cfg, &lc) != 0) return -1;
    Rng r;
    rng_seed(&r, 777);
    for (int l = 0; l < ad->n_layers; l++)
        for (int w = 0; w < LORA_NUM_TARGETS; w++) {
            LoraPair *p = lora_pair(ad, l, w);
            if (p->A) fill_normal(p->B, p->out * (size_t)lc.rank, &r, 0.2f);
        }
    size_t D = (size_t)m->cfg.dim;
    for (size_t i = 0; i < (size_t)m->cfg.vocab_size * D; i++) m->w.embed[i] += 0.05f * rng_normal(&r);
    for (int l = 0; l < m->cfg.n_layers; l++)
        for (size_t i = 0; i < D; i++) {
            m->w.layers[l].attn_norm[i] = 1.0f + 0.2f * rng_normal(&r);
            m->w.layers[l].mlp_norm[i] = 1.0f + 0.2f * rng_normal(&r);
        }
    for (size_t i = 0; i < D; i++) m->w.final_norm[i] = 1.0f + 0.2f * rng_normal(&r);
    return 0;
}

static int write_ours_adapter(const char *cfg_name, const char *dir) {
    for (int k = 0; k < 2; k++) {
        if (strcmp(TINY[k].name, cfg_name) != 0) continue;
        Model m;
        char base[512];
        snprintf(base, sizeof base, FIXTURES "/%s", cfg_name);
        model_load(&m, base, TINY[k].target_ctx);
        LoraAdapter ad;
        if (make_ours_adapter(&TINY[k], &m, &ad) != 0 || lora_save_adapter(&ad, &m, dir, base) != 0) die("%s", last_error());
        lora_free(&ad);
        model_free(&m);
        return 0;
    }
    die("unknown fixture config %s", cfg_name);
}

static void check_ours_adapter(const TinyCfg *tc) {
    char path[512], dir[512], tmp[512];
    Fixture fx;
    snprintf(path, sizeof path, FIXTURES "/%s/ours_ref.bin", tc->name);
    if (fx_load(&fx, path, "LRFX") != 0) { EXPECT(0, "%s (run tests/ref/make_lora_fixtures.py --ours)", last_error()); return; }
    snprintf(dir, sizeof dir, FIXTURES "/%s/adapter_ours", tc->name);
    /* (a) saving again gives the adapter peft loaded: the same config text, the same tensors */
    Model m, m_loaded;
    if (load_tiny(&m, tc) != 0 || load_tiny(&m_loaded, tc) != 0) { fx_free(&fx); return; }
    LoraAdapter ad, ad_loaded;
    snprintf(tmp, sizeof tmp, "build/tests/lora_ours_%s_%d", tc->name, (int)getpid());
    char base[512];
    snprintf(base, sizeof base, FIXTURES "/%s", tc->name);
    EXPECT(make_ours_adapter(tc, &m, &ad) == 0 && lora_save_adapter(&ad, &m, tmp, base) == 0, "saving: %s", last_error());
    char a_path[600], b_path[600];
    size_t la = 0, lb = 0;
    char *a = read_file(path_join(a_path, sizeof a_path, tmp, "adapter_config.json"), &la);
    char *b = read_file(path_join(b_path, sizeof b_path, dir, "adapter_config.json"), &lb);
    EXPECT(a && b && la == lb && memcmp(a, b, la) == 0, "%s: adapter_config.json differs from the one peft loaded", tc->name);
    free(a); free(b);
    if (lora_load_adapter(&ad_loaded, &m_loaded, dir) != 0) { EXPECT(0, "loading our committed adapter: %s", last_error()); goto out; }
    double e = 0;
    for (int l = 0; l < ad.n_layers; l++)
        for (int w = 0; w < LORA_NUM_TARGETS; w++) {
            LoraPair *p = lora_pair(&ad, l, w), *q = lora_pair(&ad_loaded, l, w);
            EXPECT(!p->A == !q->A, "%s: targets differ after a round trip", tc->name);
            if (!p->A || !q->A) continue;
            e = fmax(e, rel_maxnorm(q->A, p->A, p->in * (size_t)ad.cfg.rank));
            e = fmax(e, rel_maxnorm(q->B, p->B, p->out * (size_t)ad.cfg.rank));
        }
    e = fmax(e, rel_maxnorm(m_loaded.w.memory, m.w.memory, m.w.count));
    EXPECT(e <= 1e-6, "%s: the committed adapter differs from the one we make now by %g", tc->name, e);
    /* (b) our logits with it equal peft's */
    const FxTensor *tok = fx_get(&fx, "tokens");
    size_t B = tok->dims[0], N = tok->dims[1];
    Activations act;
    act_plan(&act, &m_loaded.cfg, B, N, 0);
    RunOptions ro = {0, 0, &ad_loaded.hook};
    ad_loaded.training = 0;
    model_forward(&m_loaded, &act, tok->i, NULL, B, N, &ro);
    e = rel_maxnorm(act.logits, fx_get(&fx, "logits")->f, B * N * (size_t)m.cfg.vocab_size);
    EXPECT(e <= 1e-4, "%s: our logits with our adapter differ from peft's by %g (tolerance 1e-4)", tc->name, e);
    printf("%s: the adapter we save loads in peft; logits agree to %.2g\n", tc->name, e);
    act_free(&act);
    lora_free(&ad_loaded);
out:
    lora_free(&ad);
    model_free(&m);
    model_free(&m_loaded);
    fx_free(&fx);
    char f1[600];
    remove(path_join(f1, sizeof f1, tmp, "adapter_config.json"));
    remove(path_join(f1, sizeof f1, tmp, "adapter_model.safetensors"));
    rmdir(tmp);
}

/* ---- 5. merge ------------------------------------------------------------------------------ */

static void check_merge(const TinyCfg *tc) {
    Model m;
    if (load_tiny(&m, tc) != 0) return;
    LoraAdapter ad;
    char dir[512];
    snprintf(dir, sizeof dir, FIXTURES "/%s/adapter_peft", tc->name);
    if (lora_load_adapter(&ad, &m, dir) != 0) { EXPECT(0, "%s", last_error()); model_free(&m); return; }
    ad.training = 0;
    size_t B = 2, N = 16, V = (size_t)m.cfg.vocab_size;
    int32_t *tok = xmalloc(B * N * 4);
    Rng r;
    rng_seed(&r, (uint64_t)time(NULL));
    for (size_t t = 0; t < B * N; t++) tok[t] = (int32_t)rng_below(&r, V);
    Activations act;
    act_plan(&act, &m.cfg, B, N, 0);
    RunOptions with = {0, 0, &ad.hook};
    model_forward(&m, &act, tok, NULL, B, N, &with);
    float *ref = xmalloc(B * N * V * 4), *w0 = xmalloc(m.w.count * 4);
    memcpy(ref, act.logits, B * N * V * 4);
    memcpy(w0, m.w.memory, m.w.count * 4);
    lora_merge(&ad, &m);
    model_forward(&m, &act, tok, NULL, B, N, NULL);
    double e = rel_maxnorm(act.logits, ref, B * N * V);
    EXPECT(e <= 1e-5, "%s: merged logits differ from the adapter's by %g (tolerance 1e-5)", tc->name, e);
    lora_unmerge(&ad, &m);
    double ew = rel_maxnorm(m.w.memory, w0, m.w.count);
    EXPECT(ew <= 1e-6, "%s: unmerge leaves the weights %g away from the original", tc->name, ew);
    printf("%s: merge agrees to %.2g, unmerge restores to %.2g\n", tc->name, e, ew);
    free(ref); free(w0); free(tok);
    act_free(&act);
    lora_free(&ad);
    model_free(&m);
}

/* ---- 6. S2-Attn visibility --------------------------------------------------------------- */

/* docs/DESIGN.md's rule written out, independently of s2_first_key: the segment id of token i. */
static size_t design_segment(size_t i, int h, int H, size_t G) {
    if (h < H / 2) return i / G;
    size_t S = G / 2;
    return i < S ? 0 : 1 + (i - S) / G;
}

/* A hook that bumps one token's k or v row in layer 0 and copies layer 0's attention
 * output (the input x of its o projection). */
typedef struct {
    long perturb;        /* token whose row gets the bump, -1: none */
    int which;           /* PROJ_K or PROJ_V */
    size_t kv_width;     /* Hk*d: the width of a k/v row */
    size_t att_width;    /* H*d */
    float *att;          /* [T, H*d] where layer 0's attention output goes */
} ProbeHook;
static void probe_forward(void *ctx, int layer, int which, const float *x, size_t T, float *y) {
    ProbeHook *p = (ProbeHook *)ctx;
    if (layer != 0) return;
    if (which == p->which && p->perturb >= 0)
        for (size_t e = 0; e < p->kv_width; e++) y[(size_t)p->perturb * p->kv_width + e] += 0.5f + 0.01f * (float)e;
    if (which == PROJ_O) memcpy(p->att, x, T * p->att_width * sizeof(float));
}

static void check_s2_visibility(const TinyCfg *tc) {
    Model m;
    if (load_tiny(&m, tc) != 0) return;
    const Config *c = &m.cfg;
    size_t N = tc->target_ctx == 32 ? 20 : 12, Hd = (size_t)c->n_heads * c->head_dim, kvw = (size_t)c->n_kv_heads * c->head_dim;
    int H = c->n_heads, d = c->head_dim;
    int32_t *tok = xmalloc(N * 4);
    Rng r;
    rng_seed(&r, (uint64_t)time(NULL) + 5);
    /* distinct tokens: layer 0's v rows then all differ, so moving a key's score always moves the output */
    for (size_t t = 0; t < N; t++) {
        int fresh;
        do {
            tok[t] = (int32_t)rng_below(&r, (uint64_t)c->vocab_size);
            fresh = 1;
            for (size_t u = 0; u < t; u++) fresh &= tok[u] != tok[t];
        } while (!fresh);
    }
    Activations act;
    act_plan(&act, c, 1, N, 0);
    float *base = xmalloc(N * Hd * 4), *bumped = xmalloc(N * Hd * 4);
    size_t groups[2] = {N / 4, N}; /* the default ratio, and one group of N (shifted heads still split at N/2) */
    for (int gi = 0; gi < 2; gi++) {
        size_t G = groups[gi];
        RunOptions ro = {G, 0, NULL};
        /* layer 0's attention output = the input x of its o projection: read it with a hook */
        for (int which = PROJ_K; which <= PROJ_V; which++) {
            size_t mismatches = 0;
            for (long j = -1; j < (long)N; j++) {
                ProbeHook probe = {j, which, kvw, Hd, j < 0 ? base : bumped};
                LinearHook hk = {&probe, probe_forward, NULL};
                ro.hook = &hk;
                model_forward(&m, &act, tok, NULL, 1, N, &ro);
                if (j < 0) continue;
                for (int h = 0; h < H; h++)
                    for (size_t i = 0; i < N; i++) {
                        int moved = 0;
                        for (int e = 0; e < d; e++) moved |= bumped[i * Hd + (size_t)h * d + e] != base[i * Hd + (size_t)h * d + e];
                        int allowed = (size_t)j <= i && design_segment((size_t)j, h, H, G) == design_segment(i, h, H, G);
                        /* a query that sees one key only puts all its weight there, whatever k is */
                        size_t visible = 0;
                        for (size_t jj = 0; jj <= i; jj++) visible += design_segment(jj, h, H, G) == design_segment(i, h, H, G);
                        if (which == PROJ_K && visible == 1) allowed = 0;
                        if (moved != allowed) {
                            if (mismatches++ < 5) printf("  %s G=%zu %s: head %d query %zu key %ld moved=%d allowed=%d\n", tc->name, G, which == PROJ_K ? "k" : "v", h, i, j, moved, allowed);
                        }
                    }
            }
            EXPECT(mismatches == 0, "%s G=%zu: %zu (head, query, key) visibilities break docs/DESIGN.md's S2 rule", tc->name, G, mismatches);
        }
    }
    /* ratio 1 (G = N) is full attention; ratios that do not divide N are refused */
    size_t G = 99;
    EXPECT(s2_group_size(N, 1.0, &G) == 0 && G == 0, "ratio 1 should be full attention (G=0), got %zu", G);
    EXPECT(s2_group_size(18, 0.25, &G) != 0 && strstr(last_error(), "whole number"), "N=18 ratio 1/4 should be refused");
    EXPECT(s2_group_size(20, 0.3, &G) != 0 && strstr(last_error(), "multiple"), "N=20 ratio 0.3 (G=6) should be refused");
    printf("%s: S2-Attn visibility (k and v perturbations, G=N/4 and G=N) follows docs/DESIGN.md\n", tc->name);
    free(base); free(bumped); free(tok);
    act_free(&act);
    model_free(&m);
}

/* ---- 7. bad adapters, and training ------------------------------------------------------- */

static char *replace_once(const char *text, const char *from, const char *to) {
    const char *at = strstr(text, from);
    CHECK(at, "test setup: '%s' not found in the adapter config", from);
    size_t n = strlen(text) - strlen(from) + strlen(to);
    char *out = xmalloc(n + 1);
    size_t pre = (size_t)(at - text);
    memcpy(out, text, pre);
    strcpy(out + pre, to);
    strcat(out, at + strlen(from));
    return out;
}

static void check_bad_adapters(void) {
    Model m, m3;
    if (load_tiny(&m, &TINY[0]) != 0 || load_tiny(&m3, &TINY[1]) != 0) return;
    char src[512], cfg_path[600], st_path[600], tmp[512], p1[700], p2[700];
    snprintf(src, sizeof src, FIXTURES "/%s/adapter_peft", TINY[0].name);
    char *cfg = read_file(path_join(cfg_path, sizeof cfg_path, src, "adapter_config.json"), NULL);
    size_t st_len;
    char *st = read_file(path_join(st_path, sizeof st_path, src, "adapter_model.safetensors"), &st_len);
    if (!cfg || !st) { EXPECT(0, "%s", last_error()); return; }
    snprintf(tmp, sizeof tmp, "build/tests/lora_bad_%d", (int)getpid());
    struct { const char *what, *from, *to, *expect; int drop_st; } cases[] = {
        {"rank disagrees with the tensors", "\"r\": 8", "\"r\": 4", "does not fit", 0},
        {"config targets fewer modules than the tensors", "\"k_proj\"", "\"q_proj\"", "does not target", 0},
        {"config targets a module the file lacks", "\"target_modules\": [", "\"target_modules\": [\"gate_proj\", ", "no lora_A/lora_B", 0},
        {"unknown target", "\"v_proj\"", "\"qkv_proj\"", "not one of", 0},
        {"DoRA", "\"use_dora\": false", "\"use_dora\": true", "DoRA", 0},
        {"malformed JSON", "{", "{{", "malformed JSON", 0},
        {"missing safetensors", "\"r\": 8", "\"r\": 8", "cannot open", 1},
    };
    float *w0 = xmalloc(m.w.count * 4);
    memcpy(w0, m.w.memory, m.w.count * 4);
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        EXPECT(make_dir(tmp) == 0, "%s", last_error());
        char *text = replace_once(cfg, cases[k].from, cases[k].to);
        EXPECT(write_file_atomic(path_join(p1, sizeof p1, tmp, "adapter_config.json"), text, strlen(text)) == 0, "%s", last_error());
        remove(path_join(p2, sizeof p2, tmp, "adapter_model.safetensors"));
        if (!cases[k].drop_st) EXPECT(write_file_atomic(p2, st, st_len) == 0, "%s", last_error());
        LoraAdapter ad;
        int rc = lora_load_adapter(&ad, &m, tmp);
        EXPECT(rc != 0 && strstr(last_error(), cases[k].expect), "%s: rc=%d, message '%s' lacks '%s'", cases[k].what, rc, rc ? last_error() : "", cases[k].expect);
        if (rc == 0) lora_free(&ad);
        else printf("refused (%s): %s\n", cases[k].what, last_error());
        EXPECT(memcmp(w0, m.w.memory, m.w.count * 4) == 0, "%s: a refused adapter changed the model", cases[k].what);
        free(text);
        remove(p1);
        remove(p2);
        rmdir(tmp);
    }
    /* hostile tensor files beside a valid config: one bad tensor each */
    {
        static float zeros[67 * 32];
        int64_t s8x32[2] = {8, 32}, s3d[3] = {8, 32, 1}, s3x3[2] = {3, 3};
        struct { const char *what, *name; DType dt; int nd; const int64_t *shape; const char *expect; } bad[] = {
            {"integer lora_A", "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", DT_I32, 2, s8x32, "dtype"},
            {"3-d lora_A", "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", DT_F32, 3, s3d, "shape"},
            {"negative layer", "base_model.model.model.layers.-1.self_attn.q_proj.lora_A.weight", DT_F32, 2, s8x32, "not a LoRA A/B"},
            {"huge layer", "base_model.model.model.layers.99999999999999999999.self_attn.q_proj.lora_A.weight", DT_F32, 2, s8x32, "layer"},
            {"layer past the model", "base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight", DT_F32, 2, s8x32, "the model has 2 layers"},
            {"no peft prefix", "model.layers.0.self_attn.q_proj.lora_A.weight", DT_F32, 2, s8x32, "prefix"},
            {"trailing junk", "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weightX", DT_F32, 2, s8x32, "not a LoRA A/B"},
            {"wrong head shape", "base_model.model.lm_head.weight", DT_F32, 2, s3x3, "does not fit"},
        };
        SafeTensors good;
        EXPECT(st_open(&good, st_path) == 0, "%s", last_error());
        for (size_t k = 0; k < sizeof bad / sizeof bad[0]; k++) {
            EXPECT(make_dir(tmp) == 0, "%s", last_error());
            EXPECT(write_file_atomic(path_join(p1, sizeof p1, tmp, "adapter_config.json"), cfg, strlen(cfg)) == 0, "%s", last_error());
            StWriter w = {0};
            for (size_t i = 0; i < good.count; i++) /* every good tensor except the one replaced */
                if (strcmp(good.tensors[i].name, bad[k].name) != 0 &&
                    !(strstr(bad[k].name, "q_proj.lora_A") && strstr(good.tensors[i].name, "layers.0.self_attn.q_proj.lora_A")))
                    st_writer_add(&w, good.tensors[i].name, good.tensors[i].dtype, good.tensors[i].ndim, good.tensors[i].shape, good.tensors[i].data);
            st_writer_add(&w, bad[k].name, bad[k].dt, bad[k].nd, bad[k].shape, zeros);
            EXPECT(st_write(&w, path_join(p2, sizeof p2, tmp, "adapter_model.safetensors")) == 0, "%s", last_error());
            st_writer_free(&w);
            LoraAdapter ad;
            int rc = lora_load_adapter(&ad, &m, tmp);
            EXPECT(rc != 0 && strstr(last_error(), bad[k].expect), "%s: rc=%d, message '%s' lacks '%s'", bad[k].what, rc, rc ? last_error() : "", bad[k].expect);
            if (rc == 0) lora_free(&ad);
            EXPECT(memcmp(w0, m.w.memory, m.w.count * 4) == 0, "%s: a refused adapter changed the model", bad[k].what);
            remove(p1);
            remove(p2);
            rmdir(tmp);
        }
        /* a truncated file */
        EXPECT(make_dir(tmp) == 0, "%s", last_error());
        EXPECT(write_file_atomic(p1, cfg, strlen(cfg)) == 0 && write_file_atomic(p2, st, st_len / 3) == 0, "%s", last_error());
        LoraAdapter ad;
        int rc = lora_load_adapter(&ad, &m, tmp);
        EXPECT(rc != 0 && strstr(last_error(), "adapter_model.safetensors"), "truncated safetensors: '%s'", rc ? last_error() : "accepted");
        if (rc == 0) lora_free(&ad);
        remove(p1);
        remove(p2);
        rmdir(tmp);
        st_close(&good);
    }
    /* rsLoRA adapters load with scaling alpha / sqrt(R) and save as rsLoRA again */
    {
        EXPECT(make_dir(tmp) == 0, "%s", last_error());
        char *text = replace_once(cfg, "\"use_rslora\": false", "\"use_rslora\": true");
        EXPECT(write_file_atomic(path_join(p1, sizeof p1, tmp, "adapter_config.json"), text, strlen(text)) == 0 &&
               write_file_atomic(path_join(p2, sizeof p2, tmp, "adapter_model.safetensors"), st, st_len) == 0, "%s", last_error());
        LoraAdapter rs;
        Model mr;
        if (load_tiny(&mr, &TINY[0]) == 0) {
            if (lora_load_adapter(&rs, &mr, tmp) == 0) {
                EXPECT(fabsf(rs.scale - 16.0f / sqrtf(8.0f)) < 1e-6f, "rsLoRA scale %g, want 16/sqrt(8)", (double)rs.scale);
                EXPECT(lora_save_adapter(&rs, &mr, tmp, NULL) == 0, "%s", last_error());
                char *again = read_file(p1, NULL);
                EXPECT(again && strstr(again, "\"use_rslora\": true"), "a saved rsLoRA adapter lost use_rslora");
                free(again);
                lora_free(&rs);
            } else EXPECT(0, "rsLoRA adapter: %s", last_error());
            model_free(&mr);
        }
        free(text);
        remove(p1);
        remove(p2);
        rmdir(tmp);
    }
    /* an adapter made for another model: shapes disagree */
    LoraAdapter ad;
    int rc = lora_load_adapter(&ad, &m3, src);
    EXPECT(rc != 0 && (strstr(last_error(), "shape") || strstr(last_error(), "layer")), "adapter of another model: '%s'", rc ? last_error() : "accepted");
    if (rc == 0) lora_free(&ad); else printf("refused (adapter of another model): %s\n", last_error());
    free(cfg); free(st); free(w0);
    model_free(&m);
    model_free(&m3);
}

/* A few LoRA+ steps on one batch: the loss goes down; base linears and the untied head stay put. */
static void check_training(void) {
    Model m;
    if (load_tiny(&m, &TINY[0]) != 0) return;
    float *w0 = xmalloc(m.w.count * 4);
    memcpy(w0, m.w.memory, m.w.count * 4);
    LoraConfig lc = lora_default_config();
    lc.dropout = 0.05f;
    LoraAdapter ad;
    EXPECT(lora_init(&ad, &m.cfg, &lc) == 0, "%s", last_error());
    size_t B = 2, N = 16, G;
    EXPECT(s2_group_size(N, 0.25, &G) == 0, "%s", last_error());
    AdamWConfig oc = adamw_default_config();
    oc.lr = 1e-2f;
    oc.warmup_steps = 2;
    LoraTrainer tr;
    lora_trainer_init(&tr, &m, &ad, &oc, B, N, G);
    int32_t *tok = xmalloc(B * N * 4), *tgt = xmalloc(B * N * 4);
    Rng r;
    rng_seed(&r, 3);
    for (size_t t = 0; t < B * N; t++) tok[t] = (int32_t)rng_below(&r, (uint64_t)m.cfg.vocab_size);
    for (size_t t = 0; t < B * N; t++) tgt[t] = (t + 1) % N ? tok[t + 1] : IGNORE_INDEX;
    float first = 0, last = 0;
    for (int s = 0; s < 12; s++) {
        last = lora_train_step(&tr, tok, tgt, B, N);
        if (s == 0) first = last;
    }
    EXPECT(last < 0.9f * first, "12 LoRA+ steps took the loss from %.4f only to %.4f", first, last);
    int frozen_ok = 1;
    for (int l = 0; l < m.cfg.n_layers; l++)
        for (int w = 0; w < N_PROJ; w++) {
            size_t in, out;
            proj_shape(&m.cfg, w, &in, &out);
            frozen_ok &= memcmp(proj_weight(&m.w.layers[l], w), w0 + (proj_weight(&m.w.layers[l], w) - m.w.memory), in * out * 4) == 0;
        }
    frozen_ok &= memcmp(m.w.lm_head, w0 + (m.w.lm_head - m.w.memory), (size_t)m.cfg.vocab_size * m.cfg.dim * 4) == 0;
    EXPECT(frozen_ok, "training changed a frozen base weight or the untied lm_head");
    EXPECT(memcmp(m.w.embed, w0, (size_t)m.cfg.vocab_size * m.cfg.dim * 4) != 0, "LoRA+ left embed_tokens untouched");
    printf("training: 12 LoRA+ steps with S2-Attn: loss %.4f -> %.4f; base linears and lm_head unchanged\n", first, last);
    free(tok); free(tgt); free(w0);
    lora_trainer_free(&tr);
    lora_free(&ad);
    model_free(&m);
}

/* ---- 8. the command line: train with S2-Attn, save, merge; the outputs agree -------------- */

static int run_cmd(const char *cmd) {
    int st = system(cmd);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static void check_cli(void) {
    if (!file_exists("03_lora")) { EXPECT(0, "./03_lora is not built (make 03_lora, or make test builds it)"); return; }
    char dir[256], tok_path[320], cmd[2048], out_path[320], ad_dir[320], merged_dir[320];
    snprintf(dir, sizeof dir, "build/tests/lora_cli_%d", (int)getpid());
    EXPECT(make_dir(dir) == 0, "%s", last_error());
    snprintf(tok_path, sizeof tok_path, "%s/tokens.lltk", dir);
    snprintf(out_path, sizeof out_path, "%s/out.txt", dir);
    snprintf(ad_dir, sizeof ad_dir, "%s/adapter", dir);
    snprintf(merged_dir, sizeof merged_dir, "%s/merged", dir);
    Rng r;
    rng_seed(&r, (uint64_t)time(NULL) + 11);
    int32_t ids[300];
    for (int i = 0; i < 300; i++) ids[i] = (int32_t)rng_below(&r, 67);
    EXPECT(tokfile_write(tok_path, ids, 300, 67) == 0, "%s", last_error());
    snprintf(cmd, sizeof cmd, "./03_lora --model " FIXTURES "/gqa_untied --tokens %s --s2 --steps 3 --ctx 32 --lr 1e-3 --warmup 1 "
             "--save-adapter %s --merge-out %s > %s 2>&1", tok_path, ad_dir, merged_dir, out_path);
    int rc = run_cmd(cmd);
    EXPECT(rc == 0, "03_lora training run exited %d", rc);
    char *out = read_file(out_path, NULL);
    int steps_seen = 0;
    for (char *line = out ? strtok(out, "\n") : NULL; line; line = strtok(NULL, "\n")) {
        int k;
        float loss;
        char tail;
        if (sscanf(line, "step %d loss %f%c", &k, &loss, &tail) == 2) {
            EXPECT(k == steps_seen + 1 && isfinite(loss) && loss > 0, "bad step line: %s", line);
            steps_seen++;
        }
    }
    free(out);
    EXPECT(steps_seen == 3, "03_lora printed %d 'step <k> loss <float>' lines, want 3", steps_seen);
    /* the saved adapter on the base == the merged folder */
    Model base, merged;
    LoraAdapter ad;
    if (model_try_load(&base, FIXTURES "/gqa_untied", 32) == 0 && model_try_load(&merged, merged_dir, 0) == 0) {
        EXPECT(merged.cfg.rope_factor == 2.0f, "the merged config.json carries RoPE factor %g, want 2", (double)merged.cfg.rope_factor);
        if (lora_load_adapter(&ad, &base, ad_dir) == 0) {
            ad.training = 0;
            size_t B = 1, N = 32, V = 67;
            Activations a1, a2;
            act_plan(&a1, &base.cfg, B, N, 0);
            act_plan(&a2, &merged.cfg, B, N, 0);
            RunOptions ro = {0, 0, &ad.hook};
            model_forward(&base, &a1, ids, NULL, B, N, &ro);
            model_forward(&merged, &a2, ids, NULL, B, N, NULL);
            double e = rel_maxnorm(a2.logits, a1.logits, B * N * V);
            EXPECT(e <= 1e-5, "the merged folder's logits differ from base + saved adapter by %g (tolerance 1e-5)", e);
            printf("cli: 3 S2 steps, saved adapter and merged folder agree to %.2g\n", e);
            act_free(&a1); act_free(&a2);
            lora_free(&ad);
        } else EXPECT(0, "loading the adapter 03_lora saved: %s", last_error());
        model_free(&base);
        model_free(&merged);
    } else EXPECT(0, "%s", last_error());
    /* user errors end with one sentence and a non-zero exit */
    snprintf(cmd, sizeof cmd, "./03_lora --model " FIXTURES "/gqa_untied --tokens %s --s2 --steps 1 --ctx 30 > %s 2>&1", tok_path, out_path);
    rc = run_cmd(cmd);
    out = read_file(out_path, NULL);
    EXPECT(rc != 0 && out && strstr(out, "error: ") && strstr(out, "S2-Attn"), "--s2 with --ctx 30: exit %d, '%s'", rc, out ? out : "");
    free(out);
    snprintf(cmd, sizeof cmd, "./03_lora --model " FIXTURES "/gqa_untied --load-adapter " FIXTURES "/mha3_tied/adapter_peft --merge-out %s/x > %s 2>&1", dir, out_path);
    rc = run_cmd(cmd);
    out = read_file(out_path, NULL);
    EXPECT(rc != 0 && out && strstr(out, "error: ") && strstr(out, "does not fit"), "another model's adapter: exit %d, '%s'", rc, out ? out : "");
    free(out);
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    run_cmd(cmd);
}

int main(int argc, char **argv) {
    if (argc == 4 && strcmp(argv[1], "--write-ours-adapter") == 0) return write_ours_adapter(argv[2], argv[3]);
    if (!file_exists(FIXTURES "/adamw.bin")) {
        printf("skip: %s not found (run from the repository root)\n", FIXTURES);
        return 77;
    }
    test_lora_linear();
    test_lora_dropout();
    test_adamw();
    for (int k = 0; k < 2; k++) {
        check_against_peft(&TINY[k]);
        check_ours_adapter(&TINY[k]);
        check_merge(&TINY[k]);
        check_s2_visibility(&TINY[k]);
    }
    check_bad_adapters();
    check_training();
    check_cli();
    printf("03_lora: %d checks, %d failed\n", g_checks, g_failures);
    return g_failures ? 1 : 0;
}
