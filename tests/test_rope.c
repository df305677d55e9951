/* test_rope.c: the RoPE settings and architectures of a config.json, and how a longer context
 * composes with them (02's config_parse_rope, config_extend, rope_inv_freq; 03's exporter and
 * adapter config; 06's dynamic-NTK rule). Whether the numbers equal transformers' is
 * test_model.c's job (tests/fixtures/model, made by tests/ref/make_rope_arch_fixtures.py);
 * this test pins the rules around them:
 *   1. both spellings: every fixture's transformers-5 config (rope_parameters) rewritten in
 *      transformers 4's (rope_theta at the top, rope_scaling {type, ...}) reads to the same Config;
 *   2. the extension: a plain model stretched by yarn is the yarn model transformers would
 *      build (same frequencies and scale as the rope_yarn fixture); linear over linear and
 *      yarn over yarn raise the factor; yarn over linear, linear over yarn, an explicit kind
 *      over dynamic and llama3 past max_position_embeddings are refused with a sentence;
 *   3. architectures: Mistral's sliding window (absent: 4096) and Qwen2's (only with
 *      use_sliding_window) refuse a longer context; other model types are refused;
 *   4. the config.json we write (export and adapter) reads back to the same RoPE, for every
 *      type, with the base's max_position_embeddings;
 *   5. 06's engine follows transformers' dynamic-NTK cache rule (grow, keep, reset).
 */
#define STAGE 0
#include "../06_infer.c"

#include "check.h"

#define FIXTURES "tests/fixtures/model"

static Json *read_config(const char *fixture) {
    char path[512];
    snprintf(path, sizeof path, FIXTURES "/%s/config.json", fixture);
    Json *j = json_parse_file(path);
    if (!j) die("%s", last_error());
    return j;
}

/* Config from JSON text; -1 + last_error() when refused. */
static int config_from_text(Config *c, const char *text, long target_ctx) {
    Json *j = json_parse(text, strlen(text));
    if (!j) die("bad JSON in the test: %s", last_error());
    int rc = config_from_json(c, j, target_ctx);
    json_free(j);
    return rc;
}

/* The same config in transformers 4's spelling, as text. */
static char *tf4_spelling(const Json *j) {
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    const Json *rp = json_get_type(j, "rope_parameters", JSON_OBJECT);
    fputc('{', f);
    for (size_t i = 0; i < j->count; i++) {
        if (!strcmp(j->keys[i], "rope_parameters")) continue;
        json_write_string(f, j->keys[i]);
        fputs(": ", f);
        json_write_value(f, &j->items[i], 0);
        fputs(", ", f);
    }
    fprintf(f, "\"rope_theta\": %.17g, \"rope_scaling\": {", json_get_number(rp, "rope_theta", 10000));
    int n = 0;
    for (size_t i = 0; rp && i < rp->count; i++) {
        if (!strcmp(rp->keys[i], "rope_theta")) continue;
        fputs(n++ ? ", " : "", f);
        json_write_string(f, !strcmp(rp->keys[i], "rope_type") ? "type" : rp->keys[i]);
        fputs(": ", f);
        json_write_value(f, &rp->items[i], 0);
    }
    fputs("}}", f);
    fclose(f);
    return buf;
}

static void check_spellings(void) {
    const char *names[] = {"rope_linear4", "rope_dynamic", "rope_yarn", "rope_llama3", "mistral_like", "qwen2_tied", "qwen2_yarn"};
    for (size_t k = 0; k < sizeof names / sizeof *names; k++) {
        Json *j = read_config(names[k]);
        Config a, b;
        EXPECT(config_from_json(&a, j, 0) == 0, "%s: %s", names[k], last_error());
        char *text = tf4_spelling(j);
        EXPECT(config_from_text(&b, text, 0) == 0, "%s in transformers 4's spelling: %s", names[k], last_error());
        EXPECT(memcmp(&a, &b, sizeof a) == 0, "%s: the two spellings read to different configs (rope %s/%s factor %g/%g)", names[k],
               ROPE_TYPE_NAMES[a.rope_type], ROPE_TYPE_NAMES[b.rope_type], (double)a.rope_factor, (double)b.rope_factor);
        free(text);
        json_free(j);
    }
    printf("spellings: transformers 4 and 5 read alike for %zu configs\n", sizeof names / sizeof *names);
}

/* Do a and b make the same frequencies and cos/sin scale for sequences of seq_len? */
static int same_rope(const Config *a, const Config *b, size_t seq_len) {
    float fa[512], fb[512];
    float sa = rope_inv_freq(a, seq_len, fa), sb = rope_inv_freq(b, seq_len, fb);
    return a->head_dim == b->head_dim && sa == sb && memcmp(fa, fb, (size_t)a->head_dim / 2 * sizeof(float)) == 0;
}

/* config.json text of a small LLaMA / Mistral / Qwen2 with the given extra keys. */
static char *small_config(const char *model_type, const char *extra) {
    char *buf = xmalloc(2048);
    snprintf(buf, 2048, "{\"model_type\": \"%s\", \"hidden_size\": 64, \"intermediate_size\": 90, \"num_hidden_layers\": 2, "
                        "\"num_attention_heads\": 2, \"num_key_value_heads\": 1, \"vocab_size\": 67, \"max_position_embeddings\": 32%s%s}",
             model_type, *extra ? ", " : "", extra);
    return buf;
}

static void expect_refused(const char *what, const char *text, long ctx, const char *needle) {
    Config c;
    int rc = config_from_text(&c, text, ctx);
    EXPECT(rc != 0 && strstr(last_error(), needle), "%s: want a refusal naming '%s', got %s", what, needle, rc ? last_error() : "a config");
    if (rc) printf("refused as it should be: %s: %s\n", what, last_error());
}

static void check_extension(void) {
    /* a plain model stretched by yarn = the yarn fixture's RoPE */
    Json *j = read_config("rope_yarn");
    Config yarn, plain;
    EXPECT(config_from_json(&yarn, j, 0) == 0, "rope_yarn: %s", last_error());
    json_free(j);
    plain = yarn;
    plain.rope_config_type = ROPE_LINEAR; plain.rope_config_factor = 1.0f;
    memset(&plain.rope, 0, sizeof plain.rope);
    EXPECT(config_extend(&plain, 256, ROPE_EXTEND_YARN) == 0, "plain + yarn: %s", last_error());
    EXPECT(plain.rope_type == ROPE_YARN && plain.rope_factor == 4.0f && config_context(&plain) == 256 && same_rope(&plain, &yarn, 256),
           "a plain model stretched by yarn to 256 over 64 is not the yarn fixture's RoPE (%s factor %g)", ROPE_TYPE_NAMES[plain.rope_type],
           (double)plain.rope_factor);
    EXPECT(config_extend(&plain, 0, ROPE_EXTEND_YARN) == 0 && plain.rope_type == ROPE_LINEAR && plain.rope_factor == 1.0f,
           "no target context: the config's own RoPE again");
    /* yarn over yarn raises the factor over the original context; within the context nothing moves */
    Config y = yarn;
    EXPECT(config_extend(&y, 600, ROPE_EXTEND_AUTO) == 0 && y.rope_type == ROPE_YARN && y.rope_factor == 10.0f,
           "yarn to 600 over 64: factor %g, want ceil(600/64) = 10", (double)y.rope_factor);
    EXPECT(config_extend(&y, 200, ROPE_EXTEND_YARN) == 0 && y.rope_factor == 4.0f, "yarn within its context keeps factor 4 (%g)", (double)y.rope_factor);
    EXPECT(config_extend(&y, 600, ROPE_EXTEND_LINEAR) != 0 && strstr(last_error(), "cannot extend a yarn model"), "linear over yarn: %s", last_error());
    /* linear over linear; yarn over linear refused */
    char *lin = small_config("llama", "\"rope_scaling\": {\"type\": \"linear\", \"factor\": 2}");
    Config l;
    EXPECT(config_from_text(&l, lin, 200) == 0 && l.rope_factor == 7.0f && l.rope_type == ROPE_LINEAR, "linear 2 to 200 over 32: factor %g, want 7",
           (double)l.rope_factor);
    EXPECT(config_from_text(&l, lin, 0) == 0 && config_extend(&l, 200, ROPE_EXTEND_YARN) != 0 && strstr(last_error(), "already scaled linearly"),
           "yarn over linear: %s", last_error());
    free(lin);
    /* dynamic: stretches itself; an explicit kind is refused */
    j = read_config("rope_dynamic");
    Config dyn;
    EXPECT(config_from_json(&dyn, j, 1000) == 0 && dyn.rope_type == ROPE_DYNAMIC && dyn.rope_factor == 3.0f && config_context(&dyn) == 16,
           "dynamic at 1000: %s factor %g", ROPE_TYPE_NAMES[dyn.rope_type], (double)dyn.rope_factor);
    json_free(j);
    EXPECT(config_extend(&dyn, 1000, ROPE_EXTEND_YARN) != 0 && strstr(last_error(), "dynamic"), "yarn over dynamic: %s", last_error());
    float f16[16], f1000[16];
    rope_inv_freq(&dyn, 16, f16);
    rope_inv_freq(&dyn, 1000, f1000);
    EXPECT(f1000[0] == f16[0] && f1000[5] < f16[5], "dynamic NTK: longer sequences get a larger base (lower frequencies but the first)");
    /* llama3: within max_position_embeddings as configured; past it refused */
    j = read_config("rope_llama3");
    Config l3;
    EXPECT(config_from_json(&l3, j, 128) == 0 && l3.rope_type == ROPE_LLAMA3 && l3.rope_factor == 8.0f && config_context(&l3) == 128,
           "llama3 at its own 128: %s", last_error());
    EXPECT(config_extend(&l3, 129, ROPE_EXTEND_AUTO) != 0 && strstr(last_error(), "llama3"), "llama3 past its context: %s", last_error());
    json_free(j);
    /* what config.json may not say */
    char *bad = small_config("llama", "\"rope_scaling\": {\"type\": \"longrope\", \"factor\": 2}");
    expect_refused("longrope", bad, 0, "\"longrope\" is not supported");
    free(bad);
    bad = small_config("llama", "\"rope_scaling\": {\"rope_type\": \"llama3\", \"factor\": 8}");
    expect_refused("llama3 without its bands", bad, 0, "llama3 needs");
    free(bad);
    bad = small_config("llama", "\"partial_rotary_factor\": 0.5");
    expect_refused("partial rotary", bad, 0, "partial_rotary_factor");
    free(bad);
    bad = small_config("llama", "\"rope_scaling\": {\"type\": \"yarn\", \"factor\": 0.5}");
    expect_refused("yarn factor below 1", bad, 0, "\"factor\"");
    free(bad);
}

static void check_architectures(void) {
    Config c;
    char *t = small_config("mistral", "\"sliding_window\": null");
    EXPECT(config_from_text(&c, t, 4096) == 0 && c.arch == ARCH_MISTRAL && c.sliding_window == 0 && !c.qkv_bias, "mistral, no window: %s", last_error());
    free(t);
    t = small_config("mistral", "\"sliding_window\": 48");
    EXPECT(config_from_text(&c, t, 48) == 0 && c.sliding_window == 48, "mistral, window 48 at 48: %s", last_error());
    expect_refused("mistral window 48 at 64", t, 64, "sliding_window 48 is shorter than the context 64");
    free(t);
    t = small_config("mistral", "\"max_position_embeddings\": 8192"); /* absent window: transformers' 4096 */
    expect_refused("mistral, window absent, context 8192", t, 0, "sliding_window 4096");
    free(t);
    t = small_config("qwen2", "\"sliding_window\": 16, \"use_sliding_window\": false");
    EXPECT(config_from_text(&c, t, 64) == 0 && c.arch == ARCH_QWEN2 && c.qkv_bias && c.sliding_window == 0, "qwen2 without sliding: %s", last_error());
    free(t);
    t = small_config("qwen2", "\"sliding_window\": 16, \"use_sliding_window\": true, \"max_window_layers\": 1");
    expect_refused("qwen2 sliding from layer 1", t, 64, "sliding_window 16");
    free(t);
    t = small_config("qwen2", "\"sliding_window\": 16, \"use_sliding_window\": true, \"max_window_layers\": 2");
    EXPECT(config_from_text(&c, t, 64) == 0 && c.sliding_window == 0, "qwen2 with max_window_layers = every layer slides none: %s", last_error());
    free(t);
    t = small_config("gemma", "");
    expect_refused("gemma", t, 0, "model_type \"gemma\"");
    free(t);
    t = small_config("llama", "\"architectures\": [\"Qwen2ForCausalLM\"]");
    expect_refused("llama named Qwen2ForCausalLM", t, 0, "with this model_type");
    free(t);
    t = small_config("llama", "\"attention_bias\": true");
    expect_refused("llama with attention_bias", t, 0, "attention_bias");
    free(t);
}

/* config.json as we write it (export, adapter) reads back to the same RoPE. */
static void check_written_config(void) {
    const char *names[] = {"rope_linear4", "rope_dynamic", "rope_yarn", "rope_llama3", "qwen2_yarn", "mistral_like"};
    char dir[] = "/tmp/test_rope_XXXXXX";
    if (!mkdtemp(dir)) die("mkdtemp: %s", strerror(errno));
    for (size_t k = 0; k < sizeof names / sizeof *names; k++) {
        char base[256], path[512];
        snprintf(base, sizeof base, FIXTURES "/%s", names[k]);
        Json *j = read_config(names[k]);
        Config c, back;
        long ctx = !strcmp(names[k], "rope_llama3") || !strcmp(names[k], "rope_dynamic") ? 0 : 500;
        EXPECT(config_from_json(&c, j, ctx) == 0, "%s: %s", names[k], last_error());
        json_free(j);
        for (int with_base = 0; with_base < 2; with_base++) {
            EXPECT(write_export_config(with_base ? base : NULL, dir, &c, with_base ? DT_COUNT : DT_F32) == 0, "write: %s", last_error());
            Json *w = json_parse_file(path_join(path, sizeof path, dir, "config.json"));
            EXPECT(w && config_from_json(&back, w, 0) == 0, "%s: our config.json does not read back: %s", names[k], last_error());
            json_free(w);
            RopeParams rb = back.rope, rc = c.rope; /* an original context equal to max_position_embeddings may go unsaid */
            rb.orig_max_pos = rope_orig_max_pos(&back);
            rc.orig_max_pos = rope_orig_max_pos(&c);
            EXPECT(back.rope_type == c.rope_type && back.rope_factor == c.rope_factor && back.max_pos == c.max_pos &&
                       memcmp(&rb, &rc, sizeof rc) == 0 && back.arch == c.arch && back.qkv_bias == c.qkv_bias &&
                       same_rope(&back, &c, 700),
                   "%s (%s base config): written %s factor %g max_pos %d, read back %s factor %g max_pos %d", names[k], with_base ? "with" : "without",
                   ROPE_TYPE_NAMES[c.rope_type], (double)c.rope_factor, c.max_pos, ROPE_TYPE_NAMES[back.rope_type], (double)back.rope_factor,
                   back.max_pos);
        }
        /* the adapter's copy, read by 06 over the base's own RoPE (here: plain) */
        Config plain = c;
        plain.rope_config_type = ROPE_LINEAR; plain.rope_config_factor = 1.0f;
        memset(&plain.rope, 0, sizeof plain.rope);
        config_extend(&plain, 0, ROPE_EXTEND_AUTO);
        EXPECT(lora_adapter_rope(dir, &plain, 0) == 0 && same_rope(&plain, &c, 700) && config_context(&plain) == config_context(&c),
               "%s: the adapter's config.json gives another RoPE (%s)", names[k], last_error());
    }
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    EXPECT(system(cmd) == 0, "cleanup");
    printf("written config.json: %zu configs read back to the same RoPE (export and adapter)\n", sizeof names / sizeof *names);
}

/* transformers' dynamic_rope_update: grow past the cached length, keep it while above the
 * original, reset below it. */
static void check_dynamic_rule(void) {
    Json *j = read_config("rope_dynamic");
    Model m;
    Config c;
    if (config_from_json(&c, j, 0) != 0) die("%s", last_error());
    json_free(j);
    model_init_random(&m, &c, 3, 0.05f);
    Engine e;
    engine_init(&e, &m, NULL, 64, 0);
    size_t steps[][2] = {{40, 40}, {41, 41}, {20, 41}, {17, 41}, {10, 16}, {30, 30}};
    for (size_t k = 0; k < sizeof steps / sizeof *steps; k++) {
        engine_rope(&e, steps[k][0]);
        float want[64];
        float a = rope_inv_freq(&c, steps[k][1], want);
        EXPECT(e.rope_cached == steps[k][1] && memcmp(e.cpu.inv_freq, want, (size_t)c.head_dim / 2 * sizeof(float)) == 0 && a == e.cpu.rope_attention,
               "a forward to %zu: frequencies for %zu, want %zu", steps[k][0], e.rope_cached, steps[k][1]);
    }
    /* a cached decode past the original context agrees with a full forward at the same length */
    int32_t tokens[48];
    for (int i = 0; i < 48; i++) tokens[i] = (i * 7 + 3) % c.vocab_size;
    engine_prefill(&e, tokens, 47);
    engine_decode(&e, tokens[47]); /* transformers: the prefill's keys keep f(47), the new row gets f(48) */
    Activations act;
    act_plan(&act, &c, 1, 48, 0);
    model_forward(&m, &act, tokens, NULL, 1, 48, NULL);
    double worst = 0;
    for (int v = 0; v < c.vocab_size; v++) worst = fmax(worst, fabs(act.logits[47 * (size_t)c.vocab_size + v] - e.logits[v]));
    EXPECT(worst > 1e-6, "a decode after a shorter prefill mixes two NTK bases, so it must differ a little from one forward at 48 (%.3g)", worst);
    act_free(&act);
    engine_free(&e);
    model_free(&m);
    printf("dynamic NTK: the engine's frequencies follow transformers' grow/keep/reset rule\n");
}

int main(void) {
    if (!file_exists(FIXTURES "/rope_yarn/config.json")) {
        printf("skip: the fixtures in " FIXTURES " are missing (run from the repository root)\n");
        return 77;
    }
    check_spellings();
    check_extension();
    check_architectures();
    check_written_config();
    check_dynamic_rule();
    printf("test_rope: %d checks, %d failed\n", g_checks, g_failures);
    return g_failures ? 1 : 0;
}
