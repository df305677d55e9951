/* Our SentencePiece BPE against the sentencepiece library, on 10,000 generated strings each
 * (ASCII, whitespace runs, digits, punctuation, accents, CJK, emoji, control characters,
 * long strings): exact ids, our decode == the library's decode, streaming decode == whole
 * decode, and decode(encode(s)) == s where the model keeps spaces as they are.
 * Models: a small BPE model trained here with byte_fallback, user-defined symbols, split
 * digits and remove_extra_whitespaces; and LLaMA-2's tokenizer.model when ../shared/data is here. */
#define STAGE 0
#include "01_tokenize.c"
#include "check.h"
#include "test_tokenize_fixture.h"

#define N_STRINGS 10000

int main(void) {
    if (system("mkdir -p " TOK_OUT) != 0) { printf("FAIL: cannot create %s\n", TOK_OUT); return 1; }
    int rc = run_ref("spm-train " TOK_OUT "/small.model");
    if (rc == 3) return library_missing();
    if (rc != 0) { printf("FAIL: training the small sentencepiece model failed (exit %d)\n", rc); return 1; }
    struct { const char *model, *fixture; int seed, round_trip; } runs[] = {
        {TOK_OUT "/small.model", TOK_OUT "/spm_small.fx", 1, 0},
        {"../shared/data/llama2-tokenizer/tokenizer.model", TOK_OUT "/spm_llama2.fx", 2, 1},
    };
    long total = 0;
    int models = 0;
    for (int r = 0; r < 2; r++) {
        if (!file_exists(runs[r].model)) { printf("note: %s is absent; LLaMA-2 not checked\n", runs[r].model); continue; }
        if ((rc = run_ref("spm %s %s %d %d", runs[r].model, runs[r].fixture, N_STRINGS, runs[r].seed)) != 0) {
            if (rc == 3) return library_missing();
            printf("FAIL: the reference side failed on %s (exit %d)\n", runs[r].model, rc);
            return 1;
        }
        Tokenizer t;
        if (tok_load(&t, runs[r].model) != 0) { printf("FAIL: %s\n", last_error()); return 1; }
        double t0 = now_seconds();
        long n = check_fixture(&t, runs[r].fixture, runs[r].round_trip);
        tok_free(&t);
        if (!check_counted(n >= 0)) { printf("FAIL: %s differs from sentencepiece\n", runs[r].model); continue; }
        printf("%s: %ld strings identical to sentencepiece (%.2f s)\n", runs[r].model, n, now_seconds() - t0);
        total += n;
        models++;
    }
    if (g_failures) { printf("%d of %d checks failed\n", g_failures, g_checks); return 1; }
    printf("%ld strings on %d SentencePiece models: ids, decode and round trip match the library\n", total, models);
    return 0;
}
