/* 05_train_gpu.c: the GPU training step of stage 05 (host C code; 05_train.c includes it
 * under USE_CUDA, tests and the benchmark include it after 05_train.c).
 *
 * Teaches: how a LongLoRA step runs on one GPU with a frozen bf16 model.
 *   - Weights: every frozen tensor lives on the GPU once, in bf16. Each trainable tensor
 *     (LoRA A and B, embed_tokens, the RMSNorm weights: whatever the host optimizer holds, so
 *     embed and the norms only without --no-train-embed / --no-train-norms) has an fp32
 *     master copy, an fp32 gradient and AdamW's two fp32 moments there too, plus the bf16
 *     copy the kernels read; 04's AdamW writes master and bf16 copy in one pass. A frozen
 *     tensor has no gradient buffer (NULL), and the kernels that would add to one skip it
 *     (the norms' backward, the tied head's dW in the cross-entropy, the embedding's backward).
 *   - Activation checkpointing per layer: the forward pass keeps only each layer's input
 *     ([L+1, T, D] bf16). The backward pass walks the layers from the top, runs each
 *     layer's forward again from its kept input (into one set of work buffers, minus the
 *     down projection, whose output the backward never reads), then its backward; the top
 *     layer's activations are still in the buffers, so it is not recomputed.
 *     So the step costs forward 2PT + recompute ~2PT + input gradients 2PT FLOPs (no dW for
 *     frozen weights) plus the attention, and activation memory is (L+1) T D + one layer.
 *     Where a query sees 4096 keys or more (long S2 groups), as many layers as memory
 *     allows also keep their attention output and lse ([T, H*d] bf16 each), and their
 *     recompute skips the attention forward (gpu_train_plan decides; bench/TRAIN_NOTES.md
 *     has the numbers).
 *   - Long contexts on one GPU (05_plan.c plans them for --gpu-mem and --host-mem): the
 *     inputs of the lowest layers live in pinned host memory, each copied out on a side
 *     stream while the forward goes on and brought back one layer ahead in the backward
 *     (CUDA events order the two streams); the MLP runs over the tokens in tiles, in the
 *     forward and in the backward (which recomputes each tile's gate and up), so its
 *     [T, F] temporaries become [tile, F]; where even that does not fit, under S2-Attn the
 *     attention block runs in pieces of whole groups, one half of the heads at a time
 *     (05_plan.c's tp_pieces: each half's groups are independent, so each piece is plain
 *     causal attention), and q, k, v, their gradients and the dQ accumulator become
 *     [chunk, ...].
 *   - The projections are cuBLAS products (gpu_matmul_bf16), LoRA is 04's low-rank path,
 *     attention is 04's flash attention with S2-Attn's bounds (G from --group-ratio; 0 is
 *     full causal), RoPE reads 02's frequency table for the run's RoPE type (rope_inv_freq:
 *     linear, dynamic at N, yarn with its cos/sin scale, llama3), Qwen2's frozen q, k, v
 *     biases are added after their products, and the loss
 *     is 04's chunked cross-entropy: the T x V logits never exist at once.
 *   - Memory is planned before anything is allocated: a context that does not fit ends
 *     with one sentence saying how much it needs and what to change.
 * Runs on: one NVIDIA GPU (sm_80+) with head_dim 64 or 128, through 04's extern "C" API.
 * Checked against: the CPU step of 02 + 03 (tests/test_gpu_train.c: loss, every trainable
 * gradient, a few AdamW steps); 05_train --device gpu end to end, exact resume and the
 * non-finite stop (tests/test_gpu_train_resume.c). Benchmark: bench/train_bench.c.
 * The API 05_train.c uses: train_gpu_why_not (what 04_load.c's device_choose weighs), train_gpu_setup
 * (gpu_train_init: weights, read from the files straight to the GPU by 04_load.c, and
 * trainable state; gpu_train_plan: the B x N buffers),
 * train_step_gpu, gpu_train_download_state (before each checkpoint), train_gpu_free.
 * Several GPUs (one process each, NCCL through 05_dist.c): the step takes every K-th
 * micro-batch, all-reduces the fp32 gradients (all tensors in one NCCL group, once per step)
 * and the loss sum, runs AdamW on this rank's ZeRO-1 slice of the flat trainable vector and
 * broadcasts each slice from its owner (an all-gather), then refreshes the bf16 copies.
 * --shard-weights (ZeRO-3): each rank keeps 1/K of every layer's frozen matrices; a layer
 * is all-gathered into one of two buffers before it runs (forward and recompute), the next
 * layer's gather overlapping this one's compute (tg_z3_use / tg_z3_done, CUDA events).
 * Run: the one-GPU step on an H200 (tests/test_gpu_train*.c, the demo); the NCCL paths with
 * one rank (a communicator of one: every collective of the step and --shard-weights' layer
 * gathers, tests/test_gpu_dist.sh part 1). Not run: two or more GPUs (K >= 2: part 2 of
 * tests/test_gpu_dist.sh, bench/dist_device.sh).
 * Leaves out: LoRA dropout on the GPU (LongLoRA uses none), fused q/k/v
 * products (04's attention takes q, k and v as separate [T, heads, d] buffers).
 *
 * Shape legend: B batch, N sequence, T = B*N tokens, D model width, H heads, Hk kv heads,
 * d head dim, F ffn width, V vocab, L layers, G S2 group, R LoRA rank.
 */
#ifndef TRAIN_GPU_C
#define TRAIN_GPU_C
#include "04_gpu.h" /* the kernels this step runs */
#include "05_plan.c" /* the memory plan: tile, kept attention outputs, host checkpoints */


static double tg_gib(double bytes) { return bytes / (1024.0 * 1024.0 * 1024.0); }

/* How many layers' attention outputs gpu_train_plan keeps: -1 decides by cost and memory
 * (below), k >= 0 keeps at most k, as many as fit (tests set it). */
static int tg_keep_att_policy = -1;
/* The budgets gpu_train_plan plans for: --gpu-mem (bytes the device may have in use in all,
 * this process's weights and context included; 0: whatever is free) and --host-mem (pinned
 * bytes for checkpoints; < 0: train_host_mem_default). Tests also force how many layer
 * inputs go to the host (-1: as few as fit) and the MLP tile (0: chosen). */
static double tg_gpu_mem_budget = 0, tg_host_mem_budget = -1;
static int tg_host_policy = -1;
static size_t tg_tile_policy = 0;
/* The attention chunk (05_plan.c's chunk_policy): 0 chunks only when nothing else fits, -1
 * never, k > 0 always, k S2 groups a chunk (tests). */
static long tg_chunk_policy = 0;

/* Is there a GPU this process can use? (No message: the caller says what it does instead.) */
static int gpu_train_available(void) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) { cudaGetLastError(); return 0; }
    return n > 0;
}

static void tg_free_ptr(void *p) { if (p) CUDA_CHECK(cudaFree(p)); }

/* ---------------------------------------------------------------------------------------
 * Weights on the GPU
 * ------------------------------------------------------------------------------------- */

/* One tensor: its bf16 copy (what kernels read) and, when trainable, the fp32 state. */
typedef struct {
    uint16_t *w;        /* [numel] bf16 */
    float *master;      /* [numel] fp32 master weights (trainable only, else NULL) */
    float *grad;        /* [numel] fp32, += over micro-batches */
    float *m, *v;       /* [numel] AdamW moments */
    size_t numel;
    TrainParam *host;   /* the host optimizer's entry for it (trainable only) */
} TgParam;

typedef struct {
    TgParam attn_norm, mlp_norm;                      /* [D] */
    uint16_t *wq, *wk, *wv, *wo;                      /* [H*d, D], [Hk*d, D] x 2, [D, H*d] (frozen) */
    uint16_t *w_gate, *w_up, *w_down;                 /* [F, D] x 2, [D, F] (frozen) */
    uint16_t *bias[N_PROJ];                           /* [out] q, k, v biases (Qwen2, frozen, never sharded); NULL where none */
    TgParam lora_A[N_PROJ], lora_B[N_PROJ];           /* [R, in], [out, R]; w == NULL where no adapter */
} TgLayer;

typedef struct GpuTrainer {
    Config cfg;
    /* weights */
    TgParam embed;            /* [V, D] */
    TgParam final_norm;       /* [D] */
    uint16_t *lm_head;        /* [V, D]: embed.w when tied (frozen when untied) */
    TgLayer *layers;          /* [L] */
    size_t R;                 /* LoRA rank */
    float lora_scale;         /* alpha / R */
    int lora_mlp_down;        /* the down projection has an adapter (its input h must survive) */
    TgParam **trainable;      /* [n_trainable] in the host optimizer's order */
    size_t n_trainable;
    double weight_bytes;      /* frozen + trainable state */
    /* activations, planned for B x N (gpu_train_plan) */
    TrainPlan plan;                   /* 05_plan.c's decisions and byte counts */
    size_t B, N, T, G;
    float *inv_freq;                  /* [d/2] RoPE's frequencies for sequences of N (02's rope_inv_freq) */
    float rope_attention;             /* yarn's scale of cos and sin (1 otherwise) */
    int32_t *tokens, *targets;        /* [T] */
    uint16_t *saved;                  /* [L+1-n_host, T, D]: layer l's input at l - n_host, the last output at L - n_host */
    size_t n_host;                    /* layers 0 .. n_host-1 keep their input in host memory */
    uint16_t *host_saved;             /* [n_host, T, D] pinned host memory */
    uint16_t *stage[2];               /* [T, D] each: a host layer's input on the GPU (layer l in stage[l % 2]) */
    int stage_holds[2];               /* the layer whose input a staging buffer holds (-1: none) */
    cudaStream_t copy_stream;         /* the copies to and from the host */
    cudaEvent_t stage_ready[2];       /* the buffer's contents are complete (written by a layer, or copied in) */
    cudaEvent_t stage_free[2];        /* its copy out, or its last reader, is done: it may be overwritten */
    size_t mlp_tile;                  /* rows of the MLP at a time */
    uint16_t *xn1, *x2, *xn2;         /* [T, D] norm of the input, input + attention, its norm */
    uint16_t *dx, *dtmp;              /* [T, D] gradient of the residual stream, of a norm's output */
    float *rstd1, *rstd2, *rstd_final;/* [T] */
    uint16_t *q;                      /* [T, H*d] q after RoPE */
    uint16_t *att;                    /* [T, H*d] attention output of a layer that keeps none (NULL when all keep theirs) */
    int n_keep_att;                   /* layers 0 .. n_keep_att-1 keep their attention output and lse (no attention in their recompute) */
    uint16_t *att_all;                /* [n_keep_att, T, H*d] */
    float *lse_all;                   /* [n_keep_att, B, H, N] */
    uint16_t *k, *v;                  /* [T, Hk*d] k after RoPE, v */
    float *lse;                       /* [B, H, N] its lse (NULL when all layers keep theirs) */
    uint16_t *xa;                     /* [N_PROJ, T, R] x A^T of each projection of the current layer */
    uint16_t *arena;                  /* MLP: gate, up, h (and dh) [mlp_tile, F]; later datt, dq [T, H*d], dk, dv [T, Hk*d] */
    uint16_t *gate, *up, *h, *dh;     /* views into arena */
    uint16_t *datt, *dq, *dk, *dv;    /* views into arena */
    void *attn_ws;                    /* attn_backward's workspace (for one chunk when chunked) */
    /* the attention block in chunks of whole S2 groups (plan.attn_chunk > 0; else NULL): each
     * piece is one half of the heads over consecutive groups of one sequence; xn1, q, k, v
     * and the backward's buffers below exist for one piece at a time, in the arena */
    TpPiece *pieces;                  /* [n_pieces] in the order the forward and backward run them */
    size_t n_pieces;
    uint16_t *xn1c, *dxn1c;           /* views into arena: [attn_chunk, D] a piece's normed input, its gradient */
    uint16_t *qh, *oh, *doh, *dqh;    /* views into arena: [attn_chunk, H/2 * d] q, attention output, its gradient, dq */
    uint16_t *kh, *vh, *dkh, *dvh;    /* views into arena: [attn_chunk, Hk/2 * d] */
    double act_bytes;
    size_t ce_chunk;                  /* rows of logits the cross-entropy computes at a time */
    float *dist_loss;                 /* [1] several ranks: the loss sum they add up */
    /* --shard-weights (ZeRO-3, several ranks over NCCL): each layer's seven frozen matrices,
     * concatenated (q, k, v, o, gate, up, down), are cut into K equal shards; this rank keeps
     * its shard, and a layer is all-gathered into one of two buffers before it runs */
    int z3;                           /* 1 when the frozen layer weights are sharded */
    size_t z3_shard;                  /* values per shard (the layer's count rounded up to K) */
    uint16_t **z3_mine;               /* [L] -> [z3_shard] bf16: this rank's shard of layer l */
    uint16_t *z3_buf[2];              /* [K * z3_shard] bf16 each: gathered layers, by parity of l */
    int z3_holds[2];                  /* the layer each buffer holds (-1: none) */
    cudaEvent_t z3_ready[2], z3_free[2]; /* the gather into a buffer is done / its last reader is done */
    char load_note[200];              /* what the loader read, for the startup line ("" when the weights came from the host) */
} GpuTrainer;

/* Set by train_gpu_setup before gpu_train_init: shard the frozen layer weights (ZeRO-3). */
static int tg_shard_weights = 0;
/* Set by train_gpu_setup before gpu_train_init: the model folder whose files the frozen
 * weights are read from, straight to the GPU (04_load.c; the host model then holds only
 * embed and the norms, 02's params_alloc_plus). NULL: from the host model. */
static const char *tg_weights_dir = NULL;

/* Host fp32 -> device bf16, through a staging buffer, `numel` values. */
static void tg_upload_bf16(uint16_t *dst, const float *src, size_t numel, uint16_t *stage, size_t stage_cap) {
    for (size_t at = 0; at < numel; at += stage_cap) {
        size_t n = numel - at < stage_cap ? numel - at : stage_cap;
#pragma omp parallel for schedule(static)
        for (size_t i = 0; i < n; i++) stage[i] = f32_to_bf16(src[at + i]);
        CUDA_CHECK(cudaMemcpy(dst + at, stage, n * sizeof(uint16_t), cudaMemcpyHostToDevice));
    }
}

/* Random bf16 values base + std * (about) N(0, 1), from a counter hash (threads share no
 * state): for benchmarks at 7B, where an fp32 host copy of the frozen weights is 27 GB. */
static void tg_random_bf16(uint16_t *dst, size_t numel, uint64_t seed, float base, float std, uint16_t *stage, size_t stage_cap) {
    for (size_t at = 0; at < numel; at += stage_cap) {
        size_t n = numel - at < stage_cap ? numel - at : stage_cap;
#pragma omp parallel for schedule(static)
        for (size_t i = 0; i < n; i++) {
            uint64_t z = seed * 0x9e3779b97f4a7c15ull ^ (at + i);
            uint64_t r = splitmix64(&z);
            float u = (float)(r & 0xffff) + (float)((r >> 16) & 0xffff) + (float)((r >> 32) & 0xffff) + (float)(r >> 48);
            stage[i] = f32_to_bf16(base + std * (u / 65536.0f - 2.0f) * 1.7320508f); /* sum of 4 uniforms: variance 1 */
        }
        CUDA_CHECK(cudaMemcpy(dst + at, stage, n * sizeof(uint16_t), cudaMemcpyHostToDevice));
    }
}

/* Bytes the weights and the trainable state take on the GPU. */
static double tg_weight_bytes(const Config *c, const AdamW *opt) {
    double frozen = (double)config_param_count(c) * 2.0, trainable = 0;
    for (size_t k = 0; k < opt->count; k++) trainable += (double)opt->params[k].numel * 16.0; /* master, grad, m, v */
    for (size_t k = 0; k < opt->count; k++)
        if (strstr(opt->params[k].name, "lora_")) trainable += (double)opt->params[k].numel * 2.0; /* their bf16 copies */
    return frozen + trainable;
}

/* Makes p trainable: fp32 master, gradient and moments beside its bf16 copy. */
static void tg_make_trainable(GpuTrainer *g, TgParam *p, TrainParam *host) {
    CHECK(host->numel == p->numel, "trainable tensor %s has %zu values on the host and %zu on the GPU", host->name, host->numel, p->numel);
    p->host = host;
    p->master = (float *)gpu_malloc(p->numel * sizeof(float), "the fp32 master weights");
    p->grad = (float *)gpu_malloc(p->numel * sizeof(float), "the fp32 gradients");
    p->m = (float *)gpu_malloc(p->numel * sizeof(float), "the AdamW moments");
    p->v = (float *)gpu_malloc(p->numel * sizeof(float), "the AdamW moments");
    g->trainable[g->n_trainable++] = p;
}

/* Uploads the trainable state from the host optimizer (masters, moments) and refreshes the
 * bf16 copies: at set-up and after a checkpoint was loaded on the host. */
static void gpu_train_upload_state(GpuTrainer *g) {
    for (size_t k = 0; k < g->n_trainable; k++) {
        TgParam *p = g->trainable[k];
        CUDA_CHECK(cudaMemcpy(p->master, p->host->param, p->numel * sizeof(float), cudaMemcpyHostToDevice));
        CUDA_CHECK(cudaMemcpy(p->m, p->host->m, p->numel * sizeof(float), cudaMemcpyHostToDevice));
        CUDA_CHECK(cudaMemcpy(p->v, p->host->v, p->numel * sizeof(float), cudaMemcpyHostToDevice));
        gpu_f32_to_bf16(p->w, p->master, p->numel);
    }
    CUDA_CHECK(cudaDeviceSynchronize());
}

/* Copies the trainable state back (masters and moments into the host optimizer's arrays,
 * which are the model's embed/norms and the adapter's A/B): before every checkpoint. */
static void gpu_train_download_state(const GpuTrainer *g) {
    CUDA_CHECK(cudaDeviceSynchronize());
    for (size_t k = 0; k < g->n_trainable; k++) {
        const TgParam *p = g->trainable[k];
        CUDA_CHECK(cudaMemcpy(p->host->param, p->master, p->numel * sizeof(float), cudaMemcpyDeviceToHost));
        CUDA_CHECK(cudaMemcpy(p->host->m, p->m, p->numel * sizeof(float), cudaMemcpyDeviceToHost));
        CUDA_CHECK(cudaMemcpy(p->host->v, p->v, p->numel * sizeof(float), cudaMemcpyDeviceToHost));
    }
}

/* The gradients into the host optimizer's grad arrays (tests compare them with the CPU's). */
static void gpu_train_download_grads(const GpuTrainer *g) {
    CUDA_CHECK(cudaDeviceSynchronize());
    for (size_t k = 0; k < g->n_trainable; k++) {
        const TgParam *p = g->trainable[k];
        CUDA_CHECK(cudaMemcpy(p->host->grad, p->grad, p->numel * sizeof(float), cudaMemcpyDeviceToHost));
    }
}

/* The host optimizer entry whose param array is `param`, or NULL (then the tensor is frozen). */
static TrainParam *tg_find_host(AdamW *opt, const float *param) {
    for (size_t k = 0; k < opt->count; k++)
        if (opt->params[k].param == param) return &opt->params[k];
    return NULL;
}

/* Puts the model on the GPU: frozen tensors in bf16 (read from tg_weights_dir's files by
 * 04_load.c's loader, or from the host model, or random when frozen_random_seed != 0, for
 * benchmarks), and every tensor the host optimizer trains with its fp32 state (uploaded
 * from the host). Under --shard-weights each rank reads only its slice of each matrix. Dies
 * with one sentence on an unsupported model, a bad file, or when the weights do not fit. */
static void gpu_train_init(GpuTrainer *g, const Model *m, const LoraAdapter *ad, AdamW *opt, uint64_t frozen_random_seed) {
    memset(g, 0, sizeof *g);
    const Config *c = &m->cfg;
    g->cfg = *c;
    size_t D = (size_t)c->dim, V = (size_t)c->vocab_size, L = (size_t)c->n_layers;
    if (c->head_dim != 64 && c->head_dim != 128)
        die("the GPU training step needs head_dim 64 or 128 (this model has %d); train it with --device cpu", c->head_dim);
    if (ad->cfg.dropout > 0.0f) die("LoRA dropout %g is not supported by the GPU training step (LongLoRA uses 0); train with --device cpu", (double)ad->cfg.dropout);
    g->weight_bytes = tg_weight_bytes(c, opt);
#ifdef USE_NCCL
    if (tg_shard_weights) { /* the frozen layer matrices: 1/K of them, plus two gathered layers */
        size_t in, out, per_layer = 0;
        for (int w = 0; w < N_PROJ; w++) { proj_shape(c, w, &in, &out); per_layer += in * out; }
        g->weight_bytes -= (double)L * per_layer * 2.0 * (1.0 - 1.0 / g_comm.world);
        g->weight_bytes += 2.0 * per_layer * 2.0;
    }
#endif
    size_t free_b = 0, total_b = 0;
    CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
    if (g->weight_bytes + 512.0 * 1024 * 1024 > (double)free_b)
        die("the model needs %.2f GiB on the GPU for its bf16 weights and the fp32 state of the trainable tensors, but only %.2f GiB of %.2f GiB is free; "
            "use a smaller model or a larger GPU", tg_gib(g->weight_bytes), tg_gib((double)free_b), tg_gib((double)total_b));
    g->R = (size_t)ad->cfg.rank;
    g->lora_scale = ad->scale;
    g->trainable = (TgParam **)xcalloc(opt->count + 1, sizeof(TgParam *));
    g->layers = (TgLayer *)xcalloc(L, sizeof(TgLayer));
#ifdef USE_NCCL
    if (tg_shard_weights) { /* ZeRO-3: two gather buffers and the per-layer shards (below) */
        if (frozen_random_seed) die("--shard-weights loads the frozen weights from the host model (no random bf16 path)");
        size_t in, out, per_layer = 0, K = (size_t)g_comm.world;
        for (int w = 0; w < N_PROJ; w++) { proj_shape(c, w, &in, &out); per_layer += in * out; }
        g->z3 = 1;
        g->z3_shard = (per_layer + K - 1) / K;
        g->z3_mine = (uint16_t **)xcalloc(L, sizeof(uint16_t *));
        for (int b = 0; b < 2; b++) {
            g->z3_buf[b] = (uint16_t *)gpu_malloc(K * g->z3_shard * sizeof(uint16_t), "a gathered layer of frozen weights");
            g->z3_holds[b] = -1;
            CUDA_CHECK(cudaEventCreateWithFlags(&g->z3_ready[b], cudaEventDisableTiming));
            CUDA_CHECK(cudaEventCreateWithFlags(&g->z3_free[b], cudaEventDisableTiming));
            CUDA_CHECK(cudaEventRecord(g->z3_free[b], cudaStreamLegacy));
        }
    }
#endif

    size_t stage_cap = (size_t)1 << 24; /* 16M values: 32 MiB of staging (host values and random ones) */
    uint16_t *stage = (uint16_t *)xmalloc(stage_cap * sizeof(uint16_t));
    uint64_t tensor_no = 0;
    GpuLoader ld;
    int from_files = tg_weights_dir != NULL && !frozen_random_seed;
    if (from_files && gpu_loader_open(&ld, tg_weights_dir, c) != 0) die("%s", last_error());
    char name[160];
    /* a frozen bf16 tensor (HF name `...`) from the files, host values or random ones */
#define TG_TENSOR(dst, src, n, ...)                                                                              \
    do {                                                                                                         \
        (dst) = (uint16_t *)gpu_malloc((n) * sizeof(uint16_t), "the model's bf16 weights");                      \
        snprintf(name, sizeof name, __VA_ARGS__);                                                                \
        if (frozen_random_seed) tg_random_bf16((dst), (n), frozen_random_seed + 7919 * tensor_no, 0.0f, 0.02f, stage, stage_cap); \
        else if (from_files) gpu_load_named(&ld, name, (dst), (n));                                              \
        else if (src) tg_upload_bf16((dst), (src), (n), stage, stage_cap);                                       \
        else die("the GPU step has no values for %s (the host model holds only embed and the norms)", name);     \
        tensor_no++;                                                                                             \
    } while (0)
    /* embed: trainable (LoRA+) or frozen; its values always come from the host (trainable
     * tensors are uploaded again from the optimizer by gpu_train_upload_state) */
    g->embed.numel = V * D;
    g->embed.w = (uint16_t *)gpu_malloc(V * D * sizeof(uint16_t), "the embedding");
    tg_upload_bf16(g->embed.w, m->w.embed, V * D, stage, stage_cap);
    TrainParam *hp = tg_find_host(opt, m->w.embed);
    if (hp) tg_make_trainable(g, &g->embed, hp);
    for (size_t l = 0; l < L; l++) {
        const LayerParams *lp = &m->w.layers[l];
        TgLayer *gl = &g->layers[l];
        size_t in, out;
        TgParam *norms[2] = {&gl->attn_norm, &gl->mlp_norm};
        const float *norm_src[2] = {lp->attn_norm, lp->mlp_norm};
        for (int k = 0; k < 2; k++) {
            norms[k]->numel = D;
            norms[k]->w = (uint16_t *)gpu_malloc(D * sizeof(uint16_t), "the norm weights");
            tg_upload_bf16(norms[k]->w, norm_src[k], D, stage, stage_cap);
            if ((hp = tg_find_host(opt, norm_src[k])) != NULL) tg_make_trainable(g, norms[k], hp);
        }
        uint16_t **frozen[N_PROJ] = {&gl->wq, &gl->wk, &gl->wv, &gl->wo, &gl->w_gate, &gl->w_up, &gl->w_down};
        if (g->z3) { /* ZeRO-3: only this rank's shard of the concatenated matrices */
            size_t lo = (size_t)g_comm.rank * g->z3_shard, hi = lo + g->z3_shard, at = 0;
            g->z3_mine[l] = (uint16_t *)gpu_malloc(g->z3_shard * sizeof(uint16_t), "this rank's shard of the frozen weights");
            CUDA_CHECK(cudaMemset(g->z3_mine[l], 0, g->z3_shard * sizeof(uint16_t))); /* the padding of the last shard */
            for (int w = 0; w < N_PROJ; at += in * out, w++) {
                proj_shape(c, w, &in, &out);
                size_t a = lo > at ? lo - at : 0, z = hi < at + in * out ? hi - at : in * out;
                if (hi <= at || lo >= at + in * out || a >= z) continue;
                uint16_t *dst = g->z3_mine[l] + (at + a - lo);
                if (from_files) { /* only this rank's slice of the matrix is read */
                    snprintf(name, sizeof name, "model.layers.%zu.%s.weight", l, HF_PROJ_NAMES[w]);
                    long i = model_files_find(&ld.mf, name);
                    CHECK(i >= 0, "the loader has no tensor %s", name);
                    if (gpu_load_slice(&ld, (size_t)i, a, z, dst) != 0) die("%s", last_error());
                } else if (proj_weight(lp, w)) tg_upload_bf16(dst, proj_weight(lp, w) + a, z - a, stage, stage_cap);
                else die("the GPU step has no values for layer %zu's %s (the host model holds only embed and the norms)", l, HF_PROJ_NAMES[w]);
            }
        } else
            for (int w = 0; w < N_PROJ; w++) {
                proj_shape(c, w, &in, &out);
                TG_TENSOR(*frozen[w], proj_weight(lp, w), in * out, "model.layers.%zu.%s.weight", l, HF_PROJ_NAMES[w]);
            }
        for (int w = 0; w <= PROJ_V && c->qkv_bias; w++) {
            proj_shape(c, w, &in, &out);
            gl->bias[w] = (uint16_t *)gpu_malloc(out * sizeof(uint16_t), "the model's bf16 biases");
            snprintf(name, sizeof name, "model.layers.%zu.%s.bias", l, HF_PROJ_NAMES[w]);
            if (from_files) gpu_load_named(&ld, name, gl->bias[w], out);
            else if (proj_bias(lp, w)) tg_upload_bf16(gl->bias[w], proj_bias(lp, w), out, stage, stage_cap);
            else die("the GPU step has no values for %s (the host model holds only embed and the norms)", name);
        }
        for (int w = 0; w < N_PROJ; w++) {
            const LoraPair *p = &ad->pairs[l * LORA_NUM_TARGETS + (size_t)w];
            if (!p->A) continue;
            TgParam *pa = &gl->lora_A[w], *pb = &gl->lora_B[w];
            pa->numel = g->R * p->in;
            pb->numel = p->out * g->R;
            pa->w = (uint16_t *)gpu_malloc(pa->numel * sizeof(uint16_t), "the adapter");
            pb->w = (uint16_t *)gpu_malloc(pb->numel * sizeof(uint16_t), "the adapter");
            tg_upload_bf16(pa->w, p->A, pa->numel, stage, stage_cap);
            tg_upload_bf16(pb->w, p->B, pb->numel, stage, stage_cap);
            if ((hp = tg_find_host(opt, p->A)) != NULL) tg_make_trainable(g, pa, hp);
            if ((hp = tg_find_host(opt, p->B)) != NULL) tg_make_trainable(g, pb, hp);
            if (w == PROJ_DOWN) g->lora_mlp_down = 1;
        }
    }
    g->final_norm.numel = D;
    g->final_norm.w = (uint16_t *)gpu_malloc(D * sizeof(uint16_t), "the norm weights");
    tg_upload_bf16(g->final_norm.w, m->w.final_norm, D, stage, stage_cap);
    if ((hp = tg_find_host(opt, m->w.final_norm)) != NULL) tg_make_trainable(g, &g->final_norm, hp);
    if (c->tie_embeddings) g->lm_head = g->embed.w;
    else TG_TENSOR(g->lm_head, m->w.lm_head, V * D, "lm_head.weight");
#undef TG_TENSOR
    free(stage);
    if (from_files) {
        gpu_loader_sync(&ld);
        gpu_loader_summary(&ld, g->load_note, sizeof g->load_note);
        gpu_loader_close(&ld);
    }
    if (g->n_trainable != opt->count) die("the GPU step found %zu of the %zu trainable tensors in the model", g->n_trainable, opt->count);
    /* keep the host optimizer's order, so norms and updates match the CPU step's */
    for (size_t k = 0; k < g->n_trainable; k++)
        for (size_t j = 0; j < g->n_trainable; j++)
            if (g->trainable[j]->host == &opt->params[k] && j != k) { TgParam *t = g->trainable[k]; g->trainable[k] = g->trainable[j]; g->trainable[j] = t; }
    gpu_train_upload_state(g);
}

/* ---------------------------------------------------------------------------------------
 * Activations: planned for B x N before anything is allocated
 * ------------------------------------------------------------------------------------- */

/* Plans and allocates the buffers of a B x N step for the budgets above (05_plan.c decides).
 * Returns 0, or -1 + last_error() (one sentence with the bytes needed and what to change)
 * when they would not fit. */
static int gpu_train_plan(GpuTrainer *g, size_t B, size_t N, size_t G) {
    const Config *c = &g->cfg;
    size_t T = B * N, D = (size_t)c->dim, L = (size_t)c->n_layers, H = (size_t)c->n_heads;
    size_t F = (size_t)c->ffn_dim, Hd = H * c->head_dim, Hkd = (size_t)c->n_kv_heads * c->head_dim;
    if (T > (size_t)INT_MAX || B > 65535)
        return set_error("a batch of %zu x %zu tokens is too large for the GPU kernels' int sizes", B, N);
    if (G && N % G) return set_error("the sequence length %zu is not a multiple of the S2-Attn group size %zu", N, G);
    size_t free_b = 0, total_b = 0;
    CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
    double used = (double)(total_b - free_b), avail = (double)free_b;
    if (tg_gpu_mem_budget > 0 && tg_gpu_mem_budget - used < avail) avail = tg_gpu_mem_budget - used;
    const char *host_source = "--host-mem";
    double host_avail = tg_host_mem_budget >= 0 ? tg_host_mem_budget : train_host_mem_default(&host_source);
    TrainPlan *p = &g->plan;
    memset(p, 0, sizeof *p);
    p->B = B; p->N = N; p->G = G; p->R = g->R; p->lora_down = g->lora_mlp_down;
    p->gpu_avail = avail; p->host_avail = host_avail;
    p->attn_ws_bytes = (double)attn_backward_workspace_bytes((int)B, (int)N, (int)H, c->head_dim);
    p->keep_att_policy = tg_keep_att_policy; p->host_policy = tg_host_policy; p->tile_policy = tg_tile_policy;
    p->chunk_policy = tg_chunk_policy;
    if (train_plan_decide(c, p) != 0) {
        size_t fits = train_plan_longest(c, p);
        return set_error("a context of %zu tokens (batch %zu) needs %.2f GiB of GPU memory (%.2f GiB of it one layer's work buffers, %.2f GiB "
                         "the layer inputs on the GPU and the staging buffers) with %zu of the %zu layer inputs (%.2f GiB) in host memory, beside the %.2f GiB "
                         "of weights, but the GPU allows %.2f GiB (%s) and the host %.2f GiB (%s); lower --ctx to about %zu or less (or --batch), or raise "
                         "--gpu-mem or --host-mem",
                         N, B, tg_gib(p->gpu_bytes + tp_margin), tg_gib(p->work_bytes), tg_gib(p->ckpt_gpu_bytes), p->n_host, L,
                         tg_gib(p->ckpt_host_bytes), tg_gib(g->weight_bytes), tg_gib(avail > 0 ? avail : 0),
                         tg_gpu_mem_budget > 0 ? "--gpu-mem, less what is in use" : "free", tg_gib(host_avail), host_source, fits);
    }
    /* the pinned host checkpoints first: a host that cannot pin them leaves the GPU untouched */
    if (p->n_host) {
        cudaError_t err = cudaHostAlloc((void **)&g->host_saved, p->n_host * T * D * 2, cudaHostAllocDefault);
        if (err != cudaSuccess) {
            cudaGetLastError();
            g->host_saved = NULL;
            return set_error("the host cannot pin %.2f GiB for the inputs of %zu layers (%s, planned for %.2f GiB from %s); lower --host-mem or --ctx",
                             tg_gib(p->ckpt_host_bytes), p->n_host, cudaGetErrorString(err), tg_gib(host_avail), host_source);
        }
    }
    g->B = B; g->N = N; g->T = T; g->G = G; g->act_bytes = p->gpu_bytes; g->n_keep_att = (int)p->n_keep_att;
    g->n_host = p->n_host; g->mlp_tile = p->mlp_tile; g->ce_chunk = p->ce_chunk;
    size_t n_keep = p->n_keep_att;
    float *inv_freq = (float *)xmalloc((size_t)c->head_dim / 2 * sizeof(float)); /* [d/2] */
    g->rope_attention = rope_inv_freq(c, N, inv_freq);
    g->inv_freq = (float *)gpu_malloc((size_t)c->head_dim / 2 * sizeof(float), "the RoPE table");
    CUDA_CHECK(cudaMemcpy(g->inv_freq, inv_freq, (size_t)c->head_dim / 2 * sizeof(float), cudaMemcpyHostToDevice));
    free(inv_freq);
    g->tokens = (int32_t *)gpu_malloc(T * sizeof(int32_t), "token ids");
    g->targets = (int32_t *)gpu_malloc(T * sizeof(int32_t), "target ids");
    g->saved = (uint16_t *)gpu_malloc((L + 1 - g->n_host) * T * D * 2, "the kept layer inputs");
    for (int b = 0; b < 2; b++) {
        g->stage_holds[b] = -1;
        if ((size_t)b < g->n_host) g->stage[b] = (uint16_t *)gpu_malloc(T * D * 2, "a staging buffer of the host checkpoints");
    }
    if (g->n_host) {
        CUDA_CHECK(cudaStreamCreateWithFlags(&g->copy_stream, cudaStreamNonBlocking));
        for (int b = 0; b < 2; b++) {
            CUDA_CHECK(cudaEventCreateWithFlags(&g->stage_ready[b], cudaEventDisableTiming));
            CUDA_CHECK(cudaEventCreateWithFlags(&g->stage_free[b], cudaEventDisableTiming));
            CUDA_CHECK(cudaEventRecord(g->stage_free[b], cudaStreamLegacy));
        }
    }
    size_t Rc = p->attn_chunk; /* chunked: rows of one piece at most */
    if (!Rc) g->xn1 = (uint16_t *)gpu_malloc(T * D * 2, "activations");
    g->x2 = (uint16_t *)gpu_malloc(T * D * 2, "activations");
    g->xn2 = (uint16_t *)gpu_malloc(T * D * 2, "activations");
    g->dx = (uint16_t *)gpu_malloc(T * D * 2, "activations");
    g->dtmp = (uint16_t *)gpu_malloc(T * (Rc && Hd > D ? Hd : D) * 2, "activations"); /* chunked: datt too */
    g->rstd1 = (float *)gpu_malloc(T * 4, "activations");
    g->rstd2 = (float *)gpu_malloc(T * 4, "activations");
    g->rstd_final = (float *)gpu_malloc(T * 4, "activations");
    if (n_keep) {
        g->att_all = (uint16_t *)gpu_malloc(n_keep * T * Hd * 2, "the kept attention outputs");
        g->lse_all = (float *)gpu_malloc(n_keep * B * H * N * 4, "the kept attention outputs");
    }
    if (!Rc) g->q = (uint16_t *)gpu_malloc(T * Hd * 2, "activations");
    if (n_keep < L) g->att = (uint16_t *)gpu_malloc(T * Hd * 2, "activations"); /* for the layers that do not keep theirs */
    if (!Rc) g->k = (uint16_t *)gpu_malloc(T * Hkd * 2, "activations");
    if (!Rc) g->v = (uint16_t *)gpu_malloc(T * Hkd * 2, "activations");
    if (n_keep < L) g->lse = (float *)gpu_malloc(B * H * N * 4, "activations");
    g->xa = (uint16_t *)gpu_malloc((size_t)N_PROJ * T * (g->R ? g->R : 1) * 2, "the LoRA activations");
    g->arena = (uint16_t *)gpu_malloc(tp_arena_elems(c, p) * 2, "activations");
    size_t tile = g->mlp_tile;
    g->gate = g->arena; g->up = g->gate + tile * F; g->h = g->up + tile * F;
    g->dh = g->lora_mlp_down ? g->h + tile * F : g->h;
    if (Rc) { /* one piece's buffers, the attention's first (rows of whole heads: 128-byte aligned for its TMA); dtmp takes datt */
        g->qh = g->arena; g->oh = g->qh + Rc * Hd / 2; g->doh = g->oh + Rc * Hd / 2; g->dqh = g->doh + Rc * Hd / 2;
        g->kh = g->dqh + Rc * Hd / 2; g->vh = g->kh + Rc * Hkd / 2; g->dkh = g->vh + Rc * Hkd / 2; g->dvh = g->dkh + Rc * Hkd / 2;
        g->xn1c = g->dvh + Rc * Hkd / 2; g->dxn1c = g->xn1c + Rc * D;
        g->datt = g->dtmp;
        g->n_pieces = tp_pieces(B, N, G, H, Rc, NULL);
        g->pieces = (TpPiece *)xcalloc(g->n_pieces, sizeof(TpPiece));
        tp_pieces(B, N, G, H, Rc, g->pieces);
        /* the largest call: Rc / G groups of G rows (04 may pad each sequence's rows, so the
         * workspace is asked for that shape, not for Rc rows as one sequence) */
        g->attn_ws = gpu_malloc(attn_backward_workspace_bytes((int)(Rc / p->G), (int)p->G, (int)H / 2, c->head_dim), "the attention backward workspace");
    } else {
        g->datt = g->arena; g->dq = g->datt + T * Hd; g->dk = g->dq + T * Hd; g->dv = g->dk + T * Hkd;
        g->attn_ws = gpu_malloc(attn_backward_workspace_bytes((int)B, (int)N, (int)H, c->head_dim), "the attention backward workspace");
    }
    return 0;
}

static void gpu_train_unplan(GpuTrainer *g) {
    CUDA_CHECK(cudaDeviceSynchronize()); /* the copy stream too */
    void *bufs[] = {g->tokens, g->targets, g->saved, g->xn1, g->x2, g->xn2, g->dx, g->dtmp, g->rstd1, g->rstd2, g->rstd_final, g->q,
                    g->att, g->k, g->v, g->lse, g->xa, g->arena, g->attn_ws, g->att_all, g->lse_all, g->inv_freq, g->stage[0], g->stage[1]};
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++) tg_free_ptr(bufs[i]);
    if (g->host_saved) CUDA_CHECK(cudaFreeHost(g->host_saved));
    if (g->n_host) {
        CUDA_CHECK(cudaStreamDestroy(g->copy_stream));
        for (int b = 0; b < 2; b++) { CUDA_CHECK(cudaEventDestroy(g->stage_ready[b])); CUDA_CHECK(cudaEventDestroy(g->stage_free[b])); }
    }
    g->host_saved = NULL; g->stage[0] = g->stage[1] = NULL; g->n_host = 0; g->copy_stream = NULL;
    g->tokens = g->targets = NULL; g->saved = g->xn1 = g->x2 = g->xn2 = g->dx = g->dtmp = NULL;
    g->rstd1 = g->rstd2 = g->rstd_final = g->lse = g->lse_all = g->inv_freq = NULL; g->att_all = NULL; g->n_keep_att = 0; g->q = g->att = g->k = g->v = g->xa = g->arena = NULL; g->attn_ws = NULL;
    free(g->pieces);
    g->pieces = NULL; g->n_pieces = 0;
    g->xn1c = g->dxn1c = g->qh = g->oh = g->doh = g->dqh = g->kh = g->vh = g->dkh = g->dvh = NULL;
    g->datt = g->dq = g->dk = g->dv = NULL;
    g->T = g->B = g->N = 0;
}

static void tg_param_free(TgParam *p) {
    tg_free_ptr(p->w); tg_free_ptr(p->master); tg_free_ptr(p->grad); tg_free_ptr(p->m); tg_free_ptr(p->v);
    memset(p, 0, sizeof *p);
}

static void gpu_train_free(GpuTrainer *g) {
    if (g->T) gpu_train_unplan(g);
    if (!g->cfg.tie_embeddings) tg_free_ptr(g->lm_head);
    tg_param_free(&g->embed);
    tg_param_free(&g->final_norm);
    for (int l = 0; g->layers && l < g->cfg.n_layers; l++) {
        TgLayer *gl = &g->layers[l];
        tg_param_free(&gl->attn_norm); tg_param_free(&gl->mlp_norm);
        uint16_t *frozen[N_PROJ] = {gl->wq, gl->wk, gl->wv, gl->wo, gl->w_gate, gl->w_up, gl->w_down};
        for (int w = 0; w < N_PROJ; w++) {
            if (!g->z3) tg_free_ptr(frozen[w]); /* sharded: they point into the gather buffers */
            tg_param_free(&gl->lora_A[w]); tg_param_free(&gl->lora_B[w]);
            tg_free_ptr(gl->bias[w]);
        }
        if (g->z3) tg_free_ptr(g->z3_mine[l]);
    }
    if (g->z3) {
        free(g->z3_mine);
        for (int b = 0; b < 2; b++) {
            tg_free_ptr(g->z3_buf[b]);
            CUDA_CHECK(cudaEventDestroy(g->z3_ready[b]));
            CUDA_CHECK(cudaEventDestroy(g->z3_free[b]));
        }
    }
    free(g->layers);
    free(g->trainable);
    gpu_layers_free();
    memset(g, 0, sizeof *g);
}

/* ---------------------------------------------------------------------------------------
 * Forward and backward
 * ------------------------------------------------------------------------------------- */

/* ZeRO-3 (--shard-weights): the gather of layer l into buffer l % 2 on NCCL's stream, after
 * the buffer's last reader (the layer two before, or after in the backward) is done. Issued
 * one layer ahead, so the gather of the next layer runs during this layer's compute. Every
 * rank issues the same gathers in the same order (NCCL's rule). No-ops when unsharded. */
static void tg_z3_fetch(GpuTrainer *g, int l) {
#ifdef USE_NCCL
    int b = l & 1;
    if (!g->z3 || l < 0 || l >= g->cfg.n_layers || g->z3_holds[b] == l) return;
    CUDA_CHECK(cudaStreamWaitEvent(g_comm.stream, g->z3_free[b], 0));
    NCCL_CHECK(ncclAllGather(g->z3_mine[l], g->z3_buf[b], g->z3_shard, ncclBfloat16, g_comm.nccl, g_comm.stream));
    CUDA_CHECK(cudaEventRecord(g->z3_ready[b], g_comm.stream));
    g->z3_holds[b] = l;
#else
    (void)g; (void)l;
#endif
}

/* Before layer l computes: its gather is done (the compute stream waits for it), and its
 * seven matrix pointers point into the buffer; the next layer's gather starts (next = l+1
 * in the forward, l-1 in the backward). */
static void tg_z3_use(GpuTrainer *g, int l, int next) {
#ifdef USE_NCCL
    if (!g->z3) return;
    tg_z3_fetch(g, l);
    int b = l & 1;
    CUDA_CHECK(cudaStreamWaitEvent(cudaStreamLegacy, g->z3_ready[b], 0));
    TgLayer *gl = &g->layers[l];
    uint16_t **frozen[N_PROJ] = {&gl->wq, &gl->wk, &gl->wv, &gl->wo, &gl->w_gate, &gl->w_up, &gl->w_down};
    size_t in, out, at = 0;
    for (int w = 0; w < N_PROJ; w++) {
        proj_shape(&g->cfg, w, &in, &out);
        *frozen[w] = g->z3_buf[b] + at;
        at += in * out;
    }
    tg_z3_fetch(g, next);
#else
    (void)g; (void)l; (void)next;
#endif
}

/* After layer l's compute is queued: its buffer may be overwritten once that compute is done. */
static void tg_z3_done(GpuTrainer *g, int l) {
#ifdef USE_NCCL
    if (g->z3) CUDA_CHECK(cudaEventRecord(g->z3_free[l & 1], cudaStreamLegacy));
#else
    (void)g; (void)l;
#endif
}

static uint16_t *tg_xa(GpuTrainer *g, int which) { return g->xa + (size_t)which * g->T * g->R; }
/* Layer l's attention output [T, H*d] and lse [B, H, N]: its own where it keeps them, else the shared ones. */
static uint16_t *tg_att(GpuTrainer *g, int l) { return l < g->n_keep_att ? g->att_all + (size_t)l * g->T * g->cfg.n_heads * g->cfg.head_dim : g->att; }
static float *tg_lse(GpuTrainer *g, int l) { return l < g->n_keep_att ? g->lse_all + (size_t)l * g->B * g->cfg.n_heads * g->N : g->lse; }

/* Rows r0 .. r0+rows of a projection: y [rows, out] (= or += by beta) x [rows, in] W^T, then the
 * bias and the adapter's path of projection `which` (if any; its x A^T lands in rows r0.. of xa).
 * x and y point at the tile's first row. */
static void tg_project_rows(GpuTrainer *g, int l, int which, const uint16_t *W, const uint16_t *x, uint16_t *y, float beta, size_t r0, size_t rows) {
    size_t in, out;
    proj_shape(&g->cfg, which, &in, &out);
    gpu_matmul_bf16(0, 1, rows, out, in, 1.0f, x, W, beta, y, 0);
    const TgLayer *gl = &g->layers[l];
    if (gl->bias[which]) gpu_add_bias(y, gl->bias[which], rows, out);
    if (gl->lora_A[which].w)
        gpu_lora_forward(y, tg_xa(g, which) + r0 * g->R, x, gl->lora_A[which].w, gl->lora_B[which].w, rows, in, out, g->R, g->lora_scale);
}
static void tg_project(GpuTrainer *g, int l, int which, const uint16_t *W, const uint16_t *x, uint16_t *y, float beta) {
    tg_project_rows(g, l, which, W, x, y, beta, 0, g->T);
}

/* Rows r0 .. r0+rows: dx [rows, in] (= or += by beta) dy [rows, out] W, plus the adapter's share;
 * dA, dB +=. x, dy and dx point at the tile's first row. */
static void tg_project_backward_rows(GpuTrainer *g, int l, int which, const uint16_t *W, const uint16_t *x, const uint16_t *dy, uint16_t *dx,
                                     float beta, size_t r0, size_t rows) {
    size_t in, out;
    proj_shape(&g->cfg, which, &in, &out);
    gpu_matmul_bf16(0, 0, rows, in, out, 1.0f, dy, W, beta, dx, 0);
    TgLayer *gl = &g->layers[l];
    TgParam *A = &gl->lora_A[which], *Bp = &gl->lora_B[which];
    if (A->w) gpu_lora_backward(dx, A->grad, Bp->grad, dy, x, tg_xa(g, which) + r0 * g->R, A->w, Bp->w, rows, in, out, g->R, g->lora_scale);
}
static void tg_project_backward(GpuTrainer *g, int l, int which, const uint16_t *W, const uint16_t *x, const uint16_t *dy, uint16_t *dx,
                                float beta) {
    tg_project_backward_rows(g, l, which, W, x, dy, dx, beta, 0, g->T);
}

/* RoPE (forward or backward) over each sequence of the batch: positions restart at 0. */
static void tg_rope(GpuTrainer *g, uint16_t *x, size_t heads, int backward) {
    const Config *c = &g->cfg;
    size_t d = (size_t)c->head_dim, stride = heads * d;
    for (size_t b = 0; b < g->B; b++) {
        uint16_t *xb = x + b * g->N * stride;
        if (backward) gpu_rope_backward(xb, g->N, heads, d, stride, 0, g->inv_freq, g->rope_attention);
        else gpu_rope_forward(xb, g->N, heads, d, stride, 0, g->inv_freq, g->rope_attention);
    }
}

/* The MLP's first half over rows r0 .. r0+rows of xn2: gate, up [rows, F] in the arena, and
 * with_h: h = silu(gate) * up (the forward's, or the recompute's where the down adapter needs it). */
static void tg_mlp_tile_forward(GpuTrainer *g, int l, size_t r0, size_t rows, int with_h) {
    size_t D = (size_t)g->cfg.dim, F = (size_t)g->cfg.ffn_dim;
    TgLayer *gl = &g->layers[l];
    tg_project_rows(g, l, PROJ_GATE, gl->w_gate, g->xn2 + r0 * D, g->gate, 0.0f, r0, rows);
    tg_project_rows(g, l, PROJ_UP, gl->w_up, g->xn2 + r0 * D, g->up, 0.0f, r0, rows);
    if (with_h) gpu_swiglu_forward(g->h, g->gate, g->up, rows * F);
}

/* ---------------------------------------------------------------------------------------
 * The attention block in chunks (plan.attn_chunk > 0, S2-Attn): each piece (tp_pieces) is
 * one half of the heads over whole groups, whose q, k, v come from that half's rows of the
 * q, k, v weights (and biases, and the adapters' B), so each half is its own causal
 * attention over groups, with no row shared between pieces of one half.
 * ------------------------------------------------------------------------------------- */

/* q, k or v (`which`) of heads half: y [rows, out/2] = x [rows, D] W[half rows]^T + bias + the
 * adapter's path (its x A^T into rows r0.. of xa). */
static void tg_project_half(GpuTrainer *g, int l, int which, int half, const uint16_t *x, uint16_t *y, size_t r0, size_t rows) {
    size_t in, out;
    proj_shape(&g->cfg, which, &in, &out);
    size_t part = out / 2, off = (size_t)half * part;
    const TgLayer *gl = &g->layers[l];
    const uint16_t *W = which == PROJ_Q ? gl->wq : which == PROJ_K ? gl->wk : gl->wv;
    gpu_matmul_bf16(0, 1, rows, part, in, 1.0f, x, W + off * in, 0.0f, y, 0);
    if (gl->bias[which]) gpu_add_bias(y, gl->bias[which] + off, rows, part);
    if (gl->lora_A[which].w)
        gpu_lora_forward(y, tg_xa(g, which) + r0 * g->R, x, gl->lora_A[which].w, gl->lora_B[which].w + off * g->R, rows, in, part, g->R, g->lora_scale);
}

/* Its backward: dx [rows, D] (= or += by beta) dy [rows, out/2] W[half rows], plus the adapter's
 * share; dA +=, dB[half rows] +=. */
static void tg_project_half_backward(GpuTrainer *g, int l, int which, int half, const uint16_t *x, const uint16_t *dy, uint16_t *dx, float beta,
                                     size_t r0, size_t rows) {
    size_t in, out;
    proj_shape(&g->cfg, which, &in, &out);
    size_t part = out / 2, off = (size_t)half * part;
    TgLayer *gl = &g->layers[l];
    const uint16_t *W = which == PROJ_Q ? gl->wq : which == PROJ_K ? gl->wk : gl->wv;
    gpu_matmul_bf16(0, 0, rows, in, part, 1.0f, dy, W + off * in, beta, dx, 0);
    TgParam *A = &gl->lora_A[which], *Bp = &gl->lora_B[which];
    if (A->w)
        gpu_lora_backward(dx, A->grad, Bp->grad + off * g->R, dy, x, tg_xa(g, which) + r0 * g->R, A->w, Bp->w + off * g->R, rows, in, part, g->R,
                          g->lora_scale);
}

/* A piece's normed input, q, k, v (RoPE'd at the piece's positions) into xn1c, qh, kh, vh. */
static void tg_piece_qkv(GpuTrainer *g, int l, const TpPiece *pc, const uint16_t *x_in) {
    const Config *c = &g->cfg;
    size_t D = (size_t)c->dim, d = (size_t)c->head_dim, rows = pc->n_seg * pc->seg_len, Hh = (size_t)c->n_heads / 2, Hkh = (size_t)c->n_kv_heads / 2;
    gpu_rmsnorm_forward(g->xn1c, g->rstd1 + pc->row0, x_in + pc->row0 * D, g->layers[l].attn_norm.w, rows, D, c->rms_eps);
    tg_project_half(g, l, PROJ_Q, pc->half, g->xn1c, g->qh, pc->row0, rows);
    tg_project_half(g, l, PROJ_K, pc->half, g->xn1c, g->kh, pc->row0, rows);
    tg_project_half(g, l, PROJ_V, pc->half, g->xn1c, g->vh, pc->row0, rows);
    gpu_rope_forward(g->qh, rows, Hh, d, Hh * d, pc->pos0, g->inv_freq, g->rope_attention);
    gpu_rope_forward(g->kh, rows, Hkh, d, Hkh * d, pc->pos0, g->inv_freq, g->rope_attention);
}

/* A piece's columns of a [T, H*d] buffer <-> its contiguous [rows, H/2 * d] copy. */
static void tg_piece_copy(const GpuTrainer *g, const TpPiece *pc, uint16_t *full, uint16_t *part, int to_full) {
    size_t Hd = (size_t)g->cfg.n_heads * g->cfg.head_dim, w = Hd / 2 * 2, rows = pc->n_seg * pc->seg_len;
    uint16_t *f = full + pc->row0 * Hd + (size_t)pc->half * (Hd / 2);
    if (to_full) CUDA_CHECK(cudaMemcpy2DAsync(f, Hd * 2, part, w, w, rows, cudaMemcpyDeviceToDevice, cudaStreamLegacy));
    else CUDA_CHECK(cudaMemcpy2DAsync(part, w, f, Hd * 2, w, rows, cudaMemcpyDeviceToDevice, cudaStreamLegacy));
}

/* Layer l's attention output att [T, H*d] and lse (the pieces' layout) from its input, piece by piece. */
static void tg_attn_pieces_forward(GpuTrainer *g, int l, const uint16_t *x_in, uint16_t *att, float *lse) {
    const Config *c = &g->cfg;
    for (size_t i = 0; i < g->n_pieces; i++) {
        const TpPiece *pc = &g->pieces[i];
        tg_piece_qkv(g, l, pc, x_in);
        if (attn_forward(g->qh, g->kh, g->vh, g->oh, lse + pc->lse_off, (int)pc->n_seg, (int)pc->seg_len, c->n_heads / 2, c->n_kv_heads / 2,
                         c->head_dim, 0) != 0)
            die("GPU attention: %s", last_error());
        tg_piece_copy(g, pc, att, g->oh, 1);
    }
}

/* Its backward, piece by piece, from datt [T, H*d] = dL/d(att): each piece's q, k, v
 * recomputed, its attention backward, and its share of dL/d(x_in) added to g->dx through
 * the attention norm (linear in its output's gradient, so the halves add up). */
static void tg_attn_pieces_backward(GpuTrainer *g, int l, const uint16_t *x_in, uint16_t *att, uint16_t *datt, const float *lse) {
    const Config *c = &g->cfg;
    size_t D = (size_t)c->dim, d = (size_t)c->head_dim, Hh = (size_t)c->n_heads / 2, Hkh = (size_t)c->n_kv_heads / 2;
    TgLayer *gl = &g->layers[l];
    for (size_t i = 0; i < g->n_pieces; i++) {
        const TpPiece *pc = &g->pieces[i];
        size_t rows = pc->n_seg * pc->seg_len;
        tg_piece_qkv(g, l, pc, x_in);
        tg_piece_copy(g, pc, att, g->oh, 0);
        tg_piece_copy(g, pc, datt, g->doh, 0);
        if (attn_backward(g->qh, g->kh, g->vh, g->oh, g->doh, lse + pc->lse_off, g->dqh, g->dkh, g->dvh, g->attn_ws, (int)pc->n_seg,
                          (int)pc->seg_len, (int)Hh, (int)Hkh, c->head_dim, 0) != 0)
            die("GPU attention backward: %s", last_error());
        gpu_rope_backward(g->dqh, rows, Hh, d, Hh * d, pc->pos0, g->inv_freq, g->rope_attention);
        gpu_rope_backward(g->dkh, rows, Hkh, d, Hkh * d, pc->pos0, g->inv_freq, g->rope_attention);
        tg_project_half_backward(g, l, PROJ_Q, pc->half, g->xn1c, g->dqh, g->dxn1c, 0.0f, pc->row0, rows);
        tg_project_half_backward(g, l, PROJ_K, pc->half, g->xn1c, g->dkh, g->dxn1c, 1.0f, pc->row0, rows);
        tg_project_half_backward(g, l, PROJ_V, pc->half, g->xn1c, g->dvh, g->dxn1c, 1.0f, pc->row0, rows);
        gpu_rmsnorm_backward(g->dx + pc->row0 * D, gl->attn_norm.grad, g->dxn1c, x_in + pc->row0 * D, gl->attn_norm.w, g->rstd1 + pc->row0, rows, D,
                             c->rms_eps, 1);
    }
}

/* Layer l from its input x_in [T, D]. With x_out, the whole layer (into x_out), the MLP tile
 * by tile; without, the recompute for the backward up to the MLP's norm (the backward
 * recomputes each MLP tile itself), and no attention when the forward kept its output. */
static void tg_layer_forward(GpuTrainer *g, int l, const uint16_t *x_in, uint16_t *x_out) {
    const Config *c = &g->cfg;
    size_t T = g->T, D = (size_t)c->dim;
    TgLayer *gl = &g->layers[l];
    uint16_t *att = tg_att(g, l);
    int run_attention = x_out || l >= g->n_keep_att;
    if (g->n_pieces) { /* chunked: q, k, v exist a piece at a time, so only where the attention runs */
        if (run_attention) tg_attn_pieces_forward(g, l, x_in, att, tg_lse(g, l));
    } else {
        gpu_rmsnorm_forward(g->xn1, g->rstd1, x_in, gl->attn_norm.w, T, D, c->rms_eps);
        tg_project(g, l, PROJ_Q, gl->wq, g->xn1, g->q, 0.0f);
        tg_project(g, l, PROJ_K, gl->wk, g->xn1, g->k, 0.0f);
        tg_project(g, l, PROJ_V, gl->wv, g->xn1, g->v, 0.0f);
        tg_rope(g, g->q, (size_t)c->n_heads, 0);
        tg_rope(g, g->k, (size_t)c->n_kv_heads, 0);
        if (run_attention &&
            attn_forward(g->q, g->k, g->v, att, tg_lse(g, l), (int)g->B, (int)g->N, c->n_heads, c->n_kv_heads, c->head_dim, (int)g->G) != 0)
            die("GPU attention: %s", last_error());
    }
    size_t Hd = (size_t)c->n_heads * c->head_dim, blk = g->n_pieces ? g->plan.attn_chunk : T; /* chunked: the o projection in blocks too */
    for (size_t r0 = 0; r0 < T; r0 += blk)
        tg_project_rows(g, l, PROJ_O, gl->wo, att + r0 * Hd, g->x2 + r0 * D, 0.0f, r0, T - r0 < blk ? T - r0 : blk);
    gpu_add(g->x2, g->x2, x_in, T * D);
    gpu_rmsnorm_forward(g->xn2, g->rstd2, g->x2, gl->mlp_norm.w, T, D, c->rms_eps);
    if (!x_out) return;
    /* MLP: out = x2 + down(silu(gate) * up), gate/up = proj(rmsnorm(x2)), mlp_tile rows at a time */
    for (size_t r0 = 0; r0 < T; r0 += g->mlp_tile) {
        size_t rows = T - r0 < g->mlp_tile ? T - r0 : g->mlp_tile;
        tg_mlp_tile_forward(g, l, r0, rows, 1);
        tg_project_rows(g, l, PROJ_DOWN, gl->w_down, g->h, x_out + r0 * D, 0.0f, r0, rows);
    }
    gpu_add(x_out, x_out, g->x2, T * D);
}

/* Backward of layer l after tg_layer_forward(g, l, x_in, NULL): g->dx holds dL/d(output)
 * on entry and dL/d(x_in) on return; LoRA and norm gradients accumulate. */
static void tg_layer_backward(GpuTrainer *g, int l, const uint16_t *x_in) {
    const Config *c = &g->cfg;
    size_t T = g->T, D = (size_t)c->dim, F = (size_t)c->ffn_dim;
    TgLayer *gl = &g->layers[l];
    /* MLP, tile by tile: each tile's gate and up recomputed (and h where the down adapter
     * reads it), except the top layer's single tile, which the forward left in the arena */
    int still_there = g->mlp_tile >= T && l + 1 == c->n_layers;
    for (size_t r0 = 0; r0 < T; r0 += g->mlp_tile) {
        size_t rows = T - r0 < g->mlp_tile ? T - r0 : g->mlp_tile;
        if (!still_there) {
            tg_mlp_tile_forward(g, l, r0, rows, g->lora_mlp_down);
            if (gl->lora_A[PROJ_DOWN].w) /* the backward needs x A^T of the down adapter */
                gpu_matmul_bf16(0, 1, rows, g->R, F, 1.0f, g->h, gl->lora_A[PROJ_DOWN].w, 0.0f, tg_xa(g, PROJ_DOWN) + r0 * g->R, 0);
        }
        tg_project_backward_rows(g, l, PROJ_DOWN, gl->w_down, g->h, g->dx + r0 * D, g->dh, 0.0f, r0, rows);
        gpu_swiglu_backward(g->gate, g->up, g->dh, g->gate, g->up, rows * F); /* dgate over gate, dup over up */
        tg_project_backward_rows(g, l, PROJ_GATE, gl->w_gate, g->xn2 + r0 * D, g->gate, g->dtmp + r0 * D, 0.0f, r0, rows);
        tg_project_backward_rows(g, l, PROJ_UP, gl->w_up, g->xn2 + r0 * D, g->up, g->dtmp + r0 * D, 1.0f, r0, rows);
    }
    gpu_rmsnorm_backward(g->dx, gl->mlp_norm.grad, g->dtmp, g->x2, gl->mlp_norm.w, g->rstd2, T, D, c->rms_eps, 1);
    /* attention: x2 = x_in + o(attn(rope(q), rope(k), v)), q/k/v = proj(rmsnorm(x_in)) */
    uint16_t *att = tg_att(g, l);
    size_t Hd = (size_t)c->n_heads * c->head_dim, blk = g->n_pieces ? g->plan.attn_chunk : T; /* chunked: each product under 2^31 values */
    for (size_t r0 = 0; r0 < T; r0 += blk)
        tg_project_backward_rows(g, l, PROJ_O, gl->wo, att + r0 * Hd, g->dx + r0 * D, g->datt + r0 * Hd, 0.0f, r0, T - r0 < blk ? T - r0 : blk);
    if (g->n_pieces) { tg_attn_pieces_backward(g, l, x_in, att, g->datt, tg_lse(g, l)); return; }
    if (attn_backward(g->q, g->k, g->v, att, g->datt, tg_lse(g, l), g->dq, g->dk, g->dv, g->attn_ws, (int)g->B, (int)g->N, c->n_heads,
                      c->n_kv_heads, c->head_dim, (int)g->G) != 0)
        die("GPU attention backward: %s", last_error());
    tg_rope(g, g->dq, (size_t)c->n_heads, 1);
    tg_rope(g, g->dk, (size_t)c->n_kv_heads, 1);
    tg_project_backward(g, l, PROJ_Q, gl->wq, g->xn1, g->dq, g->dtmp, 0.0f);
    tg_project_backward(g, l, PROJ_K, gl->wk, g->xn1, g->dk, g->dtmp, 1.0f);
    tg_project_backward(g, l, PROJ_V, gl->wv, g->xn1, g->dv, g->dtmp, 1.0f);
    gpu_rmsnorm_backward(g->dx, gl->attn_norm.grad, g->dtmp, x_in, gl->attn_norm.w, g->rstd1, T, D, c->rms_eps, 1);
}

/* ---------------------------------------------------------------------------------------
 * Layer inputs: slot j (0 .. L) is layer j's input, slot L the last layer's output. Slots
 * below n_host live in pinned host memory and pass through staging buffer j % 2; the rest
 * stay on the GPU. The compute runs on the legacy default stream, the copies on copy_stream:
 * a copy out waits for the layer that wrote the buffer (stage_ready), the next write into
 * the buffer waits for the copy (stage_free); a copy in waits for the buffer's last reader
 * (stage_free), and the layer that reads it waits for the copy (stage_ready).
 * ------------------------------------------------------------------------------------- */

static uint16_t *tg_slot(GpuTrainer *g, size_t j) {
    return j < g->n_host ? g->stage[j & 1] : g->saved + (j - g->n_host) * g->T * (size_t)g->cfg.dim;
}

/* Forward, before slot j is written: a staging buffer's copy out must be done. */
static void tg_slot_claim(GpuTrainer *g, size_t j) {
    if (j >= g->n_host) return;
    CUDA_CHECK(cudaStreamWaitEvent(cudaStreamLegacy, g->stage_free[j & 1], 0));
    g->stage_holds[j & 1] = (int)j;
}

/* Forward, after slot j was written: a host layer's input is copied out on the side stream.
 * The two highest host layers skip it: nothing overwrites their staging buffers before the
 * backward reads them there. */
static void tg_slot_offload(GpuTrainer *g, size_t j) {
    if (j + 2 >= g->n_host) return;
    size_t bytes = g->T * (size_t)g->cfg.dim * 2;
    int b = (int)(j & 1);
    CUDA_CHECK(cudaEventRecord(g->stage_ready[b], cudaStreamLegacy));
    CUDA_CHECK(cudaStreamWaitEvent(g->copy_stream, g->stage_ready[b], 0));
    CUDA_CHECK(cudaMemcpyAsync(g->host_saved + j * g->T * g->cfg.dim, g->stage[b], bytes, cudaMemcpyDeviceToHost, g->copy_stream));
    CUDA_CHECK(cudaEventRecord(g->stage_free[b], g->copy_stream));
}

/* Backward: layer j's input back into its staging buffer on the side stream, once the
 * buffer's last reader (layer j+2's backward) is done; nothing when it is still there. */
static void tg_slot_prefetch(GpuTrainer *g, long j) {
    if (j < 0 || (size_t)j >= g->n_host || g->stage_holds[j & 1] == (int)j) return;
    size_t bytes = g->T * (size_t)g->cfg.dim * 2;
    int b = (int)(j & 1);
    CUDA_CHECK(cudaStreamWaitEvent(g->copy_stream, g->stage_free[b], 0));
    CUDA_CHECK(cudaMemcpyAsync(g->stage[b], g->host_saved + (size_t)j * g->T * g->cfg.dim, bytes, cudaMemcpyHostToDevice, g->copy_stream));
    CUDA_CHECK(cudaEventRecord(g->stage_ready[b], g->copy_stream));
    g->stage_holds[b] = (int)j;
}

/* Backward: layer j's input, the compute stream waiting for its copy in (issued a layer ahead). */
static const uint16_t *tg_slot_fetch(GpuTrainer *g, size_t j) {
    if (j < g->n_host) {
        tg_slot_prefetch(g, (long)j); /* nothing when it was issued ahead */
        CUDA_CHECK(cudaStreamWaitEvent(cudaStreamLegacy, g->stage_ready[j & 1], 0));
    }
    return tg_slot(g, j);
}

/* Backward, after layer j's: its staging buffer may be refilled. */
static void tg_slot_release(GpuTrainer *g, size_t j) {
    if (j < g->n_host) CUDA_CHECK(cudaEventRecord(g->stage_free[j & 1], cudaStreamLegacy));
}

static void gpu_train_zero_grads(GpuTrainer *g) {
    for (size_t k = 0; k < g->n_trainable; k++) CUDA_CHECK(cudaMemset(g->trainable[k]->grad, 0, g->trainable[k]->numel * sizeof(float)));
}

/* Forward and backward of one micro-batch (tokens, targets [B*N] on the host); gradients
 * accumulate (+=). Returns the mean loss over the targets that are not IGNORE_INDEX; a
 * non-finite loss returns before the backward. */
static double gpu_train_forward_backward(GpuTrainer *g, const int32_t *tokens, const int32_t *targets) {
    const Config *c = &g->cfg;
    size_t T = g->T, D = (size_t)c->dim, V = (size_t)c->vocab_size, L = (size_t)c->n_layers;
    for (size_t t = 0; t < T; t++)
        if (tokens[t] < 0 || tokens[t] >= c->vocab_size) die("token %zu has id %d, outside the vocabulary of %d", t, tokens[t], c->vocab_size);
    CUDA_CHECK(cudaMemcpy(g->tokens, tokens, T * sizeof(int32_t), cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(g->targets, targets, T * sizeof(int32_t), cudaMemcpyHostToDevice));
    /* forward, keeping each layer's input (the lowest ones copied out to the host) */
    tg_slot_claim(g, 0);
    gpu_embedding_forward(tg_slot(g, 0), g->tokens, g->embed.w, T, D, V);
    tg_slot_offload(g, 0);
    for (size_t l = 0; l < L; l++) {
        tg_z3_use(g, (int)l, (int)l + 1); /* --shard-weights: gather this layer (the next one's gather starts) */
        tg_slot_claim(g, l + 1);
        tg_layer_forward(g, (int)l, tg_slot(g, l), tg_slot(g, l + 1));
        tg_slot_offload(g, l + 1);
        tg_z3_done(g, (int)l);
    }
    /* the final norm goes to dx (free until the backward writes it), so the work buffers
     * still hold the last layer's activations: its backward needs no recompute */
    const uint16_t *x_last = tg_slot(g, L);
    uint16_t *h_final = g->dx; /* [T, D] */
    gpu_rmsnorm_forward(h_final, g->rstd_final, x_last, g->final_norm.w, T, D, c->rms_eps);
    /* the loss and dL/d(final norm output) into dtmp; a tied head's dW goes to embed */
    double loss_sum = 0;
    size_t n_valid = 0;
    float *dW = c->tie_embeddings ? g->embed.grad : NULL;
    gpu_cross_entropy(&loss_sum, &n_valid, g->dtmp, dW, h_final, g->lm_head, g->targets, T, D, V, g->ce_chunk, 1.0f);
    double loss = n_valid ? loss_sum / (double)n_valid : 0.0;
    if (!isfinite(loss) && !g->z3) return loss; /* sharded: the backward still runs, so every rank issues the same gathers */
    gpu_rmsnorm_backward(g->dx, g->final_norm.grad, g->dtmp, x_last, g->final_norm.w, g->rstd_final, T, D, c->rms_eps, 0);
    /* backward, recomputing each layer from its kept input (the last one's are still there) */
    for (size_t l = L; l-- > 0;) {
        const uint16_t *x_in = tg_slot_fetch(g, l);
        tg_slot_prefetch(g, (long)l - 1); /* the next layer's input comes in during this one */
        tg_z3_use(g, (int)l, (int)l - 1);
        if (l + 1 < L) tg_layer_forward(g, (int)l, x_in, NULL);
        tg_layer_backward(g, (int)l, x_in);
        tg_z3_done(g, (int)l);
        tg_slot_release(g, l);
    }
    if (g->embed.grad) gpu_embedding_backward(g->embed.grad, g->tokens, g->dx, T, D, V);
    return loss;
}

/* Global L2 norm of the (accumulated) gradients times grad_scale, in the optimizer's order. */
static double gpu_train_grad_norm(GpuTrainer *g, double grad_scale) {
    double sum = 0;
    for (size_t k = 0; k < g->n_trainable; k++) sum += gpu_sum_squares(g->trainable[k]->grad, g->trainable[k]->numel);
    return sqrt(sum) * grad_scale;
}

/* AdamW on every trainable tensor with gradients times grad_scale; opt->steps_taken counts it. */
static void gpu_train_adamw(GpuTrainer *g, AdamW *opt, float lr, float grad_scale) {
    const AdamWConfig *oc = &opt->cfg;
    long step = ++opt->steps_taken;
    for (size_t k = 0; k < g->n_trainable; k++) {
        TgParam *p = g->trainable[k];
        gpu_adamw(p->master, p->w, p->grad, p->m, p->v, p->numel, lr, oc->beta1, oc->beta2, oc->eps, p->host->no_decay ? 0.0f : oc->weight_decay,
                  (int)step, grad_scale);
    }
}

/* GPU memory in use on the device now (everything: this process's context too), in bytes. */
static double gpu_train_used_bytes(void) {
    size_t free_b = 0, total_b = 0;
    CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
    return (double)(total_b - free_b);
}

/* ---------------------------------------------------------------------------------------
 * The hooks 05_train.c calls (its Trainer, TrainOptions and StepResult are defined above
 * the point where it includes this file)
 * ------------------------------------------------------------------------------------- */

/* Several ranks on one host: rank r uses GPU r mod (GPUs), set before anything touches a GPU
 * (mpirun: its local rank). A single process keeps the default device. */
static void train_gpu_select_device(const TrainOptions *o) {
    const char *local = getenv("OMPI_COMM_WORLD_LOCAL_RANK");
    int rank, world;
    dist_rank_world(o->rank, o->world_size, &rank, &world);
    if (world <= 1 || (o->device && !strcmp(o->device, "cpu"))) return;
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) { cudaGetLastError(); return; }
    int r = local ? atoi(local) : rank;
    CUDA_CHECK(cudaSetDevice(r % n));
}

/* Why the GPU step cannot train this model (NULL: it can), for 04_load.c's device_choose. */
static const char *train_gpu_why_not(const Config *c, double lora_dropout) {
    if (c->head_dim != 64 && c->head_dim != 128) return "the GPU kernels need head_dim 64 or 128";
    if (lora_dropout > 0) return "the GPU step has no LoRA dropout";
    return NULL;
}

/* Weights, trainable state (the host's, so after a resume the checkpoint's) and the
 * activations of a --batch x --ctx step on the GPU; dies with one sentence if they do not
 * fit. A host model without its frozen matrices (loaded for the GPU: 02's
 * model_try_load_host) has them read from --model's files straight to the GPU. */
static void train_gpu_setup(Trainer *t) {
    const TrainOptions *o = &t->opt;
    t->gpu = (GpuTrainer *)xcalloc(1, sizeof(GpuTrainer));
    if (o->shard_weights && g_comm.backend != COMM_NCCL)
        die("--shard-weights shards the frozen weights over several GPU ranks: it needs --world-size 2 or more on GPUs with NCCL");
    tg_shard_weights = o->shard_weights;
    tg_weights_dir = t->model.w.layers && !t->model.w.layers[0].wq ? o->model_dir : NULL;
    gpu_train_init(t->gpu, &t->model, &t->lora, &t->lt.opt, 0);
    tg_weights_dir = NULL;
    tg_gpu_mem_budget = o->gpu_mem_gib * TP_GIB;
    tg_host_mem_budget = o->host_mem_gib < 0 ? -1 : o->host_mem_gib * TP_GIB;
    if (gpu_train_plan(t->gpu, (size_t)o->batch, (size_t)o->ctx, (size_t)o->group) != 0) die("%s", last_error());
    char line[1024];
    train_plan_describe(&t->gpu->cfg, &t->gpu->plan, line, sizeof line);
    if (!o->quiet) fprintf(stderr, "05_train: %s\n", line);
}

static void train_gpu_free(Trainer *t) {
    if (!t->gpu) return;
    tg_free_ptr(t->gpu->dist_loss);
    gpu_train_free(t->gpu);
    free(t->gpu);
    t->gpu = NULL;
}

/* ---------------------------------------------------------------------------------------
 * Several GPUs (NCCL, 05_dist.c). Run with one rank on one GPU (tests/test_gpu_dist.sh);
 * not yet run with two or more.
 * ------------------------------------------------------------------------------------- */

#ifdef USE_NCCL
/* The gradients of every trainable tensor and the loss sum, added over the ranks: one NCCL
 * group (NCCL fuses the calls). The compute runs on the legacy default stream, NCCL on its
 * own: the device is synchronised first, and nccl_wait waits for the sums. */
static double tg_dist_allreduce_grads(GpuTrainer *g, double loss_sum) {
    if (!g->dist_loss) g->dist_loss = (float *)gpu_malloc(sizeof(float), "the loss sum");
    float l = (float)loss_sum;
    CUDA_CHECK(cudaMemcpy(g->dist_loss, &l, sizeof l, cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaDeviceSynchronize());
    NCCL_CHECK(ncclGroupStart());
    for (size_t k = 0; k < g->n_trainable; k++)
        NCCL_CHECK(ncclAllReduce(g->trainable[k]->grad, g->trainable[k]->grad, g->trainable[k]->numel, ncclFloat32, ncclSum, g_comm.nccl, g_comm.stream));
    NCCL_CHECK(ncclAllReduce(g->dist_loss, g->dist_loss, 1, ncclFloat32, ncclSum, g_comm.nccl, g_comm.stream));
    NCCL_CHECK(ncclGroupEnd());
    nccl_wait();
    CUDA_CHECK(cudaMemcpy(&l, g->dist_loss, sizeof l, cudaMemcpyDeviceToHost));
    return l;
}

/* fp32 array `which` (0 master, 1 m, 2 v) of every trainable tensor: each rank's ZeRO-1
 * slice of the flat vector is broadcast from its owner, so every rank ends with all of it
 * (an all-gather whose pieces need not line up with the tensors). */
static void tg_dist_gather_slices(GpuTrainer *g, int which) {
    size_t P = 0;
    for (size_t k = 0; k < g->n_trainable; k++) P += g->trainable[k]->numel;
    CUDA_CHECK(cudaDeviceSynchronize());
    NCCL_CHECK(ncclGroupStart());
    size_t base = 0;
    for (size_t k = 0; k < g->n_trainable; base += g->trainable[k]->numel, k++) {
        TgParam *p = g->trainable[k];
        float *a = which == 0 ? p->master : which == 1 ? p->m : p->v;
        for (int r = 0; r < g_comm.world; r++) {
            size_t lo, hi;
            dist_shard(P, r, g_comm.world, &lo, &hi);
            size_t from = lo > base ? lo - base : 0, to = hi < base + p->numel ? hi - base : p->numel;
            if (hi <= base || lo >= base + p->numel || from >= to) continue;
            NCCL_CHECK(ncclBroadcast(a + from, a + from, to - from, ncclFloat32, r, g_comm.nccl, g_comm.stream));
        }
    }
    NCCL_CHECK(ncclGroupEnd());
    nccl_wait();
}

/* AdamW (04's kernel) on this rank's slice only, then every slice to every rank and the
 * bf16 copies refreshed from the gathered masters. */
static void tg_dist_adamw(GpuTrainer *g, AdamW *opt, float lr, float grad_scale) {
    const AdamWConfig *oc = &opt->cfg;
    long step = ++opt->steps_taken;
    size_t P = 0, lo, hi, base = 0;
    for (size_t k = 0; k < g->n_trainable; k++) P += g->trainable[k]->numel;
    dist_shard(P, g_comm.rank, g_comm.world, &lo, &hi);
    for (size_t k = 0; k < g->n_trainable; base += g->trainable[k]->numel, k++) {
        TgParam *p = g->trainable[k];
        if (hi <= base || lo >= base + p->numel) continue;
        size_t from = lo > base ? lo - base : 0, to = hi < base + p->numel ? hi - base : p->numel;
        gpu_adamw(p->master + from, p->w + from, p->grad + from, p->m + from, p->v + from, to - from, lr, oc->beta1, oc->beta2, oc->eps,
                  p->host->no_decay ? 0.0f : oc->weight_decay, (int)step, grad_scale);
    }
    tg_dist_gather_slices(g, 0);
    for (size_t k = 0; k < g->n_trainable; k++) gpu_f32_to_bf16(g->trainable[k]->w, g->trainable[k]->master, g->trainable[k]->numel);
}
#endif

/* Before a checkpoint with several ranks: the moments' slices to every rank (rank 0 writes). */
static void train_gpu_gather_state(Trainer *t) {
#ifdef USE_NCCL
    if (t->gpu && g_comm.backend == COMM_NCCL) {
        tg_dist_gather_slices(t->gpu, 1);
        tg_dist_gather_slices(t->gpu, 2);
    }
#else
    (void)t;
#endif
}

/* The GPU twin of train_step_cpu: grad_accum micro-batches, the global norm, clipping folded
 * into AdamW's gradient scale, AdamW on the GPU. A non-finite loss or norm returns before
 * any weight changes, so the last checkpoint stays the last good state. With K ranks: every
 * K-th of K * grad_accum micro-batches, the sums over the ranks, ZeRO-1's AdamW slice. */
static StepResult train_step_gpu(Trainer *t) {
    const TrainOptions *o = &t->opt;
    StepResult r = {0, 0, 0};
    int K = comm_world(), rank = g_comm.rank, n_micro = K * o->grad_accum;
    gpu_train_zero_grads(t->gpu);
    for (int micro = 0; micro < n_micro; micro++) {
        if (micro % K != rank) { dataset_skip_batch(&t->data, o->batch); continue; }
        dataset_next_batch(&t->data, o->batch, t->inputs, t->targets);
        double loss = gpu_train_forward_backward(t->gpu, t->inputs, t->targets);
        r.loss += (float)loss;
        if (!isfinite(loss)) {
            if (!comm_active()) { r.loss = loss; return r; }
            continue; /* the other ranks wait for this one's sum, which carries the non-finite loss */
        }
    }
#ifdef USE_NCCL
    if (comm_active()) {
        r.loss = tg_dist_allreduce_grads(t->gpu, r.loss);
        if (!isfinite(r.loss)) return r;
    }
#endif
    r.loss /= n_micro;
    double scale = 1.0 / n_micro;
    r.grad_norm = gpu_train_grad_norm(t->gpu, scale);
    if (!isfinite(r.grad_norm)) return r;
    if (o->clip > 0 && r.grad_norm > o->clip) scale *= o->clip / (r.grad_norm + 1e-6);
    r.lr = adamw_lr_at(&t->lt.opt.cfg, t->step);
#ifdef USE_NCCL
    if (comm_active()) { tg_dist_adamw(t->gpu, &t->lt.opt, (float)r.lr, (float)scale); return r; }
#endif
    gpu_train_adamw(t->gpu, &t->lt.opt, (float)r.lr, (float)scale);
    return r;
}

#endif /* TRAIN_GPU_C */
