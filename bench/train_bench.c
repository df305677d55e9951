/* bench/train_bench.c: tokens/s and peak GPU memory of the GPU training step (05_train_gpu.c)
 * at LongLoRA's benchmark recipe: a random-weight model of a preset shape (default
 * LLaMA-2-7B), batch 1, LoRA r=8 on q,k,v,o + embed + norms, S2-Attn (G = N/4), activation
 * checkpointing, AdamW; one warm-up step, then --steps timed steps (median) per length.
 *
 *   build/train_bench [--shape llama2-7b] [--ctx 8192,16384,32768,65536,100000] [--steps 3]
 *                     [--warmup 1] [--no-s2] [--gpu-mem GiB] [--host-mem GiB] [--out FILE.json]
 *
 * --gpu-mem and --host-mem plan the step for those budgets (05_plan.c): an 80 GB card's plan
 * runs, and is measured, on a bigger one. Each length prints the plan, and the planner's GPU
 * bytes (what was in use before + the plan) beside what cudaMemGetInfo says after the steps.
 *
 * The frozen weights are drawn straight into bf16 (an fp32 host copy of 7B is 27 GB); the
 * trainable tensors come from the host as in training. Peak memory is what cudaMemGetInfo
 * says is in use on the device after the steps (everything is allocated up front, the
 * kernels' workspaces on the first step), minus nothing: the CUDA context is included.
 * A length that does not fit is reported with the planner's sentence, not a crash.
 * Built by `make build/train_bench` (the 04 objects, cuBLAS), which bench/train_device.sh runs.
 */
#define STAGE 0
#include "05_train.c"
#include "05_train_gpu.c"

static int by_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* The results so far (rewritten after every length: a timeout keeps what finished). */
static void write_json(const char *out_path, const char *device, const char *shape, int s2, int steps, double weights_gib, char rows[][1400],
                       int n_rows) {
    if (!out_path) return;
    FILE *f = fopen(out_path, "w");
    if (!f) die("cannot write %s: %s", out_path, strerror(errno));
    fprintf(f, "{\n  \"impl\": \"ours (05_train_gpu.c)\",\n  \"device\": ");
    json_write_string(f, device);
    fprintf(f, ",\n  \"shape\": ");
    json_write_string(f, shape);
    fprintf(f, ",\n  \"recipe\": \"batch 1, bf16 frozen weights, LoRA r=8 alpha 16 on q,k,v,o + embed + norms (fp32 masters, AdamW), %s, "
               "per-layer activation checkpointing, chunked cross-entropy\",\n  \"steps_timed\": %d,\n  \"weights_gib\": %.3f,\n  \"results\": [\n",
            s2 ? "S2-Attn G=N/4" : "full attention", steps, weights_gib);
    for (int i = 0; i < n_rows; i++) fprintf(f, "%s%s\n", rows[i], i + 1 < n_rows ? "," : "");
    fprintf(f, "  ]\n}\n");
    fclose(f);
}

int main(int argc, char **argv) {
    const char *shape = "llama2-7b", *ctx_list = "8192,16384,32768,65536,100000", *out_path = NULL;
    int steps = 3, warmup = 1, s2 = 1;
    double gpu_mem_gib = 0, host_mem_gib = -1;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--shape") && i + 1 < argc) shape = argv[++i];
        else if (!strcmp(argv[i], "--ctx") && i + 1 < argc) ctx_list = argv[++i];
        else if (!strcmp(argv[i], "--steps") && i + 1 < argc) steps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--warmup") && i + 1 < argc) warmup = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--gpu-mem") && i + 1 < argc) gpu_mem_gib = need_double_arg("--gpu-mem", argv[++i], 1.0 / 1024, 1 << 20);
        else if (!strcmp(argv[i], "--host-mem") && i + 1 < argc) host_mem_gib = need_double_arg("--host-mem", argv[++i], 0, 1 << 20);
        else if (!strcmp(argv[i], "--out") && i + 1 < argc) out_path = argv[++i];
        else if (!strcmp(argv[i], "--no-s2")) s2 = 0;
        else die("train_bench: unknown argument '%s'", argv[i]);
    }
    if (steps < 1 || steps > 100) die("--steps must be 1..100");
    if (warmup < 0 || warmup > 10) die("--warmup must be 0..10");
    tg_gpu_mem_budget = gpu_mem_gib * TP_GIB;
    tg_host_mem_budget = host_mem_gib < 0 ? -1 : host_mem_gib * TP_GIB;
    const char *host_source = "--host-mem";
    double host_default = train_host_mem_default(&host_source);
    if (host_mem_gib >= 0) host_source = "--host-mem";
    char gpu_budget[64] = "what is free";
    if (gpu_mem_gib > 0) snprintf(gpu_budget, sizeof gpu_budget, "%.1f GiB (--gpu-mem)", gpu_mem_gib);
    fprintf(stderr, "train_bench: GPU budget %s; host budget %.2f GiB (%s)\n", gpu_budget, host_mem_gib >= 0 ? host_mem_gib : tg_gib(host_default),
            host_source);
    if (!gpu_train_available()) { printf("train_bench: no GPU\n"); return 77; }
    Config c;
    if (config_from_shape(shape, &c) != 0) die("%s", last_error());
    size_t D = (size_t)c.dim, V = (size_t)c.vocab_size;
    double used0 = gpu_train_used_bytes();
    double t0 = now_seconds();
    /* host model: only the trainable embed and norms are filled (the frozen fp32 arrays stay
     * untouched zero pages); the GPU draws the frozen weights itself */
    Model m;
    m.cfg = c;
    params_alloc(&m.w, &c);
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < V * D; i++) {
        uint64_t z = 0x1234567ull ^ i;
        m.w.embed[i] = 0.02f * ((float)(splitmix64(&z) >> 40) / 16777216.0f - 0.5f) * 3.4641016f;
    }
    for (int l = 0; l < c.n_layers; l++)
        for (size_t i = 0; i < D; i++) m.w.layers[l].attn_norm[i] = m.w.layers[l].mlp_norm[i] = 1.0f;
    for (size_t i = 0; i < D; i++) m.w.final_norm[i] = 1.0f;
    LoraConfig lc = lora_default_config();
    LoraAdapter ad;
    if (lora_init(&ad, &c, &lc) != 0) die("%s", last_error());
    Grads grads;
    lora_grads_alloc(&grads, &c);
    AdamW opt;
    memset(&opt, 0, sizeof opt);
    opt.cfg = adamw_default_config();
    opt.cfg.warmup_steps = 0;
    lora_register_params(&opt, &ad, &m, &grads);
    GpuTrainer g;
    gpu_train_init(&g, &m, &ad, &opt, 42);
    CUDA_CHECK(cudaDeviceSynchronize());
    struct cudaDeviceProp prop;
    CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    size_t n_trainable = 0;
    for (size_t k = 0; k < opt.count; k++) n_trainable += opt.params[k].numel;
    fprintf(stderr, "train_bench: %s on %s: %.2f GiB of weights and trainable state ready in %.1f s (%zu trainable values, %.2f GiB in use before)\n",
            shape, prop.name, tg_gib(g.weight_bytes), now_seconds() - t0, n_trainable, tg_gib(used0));

    char rows[64][1400];
    int n_rows = 0;
    char list[256];
    snprintf(list, sizeof list, "%s", ctx_list);
    printf("%-8s %-6s %12s %12s %10s %8s\n", "N", "attn", "tokens/s", "peak GiB", "step s", "loss");
    for (char *tok = strtok(list, ","); tok && n_rows < 64; tok = strtok(NULL, ",")) {
        size_t N = (size_t)strtoull(tok, NULL, 10), G = s2 ? N / 4 : 0;
        if (N == 0) continue;
        if (G && N % G) { G = 0; }
        g.cfg.rope_factor = N > (size_t)c.max_pos ? (float)ceil((double)N / c.max_pos) : 1.0f; /* position interpolation */
        double used_before = gpu_train_used_bytes();
        double t_plan = now_seconds();
        if (gpu_train_plan(&g, 1, N, G) != 0) {
            printf("%-8zu %-6s does not fit: %s\n", N, G ? "S2" : "full", last_error());
            char msg[1100];
            snprintf(msg, sizeof msg, "%s", last_error());
            for (char *q = msg; *q; q++) if (*q == '"' || *q == '\\') *q = '\'';
            snprintf(rows[n_rows++], sizeof rows[0], "    {\"N\": %zu, \"s2_group\": %zu, \"fits\": false, \"error\": \"%s\"}", N, G, msg);
            write_json(out_path, prop.name, shape, s2, steps, tg_gib(g.weight_bytes), rows, n_rows);
            continue;
        }
        t_plan = now_seconds() - t_plan;
        char plan_line[1024];
        train_plan_describe(&g.cfg, &g.plan, plan_line, sizeof plan_line);
        fprintf(stderr, "train_bench: %s (allocated in %.1f s)\n", plan_line, t_plan);
        int32_t *tokens = (int32_t *)xmalloc(N * sizeof(int32_t)), *targets = (int32_t *)xmalloc(N * sizeof(int32_t)); /* [N] */
        Rng r;
        rng_seed(&r, N);
        for (size_t i = 0; i < N; i++) tokens[i] = (int32_t)rng_below(&r, (uint64_t)V);
        for (size_t i = 0; i + 1 < N; i++) targets[i] = tokens[i + 1];
        targets[N - 1] = IGNORE_INDEX;
        double times[101], loss = 0, fwd_bwd_s = 0;
        for (int s = 1 - warmup; s <= steps; s++) {
            CUDA_CHECK(cudaDeviceSynchronize());
            double a = now_seconds();
            gpu_train_zero_grads(&g);
            loss = gpu_train_forward_backward(&g, tokens, targets);
            CUDA_CHECK(cudaDeviceSynchronize());
            double b = now_seconds();
            double norm = gpu_train_grad_norm(&g, 1.0);
            gpu_train_adamw(&g, &opt, opt.cfg.lr, 1.0f);
            CUDA_CHECK(cudaDeviceSynchronize());
            if (s > 0) times[s] = now_seconds() - a;
            if (s > 0) fwd_bwd_s += (b - a) / steps;
            if (!isfinite(loss) || !isfinite(norm)) die("train_bench: non-finite loss %g or gradient norm %g at N=%zu", loss, norm, N);
        }
        double peak = gpu_train_used_bytes(), planned = used_before + g.plan.gpu_bytes;
        fprintf(stderr, "train_bench: N=%zu GPU memory planned %.2f GiB (%.2f in use before + %.2f planned), cudaMemGetInfo %.2f GiB in use: %+.1f%%\n",
                N, tg_gib(planned), tg_gib(used_before), tg_gib(g.plan.gpu_bytes), tg_gib(peak), 100.0 * (peak - planned) / planned);
        qsort(times + 1, (size_t)steps, sizeof(double), by_double);
        double median = times[1 + steps / 2], tps = (double)N / median;
        printf("%-8zu %-6s %12.0f %12.2f %10.3f %8.4f  (%d layers keep their attention output; %zu layer inputs in %.2f GiB of host memory; "
               "MLP tile %zu; attention chunk %zu)\n", N, G ? "S2" : "full", tps, tg_gib(peak), median, loss, g.n_keep_att, g.n_host, tg_gib(g.plan.ckpt_host_bytes),
               g.mlp_tile, g.plan.attn_chunk);
        fflush(stdout);
        snprintf(rows[n_rows++], sizeof rows[0],
                 "    {\"N\": %zu, \"s2_group\": %zu, \"fits\": true, \"tokens_per_s\": %.1f, \"step_s_median\": %.4f, \"fwd_bwd_s_mean\": %.4f, "
                 "\"peak_gib_device_used\": %.3f, \"planned_activation_gib\": %.3f, \"planned_gib_device_used\": %.3f, \"gpu_mem_budget_gib\": %.1f, "
                 "\"host_pinned_gib\": %.3f, \"layer_inputs_on_host\": %zu, \"mlp_tile\": %zu, \"attention_chunk\": %zu, \"layers_keeping_attention_output\": %d, "
                 "\"loss\": %.5f}",
                 N, G, tps, median, fwd_bwd_s, tg_gib(peak), tg_gib(g.act_bytes), tg_gib(planned), gpu_mem_gib, tg_gib(g.plan.ckpt_host_bytes), g.n_host,
                 g.mlp_tile, g.plan.attn_chunk, g.n_keep_att, loss);
        free(tokens);
        free(targets);
        gpu_train_unplan(&g);
        gpu_layers_free(); /* the next length starts without this one's workspaces */
        write_json(out_path, prop.name, shape, s2, steps, tg_gib(g.weight_bytes), rows, n_rows);
    }
    gpu_train_free(&g);
    adamw_free(&opt);
    params_free(&grads);
    lora_free(&ad);
    model_free(&m);
    return 0;
}
