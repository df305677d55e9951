/* libFuzzer target: the safetensors parser must validate any bytes without crashing,
 * leaking or reading out of bounds; every tensor it accepts must lie inside the input. */
#include "common.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    SafeTensors st;
    memset(&st, 0, sizeof st);
    if (st_parse(&st, data, size, "fuzz.safetensors") == 0) {
        float sink = 0;
        for (size_t i = 0; i < st.count; i++) {
            const StTensor *t = &st.tensors[i];
            if (t->data < data || t->data + t->nbytes > data + size) __builtin_trap();
            if (st_find(&st, t->name) != t) __builtin_trap();
            if (t->numel <= 4096 && (t->dtype == DT_F32 || t->dtype == DT_F16 || t->dtype == DT_BF16 || t->dtype == DT_F64)) {
                float *out = (float *)xmalloc(t->numel * sizeof(float) + 4);
                if (st_to_f32(t, out) == 0 && t->numel) sink += out[0];
                free(out);
            }
        }
        (void)sink;
        for (size_t i = 0; i < st.count; i++) free(st.tensors[i].name);
        free(st.tensors);
    }
    return 0;
}
