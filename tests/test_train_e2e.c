/* test_train_e2e.c: 05_train end to end on the CPU, as a user runs it.
 *
 * A tiny LLaMA (--init random --shape tiny: D 64, L 2, H 4, Hk 2, V 256, tied head) is
 * fine-tuned with LoRA+ and S2-Attn for 40 steps on packed English text (the GPL-3 text
 * a Debian/Ubuntu machine ships, else a generated text), one byte per token. Checks:
 * the run succeeds; the training loss falls clearly (the mean of the last 5 steps at least
 * 1.5 nats under the mean of the first 3; a random model starts near ln 256 = 5.55); the
 * output folder is a PEFT adapter (adapter_config.json with r 8, alpha 16, q,k,v,o) that
 * 03's loader reads back into the same base model; and with it the loss on held-out text
 * (the last tenth, never trained on, full causal attention as in evaluation) is at least
 * 1 nat lower than the base model's.
 */
#define STAGE 0
#include "05_train.c"
#include "check.h"
#include "split_args.h"
#include "train_log.h"
#pragma GCC diagnostic ignored "-Wformat-truncation" /* scratch paths are short */

/* Some English when the machine has no licence texts: sentences from a small grammar. */
static char *generated_text(size_t *len) {
    static const char *subj[] = {"the model", "a student", "the program", "every reader", "the kernel", "our team"};
    static const char *verb[] = {"reads", "writes", "checks", "trains", "learns", "computes", "saves"};
    static const char *obj[] = {"the weights", "a long text", "each token", "the gradient", "its own loss", "the adapter"};
    static const char *tail[] = {" every day", " with care", " on the CPU", "", " before lunch", " again"};
    Rng r;
    rng_seed(&r, 2024);
    size_t cap = 40000, n = 0;
    char *s = (char *)xmalloc(cap + 128);
    while (n < cap)
        n += (size_t)sprintf(s + n, "%s %s %s%s. ", subj[rng_below(&r, 6)], verb[rng_below(&r, 7)], obj[rng_below(&r, 6)], tail[rng_below(&r, 6)]);
    *len = n;
    return s;
}

int main(void) {
    double t0 = now_seconds();

    /* text -> byte tokens: 90% to train on, the last 10% held out */
    const char *source = "/usr/share/common-licenses/GPL-3";
    size_t len = 0;
    char *text = file_exists(source) ? read_file(source, &len) : NULL;
    if (!text || len < 20000) { free(text); text = generated_text(&len); source = "a generated text"; }
    int32_t *ids = (int32_t *)xmalloc(len * sizeof(int32_t));
    for (size_t i = 0; i < len; i++) ids[i] = (unsigned char)text[i];
    size_t n_train = len / 10 * 9;
    char dir[256], data[512], out[512], path[600];
    snprintf(dir, sizeof dir, "%s/test_train_e2e_XXXXXX", file_exists("build") ? "build" : ".");
    if (!mkdtemp(dir)) die("cannot create a scratch folder %s: %s", dir, strerror(errno));
    snprintf(data, sizeof data, "%s/train.tok", dir);
    snprintf(out, sizeof out, "%s/out", dir);
    CHECK(tokfile_write(data, ids, n_train, 256) == 0, "%s", last_error());
    printf("text: %s, %zu bytes (%zu to train on)\n", source, len, n_train);

    /* the run, exactly as from the command line */
    char argbuf[2048];
    snprintf(argbuf, sizeof argbuf,
             "05_train --init random --shape tiny --data %s --ctx 128 --batch 4 --max-steps 40 --lr 3e-3 --warmup 5 --seed 7 --log-every 10 --out %s",
             data, out);
    char *argv[64];
    int argc = split_args(argbuf, argv, 64);
    int rc = train_main(argc, argv);
    EXPECT(rc == 0, "training exits %d", rc);

    /* the loss curve from the CSV log */
    double loss[64];
    int steps = train_log_column(path_join(path, sizeof path, out, "train_log.csv"), TRAIN_LOG_LOSS, loss, 64);
    EXPECT(steps == 40, "the log holds %d steps, want 40", steps);
    if (steps == 40) {
        double first = (loss[0] + loss[1] + loss[2]) / 3, last = 0;
        for (int i = 35; i < 40; i++) last += loss[i] / 5;
        int finite = 1;
        for (int i = 0; i < 40; i++) finite &= isfinite(loss[i]);
        printf("training loss: first 3 steps %.3f, last 5 steps %.3f\n", first, last);
        EXPECT(finite, "a loss is not finite");
        EXPECT(first > 5.0 && first < 6.0, "a random tiny model should start near ln 256 = 5.55, got %.3f", first);
        EXPECT(last < first - 1.5, "the loss did not fall clearly: %.3f -> %.3f (want a drop of 1.5 nats)", first, last);
    }

    /* the output folder is a PEFT adapter that loads back into the same base model */
    Json *cfg = json_parse_file(path_join(path, sizeof path, out, "adapter_config.json"));
    EXPECT(cfg && json_get_number(cfg, "r", 0) == 8 && json_get_number(cfg, "lora_alpha", 0) == 16 &&
            !strcmp(json_get_string(cfg, "peft_type", ""), "LORA"), "adapter_config.json: r 8, alpha 16, LORA");
    const Json *targets = json_get_type(cfg, "target_modules", JSON_ARRAY);
    EXPECT(targets && targets->count == 4, "the adapter targets q,k,v,o");
    json_free(cfg);
    Model base, tuned;
    CHECK(model_init_shape(&base, "tiny", NULL, 128, 7) == 0, "%s", last_error());
    CHECK(model_init_shape(&tuned, "tiny", NULL, 128, 7) == 0, "%s", last_error());
    LoraAdapter ad;
    rc = lora_load_adapter(&ad, &tuned, out);
    EXPECT(rc == 0, "03's loader refuses the adapter: %s", last_error());
    if (rc == 0) {
        /* held-out loss, full causal attention, windows of 128 */
        const size_t N = 128;
        size_t n_held = len - n_train, windows = (n_held - 1) / N;
        Activations act;
        act_plan(&act, &base.cfg, 1, N, 0);
        int32_t *tg = (int32_t *)xmalloc(N * sizeof(int32_t));
        RunOptions with = {0, 0, &ad.hook};
        ad.training = 0;
        double base_loss = 0, tuned_loss = 0;
        for (size_t w = 0; w < windows; w++) {
            const int32_t *in = ids + n_train + w * N;
            for (size_t t = 0; t < N; t++) tg[t] = in[t + 1];
            base_loss += model_forward(&base, &act, in, tg, 1, N, NULL) / (double)windows;
            tuned_loss += model_forward(&tuned, &act, in, tg, 1, N, &with) / (double)windows;
        }
        printf("held-out loss (%zu windows of %zu): base %.3f, fine-tuned %.3f\n", windows, N, base_loss, tuned_loss);
        EXPECT(windows >= 4, "too little held-out text");
        EXPECT(tuned_loss < base_loss - 1.0, "the adapter does not help on held-out text: %.3f vs base %.3f", tuned_loss, base_loss);
        free(tg);
        act_free(&act);
        lora_free(&ad);
    }
    model_free(&base);
    model_free(&tuned);
    free(ids);
    free(text);
    if (g_failures == 0) {
        char cmd[600];
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
        if (system(cmd) != 0) printf("note: could not remove %s\n", dir);
    }
    printf("test_train_e2e: %s (%.1f s)\n", g_failures ? "FAILED" : "loss falls, adapter loads and helps on held-out text", now_seconds() - t0);
    return g_failures ? 1 : 0;
}
