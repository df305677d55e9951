/* libFuzzer target: the tokenizer.model (protobuf) parser, then encode and decode with
 * whatever model parses. Run by tests/test_fuzz.sh under ASan and UBSan. */
#include "fuzz_tokenizer.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    Tokenizer t;
    if (tok_load_spm_bytes(&t, data, size, "fuzz.model") != 0) return 0;
    exercise(&t, data, size);
    tok_free(&t);
    return 0;
}
