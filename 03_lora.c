/* 03_lora.c: LoRA+ and S2-Attn training on the CPU, the method itself in plain C.
 *
 * Teaches: how LongLoRA fine-tunes a frozen LLaMA. Each targeted projection y = x W^T
 * gains a low-rank path y += (alpha/R) (x A^T) B^T with A [R, in] and B [out, R] (PEFT's
 * initialisation: A kaiming-uniform, B zero, so training starts from the base model);
 * LoRA+ also trains embed_tokens and every RMSNorm weight; S2-Attn (the attention of
 * stage 02 restricted to shifted groups, docs/DESIGN.md) makes long sequences cheap. AdamW
 * with decoupled weight decay and a warmup-then-constant learning rate (or transformers'
 * cosine or linear decay after the warmup) updates only the trainable tensors; embed and the
 * norms may stay frozen (--no-train-embed, --no-train-norms), as in LongLoRA's ablations.
 * Adapters are saved and loaded in PEFT's own format (adapter_config.json +
 * adapter_model.safetensors, the trained embed and norm weights as modules_to_save), and can
 * be merged into the base weights (W += (alpha/R) B A).
 * Runs on: the CPU, fp32, through stage 02's forward/backward: LoRA plugs into the
 * seven projections through 02's LinearHook, so the layer loop is written once.
 * Checked against: peft + transformers (tests/ref/make_lora_fixtures.py writes the
 * fixtures; tests/test_lora.c compares logits, loss and every trainable gradient with
 * S2-Attn off and on, AdamW with torch's, its schedules with transformers', and adapters both
 * ways).
 * Leaves out: the GPU, bf16 compute and activation checkpointing (05), DoRA, per-module
 * rank/alpha patterns and biases (adapters that use them are refused with a clear error),
 * and gradient clipping (off in the LongLoRA recipe).
 * S2-Attn's group is N * ratio (default 1/4); ratio 1 means one group spanning the whole
 * sequence, which we run as full causal attention (no shift: nothing to bridge).
 *
 * CLI:
 *   ./03_lora --model DIR (--text-file F | --tokens F) [--s2] [--steps K] [--ctx N]
 *             [--save-adapter DIR] [--load-adapter DIR] [--merge-out DIR]   (03_lora -h: all flags)
 * runs K CPU training steps of LoRA+ on B packed sequences of N tokens each and prints
 * "step <k> loss <float>" per step; then saves the adapter (PEFT format) and/or writes the
 * base model with the adapter merged in as a HF model folder.
 */
#ifndef STAGE
#define STAGE 3
#endif
#include "02_model.c"
#include <limits.h>

/* ---------------------------------------------------------------------------------------
 * Which projections carry an adapter. `which` numbers them as 02's LinearHook does.
 * ------------------------------------------------------------------------------------- */

#define LORA_NUM_TARGETS N_PROJ /* 02's PROJ_Q, PROJ_K, PROJ_V, PROJ_O, PROJ_GATE, PROJ_UP, PROJ_DOWN */
static const char *const LORA_TARGET_NAMES[LORA_NUM_TARGETS] = {"q_proj", "k_proj", "v_proj", "o_proj",
                                                                 "gate_proj", "up_proj", "down_proj"};
static const char *const LORA_TARGET_PARENTS[LORA_NUM_TARGETS] = {"self_attn", "self_attn", "self_attn", "self_attn",
                                                                   "mlp", "mlp", "mlp"};
#define LORA_DEFAULT_TARGETS ((1u << PROJ_Q) | (1u << PROJ_K) | (1u << PROJ_V) | (1u << PROJ_O))

typedef struct {
    int rank;            /* R */
    float alpha;         /* scaling = alpha / R */
    float dropout;       /* probability of zeroing an input of the LoRA path (training only) */
    unsigned targets;    /* bit `which` set: that projection has an adapter */
    int train_embed;     /* LoRA+: embed_tokens trainable */
    int train_norms;     /* LoRA+: every RMSNorm weight trainable */
    uint64_t seed;       /* initialisation and dropout */
    int use_rslora;      /* rank-stabilised scaling alpha / sqrt(R) instead of alpha / R */
} LoraConfig;

static LoraConfig lora_default_config(void) {
    LoraConfig c = {8, 16.0f, 0.0f, LORA_DEFAULT_TARGETS, 1, 1, 1234, 0};
    return c;
}

/* Parses "q,k,v,o" or "q_proj,v_proj,gate_proj" into a target mask; -1 + last_error() otherwise. */
static API int lora_parse_targets(const char *list, unsigned *mask) {
    *mask = 0;
    const char *p = list;
    while (*p) {
        size_t n = strcspn(p, ",");
        int found = -1;
        for (int w = 0; w < LORA_NUM_TARGETS; w++) {
            const char *full = LORA_TARGET_NAMES[w];
            size_t short_len = strcspn(full, "_");
            if ((n == strlen(full) && strncmp(p, full, n) == 0) || (n == short_len && strncmp(p, full, n) == 0)) found = w;
        }
        if (found < 0) return set_error("unknown LoRA target '%.*s' (use q,k,v,o,gate,up,down)", (int)n, p);
        *mask |= 1u << found;
        p += n;
        if (*p == ',') p++;
    }
    if (!*mask) return set_error("no LoRA targets given");
    return 0;
}

/* ---------------------------------------------------------------------------------------
 * The LoRA linear on plain arrays: the whole method in two functions.
 *   forward   y  += s * (x A^T) B^T
 *   backward  dB += s * dy^T (x A^T)      dA += s * (dy B)^T x      dx += s * (dy B) A
 * ------------------------------------------------------------------------------------- */

/* y [T, out] += scale * (x [T, in] A^T) B^T with A [R, in], B [out, R]. */
static void lora_linear_forward(const float *x, size_t T, size_t in, size_t out, size_t R,
                                const float *A, const float *B, float scale, float *y) {
    float *xa_all = (float *)xmalloc(T * R * sizeof(float)); /* [T, R]: s * x A^T */
#pragma omp parallel for schedule(static)
    for (size_t t = 0; t < T; t++) {
        float *xa = xa_all + t * R;    /* [R] */
        const float *xt = x + t * in;  /* [in] */
        for (size_t r = 0; r < R; r++) {
            const float *ar = A + r * in;
            float acc = 0.0f;
            for (size_t i = 0; i < in; i++) acc += xt[i] * ar[i];
            xa[r] = acc * scale;
        }
        float *yt = y + t * out;       /* [out] */
        for (size_t o = 0; o < out; o++) {
            const float *bo = B + o * R;
            float acc = 0.0f;
            for (size_t r = 0; r < R; r++) acc += bo[r] * xa[r];
            yt[o] += acc;
        }
    }
    free(xa_all);
}

/* Given x [T, in] and dy [T, out]: dA [R, in] += ..., dB [out, R] += ..., dx [T, in] += ...
 * (dx may be NULL when the caller does not need it). */
static void lora_linear_backward(const float *x, const float *dy, size_t T, size_t in, size_t out, size_t R,
                                 const float *A, const float *B, float scale,
                                 float *dA, float *dB, float *dx) {
    float *xa = (float *)xmalloc(T * R * sizeof(float)); /* [T, R]: x A^T */
    float *u = (float *)xmalloc(T * R * sizeof(float));  /* [T, R]: s * dy B */
#pragma omp parallel for schedule(static)
    for (size_t t = 0; t < T; t++) {
        const float *xt = x + t * in, *dyt = dy + t * out;
        for (size_t r = 0; r < R; r++) {
            const float *ar = A + r * in;
            float acc = 0.0f;
            for (size_t i = 0; i < in; i++) acc += xt[i] * ar[i];
            xa[t * R + r] = acc;
            float g = 0.0f;
            for (size_t o = 0; o < out; o++) g += dyt[o] * B[o * R + r];
            u[t * R + r] = g * scale;
        }
    }
    /* dB[o, r] += s * sum_t dy[t, o] xa[t, r] */
#pragma omp parallel for schedule(static)
    for (size_t o = 0; o < out; o++)
        for (size_t r = 0; r < R; r++) {
            float acc = 0.0f;
            for (size_t t = 0; t < T; t++) acc += dy[t * out + o] * xa[t * R + r];
            dB[o * R + r] += scale * acc;
        }
    /* dA[r, i] += sum_t u[t, r] x[t, i] */
#pragma omp parallel for schedule(static)
    for (size_t r = 0; r < R; r++) {
        float *dar = dA + r * in;
        for (size_t t = 0; t < T; t++) {
            float ut = u[t * R + r];
            const float *xt = x + t * in;
            for (size_t i = 0; i < in; i++) dar[i] += ut * xt[i];
        }
    }
    /* dx[t, i] += sum_r u[t, r] A[r, i] */
    if (dx) {
#pragma omp parallel for schedule(static)
        for (size_t t = 0; t < T; t++) {
            float *dxt = dx + t * in;
            for (size_t r = 0; r < R; r++) {
                float ut = u[t * R + r];
                const float *ar = A + r * in;
                for (size_t i = 0; i < in; i++) dxt[i] += ut * ar[i];
            }
        }
    }
    free(xa);
    free(u);
}

/* ---------------------------------------------------------------------------------------
 * AdamW (torch.optim.AdamW's arithmetic) with HF's schedules: constant after a linear warmup
 * (LongLoRA's), or cosine or linear decay to 0 after it.
 * ------------------------------------------------------------------------------------- */

/* What the learning rate does after the warmup; 0 (constant) is what a zeroed config means. */
typedef enum { LR_CONSTANT, LR_COSINE, LR_LINEAR, LR_N_SCHEDULES } LrSchedule;
static const char *const LR_SCHEDULE_NAMES[LR_N_SCHEDULES] = {"constant", "cosine", "linear"};

/* The schedule `name` means (LR_SCHEDULE_NAMES, or transformers' "constant_with_warmup" for
 * constant), for the command-line flag `flag`. 0, or -1 + last_error(). */
static API int lr_schedule_parse(const char *flag, const char *name, LrSchedule *out) {
    for (int k = 0; k < LR_N_SCHEDULES; k++)
        if (!strcmp(name, LR_SCHEDULE_NAMES[k])) { *out = (LrSchedule)k; return 0; }
    if (!strcmp(name, "constant_with_warmup")) { *out = LR_CONSTANT; return 0; }
    return set_error("%s must be constant, cosine or linear, got '%s'", flag, name);
}

typedef struct {
    float lr, beta1, beta2, eps, weight_decay;
    int warmup_steps;
    LrSchedule schedule;  /* after the warmup */
    long total_steps;     /* cosine and linear reach 0 here (05's --max-steps); constant ignores it */
} AdamWConfig;

static API AdamWConfig adamw_default_config(void) {
    AdamWConfig c = {2e-5f, 0.9f, 0.95f, 1e-8f, 0.0f, 20, LR_CONSTANT, 0};
    return c;
}

/* The learning rate of optimizer step `step` (0-based), as transformers' schedules compute it
 * (W = warmup_steps, S = total_steps): lr * step / W while step < W (so the very first step has
 * lr 0, exactly as the HF Trainer runs LongLoRA), then
 *   constant  lr                                        get_constant_schedule_with_warmup
 *   cosine    lr * max(0, (1 + cos(pi p)) / 2)          get_cosine_schedule_with_warmup (0.5 cycles)
 *   linear    lr * max(0, (S - step) / max(1, S - W))   get_linear_schedule_with_warmup
 * with p = (step - W) / max(1, S - W). Past S, as transformers does, linear stays at 0 and
 * cosine rises again (the max(0, ...) does not hold it at 0). */
static float adamw_lr_at(const AdamWConfig *c, long step) {
    if (step < c->warmup_steps) return c->lr * (float)((double)step / (double)(c->warmup_steps > 0 ? c->warmup_steps : 1));
    if (c->schedule == LR_CONSTANT) return c->lr;
    double span = (double)(c->total_steps - c->warmup_steps > 1 ? c->total_steps - c->warmup_steps : 1);
    double f = c->schedule == LR_LINEAR ? (double)(c->total_steps - step) / span
                                        : 0.5 * (1.0 + cos(M_PI * (double)(step - c->warmup_steps) / span));
    return c->lr * (float)(f > 0.0 ? f : 0.0);
}

typedef struct {
    char name[160];
    float *param;   /* [numel] the fp32 master weights, updated in place */
    float *grad;    /* [numel] */
    float *m, *v;   /* [numel] first and second moments */
    size_t numel;
    int no_decay;   /* 1: no weight decay (the norms, as the HF Trainer excludes them) */
} TrainParam;

typedef struct {
    AdamWConfig cfg;
    TrainParam *params; /* [count] */
    size_t count, cap;
    long steps_taken;   /* t in the bias corrections after the next step is steps_taken + 1 */
} AdamW;

static void adamw_add(AdamW *opt, const char *name, float *param, float *grad, size_t numel) {
    if (opt->count == opt->cap) {
        opt->cap = opt->cap ? 2 * opt->cap : 32;
        opt->params = (TrainParam *)xrealloc(opt->params, opt->cap * sizeof(TrainParam));
    }
    TrainParam *p = &opt->params[opt->count++];
    memset(p, 0, sizeof *p);
    snprintf(p->name, sizeof p->name, "%s", name);
    p->param = param;
    p->grad = grad;
    p->numel = numel;
    p->m = (float *)xcalloc(numel, sizeof(float));
    p->v = (float *)xcalloc(numel, sizeof(float));
}

static void adamw_free(AdamW *opt) {
    for (size_t i = 0; i < opt->count; i++) { free(opt->params[i].m); free(opt->params[i].v); }
    free(opt->params);
    memset(opt, 0, sizeof *opt);
}

/* One step with learning rate lr on the flat index range [lo, hi) of the trainable
 * tensors laid end to end in the order they were added (ZeRO-1 in 05_dist.c gives each
 * rank its own slice; adamw_step is the whole range). The arithmetic, in the order torch
 * does it (weight decay skipped where no_decay is set):
 *   p *= 1 - lr*wd;  m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;
 *   p -= (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
 * Every caller counts the step, whatever its range. */
static void adamw_step_range(AdamW *opt, float lr, size_t lo, size_t hi) {
    const AdamWConfig *c = &opt->cfg;
    long t = ++opt->steps_taken;
    double bc1 = 1.0 - pow((double)c->beta1, (double)t);
    double bc2 = 1.0 - pow((double)c->beta2, (double)t);
    float step_size = (float)(lr / bc1);
    float bc2_sqrt = (float)sqrt(bc2);
    size_t base = 0; /* flat index of tensor k's first element */
    for (size_t k = 0; k < opt->count; base += opt->params[k].numel, k++) {
        TrainParam *p = &opt->params[k];
        if (hi <= base || lo >= base + p->numel) continue;
        size_t first = lo > base ? lo - base : 0, end = hi < base + p->numel ? hi - base : p->numel;
        float decay = p->no_decay ? 1.0f : 1.0f - lr * c->weight_decay;
#pragma omp parallel for schedule(static)
        for (size_t i = first; i < end; i++) {
            float g = p->grad[i];
            float w = p->param[i] * decay;
            float m = p->m[i] + (1.0f - c->beta1) * (g - p->m[i]);
            float v = c->beta2 * p->v[i] + (1.0f - c->beta2) * g * g;
            p->m[i] = m;
            p->v[i] = v;
            p->param[i] = w - step_size * (m / (sqrtf(v) / bc2_sqrt + c->eps));
        }
    }
}
static void adamw_step(AdamW *opt, float lr) { adamw_step_range(opt, lr, 0, SIZE_MAX); }

/* ---------------------------------------------------------------------------------------
 * An adapter: A and B (and their gradients) for every targeted projection of every layer.
 * ------------------------------------------------------------------------------------- */

typedef struct {
    size_t in, out;      /* the projection's widths: W is [out, in] */
    float *A, *B;        /* [R, in], [out, R] */
    float *dA, *dB;      /* [R, in], [out, R] */
    float *drop_mask;    /* [T, in] the last forward's dropout multipliers (0 or 1/(1-p)), or NULL */
    size_t drop_tokens;  /* T of drop_mask */
} LoraPair;

typedef struct {
    LoraConfig cfg;
    int n_layers;        /* L */
    float scale;         /* alpha / R (rsLoRA: alpha / sqrt(R)) */
    LoraPair *pairs;     /* [L * LORA_NUM_TARGETS], A == NULL where no adapter */
    int training;        /* dropout only while training */
    Rng drop_rng;
    LinearHook hook;     /* what 02's forward/backward call */
} LoraAdapter;

/* The widths of projection `which` (W is [out, in]): 02's proj_shape. */
static void lora_dims(const Config *c, int which, size_t *in, size_t *out) { proj_shape(c, which, in, out); }

static LoraPair *lora_pair(LoraAdapter *ad, int layer, int which) {
    return &ad->pairs[(size_t)layer * LORA_NUM_TARGETS + (size_t)which];
}

static void lora_hook_forward(void *ctx, int layer, int which, const float *x, size_t T, float *y);
static void lora_hook_backward(void *ctx, int layer, int which, const float *x, const float *dy, size_t T, float *dx);

/* Allocates an adapter with PEFT's initialisation: A ~ U(-1/sqrt(in), 1/sqrt(in))
 * (kaiming_uniform with a = sqrt(5)), B = 0. -1 + last_error() for an unusable config.
 * ad->hook points at ad itself: initialise the adapter where it will stay (do not copy it). */
static int lora_init(LoraAdapter *ad, const Config *c, const LoraConfig *lc) {
    memset(ad, 0, sizeof *ad);
    if (lc->rank < 1 || lc->rank > 4096) return set_error("LoRA rank %d is outside 1..4096", lc->rank);
    if (!(lc->dropout >= 0.0f && lc->dropout < 1.0f)) return set_error("LoRA dropout %g is outside [0, 1)", (double)lc->dropout);
    if (!(lc->alpha > 0.0f)) return set_error("LoRA alpha %g must be positive", (double)lc->alpha);
    if (!(lc->targets & ((1u << LORA_NUM_TARGETS) - 1))) return set_error("LoRA has no target modules");
    ad->cfg = *lc;
    ad->n_layers = c->n_layers;
    ad->scale = lc->use_rslora ? lc->alpha / sqrtf((float)lc->rank) : lc->alpha / (float)lc->rank;
    ad->pairs = (LoraPair *)xcalloc((size_t)c->n_layers * LORA_NUM_TARGETS, sizeof(LoraPair));
    ad->training = 1;
    Rng init_rng;
    rng_seed(&init_rng, lc->seed);
    rng_seed(&ad->drop_rng, lc->seed ^ 0x5deece66dull);
    size_t R = (size_t)lc->rank;
    for (int l = 0; l < c->n_layers; l++)
        for (int w = 0; w < LORA_NUM_TARGETS; w++) {
            if (!(lc->targets & (1u << w))) continue;
            LoraPair *p = lora_pair(ad, l, w);
            lora_dims(c, w, &p->in, &p->out);
            p->A = (float *)xmalloc(R * p->in * sizeof(float));
            p->B = (float *)xcalloc(p->out * R, sizeof(float));
            p->dA = (float *)xcalloc(R * p->in, sizeof(float));
            p->dB = (float *)xcalloc(p->out * R, sizeof(float));
            float bound = 1.0f / sqrtf((float)p->in);
            for (size_t i = 0; i < R * p->in; i++) p->A[i] = (2.0f * rng_uniform(&init_rng) - 1.0f) * bound;
        }
    ad->hook.ctx = ad;
    ad->hook.forward = lora_hook_forward;
    ad->hook.backward = lora_hook_backward;
    return 0;
}

static void lora_free(LoraAdapter *ad) {
    if (ad->pairs)
        for (size_t i = 0; i < (size_t)ad->n_layers * LORA_NUM_TARGETS; i++) {
            LoraPair *p = &ad->pairs[i];
            free(p->A); free(p->B); free(p->dA); free(p->dB); free(p->drop_mask);
        }
    free(ad->pairs);
    memset(ad, 0, sizeof *ad);
}

static void lora_zero_grads(LoraAdapter *ad) {
    size_t R = (size_t)ad->cfg.rank;
    for (size_t i = 0; i < (size_t)ad->n_layers * LORA_NUM_TARGETS; i++) {
        LoraPair *p = &ad->pairs[i];
        if (!p->A) continue;
        memset(p->dA, 0, R * p->in * sizeof(float));
        memset(p->dB, 0, p->out * R * sizeof(float));
    }
}

/* 02 calls this after y = x W^T for every projection: add the adapter's path.
 * With dropout (training only) the LoRA path sees x * mask, the mask kept for backward. */
static void lora_hook_forward(void *ctx, int layer, int which, const float *x /* [T, in] */, size_t T, float *y /* [T, out] */) {
    LoraAdapter *ad = (LoraAdapter *)ctx;
    LoraPair *p = lora_pair(ad, layer, which);
    if (!p->A) return;
    const float *x_in = x;
    float *x_drop = NULL; /* [T, in] */
    if (ad->training && ad->cfg.dropout > 0.0f) {
        if (p->drop_tokens != T) { free(p->drop_mask); p->drop_mask = (float *)xmalloc(T * p->in * sizeof(float)); p->drop_tokens = T; }
        float keep = 1.0f - ad->cfg.dropout, inv = 1.0f / keep;
        x_drop = (float *)xmalloc(T * p->in * sizeof(float));
        for (size_t i = 0; i < T * p->in; i++) {
            p->drop_mask[i] = rng_uniform(&ad->drop_rng) < keep ? inv : 0.0f;
            x_drop[i] = x[i] * p->drop_mask[i];
        }
        x_in = x_drop;
    }
    lora_linear_forward(x_in, T, p->in, p->out, (size_t)ad->cfg.rank, p->A, p->B, ad->scale, y);
    free(x_drop);
}

/* 02 calls this after dx = dy W: accumulate dA, dB and add the adapter's share of dx. */
static void lora_hook_backward(void *ctx, int layer, int which, const float *x /* [T, in] */, const float *dy /* [T, out] */,
                               size_t T, float *dx /* [T, in] */) {
    LoraAdapter *ad = (LoraAdapter *)ctx;
    LoraPair *p = lora_pair(ad, layer, which);
    if (!p->A) return;
    size_t R = (size_t)ad->cfg.rank;
    if (ad->training && ad->cfg.dropout > 0.0f) {
        CHECK(p->drop_mask && p->drop_tokens == T, "LoRA backward without a matching forward (layer %d, %s)", layer, LORA_TARGET_NAMES[which]);
        float *x_drop = (float *)xmalloc(T * p->in * sizeof(float));  /* [T, in] */
        float *dx_drop = (float *)xcalloc(T * p->in, sizeof(float));  /* [T, in] */
        for (size_t i = 0; i < T * p->in; i++) x_drop[i] = x[i] * p->drop_mask[i];
        lora_linear_backward(x_drop, dy, T, p->in, p->out, R, p->A, p->B, ad->scale, p->dA, p->dB, dx ? dx_drop : NULL);
        if (dx) for (size_t i = 0; i < T * p->in; i++) dx[i] += dx_drop[i] * p->drop_mask[i];
        free(x_drop);
        free(dx_drop);
        return;
    }
    lora_linear_backward(x, dy, T, p->in, p->out, R, p->A, p->B, ad->scale, p->dA, p->dB, dx);
}

/* ---------------------------------------------------------------------------------------
 * Where the model keeps what LoRA+ touches (the one place that knows 02's field names).
 * ------------------------------------------------------------------------------------- */

/* W [out, in] of projection `which` in `layer`. */
static float *lora_base_weight(Model *m, int layer, int which) { return proj_weight(&m->w.layers[layer], which); }

/* The LoRA+ tensors beside the adapters: embed_tokens and the RMSNorm weights, with their
 * PEFT names (below "base_model.model."), where they live in the model and in the grads. */
typedef struct {
    char name[128];  /* e.g. "model.layers.3.input_layernorm.weight" */
    float *weight;   /* [numel] */
    float *grad;     /* [numel] */
    size_t numel;
    int is_embed;    /* 1: embed_tokens [V, D]; 0: a norm [D] */
} PlusTensor;

/* Fills list (room for 2L + 2) with the tensors LoRA+ may train; returns how many. */
static size_t lora_plus_tensors(Model *m, Grads *g, PlusTensor *list) {
    const Config *c = &m->cfg;
    size_t D = (size_t)c->dim, n = 0;
    PlusTensor *t = &list[n++];
    snprintf(t->name, sizeof t->name, "model.embed_tokens.weight");
    t->weight = m->w.embed; t->grad = g ? g->embed : NULL; t->numel = (size_t)c->vocab_size * D; t->is_embed = 1;
    for (int l = 0; l < c->n_layers; l++) {
        t = &list[n++];
        snprintf(t->name, sizeof t->name, "model.layers.%d.input_layernorm.weight", l);
        t->weight = m->w.layers[l].attn_norm; t->grad = g ? g->layers[l].attn_norm : NULL; t->numel = D; t->is_embed = 0;
        t = &list[n++];
        snprintf(t->name, sizeof t->name, "model.layers.%d.post_attention_layernorm.weight", l);
        t->weight = m->w.layers[l].mlp_norm; t->grad = g ? g->layers[l].mlp_norm : NULL; t->numel = D; t->is_embed = 0;
    }
    t = &list[n++];
    snprintf(t->name, sizeof t->name, "model.norm.weight");
    t->weight = m->w.final_norm; t->grad = g ? g->final_norm : NULL; t->numel = D; t->is_embed = 0;
    return n;
}

/* Registers every trainable tensor (A and B of each adapter, then embed and norms as
 * configured) with the optimizer. */
static void lora_register_params(AdamW *opt, LoraAdapter *ad, Model *m, Grads *g) {
    size_t R = (size_t)ad->cfg.rank;
    char name[160];
    for (int l = 0; l < ad->n_layers; l++)
        for (int w = 0; w < LORA_NUM_TARGETS; w++) {
            LoraPair *p = lora_pair(ad, l, w);
            if (!p->A) continue;
            snprintf(name, sizeof name, "model.layers.%d.%s.%s.lora_A.weight", l, LORA_TARGET_PARENTS[w], LORA_TARGET_NAMES[w]);
            adamw_add(opt, name, p->A, p->dA, R * p->in);
            snprintf(name, sizeof name, "model.layers.%d.%s.%s.lora_B.weight", l, LORA_TARGET_PARENTS[w], LORA_TARGET_NAMES[w]);
            adamw_add(opt, name, p->B, p->dB, p->out * R);
        }
    PlusTensor *plus = (PlusTensor *)xmalloc(((size_t)2 * m->cfg.n_layers + 2) * sizeof(PlusTensor));
    size_t n = lora_plus_tensors(m, g, plus);
    for (size_t i = 0; i < n; i++)
        if (plus[i].is_embed ? ad->cfg.train_embed : ad->cfg.train_norms) {
            adamw_add(opt, plus[i].name, plus[i].weight, plus[i].grad, plus[i].numel);
            opt->params[opt->count - 1].no_decay = !plus[i].is_embed; /* HF's Trainer never decays norms */
        }
    free(plus);
}

/* ---------------------------------------------------------------------------------------
 * Merge and unmerge: W [out, in] += / -= (alpha/R) B [out, R] A [R, in].
 * ------------------------------------------------------------------------------------- */

static void lora_merge_sign(LoraAdapter *ad, Model *m, float sign) {
    size_t R = (size_t)ad->cfg.rank;
    for (int l = 0; l < ad->n_layers; l++)
        for (int w = 0; w < LORA_NUM_TARGETS; w++) {
            LoraPair *p = lora_pair(ad, l, w);
            if (!p->A) continue;
            float *W = lora_base_weight(m, l, w);
            float s = sign * ad->scale;
#pragma omp parallel for schedule(static)
            for (size_t o = 0; o < p->out; o++) {
                float *wo = W + o * p->in;
                const float *bo = p->B + o * R;
                for (size_t r = 0; r < R; r++) {
                    float c = s * bo[r];
                    const float *ar = p->A + r * p->in;
                    for (size_t i = 0; i < p->in; i++) wo[i] += c * ar[i];
                }
            }
        }
}
static API void lora_merge(LoraAdapter *ad, Model *m) { lora_merge_sign(ad, m, 1.0f); }
static API void lora_unmerge(LoraAdapter *ad, Model *m) { lora_merge_sign(ad, m, -1.0f); }

/* ---------------------------------------------------------------------------------------
 * PEFT adapter folders.
 *   adapter_config.json         r, lora_alpha, lora_dropout, target_modules, modules_to_save, ...
 *   adapter_model.safetensors   base_model.model.model.layers.<l>.<self_attn|mlp>.<x_proj>.lora_A.weight [R, in]
 *                               base_model.model.model.layers.<l>.<self_attn|mlp>.<x_proj>.lora_B.weight [out, R]
 *                               and, as modules_to_save (what peft 0.21 writes and loads):
 *                               base_model.model.model.embed_tokens.weight [V, D]
 *                               base_model.model.model.layers.<l>.input_layernorm.weight [D]
 *                               base_model.model.model.layers.<l>.post_attention_layernorm.weight [D]
 *                               base_model.model.model.norm.weight [D]
 * ------------------------------------------------------------------------------------- */

#define PEFT_PREFIX "base_model.model."

static int write_export_config(const char *base_dir, const char *out_dir, const Config *c, DType dtype);

/* Writes adapter_config.json, adapter_model.safetensors and config.json into the folder dir
 * (which exists). base_name goes into base_model_name_or_path (may be NULL). config.json is
 * the base's (base_name's, when it is a folder with one; else written whole from m's config)
 * with the RoPE the adapter was trained with, a longer context's scaling included, so
 * transformers rebuilds that model: AutoConfig.from_pretrained(dir), the base's weights, then
 * peft's PeftModel.from_pretrained(model, dir); 06_infer --adapter reads it back.
 * -1 + last_error(). */
static int lora_write_adapter_files(LoraAdapter *ad, Model *m, const char *dir, const char *base_name) {
    char path[4400];
    AtomicFile af;
    if (atomic_open(&af, path_join(path, sizeof path, dir, "adapter_config.json")) != 0) return -1;
    FILE *f = af.f;
    fprintf(f, "{\n  \"base_model_name_or_path\": ");
    if (base_name) json_write_string(f, base_name); else fprintf(f, "null");
    /* A tied head is the embedding: peft keeps its trained copy tied only when asked to. */
    int tied_trained = m->cfg.tie_embeddings && ad->cfg.train_embed;
    fprintf(f, ",\n  \"bias\": \"none\",\n  \"ensure_weight_tying\": %s,\n  \"fan_in_fan_out\": false,\n"
               "  \"inference_mode\": true,\n  \"init_lora_weights\": true,\n  \"lora_alpha\": %.9g,\n  \"lora_dropout\": %.9g,\n",
            tied_trained ? "true" : "false", (double)ad->cfg.alpha, (double)ad->cfg.dropout);
    fprintf(f, "  \"modules_to_save\": ");
    if (!ad->cfg.train_embed && !ad->cfg.train_norms) fprintf(f, "null");
    else {
        fprintf(f, "[");
        int first = 1;
        if (ad->cfg.train_embed) { fprintf(f, "\"embed_tokens\""); first = 0; }
        if (ad->cfg.train_norms) fprintf(f, "%s\"input_layernorm\", \"post_attention_layernorm\", \"norm\"", first ? "" : ", ");
        fprintf(f, "]");
    }
    fprintf(f, ",\n  \"peft_type\": \"LORA\",\n  \"r\": %d,\n  \"target_modules\": [", ad->cfg.rank);
    int first = 1;
    for (int w = 0; w < LORA_NUM_TARGETS; w++)
        if (ad->cfg.targets & (1u << w)) { fprintf(f, "%s\"%s\"", first ? "" : ", ", LORA_TARGET_NAMES[w]); first = 0; }
    fprintf(f, "],\n  \"task_type\": \"CAUSAL_LM\",\n  \"use_dora\": false,\n  \"use_rslora\": %s\n}\n", ad->cfg.use_rslora ? "true" : "false");
    if (atomic_commit(&af) != 0) return -1;
    char base_cfg[4096];
    const char *base_dir = base_name && file_exists(path_join(base_cfg, sizeof base_cfg, base_name, "config.json")) ? base_name : NULL;
    if (write_export_config(base_dir, dir, &m->cfg, DT_COUNT) != 0) return -1;

    /* The tensors, named as peft names them; the names live until st_write. */
    StWriter sw = {0};
    sw.metadata_json = (char *)"{\"format\":\"pt\"}";
    size_t max_names = (size_t)ad->n_layers * LORA_NUM_TARGETS * 2 + (size_t)2 * ad->n_layers + 3;
    char (*names)[192] = (char (*)[192])xmalloc(max_names * sizeof *names);
    size_t n_names = 0, R = (size_t)ad->cfg.rank;
    for (int l = 0; l < ad->n_layers; l++)
        for (int w = 0; w < LORA_NUM_TARGETS; w++) {
            LoraPair *p = lora_pair(ad, l, w);
            if (!p->A) continue;
            int64_t shape_a[2] = {(int64_t)R, (int64_t)p->in}, shape_b[2] = {(int64_t)p->out, (int64_t)R};
            snprintf(names[n_names], sizeof names[0], PEFT_PREFIX "model.layers.%d.%s.%s.lora_A.weight", l, LORA_TARGET_PARENTS[w], LORA_TARGET_NAMES[w]);
            st_writer_add(&sw, names[n_names++], DT_F32, 2, shape_a, p->A);
            snprintf(names[n_names], sizeof names[0], PEFT_PREFIX "model.layers.%d.%s.%s.lora_B.weight", l, LORA_TARGET_PARENTS[w], LORA_TARGET_NAMES[w]);
            st_writer_add(&sw, names[n_names++], DT_F32, 2, shape_b, p->B);
        }
    /* modules_to_save in the base's dtype, as peft writes them (its copies of the base's
     * modules keep the model's dtype; A and B above are fp32 either way, peft's
     * autocast_adapter_dtype): a bf16 base gets bf16 embed and norms and an fp16 base fp16
     * ones (peft 0.21 checked on both), whose fp32 masters live on in the checkpoint's
     * train_state (05). fp32 bases and random models keep fp32. */
    DType plus_dtype = m->cfg.weight_dtype == DT_BF16 || m->cfg.weight_dtype == DT_F16 ? m->cfg.weight_dtype : DT_F32;
    int as_half = plus_dtype != DT_F32;
    PlusTensor *plus = (PlusTensor *)xmalloc(((size_t)2 * m->cfg.n_layers + 2) * sizeof(PlusTensor));
    size_t n_plus = lora_plus_tensors(m, NULL, plus);
    uint16_t **half = (uint16_t **)xcalloc(n_plus + 1, sizeof(uint16_t *)); /* [n_plus + 1] the bf16 / fp16 copies */
    for (size_t i = 0; i <= n_plus; i++) {
        int is_head = i == n_plus; /* what peft writes for a tied head it keeps tied: the embedding again */
        if (is_head ? !tied_trained : !(plus[i].is_embed ? ad->cfg.train_embed : ad->cfg.train_norms)) continue;
        const float *w = is_head ? m->w.embed : plus[i].weight;
        int is_matrix = is_head || plus[i].is_embed;
        int64_t shape[2] = {(int64_t)m->cfg.vocab_size, (int64_t)m->cfg.dim};
        size_t numel = is_matrix ? (size_t)m->cfg.vocab_size * m->cfg.dim : (size_t)m->cfg.dim;
        snprintf(names[n_names], sizeof names[0], PEFT_PREFIX "%s", is_head ? "lm_head.weight" : plus[i].name);
        if (as_half) {
            half[i] = (uint16_t *)xmalloc(numel * sizeof(uint16_t));
            for (size_t k = 0; k < numel; k++) half[i][k] = plus_dtype == DT_BF16 ? f32_to_bf16(w[k]) : f32_to_f16(w[k]);
        }
        st_writer_add(&sw, names[n_names++], plus_dtype, is_matrix ? 2 : 1, is_matrix ? shape : shape + 1,
                      as_half ? (const void *)half[i] : (const void *)w);
    }
    int rc = st_write(&sw, path_join(path, sizeof path, dir, "adapter_model.safetensors"));
    st_writer_free(&sw);
    for (size_t i = 0; i <= n_plus; i++) free(half[i]);
    free(half);
    free(names);
    free(plus);
    return rc;
}

/* Saves the adapter into dir (created if needed), whole or not at all: its files are
 * written into dir/.adapter.tmp.<pid>, then moved into dir with adapter_config.json (what
 * marks a folder as a PEFT adapter) last. -1 + last_error() on failure (dir keeps no part
 * of the new adapter). */
static API int lora_save_adapter(LoraAdapter *ad, Model *m, const char *dir, const char *base_name) {
    AtomicDir d;
    if (make_dir(dir) != 0 || atomic_dir_begin(&d, dir, "adapter") != 0) return -1;
    if (lora_write_adapter_files(ad, m, d.tmp_dir, base_name) != 0) {
        atomic_dir_abort(&d);
        return error_in("saving the adapter into %s failed", dir);
    }
    return atomic_dir_commit_into(&d, dir, "adapter_config.json");
}

/* The RoPE an adapter was trained with, from the config.json we write beside it (none, as in
 * peft's own folders: c is left as it is): its rope settings and max_position_embeddings
 * replace c's, then target_ctx extends them as config_extend does. The config must describe
 * the same model (width, layers, vocabulary). 0, or -1 + last_error(). */
static API int lora_adapter_rope(const char *dir, Config *c, long target_ctx) {
    char path[4096];
    if (!file_exists(path_join(path, sizeof path, dir, "config.json"))) return 0;
    Json *j = json_parse_file(path);
    if (!j) return -1;
    Config a = *c;
    int rc = 0;
    if (json_get_number(j, "hidden_size", -1) != c->dim || json_get_number(j, "num_hidden_layers", -1) != c->n_layers ||
        json_get_number(j, "vocab_size", -1) != c->vocab_size)
        rc = set_error("%s describes another model than the base (hidden_size, num_hidden_layers or vocab_size differ)", path);
    else if (config_int(j, "max_position_embeddings", 0, c->max_pos, &a.max_pos) != 0 || a.max_pos <= 0 || config_parse_rope(&a, j) != 0) {
        char why[1024];
        snprintf(why, sizeof why, "%s", last_error());
        rc = set_error("%s: %s", path, why);
    }
    json_free(j);
    if (rc) return -1;
    *c = a;
    return config_extend(c, target_ctx, ROPE_EXTEND_AUTO);
}

/* The lora_dropout of an adapter folder's adapter_config.json (0 where it has none or cannot
 * be read: lora_load_adapter says why later), for choosing where a run goes before loading. */
static API double lora_adapter_dropout(const char *dir) {
    char path[4096];
    Json *cfg = json_parse_file(path_join(path, sizeof path, dir, "adapter_config.json"));
    double p = cfg ? json_get_number(cfg, "lora_dropout", 0.0) : 0.0;
    json_free(cfg);
    return p > 0 && p < 1 ? p : 0.0;
}

/* Reads an adapter folder (ours or peft's) for model m into ad (initialised here).
 * The embed/norm weights it carries (modules_to_save) are copied into m. Anything that
 * disagrees with the model (rank, targets, shapes, layer numbers, unknown tensors) or that
 * we do not implement (DoRA, per-module ranks, biases) is refused: -1 + last_error(),
 * and then m is unchanged. */
static API int lora_load_adapter(LoraAdapter *ad, Model *m, const char *dir) {
    memset(ad, 0, sizeof *ad);
    const Config *c = &m->cfg;
    char path[4096];
    Json *cfg = json_parse_file(path_join(path, sizeof path, dir, "adapter_config.json"));
    if (!cfg) return -1;
    int rc = 0;
    LoraConfig lc = lora_default_config();
    lc.train_embed = lc.train_norms = 0;
    const char *ptype = json_get_string(cfg, "peft_type", "LORA");
    const Json *r = json_get_type(cfg, "r", JSON_NUMBER), *alpha = json_get_type(cfg, "lora_alpha", JSON_NUMBER);
    const Json *targets = json_get(cfg, "target_modules"), *mts = json_get(cfg, "modules_to_save");
    const Json *rank_pattern = json_get(cfg, "rank_pattern"), *alpha_pattern = json_get(cfg, "alpha_pattern");
    const Json *layers_tt = json_get(cfg, "layers_to_transform");
    if (cfg->type != JSON_OBJECT) rc = set_error("%s is not a JSON object", path);
    else if (strcmp(ptype, "LORA") != 0) rc = set_error("%s: peft_type is %s, not LORA", path, ptype);
    else if (!r || r->number != floor(r->number) || r->number < 1 || r->number > 4096) rc = set_error("%s: \"r\" is missing or not an integer in 1..4096", path);
    else if (!alpha || !(alpha->number > 0)) rc = set_error("%s: \"lora_alpha\" is missing or not positive", path);
    else if (json_get_bool(cfg, "use_dora", 0)) rc = set_error("%s: DoRA adapters are not supported", path);
    else if (json_get_bool(cfg, "fan_in_fan_out", 0)) rc = set_error("%s: fan_in_fan_out adapters are not supported", path);
    else if (strcmp(json_get_string(cfg, "bias", "none"), "none") != 0) rc = set_error("%s: adapters with biases are not supported", path);
    else if ((rank_pattern && rank_pattern->type == JSON_OBJECT && rank_pattern->count) ||
             (alpha_pattern && alpha_pattern->type == JSON_OBJECT && alpha_pattern->count))
        rc = set_error("%s: per-module rank_pattern/alpha_pattern is not supported", path);
    else if (layers_tt && layers_tt->type != JSON_NULL) rc = set_error("%s: layers_to_transform is not supported", path);
    else if (!targets || targets->type != JSON_ARRAY || targets->count == 0)
        rc = set_error("%s: target_modules must be a list of module names (q_proj, ..., down_proj)", path);
    else {
        lc.rank = (int)r->number;
        lc.alpha = (float)alpha->number;
        lc.dropout = (float)json_get_number(cfg, "lora_dropout", 0.0);
        lc.targets = 0;
        for (size_t i = 0; i < targets->count && rc == 0; i++) {
            const Json *t = &targets->items[i];
            int found = -1;
            for (int w = 0; w < LORA_NUM_TARGETS && t->type == JSON_STRING; w++)
                if (strcmp(t->string, LORA_TARGET_NAMES[w]) == 0) found = w;
            if (found < 0) rc = set_error("%s: target module %s%s%s is not one of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj",
                                          path, t->type == JSON_STRING ? "'" : "", t->type == JSON_STRING ? t->string : "(not a string)", t->type == JSON_STRING ? "'" : "");
            else lc.targets |= 1u << found;
        }
        if (rc == 0 && mts && mts->type != JSON_NULL && mts->type != JSON_ARRAY) rc = set_error("%s: modules_to_save must be a list", path);
    }
    lc.use_rslora = json_get_bool(cfg, "use_rslora", 0);
    json_free(cfg);
    if (rc != 0) return -1;
    if (lc.dropout < 0.0f || lc.dropout >= 1.0f) lc.dropout = 0.0f;
    SafeTensors st;
    if (st_open(&st, path_join(path, sizeof path, dir, "adapter_model.safetensors")) != 0) return -1;
    /* the rank of every A and B, checked before the adapter's memory is allocated (a config
     * whose r disagrees with its tensors says so instead of running out of memory) */
    for (size_t i = 0; i < st.count; i++) {
        const StTensor *t = &st.tensors[i];
        size_t n = strlen(t->name);
        int is_a = n > 14 && !strcmp(t->name + n - 14, ".lora_A.weight"), is_b = n > 14 && !strcmp(t->name + n - 14, ".lora_B.weight");
        if ((is_a || is_b) && (t->ndim != 2 || t->shape[is_a ? 0 : 1] != (int64_t)lc.rank)) {
            char shape[160] = "";
            for (int k = 0; k < t->ndim; k++) snprintf(shape + strlen(shape), sizeof shape - strlen(shape), "%s%lld", k ? ", " : "", (long long)t->shape[k]);
            rc = set_error("%s: tensor '%s' has shape [%s], not one of rank r = %d as adapter_config.json gives (the adapter does not fit this model)",
                           st.path, t->name, shape, lc.rank);
            st_close(&st);
            return rc;
        }
    }
    if (lora_init(ad, c, &lc) != 0) { st_close(&st); return -1; }
    size_t n_slots = (size_t)c->n_layers * LORA_NUM_TARGETS * 2;
    const StTensor **lora_src = (const StTensor **)xcalloc(n_slots, sizeof *lora_src); /* [L*7*2] */
    PlusTensor *plus = (PlusTensor *)xmalloc(((size_t)2 * c->n_layers + 2) * sizeof(PlusTensor));
    size_t n_plus = lora_plus_tensors(m, NULL, plus);
    const StTensor **plus_src = (const StTensor **)xcalloc(n_plus, sizeof *plus_src);
    const StTensor *head_src = NULL; /* a trained lm_head (untied: copied in; tied: must come with the embedding) */
    size_t R = (size_t)lc.rank;
    for (size_t i = 0; i < st.count && rc == 0; i++) {
        const StTensor *t = &st.tensors[i];
        const char *name = t->name;
        if (strncmp(name, PEFT_PREFIX, strlen(PEFT_PREFIX)) != 0) { rc = set_error("%s: tensor '%s' is not a peft adapter tensor (no '" PEFT_PREFIX "' prefix)", st.path, name); break; }
        name += strlen(PEFT_PREFIX);
        int matched = 0;
        for (size_t k = 0; k < n_plus && !matched; k++)
            if (strcmp(name, plus[k].name) == 0) {
                matched = 1;
                int64_t shape[2] = {(int64_t)c->vocab_size, (int64_t)c->dim};
                if (plus[k].is_embed ? st_check_shape(t, 2, shape) : st_check_shape(t, 1, shape + 1)) {
                    rc = error_in("%s (the adapter does not fit this model)", st.path);
                }
                plus_src[k] = t;
            }
        if (matched) continue;
        if (strcmp(name, "lm_head.weight") == 0) { /* modules_to_save of the head */
            int64_t shape[2] = {(int64_t)c->vocab_size, (int64_t)c->dim};
            if (st_check_shape(t, 2, shape) != 0) {
                rc = error_in("%s (the adapter does not fit this model)", st.path);
                break;
            }
            head_src = t;
            continue;
        }
        /* model.layers.<l>.<self_attn|mlp>.<x_proj>.lora_<A|B>.weight */
        long layer = -1;
        int used = 0;
        char parent[16], proj[16], ab = 0, *after_layer = NULL;
        const char *layers_prefix = "model.layers.";
        if (strncmp(name, layers_prefix, strlen(layers_prefix)) == 0 && name[strlen(layers_prefix)] >= '0' && name[strlen(layers_prefix)] <= '9') {
            errno = 0;
            layer = strtol(name + strlen(layers_prefix), &after_layer, 10);
            if (errno) layer = LONG_MAX;
        }
        if (after_layer && sscanf(after_layer, ".%15[a-z_].%15[a-z_].lora_%c.weight%n", parent, proj, &ab, &used) == 3 && after_layer[used] == 0 &&
            (ab == 'A' || ab == 'B')) {
            int w = -1;
            for (int k = 0; k < LORA_NUM_TARGETS; k++)
                if (strcmp(proj, LORA_TARGET_NAMES[k]) == 0 && strcmp(parent, LORA_TARGET_PARENTS[k]) == 0) w = k;
            if (w < 0) { rc = set_error("%s: tensor '%s' adapts a module we do not know", st.path, t->name); break; }
            if (layer < 0 || layer >= c->n_layers) { rc = set_error("%s: tensor '%s' is for layer %ld but the model has %d layers", st.path, t->name, layer, c->n_layers); break; }
            if (!(lc.targets & (1u << w))) { rc = set_error("%s: tensor '%s' adapts %s, which the adapter config does not target", st.path, t->name, LORA_TARGET_NAMES[w]); break; }
            LoraPair *p = lora_pair(ad, layer, w);
            int64_t want[2] = {ab == 'A' ? (int64_t)R : (int64_t)p->out, ab == 'A' ? (int64_t)p->in : (int64_t)R};
            if (st_check_shape(t, 2, want) != 0) {
                rc = error_in("%s (rank %zu, model widths in %zu, out %zu: the adapter does not fit this model)", st.path, R, p->in, p->out);
                break;
            }
            lora_src[((size_t)layer * LORA_NUM_TARGETS + (size_t)w) * 2 + (ab == 'B')] = t;
            continue;
        }
        rc = set_error("%s: tensor '%s' is not a LoRA A/B of a known module nor an embed/norm weight", st.path, t->name);
    }
    for (int l = 0; l < c->n_layers && rc == 0; l++)
        for (int w = 0; w < LORA_NUM_TARGETS && rc == 0; w++)
            if ((lc.targets & (1u << w)) && (!lora_src[((size_t)l * LORA_NUM_TARGETS + (size_t)w) * 2] || !lora_src[((size_t)l * LORA_NUM_TARGETS + (size_t)w) * 2 + 1]))
                rc = set_error("%s: the adapter targets %s but has no lora_A/lora_B for layer %d", st.path, LORA_TARGET_NAMES[w], l);
    if (rc == 0 && head_src && c->tie_embeddings && !plus_src[0])
        rc = set_error("%s: the adapter trains the tied lm_head but carries no embed_tokens", st.path);
    if (rc == 0 && head_src && head_src->dtype != DT_F32 && head_src->dtype != DT_F16 && head_src->dtype != DT_BF16 && head_src->dtype != DT_F64)
        rc = set_error("%s: tensor '%s' is not floating-point", st.path, head_src->name);
    /* Everything checked: only now copy (so a refused adapter leaves the model as it was). */
    for (int l = 0; l < c->n_layers && rc == 0; l++)
        for (int w = 0; w < LORA_NUM_TARGETS && rc == 0; w++) {
            LoraPair *p = lora_pair(ad, l, w);
            if (!p->A) continue;
            if (st_to_f32(lora_src[((size_t)l * LORA_NUM_TARGETS + (size_t)w) * 2], p->A) != 0 ||
                st_to_f32(lora_src[((size_t)l * LORA_NUM_TARGETS + (size_t)w) * 2 + 1], p->B) != 0) rc = -1;
        }
    for (size_t k = 0; k < n_plus && rc == 0; k++) {
        if (!plus_src[k]) continue;
        if (plus_src[k]->dtype != DT_F32 && plus_src[k]->dtype != DT_F16 && plus_src[k]->dtype != DT_BF16 && plus_src[k]->dtype != DT_F64) {
            rc = set_error("%s: tensor '%s' is not floating-point", st.path, plus_src[k]->name);
            break;
        }
    }
    for (size_t k = 0; k < n_plus && rc == 0; k++) {
        if (!plus_src[k]) continue;
        if (st_to_f32(plus_src[k], plus[k].weight) != 0) rc = -1;
        if (plus[k].is_embed) ad->cfg.train_embed = 1; else ad->cfg.train_norms = 1;
    }
    if (rc == 0 && head_src && !c->tie_embeddings && !m->w.lm_head)
        rc = set_error("%s carries a trained lm_head, which the GPU path keeps frozen in bf16; use --device cpu", st.path);
    if (rc == 0 && head_src && !c->tie_embeddings && st_to_f32(head_src, m->w.lm_head) != 0) rc = -1;
    free(lora_src);
    free(plus_src);
    free(plus);
    st_close(&st);
    if (rc != 0) { lora_free(ad); return -1; } /* lora_free leaves last_error() alone */
    return 0;
}

/* What a run from a loaded adapter trains beside LoRA: embed and/or the norms (LoRA+: both,
 * whether or not the adapter carried them). Freezing a part the adapter carries trained would
 * leave it out of the adapter the run saves (PEFT's modules_to_save are what was trained),
 * so that is refused: -1 + last_error(), the adapter unchanged. */
static API int lora_set_trained(LoraAdapter *ad, int train_embed, int train_norms, const char *dir) {
    int drops_embed = ad->cfg.train_embed && !train_embed, drops_norms = ad->cfg.train_norms && !train_norms;
    if (drops_embed || drops_norms) {
        const char *flag = drops_embed ? "--no-train-embed" : "--no-train-norms";
        return set_error("the adapter %s carries %s (modules_to_save), which %s would leave out of the adapter this run saves; "
                         "drop %s, or start from an adapter without %s", dir, drops_embed ? "a trained embed_tokens" : "trained norm weights",
                         flag, flag, drops_embed ? "it" : "them");
    }
    ad->cfg.train_embed = train_embed;
    ad->cfg.train_norms = train_norms;
    return 0;
}

/* ---------------------------------------------------------------------------------------
 * S2-Attn group size and one training step
 * ------------------------------------------------------------------------------------- */

/* Gradients for a LoRA+ run: only what 02's backward writes when grads_for_frozen_linears
 * is 0 (embed [V, D], the norms [D], and the head when it is tied, which is embed), so a 7B
 * model needs 0.5 GB here instead of a second copy of every weight. The projection and an
 * untied head's pointers stay NULL. grads_zero() and params_free() work on it as usual. */
static void lora_grads_alloc(Grads *g, const Config *c) { params_alloc_plus(g, c); }

/* Everything one LoRA+ training run holds on the CPU: 05's trainer keeps one (its GPU step
 * uses the optimizer's fp32 masters and moments, not the activations). */
typedef struct {
    Model *model;      /* base weights (frozen) plus the LoRA+ embed/norms (trained in place) */
    Grads grads;       /* lora_grads_alloc: embed, norms (and a tied head) only */
    Activations act;   /* planned for B x N; none when B * N is 0 */
    LoraAdapter *ad;
    AdamW opt;         /* every trainable tensor, its gradient and moments */
    RunOptions run;    /* s2_group, the LoRA hook, no dW for the frozen linears */
} LoraTrainer;

static API void lora_trainer_init(LoraTrainer *tr, Model *m, LoraAdapter *ad, const AdamWConfig *oc, size_t B, size_t N, size_t s2_group) {
    memset(tr, 0, sizeof *tr);
    tr->model = m;
    tr->ad = ad;
    lora_grads_alloc(&tr->grads, &m->cfg);
    if (B * N > 0) act_plan(&tr->act, &m->cfg, B, N, 1);
    tr->opt.cfg = *oc;
    lora_register_params(&tr->opt, ad, m, &tr->grads);
    tr->run.s2_group = s2_group;
    tr->run.grads_for_frozen_linears = 0;
    tr->run.hook = &ad->hook;
}

/* Frees the host gradients of embed and the norms, for a run whose step keeps its own (05's
 * GPU step: 0.5 GB of host memory at 7B); their grad pointers in the optimizer become NULL. */
static API void lora_trainer_drop_plus_grads(LoraTrainer *tr) {
    const float *lo = tr->grads.memory, *hi = tr->grads.memory + tr->grads.count;
    for (size_t k = 0; k < tr->opt.count; k++)
        if (tr->opt.params[k].grad >= lo && tr->opt.params[k].grad < hi) tr->opt.params[k].grad = NULL;
    params_free(&tr->grads);
}

static API void lora_trainer_free(LoraTrainer *tr) {
    params_free(&tr->grads);
    if (tr->act.memory) act_free(&tr->act);
    adamw_free(&tr->opt);
    memset(tr, 0, sizeof *tr);
}

static void lora_trainer_zero_grads(LoraTrainer *tr) {
    grads_zero(&tr->grads);
    lora_zero_grads(tr->ad);
}

/* Forward and backward of one micro-batch tokens/targets [B*N], the gradients added to what
 * is there; returns its loss (no backward when the loss is not finite). */
static float lora_trainer_accumulate(LoraTrainer *tr, const int32_t *tokens, const int32_t *targets, size_t B, size_t N) {
    tr->ad->training = 1;
    float loss = model_forward(tr->model, &tr->act, tokens, targets, B, N, &tr->run);
    if (isfinite(loss)) model_backward(tr->model, &tr->act, &tr->grads, tokens, targets, B, N, &tr->run);
    return loss;
}

/* Global L2 norm of every trainable gradient (for clipping). */
static API double lora_trainer_grad_norm(const LoraTrainer *tr) {
    double sum = 0;
    for (size_t k = 0; k < tr->opt.count; k++) {
        const TrainParam *p = &tr->opt.params[k];
        double s = 0;
#pragma omp parallel for reduction(+ : s) schedule(static)
        for (size_t i = 0; i < p->numel; i++) s += (double)p->grad[i] * p->grad[i];
        sum += s;
    }
    return sqrt(sum);
}

static API void lora_trainer_scale_grads(LoraTrainer *tr, float scale) {
    for (size_t k = 0; k < tr->opt.count; k++) {
        TrainParam *p = &tr->opt.params[k];
        for (size_t i = 0; i < p->numel; i++) p->grad[i] *= scale;
    }
}

/* Forward, backward and one AdamW step on tokens/targets [B*N]; returns the loss. */
static API float lora_train_step(LoraTrainer *tr, const int32_t *tokens, const int32_t *targets, size_t B, size_t N) {
    lora_trainer_zero_grads(tr);
    float loss = lora_trainer_accumulate(tr, tokens, targets, B, N);
    adamw_step(&tr->opt, adamw_lr_at(&tr->opt.cfg, tr->opt.steps_taken));
    return loss;
}

/* ---------------------------------------------------------------------------------------
 * A merged HF model folder transformers loads (03's --merge-out in fp32, 06's --export in bf16):
 *   config.json       the base's, with the RoPE the model ran with as "rope_scaling" (linear:
 *                     {"type": "linear", "factor": s}; yarn, llama3, dynamic: their parameters;
 *                     null for plain RoPE) and "max_position_embeddings" the base's own (as
 *                     LongLoRA saves its models: the context is max_position_embeddings x s),
 *                     "torch_dtype" the weights' dtype
 *   model.safetensors or model-0000k-of-0000n.safetensors + model.safetensors.index.json
 *                     when the weights exceed the shard size: HF's tensor names
 *   tokenizer files   copied as they are
 * ------------------------------------------------------------------------------------- */

/* Writes a parsed JSON value back out (2-space indents; integers stay integers). */
static void json_write_value(FILE *f, const Json *v, int indent) {
    switch (v->type) {
    case JSON_NULL: fputs("null", f); break;
    case JSON_BOOL: fputs(v->boolean ? "true" : "false", f); break;
    case JSON_NUMBER:
        if (v->number == floor(v->number) && fabs(v->number) < 1e15) fprintf(f, "%.0f", v->number);
        else { /* the shortest form that reads back the same */
            char buf[32];
            snprintf(buf, sizeof buf, "%.15g", v->number);
            if (strtod(buf, NULL) != v->number) snprintf(buf, sizeof buf, "%.17g", v->number);
            fputs(buf, f);
        }
        break;
    case JSON_STRING: json_write_string(f, v->string); break;
    case JSON_ARRAY:
    case JSON_OBJECT:
        fputc(v->type == JSON_ARRAY ? '[' : '{', f);
        for (size_t i = 0; i < v->count; i++) {
            fprintf(f, "%s\n%*s", i ? "," : "", indent + 2, "");
            if (v->type == JSON_OBJECT) { json_write_string(f, v->keys[i]); fputs(": ", f); }
            json_write_value(f, &v->items[i], indent + 2);
        }
        if (v->count) fprintf(f, "\n%*s", indent, "");
        fputc(v->type == JSON_ARRAY ? ']' : '}', f);
        break;
    }
}

/* "rope_scaling": the RoPE c runs with, as transformers reads it back (both "type" and
 * "rope_type" for transformers 4 and 5; yarn's original_max_position_embeddings only when it
 * differs from max_position_embeddings, so transformers 4 does not derive its factor from them). */
static void write_rope_scaling(FILE *f, const Config *c) {
    const RopeParams *r = &c->rope;
    const char *t = ROPE_TYPE_NAMES[c->rope_type];
    if (c->rope_type == ROPE_LINEAR && c->rope_factor == 1.0f) { fputs("  \"rope_scaling\": null", f); return; }
    fprintf(f, "  \"rope_scaling\": {\"type\": \"%s\", \"rope_type\": \"%s\", \"factor\": %.9g", t, t, (double)c->rope_factor);
    if (c->rope_type == ROPE_LLAMA3)
        fprintf(f, ", \"low_freq_factor\": %.9g, \"high_freq_factor\": %.9g, \"original_max_position_embeddings\": %d",
                (double)r->low_freq_factor, (double)r->high_freq_factor, rope_orig_max_pos(c));
    if (c->rope_type == ROPE_YARN) {
        if (rope_orig_max_pos(c) != c->max_pos) fprintf(f, ", \"original_max_position_embeddings\": %d", rope_orig_max_pos(c));
        if (r->beta_fast > 0) fprintf(f, ", \"beta_fast\": %.9g", (double)r->beta_fast);
        if (r->beta_slow > 0) fprintf(f, ", \"beta_slow\": %.9g", (double)r->beta_slow);
        if (r->attention_factor > 0) fprintf(f, ", \"attention_factor\": %.9g", (double)r->attention_factor);
        if (r->mscale > 0) fprintf(f, ", \"mscale\": %.9g", (double)r->mscale);
        if (r->mscale_all_dim > 0) fprintf(f, ", \"mscale_all_dim\": %.9g", (double)r->mscale_all_dim);
        if (r->no_truncate) fputs(", \"truncate\": false", f);
    }
    fputc('}', f);
}

/* config.json for a model folder (an export) or beside an adapter: the base's keys, then ours
 * (max_position_embeddings, rope_theta, rope_scaling, torch_dtype: dtype, or with DT_COUNT the
 * base's own dtype keys kept). */
static int write_export_config(const char *base_dir, const char *out_dir, const Config *c, DType dtype) {
    char path[4600];
    Json *j = NULL;
    if (base_dir) {
        j = json_parse_file(path_join(path, sizeof path, base_dir, "config.json"));
        if (!j) return -1;
    }
    AtomicFile af;
    if (atomic_open(&af, path_join(path, sizeof path, out_dir, "config.json")) != 0) { json_free(j); return -1; }
    FILE *f = af.f;
    static const char *const ours[] = {"rope_scaling", "rope_parameters", "max_position_embeddings", "rope_theta", "torch_dtype", "dtype"};
    size_t n = 0, n_ours = dtype == DT_COUNT ? 4 : 6;
    fputc('{', f);
    for (size_t i = 0; j && i < j->count; i++) {
        int skip = 0;
        for (size_t k = 0; k < n_ours; k++) skip |= strcmp(j->keys[i], ours[k]) == 0;
        if (skip) continue;
        fprintf(f, "%s\n  ", n++ ? "," : "");
        json_write_string(f, j->keys[i]);
        fputs(": ", f);
        json_write_value(f, &j->items[i], 2);
    }
    if (!j) /* random weights: a complete config of the architecture */
        fprintf(f, "\n  \"architectures\": [\"%s\"],\n  \"model_type\": \"%s\",\n  \"hidden_size\": %d,\n"
                   "  \"intermediate_size\": %d,\n  \"num_hidden_layers\": %d,\n  \"num_attention_heads\": %d,\n"
                   "  \"num_key_value_heads\": %d,\n  \"head_dim\": %d,\n  \"vocab_size\": %d,\n  \"rms_norm_eps\": %.9g,\n"
                   "  \"tie_word_embeddings\": %s,\n  \"hidden_act\": \"silu\"%s",
                ARCH_CLASSES[c->arch], ARCH_MODEL_TYPES[c->arch], c->dim, c->ffn_dim, c->n_layers, c->n_heads, c->n_kv_heads, c->head_dim,
                c->vocab_size, (double)c->rms_eps, c->tie_embeddings ? "true" : "false",
                c->arch == ARCH_LLAMA ? "" : ",\n  \"sliding_window\": null"), n = 1;
    fprintf(f, "%s\n  \"max_position_embeddings\": %d,\n  \"rope_theta\": %.9g,\n", n ? "," : "", c->max_pos, (double)c->rope_theta);
    write_rope_scaling(f, c);
    if (dtype == DT_COUNT) fputs("\n}\n", f);
    else fprintf(f, ",\n  \"torch_dtype\": \"%s\"\n}\n", dtype == DT_BF16 ? "bfloat16" : dtype == DT_F16 ? "float16" : "float32");
    json_free(j);
    return atomic_commit(&af);
}

/* The files an export writes: --overwrite replaces a folder that holds only these. */
static const char *const EXPORT_COPIES[] = {"tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                                            "special_tokens_map.json", "generation_config.json"};
static int is_export_file(const char *name) {
    int a, b, used = 0;
    if (!strcmp(name, "config.json") || !strcmp(name, "model.safetensors") || !strcmp(name, "model.safetensors.index.json")) return 1;
    if (sscanf(name, "model-%5d-of-%5d.safetensors%n", &a, &b, &used) == 2 && name[used] == 0) return 1;
    for (size_t i = 0; i < sizeof EXPORT_COPIES / sizeof *EXPORT_COPIES; i++)
        if (!strcmp(name, EXPORT_COPIES[i])) return 1;
    return 0;
}

/* Whether out_dir may receive an export: it does not exist or is empty; or, with overwrite,
 * it holds a previous export (only files an export writes), which the new one replaces
 * whole. -1 + one sentence otherwise. Programs call it before loading the model, and
 * export_merged again before writing. */
static API int export_check_target(const char *out_dir, int overwrite) {
    char b[PATH_MSG_MAX + 1];
    struct stat st;
    if (stat(out_dir, &st) != 0) return 0;
    if (!S_ISDIR(st.st_mode)) return set_error("the export target %s exists and is not a folder", path_for_message(out_dir, b));
    DIR *d = opendir(out_dir);
    if (!d) return set_error("cannot open the folder %s: %s", path_for_message(out_dir, b), strerror(errno));
    int rc = 0;
    for (struct dirent *e; rc == 0 && (e = readdir(d));) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        if (!overwrite)
            rc = set_error("the export folder %s is not empty (it holds %s), and an export into it would mix with what is there; "
                           "choose a new folder, or pass --overwrite to replace a previous export", path_for_message(out_dir, b), e->d_name);
        else if (!is_export_file(e->d_name))
            rc = set_error("the export folder %s holds %s, which an export does not write; --overwrite replaces only a previous "
                           "export, so choose another folder", path_for_message(out_dir, b), e->d_name);
    }
    closedir(d);
    return rc;
}

/* Writes m's weights (the adapter already merged in) as shards of at most shard_bytes (a
 * tensor is never split) in dtype (DT_BF16, DT_F16 or DT_F32), the index when there is more than
 * one, the config, and the base's tokenizer files (base_dir NULL: random weights, a
 * complete config written from m's). The folder appears whole or not at all: it is written
 * as a temporary folder beside it and renamed into place; a previous export there is
 * replaced only with overwrite (export_check_target). -1 + last_error() on failure, and then
 * out_dir is as it was. */
static int export_write_files(const Model *m, const char *base_dir, const char *out_dir, size_t shard_bytes, DType dtype);
static API int export_merged(const Model *m, const char *base_dir, const char *out_dir, size_t shard_bytes, DType dtype, int overwrite) {
    if (dtype != DT_BF16 && dtype != DT_F16 && dtype != DT_F32) return set_error("an export is written in bf16, fp16 or fp32");
    if (export_check_target(out_dir, overwrite) != 0) return -1;
    char full[PATH_MAX + 4096], b[PATH_MSG_MAX + 1];
    resolve_path(out_dir, full, sizeof full);
    char *slash = strrchr(full, '/');
    if (!slash || !slash[1]) return set_error("%s cannot be an export folder; name a folder", out_dir);
    *slash = 0;
    AtomicDir d;
    if (atomic_dir_begin(&d, full[0] ? full : "/", slash + 1) != 0) return -1;
    if (export_write_files(m, base_dir, d.tmp_dir, shard_bytes, dtype) != 0) {
        atomic_dir_abort(&d);
        return error_in("the export to %s failed, leaving it as it was", path_for_message(out_dir, b));
    }
    return atomic_dir_commit(&d);
}

static int export_write_files(const Model *m, const char *base_dir, const char *out_dir, size_t shard_bytes, DType dtype) {
    if (write_export_config(base_dir, out_dir, &m->cfg, dtype) != 0) return -1;
    size_t n = params_list(&m->w, &m->cfg, NULL);
    ParamRef *refs = (ParamRef *)xmalloc(n * sizeof(ParamRef));
    params_list(&m->w, &m->cfg, refs);
    size_t *shard_of = (size_t *)xmalloc(n * sizeof(size_t)); /* [n] */
    size_t n_shards = 1, in_shard = 0, total = 0;
    for (size_t i = 0; i < n; i++) {
        size_t bytes = (size_t)refs[i].shape[0] * (size_t)refs[i].shape[1] * DTYPE_SIZES[dtype];
        if (in_shard > 0 && in_shard + bytes > shard_bytes) { n_shards++; in_shard = 0; }
        shard_of[i] = n_shards - 1;
        in_shard += bytes;
        total += bytes;
    }
    int rc = 0;
    char path[4600], name[64];
    for (size_t s = 0; s < n_shards && rc == 0; s++) {
        StWriter sw = {0};
        sw.metadata_json = (char *)"{\"format\":\"pt\"}";
        uint16_t **bufs = (uint16_t **)xcalloc(n, sizeof(uint16_t *));
        for (size_t i = 0; i < n; i++) {
            if (shard_of[i] != s) continue;
            int64_t shape[2] = {refs[i].shape[0], refs[i].shape[1]};
            if (dtype == DT_F32) { st_writer_add(&sw, refs[i].name, DT_F32, refs[i].ndim, shape, refs[i].data); continue; }
            size_t numel = (size_t)refs[i].shape[0] * (size_t)refs[i].shape[1];
            bufs[i] = (uint16_t *)xmalloc(numel * sizeof(uint16_t)); /* [numel] the tensor in bf16 / fp16 */
            for (size_t k = 0; k < numel; k++) bufs[i][k] = dtype == DT_BF16 ? f32_to_bf16(refs[i].data[k]) : f32_to_f16(refs[i].data[k]);
            st_writer_add(&sw, refs[i].name, dtype, refs[i].ndim, shape, bufs[i]);
        }
        if (n_shards == 1) snprintf(name, sizeof name, "model.safetensors");
        else snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", s + 1, n_shards);
        rc = st_write(&sw, path_join(path, sizeof path, out_dir, name));
        st_writer_free(&sw);
        for (size_t i = 0; i < n; i++) free(bufs[i]);
        free(bufs);
    }
    if (rc == 0 && n_shards > 1) {
        AtomicFile af;
        if (atomic_open(&af, path_join(path, sizeof path, out_dir, "model.safetensors.index.json")) != 0) rc = -1;
        else {
            fprintf(af.f, "{\n  \"metadata\": {\"total_size\": %zu},\n  \"weight_map\": {", total);
            for (size_t i = 0; i < n; i++) {
                fprintf(af.f, "%s\n    ", i ? "," : "");
                json_write_string(af.f, refs[i].name);
                fprintf(af.f, ": \"model-%05zu-of-%05zu.safetensors\"", shard_of[i] + 1, n_shards);
            }
            fputs("\n  }\n}\n", af.f);
            rc = atomic_commit(&af);
        }
    }
    for (size_t i = 0; rc == 0 && base_dir && i < sizeof EXPORT_COPIES / sizeof *EXPORT_COPIES; i++) {
        char src[4096];
        if (!file_exists(path_join(src, sizeof src, base_dir, EXPORT_COPIES[i]))) continue;
        size_t len;
        char *data = read_file(src, &len);
        if (!data || write_file_atomic(path_join(path, sizeof path, out_dir, EXPORT_COPIES[i]), data, len) != 0) rc = -1;
        free(data);
    }
    free(shard_of);
    free(refs);
    return rc;
}

/* ---------------------------------------------------------------------------------------
 * The program
 * ------------------------------------------------------------------------------------- */
#if STAGE == 3

static void usage(void) {
    fprintf(stderr,
            "usage: 03_lora --model DIR (--text-file F | --tokens F) [--steps K] [--ctx N] [--batch B] [--s2]\n"
            "               [--s2-ratio R] [--rank R] [--alpha A] [--dropout P] [--targets q,k,v,o,gate,up,down]\n"
            "               [--no-train-embed] [--no-train-norms] [--lr LR] [--warmup W] [--beta1 B1] [--beta2 B2]\n"
            "               [--eps E] [--weight-decay WD] [--seed S]\n"
            "               [--load-adapter DIR] [--save-adapter DIR] [--merge-out DIR [--overwrite]]\n"
            "  K CPU training steps of LoRA+ (default 10; 0 with --load-adapter), each on B packed\n"
            "  sequences of N tokens (default 256); prints \"step <k> loss <float>\" per step.\n"
            "  --s2 trains with S2-Attn, group N * ratio (default 1/4). --merge-out writes the base\n"
            "  model with the adapter merged in (W += alpha/R B A) as a HF model folder (a new or empty\n"
            "  one; --overwrite replaces a previous export).\n");
    exit(2);
}

int main(int argc, char **argv) {
    const char *model_dir = NULL, *text_file = NULL, *token_file = NULL;
    const char *save_dir = NULL, *load_dir = NULL, *merge_dir = NULL;
    long steps = -1, ctx = 256, batch = 1;
    int use_s2 = 0, overwrite = 0;
    double s2_ratio = 0.25;
    LoraConfig lc = lora_default_config();
    AdamWConfig oc = adamw_default_config();
    for (int i = 1; i < argc; i++) {
        const char *f = argv[i];
        if (!strcmp(f, "--s2")) { use_s2 = 1; continue; }
        if (!strcmp(f, "--no-train-embed")) { lc.train_embed = 0; continue; }
        if (!strcmp(f, "--no-train-norms")) { lc.train_norms = 0; continue; }
        if (!strcmp(f, "--overwrite")) { overwrite = 1; continue; }
        if (!strcmp(f, "-h") || !strcmp(f, "--help") || i + 1 >= argc) usage();
        const char *v = argv[++i];
        if (!strcmp(f, "--model")) model_dir = v;
        else if (!strcmp(f, "--text-file")) text_file = v;
        else if (!strcmp(f, "--tokens")) token_file = v;
        else if (!strcmp(f, "--steps")) steps = need_long_arg(f, v, 0, LONG_MAX);
        else if (!strcmp(f, "--ctx")) ctx = need_long_arg(f, v, 2, LONG_MAX);
        else if (!strcmp(f, "--batch")) batch = need_long_arg(f, v, 1, LONG_MAX);
        else if (!strcmp(f, "--s2-ratio")) { s2_ratio = need_double_arg(f, v, -HUGE_VAL, HUGE_VAL); use_s2 = 1; }
        else if (!strcmp(f, "--rank")) lc.rank = (int)need_long_arg(f, v, 1, LONG_MAX);
        else if (!strcmp(f, "--alpha")) lc.alpha = (float)need_double_arg(f, v, -HUGE_VAL, HUGE_VAL);
        else if (!strcmp(f, "--dropout")) lc.dropout = (float)need_double_arg(f, v, -HUGE_VAL, HUGE_VAL);
        else if (!strcmp(f, "--targets")) { if (lora_parse_targets(v, &lc.targets) != 0) die("%s", last_error()); }
        else if (!strcmp(f, "--lr")) oc.lr = (float)need_double_arg(f, v, -HUGE_VAL, HUGE_VAL);
        else if (!strcmp(f, "--warmup")) oc.warmup_steps = (int)need_long_arg(f, v, 0, LONG_MAX);
        else if (!strcmp(f, "--beta1")) oc.beta1 = (float)need_double_arg(f, v, -HUGE_VAL, HUGE_VAL);
        else if (!strcmp(f, "--beta2")) oc.beta2 = (float)need_double_arg(f, v, -HUGE_VAL, HUGE_VAL);
        else if (!strcmp(f, "--eps")) oc.eps = (float)need_double_arg(f, v, -HUGE_VAL, HUGE_VAL);
        else if (!strcmp(f, "--weight-decay")) oc.weight_decay = (float)need_double_arg(f, v, -HUGE_VAL, HUGE_VAL);
        else if (!strcmp(f, "--seed")) lc.seed = (uint64_t)need_long_arg(f, v, 0, LONG_MAX);
        else if (!strcmp(f, "--save-adapter")) save_dir = v;
        else if (!strcmp(f, "--load-adapter")) load_dir = v;
        else if (!strcmp(f, "--merge-out")) merge_dir = v;
        else usage();
    }
    if (!model_dir) usage();
    if (steps < 0) steps = load_dir ? 0 : 10;
    if (steps > 0 && !text_file && !token_file) die("training needs --text-file or --tokens");
    if (!(oc.beta1 >= 0 && oc.beta1 < 1 && oc.beta2 >= 0 && oc.beta2 < 1 && oc.eps > 0 && oc.lr >= 0 && oc.weight_decay >= 0))
        die("AdamW needs 0 <= beta1, beta2 < 1, eps > 0, lr >= 0 and weight decay >= 0");
    size_t N = (size_t)ctx, B = (size_t)batch, G = 0;
    if (use_s2 && s2_group_size(N, s2_ratio, &G) != 0) die("%s", last_error());
    /* outputs never overwrite inputs; a merged export goes to a new folder (or replaces one) */
    const NamedPath inputs[] = {{"--model", model_dir}, {"--text-file", text_file}, {"--tokens", token_file}, {"--load-adapter", load_dir}};
    if (check_output_path("--save-adapter", save_dir, 0, inputs, 4) != 0 || check_output_path("--merge-out", merge_dir, 1, inputs, 4) != 0 ||
        (merge_dir && export_check_target(merge_dir, overwrite) != 0))
        die("%s", last_error());

    Model model;
    model_load(&model, model_dir, ctx);
    const Config *c = &model.cfg;
    LoraAdapter ad;
    if (load_dir) {
        if (lora_load_adapter(&ad, &model, load_dir) != 0 || lora_set_trained(&ad, lc.train_embed, lc.train_norms, load_dir) != 0)
            die("%s", last_error());
        ad.cfg.seed = lc.seed;
        rng_seed(&ad.drop_rng, lc.seed ^ 0x5deece66dull);
    } else if (lora_init(&ad, c, &lc) != 0) die("%s", last_error());

    if (steps > 0) {
        /* the training text: BOS + the tokens, packed into windows of N + 1 (inputs and shifted targets) */
        int32_t *ids = NULL;
        size_t n_ids = 0;
        if (token_file) {
            ids = tokfile_read(token_file, &n_ids);
            if (!ids) die("%s", last_error());
        } else {
            Tokenizer tok;
            if (tok_load(&tok, model_dir) != 0) die("%s", last_error());
            size_t len;
            char *text = read_file(text_file, &len);
            if (!text) die("%s", last_error());
            ids = tok_encode(&tok, text, len, 1, &n_ids);
            free(text);
            tok_free(&tok);
        }
        if (n_ids < N + 1) die("the training text has %zu tokens; one sequence of --ctx %zu needs %zu", n_ids, N, N + 1);
        for (size_t t = 0; t < n_ids; t++)
            if (ids[t] < 0 || ids[t] >= c->vocab_size) die("token %zu has id %d, outside the model's vocabulary of %d", t, ids[t], c->vocab_size);
        LoraTrainer tr;
        lora_trainer_init(&tr, &model, &ad, &oc, B, N, G);
        size_t n_trainable = 0;
        for (size_t k = 0; k < tr.opt.count; k++) n_trainable += tr.opt.params[k].numel;
        fprintf(stderr, "03_lora: %zu base parameters (frozen), %zu trainable in %zu tensors; R=%d alpha=%g; N=%zu B=%zu; RoPE factor %g\n",
                model.w.count, n_trainable, tr.opt.count, ad.cfg.rank, (double)ad.cfg.alpha, N, B, (double)c->rope_factor);
        if (G) fprintf(stderr, "03_lora: S2-Attn, group %zu, shift %zu\n", G, G / 2);
        else fprintf(stderr, "03_lora: full causal attention\n");
        int32_t *tokens = (int32_t *)xmalloc(B * N * sizeof(int32_t)), *targets = (int32_t *)xmalloc(B * N * sizeof(int32_t));
        size_t cursor = 0, windows = (n_ids - 1) / N;
        double t0 = now_seconds();
        for (long s = 0; s < steps; s++) {
            for (size_t b = 0; b < B; b++) {
                size_t start = (cursor++ % windows) * N;
                memcpy(tokens + b * N, ids + start, N * sizeof(int32_t));
                memcpy(targets + b * N, ids + start + 1, N * sizeof(int32_t));
            }
            float loss = lora_train_step(&tr, tokens, targets, B, N);
            printf("step %ld loss %.6f\n", s + 1, (double)loss);
            fflush(stdout);
        }
        double dt = now_seconds() - t0;
        fprintf(stderr, "03_lora: %ld steps in %.2f s, %.1f tokens/s\n", steps, dt, (double)(steps * (long)(B * N)) / dt);
        free(tokens); free(targets); free(ids);
        lora_trainer_free(&tr);
    }
    if (save_dir) {
        if (lora_save_adapter(&ad, &model, save_dir, model_dir) != 0) die("%s", last_error());
        fprintf(stderr, "03_lora: adapter saved to %s\n", save_dir);
    }
    if (merge_dir) {
        lora_merge(&ad, &model);
        if (export_merged(&model, model_dir, merge_dir, (size_t)5e9, DT_F32, overwrite) != 0) die("%s", last_error());
        fprintf(stderr, "03_lora: merged model written to %s\n", merge_dir);
    }
    lora_free(&ad);
    model_free(&model);
    return 0;
}
#endif /* STAGE == 3 */
