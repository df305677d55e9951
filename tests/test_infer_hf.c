/* tests/test_infer_hf.c: 06_infer.c against HF transformers + peft (tests/fixtures/infer,
 * written by tests/ref/make_infer_fixtures.py).
 *
 *  1. perplexity by LongLoRA's protocol on a tiny GQA model with a LoRA adapter on all seven
 *     projections, at ctx 64 over a trained 32 (RoPE linear factor 2), seq_len 24 and 64,
 *     stride 16: every window's loss (1e-5 relative) and the PPL (1e-4 relative) equal
 *     transformers' (float64), with the adapter applied through the hook and merged;
 *  2. export: the folder we write from base + adapter is byte-identical (FNV-1a 64 of every
 *     file) to the one transformers loaded when the fixture was made, and 02's loader reading
 *     it gives transformers' logits for it (1e-4 relative max-norm).
 *  3. Qwen2 + yarn (tests/fixtures/qwen2_peft, tests/ref/make_qwen2_peft_fixtures.py): the
 *     adapter our 05_train wrote at --ctx 64 --rope-scaling yarn over a trained 32: its
 *     config.json gives yarn factor 2; base + adapter (applied and merged) give the logits
 *     transformers + peft computed from that folder (1e-4); saving it again writes the same
 *     three files peft read; the bf16 export is the folder transformers loaded (same files,
 *     its logits to 1e-4, config yarn factor 2 over max_position_embeddings 32).
 */
#define STAGE 0
#include "../06_infer.c"

#include "check.h"
#include "fixture.h"

#define FIX "tests/fixtures/infer"

static uint64_t fnv1a64_file(const char *path) {
    size_t len;
    char *data = read_file(path, &len);
    if (!data) return 0;
    uint64_t h = 0xCBF29CE484222325ull;
    for (size_t i = 0; i < len; i++) { h ^= (uint8_t)data[i]; h *= 0x100000001B3ull; }
    free(data);
    return h;
}

static void check_ppl(const Fixture *fx, const int32_t *tokens, size_t n_tokens, int merged) {
    Model m;
    if (model_try_load(&m, FIX "/base", 64) != 0) die("%s", last_error());
    EXPECT(m.cfg.rope_factor == 2.0f, "rope factor %g at ctx 64", (double)m.cfg.rope_factor);
    LoraAdapter ad;
    if (lora_load_adapter(&ad, &m, FIX "/adapter") != 0) die("%s", last_error());
    ad.training = 0;
    if (merged) lora_merge(&ad, &m);
    Engine e;
    engine_init(&e, &m, merged ? NULL : &ad.hook, 64, 0);
    size_t lens[2] = {24, 64};
    for (int k = 0; k < 2; k++) {
        char name[64];
        snprintf(name, sizeof name, "window_loss_%zu", lens[k]);
        const FxTensor *ref = fx_get(fx, name);
        snprintf(name, sizeof name, "ppl_%zu", lens[k]);
        const FxTensor *ref_ppl = fx_get(fx, name);
        if (!ref || !ref_ppl) die("fixture lacks %s", name);
        size_t *starts;
        size_t count = ppl_window_starts(n_tokens, lens[k], 16, &starts);
        EXPECT(count == ref->numel, "seq_len %zu: %zu windows, transformers ran %zu", lens[k], count, ref->numel);
        double worst = 0;
        for (size_t w = 0; w < count && w < ref->numel; w++) {
            double got = engine_window_loss(&e, tokens + starts[w], lens[k]), want = (ref->d)[w];
            double err = fabs(got - want) / fabs(want);
            if (err > worst) worst = err;
        }
        EXPECT(worst <= 1e-5, "seq_len %zu (%s): window loss off by %.3g relative", lens[k], merged ? "merged" : "applied", worst);
        PplRow r = perplexity(&e, tokens, n_tokens, lens[k], 16, 0);
        double want = (ref_ppl->d)[0];
        EXPECT(fabs(r.ppl - want) <= 1e-4 * want, "seq_len %zu (%s): PPL %.6f, transformers %.6f", lens[k], merged ? "merged" : "applied", r.ppl, want);
        printf("ppl seq_len %zu (%s): ours %.6f, transformers %.6f (%zu windows, worst window loss %.1e relative)\n", lens[k],
               merged ? "merged" : "applied", r.ppl, want, r.windows, worst);
        free(starts);
    }
    engine_free(&e);
    lora_free(&ad);
    model_free(&m);
}

static void check_export(const Fixture *fx, const int32_t *tokens) {
    Model m;
    if (model_try_load(&m, FIX "/base", 64) != 0) die("%s", last_error());
    LoraAdapter ad;
    if (lora_load_adapter(&ad, &m, FIX "/adapter") != 0) die("%s", last_error());
    lora_merge(&ad, &m);
    char dir[] = "/tmp/test_infer_hf_XXXXXX";
    if (!mkdtemp(dir)) die("mkdtemp: %s", strerror(errno));
    char out[256], path[512];
    snprintf(out, sizeof out, "%s/merged", dir);
    EXPECT(export_merged(&m, FIX "/base", out, 20000, DT_BF16, 0) == 0, "export: %s", last_error());
    size_t n_files = 0;
    for (size_t k = 0; k < fx->count; k++) {
        if (strncmp(fx->t[k].name, "hash:", 5) != 0) continue;
        n_files++;
        snprintf(path, sizeof path, "%s/%s", out, fx->t[k].name + 5);
        const uint32_t *hw = (const uint32_t *)fx->t[k].i;
        uint64_t want = (uint64_t)hw[0] | ((uint64_t)hw[1] << 32);
        EXPECT(file_exists(path) && fnv1a64_file(path) == want, "exported %s differs from the file transformers loaded", fx->t[k].name + 5);
    }
    EXPECT(n_files >= 4, "the fixture names %zu exported files (shards, index, config)", n_files);
    Model back;
    EXPECT(model_try_load(&back, out, 0) == 0, "reload: %s", last_error());
    const FxTensor *ref = fx_get(fx, "export_logits");
    if (!ref) die("fixture lacks export_logits");
    size_t N = 40, V = (size_t)back.cfg.vocab_size;
    EXPECT(ref->numel == N * V, "export_logits has %zu values", ref->numel);
    Activations act;
    act_plan(&act, &back.cfg, 1, N, 0);
    model_forward(&back, &act, tokens, NULL, 1, N, NULL);
    double num = 0, den = 0;
    for (size_t i = 0; i < N * V && i < ref->numel; i++) {
        double want = (ref->d)[i];
        num = fmax(num, fabs(act.logits[i] - want));
        den = fmax(den, fabs(want));
    }
    EXPECT(num / den <= 1e-4, "the exported model's logits differ from transformers' by %.3g relative", num / den);
    printf("export: %zu files identical to what transformers loaded; logits %.2e relative to transformers'\n", n_files, num / den);
    act_free(&act);
    model_free(&back);
    snprintf(path, sizeof path, "rm -rf '%s'", dir);
    EXPECT(system(path) == 0, "cleanup");
    lora_free(&ad);
    model_free(&m);
}

/* Max-norm relative distance of logits [n] from ref (f64 [n]). */
static double rel_to(const float *logits, const FxTensor *ref, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n && i < ref->numel; i++) {
        double want = (ref->d)[i];
        num = fmax(num, fabs(logits[i] - want));
        den = fmax(den, fabs(want));
    }
    return ref->numel == n ? num / den : INFINITY;
}
/* Every hash:<prefix><name> of the fixture against the file <dir>/<name>; returns how many. */
static size_t check_hashes(const Fixture *fx, const char *prefix, const char *dir) {
    size_t n = 0;
    for (size_t k = 0; k < fx->count; k++) {
        const char *name = fx->t[k].name;
        if (strncmp(name, "hash:", 5) != 0 || strncmp(name + 5, prefix, strlen(prefix)) != 0) continue;
        name += 5 + strlen(prefix);
        if (!*prefix && strchr(name, '/')) continue;
        char path[512];
        snprintf(path, sizeof path, "%s/%s", dir, name);
        const uint32_t *hw = (const uint32_t *)fx->t[k].i;
        uint64_t want = (uint64_t)hw[0] | ((uint64_t)hw[1] << 32);
        EXPECT(file_exists(path) && fnv1a64_file(path) == want, "%s: %s differs from the file peft/transformers read", dir, name);
        n++;
    }
    return n;
}

#define QFIX "tests/fixtures/qwen2_peft"
static void check_qwen2_yarn(void) {
    Fixture fx;
    if (fx_load(&fx, QFIX "/ref.bin", "INFX") != 0) die("%s", last_error());
    const FxTensor *tok = fx_get(&fx, "tokens"), *peft = fx_get(&fx, "peft_logits"), *exp = fx_get(&fx, "export_logits");
    if (!tok || !peft || !exp) die(QFIX "/ref.bin lacks tokens, peft_logits or export_logits");
    const int32_t *tokens = tok->i;
    size_t N = tok->numel;
    Model m;
    if (model_try_load(&m, QFIX "/base", 0) != 0 || lora_adapter_rope(QFIX "/adapter", &m.cfg, 0) != 0) die("%s", last_error());
    EXPECT(m.cfg.arch == ARCH_QWEN2 && m.cfg.qkv_bias && m.cfg.rope_type == ROPE_YARN && m.cfg.rope_factor == 2.0f && config_context(&m.cfg) == 64,
           "the adapter's config.json: arch %d bias %d rope %s factor %g context %zu (want qwen2, biases, yarn 2, 64)", m.cfg.arch, m.cfg.qkv_bias,
           ROPE_TYPE_NAMES[m.cfg.rope_type], (double)m.cfg.rope_factor, config_context(&m.cfg));
    LoraAdapter ad;
    if (lora_load_adapter(&ad, &m, QFIX "/adapter") != 0) die("%s", last_error());
    size_t V = (size_t)m.cfg.vocab_size;
    Activations act;
    act_plan(&act, &m.cfg, 1, N, 0);
    RunOptions ro = {0, 0, &ad.hook};
    model_forward(&m, &act, tokens, NULL, 1, N, &ro);
    double e_applied = rel_to(act.logits, peft, N * V);
    EXPECT(e_applied <= 1e-4, "qwen2 + yarn, adapter applied: logits differ from peft's by %.3g relative", e_applied);
    char dir[] = "/tmp/test_infer_hf_qwen2_XXXXXX", out[256], cmd[512];
    if (!mkdtemp(dir)) die("mkdtemp: %s", strerror(errno));
    snprintf(out, sizeof out, "%s/adapter", dir);
    EXPECT(lora_save_adapter(&ad, &m, out, QFIX "/base") == 0, "save: %s", last_error());
    size_t n_adapter = check_hashes(&fx, "adapter/", out);
    EXPECT(n_adapter == 3, "the fixture names %zu adapter files (want adapter_config.json, adapter_model.safetensors, config.json)", n_adapter);
    lora_merge(&ad, &m);
    model_forward(&m, &act, tokens, NULL, 1, N, NULL);
    double e_merged = rel_to(act.logits, peft, N * V);
    EXPECT(e_merged <= 1e-4, "qwen2 + yarn, adapter merged: logits differ from peft's by %.3g relative", e_merged);
    snprintf(out, sizeof out, "%s/merged", dir);
    EXPECT(export_merged(&m, QFIX "/base", out, 20000, DT_BF16, 0) == 0, "export: %s", last_error());
    size_t n_export = check_hashes(&fx, "", out);
    EXPECT(n_export >= 4, "the fixture names %zu exported files (shards, index, config)", n_export);
    Model back;
    EXPECT(model_try_load(&back, out, 0) == 0, "reload: %s", last_error());
    EXPECT(back.cfg.rope_type == ROPE_YARN && back.cfg.rope_factor == 2.0f && back.cfg.max_pos == 32 && back.cfg.qkv_bias,
           "the export reloads as rope %s factor %g, max_position_embeddings %d, biases %d", ROPE_TYPE_NAMES[back.cfg.rope_type],
           (double)back.cfg.rope_factor, back.cfg.max_pos, back.cfg.qkv_bias);
    Activations a2;
    act_plan(&a2, &back.cfg, 1, N, 0);
    model_forward(&back, &a2, tokens, NULL, 1, N, NULL);
    double e_export = rel_to(a2.logits, exp, N * V);
    EXPECT(e_export <= 1e-4, "the exported Qwen2's logits differ from transformers' by %.3g relative", e_export);
    printf("qwen2 + yarn: adapter applied %.2e, merged %.2e from peft's logits; %zu adapter files and %zu exported files as peft and "
           "transformers read them; export %.2e from transformers' logits\n", e_applied, e_merged, n_adapter, n_export, e_export);
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    EXPECT(system(cmd) == 0, "cleanup");
    act_free(&act); act_free(&a2);
    model_free(&back);
    lora_free(&ad);
    model_free(&m);
}

int main(void) {
    Fixture fx;
    if (fx_load(&fx, FIX "/ref.bin", "INFX") != 0) die("%s", last_error());
    const FxTensor *tok = fx_get(&fx, "tokens");
    if (!tok || tok->code != 1) die("fixture lacks tokens");
    check_ppl(&fx, tok->i, tok->numel, 0);
    check_ppl(&fx, tok->i, tok->numel, 1);
    check_export(&fx, tok->i);
    check_qwen2_yarn();
    printf("test_infer_hf: %d checks, %d failures\n", g_checks, g_failures);
    return g_failures ? 1 : 0;
}
