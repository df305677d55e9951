/* test_train_ref.c: 05_train's training steps against transformers + peft + torch AdamW.
 *
 * tests/ref/make_train_fixtures.py ran LongLoRA's recipe in float64 on a tiny LLaMA (tied
 * head, GQA, bf16 weights on disk) from a given peft adapter: RoPE interpolation (factor 2),
 * S2-Attn (N 92, G 23, an explicit per-head mask), LoRA on q,k,v,o plus trainable embed and
 * norms, AdamW (0.9, 0.95, eps 1e-8, weight decay 0.1 but not on norms), lr 5e-3 with 3 warmup
 * steps (HF's constant_with_warmup: the first step has lr 0), 2 accumulated micro-batches,
 * gradient clipping at 1.0, 8 steps. Here the same run goes through 05_train's command line
 * (--model, --adapter, --data token file) and must match, step by step:
 *   loss           |ours - ref| <= 1e-5
 *   grad norm      |ours - ref| <= 1e-5 |ref|   (before clipping; clipping is active: norms ~2)
 *   lr             |ours - ref| <= 1e-6 |ref| + 1e-12
 * and after the last step every trainable tensor (LoRA A and B, embed_tokens, each norm) in
 * the checkpoint must match the reference's: max |ours - ref| <= 2e-5 (the updates are ~5e-3
 * per step, so a missed or wrong step, decay or clip shows up at once).
 * Our fp32 against the reference's float64 sets the tolerances.
 */
#define STAGE 0
#include "05_train.c"
#include "check.h"
#include "split_args.h"

#define FIX "tests/fixtures/train"

static int read_exact(FILE *f, void *p, size_t n) { return fread(p, 1, n, f) == n; }

int main(void) {
    double t0 = now_seconds();
    if (!file_exists(FIX "/ref.bin")) {
        printf("skip: %s/ref.bin is missing (python tests/ref/make_train_fixtures.py writes it)\n", FIX);
        return 77;
    }
    /* the reference */
    FILE *f = fopen(FIX "/ref.bin", "rb");
    CHECK(f, "cannot open " FIX "/ref.bin");
    char magic[4];
    uint32_t version = 0, steps = 0, count = 0;
    CHECK(read_exact(f, magic, 4) && !memcmp(magic, "TRFX", 4) && read_exact(f, &version, 4) && version == 1 && read_exact(f, &steps, 4) &&
          steps > 0 && steps < 1000, FIX "/ref.bin: bad header");
    double *ref = (double *)xmalloc(3 * steps * sizeof(double)); /* loss, grad norm, lr */
    CHECK(read_exact(f, ref, 3 * steps * sizeof(double)) && read_exact(f, &count, 4) && count < 10000, FIX "/ref.bin: truncated");
    char **names = (char **)xcalloc(count, sizeof(char *));
    float **values = (float **)xcalloc(count, sizeof(float *));
    size_t *numels = (size_t *)xcalloc(count, sizeof(size_t));
    for (uint32_t i = 0; i < count; i++) {
        uint32_t len = 0;
        uint64_t numel = 0;
        CHECK(read_exact(f, &len, 4) && len < 256, FIX "/ref.bin: bad name");
        names[i] = (char *)xcalloc(len + 1, 1);
        CHECK(read_exact(f, names[i], len) && read_exact(f, &numel, 8) && numel < (1u << 26), FIX "/ref.bin: bad tensor");
        numels[i] = (size_t)numel;
        values[i] = (float *)xmalloc(numels[i] * sizeof(float));
        CHECK(read_exact(f, values[i], numels[i] * sizeof(float)), FIX "/ref.bin: truncated tensor");
    }
    fclose(f);

    /* our run, from the command line */
    char dir[256], argbuf[1024];
    snprintf(dir, sizeof dir, "%s/test_train_ref_XXXXXX", file_exists("build") ? "build" : ".");
    if (!mkdtemp(dir)) die("cannot create a scratch folder %s: %s", dir, strerror(errno));
    snprintf(argbuf, sizeof argbuf,
             "05_train --model " FIX "/model --adapter " FIX "/adapter_init --data " FIX "/data.tok --ctx 92 --group-ratio 0.25 "
             "--batch 1 --grad-accum 2 --clip 1.0 --lr 5e-3 --warmup 3 --weight-decay 0.1 --betas 0.9,0.95 --eps 1e-8 "
             "--max-steps %u --quiet --out %s/out", steps, dir);
    char *argv[64];
    int argc = split_args(argbuf, argv, 64);
    int rc = train_main(argc, argv);
    EXPECT(rc == 0, "training exits %d", rc);

    /* step by step: the CSV log */
    char path[600];
    snprintf(path, sizeof path, "%s/out/train_log.csv", dir);
    char *csv = read_file(path, NULL);
    CHECK(csv, "%s", last_error());
    uint32_t seen = 0;
    double worst_loss = 0, worst_norm = 0;
    printf("step  loss (ours / reference)      grad norm (ours / reference)   lr\n");
    for (char *line = strchr(csv, '\n'); line && line[1]; line = strchr(line + 1, '\n')) {
        int step;
        double loss, lr, norm;
        if (sscanf(line + 1, "%d,%lf,%lf,%lf", &step, &loss, &lr, &norm) != 4 || step != (int)seen + 1 || seen >= steps) { EXPECT(0, "bad CSV line"); break; }
        double rl = ref[seen], rn = ref[steps + seen], rlr = ref[2 * steps + seen];
        printf("%4d  %.6f / %.6f        %.6f / %.6f         %.2e\n", step, loss, rl, norm, rn, lr);
        EXPECT(fabs(loss - rl) <= 1e-5, "step %d: loss %.7f, reference %.7f", step, loss, rl);
        EXPECT(fabs(norm - rn) <= 1e-5 * fabs(rn), "step %d: grad norm %.7f, reference %.7f", step, norm, rn);
        EXPECT(fabs(lr - rlr) <= 1e-6 * fabs(rlr) + 1e-12, "step %d: lr %.9g, reference %.9g", step, lr, rlr);
        if (fabs(loss - rl) > worst_loss) worst_loss = fabs(loss - rl);
        if (fabs(norm - rn) / rn > worst_norm) worst_norm = fabs(norm - rn) / rn;
        seen++;
    }
    free(csv);
    EXPECT(seen == steps, "the log has %u steps, want %u", seen, steps);

    /* the trainable tensors after the last step (our checkpoint's fp32 master copies) */
    snprintf(path, sizeof path, "%s/out/checkpoint-%u/train_state.safetensors", dir, steps);
    SafeTensors st;
    double worst_tensor = 0;
    const char *worst_name = "";
    if (st_open(&st, path) != 0) EXPECT(0, "%s", last_error());
    else {
        for (uint32_t i = 0; i < count; i++) {
            const StTensor *t = st_find(&st, names[i]);
            EXPECT(t && t->dtype == DT_F32 && t->numel == numels[i], "tensor %s missing or of another size in our checkpoint", names[i]);
            if (!t || t->numel != numels[i]) continue;
            const float *ours = (const float *)t->data;
            double d = 0;
            for (size_t k = 0; k < numels[i]; k++) d = fmax(d, fabs((double)ours[k] - values[i][k]));
            EXPECT(d <= 2e-5, "%s: max |ours - reference| = %.3g", names[i], d);
            if (d > worst_tensor) { worst_tensor = d; worst_name = names[i]; }
        }
        size_t ours_params = 0;
        for (size_t k = 0; k < st.count; k++) ours_params += strstr(st.tensors[k].name, ".exp_avg") == NULL && strcmp(st.tensors[k].name, "data.order") != 0;
        EXPECT(ours_params == count, "we train %zu tensors, the reference %u", ours_params, count);
        st_close(&st);
    }
    printf("worst: loss %.2e, grad norm %.2e relative, tensor %.2e (%s)\n", worst_loss, worst_norm, worst_tensor, worst_name);
    for (uint32_t i = 0; i < count; i++) { free(names[i]); free(values[i]); }
    free(names); free(values); free(numels); free(ref);
    if (g_failures == 0) {
        char cmd[600];
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
        if (system(cmd) != 0) printf("note: could not remove %s\n", dir);
    }
    printf("test_train_ref: %u steps %s transformers + peft + torch AdamW (%.1f s)\n", steps, g_failures ? "DIFFER from" : "match", now_seconds() - t0);
    return g_failures ? 1 : 0;
}
