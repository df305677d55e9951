/* fuzz_tokenizer.h: what both tokenizer fuzz targets do with a tokenizer that parsed. */
#define STAGE 0
#include "01_tokenize.c"

/* Encodes a few texts (and the input itself as text), checks every id is in range,
 * decodes them at once and token by token, and decodes ids made from the input bytes. */
static void exercise(const Tokenizer *t, const uint8_t *data, size_t size) {
    const char *texts[] = {"", " ", "Hello world", "  two  spaces ", "\xF0\x9F\xA6\x99.cpp \xC3\xA9\n\t", "\xFF\xC3 broken \xE2\x82"};
    for (size_t k = 0; k < sizeof texts / sizeof texts[0] + 1; k++) {
        const char *s = k < 6 ? texts[k] : (const char *)data;
        size_t len = k < 6 ? strlen(s) : (size < 2048 ? size : 2048);
        size_t n;
        int32_t *ids = tok_encode(t, s, len, 1, &n);
        if (!ids) continue;
        for (size_t i = 0; i < n; i++)
            if (ids[i] < 0 || ids[i] >= t->vocab_size) { fprintf(stderr, "encode made id %d of %d\n", ids[i], t->vocab_size); abort(); }
        size_t dlen;
        char *dec = tok_decode(t, ids, n, &dlen);
        if (!dec) { fprintf(stderr, "decoding our own ids failed: %s\n", last_error()); abort(); }
        TokDecoder d;
        tok_decoder_init(&d);
        TokText stream = {0};
        for (size_t i = 0; i < n; i++) tok_decode_next(t, &d, ids[i], &stream);
        tok_decode_flush(t, &d, &stream);
        if (stream.len != dlen || (dlen && memcmp(stream.data, dec, dlen) != 0)) { fprintf(stderr, "streaming decode differs\n"); abort(); }
        free(stream.data);
        free(dec);
        free(ids);
    }
    int32_t raw[64];
    size_t m = 0;
    for (size_t i = 0; i + 2 <= size && m < 64; i += 2) raw[m++] = (int32_t)(data[i] | data[i + 1] << 8) - 8;
    free(tok_decode(t, raw, m, NULL));
}

