/* Encoding speed on a whole book (../shared/data/text/, 725 kB), next to the reference
 * libraries on the same text, one core each:
 *   SentencePiece BPE with LLaMA-2's tokenizer.model vs the sentencepiece library
 *   byte-level BPE with a LLaMA-3-style tokenizer.json (built here) vs the tokenizers library
 * SentencePiece is also run with the whole book as one merge sequence (one priority queue
 * over 725 kB), which must give the same ids as merging word by word.
 * The ids must equal the library's, encoding the book must take well under a second here
 * (the test fails above 5 s, to leave room for slow CI machines), and encoding the book
 * twice over must take less than 3x as long as once (merging is O(n log n), not O(n^2)). */
#define STAGE 0
#include "01_tokenize.c"
#include "check.h"
#include "test_tokenize_fixture.h"

static double time_encode(const Tokenizer *t, const char *text, size_t len, size_t *n_out, int32_t **ids_out) {
    double best = 1e30;
    for (int rep = 0; rep < 3; rep++) {
        double t0 = now_seconds();
        size_t n = 0;
        int32_t *ids = tok_encode(t, text, len, 0, &n);
        double dt = now_seconds() - t0;
        if (dt < best) best = dt;
        if (ids_out && rep == 0) { *ids_out = ids; *n_out = n; }
        else free(ids);
    }
    return best;
}

/* Times our encoder and the library's on the book; compares the ids (checks counted by check.h).
 * 0 ran, 1 could not run, 3 no library. */
static int compare(const char *tag, const char *label, const char *tok_path, const char *ref_cmd, const char *book, const char *text, size_t len) {
    Tokenizer t;
    if (tok_load(&t, tok_path) != 0) { printf("FAIL: %s\n", last_error()); return 1; }
    size_t n = 0;
    int32_t *ids = NULL;
    double ours = time_encode(&t, text, len, &n, &ids);
    /* twice the text: the time must grow about linearly */
    char *twice = (char *)xmalloc(2 * len);
    memcpy(twice, text, len);
    memcpy(twice + len, text, len);
    size_t n2;
    double ours2 = time_encode(&t, twice, 2 * len, &n2, NULL);
    free(twice);
    /* SentencePiece: the same merges over the whole book as one sequence (no cutting at
     * word starts) must give the same ids, still in O(n log n) time */
    double whole = 0;
    if (t.kind == TOK_SPM) {
        t.split_at_space = 0;
        size_t nw = 0;
        int32_t *idw = NULL;
        whole = time_encode(&t, text, len, &nw, &idw);
        int same = nw == n && memcmp(idw, ids, n * 4) == 0;
        free(idw);
        printf("%s: whole text as one merge sequence: %.3f s, %s\n", label, whole, same ? "same ids" : "DIFFERENT ids");
        EXPECT(same && whole <= 5.0, "%s: one-sequence merging is wrong or slow", label);
    }
    tok_free(&t);

    char ids_path[256];
    snprintf(ids_path, sizeof ids_path, TOK_OUT "/%s_book_ids.bin", tag);
    printf("%s: the reference library: ", label);
    fflush(stdout);
    FILE *p;
    char cmd[1024], line[256] = "";
    const char *py = getenv("PYTHON");
    snprintf(cmd, sizeof cmd, "\"%s\" tests/tokenize_ref.py %s %s %s %s", py && py[0] ? py : "python3", ref_cmd, tok_path, book, ids_path);
    if (!(p = popen(cmd, "r"))) { printf("FAIL: cannot run %s\n", cmd); free(ids); return 1; }
    if (!fgets(line, sizeof line, p)) line[0] = 0;
    int rc = pclose(p);
    if (WIFEXITED(rc) && WEXITSTATUS(rc) == 3) { printf("%s", line); free(ids); return 3; }
    unsigned long ref_n = 0;
    double ref_s = 0;
    if (rc != 0 || sscanf(line, "%lu %lf", &ref_n, &ref_s) != 2) { printf("FAIL: the reference side failed (%s)\n", line); free(ids); return 1; }
    printf("%lu tokens in %.3f s\n", ref_n, ref_s);
    size_t ref_len;
    char *ref = read_file(ids_path, &ref_len);
    int same = ref && ref_len == n * 4 && memcmp(ref, ids, ref_len) == 0; /* little-endian host */
    size_t first = 0;
    while (ref && first < n && first * 4 + 4 <= ref_len && memcmp(ref + first * 4, &ids[first], 4) == 0) first++;
    free(ref);
    free(ids);
    printf("%-28s %8zu tokens  %.3f s  %10.0f tokens/s  %6.2f MB/s   (2x text: %.3f s)\n", label, n, ours, n / ours, len / ours / 1e6, ours2);
    printf("%-28s %8lu tokens  %.3f s  %10.0f tokens/s  %6.2f MB/s\n", ref_cmd[0] == 's' ? "sentencepiece library" : "tokenizers library", ref_n, ref_s, ref_n / ref_s, len / ref_s / 1e6);
    EXPECT(same, "%s: ids differ from the library's on the book (first difference at token %zu)", label, first);
    EXPECT(ours <= 5.0, "%s: encoding the book took %.2f s", label, ours);
    EXPECT(ours2 <= 3.0 * ours + 0.05, "%s: twice the text took %.2fx as long: not O(n log n)", label, ours2 / ours);
    return 0;
}

int main(void) {
    const char *book = "../shared/data/text/pride-and-prejudice.txt";
    const char *model = "../shared/data/llama2-tokenizer/tokenizer.model";
    if (!file_exists(book) || !file_exists(model)) { printf("skip: the shared test data (%s, %s) is not here\n", book, model); return 77; }
    if (system("mkdir -p " TOK_OUT) != 0) { printf("FAIL: cannot create %s\n", TOK_OUT); return 1; }
    size_t len;
    char *text = read_file(book, &len);
    if (!text) die("%s", last_error());
    printf("book: %s, %zu bytes\n", book, len);
    int rc = compare("spm", "ours, SentencePiece (LLaMA-2)", model, "spm-time", book, text, len);
    if (rc == 0) {
        int b = run_ref("hf-build llama3 " TOK_OUT "/speed_llama3.json");
        rc = b == 0 ? compare("bpe", "ours, byte-level (LLaMA-3)", TOK_OUT "/speed_llama3.json", "hf-time", book, text, len) : b == 3 ? 3 : 1;
    }
    free(text);
    if (rc == 3) return library_missing();
    if (rc != 0 || g_failures) return 1;
    printf("book encoded identically to both libraries, under the time limit, near-linear in length\n");
    return 0;
}
