/* 02_model.c: a LLaMA-family model, forward and backward, in plain C and fp32.
 *
 * Teaches: what a LLaMA layer computes, one small function per piece: RMSNorm, the q/k/v
 * projections (with Qwen2's biases), RoPE with every scaling transformers applies to LLaMA-family
 * models (linear position interpolation, dynamic NTK, YaRN, LLaMA-3's; HF's rotate-half layout), causal attention
 * with grouped-query heads (and S2-Attn's segment bounds, see s2_first_key in common.h),
 * the o projection and residual, SwiGLU, a tied or untied head and cross-entropy with an
 * ignore label; then the backward pass of every one of them, so every parameter (and the
 * input) gets its gradient. It reads a HuggingFace model folder directly (config.json and
 * model.safetensors or shards + model.safetensors.index.json, in bf16, fp16 or fp32).
 * Runs on: any CPU; OpenMP spreads the matmuls and the attention over the cores.
 * Checked against: HF transformers (tests/ref/make_model_fixtures.py writes the fixtures,
 * tests/test_model.c compares logits, loss and every gradient).
 * Leaves out: the GPU (stage 04), LoRA and the optimizer (stage 03), KV caching (stage 06),
 * bf16 compute (this is the fp32 reference every faster path is checked against).
 *
 * The interface later stages build on:
 *   Config        the model's shape from config.json (LLaMA, Mistral, Qwen2: architecture,
 *                 q/k/v biases, sliding window), and its RoPE: the type and parameters
 *                 config.json gives (default, linear, dynamic, yarn, llama3, both spellings)
 *                 and those actually used (config_extend: a target context longer than the
 *                 model's raises the factor, linearly or by yarn, see docs/DESIGN.md).
 *                 rope_inv_freq() is the one place RoPE's frequencies are computed.
 *   Params        every weight as an fp32 array (layout below, HF's [out, in] for linears);
 *                 Grads is the same struct holding gradients (grads_alloc, zeroed, +=).
 *                 params_list() names every tensor as HF does; proj_shape()/proj_weight()
 *                 give projection `which` of a layer.
 *   Model         a Config and its Params. model_load(m, dir, target_ctx) dies with one
 *                 sentence on bad input; model_try_load() returns -1 + last_error() instead.
 *                 model_init_random(m, cfg, seed, std) makes a random model; model_free().
 *   Activations   every buffer a forward (and backward) needs, planned up front for B x N
 *                 by act_plan(); act->bytes says how much. Plan with for_training = 0 and
 *                 the layers share one set of buffers (enough for evaluation).
 *   RunOptions    s2_group: S2-Attn group size G (0 = full causal attention; N % G == 0);
 *                 grads_for_frozen_linears: 0 skips dW of the 7 projections and an untied
 *                 lm_head (only dX flows: LoRA training); hook: see LinearHook.
 *   LinearHook    after y = x W^T of projection `which` (0..6 = q,k,v,o,gate,up,down) of a
 *                 layer, the forward calls hook->forward(ctx, layer, which, x, T, y), which
 *                 may add to y; the backward, after dx = dy W, calls hook->backward(ctx,
 *                 layer, which, x, dy, T, dx), which may add to dx (and keep its own grads).
 *   model_forward(m, act, tokens[B*N], targets[B*N] or NULL, B, N, opts) returns the mean
 *                 cross-entropy over targets that are not IGNORE_INDEX (-100); targets[t] is
 *                 the token expected after position t (already shifted). Logits stay in
 *                 act->logits [B*N, V].
 *   model_backward(m, act, grads, tokens, targets, B, N, opts) after a forward with the same
 *                 arguments: accumulates into grads (NULL: only the hook's gradients) and
 *                 leaves dLoss/d(embedding output) in act->d_resid. It overwrites act->logits
 *                 with dLoss/dlogits. A tied head is the (trainable) embedding, so its dW
 *                 always lands in grads->embed, whatever grads_for_frozen_linears says.
 *   The pieces (rmsnorm_*, rope_*, attention_*, swiglu_*, cross_entropy_*, matmul_*) are
 *   separate functions: stage 04's kernels are checked against them.
 *
 * CLI:
 *   ./02_model --model DIR --text-file F [--ctx N] [--window W]
 *       BOS + the tokenized text, in windows of W tokens (default: the model's context,
 *       config_context); prints the mean next-token loss over
 *       all predicted positions as a last line "loss <float> ppl <float> tokens <count>".
 *   ./02_model --model DIR --tokens F ...        the same over a token file (common.h)
 *   ./02_model --model DIR --top K --text "..."  the K likeliest next tokens
 *   ./02_model --bench N [--model DIR] [--batch B] [--train]
 *       forward tokens/s (a random SmolLM2-135M-shaped model without --model).
 */
#ifndef STAGE
#define STAGE 2
#endif
#include "01_tokenize.c"
#ifdef _OPENMP
#include <omp.h>
static int max_threads(void) { return omp_get_max_threads(); }
static int thread_id(void) { return omp_get_thread_num(); }
#else
static int max_threads(void) { return 1; }
static int thread_id(void) { return 0; }
#endif

#define IGNORE_INDEX (-100)

/* ---------------------------------------------------------------------------------------
 * Config: the model's shape, from config.json
 * ------------------------------------------------------------------------------------- */

/* RoPE: how the per-dimension inverse frequencies are made (rope_inv_freq below, exactly as
 * transformers' modeling_rope_utils.py computes them). ROPE_LINEAR with factor 1 is the
 * plain RoPE of config.json's "default". */
typedef enum { ROPE_LINEAR, ROPE_DYNAMIC, ROPE_YARN, ROPE_LLAMA3 } RopeType;
static const char *const ROPE_TYPE_NAMES[] = {"linear", "dynamic", "yarn", "llama3"};
/* How a target context longer than the model's is reached (05_train --rope-scaling): AUTO
 * keeps a linear or yarn model's own kind and stretches a plain one linearly (LongLoRA's). */
typedef enum { ROPE_EXTEND_AUTO, ROPE_EXTEND_LINEAR, ROPE_EXTEND_YARN } RopeExtend;

typedef struct {          /* the parameters some RoPE types read (0: transformers' default) */
    int orig_max_pos;     /* yarn, llama3: original_max_position_embeddings (0: max_pos) */
    float low_freq_factor, high_freq_factor; /* llama3 */
    float beta_fast, beta_slow;              /* yarn (0: 32 and 1) */
    float attention_factor;                  /* yarn: explicit cos/sin scale (0: from the factor) */
    float mscale, mscale_all_dim;            /* yarn (0: unused) */
    int no_truncate;                         /* yarn: "truncate": false */
} RopeParams;

typedef enum { ARCH_LLAMA, ARCH_MISTRAL, ARCH_QWEN2 } Arch;
static const char *const ARCH_MODEL_TYPES[] = {"llama", "mistral", "qwen2"};
static const char *const ARCH_CLASSES[] = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"};

typedef struct {
    int dim;              /* D: hidden_size */
    int ffn_dim;          /* F: intermediate_size */
    int n_layers;         /* L: num_hidden_layers */
    int n_heads;          /* H: num_attention_heads */
    int n_kv_heads;       /* Hk: num_key_value_heads (H % Hk == 0) */
    int head_dim;         /* d: head_dim, or D / H when absent */
    int vocab_size;       /* V */
    float rms_eps;        /* rms_norm_eps */
    float rope_theta;     /* rope_theta */
    float rope_config_factor; /* the rope factor in config.json (1 if none) */
    float rope_factor;    /* the factor actually used (the config's, or raised for a target context) */
    RopeType rope_config_type; /* the rope type in config.json */
    RopeType rope_type;   /* the rope type actually used (a plain model extended by yarn: yarn) */
    RopeParams rope;      /* the type's other parameters */
    int max_pos;          /* max_position_embeddings: the context the model was trained at */
    int tie_embeddings;   /* tie_word_embeddings: lm_head is embed */
    int bos_id, eos_id;   /* -1 when absent */
    Arch arch;            /* llama, mistral or qwen2 (what an export without a base config says) */
    int qkv_bias;         /* q, k and v projections have biases (Qwen2) */
    int sliding_window;   /* keys a query may see (Mistral, Qwen2); 0: all of them */
    DType weight_dtype;   /* the dtype of the loaded weight files (embed_tokens'); DT_F32 (0) for random models */
} Config;

static int rope_orig_max_pos(const Config *c) { return c->rope.orig_max_pos > 0 ? c->rope.orig_max_pos : c->max_pos; }

/* The context the model runs at: its trained context stretched by the RoPE scaling (linear:
 * max_position_embeddings x factor, as LongLoRA saves its models; yarn: the original
 * context x factor; llama3 and dynamic: max_position_embeddings). */
static API size_t config_context(const Config *c) {
    switch (c->rope_type) {
    case ROPE_YARN: return (size_t)((double)rope_orig_max_pos(c) * c->rope_factor + 0.5);
    case ROPE_LINEAR: return (size_t)((double)c->max_pos * c->rope_factor + 0.5);
    default: return (size_t)c->max_pos;
    }
}

/* Position interpolation (docs/DESIGN.md): a target context longer than the model's runs
 * with the factor s = ceil(target_ctx / trained context) in the encoding `how` asks for:
 *   a plain or linear model, linear: factor max(config's, s) over max_position_embeddings;
 *   a plain model, yarn: yarn with factor s over original_max_position_embeddings =
 *     max_position_embeddings (beta_fast 32, beta_slow 1, attention factor 0.1 ln s + 1);
 *   a yarn model: its yarn with factor max(config's, s over its original context);
 *   a dynamic model stretches itself at run time (transformers' NTK rule), nothing to set.
 * Refused (transformers has one rope_type per model, so no faithful composition exists):
 * yarn over a linear factor, linear over yarn, any explicit kind over dynamic, and a llama3
 * model past its max_position_embeddings. target_ctx <= 0 means "as configured". Also
 * refuses a sliding window shorter than the context (we run full attention only).
 * Returns 0 or -1 + last_error(). */
static int config_extend(Config *c, long target_ctx, RopeExtend how) {
    c->rope_type = c->rope_config_type;
    c->rope_factor = c->rope_config_factor;
    const char *why = NULL;
    if (target_ctx > 0 && c->max_pos > 0 && (size_t)target_ctx > config_context(c)) {
        switch (c->rope_config_type) {
        case ROPE_LINEAR:
            if (how == ROPE_EXTEND_YARN && c->rope_config_factor > 1.0f) why = "yarn cannot extend a model already scaled linearly (transformers has one rope_type per model); use --rope-scaling linear";
            else if (how == ROPE_EXTEND_YARN) {
                c->rope_type = ROPE_YARN;
                c->rope_factor = (float)ceil((double)target_ctx / (double)c->max_pos);
                c->rope.orig_max_pos = c->max_pos;
            } else c->rope_factor = (float)ceil((double)target_ctx / (double)c->max_pos);
            break;
        case ROPE_YARN:
            if (how == ROPE_EXTEND_LINEAR) why = "linear interpolation cannot extend a yarn model (transformers has one rope_type per model); use --rope-scaling yarn";
            else c->rope_factor = (float)ceil((double)target_ctx / (double)rope_orig_max_pos(c));
            break;
        case ROPE_DYNAMIC:
            if (how != ROPE_EXTEND_AUTO) why = "a dynamic-NTK model stretches its RoPE itself at run time; --rope-scaling does not compose with it";
            break;
        case ROPE_LLAMA3:
            why = "a llama3-scaled model runs up to its max_position_embeddings; transformers cannot put another scaling on top of rope_type llama3, so a longer context is refused";
            break;
        }
    }
    if (why) return set_error("%s (target context %ld, the model's %zu)", why, target_ctx, config_context(c));
    size_t ctx = target_ctx > 0 ? (size_t)target_ctx : config_context(c);
    if (c->sliding_window > 0 && ctx > (size_t)c->sliding_window)
        return set_error("config.json: sliding_window %d is shorter than the context %zu; sliding-window attention is not supported (give a context of at most %d)",
                         c->sliding_window, ctx, c->sliding_window);
    return 0;
}

/* config_extend with the automatic kind, ending the program with one sentence if refused. */
static API void config_set_target_ctx(Config *c, long target_ctx) {
    if (config_extend(c, target_ctx, ROPE_EXTEND_AUTO) != 0) die("%s", last_error());
}

/* A string from the file, safe to put in a one-line message: control bytes become '?',
 * and it is cut at 60 bytes. */
static const char *printable(const char *s, char *buf, size_t cap) {
    size_t n = 0;
    for (; s[n] && n + 1 < cap && n < 60; n++) buf[n] = ((unsigned char)s[n] < 0x20 || s[n] == 0x7f) ? '?' : s[n];
    buf[n] = 0;
    return buf;
}

static int config_int(const Json *j, const char *key, int required, int fallback, int *out) {
    const Json *v = json_get(j, key);
    if (!v || v->type == JSON_NULL) {
        if (required) return set_error("config.json has no \"%s\"", key);
        *out = fallback;
        return 0;
    }
    if (v->type != JSON_NUMBER || v->number != floor(v->number) || v->number < 0)
        return set_error("config.json: \"%s\" is not a non-negative integer", key);
    if (v->number > 1e9) return set_error("config.json: \"%s\" is %.17g, larger than this program takes (at most 1e9)", key, v->number);
    *out = (int)v->number;
    return 0;
}

/* A number of the rope dict in range [lo, hi], or `fallback` when absent or null. */
static int rope_number(const Json *r, const char *key, double lo, double hi, double fallback, double *out) {
    const Json *v = json_get(r, key);
    if (!v || v->type == JSON_NULL) { *out = fallback; return 0; }
    if (v->type != JSON_NUMBER || !(v->number >= lo && v->number <= hi))
        return set_error("config.json: the rope \"%s\" must be a number in [%g, %g]", key, lo, hi);
    *out = v->number;
    return 0;
}

/* Reads the RoPE settings from either spelling: transformers 4 (rope_theta + rope_scaling
 * {type or rope_type, factor, ...}) or transformers 5 (rope_parameters {rope_type,
 * rope_theta, factor, ...}). Types: default, linear, dynamic, yarn, llama3; anything else
 * (longrope, partial rotary, ...) is refused. Needs c->max_pos. */
static int config_parse_rope(Config *c, const Json *j) {
    const Json *params = json_get(j, "rope_parameters");
    const Json *scaling = json_get(j, "rope_scaling");
    const Json *r = (params && params->type == JSON_OBJECT) ? params : scaling;
    if (r && r->type != JSON_OBJECT && r->type != JSON_NULL) return set_error("config.json: rope_scaling is neither an object nor null");
    double theta = json_get_number(j, "rope_theta", 0);
    if (r && r->type == JSON_OBJECT) theta = json_get_number(r, "rope_theta", theta);
    if (theta == 0) theta = 10000.0;
    if (!(theta > 1.0 && theta < 1e12)) return set_error("config.json: rope_theta %g is out of range", theta);
    c->rope_theta = (float)theta;
    c->rope_config_factor = 1.0f;
    c->rope_config_type = ROPE_LINEAR;
    memset(&c->rope, 0, sizeof c->rope);
    double prf = json_get_number(j, "partial_rotary_factor", json_get_number(r, "partial_rotary_factor", 1.0));
    if (prf != 1.0) return set_error("config.json: partial_rotary_factor %g is not supported (only 1)", prf);
    if (!r || r->type != JSON_OBJECT) return 0;
    const char *type = json_get_string(r, "rope_type", json_get_string(r, "type", "default"));
    if (strcmp(type, "default") == 0) return 0;
    char buf[64];
    int t = -1;
    for (int k = 0; k < 4; k++) if (strcmp(type, ROPE_TYPE_NAMES[k]) == 0) t = k;
    if (t < 0) return set_error("config.json: rope type \"%s\" is not supported (default, linear, dynamic, yarn and llama3 are)", printable(type, buf, sizeof buf));
    c->rope_config_type = (RopeType)t;
    /* transformers takes a top-level original_max_position_embeddings first (Phi-3's spelling) */
    double orig = json_get_number(j, "original_max_position_embeddings", 0), f = 0, v = 0;
    if (orig == 0 && rope_number(r, "original_max_position_embeddings", 1, 1e9, 0, &orig)) return -1;
    if (orig != floor(orig)) return set_error("config.json: original_max_position_embeddings is not an integer");
    if (rope_number(r, "factor", 1.0, 1e6, 0, &f)) return -1;
    if (t == ROPE_YARN && f == 0 && orig > 0) f = (double)c->max_pos / orig; /* transformers 5: factor from the two contexts */
    if (f == 0) return set_error("config.json: the rope type \"%s\" needs a factor >= 1", type);
    c->rope_config_factor = (float)f;
    if (t == ROPE_YARN || t == ROPE_LLAMA3) c->rope.orig_max_pos = (int)orig;
    if (t == ROPE_YARN) {
        if (rope_number(r, "beta_fast", 0, 1e6, 0, &v)) return -1;
        c->rope.beta_fast = (float)v;
        if (rope_number(r, "beta_slow", 0, 1e6, 0, &v)) return -1;
        c->rope.beta_slow = (float)v;
        if (rope_number(r, "attention_factor", 0, 1e6, 0, &v)) return -1;
        c->rope.attention_factor = (float)v;
        if (rope_number(r, "mscale", 0, 1e6, 0, &v)) return -1;
        c->rope.mscale = (float)v;
        if (rope_number(r, "mscale_all_dim", 0, 1e6, 0, &v)) return -1;
        c->rope.mscale_all_dim = (float)v;
        c->rope.no_truncate = !json_get_bool(r, "truncate", 1);
    }
    if (t == ROPE_LLAMA3) {
        double lo, hi;
        if (rope_number(r, "low_freq_factor", 1e-6, 1e6, 0, &lo) || rope_number(r, "high_freq_factor", 1e-6, 1e6, 0, &hi)) return -1;
        if (lo == 0 || hi == 0 || orig == 0)
            return set_error("config.json: rope type llama3 needs factor, low_freq_factor, high_freq_factor and original_max_position_embeddings");
        if (!(hi > lo)) return set_error("config.json: llama3's high_freq_factor %g must be larger than low_freq_factor %g", hi, lo);
        c->rope.low_freq_factor = (float)lo;
        c->rope.high_freq_factor = (float)hi;
    }
    return 0;
}

/* The sliding window, as transformers applies it: Mistral's sliding_window (4096 when absent,
 * null for none) on every layer; Qwen2's only with use_sliding_window, on the layers from
 * max_window_layers on (or those layer_types names "sliding_attention"). c->sliding_window
 * gets the window when some layer slides, else 0; config_extend refuses a window shorter
 * than the context. Needs c->arch and c->n_layers. */
static int config_parse_window(Config *c, const Json *j) {
    c->sliding_window = 0;
    if (c->arch == ARCH_LLAMA) return 0;
    const Json *w = json_get(j, "sliding_window");
    double win = !w ? 4096 : (w->type == JSON_NUMBER ? w->number : 0); /* absent: transformers' 4096 */
    if (w && w->type != JSON_NULL && (w->type != JSON_NUMBER || w->number != floor(w->number) || w->number < 1 || w->number > 1e9))
        return set_error("config.json: sliding_window is neither null nor a positive integer");
    int slides = c->arch == ARCH_MISTRAL;
    if (c->arch == ARCH_QWEN2 && json_get_bool(j, "use_sliding_window", 0)) {
        const Json *types = json_get_type(j, "layer_types", JSON_ARRAY);
        int first = (int)json_get_number(j, "max_window_layers", 28);
        slides = types ? 0 : first < c->n_layers;
        for (size_t i = 0; types && i < types->count; i++) slides |= types->items[i].type == JSON_STRING && !strcmp(types->items[i].string, "sliding_attention");
    }
    const Json *types = json_get_type(j, "layer_types", JSON_ARRAY);
    for (size_t i = 0; types && i < types->count; i++)
        if (types->items[i].type != JSON_STRING || (strcmp(types->items[i].string, "full_attention") && strcmp(types->items[i].string, "sliding_attention")))
            return set_error("config.json: layer_types holds a layer kind other than full_attention and sliding_attention");
    if (slides && win > 0) c->sliding_window = (int)win;
    return 0;
}

/* Fills c from a parsed config.json; -1 + last_error() for anything we cannot run faithfully. */
static int config_from_json(Config *c, const Json *j, long target_ctx) {
    memset(c, 0, sizeof *c);
    if (!j || j->type != JSON_OBJECT) return set_error("config.json is not a JSON object");
    const char *mt = json_get_string(j, "model_type", NULL);
    const Json *arch = json_get_type(j, "architectures", JSON_ARRAY);
    char buf[64];
    int a = -1;
    for (int k = 0; k < 3 && mt; k++) if (strcmp(mt, ARCH_MODEL_TYPES[k]) == 0) a = k;
    if (mt && a < 0) return set_error("config.json: model_type \"%s\" is not supported (llama, mistral and qwen2 are)", printable(mt, buf, sizeof buf));
    if (arch)
        for (size_t i = 0; i < arch->count; i++) {
            int k = -1;
            for (int q = 0; q < 3 && arch->items[i].type == JSON_STRING; q++) if (strcmp(arch->items[i].string, ARCH_CLASSES[q]) == 0) k = q;
            if (k < 0 || (a >= 0 && k != a))
                return set_error("config.json: architecture %s is not supported%s (LlamaForCausalLM, MistralForCausalLM and Qwen2ForCausalLM are)",
                                 arch->items[i].type == JSON_STRING ? printable(arch->items[i].string, buf, sizeof buf) : "(not a string)",
                                 k >= 0 ? " with this model_type" : "");
            a = k;
        }
    if (a < 0) return set_error("config.json names neither a model_type nor architectures");
    c->arch = (Arch)a;
    if (json_get_bool(j, "attention_bias", 0) || json_get_bool(j, "mlp_bias", 0))
        return set_error("config.json: biases (attention_bias / mlp_bias) are not supported (only Qwen2's q, k, v biases are)");
    c->qkv_bias = c->arch == ARCH_QWEN2; /* Qwen2 always has them (its modeling code, not its config, says so) */
    const char *act = json_get_string(j, "hidden_act", "silu");
    if (strcmp(act, "silu") != 0) return set_error("config.json: hidden_act \"%s\" is not supported (only silu)", printable(act, buf, sizeof buf));
    if (json_get_number(j, "pretraining_tp", 1) != 1) return set_error("config.json: pretraining_tp other than 1 is not supported");
    int rc = 0;
    rc |= config_int(j, "hidden_size", 1, 0, &c->dim);
    rc |= config_int(j, "intermediate_size", 1, 0, &c->ffn_dim);
    rc |= config_int(j, "num_hidden_layers", 1, 0, &c->n_layers);
    rc |= config_int(j, "num_attention_heads", 1, 0, &c->n_heads);
    if (rc) return -1;
    if (config_int(j, "num_key_value_heads", 0, c->n_heads, &c->n_kv_heads)) return -1;
    if (c->n_heads <= 0 || c->dim <= 0) return set_error("config.json: hidden_size and num_attention_heads must be positive");
    if (config_int(j, "head_dim", 0, c->dim / c->n_heads, &c->head_dim)) return -1;
    if (config_int(j, "vocab_size", 1, 0, &c->vocab_size)) return -1;
    /* what transformers assumes when config.json leaves these out, per architecture */
    static const int default_max_pos[] = {2048, 4096 * 32, 32768};
    static const double default_eps[] = {1e-6, 1e-6, 1e-6};
    if (config_int(j, "max_position_embeddings", 0, default_max_pos[c->arch], &c->max_pos)) return -1;
    if (c->ffn_dim <= 0 || c->n_layers <= 0 || c->n_kv_heads <= 0 || c->head_dim <= 0 || c->vocab_size <= 0 || c->max_pos <= 0)
        return set_error("config.json: every size must be positive");
    if (c->head_dim % 2) return set_error("config.json: head_dim %d is odd; RoPE needs pairs", c->head_dim);
    if (c->n_heads % c->n_kv_heads) return set_error("config.json: num_attention_heads %d is not a multiple of num_key_value_heads %d", c->n_heads, c->n_kv_heads);
    if ((double)c->vocab_size * c->dim > 4e10 || (double)c->ffn_dim * c->dim > 4e10) return set_error("config.json: sizes are implausibly large");
    double n_params = (double)c->n_layers * ((double)c->dim * c->head_dim * (2.0 * c->n_heads + 2.0 * c->n_kv_heads) + 3.0 * c->dim * c->ffn_dim)
                    + 2.0 * c->vocab_size * c->dim;
    if (n_params > 2e11 || c->head_dim > 65536) return set_error("config.json describes %.3g parameters, implausibly many", n_params);
    double eps = json_get_number(j, "rms_norm_eps", default_eps[c->arch]);
    if (!(eps >= 1e-12 && eps < 1)) return set_error("config.json: rms_norm_eps %g is out of range [1e-12, 1)", eps);
    c->rms_eps = (float)eps;
    if (config_parse_rope(c, j)) return -1;
    if (config_parse_window(c, j)) return -1;
    c->tie_embeddings = json_get_bool(j, "tie_word_embeddings", 0);
    double bos = json_get_number(j, "bos_token_id", -1), eos = json_get_number(j, "eos_token_id", -1);
    c->bos_id = bos >= 0 && bos < c->vocab_size && bos == floor(bos) ? (int)bos : -1; /* absent or odd: none */
    c->eos_id = eos >= 0 && eos < c->vocab_size && eos == floor(eos) ? (int)eos : -1; /* a list of eos ids: none */
    return config_extend(c, target_ctx, ROPE_EXTEND_AUTO);
}

/* Shapes by name, for a model of random weights (05's and 06's --init random --shape NAME,
 * the benchmarks, the tests): the real models' configs and small ones for tests (tiny-gpu
 * and tiny-llama2 have head_dim 64, which the GPU kernels take). */
typedef struct {
    const char *name;
    int dim, n_layers, n_heads, n_kv_heads, ffn_dim, vocab_size, max_pos, tied;
    float rope_theta, norm_eps;
} ShapePreset;
static const ShapePreset SHAPES[] = {
    {"llama2-7b", 4096, 32, 32, 32, 11008, 32000, 4096, 0, 10000.0f, 1e-5f},
    {"llama2-13b", 5120, 40, 40, 40, 13824, 32000, 4096, 0, 10000.0f, 1e-5f},
    {"llama2-70b", 8192, 80, 64, 8, 28672, 32000, 4096, 0, 10000.0f, 1e-5f},
    {"smollm2-135m", 576, 30, 9, 3, 1536, 49152, 8192, 1, 100000.0f, 1e-5f},
    {"tiny", 64, 2, 4, 2, 160, 256, 256, 1, 10000.0f, 1e-5f},
    {"tiny-gpu", 128, 2, 2, 1, 320, 512, 256, 0, 10000.0f, 1e-5f},
    {"tiny-llama2", 128, 2, 2, 1, 320, 32000, 512, 0, 10000.0f, 1e-5f},
};
#define SHAPE_NAMES "llama2-7b, llama2-13b, llama2-70b, smollm2-135m, tiny, tiny-gpu or tiny-llama2"

/* The config of shape `name` at its own context (no interpolation, no BOS/EOS ids).
 * -1 + last_error() for an unknown name. */
static API int config_from_shape(const char *name, Config *c) {
    const ShapePreset *p = NULL;
    for (size_t i = 0; i < sizeof SHAPES / sizeof *SHAPES; i++)
        if (!strcmp(SHAPES[i].name, name)) p = &SHAPES[i];
    if (!p) return set_error("unknown shape '%s' (" SHAPE_NAMES ")", name);
    memset(c, 0, sizeof *c);
    c->dim = p->dim; c->ffn_dim = p->ffn_dim; c->n_layers = p->n_layers; c->n_heads = p->n_heads;
    c->n_kv_heads = p->n_kv_heads; c->head_dim = p->dim / p->n_heads; c->vocab_size = p->vocab_size;
    c->rms_eps = p->norm_eps; c->rope_theta = p->rope_theta; c->rope_config_factor = 1.0f; c->rope_factor = 1.0f;
    c->max_pos = p->max_pos; c->tie_embeddings = p->tied; c->bos_id = -1; c->eos_id = -1;
    return 0;
}

/* ---------------------------------------------------------------------------------------
 * Params: every weight (or gradient) as fp32, in one allocation
 * ------------------------------------------------------------------------------------- */

typedef struct {
    float *attn_norm; /* [D] input_layernorm */
    float *wq;        /* [H*d, D] */
    float *wk;        /* [Hk*d, D] */
    float *wv;        /* [Hk*d, D] */
    float *bq, *bk, *bv; /* [H*d], [Hk*d], [Hk*d] biases (Qwen2), NULL without */
    float *wo;        /* [D, H*d] */
    float *mlp_norm;  /* [D] post_attention_layernorm */
    float *w_gate;    /* [F, D] */
    float *w_up;      /* [F, D] */
    float *w_down;    /* [D, F] */
} LayerParams;

typedef struct {
    float *embed;        /* [V, D] */
    LayerParams *layers; /* [L] */
    float *final_norm;   /* [D] */
    float *lm_head;      /* [V, D]; the same memory as embed when tied */
    float *memory;       /* [count]: every array above lives here */
    size_t count;        /* floats in memory */
} Params;
typedef Params Grads; /* gradients: the same layout */

typedef struct {
    Config cfg;
    Params w;
} Model;

/* The 7 projections of a layer, in hook order. */
enum { PROJ_Q, PROJ_K, PROJ_V, PROJ_O, PROJ_GATE, PROJ_UP, PROJ_DOWN, N_PROJ };

/* Input and output widths of projection `which`: y [T, out] = x [T, in] W^T, W [out, in]. */
static void proj_shape(const Config *c, int which, size_t *in, size_t *out) {
    size_t D = (size_t)c->dim, F = (size_t)c->ffn_dim, Hd = (size_t)c->n_heads * c->head_dim, Hkd = (size_t)c->n_kv_heads * c->head_dim;
    switch (which) {
    case PROJ_Q: *in = D; *out = Hd; break;
    case PROJ_K: case PROJ_V: *in = D; *out = Hkd; break;
    case PROJ_O: *in = Hd; *out = D; break;
    case PROJ_GATE: case PROJ_UP: *in = D; *out = F; break;
    default: *in = F; *out = D; break;
    }
}
/* The bias of projection `which` (only q, k, v may have one), or NULL. */
static float *proj_bias(const LayerParams *lp, int which) {
    return which == PROJ_Q ? lp->bq : which == PROJ_K ? lp->bk : which == PROJ_V ? lp->bv : NULL;
}
static float *proj_weight(const LayerParams *lp, int which) {
    switch (which) {
    case PROJ_Q: return lp->wq;
    case PROJ_K: return lp->wk;
    case PROJ_V: return lp->wv;
    case PROJ_O: return lp->wo;
    case PROJ_GATE: return lp->w_gate;
    case PROJ_UP: return lp->w_up;
    default: return lp->w_down;
    }
}

/* Every parameter of the model: embed, L x (two norms, the 7 projections and the q, k, v
 * biases if any), the final norm, and the head unless it is tied to embed. */
static size_t config_param_count(const Config *c) {
    size_t D = (size_t)c->dim, V = (size_t)c->vocab_size, L = (size_t)c->n_layers;
    size_t per_layer = 2 * D;
    for (int w = 0; w < N_PROJ; w++) { size_t in, out; proj_shape(c, w, &in, &out); per_layer += in * out + (c->qkv_bias && w <= PROJ_V ? out : 0); }
    return V * D + L * per_layer + D + (c->tie_embeddings ? 0 : V * D);
}

/* Lays out every array of p in one zeroed allocation. */
static void params_alloc(Params *p, const Config *c) {
    size_t D = (size_t)c->dim, V = (size_t)c->vocab_size, L = (size_t)c->n_layers;
    p->count = config_param_count(c);
    p->memory = (float *)xcalloc(p->count, sizeof(float));
    p->layers = (LayerParams *)xcalloc(L, sizeof(LayerParams));
    float *m = p->memory;
    p->embed = m; m += V * D;
    for (size_t l = 0; l < L; l++) {
        LayerParams *lp = &p->layers[l];
        size_t in, out;
        lp->attn_norm = m; m += D;
        proj_shape(c, PROJ_Q, &in, &out); lp->wq = m; m += in * out;
        if (c->qkv_bias) { lp->bq = m; m += out; }
        proj_shape(c, PROJ_K, &in, &out); lp->wk = m; m += in * out;
        if (c->qkv_bias) { lp->bk = m; m += out; }
        proj_shape(c, PROJ_V, &in, &out); lp->wv = m; m += in * out;
        if (c->qkv_bias) { lp->bv = m; m += out; }
        proj_shape(c, PROJ_O, &in, &out); lp->wo = m; m += in * out;
        lp->mlp_norm = m; m += D;
        proj_shape(c, PROJ_GATE, &in, &out); lp->w_gate = m; m += in * out;
        proj_shape(c, PROJ_UP, &in, &out); lp->w_up = m; m += in * out;
        proj_shape(c, PROJ_DOWN, &in, &out); lp->w_down = m; m += in * out;
    }
    p->final_norm = m; m += D;
    if (c->tie_embeddings) p->lm_head = p->embed;
    else { p->lm_head = m; m += V * D; }
    CHECK((size_t)(m - p->memory) == p->count, "parameter layout miscounted");
}
static void params_free(Params *p) {
    free(p->memory);
    free(p->layers);
    memset(p, 0, sizeof *p);
}
/* Lays out only the LoRA+ trainable arrays in one zeroed allocation: embed [V, D], the norms
 * [D] (and a tied head, which is embed). The projections, biases and an untied head stay
 * NULL: a GPU run keeps those in bf16 on the GPU only (04_load.c), and the gradients of a
 * LoRA+ run need no more (03's lora_grads_alloc). params_free() works on it as usual. */
static void params_alloc_plus(Params *p, const Config *c) {
    size_t D = (size_t)c->dim, V = (size_t)c->vocab_size, L = (size_t)c->n_layers;
    memset(p, 0, sizeof *p);
    p->count = V * D + 2 * L * D + D;
    p->memory = (float *)xcalloc(p->count, sizeof(float));
    p->layers = (LayerParams *)xcalloc(L, sizeof(LayerParams));
    float *m = p->memory;
    p->embed = m; m += V * D;
    for (size_t l = 0; l < L; l++) { p->layers[l].attn_norm = m; m += D; p->layers[l].mlp_norm = m; m += D; }
    p->final_norm = m;
    p->lm_head = c->tie_embeddings ? p->embed : NULL;
}
static API void grads_alloc(Grads *g, const Config *c) { params_alloc(g, c); }
static API void grads_zero(Grads *g) { memset(g->memory, 0, g->count * sizeof(float)); }

/* The HF names of the 7 projections, in PROJ_ order. */
static const char *const HF_PROJ_NAMES[N_PROJ] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"};

/* One named tensor of the model, as HF names it. */
typedef struct {
    char name[96];
    float *data; /* [shape[0] * shape[1]] */
    int ndim;
    int64_t shape[2];
} ParamRef;

/* Lists every tensor of p under its HF name (lm_head only when untied); returns how many.
 * out may be NULL to count; otherwise it has room for params_list(NULL...) entries. p may be
 * NULL for the names and shapes alone (data NULL): a loader checks those before allocating. */
static size_t params_list(const Params *p, const Config *c, ParamRef *out) {
    size_t n = 0, D = (size_t)c->dim, V = (size_t)c->vocab_size;
#define ADD(ptr, nd, s0, s1, ...)                                                             \
    do {                                                                                      \
        if (out) {                                                                            \
            snprintf(out[n].name, sizeof out[n].name, __VA_ARGS__);                           \
            out[n].data = (ptr); out[n].ndim = (nd);                                          \
            out[n].shape[0] = (int64_t)(s0); out[n].shape[1] = (int64_t)(s1);                 \
        }                                                                                     \
        n++;                                                                                  \
    } while (0)
    ADD(p ? p->embed : NULL, 2, V, D, "model.embed_tokens.weight");
    for (int l = 0; l < c->n_layers; l++) {
        const LayerParams *lp = p ? &p->layers[l] : NULL;
        ADD(lp ? lp->attn_norm : NULL, 1, D, 1, "model.layers.%d.input_layernorm.weight", l);
        for (int w = 0; w < N_PROJ; w++) {
            size_t in, o;
            proj_shape(c, w, &in, &o);
            ADD(lp ? proj_weight(lp, w) : NULL, 2, o, in, "model.layers.%d.%s.weight", l, HF_PROJ_NAMES[w]);
            if (c->qkv_bias && w <= PROJ_V) ADD(lp ? proj_bias(lp, w) : NULL, 1, o, 1, "model.layers.%d.%s.bias", l, HF_PROJ_NAMES[w]);
        }
        ADD(lp ? lp->mlp_norm : NULL, 1, D, 1, "model.layers.%d.post_attention_layernorm.weight", l);
    }
    ADD(p ? p->final_norm : NULL, 1, D, 1, "model.norm.weight");
    if (!c->tie_embeddings) ADD(p ? p->lm_head : NULL, 2, V, D, "lm_head.weight");
#undef ADD
    return n;
}

/* A random model (for tests and benchmarks): linears and biases ~ N(0, std^2), norms ~ 1 + N(0, 0.1^2). */
static API void model_init_random(Model *m, const Config *c, uint64_t seed, float std) {
    m->cfg = *c;
    params_alloc(&m->w, c);
    size_t n = params_list(&m->w, c, NULL);
    ParamRef *refs = (ParamRef *)xmalloc(n * sizeof(ParamRef));
    params_list(&m->w, c, refs);
    Rng rng;
    rng_seed(&rng, seed);
    for (size_t i = 0; i < n; i++) {
        size_t numel = (size_t)refs[i].shape[0] * (size_t)refs[i].shape[1];
        int is_norm = refs[i].ndim == 1 && !strstr(refs[i].name, ".bias");
        for (size_t k = 0; k < numel; k++) refs[i].data[k] = is_norm ? 1.0f + 0.1f * rng_normal(&rng) : std * rng_normal(&rng);
    }
    free(refs);
}
static API void model_free(Model *m) { params_free(&m->w); }

/* ---------------------------------------------------------------------------------------
 * Loading a HF folder: config.json + model.safetensors, or shards listed in
 * model.safetensors.index.json. Every tensor is checked by name, dtype and shape.
 * ------------------------------------------------------------------------------------- */

static int is_ignored_tensor(const char *name) { /* old checkpoints carry RoPE tables we recompute */
    size_t n = strlen(name), k = strlen("rotary_emb.inv_freq");
    return n >= k && strcmp(name + n - k, "rotary_emb.inv_freq") == 0;
}

/* A model folder's weight files, opened (memory-mapped; nothing is read but the headers)
 * and checked against its config: the safetensors file and tensor of every tensor the
 * config needs, in 02's params_list order. Both loaders read through it: model_try_load
 * below into fp32 on the host, 04_load.c straight to the GPU in bf16. */
typedef struct {
    SafeTensors *files;        /* [n_files] */
    size_t n_files;
    ParamRef *refs;            /* [n] names and shapes (data NULL) */
    const StTensor **found;    /* [n] the file's tensor for each of refs */
    const SafeTensors **found_in; /* [n] the file that holds it */
    size_t n;
} ModelFiles;

static void model_files_close(ModelFiles *mf) {
    for (size_t k = 0; k < mf->n_files; k++) st_close(&mf->files[k]);
    free(mf->files);
    free(mf->refs);
    free(mf->found);
    free(mf->found_in);
    memset(mf, 0, sizeof *mf);
}

/* The index of the tensor named `name` in mf->refs, or -1. */
static API long model_files_find(const ModelFiles *mf, const char *name) {
    for (size_t i = 0; i < mf->n; i++)
        if (strcmp(mf->refs[i].name, name) == 0) return (long)i;
    return -1;
}

/* Opens dir's model.safetensors, or the shards model.safetensors.index.json lists, and
 * finds every tensor config c needs by name and shape. -1 + last_error() (naming the file
 * or tensor) on bad input: a truncated file is refused here, before anything is read. */
static int model_files_open(ModelFiles *mf, const char *dir, const Config *c) {
    memset(mf, 0, sizeof *mf);
    char path[4096];
    int rc = 0;
    Json *index = NULL;
    path_join(path, sizeof path, dir, "model.safetensors.index.json");
    if (file_exists(path)) {
        index = json_parse_file(path);
        if (!index) return -1;
        const Json *map = json_get_type(index, "weight_map", JSON_OBJECT);
        if (!map) { json_free(index); return set_error("%s has no weight_map object", path); }
        mf->files = (SafeTensors *)xcalloc(map->count ? map->count : 1, sizeof(SafeTensors));
        for (size_t i = 0; i < map->count && rc == 0; i++) {
            const Json *f = &map->items[i];
            int bad_name = f->type != JSON_STRING || f->len == 0 || strlen(f->string) != f->len || strchr(f->string, '/');
            for (size_t b = 0; !bad_name && b < f->len; b++) bad_name = (unsigned char)f->string[b] < 0x20;
            if (bad_name) { char buf[64]; rc = set_error("%s: tensor '%s' maps to a bad file name", path, printable(map->keys[i], buf, sizeof buf)); break; }
            size_t k = 0;
            while (k < mf->n_files && strcmp(strrchr(mf->files[k].path, '/') + 1, f->string) != 0) k++;
            if (k < mf->n_files) continue;
            char shard[4096];
            if (st_open(&mf->files[mf->n_files], path_join(shard, sizeof shard, dir, f->string)) != 0) rc = -1;
            else mf->n_files++;
        }
    } else {
        mf->files = (SafeTensors *)xcalloc(1, sizeof(SafeTensors));
        if (st_open(&mf->files[0], path_join(path, sizeof path, dir, "model.safetensors")) != 0) rc = -1;
        else mf->n_files = 1;
    }

    /* Every tensor the config needs, by name and shape, checked before anything is allocated:
     * a config that disagrees with its weights (num_hidden_layers 1e6) says so instead of
     * running out of memory. */
    size_t n = params_list(NULL, c, NULL), held = 0;
    for (size_t k = 0; k < mf->n_files; k++) held += mf->files[k].count;
    if (rc == 0 && n > 2 * held + 64) /* far off: say so before listing n names (a close one names the missing tensor) */
        rc = set_error("%s: config.json describes %zu tensors (%d layers) but the weights hold %zu; the config and the weights disagree",
                       dir, n, c->n_layers, held);
    if (rc == 0) {
        mf->n = n;
        mf->refs = (ParamRef *)xmalloc(n * sizeof(ParamRef));
        mf->found = (const StTensor **)xcalloc(n, sizeof *mf->found);
        mf->found_in = (const SafeTensors **)xcalloc(n, sizeof *mf->found_in);
        params_list(NULL, c, mf->refs);
        for (size_t i = 0; i < n && rc == 0; i++) {
            const StTensor *t = NULL;
            const SafeTensors *where = &mf->files[0];
            if (index) {
                const char *fname = json_get_string(json_get(index, "weight_map"), mf->refs[i].name, NULL);
                if (!fname) { rc = set_error("%s: tensor '%s' is missing from model.safetensors.index.json", dir, mf->refs[i].name); break; }
                for (size_t k = 0; k < mf->n_files; k++)
                    if (strcmp(strrchr(mf->files[k].path, '/') + 1, fname) == 0) { t = st_find(&mf->files[k], mf->refs[i].name); where = &mf->files[k]; }
            } else t = st_find(&mf->files[0], mf->refs[i].name);
            if (!t) { rc = set_error("%s: tensor '%s' is missing", where->path, mf->refs[i].name); break; }
            if (st_check_shape(t, mf->refs[i].ndim, mf->refs[i].shape) != 0) rc = error_in("%s", where->path);
            else if (t->dtype != DT_F32 && t->dtype != DT_F16 && t->dtype != DT_BF16 && t->dtype != DT_F64)
                rc = set_error("%s: tensor '%s' has dtype %s, not a floating-point type", where->path, t->name, DTYPE_NAMES[t->dtype]);
            mf->found[i] = t;
            mf->found_in[i] = where;
        }
        /* ... and nothing else (a tensor we do not know means a model we would run wrongly). */
        for (size_t k = 0; k < mf->n_files && rc == 0; k++)
            for (size_t t = 0; t < mf->files[k].count && rc == 0; t++) {
                const char *name = mf->files[k].tensors[t].name;
                int known = is_ignored_tensor(name) || (c->tie_embeddings && strcmp(name, "lm_head.weight") == 0);
                for (size_t i = 0; i < n && !known; i++) known = strcmp(mf->refs[i].name, name) == 0;
                if (!known) rc = set_error("%s: unexpected tensor '%s' (biases and other architectures are not supported)", mf->files[k].path, name);
            }
    }
    json_free(index);
    if (rc != 0) model_files_close(mf);
    return rc;
}

/* Reads config.json alone (no weights): the shape a run is planned from. -1 + last_error(). */
static API int model_read_config(Config *c, const char *dir, long target_ctx) {
    char path[4096];
    Json *cj = json_parse_file(path_join(path, sizeof path, dir, "config.json"));
    if (!cj) return -1;
    int rc = config_from_json(c, cj, target_ctx);
    json_free(cj);
    return rc ? error_in("%s", dir) : 0;
}

/* Loads a model folder, converted to fp32: every tensor (frozen_too), or only the LoRA+
 * trainable ones, embed and the norms (params_alloc_plus: a GPU run reads the rest straight
 * to the GPU with 04_load.c). -1 + last_error() (naming the file or tensor) on bad input. */
static API int model_try_load_host(Model *m, const char *dir, long target_ctx, int frozen_too) {
    memset(m, 0, sizeof *m);
    if (model_read_config(&m->cfg, dir, target_ctx) != 0) return -1;
    ModelFiles mf;
    if (model_files_open(&mf, dir, &m->cfg) != 0) return -1;
    m->cfg.weight_dtype = mf.found[0]->dtype; /* embed_tokens' */
    if (frozen_too) params_alloc(&m->w, &m->cfg);
    else params_alloc_plus(&m->w, &m->cfg);
    ParamRef *refs = (ParamRef *)xmalloc(mf.n * sizeof(ParamRef));
    params_list(&m->w, &m->cfg, refs);
    int rc = 0;
    for (size_t i = 0; i < mf.n && rc == 0; i++)
        if (refs[i].data && st_to_f32(mf.found[i], refs[i].data) != 0) rc = error_in("%s", mf.found_in[i]->path);
    if (rc) params_free(&m->w);
    free(refs);
    model_files_close(&mf);
    return rc;
}

/* Loads a whole model folder in fp32 (the CPU's model). -1 + last_error() on bad input. */
static API int model_try_load(Model *m, const char *dir, long target_ctx) { return model_try_load_host(m, dir, target_ctx, 1); }

/* Loads a model folder or ends the program with one sentence. */
static API void model_load(Model *m, const char *dir, long target_ctx) {
    if (model_try_load(m, dir, target_ctx) != 0) die("%s", last_error());
}

/* ---------------------------------------------------------------------------------------
 * The pieces, forward and backward. T = B*N rows; every buffer is row-major.
 * ------------------------------------------------------------------------------------- */

/* y [T, out] = x [T, in] W^T, W [out, in]. Blocks of 30 weight rows stay in cache while 4
 * rows of x at a time stream past them, against 3 weight rows at once (12 sums, 7 loads per
 * 12 multiply-adds); OpenMP shares the (weight block, row block) tiles. */
HOT_LOOPS static void matmul_forward(float *y, const float *x, const float *w, size_t T, size_t in, size_t out) {
    const size_t OB = 30, TB = 64;
    size_t n_ob = (out + OB - 1) / OB, n_tb = (T + TB - 1) / TB;
#pragma omp parallel for collapse(2) schedule(dynamic)
    for (size_t ob = 0; ob < n_ob; ob++)
        for (size_t tb = 0; tb < n_tb; tb++) {
            size_t o_end = (ob + 1) * OB < out ? (ob + 1) * OB : out;
            size_t t_end = (tb + 1) * TB < T ? (tb + 1) * TB : T;
            size_t t = tb * TB;
            for (; t + 4 <= t_end; t += 4) {
                const float *x0 = x + t * in, *x1 = x0 + in, *x2 = x1 + in, *x3 = x2 + in;
                size_t o = ob * OB;
                for (; o + 3 <= o_end; o += 3) { /* 4 rows x 3 weight rows */
                    const float *wa = w + o * in, *wb = wa + in, *wc = wb + in;
                    float a0 = 0, a1 = 0, a2 = 0, a3 = 0, b0 = 0, b1 = 0, b2 = 0, b3 = 0, c0 = 0, c1 = 0, c2 = 0, c3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3)
                    for (size_t i = 0; i < in; i++) {
                        a0 += x0[i] * wa[i]; a1 += x1[i] * wa[i]; a2 += x2[i] * wa[i]; a3 += x3[i] * wa[i];
                        b0 += x0[i] * wb[i]; b1 += x1[i] * wb[i]; b2 += x2[i] * wb[i]; b3 += x3[i] * wb[i];
                        c0 += x0[i] * wc[i]; c1 += x1[i] * wc[i]; c2 += x2[i] * wc[i]; c3 += x3[i] * wc[i];
                    }
                    y[t * out + o] = a0; y[(t + 1) * out + o] = a1; y[(t + 2) * out + o] = a2; y[(t + 3) * out + o] = a3;
                    y[t * out + o + 1] = b0; y[(t + 1) * out + o + 1] = b1; y[(t + 2) * out + o + 1] = b2; y[(t + 3) * out + o + 1] = b3;
                    y[t * out + o + 2] = c0; y[(t + 1) * out + o + 2] = c1; y[(t + 2) * out + o + 2] = c2; y[(t + 3) * out + o + 2] = c3;
                }
                for (; o < o_end; o++) {
                    const float *wr = w + o * in;
                    float a0 = 0, a1 = 0, a2 = 0, a3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
                    for (size_t i = 0; i < in; i++) {
                        a0 += x0[i] * wr[i]; a1 += x1[i] * wr[i];
                        a2 += x2[i] * wr[i]; a3 += x3[i] * wr[i];
                    }
                    y[t * out + o] = a0; y[(t + 1) * out + o] = a1;
                    y[(t + 2) * out + o] = a2; y[(t + 3) * out + o] = a3;
                }
            }
            for (; t < t_end; t++)
                for (size_t o = ob * OB; o < o_end; o++) {
                    const float *xr = x + t * in, *wr = w + o * in;
                    float a = 0;
#pragma omp simd reduction(+ : a)
                    for (size_t i = 0; i < in; i++) a += xr[i] * wr[i];
                    y[t * out + o] = a;
                }
        }
}

/* dx [T, in] += dy [T, out] W, W [out, in]: each thread owns blocks of 32 rows of dx; eight
 * weight rows are folded in per pass over a row of dx (one load and one store of dx per 8
 * multiply-adds). */
HOT_LOOPS static void matmul_backward_dx(float *dx, const float *dy, const float *w, size_t T, size_t in, size_t out) {
    const size_t TB = 32;
    size_t n_tb = (T + TB - 1) / TB;
#pragma omp parallel for schedule(dynamic)
    for (size_t tb = 0; tb < n_tb; tb++) {
        size_t t_end = (tb + 1) * TB < T ? (tb + 1) * TB : T;
        size_t o = 0;
        for (; o + 8 <= out; o += 8) {
            const float *w0 = w + o * in, *w1 = w0 + in, *w2 = w1 + in, *w3 = w2 + in;
            const float *w4 = w3 + in, *w5 = w4 + in, *w6 = w5 + in, *w7 = w6 + in;
            for (size_t t = tb * TB; t < t_end; t++) {
                const float *g = dy + t * out + o;
                float g0 = g[0], g1 = g[1], g2 = g[2], g3 = g[3], g4 = g[4], g5 = g[5], g6 = g[6], g7 = g[7];
                float *dxr = dx + t * in;
#pragma omp simd
                for (size_t i = 0; i < in; i++)
                    dxr[i] += g0 * w0[i] + g1 * w1[i] + g2 * w2[i] + g3 * w3[i] + g4 * w4[i] + g5 * w5[i] + g6 * w6[i] + g7 * w7[i];
            }
        }
        for (; o < out; o++) {
            const float *wr = w + o * in;
            for (size_t t = tb * TB; t < t_end; t++) {
                float g = dy[t * out + o];
                float *dxr = dx + t * in;
#pragma omp simd
                for (size_t i = 0; i < in; i++) dxr[i] += g * wr[i];
            }
        }
    }
}

/* dW [out, in] += dy^T [out, T] x [T, in]: each thread owns blocks of 32 rows of dW; eight
 * rows of x are folded in per pass over a row of dW. */
HOT_LOOPS static void matmul_backward_dw(float *dw, const float *dy, const float *x, size_t T, size_t in, size_t out) {
    const size_t OB = 32;
    size_t n_ob = (out + OB - 1) / OB;
#pragma omp parallel for schedule(dynamic)
    for (size_t ob = 0; ob < n_ob; ob++) {
        size_t o_end = (ob + 1) * OB < out ? (ob + 1) * OB : out;
        size_t t = 0;
        for (; t + 8 <= T; t += 8) {
            const float *x0 = x + t * in, *x1 = x0 + in, *x2 = x1 + in, *x3 = x2 + in;
            const float *x4 = x3 + in, *x5 = x4 + in, *x6 = x5 + in, *x7 = x6 + in;
            for (size_t o = ob * OB; o < o_end; o++) {
                const float *g = dy + t * out + o;
                float g0 = g[0], g1 = g[out], g2 = g[2 * out], g3 = g[3 * out], g4 = g[4 * out], g5 = g[5 * out], g6 = g[6 * out], g7 = g[7 * out];
                float *dwr = dw + o * in;
#pragma omp simd
                for (size_t i = 0; i < in; i++)
                    dwr[i] += g0 * x0[i] + g1 * x1[i] + g2 * x2[i] + g3 * x3[i] + g4 * x4[i] + g5 * x5[i] + g6 * x6[i] + g7 * x7[i];
            }
        }
        for (; t < T; t++) {
            const float *xr = x + t * in;
            for (size_t o = ob * OB; o < o_end; o++) {
                float g = dy[t * out + o];
                float *dwr = dw + o * in;
#pragma omp simd
                for (size_t i = 0; i < in; i++) dwr[i] += g * xr[i];
            }
        }
    }
}

/* RMSNorm: out = w * x / sqrt(mean(x^2) + eps), per row; rstd [T] keeps 1/sqrt(...) for the backward. */
static void rmsnorm_forward(float *out /* [T, D] */, float *rstd /* [T] */, const float *x /* [T, D] */,
                            const float *w /* [D] */, size_t T, size_t D, float eps) {
#pragma omp parallel for
    for (size_t t = 0; t < T; t++) {
        const float *xr = x + t * D;
        float ss = 0;
        for (size_t i = 0; i < D; i++) ss += xr[i] * xr[i];
        float r = 1.0f / sqrtf(ss / (float)D + eps);
        rstd[t] = r;
        for (size_t i = 0; i < D; i++) out[t * D + i] = w[i] * (xr[i] * r);
    }
}
/* dx [T, D] += d(rmsnorm)/dx . dout; dw [D] += sum over rows of dout * x * rstd (dw may be NULL). */
static void rmsnorm_backward(float *dx, float *dw, const float *dout /* [T, D] */, const float *x /* [T, D] */,
                             const float *w /* [D] */, const float *rstd /* [T] */, size_t T, size_t D) {
#pragma omp parallel for
    for (size_t t = 0; t < T; t++) {
        const float *xr = x + t * D, *gr = dout + t * D;
        float r = rstd[t], dot = 0;
        for (size_t i = 0; i < D; i++) dot += gr[i] * w[i] * xr[i] * r; /* sum of dn * n */
        dot /= (float)D;
        for (size_t i = 0; i < D; i++) dx[t * D + i] += r * (gr[i] * w[i] - xr[i] * r * dot);
    }
    if (dw)
        for (size_t t = 0; t < T; t++)
            for (size_t i = 0; i < D; i++) dw[i] += dout[t * D + i] * x[t * D + i] * rstd[t];
}

/* RoPE's inverse frequencies inv_freq [d/2] for a forward over positions 0 .. seq_len-1 (only
 * dynamic NTK reads seq_len), and the scale yarn puts on cos and sin (returned; 1 otherwise).
 * Every RoPE type, once, in fp32 step by step as transformers' modeling_rope_utils.py
 * computes it (so the tables agree to the last bit or two); the GPU kernels get this table.
 *   default / linear  theta^(-2i/d) / factor
 *   dynamic           theta' = theta (factor seq_len / max_pos - (factor - 1))^(d/(d-2)) for
 *                     seq_len > max_pos (else theta), then theta'^(-2i/d)
 *   yarn              per dimension a blend of theta^(-2i/d) (extrapolated) and that / factor
 *                     (interpolated) by a ramp between the dimensions that turn beta_fast and
 *                     beta_slow times over the original context; cos, sin scaled by
 *                     attention_factor (default 0.1 ln(factor) + 1)
 *   llama3            wavelengths above original/low_freq_factor divided by factor, below
 *                     original/high_freq_factor kept, smoothly blended between */
static API float rope_inv_freq(const Config *c, size_t seq_len, float *inv_freq /* [d/2] */) {
    int d = c->head_dim;
    size_t half = (size_t)d / 2;
    float base = c->rope_theta, factor = c->rope_factor, attention = 1.0f;
    if (c->rope_type == ROPE_DYNAMIC && seq_len > (size_t)c->max_pos) /* fp32, as the tensors in transformers' forward */
        base = base * powf((factor * (float)seq_len) / (float)c->max_pos - (float)((double)factor - 1.0), (float)((double)d / (double)(d - 2)));
    for (size_t i = 0; i < half; i++) inv_freq[i] = 1.0f / powf(base, (float)(2 * i) / (float)d);
    if (c->rope_type == ROPE_LINEAR)
        for (size_t i = 0; i < half; i++) inv_freq[i] = inv_freq[i] / factor;
    if (c->rope_type == ROPE_YARN) {
        const RopeParams *r = &c->rope;
        double f = factor, orig = (double)rope_orig_max_pos(c), theta = c->rope_theta;
        if (r->attention_factor > 0) attention = r->attention_factor;
        else if (r->mscale > 0 && r->mscale_all_dim > 0)
            attention = (float)((f <= 1 ? 1.0 : 0.1 * r->mscale * log(f) + 1.0) / (f <= 1 ? 1.0 : 0.1 * r->mscale_all_dim * log(f) + 1.0));
        else attention = (float)(f <= 1 ? 1.0 : 0.1 * log(f) + 1.0);
        double beta_fast = r->beta_fast > 0 ? r->beta_fast : 32, beta_slow = r->beta_slow > 0 ? r->beta_slow : 1;
        /* the dimension that turns `rotations` times over the original context */
#define YARN_DIM(rotations) ((double)d * log(orig / ((rotations) * 2.0 * M_PI)) / (2.0 * log(theta)))
        double low = YARN_DIM(beta_fast), high = YARN_DIM(beta_slow);
#undef YARN_DIM
        if (!r->no_truncate) { low = floor(low); high = ceil(high); }
        if (low < 0) low = 0;
        if (high > d - 1) high = d - 1;
        if (low == high) high += 0.001;
        for (size_t i = 0; i < half; i++) {
            float pos_freq = powf(c->rope_theta, (float)(2 * i) / (float)d);
            float extrapolated = 1.0f / pos_freq, interpolated = 1.0f / (factor * pos_freq);
            float ramp = ((float)i - (float)low) / (float)(high - low);
            ramp = ramp < 0 ? 0 : ramp > 1 ? 1 : ramp;
            float keep = 1.0f - ramp; /* the share that stays extrapolated */
            inv_freq[i] = interpolated * (1.0f - keep) + extrapolated * keep;
        }
    }
    if (c->rope_type == ROPE_LLAMA3) {
        const RopeParams *r = &c->rope;
        float old_ctx = (float)rope_orig_max_pos(c);
        float low_wavelen = (float)((double)old_ctx / r->low_freq_factor), high_wavelen = (float)((double)old_ctx / r->high_freq_factor);
        float span = (float)((double)r->high_freq_factor - (double)r->low_freq_factor);
        for (size_t i = 0; i < half; i++) {
            float wavelen = (float)(2.0 * M_PI) / inv_freq[i];
            float scaled = wavelen > low_wavelen ? inv_freq[i] / factor : inv_freq[i];
            if (!(wavelen < high_wavelen) && !(wavelen > low_wavelen)) {
                float smooth = (old_ctx / wavelen - r->low_freq_factor) / span;
                scaled = (1.0f - smooth) * scaled / factor + smooth * scaled;
            }
            inv_freq[i] = scaled;
        }
    }
    return attention;
}

/* cos_t, sin_t [N, d/2] for positions pos0 .. pos0+N-1, as transformers makes them: angle =
 * (float)pos * inv_freq[i] in fp32, then cos and sin times the attention scale. */
static void rope_tables(float *cos_t /* [N, d/2] */, float *sin_t /* [N, d/2] */, size_t pos0, size_t N, const float *inv_freq /* [d/2] */,
                        int d, float attention) {
    size_t half = (size_t)d / 2;
    for (size_t p = 0; p < N; p++)
        for (size_t i = 0; i < half; i++) {
            float angle = (float)(pos0 + p) * inv_freq[i];
            cos_t[p * half + i] = cosf(angle) * attention;
            sin_t[p * half + i] = sinf(angle) * attention;
        }
}
/* Rotates every head of x in place, HF's rotate-half layout: pairs (i, i + d/2).
 * sign = +1 forward, -1 backward (the transpose of a rotation is the rotation back). */
static void rope_apply(float *x /* [B*N, nh*d] */, const float *cos_t, const float *sin_t /* [N, d/2] */,
                       size_t B, size_t N, int nh, int d, float sign) {
    size_t half = (size_t)d / 2;
#pragma omp parallel for
    for (size_t t = 0; t < B * N; t++) {
        size_t pos = t % N;
        for (int h = 0; h < nh; h++) {
            float *v = x + t * (size_t)nh * d + (size_t)h * d;
            for (size_t i = 0; i < half; i++) {
                float c = cos_t[pos * half + i], s = sign * sin_t[pos * half + i];
                float a = v[i], b = v[i + half];
                v[i] = a * c - b * s;
                v[i + half] = b * c + a * s;
            }
        }
    }
}
static void rope_forward(float *x, const float *cos_t, const float *sin_t, size_t B, size_t N, int nh, int d) {
    rope_apply(x, cos_t, sin_t, B, N, nh, d, 1.0f);
}
static void rope_backward(float *dx, const float *cos_t, const float *sin_t, size_t B, size_t N, int nh, int d) {
    rope_apply(dx, cos_t, sin_t, B, N, nh, d, -1.0f);
}

/* One query row: out [d] = sum_j softmax_j(q . k_j / sqrt(d)) v_j over keys j0 <= j <= j1,
 * key j read at k + j * kv_stride (and its value at v + j * kv_stride). p [j1 + 1] is
 * scratch. Returns the row's natural log-sum-exp of the scaled scores. The one CPU
 * attention: the training forward below and 06's KV-cache decode both call it. */
static float attention_row(float *out /* [d] */, const float *q /* [d] */, const float *k, const float *v, size_t kv_stride,
                           size_t j0, size_t j1, int d, float *p /* [j1 + 1] */) {
    float scale = 1.0f / sqrtf((float)d);
    float mx = -INFINITY;
    for (size_t j = j0; j <= j1; j++) {
        const float *kj = k + j * kv_stride;
        float s = 0;
#pragma omp simd reduction(+ : s)
        for (int c = 0; c < d; c++) s += q[c] * kj[c];
        p[j] = s * scale;
        if (p[j] > mx) mx = p[j];
    }
    float sum = 0;
    for (size_t j = j0; j <= j1; j++) { p[j] = expf(p[j] - mx); sum += p[j]; }
    for (int c = 0; c < d; c++) out[c] = 0;
    for (size_t j = j0; j <= j1; j++) {
        const float *vj = v + j * kv_stride;
        float pj = p[j] / sum;
#pragma omp simd
        for (int c = 0; c < d; c++) out[c] += pj * vj[c];
    }
    return mx + logf(sum);
}

/* Causal attention with grouped-query heads: query head h reads KV head h / (H/Hk).
 * Query i sees keys s2_first_key(i, h, H, G) <= j <= i (G == 0: all j <= i).
 * lse [B, H, N] keeps each row's log-sum-exp so the backward can rebuild the probabilities
 * without storing the N x N matrix. scratch [threads, N]. */
static void attention_forward(float *out /* [B*N, H*d] */, float *lse /* [B, H, N] */, const float *q /* [B*N, H*d] */,
                              const float *k /* [B*N, Hk*d] */, const float *v /* [B*N, Hk*d] */,
                              size_t B, size_t N, int H, int Hk, int d, size_t G, float *scratch /* [threads, N] */) {
    size_t qs = (size_t)H * d, ks = (size_t)Hk * d;
#pragma omp parallel for collapse(2) schedule(dynamic, 8)
    for (size_t bh = 0; bh < B * (size_t)H; bh++)
        for (size_t i = 0; i < N; i++) {
            size_t b = bh / (size_t)H;
            int h = (int)(bh % (size_t)H), kvh = h / (H / Hk);
            const float *kb = k + b * N * ks + (size_t)kvh * d, *vb = v + b * N * ks + (size_t)kvh * d; /* row 0 of this kv head */
            lse[bh * N + i] = attention_row(out + (b * N + i) * qs + (size_t)h * d, q + (b * N + i) * qs + (size_t)h * d, kb, vb, ks,
                                            s2_first_key(i, h, H, G), i, d, scratch + (size_t)thread_id() * N);
        }
}

/* The attention backward in two race-free passes. With P[i,j] = exp(S[i,j] - lse[i]):
 *   dP[i,j] = dout_i . v_j,  delta_i = sum_j P dP = dout_i . out_i,  dS = P (dP - delta),
 *   dq_i = scale sum_j dS k_j (pass 1, one query row per task),
 *   dk_j = scale sum_i dS q_i, dv_j = sum_i P dout_i over the query heads of j's KV head
 *   and the queries i that see j (pass 2, one key row per task).
 * dq, dk, dv are overwritten. delta [B, H, N] is scratch. */
static void attention_backward(float *dq /* [B*N, H*d] */, float *dk /* [B*N, Hk*d] */, float *dv /* [B*N, Hk*d] */,
                               float *delta /* [B, H, N] */, const float *dout /* [B*N, H*d] */,
                               const float *q, const float *k, const float *v, const float *out, const float *lse,
                               size_t B, size_t N, int H, int Hk, int d, size_t G) {
    size_t qs = (size_t)H * d, ks = (size_t)Hk * d;
    float scale = 1.0f / sqrtf((float)d);
    int group = H / Hk;
#pragma omp parallel for collapse(2) schedule(dynamic, 8)
    for (size_t bh = 0; bh < B * (size_t)H; bh++)
        for (size_t i = 0; i < N; i++) {
            size_t b = bh / (size_t)H;
            int h = (int)(bh % (size_t)H), kvh = h / group;
            const float *qi = q + (b * N + i) * qs + (size_t)h * d, *doi = dout + (b * N + i) * qs + (size_t)h * d;
            const float *oi = out + (b * N + i) * qs + (size_t)h * d;
            float *dqi = dq + (b * N + i) * qs + (size_t)h * d;
            float dl = 0;
            for (int c = 0; c < d; c++) dl += doi[c] * oi[c];
            delta[bh * N + i] = dl;
            for (int c = 0; c < d; c++) dqi[c] = 0;
            float l = lse[bh * N + i];
            for (size_t j = s2_first_key(i, h, H, G); j <= i; j++) {
                const float *kj = k + (b * N + j) * ks + (size_t)kvh * d, *vj = v + (b * N + j) * ks + (size_t)kvh * d;
                float s = 0, dp = 0;
#pragma omp simd reduction(+ : s, dp)
                for (int c = 0; c < d; c++) { s += qi[c] * kj[c]; dp += doi[c] * vj[c]; }
                float ds = expf(s * scale - l) * (dp - dl) * scale;
#pragma omp simd
                for (int c = 0; c < d; c++) dqi[c] += ds * kj[c];
            }
        }
#pragma omp parallel for collapse(2) schedule(dynamic, 8)
    for (size_t bk = 0; bk < B * (size_t)Hk; bk++)
        for (size_t j = 0; j < N; j++) {
            size_t b = bk / (size_t)Hk;
            int kvh = (int)(bk % (size_t)Hk);
            const float *kj = k + (b * N + j) * ks + (size_t)kvh * d, *vj = v + (b * N + j) * ks + (size_t)kvh * d;
            float *dkj = dk + (b * N + j) * ks + (size_t)kvh * d, *dvj = dv + (b * N + j) * ks + (size_t)kvh * d;
            for (int c = 0; c < d; c++) { dkj[c] = 0; dvj[c] = 0; }
            for (int h = kvh * group; h < (kvh + 1) * group; h++) {
                size_t bh = b * (size_t)H + (size_t)h;
                for (size_t i = j; i < N; i++) {
                    if (s2_first_key(i, h, H, G) > j) break; /* first keys only grow with i */
                    const float *qi = q + (b * N + i) * qs + (size_t)h * d, *doi = dout + (b * N + i) * qs + (size_t)h * d;
                    float s = 0, dp = 0;
#pragma omp simd reduction(+ : s, dp)
                    for (int c = 0; c < d; c++) { s += qi[c] * kj[c]; dp += doi[c] * vj[c]; }
                    float p = expf(s * scale - lse[bh * N + i]);
                    float ds = p * (dp - delta[bh * N + i]) * scale;
#pragma omp simd
                    for (int c = 0; c < d; c++) { dkj[c] += ds * qi[c]; dvj[c] += p * doi[c]; }
                }
            }
        }
}

/* SwiGLU: h = silu(gate) * up, silu(g) = g * sigmoid(g). */
static void swiglu_forward(float *h /* [n] */, const float *gate /* [n] */, const float *up /* [n] */, size_t n) {
#pragma omp parallel for
    for (size_t i = 0; i < n; i++) h[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}
static void swiglu_backward(float *dgate /* [n] */, float *dup /* [n] */, const float *dh /* [n] */,
                            const float *gate, const float *up, size_t n) {
#pragma omp parallel for
    for (size_t i = 0; i < n; i++) {
        float sg = 1.0f / (1.0f + expf(-gate[i])), silu = gate[i] * sg;
        dup[i] = dh[i] * silu;
        dgate[i] = dh[i] * up[i] * sg * (1.0f + gate[i] * (1.0f - sg));
    }
}

/* Row-wise log(sum(exp(logits))), computed stably. */
static float logsumexp_row(const float *row, size_t V) {
    float mx = -INFINITY;
    for (size_t c = 0; c < V; c++) if (row[c] > mx) mx = row[c];
    double sum = 0;
    for (size_t c = 0; c < V; c++) sum += exp((double)(row[c] - mx));
    return mx + (float)log(sum);
}
/* Mean over the targets that are not IGNORE_INDEX of -log softmax(logits)[target]
 * (0 when there are none); *count gets how many there were. */
static float cross_entropy_forward(const float *logits /* [T, V] */, const int32_t *targets /* [T] */, size_t T, size_t V, size_t *count) {
    double total = 0;
    size_t n = 0;
#pragma omp parallel for reduction(+ : total, n)
    for (size_t t = 0; t < T; t++) {
        if (targets[t] == IGNORE_INDEX) continue;
        const float *row = logits + t * V;
        total += (double)(logsumexp_row(row, V) - row[targets[t]]);
        n++;
    }
    *count = n;
    return n ? (float)(total / (double)n) : 0.0f;
}
/* dlogits = (softmax(logits) - onehot(target)) / count for each counted row, 0 for ignored
 * rows. dlogits may be logits itself (each row is read before it is written). */
static void cross_entropy_backward(float *dlogits /* [T, V] */, const float *logits /* [T, V] */, const int32_t *targets /* [T] */,
                                   size_t T, size_t V, size_t count) {
    float inv = count ? 1.0f / (float)count : 0.0f;
#pragma omp parallel for
    for (size_t t = 0; t < T; t++) {
        const float *row = logits + t * V;
        float *drow = dlogits + t * V;
        if (targets[t] == IGNORE_INDEX) { for (size_t c = 0; c < V; c++) drow[c] = 0; continue; }
        float lse = logsumexp_row(row, V);
        for (size_t c = 0; c < V; c++) drow[c] = expf(row[c] - lse) * inv;
        drow[targets[t]] -= inv;
    }
}

/* ---------------------------------------------------------------------------------------
 * Activations: every buffer planned up front
 * ------------------------------------------------------------------------------------- */

typedef struct LinearHook {
    void *ctx;
    void (*forward)(void *ctx, int layer, int which, const float *x /* [T, in] */, size_t T, float *y /* [T, out] */);
    void (*backward)(void *ctx, int layer, int which, const float *x /* [T, in] */, const float *dy /* [T, out] */,
                     size_t T, float *dx /* [T, in] */);
} LinearHook;

typedef struct {
    size_t s2_group;             /* G: 0 = full causal attention; otherwise N % G == 0 */
    int grads_for_frozen_linears; /* 0: no dW for the 7 projections and an untied lm_head */
    LinearHook *hook;            /* NULL: plain linears */
} RunOptions;

/* What one layer keeps for its backward (with for_training = 0 every layer uses layer 0's). */
typedef struct {
    float *x_in;      /* [T, D] the layer's input (residual stream) */
    float *xn_attn;   /* [T, D] RMSNorm(x_in): input of q, k, v */
    float *rstd_attn; /* [T] */
    float *q;         /* [T, H*d] after RoPE */
    float *k;         /* [T, Hk*d] after RoPE */
    float *v;         /* [T, Hk*d] */
    float *att;       /* [T, H*d] attention output: input of o */
    float *lse;       /* [B, H, N] */
    float *x_mid;     /* [T, D] x_in + o: the MLP block's input */
    float *xn_mlp;    /* [T, D] RMSNorm(x_mid): input of gate, up */
    float *rstd_mlp;  /* [T] */
    float *gate;      /* [T, F] */
    float *up;        /* [T, F] */
    float *h;         /* [T, F] silu(gate) * up: input of down */
} LayerActs;

typedef struct {
    size_t B, N;          /* the largest batch and sequence this plan holds */
    Config cfg;           /* the model it was planned for (shapes and RoPE tables) */
    int for_training;     /* 1: every layer keeps its buffers and the backward ones exist */
    int n_threads;
    LayerActs *layers;    /* [L] */
    float *x_out;         /* [T, D] the last layer's output */
    float *xn_final;      /* [T, D] */
    float *rstd_final;    /* [T] */
    float *logits;        /* [T, V] (after a backward: dlogits) */
    float *proj_out;      /* [T, D] scratch: o and down outputs */
    float *rope_cos;      /* [N, d/2] */
    float *rope_sin;      /* [N, d/2] */
    size_t rope_seq_len;  /* the sequence length the tables were made for (dynamic NTK reads it) */
    size_t rope_seq_min;  /* dynamic NTK: make them for at least this length (06 keeps transformers' cache rule) */
    float *scratch;       /* [threads, N] attention rows */
    /* backward only */
    float *d_resid;       /* [T, D] dLoss/d(residual stream); after a backward: d(embedding output) */
    float *d_xn;          /* [T, D] */
    float *d_q;           /* [T, H*d] */
    float *d_k;           /* [T, Hk*d] */
    float *d_v;           /* [T, Hk*d] */
    float *d_att;         /* [T, H*d] */
    float *d_h;           /* [T, F] */
    float *d_gate;        /* [T, F] */
    float *d_up;          /* [T, F] */
    float *delta;         /* [B, H, N] */
    size_t loss_count;    /* targets counted by the last forward */
    float *memory;
    size_t bytes;         /* everything above, in bytes */
} Activations;

/* The RoPE tables of positions 0 .. a->N-1 for a forward over seq_len positions. */
static void act_rope(Activations *a, size_t seq_len) {
    float *inv_freq = (float *)xmalloc((size_t)a->cfg.head_dim / 2 * sizeof(float)); /* [d/2] */
    float attention = rope_inv_freq(&a->cfg, seq_len, inv_freq);
    rope_tables(a->rope_cos, a->rope_sin, 0, a->N, inv_freq, a->cfg.head_dim, attention);
    a->rope_seq_len = seq_len;
    free(inv_freq);
}

/* Plans (allocates, once) every buffer for up to B x N tokens. */
static API void act_plan(Activations *a, const Config *c, size_t B, size_t N, int for_training) {
    memset(a, 0, sizeof *a);
    a->B = B; a->N = N; a->cfg = *c; a->for_training = for_training; a->n_threads = max_threads();
    size_t T = B * N, D = (size_t)c->dim, F = (size_t)c->ffn_dim, V = (size_t)c->vocab_size, H = (size_t)c->n_heads;
    size_t Hd = H * c->head_dim, Hkd = (size_t)c->n_kv_heads * c->head_dim, L = (size_t)c->n_layers;
    size_t kept = for_training ? L : 1;
    size_t per_layer = T * (4 * D + 2 + 2 * Hd + 2 * Hkd + 3 * F) + B * H * N;
    size_t total = kept * per_layer + T * D + T * D + T + T * V + T * D + 2 * N * (size_t)(c->head_dim / 2) + (size_t)a->n_threads * N;
    if (for_training) total += 2 * T * D + 2 * Hd * T + 2 * Hkd * T + 3 * T * F + B * H * N;
    a->memory = (float *)xcalloc(total, sizeof(float));
    a->bytes = total * sizeof(float);
    a->layers = (LayerActs *)xcalloc(L, sizeof(LayerActs));
    float *m = a->memory;
#define TAKE(n) (m += (n), m - (n))
    for (size_t l = 0; l < kept; l++) {
        LayerActs *la = &a->layers[l];
        la->x_in = TAKE(T * D); la->xn_attn = TAKE(T * D); la->rstd_attn = TAKE(T);
        la->q = TAKE(T * Hd); la->k = TAKE(T * Hkd); la->v = TAKE(T * Hkd); la->att = TAKE(T * Hd);
        la->lse = TAKE(B * H * N); la->x_mid = TAKE(T * D); la->xn_mlp = TAKE(T * D); la->rstd_mlp = TAKE(T);
        la->gate = TAKE(T * F); la->up = TAKE(T * F); la->h = TAKE(T * F);
    }
    for (size_t l = kept; l < L; l++) a->layers[l] = a->layers[0];
    a->x_out = TAKE(T * D); a->xn_final = TAKE(T * D); a->rstd_final = TAKE(T); a->logits = TAKE(T * V);
    a->proj_out = TAKE(T * D);
    a->rope_cos = TAKE(N * (size_t)(c->head_dim / 2)); a->rope_sin = TAKE(N * (size_t)(c->head_dim / 2));
    a->scratch = TAKE((size_t)a->n_threads * N);
    if (for_training) {
        a->d_resid = TAKE(T * D); a->d_xn = TAKE(T * D); a->d_q = TAKE(T * Hd); a->d_k = TAKE(T * Hkd);
        a->d_v = TAKE(T * Hkd); a->d_att = TAKE(T * Hd); a->d_h = TAKE(T * F); a->d_gate = TAKE(T * F);
        a->d_up = TAKE(T * F); a->delta = TAKE(B * H * N);
    }
#undef TAKE
    CHECK((size_t)(m - a->memory) == total, "activation plan miscounted");
    act_rope(a, N);
}
static API void act_free(Activations *a) {
    free(a->memory);
    free(a->layers);
    memset(a, 0, sizeof *a);
}

/* ---------------------------------------------------------------------------------------
 * The model: forward and backward
 * ------------------------------------------------------------------------------------- */

/* y = x W^T for projection `which` of layer l, then the hook may add to y. */
static void project(const Model *m, const RunOptions *o, int l, int which, const float *x, size_t T, float *y) {
    size_t in, out;
    proj_shape(&m->cfg, which, &in, &out);
    matmul_forward(y, x, proj_weight(&m->w.layers[l], which), T, in, out);
    const float *b = proj_bias(&m->w.layers[l], which);
    if (b)
#pragma omp parallel for
        for (size_t t = 0; t < T; t++)
            for (size_t i = 0; i < out; i++) y[t * out + i] += b[i];
    if (o && o->hook && o->hook->forward) o->hook->forward(o->hook->ctx, l, which, x, T, y);
}
/* dx += dy W (then the hook may add to dx), and dW += dy^T x (and db += the column sums of
 * dy) when that gradient is wanted. */
static void project_backward(const Model *m, Grads *g, const RunOptions *o, int l, int which, const float *x,
                             const float *dy, size_t T, float *dx) {
    size_t in, out;
    proj_shape(&m->cfg, which, &in, &out);
    matmul_backward_dx(dx, dy, proj_weight(&m->w.layers[l], which), T, in, out);
    if (o && o->hook && o->hook->backward) o->hook->backward(o->hook->ctx, l, which, x, dy, T, dx);
    if (g && o && o->grads_for_frozen_linears) {
        matmul_backward_dw(proj_weight(&g->layers[l], which), dy, x, T, in, out);
        float *db = proj_bias(&g->layers[l], which);
        if (db)
#pragma omp parallel for
            for (size_t i = 0; i < out; i++) {
                float sum = 0;
                for (size_t t = 0; t < T; t++) sum += dy[t * out + i];
                db[i] += sum;
            }
    }
}

static void check_run(const Model *m, const Activations *a, const int32_t *tokens, size_t B, size_t N, const RunOptions *o) {
    const Config *c = &m->cfg, *p = &a->cfg;
    if (c->dim != p->dim || c->ffn_dim != p->ffn_dim || c->n_layers != p->n_layers || c->n_heads != p->n_heads ||
        c->n_kv_heads != p->n_kv_heads || c->head_dim != p->head_dim || c->vocab_size != p->vocab_size ||
        c->qkv_bias != p->qkv_bias || c->rope_theta != p->rope_theta || c->rope_factor != p->rope_factor || c->rope_type != p->rope_type ||
        memcmp(&c->rope, &p->rope, sizeof c->rope) != 0 || c->max_pos != p->max_pos)
        die("the activations were planned for a model of another shape or RoPE scaling");
    if (B * N > a->B * a->N || N > a->N) die("a batch of %zu x %zu tokens does not fit activations planned for %zu x %zu", B, N, a->B, a->N);
    if (o && o->s2_group && N % o->s2_group != 0) die("the sequence length %zu is not a multiple of the S2-Attn group size %zu", N, o->s2_group);
    if (c->sliding_window > 0 && N > (size_t)c->sliding_window) die("a sequence of %zu tokens is longer than the model's sliding window %d, which is not supported", N, c->sliding_window);
    for (size_t t = 0; t < B * N; t++)
        if (tokens[t] < 0 || tokens[t] >= m->cfg.vocab_size) die("token %zu has id %d, outside the vocabulary of %d", t, tokens[t], m->cfg.vocab_size);
}

/* Runs the model over tokens [B*N]; returns the mean loss over targets (0 without targets). */
static API float model_forward(const Model *m, Activations *a, const int32_t *tokens /* [B*N] */,
                           const int32_t *targets /* [B*N] or NULL */, size_t B, size_t N, const RunOptions *o) {
    const Config *c = &m->cfg;
    check_run(m, a, tokens, B, N, o);
    if (max_threads() > a->n_threads) die("OpenMP now runs %d threads but the activations were planned for %d", max_threads(), a->n_threads);
    size_t T = B * N, D = (size_t)c->dim, F = (size_t)c->ffn_dim, V = (size_t)c->vocab_size;
    size_t G = o ? o->s2_group : 0;
    size_t rope_seq = N > a->rope_seq_min ? N : a->rope_seq_min;
    if (c->rope_type == ROPE_DYNAMIC && rope_seq != a->rope_seq_len) act_rope(a, rope_seq); /* NTK's base depends on the length */
    /* embedding lookup into layer 0's input */
    for (size_t t = 0; t < T; t++) memcpy(a->layers[0].x_in + t * D, m->w.embed + (size_t)tokens[t] * D, D * sizeof(float));
    for (int l = 0; l < c->n_layers; l++) {
        const LayerParams *lp = &m->w.layers[l];
        LayerActs *la = &a->layers[l];
        /* attention block */
        rmsnorm_forward(la->xn_attn, la->rstd_attn, la->x_in, lp->attn_norm, T, D, c->rms_eps);
        project(m, o, l, PROJ_Q, la->xn_attn, T, la->q);
        project(m, o, l, PROJ_K, la->xn_attn, T, la->k);
        project(m, o, l, PROJ_V, la->xn_attn, T, la->v);
        rope_forward(la->q, a->rope_cos, a->rope_sin, B, N, c->n_heads, c->head_dim);
        rope_forward(la->k, a->rope_cos, a->rope_sin, B, N, c->n_kv_heads, c->head_dim);
        attention_forward(la->att, la->lse, la->q, la->k, la->v, B, N, c->n_heads, c->n_kv_heads, c->head_dim, G, a->scratch);
        project(m, o, l, PROJ_O, la->att, T, a->proj_out);
        for (size_t i = 0; i < T * D; i++) la->x_mid[i] = la->x_in[i] + a->proj_out[i];
        /* MLP block */
        rmsnorm_forward(la->xn_mlp, la->rstd_mlp, la->x_mid, lp->mlp_norm, T, D, c->rms_eps);
        project(m, o, l, PROJ_GATE, la->xn_mlp, T, la->gate);
        project(m, o, l, PROJ_UP, la->xn_mlp, T, la->up);
        swiglu_forward(la->h, la->gate, la->up, T * F);
        project(m, o, l, PROJ_DOWN, la->h, T, a->proj_out);
        /* the next layer's input (when layers share buffers, x_in is free again by now) */
        float *next = l + 1 < c->n_layers ? a->layers[l + 1].x_in : a->x_out;
        for (size_t i = 0; i < T * D; i++) next[i] = la->x_mid[i] + a->proj_out[i];
    }
    rmsnorm_forward(a->xn_final, a->rstd_final, a->x_out, m->w.final_norm, T, D, c->rms_eps);
    matmul_forward(a->logits, a->xn_final, m->w.lm_head, T, D, V);
    a->loss_count = 0;
    if (!targets) return 0.0f;
    for (size_t t = 0; t < T; t++)
        if (targets[t] != IGNORE_INDEX && (targets[t] < 0 || targets[t] >= c->vocab_size))
            die("target %zu has id %d, outside the vocabulary of %d", t, targets[t], c->vocab_size);
    return cross_entropy_forward(a->logits, targets, T, V, &a->loss_count);
}

/* Backpropagates the loss of the last model_forward (same arguments) and accumulates into g. */
static API void model_backward(const Model *m, Activations *a, Grads *g, const int32_t *tokens, const int32_t *targets,
                           size_t B, size_t N, const RunOptions *o) {
    const Config *c = &m->cfg;
    if (!a->for_training) die("model_backward needs activations planned for training");
    if (!targets) die("model_backward needs targets");
    size_t T = B * N, D = (size_t)c->dim, F = (size_t)c->ffn_dim, V = (size_t)c->vocab_size;
    size_t Hd = (size_t)c->n_heads * c->head_dim;
    size_t G = o ? o->s2_group : 0;
    int want_frozen = o && o->grads_for_frozen_linears;
    /* head: the tied head is the (trainable) embedding, so its gradient is always wanted */
    cross_entropy_backward(a->logits, a->logits, targets, T, V, a->loss_count);
    const float *dlogits = a->logits;
    memset(a->d_xn, 0, T * D * sizeof(float));
    matmul_backward_dx(a->d_xn, dlogits, m->w.lm_head, T, D, V);
    if (g && (c->tie_embeddings || want_frozen)) matmul_backward_dw(g->lm_head, dlogits, a->xn_final, T, D, V);
    memset(a->d_resid, 0, T * D * sizeof(float));
    rmsnorm_backward(a->d_resid, g ? g->final_norm : NULL, a->d_xn, a->x_out, m->w.final_norm, a->rstd_final, T, D);
    for (int l = c->n_layers - 1; l >= 0; l--) {
        const LayerParams *lp = &m->w.layers[l];
        LayerParams *gl = g ? &g->layers[l] : NULL;
        LayerActs *la = &a->layers[l];
        /* MLP block: x_out = x_mid + down(silu(gate(xn)) * up(xn)); d_resid flows through unchanged */
        memset(a->d_h, 0, T * F * sizeof(float));
        project_backward(m, g, o, l, PROJ_DOWN, la->h, a->d_resid, T, a->d_h);
        swiglu_backward(a->d_gate, a->d_up, a->d_h, la->gate, la->up, T * F);
        memset(a->d_xn, 0, T * D * sizeof(float));
        project_backward(m, g, o, l, PROJ_GATE, la->xn_mlp, a->d_gate, T, a->d_xn);
        project_backward(m, g, o, l, PROJ_UP, la->xn_mlp, a->d_up, T, a->d_xn);
        rmsnorm_backward(a->d_resid, gl ? gl->mlp_norm : NULL, a->d_xn, la->x_mid, lp->mlp_norm, la->rstd_mlp, T, D);
        /* attention block: x_mid = x_in + o(attention(rope(q(xn)), rope(k(xn)), v(xn))) */
        memset(a->d_att, 0, T * Hd * sizeof(float));
        project_backward(m, g, o, l, PROJ_O, la->att, a->d_resid, T, a->d_att);
        attention_backward(a->d_q, a->d_k, a->d_v, a->delta, a->d_att, la->q, la->k, la->v, la->att, la->lse,
                           B, N, c->n_heads, c->n_kv_heads, c->head_dim, G);
        rope_backward(a->d_q, a->rope_cos, a->rope_sin, B, N, c->n_heads, c->head_dim);
        rope_backward(a->d_k, a->rope_cos, a->rope_sin, B, N, c->n_kv_heads, c->head_dim);
        memset(a->d_xn, 0, T * D * sizeof(float));
        project_backward(m, g, o, l, PROJ_Q, la->xn_attn, a->d_q, T, a->d_xn);
        project_backward(m, g, o, l, PROJ_K, la->xn_attn, a->d_k, T, a->d_xn);
        project_backward(m, g, o, l, PROJ_V, la->xn_attn, a->d_v, T, a->d_xn);
        rmsnorm_backward(a->d_resid, gl ? gl->attn_norm : NULL, a->d_xn, la->x_in, lp->attn_norm, la->rstd_attn, T, D);
    }
    /* embedding: scatter-add (serial: two positions may hold the same token) */
    if (g)
        for (size_t t = 0; t < T; t++) {
            float *row = g->embed + (size_t)tokens[t] * D;
            for (size_t i = 0; i < D; i++) row[i] += a->d_resid[t * D + i];
        }
}

/* ---------------------------------------------------------------------------------------
 * The program: perplexity over a text, the top next tokens, or a throughput benchmark
 * ------------------------------------------------------------------------------------- */
#if STAGE == 2

/* SmolLM2-135M's shape, for the benchmark with random weights. */
static void usage(void) {
    fprintf(stderr,
            "usage: 02_model --model DIR --text-file F [--ctx N] [--window W]   mean next-token loss over a text\n"
            "       02_model --model DIR --tokens F [--ctx N] [--window W]      the same over a token file\n"
            "       02_model --model DIR --top K --text \"...\"                 the K most likely next tokens\n"
            "       02_model --bench N [--model DIR] [--batch B] [--train]      forward (and with --train forward + backward) tokens/s;\n"
            "                                                                   a random SmolLM2-135M-shaped model without --model\n");
    exit(2);
}

int main(int argc, char **argv) {
    const char *model_dir = NULL, *text_file = NULL, *text = NULL, *token_file = NULL;
    long ctx = 0, window = 0, top = 0, bench = 0, batch = 1;
    int train = 0;
    for (int i = 1; i < argc; i++) {
        const char *f = argv[i];
        if (!strcmp(f, "--train")) { train = 1; continue; }
        if (i + 1 >= argc) usage();
        if (!strcmp(f, "--model")) model_dir = argv[++i];
        else if (!strcmp(f, "--text-file")) text_file = argv[++i];
        else if (!strcmp(f, "--text")) text = argv[++i];
        else if (!strcmp(f, "--tokens")) token_file = argv[++i];
        else if (!strcmp(f, "--ctx")) ctx = need_long_arg(f, argv[++i], 1, LONG_MAX);
        else if (!strcmp(f, "--window")) window = need_long_arg(f, argv[++i], 1, LONG_MAX);
        else if (!strcmp(f, "--top")) top = need_long_arg(f, argv[++i], 1, LONG_MAX);
        else if (!strcmp(f, "--bench")) bench = need_long_arg(f, argv[++i], 1, LONG_MAX);
        else if (!strcmp(f, "--batch")) batch = need_long_arg(f, argv[++i], 1, LONG_MAX);
        else usage();
    }
    Model model;
    if (bench) {
        if (model_dir) model_load(&model, model_dir, ctx);
        else {
            Config c;
            if (config_from_shape("smollm2-135m", &c) != 0) die("%s", last_error());
            model_init_random(&model, &c, 1234, 0.02f);
        }
        const Config *c = &model.cfg;
        Activations act;
        act_plan(&act, c, (size_t)batch, (size_t)bench, 0);
        printf("model: D=%d F=%d L=%d H=%d Hk=%d d=%d V=%d, %zu parameters; activations %.1f MiB for %ld x %ld; %d threads\n",
               c->dim, c->ffn_dim, c->n_layers, c->n_heads, c->n_kv_heads, c->head_dim, c->vocab_size, model.w.count,
               (double)act.bytes / (1 << 20), batch, bench, act.n_threads);
        size_t T = (size_t)batch * (size_t)bench;
        int32_t *tokens = (int32_t *)xmalloc(T * sizeof(int32_t));
        Rng rng;
        rng_seed(&rng, 7);
        for (size_t t = 0; t < T; t++) tokens[t] = (int32_t)rng_below(&rng, (uint64_t)c->vocab_size);
        model_forward(&model, &act, tokens, NULL, (size_t)batch, (size_t)bench, NULL); /* warm-up */
        int reps = 3;
        double t0 = now_seconds();
        for (int r = 0; r < reps; r++) model_forward(&model, &act, tokens, NULL, (size_t)batch, (size_t)bench, NULL);
        double dt = (now_seconds() - t0) / reps;
        printf("forward %ld x %ld tokens: %.3f s, %.1f tokens/s\n", batch, bench, dt, (double)T / dt);
        if (train) { /* one forward + backward with every gradient (full fine-tuning) */
            Activations tact;
            act_plan(&tact, c, (size_t)batch, (size_t)bench, 1);
            Grads g;
            grads_alloc(&g, c);
            RunOptions opt = {0, 1, NULL};
            double t1 = now_seconds();
            model_forward(&model, &tact, tokens, tokens, (size_t)batch, (size_t)bench, &opt);
            double t2 = now_seconds();
            model_backward(&model, &tact, &g, tokens, tokens, (size_t)batch, (size_t)bench, &opt);
            double t3 = now_seconds();
            printf("training activations %.1f MiB; forward %.3f s + backward %.3f s: %.1f tokens/s\n",
                   (double)tact.bytes / (1 << 20), t2 - t1, t3 - t2, (double)T / (t3 - t1));
            params_free(&g);
            act_free(&tact);
        }
        free(tokens);
        act_free(&act);
        model_free(&model);
        return 0;
    }
    if (!model_dir || (!!text_file + !!text + !!token_file) != 1) usage();
    model_load(&model, model_dir, ctx);
    const Config *c = &model.cfg;

    /* tokens: BOS + the text, as HF's LLaMA tokenizers do */
    int32_t *ids = NULL;
    size_t n_ids = 0;
    Tokenizer tok;
    int have_tok = 0;
    if (token_file) {
        ids = tokfile_read(token_file, &n_ids);
        if (!ids) die("%s", last_error());
    } else {
        if (tok_load(&tok, model_dir) != 0) die("%s", last_error());
        have_tok = 1;
        size_t len = text ? strlen(text) : 0;
        char *file_text = NULL;
        if (text_file && !(file_text = read_file(text_file, &len))) die("%s", last_error());
        size_t n_text = 0;
        int32_t *text_ids = tok_encode(&tok, file_text ? file_text : text, len, 0, &n_text);
        if (!text_ids) die("%s", last_error());
        int32_t bos = tok.bos_id >= 0 ? tok.bos_id : c->bos_id;
        ids = (int32_t *)xmalloc((n_text + 1) * sizeof(int32_t));
        if (bos >= 0) ids[n_ids++] = bos;
        memcpy(ids + n_ids, text_ids, n_text * sizeof(int32_t));
        n_ids += n_text;
        free(text_ids);
        free(file_text);
    }
    if (n_ids == 0) die("there are no tokens to run the model on");
    for (size_t i = 0; i < n_ids; i++)
        if (ids[i] < 0 || ids[i] >= c->vocab_size)
            die("token %zu has id %d, outside the model's vocabulary of %d", i, ids[i], c->vocab_size);

    if (top) {
        Activations act;
        act_plan(&act, c, 1, n_ids, 0);
        model_forward(&model, &act, ids, NULL, 1, n_ids, NULL);
        const float *row = act.logits + (n_ids - 1) * (size_t)c->vocab_size;
        float lse = logsumexp_row(row, (size_t)c->vocab_size);
        int *best = (int *)xcalloc((size_t)top, sizeof(int));
        long n_best = top < c->vocab_size ? top : c->vocab_size;
        for (long r = 0; r < n_best; r++) { /* selection: K passes, fine for small K */
            int arg = -1;
            for (int v = 0; v < c->vocab_size; v++) {
                int taken = 0;
                for (long q = 0; q < r && !taken; q++) taken = best[q] == v;
                if (!taken && (arg < 0 || row[v] > row[arg])) arg = v;
            }
            best[r] = arg;
            printf("%ld %d %.6f", r + 1, arg, exp((double)(row[arg] - lse)));
            if (have_tok) {
                size_t len;
                char *piece = tok_decode(&tok, &arg, 1, &len);
                if (piece) { printf(" "); json_write_string(stdout, piece); }
                free(piece);
            }
            printf("\n");
        }
        free(best);
        act_free(&act);
    } else {
        size_t W = window ? (size_t)window : config_context(c);
        if (W < 2) die("--window must be at least 2 tokens");
        if (W > n_ids) W = n_ids;
        if (n_ids < 2) die("the text has fewer than 2 tokens; nothing to predict");
        Activations act;
        act_plan(&act, c, 1, W, 0);
        fprintf(stderr, "model: %zu parameters, RoPE %s factor %g, window %zu tokens, activations %.1f MiB\n",
                model.w.count, ROPE_TYPE_NAMES[c->rope_type], c->rope_factor, W, (double)act.bytes / (1 << 20));
        int32_t *targets = (int32_t *)xmalloc(W * sizeof(int32_t));
        double total = 0;
        size_t counted = 0;
        for (size_t s = 0; s + 1 < n_ids; s += W) {
            size_t n = n_ids - s < W ? n_ids - s : W;
            if (n < 2) break;
            for (size_t i = 0; i < n; i++) targets[i] = i + 1 < n ? ids[s + i + 1] : IGNORE_INDEX;
            float loss = model_forward(&model, &act, ids + s, targets, 1, n, NULL);
            total += (double)loss * (double)act.loss_count;
            counted += act.loss_count;
        }
        double mean = total / (double)counted;
        printf("loss %.6f ppl %.4f tokens %zu\n", mean, exp(mean), counted);
        free(targets);
        act_free(&act);
    }
    free(ids);
    if (have_tok) tok_free(&tok);
    model_free(&model);
    return 0;
}
#endif /* STAGE == 2 */
