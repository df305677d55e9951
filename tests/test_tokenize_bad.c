/* Hostile input: truncated and corrupted tokenizer.model / tokenizer.json images, unsupported
 * configurations, out-of-range ids and bad token files. Every one must end in one sentence
 * from the parser (no newline, no crash; the fuzz targets run the same parsers under ASan
 * and UBSan), and the CLI must print "error: ..." on one line and exit 1. The models are
 * built here, so this needs no shared data. */
#define STAGE 0
#include "01_tokenize.c"
#include "check.h"
#include <sys/wait.h>

#define OUT "build/tests/tok"

/* ---- a small SentencePiece model, written as protobuf ---- */
typedef struct { uint8_t *p; size_t n, cap; } Buf;
static void put(Buf *b, const void *d, size_t n) {
    if (b->n + n > b->cap) { b->cap = (b->n + n) * 2 + 64; b->p = (uint8_t *)xrealloc(b->p, b->cap); }
    memcpy(b->p + b->n, d, n);
    b->n += n;
}
static void put_varint(Buf *b, uint64_t v) { do { uint8_t c = (uint8_t)(v & 0x7f); v >>= 7; if (v) c |= 0x80; put(b, &c, 1); } while (v); }
static void put_bytes_field(Buf *b, int field, const void *d, size_t n) { put_varint(b, (uint64_t)field << 3 | 2); put_varint(b, n); put(b, d, n); }
static void put_varint_field(Buf *b, int field, uint64_t v) { put_varint(b, (uint64_t)field << 3); put_varint(b, v); }
static void put_piece(Buf *m, const char *text, float score, int type) {
    Buf p = {0};
    put_bytes_field(&p, 1, text, strlen(text));
    uint32_t u;
    memcpy(&u, &score, 4);
    put_varint(&p, 2 << 3 | 5);
    uint8_t le[4] = {(uint8_t)u, (uint8_t)(u >> 8), (uint8_t)(u >> 16), (uint8_t)(u >> 24)};
    put(&p, le, 4);
    if (type != PIECE_NORMAL) put_varint_field(&p, 3, (uint64_t)type);
    put_bytes_field(m, 1, p.p, p.n);
    free(p.p);
}
/* options: model_type, charsmap (1: add a precompiled map), unk (0: no unknown piece), bytes */
static Buf make_spm(int model_type, int charsmap, int unk, int bytes) {
    Buf m = {0};
    if (unk) put_piece(&m, "<unk>", 0, PIECE_UNKNOWN);
    put_piece(&m, "<s>", 0, PIECE_CONTROL);
    put_piece(&m, "</s>", 0, PIECE_CONTROL);
    for (int b = 0; b < bytes; b++) { char s[8]; snprintf(s, sizeof s, "<0x%02X>", b); put_piece(&m, s, 0, PIECE_BYTE); }
#define SP "\xE2\x96\x81" /* U+2581 */
    const char *pieces[] = {SP "t", "he", SP "the", SP "a", "an", SP "an", "d", SP "and", SP, "t", "h", "e", "a", "n", "\xC3\xA9"};
    for (int i = 0; i < 15; i++) put_piece(&m, pieces[i], -(float)i, PIECE_NORMAL);
    Buf trainer = {0}, norm = {0};
    put_varint_field(&trainer, 3, (uint64_t)model_type);
    put_varint_field(&trainer, 35, 1);
    put_bytes_field(&norm, 1, "identity", 8);
    if (charsmap) put_bytes_field(&norm, 2, "\x01\x02\x03\x04", 4);
    put_varint_field(&norm, 4, 0);
    put_bytes_field(&m, 2, trainer.p, trainer.n);
    put_bytes_field(&m, 3, norm.p, norm.n);
    free(trainer.p); free(norm.p);
    return m;
}

/* ---- a small byte-level tokenizer.json ---- */
static char *make_json(const char *pre, const char *norm, const char *model_type, int pair_merges, const char *extra_merge) {
    uint32_t b2c[256];
    int16_t c2b[512];
    bytelevel_alphabet(b2c, c2b);
    TokText j = {0};
    char tmp[512];
    snprintf(tmp, sizeof tmp, "{\"version\":\"1.0\",\"added_tokens\":[{\"id\":262,\"content\":\"<|endoftext|>\",\"single_word\":false,"
             "\"lstrip\":false,\"rstrip\":false,\"normalized\":false,\"special\":true}],\"normalizer\":%s,\"pre_tokenizer\":%s,"
             "\"post_processor\":null,\"decoder\":{\"type\":\"ByteLevel\"},\"model\":{\"type\":\"%s\",\"dropout\":null,\"unk_token\":null,"
             "\"ignore_merges\":false,\"vocab\":{", norm, pre, model_type);
    text_put(&j, tmp, strlen(tmp));
    for (int b = 0; b < 256; b++) {
        char u[8];
        size_t n = utf8_encode(b2c[b], u);
        text_put(&j, b ? ",\"" : "\"", b ? 2 : 1);
        if (b == '"' || b == '\\') text_put(&j, "\\", 1);
        text_put(&j, u, n);
        snprintf(tmp, sizeof tmp, "\":%d", b);
        text_put(&j, tmp, strlen(tmp));
    }
#define G "\xC4\xA0" /* U+0120, the space byte */
    const char *merged[] = {"th", "the", G "t", G "the", "an", G "an"};
    for (int i = 0; i < 6; i++) { snprintf(tmp, sizeof tmp, ",\"%s\":%d", merged[i], 256 + i); text_put(&j, tmp, strlen(tmp)); }
    const char *merges[][2] = {{"t", "h"}, {"th", "e"}, {G, "t"}, {G, "the"}, {"a", "n"}, {G, "an"}};
    text_put(&j, "},\"merges\":[", 12);
    for (int i = 0; i < 6; i++) {
        if (pair_merges) snprintf(tmp, sizeof tmp, "%s[\"%s\",\"%s\"]", i ? "," : "", merges[i][0], merges[i][1]);
        else snprintf(tmp, sizeof tmp, "%s\"%s %s\"", i ? "," : "", merges[i][0], merges[i][1]);
        text_put(&j, tmp, strlen(tmp));
    }
    if (extra_merge) text_put(&j, extra_merge, strlen(extra_merge));
    text_put(&j, "]}}", 3);
    return j.data;
}

static int one_sentence(const char *msg) { return msg && msg[0] && !strchr(msg, '\n') && strlen(msg) < 600; }

/* Loading must fail with one sentence, or succeed and then encode/decode without trouble. */
static int try_spm(const uint8_t *d, size_t n) {
    Tokenizer t;
    g_last_error[0] = 0;
    if (tok_load_spm_bytes(&t, d, n, "mutant.model") != 0) { EXPECT(one_sentence(g_last_error), "spm error message: '%s'", g_last_error); return 0; }
    size_t k;
    int32_t *ids = tok_encode(&t, "the and \xC3\xA9 \xF0\x9F\xA6\x99 x", 17, 1, &k);
    char *s = tok_decode(&t, ids, k, NULL);
    free(ids); free(s);
    tok_free(&t);
    return 1;
}
static int try_json(const char *d, size_t n) {
    Tokenizer t;
    g_last_error[0] = 0;
    if (tok_load_json_bytes(&t, d, n, NULL, "mutant.json") != 0) { EXPECT(one_sentence(g_last_error), "json error message: '%s'", g_last_error); return 0; }
    size_t k;
    int32_t *ids = tok_encode(&t, "the and <|endoftext|> \xC3\xA9 x", 24, 1, &k);
    char *s = tok_decode(&t, ids, k, NULL);
    free(ids); free(s);
    tok_free(&t);
    return 1;
}

/* Runs the CLI; wants exit 1 and stderr one line "error: ..." mentioning `mention`. */
static void cli_fails(const char *args, const char *mention) {
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "./01_tokenize %s >/dev/null 2>" OUT "/stderr.txt", args);
    int rc = system(cmd);
    size_t len = 0;
    char *err = read_file(OUT "/stderr.txt", &len);
    int lines = 0;
    for (size_t i = 0; err && i < len; i++) lines += err[i] == '\n';
    EXPECT(WIFEXITED(rc) && WEXITSTATUS(rc) == 1 && err && strncmp(err, "error: ", 7) == 0 && lines == 1 && strstr(err, mention),
           "./01_tokenize %s: exit %d, stderr '%s' (want one line mentioning '%s')", args, WIFEXITED(rc) ? WEXITSTATUS(rc) : -1, err ? err : "", mention);
    free(err);
}

int main(void) {
    if (system("mkdir -p " OUT) != 0) { printf("FAIL: cannot create %s\n", OUT); return 1; }
    Rng rng;
    rng_seed(&rng, 1234);

    /* ---- tokenizer.model ---- */
    Buf good = make_spm(2, 0, 1, 256);
    Tokenizer t;
    EXPECT(tok_load_spm_bytes(&t, good.p, good.n, "good.model") == 0, "the valid model does not load: %s", last_error());
    size_t n;
    int32_t *ids = tok_encode(&t, "the and", 7, 0, &n);
    EXPECT(n == 2 && ids[0] == 261 && ids[1] == 266, "the small model encodes 'the and' as %zu ids", n);
    free(ids);
    /* out-of-range ids */
    int32_t bad_ids[2][2] = {{5, t.vocab_size}, {-1, 5}};
    for (int i = 0; i < 2; i++) {
        char *s = tok_decode(&t, bad_ids[i], 2, NULL);
        EXPECT(!s && one_sentence(last_error()) && strstr(last_error(), "out of range"), "decoding a bad id gave '%s'", s ? s : last_error());
        free(s);
    }
    tok_free(&t);
    int loaded = 0, tries = 0;
    for (size_t cut = 0; cut < good.n; cut += 1 + cut / 64, tries++) loaded += try_spm(good.p, cut);
    for (int m = 0; m < 3000; m++, tries++) {
        uint8_t *d = (uint8_t *)xmalloc(good.n);
        memcpy(d, good.p, good.n);
        int flips = 1 + (int)rng_below(&rng, 4);
        for (int f = 0; f < flips; f++) d[rng_below(&rng, good.n)] = (uint8_t)rng_u32(&rng);
        loaded += try_spm(d, good.n);
        free(d);
    }
    printf("tokenizer.model: %d truncated/corrupted images, %d still loaded, the rest failed with one sentence\n", tries, loaded);
    struct { Buf m; const char *want; } spm_bad[] = {
        {make_spm(1, 0, 1, 256), "model type 1 is not supported"},
        {make_spm(2, 1, 1, 256), "precompiled character map"},
        {make_spm(2, 0, 0, 256), "no unknown piece"},
        {make_spm(2, 0, 1, 200), "byte_fallback is on but piece <0xC8> is missing"},
    };
    for (int i = 0; i < 4; i++) {
        EXPECT(tok_load_spm_bytes(&t, spm_bad[i].m.p, spm_bad[i].m.n, "bad.model") != 0 && strstr(last_error(), spm_bad[i].want),
               "want an error with '%s', got '%s'", spm_bad[i].want, last_error());
        free(spm_bad[i].m.p);
    }
    EXPECT(write_file_atomic(OUT "/good.model", good.p, good.n) == 0, "write");
    EXPECT(write_file_atomic(OUT "/truncated.model", good.p, good.n / 2) == 0, "write");
    free(good.p);

    /* ---- tokenizer.json ---- */
    const char *bl = "{\"type\":\"ByteLevel\",\"add_prefix_space\":false,\"trim_offsets\":true,\"use_regex\":true}";
    char *gj = make_json(bl, "null", "BPE", 0, NULL);
    char *gj2 = make_json(bl, "null", "BPE", 1, NULL);
    size_t gl = strlen(gj);
    EXPECT(tok_load_json_bytes(&t, gj, gl, NULL, "good.json") == 0, "the valid tokenizer.json does not load: %s", last_error());
    ids = tok_encode(&t, " the an<|endoftext|>", 20, 0, &n);
    EXPECT(n == 3 && ids[0] == 259 && ids[1] == 261 && ids[2] == 262, "the small tokenizer.json encodes ' the an<|endoftext|>' as %zu ids", n);
    free(ids);
    EXPECT(t.eos_id == 262, "EOS id %d", t.eos_id);
    tok_free(&t);
    EXPECT(tok_load_json_bytes(&t, gj2, strlen(gj2), NULL, "pairs.json") == 0, "merges as pairs do not load: %s", last_error());
    tok_free(&t);
    loaded = 0; tries = 0;
    for (size_t cut = 0; cut < gl; cut += 1 + cut / 64, tries++) loaded += try_json(gj, cut);
    for (int m = 0; m < 3000; m++, tries++) {
        char *d = (char *)xmalloc(gl);
        memcpy(d, gj, gl);
        int flips = 1 + (int)rng_below(&rng, 4);
        for (int f = 0; f < flips; f++) {
            size_t at = rng_below(&rng, gl);
            d[at] = rng_below(&rng, 2) ? (char)rng_u32(&rng) : "{}[]\":,0 9-"[rng_below(&rng, 11)];
        }
        loaded += try_json(d, gl);
        free(d);
    }
    printf("tokenizer.json: %d truncated/corrupted images, %d still loaded, the rest failed with one sentence\n", tries, loaded);
    struct { char *j; const char *want; } json_bad[] = {
        {make_json(bl, "{\"type\":\"NFKC\"}", "BPE", 0, NULL), "normalizer 'NFKC' is not supported"},
        {make_json(bl, "null", "WordPiece", 0, NULL), "model type 'WordPiece' is not supported"},
        {make_json("{\"type\":\"Whitespace\"}", "null", "BPE", 0, NULL), "pre_tokenizer type 'Whitespace' is not supported"},
        {make_json("{\"type\":\"Sequence\",\"pretokenizers\":[{\"type\":\"Split\",\"pattern\":{\"Regex\":\"\\\\w+\"},\"behavior\":\"Isolated\",\"invert\":false},"
                   "{\"type\":\"ByteLevel\",\"use_regex\":false}]}", "null", "BPE", 0, NULL), "is not one we implement"},
        {make_json("null", "null", "BPE", 0, NULL), "no pre_tokenizer"},
        {make_json(bl, "null", "BPE", 0, ",\"x y\""), "not in the vocabulary"},
        {make_json(bl, "null", "BPE", 0, ",\"xy\""), "not two tokens"},
        {make_json(bl, "null", "BPE", 0, ",[\"t\"]"), "neither a string nor a pair"},
    };
    for (size_t i = 0; i < COUNT_OF(json_bad); i++) {
        EXPECT(tok_load_json_bytes(&t, json_bad[i].j, strlen(json_bad[i].j), NULL, "bad.json") != 0 && strstr(last_error(), json_bad[i].want),
               "want an error with '%s', got '%s'", json_bad[i].want, last_error());
        free(json_bad[i].j);
    }
    EXPECT(write_file_atomic(OUT "/good.json", gj, gl) == 0, "write");
    EXPECT(write_file_atomic(OUT "/truncated.json", gj, gl - 10) == 0, "write");
    free(gj); free(gj2);

    /* ---- the CLI ---- */
    if (!file_exists("01_tokenize")) { printf("FAIL: ./01_tokenize is not built (make 01_tokenize)\n"); return 1; }
    int32_t far[3] = {5, 100000, 6};
    EXPECT(tokfile_write(OUT "/bad_ids.bin", far, 3, 300) != 0 || 1, "write");
    EXPECT(write_file_atomic(OUT "/short.bin", "LLTK\x01\0\0\0\x02\0\0\0\x09\0\0\0\0\0\0\0\x05\0", 22) == 0, "write");
    EXPECT(write_file_atomic(OUT "/empty.model", "", 0) == 0, "write");
    cli_fails("--tokenizer " OUT "/truncated.model hello", "truncated.model");
    cli_fails("--tokenizer " OUT "/truncated.json hello", "truncated.json");
    cli_fails("--tokenizer " OUT "/empty.model hello", "empty.model");
    cli_fails("--tokenizer " OUT "/no-such-file hello", "no-such-file");
    cli_fails("--tokenizer " OUT " hello", "neither tokenizer.model nor tokenizer.json");
    cli_fails("--tokenizer " OUT "/good.model --decode-file " OUT "/bad_ids.bin", "out of range");
    cli_fails("--tokenizer " OUT "/good.json --decode-file " OUT "/bad_ids.bin", "out of range");
    cli_fails("--tokenizer " OUT "/good.model --decode-file " OUT "/short.bin", "short.bin");
    cli_fails("--tokenizer " OUT "/good.model --encode-file " OUT "/no-such.txt --out " OUT "/x.bin", "no-such.txt");
    if (g_failures) { printf("%d of %d checks failed\n", g_failures, g_checks); return 1; }
    printf("bad tokenizer files, unsupported configurations, bad ids and token files all end in one clear error (%d checks)\n", g_checks);
    return 0;
}
