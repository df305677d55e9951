/* Shared by the tokenizer tests that compare against the reference libraries: running the
 * Python side (tests/tokenize_ref.py through $PYTHON) and checking a fixture it wrote.
 * Include after 01_tokenize.c. */
#include <sys/wait.h>

#define TOK_OUT "build/tests/tok"

/* Runs "$PYTHON tests/tokenize_ref.py ARGS"; returns its exit status. */
static int run_ref(const char *fmt, ...) {
    const char *py = getenv("PYTHON");
    if (!py || !py[0]) py = "python3";
    char args[2048], cmd[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(args, sizeof args, fmt, ap);
    va_end(ap);
    snprintf(cmd, sizeof cmd, "\"%s\" tests/tokenize_ref.py %s", py, args);
    fflush(stdout);
    int rc = system(cmd);
    if (rc == -1 || !WIFEXITED(rc)) return 1;
    return WEXITSTATUS(rc);
}

/* The reference library is missing (exit 3): a skip on a developer machine, a failure in CI. */
static int library_missing(void) {
    const char *ci = getenv("CI");
    if (ci && ci[0]) { printf("FAIL: the reference library must be installed in CI (tests/requirements.txt)\n"); return 1; }
    printf("skip: the reference library is not installed for $PYTHON (make test installs tests/requirements.txt into .venv)\n");
    return 77;
}

/* Prints s[0..n) readably: printable text as is, everything else as \xNN, at most 400 bytes. */
static void print_escaped(const char *s, size_t n) {
    putchar('"');
    for (size_t i = 0; i < n && i < 400; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"' || c == '\\') printf("\\%c", c);
        else if (c < 0x20 || c == 0x7f) printf("\\x%02x", c);
        else putchar(c);
    }
    printf(n > 400 ? "\"... (%zu bytes)" : "\"", n);
}
static void print_ids(const char *label, const int32_t *ids, size_t n) {
    printf("  %s (%zu):", label, n);
    for (size_t i = 0; i < n && i < 60; i++) printf(" %d", ids[i]);
    printf(n > 60 ? " ...\n" : "\n");
}

static uint32_t rd_u32(const uint8_t **p, const uint8_t *end, int *ok) {
    if (end - *p < 4) { *ok = 0; return 0; }
    uint32_t v = (uint32_t)(*p)[0] | (uint32_t)(*p)[1] << 8 | (uint32_t)(*p)[2] << 16 | (uint32_t)(*p)[3] << 24;
    *p += 4;
    return v;
}

/* Encodes every fixture string, compares ids with the library's; decodes our ids (at once and
 * token by token) and compares with the library's decode, and (round_trip) with the input.
 * Returns the number of cases checked, or -1 when any failed. */
static API long check_fixture(const Tokenizer *t, const char *path, int round_trip) {
    size_t len;
    char *raw = read_file(path, &len);
    if (!raw) { printf("FAIL: %s\n", last_error()); return -1; }
    const uint8_t *p = (const uint8_t *)raw, *end = p + len;
    int ok = len >= 12 && memcmp(p, "TKFX", 4) == 0;
    p += 4;
    uint32_t version = rd_u32(&p, end, &ok), count = rd_u32(&p, end, &ok);
    if (!ok || version != 1) { printf("FAIL: %s is not a version-1 fixture\n", path); free(raw); return -1; }
    long failures = 0;
    for (uint32_t c = 0; c < count; c++) {
        uint32_t tl = rd_u32(&p, end, &ok);
        if (!ok || (size_t)(end - p) < tl) break;
        const char *text = (const char *)p; p += tl;
        uint32_t ni = rd_u32(&p, end, &ok);
        if (!ok || (size_t)(end - p) / 4 < ni) break;
        int32_t *want = (int32_t *)xmalloc((size_t)ni * 4 + 4);
        for (uint32_t i = 0; i < ni; i++) want[i] = (int32_t)rd_u32(&p, end, &ok);
        uint32_t dl = rd_u32(&p, end, &ok);
        if (!ok || (size_t)(end - p) < dl) { free(want); break; }
        const char *want_dec = (const char *)p; p += dl;

        size_t n = 0, got_len = 0;
        int32_t *got = tok_encode(t, text, tl, 0, &n);
        char *dec = tok_decode(t, want, ni, &got_len);
        TokDecoder d;
        tok_decoder_init(&d);
        TokText stream = {0};
        text_put(&stream, "", 0);
        int stream_ok = 1; /* every step emits whole UTF-8 characters only */
        for (uint32_t i = 0; i < ni; i++) {
            size_t before = stream.len;
            tok_decode_next(t, &d, want[i], &stream);
            for (size_t k = before, l; k < stream.len; k += l)
                if (!(l = utf8_valid_len((const uint8_t *)stream.data + k, stream.len - k))) { stream_ok = 0; break; }
        }
        tok_decode_flush(t, &d, &stream);
        int ids_ok = got && n == ni && memcmp(got, want, n * 4) == 0;
        int dec_ok = dec && got_len == dl && memcmp(dec, want_dec, dl) == 0 && stream_ok && stream.len == got_len && memcmp(stream.data, dec, got_len) == 0;
        int rt_ok = !round_trip || (dec && got_len == tl && memcmp(dec, text, tl) == 0);
        if (!ids_ok || !dec_ok || !rt_ok) {
            if (failures < 8) {
                printf("MISMATCH case %u%s%s%s: ", c, ids_ok ? "" : " [ids]", dec_ok ? "" : " [decode]", rt_ok ? "" : " [round trip]");
                print_escaped(text, tl);
                printf("\n");
                if (!ids_ok) { print_ids("library", want, ni); print_ids("ours   ", got, n); }
                if (!dec_ok || !rt_ok) {
                    printf("  library decode: "); print_escaped(want_dec, dl);
                    printf("\n  our decode:     "); if (dec) print_escaped(dec, got_len);
                    printf("\n");
                }
            }
            failures++;
        }
        free(got); free(dec); free(stream.data); free(want);
        if (c + 1 == count) { free(raw); if (failures) { printf("%ld of %u cases differ in %s\n", failures, count, path); return -1; } return count; }
    }
    free(raw);
    printf("FAIL: %s is truncated\n", path);
    return -1;
}
