/* The 46 llama.cpp SentencePiece test vectors (tests/test-tokenizer-0 inputs and the ids
 * LLaMA's tokenizer.model gives them, no BOS) must come out exactly; each must also decode
 * back to its input (the dummy-prefix space removed), in one go and token by token.
 * Needs ../shared/data (skips without it). */
#define STAGE 0
#include "01_tokenize.c"
#include "check.h"

#define DATA "../shared/data/"

int main(void) {
    const char *model = DATA "llama2-tokenizer/tokenizer.model";
    const char *inp_path = DATA "llama-spm-vectors/ggml-vocab-llama-spm.gguf.inp";
    const char *out_path = DATA "llama-spm-vectors/ggml-vocab-llama-spm.gguf.out";
    if (!file_exists(model) || !file_exists(inp_path) || !file_exists(out_path)) {
        printf("skip: the shared test data (%s, llama-spm-vectors) is not here\n", model);
        return 77;
    }
    Tokenizer t;
    if (tok_load(&t, model) != 0) die("%s", last_error());
    size_t inp_len, out_len;
    char *inp = read_file(inp_path, &inp_len), *outs = read_file(out_path, &out_len);
    if (!inp || !outs) die("%s", last_error());

    /* Inputs are separated by "\n__ggml_vocab_test__\n"; outputs are one line each. */
    const char *sep = "\n__ggml_vocab_test__\n";
    size_t sep_len = strlen(sep);
    char *p = inp, *end = inp + inp_len, *line = outs;
    int cases = 0;
    while (p < end) {
        char *q = memmem(p, (size_t)(end - p), sep, sep_len);
        if (!q) break; /* the file ends with a separator */
        size_t text_len = (size_t)(q - p);
        char *nl = strchr(line, '\n');
        if (!nl) die("%s has fewer lines than %s has cases", out_path, inp_path);
        *nl = 0;
        int32_t want[4096];
        size_t n_want = 0;
        for (char *tok = strtok(line, " "); tok; tok = strtok(NULL, " ")) want[n_want++] = (int32_t)atoi(tok);
        size_t n = 0;
        int32_t *got = tok_encode(&t, p, text_len, 0, &n);
        int same = n == n_want && memcmp(got, want, n * sizeof(int32_t)) == 0;
        /* decode: the whole list, and token by token */
        size_t dlen = 0;
        char *dec = tok_decode(&t, got, n, &dlen);
        TokDecoder d;
        tok_decoder_init(&d);
        TokText stream = {0};
        text_put(&stream, "", 0);
        for (size_t i = 0; i < n; i++) tok_decode_next(&t, &d, got[i], &stream);
        tok_decode_flush(&t, &d, &stream);
        int round = dlen == text_len && memcmp(dec, p, text_len) == 0 && stream.len == dlen && memcmp(stream.data, dec, dlen) == 0;
        if (!check_counted(same && round)) {
            printf("FAIL case %d \"%.*s\": %s%s\n  want:", cases, (int)text_len, p, same ? "" : "ids differ ", round ? "" : "round trip differs");
            for (size_t i = 0; i < n_want; i++) printf(" %d", want[i]);
            printf("\n  got: ");
            for (size_t i = 0; i < n; i++) printf(" %d", got[i]);
            printf("\n  decoded: \"%.*s\"\n", (int)dlen, dec);
        }
        free(got); free(dec); free(stream.data);
        cases++;
        p = q + sep_len;
        line = nl + 1;
    }
    free(inp); free(outs);
    tok_free(&t);
    printf("%d/%d llama.cpp vectors give exact ids and round-trip\n", g_checks - g_failures, cases);
    EXPECT(cases == 46, "expected 46 cases, read %d", cases);
    return g_failures ? 1 : 0;
}
