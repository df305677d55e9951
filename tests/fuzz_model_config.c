/* libFuzzer target: 02_model.c's config.json reader must accept or refuse any bytes with
 * one sentence, never crash, overflow or leak (run under ASan and UBSan by test_fuzz.sh).
 * What it accepts must describe a model whose sizes are positive and consistent. */
#define STAGE 0
#include "02_model.c"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    Json *j = json_parse((const char *)data, size);
    if (!j) return 0;
    Config c;
    long target_ctx = size > 0 ? (long)data[0] * 1000 : 0;
    if (config_from_json(&c, j, target_ctx) == 0) {
        if (c.dim <= 0 || c.ffn_dim <= 0 || c.n_layers <= 0 || c.n_heads <= 0 || c.n_kv_heads <= 0 || c.head_dim <= 0 ||
            c.head_dim % 2 || c.n_heads % c.n_kv_heads || c.vocab_size <= 0 || !(c.rope_factor >= 1) || !(c.rms_eps > 0) ||
            c.bos_id >= c.vocab_size || c.eos_id >= c.vocab_size)
            abort(); /* accepted a config the model code cannot run */
        (void)config_context(&c);
    } else if (!last_error()[0] || strchr(last_error(), '\n')) {
        abort(); /* refused without one sentence */
    }
    json_free(j);
    return 0;
}
