/* fixture.h: the reference arrays the scripts of tests/ref write (tests/ref/fixture_io.py):
 * a 4-byte magic naming the family ("INFX" inference, "LRFX" LoRA, "LLMF" model), u32
 * version 1, u32 count, then per array: u32 name length, the name, u32 dtype (0 f32, 1 i32,
 * 2 f64), u32 ndim (at most 4), u64 dims[ndim], the values, and nothing after them.
 * Needs common.h (read_file, set_error, xmalloc). */
#ifndef TESTS_FIXTURE_H
#define TESTS_FIXTURE_H

typedef struct {
    char name[160];
    int code;       /* 0 f32, 1 i32, 2 f64 */
    int ndim;
    size_t dims[4];
    size_t numel;
    float *f;       /* [numel] when code 0, else NULL */
    int32_t *i;     /* [numel] when code 1, else NULL */
    double *d;      /* [numel] when code 2, else NULL */
} FxTensor;
typedef struct {
    FxTensor *t;
    size_t count;
} Fixture;

static void fx_free(Fixture *fx) {
    for (size_t k = 0; k < fx->count; k++) { free(fx->t[k].f); free(fx->t[k].i); free(fx->t[k].d); }
    free(fx->t);
    memset(fx, 0, sizeof *fx);
}

/* 0, or -1 with last_error() set (a file that is missing, truncated, of another family or
 * malformed); nothing is left allocated then. */
static int fx_load(Fixture *fx, const char *path, const char magic[4]) {
    memset(fx, 0, sizeof *fx);
    size_t len;
    char *raw = read_file(path, &len);
    if (!raw) return -1;
    const uint8_t *p = (const uint8_t *)raw, *end = p + len;
#define FX_FAIL(...) do { free(raw); fx_free(fx); return set_error(__VA_ARGS__); } while (0)
#define NEED(n) do { if ((size_t)(end - p) < (size_t)(n)) FX_FAIL("%s: truncated", path); } while (0)
    NEED(12);
    if (memcmp(p, magic, 4) != 0) FX_FAIL("%s: not a %.4s fixture", path, magic);
    uint32_t ver, count;
    memcpy(&ver, p + 4, 4);
    memcpy(&count, p + 8, 4);
    if (ver != 1) FX_FAIL("%s: version %u", path, ver);
    p += 12;
    if (count > (size_t)(end - p) / 12) FX_FAIL("%s: %u arrays cannot fit", path, count);
    fx->t = (FxTensor *)xcalloc(count ? count : 1, sizeof(FxTensor));
    for (uint32_t k = 0; k < count; k++) {
        FxTensor *t = &fx->t[fx->count++];
        uint32_t nl, code, nd;
        NEED(4); memcpy(&nl, p, 4); p += 4;
        NEED(nl); if (nl >= sizeof t->name) FX_FAIL("%s: long name", path);
        memcpy(t->name, p, nl); t->name[nl] = 0; p += nl;
        NEED(8); memcpy(&code, p, 4); memcpy(&nd, p + 4, 4); p += 8;
        if (nd > 4 || code > 2) FX_FAIL("%s: bad header for %s", path, t->name);
        t->code = (int)code; t->ndim = (int)nd; t->numel = 1;
        for (uint32_t a = 0; a < nd; a++) {
            uint64_t v;
            NEED(8); memcpy(&v, p, 8); p += 8;
            if (v && t->numel > (size_t)(end - p) / v) FX_FAIL("%s: %s is larger than the file", path, t->name);
            t->dims[a] = (size_t)v; t->numel *= (size_t)v;
        }
        size_t bytes = t->numel * (code == 2 ? 8 : 4);
        NEED(bytes);
        void *data = xmalloc(bytes + 1);
        memcpy(data, p, bytes);
        p += bytes;
        if (code == 0) t->f = (float *)data;
        else if (code == 1) t->i = (int32_t *)data;
        else t->d = (double *)data;
    }
    if (p != end) {
        const size_t extra = (size_t)(end - p); /* counted before FX_FAIL frees the bytes */
        FX_FAIL("%s: %zu trailing bytes", path, extra);
    }
#undef NEED
#undef FX_FAIL
    free(raw);
    return 0;
}

static const FxTensor *fx_get(const Fixture *fx, const char *name) {
    for (size_t k = 0; k < fx->count; k++)
        if (strcmp(fx->t[k].name, name) == 0) return &fx->t[k];
    return NULL;
}

#endif
