/* 06_infer.c: what a user does after training: generate, measure perplexity, test passkey
 * retrieval, and export a merged model.
 *
 * Teaches: inference with a KV cache. Prefill runs the prompt through the model once and
 * keeps every layer's keys and values; each new token then costs one row through the
 * layers and one attention read over the cache. Around that: sampling (greedy,
 * temperature, top-p), LongLoRA's evaluation protocols (sliding-window perplexity and
 * passkey retrieval, both written down exactly below) and merging an adapter into a
 * HuggingFace folder (bf16 shards + index, config.json with the rope_scaling and
 * max_position_embeddings the model was trained for, tokenizer files copied).
 * Runs on: the GPU where this build has CUDA and the machine a GPU (04_load.c's
 * device_choose, as 05_train; --device cpu|gpu overrides, the startup line says which and
 * why), else the CPU. The CPU runs fp32 (02's pieces, the KV cache in fp32, the adapter
 * applied through 02's LinearHook or merged). The GPU: bf16 weights read from the files
 * straight to the GPU (04_load.c; the host keeps embed and the norms in fp32, or the whole
 * fp32 model for --merge), cuBLAS for the projections, 04's layer kernels, 04's flash attention for the
 * prefill and its split-K decode attention for every new token, a bf16 KV cache, the
 * adapter applied through 04's LoRA path or merged. A generation prefill's last layer
 * computes keys and values for every row but everything else for the last row only.
 * Checked against: 02's full forward (every logit of a cached decode), HF transformers'
 * perplexity and its reload of our exported folder (fixtures from tests/ref/), the CPU
 * path (the GPU's greedy tokens, logits and window losses: tests/test_gpu_infer.c).
 * Leaves out: batching several prompts, beam search, chunked prefill on the GPU (a prompt
 * is prefilled in one pass, so the activations are planned for the whole context),
 * speculative decoding and quantised weights.
 *
 * CLI (one of the four jobs per run):
 *   06_infer --model DIR [--adapter DIR [--merge]] [--ctx N] [--device cpu|gpu]
 *            --prompt TEXT | --prompt-file F  [--template none|llama2-chat] [--max-new N]
 *            [--temperature T] [--top-p P] [--seed S]
 *   06_infer ... --ppl TOKENS [--seq-len N[,N...]] [--stride S] [--max-windows K]
 *   06_infer ... --passkey [--max-tokens N] [--interval I] [--trials K] [--csv F]
 *   06_infer ... --export DIR [--shard-size BYTES]
 *   06_infer --init random --shape llama2-7b --device gpu --bench [--bench-out F]
 *
 * Shape legend: B batch, N sequence, D model width, H heads, Hk kv heads, d head dim,
 * F ffn width, V vocab, L layers, G S2 group, R LoRA rank.
 */
#ifndef STAGE
#define STAGE 6
#endif
#include "03_lora.c"

#include <unistd.h>
#ifdef USE_CUDA
#include "04_gpu.h" /* the GPU engine runs 04's kernels */
#endif
#include "04_load.c" /* where it runs (device_choose, as 05_train), the GPU loader */

/* Set by infer_main before engine_init: the model folder whose files the tensors the host
 * model lacks (all but embed and the norms: 02's model_try_load_host for the GPU) are read
 * from, straight to the GPU in bf16 (04_load.c). NULL: the host model has every tensor. */
static const char *infer_weights_dir = NULL;

/* =======================================================================================
 * 1. The CPU engine: fp32, a KV cache, 02's pieces
 * ===================================================================================== */

typedef struct {
    size_t n_cap;             /* positions the cache holds (the context) */
    size_t chunk;             /* rows one forward call processes (prefill goes in chunks) */
    float *k_cache, *v_cache; /* [L, n_cap, Hk*d] after RoPE (k) */
    float *inv_freq;          /* [d/2] RoPE's frequencies for the current forward (rope_inv_freq) */
    float rope_attention;     /* and yarn's scale of cos and sin */
    float *rope_cos, *rope_sin; /* [chunk, d/2] the tables of the rows being run */
    float *x;                 /* [chunk, D] residual stream */
    float *xn;                /* [chunk, D] normalised */
    float *rstd;              /* [chunk] */
    float *q;                 /* [chunk, H*d] */
    float *att;               /* [chunk, H*d] */
    float *proj;              /* [chunk, D] o and down outputs */
    float *gate, *up, *h;     /* [chunk, F] */
    float *scratch;           /* [threads, n_cap] attention rows */
    int n_threads;
    Activations act;          /* 02's full forward, for window losses (planned on first use) */
    size_t act_N;
} CpuEngine;

/* Bytes of a KV cache of n_cap positions with elem-byte entries. */
static double kv_cache_bytes(const Config *c, size_t n_cap, size_t elem) {
    return 2.0 * c->n_layers * (double)n_cap * c->n_kv_heads * c->head_dim * (double)elem;
}
static double gib(double bytes) { return bytes / (1024.0 * 1024.0 * 1024.0); }

static void cpu_engine_init(CpuEngine *e, const Config *c, size_t n_cap) {
    memset(e, 0, sizeof *e);
    double need = kv_cache_bytes(c, n_cap, sizeof(float));
    double have = (double)sysconf(_SC_PHYS_PAGES) * (double)sysconf(_SC_PAGESIZE);
    if (have > 0 && need > have)
        die("a context of %zu positions needs a KV cache of %.2f GiB (2 x %d layers x %zu positions x %d kv heads x %d dims x 4 bytes) "
            "but this machine has %.2f GiB of memory; lower --ctx",
            n_cap, gib(need), c->n_layers, n_cap, c->n_kv_heads, c->head_dim, gib(have));
    size_t D = (size_t)c->dim, F = (size_t)c->ffn_dim, Hd = (size_t)c->n_heads * c->head_dim;
    size_t Hkd = (size_t)c->n_kv_heads * c->head_dim, L = (size_t)c->n_layers, half = (size_t)c->head_dim / 2;
    e->n_cap = n_cap;
    e->chunk = n_cap < 256 ? n_cap : 256;
    e->n_threads = max_threads();
    e->k_cache = (float *)xcalloc(L * n_cap * Hkd, sizeof(float));
    e->v_cache = (float *)xcalloc(L * n_cap * Hkd, sizeof(float));
    size_t T = e->chunk;
    e->rope_cos = (float *)xmalloc(T * half * sizeof(float));
    e->rope_sin = (float *)xmalloc(T * half * sizeof(float));
    e->inv_freq = (float *)xmalloc(half * sizeof(float));
    e->x = (float *)xmalloc(T * D * sizeof(float));
    e->xn = (float *)xmalloc(T * D * sizeof(float));
    e->rstd = (float *)xmalloc(T * sizeof(float));
    e->q = (float *)xmalloc(T * Hd * sizeof(float));
    e->att = (float *)xmalloc(T * Hd * sizeof(float));
    e->proj = (float *)xmalloc(T * D * sizeof(float));
    e->gate = (float *)xmalloc(T * F * sizeof(float));
    e->up = (float *)xmalloc(T * F * sizeof(float));
    e->h = (float *)xmalloc(T * F * sizeof(float));
    e->scratch = (float *)xmalloc((size_t)e->n_threads * n_cap * sizeof(float));
}

static void cpu_engine_free(CpuEngine *e) {
    free(e->k_cache); free(e->v_cache); free(e->rope_cos); free(e->rope_sin); free(e->inv_freq);
    free(e->x); free(e->xn); free(e->rstd); free(e->q); free(e->att); free(e->proj);
    free(e->gate); free(e->up); free(e->h); free(e->scratch);
    if (e->act.memory) act_free(&e->act);
    memset(e, 0, sizeof *e);
}

/* Causal attention of T new queries at positions pos0.. over the cache rows [0, pos0 + t]:
 * 02's attention_row with the keys read from the cache. */
static void attention_cached(float *out /* [T, H*d] */, const float *q /* [T, H*d] */, const float *k_cache /* [n_cap, Hk*d] */,
                             const float *v_cache /* [n_cap, Hk*d] */, size_t T, size_t pos0, int H, int Hk, int d,
                             float *scratch /* [threads, n_cap] */, size_t n_cap) {
    size_t qs = (size_t)H * d, ks = (size_t)Hk * d;
#pragma omp parallel for collapse(2) schedule(dynamic, 4)
    for (size_t t = 0; t < T; t++)
        for (int h = 0; h < H; h++) {
            size_t kv = (size_t)(h / (H / Hk)) * d;
            attention_row(out + t * qs + (size_t)h * d, q + t * qs + (size_t)h * d, k_cache + kv, v_cache + kv, ks, 0, pos0 + t, d,
                          scratch + (size_t)thread_id() * n_cap);
        }
}

/* Runs tokens [T] at positions pos0 .. pos0+T-1 (pos0 + T <= n_cap, T <= chunk) through the
 * model, writing their keys and values into the cache; logits [V] (if not NULL) gets the
 * last token's logits. o carries the adapter hook when the adapter is applied unmerged. */
static void cpu_forward_rows(CpuEngine *e, const Model *m, const RunOptions *o, const int32_t *tokens, size_t T, size_t pos0,
                             float *logits) {
    const Config *c = &m->cfg;
    size_t D = (size_t)c->dim, F = (size_t)c->ffn_dim, Hkd = (size_t)c->n_kv_heads * c->head_dim;
    CHECK(T <= e->chunk && pos0 + T <= e->n_cap, "%zu rows at position %zu do not fit the cache", T, pos0);
    if (max_threads() > e->n_threads) die("OpenMP now runs %d threads but the engine was planned for %d", max_threads(), e->n_threads);
    for (size_t t = 0; t < T; t++) {
        if (tokens[t] < 0 || tokens[t] >= c->vocab_size) die("token id %d is outside the vocabulary of %d", tokens[t], c->vocab_size);
        memcpy(e->x + t * D, m->w.embed + (size_t)tokens[t] * D, D * sizeof(float));
    }
    rope_tables(e->rope_cos, e->rope_sin, pos0, T, e->inv_freq, c->head_dim, e->rope_attention);
    for (int l = 0; l < c->n_layers; l++) {
        const LayerParams *lp = &m->w.layers[l];
        float *kc = e->k_cache + (size_t)l * e->n_cap * Hkd, *vc = e->v_cache + (size_t)l * e->n_cap * Hkd;
        rmsnorm_forward(e->xn, e->rstd, e->x, lp->attn_norm, T, D, c->rms_eps);
        project(m, o, l, PROJ_Q, e->xn, T, e->q);
        project(m, o, l, PROJ_K, e->xn, T, kc + pos0 * Hkd); /* straight into the cache */
        project(m, o, l, PROJ_V, e->xn, T, vc + pos0 * Hkd);
        rope_apply(e->q, e->rope_cos, e->rope_sin, 1, T, c->n_heads, c->head_dim, 1.0f);
        rope_apply(kc + pos0 * Hkd, e->rope_cos, e->rope_sin, 1, T, c->n_kv_heads, c->head_dim, 1.0f);
        attention_cached(e->att, e->q, kc, vc, T, pos0, c->n_heads, c->n_kv_heads, c->head_dim, e->scratch, e->n_cap);
        project(m, o, l, PROJ_O, e->att, T, e->proj);
        for (size_t i = 0; i < T * D; i++) e->x[i] += e->proj[i];
        rmsnorm_forward(e->xn, e->rstd, e->x, lp->mlp_norm, T, D, c->rms_eps);
        project(m, o, l, PROJ_GATE, e->xn, T, e->gate);
        project(m, o, l, PROJ_UP, e->xn, T, e->up);
        swiglu_forward(e->h, e->gate, e->up, T * F);
        project(m, o, l, PROJ_DOWN, e->h, T, e->proj);
        for (size_t i = 0; i < T * D; i++) e->x[i] += e->proj[i];
    }
    if (logits) {
        rmsnorm_forward(e->xn, e->rstd, e->x + (T - 1) * D, m->w.final_norm, 1, D, c->rms_eps);
        matmul_forward(logits, e->xn, m->w.lm_head, 1, D, (size_t)c->vocab_size);
    }
}

/* =======================================================================================
 * 2. The GPU engine: bf16 weights and KV cache, cuBLAS, 04's kernels
 * ===================================================================================== */
#ifdef USE_CUDA

typedef struct {
    uint16_t *attn_norm, *mlp_norm;           /* [D] */
    uint16_t *wq, *wk, *wv, *wo;              /* [H*d, D], [Hk*d, D] x 2, [D, H*d] */
    uint16_t *w_gate, *w_up, *w_down;         /* [F, D] x 2, [D, F] */
    uint16_t *bq, *bk, *bv;                   /* [H*d], [Hk*d] x 2 biases (Qwen2), NULL without */
} GpuLayer;

typedef struct { uint16_t *ptr; size_t numel; int kind; /* 0 matrix, 1 norm, 2 bias */ } GpuTensor;

typedef struct {
    Config cfg;
    size_t n_cap;                 /* KV cache positions = the most rows one prefill takes */
    uint16_t *embed;              /* [V, D] */
    uint16_t *final_norm;         /* [D] */
    uint16_t *lm_head;            /* [V, D] (embed when tied) */
    GpuLayer *layers;             /* [L] */
    GpuTensor *tensors;           /* [n_tensors] in 02's params_list order */
    size_t n_tensors;
    uint16_t *k_cache, *v_cache;  /* [L, n_cap, Hk, d] */
    int32_t *tokens;              /* [n_cap] */
    int32_t *targets;             /* [n_cap] */
    uint16_t *x, *xn, *proj;      /* [n_cap, D] */
    uint16_t *q, *att;            /* [n_cap, H*d] */
    uint16_t *gate, *up;          /* [n_cap, F] (h overwrites gate) */
    float *lse;                   /* [H, n_cap] */
    float *logits;                /* [V] */
    float *inv_freq;              /* [d/2] RoPE's frequencies (02's rope_inv_freq; the engine sets them) */
    float rope_attention;         /* yarn's scale of cos and sin (1 otherwise) */
    void *decode_ws;              /* attn_decode's workspace for n_cap keys */
    double weight_bytes;
    /* an adapter applied unmerged (04's LoRA path after each projection), or none */
    uint16_t **lora_A, **lora_B;  /* [L * N_PROJ]: [R, in] and [out, R] bf16, NULL where none */
    size_t lora_R;                /* R */
    float lora_scale;             /* alpha / R */
    uint16_t *xa;                 /* [n_cap, R] */
} GpuEngine;


/* Allocates the weights (in 02's params_list order, so uploads can walk both lists). */
static void gpu_engine_alloc_weights(GpuEngine *g, const Config *c) {
    size_t D = (size_t)c->dim, V = (size_t)c->vocab_size, L = (size_t)c->n_layers;
    g->cfg = *c;
    g->layers = (GpuLayer *)xcalloc(L, sizeof(GpuLayer));
    g->tensors = (GpuTensor *)xcalloc(3 + 12 * L, sizeof(GpuTensor));
    g->n_tensors = 0;
#define GPU_TENSOR(dst, n, norm)                                                                    \
    do {                                                                                             \
        (dst) = (uint16_t *)gpu_malloc((n) * sizeof(uint16_t), "the model's bf16 weights");         \
        g->tensors[g->n_tensors++] = (GpuTensor){(dst), (n), (norm)};                                \
        g->weight_bytes += (double)(n) * 2.0;                                                        \
    } while (0)
    GPU_TENSOR(g->embed, V * D, 0);
    for (size_t l = 0; l < L; l++) {
        GpuLayer *gl = &g->layers[l];
        size_t in, out;
        GPU_TENSOR(gl->attn_norm, D, 1);
        proj_shape(c, PROJ_Q, &in, &out); GPU_TENSOR(gl->wq, in * out, 0);
        if (c->qkv_bias) GPU_TENSOR(gl->bq, out, 2);
        proj_shape(c, PROJ_K, &in, &out); GPU_TENSOR(gl->wk, in * out, 0);
        if (c->qkv_bias) GPU_TENSOR(gl->bk, out, 2);
        proj_shape(c, PROJ_V, &in, &out); GPU_TENSOR(gl->wv, in * out, 0);
        if (c->qkv_bias) GPU_TENSOR(gl->bv, out, 2);
        proj_shape(c, PROJ_O, &in, &out); GPU_TENSOR(gl->wo, in * out, 0);
        proj_shape(c, PROJ_GATE, &in, &out); GPU_TENSOR(gl->w_gate, in * out, 0);
        proj_shape(c, PROJ_UP, &in, &out); GPU_TENSOR(gl->w_up, in * out, 0);
        proj_shape(c, PROJ_DOWN, &in, &out); GPU_TENSOR(gl->w_down, in * out, 0);
        GPU_TENSOR(gl->mlp_norm, D, 1);
    }
    GPU_TENSOR(g->final_norm, D, 1);
    if (c->tie_embeddings) g->lm_head = g->embed;
    else GPU_TENSOR(g->lm_head, V * D, 0);
#undef GPU_TENSOR
}

/* Copies the host model (fp32) to the GPU as bf16, one tensor at a time; the tensors it
 * does not hold come from infer_weights_dir's files. */
static void gpu_engine_upload(GpuEngine *g, const Model *m) {
    size_t n = params_list(&m->w, &m->cfg, NULL);
    CHECK(n == g->n_tensors, "GPU tensor list (%zu) and model tensor list (%zu) differ", g->n_tensors, n);
    ParamRef *refs = (ParamRef *)xmalloc(n * sizeof(ParamRef));
    params_list(&m->w, &m->cfg, refs);
    size_t biggest = 0;
    for (size_t i = 0; i < n; i++) if (g->tensors[i].numel > biggest) biggest = g->tensors[i].numel;
    uint16_t *host = (uint16_t *)xmalloc(biggest * sizeof(uint16_t)); /* [biggest] */
    GpuLoader ld;
    int from_files = 0;
    for (size_t i = 0; i < n; i++) {
        size_t numel = g->tensors[i].numel;
        CHECK((size_t)refs[i].shape[0] * (size_t)refs[i].shape[1] == numel && (refs[i].ndim == 1) == (g->tensors[i].kind != 0),
              "tensor %s does not match the GPU layout", refs[i].name);
        if (!refs[i].data) { /* not on the host: from the files */
            if (!from_files && (!infer_weights_dir || gpu_loader_open(&ld, infer_weights_dir, &m->cfg) != 0))
                die("%s", infer_weights_dir ? last_error() : "the host model lacks a tensor and there is no folder to read it from");
            from_files = 1;
            gpu_load_named(&ld, refs[i].name, g->tensors[i].ptr, numel);
            continue;
        }
#pragma omp parallel for
        for (size_t k = 0; k < numel; k++) host[k] = f32_to_bf16(refs[i].data[k]);
        CUDA_CHECK(cudaMemcpy(g->tensors[i].ptr, host, numel * sizeof(uint16_t), cudaMemcpyHostToDevice));
    }
    if (from_files) {
        char note[200];
        gpu_loader_summary(&ld, note, sizeof note);
        gpu_loader_close(&ld);
        fprintf(stderr, "06_infer: frozen weights straight to the GPU in bf16: %s\n", note);
    }
    free(host);
    free(refs);
}

/* Random bf16 weights straight on the GPU side (for benchmarks at 7B, where an fp32 host
 * copy would be 27 GB): linears ~ N(0, std^2) (approximately: a sum of 4 uniforms),
 * norms ~ 1 + N(0, 0.1^2), from a counter-based hash so threads need no shared state. */
static void gpu_engine_random(GpuEngine *g, uint64_t seed, float std) {
    size_t biggest = 0;
    for (size_t i = 0; i < g->n_tensors; i++) if (g->tensors[i].numel > biggest) biggest = g->tensors[i].numel;
    uint16_t *host = (uint16_t *)xmalloc(biggest * sizeof(uint16_t)); /* [biggest] */
    for (size_t i = 0; i < g->n_tensors; i++) {
        size_t numel = g->tensors[i].numel;
        float s = g->tensors[i].kind == 1 ? 0.1f : std, base = g->tensors[i].kind == 1 ? 1.0f : 0.0f;
#pragma omp parallel for
        for (size_t k = 0; k < numel; k++) {
            uint64_t z = seed ^ ((uint64_t)i << 40) ^ k;
            uint64_t r = splitmix64(&z);
            float u = (float)(r & 0xffff) + (float)((r >> 16) & 0xffff) + (float)((r >> 32) & 0xffff) + (float)(r >> 48);
            float normal = (u / 65536.0f - 2.0f) * 1.7320508f; /* mean 0, variance 1 */
            host[k] = f32_to_bf16(base + s * normal);
        }
        CUDA_CHECK(cudaMemcpy(g->tensors[i].ptr, host, numel * sizeof(uint16_t), cudaMemcpyHostToDevice));
    }
    free(host);
}

/* The KV cache and the activations for a prefill of up to n_cap rows. Checks the memory
 * first, so a context that does not fit ends with what it would need. */
static void gpu_engine_alloc_cache(GpuEngine *g, size_t n_cap) {
    const Config *c = &g->cfg;
    size_t D = (size_t)c->dim, F = (size_t)c->ffn_dim, Hd = (size_t)c->n_heads * c->head_dim, V = (size_t)c->vocab_size;
    if (c->head_dim != 64 && c->head_dim != 128) die("the GPU path needs head_dim 64 or 128 (this model has %d); use --device cpu", c->head_dim);
    if (c->n_heads / c->n_kv_heads > 8) die("the GPU decode attention needs at most 8 query heads per kv head (this model has %d)", c->n_heads / c->n_kv_heads);
    if (n_cap > (size_t)INT_MAX) die("a context of %zu positions is beyond the GPU kernels' int sizes; lower --ctx", n_cap);
    g->n_cap = n_cap;
    double kv = kv_cache_bytes(c, n_cap, sizeof(uint16_t));
    double acts = (double)n_cap * (3.0 * D + 2.0 * Hd + 2.0 * F) * 2.0 + (double)n_cap * (c->n_heads * 4.0 + 8.0) + V * 4.0 +
                  (double)attn_decode_workspace_bytes(1, c->n_heads, c->head_dim, (int)n_cap);
    size_t free_b = 0, total_b = 0;
    CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
    if (kv + acts + (512.0 * 1024 * 1024) > (double)free_b)
        die("a context of %zu positions needs %.2f GiB on the GPU for the bf16 KV cache (2 x %d layers x %zu positions x %d kv heads x %d dims x 2 bytes) "
            "and %.2f GiB for the prefill activations, but only %.2f GiB of %.2f GiB is free after the %.2f GiB of weights; lower --ctx",
            n_cap, gib(kv), c->n_layers, n_cap, c->n_kv_heads, c->head_dim, gib(acts), gib((double)free_b), gib((double)total_b), gib(g->weight_bytes));
    size_t kv_elems = (size_t)c->n_layers * n_cap * (size_t)c->n_kv_heads * c->head_dim;
    g->k_cache = (uint16_t *)gpu_malloc(kv_elems * 2, "the KV cache");
    g->v_cache = (uint16_t *)gpu_malloc(kv_elems * 2, "the KV cache");
    g->tokens = (int32_t *)gpu_malloc(n_cap * sizeof(int32_t), "token ids");
    g->targets = (int32_t *)gpu_malloc(n_cap * sizeof(int32_t), "target ids");
    g->x = (uint16_t *)gpu_malloc(n_cap * D * 2, "activations");
    g->xn = (uint16_t *)gpu_malloc(n_cap * D * 2, "activations");
    g->proj = (uint16_t *)gpu_malloc(n_cap * D * 2, "activations");
    g->q = (uint16_t *)gpu_malloc(n_cap * Hd * 2, "activations");
    g->att = (uint16_t *)gpu_malloc(n_cap * Hd * 2, "activations");
    g->gate = (uint16_t *)gpu_malloc(n_cap * F * 2, "activations");
    g->up = (uint16_t *)gpu_malloc(n_cap * F * 2, "activations");
    g->lse = (float *)gpu_malloc((size_t)c->n_heads * n_cap * sizeof(float), "activations");
    g->logits = (float *)gpu_malloc(V * sizeof(float), "logits");
    g->decode_ws = gpu_malloc(attn_decode_workspace_bytes(1, c->n_heads, c->head_dim, (int)n_cap), "the decode workspace");
    g->inv_freq = (float *)gpu_malloc((size_t)c->head_dim / 2 * sizeof(float), "the RoPE table");
}

/* Uploads an adapter to apply unmerged: its A and B in bf16 (after gpu_engine_alloc_cache). */
static void gpu_engine_upload_lora(GpuEngine *g, const LoraAdapter *ad) {
    size_t n = (size_t)g->cfg.n_layers * N_PROJ, R = (size_t)ad->cfg.rank;
    g->lora_A = (uint16_t **)xcalloc(n, sizeof(uint16_t *));
    g->lora_B = (uint16_t **)xcalloc(n, sizeof(uint16_t *));
    g->lora_R = R;
    g->lora_scale = ad->scale;
    g->xa = (uint16_t *)gpu_malloc(g->n_cap * R * sizeof(uint16_t), "the LoRA activations");
    for (size_t k = 0; k < n; k++) {
        const LoraPair *p = &ad->pairs[k];
        if (!p->A) continue;
        const float *src[2] = {p->A, p->B};
        size_t numel[2] = {R * p->in, p->out * R};
        uint16_t **dst[2] = {&g->lora_A[k], &g->lora_B[k]};
        for (int w = 0; w < 2; w++) {
            uint16_t *host = (uint16_t *)xmalloc(numel[w] * sizeof(uint16_t));
            for (size_t i = 0; i < numel[w]; i++) host[i] = f32_to_bf16(src[w][i]);
            *dst[w] = (uint16_t *)gpu_malloc(numel[w] * sizeof(uint16_t), "the adapter");
            CUDA_CHECK(cudaMemcpy(*dst[w], host, numel[w] * sizeof(uint16_t), cudaMemcpyHostToDevice));
            g->weight_bytes += (double)numel[w] * 2.0;
            free(host);
        }
    }
}

/* y [T, out] += scale * (x A^T) B^T for projection `which` of layer l, when it has an adapter. */
static void gpu_lora(GpuEngine *g, int l, int which, const uint16_t *x /* [T, in] */, uint16_t *y /* [T, out] */, size_t T) {
    if (!g->lora_A) return;
    size_t k = (size_t)l * N_PROJ + (size_t)which, in, out;
    if (!g->lora_A[k]) return;
    proj_shape(&g->cfg, which, &in, &out);
    gpu_lora_forward(y, g->xa, x, g->lora_A[k], g->lora_B[k], T, in, out, g->lora_R, g->lora_scale);
}

static void gpu_engine_free(GpuEngine *g) {
    for (size_t i = 0; i < g->n_tensors; i++) cudaFree(g->tensors[i].ptr);
    for (size_t k = 0; g->lora_A && k < (size_t)g->cfg.n_layers * N_PROJ; k++) {
        if (g->lora_A[k]) cudaFree(g->lora_A[k]);
        if (g->lora_B[k]) cudaFree(g->lora_B[k]);
    }
    if (g->xa) cudaFree(g->xa);
    free(g->lora_A);
    free(g->lora_B);
    void *bufs[] = {g->k_cache, g->v_cache, g->tokens, g->targets, g->x, g->xn, g->proj, g->q, g->att, g->gate, g->up, g->lse, g->logits, g->decode_ws, g->inv_freq};
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++) if (bufs[i]) cudaFree(bufs[i]);
    free(g->layers);
    free(g->tensors);
    memset(g, 0, sizeof *g);
}

/* Tokens [T] at positions pos0 .. pos0+T-1 through the layers; keys and values go into the
 * cache. A prefill (T rows) must start at position 0 (flash attention over the rows); a
 * decode step (T = 1) reads every cached key with 04's decode attention. The last layer's
 * output stays in g->x [T, D]. With last_row_only, only row T-1 of the output is wanted
 * (generation): the last layer then computes keys and values for every row (the cache
 * needs them) but its queries, attention, o projection and MLP for row T-1 alone. */
static void gpu_forward_rows(GpuEngine *g, const int32_t *tokens, size_t T, size_t pos0, int last_row_only) {
    const Config *c = &g->cfg;
    size_t D = (size_t)c->dim, F = (size_t)c->ffn_dim, V = (size_t)c->vocab_size, H = (size_t)c->n_heads, Hk = (size_t)c->n_kv_heads;
    size_t d = (size_t)c->head_dim, Hd = H * d, Hkd = Hk * d;
    CHECK(T >= 1 && pos0 + T <= g->n_cap && (pos0 == 0 || T == 1), "GPU forward of %zu rows at %zu is not supported", T, pos0);
    for (size_t t = 0; t < T; t++)
        if (tokens[t] < 0 || tokens[t] >= c->vocab_size) die("token id %d is outside the vocabulary of %d", tokens[t], c->vocab_size);
    CUDA_CHECK(cudaMemcpy(g->tokens, tokens, T * sizeof(int32_t), cudaMemcpyHostToDevice));
    gpu_embedding_forward(g->x, g->tokens, g->embed, T, D, V);
    for (int l = 0; l < c->n_layers; l++) {
        const GpuLayer *gl = &g->layers[l];
        uint16_t *kc = g->k_cache + (size_t)l * g->n_cap * Hkd, *vc = g->v_cache + (size_t)l * g->n_cap * Hkd;
        gpu_rmsnorm_forward(g->xn, NULL, g->x, gl->attn_norm, T, D, c->rms_eps);
        gpu_matmul_bf16(0, 1, T, Hkd, D, 1.0f, g->xn, gl->wk, 0.0f, kc + pos0 * Hkd, 0);
        if (gl->bk) gpu_add_bias(kc + pos0 * Hkd, gl->bk, T, Hkd);
        gpu_lora(g, l, PROJ_K, g->xn, kc + pos0 * Hkd, T);
        gpu_matmul_bf16(0, 1, T, Hkd, D, 1.0f, g->xn, gl->wv, 0.0f, vc + pos0 * Hkd, 0);
        if (gl->bv) gpu_add_bias(vc + pos0 * Hkd, gl->bv, T, Hkd);
        gpu_lora(g, l, PROJ_V, g->xn, vc + pos0 * Hkd, T);
        gpu_rope_forward(kc + pos0 * Hkd, T, Hk, d, Hkd, pos0, g->inv_freq, g->rope_attention);
        if (last_row_only && T > 1 && l == c->n_layers - 1) {
            /* from here on one row: the last, at position pos0 + T - 1, seeing all T keys */
            size_t last = T - 1;
            CUDA_CHECK(cudaMemcpy(g->x, g->x + last * D, D * sizeof(uint16_t), cudaMemcpyDeviceToDevice));
            CUDA_CHECK(cudaMemcpy(g->xn, g->xn + last * D, D * sizeof(uint16_t), cudaMemcpyDeviceToDevice));
            pos0 += last;
            T = 1;
        }
        gpu_matmul_bf16(0, 1, T, Hd, D, 1.0f, g->xn, gl->wq, 0.0f, g->q, 0);
        if (gl->bq) gpu_add_bias(g->q, gl->bq, T, Hd);
        gpu_lora(g, l, PROJ_Q, g->xn, g->q, T);
        gpu_rope_forward(g->q, T, H, d, Hd, pos0, g->inv_freq, g->rope_attention);
        int rc = pos0 == 0 ? attn_forward(g->q, kc, vc, g->att, g->lse, 1, (int)T, (int)H, (int)Hk, (int)d, 0)
                           : attn_decode(g->q, kc, vc, g->att, g->decode_ws, 1, (int)H, (int)Hk, (int)d, (int)g->n_cap, (int)(pos0 + 1));
        if (rc != 0) die("GPU attention: %s", last_error());
        gpu_matmul_bf16(0, 1, T, D, Hd, 1.0f, g->att, gl->wo, 0.0f, g->proj, 0);
        gpu_lora(g, l, PROJ_O, g->att, g->proj, T);
        gpu_add(g->x, g->x, g->proj, T * D);
        gpu_rmsnorm_forward(g->xn, NULL, g->x, gl->mlp_norm, T, D, c->rms_eps);
        gpu_matmul_bf16(0, 1, T, F, D, 1.0f, g->xn, gl->w_gate, 0.0f, g->gate, 0);
        gpu_lora(g, l, PROJ_GATE, g->xn, g->gate, T);
        gpu_matmul_bf16(0, 1, T, F, D, 1.0f, g->xn, gl->w_up, 0.0f, g->up, 0);
        gpu_lora(g, l, PROJ_UP, g->xn, g->up, T);
        gpu_swiglu_forward(g->gate, g->gate, g->up, T * F);
        gpu_matmul_bf16(0, 1, T, D, F, 1.0f, g->gate, gl->w_down, 0.0f, g->proj, 0);
        gpu_lora(g, l, PROJ_DOWN, g->gate, g->proj, T);
        gpu_add(g->x, g->x, g->proj, T * D);
    }
}

/* The logits of row `row` of the last forward, to the host (fp32 [V]). */
static void gpu_last_logits(GpuEngine *g, size_t row, float *logits) {
    const Config *c = &g->cfg;
    size_t D = (size_t)c->dim, V = (size_t)c->vocab_size;
    gpu_rmsnorm_forward(g->xn, NULL, g->x + row * D, g->final_norm, 1, D, c->rms_eps);
    gpu_matmul_bf16(0, 1, 1, V, D, 1.0f, g->xn, g->lm_head, 0.0f, g->logits, 1);
    CUDA_CHECK(cudaMemcpy(logits, g->logits, V * sizeof(float), cudaMemcpyDeviceToHost));
}
#endif /* USE_CUDA */

/* =======================================================================================
 * 3. One engine for the jobs below: CPU or GPU behind the same three calls
 * ===================================================================================== */

typedef struct {
    int on_gpu;
    Model *model;         /* host model (fp32); NULL for GPU-only random weights */
    RunOptions run;       /* the adapter's hook when it is applied unmerged */
    Config cfg;
    size_t n_cap;         /* context: KV cache positions */
    size_t pos;           /* positions filled */
    size_t rope_cached;   /* the sequence length RoPE's frequencies were made for (dynamic NTK's state) */
    float *logits;        /* [V] host: the logits after the last token fed */
    CpuEngine cpu;
#ifdef USE_CUDA
    GpuEngine gpu;
#endif
} Engine;

/* RoPE's frequencies before a forward that reaches position seq_len - 1 (0: at start-up).
 * Only dynamic NTK's change, by transformers' rule (dynamic_rope_update): remade for seq_len
 * when it grows past the length they were made for, back to the plain ones when a forward
 * stays below max_position_embeddings; keys already in the cache keep their rotation, as in
 * transformers' generation. */
static void engine_rope(Engine *e, size_t seq_len) {
    const Config *c = &e->cfg;
    size_t orig = (size_t)c->max_pos, cached = e->rope_cached ? e->rope_cached : orig;
    int remake = e->rope_cached == 0;
    if (c->rope_type == ROPE_DYNAMIC) {
        if (seq_len > cached) { cached = seq_len; remake = 1; }
        if (seq_len < orig && cached > orig) { cached = orig; remake = 1; }
    }
    if (!remake) return;
    e->rope_cached = cached;
    size_t half = (size_t)c->head_dim / 2;
    float *inv_freq = (float *)xmalloc(half * sizeof(float)); /* [d/2] */
    float attention = rope_inv_freq(c, cached, inv_freq);
    if (!e->on_gpu) {
        memcpy(e->cpu.inv_freq, inv_freq, half * sizeof(float));
        e->cpu.rope_attention = attention;
        e->cpu.act.rope_seq_min = cached;
    }
#ifdef USE_CUDA
    else {
        CUDA_CHECK(cudaMemcpy(e->gpu.inv_freq, inv_freq, half * sizeof(float), cudaMemcpyHostToDevice));
        e->gpu.rope_attention = attention;
    }
#endif
    free(inv_freq);
}

/* Starts an engine over a loaded model (CPU, or its bf16 copy on the GPU). */
static void engine_init(Engine *e, Model *m, LinearHook *hook, size_t n_cap, int on_gpu) {
    memset(e, 0, sizeof *e);
    e->model = m;
    e->cfg = m->cfg;
    e->n_cap = n_cap;
    e->run.hook = hook;
    e->logits = (float *)xmalloc((size_t)m->cfg.vocab_size * sizeof(float));
    e->on_gpu = on_gpu;
    if (!on_gpu) { cpu_engine_init(&e->cpu, &m->cfg, n_cap); return; }
#ifdef USE_CUDA
    gpu_engine_alloc_weights(&e->gpu, &m->cfg);
    gpu_engine_upload(&e->gpu, m);
    gpu_engine_alloc_cache(&e->gpu, n_cap);
    if (hook) { /* the only hook this program makes is a LoRA adapter's */
        CHECK(hook->forward == lora_hook_forward, "the GPU engine applies LoRA adapters only");
        gpu_engine_upload_lora(&e->gpu, (const LoraAdapter *)hook->ctx);
    }
#else
    die("this build has no GPU support (built without CUDA); use --device cpu");
#endif
    engine_rope(e, 0);
}

static void engine_free(Engine *e) {
    if (!e->on_gpu) cpu_engine_free(&e->cpu);
#ifdef USE_CUDA
    else gpu_engine_free(&e->gpu);
#endif
    free(e->logits);
    memset(e, 0, sizeof *e);
}

static void engine_sync(const Engine *e) {
#ifdef USE_CUDA
    if (e->on_gpu) CUDA_CHECK(cudaDeviceSynchronize());
#else
    (void)e;
#endif
}

/* Forgets the cache and runs tokens [n] from position 0; e->logits gets the last one's. */
static void engine_prefill(Engine *e, const int32_t *tokens, size_t n) {
    if (n == 0) die("the prompt is empty");
    if (n > e->n_cap) die("the prompt has %zu tokens but the context (--ctx) is %zu", n, e->n_cap);
    e->pos = 0;
    engine_rope(e, n);
    if (!e->on_gpu) {
        for (size_t at = 0; at < n; at += e->cpu.chunk) {
            size_t T = n - at < e->cpu.chunk ? n - at : e->cpu.chunk;
            cpu_forward_rows(&e->cpu, e->model, &e->run, tokens + at, T, at, at + T == n ? e->logits : NULL);
        }
    }
#ifdef USE_CUDA
    else {
        gpu_forward_rows(&e->gpu, tokens, n, 0, 1);
        gpu_last_logits(&e->gpu, 0, e->logits); /* the last row, now row 0 */
    }
#endif
    e->pos = n;
}

/* Appends one token at the next position; e->logits gets its logits. */
static void engine_decode(Engine *e, int32_t token) {
    if (e->pos >= e->n_cap) die("the KV cache is full: the context (--ctx) is %zu positions", e->n_cap);
    engine_rope(e, e->pos + 1);
    if (!e->on_gpu) cpu_forward_rows(&e->cpu, e->model, &e->run, &token, 1, e->pos, e->logits);
#ifdef USE_CUDA
    else {
        gpu_forward_rows(&e->gpu, &token, 1, e->pos, 0);
        gpu_last_logits(&e->gpu, 0, e->logits);
    }
#endif
    e->pos++;
}

/* The mean cross-entropy of the n - 1 next-token predictions inside tokens [n]: position t
 * predicts tokens[t + 1] for t = 0 .. n-2 (what HF computes for labels = input_ids). */
static double engine_window_loss(Engine *e, const int32_t *tokens, size_t n) {
    if (n < 2) die("a perplexity window needs at least 2 tokens");
    if (n > e->n_cap) die("a window of %zu tokens is longer than the context (--ctx %zu)", n, e->n_cap);
    int32_t *targets = (int32_t *)xmalloc(n * sizeof(int32_t)); /* [n] */
    for (size_t t = 0; t + 1 < n; t++) targets[t] = tokens[t + 1];
    targets[n - 1] = IGNORE_INDEX;
    double loss = 0;
    engine_rope(e, n);
    if (!e->on_gpu) {
        if (e->cpu.act_N < n) {
            if (e->cpu.act.memory) act_free(&e->cpu.act);
            act_plan(&e->cpu.act, &e->cfg, 1, n, 0);
            e->cpu.act_N = n;
        }
        e->cpu.act.rope_seq_min = e->rope_cached;
        loss = model_forward(e->model, &e->cpu.act, tokens, targets, 1, n, &e->run);
    }
#ifdef USE_CUDA
    else {
        GpuEngine *g = &e->gpu;
        gpu_forward_rows(g, tokens, n, 0, 0);
        size_t D = (size_t)e->cfg.dim, V = (size_t)e->cfg.vocab_size;
        gpu_rmsnorm_forward(g->xn, NULL, g->x, g->final_norm, n, D, e->cfg.rms_eps);
        CUDA_CHECK(cudaMemcpy(g->targets, targets, n * sizeof(int32_t), cudaMemcpyHostToDevice));
        double sum = 0;
        size_t valid = 0;
        gpu_cross_entropy(&sum, &valid, NULL, NULL, g->xn, g->lm_head, g->targets, n, D, V, 0, 1.0f);
        loss = valid ? sum / (double)valid : 0.0;
    }
#endif
    e->pos = 0;
    free(targets);
    return loss;
}

/* =======================================================================================
 * 4. Sampling
 * ===================================================================================== */

typedef struct {
    float temperature;  /* 0: greedy (argmax) */
    float top_p;        /* nucleus: keep the fewest most likely tokens whose probability reaches top_p */
    Rng rng;
    float *probs;       /* [V] */
    int32_t *order;     /* [V] */
} Sampler;

static void sampler_init(Sampler *s, size_t V, float temperature, float top_p, uint64_t seed) {
    s->temperature = temperature;
    s->top_p = top_p;
    rng_seed(&s->rng, seed);
    s->probs = (float *)xmalloc(V * sizeof(float));
    s->order = (int32_t *)xmalloc(V * sizeof(int32_t));
}
static void sampler_free(Sampler *s) { free(s->probs); free(s->order); memset(s, 0, sizeof *s); }

static int32_t argmax(const float *x, size_t n) {
    size_t best = 0;
    for (size_t i = 1; i < n; i++) if (x[i] > x[best]) best = i;
    return (int32_t)best;
}

static const float *g_sort_probs; /* qsort has no context argument */
static int by_prob_desc(const void *a, const void *b) {
    float pa = g_sort_probs[*(const int32_t *)a], pb = g_sort_probs[*(const int32_t *)b];
    if (pa != pb) return pa < pb ? 1 : -1;
    return *(const int32_t *)a - *(const int32_t *)b;
}

/* The next token from logits [V]: argmax when temperature is 0, else a draw from
 * softmax(logits / temperature) cut to the top-p nucleus (HF's order: temperature, then top-p). */
static int32_t sample_token(Sampler *s, const float *logits, size_t V) {
    if (s->temperature <= 0.0f) return argmax(logits, V);
    float mx = -INFINITY;
    for (size_t i = 0; i < V; i++) if (logits[i] > mx) mx = logits[i];
    double sum = 0;
    for (size_t i = 0; i < V; i++) { s->probs[i] = expf((logits[i] - mx) / s->temperature); sum += s->probs[i]; }
    for (size_t i = 0; i < V; i++) s->probs[i] = (float)(s->probs[i] / sum);
    size_t keep = V;
    double mass = 1.0;
    for (size_t i = 0; i < V; i++) s->order[i] = (int32_t)i;
    if (s->top_p < 1.0f) {
        g_sort_probs = s->probs;
        qsort(s->order, V, sizeof(int32_t), by_prob_desc);
        double cum = 0;
        keep = 0;
        while (keep < V && (keep == 0 || cum < s->top_p)) cum += s->probs[s->order[keep++]];
        mass = cum;
    }
    double u = (double)rng_uniform(&s->rng) * mass, cum = 0;
    for (size_t i = 0; i < keep; i++) {
        cum += s->probs[s->order[i]];
        if (u < cum) return s->order[i];
    }
    return s->order[keep - 1];
}

/* =======================================================================================
 * 5. Generation: prompt in, tokens streamed out
 * ===================================================================================== */

typedef struct {
    size_t prompt_tokens, new_tokens;
    double prefill_seconds, decode_seconds;
} GenStats;

/* Prefills prompt [n] and samples up to max_new tokens into out [max_new] (may be NULL),
 * stopping after EOS (eos_id < 0: never). Each token's text goes to stream (if not NULL)
 * as soon as it is decoded. Returns how many tokens were produced (the EOS not counted). */
static size_t generate(Engine *e, Sampler *s, const Tokenizer *tok, const int32_t *prompt, size_t n, size_t max_new,
                       int32_t eos_id, int32_t *out, FILE *stream, GenStats *stats) {
    if (n + max_new > e->n_cap)
        die("the prompt (%zu tokens) and --max-new %zu do not fit the context (--ctx %zu)", n, max_new, e->n_cap);
    double t0 = now_seconds();
    engine_prefill(e, prompt, n);
    engine_sync(e);
    double t1 = now_seconds();
    TokDecoder dec;
    tok_decoder_init(&dec);
    TokText text = {0};
    size_t produced = 0;
    for (size_t i = 0; i < max_new; i++) {
        int32_t next = sample_token(s, e->logits, (size_t)e->cfg.vocab_size);
        if (eos_id >= 0 && next == eos_id) break;
        if (out) out[produced] = next;
        produced++;
        if (tok && stream) {
            text.len = 0;
            /* an id past the tokenizer's vocabulary (LongLoRA's models add a pad token, V = 32001)
             * has no text: it is generated but prints nothing */
            if (tok_decode_next(tok, &dec, next, &text) != 0) text.len = 0;
            fwrite(text.data, 1, text.len, stream);
            fflush(stream);
        }
        if (i + 1 < max_new) engine_decode(e, next);
    }
    if (tok && stream) {
        text.len = 0;
        tok_decode_flush(tok, &dec, &text);
        if (text.len) fwrite(text.data, 1, text.len, stream);
        fflush(stream);
    }
    free(text.data);
    engine_sync(e);
    double t2 = now_seconds();
    if (stats) {
        stats->prompt_tokens = n;
        stats->new_tokens = produced;
        stats->prefill_seconds = t1 - t0;
        stats->decode_seconds = t2 - t1;
    }
    return produced;
}

/* =======================================================================================
 * 6. Perplexity, LongLoRA's protocol (its eval.py):
 *   windows start at i = 0, stride, 2*stride, ... while i < n_tokens - seq_len, and the
 *   last of those starts is dropped; window i is tokens [i, i + seq_len). Inside a window
 *   the model scores the seq_len - 1 next-token predictions (position t predicts token
 *   t + 1; HF's labels = input_ids), and the window's loss is their mean. The loss of a
 *   seq_len is the mean over windows, PPL = exp(loss). (eval.py writes 2.71828 ** loss;
 *   we use exp.) Windows overlap, so a token is scored by several of them.
 * ===================================================================================== */

/* Window starts for n tokens: returns how many, *starts malloc'd. */
static size_t ppl_window_starts(size_t n_tokens, size_t seq_len, size_t stride, size_t **starts) {
    size_t count = 0;
    *starts = NULL;
    if (n_tokens <= seq_len || stride == 0) return 0;
    for (size_t i = 0; i < n_tokens - seq_len; i += stride) count++;
    if (count) count--; /* eval.py's all_ix.pop() */
    *starts = (size_t *)xmalloc((count ? count : 1) * sizeof(size_t));
    for (size_t k = 0; k < count; k++) (*starts)[k] = k * stride;
    return count;
}

typedef struct { size_t seq_len, windows; double loss, ppl, seconds; } PplRow;

static PplRow perplexity(Engine *e, const int32_t *tokens, size_t n_tokens, size_t seq_len, size_t stride, size_t max_windows) {
    size_t *starts;
    size_t count = ppl_window_starts(n_tokens, seq_len, stride, &starts);
    if (count == 0)
        die("%zu tokens are too few for --seq-len %zu with --stride %zu (LongLoRA's protocol needs more than seq_len + stride)",
            n_tokens, seq_len, stride);
    if (max_windows && count > max_windows) count = max_windows;
    double t0 = now_seconds(), total = 0;
    for (size_t k = 0; k < count; k++) total += engine_window_loss(e, tokens + starts[k], seq_len);
    free(starts);
    PplRow r = {seq_len, count, total / (double)count, 0, now_seconds() - t0};
    r.ppl = exp(r.loss);
    return r;
}

/* A token file: ours (tokfile, "LLTK"), or LongLoRA's raw uint16 .bin (np.memmap uint16). */
static int32_t *read_tokens(const char *path, size_t *count) {
    size_t len = 0;
    char *data = read_file(path, &len);
    if (!data) die("%s", last_error());
    int ours = len >= 4 && memcmp(data, TOKFILE_MAGIC, 4) == 0;
    int32_t *ids;
    if (ours) {
        free(data);
        ids = tokfile_read(path, count);
        if (!ids) die("%s", last_error());
        return ids;
    }
    size_t n = strlen(path);
    if (n < 4 || strcmp(path + n - 4, ".bin") != 0)
        die("%s is neither a token file (LLTK) nor a raw uint16 .bin file", path);
    if (len % 2) die("%s: a raw uint16 token file has an odd number of bytes", path);
    *count = len / 2;
    ids = (int32_t *)xmalloc((*count ? *count : 1) * sizeof(int32_t));
    for (size_t i = 0; i < *count; i++) ids[i] = (int32_t)((uint8_t)data[2 * i] | ((uint16_t)(uint8_t)data[2 * i + 1] << 8));
    free(data);
    return ids;
}

/* =======================================================================================
 * 7. Passkey retrieval, LongLoRA's test (its passkey_retrivial.py):
 *   the prompt is five lines joined by "\n": the task sentence; the first `depth`
 *   characters of the filler repeated (joined by spaces); the line with the key; the first
 *   n_garbage - depth characters of the same repeated filler; the question. depth is
 *   uniform in [0, n_garbage) and the key uniform in [1, 50000) (numpy's randint excludes
 *   the top), both drawn from a generator seeded with (seed + trial), the same for every
 *   length, as LongLoRA seeds trial j with j. Grid point i (1-based) aims at i * interval
 *   tokens with n_garbage = floor(3.75 * i * interval / 1024) * 1024 characters.
 *   The verdict: LongLoRA decodes as many tokens as the key has (encoded alone, BOS
 *   dropped) and compares token ids. That only works with LLaMA's SentencePiece, whose
 *   "▁" prefix makes the key alone tokenize as the model's answer " 348" does; with a
 *   byte-level BPE (SmolLM2, LLaMA-3) the answer starts with a space token the key alone
 *   lacks, and the rule scores 0 forever. So we compare text, which is what the id rule
 *   means: the model decodes the key's token count + 2 tokens (room for a leading space
 *   token and one token past the key) greedily, and is right when the first run of digits
 *   in the decoded continuation is the key (so " 348." passes, " 3481" and " 34" fail).
 *   The prompt gets BOS where the tokenizer adds one (tokenizer_adds_bos below).
 * ===================================================================================== */

#define PASSKEY_TASK "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will quiz you about the important information there."
#define PASSKEY_FILLER "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
#define PASSKEY_QUESTION "What is the pass key? The pass key is"

static size_t passkey_garbage_chars(size_t target_tokens) { return (size_t)floor(3.75 * (double)target_tokens / 1024.0) * 1024; }

/* Draws one trial's depth and key. */
static void passkey_draw(uint64_t seed, size_t n_garbage, size_t *depth, long *key) {
    Rng r;
    rng_seed(&r, seed);
    *depth = n_garbage ? (size_t)rng_below(&r, n_garbage) : 0;
    *key = 1 + (long)rng_below(&r, 49999);
}

/* The first n characters of the filler repeated, joined by single spaces. */
static void put_filler(TokText *t, size_t n) {
    static const char filler[] = PASSKEY_FILLER;
    size_t period = sizeof filler; /* the filler and one space */
    for (size_t i = 0; i < n; i++) {
        size_t k = i % period;
        char ch = k + 1 == period ? ' ' : filler[k];
        text_put(t, &ch, 1);
    }
}

/* The prompt (malloc'd, NUL-terminated) for n_garbage filler characters, the key at depth. */
static char *passkey_prompt(size_t n_garbage, size_t depth, long key) {
    TokText t = {0};
    char line[160];
    text_put(&t, PASSKEY_TASK "\n", strlen(PASSKEY_TASK) + 1);
    put_filler(&t, depth);
    snprintf(line, sizeof line, "\nThe pass key is %ld. Remember it. %ld is the pass key.\n", key, key);
    text_put(&t, line, strlen(line));
    put_filler(&t, n_garbage - depth);
    text_put(&t, "\n" PASSKEY_QUESTION, strlen(PASSKEY_QUESTION) + 1);
    text_put(&t, "", 1);
    return t.data;
}

typedef struct { size_t target_tokens, n_garbage, trials, correct, total_prompt_tokens; } PasskeyRow;

/* 1 when the first run of ASCII digits in the model's decoded continuation is the key. */
static int passkey_correct(const char *continuation, long key) {
    const char *p = continuation;
    while (*p && !(*p >= '0' && *p <= '9')) p++;
    if (!*p) return 0;
    char digits[32];
    size_t n = 0;
    while (p[n] >= '0' && p[n] <= '9') { if (n + 1 < sizeof digits) digits[n] = p[n]; n++; }
    if (n + 1 > sizeof digits) return 0;
    digits[n] = 0;
    char want[32];
    snprintf(want, sizeof want, "%ld", key);
    return strcmp(digits, want) == 0;
}

/* Tokens the model decodes for a key: the key's own count (BOS dropped), plus 2. */
static size_t passkey_budget(const Tokenizer *tok, long key) {
    char key_text[32];
    snprintf(key_text, sizeof key_text, "%ld", key);
    size_t n;
    int32_t *ids = tok_encode(tok, key_text, strlen(key_text), 0, &n);
    if (!ids) die("%s", last_error());
    free(ids);
    return n + 2;
}

/* The verdict on the tokens the model decoded; *said (if not NULL) gets their text (malloc'd). */
static int passkey_score(const Tokenizer *tok, const int32_t *got, size_t n, long key, char **said) {
    char *text = tok_decode(tok, got, n, NULL);
    if (!text) die("%s", last_error());
    int ok = passkey_correct(text, key);
    if (said) *said = text; else free(text);
    return ok;
}

/* Whether text gets a BOS in front, as transformers decides: tokenizer_config.json's
 * "add_bos_token" where the tokenizer's folder has one that says (SmolLM2: false), else
 * yes (LLaMA-2's tokenizer.model, whose config says true). */
static int tokenizer_adds_bos(const char *tok_path) {
    char dir[4096], cfg[4200];
    struct stat st;
    snprintf(dir, sizeof dir, "%s", tok_path);
    if (stat(tok_path, &st) != 0 || !S_ISDIR(st.st_mode)) { /* a file: its folder */
        char *slash = strrchr(dir, '/');
        if (slash) slash[1] = 0; else snprintf(dir, sizeof dir, ".");
    }
    path_join(cfg, sizeof cfg, dir, "tokenizer_config.json");
    if (!file_exists(cfg)) return 1;
    Json *config = json_parse_file(cfg);
    if (!config) die("%s", last_error());
    int adds = json_get_bool(config, "add_bos_token", 1);
    json_free(config);
    return adds;
}

/* One CSV field, quoted, with its quotes doubled (RFC 4180). */
static void csv_write_field(FILE *f, const char *s) {
    fputc('"', f);
    for (; *s; s++) { if (*s == '"') fputc('"', f); fputc(*s, f); }
    fputc('"', f);
}

/* Runs the grid; rows [max_tokens / interval] get the results; per-trial lines go to csv. */
static size_t passkey_run(Engine *e, const Tokenizer *tok, int add_bos, size_t max_tokens, size_t interval, size_t trials, uint64_t seed,
                          FILE *csv, PasskeyRow *rows) {
    size_t points = max_tokens / interval, done = 0;
    Sampler greedy;
    sampler_init(&greedy, (size_t)e->cfg.vocab_size, 0.0f, 1.0f, 0);
    if (csv) fprintf(csv, "target_tokens,n_garbage,trial,depth_chars,key,prompt_tokens,answer,model_answer,correct\n");
    for (size_t p = 0; p < points; p++) {
        PasskeyRow *row = &rows[p];
        memset(row, 0, sizeof *row);
        row->target_tokens = (p + 1) * interval;
        row->n_garbage = passkey_garbage_chars(row->target_tokens);
        int fits = 1;
        for (size_t j = 0; j < trials && fits; j++) {
            size_t depth; long key;
            passkey_draw(seed + j, row->n_garbage, &depth, &key);
            char *prompt = passkey_prompt(row->n_garbage, depth, key);
            size_t n_prompt, n_answer = passkey_budget(tok, key);
            int32_t *ids = tok_encode(tok, prompt, strlen(prompt), add_bos, &n_prompt);
            if (!ids) die("%s", last_error());
            if (n_prompt + n_answer > e->n_cap) {
                fprintf(stderr, "passkey: prompts of ~%zu tokens (%zu here) do not fit --ctx %zu; the grid stops here\n",
                        row->target_tokens, n_prompt, e->n_cap);
                fits = 0;
            } else {
                int32_t *got = (int32_t *)xcalloc(n_answer ? n_answer : 1, sizeof(int32_t)); /* [n_answer] */
                size_t made = generate(e, &greedy, tok, ids, n_prompt, n_answer, -1, got, NULL, NULL);
                char *said;
                int ok = passkey_score(tok, got, made, key, &said);
                row->trials++;
                row->correct += (size_t)ok;
                row->total_prompt_tokens += n_prompt;
                if (csv) {
                    fprintf(csv, "%zu,%zu,%zu,%zu,%ld,%zu,%ld,", row->target_tokens, row->n_garbage, j, depth, key, n_prompt, key);
                    csv_write_field(csv, said);
                    fprintf(csv, ",%d\n", ok);
                }
                free(said);
                free(got);
            }
            free(ids); free(prompt);
        }
        if (!fits) break;
        done++;
    }
    sampler_free(&greedy);
    return done;
}

/* =======================================================================================
 * 8. The program
 * ===================================================================================== */

typedef struct {
    const char *model_dir, *adapter_dir, *init, *shape, *tokenizer;
    int merge;
    const char *device;             /* --device cpu|gpu (NULL: the GPU where this build and machine have one) */
    long ctx;
    const char *prompt, *prompt_file, *template_name;
    long max_new;
    double temperature, top_p;
    uint64_t seed;
    const char *ppl_file, *seq_lens;
    long stride, max_windows;
    int passkey;
    long max_tokens, interval, trials;
    const char *csv;
    const char *export_dir;
    int overwrite;                  /* --overwrite: replace a previous export in --export DIR */
    double shard_size;
    int bench;
    const char *bench_out;
} InferOptions;

static void infer_usage(FILE *f) {
    fprintf(f,
            "usage: 06_infer (--model DIR | --init random --shape NAME) [--adapter DIR [--merge]] [--ctx N]\n"
            "                [--device cpu|gpu] [--tokenizer PATH] JOB\n"
            "jobs:\n"
            "  --prompt TEXT | --prompt-file F   generate; [--template none|llama2-chat] [--max-new N (256)]\n"
            "                                    [--temperature T (0: greedy)] [--top-p P (1)] [--seed S]\n"
            "  --ppl TOKENS                      perplexity of a token file (LLTK, or LongLoRA's uint16 .bin)\n"
            "                                    [--seq-len N[,N...] (the context)] [--stride S (256)] [--max-windows K]\n"
            "  --passkey                         passkey retrieval; [--max-tokens N (the context)] [--interval I (1000)]\n"
            "                                    [--trials K (10)] [--seed S] [--csv F]\n"
            "  --export DIR                      merged bf16 HF folder, new or empty; [--shard-size BYTES (5e9)]\n"
            "                                    [--overwrite: replace a previous export in DIR]\n"
            "  --bench                           GPU: prefill at 32k, decode at 4k and 32k; [--bench-out F]\n"
            "--ctx sets the context (KV cache size); past the model's, RoPE is stretched by ceil(ctx / max_position_embeddings)\n"
            "(linearly, or by yarn for a yarn model). An adapter folder with a config.json brings the RoPE it was trained with.\n"
            "The adapter is applied unmerged (its own low-rank path after each projection) unless --merge.\n");
}

static void infer_parse(InferOptions *o, int argc, char **argv) {
    memset(o, 0, sizeof *o);
    o->max_new = 256; o->top_p = 1.0; o->seed = 1234; o->stride = 256; o->interval = 1000; o->trials = 10;
    o->shard_size = 5e9; o->template_name = "none";
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) { infer_usage(stdout); exit(0); }
        if (!strcmp(a, "--merge")) { o->merge = 1; continue; }
        if (!strcmp(a, "--passkey")) { o->passkey = 1; continue; }
        if (!strcmp(a, "--bench")) { o->bench = 1; continue; }
        if (!strcmp(a, "--overwrite")) { o->overwrite = 1; continue; }
        if (i + 1 >= argc) die("%s needs a value (see --help)", a);
        const char *v = argv[++i];
        if (!strcmp(a, "--model")) o->model_dir = v;
        else if (!strcmp(a, "--adapter")) o->adapter_dir = v;
        else if (!strcmp(a, "--init")) o->init = v;
        else if (!strcmp(a, "--shape")) o->shape = v;
        else if (!strcmp(a, "--tokenizer")) o->tokenizer = v;
        else if (!strcmp(a, "--device")) {
            if (strcmp(v, "cpu") && strcmp(v, "gpu")) die("--device is cpu or gpu, not '%s'", v);
            o->device = v;
        } else if (!strcmp(a, "--ctx")) o->ctx = need_long_arg(a, v, 1, 1L << 40);
        else if (!strcmp(a, "--prompt")) o->prompt = v;
        else if (!strcmp(a, "--prompt-file")) o->prompt_file = v;
        else if (!strcmp(a, "--template")) {
            if (strcmp(v, "none") && strcmp(v, "llama2-chat")) die("--template is none or llama2-chat, not '%s'", v);
            o->template_name = v;
        } else if (!strcmp(a, "--max-new")) o->max_new = need_long_arg(a, v, 0, 1L << 30);
        else if (!strcmp(a, "--temperature")) o->temperature = need_double_arg(a, v, 0, 100);
        else if (!strcmp(a, "--top-p")) o->top_p = need_double_arg(a, v, 1e-6, 1);
        else if (!strcmp(a, "--seed")) o->seed = (uint64_t)need_long_arg(a, v, 0, LONG_MAX);
        else if (!strcmp(a, "--ppl")) o->ppl_file = v;
        else if (!strcmp(a, "--seq-len")) o->seq_lens = v;
        else if (!strcmp(a, "--stride")) o->stride = need_long_arg(a, v, 1, 1L << 40);
        else if (!strcmp(a, "--max-windows")) o->max_windows = need_long_arg(a, v, 0, 1L << 40);
        else if (!strcmp(a, "--max-tokens")) o->max_tokens = need_long_arg(a, v, 1, 1L << 40);
        else if (!strcmp(a, "--interval")) o->interval = need_long_arg(a, v, 1, 1L << 40);
        else if (!strcmp(a, "--trials")) o->trials = need_long_arg(a, v, 1, 1L << 20);
        else if (!strcmp(a, "--csv")) o->csv = v;
        else if (!strcmp(a, "--export")) o->export_dir = v;
        else if (!strcmp(a, "--shard-size")) o->shard_size = need_double_arg(a, v, 1, 1e15);
        else if (!strcmp(a, "--bench-out")) o->bench_out = v;
        else die("unknown flag %s (see --help)", a);
    }
    int jobs = (o->prompt || o->prompt_file) + !!o->ppl_file + o->passkey + !!o->export_dir + o->bench;
    if (jobs != 1) die("give exactly one job: --prompt/--prompt-file, --ppl, --passkey, --export or --bench (see --help)");
    if (o->prompt && o->prompt_file) die("give --prompt or --prompt-file, not both");
    if (!!o->model_dir == !!o->init) die("give --model DIR or --init random --shape NAME");
    if (o->init && strcmp(o->init, "random")) die("--init takes only 'random'");
    if (o->init && !o->shape) die("--init random needs --shape NAME");
    if (o->init && o->adapter_dir) die("--adapter needs --model");
    if (o->overwrite && !o->export_dir) die("--overwrite applies to --export");
    /* outputs never overwrite inputs; an export goes to a new folder (or replaces one) */
    const NamedPath inputs[] = {{"--model", o->model_dir}, {"--adapter", o->adapter_dir}, {"--tokenizer", o->tokenizer},
                                {"--ppl", o->ppl_file}, {"--prompt-file", o->prompt_file}};
    int n_in = (int)(sizeof inputs / sizeof *inputs);
    if (check_output_path("--export", o->export_dir, 1, inputs, n_in) != 0 || check_output_path("--csv", o->csv, 0, inputs, n_in) != 0 ||
        check_output_path("--bench-out", o->bench_out, 0, inputs, n_in) != 0 || (o->export_dir && export_check_target(o->export_dir, o->overwrite) != 0))
        die("%s", last_error());
}

#ifdef USE_CUDA
/* Where a prefill's time goes: layer 0 at T rows, each group of kernels timed alone (best of
 * 3 after a warm-up): the 7 projections, the attention, the rest (norms, RoPE, adds, SwiGLU). */
static void bench_breakdown(GpuEngine *g, size_t T, double ms[3]) {
    const Config *c = &g->cfg;
    size_t D = (size_t)c->dim, F = (size_t)c->ffn_dim, H = (size_t)c->n_heads, Hk = (size_t)c->n_kv_heads, d = (size_t)c->head_dim;
    size_t Hd = H * d, Hkd = Hk * d;
    const GpuLayer *gl = &g->layers[0];
    uint16_t *kc = g->k_cache, *vc = g->v_cache;
    cudaEvent_t ev[2];
    CUDA_CHECK(cudaEventCreate(&ev[0]));
    CUDA_CHECK(cudaEventCreate(&ev[1]));
    for (int k = 0; k < 3; k++) ms[k] = 1e30;
    for (int rep = 0; rep < 4; rep++)
        for (int k = 0; k < 3; k++) {
            CUDA_CHECK(cudaEventRecord(ev[0], 0));
            if (k == 0) {
                gpu_matmul_bf16(0, 1, T, Hd, D, 1.0f, g->xn, gl->wq, 0.0f, g->q, 0);
                gpu_matmul_bf16(0, 1, T, Hkd, D, 1.0f, g->xn, gl->wk, 0.0f, kc, 0);
                gpu_matmul_bf16(0, 1, T, Hkd, D, 1.0f, g->xn, gl->wv, 0.0f, vc, 0);
                gpu_matmul_bf16(0, 1, T, D, Hd, 1.0f, g->att, gl->wo, 0.0f, g->proj, 0);
                gpu_matmul_bf16(0, 1, T, F, D, 1.0f, g->xn, gl->w_gate, 0.0f, g->gate, 0);
                gpu_matmul_bf16(0, 1, T, F, D, 1.0f, g->xn, gl->w_up, 0.0f, g->up, 0);
                gpu_matmul_bf16(0, 1, T, D, F, 1.0f, g->gate, gl->w_down, 0.0f, g->proj, 0);
            } else if (k == 1) {
                if (attn_forward(g->q, kc, vc, g->att, g->lse, 1, (int)T, (int)H, (int)Hk, (int)d, 0) != 0) die("%s", last_error());
            } else {
                gpu_rmsnorm_forward(g->xn, NULL, g->x, gl->attn_norm, T, D, c->rms_eps);
                gpu_rope_forward(g->q, T, H, d, Hd, 0, g->inv_freq, g->rope_attention);
                gpu_rope_forward(kc, T, Hk, d, Hkd, 0, g->inv_freq, g->rope_attention);
                gpu_add(g->x, g->x, g->proj, T * D);
                gpu_rmsnorm_forward(g->xn, NULL, g->x, gl->mlp_norm, T, D, c->rms_eps);
                gpu_swiglu_forward(g->gate, g->gate, g->up, T * F);
                gpu_add(g->x, g->x, g->proj, T * D);
            }
            CUDA_CHECK(cudaEventRecord(ev[1], 0));
            CUDA_CHECK(cudaEventSynchronize(ev[1]));
            float t;
            CUDA_CHECK(cudaEventElapsedTime(&t, ev[0], ev[1]));
            if (rep > 0 && t < ms[k]) ms[k] = t;
        }
    cudaEventDestroy(ev[0]);
    cudaEventDestroy(ev[1]);
    double gemm_flop = 2.0 * (double)T * (double)(2 * Hd * D + 2 * Hkd * D + 3 * F * D);
    double attn_flop = 4.0 * (double)T * (double)T * (double)d * (double)H / 2.0;
    fprintf(stderr, "bench: one layer at %zu rows: projections %.2f ms (%.0f TFLOP/s), attention %.2f ms (%.0f TFLOP/s), the rest %.2f ms\n",
            T, ms[0], gemm_flop / ms[0] / 1e9, ms[1], attn_flop / ms[1] / 1e9, ms[2]);
}

/* Prefill at 32k and decode at 4k and 32k on random weights of a shape (GPU only). */
static void run_bench(const InferOptions *o, const Config *cfg_in) {
    Config c = *cfg_in;
    size_t steps = 64, long_ctx = o->ctx > 0 ? (size_t)o->ctx : 32768, short_ctx = 4096;
    config_set_target_ctx(&c, (long)long_ctx);
    Engine e;
    memset(&e, 0, sizeof e);
    e.on_gpu = 1; e.cfg = c; e.n_cap = long_ctx + steps;
    e.logits = (float *)xmalloc((size_t)c.vocab_size * sizeof(float));
    double t0 = now_seconds();
    gpu_engine_alloc_weights(&e.gpu, &c);
    gpu_engine_random(&e.gpu, o->seed, 0.02f);
    gpu_engine_alloc_cache(&e.gpu, e.n_cap);
    fprintf(stderr, "bench: %.2f GiB of bf16 weights ready in %.1f s\n", gib(e.gpu.weight_bytes), now_seconds() - t0);
    int32_t *tokens = (int32_t *)xmalloc(e.n_cap * sizeof(int32_t)); /* [n_cap] */
    Rng r;
    rng_seed(&r, o->seed);
    for (size_t i = 0; i < e.n_cap; i++) tokens[i] = (int32_t)rng_below(&r, (uint64_t)c.vocab_size);
    engine_prefill(&e, tokens, 512); /* warm-up: cuBLAS heuristics, kernels loaded */
    for (int i = 0; i < 8; i++) engine_decode(&e, tokens[512 + i]);
    engine_sync(&e);
    double prefill_tps = 0, decode_tps[2] = {0, 0};
    size_t ctxs[2] = {short_ctx, long_ctx};
    for (int k = 0; k < 2; k++) {
        for (int rep = 0; rep < (k == 1 ? 2 : 1); rep++) {
            double a = now_seconds();
            engine_prefill(&e, tokens, ctxs[k]);
            engine_sync(&e);
            double b = now_seconds();
            if (k == 1 && ctxs[k] / (b - a) > prefill_tps) prefill_tps = (double)ctxs[k] / (b - a);
        }
        double a = now_seconds();
        for (size_t s = 0; s < steps; s++) engine_decode(&e, argmax(e.logits, (size_t)c.vocab_size));
        engine_sync(&e);
        decode_tps[k] = (double)steps / (now_seconds() - a);
        fprintf(stderr, "bench: decode at %zu context: %.1f tokens/s\n", ctxs[k], decode_tps[k]);
    }
    fprintf(stderr, "bench: prefill of %zu tokens: %.0f tokens/s\n", long_ctx, prefill_tps);
    double ms[3];
    bench_breakdown(&e.gpu, long_ctx, ms);
    struct cudaDeviceProp prop;
    CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    AtomicFile af;
    if (o->bench_out && atomic_open(&af, o->bench_out) != 0) die("%s", last_error());
    FILE *f = o->bench_out ? af.f : stdout;
    fprintf(f, "{\n  \"impl\": \"ours\",\n  \"device\": ");
    json_write_string(f, prop.name);
    fprintf(f, ",\n  \"shape\": ");
    json_write_string(f, o->shape ? o->shape : "model");
    fprintf(f, ",\n  \"dtype\": \"bf16\",\n  \"prefill_tokens\": %zu,\n  \"prefill_tokens_per_s\": %.1f,\n"
               "  \"decode_steps\": %zu,\n  \"decode_tokens_per_s\": {\"%zu\": %.2f, \"%zu\": %.2f},\n"
               "  \"layer_ms_at_prefill\": {\"projections\": %.3f, \"attention\": %.3f, \"rest\": %.3f}\n}\n",
            long_ctx, prefill_tps, steps, short_ctx, decode_tps[0], long_ctx, decode_tps[1], ms[0], ms[1], ms[2]);
    if (o->bench_out && atomic_commit(&af) != 0) die("%s", last_error());
    free(tokens);
    engine_free(&e);
}
#endif

/* Why the GPU engine cannot run this model (NULL: it can), for device_choose. */
static const char *infer_gpu_why_not(const Config *c) {
    if (c->head_dim != 64 && c->head_dim != 128) return "the GPU kernels need head_dim 64 or 128";
    if (c->n_heads / c->n_kv_heads > 8) return "the GPU decode attention takes at most 8 query heads per kv head";
    return NULL;
}

static API int infer_main(int argc, char **argv) {
    InferOptions o;
    infer_parse(&o, argc, argv);
    Config shape_cfg;
    if (o.init && config_from_shape(o.shape, &shape_cfg) != 0) die("%s", last_error());
    shape_cfg.bos_id = 1; /* LLaMA's ids, for prompts to a random model */
    shape_cfg.eos_id = 2;
    if (o.bench) {
#ifdef USE_CUDA
        if (!o.init) die("--bench runs on random weights: give --init random --shape NAME");
        run_bench(&o, &shape_cfg);
        return 0;
#else
        die("--bench needs the GPU build (make with nvcc and cuBLAS)");
#endif
    }

    /* where it runs (04_load.c's device_choose, the rule 05_train follows), decided from the
     * config before the weights are read: on the GPU the host keeps only embed and the norms
     * (an adapter may replace them) and the engine reads the rest from the files straight to
     * the GPU. --merge and --export merge in fp32 on the host, so they load the whole model. */
    Config file_cfg = shape_cfg;
    if (o.model_dir && model_read_config(&file_cfg, o.model_dir, o.ctx) != 0) die("%s", last_error());
    char device_note[320];
    int on_gpu = 0;
    if (o.export_dir) snprintf(device_note, sizeof device_note, "on the CPU (--export merges and writes on the host)");
    else {
        const char *gpu = NULL;
        int has_cuda = 0;
#ifdef USE_CUDA
        char name[256];
        has_cuda = 1;
        gpu = gpu_visible_name(name, sizeof name);
#endif
        on_gpu = device_choose(o.device, has_cuda, gpu, infer_gpu_why_not(&file_cfg), "runs", device_note, sizeof device_note);
        if (on_gpu < 0) die("%s", last_error());
    }
    Model model;
    double load_seconds = now_seconds();
    if (o.model_dir) {
        int frozen_on_host = !on_gpu || o.merge || o.export_dir;
        if (model_try_load_host(&model, o.model_dir, o.ctx, frozen_on_host) != 0) die("%s", last_error());
        if (!frozen_on_host) infer_weights_dir = o.model_dir;
    } else {
        config_set_target_ctx(&shape_cfg, o.ctx);
        model_init_random(&model, &shape_cfg, o.seed, 0.02f);
    }
    LoraAdapter adapter;
    int have_adapter = 0;
    if (o.adapter_dir) { /* the RoPE it was trained with (its config.json), then its weights */
        if (lora_adapter_rope(o.adapter_dir, &model.cfg, o.ctx) != 0 || lora_load_adapter(&adapter, &model, o.adapter_dir) != 0) die("%s", last_error());
        adapter.training = 0;
        have_adapter = 1;
        if (o.merge || o.export_dir) lora_merge(&adapter, &model);
    }
    size_t ctx = o.ctx > 0 ? (size_t)o.ctx : config_context(&model.cfg);
    LinearHook *hook = have_adapter && !(o.merge || o.export_dir) ? &adapter.hook : NULL;
    load_seconds = now_seconds() - load_seconds;
    fprintf(stderr, "06_infer: %s, %d layers, D %d, V %d; context %zu (RoPE %s factor %g); adapter %s; %s in %s; "
            "host weights (%s) in %.1f s, peak host RSS %.2f GB\n",
            o.model_dir ? o.model_dir : o.shape, model.cfg.n_layers, model.cfg.dim, model.cfg.vocab_size, ctx,
            ROPE_TYPE_NAMES[model.cfg.rope_type], (double)model.cfg.rope_factor, !have_adapter ? "none" : hook ? "applied" : "merged",
            device_note, on_gpu ? "bf16" : "fp32", infer_weights_dir ? "embed and norms in fp32" : "all, fp32", load_seconds, peak_rss_bytes() / 1e9);

    if (o.export_dir) {
        if (export_merged(&model, o.model_dir, o.export_dir, (size_t)o.shard_size, DT_BF16, o.overwrite) != 0) die("%s", last_error());
        fprintf(stderr, "06_infer: wrote %s\n", o.export_dir);
    } else if (o.ppl_file) {
        size_t n_tokens;
        int32_t *tokens = read_tokens(o.ppl_file, &n_tokens);
        for (size_t i = 0; i < n_tokens; i++)
            if (tokens[i] < 0 || tokens[i] >= model.cfg.vocab_size) die("%s: token %zu has id %d, outside the vocabulary of %d", o.ppl_file, i, tokens[i], model.cfg.vocab_size);
        size_t lens[64], n_lens = 0;
        if (!o.seq_lens) lens[n_lens++] = ctx;
        else {
            char buf[1024];
            snprintf(buf, sizeof buf, "%s", o.seq_lens);
            for (char *tk = strtok(buf, ","); tk; tk = strtok(NULL, ",")) {
                if (n_lens == 64) die("--seq-len takes at most 64 values");
                lens[n_lens++] = (size_t)need_long_arg("--seq-len", tk, 2, 1L << 40);
            }
        }
        if (n_lens == 0) die("--seq-len needs at least one length");
        size_t biggest = 0;
        for (size_t i = 0; i < n_lens; i++) if (lens[i] > biggest) biggest = lens[i];
        if (biggest > ctx) die("--seq-len %zu is longer than the context (--ctx %zu)", biggest, ctx);
        Engine e;
        engine_init(&e, &model, hook, biggest, on_gpu);
        printf("%-10s %8s %12s %12s %10s\n", "seq_len", "windows", "loss", "ppl", "seconds");
        for (size_t i = 0; i < n_lens; i++) {
            PplRow r = perplexity(&e, tokens, n_tokens, lens[i], (size_t)o.stride, (size_t)o.max_windows);
            printf("%-10zu %8zu %12.6f %12.4f %10.2f\n", r.seq_len, r.windows, r.loss, r.ppl, r.seconds);
            fflush(stdout);
        }
        engine_free(&e);
        free(tokens);
    } else {
        /* generation and passkey need the tokenizer */
        const char *tok_path = o.tokenizer ? o.tokenizer : o.model_dir;
        if (!tok_path) die("give --tokenizer PATH (random weights have no tokenizer)");
        Tokenizer tok;
        if (tok_load(&tok, tok_path) != 0) die("%s", last_error());
        if (tok.vocab_size > model.cfg.vocab_size) die("the tokenizer has %d tokens but the model only %d", tok.vocab_size, model.cfg.vocab_size);
        Engine e;
        engine_init(&e, &model, hook, ctx, on_gpu);
        if (o.passkey) {
            size_t max_tokens = o.max_tokens ? (size_t)o.max_tokens : ctx;
            if ((size_t)o.interval > max_tokens) die("--interval %ld is larger than --max-tokens %zu", o.interval, max_tokens);
            size_t points = max_tokens / (size_t)o.interval;
            PasskeyRow *rows = (PasskeyRow *)xcalloc(points, sizeof(PasskeyRow));
            FILE *csv = NULL;
            AtomicFile af;
            if (o.csv) { if (atomic_open(&af, o.csv) != 0) die("%s", last_error()); csv = af.f; }
            size_t done = passkey_run(&e, &tok, tokenizer_adds_bos(tok_path), max_tokens, (size_t)o.interval, (size_t)o.trials, o.seed, csv, rows);
            if (csv && atomic_commit(&af) != 0) die("%s", last_error());
            printf("%-14s %14s %8s %10s\n", "target_tokens", "prompt_tokens", "trials", "accuracy");
            for (size_t p = 0; p < done; p++)
                printf("%-14zu %14zu %8zu %10.3f\n", rows[p].target_tokens, rows[p].total_prompt_tokens / rows[p].trials, rows[p].trials,
                       (double)rows[p].correct / (double)rows[p].trials);
            free(rows);
        } else {
            char *text;
            if (o.prompt_file) { text = read_file(o.prompt_file, NULL); if (!text) die("%s", last_error()); }
            else text = xstrdup(o.prompt);
            char *prompt = prompt_template(o.template_name, text, NULL);
            size_t n;
            int32_t *ids = tok_encode(&tok, prompt, strlen(prompt), tokenizer_adds_bos(tok_path), &n);
            if (!ids) die("%s", last_error());
            Sampler s;
            sampler_init(&s, (size_t)model.cfg.vocab_size, (float)o.temperature, (float)o.top_p, o.seed);
            GenStats st;
            int32_t eos = tok.eos_id >= 0 ? tok.eos_id : model.cfg.eos_id;
            generate(&e, &s, &tok, ids, n, (size_t)o.max_new, eos, NULL, stdout, &st);
            printf("\n");
            fprintf(stderr, "prefill: %zu tokens in %.3f s (%.1f tokens/s); decode: %zu tokens in %.3f s (%.1f tokens/s)\n",
                    st.prompt_tokens, st.prefill_seconds, st.prompt_tokens / (st.prefill_seconds > 0 ? st.prefill_seconds : 1e-9),
                    st.new_tokens, st.decode_seconds, st.new_tokens / (st.decode_seconds > 0 ? st.decode_seconds : 1e-9));
            sampler_free(&s);
            free(ids); free(prompt); free(text);
        }
        engine_free(&e);
        tok_free(&tok);
    }
    if (have_adapter) lora_free(&adapter);
    model_free(&model);
    return 0;
}

#if STAGE == 6
int main(int argc, char **argv) {
    if (argc == 1) { infer_usage(stderr); return 2; }
    return infer_main(argc, argv);
}
#endif
