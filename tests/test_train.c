/* test_train.c: the CPU parts of 05_train.c.
 *
 * Flags: every value and every rule between flags (N % G, exclusive flags, ranges) is
 * accepted or refused with a sentence. Data: a token stream is cut into N-token
 * sequences whose targets are the next tokens; an epoch visits every sequence once in a
 * seeded shuffle; text and .jsonl documents are joined with BOS ... EOS. SFT: each record
 * becomes prompt (template) + output + EOS, with target -100 on the prompt and padding,
 * packed or padded to N; malformed records are refused. Masking: with a real (tiny, random)
 * model and live LoRA, the loss equals the mean cross-entropy over the unmasked positions
 * computed here from the logits, the gradient reaching the logits is exactly zero on every
 * masked position, and perturbing the masked (padding) tokens leaves the loss and every
 * trainable gradient bit-identical (while perturbing an output token changes them).
 * Resume: 10 steps straight and 5 + resume + 5 (with gradient accumulation, clipping,
 * S2-Attn and an epoch boundary inside) give identical losses, adapter and optimizer
 * state; so does a run stopped by SIGINT and resumed; resuming with another --ctx or other
 * data, or from a corrupt checkpoint, is refused; a non-finite loss stops the run, names
 * the step and keeps the last good checkpoint. Trained parts and schedules: with
 * --no-train-embed / --no-train-norms the frozen tensors are bit-identical after training and
 * absent from the adapter (tensors and modules_to_save) and the checkpoint; the CSV's lr
 * follows the constant, cosine and linear schedules (the closed forms, computed here);
 * resuming with other trained parts is refused, with another schedule it is honoured.
 * The byte codec below (id = byte + 3, BOS 1, EOS 2) stands in for a tokenizer so the
 * expected ids can be computed independently here.
 */
#define STAGE 0
#include "05_train.c"
#include <sys/wait.h>
#pragma GCC diagnostic ignored "-Wformat-truncation" /* scratch paths are short */

#include "check.h"
#include "split_args.h"
#include "train_log.h"

static char g_tmp[256]; /* this test's scratch folder */

/* ---- helpers ------------------------------------------------------------------------- */

static int32_t *byte_encode(void *tok, const char *text, size_t len, int add_bos, size_t *n) {
    (void)tok;
    int32_t *ids = (int32_t *)xmalloc((len + 1) * sizeof(int32_t));
    size_t k = 0;
    if (add_bos) ids[k++] = 1;
    for (size_t i = 0; i < len; i++) ids[k++] = (unsigned char)text[i] + 3;
    *n = k;
    return ids;
}
static TextCodec byte_codec(void) {
    TextCodec c = {NULL, byte_encode, 1, 2, 259};
    return c;
}

static void write_text(const char *path, const char *text) {
    if (write_file_atomic(path, text, strlen(text)) != 0) die("%s", last_error());
}

static const char *tmp_path(char *buf, const char *name) {
    snprintf(buf, 512, "%s/%s", g_tmp, name);
    return buf;
}

static void remove_tree(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) { remove(dir); return; }
    struct dirent *e;
    char path[1024];
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        struct stat st;
        if (lstat(path, &st) == 0 && S_ISDIR(st.st_mode)) remove_tree(path);
        else remove(path);
    }
    closedir(d);
    rmdir(dir);
}

/* Parses a flag list (space-separated) into fresh options; returns train_parse_args' rc,
 * and when that is 0 also train_validate's (with ctx defaulting to 4096 as a model's). */
static int parse_flags(TrainOptions *o, const char *flags) {
    char buf[1024];
    snprintf(buf, sizeof buf, "05_train %s", flags);
    char *argv[64];
    int argc = split_args(buf, argv, 64);
    train_defaults(o);
    g_last_error[0] = 0;
    int rc = train_parse_args(o, argc, argv);
    if (rc != 0) return rc;
    if (o->ctx == 0) o->ctx = 4096;
    return train_validate(o);
}

static const char *g_self; /* this program: runs started by run_training exec it with --train */

/* Runs the trainer (this program with --train FLAGS, a fresh process: OpenMP does not
 * survive fork) with its output in log. Returns the exit status (or 128 + signal). If
 * stop_after_rows > 0, sends SIGINT once the CSV at csv_path has that many data rows. */
static int run_training(const char *flags, const char *log, const char *csv_path, int stop_after_rows) {
    static char buf[4096];
    snprintf(buf, sizeof buf, "%s --train %s", g_self, flags);
    char *argv[128];
    split_args(buf, argv, 128);
    fflush(stdout);
    pid_t pid = fork();
    CHECK(pid >= 0, "fork failed");
    if (pid == 0) {
        FILE *f = freopen(log, "w", stdout);
        if (!f || dup2(fileno(stdout), 2) < 0) _exit(99);
        execv(g_self, argv);
        _exit(98);
    }
    int status = 0;
    if (stop_after_rows > 0) {
        double t0 = now_seconds();
        for (;;) {
            size_t len = 0;
            char *csv = read_file(csv_path, &len);
            int rows = -1;
            for (size_t i = 0; csv && i < len; i++) rows += csv[i] == '\n';
            free(csv);
            if (rows >= stop_after_rows || now_seconds() - t0 > 60) break;
            if (waitpid(pid, &status, WNOHANG) == pid) goto done;
            usleep(2000);
        }
        kill(pid, SIGINT);
    }
    CHECK(waitpid(pid, &status, 0) == pid, "waitpid failed");
done:
    if (WIFEXITED(status)) return WEXITSTATUS(status);
    return 128 + WTERMSIG(status);
}

/* The loss column of a train_log.csv as text lines "step,loss" (exactly as written). */
static char *csv_losses(const char *path, int *rows) {
    size_t len = 0;
    char *csv = read_file(path, &len);
    *rows = 0;
    if (!csv) return xstrdup("");
    char *out = (char *)xcalloc(len + 1, 1), *w = out;
    char *line = strchr(csv, '\n');
    while (line && line[1]) {
        char *next = strchr(line + 1, '\n');
        char *c2 = strchr(line + 1, ',');
        c2 = c2 ? strchr(c2 + 1, ',') : NULL;
        if (!c2 || (next && c2 > next)) break;
        memcpy(w, line + 1, (size_t)(c2 - line - 1));
        w += c2 - line - 1;
        *w++ = '\n';
        (*rows)++;
        line = next;
    }
    free(csv);
    return out;
}

static int files_equal(const char *a, const char *b) {
    size_t la, lb;
    char *x = read_file(a, &la), *y = read_file(b, &lb);
    int eq = x && y && la == lb && memcmp(x, y, la) == 0;
    free(x);
    free(y);
    return eq;
}

static int log_contains(const char *log, const char *what) {
    char *s = read_file(log, NULL);
    int found = s && strstr(s, what) != NULL;
    free(s);
    return found;
}

/* ---- flags --------------------------------------------------------------------------- */

static void test_flags(void) {
    TrainOptions o;
    int rc = parse_flags(&o, "--model m --data a.txt b.tok c.jsonl --ctx 8192 --out o --max-steps 7 --lr 3e-4 --betas 0.8,0.99 "
                             "--eps 1e-6 --weight-decay 0.1 --warmup 5 --grad-accum 4 --clip 1.5 --seed 9 --batch 2 --group-ratio 0.125 "
                             "--save-every 3 --lora-rank 16 --lora-alpha 32");
    EXPECT(rc == 0, "a full valid command line is refused: %s", last_error());
    EXPECT(o.n_data_files == 3 && !strcmp(o.data_files[2], "c.jsonl"), "--data takes every file up to the next flag");
    EXPECT(o.ctx == 8192 && o.group == 1024 && o.max_steps == 7 && o.batch == 2 && o.grad_accum == 4, "sizes parsed");
    EXPECT(o.lr == 3e-4 && o.beta1 == 0.8 && o.beta2 == 0.99 && o.eps == 1e-6 && o.weight_decay == 0.1 && o.clip == 1.5, "optimizer flags parsed");
    EXPECT(o.warmup == 5 && o.seed == 9 && o.save_every == 3 && o.lora_rank == 16 && o.lora_alpha == 32, "other flags parsed");
    rc = parse_flags(&o, "--model m --data a --ctx 1000");
    EXPECT(rc == 0 && o.group == 250 && o.s2 && o.lr == 2e-5 && o.beta1 == 0.9 && o.beta2 == 0.95 && o.eps == 1e-8 && o.warmup == 20,
           "defaults are the LongLoRA recipe (G = N/4, lr 2e-5, betas 0.9,0.95, eps 1e-8, warmup 20)");
    rc = parse_flags(&o, "--model m --data a --ctx 1002 --no-s2");
    EXPECT(rc == 0 && o.group == 0, "--no-s2 means full attention (G = 0) and lifts the N %% G rule");
    rc = parse_flags(&o, "--init random --shape tiny --sft s.json --template alpaca --pack --ctx 64");
    EXPECT(rc == 0 && o.sft_pack && !strcmp(o.template_name, "alpaca"), "SFT flags parsed");
    EXPECT(parse_flags(&o, "--help") == 1, "--help is reported");
    rc = parse_flags(&o, "--model m --data a --ctx 64");
    EXPECT(rc == 0 && o.gpu_mem_gib == 0 && o.host_mem_gib < 0, "no memory budgets by default (what is free, what the machine has)");
    rc = parse_flags(&o, "--model m --data a --ctx 64 --gpu-mem 80 --host-mem 112.5");
    EXPECT(rc == 0 && o.gpu_mem_gib == 80 && o.host_mem_gib == 112.5, "--gpu-mem and --host-mem parsed: %s", last_error());
    /* one S2 rule (common.h's s2_group_size): a ratio of 1 is one group, i.e. full attention */
    rc = parse_flags(&o, "--model m --data a --ctx 64 --group-ratio 1");
    EXPECT(rc == 0 && o.group == 0, "--group-ratio 1 is full attention (G = 0), got G = %d: %s", o.group, last_error());
    rc = parse_flags(&o, "--model m --data a --ctx 64");
    EXPECT(rc == 0 && o.lr_scheduler == LR_CONSTANT && o.train_embed && o.train_norms, "by default the schedule is constant and LoRA+ trains whole");
    rc = parse_flags(&o, "--model m --data a --ctx 64 --lr-scheduler cosine --no-train-embed");
    EXPECT(rc == 0 && o.lr_scheduler == LR_COSINE && !o.train_embed && o.train_norms, "--lr-scheduler cosine --no-train-embed: %s", last_error());
    rc = parse_flags(&o, "--model m --data a --ctx 64 --lr_scheduler_type linear --no_train_norms");
    EXPECT(rc == 0 && o.lr_scheduler == LR_LINEAR && o.train_embed && !o.train_norms, "HF's --lr_scheduler_type and --no_train_norms: %s", last_error());
    rc = parse_flags(&o, "--model m --data a --ctx 64 --lr_scheduler_type constant_with_warmup");
    EXPECT(rc == 0 && o.lr_scheduler == LR_CONSTANT, "HF's constant_with_warmup is the constant schedule: %s", last_error());
    rc = parse_flags(&o, "--model_name_or_path m --data_path a --learning_rate 1e-4 --model_max_length 2048 --per_device_train_batch_size 3 "
                         "--gradient_accumulation_steps 5 --warmup_steps 7 --max_grad_norm 0.3 --output_dir od --save_steps 9 --weight_decay 0.5");
    EXPECT(rc == 0 && !strcmp(o.model_dir, "m") && o.n_data_files == 1 && o.lr == 1e-4 && o.ctx == 2048 && o.batch == 3 && o.grad_accum == 5 &&
           o.warmup == 7 && o.clip == 0.3 && !strcmp(o.out_dir, "od") && o.save_every == 9 && o.weight_decay == 0.5,
           "HF Trainer spellings (underscores, learning_rate, per_device_train_batch_size, ...) work: %s", last_error());

    struct { const char *flags, *says; } bad[] = {
        {"--model m --data a --ctx 1002", "whole number"},             /* 1002 * 0.25 = 250.5 */
        {"--model m --data a --ctx 1000 --group-ratio 0.3", "multiple"}, /* G = 300 does not divide 1000 */
        {"--model m --data a --ctx 64 --group-ratio 0", "--group-ratio"},
        {"--model m --data a --ctx 64 --group-ratio 1.5", "--group-ratio"},
        {"--data a --ctx 64", "--model"},
        {"--model m --ctx 64", "--data"},
        {"--model m --init random --shape tiny --data a", "exclude"},
        {"--init random --data a", "--shape"},
        {"--model m --shape tiny --data a", "--shape"},
        {"--init zeros --shape tiny --data a", "--init"},
        {"--model m --data a --sft s.json", "exclude"},
        {"--model m --data a --pack", "--pack"},
        {"--model m --data a --lr abc", "--lr"},
        {"--model m --data a --lr -1", "--lr"},
        {"--model m --data a --lr 1e-3x", "--lr"},
        {"--model m --data a --lr nan", "--lr"},
        {"--model m --data a --betas 0.9", "--betas"},
        {"--model m --data a --betas 0.9,1.0", "--betas"},
        {"--model m --data a --eps 0", "--eps"},
        {"--model m --data a --weight-decay -0.1", "--weight-decay"},
        {"--model m --data a --warmup -1", "--warmup"},
        {"--model m --data a --grad-accum 0", "--grad-accum"},
        {"--model m --data a --batch 0", "--batch"},
        {"--model m --data a --ctx 1", "--ctx"},
        {"--model m --data a --ctx 99999999999", "--ctx"},
        {"--model m --data a --max-steps 0", "--max-steps"},
        {"--model m --data a --clip -1", "--clip"},
        {"--model m --data a --seed -3", "--seed"},
        {"--model m --data a --template chatml", "--template"},
        {"--model m --data a --frobnicate 3", "unknown flag"},
        {"stray --model m --data a", "unexpected argument"},
        {"--model m --data a --lr", "needs a value"},
        {"--model m --data a --device gpu", "no CUDA"}, /* this test is built without USE_CUDA */
        {"--model m --data a --device tpu", "--device"},
        {"--model m --sft s.json --save-tokens t.tok", "--save-tokens"},
        {"--model m --data a --gpu-mem 0", "--gpu-mem"},
        {"--model m --data a --gpu-mem 80GB", "--gpu-mem"},
        {"--model m --data a --host-mem -1", "--host-mem"},
        {"--model m --data a --lr-scheduler bogus", "--lr-scheduler must be constant, cosine or linear, got 'bogus'"},
        {"--model m --data a --lr-scheduler", "needs a value"},
        {"--model m --data a --lr_scheduler_type polynomial", "--lr-scheduler"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        rc = parse_flags(&o, bad[i].flags);
        EXPECT(rc == -1 && strstr(last_error(), bad[i].says), "'%s' should be refused naming '%s'; got rc %d: %s", bad[i].flags,
               bad[i].says, rc, last_error());
    }
    /* warmup then constant (HF's constant_with_warmup: step s (0-based) gets lr * s / W) */
    AdamWConfig ac = adamw_default_config();
    ac.lr = 1e-3f;
    ac.warmup_steps = 4;
    EXPECT(adamw_lr_at(&ac, 0) == 0.0f && fabsf(adamw_lr_at(&ac, 2) - 5e-4f) < 1e-9f && adamw_lr_at(&ac, 4) == 1e-3f &&
           adamw_lr_at(&ac, 1000) == 1e-3f, "warmup-then-constant schedule");
    /* cosine and linear over 12 steps: peak after the warmup, half way at step 8, 0 at the end
     * (and past it: linear stays at 0, cosine rises again as transformers' does) */
    ac.total_steps = 12;
    ac.schedule = LR_COSINE;
    EXPECT(adamw_lr_at(&ac, 2) == 5e-4f && adamw_lr_at(&ac, 4) == 1e-3f && fabsf(adamw_lr_at(&ac, 8) - 5e-4f) < 1e-9f && adamw_lr_at(&ac, 12) < 1e-12f &&
           fabsf(adamw_lr_at(&ac, 16) - 5e-4f) < 1e-9f, "cosine schedule");
    ac.schedule = LR_LINEAR;
    EXPECT(adamw_lr_at(&ac, 2) == 5e-4f && adamw_lr_at(&ac, 4) == 1e-3f && fabsf(adamw_lr_at(&ac, 8) - 5e-4f) < 1e-9f && adamw_lr_at(&ac, 12) == 0.0f &&
           adamw_lr_at(&ac, 16) == 0.0f, "linear schedule");
}

/* ---- data ---------------------------------------------------------------------------- */

static void test_packing(void) {
    char path[512];
    Rng rng;
    rng_seed(&rng, (uint64_t)time(NULL));
    size_t T = 1000 + rng_below(&rng, 500); /* not a multiple of N */
    int N = 37;
    int32_t *ids = (int32_t *)xmalloc(T * sizeof(int32_t));
    for (size_t i = 0; i < T; i++) ids[i] = (int32_t)rng_below(&rng, 259);
    CHECK(tokfile_write(tmp_path(path, "stream.tok"), ids, T, 259) == 0, "%s", last_error());
    TextCodec c = byte_codec();
    Dataset ds;
    const char *paths[1] = {path};
    EXPECT(dataset_load_text(&ds, &c, paths, 1, N) == 0, "token file loads: %s", last_error());
    EXPECT(ds.n_seqs == (T - 1) / (size_t)N, "n_seqs %zu, want (T-1)/N = %zu", ds.n_seqs, (T - 1) / (size_t)N);
    dataset_start(&ds, 5);
    int32_t *in = (int32_t *)xmalloc(3 * (size_t)N * sizeof(int32_t)), *tg = (int32_t *)xmalloc(3 * (size_t)N * sizeof(int32_t));
    /* one epoch: every sequence once, each equal to its slice of the stream */
    size_t n = ds.n_seqs;
    int *seen = (int *)xcalloc(n, sizeof(int));
    uint32_t *first_order = (uint32_t *)xmalloc(n * sizeof(uint32_t));
    memcpy(first_order, ds.order, n * sizeof(uint32_t));
    int ok = 1, in_order = 1;
    for (size_t s = 0; s < n; s++) {
        dataset_next_batch(&ds, 1, in, tg);
        /* find which sequence this is from its first token position: it is order[s] */
        size_t k = first_order[s];
        if (k >= n || seen[k]++) ok = 0;
        for (int t = 0; t < N && ok; t++)
            if (in[t] != ids[k * (size_t)N + (size_t)t] || tg[t] != ids[k * (size_t)N + (size_t)t + 1]) ok = 0;
        if (k != s) in_order = 0;
    }
    EXPECT(ok, "one epoch visits every sequence once, inputs = stream[kN, kN+N), targets shifted by one");
    EXPECT(!in_order, "the order is shuffled");
    EXPECT(ds.epoch == 0 && ds.pos == n, "position at the end of the epoch");
    dataset_next_batch(&ds, 3, in, tg);
    EXPECT(ds.epoch == 1 && ds.pos == 3, "a batch past the end starts epoch 2");
    EXPECT(memcmp(first_order, ds.order, n * sizeof(uint32_t)) != 0, "epoch 2 is reshuffled");
    Dataset ds2;
    dataset_load_text(&ds2, &c, paths, 1, N);
    dataset_start(&ds2, 5);
    EXPECT(memcmp(first_order, ds2.order, n * sizeof(uint32_t)) == 0 && ds2.fingerprint == ds.fingerprint, "same seed, same order");
    dataset_free(&ds2);
    dataset_load_text(&ds2, &c, paths, 1, N);
    dataset_start(&ds2, 6);
    EXPECT(memcmp(first_order, ds2.order, n * sizeof(uint32_t)) != 0, "another seed, another order");
    dataset_free(&ds2);
    dataset_load_text(&ds2, &c, paths, 1, N + 1);
    EXPECT(ds2.fingerprint != ds.fingerprint, "the fingerprint depends on N");
    dataset_free(&ds2);
    free(seen); free(first_order); free(in); free(tg); dataset_free(&ds);

    /* token ids outside the vocabulary, too little data, a token file with a bad header */
    c.vocab_size = 100;
    EXPECT(dataset_load_text(&ds, &c, paths, 1, N) == -1 && strstr(last_error(), "vocabulary"), "ids >= V are refused: %s", last_error());
    c.vocab_size = 259;
    EXPECT(dataset_load_text(&ds, &c, paths, 1, (int)T) == -1 && strstr(last_error(), "fewer"), "data shorter than N+1 is refused: %s", last_error());
    write_text(tmp_path(path, "bad.tok"), "LLTK\x01\0\0\0\x02\0\0\0\xff\0\0\0\0\0\0\0ab");
    EXPECT(dataset_load_text(&ds, &c, paths, 1, 4) == -1 && strstr(last_error(), "bad.tok"), "a corrupt token file is refused: %s", last_error());
    free(ids);

    /* text and .jsonl: BOS doc EOS, one document per file or per line */
    char p1[512], p2[512];
    write_text(tmp_path(p1, "a.txt"), "hello world");
    write_text(tmp_path(p2, "b.jsonl"), "{\"text\": \"ab\"}\n\n{\"text\": \"c\\u00e9\", \"meta\": 1}\n");
    const char *tp[2] = {p1, p2};
    EXPECT(dataset_load_text(&ds, &c, tp, 2, 4) == 0, "text + jsonl load: %s", last_error());
    int32_t want[64];
    size_t w = 0;
    want[w++] = 1;
    for (const char *s = "hello world"; *s; s++) want[w++] = (unsigned char)*s + 3;
    want[w++] = 2; want[w++] = 1; want[w++] = 'a' + 3; want[w++] = 'b' + 3; want[w++] = 2;
    want[w++] = 1; want[w++] = 'c' + 3; want[w++] = 0xc3 + 3; want[w++] = 0xa9 + 3; want[w++] = 2;
    EXPECT(ds.stream_len == w && memcmp(ds.stream, want, w * sizeof(int32_t)) == 0, "documents joined as BOS doc EOS (%zu tokens, want %zu)", ds.stream_len, w);
    dataset_free(&ds);
    write_text(p2, "{\"text\": \"ab\"}\n{\"txt\": 1}\n");
    EXPECT(dataset_load_text(&ds, &c, tp, 2, 4) == -1 && strstr(last_error(), "line 2"), "a .jsonl line without text is refused: %s", last_error());
    write_text(p2, "{\"text\": \"ab\"\n");
    EXPECT(dataset_load_text(&ds, &c, tp, 2, 4) == -1 && strstr(last_error(), "line 1"), "malformed .jsonl is refused: %s", last_error());
    TextCodec none = {0};
    none.vocab_size = 259;
    none.bos_id = none.eos_id = -1;
    EXPECT(dataset_load_text(&ds, &none, tp, 1, 4) == -1 && strstr(last_error(), "tokenizer"), "text without a tokenizer is refused: %s", last_error());
    const char *missing[1] = {"no/such/file.txt"};
    EXPECT(dataset_load_text(&ds, &c, missing, 1, 4) == -1 && strstr(last_error(), "no/such/file.txt"), "a missing file is named: %s", last_error());
}

/* The ids and targets test_sft expects for one record, computed from the template text. */
static size_t expected_example(const char *tmpl, const char *ins, const char *inp, const char *out, int32_t *ids, size_t *n_prompt) {
    char *prompt = prompt_template(tmpl, ins, inp);
    size_t n = 0;
    ids[n++] = 1;
    for (const char *s = prompt; *s; s++) ids[n++] = (unsigned char)*s + 3;
    *n_prompt = n;
    for (const char *s = out; *s; s++) ids[n++] = (unsigned char)*s + 3;
    ids[n++] = 2;
    free(prompt);
    return n;
}

static void test_sft(void) {
    char path[512];
    TextCodec c = byte_codec();
    /* the templates' exact text */
    char *p = prompt_template("llama2-chat", "Sum", "2+2");
    EXPECT(!strcmp(p, "[INST] Sum\n\n2+2 [/INST]"), "llama2-chat with input: '%s'", p);
    free(p);
    p = prompt_template("llama2-chat", "Hi", "");
    EXPECT(!strcmp(p, "[INST] Hi [/INST]"), "llama2-chat without input: '%s'", p);
    free(p);
    p = prompt_template("alpaca", "Hi", NULL);
    EXPECT(!strcmp(p, "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
                      "### Instruction:\nHi\n\n### Response:"), "alpaca without input: '%s'", p);
    free(p);
    p = prompt_template("alpaca", "Hi", "x");
    EXPECT(strstr(p, "paired with an input") && strstr(p, "### Input:\nx\n\n### Response:"), "alpaca with input: '%s'", p);
    free(p);
    p = prompt_template("none", "Hi", "x");
    EXPECT(!strcmp(p, "Hi\n\nx"), "none: '%s'", p);
    free(p);

    /* padded: one example per sequence, -100 on prompt and padding, truncation at N */
    const int N = 96;
    char longout[200];
    memset(longout, 'z', 150);
    longout[150] = 0;
    char json[1024];
    snprintf(json, sizeof json,
             "[{\"instruction\": \"Say hi\", \"input\": \"\", \"output\": \"hi there\"},\n"
             " {\"instruction\": \"Add\", \"input\": \"2+2\", \"output\": \"4\"},\n"
             " {\"instruction\": \"Long\", \"output\": \"%s\"}]", longout);
    write_text(tmp_path(path, "sft.json"), json);
    const char *recs[3][3] = {{"Say hi", "", "hi there"}, {"Add", "2+2", "4"}, {"Long", NULL, longout}};
    Dataset ds;
    for (int tmpl = 0; tmpl < 3; tmpl++) {
        const char *tname = tmpl == 0 ? "llama2-chat" : tmpl == 1 ? "alpaca" : "none";
        int n_expected = 3;
        int rc = dataset_load_sft(&ds, &c, path, tname, 0, tmpl == 1 ? 256 : N);
        int NN = tmpl == 1 ? 256 : N;
        EXPECT(rc == 0 && ds.n_seqs == (size_t)n_expected, "%s: 3 records give 3 sequences (rc %d, %zu): %s", tname, rc, ds.n_seqs, last_error());
        if (rc != 0) continue;
        size_t loss_tokens = 0;
        for (int r = 0; r < 3; r++) {
            int32_t ids[512];
            size_t n_prompt;
            size_t len = expected_example(tname, recs[r][0], recs[r][1], recs[r][2], ids, &n_prompt);
            const int32_t *in = ds.seq_inputs + (size_t)r * NN, *tg = ds.seq_targets + (size_t)r * NN;
            int ok = 1;
            for (int t = 0; t < NN; t++) {
                int32_t want_in = (size_t)t < len ? ids[t] : 2; /* EOS padding */
                int32_t want_tg = ((size_t)t + 1 < len && (size_t)t + 1 >= n_prompt) ? ids[t + 1] : IGNORE_INDEX;
                if (in[t] != want_in || tg[t] != want_tg) { ok = 0; printf("  %s record %d position %d: in %d tg %d, want %d %d\n", tname, r, t, in[t], tg[t], want_in, want_tg); break; }
                loss_tokens += want_tg != IGNORE_INDEX;
            }
            EXPECT(ok, "%s record %d: inputs and targets (prompt and padding masked, output + EOS learned)", tname, r);
        }
        EXPECT(ds.loss_tokens == loss_tokens, "%s: loss token count %zu, want %zu", tname, ds.loss_tokens, loss_tokens);
        dataset_free(&ds);
    }

    /* packed: short examples share a sequence, each still masked on its own prompt */
    EXPECT(dataset_load_sft(&ds, &c, path, "none", 1, 48) == 0, "packed load: %s", last_error());
    {
        int32_t a[256], b[256];
        size_t na_p, nb_p;
        size_t na = expected_example("none", "Say hi", "", "hi there", a, &na_p);
        size_t nb = expected_example("none", "Add", "2+2", "4", b, &nb_p);
        EXPECT(na + nb <= 48 && ds.n_seqs == 2, "two short examples packed into one sequence, the long one alone (%zu sequences)", ds.n_seqs);
        const int32_t *in = ds.seq_inputs, *tg = ds.seq_targets;
        int ok = 1;
        for (size_t t = 0; t < 48 && ok; t++) {
            int32_t wi, wt;
            if (t < na) { wi = a[t]; wt = (t + 1 < na && t + 1 >= na_p) ? a[t + 1] : IGNORE_INDEX; }
            else if (t < na + nb) { size_t u = t - na; wi = b[u]; wt = (u + 1 < nb && u + 1 >= nb_p) ? b[u + 1] : IGNORE_INDEX; }
            else { wi = 2; wt = IGNORE_INDEX; }
            if (in[t] != wi || tg[t] != wt) { ok = 0; printf("  packed position %zu: in %d tg %d, want %d %d\n", t, in[t], tg[t], wi, wt); }
        }
        EXPECT(ok, "packed sequence: example 1, example 2, EOS padding; no target crosses from one example into the next");
        dataset_free(&ds);
    }

    /* JSONL works the same; malformed records are refused by index */
    write_text(path, "{\"instruction\": \"Say hi\", \"output\": \"hi\"}\n{\"instruction\": \"b\", \"output\": \"c\"}\n");
    EXPECT(dataset_load_sft(&ds, &c, path, "none", 0, 32) == 0 && ds.n_seqs == 2, "JSONL records load: %s", last_error());
    dataset_free(&ds);
    struct { const char *text, *says; } bad[] = {
        {"[{\"instruction\": \"a\"}]", "record 1"},
        {"[{\"instruction\": \"a\", \"output\": \"b\"}, {\"output\": \"b\"}]", "record 2"},
        {"[{\"instruction\": 3, \"output\": \"b\"}]", "record 1"},
        {"[{\"instruction\": \"a\", \"input\": [1], \"output\": \"b\"}]", "input"},
        {"[1]", "not an object"},
        {"[]", "no records"},
        {"{\"instruction\": \"a\", \"output\": \"b\"}\n{oops}\n", "line 2"},
        {"[{\"instruction\": \"a\", \"output\": \"b\"}", "malformed"},
        {"[{\"instruction\": \"a\\u0000b\", \"output\": \"b\"}]", "\\u0000"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        write_text(path, bad[i].text);
        int rc = dataset_load_sft(&ds, &c, path, "none", 0, 32);
        EXPECT(rc == -1 && strstr(last_error(), bad[i].says), "SFT file %zu should be refused naming '%s': %s", i, bad[i].says, last_error());
        if (rc == 0) dataset_free(&ds);
    }
    /* a prompt longer than N leaves nothing to learn: refused when it is all there is */
    write_text(path, "[{\"instruction\": \"a very long instruction indeed\", \"output\": \"b\"}]");
    EXPECT(dataset_load_sft(&ds, &c, path, "none", 0, 8) == -1 && strstr(last_error(), "no record"), "nothing learnable within N is refused: %s", last_error());
}

/* ---- SFT masking with a real model --------------------------------------------------- */

/* Loss and every trainable gradient for one batch (grads zeroed first). */
static float loss_and_grads(Model *m, Activations *a, Grads *g, LoraAdapter *ad, const int32_t *in, const int32_t *tg, size_t N,
                            size_t G) {
    grads_zero(g);
    lora_zero_grads(ad);
    RunOptions run = {G, 0, &ad->hook};
    float loss = model_forward(m, a, in, tg, 1, N, &run);
    model_backward(m, a, g, in, tg, 1, N, &run);
    return loss;
}

static void test_sft_masking(void) {
    char path[512];
    TextCodec c = byte_codec();
    const int N = 80;
    write_text(tmp_path(path, "mask.json"), "[{\"instruction\": \"Name a color\", \"input\": \"sky\", \"output\": \"blue!\"}]");
    Dataset ds;
    CHECK(dataset_load_sft(&ds, &c, path, "llama2-chat", 0, N) == 0, "%s", last_error());
    int32_t *in = ds.seq_inputs, *tg = ds.seq_targets;
    size_t last_label = 0, first_label = (size_t)N, n_labels = 0;
    for (size_t t = 0; t < (size_t)N; t++)
        if (tg[t] != IGNORE_INDEX) { if (t < first_label) first_label = t; last_label = t; n_labels++; }
    CHECK(n_labels == 6 && last_label + 2 < (size_t)N, "the example should leave padding (labels %zu, last %zu)", n_labels, last_label);

    /* a tiny model with V = 259 and live adapters (B random, so every LoRA gradient flows) */
    Config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.dim = 48; cfg.ffn_dim = 100; cfg.n_layers = 2; cfg.n_heads = 4; cfg.n_kv_heads = 2; cfg.head_dim = 12;
    cfg.vocab_size = 259; cfg.rms_eps = 1e-5f; cfg.rope_theta = 10000.0f; cfg.rope_config_factor = 1.0f; cfg.rope_factor = 1.0f;
    cfg.max_pos = N; cfg.tie_embeddings = 1; cfg.bos_id = 1; cfg.eos_id = 2;
    Model m;
    model_init_random(&m, &cfg, 77, 0.2f);
    LoraAdapter ad;
    LoraConfig lc = lora_default_config();
    CHECK(lora_init(&ad, &cfg, &lc) == 0, "%s", last_error());
    Rng rng;
    rng_seed(&rng, 99);
    for (size_t i = 0; i < (size_t)cfg.n_layers * LORA_NUM_TARGETS; i++)
        if (ad.pairs[i].B) for (size_t k = 0; k < ad.pairs[i].out * (size_t)lc.rank; k++) ad.pairs[i].B[k] = 0.1f * rng_normal(&rng);
    Grads g;
    lora_grads_alloc(&g, &cfg);
    AdamW opt;
    memset(&opt, 0, sizeof opt);
    lora_register_params(&opt, &ad, &m, &g);
    Activations a;
    act_plan(&a, &cfg, 1, (size_t)N, 1);
    size_t G = (size_t)N / 4;

    float loss = loss_and_grads(&m, &a, &g, &ad, in, tg, (size_t)N, G);
    /* (1) the loss is the mean over the labelled positions, recomputed here from the logits */
    float *logits = (float *)xmalloc((size_t)N * cfg.vocab_size * sizeof(float));
    RunOptions run = {G, 0, &ad.hook};
    model_forward(&m, &a, in, tg, 1, (size_t)N, &run);
    memcpy(logits, a.logits, (size_t)N * cfg.vocab_size * sizeof(float));
    double manual = 0;
    for (size_t t = 0; t < (size_t)N; t++) {
        if (tg[t] == IGNORE_INDEX) continue;
        const float *row = logits + t * cfg.vocab_size;
        double mx = row[0], s = 0;
        for (int v = 0; v < cfg.vocab_size; v++) if (row[v] > mx) mx = row[v];
        for (int v = 0; v < cfg.vocab_size; v++) s += exp((double)row[v] - mx);
        manual += mx + log(s) - row[tg[t]];
    }
    manual /= (double)n_labels;
    EXPECT(fabs(manual - loss) <= 1e-5 * fabs(manual), "loss %.7f equals the mean over the %zu output positions %.7f (tolerance 1e-5 relative)",
           (double)loss, n_labels, manual);
    /* (2) the gradient reaching the logits is exactly zero on every masked position */
    loss_and_grads(&m, &a, &g, &ad, in, tg, (size_t)N, G);
    int zero_rows = 1, live_rows = 1;
    for (size_t t = 0; t < (size_t)N; t++) {
        double s = 0;
        for (int v = 0; v < cfg.vocab_size; v++) s += fabs((double)a.logits[t * cfg.vocab_size + v]);
        if (tg[t] == IGNORE_INDEX && s != 0) zero_rows = 0;
        if (tg[t] != IGNORE_INDEX && !(s > 0)) live_rows = 0;
    }
    EXPECT(zero_rows, "dLoss/dlogits is exactly zero on prompt and padding positions");
    EXPECT(live_rows, "dLoss/dlogits is non-zero on every output position");

    /* (3) perturb the masked padding tokens: loss and every trainable gradient bit-identical */
    size_t total = 0;
    for (size_t k = 0; k < opt.count; k++) total += opt.params[k].numel;
    float *g1 = (float *)xmalloc(total * sizeof(float)), *g2 = (float *)xmalloc(total * sizeof(float));
    float l1 = loss_and_grads(&m, &a, &g, &ad, in, tg, (size_t)N, G);
    for (size_t k = 0, off = 0; k < opt.count; off += opt.params[k].numel, k++) memcpy(g1 + off, opt.params[k].grad, opt.params[k].numel * sizeof(float));
    int32_t *in2 = (int32_t *)xmalloc((size_t)N * sizeof(int32_t));
    memcpy(in2, in, (size_t)N * sizeof(int32_t));
    for (size_t t = last_label + 2; t < (size_t)N; t++) in2[t] = 3 + (int32_t)rng_below(&rng, 256);
    float l2 = loss_and_grads(&m, &a, &g, &ad, in2, tg, (size_t)N, G);
    for (size_t k = 0, off = 0; k < opt.count; off += opt.params[k].numel, k++) memcpy(g2 + off, opt.params[k].grad, opt.params[k].numel * sizeof(float));
    double gnorm = 0;
    for (size_t i = 0; i < total; i++) gnorm += (double)g1[i] * g1[i];
    EXPECT(gnorm > 0, "the gradients are not all zero");
    EXPECT(l1 == l2, "perturbing masked tokens changed the loss: %.9g vs %.9g", (double)l1, (double)l2);
    EXPECT(memcmp(g1, g2, total * sizeof(float)) == 0, "perturbing masked tokens changed a trainable gradient");
    /* ... while perturbing an output token does change them (so the check above can fail) */
    memcpy(in2, in, (size_t)N * sizeof(int32_t));
    in2[first_label + 2] = in2[first_label + 2] == 100 ? 101 : 100;
    float l3 = loss_and_grads(&m, &a, &g, &ad, in2, tg, (size_t)N, G);
    EXPECT(l3 != l1, "perturbing an output token must change the loss");

    free(g1); free(g2); free(in2); free(logits);
    act_free(&a); adamw_free(&opt); params_free(&g); lora_free(&ad); model_free(&m); dataset_free(&ds);
}

/* ---- runs: resume, SIGINT, non-finite loss ------------------------------------------- */

static void test_resume(void) {
    char data[512], log[512], a[512], b[512], csv_a[512], csv_b[512], flags[2048], x[512], y[512];
    /* 7 sequences of 64: 4 per step (batch 2 x accumulation 2), so epochs wrap mid-run */
    Rng rng;
    rng_seed(&rng, (uint64_t)time(NULL) ^ 0x1234);
    size_t T = 7 * 64 + 1 + rng_below(&rng, 60);
    int32_t *ids = (int32_t *)xmalloc(T * sizeof(int32_t));
    for (size_t i = 0; i < T; i++) ids[i] = (int32_t)(i % 13 == 0 ? 10 : rng_below(&rng, 256)); /* some structure to learn */
    CHECK(tokfile_write(tmp_path(data, "resume.tok"), ids, T, 256) == 0, "%s", last_error());
    free(ids);
    const char *common = "--init random --shape tiny --ctx 64 --batch 2 --grad-accum 2 --clip 0.5 --lr 2e-3 --warmup 3 --quiet";
    tmp_path(a, "runA");
    tmp_path(b, "runB");
    snprintf(csv_a, sizeof csv_a, "%s/train_log.csv", a);
    snprintf(csv_b, sizeof csv_b, "%s/train_log.csv", b);

    snprintf(flags, sizeof flags, "%s --data %s --max-steps 10 --out %s", common, data, a);
    int rc = run_training(flags, tmp_path(log, "a.log"), NULL, 0);
    EXPECT(rc == 0, "straight run exits %d (log %s)", rc, log);
    snprintf(flags, sizeof flags, "%s --data %s --max-steps 5 --save-every 2 --out %s", common, data, b);
    rc = run_training(flags, tmp_path(log, "b1.log"), NULL, 0);
    EXPECT(rc == 0, "first half exits %d", rc);
    snprintf(x, sizeof x, "%s/checkpoint-2/trainer_state.json", b);
    snprintf(y, sizeof y, "%s/checkpoint-5/train_state.safetensors", b);
    EXPECT(file_exists(x) && file_exists(y), "--save-every 2 and the end leave checkpoint-2 and checkpoint-5");
    snprintf(flags, sizeof flags, "%s --data %s --max-steps 10 --out %s --resume %s", common, data, b, b);
    rc = run_training(flags, tmp_path(log, "b2.log"), NULL, 0);
    EXPECT(rc == 0 && log_contains(log, "resumed from") && log_contains(log, "checkpoint-5"), "resume exits %d and says from where", rc);
    int ra, rb;
    char *la = csv_losses(csv_a, &ra), *lb = csv_losses(csv_b, &rb);
    EXPECT(ra == 10 && rb == 10, "both logs have 10 steps (%d, %d)", ra, rb);
    EXPECT(!strcmp(la, lb), "losses differ between 10 straight steps and 5 + resume + 5:\n%s---\n%s", la, lb);
    {   /* the losses must actually move (else equality says little) */
        double first = atof(strchr(la, ',') + 1), last = 0;
        const char *l = la;
        for (const char *nl; (nl = strchr(l, '\n')) && nl[1]; l = nl + 1) {}
        last = atof(strchr(l, ',') + 1);
        EXPECT(first != last && isfinite(first) && isfinite(last), "losses change over the run (%g -> %g)", first, last);
    }
    free(la); free(lb);
    snprintf(x, sizeof x, "%s/adapter_model.safetensors", a);
    snprintf(y, sizeof y, "%s/adapter_model.safetensors", b);
    EXPECT(files_equal(x, y), "final adapters are byte-identical");
    snprintf(x, sizeof x, "%s/checkpoint-10/train_state.safetensors", a);
    snprintf(y, sizeof y, "%s/checkpoint-10/train_state.safetensors", b);
    EXPECT(files_equal(x, y), "final optimizer states are byte-identical");
    snprintf(x, sizeof x, "%s/checkpoint-10/trainer_state.json", a);
    Json *js = json_parse_file(x);
    EXPECT(js && json_get_number(json_get(js, "data"), "epoch", -1) == 5 && json_get_number(json_get(js, "data"), "position", -1) == 5,
           "40 sequences over 7 per epoch: epoch 5, position 5");
    json_free(js);
    DIR *d = opendir(b);
    int leftovers = 0;
    for (struct dirent *e; d && (e = readdir(d));) leftovers += strstr(e->d_name, ".tmp") != NULL || strstr(e->d_name, ".old") != NULL;
    if (d) closedir(d);
    EXPECT(leftovers == 0, "no temporary checkpoint folders are left behind");

    /* refusals: another --ctx, other data, already done, a corrupt checkpoint */
    snprintf(flags, sizeof flags, "%s --data %s --max-steps 12 --out %s --resume %s/checkpoint-5", common, data, b, b);
    char *ctx = strstr(flags, "--ctx 64");
    memcpy(ctx, "--ctx 32", 8);
    rc = run_training(flags, tmp_path(log, "r1.log"), NULL, 0);
    EXPECT(rc == 1 && log_contains(log, "--ctx"), "resume with another --ctx is refused (exit %d)", rc);
    char other[512];
    ids = (int32_t *)xmalloc(T * sizeof(int32_t));
    for (size_t i = 0; i < T; i++) ids[i] = (int32_t)rng_below(&rng, 256);
    CHECK(tokfile_write(tmp_path(other, "other.tok"), ids, T, 256) == 0, "%s", last_error());
    free(ids);
    snprintf(flags, sizeof flags, "%s --data %s --max-steps 12 --out %s --resume %s", common, other, b, b);
    rc = run_training(flags, tmp_path(log, "r2.log"), NULL, 0);
    EXPECT(rc == 1 && log_contains(log, "other data"), "resume on other data is refused (exit %d)", rc);
    snprintf(flags, sizeof flags, "%s --data %s --max-steps 10 --out %s --resume %s", common, data, b, b);
    rc = run_training(flags, tmp_path(log, "r3.log"), NULL, 0);
    EXPECT(rc == 1 && log_contains(log, "--max-steps"), "resume at --max-steps says so (exit %d)", rc);
    snprintf(x, sizeof x, "%s/checkpoint-2/train_state.safetensors", b);
    size_t len;
    char *st = read_file(x, &len);
    CHECK(st, "%s", last_error());
    CHECK(write_file_atomic(x, st, len / 2) == 0, "%s", last_error());
    free(st);
    snprintf(flags, sizeof flags, "%s --data %s --max-steps 12 --out %s --resume %s/checkpoint-2", common, data, b, b);
    rc = run_training(flags, tmp_path(log, "r4.log"), NULL, 0);
    EXPECT(rc == 1 && log_contains(log, "error: ") && log_contains(log, "checkpoint-2"), "a truncated checkpoint is refused with a sentence (exit %d)", rc);
    snprintf(x, sizeof x, "%s/checkpoint-2/trainer_state.json", b);
    write_text(x, "{\"format\": \"longlora-c trainer state\", \"version\": 1, \"step\": -4}");
    rc = run_training(flags, tmp_path(log, "r5.log"), NULL, 0);
    EXPECT(rc == 1 && log_contains(log, "error: "), "a malformed trainer_state.json is refused (exit %d)", rc);

    /* SIGINT: the run saves at the step boundary, exits 130, and resuming matches a straight run */
    char c_dir[512], csv_c[512];
    tmp_path(c_dir, "runC");
    snprintf(csv_c, sizeof csv_c, "%s/train_log.csv", c_dir);
    snprintf(flags, sizeof flags, "%s --data %s --max-steps 100000 --out %s", common, data, c_dir);
    rc = run_training(flags, tmp_path(log, "c1.log"), csv_c, 3);
    int rows;
    free(csv_losses(csv_c, &rows));
    snprintf(x, sizeof x, "%s/checkpoint-%d/trainer_state.json", c_dir, rows);
    EXPECT(rc == 130 && log_contains(log, "interrupted") && file_exists(x), "SIGINT: exit %d, checkpoint-%d saved", rc, rows);
    if (rc == 130 && rows >= 3 && rows < 1000) {
        snprintf(flags, sizeof flags, "%s --data %s --max-steps %d --out %s --resume %s", common, data, rows + 3, c_dir, c_dir);
        rc = run_training(flags, tmp_path(log, "c2.log"), NULL, 0);
        char d_dir[512], csv_d[512];
        tmp_path(d_dir, "runD");
        snprintf(csv_d, sizeof csv_d, "%s/train_log.csv", d_dir);
        snprintf(flags, sizeof flags, "%s --data %s --max-steps %d --out %s", common, data, rows + 3, d_dir);
        int rc2 = run_training(flags, tmp_path(log, "d.log"), NULL, 0);
        int r1, r2;
        char *l1 = csv_losses(csv_c, &r1), *l2 = csv_losses(csv_d, &r2);
        EXPECT(rc == 0 && rc2 == 0 && r1 == rows + 3 && !strcmp(l1, l2), "interrupted + resumed equals straight (%d vs %d rows)", r1, r2);
        free(l1); free(l2);
    }

    /* --save-total-limit keeps the newest checkpoints only */
    char f_dir[512];
    tmp_path(f_dir, "runF");
    snprintf(flags, sizeof flags, "%s --data %s --max-steps 5 --save-every 1 --save-total-limit 2 --out %s", common, data, f_dir);
    rc = run_training(flags, tmp_path(log, "f.log"), NULL, 0);
    int kept = 0, newest = 0;
    d = opendir(f_dir);
    for (struct dirent *e; d && (e = readdir(d));) {
        int s;
        if (sscanf(e->d_name, "checkpoint-%d", &s) == 1) { kept++; newest += s == 4 || s == 5; }
    }
    if (d) closedir(d);
    EXPECT(rc == 0 && kept == 2 && newest == 2, "--save-total-limit 2 keeps checkpoint-4 and checkpoint-5 only (%d kept)", kept);

    /* a non-finite loss stops the run, names the step, keeps the last good checkpoint */
    char e_dir[512];
    tmp_path(e_dir, "runE");
    snprintf(flags, sizeof flags, "--init random --shape tiny --ctx 64 --quiet --data %s --max-steps 20 --lr 1e30 --warmup 0 --save-every 1 --out %s",
             data, e_dir);
    rc = run_training(flags, tmp_path(log, "e.log"), NULL, 0);
    snprintf(x, sizeof x, "%s/checkpoint-1/trainer_state.json", e_dir);
    snprintf(y, sizeof y, "%s/checkpoint-2", e_dir);
    EXPECT(rc == 1 && log_contains(log, "not finite at step 2") && log_contains(log, "checkpoint-1") && file_exists(x) && !file_exists(y),
           "lr 1e30: exit %d, 'not finite at step 2', checkpoint-1 kept, no checkpoint-2", rc);
}

/* A trainer set up in this process from a command line ("05_train --flag value ...", split at
 * spaces; the string is cut up), as 05_train's main sets one up, ready for trainer_run. */
static Trainer *trainer_from_flags(char *flags) {
    char *argv[32];
    int argc = split_args(flags, argv, 32);
    Trainer *t = (Trainer *)xcalloc(1, sizeof(Trainer));
    train_defaults(&t->opt);
    CHECK(train_parse_args(&t->opt, argc, argv) == 0, "%s", last_error());
    trainer_init(t);
    return t;
}

/* ---- what trains, and the learning-rate schedule -------------------------------------- */

/* Whether an adapter folder's modules_to_save lists `module` (0 when it is null or missing). */
static int adapter_saves(const char *dir, const char *module) {
    char path[700];
    snprintf(path, sizeof path, "%s/adapter_config.json", dir);
    Json *j = json_parse_file(path);
    const Json *m = j ? json_get_type(j, "modules_to_save", JSON_ARRAY) : NULL;
    int found = 0;
    for (size_t i = 0; m && i < m->count; i++) found |= m->items[i].type == JSON_STRING && !strcmp(m->items[i].string, module);
    json_free(j);
    return found;
}

/* --no-train-embed, --no-train-norms (alone and together) against LoRA+, in-process on the
 * tiny shape (tied head): the frozen tensors are bit-identical after 4 steps, the trained ones
 * moved; the adapter and the checkpoint hold only what trained. The runs also use the
 * schedules: each logs the lr transformers' schedule gives, from the closed form here
 * (constant, cosine with half a cycle, linear; warmup 1 of 4 steps). Then the CLI: resuming with
 * other trained parts is refused, a resume takes a new schedule and --max-steps, an adapter
 * whose norms a run would drop is refused, a bad --lr-scheduler is one sentence. */
static void test_trained_parts(void) {
    char data[512], out[512], flags[2048], log[512], path[700];
    tmp_path(data, "resume.tok");
    const struct { const char *name, *flags; int embed, norms; LrSchedule sched; } runs[4] = {
        {"lora+", "", 1, 1, LR_CONSTANT},
        {"no-embed", "--no-train-embed --lr-scheduler cosine", 0, 1, LR_COSINE},
        {"no-norms", "--no_train_norms --lr_scheduler_type linear", 1, 0, LR_LINEAR},
        {"lora", "--no-train-embed --no-train-norms --lr-scheduler cosine", 0, 0, LR_COSINE},
    };
    const double lr = 1e-2;
    const int W = 1, S = 4;
    for (int k = 0; k < 4; k++) {
        snprintf(flags, sizeof flags, "05_train --init random --shape tiny --ctx 64 --quiet --device cpu --data %s --max-steps %d --warmup %d --lr %g "
                 "--out %s %s", data, S, W, lr, tmp_path(out, runs[k].name), runs[k].flags);
        Trainer *t = trainer_from_flags(flags);
        const Config *c = &t->model.cfg;
        size_t D = (size_t)c->dim, VD = (size_t)c->vocab_size * D, L = (size_t)c->n_layers;
        float *embed0 = (float *)xmalloc(VD * sizeof(float)), *norms0 = (float *)xmalloc((2 * L + 1) * D * sizeof(float)); /* [V, D], [2L+1, D] */
        memcpy(embed0, t->model.w.embed, VD * sizeof(float));
        for (size_t l = 0; l < L; l++) {
            memcpy(norms0 + 2 * l * D, t->model.w.layers[l].attn_norm, D * sizeof(float));
            memcpy(norms0 + (2 * l + 1) * D, t->model.w.layers[l].mlp_norm, D * sizeof(float));
        }
        memcpy(norms0 + 2 * L * D, t->model.w.final_norm, D * sizeof(float));
        EXPECT(c->tie_embeddings, "the tiny shape has a tied head (so a frozen embed freezes the head too)");
        int rc = trainer_run(t);
        EXPECT(rc == 0, "%s: the run exits %d", runs[k].name, rc);
        int embed_same = memcmp(embed0, t->model.w.embed, VD * sizeof(float)) == 0, norms_same = 1;
        for (size_t l = 0; l < L; l++)
            norms_same &= !memcmp(norms0 + 2 * l * D, t->model.w.layers[l].attn_norm, D * sizeof(float)) &&
                          !memcmp(norms0 + (2 * l + 1) * D, t->model.w.layers[l].mlp_norm, D * sizeof(float));
        norms_same &= !memcmp(norms0 + 2 * L * D, t->model.w.final_norm, D * sizeof(float));
        EXPECT(embed_same == !runs[k].embed, "%s: embed_tokens is %s after %d steps, want %s", runs[k].name, embed_same ? "bit-identical" : "changed", S,
               runs[k].embed ? "changed" : "bit-identical");
        EXPECT(norms_same == !runs[k].norms, "%s: the norms are %s after %d steps, want %s", runs[k].name, norms_same ? "bit-identical" : "changed", S,
               runs[k].norms ? "changed" : "bit-identical");
        size_t want_count = 2 * 4 * L + (size_t)runs[k].embed + (2 * L + 1) * (size_t)runs[k].norms; /* A and B of q,k,v,o per layer */
        EXPECT(t->lt.opt.count == want_count, "%s: %zu trainable tensors, want %zu", runs[k].name, t->lt.opt.count, want_count);
        /* the adapter and the checkpoint: only what trained */
        SafeTensors ad, st;
        snprintf(path, sizeof path, "%s/adapter_model.safetensors", out);
        CHECK(st_open(&ad, path) == 0, "%s", last_error());
        snprintf(path, sizeof path, "%s/checkpoint-%d/train_state.safetensors", out, S);
        CHECK(st_open(&st, path) == 0, "%s", last_error());
        int ad_embed = st_find(&ad, PEFT_PREFIX "model.embed_tokens.weight") != NULL, ad_norm = st_find(&ad, PEFT_PREFIX "model.norm.weight") != NULL;
        int ad_lnorm = st_find(&ad, PEFT_PREFIX "model.layers.1.post_attention_layernorm.weight") != NULL;
        int ad_head = st_find(&ad, PEFT_PREFIX "lm_head.weight") != NULL;
        int st_embed = st_find(&st, "model.embed_tokens.weight") != NULL, st_norm = st_find(&st, "model.norm.weight.exp_avg") != NULL;
        EXPECT(ad_embed == runs[k].embed && ad_head == runs[k].embed && adapter_saves(out, "embed_tokens") == runs[k].embed && st_embed == runs[k].embed,
               "%s: embed_tokens (and the tied lm_head) %s the adapter's tensors and modules_to_save and the checkpoint (%d %d %d %d)", runs[k].name,
               runs[k].embed ? "in" : "absent from", ad_embed, ad_head, adapter_saves(out, "embed_tokens"), st_embed);
        EXPECT(ad_norm == runs[k].norms && ad_lnorm == runs[k].norms && adapter_saves(out, "norm") == runs[k].norms &&
               adapter_saves(out, "input_layernorm") == runs[k].norms && st_norm == runs[k].norms,
               "%s: the norms %s the adapter's tensors and modules_to_save and the checkpoint", runs[k].name, runs[k].norms ? "in" : "absent from");
        EXPECT(st_find(&ad, PEFT_PREFIX "model.layers.0.self_attn.q_proj.lora_B.weight") != NULL, "%s: the adapter has LoRA B", runs[k].name);
        st_close(&ad);
        st_close(&st);
        if (!runs[k].embed && !runs[k].norms) {
            char *cfg = read_file(strcat(strcpy(path, out), "/adapter_config.json"), NULL);
            EXPECT(cfg && strstr(cfg, "\"modules_to_save\": null"), "plain LoRA: modules_to_save is null");
            free(cfg);
        }
        /* the schedule the log shows, step s (0-based) at lr * f(s) */
        double got[16];
        snprintf(path, sizeof path, "%s/train_log.csv", out);
        int n = train_log_column(path, TRAIN_LOG_LR, got, 16), bad = 0;
        for (int s = 0; s < n; s++) {
            double p = (double)(s - W) / (S - W), f = s < W ? (double)s / W : runs[k].sched == LR_CONSTANT ? 1.0
                                                                   : runs[k].sched == LR_COSINE ? 0.5 * (1.0 + cos(M_PI * p)) : 1.0 - p;
            if (fabs(got[s] - lr * f) > 1e-6 * lr) { bad++; printf("  %s step %d: lr %.9g, want %.9g\n", runs[k].name, s + 1, got[s], lr * f); }
        }
        EXPECT(n == S && bad == 0, "%s: the log's lr follows the %s schedule (%d rows, %d off)", runs[k].name, LR_SCHEDULE_NAMES[runs[k].sched], n, bad);
        free(embed0);
        free(norms0);
        trainer_free(t);
        free(t);
    }

    /* resume: other trained parts are refused; a new schedule and --max-steps are the resumed run's */
    const char *common = "--init random --shape tiny --ctx 64 --quiet --device cpu --warmup 1 --lr 1e-2";
    tmp_path(out, "no-embed");
    snprintf(flags, sizeof flags, "%s --data %s --max-steps 6 --out %s --resume %s", common, data, out, out);
    int rc = run_training(flags, tmp_path(log, "parts1.log"), NULL, 0);
    EXPECT(rc == 1 && log_contains(log, "kept embed_tokens frozen") && log_contains(log, "resume with --no-train-embed"),
           "resuming a --no-train-embed run without it is refused, naming the flag (exit %d, log %s)", rc, log);
    snprintf(flags, sizeof flags, "%s --data %s --max-steps 6 --out %s --resume %s --no-train-embed --no-train-norms", common, data, out, out);
    rc = run_training(flags, tmp_path(log, "parts2.log"), NULL, 0);
    EXPECT(rc == 1 && log_contains(log, "trained the norm weights") && log_contains(log, "without --no-train-norms"),
           "resuming with the norms frozen that trained is refused (exit %d, log %s)", rc, log);
    snprintf(flags, sizeof flags, "%s --data %s --max-steps 6 --out %s --resume %s --no-train-embed --lr-scheduler linear", common, data, out, out);
    rc = run_training(flags, tmp_path(log, "parts3.log"), NULL, 0);
    double got[16];
    snprintf(path, sizeof path, "%s/train_log.csv", out);
    int n = train_log_column(path, TRAIN_LOG_LR, got, 16);
    EXPECT(rc == 0 && n == 6 && fabs(got[3] - 0.5 * (1.0 + cos(M_PI * 2.0 / 3.0)) * 1e-2) < 1e-8 && fabs(got[4] - 1e-2 * 2.0 / 5.0) < 1e-8 &&
           fabs(got[5] - 1e-2 / 5.0) < 1e-8, "a resume (cosine over 4 -> linear over 6) keeps the logged rows and runs the new schedule to the new "
           "--max-steps (exit %d, %d rows, step 5 lr %g, step 6 lr %g)", rc, n, n > 4 ? got[4] : 0, n > 5 ? got[5] : 0);
    char p2[512];
    snprintf(flags, sizeof flags, "%s --data %s --max-steps 2 --out %s --adapter %s --no-train-norms", common, data, tmp_path(p2, "from-adapter"), out);
    rc = run_training(flags, tmp_path(log, "parts4.log"), NULL, 0);
    EXPECT(rc == 1 && log_contains(log, "carries trained norm weights") && log_contains(log, "drop --no-train-norms"),
           "starting from an adapter with trained norms under --no-train-norms is refused (exit %d, log %s)", rc, log);
    snprintf(flags, sizeof flags, "%s --data %s --max-steps 2 --out %s --adapter %s", common, data, p2, out);
    rc = run_training(flags, tmp_path(log, "parts5.log"), NULL, 0);
    EXPECT(rc == 0 && adapter_saves(p2, "embed_tokens") && adapter_saves(p2, "norm"),
           "starting from an adapter without embed trains LoRA+ whole by default (exit %d, log %s)", rc, log);
    snprintf(flags, sizeof flags, "%s --data %s --max-steps 2 --out %s --lr-scheduler bogus", common, data, tmp_path(p2, "bogus"));
    rc = run_training(flags, tmp_path(log, "parts6.log"), NULL, 0);
    char *text = read_file(log, NULL);
    EXPECT(rc == 1 && text && !strcmp(text, "error: --lr-scheduler must be constant, cosine or linear, got 'bogus'\n"),
           "--lr-scheduler bogus: exit %d with one sentence, said: %s", rc, text ? text : "(nothing)");
    free(text);
}

/* ---- hostile files: mutated SFT data and checkpoints never crash the loaders ----------- */

static void mutate(char *buf, size_t *len, Rng *r) {
    int kind = (int)rng_below(r, 4);
    if (kind == 0 && *len > 1) *len = (size_t)rng_below(r, *len);                      /* truncate */
    else if (kind == 1) for (int k = 0; k < 3; k++) buf[rng_below(r, *len)] = (char)rng_below(r, 256); /* random bytes */
    else if (kind == 2) buf[rng_below(r, *len)] ^= (char)(1u << rng_below(r, 8));      /* one bit */
    else { const char *s = "\"-1e999[{,:}]0x"; buf[rng_below(r, *len)] = s[rng_below(r, strlen(s))]; } /* JSON-ish */
}

static void test_hostile(void) {
    Rng r;
    rng_seed(&r, (uint64_t)time(NULL) ^ 0xbad);
    char path[512];
    TextCodec c = byte_codec();
    /* SFT files */
    const char *good = "[{\"instruction\": \"Name a color\", \"input\": \"sky\", \"output\": \"blue\"},"
                       " {\"instruction\": \"Add\", \"output\": \"4\"}]";
    size_t accepted = 0, bad_invariants = 0;
    for (int it = 0; it < 400; it++) {
        char buf[512];
        size_t len = strlen(good);
        memcpy(buf, good, len);
        mutate(buf, &len, &r);
        CHECK(write_file_atomic(tmp_path(path, "fuzz.json"), buf, len) == 0, "%s", last_error());
        Dataset ds;
        if (dataset_load_sft(&ds, &c, path, it % 2 ? "alpaca" : "none", it % 3 == 0, 40) != 0) continue;
        accepted++;
        for (size_t k = 0; k < ds.n_seqs * 40; k++)
            if (ds.seq_inputs[k] < 0 || ds.seq_inputs[k] >= 259 || (ds.seq_targets[k] != IGNORE_INDEX && (ds.seq_targets[k] < 0 || ds.seq_targets[k] >= 259)))
                bad_invariants++;
        dataset_free(&ds);
    }
    EXPECT(bad_invariants == 0, "a mutated SFT file that loads has ids outside the vocabulary");
    printf("hostile SFT files: 400 mutations, %zu still valid, none crashed\n", accepted);

    /* checkpoints: a trainer set up as test_resume's run A, then runA/checkpoint-10 mutated */
    char data[512], ckpt[512], dir[512], flags[1024];
    tmp_path(data, "resume.tok");
    snprintf(ckpt, sizeof ckpt, "%s/runA/checkpoint-10", g_tmp);
    tmp_path(dir, "fuzz-ckpt");
    snprintf(flags, sizeof flags, "05_train --init random --shape tiny --ctx 64 --batch 2 --grad-accum 2 --quiet --data %s --out %s", data, dir);
    Trainer *t = trainer_from_flags(flags);
    const char *files[2] = {"trainer_state.json", "train_state.safetensors"};
    size_t lens[2];
    char *orig[2];
    for (int f = 0; f < 2; f++) {
        char p[1024];
        snprintf(p, sizeof p, "%s/%s", ckpt, files[f]);
        orig[f] = read_file(p, &lens[f]);
        CHECK(orig[f], "%s", last_error());
    }
    make_dir(dir);
    for (int f = 0; f < 2; f++) { /* the adapter files, unmutated: the checkpoint's checksums cover them too */
        const char *adapter_files[2] = {"adapter_config.json", "adapter_model.safetensors"};
        char p[1024], q[1024];
        snprintf(p, sizeof p, "%s/%s", ckpt, adapter_files[f]);
        snprintf(q, sizeof q, "%s/%s", dir, adapter_files[f]);
        size_t len;
        char *buf = read_file(p, &len);
        CHECK(buf && write_file_atomic(q, buf, len) == 0, "%s", last_error());
        free(buf);
    }
    int loads = 0;
    for (int it = 0; it < 301; it++) {
        for (int f = 0; f < 2; f++) {
            char p[1024];
            snprintf(p, sizeof p, "%s/%s", dir, files[f]);
            size_t len = lens[f];
            char *buf = (char *)xmalloc(len + 1);
            memcpy(buf, orig[f], len);
            if (it > 0 && (int)(it % 2) == f) {
                if (f == 1 && rng_below(&r, 2)) { /* aim at the safetensors header */
                    size_t at = (size_t)rng_below(&r, len < 600 ? len : 600);
                    buf[at] = (char)rng_below(&r, 256);
                } else mutate(buf, &len, &r);
            }
            CHECK(write_file_atomic(p, buf, len) == 0, "%s", last_error());
            free(buf);
        }
        int rc = checkpoint_load(t, dir);
        if (it == 0) EXPECT(rc == 0, "the unmutated checkpoint loads: %s", last_error());
        loads += rc == 0;
        EXPECT(rc == 0 || (rc == -1 && strlen(last_error()) > 10), "a refused checkpoint says why");
        EXPECT(t->data.pos <= t->data.n_seqs, "the data position stays in range");
    }
    printf("hostile checkpoints: 300 mutations, %d still loaded, none crashed\n", loads - 1);
    free(orig[0]);
    free(orig[1]);
    trainer_free(t);
    free(t);
}

/* Where the step runs (04_load.c's device_choose, the rule 06_infer follows too), the GPU
 * peaks MFU is measured against, the startup lines of a CPU run, and the adapter's dtype on
 * bf16 and fp16 bases (peft's: modules_to_save in the model's dtype, A and B fp32) with the
 * fp32 masters kept in the checkpoint. */
static void test_device_and_dtype(void) {
    char note[320];
    EXPECT(device_choose(NULL, 0, NULL, NULL, "trains", note, sizeof note) == 0 && strstr(note, "on the CPU (this build has no CUDA"),
           "a build without CUDA trains on the CPU and says why: %s", note);
    EXPECT(device_choose(NULL, 1, NULL, NULL, "trains", note, sizeof note) == 0 && strstr(note, "on the CPU (no CUDA GPU is visible"),
           "no GPU visible: the CPU, and why: %s", note);
    EXPECT(device_choose(NULL, 1, "NVIDIA H200", NULL, "runs", note, sizeof note) == 1 &&
           !strcmp(note, "on the GPU (NVIDIA H200, found one; --device cpu runs on the CPU)"), "a GPU found is the default: %s", note);
    EXPECT(device_choose(NULL, 1, "NVIDIA H200", "the GPU kernels need head_dim 64 or 128", "trains", note, sizeof note) == 0 &&
           strstr(note, "on the CPU (the GPU kernels need head_dim 64 or 128)"), "a model the GPU code cannot run: the CPU, and why: %s", note);
    EXPECT(device_choose("cpu", 1, "NVIDIA H200", NULL, "trains", note, sizeof note) == 0 && !strcmp(note, "on the CPU (--device cpu)"),
           "--device cpu wins: %s", note);
    EXPECT(device_choose("gpu", 1, "NVIDIA A100-SXM4-80GB", NULL, "trains", note, sizeof note) == 1 && strstr(note, "--device gpu"),
           "--device gpu: %s", note);
    EXPECT(device_choose("gpu", 1, "NVIDIA H200", "the GPU kernels need head_dim 64 or 128", "trains", note, sizeof note) == -1 &&
           strstr(last_error(), "--device gpu: the GPU kernels need head_dim 64 or 128; use --device cpu"), "--device gpu that cannot be: %s", last_error());
    EXPECT(device_choose("gpu", 1, NULL, NULL, "trains", note, sizeof note) == -1 && strstr(last_error(), "no CUDA GPU is visible"),
           "--device gpu without a GPU: %s", last_error());
    const struct { const char *name; double tflops; } peaks[] = {
        {"NVIDIA H200", 989}, {"NVIDIA H200 NVL", 835}, {"NVIDIA H100 80GB HBM3", 989}, {"NVIDIA H100 PCIe", 756}, {"NVIDIA H100 NVL", 835},
        {"NVIDIA A100-SXM4-80GB", 312}, {"NVIDIA A100 80GB PCIe", 312}, {"NVIDIA GH200 480GB", 989}, {"NVIDIA GeForce RTX 4090", 0}, {NULL, 0}};
    for (size_t i = 0; i < sizeof peaks / sizeof peaks[0]; i++)
        EXPECT(gpu_peak_tflops(peaks[i].name) == peaks[i].tflops, "peak of %s: %g, not %g", peaks[i].name ? peaks[i].name : "(none)",
               gpu_peak_tflops(peaks[i].name), peaks[i].tflops);

    /* a bf16 and an fp16 base folder (03's export of a random tiny model), each trained 2 steps
     * on the CPU */
    Config c;
    CHECK(config_from_shape("tiny", &c) == 0, "%s", last_error());
    Model m;
    model_init_random(&m, &c, 77, 0.02f);
    int32_t ids[600];
    for (int i = 0; i < 600; i++) ids[i] = (i * 7 + 3) % 256;
    char data[512];
    CHECK(tokfile_write(tmp_path(data, "dtype.tok"), ids, 600, c.vocab_size) == 0, "%s", last_error());
    const DType base_dtypes[2] = {DT_BF16, DT_F16};
    for (int d = 0; d < 2; d++) {
        DType dt = base_dtypes[d];
        const char *dn = dt == DT_BF16 ? "bf16" : "fp16";
        char base[512], out[512], flags[2048], log[512], path[700], name[64];
        snprintf(name, sizeof name, "%s_base", dn);
        CHECK(export_merged(&m, NULL, tmp_path(base, name), 5e9, dt, 0) == 0, "%s", last_error());
        snprintf(name, sizeof name, "%s_run", dn);
        snprintf(flags, sizeof flags, "--model %s --data %s --ctx 64 --max-steps 2 --save-every 1 --out %s", base, data, tmp_path(out, name));
        snprintf(name, sizeof name, "%s.log", dn);
        int rc = run_training(flags, tmp_path(log, name), NULL, 0);
        EXPECT(rc == 0, "training on the %s base exits %d (log %s)", dn, rc, log);
        if (d == 0) {
            char *text = read_file(log, NULL);
            EXPECT(text && strstr(text, "on the CPU (this build has no CUDA"), "the startup line says where the step runs and why (log %s)", log);
            EXPECT(text && strstr(text, "load: fp32 weights on the host in ") && strstr(text, "peak host RSS"),
                   "the startup says how the weights were loaded (log %s)", log);
            EXPECT(text && strstr(text, "MFU: ") && strstr(text, "model FLOPs per step") && strstr(text, "no peak on the CPU"),
                   "the startup gives the FLOPs per step and why MFU is n/a (log %s)", log);
            free(text);
        }
        SafeTensors ad, state;
        snprintf(path, sizeof path, "%s/adapter_model.safetensors", out);
        CHECK(st_open(&ad, path) == 0, "%s", last_error());
        snprintf(path, sizeof path, "%s/checkpoint-2/train_state.safetensors", out);
        CHECK(st_open(&state, path) == 0, "%s", last_error());
        const StTensor *embed = st_find(&ad, "base_model.model.model.embed_tokens.weight");
        const StTensor *norm = st_find(&ad, "base_model.model.model.norm.weight");
        const StTensor *lora_a = st_find(&ad, "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight");
        EXPECT(embed && norm && lora_a && embed->dtype == dt && norm->dtype == dt && lora_a->dtype == DT_F32,
               "on a %s base the adapter's embed and norms are %s and LoRA A is F32, as peft writes them", dn, dn);
        const StTensor *master = NULL;
        for (size_t i = 0; i < state.count && !master; i++)
            if (strstr(state.tensors[i].name, "embed_tokens") && !strstr(state.tensors[i].name, "exp_avg")) master = &state.tensors[i];
        EXPECT(master && master->dtype == DT_F32, "the checkpoint keeps the embedding's fp32 master (%s base)", dn);
        if (embed && master && master->dtype == DT_F32 && embed->dtype == dt && master->numel == embed->numel) {
            size_t bad = 0;
            for (size_t i = 0; i < master->numel; i++) {
                float f;
                uint16_t h;
                memcpy(&f, master->data + 4 * i, 4);
                memcpy(&h, embed->data + 2 * i, 2);
                bad += (dt == DT_BF16 ? f32_to_bf16(f) : f32_to_f16(f)) != h;
            }
            EXPECT(bad == 0, "the adapter's %s embedding is the final fp32 master rounded (%zu values differ)", dn, bad);
        }
        st_close(&ad);
        st_close(&state);
    }
    model_free(&m);
}

int main(int argc, char **argv) {
    g_self = argv[0];
    if (argc > 1 && !strcmp(argv[1], "--train")) return train_main(argc - 1, argv + 1);
    snprintf(g_tmp, sizeof g_tmp, "%s/test_train_XXXXXX", file_exists("build") ? "build" : ".");
    if (!mkdtemp(g_tmp)) die("cannot create a scratch folder %s: %s", g_tmp, strerror(errno));
    double t0 = now_seconds();
    test_flags();
    test_packing();
    test_sft();
    test_sft_masking();
    test_resume();
    test_trained_parts();
    test_hostile();
    test_device_and_dtype();
    if (g_failures == 0) remove_tree(g_tmp);
    else printf("scratch files kept in %s\n", g_tmp);
    printf("test_train: %d checks, %d failed (%.1f s)\n", g_checks, g_failures, now_seconds() - t0);
    return g_failures ? 1 : 0;
}
