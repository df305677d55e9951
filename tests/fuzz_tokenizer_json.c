/* libFuzzer target: the tokenizer.json (byte-level BPE) loader, then encode and decode with
 * whatever model parses. Run by tests/test_fuzz.sh under ASan and UBSan. */
#include "fuzz_tokenizer.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    Tokenizer t;
    if (tok_load_json_bytes(&t, (const char *)data, size, NULL, "fuzz.json") != 0) return 0;
    exercise(&t, data, size);
    tok_free(&t);
    return 0;
}
