/* Our byte-level BPE against the HF tokenizers library. The Python side trains small
 * tokenizer.json files in four families' styles and encodes 10,000 generated strings with
 * each (add_special_tokens=False):
 *   gpt2     ByteLevel pre-tokenizer (GPT-2 regex), merges written as "left right" strings
 *   llama3   Split(LLaMA-3 regex) + ByteLevel(use_regex=false), ignore_merges, BOS template
 *   smollm2  Digits(individual) + ByteLevel (SmolLM2's configuration)
 *   qwen2    NFC normalizer, Split(Qwen2 regex) + ByteLevel, plus added tokens with
 *            lstrip/rstrip/single_word
 * Checked: exact ids, our decode == the library's decode (== the input, but for qwen2 whose
 * stripping tokens eat spaces), streaming decode == whole decode, and BOS/EOS ids. */
#define STAGE 0
#include "01_tokenize.c"
#include "check.h"
#include "test_tokenize_fixture.h"

#define N_STRINGS 10000

int main(void) {
    if (system("mkdir -p " TOK_OUT) != 0) { printf("FAIL: cannot create %s\n", TOK_OUT); return 1; }
    const char *styles[] = {"gpt2", "llama3", "smollm2", "qwen2"};
    const char *want_bos[] = {NULL, "<|begin_of_text|>", NULL, NULL};
    const char *want_eos[] = {"<|endoftext|>", "<|end_of_text|>", "<|endoftext|>", "<|endoftext|>"};
    long total = 0;
    for (int s = 0; s < 4; s++) {
        char json[256], fx[256];
        snprintf(json, sizeof json, TOK_OUT "/%s.json", styles[s]);
        snprintf(fx, sizeof fx, TOK_OUT "/hf_%s.fx", styles[s]);
        int rc = run_ref("hf-build %s %s", styles[s], json);
        if (rc == 0) rc = run_ref("hf %s %s %d %d", json, fx, N_STRINGS, 100 + s);
        if (rc == 3) return library_missing();
        if (rc != 0) { printf("FAIL: the reference side failed for %s (exit %d)\n", styles[s], rc); return 1; }
        Tokenizer t;
        if (tok_load(&t, json) != 0) { printf("FAIL: %s\n", last_error()); return 1; }
        int32_t bos = want_bos[s] ? (int32_t)strmap_get(&t.map, want_bos[s], strlen(want_bos[s])) : -1;
        int32_t eos = (int32_t)strmap_get(&t.map, want_eos[s], strlen(want_eos[s]));
        if (bos < 0 && want_bos[s]) for (size_t i = 0; i < t.n_added; i++) if (strcmp(t.added[i].content, want_bos[s]) == 0) bos = t.added[i].id;
        EXPECT(t.bos_id == bos && t.eos_id == eos, "%s: BOS/EOS ids %d/%d, want %d/%d", styles[s], t.bos_id, t.eos_id, bos, eos);
        double t0 = now_seconds();
        /* qwen2 normalizes and its lstrip/rstrip tokens swallow spaces: there only our decode == the library's */
        long n = check_fixture(&t, fx, s != 3);
        tok_free(&t);
        if (!check_counted(n >= 0)) { printf("FAIL: the %s-style tokenizer differs from the tokenizers library\n", styles[s]); continue; }
        printf("%s: %ld strings identical to tokenizers (%.2f s)\n", styles[s], n, now_seconds() - t0);
        total += n;
    }
    if (g_failures) { printf("%d of %d checks failed\n", g_failures, g_checks); return 1; }
    printf("%ld strings on 4 byte-level BPE tokenizer.json files: ids, decode and round trip match the library\n", total);
    return 0;
}
