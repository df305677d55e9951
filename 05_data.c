/* 05_data.c: the training data of 05_train (05_train.c includes it).
 *
 * Both kinds of data end as a Dataset: n_seqs sequences of N inputs and N targets, read in
 * an order that is a seeded shuffle, reshuffled each epoch. Pre-training style data is one
 * token stream (documents joined with EOS); sequence k is stream[kN, kN+N) with targets
 * stream[kN+1, kN+N+1). SFT data is built into whole sequences up front, with target -100
 * wherever the loss must not look (the prompt, the padding).
 *
 * Checked by: tests/test_train.c (packing, the shuffle, SFT masking), tests/test_train_text.sh
 * (text and SFT through a real tokenizer).
 */
#ifndef TRAIN_DATA_C
#define TRAIN_DATA_C

typedef struct {
    /* pre-training stream (stream != NULL) */
    int32_t *stream;            /* [stream_len] documents joined with EOS */
    size_t stream_len;
    /* SFT sequences (seq_inputs != NULL) */
    int32_t *seq_inputs;        /* [n_seqs, N] */
    int32_t *seq_targets;       /* [n_seqs, N] (-100 = no loss) */
    size_t n_seqs;              /* sequences per epoch */
    int N;                      /* sequence length */
    uint64_t fingerprint;       /* FNV-1a over the data: a resume must see the same data */
    /* position: part of the checkpoint */
    uint32_t *order;            /* [n_seqs] this epoch's shuffled sequence indices */
    size_t pos;                 /* next index into order */
    uint64_t epoch;             /* epochs completed */
    Rng rng;                    /* draws the shuffles */
    size_t loss_tokens;         /* SFT: target tokens that carry loss, in all sequences */
} Dataset;

static uint64_t fnv1a(uint64_t h, const void *data, size_t len) {
    const uint8_t *p = (const uint8_t *)data;
    for (size_t i = 0; i < len; i++) { h ^= p[i]; h *= 0x100000001b3ull; }
    return h;
}
#define FNV_OFFSET 0xcbf29ce484222325ull

/* Fisher-Yates over 0..n-1 with the dataset's RNG. */
static void dataset_shuffle(Dataset *ds) {
    for (size_t i = 0; i < ds->n_seqs; i++) ds->order[i] = (uint32_t)i;
    for (size_t i = ds->n_seqs; i > 1; i--) {
        size_t j = (size_t)rng_below(&ds->rng, i);
        uint32_t t = ds->order[i - 1];
        ds->order[i - 1] = ds->order[j];
        ds->order[j] = t;
    }
}

/* Sets up the order once the sequences exist. */
static void dataset_start(Dataset *ds, uint64_t seed) {
    rng_seed(&ds->rng, seed ^ 0xda7a5eedda7a5eedull);
    ds->order = (uint32_t *)xmalloc(ds->n_seqs * sizeof(uint32_t)); /* [n_seqs] */
    ds->pos = 0;
    ds->epoch = 0;
    dataset_shuffle(ds);
}

/* Copies sequence `index` into inputs[N] and targets[N]. */
static void dataset_sequence(const Dataset *ds, size_t index, int32_t *inputs /* [N] */, int32_t *targets /* [N] */) {
    size_t N = (size_t)ds->N;
    if (ds->stream) {
        const int32_t *s = ds->stream + index * N;
        memcpy(inputs, s, N * sizeof(int32_t));
        memcpy(targets, s + 1, N * sizeof(int32_t));
    } else {
        memcpy(inputs, ds->seq_inputs + index * N, N * sizeof(int32_t));
        memcpy(targets, ds->seq_targets + index * N, N * sizeof(int32_t));
    }
}

/* The next B sequences in the shuffled order (a new epoch reshuffles). */
static void dataset_next_batch(Dataset *ds, int B, int32_t *inputs /* [B, N] */, int32_t *targets /* [B, N] */) {
    for (int b = 0; b < B; b++) {
        if (ds->pos == ds->n_seqs) { ds->epoch++; ds->pos = 0; dataset_shuffle(ds); }
        size_t index = ds->order[ds->pos++];
        dataset_sequence(ds, index, inputs + (size_t)b * ds->N, targets + (size_t)b * ds->N);
    }
}

/* Moves past the next B sequences exactly as dataset_next_batch would (another rank reads them). */
static void dataset_skip_batch(Dataset *ds, int B) {
    for (int b = 0; b < B; b++) {
        if (ds->pos == ds->n_seqs) { ds->epoch++; ds->pos = 0; dataset_shuffle(ds); }
        ds->pos++;
    }
}

static void dataset_free(Dataset *ds) {
    free(ds->stream);
    free(ds->seq_inputs);
    free(ds->seq_targets);
    free(ds->order);
    memset(ds, 0, sizeof *ds);
}

/* A growable token array. */
typedef struct { int32_t *ids; size_t len, cap; } TokBuf;
static void tokbuf_push(TokBuf *t, const int32_t *ids, size_t n) {
    if (t->len + n > t->cap) {
        size_t cap = t->cap ? t->cap : 1024;
        while (cap < t->len + n) cap *= 2;
        t->ids = (int32_t *)xrealloc(t->ids, cap * sizeof(int32_t));
        t->cap = cap;
    }
    if (n) memcpy(t->ids + t->len, ids, n * sizeof(int32_t));
    t->len += n;
}
static void tokbuf_push1(TokBuf *t, int32_t id) { tokbuf_push(t, &id, 1); }

/* What the data code needs from a tokenizer: encode (with or without BOS), the special ids.
 * text_encode is NULL when there is no tokenizer (then only token files can be read). */
typedef struct {
    void *tok;                  /* the stage-01 tokenizer, or NULL */
    int32_t *(*text_encode)(void *tok, const char *text, size_t len, int add_bos, size_t *n_out);
    int bos_id, eos_id;         /* -1 when the tokenizer has none */
    int vocab_size;             /* V of the model: every id must be below it */
} TextCodec;

static int check_ids(const int32_t *ids, size_t n, int vocab_size, const char *path) {
    for (size_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= vocab_size)
            return set_error("%s: token %zu has id %d, outside the model's vocabulary of %d", path, i, (int)ids[i], vocab_size);
    return 0;
}

/* Appends one document: its tokens (with BOS when the tokenizer has one), then EOS. */
static int append_document(TokBuf *stream, const TextCodec *c, const char *text, size_t len, const char *path) {
    if (!c->text_encode) return set_error("%s is text, but there is no tokenizer (give --tokenizer, or token files)", path);
    size_t n = 0;
    int32_t *ids = c->text_encode(c->tok, text, len, c->bos_id >= 0, &n);
    if (!ids) return error_in("%s", path);
    int rc = check_ids(ids, n, c->vocab_size, path);
    if (rc == 0) {
        tokbuf_push(stream, ids, n);
        if (c->eos_id >= 0) tokbuf_push1(stream, c->eos_id);
    }
    free(ids);
    return rc;
}

static int has_suffix(const char *s, const char *suffix) {
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && strcmp(s + a - b, suffix) == 0;
}

/* Reads one --data file into the stream: a token file (magic LLTK) is taken as it is (it
 * carries its own EOS between documents); a .jsonl file holds one {"text": ...} per line;
 * anything else is one text document. */
static int load_data_file(TokBuf *stream, const TextCodec *c, const char *path) {
    size_t len;
    char *raw = read_file(path, &len);
    if (!raw) return -1;
    int rc = 0;
    if (len >= 4 && memcmp(raw, TOKFILE_MAGIC, 4) == 0) {
        free(raw);
        size_t n;
        int32_t *ids = tokfile_read(path, &n);
        if (!ids) return -1;
        rc = check_ids(ids, n, c->vocab_size, path);
        if (rc == 0) tokbuf_push(stream, ids, n);
        free(ids);
        return rc;
    }
    if (has_suffix(path, ".jsonl")) {
        size_t line_no = 0;
        for (char *p = raw, *end = raw + len; p < end && rc == 0;) {
            char *nl = memchr(p, '\n', (size_t)(end - p));
            char *line_end = nl ? nl : end;
            line_no++;
            size_t line_len = (size_t)(line_end - p);
            int blank = 1;
            for (size_t k = 0; k < line_len; k++) if (!strchr(" \t\r", p[k])) blank = 0;
            if (!blank) {
                Json *j = json_parse(p, line_len);
                if (!j) { rc = error_in("%s line %zu", path, line_no); break; }
                const Json *text = json_get_type(j, "text", JSON_STRING);
                if (!text) rc = set_error("%s line %zu has no \"text\" string", path, line_no);
                else rc = append_document(stream, c, text->string, text->len, path);
                json_free(j);
            }
            p = line_end + 1;
        }
        free(raw);
        return rc;
    }
    if (memchr(raw, 0, len)) { free(raw); return set_error("%s holds NUL bytes: it is neither text nor a token file", path); }
    rc = append_document(stream, c, raw, len, path);
    free(raw);
    return rc;
}

/* Pre-training data: every file into one stream, cut into N-token sequences. */
static int dataset_load_text(Dataset *ds, const TextCodec *c, const char *const *paths, int n_paths, int N) {
    memset(ds, 0, sizeof *ds);
    TokBuf stream = {0};
    for (int i = 0; i < n_paths; i++)
        if (load_data_file(&stream, c, paths[i]) != 0) { free(stream.ids); return -1; }
    if (stream.len < (size_t)N + 1) {
        free(stream.ids);
        return set_error("the data holds %zu tokens, fewer than the %d needed for one sequence of --ctx %d", stream.len, N + 1, N);
    }
    ds->stream = stream.ids;
    ds->stream_len = stream.len;
    ds->N = N;
    ds->n_seqs = (stream.len - 1) / (size_t)N;
    if (ds->n_seqs > UINT32_MAX) { dataset_free(ds); return set_error("the data holds more than 2^32 sequences"); }
    ds->fingerprint = fnv1a(fnv1a(FNV_OFFSET, &ds->N, sizeof ds->N), stream.ids, stream.len * sizeof(int32_t));
    ds->loss_tokens = ds->n_seqs * (size_t)N;
    return 0;
}

/* ---- instruction data (SFT) ----------------------------------------------------------- */

/* One example: prompt tokens (with BOS) then output tokens then EOS; the loss looks at the
 * output and the EOS only. */
typedef struct {
    int32_t *ids;               /* [len] */
    size_t len;
    size_t n_prompt;            /* ids[0..n_prompt) are the prompt */
} SftExample;

/* index: the record's number, counted from 1 (as line numbers are). */
static int sft_example_from_record(SftExample *ex, const TextCodec *c, const char *template_name, const Json *rec,
                                   const char *path, size_t index) {
    if (rec->type != JSON_OBJECT) return set_error("%s: record %zu is not an object", path, index);
    const Json *instruction = json_get_type(rec, "instruction", JSON_STRING);
    const Json *input = json_get(rec, "input");
    const Json *output = json_get_type(rec, "output", JSON_STRING);
    if (!instruction || !output) return set_error("%s: record %zu needs \"instruction\" and \"output\" strings", path, index);
    if (input && input->type != JSON_STRING && input->type != JSON_NULL)
        return set_error("%s: record %zu has an \"input\" that is not a string", path, index);
    if (strlen(instruction->string) != instruction->len || strlen(output->string) != output->len ||
        (input && input->type == JSON_STRING && strlen(input->string) != input->len))
        return set_error("%s: record %zu holds a \\u0000 character", path, index);
    char *prompt = prompt_template(template_name, instruction->string, (input && input->type == JSON_STRING) ? input->string : NULL);
    size_t n_prompt = 0, n_out = 0;
    int32_t *p_ids = c->text_encode(c->tok, prompt, strlen(prompt), c->bos_id >= 0, &n_prompt);
    free(prompt);
    if (!p_ids) return -1;
    int32_t *o_ids = c->text_encode(c->tok, output->string, output->len, 0, &n_out);
    if (!o_ids) { free(p_ids); return -1; }
    ex->len = n_prompt + n_out + (c->eos_id >= 0 ? 1 : 0);
    ex->n_prompt = n_prompt;
    ex->ids = (int32_t *)xmalloc((ex->len ? ex->len : 1) * sizeof(int32_t)); /* [len] */
    memcpy(ex->ids, p_ids, n_prompt * sizeof(int32_t));
    memcpy(ex->ids + n_prompt, o_ids, n_out * sizeof(int32_t));
    if (c->eos_id >= 0) ex->ids[ex->len - 1] = c->eos_id;
    free(p_ids);
    free(o_ids);
    return check_ids(ex->ids, ex->len, c->vocab_size, path);
}

/* Writes example ex at positions [at, at + n) of one sequence: inputs are the ids, the
 * target of position t is the next id when that id is an output token, else -100. Returns
 * the number of positions used (the example truncated to `room`). */
static size_t sft_place(const SftExample *ex, int32_t *inputs, int32_t *targets, size_t room, size_t *loss_tokens) {
    size_t n = ex->len < room ? ex->len : room;
    for (size_t t = 0; t < n; t++) {
        inputs[t] = ex->ids[t];
        int has_next = t + 1 < ex->len;
        targets[t] = (has_next && t + 1 >= ex->n_prompt) ? ex->ids[t + 1] : IGNORE_INDEX;
        if (targets[t] != IGNORE_INDEX) (*loss_tokens)++;
    }
    return n;
}

/* SFT data: a JSON array of records (LongAlpaca's format) or JSONL, one record per line.
 * Each example becomes one N-token sequence padded with EOS (no loss on padding), or with
 * pack, examples are packed greedily into sequences. Longer examples are truncated to N,
 * with a warning. Every sequence is exactly N long, so S2-Attn's N % G rule holds. */
static int dataset_load_sft(Dataset *ds, const TextCodec *c, const char *path, const char *template_name, int pack, int N) {
    memset(ds, 0, sizeof *ds);
    if (!c->text_encode) return set_error("--sft needs a tokenizer (give --model or --tokenizer)");
    size_t len;
    char *raw = read_file(path, &len);
    if (!raw) return -1;
    /* collect the records: one JSON array, or one object per line */
    Json *whole = NULL;
    size_t p0 = 0;
    while (p0 < len && strchr(" \t\r\n", raw[p0])) p0++;
    Json **lines = NULL;
    size_t n_rec = 0;
    if (p0 < len && raw[p0] == '[') {
        whole = json_parse(raw, len);
        if (!whole) { free(raw); return error_in("%s", path); }
        n_rec = whole->count;
    } else {
        size_t line_no = 0;
        for (char *p = raw, *end = raw + len; p < end;) {
            char *nl = memchr(p, '\n', (size_t)(end - p));
            char *line_end = nl ? nl : end;
            line_no++;
            int blank = 1;
            for (char *k = p; k < line_end; k++) if (!strchr(" \t\r", *k)) blank = 0;
            if (!blank) {
                Json *j = json_parse(p, (size_t)(line_end - p));
                if (!j) {
                    for (size_t i = 0; i < n_rec; i++) json_free(lines[i]);
                    free(lines); free(raw);
                    return error_in("%s line %zu (expected a JSON array of records or one record per line)", path, line_no);
                }
                lines = (Json **)xrealloc(lines, (n_rec + 1) * sizeof(Json *));
                lines[n_rec++] = j;
            }
            p = line_end + 1;
        }
    }
    free(raw);
    int rc = 0;
    if (n_rec == 0) rc = set_error("%s holds no records", path);
    SftExample *ex = (SftExample *)xcalloc(n_rec ? n_rec : 1, sizeof(SftExample)); /* [n_rec] */
    for (size_t i = 0; i < n_rec && rc == 0; i++)
        rc = sft_example_from_record(&ex[i], c, template_name, whole ? &whole->items[i] : lines[i], path, i + 1); /* 1-based, as lines */
    json_free(whole);
    for (size_t i = 0; i < n_rec && lines; i++) json_free(lines[i]);
    free(lines);
    /* lay the examples out as N-token sequences */
    size_t cap = 0, n_truncated = 0, n_skipped = 0;
    int32_t pad = c->eos_id >= 0 ? c->eos_id : 0;
    for (size_t i = 0; i < n_rec && rc == 0; i++) {
        if (ex[i].len <= ex[i].n_prompt || ex[i].n_prompt > (size_t)N) { n_skipped++; continue; } /* no target within N */
        if (ex[i].len > (size_t)N) n_truncated++;
        size_t used_in_last = 0;
        if (pack && ds->n_seqs > 0) {
            const int32_t *last_t = ds->seq_targets + (ds->n_seqs - 1) * (size_t)N;
            const int32_t *last_i = ds->seq_inputs + (ds->n_seqs - 1) * (size_t)N;
            used_in_last = (size_t)N;
            while (used_in_last > 0 && last_t[used_in_last - 1] == IGNORE_INDEX && last_i[used_in_last - 1] == -1) used_in_last--;
        }
        if (pack && ds->n_seqs > 0 && ex[i].len <= (size_t)N - used_in_last) {
            size_t off = (ds->n_seqs - 1) * (size_t)N + used_in_last;
            sft_place(&ex[i], ds->seq_inputs + off, ds->seq_targets + off, (size_t)N - used_in_last, &ds->loss_tokens);
            continue;
        }
        if (ds->n_seqs == cap) {
            cap = cap ? 2 * cap : 64;
            ds->seq_inputs = (int32_t *)xrealloc(ds->seq_inputs, cap * (size_t)N * sizeof(int32_t));
            ds->seq_targets = (int32_t *)xrealloc(ds->seq_targets, cap * (size_t)N * sizeof(int32_t));
        }
        size_t off = ds->n_seqs * (size_t)N;
        /* -1 marks free positions while packing; they become EOS padding below */
        for (size_t t = 0; t < (size_t)N; t++) { ds->seq_inputs[off + t] = -1; ds->seq_targets[off + t] = IGNORE_INDEX; }
        sft_place(&ex[i], ds->seq_inputs + off, ds->seq_targets + off, (size_t)N, &ds->loss_tokens);
        ds->n_seqs++;
    }
    for (size_t i = 0; i < n_rec; i++) free(ex[i].ids);
    free(ex);
    if (rc == 0 && ds->n_seqs == 0) rc = set_error("%s: no record has output tokens within --ctx %d", path, N);
    if (rc != 0) { dataset_free(ds); return -1; }
    for (size_t k = 0; k < ds->n_seqs * (size_t)N; k++) if (ds->seq_inputs[k] == -1) ds->seq_inputs[k] = pad;
    if (n_truncated) fprintf(stderr, "warning: %zu of %zu SFT examples are longer than --ctx %d tokens and were truncated\n", n_truncated, n_rec, N);
    if (n_skipped) fprintf(stderr, "warning: %zu of %zu SFT examples have no output tokens within --ctx %d and were skipped\n", n_skipped, n_rec, N);
    ds->N = N;
    uint64_t h = fnv1a(FNV_OFFSET, &ds->N, sizeof ds->N);
    h = fnv1a(h, ds->seq_inputs, ds->n_seqs * (size_t)N * sizeof(int32_t));
    ds->fingerprint = fnv1a(h, ds->seq_targets, ds->n_seqs * (size_t)N * sizeof(int32_t));
    return 0;
}

#endif /* TRAIN_DATA_C */
