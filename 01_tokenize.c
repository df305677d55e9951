/* 01_tokenize.c: text <-> token ids, the two ways LLaMA-family models do it.
 *
 * Teaches:
 *   1. SentencePiece BPE, read straight from `tokenizer.model` (a protobuf ModelProto):
 *      spaces become U+2581 "▁", a dummy "▁" goes in front, adjacent symbols merge by
 *      piece score, and characters the vocabulary lacks fall back to <0xXX> byte pieces.
 *      This is LLaMA-1/2's tokenizer.
 *   2. Byte-level BPE, read from HuggingFace `tokenizer.json`: every byte is one of 256
 *      printable characters, a pre-tokenizer regex cuts the text into words (GPT-2,
 *      LLaMA-3 and SmolLM2/Qwen2 patterns, hand-written below over Unicode tables made by
 *      tests/ref/gen_unicode_tables.py), and adjacent pairs merge by merge rank. Added
 *      (special) tokens are cut out of the text first. This is LLaMA-3's and SmolLM2's.
 *   Both merge loops keep the candidate pairs in a priority queue, so encoding costs
 *   O(n log n) in the text length (llama2.c rescans all pairs after every merge: O(n^2)).
 *   Decoding is streamable: a multi-byte UTF-8 character split over several tokens is
 *   held back until it is complete.
 * Runs on: the CPU, one core.
 * Leaves out: SentencePiece unigram models and precompiled normalizers (nmt_nfkc: we
 *   accept only the identity normalizer LLaMA uses), tokenizer.json normalizers other than
 *   NFC (Qwen2's), BPE dropout, WordPiece/Unigram models and regex patterns other than
 *   the three below; all of these are refused with a clear error rather than tokenized
 *   wrongly. HF post-processors are not run: the caller asks for BOS.
 *
 * CLI:
 *   ./01_tokenize --tokenizer PATH [--bos] [--pieces] TEXT
 *   ./01_tokenize --tokenizer PATH [--bos] --encode-file IN.txt --out OUT.bin
 *   ./01_tokenize --tokenizer PATH --decode-file IN.bin
 * PATH is a tokenizer.model, a tokenizer.json, or a model folder holding either.
 *
 * API for later stages:
 *   tok_load(&t, path) / tok_free(&t)                  0 or -1 + last_error()
 *   tok_encode(&t, text, len, add_bos, &n)             malloc'd ids [n] (NULL over 2 GB of text)
 *   tok_decoder_init(&dec); tok_decode_next(&t, &dec, id, &text); tok_decode_flush(...)
 *   tok_decode(&t, ids, n, &len)                       malloc'd text
 *   t.bos_id, t.eos_id (-1 when the tokenizer has none), t.vocab_size
 */
#ifndef STAGE
#define STAGE 1
#endif
#include "common.h"
#include "01_unicode_tables.h"
#include <ctype.h>

/* ---------------------------------------------------------------------------------------
 * Unicode: UTF-8 decoding and the three character classes the pre-tokenizers need
 * ------------------------------------------------------------------------------------- */

enum { CP_OTHER = 0, CP_LETTER = 1, CP_NUMBER = 2, CP_SPACE = 4 };

static int in_ranges(const uint32_t (*r)[2], size_t n, uint32_t cp) {
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (cp < r[mid][0]) hi = mid;
        else if (cp > r[mid][1]) lo = mid + 1;
        else return 1;
    }
    return 0;
}
#define COUNT_OF(a) (sizeof(a) / sizeof((a)[0]))

static int cp_class(uint32_t cp) {
    if (cp < 0x80) {
        if ((cp >= 'a' && cp <= 'z') || (cp >= 'A' && cp <= 'Z')) return CP_LETTER;
        if (cp >= '0' && cp <= '9') return CP_NUMBER;
        if (cp == ' ' || (cp >= 0x09 && cp <= 0x0d)) return CP_SPACE;
        return CP_OTHER;
    }
    if (in_ranges(UNI_LETTER, COUNT_OF(UNI_LETTER), cp)) return CP_LETTER;
    if (in_ranges(UNI_NUMBER, COUNT_OF(UNI_NUMBER), cp)) return CP_NUMBER;
    if (in_ranges(UNI_WHITE_SPACE, COUNT_OF(UNI_WHITE_SPACE), cp)) return CP_SPACE;
    return CP_OTHER;
}

/* The Digits pre-tokenizer's test (Rust's Unicode version, a little newer than the regexes'). */
static int is_numeric(uint32_t cp) {
    if (cp < 0x80) return cp >= '0' && cp <= '9';
    return in_ranges(UNI_NUMERIC, COUNT_OF(UNI_NUMERIC), cp);
}

/* The code point at s[0..n) (n >= 1) and its byte length. A byte that does not start a valid
 * UTF-8 sequence decodes as U+FFFD, one byte long: hostile text never stalls a loop. */
static uint32_t utf8_next(const uint8_t *s, size_t n, size_t *len) {
    size_t l = utf8_valid_len(s, n);
    if (l == 0) { *len = 1; return 0xFFFD; }
    *len = l;
    if (l == 1) return s[0];
    if (l == 2) return (uint32_t)(s[0] & 0x1f) << 6 | (s[1] & 0x3f);
    if (l == 3) return (uint32_t)(s[0] & 0x0f) << 12 | (uint32_t)(s[1] & 0x3f) << 6 | (s[2] & 0x3f);
    return (uint32_t)(s[0] & 0x07) << 18 | (uint32_t)(s[1] & 0x3f) << 12 | (uint32_t)(s[2] & 0x3f) << 6 | (s[3] & 0x3f);
}

/* A NUL-terminated copy of p[0..n). */
static char *dup_bytes(const void *p, size_t n) {
    char *s = (char *)xmalloc(n + 1);
    if (n) memcpy(s, p, n);
    s[n] = 0;
    return s;
}

/* ---------------------------------------------------------------------------------------
 * NFC (the normalizer Qwen2's tokenizer.json asks for): decompose every character
 * canonically, put each run of combining marks in combining-class order, then compose each
 * mark with the last starter it is not blocked from. Hangul syllables are arithmetic.
 * ------------------------------------------------------------------------------------- */

enum { HANGUL_S = 0xAC00, HANGUL_L = 0x1100, HANGUL_V = 0x1161, HANGUL_T = 0x11A7,
       HANGUL_LN = 19, HANGUL_VN = 21, HANGUL_TN = 28, HANGUL_N = 21 * 28, HANGUL_SN = 19 * 21 * 28 };

static int combining_class(uint32_t cp) {
    if (cp < 0x300) return 0;
    size_t lo = 0, hi = COUNT_OF(UNI_CCC);
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (cp < UNI_CCC[mid][0]) hi = mid;
        else if (cp > UNI_CCC[mid][1]) lo = mid + 1;
        else return (int)UNI_CCC[mid][2];
    }
    return 0;
}

/* Appends the canonical decomposition of cp to out (at most 4 code points). */
static size_t nfc_decompose(uint32_t cp, uint32_t *out) {
    if (cp >= HANGUL_S && cp < HANGUL_S + HANGUL_SN) {
        uint32_t si = cp - HANGUL_S, t = si % HANGUL_TN;
        out[0] = HANGUL_L + si / HANGUL_N;
        out[1] = HANGUL_V + (si % HANGUL_N) / HANGUL_TN;
        if (t) { out[2] = HANGUL_T + t; return 3; }
        return 2;
    }
    if (cp >= 0xC0) {
        size_t lo = 0, hi = COUNT_OF(UNI_DECOMP);
        while (lo < hi) {
            size_t mid = (lo + hi) / 2;
            if (cp < UNI_DECOMP[mid][0]) hi = mid;
            else if (cp > UNI_DECOMP[mid][0]) lo = mid + 1;
            else {
                for (uint32_t k = 0; k < UNI_DECOMP[mid][2]; k++) out[k] = UNI_DECOMP_POOL[UNI_DECOMP[mid][1] + k];
                return UNI_DECOMP[mid][2];
            }
        }
    }
    out[0] = cp;
    return 1;
}

/* The primary composite of (a, b), or 0. */
static uint32_t nfc_compose(uint32_t a, uint32_t b) {
    if (a >= HANGUL_L && a < HANGUL_L + HANGUL_LN && b >= HANGUL_V && b < HANGUL_V + HANGUL_VN)
        return HANGUL_S + ((a - HANGUL_L) * HANGUL_VN + (b - HANGUL_V)) * HANGUL_TN;
    if (a >= HANGUL_S && a < HANGUL_S + HANGUL_SN && (a - HANGUL_S) % HANGUL_TN == 0 && b > HANGUL_T && b < HANGUL_T + HANGUL_TN)
        return a + (b - HANGUL_T);
    size_t lo = 0, hi = COUNT_OF(UNI_COMPOSE);
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (a < UNI_COMPOSE[mid][0] || (a == UNI_COMPOSE[mid][0] && b < UNI_COMPOSE[mid][1])) hi = mid;
        else if (a > UNI_COMPOSE[mid][0] || b > UNI_COMPOSE[mid][1]) lo = mid + 1;
        else return UNI_COMPOSE[mid][2];
    }
    return 0;
}

/* NFC of s[0..n) (invalid UTF-8 bytes become U+FFFD); malloc'd [*out_len]. */
static char *nfc_normalize(const uint8_t *s, size_t n, size_t *out_len) {
    size_t i = 0;
    while (i < n && s[i] < 0xCC) i++; /* below U+0300 nothing changes unless a mark follows */
    if (i == n) { *out_len = n; return dup_bytes(s, n); }
    uint32_t *cp = (uint32_t *)xmalloc((4 * n + 4) * sizeof(uint32_t)); /* [4 n] decomposed code points */
    size_t m = 0;
    for (i = 0; i < n;) {
        size_t len;
        uint32_t c = utf8_next(s + i, n - i, &len);
        i += len;
        m += nfc_decompose(c, cp + m);
    }
    for (size_t k = 1; k < m; k++) { /* canonical order: stable insertion sort inside mark runs */
        int cc = combining_class(cp[k]);
        if (cc == 0) continue;
        uint32_t c = cp[k];
        size_t j = k;
        while (j > 0 && combining_class(cp[j - 1]) > cc) { cp[j] = cp[j - 1]; j--; }
        cp[j] = c;
    }
    /* Compose in place. Every character kept after the last starter is a mark, sorted by
     * class, so a mark is blocked from the starter exactly when the last one kept has a
     * class >= its own; a starter composes only with the starter right before it. */
    size_t w = 0;               /* composed length */
    size_t starter = SIZE_MAX;  /* index in cp[0..w) of the last starter */
    int last_cc = -1;           /* class of the last character kept after it; -1: none */
    for (size_t k = 0; k < m; k++) {
        int cc = combining_class(cp[k]);
        if (starter != SIZE_MAX && (last_cc == -1 || last_cc < cc)) {
            uint32_t comp = nfc_compose(cp[starter], cp[k]);
            if (comp) { cp[starter] = comp; continue; }
        }
        if (cc == 0) { starter = w; last_cc = -1; }
        else last_cc = cc;
        cp[w++] = cp[k];
    }
    char *out = (char *)xmalloc(4 * w + 1);
    size_t o = 0;
    for (size_t k = 0; k < w; k++) o += utf8_encode(cp[k], out + o);
    out[o] = 0;
    free(cp);
    *out_len = o;
    return out;
}

/* ---------------------------------------------------------------------------------------
 * Small containers: a growable id list, a growable byte string, a string -> id hash map,
 * a (id, id) -> merge hash map, and a binary heap of merge candidates.
 * ------------------------------------------------------------------------------------- */

typedef struct { int32_t *ids; size_t n, cap; } IdList;
static void ids_push(IdList *l, int32_t id) {
    if (l->n == l->cap) { l->cap = l->cap ? 2 * l->cap : 256; l->ids = (int32_t *)xrealloc(l->ids, l->cap * sizeof(int32_t)); }
    l->ids[l->n++] = id;
}

typedef struct { char *data; size_t len, cap; } TokText;
static void text_put(TokText *b, const void *p, size_t n) {
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (b->len + n + 1 > cap) cap *= 2;
        b->data = (char *)xrealloc(b->data, cap);
        b->cap = cap;
    }
    memcpy(b->data + b->len, p, n);
    b->len += n;
    b->data[b->len] = 0;
}

static uint32_t hash_bytes(const char *s, size_t n) {
    uint64_t h = 0xcbf29ce484222325ull; /* FNV-1a, folded to 32 bits */
    for (size_t i = 0; i < n; i++) { h ^= (uint8_t)s[i]; h *= 0x100000001b3ull; }
    return (uint32_t)(h ^ (h >> 32));
}

/* Open addressing over token ids; the key bytes live in the tokenizer's key[] arrays. */
typedef struct {
    int32_t *slot;      /* [cap] token id, -1 when empty */
    uint32_t *hash;     /* [cap] hash of that token's key */
    size_t cap;         /* a power of two, at least twice the entries */
    char *const *key;   /* [V] borrowed from the tokenizer */
    const uint32_t *key_len;
} StrMap;

static void strmap_init(StrMap *m, size_t entries, char *const *key, const uint32_t *key_len) {
    m->cap = 16;
    while (m->cap < 2 * entries + 16) m->cap *= 2;
    m->slot = (int32_t *)xmalloc(m->cap * sizeof(int32_t));
    m->hash = (uint32_t *)xmalloc(m->cap * sizeof(uint32_t));
    for (size_t i = 0; i < m->cap; i++) m->slot[i] = -1;
    m->key = key;
    m->key_len = key_len;
}
static int32_t strmap_get(const StrMap *m, const char *s, size_t n) {
    if (!m->cap) return -1;
    uint32_t h = hash_bytes(s, n);
    for (size_t i = h & (m->cap - 1);; i = (i + 1) & (m->cap - 1)) {
        int32_t id = m->slot[i];
        if (id < 0) return -1;
        if (m->hash[i] == h && m->key_len[id] == n && memcmp(m->key[id], s, n) == 0) return id;
    }
}
/* Inserts id under its key; returns the id already there with the same key, or -1. */
static int32_t strmap_put(StrMap *m, int32_t id) {
    const char *s = m->key[id];
    size_t n = m->key_len[id];
    uint32_t h = hash_bytes(s, n);
    for (size_t i = h & (m->cap - 1);; i = (i + 1) & (m->cap - 1)) {
        int32_t other = m->slot[i];
        if (other < 0) { m->slot[i] = id; m->hash[i] = h; return -1; }
        if (m->hash[i] == h && m->key_len[other] == n && memcmp(m->key[other], s, n) == 0) return other;
    }
}
static void strmap_free(StrMap *m) { free(m->slot); free(m->hash); memset(m, 0, sizeof *m); }

/* Byte-level BPE merges: the pair (left id, right id) -> (rank, merged id). */
typedef struct { uint64_t pair; int32_t rank, merged; } MergeSlot;
typedef struct { MergeSlot *slot; size_t cap; } MergeMap; /* slot.merged == -1: empty */

static uint32_t hash_pair(uint64_t k) { k *= 0x9e3779b97f4a7c15ull; return (uint32_t)(k >> 32); }
static void mergemap_init(MergeMap *m, size_t entries) {
    m->cap = 16;
    while (m->cap < 2 * entries + 16) m->cap *= 2;
    m->slot = (MergeSlot *)xmalloc(m->cap * sizeof(MergeSlot));
    for (size_t i = 0; i < m->cap; i++) m->slot[i].merged = -1;
}
static const MergeSlot *mergemap_get(const MergeMap *m, int32_t a, int32_t b) {
    if (!m->cap) return NULL;
    uint64_t k = (uint64_t)(uint32_t)a << 32 | (uint32_t)b;
    for (size_t i = hash_pair(k) & (m->cap - 1);; i = (i + 1) & (m->cap - 1)) {
        if (m->slot[i].merged < 0) return NULL;
        if (m->slot[i].pair == k) return &m->slot[i];
    }
}
/* Keeps the first (best-ranked) merge of a pair, as the tokenizers library does. */
static void mergemap_put(MergeMap *m, int32_t a, int32_t b, int32_t rank, int32_t merged) {
    uint64_t k = (uint64_t)(uint32_t)a << 32 | (uint32_t)b;
    for (size_t i = hash_pair(k) & (m->cap - 1);; i = (i + 1) & (m->cap - 1)) {
        if (m->slot[i].merged < 0) { m->slot[i].pair = k; m->slot[i].rank = rank; m->slot[i].merged = merged; return; }
        if (m->slot[i].pair == k) return;
    }
}

/* A merge candidate: the adjacent symbols (left, right). Smaller key first, then leftmost.
 * SentencePiece: key = -score (best score first). Byte-level BPE: key = merge rank. */
typedef struct { double key; int32_t left, right; int32_t aux; } Cand;
typedef struct { Cand *a; size_t n, cap; } CandHeap;

static int cand_before(const Cand *x, const Cand *y) { return x->key < y->key || (x->key == y->key && x->left < y->left); }
static void heap_push(CandHeap *h, Cand c) {
    if (h->n == h->cap) { h->cap = h->cap ? 2 * h->cap : 256; h->a = (Cand *)xrealloc(h->a, h->cap * sizeof(Cand)); }
    size_t i = h->n++;
    while (i > 0 && cand_before(&c, &h->a[(i - 1) / 2])) { h->a[i] = h->a[(i - 1) / 2]; i = (i - 1) / 2; }
    h->a[i] = c;
}
static Cand heap_pop(CandHeap *h) {
    Cand top = h->a[0], last = h->a[--h->n];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= h->n) break;
        if (c + 1 < h->n && cand_before(&h->a[c + 1], &h->a[c])) c++;
        if (!cand_before(&h->a[c], &last)) break;
        h->a[i] = h->a[c];
        i = c;
    }
    if (h->n) h->a[i] = last;
    return top;
}

/* A symbol of the text being merged: a byte range of it, linked to its live neighbours. */
typedef struct {
    uint32_t start, len; /* bytes [start, start + len) of the segment; len 0 once merged away */
    int32_t prev, next;  /* neighbour symbol indices, -1 at the ends */
    int32_t id;          /* byte-level BPE: the token this symbol is */
    int32_t freeze;      /* SentencePiece: a user-defined piece, never merged further */
} Symbol;

typedef struct { Symbol *sym; size_t cap; CandHeap heap; int32_t *split; } MergeWork;

static Symbol *work_symbols(MergeWork *w, size_t n) {
    if (n > w->cap) { w->cap = n + n / 2 + 64; w->sym = (Symbol *)xrealloc(w->sym, w->cap * sizeof(Symbol)); }
    return w->sym;
}
static void work_free(MergeWork *w) { free(w->sym); free(w->heap.a); free(w->split); memset(w, 0, sizeof *w); }

/* ---------------------------------------------------------------------------------------
 * The tokenizer
 * ------------------------------------------------------------------------------------- */

typedef enum { TOK_SPM = 1, TOK_BPE = 2 } TokKind;

/* SentencePiece piece types (sentencepiece_model.proto); byte-level BPE uses NORMAL/CONTROL. */
enum { PIECE_NORMAL = 1, PIECE_UNKNOWN = 2, PIECE_CONTROL = 3, PIECE_USER_DEFINED = 4, PIECE_UNUSED = 5, PIECE_BYTE = 6 };

/* Byte-level pre-tokenizer steps, applied in order; each cuts every piece further. */
typedef enum { PRE_SPLIT, PRE_DIGITS, PRE_BYTELEVEL } PreKind;
typedef enum { PAT_GPT2, PAT_LLAMA3, PAT_QWEN2 } Pattern;
typedef struct {
    PreKind kind;
    Pattern pattern;      /* PRE_SPLIT (and PRE_BYTELEVEL with use_regex: GPT-2) */
    int individual;       /* PRE_DIGITS: each digit alone (else runs of digits) */
    int add_prefix_space; /* PRE_BYTELEVEL */
    int use_regex;        /* PRE_BYTELEVEL */
} PreStep;
#define TOK_MAX_PRE 8

typedef struct {
    char *content;   /* [len] */
    size_t len;
    int32_t id;
    int lstrip, rstrip, single_word, special;
} AddedToken;

typedef struct {
    TokKind kind;
    int32_t vocab_size;   /* V: one past the largest id */
    char **piece;         /* [V] the token as the file spells it (NUL-terminated), NULL for an unused id */
    uint32_t *piece_len;  /* [V] */
    char **key;           /* [V] what encoding looks up: the SPM piece, or a BPE token's raw bytes (NULL if none) */
    uint32_t *key_len;    /* [V] */
    char **out;           /* [V] the bytes decoding emits */
    uint32_t *out_len;    /* [V] */
    uint8_t *type;        /* [V] PIECE_* */
    float *score;         /* [V] SentencePiece merge priority */
    StrMap map;           /* key -> id */
    int32_t bos_id, eos_id, unk_id; /* -1 when absent */

    /* SentencePiece */
    int add_dummy_prefix, remove_extra_ws, escape_ws, byte_fallback;
    int split_at_space;   /* no mergeable piece has "▁" after another character: encode word by word */
    int has_unused;
    int32_t byte_id[256]; /* <0xXX> pieces; byte-level BPE: the one-byte tokens */
    size_t max_user_len;  /* longest user-defined piece, 0 if none */
    uint32_t *user_lens;  /* [n_user_lens] the distinct lengths of user-defined pieces, longest first */
    size_t n_user_lens;

    /* byte-level BPE */
    MergeMap merges;
    int ignore_merges;
    int nfc;              /* the normalizer is NFC (Qwen2) */
    PreStep pre[TOK_MAX_PRE];
    int n_pre;
    AddedToken *added;    /* [n_added], sorted by first byte then longest first */
    size_t n_added;
    uint32_t added_at[257]; /* added tokens starting with byte b: added[added_at[b] .. added_at[b+1]) */

    char source[512];     /* the file it came from, for messages */
} Tokenizer;

static void tok_free(Tokenizer *t) {
    for (int32_t i = 0; i < t->vocab_size; i++) {
        if (t->key && t->key[i] != t->piece[i]) free(t->key[i]);
        if (t->out && t->out[i] != t->piece[i] && t->out[i] != t->key[i]) free(t->out[i]);
        if (t->piece) free(t->piece[i]);
    }
    free(t->piece); free(t->piece_len); free(t->key); free(t->key_len); free(t->user_lens);
    free(t->out); free(t->out_len); free(t->type); free(t->score);
    strmap_free(&t->map);
    free(t->merges.slot);
    for (size_t i = 0; i < t->n_added; i++) free(t->added[i].content);
    free(t->added);
    memset(t, 0, sizeof *t);
}

static void tok_alloc_vocab(Tokenizer *t, int32_t V) {
    t->vocab_size = V;
    t->piece = (char **)xcalloc((size_t)V, sizeof(char *));
    t->piece_len = (uint32_t *)xcalloc((size_t)V, sizeof(uint32_t));
    t->key = (char **)xcalloc((size_t)V, sizeof(char *));
    t->key_len = (uint32_t *)xcalloc((size_t)V, sizeof(uint32_t));
    t->out = (char **)xcalloc((size_t)V, sizeof(char *));
    t->out_len = (uint32_t *)xcalloc((size_t)V, sizeof(uint32_t));
    t->type = (uint8_t *)xcalloc((size_t)V, 1);
    t->score = (float *)xcalloc((size_t)V, sizeof(float));
    t->bos_id = t->eos_id = t->unk_id = -1;
    for (int b = 0; b < 256; b++) t->byte_id[b] = -1;
}

/* Text from a file, made safe to quote in an error sentence: control bytes and invalid UTF-8
 * as \xNN, at most about 80 bytes. Returns one of four rotating static buffers. */
static const char *quote_bytes(const char *s, size_t n) {
    static char bufs[4][400];
    static int which = 0;
    char *b = bufs[which = (which + 1) % 4];
    size_t m = 0;
    for (size_t i = 0; i < n && m < 320;) {
        size_t l = utf8_valid_len((const uint8_t *)s + i, n - i);
        unsigned char c = (unsigned char)s[i];
        if (l == 0 || c < 0x20 || c == 0x7f || c == '\\') { m += (size_t)snprintf(b + m, 8, "\\x%02X", c); i++; }
        else { memcpy(b + m, s + i, l); m += l; i += l; }
    }
    if (m >= 320) { memcpy(b + m, "...", 3); m += 3; }
    b[m] = 0;
    return b;
}
static const char *quote_str(const char *s) { return s ? quote_bytes(s, strlen(s)) : "?"; }

/* ---------------------------------------------------------------------------------------
 * Loading tokenizer.model: a protobuf ModelProto, read field by field.
 *   ModelProto      1: pieces (repeated SentencePiece)  2: trainer_spec  3: normalizer_spec
 *   SentencePiece   1: piece (string)  2: score (float)  3: type (enum, NORMAL by default)
 *   TrainerSpec     3: model_type (1 unigram, 2 BPE)  24: treat_whitespace_as_suffix
 *                   35: byte_fallback  44: unk_surface  46: bos_piece  47: eos_piece
 *   NormalizerSpec  1: name  2: precompiled_charsmap  3: add_dummy_prefix (default true)
 *                   4: remove_extra_whitespaces (true)  5: escape_whitespaces (true)
 * ------------------------------------------------------------------------------------- */

typedef struct { const uint8_t *p, *end; } PbReader;
typedef struct { uint32_t field, wire; uint64_t value; const uint8_t *data; size_t len; } PbField;

static int pb_varint(PbReader *r, uint64_t *v) {
    uint64_t x = 0;
    for (int shift = 0; shift < 64; shift += 7) {
        if (r->p >= r->end) return -1;
        uint8_t b = *r->p++;
        x |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) { *v = x; return 0; }
    }
    return -1; /* more than 10 bytes */
}
/* Reads the next field: 1 got one, 0 at the end, -1 malformed. */
static int pb_next(PbReader *r, PbField *f) {
    if (r->p >= r->end) return 0;
    uint64_t key;
    if (pb_varint(r, &key) != 0) return -1;
    f->field = (uint32_t)(key >> 3);
    f->wire = (uint32_t)(key & 7);
    f->data = NULL; f->len = 0; f->value = 0;
    if (f->field == 0) return -1;
    switch (f->wire) {
    case 0: return pb_varint(r, &f->value) == 0 ? 1 : -1;
    case 1: if (r->end - r->p < 8) return -1; f->data = r->p; f->len = 8; r->p += 8; return 1;
    case 5: if (r->end - r->p < 4) return -1;
        f->value = (uint64_t)r->p[0] | (uint64_t)r->p[1] << 8 | (uint64_t)r->p[2] << 16 | (uint64_t)r->p[3] << 24;
        f->data = r->p; f->len = 4; r->p += 4; return 1;
    case 2: {
        uint64_t n;
        if (pb_varint(r, &n) != 0 || n > (uint64_t)(r->end - r->p)) return -1;
        f->data = r->p; f->len = (size_t)n; r->p += n; return 1;
    }
    default: return -1; /* groups (3, 4) and reserved wire types */
    }
}

static int spm_fail(const char *name, const char *what) {
    return set_error("%s is not a valid SentencePiece model: %s", name, what);
}

/* Parses a tokenizer.model image; -1 + last_error() on anything malformed or unsupported. */
static int tok_load_spm_bytes(Tokenizer *t, const uint8_t *data, size_t size, const char *name) {
    memset(t, 0, sizeof *t);
    snprintf(t->source, sizeof t->source, "%.500s", name);
    t->kind = TOK_SPM;
    PbReader r = {data, data + size};
    PbField f;
    int got;
    size_t n_pieces = 0;
    const uint8_t *trainer = NULL, *normalizer = NULL;
    size_t trainer_len = 0, normalizer_len = 0;
    while ((got = pb_next(&r, &f)) == 1) {
        if (f.field == 1) { if (f.wire != 2) return spm_fail(name, "a piece entry has the wrong wire type"); n_pieces++; }
        if (f.field == 2 && f.wire == 2) { trainer = f.data; trainer_len = f.len; }
        if (f.field == 3 && f.wire == 2) { normalizer = f.data; normalizer_len = f.len; }
    }
    if (got < 0) return spm_fail(name, "truncated or corrupt protobuf");
    if (n_pieces == 0) return spm_fail(name, "it has no pieces");
    if (n_pieces > (size_t)INT32_MAX / 2) return spm_fail(name, "too many pieces");

    /* Trainer spec: the model type and the options encoding depends on. */
    int model_type = 1, ws_suffix = 0;
    const char *unk_surface = " \xE2\x81\x87 ";
    size_t unk_surface_len = strlen(unk_surface);
    const uint8_t *bos_piece = (const uint8_t *)"<s>", *eos_piece = (const uint8_t *)"</s>";
    size_t bos_len = 3, eos_len = 4;
    r.p = r.end = NULL;
    if (trainer) { r.p = trainer; r.end = trainer + trainer_len; }
    while (trainer && (got = pb_next(&r, &f)) == 1) {
        if (f.field == 3 && f.wire == 0) model_type = (int)f.value;
        if (f.field == 24 && f.wire == 0) ws_suffix = f.value != 0;
        if (f.field == 35 && f.wire == 0) t->byte_fallback = f.value != 0;
        if (f.field == 44 && f.wire == 2) { unk_surface = (const char *)f.data; unk_surface_len = f.len; }
        if (f.field == 46 && f.wire == 2) { bos_piece = f.data; bos_len = f.len; }
        if (f.field == 47 && f.wire == 2) { eos_piece = f.data; eos_len = f.len; }
    }
    if (trainer && got < 0) return spm_fail(name, "truncated or corrupt trainer_spec");
    if (model_type != 2)
        return set_error("%s: SentencePiece model type %d is not supported (only BPE, type 2, as LLaMA uses)", name, model_type);
    if (ws_suffix) return set_error("%s: treat_whitespace_as_suffix is not supported", name);

    /* Normalizer spec: we implement the identity normalizer (LLaMA's), nothing precompiled. */
    t->add_dummy_prefix = t->remove_extra_ws = t->escape_ws = 1;
    r.p = r.end = NULL;
    if (normalizer) { r.p = normalizer; r.end = normalizer + normalizer_len; }
    while (normalizer && (got = pb_next(&r, &f)) == 1) {
        if (f.field == 2 && f.wire == 2 && f.len > 0)
            return set_error("%s: the normalizer has a precompiled character map (e.g. nmt_nfkc), which is not supported; only the identity normalizer is", name);
        if (f.field == 3 && f.wire == 0) t->add_dummy_prefix = f.value != 0;
        if (f.field == 4 && f.wire == 0) t->remove_extra_ws = f.value != 0;
        if (f.field == 5 && f.wire == 0) t->escape_ws = f.value != 0;
    }
    if (normalizer && got < 0) return spm_fail(name, "truncated or corrupt normalizer_spec");

    /* Pieces. */
    tok_alloc_vocab(t, (int32_t)n_pieces);
    r.p = data; r.end = data + size;
    int32_t id = 0;
    while (pb_next(&r, &f) == 1) {
        if (f.field != 1) continue;
        PbReader pr = {f.data, f.data + f.len};
        PbField g;
        const uint8_t *text = NULL;
        size_t text_len = 0;
        float score = 0;
        uint64_t type = PIECE_NORMAL;
        while ((got = pb_next(&pr, &g)) == 1) {
            if (g.field == 1 && g.wire == 2) { text = g.data; text_len = g.len; }
            if (g.field == 2 && g.wire == 5) { uint32_t u = (uint32_t)g.value; memcpy(&score, &u, 4); }
            if (g.field == 3 && g.wire == 0) type = g.value;
        }
        if (got < 0) { tok_free(t); return spm_fail(name, "a piece is truncated or corrupt"); }
        if (!text || text_len == 0) { tok_free(t); return set_error("%s: piece %d is empty", name, id); }
        if (text_len > 4096) { tok_free(t); return set_error("%s: piece %d is %zu bytes long", name, id, text_len); }
        if (type < 1 || type > 6) { tok_free(t); return set_error("%s: piece %d has unknown type %llu", name, id, (unsigned long long)type); }
        if (!isfinite(score)) { tok_free(t); return set_error("%s: piece %d has a score that is not finite", name, id); }
        t->piece[id] = dup_bytes(text, text_len);
        t->piece_len[id] = (uint32_t)text_len;
        t->key[id] = t->piece[id];
        t->key_len[id] = (uint32_t)text_len;
        t->type[id] = (uint8_t)type;
        t->score[id] = score;
        id++;
    }
    /* The map: every piece by its text; two pieces may not share a text. */
    strmap_init(&t->map, n_pieces, t->key, t->key_len);
    for (int32_t i = 0; i < t->vocab_size; i++) {
        int32_t dup = strmap_put(&t->map, i);
        if (dup >= 0) { set_error("%s: pieces %d and %d are both '%s'", name, dup, i, quote_bytes(t->piece[i], t->piece_len[i])); tok_free(t); return -1; }
    }
    const uint8_t SPACE[3] = {0xE2, 0x96, 0x81}; /* U+2581 "▁" */
    t->split_at_space = 1;
    for (int32_t i = 0; i < t->vocab_size; i++) {
        uint8_t ty = t->type[i];
        const char *p = t->piece[i];
        size_t n = t->piece_len[i];
        if (ty == PIECE_UNKNOWN) {
            if (t->unk_id >= 0) { tok_free(t); return set_error("%s: more than one unknown piece", name); }
            t->unk_id = i;
        }
        if (ty == PIECE_BYTE) {
            int v = -1;
            if (n == 6 && memcmp(p, "<0x", 3) == 0 && p[5] == '>' && isxdigit((unsigned char)p[3]) && isxdigit((unsigned char)p[4]))
                v = (int)strtol(p + 3, NULL, 16);
            if (v < 0 || t->byte_id[v] >= 0) {
                set_error("%s: byte piece %d is '%s', not a distinct <0xXX>", name, i, quote_bytes(p, n));
                tok_free(t);
                return -1;
            }
            t->byte_id[v] = i;
        }
        if (ty == PIECE_USER_DEFINED && n > t->max_user_len) t->max_user_len = n;
        if (ty == PIECE_UNUSED) t->has_unused = 1;
        if (ty == PIECE_NORMAL || ty == PIECE_USER_DEFINED || ty == PIECE_UNUSED) {
            /* A "▁" preceded by some other character inside a mergeable piece means merges may
             * cross word starts; then the whole text is merged as one sequence. */
            for (size_t k = 1; k + 3 <= n; k++)
                if (memcmp(p + k, SPACE, 3) == 0 && (k < 3 || memcmp(p + k - 3, SPACE, 3) != 0)) t->split_at_space = 0;
        }
        /* What decoding emits. */
        if (ty == PIECE_CONTROL) { t->out[i] = dup_bytes("", 0); t->out_len[i] = 0; }
        else if (ty == PIECE_UNKNOWN) { t->out[i] = dup_bytes(unk_surface, unk_surface_len); t->out_len[i] = (uint32_t)unk_surface_len; }
        else if (ty == PIECE_BYTE) { char b = (char)(unsigned char)(strtoul(p + 3, NULL, 16)); t->out[i] = dup_bytes(&b, 1); t->out_len[i] = 1; }
        else {
            char *o = (char *)xmalloc(n + 1);
            size_t m = 0;
            for (size_t k = 0; k < n;) {
                if (k + 3 <= n && memcmp(p + k, SPACE, 3) == 0) { o[m++] = ' '; k += 3; }
                else o[m++] = p[k++];
            }
            o[m] = 0;
            t->out[i] = o;
            t->out_len[i] = (uint32_t)m;
        }
    }
    if (t->unk_id < 0) { tok_free(t); return set_error("%s: the model has no unknown piece", name); }
    if (t->byte_fallback)
        for (int b = 0; b < 256; b++)
            if (t->byte_id[b] < 0) { tok_free(t); return set_error("%s: byte_fallback is on but piece <0x%02X> is missing", name, b); }
    int32_t b = strmap_get(&t->map, (const char *)bos_piece, bos_len);
    int32_t e = strmap_get(&t->map, (const char *)eos_piece, eos_len);
    t->bos_id = (b >= 0 && (t->type[b] == PIECE_CONTROL || t->type[b] == PIECE_USER_DEFINED)) ? b : -1;
    t->eos_id = (e >= 0 && (t->type[e] == PIECE_CONTROL || t->type[e] == PIECE_USER_DEFINED)) ? e : -1;
    if (t->has_unused) t->split_at_space = 0; /* keep SentencePiece's whole-text resegmentation exact */
    if (t->max_user_len) { /* the distinct user-defined lengths, longest first, for prefix matching */
        uint8_t *seen = (uint8_t *)xcalloc(t->max_user_len + 1, 1);
        t->user_lens = (uint32_t *)xmalloc((t->max_user_len + 1) * sizeof(uint32_t));
        for (int32_t i = 0; i < t->vocab_size; i++)
            if (t->type[i] == PIECE_USER_DEFINED) seen[t->piece_len[i]] = 1;
        for (size_t l = t->max_user_len; l > 0; l--)
            if (seen[l]) t->user_lens[t->n_user_lens++] = (uint32_t)l;
        free(seen);
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------
 * SentencePiece encoding
 * ------------------------------------------------------------------------------------- */

/* Identity normalization: invalid UTF-8 becomes U+FFFD, optional removal of extra spaces,
 * the dummy prefix, and ' ' -> "▁". Returns malloc'd text [*out_len]. */
static char *spm_normalize(const Tokenizer *t, const char *text, size_t n, size_t *out_len) {
    const char *space = t->escape_ws ? "\xE2\x96\x81" : " ";
    size_t space_len = t->escape_ws ? 3 : 1;
    char *out = (char *)xmalloc(3 * n + 4);
    size_t m = 0, i = 0;
    const uint8_t *s = (const uint8_t *)text;
    if (t->remove_extra_ws) while (i < n && s[i] == ' ') i++;
    if (i < n && t->add_dummy_prefix) { memcpy(out + m, space, space_len); m += space_len; }
    int prev_space = 0;
    while (i < n) {
        size_t len = utf8_valid_len(s + i, n - i);
        if (len == 0) { memcpy(out + m, "\xEF\xBF\xBD", 3); m += 3; i += 1; prev_space = 0; continue; }
        if (s[i] == ' ') {
            if (!(t->remove_extra_ws && prev_space)) { memcpy(out + m, space, space_len); m += space_len; }
            prev_space = 1;
        } else {
            memcpy(out + m, s + i, len);
            m += len;
            prev_space = 0;
        }
        i += len;
    }
    if (t->remove_extra_ws)
        while (m >= space_len && memcmp(out + m - space_len, space, space_len) == 0) m -= space_len;
    *out_len = m;
    return out;
}

static int spm_mergeable(const Tokenizer *t, int32_t id) {
    return id >= 0 && (t->type[id] == PIECE_NORMAL || t->type[id] == PIECE_USER_DEFINED || t->type[id] == PIECE_UNUSED);
}

/* Queues the merge of symbols (left, right) if their concatenation is a piece. */
static void spm_try_pair(const Tokenizer *t, MergeWork *w, const char *s, int32_t left, int32_t right) {
    if (left < 0 || right < 0) return;
    Symbol *a = &w->sym[left], *b = &w->sym[right];
    if (a->freeze || b->freeze) return;
    int32_t id = strmap_get(&t->map, s + a->start, (size_t)a->len + b->len);
    if (!spm_mergeable(t, id)) return;
    Cand c = {-(double)t->score[id], left, right, (int32_t)(a->len + b->len)};
    heap_push(&w->heap, c);
    if (t->type[id] == PIECE_UNUSED) w->split[id] = (int32_t)a->len; /* how to undo it (last one wins) */
}

/* Emits the ids for one final symbol s[0..n): the piece, its halves if the piece is unused,
 * or (not a piece at all) its bytes as <0xXX> pieces or the unknown piece. */
static void spm_emit(const Tokenizer *t, const MergeWork *w, const char *s, size_t n, IdList *out) {
    int32_t id = strmap_get(&t->map, s, n);
    if (id >= 0 && t->type[id] == PIECE_UNUSED && w->split && w->split[id] > 0 && (size_t)w->split[id] < n) {
        size_t l = (size_t)w->split[id];
        spm_emit(t, w, s, l, out);
        spm_emit(t, w, s + l, n - l, out);
        return;
    }
    if (id >= 0) { ids_push(out, id); return; }
    if (t->byte_fallback) for (size_t i = 0; i < n; i++) ids_push(out, t->byte_id[(uint8_t)s[i]]);
    else ids_push(out, t->unk_id);
}

/* BPE over one segment of normalized text: start from characters (and whole user-defined
 * pieces), repeatedly merge the adjacent pair whose merged piece has the best score. */
static void spm_encode_segment(const Tokenizer *t, MergeWork *w, const char *s, size_t n, IdList *out) {
    Symbol *sym = work_symbols(w, n);
    int32_t count = 0;
    const uint8_t *u = (const uint8_t *)s;
    for (size_t i = 0; i < n;) {
        size_t len = 0;
        int freeze = 0;
        for (size_t k = 0; k < t->n_user_lens && !len; k++) { /* the longest user-defined piece here */
            size_t l = t->user_lens[k];
            if (l > n - i) continue;
            int32_t id = strmap_get(&t->map, s + i, l);
            if (id >= 0 && t->type[id] == PIECE_USER_DEFINED) { len = l; freeze = 1; }
        }
        if (!len) { len = utf8_valid_len(u + i, n - i); if (!len) len = 1; }
        sym[count] = (Symbol){(uint32_t)i, (uint32_t)len, count - 1, count + 1, -1, freeze};
        count++;
        i += len;
    }
    if (count == 0) return;
    sym[count - 1].next = -1;
    w->heap.n = 0;
    for (int32_t i = 0; i + 1 < count; i++) spm_try_pair(t, w, s, i, i + 1);
    while (w->heap.n) {
        Cand c = heap_pop(&w->heap);
        Symbol *a = &sym[c.left], *b = &sym[c.right];
        if (a->len == 0 || b->len == 0 || a->next != c.right || (int32_t)(a->len + b->len) != c.aux) continue; /* stale */
        a->len += b->len;
        b->len = 0;
        a->next = b->next;
        if (b->next >= 0) sym[b->next].prev = c.left;
        spm_try_pair(t, w, s, a->prev, c.left);
        spm_try_pair(t, w, s, c.left, a->next);
    }
    for (int32_t i = 0; i >= 0; i = sym[i].next) spm_emit(t, w, s + sym[i].start, sym[i].len, out);
}

/* ---------------------------------------------------------------------------------------
 * Byte-level BPE encoding
 * ------------------------------------------------------------------------------------- */

/* Length (>= 1) of the match the pattern makes at the start of s[0..n), n >= 1. The three
 * patterns are alternations tried left to right (first alternative that matches wins):
 *   GPT-2   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
 *   LLaMA-3 (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}
 *           | ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
 *   Qwen2   as LLaMA-3 with \p{N} instead of \p{N}{1,3}
 * Every character is a letter, a number, a space or "other", so some alternative always
 * matches: splitting never leaves gaps. */
static size_t class_run(const uint8_t *s, size_t n, size_t i, int cls, size_t max_chars) {
    size_t chars = 0;
    while (i < n && chars < max_chars) {
        size_t len;
        if (cp_class(utf8_next(s + i, n - i, &len)) != cls) break;
        i += len;
        chars++;
    }
    return i;
}
static size_t contraction(const uint8_t *s, size_t n, int any_case) {
    if (n < 2 || s[0] != '\'') return 0;
    static const char *const forms[] = {"s", "t", "re", "ve", "m", "ll", "d"};
    for (int k = 0; k < 7; k++) {
        size_t m = strlen(forms[k]);
        if (n < 1 + m) continue;
        size_t j = 0;
        for (; j < m; j++) {
            int c = s[1 + j];
            if (any_case && c >= 'A' && c <= 'Z') c += 'a' - 'A';
            if (c != forms[k][j]) break;
        }
        if (j == m) return 1 + m;
    }
    /* case-insensitively the long s U+017F "ſ" folds to 's' (Oniguruma matches "'ſ" too) */
    if (any_case && n >= 3 && (uint8_t)s[1] == 0xC5 && (uint8_t)s[2] == 0xBF) return 3;
    return 0;
}
static size_t pattern_match(Pattern pat, const uint8_t *s, size_t n) {
    size_t len0, len1 = 0;
    uint32_t c0 = utf8_next(s, n, &len0);
    int k0 = cp_class(c0), k1 = -1;
    if (len0 < n) k1 = cp_class(utf8_next(s + len0, n - len0, &len1));
    size_t m = contraction(s, n, pat != PAT_GPT2);
    if (m) return m;
    if (pat == PAT_GPT2) {
        /* ` ?X+` for X = letters, numbers, other */
        int classes[3] = {CP_LETTER, CP_NUMBER, CP_OTHER};
        for (int k = 0; k < 3; k++) {
            if (c0 == ' ' && k1 == classes[k]) return class_run(s, n, len0, classes[k], SIZE_MAX);
            if (k0 == classes[k]) return class_run(s, n, 0, classes[k], SIZE_MAX);
        }
    } else {
        /* [^\r\n\p{L}\p{N}]?\p{L}+ */
        if (k0 != CP_LETTER && k0 != CP_NUMBER && c0 != '\r' && c0 != '\n' && k1 == CP_LETTER)
            return class_run(s, n, len0, CP_LETTER, SIZE_MAX);
        if (k0 == CP_LETTER) return class_run(s, n, 0, CP_LETTER, SIZE_MAX);
        /* \p{N}{1,3} or \p{N} */
        if (k0 == CP_NUMBER) return class_run(s, n, 0, CP_NUMBER, pat == PAT_LLAMA3 ? 3 : 1);
        /*  ?[^\s\p{L}\p{N}]+[\r\n]* */
        size_t e = 0;
        if (c0 == ' ' && k1 == CP_OTHER) e = class_run(s, n, len0, CP_OTHER, SIZE_MAX);
        else if (k0 == CP_OTHER) e = class_run(s, n, 0, CP_OTHER, SIZE_MAX);
        if (e) {
            while (e < n && (s[e] == '\r' || s[e] == '\n')) e++;
            return e;
        }
        /* \s*[\r\n]+ : the space run up to and including its last \r or \n */
        size_t run = class_run(s, n, 0, CP_SPACE, SIZE_MAX), last_nl = 0;
        for (size_t i = 0; i < run; i++) if (s[i] == '\r' || s[i] == '\n') last_nl = i + 1;
        if (last_nl) return last_nl;
    }
    /* \s+(?!\S) then \s+ : a space run, leaving its last space to the next word if one follows */
    size_t run = class_run(s, n, 0, CP_SPACE, SIZE_MAX);
    if (run == n) return run;
    size_t last_start = 0;
    for (size_t i = 0, len; i < run; i += len) { last_start = i; utf8_next(s + i, run - i, &len); }
    return last_start > 0 ? last_start : run;
}

/* Merges one pre-tokenized word (raw bytes) into ids. */
static void bpe_encode_word(const Tokenizer *t, MergeWork *w, const uint8_t *s, size_t n, IdList *out) {
    if (n == 0) return;
    if (t->ignore_merges) {
        int32_t id = strmap_get(&t->map, (const char *)s, n);
        if (id >= 0) { ids_push(out, id); return; }
    }
    Symbol *sym = work_symbols(w, n);
    int32_t count = 0;
    for (size_t i = 0; i < n; i++) {
        int32_t id = t->byte_id[s[i]];
        if (id < 0) id = t->unk_id;
        if (id < 0) continue; /* a byte the vocabulary lacks, and no unknown token: dropped */
        sym[count] = (Symbol){(uint32_t)i, 1, count - 1, count + 1, id, 0};
        count++;
    }
    if (count == 0) return;
    sym[count - 1].next = -1;
    w->heap.n = 0;
    for (int32_t i = 0; i + 1 < count; i++) {
        const MergeSlot *m = mergemap_get(&t->merges, sym[i].id, sym[i + 1].id);
        if (m) heap_push(&w->heap, (Cand){(double)m->rank, i, i + 1, m->merged});
    }
    while (w->heap.n) {
        Cand c = heap_pop(&w->heap);
        Symbol *a = &sym[c.left];
        if (a->len == 0 || a->next < 0) continue;
        Symbol *b = &sym[a->next];
        const MergeSlot *m = mergemap_get(&t->merges, a->id, b->id);
        if (!m || m->merged != c.aux) continue; /* stale: one side changed since it was queued */
        a->id = m->merged;
        a->len += b->len;
        b->len = 0;
        a->next = b->next;
        if (a->next >= 0) sym[a->next].prev = c.left;
        if (a->prev >= 0) {
            const MergeSlot *p = mergemap_get(&t->merges, sym[a->prev].id, a->id);
            if (p) heap_push(&w->heap, (Cand){(double)p->rank, a->prev, c.left, p->merged});
        }
        if (a->next >= 0) {
            const MergeSlot *q = mergemap_get(&t->merges, a->id, sym[a->next].id);
            if (q) heap_push(&w->heap, (Cand){(double)q->rank, c.left, a->next, q->merged});
        }
    }
    for (int32_t i = 0; i >= 0; i = sym[i].next) ids_push(out, sym[i].id);
}

typedef void (*TokProgressFn)(size_t bytes_done, size_t bytes_total, size_t tokens, void *ctx);
typedef struct {
    const Tokenizer *t;
    MergeWork *w;
    IdList *out;
    const char *base;  /* the whole text, for progress */
    size_t total, next_report;
    TokProgressFn progress;
    void *progress_ctx;
} EncodeCtx;

static void report_progress(EncodeCtx *e, const void *at) {
    if (!e->progress) return;
    const char *p = (const char *)at;
    if (p < e->base || p > e->base + e->total) return; /* a temporary buffer */
    size_t done = (size_t)(p - e->base);
    if (done >= e->next_report) { e->progress(done, e->total, e->out->n, e->progress_ctx); e->next_report = done + ((size_t)4 << 20); }
}

/* Runs pre-tokenizer steps [step, n_pre) over s[0..n), then BPE on every word. */
static void bpe_pretokenize(EncodeCtx *e, int step, const uint8_t *s, size_t n) {
    const Tokenizer *t = e->t;
    if (n == 0) return;
    const PreStep *ps = &t->pre[step];
    if (ps->kind == PRE_SPLIT) {
        for (size_t i = 0; i < n;) {
            size_t m = pattern_match(ps->pattern, s + i, n - i);
            bpe_pretokenize(e, step + 1, s + i, m);
            i += m;
        }
    } else if (ps->kind == PRE_DIGITS) {
        /* "digits" are what Rust's char::is_numeric() says: \p{N}, not just 0-9 */
        for (size_t i = 0; i < n;) {
            size_t len, j;
            int digit = is_numeric(utf8_next(s + i, n - i, &len));
            j = i + len;
            if (!digit || !ps->individual)
                while (j < n && is_numeric(utf8_next(s + j, n - j, &len)) == digit) j += len;
            bpe_pretokenize(e, step + 1, s + i, j - i);
            i = j;
        }
    } else { /* PRE_BYTELEVEL: the last step */
        uint8_t *tmp = NULL;
        if (ps->add_prefix_space && s[0] != ' ') {
            tmp = (uint8_t *)xmalloc(n + 1);
            tmp[0] = ' ';
            memcpy(tmp + 1, s, n);
            s = tmp;
            n++;
        }
        if (ps->use_regex) {
            for (size_t i = 0; i < n;) {
                size_t m = pattern_match(PAT_GPT2, s + i, n - i);
                bpe_encode_word(t, e->w, s + i, m, e->out);
                i += m;
                report_progress(e, s + i);
            }
        } else {
            bpe_encode_word(t, e->w, s, n, e->out);
            report_progress(e, s + n);
        }
        free(tmp);
    }
}

/* single_word tokens need no \w character (Rust regex's: Alphabetic, marks, Nd, Pc, joiners) beside them. */
static int is_word_char(uint32_t cp) {
    if (cp < 0x80) return (cp >= 'a' && cp <= 'z') || (cp >= 'A' && cp <= 'Z') || (cp >= '0' && cp <= '9') || cp == '_';
    return in_ranges(UNI_WORD, COUNT_OF(UNI_WORD), cp);
}

/* The added token matching at s[i..n) (longest first), or NULL. */
static const AddedToken *added_match(const Tokenizer *t, const uint8_t *s, size_t n, size_t i) {
    for (uint32_t k = t->added_at[s[i]]; k < t->added_at[s[i] + 1]; k++) {
        const AddedToken *a = &t->added[k];
        if (a->len > n - i || memcmp(s + i, a->content, a->len) != 0) continue;
        if (a->single_word) {
            /* only as a whole word: no word character just before or just after */
            if (i > 0) {
                size_t j = i - 1, len;
                while (j > 0 && (s[j] & 0xc0) == 0x80) j--;
                if (is_word_char(utf8_next(s + j, n - j, &len))) continue;
            }
            size_t len;
            if (i + a->len < n && is_word_char(utf8_next(s + i + a->len, n - i - a->len, &len))) continue;
        }
        return a;
    }
    return NULL;
}

static int is_space_at(const uint8_t *s, size_t n, size_t i, size_t *len) {
    return cp_class(utf8_next(s + i, n - i, len)) == CP_SPACE;
}

/* A stretch of text between added tokens: normalized (NFC, if asked), then pre-tokenized. */
static void bpe_encode_gap(EncodeCtx *e, const uint8_t *s, size_t n) {
    if (!e->t->nfc) { bpe_pretokenize(e, 0, s, n); return; }
    size_t m;
    char *norm = nfc_normalize(s, n, &m);
    bpe_pretokenize(e, 0, (const uint8_t *)norm, m);
    free(norm);
}

static void bpe_encode_text(EncodeCtx *e, const uint8_t *s, size_t n) {
    const Tokenizer *t = e->t;
    size_t gap = 0; /* start of the text not yet encoded */
    for (size_t i = 0; i < n && t->n_added;) {
        const AddedToken *a = added_match(t, s, n, i);
        if (!a) { i++; continue; }
        size_t start = i, end = i + a->len, len;
        if (a->lstrip)  /* the token swallows the whitespace before it */
            while (start > gap) {
                size_t j = start - 1;
                while (j > gap && (s[j] & 0xc0) == 0x80) j--;
                if (!is_space_at(s, n, j, &len) || j + len != start) break;
                start = j;
            }
        if (a->rstrip) while (end < n && is_space_at(s, n, end, &len)) end += len;
        bpe_encode_gap(e, s + gap, start - gap);
        ids_push(e->out, a->id);
        gap = i = end;
    }
    bpe_encode_gap(e, s + gap, n - gap);
}

/* ---------------------------------------------------------------------------------------
 * Encoding: the public entry points
 * ------------------------------------------------------------------------------------- */

/* Encodes text[0..len) (any bytes; invalid UTF-8 is tolerated); returns malloc'd ids [*n_out].
 * progress (may be NULL) is called now and then with how far it got. */
static int32_t *tok_encode_progress(const Tokenizer *t, const char *text, size_t len, int add_bos, size_t *n_out,
                                    TokProgressFn progress, void *progress_ctx) {
    if (len > (size_t)INT32_MAX) { /* symbol indices are 32-bit */
        set_error("text of %zu bytes is longer than the 2 GB one call encodes; split it into documents", len);
        return NULL;
    }
    IdList out = {0};
    MergeWork w = {0};
    if (add_bos && t->bos_id >= 0) ids_push(&out, t->bos_id);
    EncodeCtx e = {t, &w, &out, text, len, 0, progress, progress_ctx};
    if (t->kind == TOK_SPM) {
        if (t->has_unused) w.split = (int32_t *)xcalloc((size_t)t->vocab_size, sizeof(int32_t));
        size_t n;
        char *norm = spm_normalize(t, text, len, &n);
        /* Cut before every "▁" that follows another character (when no piece spans one). */
        const char *SPACE = "\xE2\x96\x81";
        size_t seg = 0;
        for (size_t i = 3; t->split_at_space && i + 3 <= n; i++) {
            if (memcmp(norm + i, SPACE, 3) != 0 || memcmp(norm + i - 3, SPACE, 3) == 0) continue;
            spm_encode_segment(t, &w, norm + seg, i - seg, &out);
            seg = i;
            if (progress && i >= e.next_report) { progress((size_t)((double)i / (double)n * (double)len), len, out.n, progress_ctx); e.next_report = i + ((size_t)4 << 20); }
        }
        if (n - seg > (size_t)INT32_MAX) { /* normalizing can triple the length */
            free(norm); work_free(&w); free(out.ids);
            set_error("text of %zu bytes is too long to encode as one piece; split it into documents", len);
            return NULL;
        }
        spm_encode_segment(t, &w, norm + seg, n - seg, &out);
        free(norm);
    } else {
        bpe_encode_text(&e, (const uint8_t *)text, len);
    }
    if (progress) progress(len, len, out.n, progress_ctx);
    work_free(&w);
    *n_out = out.n;
    if (!out.ids) out.ids = (int32_t *)xmalloc(sizeof(int32_t));
    return out.ids;
}
static API int32_t *tok_encode(const Tokenizer *t, const char *text, size_t len, int add_bos, size_t *n_out) {
    return tok_encode_progress(t, text, len, add_bos, n_out, NULL, NULL);
}

/* ---------------------------------------------------------------------------------------
 * Decoding, safe to stream: bytes of an unfinished UTF-8 character wait for the next token;
 * a sequence that cannot be finished becomes U+FFFD (SentencePiece: one per byte, as the
 * library does; byte-level BPE: one per maximal invalid subsequence, as Rust's lossy UTF-8).
 * ------------------------------------------------------------------------------------- */

typedef struct {
    uint8_t pending[4]; /* the start of an unfinished UTF-8 character */
    int n_pending;
    int started;        /* a visible piece has been emitted (SentencePiece strips one leading space) */
} TokDecoder;

static void tok_decoder_init(TokDecoder *d) { memset(d, 0, sizeof *d); }

/* How many bytes the sequence starting with lead needs (0: lead cannot start one), and
 * whether byte b may be continuation number k (1-based) after lead. */
static int utf8_need(uint8_t lead) {
    if (lead < 0x80) return 1;
    if (lead >= 0xc2 && lead <= 0xdf) return 2;
    if (lead >= 0xe0 && lead <= 0xef) return 3;
    if (lead >= 0xf0 && lead <= 0xf4) return 4;
    return 0;
}
static int utf8_cont_ok(uint8_t lead, int k, uint8_t b) {
    if (k == 1) {
        if (lead == 0xe0) return b >= 0xa0 && b <= 0xbf;
        if (lead == 0xed) return b >= 0x80 && b <= 0x9f;
        if (lead == 0xf0) return b >= 0x90 && b <= 0xbf;
        if (lead == 0xf4) return b >= 0x80 && b <= 0x8f;
    }
    return b >= 0x80 && b <= 0xbf;
}
static void put_replacement(const Tokenizer *t, TokDecoder *d, TokText *out) {
    int copies = t->kind == TOK_SPM ? d->n_pending : 1;
    for (int i = 0; i < copies; i++) text_put(out, "\xEF\xBF\xBD", 3);
    d->n_pending = 0;
}
static void decoder_feed(const Tokenizer *t, TokDecoder *d, const uint8_t *s, size_t n, TokText *out) {
    size_t i = 0;
    while (i < n) {
        if (d->n_pending) {
            uint8_t lead = d->pending[0];
            if (utf8_cont_ok(lead, d->n_pending, s[i])) {
                d->pending[d->n_pending++] = s[i++];
                if (d->n_pending == utf8_need(lead)) { text_put(out, d->pending, (size_t)d->n_pending); d->n_pending = 0; }
            } else put_replacement(t, d, out); /* s[i] is looked at again as a fresh start */
            continue;
        }
        /* the longest run of complete valid characters goes out in one copy */
        size_t j = i;
        for (;;) {
            size_t l = j < n ? utf8_valid_len(s + j, n - j) : 0;
            if (!l) break;
            j += l;
        }
        if (j > i) { text_put(out, s + i, j - i); i = j; continue; }
        int need = utf8_need(s[i]);
        if (need == 0) { d->n_pending = 1; put_replacement(t, d, out); i++; continue; }
        d->pending[0] = s[i++]; /* a valid start cut off by the token's end, or broken later */
        d->n_pending = 1;
    }
}

/* Appends the text of token id to out; -1 + last_error() for an id the vocabulary lacks. */
static int tok_decode_next(const Tokenizer *t, TokDecoder *d, int32_t id, TokText *out) {
    if (id < 0 || id >= t->vocab_size || !t->out[id])
        return set_error("token id %d is out of range (the vocabulary has %d tokens)", id, t->vocab_size);
    const uint8_t *s = (const uint8_t *)t->out[id];
    size_t n = t->out_len[id];
    if (t->kind == TOK_SPM) {
        if (t->type[id] == PIECE_CONTROL) return 0; /* <s>, </s>: invisible */
        if (!d->started && (t->add_dummy_prefix || t->remove_extra_ws) && n > 0 && s[0] == ' ' &&
            t->type[id] != PIECE_BYTE && t->type[id] != PIECE_UNKNOWN) { s++; n--; }
        d->started = 1;
        if (t->type[id] != PIECE_BYTE && d->n_pending) put_replacement(t, d, out);
    }
    decoder_feed(t, d, s, n, out);
    return 0;
}
/* Ends a stream: an unfinished character becomes U+FFFD. */
static void tok_decode_flush(const Tokenizer *t, TokDecoder *d, TokText *out) {
    if (d->n_pending) put_replacement(t, d, out);
}

/* Decodes ids[0..n) into malloc'd text [*len_out]; NULL + last_error() on a bad id. */
static API char *tok_decode(const Tokenizer *t, const int32_t *ids, size_t n, size_t *len_out) {
    TokDecoder d;
    tok_decoder_init(&d);
    TokText out = {0};
    text_put(&out, "", 0);
    for (size_t i = 0; i < n; i++)
        if (tok_decode_next(t, &d, ids[i], &out) != 0) { free(out.data); return NULL; }
    tok_decode_flush(t, &d, &out);
    if (len_out) *len_out = out.len;
    return out.data;
}

/* ---------------------------------------------------------------------------------------
 * Loading tokenizer.json (byte-level BPE)
 * The byte-level alphabet (GPT-2's bytes_to_unicode): the printable bytes ! .. ~, ¡ .. ¬ and
 * ® .. ÿ stand for themselves; the other 68 bytes become U+0100, U+0101, ... in byte order,
 * so every token is a printable string ("Ġ" is the space byte, "Ċ" the newline).
 * ------------------------------------------------------------------------------------- */

static void bytelevel_alphabet(uint32_t byte_to_cp[256], int16_t cp_to_byte[512]) {
    uint32_t next = 256;
    for (int i = 0; i < 512; i++) cp_to_byte[i] = -1;
    for (int b = 0; b < 256; b++) {
        int printable = (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff);
        byte_to_cp[b] = printable ? (uint32_t)b : next++;
        cp_to_byte[byte_to_cp[b]] = (int16_t)b;
    }
}

/* The raw bytes a byte-level token string stands for (malloc'd [*n_out]), or NULL if some
 * character is outside the alphabet (such a token cannot come out of merging). */
static char *bytelevel_to_raw(const int16_t cp_to_byte[512], const char *s, size_t n, size_t *n_out) {
    char *raw = (char *)xmalloc(n + 1);
    size_t m = 0;
    for (size_t i = 0; i < n;) {
        size_t len;
        uint32_t cp = utf8_next((const uint8_t *)s + i, n - i, &len);
        if (utf8_valid_len((const uint8_t *)s + i, n - i) == 0 || cp >= 512 || cp_to_byte[cp] < 0) { free(raw); return NULL; }
        raw[m++] = (char)cp_to_byte[cp];
        i += len;
    }
    raw[m] = 0;
    *n_out = m;
    return raw;
}

static int json_fail_in(const char *name, const char *what) {
    return set_error("%s is not a supported tokenizer.json: %s", name, what);
}

static int known_pattern(const char *re, Pattern *out) {
    static const struct { const char *re; Pattern p; } known[] = {
        {"'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+", PAT_GPT2},
        {"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+", PAT_LLAMA3},
        {"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+", PAT_QWEN2},
    };
    for (size_t i = 0; i < COUNT_OF(known); i++)
        if (strcmp(re, known[i].re) == 0) { *out = known[i].p; return 0; }
    return -1;
}

/* Appends the steps of one pre_tokenizer object (flattening Sequences). */
static int parse_pre_tokenizer(Tokenizer *t, const Json *p, const char *name, int depth) {
    if (depth > 4) return json_fail_in(name, "pre_tokenizer Sequences nest too deeply");
    const char *type = json_get_string(p, "type", NULL);
    if (!type) return json_fail_in(name, "a pre_tokenizer has no type");
    if (strcmp(type, "Sequence") == 0) {
        const Json *list = json_get_type(p, "pretokenizers", JSON_ARRAY);
        if (!list) return json_fail_in(name, "a Sequence pre_tokenizer has no pretokenizers list");
        for (size_t i = 0; i < list->count; i++)
            if (parse_pre_tokenizer(t, &list->items[i], name, depth + 1) != 0) return -1;
        return 0;
    }
    if (t->n_pre == TOK_MAX_PRE) return json_fail_in(name, "too many pre_tokenizer steps");
    if (t->n_pre > 0 && t->pre[t->n_pre - 1].kind == PRE_BYTELEVEL)
        return json_fail_in(name, "a pre_tokenizer step after ByteLevel is not supported");
    PreStep *s = &t->pre[t->n_pre];
    memset(s, 0, sizeof *s);
    if (strcmp(type, "ByteLevel") == 0) {
        s->kind = PRE_BYTELEVEL;
        s->add_prefix_space = json_get_bool(p, "add_prefix_space", 1);
        s->use_regex = json_get_bool(p, "use_regex", 1);
        s->pattern = PAT_GPT2;
    } else if (strcmp(type, "Digits") == 0) {
        s->kind = PRE_DIGITS;
        s->individual = json_get_bool(p, "individual_digits", 0);
    } else if (strcmp(type, "Split") == 0) {
        s->kind = PRE_SPLIT;
        const Json *pat = json_get_type(p, "pattern", JSON_OBJECT);
        const char *re = pat ? json_get_string(pat, "Regex", NULL) : NULL;
        const char *behavior = json_get_string(p, "behavior", "");
        if (!re) return json_fail_in(name, "a Split pre_tokenizer without a Regex pattern is not supported");
        if (known_pattern(re, &s->pattern) != 0)
            return set_error("%s: the Split pattern '%s' is not one we implement (GPT-2, LLaMA-3 and Qwen2 patterns are)", name, quote_str(re));
        if (strcmp(behavior, "Isolated") != 0)
            return set_error("%s: Split behavior '%s' is not supported (only Isolated)", name, quote_str(behavior));
        if (json_get_bool(p, "invert", 0)) return json_fail_in(name, "an inverted Split is not supported");
    } else {
        return set_error("%s: pre_tokenizer type '%s' is not supported (ByteLevel, Split, Digits and Sequence are)", name, quote_str(type));
    }
    t->n_pre++;
    return 0;
}

/* The id of a token by its text: added tokens first, then the vocabulary. */
static int32_t token_by_content(const Tokenizer *t, const int16_t cp_to_byte[512], const char *s) {
    size_t n = strlen(s);
    for (size_t i = 0; i < t->n_added; i++)
        if (t->added[i].len == n && memcmp(t->added[i].content, s, n) == 0) return t->added[i].id;
    if (t->kind == TOK_SPM) return strmap_get(&t->map, s, n);
    size_t m;
    char *raw = bytelevel_to_raw(cp_to_byte, s, n, &m);
    int32_t id = raw ? strmap_get(&t->map, raw, m) : -1;
    free(raw);
    return id;
}

/* "<s>" or {"content": "<s>", ...} as tokenizer_config.json spells special tokens. */
static const char *config_token(const Json *config, const char *key) {
    const Json *v = json_get(config, key);
    if (v && v->type == JSON_STRING) return v->string;
    if (v && v->type == JSON_OBJECT) return json_get_string(v, "content", NULL);
    return NULL;
}

static int cmp_added(const void *a, const void *b) {
    const AddedToken *x = (const AddedToken *)a, *y = (const AddedToken *)b;
    uint8_t fx = (uint8_t)x->content[0], fy = (uint8_t)y->content[0];
    if (fx != fy) return fx < fy ? -1 : 1;
    if (x->len != y->len) return x->len > y->len ? -1 : 1;
    return x->id < y->id ? -1 : x->id > y->id;
}

static int json_is_id(const Json *v) {
    return v && v->type == JSON_NUMBER && v->number >= 0 && v->number < (double)(1 << 30) && v->number == floor(v->number);
}

static int tok_load_json_root(Tokenizer *t, const Json *root, const Json *config, const char *name) {
    uint32_t byte_to_cp[256];
    int16_t cp_to_byte[512];
    bytelevel_alphabet(byte_to_cp, cp_to_byte);
    if (root->type != JSON_OBJECT) return json_fail_in(name, "the top level is not an object");
    const Json *model = json_get_type(root, "model", JSON_OBJECT);
    if (!model) return json_fail_in(name, "it has no model object");
    const char *mtype = json_get_string(model, "type", "BPE");
    if (strcmp(mtype, "BPE") != 0) return set_error("%s: model type '%s' is not supported (only byte-level BPE)", name, quote_str(mtype));
    if (json_get_bool(model, "byte_fallback", 0))
        return set_error("%s: a BPE model with byte_fallback (SentencePiece style) is not supported: load its tokenizer.model instead", name);
    const char *cont = json_get_string(model, "continuing_subword_prefix", NULL);
    const char *suffix = json_get_string(model, "end_of_word_suffix", NULL);
    if ((cont && cont[0]) || (suffix && suffix[0])) return set_error("%s: BPE subword prefixes/suffixes are not supported", name);
    if (json_get_number(model, "dropout", 0) != 0) return set_error("%s: BPE dropout is not supported", name);
    t->ignore_merges = json_get_bool(model, "ignore_merges", 0);
    const Json *norm = json_get(root, "normalizer");
    if (norm && norm->type == JSON_OBJECT && strcmp(json_get_string(norm, "type", ""), "NFC") == 0) t->nfc = 1;
    else if (norm && norm->type != JSON_NULL)
        return set_error("%s: normalizer '%s' is not supported (only none or NFC)", name, quote_str(json_get_string(norm, "type", "?")));
    const Json *pre = json_get(root, "pre_tokenizer");
    if (!pre || pre->type != JSON_OBJECT) return set_error("%s: it has no pre_tokenizer; only byte-level BPE (a ByteLevel pre_tokenizer) is supported", name);
    if (parse_pre_tokenizer(t, pre, name, 0) != 0) return -1;
    if (t->n_pre == 0 || t->pre[t->n_pre - 1].kind != PRE_BYTELEVEL)
        return set_error("%s: the pre_tokenizer has no ByteLevel step; only byte-level BPE is supported", name);
    const Json *dec = json_get(root, "decoder");
    if (dec && dec->type != JSON_NULL && strcmp(json_get_string(dec, "type", ""), "ByteLevel") != 0)
        return set_error("%s: decoder '%s' is not supported (only ByteLevel)", name, quote_str(json_get_string(dec, "type", "?")));

    const Json *vocab = json_get_type(model, "vocab", JSON_OBJECT);
    const Json *merges = json_get_type(model, "merges", JSON_ARRAY);
    const Json *added = json_get(root, "added_tokens");
    if (!vocab || !merges) return json_fail_in(name, "the model lacks its vocab object or merges list");
    if (added && added->type != JSON_ARRAY && added->type != JSON_NULL) return json_fail_in(name, "added_tokens is not a list");
    size_t n_added = added && added->type == JSON_ARRAY ? added->count : 0;

    /* The vocabulary size: one past the largest id anywhere. */
    double max_id = -1;
    for (size_t i = 0; i < vocab->count; i++) {
        if (!json_is_id(&vocab->items[i])) return set_error("%s: vocab entry '%s' has no valid id", name, quote_bytes(vocab->keys[i], vocab->key_lens[i]));
        if (vocab->items[i].number > max_id) max_id = vocab->items[i].number;
    }
    for (size_t i = 0; i < n_added; i++) {
        const Json *a = &added->items[i];
        const Json *id = json_get(a, "id");
        const Json *content = json_get_type(a, "content", JSON_STRING);
        if (!json_is_id(id) || !content || content->len == 0 || strlen(content->string) != content->len)
            return set_error("%s: added token %zu lacks a valid id or content", name, i);
        if (id->number > max_id) max_id = id->number;
    }
    if (max_id < 0) return json_fail_in(name, "the vocabulary is empty");
    if (max_id >= 2.0 * (double)(vocab->count + n_added) + 1024)
        return set_error("%s: token ids run up to %.0f but only %zu tokens are defined", name, max_id, vocab->count + n_added);
    tok_alloc_vocab(t, (int32_t)max_id + 1);
    for (size_t i = 0; i < vocab->count; i++) {
        int32_t id = (int32_t)vocab->items[i].number;
        const char *k = vocab->keys[i];
        size_t klen = vocab->key_lens[i];
        if (t->piece[id]) return set_error("%s: tokens '%s' and '%s' share id %d", name, quote_bytes(t->piece[id], t->piece_len[id]), quote_bytes(k, klen), id);
        t->piece[id] = dup_bytes(k, klen);
        t->piece_len[id] = (uint32_t)klen;
        t->type[id] = PIECE_NORMAL;
        size_t m;
        char *raw = bytelevel_to_raw(cp_to_byte, k, klen, &m);
        if (raw) { t->key[id] = raw; t->key_len[id] = (uint32_t)m; t->out[id] = raw; t->out_len[id] = (uint32_t)m; }
        else { t->out[id] = t->piece[id]; t->out_len[id] = (uint32_t)klen; }
    }
    t->added = (AddedToken *)xcalloc(n_added ? n_added : 1, sizeof(AddedToken));
    for (size_t i = 0; i < n_added; i++) {
        const Json *a = &added->items[i];
        const Json *content = json_get_type(a, "content", JSON_STRING);
        int32_t id = (int32_t)json_get_number(a, "id", 0);
        if (t->piece[id] && (t->piece_len[id] != content->len || memcmp(t->piece[id], content->string, content->len) != 0))
            return set_error("%s: added token '%s' reuses id %d of '%s'", name, quote_bytes(content->string, content->len), id, quote_bytes(t->piece[id], t->piece_len[id]));
        AddedToken *at = &t->added[t->n_added++];
        at->content = dup_bytes(content->string, content->len);
        at->len = content->len;
        at->id = id;
        at->lstrip = json_get_bool(a, "lstrip", 0);
        at->rstrip = json_get_bool(a, "rstrip", 0);
        at->single_word = json_get_bool(a, "single_word", 0);
        at->special = json_get_bool(a, "special", 0);
        if (at->special) t->type[id] = PIECE_CONTROL;
        if (!t->piece[id]) { /* not in the vocabulary: only ever produced by matching */
            t->piece[id] = dup_bytes(content->string, content->len);
            t->piece_len[id] = (uint32_t)content->len;
            t->type[id] = at->special ? PIECE_CONTROL : PIECE_NORMAL;
            size_t m;
            char *raw = bytelevel_to_raw(cp_to_byte, content->string, content->len, &m);
            if (raw) { t->out[id] = raw; t->out_len[id] = (uint32_t)m; }
            else { t->out[id] = t->piece[id]; t->out_len[id] = (uint32_t)content->len; }
        }
    }
    qsort(t->added, t->n_added, sizeof(AddedToken), cmp_added);
    for (int b = 0, k = 0; b <= 256; b++) {
        while (k < (int)t->n_added && (uint8_t)t->added[k].content[0] < b) k++;
        t->added_at[b] = (uint32_t)k;
    }
    t->added_at[256] = (uint32_t)t->n_added;

    strmap_init(&t->map, vocab->count, t->key, t->key_len);
    for (int32_t i = 0; i < t->vocab_size; i++)
        if (t->key[i] && strmap_put(&t->map, i) >= 0) return set_error("%s: two tokens stand for the same bytes (id %d)", name, i);
    for (int b = 0; b < 256; b++) { char c = (char)b; t->byte_id[b] = strmap_get(&t->map, &c, 1); }
    const char *unk = json_get_string(model, "unk_token", NULL);
    if (unk) t->unk_id = token_by_content(t, cp_to_byte, unk);

    /* Merges: "left right" strings or ["left", "right"] pairs; rank = position in the list. */
    if (merges->count > (size_t)INT32_MAX) return json_fail_in(name, "too many merges");
    mergemap_init(&t->merges, merges->count);
    for (size_t r = 0; r < merges->count; r++) {
        const Json *mg = &merges->items[r];
        const char *parts[2];
        size_t lens[2];
        char *owned = NULL;
        if (mg->type == JSON_STRING) {
            const char *sp = memchr(mg->string, ' ', mg->len);
            if (!sp || memchr(sp + 1, ' ', mg->len - (size_t)(sp + 1 - mg->string)))
                return set_error("%s: merge %zu ('%s') is not two tokens separated by one space", name, r, quote_bytes(mg->string, mg->len));
            parts[0] = mg->string; lens[0] = (size_t)(sp - mg->string);
            parts[1] = sp + 1; lens[1] = mg->len - lens[0] - 1;
        } else if (mg->type == JSON_ARRAY && mg->count == 2 && mg->items[0].type == JSON_STRING && mg->items[1].type == JSON_STRING) {
            parts[0] = mg->items[0].string; lens[0] = mg->items[0].len;
            parts[1] = mg->items[1].string; lens[1] = mg->items[1].len;
        } else return set_error("%s: merge %zu is neither a string nor a pair of strings", name, r);
        size_t m0 = 0, m1 = 0;
        char *r0 = bytelevel_to_raw(cp_to_byte, parts[0], lens[0], &m0);
        char *r1 = bytelevel_to_raw(cp_to_byte, parts[1], lens[1], &m1);
        int32_t a = -1, b = -1, ab = -1;
        if (r0 && r1) {
            owned = (char *)xmalloc(m0 + m1 + 1);
            memcpy(owned, r0, m0);
            memcpy(owned + m0, r1, m1);
            a = strmap_get(&t->map, r0, m0);
            b = strmap_get(&t->map, r1, m1);
            ab = strmap_get(&t->map, owned, m0 + m1);
        }
        free(r0); free(r1); free(owned);
        if (a < 0 || b < 0 || ab < 0)
            return set_error("%s: merge %zu ('%s' + '%s') uses or makes a token that is not in the vocabulary", name, r, quote_bytes(parts[0], lens[0]), quote_bytes(parts[1], lens[1]));
        mergemap_put(&t->merges, a, b, (int32_t)r, ab);
    }

    /* BOS/EOS: tokenizer_config.json, else the post-processor template, else the usual names. */
    const char *bos = config_token(config, "bos_token"), *eos = config_token(config, "eos_token");
    if (!bos) {
        const Json *pp = json_get_type(root, "post_processor", JSON_OBJECT);
        const Json *list = json_get_type(pp, "processors", JSON_ARRAY);
        for (size_t i = 0; pp && i < (list ? list->count : 1) && !bos; i++) {
            const Json *proc = list ? &list->items[i] : pp;
            const Json *single = json_get_type(proc, "single", JSON_ARRAY);
            if (single && single->count > 1) bos = json_get_string(json_get_type(&single->items[0], "SpecialToken", JSON_OBJECT), "id", NULL);
        }
    }
    if (bos) t->bos_id = token_by_content(t, cp_to_byte, bos);
    if (eos) t->eos_id = token_by_content(t, cp_to_byte, eos);
    static const char *const eos_names[] = {"<|end_of_text|>", "<|endoftext|>", "</s>"};
    for (size_t i = 0; i < COUNT_OF(eos_names) && t->eos_id < 0 && !eos; i++) t->eos_id = token_by_content(t, cp_to_byte, eos_names[i]);
    return 0;
}

/* Parses a tokenizer.json image (config: the parsed tokenizer_config.json, or NULL). */
static int tok_load_json_bytes(Tokenizer *t, const char *text, size_t len, const Json *config, const char *name) {
    memset(t, 0, sizeof *t);
    snprintf(t->source, sizeof t->source, "%.500s", name);
    t->kind = TOK_BPE;
    t->bos_id = t->eos_id = t->unk_id = -1;
    Json *root = json_parse(text, len);
    if (!root) return error_in("%s is not a valid tokenizer.json", name);
    int rc = tok_load_json_root(t, root, config, name);
    json_free(root);
    if (rc != 0) tok_free(t); /* the sentence in last_error() stays */
    return rc;
}

/* Loads a tokenizer.model, a tokenizer.json, or a model folder holding one (tokenizer.model
 * first: LLaMA-2 folders carry both). -1 + last_error() on failure. */
static API int tok_load(Tokenizer *t, const char *path) {
    char buf[4096];
    struct stat st;
    memset(t, 0, sizeof *t);
    if (stat(path, &st) != 0) return set_error("cannot open tokenizer %s: %s", path, strerror(errno));
    char dir[4096];
    if (S_ISDIR(st.st_mode)) {
        snprintf(dir, sizeof dir, "%s", path);
        if (file_exists(path_join(buf, sizeof buf, path, "tokenizer.model"))) path = buf;
        else if (file_exists(path_join(buf, sizeof buf, path, "tokenizer.json"))) path = buf;
        else return set_error("%s holds neither tokenizer.model nor tokenizer.json", path);
    } else {
        snprintf(dir, sizeof dir, "%s", path);
        char *slash = strrchr(dir, '/');
        if (slash) slash[1] = 0; else snprintf(dir, sizeof dir, ".");
    }
    size_t len;
    char *data = read_file(path, &len);
    if (!data) return -1;
    size_t i = 0;
    while (i < len && (data[i] == ' ' || data[i] == '\n' || data[i] == '\r' || data[i] == '\t')) i++;
    int rc;
    size_t n = strlen(path);
    int named_json = n >= 5 && !strcmp(path + n - 5, ".json"); /* a broken tokenizer.json is still JSON's to report */
    if ((i < len && data[i] == '{') || named_json) {
        char cfg_path[4200];
        path_join(cfg_path, sizeof cfg_path, dir, "tokenizer_config.json");
        Json *config = file_exists(cfg_path) ? json_parse_file(cfg_path) : NULL;
        if (file_exists(cfg_path) && !config) { free(data); return -1; }
        rc = tok_load_json_bytes(t, data, len, config, path);
        json_free(config);
    } else {
        rc = tok_load_spm_bytes(t, (const uint8_t *)data, len, path);
    }
    free(data);
    return rc;
}

/* ---------------------------------------------------------------------------------------
 * The command line
 * ------------------------------------------------------------------------------------- */
/* ---------------------------------------------------------------------------------------
 * Prompt templates. Like HF, which keeps a model's chat template with its tokenizer, the
 * text a prompt is wrapped in lives here: 05 trains on instruction records through it and
 * 06 wraps a chat prompt the same way.
 * ------------------------------------------------------------------------------------- */

/* The prompt text of one record under a template. Alpaca's wording is the Stanford Alpaca
 * prompt; llama2-chat is LLaMA-2-chat's [INST] ... [/INST] turn (no system prompt);
 * none is the instruction (and input) as they are. Returns malloc'd text. */
static API char *prompt_template(const char *template_name, const char *instruction, const char *input) {
    int has_input = input && input[0];
    const char *fmt;
    if (!strcmp(template_name, "alpaca"))
        fmt = has_input ? "Below is an instruction that describes a task, paired with an input that provides further context. "
                          "Write a response that appropriately completes the request.\n\n"
                          "### Instruction:\n%s\n\n### Input:\n%s\n\n### Response:"
                        : "Below is an instruction that describes a task. "
                          "Write a response that appropriately completes the request.\n\n"
                          "### Instruction:\n%s\n\n### Response:%s";
    else if (!strcmp(template_name, "llama2-chat"))
        fmt = has_input ? "[INST] %s\n\n%s [/INST]" : "[INST] %s [/INST]%s";
    else
        fmt = has_input ? "%s\n\n%s" : "%s%s";
    size_t cap = strlen(fmt) + strlen(instruction) + (has_input ? strlen(input) : 0) + 1;
    char *s = (char *)xmalloc(cap); /* [cap] the prompt text */
    snprintf(s, cap, fmt, instruction, has_input ? input : "");
    return s;
}


#if STAGE == 1

static void usage(void) {
    fprintf(stderr,
            "usage: ./01_tokenize --tokenizer PATH [--bos] [--pieces] TEXT\n"
            "       ./01_tokenize --tokenizer PATH [--bos] --encode-file IN.txt --out OUT.bin\n"
            "       ./01_tokenize --tokenizer PATH --decode-file IN.bin\n"
            "PATH is a tokenizer.model, a tokenizer.json or a model folder holding one.\n");
    exit(2);
}

/* Prints a piece with anything unprintable (and spaces) as \xNN. */
static void print_piece(const char *p, size_t n) {
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)p[i];
        if (c <= 0x20 || c == 0x7f || c == '\\') printf("\\x%02X", c);
        else putchar(c);
    }
}

typedef struct { double t0, last; } CliProgress;
static void cli_progress(size_t done, size_t total, size_t tokens, void *ctx) {
    CliProgress *p = (CliProgress *)ctx;
    double now = now_seconds();
    if (done < total && now - p->last < 1.0) return;
    p->last = now;
    double dt = now - p->t0 > 1e-9 ? now - p->t0 : 1e-9;
    fprintf(stderr, "\rencoding: %.1f / %.1f MB, %zu tokens, %.1f MB/s   ", done / 1e6, total / 1e6, tokens, done / 1e6 / dt);
    if (done >= total) fputc('\n', stderr);
}

int main(int argc, char **argv) {
    const char *tok_path = NULL, *text = NULL, *encode_in = NULL, *out_path = NULL, *decode_in = NULL;
    int bos = 0, pieces = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--tokenizer") == 0 && i + 1 < argc) tok_path = argv[++i];
        else if (strcmp(a, "--bos") == 0) bos = 1;
        else if (strcmp(a, "--pieces") == 0) pieces = 1;
        else if (strcmp(a, "--encode-file") == 0 && i + 1 < argc) encode_in = argv[++i];
        else if (strcmp(a, "--out") == 0 && i + 1 < argc) out_path = argv[++i];
        else if (strcmp(a, "--decode-file") == 0 && i + 1 < argc) decode_in = argv[++i];
        else if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) usage();
        else if (strncmp(a, "--", 2) == 0 && a[2]) { fprintf(stderr, "error: unknown option %s\n", a); usage(); }
        else if (!text) text = a;
        else { fprintf(stderr, "error: give the text as one argument (quote it)\n"); usage(); }
    }
    if (!tok_path) usage();
    if ((text != NULL) + (encode_in != NULL) + (decode_in != NULL) != 1) usage();
    if (encode_in && !out_path) die("--encode-file needs --out OUT.bin");

    const NamedPath inputs[] = {{"--encode-file", encode_in}, {"--tokenizer", tok_path}};
    if (check_output_path("--out", out_path, 0, inputs, 2) != 0) die("%s", last_error());
    Tokenizer t;
    if (tok_load(&t, tok_path) != 0) die("%s", last_error());

    if (text) {
        size_t n;
        int32_t *ids = tok_encode(&t, text, strlen(text), bos, &n);
        if (!ids) die("%s", last_error());
        for (size_t i = 0; i < n; i++) printf("%s%d", i ? " " : "", ids[i]);
        printf("\n");
        if (pieces) {
            for (size_t i = 0; i < n; i++) {
                if (i) putchar(' ');
                print_piece(t.piece[ids[i]], t.piece_len[ids[i]]);
            }
            printf("\n");
        }
        free(ids);
    } else if (encode_in) {
        size_t len;
        char *data = read_file(encode_in, &len);
        if (!data) die("%s", last_error());
        CliProgress prog = {now_seconds(), now_seconds()};
        size_t n;
        int32_t *ids = tok_encode_progress(&t, data, len, bos, &n, len > ((size_t)8 << 20) ? cli_progress : NULL, &prog);
        if (!ids) die("%s: %s", encode_in, last_error());
        if (tokfile_write(out_path, ids, n, t.vocab_size) != 0) die("%s", last_error());
        double dt = now_seconds() - prog.t0;
        fprintf(stderr, "wrote %zu tokens (%zu bytes of text) to %s in %.2f s (%.0f tokens/s)\n", n, len, out_path, dt, n / (dt > 1e-9 ? dt : 1e-9));
        free(ids);
        free(data);
    } else {
        size_t n;
        int32_t *ids = tokfile_read(decode_in, &n);
        if (!ids) die("%s", last_error());
        size_t len;
        char *out = tok_decode(&t, ids, n, &len);
        if (!out) die("%s: %s", decode_in, last_error());
        if (fwrite(out, 1, len, stdout) != len || fflush(stdout) != 0) die("writing the decoded text failed");
        free(out);
        free(ids);
    }
    tok_free(&t);
    return 0;
}
#endif
