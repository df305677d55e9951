/* test_gpu_train_resume.c: 05_train's runs on the GPU (--device gpu), end to end.
 *
 * A tiny random model written as a HF folder (config.json + model.safetensors; head_dim 64,
 * GQA 2:1, untied head, trained context 64 so --ctx 128 interpolates RoPE by 2), a random
 * token file, and the CLI run as a child process (this binary with --train):
 *   - resume: 10 steps straight vs 5 steps + --resume + 5 more, with batch 2, gradient
 *     accumulation 2, clipping and S2-Attn; the ten losses of the CSV logs must agree.
 *     The GPU sums some gradients with atomics (attention dQ, embedding and norm weight
 *     gradients), so two runs may differ in the last bits: the tolerance is 1e-5 relative,
 *     and the test prints whether they were bit-identical,
 *   - the losses go down over the run (the GPU step trains),
 *   - a non-finite loss (lr 1e20) stops the run with exit 1, naming the step and the last
 *     good checkpoint, and that checkpoint is still there,
 *   - --lr-scheduler cosine with --no-train-embed: the CSV's lr is transformers' cosine (the
 *     closed form), and the adapter and checkpoint carry the norms but no embed_tokens.
 * Without a GPU it exits 77.
 */
#define STAGE 0
#include "05_train.c"

#include <sys/wait.h>

#include "check.h"
#include "train_log.h"

static char g_tmp[256], g_self[1024];

static const char *tmp_path(char *buf, const char *name) {
    snprintf(buf, 512, "%s/%s", g_tmp, name);
    return buf;
}

/* Runs this binary with --train FLAGS, output to log; returns the exit status. */
static int run_training(const char *flags, const char *log) {
    char cmd[4096];
    snprintf(cmd, sizeof cmd, "'%s' --train %s > '%s' 2>&1", g_self, flags, log);
    int rc = system(cmd);
    return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

static int log_contains(const char *log, const char *what) {
    char *s = read_file(log, NULL);
    int found = s && strstr(s, what) != NULL;
    free(s);
    return found;
}

/* A tiny LLaMA as a HF folder the loader reads like any other. */
static void write_model(const char *dir) {
    Config c;
    memset(&c, 0, sizeof c);
    c.dim = 128; c.n_layers = 2; c.n_heads = 2; c.n_kv_heads = 1; c.head_dim = 64; c.ffn_dim = 200; c.vocab_size = 256;
    c.rms_eps = 1e-5f; c.rope_theta = 10000.0f; c.rope_config_factor = 1.0f; c.rope_factor = 1.0f; c.max_pos = 64;
    c.bos_id = 1; c.eos_id = 2;
    Model m;
    model_init_random(&m, &c, 11, 0.05f);
    CHECK(make_dir(dir) == 0, "%s", last_error());
    char path[600];
    snprintf(path, sizeof path, "%s/config.json", dir);
    FILE *f = fopen(path, "w");
    CHECK(f, "cannot write %s", path);
    fprintf(f, "{\"model_type\": \"llama\", \"architectures\": [\"LlamaForCausalLM\"], \"hidden_size\": 128, \"intermediate_size\": 200, "
               "\"num_hidden_layers\": 2, \"num_attention_heads\": 2, \"num_key_value_heads\": 1, \"vocab_size\": 256, "
               "\"max_position_embeddings\": 64, \"rms_norm_eps\": 1e-05, \"rope_theta\": 10000.0, \"tie_word_embeddings\": false, "
               "\"bos_token_id\": 1, \"eos_token_id\": 2}\n");
    fclose(f);
    size_t n = params_list(&m.w, &c, NULL);
    ParamRef *refs = (ParamRef *)xmalloc(n * sizeof(ParamRef));
    params_list(&m.w, &c, refs);
    StWriter sw = {0};
    for (size_t i = 0; i < n; i++) st_writer_add(&sw, refs[i].name, DT_F32, refs[i].ndim, refs[i].shape, refs[i].data);
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    CHECK(st_write(&sw, path) == 0, "%s", last_error());
    st_writer_free(&sw);
    free(refs);
    model_free(&m);
}

int main(int argc, char **argv) {
    if (argc > 1 && !strcmp(argv[1], "--train")) return train_main(argc - 1, argv + 1);
    if (!gpu_train_available()) {
        printf("test_gpu_train_resume: no GPU, skipped\n");
        return 77;
    }
    snprintf(g_self, sizeof g_self, "%s", argv[0]);
    snprintf(g_tmp, sizeof g_tmp, "build/tmp/gpu_train_resume.%d", (int)getpid());
    CHECK(make_dir("build") == 0 && make_dir("build/tmp") == 0 && make_dir(g_tmp) == 0, "%s", last_error());
    char model[512], data[512], a[512], b[512], c[512], log[512], flags[3000], path[700];
    write_model(tmp_path(model, "model"));
    Rng rng;
    rng_seed(&rng, (uint64_t)time(NULL));
    size_t T = 9 * 128 + 1 + rng_below(&rng, 100);
    int32_t *ids = (int32_t *)xmalloc(T * sizeof(int32_t)); /* [T] */
    for (size_t i = 0; i < T; i++) ids[i] = (int32_t)(i % 7 == 0 ? 10 : rng_below(&rng, 256)); /* something to learn */
    CHECK(tokfile_write(tmp_path(data, "data.tok"), ids, T, 256) == 0, "%s", last_error());
    free(ids);
    char common[1200];
    snprintf(common, sizeof common, "--model %s --data %s --device gpu --ctx 128 --batch 2 --grad-accum 2 --clip 0.5 --lr 2e-3 --warmup 2 --quiet",
             model, data);

    /* resume: 10 straight vs 5 + resume + 5 */
    tmp_path(a, "runA");
    tmp_path(b, "runB");
    snprintf(flags, sizeof flags, "%s --max-steps 10 --out %s", common, a);
    int rc = run_training(flags, tmp_path(log, "a.log"));
    EXPECT(rc == 0 && !log_contains(log, "on the CPU"), "straight run on the GPU exits %d (log %s)", rc, log);
    snprintf(flags, sizeof flags, "%s --max-steps 5 --out %s", common, b);
    rc = run_training(flags, tmp_path(log, "b1.log"));
    EXPECT(rc == 0, "first half exits %d (log %s)", rc, log);
    snprintf(flags, sizeof flags, "%s --max-steps 10 --out %s --resume %s", common, b, b);
    rc = run_training(flags, tmp_path(log, "b2.log"));
    EXPECT(rc == 0 && log_contains(log, "resumed from") && log_contains(log, "checkpoint-5"), "resume exits %d and says from where (log %s)", rc, log);
    double la[32], lb[32];
    snprintf(path, sizeof path, "%s/train_log.csv", a);
    int na = train_log_column(path, TRAIN_LOG_LOSS, la, 32);
    snprintf(path, sizeof path, "%s/train_log.csv", b);
    int nb = train_log_column(path, TRAIN_LOG_LOSS, lb, 32);
    double worst = 0;
    int identical = na == nb;
    for (int i = 0; i < na && i < nb; i++) {
        double rel = fabs(la[i] - lb[i]) / fabs(la[i]);
        if (!(rel <= worst)) worst = rel;
        if (la[i] != lb[i]) identical = 0;
        printf("     step %2d: straight %.9g resumed %.9g\n", i + 1, la[i], lb[i]);
    }
    EXPECT(na == 10 && nb == 10 && worst <= 1e-5, "10 straight vs 5 + resume + 5: %d and %d losses, worst relative difference %.2e (%s)", na, nb,
           worst, identical ? "bit-identical" : "not bit-identical: atomics");
    EXPECT(na == 10 && la[9] < la[0] - 0.05, "the loss goes down on the GPU: %.4f -> %.4f", la[0], na == 10 ? la[9] : 0.0);

    /* a non-finite loss stops the run and keeps the last good checkpoint */
    tmp_path(c, "runC");
    snprintf(flags, sizeof flags, "%s --max-steps 6 --save-every 1 --lr 1e20 --clip 0 --warmup 0 --out %s", common, c);
    rc = run_training(flags, tmp_path(log, "c.log"));
    char *text = read_file(log, NULL);
    const char *at = text ? strstr(text, "not finite at step ") : NULL;
    int step = at ? atoi(at + strlen("not finite at step ")) : -1;
    char ck[700];
    snprintf(ck, sizeof ck, "%s/checkpoint-%d/train_state.safetensors", c, step - 1);
    EXPECT(rc == 1 && step >= 2 && log_contains(log, "last good checkpoint") && file_exists(ck),
           "a non-finite loss stops with exit %d at step %d, naming the last good checkpoint (%s)", rc, step, file_exists(ck) ? ck : "missing");
    free(text);

    /* cosine after 2 warmup steps of 6, embed frozen: the lr the log shows, what the adapter holds */
    char d[512];
    tmp_path(d, "runD");
    snprintf(flags, sizeof flags, "%s --max-steps 6 --lr-scheduler cosine --no-train-embed --out %s", common, d);
    rc = run_training(flags, tmp_path(log, "d.log"));
    EXPECT(rc == 0 && !log_contains(log, "on the CPU"), "a cosine --no-train-embed run on the GPU exits %d (log %s)", rc, log);
    double lr[16], ld[16];
    snprintf(path, sizeof path, "%s/train_log.csv", d);
    int nl = train_log_column(path, TRAIN_LOG_LR, lr, 16), nd = train_log_column(path, TRAIN_LOG_LOSS, ld, 16), off = 0;
    for (int i = 0; i < nl; i++) { /* step i (0-based): 2e-3 * i / 2 in the warmup, then (1 + cos(pi (i - 2) / 4)) / 2 of it */
        double want = i < 2 ? 2e-3 * i / 2.0 : 2e-3 * 0.5 * (1.0 + cos(M_PI * (i - 2) / 4.0));
        off += fabs(lr[i] - want) > 1e-6 * 2e-3;
        printf("     step %d: lr %.9g (want %.9g), loss %.6f\n", i + 1, lr[i], want, i < nd ? ld[i] : NAN);
    }
    EXPECT(nl == 6 && off == 0, "the GPU run's lr follows the cosine schedule (%d rows, %d off)", nl, off);
    SafeTensors ad, st;
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", d);
    int ad_ok = st_open(&ad, path) == 0;
    snprintf(path, sizeof path, "%s/checkpoint-6/train_state.safetensors", d);
    int st_ok = st_open(&st, path) == 0;
    EXPECT(ad_ok && st_ok && !st_find(&ad, PEFT_PREFIX "model.embed_tokens.weight") && st_find(&ad, PEFT_PREFIX "model.norm.weight") &&
           !st_find(&st, "model.embed_tokens.weight") && st_find(&st, "model.norm.weight"),
           "--no-train-embed on the GPU: the adapter and the checkpoint carry the norms and no embed_tokens");
    if (ad_ok) st_close(&ad);
    if (st_ok) st_close(&st);
    printf("test_gpu_train_resume: %d checks, %d failed\n", g_checks, g_failures);
    return g_failures ? 1 : 0;
}
