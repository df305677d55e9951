/* libFuzzer target: the JSON parser must reject or accept any bytes without crashing,
 * leaking or reading out of bounds (run under AddressSanitizer and UBSan by test_fuzz.sh). */
#include "common.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    Json *j = json_parse((const char *)data, size);
    if (j) {
        /* walk the typed accessors over whatever parsed */
        (void)json_get_number(j, "hidden_size", 0);
        (void)json_get_string(j, "model_type", NULL);
        const Json *arr = json_get_type(j, "merges", JSON_ARRAY);
        for (size_t i = 0; arr && i < arr->count; i++) (void)arr->items[i].type;
        json_free(j);
    }
    return 0;
}
