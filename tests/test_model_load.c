/* test_model_load.c: 02_model.c's loader on hostile model folders.
 *
 * Each case copies a committed fixture folder into a fresh temporary folder, breaks one
 * thing, and requires model_try_load() to fail with one sentence naming the file or
 * tensor at fault: a missing shard, a truncated file, a tensor of the wrong shape, a
 * missing tensor, an unexpected tensor (a bias), an integer tensor, an unknown rope type,
 * another architecture, malformed config.json, a bad index. The untouched copies must
 * load (so a failure is the break's doing), and the old transformers-4 spelling of the
 * RoPE settings (rope_theta + rope_scaling) must load to the same factor.
 */
#define STAGE 0
#include "02_model.c"
#include "check.h"
#include <dirent.h>

#define FIXTURES "tests/fixtures/model"

static void copy_file(const char *from, const char *to) {
    size_t len;
    char *data = read_file(from, &len);
    if (!data) die("%s", last_error());
    if (write_file_atomic(to, data, len) != 0) die("%s", last_error());
    free(data);
}
/* A fresh copy of fixture folder `name` under build/tests, its path written to dir [256]. */
static void fresh_copy(const char *name, char dir[256]) {
    snprintf(dir, 256, "build/tests/model_bad_XXXXXX");
    if (!mkdtemp(dir)) die("cannot create a temporary folder under build/tests: %s", strerror(errno));
    char src[512], from[1024], to[1024];
    snprintf(src, sizeof src, FIXTURES "/%s", name);
    DIR *d = opendir(src);
    if (!d) die("cannot open %s", src);
    struct dirent *e;
    while ((e = readdir(d)))
        if (e->d_name[0] != '.') copy_file(path_join(from, sizeof from, src, e->d_name), path_join(to, sizeof to, dir, e->d_name));
    closedir(d);
}
static void remove_dir(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return;
    struct dirent *e;
    char p[1024];
    while ((e = readdir(d)))
        if (e->d_name[0] != '.') remove(path_join(p, sizeof p, dir, e->d_name));
    closedir(d);
    rmdir(dir);
}
static void write_text(const char *dir, const char *file, const char *text) {
    char p[1024];
    if (write_file_atomic(path_join(p, sizeof p, dir, file), text, strlen(text)) != 0) die("%s", last_error());
}
/* Replaces `from` by `to` (first occurrence) inside dir/file. */
static void edit_text(const char *dir, const char *file, const char *from, const char *to) {
    char p[1024];
    size_t len;
    char *s = read_file(path_join(p, sizeof p, dir, file), &len);
    if (!s) die("%s", last_error());
    char *at = strstr(s, from);
    if (!at) die("%s has no \"%s\" to replace", p, from);
    char *out = xmalloc(len + strlen(to) + 1);
    size_t pre = (size_t)(at - s);
    memcpy(out, s, pre);
    strcpy(out + pre, to);
    strcat(out, at + strlen(from));
    write_text(dir, file, out);
    free(s);
    free(out);
}

/* Loading dir must fail and the sentence must contain `want`. */
static void expect_fail(const char *what, const char *dir, const char *want) {
    Model m;
    g_last_error[0] = 0;
    if (!check_counted(model_try_load(&m, dir, 0) != 0)) {
        printf("FAIL %s: the folder loaded\n", what);
        model_free(&m);
        return;
    }
    const char *msg = last_error();
    int one_line = strchr(msg, '\n') == NULL;
    if (!check_counted(strstr(msg, want) && one_line)) {
        printf("FAIL %s: error \"%s\" does not name \"%s\"\n", what, msg, want);
    } else printf("ok   %-34s error: %s\n", what, msg);
}
static void expect_load(const char *what, const char *dir) {
    Model m;
    if (!check_counted(model_try_load(&m, dir, 0) == 0)) { printf("FAIL %s: %s\n", what, last_error()); return; }
    printf("ok   %-34s loads (%zu parameters)\n", what, m.w.count);
    model_free(&m);
}

/* Rewrites dir/file (a single safetensors file) through `edit`, which may change one entry. */
typedef void (*EditFn)(StWriter *w, const SafeTensors *st);
static void rewrite_safetensors(const char *dir, const char *file, EditFn edit) {
    char p[1024];
    path_join(p, sizeof p, dir, file);
    SafeTensors st;
    if (st_open(&st, p) != 0) die("%s", last_error());
    StWriter w = {0};
    for (size_t i = 0; i < st.count; i++) st_writer_add(&w, st.tensors[i].name, st.tensors[i].dtype, st.tensors[i].ndim, st.tensors[i].shape, st.tensors[i].data);
    edit(&w, &st);
    if (st_write(&w, p) != 0) die("%s", last_error());
    st_writer_free(&w);
    st_close(&st);
}
static StEntry *entry(StWriter *w, const char *name) {
    for (size_t i = 0; i < w->count; i++)
        if (!strcmp(w->entries[i].name, name)) return &w->entries[i];
    die("no tensor %s to edit", name);
}
static void edit_wrong_shape(StWriter *w, const SafeTensors *st) { /* k_proj [128, 128] -> [64, 128] */
    (void)st;
    StEntry *e = entry(w, "model.layers.0.self_attn.k_proj.weight");
    e->shape[0] = 64;
    e->nbytes /= 2;
}
static void edit_drop_tensor(StWriter *w, const SafeTensors *st) {
    (void)st;
    StEntry *e = entry(w, "model.layers.0.mlp.up_proj.weight");
    *e = w->entries[--w->count];
}
static float zero_bias[128];
static void edit_add_bias(StWriter *w, const SafeTensors *st) {
    (void)st;
    int64_t shape[1] = {128};
    st_writer_add(w, "model.layers.0.self_attn.q_proj.bias", DT_F32, 1, shape, zero_bias);
}
static uint16_t *f16_data[64];
static void edit_to_f16(StWriter *w, const SafeTensors *st) {
    if (w->count > 64) die("too many tensors");
    for (size_t i = 0; i < w->count; i++) {
        const StTensor *t = st_find(st, w->entries[i].name);
        float *f = xmalloc(t->numel * sizeof(float));
        if (st_to_f32(t, f) != 0) die("%s", last_error());
        f16_data[i] = xmalloc(t->numel * 2);
        for (size_t k = 0; k < t->numel; k++) f16_data[i][k] = f32_to_f16(f[k]);
        free(f);
        w->entries[i].dtype = DT_F16;
        w->entries[i].data = f16_data[i];
        w->entries[i].nbytes = t->numel * 2;
    }
}
static void edit_int_tensor(StWriter *w, const SafeTensors *st) {
    (void)st;
    entry(w, "model.norm.weight")->dtype = DT_I32;
}

/* The folders broken by one edit: a copy of `fixture` with `from` replaced by `to` in the text
 * file `file`, or `file` (a single safetensors file) rewritten through `edit`; loading it must
 * fail with one sentence containing `want`. */
typedef struct {
    const char *what, *fixture, *file, *from, *to;
    EditFn edit;
    const char *want;
} BrokenCopy;
static const BrokenCopy broken[] = {
    {"index without a tensor", "rope_linear4_bf16", "model.safetensors.index.json", "\"model.norm.weight\"",
     "\"model.norm.weight_renamed\"", NULL, "model.norm.weight"},
    {"index naming a file elsewhere", "rope_linear4_bf16", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
     "../model-00001-of-00002.safetensors", NULL, "bad file name"},
    {"tensor of the wrong shape", "llama2_like", "model.safetensors", NULL, NULL, edit_wrong_shape, "model.layers.0.self_attn.k_proj.weight"},
    {"missing tensor", "llama2_like", "model.safetensors", NULL, NULL, edit_drop_tensor, "model.layers.0.mlp.up_proj.weight"},
    {"unexpected tensor (a bias)", "llama2_like", "model.safetensors", NULL, NULL, edit_add_bias, "model.layers.0.self_attn.q_proj.bias"},
    {"integer tensor", "llama2_like", "model.safetensors", NULL, NULL, edit_int_tensor, "model.norm.weight"},
    {"unknown rope type", "rope_linear4", "config.json", "\"rope_type\": \"linear\"", "\"rope_type\": \"longrope\"", NULL,
     "rope type \"longrope\""},
    {"another architecture", "llama2_like", "config.json", "\"LlamaForCausalLM\"", "\"MistralForCausalLM\"", NULL, "MistralForCausalLM"},
    {"attention biases", "llama2_like", "config.json", "\"attention_bias\": false", "\"attention_bias\": true", NULL, "attention_bias"},
    {"malformed config.json", "llama2_like", "config.json", "\"hidden_size\": 128,", "\"hidden_size\": 128", NULL, "config.json"},
    {"heads not a multiple of kv heads", "llama2_like", "config.json", "\"num_key_value_heads\": 2", "\"num_key_value_heads\": 3", NULL,
     "num_key_value_heads"},
    {"config and weights disagree", "llama2_like", "config.json", "\"vocab_size\": 64", "\"vocab_size\": 65", NULL,
     "model.embed_tokens.weight"},
    {"absurd sizes", "llama2_like", "config.json", "\"num_hidden_layers\": 1", "\"num_hidden_layers\": 999999999", NULL, "implausibly"},
};

int main(void) {
    if (!file_exists(FIXTURES "/llama2_like/model.safetensors")) {
        printf("skip: the fixtures in " FIXTURES " are missing (run from the repository root)\n");
        return 77;
    }
    if (mkdir("build", 0755) != 0 && errno != EEXIST) die("cannot create build/");
    if (mkdir("build/tests", 0755) != 0 && errno != EEXIST) die("cannot create build/tests/");
    char keep[256];

    fresh_copy("rope_linear4_bf16", keep);
    expect_load("bf16 shards, untouched", keep);
    char shard[1024];
    remove(path_join(shard, sizeof shard, keep, "model-00002-of-00002.safetensors"));
    expect_fail("missing shard", keep, "model-00002-of-00002.safetensors");
    remove_dir(keep);

    fresh_copy("llama2_like", keep);
    expect_load("fp32 single file, untouched", keep);
    {
        char p[1024];
        size_t len;
        char *data = read_file(path_join(p, sizeof p, keep, "model.safetensors"), &len);
        if (!data || truncate(p, (off_t)(len * 3 / 5)) != 0) die("cannot truncate %s", p);
        free(data);
    }
    expect_fail("truncated file", keep, "model.safetensors");
    remove_dir(keep);

    for (size_t i = 0; i < sizeof broken / sizeof broken[0]; i++) {
        const BrokenCopy *c = &broken[i];
        fresh_copy(c->fixture, keep);
        if (c->edit) rewrite_safetensors(keep, c->file, c->edit);
        else edit_text(keep, c->file, c->from, c->to);
        expect_fail(c->what, keep, c->want);
        remove_dir(keep);
    }

    /* fp16 weights: the llama2_like model with every tensor stored as F16 loads to the same
     * logits within fp16 rounding (and not bit-identical: the conversion really happened) */
    fresh_copy("llama2_like", keep);
    rewrite_safetensors(keep, "model.safetensors", edit_to_f16);
    {
        Model m32, m16;
        if (model_try_load(&m32, FIXTURES "/llama2_like", 0) != 0) die("%s", last_error());
        if (!check_counted(model_try_load(&m16, keep, 0) == 0)) { printf("FAIL fp16 weights: %s\n", last_error()); }
        else {
            size_t B = 1, N = 11, V = (size_t)m32.cfg.vocab_size;
            int32_t tokens[11] = {1, 5, 9, 63, 0, 17, 17, 42, 8, 30, 2};
            Activations a32, a16;
            act_plan(&a32, &m32.cfg, B, N, 0);
            act_plan(&a16, &m16.cfg, B, N, 0);
            model_forward(&m32, &a32, tokens, NULL, B, N, NULL);
            model_forward(&m16, &a16, tokens, NULL, B, N, NULL);
            double md = 0, mr = 0;
            for (size_t i = 0; i < N * V; i++) {
                double diff = fabs((double)a16.logits[i] - a32.logits[i]);
                if (diff > md || diff != diff) md = diff;
                if (fabs(a32.logits[i]) > mr) mr = fabs(a32.logits[i]);
            }
            if (!check_counted(md / mr <= 5e-3 && md > 0)) { printf("FAIL fp16 weights: logits differ by %.3g relative (want (0, 5e-3])\n", md / mr); }
            else printf("ok   %-34s logits within %.2g of fp32\n", "fp16 weights", md / mr);
            act_free(&a32); act_free(&a16);
            model_free(&m16);
        }
        model_free(&m32);
    }
    remove_dir(keep);

    expect_fail("no such folder", "build/tests/no_such_model_folder", "no_such_model_folder");

    /* transformers 4's spelling: rope_theta at the top, rope_scaling {type, factor} */
    fresh_copy("rope_linear4", keep);
    {
        char p[1024];
        size_t len;
        char *s = read_file(path_join(p, sizeof p, keep, "config.json"), &len);
        char *at = s ? strstr(s, "\"rope_parameters\"") : NULL;
        char *end = at ? strchr(at, '}') : NULL;
        if (!end) die("fixture config.json has no rope_parameters");
        char out[4096];
        snprintf(out, sizeof out, "%.*s\"rope_theta\": 10000.0, \"rope_scaling\": {\"type\": \"linear\", \"factor\": 4.0}%s",
                 (int)(at - s), s, end + 1);
        write_text(keep, "config.json", out);
        free(s);
        Model m;
        if (!check_counted(model_try_load(&m, keep, 0) == 0)) { printf("FAIL transformers-4 config: %s\n", last_error()); }
        else {
            if (!check_counted(m.cfg.rope_factor == 4.0f && m.cfg.rope_theta == 10000.0f)) { printf("FAIL transformers-4 config: factor %g theta %g\n", m.cfg.rope_factor, m.cfg.rope_theta); }
            else printf("ok   %-34s loads with factor 4, theta 1e4\n", "transformers-4 rope_scaling");
            model_free(&m);
        }
    }
    remove_dir(keep);

    printf("%s: %d of %d loader checks failed\n", g_failures ? "FAIL" : "ok", g_failures, g_checks);
    return g_failures ? 1 : 0;
}
