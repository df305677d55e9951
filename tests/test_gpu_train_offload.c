/* test_gpu_train_offload.c: the GPU step with layer inputs in host memory and the MLP in
 * tiles (05_train_gpu.c, planned by 05_plan.c) against the same step with everything on the
 * GPU and the MLP in one piece.
 *
 * A tiny random model (GQA 3:1, d=64, S2-Attn over two sequences, odd widths), the same
 * weights and tokens on both sides. Cases:
 *   - budget: --gpu-mem set just below what the in-memory plan needs, so the planner itself
 *     moves layer inputs to the host and picks the MLP tile;
 *   - every layer input on the host (the top layer's too), a tile of 37 rows (not a multiple
 *     of anything), LoRA on all seven projections (the down adapter's recomputed x A^T), one
 *     layer keeping its attention output;
 *   - the attention block in chunks of one S2 group (4 heads, 2 kv heads, so each half of
 *     the heads has its own kv heads): the plain half's groups and the shifted half's short
 *     first and last groups as separate pieces, LoRA on all seven projections (the q, k, v
 *     adapters' B split by halves), one layer keeping its attention output (its lse in the
 *     pieces' layout), two layer inputs on the host, a tile of 37 rows; and chunks of two
 *     groups (a piece of two groups in one call, the last chunk of the shifted half one).
 * Each offloaded plan runs two steps (the staging buffers' bookkeeping carries over), every
 * work buffer and the pinned host buffer poisoned with NaN bytes first. Tolerances: the loss
 * within 1e-4 relative, every trainable gradient within 1e-2 relative L2 (the tiles change
 * cuBLAS's choice of kernel, so bf16 outputs may round differently; two in-memory steps are
 * compared too, as the floor). Every step is also measured against the fp32 CPU step (02 +
 * 03) on the same weights: the chunked cases round more (see run_case), so there the bar is
 * that distance, the in-memory step's within 1.1x, and the distance between the two GPU steps
 * under 0.75x of it. Without a GPU it exits 77.
 */
#define STAGE 0
#include "05_train.c"
#include "05_train_gpu.c"

#include "check.h"
#include "gpu_tiny.h"

static void round_bf16(float *x, size_t n) {
    for (size_t i = 0; i < n; i++) x[i] = bf16_to_f32(f32_to_bf16(x[i]));
}

static void poison(GpuTrainer *g) {
    const Config *c = &g->cfg;
    size_t T = g->T, D = (size_t)c->dim, Hd = (size_t)c->n_heads * c->head_dim, Hkd = (size_t)c->n_kv_heads * c->head_dim;
    struct { void *p; size_t bytes; } bufs[] = {
        {g->saved, ((size_t)c->n_layers + 1 - g->n_host) * T * D * 2}, {g->stage[0], g->stage[0] ? T * D * 2 : 0},
        {g->stage[1], g->stage[1] ? T * D * 2 : 0}, {g->xn1, T * D * 2}, {g->x2, T * D * 2}, {g->xn2, T * D * 2}, {g->dx, T * D * 2},
        {g->dtmp, T * D * 2}, {g->q, T * Hd * 2}, {g->att, g->att ? T * Hd * 2 : 0}, {g->k, T * Hkd * 2}, {g->v, T * Hkd * 2},
        {g->xa, (size_t)N_PROJ * T * g->R * 2}, {g->arena, tp_arena_elems(c, &g->plan) * 2},
        {g->att_all, (size_t)g->n_keep_att * T * Hd * 2}, {g->lse, g->lse ? T * (size_t)c->n_heads * 4 : 0},
        {g->lse_all, (size_t)g->n_keep_att * T * c->n_heads * 4}, {g->rstd1, T * 4}};
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++)
        if (bufs[i].p && bufs[i].bytes) CUDA_CHECK(cudaMemset(bufs[i].p, 0xff, bufs[i].bytes)); /* chunked: no xn1, q, k, v */
    if (g->host_saved) memset(g->host_saved, 0xff, g->n_host * T * D * 2);
    CUDA_CHECK(cudaDeviceSynchronize());
}

/* One forward + backward from zero gradients; the loss, and the gradients into out[k]. */
static double step(GpuTrainer *g, AdamW *opt, const int32_t *tokens, const int32_t *targets, float **out) {
    poison(g);
    gpu_train_zero_grads(g);
    double loss = gpu_train_forward_backward(g, tokens, targets);
    gpu_train_download_grads(g);
    for (size_t k = 0; k < opt->count; k++) memcpy(out[k], opt->params[k].grad, opt->params[k].numel * sizeof(float));
    return loss;
}

/* The worst relative L2 difference of a's gradients from b's, and where. */
static double worst_grad_diff(const AdamW *opt, float **a, float **b, const char **where) {
    double worst = 0;
    *where = "";
    for (size_t k = 0; k < opt->count; k++) {
        double d2 = 0, n2 = 0;
        for (size_t j = 0; j < opt->params[k].numel; j++) {
            double d = (double)a[k][j] - b[k][j];
            d2 += d * d;
            n2 += (double)b[k][j] * b[k][j];
        }
        double rel = sqrt(d2) / (sqrt(n2) + 1e-30);
        if (!(rel <= worst)) { worst = rel; *where = opt->params[k].name; }
    }
    return worst;
}

static float **grad_copies_alloc(const AdamW *opt) {
    float **g = (float **)xcalloc(opt->count, sizeof(float *));
    for (size_t k = 0; k < opt->count; k++) g[k] = (float *)xmalloc(opt->params[k].numel * sizeof(float));
    return g;
}

static void grad_copies_free(const AdamW *opt, float **g) {
    for (size_t k = 0; k < opt->count; k++) free(g[k]);
    free(g);
}

static void plan_or_die(GpuTrainer *g, size_t B, size_t N, size_t G, int keep, int host, size_t tile, double gpu_budget, long chunk) {
    tg_chunk_policy = chunk;
    tg_keep_att_policy = keep;
    tg_host_policy = host;
    tg_tile_policy = tile;
    tg_gpu_mem_budget = gpu_budget;
    tg_host_mem_budget = 1.0 * TP_GIB;
    if (gpu_train_plan(g, B, N, G) != 0) die("%s", last_error());
    tg_keep_att_policy = -1; tg_host_policy = -1; tg_tile_policy = 0; tg_gpu_mem_budget = 0; tg_host_mem_budget = -1; tg_chunk_policy = 0;
}

/* chunk > 0: the attention block in chunks of `chunk` S2 groups (a shape with even head counts). */
static void run_case(const char *name, unsigned targets_mask, int budget_case, long chunk, uint64_t seed) {
    Config c;
    memset(&c, 0, sizeof c);
    c.dim = 192; c.n_layers = 4; c.n_heads = 3; c.n_kv_heads = 1; c.head_dim = 64; c.ffn_dim = 328; c.vocab_size = 397;
    if (chunk) { c.dim = 256; c.n_heads = 4; c.n_kv_heads = 2; }
    c.rms_eps = 1e-5f; c.rope_theta = 10000.0f; c.rope_config_factor = 1.0f; c.max_pos = 64; c.bos_id = c.eos_id = -1;
    size_t B = 2, N = 96, T = B * N, G = 0;
    if (config_extend(&c, (long)N, ROPE_EXTEND_AUTO) != 0) die("%s", last_error());
    if (s2_group_size(N, 0.25, &G) != 0) die("%s", last_error());
    Model m;
    model_init_random(&m, &c, seed, 0.05f);
    round_bf16(m.w.memory, m.w.count);
    LoraConfig lc = lora_default_config();
    lc.targets = targets_mask;
    lc.seed = seed + 1;
    LoraAdapter ad;
    if (lora_init(&ad, &c, &lc) != 0) die("%s", last_error());
    Rng rng;
    rng_seed(&rng, seed + 2);
    for (size_t i = 0; i < (size_t)c.n_layers * LORA_NUM_TARGETS; i++) { /* B random, so every gradient is non-trivial */
        LoraPair *p = &ad.pairs[i];
        if (!p->A) continue;
        for (size_t j = 0; j < p->out * (size_t)lc.rank; j++) p->B[j] = 0.05f * rng_normal(&rng);
        round_bf16(p->A, (size_t)lc.rank * p->in); /* the GPU holds them in bf16: the CPU sees the same values */
        round_bf16(p->B, p->out * (size_t)lc.rank);
    }
    AdamWConfig oc = adamw_default_config();
    LoraTrainer lt;
    lora_trainer_init(&lt, &m, &ad, &oc, B, N, G);
    AdamW *opt = &lt.opt;
    int32_t *tokens = (int32_t *)xmalloc(T * sizeof(int32_t)), *targets = (int32_t *)xmalloc(T * sizeof(int32_t)); /* [B, N] */
    for (size_t t = 0; t < T; t++) {
        tokens[t] = (int32_t)rng_below(&rng, (uint64_t)c.vocab_size);
        targets[t] = rng_uniform(&rng) < 0.1f ? IGNORE_INDEX : (int32_t)rng_below(&rng, (uint64_t)c.vocab_size);
    }
    /* the fp32 CPU step (02 + 03): what both GPU steps approximate */
    float **cpu = grad_copies_alloc(opt);
    lora_trainer_zero_grads(&lt);
    double loss_cpu = lora_trainer_accumulate(&lt, tokens, targets, B, N);
    for (size_t k = 0; k < opt->count; k++) memcpy(cpu[k], opt->params[k].grad, opt->params[k].numel * sizeof(float));
    GpuTrainer g;
    gpu_train_init(&g, &m, &ad, opt, 0);
    int keep = budget_case ? -1 : 1;

    /* the in-memory step, twice (the floor of run-to-run differences) */
    float **ref = grad_copies_alloc(opt), **again = grad_copies_alloc(opt), **off = grad_copies_alloc(opt);
    plan_or_die(&g, B, N, G, keep, 0, T, 0, -1);
    EXPECT(g.n_host == 0 && g.mlp_tile == T && g.n_pieces == 0, "%s: the reference keeps every layer input on the GPU (%zu on the host) and one MLP tile (%zu rows)",
           name, g.n_host, g.mlp_tile);
    TrainPlan in_memory = g.plan;
    double loss_ref = step(&g, opt, tokens, targets, ref);
    double loss_again = step(&g, opt, tokens, targets, again);
    const char *where;
    double floor_diff = worst_grad_diff(opt, again, ref, &where);
    printf("     %s: in-memory loss %.7f, again %.7f; gradients of two in-memory steps differ by %.2e (relative L2, worst %s)\n", name, loss_ref,
           loss_again, floor_diff, where);
    const char *where_cpu;
    double mem_vs_cpu = worst_grad_diff(opt, ref, cpu, &where_cpu);
    printf("     %s: in-memory step against the fp32 CPU step: loss %.7f vs %.7f, gradients within %.2e relative L2 (worst %s)\n", name, loss_ref,
           loss_cpu, mem_vs_cpu, where_cpu);
    gpu_train_unplan(&g);
    double used = gpu_train_used_bytes(); /* weights, context, the kernels' workspaces */

    /* the offloaded, tiled plan */
    if (budget_case) {
        /* what the tiled plan needs with everything on the GPU, less half a layer input: one
         * more than the two staging buffers must go to the host, three in all */
        TrainPlan tiled = in_memory;
        tiled.tile_policy = 0; tiled.host_policy = 0; tiled.gpu_avail = tiled.host_avail = 1e30;
        if (train_plan_decide(&c, &tiled) != 0) die("the tiled plan does not fit an unlimited budget");
        double budget = used + tiled.gpu_bytes + tp_margin - 0.5 * tiled.slot_bytes;
        plan_or_die(&g, B, N, G, -1, -1, 0, budget, -1);
        EXPECT(g.n_host == 3 && g.mlp_tile < T && g.plan.gpu_bytes + tp_margin <= budget - used,
               "%s: a budget half a layer input below the tiled in-memory plan puts %zu layer inputs on the host (3 expected), the MLP in tiles of "
               "%zu rows of %zu, %.1f KiB planned within the %.1f KiB allowed", name, g.n_host, g.mlp_tile, T, g.plan.gpu_bytes / 1024,
               (budget - used - tp_margin) / 1024);
    } else if (chunk) {
        plan_or_die(&g, B, N, G, 1, 2, 37, 0, chunk);
        size_t want = B * ((N / G + (size_t)chunk - 1) / (size_t)chunk + (N / G - 1 + (size_t)chunk - 1) / (size_t)chunk + 2); /* per sequence: the plain half, the shifted half's full groups and its two short ones */
        EXPECT(g.plan.attn_chunk == (size_t)chunk * G && g.n_pieces == want && g.n_host == 2 && g.n_keep_att == 1,
               "%s: attention in chunks of %zu rows (%zu), %zu pieces (%zu), 2 layer inputs on the host (%zu), one kept attention output (%d)", name,
               (size_t)chunk * G, g.plan.attn_chunk, want, g.n_pieces, g.n_host, g.n_keep_att);
    } else {
        plan_or_die(&g, B, N, G, 1, c.n_layers, 37, 0, -1);
        EXPECT(g.n_host == (size_t)c.n_layers && g.mlp_tile == 37 && g.n_keep_att == 1,
               "%s: every layer input on the host (%zu), MLP tiles of 37 rows (%zu), one layer keeps its attention output (%d)", name, g.n_host,
               g.mlp_tile, g.n_keep_att);
    }
    char line[1024];
    train_plan_describe(&c, &g.plan, line, sizeof line);
    printf("     %s: %s\n", name, line);
    /* Chunked, the halves' products and norm backwards add into dx one piece at a time, each
     * rounded to bf16: the gradients move by about 1e-2 from the in-memory step's (measured on
     * the H200: 1.11e-2 and 1.02e-2), while both stand 2.2-2.3e-2 from the fp32 CPU step's.
     * So there the test asks that the chunked step be as near the CPU's as the in-memory step
     * is (within 1.1x) and nearer the in-memory step than either is to the CPU (0.75x): a
     * wrong or missing piece moves a gradient by more than the bf16 rounding does. */
    double tol = chunk ? 0.75 * mem_vs_cpu : 1e-2;
    for (int s = 1; s <= 2; s++) {
        double loss = step(&g, opt, tokens, targets, off);
        double dl = fabs(loss - loss_ref) / fabs(loss_ref), dg = worst_grad_diff(opt, off, ref, &where);
        double dc = worst_grad_diff(opt, off, cpu, &where_cpu);
        printf("     %s, step %d: loss %.7f (relative difference %.1e), gradients within %.2e relative L2 (worst %s); against the CPU step %.2e (worst %s)\n",
               name, s, loss, dl, dg, where, dc, where_cpu);
        EXPECT(dl <= 1e-4 && dg <= tol && dc <= 1.1 * mem_vs_cpu,
               "%s, step %d: offloaded + tiled loss %.7f vs %.7f (relative %.1e, 1e-4), %zu gradients within %.2e relative L2 of the in-memory "
               "step's (%.2e; worst %s) and %.2e of the CPU step's (1.1 x the in-memory step's %.2e; worst %s)", name, s, loss, loss_ref, dl,
               opt->count, dg, tol, where, dc, mem_vs_cpu, where_cpu);
    }
    gpu_train_free(&g);
    grad_copies_free(opt, ref); grad_copies_free(opt, again); grad_copies_free(opt, off); grad_copies_free(opt, cpu);
    lora_trainer_free(&lt);
    lora_free(&ad);
    model_free(&m);
    free(tokens);
    free(targets);
}

/* A host budget too small for what the GPU budget leaves: one sentence naming both flags. */
static void test_neither_fits(void) {
    TinyTrainer t;
    tiny_trainer_init(&t, 2, 2, 3);
    tg_gpu_mem_budget = gpu_train_used_bytes() + 1.0 * TP_GIB; /* 1 GiB beside what is in use */
    tg_host_mem_budget = 0.5 * TP_GIB;
    size_t N = (size_t)1 << 22;
    int rc = gpu_train_plan(&t.g, 1, N, N / 4);
    tg_gpu_mem_budget = 0; tg_host_mem_budget = -1;
    EXPECT(rc == -1 && strstr(last_error(), "lower --ctx") && strstr(last_error(), "--gpu-mem") && strstr(last_error(), "--host-mem"),
           "neither budget fits: %s", rc ? last_error() : "(accepted)");
    tiny_trainer_free(&t);
}

int main(void) {
    if (!gpu_train_available()) {
        printf("test_gpu_train_offload: no GPU, skipped\n");
        return 77;
    }
    run_case("budget", LORA_DEFAULT_TARGETS, 1, 0, 300);
    run_case("all-host-tile37-all7", (1u << N_PROJ) - 1, 0, 0, 400);
    run_case("chunk1-all7", (1u << N_PROJ) - 1, 0, 1, 500);
    run_case("chunk2", LORA_DEFAULT_TARGETS, 0, 2, 600);
    test_neither_fits();
    printf("test_gpu_train_offload: %d checks, %d failed\n", g_checks, g_failures);
    return g_failures ? 1 : 0;
}
