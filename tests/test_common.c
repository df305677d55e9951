/* test_common.c: unit tests for common.h.
 *
 * JSON: accepts what RFC 8259 accepts (escapes, surrogate pairs, numbers) and rejects
 * what it rejects (trailing commas, bad escapes, lone surrogates, invalid UTF-8, deep
 * nesting, trailing garbage). safetensors: round trip through the writer, then every kind
 * of corruption (truncation, bad header length, offsets past the end, overlapping tensors,
 * dtype/shape that disagree with the byte count, duplicate names) is rejected with a
 * sentence. bf16/fp16: exhaustive against the compiler's own conversions or an exact
 * rounding rule. Token files: round trip and rejection of corrupt headers.
 */
#include "common.h"

#include "check.h"

static Json *parse_str(const char *s) { return json_parse(s, strlen(s)); }

static void test_json_accepts(void) {
    const char *good[] = {
        "0", "-0", "1.5e-3", "-12.25E+2", "true", "false", "null", "\"\"", "[]", "{}",
        " [1, 2 ,3 ] ", "{\"a\":{\"b\":[{}]}}", "\"\\u00e9\\ud83d\\ude00\\n\\t\\\"\\\\\\/\"",
        "\"caf\xc3\xa9 \xe4\xb8\xad \xf0\x9f\x98\x80\"",
    };
    for (size_t i = 0; i < sizeof good / sizeof *good; i++) {
        Json *j = parse_str(good[i]);
        EXPECT(j != NULL, "valid JSON rejected: %s (%s)", good[i], last_error());
        json_free(j);
    }
    Json *j = parse_str("{\"n\": -12.25E+2, \"s\": \"a\\u00e9\\ud83d\\ude00\", \"a\": [1, [2]], \"t\": true, \"k\": 1, \"k\": 2}");
    EXPECT(j && json_get_number(j, "n", 0) == -1225.0, "number value");
    EXPECT(j && strcmp(json_get_string(j, "s", ""), "a\xc3\xa9\xf0\x9f\x98\x80") == 0, "escapes decode to UTF-8");
    EXPECT(j && json_get_type(j, "a", JSON_ARRAY)->count == 2, "array count");
    EXPECT(j && json_get_bool(j, "t", 0) == 1, "bool");
    EXPECT(j && json_get_number(j, "k", 0) == 2.0, "last duplicate key wins");
    EXPECT(j && json_get(j, "missing") == NULL, "missing key is NULL");
    EXPECT(j && json_get_string(j, "n", NULL) == NULL, "typed lookup rejects another type");
    json_free(j);
    /* embedded NUL via \u0000 keeps its length */
    j = parse_str("\"a\\u0000b\"");
    EXPECT(j && j->len == 3 && j->string[1] == 0, "\\u0000 kept with its length");
    json_free(j);
}

static void test_json_rejects(void) {
    const char *bad[] = {
        "", " ", "[1,]", "{\"a\":1,}", "[1 2]", "{\"a\" 1}", "{a:1}", "01", "1.", ".5", "1e", "+1", "-",
        "\"abc", "\"\\x\"", "\"\\u12\"", "\"\\ud800\"", "\"\\udc00\"", "\"\\ud800\\u0041\"", "\"a\tb\"",
        "\"\xff\"", "\"\xc0\xaf\"", "\"\xed\xa0\x80\"", "\"\xf4\x90\x80\x80\"", "tru", "nul", "[1] x",
        "{\"a\":1}}", "[", "{", "NaN", "Infinity", "\"\\", "[\"\\u00\"]",
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        Json *j = parse_str(bad[i]);
        EXPECT(j == NULL, "invalid JSON accepted: [%s]", bad[i]);
        EXPECT(strstr(last_error(), "JSON") != NULL, "error sentence mentions JSON: %s", last_error());
        json_free(j);
    }
    /* nesting past the limit is refused, not a stack overflow */
    size_t depth = 100000;
    char *deep = (char *)xmalloc(2 * depth + 1);
    for (size_t i = 0; i < depth; i++) { deep[i] = '['; deep[depth + i] = ']'; }
    deep[2 * depth] = 0;
    Json *j = parse_str(deep);
    EXPECT(j == NULL && strstr(last_error(), "deep"), "deep nesting rejected (%s)", last_error());
    json_free(j);
    /* within the limit is fine */
    memset(deep, 0, 2 * depth + 1);
    for (int i = 0; i < 100; i++) { deep[i] = '['; deep[100 + i] = ']'; }
    j = parse_str(deep);
    EXPECT(j != NULL, "nesting of 100 accepted");
    json_free(j);
    free(deep);
    /* every prefix of a valid document is rejected (truncation) */
    const char *doc = "{\"dtype\":\"BF16\",\"shape\":[2,3],\"data_offsets\":[0,12],\"s\":\"\\ud83d\\ude00\"}";
    for (size_t n = 0; n < strlen(doc); n++) {
        Json *t = json_parse(doc, n);
        EXPECT(t == NULL, "truncated JSON of %zu bytes accepted", n);
        json_free(t);
    }
}

/* ---- safetensors ---- */

static const char *tmp_path(const char *name) {
    static char buf[512];
    mkdir("build", 0755);
    mkdir("build/tmp", 0755);
    snprintf(buf, sizeof buf, "build/tmp/%s", name);
    return buf;
}

static uint8_t *write_and_read(const StWriter *w, const char *path, size_t *len) {
    EXPECT(st_write(w, path) == 0, "st_write failed: %s", last_error());
    char *raw = read_file(path, len);
    EXPECT(raw != NULL, "read back %s", path);
    return (uint8_t *)raw;
}

/* Builds a file image from a header string and a body of body_len bytes. */
static uint8_t *make_image(const char *header, size_t body_len, size_t *len) {
    size_t h = strlen(header);
    *len = 8 + h + body_len;
    uint8_t *img = (uint8_t *)xcalloc(*len, 1);
    for (int i = 0; i < 8; i++) img[i] = (uint8_t)(((uint64_t)h >> (8 * i)) & 0xff);
    memcpy(img + 8, header, h);
    for (size_t i = 0; i < body_len; i++) img[8 + h + i] = (uint8_t)i;
    return img;
}

static int parse_image(const uint8_t *img, size_t len) {
    SafeTensors st;
    memset(&st, 0, sizeof st);
    int rc = st_parse(&st, img, len, "test.safetensors");
    if (rc == 0) { for (size_t i = 0; i < st.count; i++) free(st.tensors[i].name); free(st.tensors); }
    return rc;
}

static void test_safetensors(void) {
    /* round trip through the writer and the mmap reader */
    float a[6] = {1.5f, -2.0f, 3.25f, 0.0f, -0.5f, 1e-3f};
    uint16_t b[4];
    for (int i = 0; i < 4; i++) b[i] = f32_to_bf16((float)i - 1.5f);
    int64_t sa[2] = {2, 3}, sb[1] = {4}, sc[1] = {0};
    StWriter w;
    memset(&w, 0, sizeof w);
    st_writer_add(&w, "layer.0.weight", DT_F32, 2, sa, a);
    st_writer_add(&w, "b\"quoted\\name", DT_BF16, 1, sb, b);
    st_writer_add(&w, "empty", DT_F32, 1, sc, NULL);
    w.metadata_json = (char *)"{\"format\":\"pt\"}";
    const char *path = tmp_path("rt.safetensors");
    size_t len;
    uint8_t *img = write_and_read(&w, path, &len);
    st_writer_free(&w);
    SafeTensors st;
    EXPECT(st_open(&st, path) == 0, "st_open: %s", last_error());
    EXPECT(st.count == 3, "three tensors, got %zu", st.count);
    const StTensor *ta = st_find(&st, "layer.0.weight"), *tb = st_find(&st, "b\"quoted\\name");
    EXPECT(ta && ta->ndim == 2 && ta->shape[0] == 2 && ta->shape[1] == 3 && ta->dtype == DT_F32, "shape/dtype of a");
    EXPECT(tb && tb->numel == 4 && tb->dtype == DT_BF16, "shape/dtype of b");
    EXPECT(st_find(&st, "nope") == NULL, "missing tensor is NULL");
    EXPECT(((size_t)(ta->data - st.file.data)) % 8 == 0, "data section 8-byte aligned");
    float out[6];
    EXPECT(ta && st_to_f32(ta, out) == 0 && memcmp(out, a, sizeof a) == 0, "f32 data round trip");
    EXPECT(tb && st_to_f32(tb, out) == 0 && out[0] == -1.5f && out[3] == 1.5f, "bf16 data converts");
    int64_t want[2] = {3, 2};
    EXPECT(ta && st_check_shape(ta, 2, want) != 0 && strstr(last_error(), "layer.0.weight"), "shape mismatch names the tensor: %s", last_error());
    st_close(&st);

    /* every truncation of a valid file is rejected */
    for (size_t n = 0; n < len; n += (n < 64 ? 1 : 7)) {
        EXPECT(parse_image(img, n) != 0, "truncated file of %zu/%zu bytes accepted", n, len);
    }
    free(img);

    /* hand-made corruptions */
    struct { const char *header; size_t body; const char *why; } cases[] = {
        {"{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 4, "offsets past the end"},
        {"{\"x\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", 8, "byte count disagrees with shape"},
        {"{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},\"y\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", 12, "overlap"},
        {"{\"x\":{\"dtype\":\"Q4\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8, "unknown dtype"},
        {"{\"x\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}", 8, "negative dim"},
        {"{\"x\":{\"dtype\":\"F32\",\"shape\":[2.5],\"data_offsets\":[0,8]}}", 8, "fractional dim"},
        {"{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,0]}}", 8, "reversed offsets"},
        {"{\"x\":{\"dtype\":\"F32\",\"shape\":[2]}}", 8, "missing offsets"},
        {"{\"x\":{\"shape\":[2],\"data_offsets\":[0,8]}}", 8, "missing dtype"},
        {"{\"x\":[1,2]}", 8, "entry not an object"},
        {"[1,2]", 8, "header not an object"},
        {"{\"x\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,4294967296],\"data_offsets\":[0,8]}}", 8, "shape overflow"},
        {"{\"x\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,4]}}", 4, "too many dims"},
        {"{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}}", 16, "duplicate name"},
        {"{\"__metadata__\":[1],\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8, "metadata not an object"},
        {"{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]", 8, "malformed JSON"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        size_t n;
        uint8_t *bad = make_image(cases[i].header, cases[i].body, &n);
        EXPECT(parse_image(bad, n) != 0, "corrupt safetensors accepted: %s", cases[i].why);
        EXPECT(strstr(last_error(), "test.safetensors") != NULL, "error names the file: %s", last_error());
        free(bad);
    }
    /* a header length larger than the file */
    size_t n;
    uint8_t *bad = make_image("{}", 0, &n);
    bad[0] = 0xff; bad[3] = 0x01;
    EXPECT(parse_image(bad, n) != 0, "huge header length accepted");
    free(bad);
    /* and a valid hand-made one is accepted */
    uint8_t *ok = make_image("{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},\"y\":{\"dtype\":\"BF16\",\"shape\":[],\"data_offsets\":[8,10]}}", 10, &n);
    EXPECT(parse_image(ok, n) == 0, "valid hand-made file rejected: %s", last_error());
    free(ok);
    /* missing files give a sentence with the path */
    EXPECT(st_open(&st, "build/tmp/does-not-exist.safetensors") != 0 && strstr(last_error(), "does-not-exist"), "missing file: %s", last_error());
}

/* ---- number formats ---- */

/* Exact round-to-nearest-even to bf16 computed with integer arithmetic on a different path:
 * pick the nearer of the two neighbours by comparing doubles. */
static uint16_t ref_f32_to_bf16(float f) {
    if (isnan(f)) return 0x7fc0;
    uint32_t u;
    memcpy(&u, &f, 4);
    uint16_t lo = (uint16_t)(u >> 16), hi = (uint16_t)(lo + 1);
    if ((u & 0xffff) == 0) return lo;
    double x = f, dl = fabs(x - (double)bf16_to_f32(lo)), dh = fabs((double)bf16_to_f32(hi) - x);
    if (isinf(bf16_to_f32(hi)) && !isinf(f)) { /* rounding up overflows: compare with 2^128 */
        dh = ldexp(1.0, 128) - fabs(x);
    }
    if (dl < dh) return lo;
    if (dh < dl) return hi;
    return (lo & 1) ? hi : lo;
}

static void test_number_formats(void) {
    Rng r;
    rng_seed(&r, (uint64_t)time(NULL));
    /* bf16: every bf16 value round-trips; random floats round like the reference */
    for (uint32_t h = 0; h < 65536; h++) {
        float f = bf16_to_f32((uint16_t)h);
        uint16_t back = f32_to_bf16(f);
        if (isnan(f)) EXPECT(isnan(bf16_to_f32(back)), "bf16 NaN stays NaN (%04x)", h);
        else EXPECT(back == h, "bf16 %04x round trip gave %04x", h, back);
    }
    int bad = 0;
    for (int i = 0; i < 2000000; i++) {
        uint32_t u = rng_u32(&r);
        if (i % 4 == 0) u = (u & 0xffff0000u) | 0x8000u; /* exact ties */
        float f;
        memcpy(&f, &u, 4);
        if (f32_to_bf16(f) != ref_f32_to_bf16(f) && !isnan(f)) bad++;
    }
    EXPECT(bad == 0, "%d random floats rounded to bf16 differently from the reference", bad);
#if defined(__FLT16_MAX__) && !defined(__clang__)
    /* fp16 against the compiler's _Float16 */
    for (uint32_t h = 0; h < 65536; h++) {
        uint16_t hh = (uint16_t)h;
        _Float16 x;
        memcpy(&x, &hh, 2);
        float want = (float)x, got = f16_to_f32(hh);
        EXPECT((isnan(want) && isnan(got)) || memcmp(&want, &got, 4) == 0, "f16 %04x -> %g, want %g", h, got, want);
    }
    bad = 0;
    for (int i = 0; i < 2000000; i++) {
        uint32_t u = rng_u32(&r);
        if (i % 2) u = (u & 0x8fffffffu) | 0x30000000u; /* bias towards fp16's range */
        float f;
        memcpy(&f, &u, 4);
        _Float16 x = (_Float16)f;
        uint16_t want;
        memcpy(&want, &x, 2);
        uint16_t got = f32_to_f16(f);
        if (isnan(f)) { if ((got & 0x7c00) != 0x7c00 || !(got & 0x3ff)) bad++; }
        else if (got != want) { if (bad < 5) printf("f32 %a -> f16 %04x, want %04x\n", f, got, want); bad++; }
    }
    EXPECT(bad == 0, "%d random floats rounded to fp16 differently from _Float16", bad);
#else
    printf("note: no _Float16 in this compiler; fp16 checked by round trip only\n");
    for (uint32_t h = 0; h < 65536; h++) {
        float f = f16_to_f32((uint16_t)h);
        if (!isnan(f)) EXPECT(f32_to_f16(f) == h, "f16 %04x round trip", h);
    }
#endif
}

static void test_rng(void) {
    Rng a, b;
    rng_seed(&a, 42);
    rng_seed(&b, 42);
    int same = 1;
    for (int i = 0; i < 1000; i++) same &= rng_u64(&a) == rng_u64(&b);
    EXPECT(same, "same seed, same stream");
    double sum = 0, sq = 0;
    int n = 200000;
    for (int i = 0; i < n; i++) { double x = rng_normal(&a); sum += x; sq += x * x; }
    EXPECT(fabs(sum / n) < 0.02 && fabs(sq / n - 1.0) < 0.02, "normal has mean 0, variance 1 (%g, %g)", sum / n, sq / n);
    float lo = 1, hi = 0;
    for (int i = 0; i < n; i++) { float u = rng_uniform(&a); lo = u < lo ? u : lo; hi = u > hi ? u : hi; }
    EXPECT(lo >= 0.0f && hi < 1.0f && lo < 0.001f && hi > 0.999f, "uniform in [0,1)");
}

static void test_tokfile(void) {
    const char *path = tmp_path("tokens.bin");
    Rng r;
    rng_seed(&r, 7);
    int vocab[2] = {32000, 128256};
    for (int v = 0; v < 2; v++) {
        size_t n = 12345;
        int32_t *ids = (int32_t *)xmalloc(n * sizeof(int32_t));
        for (size_t i = 0; i < n; i++) ids[i] = (int32_t)rng_below(&r, (uint64_t)vocab[v]);
        EXPECT(tokfile_write(path, ids, n, vocab[v]) == 0, "tokfile_write: %s", last_error());
        size_t got_n = 0;
        int32_t *got = tokfile_read(path, &got_n);
        EXPECT(got && got_n == n && memcmp(got, ids, n * sizeof(int32_t)) == 0, "token file round trip (vocab %d)", vocab[v]);
        free(got);
        free(ids);
    }
    /* corruptions */
    size_t len;
    char *raw = read_file(path, &len);
    const char *bad_path = tmp_path("bad_tokens.bin");
    char *copy = (char *)xmalloc(len);
    memcpy(copy, raw, len); copy[0] = 'X';
    write_file_atomic(bad_path, copy, len);
    size_t n;
    EXPECT(tokfile_read(bad_path, &n) == NULL && strstr(last_error(), "magic"), "bad magic: %s", last_error());
    memcpy(copy, raw, len); copy[4] = 9;
    write_file_atomic(bad_path, copy, len);
    EXPECT(tokfile_read(bad_path, &n) == NULL && strstr(last_error(), "version"), "bad version: %s", last_error());
    memcpy(copy, raw, len);
    write_file_atomic(bad_path, copy, len - 3);
    EXPECT(tokfile_read(bad_path, &n) == NULL, "truncated token file accepted");
    memcpy(copy, raw, len); copy[8] = 3;
    write_file_atomic(bad_path, copy, len);
    EXPECT(tokfile_read(bad_path, &n) == NULL, "bad width accepted");
    free(copy);
    free(raw);
}

static void test_atomic_write(void) {
    const char *path = tmp_path("keep.txt");
    EXPECT(write_file_atomic(path, "old", 3) == 0, "write");
    /* a failed write (into a folder that does not exist) leaves nothing behind and the old file intact */
    EXPECT(write_file_atomic("build/tmp/no/such/dir/x", "new", 3) != 0, "write into a missing folder fails");
    AtomicFile af;
    EXPECT(atomic_open(&af, path) == 0, "open");
    fputs("partial", af.f);
    atomic_abort(&af);
    size_t len;
    char *got = read_file(path, &len);
    EXPECT(got && len == 3 && memcmp(got, "old", 3) == 0, "aborted write keeps the old content");
    free(got);
    EXPECT(!file_exists(af.tmp_path), "aborted write removes its temporary");
    EXPECT(write_file_atomic(path, "new!", 4) == 0, "overwrite");
    got = read_file(path, &len);
    EXPECT(got && len == 4 && memcmp(got, "new!", 4) == 0, "committed write replaces the file");
    free(got);
}

static void test_s2_bounds(void) {
    /* s2_first_key against a brute-force segment list built from docs/DESIGN.md's words */
    size_t Ns[3] = {16, 48, 40};
    size_t Gs[3] = {4, 12, 10};
    for (int c = 0; c < 3; c++) {
        size_t N = Ns[c], G = Gs[c], S = G / 2;
        int H = 5;
        for (int h = 0; h < H; h++) {
            for (size_t i = 0; i < N; i++) {
                size_t start;
                if (h < H / 2) start = i - i % G;
                else {
                    /* segments [0,S), [S,S+G), ... up to N */
                    start = 0;
                    for (size_t s = S; s < N; s += G) if (s <= i) start = s;
                }
                EXPECT(s2_first_key(i, h, H, G) == start, "s2 bound N=%zu G=%zu h=%d i=%zu: %zu vs %zu", N, G, h, i, s2_first_key(i, h, H, G), start);
            }
        }
        /* s2_segment_end against a scan: one past the last query whose window holds key j */
        for (int h = 0; h < H; h++)
            for (size_t g = 0; g <= G; g += G) /* the group, and G = 0 (full attention) */
                for (size_t j = 0; j < N; j++) {
                    size_t end = j + 1;
                    while (end < N && s2_first_key(end, h, H, g) <= j) end++;
                    EXPECT(s2_segment_end(j, h, H, g, N) == end, "s2 segment end N=%zu G=%zu h=%d j=%zu: %zu vs %zu", N, g, h, j,
                           s2_segment_end(j, h, H, g, N), end);
                }
        EXPECT(s2_first_key(N - 1, 0, H, 0) == 0, "G=0 is full attention");
        EXPECT(s2_first_key(N - 1, H - 1, H, N) == N / 2, "shifted head at G=N: last segment starts at N/2");
    }
    /* s2_head_pairs (closed form) against the sum of the windows s2_first_key gives, for
     * groups that divide N and groups that do not, G >= N, G = 1 and G = 0, odd H */
    const size_t pair_Ns[] = {1, 7, 16, 24, 33, 100, 4096};
    const size_t pair_Gs[] = {0, 1, 2, 3, 4, 6, 8, 10, 16, 100, 1024, 5000};
    const int pair_Hs[] = {1, 2, 9};
    for (size_t a = 0; a < sizeof pair_Ns / sizeof *pair_Ns; a++)
        for (size_t c = 0; c < sizeof pair_Gs / sizeof *pair_Gs; c++)
            for (size_t e = 0; e < sizeof pair_Hs / sizeof *pair_Hs; e++) {
                const size_t N = pair_Ns[a], G = pair_Gs[c];
                const int H = pair_Hs[e];
                for (int h = 0; h < H; h++) {
                    double scan = 0;
                    for (size_t i = 0; i < N; i++) scan += (double)(i - s2_first_key(i, h, H, G) + 1);
                    EXPECT(s2_head_pairs(N, h, H, G, 1) == scan, "s2 pairs N=%zu G=%zu H=%d h=%d: %.1f vs a scan's %.1f", N, G, H, h,
                           s2_head_pairs(N, h, H, G, 1), scan);
                    EXPECT(s2_head_pairs(N, h, H, G, 0) == scan - (double)N / 2, "s2 pairs without the diagonal N=%zu G=%zu H=%d h=%d", N,
                           G, H, h);
                }
            }
}

int main(void) {
    test_json_accepts();
    test_json_rejects();
    test_safetensors();
    test_number_formats();
    test_rng();
    test_tokfile();
    test_atomic_write();
    test_s2_bounds();
    printf("common.h: %d checks, %d failed\n", g_checks, g_failures);
    return g_failures ? 1 : 0;
}
