/* tests/test_infer.c: checks 06_infer.c's CPU engine, sampler, protocols and export.
 *
 *  1. cached decoding: prefill in chunks then one token at a time gives, at every position,
 *     the logits of 02's full forward over the whole sequence (1e-4 of the largest logit),
 *     with RoPE interpolation (ctx = 3 x max_position_embeddings), GQA, odd sizes, and an
 *     adapter applied through the hook; merged weights give the applied adapter's logits;
 *  2. the window loss equals the mean of 02's cross-entropy over the n - 1 shifted targets;
 *     the window starts follow LongLoRA's eval.py (written out here as Python does it);
 *  3. sampling: greedy is argmax; a tiny top-p is argmax; temperature draws follow
 *     softmax(logits / T) (200k draws, 0.006 absolute per token); top-p draws never leave
 *     the nucleus and follow its renormalised probabilities; a seed reproduces the draws;
 *  4. passkey: the prompt equals LongLoRA's construction ("\n".join of its five lines, the
 *     filler " ".join'ed 5000 times and cut at characters) for depths 0, n-1 and random ones;
 *     keys and depths are reproducible from the seed and in range; the grid's n_garbage;
 *  4b. passkey verdict, on a SmolLM2-style byte-level BPE (Digits + ByteLevel, built here)
 *     and LLaMA-2's SentencePiece (../shared/data, skipped where absent): the tokens of the
 *     right answer as it follows the prompt (" 348." encoded after the prompt, which with a
 *     byte-level BPE starts with a space token the key alone lacks) fit the decode budget
 *     and score right; a wrong key, a longer number, a cut-off number score wrong;
 *     tokenizer_config.json's add_bos_token decides BOS (false, true, absent = true);
 *  5. export: sharded bf16 folder + index reloads through 02's loader to the bf16-rounded
 *     merged weights exactly; config.json carries rope_scaling and the base's max_position_embeddings;
 *  6. generation stops at EOS and never passes --max-new.
 */
#define STAGE 0
#include "../06_infer.c"

#include "check.h"

static Config small_config(void) {
    Config c;
    memset(&c, 0, sizeof c);
    c.dim = 48; c.n_heads = 4; c.n_kv_heads = 2; c.head_dim = 12; c.ffn_dim = 80; c.n_layers = 2;
    c.vocab_size = 97; c.max_pos = 32; c.rms_eps = 1e-5f; c.rope_theta = 10000.0f; c.rope_config_factor = 1.0f;
    c.tie_embeddings = 0; c.bos_id = 1; c.eos_id = 2;
    return c;
}

static float max_abs(const float *x, size_t n) {
    float m = 0;
    for (size_t i = 0; i < n; i++) if (fabsf(x[i]) > m) m = fabsf(x[i]);
    return m;
}

/* A LoRA adapter with random (non-zero) B on all seven projections. */
static void random_adapter(LoraAdapter *ad, const Config *c, uint64_t seed) {
    LoraConfig lc = lora_default_config();
    lc.targets = (1u << N_PROJ) - 1;
    lc.rank = 3;
    lc.seed = seed;
    EXPECT(lora_init(ad, c, &lc) == 0, "lora_init: %s", last_error());
    Rng r;
    rng_seed(&r, seed + 7);
    for (size_t i = 0; i < (size_t)c->n_layers * LORA_NUM_TARGETS; i++) {
        LoraPair *p = &ad->pairs[i];
        if (!p->A) continue;
        for (size_t k = 0; k < p->out * (size_t)lc.rank; k++) p->B[k] = 0.05f * rng_normal(&r);
    }
    ad->training = 0;
}

/* Check 1: cached decode against the full forward, for one model and hook. */
static void check_cached_decode(Model *m, LinearHook *hook, size_t N, size_t n_prompt, size_t chunk, const char *what) {
    size_t V = (size_t)m->cfg.vocab_size;
    int32_t *tokens = (int32_t *)xmalloc(N * sizeof(int32_t));
    Rng r;
    rng_seed(&r, 99 + N);
    for (size_t i = 0; i < N; i++) tokens[i] = (int32_t)rng_below(&r, V);
    Activations act;
    act_plan(&act, &m->cfg, 1, N, 0);
    RunOptions ro = {0, 0, hook};
    model_forward(m, &act, tokens, NULL, 1, N, &ro);
    Engine e;
    engine_init(&e, m, hook, N, 0);
    e.cpu.chunk = chunk; /* buffers hold n_cap rows; smaller chunks exercise the chunked prefill */
    engine_prefill(&e, tokens, n_prompt);
    double worst = 0;
    for (size_t t = n_prompt - 1; t < N; t++) {
        if (t >= n_prompt) engine_decode(&e, tokens[t]);
        const float *ref = act.logits + t * V;
        float scale = max_abs(ref, V);
        for (size_t v = 0; v < V; v++) {
            double err = fabs((double)e.logits[v] - ref[v]) / scale;
            if (err > worst) worst = err;
        }
    }
    EXPECT(worst <= 1e-4, "%s: cached logits differ from the full forward by %.3g of the largest logit", what, worst);
    printf("cached decode (%s, N %zu, prompt %zu, chunk %zu): worst relative logit error %.2e\n", what, N, n_prompt, chunk, worst);
    /* the window loss */
    int32_t *targets = (int32_t *)xmalloc(N * sizeof(int32_t));
    for (size_t t = 0; t + 1 < N; t++) targets[t] = tokens[t + 1];
    targets[N - 1] = IGNORE_INDEX;
    float ref_loss = model_forward(m, &act, tokens, targets, 1, N, &ro);
    double got = engine_window_loss(&e, tokens, N);
    EXPECT(fabs(got - ref_loss) <= 1e-6 * fabs(ref_loss) + 1e-7, "%s: window loss %.8f, cross-entropy %.8f", what, got, (double)ref_loss);
    double manual = 0;
    for (size_t t = 0; t + 1 < N; t++) manual += logsumexp_row(act.logits + t * V, V) - act.logits[t * V + tokens[t + 1]];
    manual /= (double)(N - 1);
    EXPECT(fabs(got - manual) <= 1e-5 * fabs(manual), "%s: window loss %.8f, direct mean over n-1 targets %.8f", what, got, manual);
    engine_free(&e);
    act_free(&act);
    free(tokens);
    free(targets);
}

static void check_decode(void) {
    Config c = small_config();
    config_set_target_ctx(&c, 96); /* factor 3 */
    EXPECT(c.rope_factor == 3.0f, "rope factor %g for ctx 96 over 32", (double)c.rope_factor);
    Model m;
    model_init_random(&m, &c, 5, 0.2f);
    check_cached_decode(&m, NULL, 83, 29, 13, "base");
    check_cached_decode(&m, NULL, 7, 1, 256, "prompt of one token");
    LoraAdapter ad;
    random_adapter(&ad, &c, 11);
    check_cached_decode(&m, &ad.hook, 61, 20, 7, "adapter applied");
    /* merged = applied */
    size_t N = 40, V = (size_t)c.vocab_size;
    int32_t tokens[40];
    for (size_t i = 0; i < N; i++) tokens[i] = (int32_t)((i * 37 + 5) % V);
    Engine applied, merged;
    engine_init(&applied, &m, &ad.hook, N, 0);
    engine_prefill(&applied, tokens, N);
    lora_merge(&ad, &m);
    engine_init(&merged, &m, NULL, N, 0);
    engine_prefill(&merged, tokens, N);
    float scale = max_abs(applied.logits, V), worst = 0;
    for (size_t v = 0; v < V; v++) worst = fmaxf(worst, fabsf(applied.logits[v] - merged.logits[v]) / scale);
    EXPECT(worst <= 1e-5, "merged logits differ from applied ones by %.3g", (double)worst);
    engine_free(&applied);
    engine_free(&merged);
    lora_free(&ad);
    model_free(&m);
}

/* Check 2: window starts as eval.py's get_as_batch makes them. */
static void check_windows(void) {
    size_t cases[][3] = {{1000, 100, 256}, {612, 100, 256}, {613, 100, 256}, {356, 100, 256}, {357, 100, 256},
                         {100, 100, 256}, {50, 100, 256}, {4097, 4096, 1}, {300, 24, 16}, {301, 64, 16}};
    for (size_t k = 0; k < sizeof cases / sizeof *cases; k++) {
        size_t n = cases[k][0], L = cases[k][1], S = cases[k][2];
        /* all_ix = list(range(0, n - L, S)); all_ix.pop()  (range of a non-positive span is empty) */
        size_t expect[4096], m = 0;
        for (long i = 0; i < (long)n - (long)L; i += (long)S) expect[m++] = (size_t)i;
        if (m) m--; /* Python's pop() on an empty list raises: we report "too few tokens" instead */
        size_t *starts;
        size_t got = ppl_window_starts(n, L, S, &starts);
        EXPECT(got == m, "n %zu seq_len %zu stride %zu: %zu windows, eval.py has %zu", n, L, S, got, m);
        for (size_t i = 0; i < got && i < m; i++) EXPECT(starts[i] == expect[i], "window %zu starts at %zu, not %zu", i, starts[i], expect[i]);
        for (size_t i = 0; i < got; i++) EXPECT(starts[i] + L + 1 <= n, "window %zu overruns the data", i); /* eval.py's assert */
        free(starts);
    }
}

/* Check 3: the sampler. */
static void check_sampler(void) {
    const size_t V = 5;
    float logits[5] = {1.0f, 2.5f, 0.3f, 2.2f, -1.0f};
    Sampler s;
    sampler_init(&s, V, 0.0f, 1.0f, 1);
    EXPECT(sample_token(&s, logits, V) == 1, "greedy is not argmax");
    s.temperature = 1.0f; s.top_p = 1e-6f;
    int only_top = 1;
    for (int i = 0; i < 1000; i++) only_top &= sample_token(&s, logits, V) == 1;
    EXPECT(only_top, "top-p 1e-6 drew something other than the most likely token");
    float temps[2] = {0.7f, 1.6f};
    for (int k = 0; k < 2; k++) {
        s.temperature = temps[k]; s.top_p = 1.0f;
        double p[5], z = 0;
        for (size_t i = 0; i < V; i++) z += p[i] = exp((double)logits[i] / temps[k]);
        size_t hist[5] = {0}, draws = 200000;
        for (size_t i = 0; i < draws; i++) hist[sample_token(&s, logits, V)]++;
        for (size_t i = 0; i < V; i++)
            EXPECT(fabs((double)hist[i] / draws - p[i] / z) < 0.006, "T %.1f token %zu: frequency %.4f, softmax %.4f", temps[k], i,
                   (double)hist[i] / draws, p[i] / z);
    }
    /* top-p 0.8 at T = 1: probabilities sorted are 0.48 (id 1), 0.36 (id 3), ...: the nucleus is {1, 3} */
    s.temperature = 1.0f; s.top_p = 0.8f;
    double p[5], z = 0;
    for (size_t i = 0; i < V; i++) z += p[i] = exp((double)logits[i]);
    size_t hist[5] = {0}, draws = 100000;
    for (size_t i = 0; i < draws; i++) hist[sample_token(&s, logits, V)]++;
    EXPECT(hist[0] == 0 && hist[2] == 0 && hist[4] == 0, "top-p drew outside the nucleus: %zu %zu %zu", hist[0], hist[2], hist[4]);
    double want1 = p[1] / (p[1] + p[3]);
    EXPECT(fabs((double)hist[1] / draws - want1) < 0.006, "nucleus frequency %.4f, renormalised %.4f", (double)hist[1] / draws, want1);
    /* a seed reproduces the draws */
    Sampler a, b;
    sampler_init(&a, V, 0.9f, 0.95f, 42);
    sampler_init(&b, V, 0.9f, 0.95f, 42);
    int same = 1;
    for (int i = 0; i < 500; i++) same &= sample_token(&a, logits, V) == sample_token(&b, logits, V);
    EXPECT(same, "the same seed gave different draws");
    sampler_free(&a); sampler_free(&b); sampler_free(&s);
}

/* Check 4: the passkey prompt, built here the way passkey_retrivial.py builds it. */
static char *longlora_prompt(size_t n_garbage, size_t prefix, long key) {
    const char *garbage = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.";
    size_t gl = strlen(garbage), inf_len = 5000 * gl + 4999;
    char *inf = (char *)xmalloc(inf_len + 1), *w = inf; /* " ".join([garbage] * 5000) */
    for (int i = 0; i < 5000; i++) { if (i) *w++ = ' '; memcpy(w, garbage, gl); w += gl; }
    *w = 0;
    CHECK(n_garbage <= inf_len, "len(garbage_inf) >= n_garbage");
    char info[128];
    snprintf(info, sizeof info, "The pass key is %ld. Remember it. %ld is the pass key.", key, key);
    const char *task = "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will quiz you about the important information there.";
    const char *question = "What is the pass key? The pass key is";
    size_t cap = strlen(task) + n_garbage + strlen(info) + strlen(question) + 8;
    char *out = (char *)xmalloc(cap);
    int n = snprintf(out, cap, "%s\n%.*s\n%s\n%.*s\n%s", task, (int)prefix, inf, info, (int)(n_garbage - prefix), inf, question);
    CHECK(n > 0 && (size_t)n < cap, "prompt size");
    free(inf);
    return out;
}

static void check_passkey(void) {
    size_t sizes[] = {0, 1, 88, 89, 90, 1024, 3072, 7168, 12345};
    Rng r;
    rng_seed(&r, 3);
    for (size_t k = 0; k < sizeof sizes / sizeof *sizes; k++) {
        size_t n = sizes[k];
        size_t depths[4] = {0, n ? n - 1 : 0, n ? (size_t)rng_below(&r, n) : 0, n / 2};
        for (int j = 0; j < 4; j++) {
            long key = 1 + (long)rng_below(&r, 49999);
            char *ours = passkey_prompt(n, depths[j], key), *ref = longlora_prompt(n, depths[j], key);
            EXPECT(strcmp(ours, ref) == 0, "passkey prompt for n_garbage %zu depth %zu differs from LongLoRA's construction", n, depths[j]);
            free(ours); free(ref);
        }
    }
    /* the grid: int(3.75 * (i + 1) * interval // 1024 * 1024) */
    for (size_t interval = 1000; interval <= 3000; interval += 1000)
        for (size_t i = 0; i < 40; i++) {
            double v = floor(3.75 * (double)(i + 1) * (double)interval / 1024.0) * 1024.0;
            EXPECT(passkey_garbage_chars((i + 1) * interval) == (size_t)v, "n_garbage for %zu tokens", (i + 1) * interval);
        }
    EXPECT(passkey_garbage_chars(1000) == 3072 && passkey_garbage_chars(32000) == 119808, "n_garbage of the default grid");
    /* draws: reproducible, in range, spread over the range */
    long kmin = 1L << 30, kmax = 0;
    size_t dmax = 0;
    for (uint64_t seed = 0; seed < 2000; seed++) {
        size_t d1, d2; long k1, k2;
        passkey_draw(seed, 7168, &d1, &k1);
        passkey_draw(seed, 7168, &d2, &k2);
        EXPECT(d1 == d2 && k1 == k2, "seed %llu does not reproduce its draw", (unsigned long long)seed);
        EXPECT(d1 < 7168 && k1 >= 1 && k1 < 50000, "draw out of range: depth %zu key %ld", d1, k1);
        if (k1 < kmin) kmin = k1;
        if (k1 > kmax) kmax = k1;
        if (d1 > dmax) dmax = d1;
    }
    EXPECT(kmin < 500 && kmax > 49500 && dmax > 7000, "draws do not cover their range: keys %ld..%ld, depth up to %zu", kmin, kmax, dmax);
    size_t d0; long k0;
    passkey_draw(5, 0, &d0, &k0);
    EXPECT(d0 == 0, "no filler: depth 0");
}

/* Check 5: export, sharded, reloaded by 02's loader. */
static void check_export(void) {
    Config c = small_config();
    config_set_target_ctx(&c, 100); /* factor 4 */
    Model m;
    model_init_random(&m, &c, 21, 0.3f);
    char dir[] = "/tmp/test_infer_export_XXXXXX";
    EXPECT(mkdtemp(dir) != NULL, "mkdtemp");
    char out[512];
    snprintf(out, sizeof out, "%s/merged", dir);
    EXPECT(export_merged(&m, NULL, out, 20000, DT_BF16, 0) == 0, "export: %s", last_error());
    char path[1024];
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", out);
    EXPECT(file_exists(path), "no index for a sharded export");
    Json *idx = json_parse_file(path);
    EXPECT(idx && json_get_type(idx, "weight_map", JSON_OBJECT), "index without weight_map");
    size_t n_tensors = params_list(&m.w, &c, NULL);
    if (idx) EXPECT(json_get(idx, "weight_map")->count == n_tensors, "index lists %zu tensors, want %zu", json_get(idx, "weight_map")->count, n_tensors);
    json_free(idx);
    snprintf(path, sizeof path, "%s/config.json", out);
    Json *cj = json_parse_file(path);
    EXPECT(cj != NULL, "config.json: %s", last_error());
    if (cj) {
        EXPECT(json_get_number(cj, "max_position_embeddings", 0) == 32, "max_position_embeddings %g, want the base's 32 (x 4 by rope_scaling)",
               json_get_number(cj, "max_position_embeddings", 0));
        const Json *rs = json_get_type(cj, "rope_scaling", JSON_OBJECT);
        EXPECT(rs && json_get_number(rs, "factor", 0) == 4 && !strcmp(json_get_string(rs, "type", ""), "linear"), "rope_scaling");
        EXPECT(!strcmp(json_get_string(cj, "torch_dtype", ""), "bfloat16"), "torch_dtype");
        json_free(cj);
    }
    Model back;
    EXPECT(model_try_load(&back, out, 0) == 0, "reload: %s", last_error());
    if (back.w.memory) {
        EXPECT(back.cfg.rope_factor == 4.0f && config_context(&back.cfg) == 128, "reloaded rope factor %g, context %zu (want 4, 128)",
               (double)back.cfg.rope_factor, config_context(&back.cfg));
        size_t bad = 0;
        for (size_t i = 0; i < m.w.count; i++) bad += back.w.memory[i] != bf16_to_f32(f32_to_bf16(m.w.memory[i]));
        EXPECT(bad == 0, "%zu reloaded weights differ from their bf16 rounding", bad);
        model_free(&back);
    }
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    EXPECT(system(cmd) == 0, "cleanup");
    model_free(&m);
}

/* Check 4b: the passkey verdict on both tokenizer kinds. */
static Tokenizer smollm2_style_tokenizer(void) {
    uint32_t b2c[256];
    int16_t c2b[512];
    bytelevel_alphabet(b2c, c2b);
    TokText j = {0};
    const char *head = "{\"version\":\"1.0\",\"added_tokens\":[],\"normalizer\":null,\"pre_tokenizer\":{\"type\":\"Sequence\","
                       "\"pretokenizers\":[{\"type\":\"Digits\",\"individual_digits\":true},{\"type\":\"ByteLevel\","
                       "\"add_prefix_space\":false,\"trim_offsets\":true,\"use_regex\":true}]},\"post_processor\":null,"
                       "\"decoder\":{\"type\":\"ByteLevel\"},\"model\":{\"type\":\"BPE\",\"dropout\":null,\"unk_token\":null,"
                       "\"ignore_merges\":false,\"vocab\":{";
    text_put(&j, head, strlen(head));
    for (int b = 0; b < 256; b++) {
        char u[8], tmp[32];
        size_t n = utf8_encode(b2c[b], u);
        text_put(&j, b ? ",\"" : "\"", b ? 2 : 1);
        if (b == '"' || b == '\\') text_put(&j, "\\", 1);
        text_put(&j, u, n);
        snprintf(tmp, sizeof tmp, "\":%d", b);
        text_put(&j, tmp, strlen(tmp));
    }
    const char *tail = ",\"is\":256,\"\xC4\xA0is\":257},\"merges\":[\"i s\",\"\xC4\xA0 is\"]}}";
    text_put(&j, tail, strlen(tail));
    Tokenizer t;
    EXPECT(tok_load_json_bytes(&t, j.data, j.len, NULL, "smollm2-style.json") == 0, "the byte-level tokenizer: %s", last_error());
    free(j.data);
    return t;
}

/* The right answer as the model continues the prompt: the ids after the prompt's in
 * encode(prompt + " key."), i.e. what a model that knows the key decodes greedily. */
static int32_t *answer_after_prompt(const Tokenizer *t, const char *prompt, const char *answer, size_t *n_out) {
    size_t n_prompt, n_full;
    size_t lp = strlen(prompt), la = strlen(answer);
    char *full = (char *)xmalloc(lp + la + 1);
    memcpy(full, prompt, lp); memcpy(full + lp, answer, la + 1);
    int32_t *p = tok_encode(t, prompt, lp, 0, &n_prompt), *f = tok_encode(t, full, lp + la, 0, &n_full);
    EXPECT(n_full > n_prompt && memcmp(p, f, n_prompt * sizeof(int32_t)) == 0, "the prompt's ids are not a prefix of the prompt + answer's");
    *n_out = n_full - n_prompt;
    int32_t *out = (int32_t *)xmalloc((*n_out ? *n_out : 1) * sizeof(int32_t));
    memcpy(out, f + n_prompt, *n_out * sizeof(int32_t));
    free(p); free(f); free(full);
    return out;
}

static void check_passkey_verdict_with(const Tokenizer *t, const char *kind, uint64_t seed) {
    for (int trial = 0; trial < 6; trial++) {
        size_t depth; long key;
        passkey_draw(seed + (uint64_t)trial, 3072, &depth, &key);
        char *prompt = passkey_prompt(3072, depth, key);
        size_t budget = passkey_budget(t, key);
        char text[64];
        /* right: the key, then the sentence goes on */
        snprintf(text, sizeof text, " %ld. Remember it.", key);
        size_t n;
        int32_t *ids = answer_after_prompt(t, prompt, text, &n);
        EXPECT(n >= budget, "%s: the right answer is shorter than the budget", kind);
        EXPECT(passkey_score(t, ids, budget < n ? budget : n, key, NULL) == 1, "%s: the right answer to key %ld scores wrong", kind, key);
        free(ids);
        /* wrong: another key, a longer number, the key cut short, no number */
        long wrong[3] = {key == 49999 ? 1 : key + 1, key * 10 + 7, key / 10};
        for (int w = 0; w < 3; w++) {
            snprintf(text, sizeof text, w == 2 ? " %ld" : " %ld.", wrong[w]);
            ids = answer_after_prompt(t, prompt, text, &n);
            EXPECT(passkey_score(t, ids, budget < n ? budget : n, key, NULL) == 0, "%s: the answer '%s' to key %ld scores right", kind, text, key);
            free(ids);
        }
        ids = answer_after_prompt(t, prompt, " the grass is green.", &n);
        EXPECT(passkey_score(t, ids, n, key, NULL) == 0, "%s: an answer without a number scores right", kind);
        free(ids);
        free(prompt);
    }
    EXPECT(passkey_correct("  348\n", 348) && passkey_correct(" is 348, yes", 348) && !passkey_correct(" 0348", 348) &&
           !passkey_correct(" 34 8", 348) && !passkey_correct("", 348), "passkey_correct on hand-written strings");
}

static void check_passkey_verdict(void) {
    uint64_t seed = (uint64_t)time(NULL);
    Tokenizer bpe = smollm2_style_tokenizer();
    /* the bug this replaces: with a byte-level BPE the answer starts with a space token */
    size_t n_key, n_ans;
    int32_t *key_ids = tok_encode(&bpe, "348", 3, 0, &n_key);
    char *prompt = passkey_prompt(1024, 10, 348);
    int32_t *ans = answer_after_prompt(&bpe, prompt, " 348.", &n_ans);
    EXPECT(n_ans > n_key && memcmp(ans, key_ids, n_key * sizeof(int32_t)) != 0, "byte-level BPE: the answer's first ids are the key's alone");
    free(key_ids); free(ans); free(prompt);
    check_passkey_verdict_with(&bpe, "byte-level BPE", seed);
    tok_free(&bpe);
    const char *spm_path = "../shared/data/llama2-tokenizer/tokenizer.model";
    Tokenizer spm;
    if (file_exists(spm_path) && tok_load(&spm, spm_path) == 0) {
        check_passkey_verdict_with(&spm, "SentencePiece", seed + 100);
        tok_free(&spm);
    } else {
        printf("note: %s is absent; the SentencePiece half of the passkey verdict check is skipped\n", spm_path);
    }
    /* BOS follows tokenizer_config.json's add_bos_token */
    const char *dir = "build/tests/infer_bos";
    EXPECT(system("mkdir -p build/tests/infer_bos && rm -f build/tests/infer_bos/tokenizer_config.json") == 0, "mkdir");
    EXPECT(tokenizer_adds_bos(dir) == 1, "no tokenizer_config.json: BOS");
    const char *cfgs[3] = {"{\"add_bos_token\": false}", "{\"add_bos_token\": true}", "{\"bos_token\": \"<s>\"}"};
    for (int i = 0; i < 3; i++) {
        EXPECT(write_file_atomic("build/tests/infer_bos/tokenizer_config.json", cfgs[i], strlen(cfgs[i])) == 0, "write");
        EXPECT(tokenizer_adds_bos(dir) == (i != 0), "tokenizer_config %s: BOS %d", cfgs[i], tokenizer_adds_bos(dir));
        EXPECT(tokenizer_adds_bos("build/tests/infer_bos/tokenizer.json") == (i != 0), "a file path looks in its folder");
    }
}

/* Check 6: EOS and --max-new. */
static void check_stops(void) {
    Config c = small_config();
    Model m;
    model_init_random(&m, &c, 8, 0.2f);
    Engine e;
    engine_init(&e, &m, NULL, 64, 0);
    Sampler s;
    sampler_init(&s, (size_t)c.vocab_size, 0.0f, 1.0f, 0);
    int32_t prompt[3] = {1, 17, 40}, out[32];
    size_t made = generate(&e, &s, NULL, prompt, 3, 20, -1, out, NULL, NULL);
    EXPECT(made == 20, "made %zu of 20 tokens without EOS", made);
    int32_t eos = out[5];
    size_t first = 0;
    while (out[first] != eos) first++;
    size_t made2 = generate(&e, &s, NULL, prompt, 3, 20, eos, out, NULL, NULL);
    EXPECT(made2 == first, "with EOS %d at step %zu generation made %zu tokens", eos, first, made2);
    engine_free(&e);
    sampler_free(&s);
    model_free(&m);
}

int main(void) {
    check_decode();
    check_windows();
    check_sampler();
    check_passkey();
    check_passkey_verdict();
    check_export();
    check_stops();
    printf("test_infer: %d checks, %d failures\n", g_checks, g_failures);
    return g_failures ? 1 : 0;
}
