/* 05_train.c: the LongLoRA fine-tuning loop.
 *
 * Teaches: how a fine-tuning run is put together around the model of 02 and the LoRA+,
 * S2-Attn and AdamW of 03: command-line flags a user of llm.c or HF would guess, data
 * (documents joined with EOS and packed into N-token sequences, or instruction records
 * with the prompt masked out of the loss), a seeded shuffle, gradient accumulation and
 * clipping, warmup-then-constant learning rate, a progress line with tokens/s, MFU, peak
 * memory and ETA, a CSV log, and checkpoints that resume exactly: the adapter in PEFT's
 * format, the fp32 trainable weights with their AdamW moments, the data position and the
 * RNG state, written under a temporary name and renamed into place.
 * Runs on: the GPU where the build has CUDA and the machine a GPU (05_train_gpu.c: bf16
 * weights, 04's kernels, activation checkpointing; --device cpu|gpu chooses, the startup
 * line says which and why), else the CPU, with the fp32 code of 02 and 03. The CPU trains
 * tiny models end to end on a laptop or in CI; a real model there is correct but slow
 * (SmolLM2-135M: about 15 tokens/s on 2 busy cores). train_step() dispatches; the CPU step
 * is the reference the GPU step is checked against (tests/test_gpu_train.c).
 * Several processes: --world-size K with --rank and --dist-file (or mpirun's environment)
 * train data-parallel (05_dist.c): the same losses and adapter as one process with K times
 * the gradient accumulation; CPU ranks share a file, GPU ranks talk through NCCL.
 * Checked by: tests/test_train.c (flags, data, SFT masking, exact resume, SIGINT, non-finite
 * loss), tests/test_train_e2e.c (a tiny model learns; its adapter reloads and helps on
 * held-out text), tests/test_train_text.sh (text and SFT through a real tokenizer),
 * tests/test_dist_train.sh and tests/test_dist.c (several processes, 05_dist.c).
 *
 * CLI (see --help):
 *   05_train --model DIR --data a.txt b.jsonl c.tok --ctx 8192 --out OUT [--max-steps S] ...
 *   05_train --model DIR --sft LongAlpaca-12k.json --template llama2-chat --ctx 8192 --out OUT
 *   05_train --init random --shape tiny --data text.tok --ctx 128 --out OUT     (CI-sized)
 *   05_train ... --resume OUT     continues from OUT's newest checkpoint-<step>
 *
 * Shape legend: B batch, N sequence (--ctx), D model width, H heads, Hk kv heads,
 * d head dim, F ffn width, V vocab, L layers, G S2 group, R LoRA rank.
 */
#ifndef STAGE
#define STAGE 5
#endif
#include "03_lora.c"
#ifdef USE_NCCL
#include <cuda_runtime.h>
#endif
#include "05_dist.c" /* several processes: the communicator, ZeRO-1's slices, the memory plan */

#include <dirent.h>
#include <signal.h>
#include <sys/types.h>

/* =======================================================================================
 * 1. Flags
 * ===================================================================================== */

#define TRAIN_MAX_DATA_FILES 64

typedef struct {
    /* what to train */
    const char *model_dir;          /* --model DIR: a HuggingFace folder */
    const char *init;               /* --init random (instead of --model) */
    const char *shape;              /* --shape NAME, with --init random */
    const char *tokenizer_path;     /* --tokenizer PATH (default: the model folder) */
    const char *adapter_dir;        /* --adapter DIR: start from this PEFT adapter (else a fresh one) */
    /* data */
    const char *data_files[TRAIN_MAX_DATA_FILES]; /* --data FILE...: text, .jsonl or token files */
    int n_data_files;
    const char *sft_file;           /* --sft FILE.json: instruction records */
    const char *template_name;      /* --template llama2-chat|alpaca|none */
    const char *save_tokens;        /* --save-tokens FILE: write the joined --data stream as a token file */
    int sft_pack;                   /* --pack: several SFT examples per sequence */
    /* shapes */
    int ctx;                        /* --ctx N: training sequence length (and PI target) */
    int batch;                      /* --batch B */
    int grad_accum;                 /* --grad-accum: micro-batches per optimizer step */
    int s2;                         /* --s2 / --no-s2 */
    double group_ratio;             /* --group-ratio: G = N * ratio */
    int group;                      /* G, derived (0 = full attention) */
    /* LoRA */
    int lora_rank;                  /* --lora-rank R */
    double lora_alpha;              /* --lora-alpha */
    /* optimiser */
    int max_steps;                  /* --max-steps */
    double lr;                      /* --lr */
    double beta1, beta2;            /* --betas B1,B2 */
    double eps;                     /* --eps */
    double weight_decay;            /* --weight-decay */
    int warmup;                     /* --warmup: linear warmup steps, then constant */
    double clip;                    /* --clip: max global grad norm (0 = off) */
    uint64_t seed;                  /* --seed */
    /* output */
    const char *out_dir;            /* --out DIR */
    const char *resume_dir;         /* --resume DIR: a checkpoint folder, or an --out folder */
    int save_every;                 /* --save-every K (0: only at the end) */
    int save_total_limit;           /* --save-total-limit K: keep the newest K checkpoints (0: all) */
    int log_every;                  /* --log-every K: progress lines */
    double peak_tflops;             /* --peak-tflops: the device's peak, for MFU (0: n/a on CPU) */
    int quiet;                      /* --quiet: no progress lines (the CSV is still written) */
    const char *device;             /* --device cpu|gpu (NULL: the GPU where this build has one, else the CPU) */
    /* several processes (05_dist.c) */
    int rank, world_size;           /* --rank R --world-size K (0: from mpirun's environment, else 1) */
    const char *dist_file;          /* --dist-file PATH: where the ranks meet (rank 0 creates it) */
    int shard_weights;              /* --shard-weights: ZeRO-3 for the frozen bf16 weights */
} TrainOptions;

static void train_defaults(TrainOptions *o) {
    memset(o, 0, sizeof *o);
    o->template_name = "llama2-chat";
    o->ctx = 0; /* 0: the model's own context length */
    o->batch = 1;
    o->grad_accum = 1;
    o->s2 = 1;
    o->group_ratio = 0.25;
    o->lora_rank = 8;
    o->lora_alpha = 16;
    o->max_steps = 1000;
    o->lr = 2e-5;
    o->beta1 = 0.9;
    o->beta2 = 0.95;
    o->eps = 1e-8;
    o->weight_decay = 0.0;
    o->warmup = 20;
    o->clip = 0.0;
    o->seed = 42;
    o->out_dir = "out";
    o->save_every = 0;
    o->log_every = 1;
}

static void train_usage(FILE *f) {
    fprintf(f,
        "usage: 05_train (--model DIR | --init random --shape NAME) (--data FILE... | --sft FILE.json) [flags]\n"
        "\n"
        "LongLoRA fine-tuning: LoRA on q,k,v,o plus trainable embeddings and norms, S2-Attn,\n"
        "RoPE position interpolation to --ctx. Runs on the GPU (bf16, checkpointed) where there is\n"
        "one, else on the CPU (tiny models).\n"
        "\n"
        "model:\n"
        "  --model DIR            HuggingFace folder (config.json, *.safetensors, tokenizer)\n"
        "  --init random          random weights instead, with --shape\n"
        "  --shape NAME           llama2-7b | llama2-13b | llama2-70b | smollm2-135m | tiny (tests: V from\n"
        "                         --tokenizer, else 256)\n"
        "  --tokenizer PATH       tokenizer.model / tokenizer.json or a folder (default: --model)\n"
        "  --adapter DIR          start from this PEFT adapter (its rank, alpha, targets) instead of a fresh one\n"
        "data:\n"
        "  --data FILE...         text files (one document each), .jsonl ({\"text\": ...} per line)\n"
        "                         or token files; documents are joined with EOS and packed\n"
        "  --sft FILE.json        instruction records {instruction, input?, output} (JSON array or\n"
        "                         JSONL); the loss is on the output tokens only\n"
        "  --template NAME        llama2-chat | alpaca | none (default llama2-chat)\n"
        "  --pack                 SFT: pack several examples per sequence (default: pad)\n"
        "  --save-tokens FILE     also write the joined --data tokens as a token file (reuse it as --data)\n"
        "shapes:\n"
        "  --ctx N                sequence length N = the extended context (default: the model's)\n"
        "  --batch B              sequences per micro-batch (default 1)\n"
        "  --grad-accum K         micro-batches per optimizer step (default 1)\n"
        "  --s2 / --no-s2         S2-Attn (default on) or full causal attention\n"
        "  --group-ratio R        S2-Attn group G = N * R, N %% G == 0 (default 0.25)\n"
        "  --lora-rank R          LoRA rank (default 8)\n"
        "  --lora-alpha A         LoRA alpha (default 16)\n"
        "optimizer (AdamW, linear warmup then constant):\n"
        "  --max-steps S          optimizer steps (default 1000)\n"
        "  --lr LR                peak learning rate (default 2e-5)\n"
        "  --betas B1,B2          (default 0.9,0.95)\n"
        "  --eps E                (default 1e-8)\n"
        "  --weight-decay W       (default 0)\n"
        "  --warmup W             warmup steps (default 20)\n"
        "  --clip C               clip the global gradient norm to C (default 0 = off)\n"
        "  --seed S               data shuffle and LoRA init (default 42)\n"
        "output:\n"
        "  --out DIR              adapter, checkpoints and train_log.csv (default out)\n"
        "  --save-every K         checkpoint every K steps (default 0: at the end only)\n"
        "  --save-total-limit K   keep only the newest K checkpoints (default 0: keep all)\n"
        "  --resume DIR           continue from a checkpoint folder (or the newest in an --out folder)\n"
        "  --log-every K          a progress line every K steps (default 1)\n"
        "  --peak-tflops T        the device's peak TFLOP/s, for MFU (default: n/a on the CPU)\n"
        "  --quiet                no progress lines\n"
        "  --device cpu|gpu       where the step runs (default: the GPU when this build and machine have one)\n"
        "several processes (data parallel; one per GPU):\n"
        "  --world-size K         K ranks (mpirun -np K sets it and --rank from its environment)\n"
        "  --rank R               this process's rank, 0..K-1\n"
        "  --dist-file PATH       a path every rank sees, not existing yet: rank 0 creates it\n"
        "                         (CPU: the shared segment; GPU: NCCL's unique id) and removes it\n"
        "  --shard-weights        shard the frozen bf16 weights over the GPU ranks (ZeRO-3: each layer is\n"
        "                         all-gathered before it runs); prints the per-GPU memory plan\n"
        "  --help                 this text\n"
        "Flags may be spelled with _ for -, and HF Trainer names work too (--learning_rate,\n"
        "--per_device_train_batch_size, --gradient_accumulation_steps, --warmup_steps,\n"
        "--max_grad_norm, --output_dir, --model_name_or_path, --model_max_length, --save_steps).\n");
}

/* Strict number parsing: the whole string must be a finite number. */
static int parse_double_arg(const char *flag, const char *s, double *out) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (end == s || *end != 0 || errno != 0 || !isfinite(v)) return set_error("%s expects a number, got '%s'", flag, s);
    *out = v;
    return 0;
}
static int parse_int_arg(const char *flag, const char *s, long lo, long hi, int *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (end == s || *end != 0 || errno != 0) return set_error("%s expects an integer, got '%s'", flag, s);
    if (v < lo || v > hi) return set_error("%s must be between %ld and %ld, got %ld", flag, lo, hi, v);
    *out = (int)v;
    return 0;
}

/* HF Trainer spellings a user may reach for, and the flag each means here. */
static const char *const FLAG_ALIASES[][2] = {
    {"--model-name-or-path", "--model"}, {"--output-dir", "--out"}, {"--learning-rate", "--lr"},
    {"--model-max-length", "--ctx"}, {"--per-device-train-batch-size", "--batch"},
    {"--gradient-accumulation-steps", "--grad-accum"}, {"--warmup-steps", "--warmup"}, {"--max-grad-norm", "--clip"},
    {"--save-steps", "--save-every"}, {"--logging-steps", "--log-every"}, {"--adam-epsilon", "--eps"},
    {"--resume-from-checkpoint", "--resume"}, {"--data-path", "--data"}, {"--lora-r", "--lora-rank"},
};

/* "--learning_rate" and "--learning-rate" both become "--lr" (in buf); other flags stay. */
static const char *canonical_flag(const char *arg, char *buf, size_t cap) {
    if (strncmp(arg, "--", 2) != 0 || strlen(arg) >= cap) return arg;
    snprintf(buf, cap, "%s", arg);
    for (char *c = buf + 2; *c; c++) if (*c == '_') *c = '-';
    for (size_t k = 0; k < sizeof FLAG_ALIASES / sizeof *FLAG_ALIASES; k++)
        if (!strcmp(buf, FLAG_ALIASES[k][0])) return FLAG_ALIASES[k][1];
    return buf;
}

/* Parses argv into o (which holds the defaults). -1 + last_error() on a bad flag; returns 1
 * when --help was asked for. Does not check cross-flag rules: train_validate does. */
static int train_parse_args(TrainOptions *o, int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        char flag[64];
        const char *a = canonical_flag(argv[i], flag, sizeof flag);
        /* flags without a value */
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) return 1;
        if (!strcmp(a, "--s2")) { o->s2 = 1; continue; }
        if (!strcmp(a, "--no-s2")) { o->s2 = 0; continue; }
        if (!strcmp(a, "--pack")) { o->sft_pack = 1; continue; }
        if (!strcmp(a, "--quiet")) { o->quiet = 1; continue; }
        if (!strcmp(a, "--shard-weights")) { o->shard_weights = 1; continue; }
        if (strncmp(a, "--", 2) != 0) return set_error("unexpected argument '%s' (flags start with --; see --help)", a);
        if (i + 1 >= argc) return set_error("%s needs a value", a);
        const char *v = argv[++i];
        double x;
        if (!strcmp(a, "--data")) {
            /* --data takes every following argument up to the next flag */
            i--;
            while (i + 1 < argc && strncmp(argv[i + 1], "--", 2) != 0) {
                if (o->n_data_files == TRAIN_MAX_DATA_FILES) return set_error("--data takes at most %d files", TRAIN_MAX_DATA_FILES);
                o->data_files[o->n_data_files++] = argv[++i];
            }
        }
        else if (!strcmp(a, "--model")) o->model_dir = v;
        else if (!strcmp(a, "--init")) {
            if (strcmp(v, "random") != 0) return set_error("--init only knows 'random', got '%s'", v);
            o->init = v;
        }
        else if (!strcmp(a, "--shape")) o->shape = v;
        else if (!strcmp(a, "--tokenizer")) o->tokenizer_path = v;
        else if (!strcmp(a, "--adapter")) o->adapter_dir = v;
        else if (!strcmp(a, "--device")) {
            if (strcmp(v, "cpu") != 0 && strcmp(v, "gpu") != 0) return set_error("--device must be cpu or gpu, got '%s'", v);
#ifndef USE_CUDA
            if (!strcmp(v, "gpu")) return set_error("--device gpu: this build has no CUDA (build with nvcc and cuBLAS present); use --device cpu");
#endif
            o->device = v;
        }
        else if (!strcmp(a, "--sft")) o->sft_file = v;
        else if (!strcmp(a, "--save-tokens")) o->save_tokens = v;
        else if (!strcmp(a, "--template")) {
            if (strcmp(v, "llama2-chat") && strcmp(v, "alpaca") && strcmp(v, "none"))
                return set_error("--template must be llama2-chat, alpaca or none, got '%s'", v);
            o->template_name = v;
        }
        else if (!strcmp(a, "--ctx")) { if (parse_int_arg(a, v, 2, 1 << 24, &o->ctx)) return -1; }
        else if (!strcmp(a, "--batch")) { if (parse_int_arg(a, v, 1, 1 << 16, &o->batch)) return -1; }
        else if (!strcmp(a, "--grad-accum")) { if (parse_int_arg(a, v, 1, 1 << 20, &o->grad_accum)) return -1; }
        else if (!strcmp(a, "--group-ratio")) {
            if (parse_double_arg(a, v, &x)) return -1;
            if (!(x > 0 && x <= 1)) return set_error("--group-ratio must be in (0, 1], got %s", v);
            o->group_ratio = x;
        }
        else if (!strcmp(a, "--lora-rank")) { if (parse_int_arg(a, v, 1, 65536, &o->lora_rank)) return -1; }
        else if (!strcmp(a, "--lora-alpha")) {
            if (parse_double_arg(a, v, &x)) return -1;
            if (!(x > 0)) return set_error("--lora-alpha must be positive, got %s", v);
            o->lora_alpha = x;
        }
        else if (!strcmp(a, "--max-steps")) { if (parse_int_arg(a, v, 1, INT32_MAX, &o->max_steps)) return -1; }
        else if (!strcmp(a, "--lr")) {
            if (parse_double_arg(a, v, &x)) return -1;
            if (!(x > 0)) return set_error("--lr must be positive, got %s", v);
            o->lr = x;
        }
        else if (!strcmp(a, "--betas")) {
            char b1[64], b2[64];
            const char *comma = strchr(v, ',');
            if (!comma || (size_t)(comma - v) >= sizeof b1 || strlen(comma + 1) >= sizeof b2)
                return set_error("--betas expects two numbers like 0.9,0.95, got '%s'", v);
            memcpy(b1, v, (size_t)(comma - v));
            b1[comma - v] = 0;
            snprintf(b2, sizeof b2, "%s", comma + 1);
            if (parse_double_arg(a, b1, &o->beta1) || parse_double_arg(a, b2, &o->beta2)) return -1;
            if (!(o->beta1 >= 0 && o->beta1 < 1 && o->beta2 >= 0 && o->beta2 < 1))
                return set_error("--betas must both lie in [0, 1), got '%s'", v);
        }
        else if (!strcmp(a, "--eps")) {
            if (parse_double_arg(a, v, &x)) return -1;
            if (!(x > 0)) return set_error("--eps must be positive, got %s", v);
            o->eps = x;
        }
        else if (!strcmp(a, "--weight-decay")) {
            if (parse_double_arg(a, v, &x)) return -1;
            if (!(x >= 0)) return set_error("--weight-decay must not be negative, got %s", v);
            o->weight_decay = x;
        }
        else if (!strcmp(a, "--warmup")) { if (parse_int_arg(a, v, 0, INT32_MAX, &o->warmup)) return -1; }
        else if (!strcmp(a, "--clip")) {
            if (parse_double_arg(a, v, &x)) return -1;
            if (!(x >= 0)) return set_error("--clip must not be negative (0 turns clipping off), got %s", v);
            o->clip = x;
        }
        else if (!strcmp(a, "--seed")) {
            char *end;
            errno = 0;
            unsigned long long s = strtoull(v, &end, 10);
            if (end == v || *end != 0 || errno != 0 || v[0] == '-') return set_error("--seed expects a non-negative integer, got '%s'", v);
            o->seed = (uint64_t)s;
        }
        else if (!strcmp(a, "--out")) o->out_dir = v;
        else if (!strcmp(a, "--rank")) { if (parse_int_arg(a, v, 0, DIST_MAX_RANKS - 1, &o->rank)) return -1; }
        else if (!strcmp(a, "--world-size")) { if (parse_int_arg(a, v, 1, DIST_MAX_RANKS, &o->world_size)) return -1; }
        else if (!strcmp(a, "--dist-file")) o->dist_file = v;
        else if (!strcmp(a, "--resume")) o->resume_dir = v;
        else if (!strcmp(a, "--save-every")) { if (parse_int_arg(a, v, 0, INT32_MAX, &o->save_every)) return -1; }
        else if (!strcmp(a, "--save-total-limit")) { if (parse_int_arg(a, v, 0, INT32_MAX, &o->save_total_limit)) return -1; }
        else if (!strcmp(a, "--log-every")) { if (parse_int_arg(a, v, 1, INT32_MAX, &o->log_every)) return -1; }
        else if (!strcmp(a, "--peak-tflops")) {
            if (parse_double_arg(a, v, &x)) return -1;
            if (!(x > 0)) return set_error("--peak-tflops must be positive, got %s", v);
            o->peak_tflops = x;
        }
        else return set_error("unknown flag %s (see --help)", a);
    }
    return 0;
}

/* S2-Attn's group size for N: G = N * ratio, which must be a whole number dividing N. */
static int s2_group_size(int ctx, double ratio, int *group) {
    double g = (double)ctx * ratio;
    int gi = (int)floor(g + 0.5);
    if (fabs(g - gi) > 1e-9 || gi < 1 || ctx % gi != 0)
        return set_error("S2-Attn needs the group size G = N * ratio to divide N: --ctx %d with --group-ratio %g gives G = %g "
                         "(pick --ctx as a multiple of %g, or another --group-ratio)", ctx, ratio, g, ratio > 0 ? 1.0 / ratio : 1.0);
    *group = gi;
    return 0;
}

/* Rules between flags, checked once the model's context length is known (ctx 0 = use it). */
static int train_validate(TrainOptions *o) {
    if (!o->model_dir && !o->init) return set_error("say which model to train: --model DIR, or --init random --shape NAME");
    if (o->model_dir && o->init) return set_error("--model and --init random exclude each other");
    if (o->init && !o->shape) return set_error("--init random needs --shape (llama2-7b, llama2-13b, smollm2-135m or tiny)");
    if (o->shape && !o->init) return set_error("--shape only applies with --init random");
    if (!o->n_data_files && !o->sft_file) return set_error("say what to train on: --data FILE... or --sft FILE.json");
    if (o->n_data_files && o->sft_file) return set_error("--data and --sft exclude each other; run them as two trainings");
    if (o->sft_pack && !o->sft_file) return set_error("--pack applies to --sft data (--data is always packed)");
    if (o->save_tokens && !o->n_data_files) return set_error("--save-tokens applies to --data (the joined token stream)");
    if (o->ctx < 2) return set_error("--ctx must be at least 2, got %d", o->ctx);
    o->group = 0;
    if (o->s2 && s2_group_size(o->ctx, o->group_ratio, &o->group) != 0) return -1;
    if (o->save_every > o->max_steps) o->save_every = 0;
    return 0;
}

/* Learning rate at 1-based step: linear warmup over `warmup` steps, then constant. */
static double lr_at_step(const TrainOptions *o, int step) {
    if (o->warmup > 0 && step <= o->warmup) return o->lr * (double)step / (double)o->warmup;
    return o->lr;
}

/* =======================================================================================
 * 2. Data
 *
 * Both kinds of data end as a Dataset: n_seqs sequences of N inputs and N targets, read in
 * an order that is a seeded shuffle, reshuffled each epoch. Pre-training style data is one
 * token stream (documents joined with EOS); sequence k is stream[kN, kN+N) with targets
 * stream[kN+1, kN+N+1). SFT data is built into whole sequences up front, with target -100
 * wherever the loss must not look (the prompt, the padding).
 * ===================================================================================== */

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
    if (!ids) { char why[1024]; snprintf(why, sizeof why, "%s", last_error()); return set_error("%s: %s", path, why); }
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
                if (!j) { char why[1024]; snprintf(why, sizeof why, "%s", last_error()); rc = set_error("%s line %zu: %s", path, line_no, why); break; }
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

/* The prompt text of one record under a template. Alpaca's wording is the Stanford Alpaca
 * prompt; llama2-chat is LLaMA-2-chat's [INST] ... [/INST] turn (no system prompt);
 * none is the instruction (and input) as they are. Returns malloc'd text. */
static char *sft_prompt(const char *template_name, const char *instruction, const char *input) {
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

/* One example: prompt tokens (with BOS) then output tokens then EOS; the loss looks at the
 * output and the EOS only. */
typedef struct {
    int32_t *ids;               /* [len] */
    size_t len;
    size_t n_prompt;            /* ids[0..n_prompt) are the prompt */
} SftExample;

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
    char *prompt = sft_prompt(template_name, instruction->string, (input && input->type == JSON_STRING) ? input->string : NULL);
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
        if (!whole) { char why[1024]; snprintf(why, sizeof why, "%s", last_error()); free(raw); return set_error("%s: %s", path, why); }
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
                    char why[1024]; snprintf(why, sizeof why, "%s", last_error());
                    for (size_t i = 0; i < n_rec; i++) json_free(lines[i]);
                    free(lines); free(raw);
                    return set_error("%s line %zu: %s (expected a JSON array of records or one record per line)", path, line_no, why);
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
        rc = sft_example_from_record(&ex[i], c, template_name, whole ? &whole->items[i] : lines[i], path, i);
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

/* =======================================================================================
 * 3. The trainer: model, adapter, optimizer, data, and where the step runs
 * ===================================================================================== */

typedef struct {
    TrainOptions opt;
    Model model;                /* fp32 base weights (frozen) and the LoRA+ embed/norms (trained) */
    Grads grads;                /* gradients of embed and the norms (03's lora_grads_alloc) */
    Activations acts;           /* for one micro-batch of [B, N] */
    LoraAdapter lora;           /* A, B of q,k,v,o (and their gradients) */
    AdamW adamw;                /* fp32 master weights are the tensors themselves; m, v here */
    Dataset data;
    Tokenizer tokenizer;        /* stage 01's, when there is one */
    TextCodec codec;            /* what the data code calls */
    int32_t *inputs;            /* [B, N] */
    int32_t *targets;           /* [B, N] */
    int step;                   /* optimizer steps completed */
    char last_checkpoint[4200]; /* "" until one is written */
    /* progress */
    double flops_per_token;     /* model FLOPs: 6 * params + attention, per trained token */
    size_t n_params, n_trainable;
    FILE *csv;                  /* OUT/train_log.csv */
    struct GpuTrainer *gpu;     /* the GPU step's state (05_train_gpu.c), or NULL: the step runs on the CPU */
    const char *device_note;    /* where the step runs and why, for the startup line */
    float *dist_flat;           /* [P + 1] several ranks: the flat gradients (+ the loss sum) they add up */
} Trainer;

/* ---- model FLOPs (for MFU) ------------------------------------------------------------ */

static size_t config_param_count(const Config *c) {
    size_t D = (size_t)c->dim, F = (size_t)c->ffn_dim, V = (size_t)c->vocab_size;
    size_t Hd = (size_t)c->n_heads * c->head_dim, Hkd = (size_t)c->n_kv_heads * c->head_dim;
    size_t per_layer = D * Hd + 2 * D * Hkd + Hd * D + 3 * D * F + 2 * D;
    return V * D * (c->tie_embeddings ? 1 : 2) + (size_t)c->n_layers * per_layer + D;
}

/* FLOPs per token of one training step: 6 per parameter (forward 2, backward 4) plus the
 * attention matmuls (QK^T and PV: 4 H d per visible key forward, twice that backward),
 * counting only the keys a query really sees under S2-Attn's causal groups. */
static double train_flops_per_token(const Config *c, int N, int G) {
    double visible = 0; /* keys per query, averaged over positions and heads */
    for (int h = 0; h < c->n_heads; h++)
        for (size_t i = 0; i < (size_t)N; i++) visible += (double)(i - s2_first_key(i, h, c->n_heads, (size_t)G) + 1);
    visible /= (double)N * c->n_heads;
    double attn = 12.0 * c->n_layers * (double)c->n_heads * c->head_dim * visible;
    return 6.0 * (double)config_param_count(c) + attn;
}

/* Peak resident memory of this process in GiB (Linux), or -1. */
static double peak_memory_gib(void) {
    FILE *f = fopen("/proc/self/status", "r");
    if (!f) return -1;
    char line[256];
    double kib = -1;
    while (fgets(line, sizeof line, f))
        if (strncmp(line, "VmHWM:", 6) == 0) { kib = strtod(line + 6, NULL); break; }
    fclose(f);
    return kib < 0 ? -1 : kib / (1024.0 * 1024.0);
}

static void format_duration(char *buf, size_t cap, double s) {
    if (!(s >= 0) || s > 1e8) { snprintf(buf, cap, "?"); return; }
    long t = (long)(s + 0.5);
    if (t >= 3600) snprintf(buf, cap, "%ldh%02ldm", t / 3600, (t / 60) % 60);
    else if (t >= 60) snprintf(buf, cap, "%ldm%02lds", t / 60, t % 60);
    else snprintf(buf, cap, "%lds", t);
}

/* ---- the step ------------------------------------------------------------------------- */

static void trainer_zero_grads(Trainer *t) {
    grads_zero(&t->grads);
    lora_zero_grads(&t->lora);
}

/* Global L2 norm of every trainable gradient. */
static double trainer_grad_norm(const Trainer *t) {
    double sum = 0;
    for (size_t k = 0; k < t->adamw.count; k++) {
        const TrainParam *p = &t->adamw.params[k];
        double s = 0;
#pragma omp parallel for reduction(+ : s) schedule(static)
        for (size_t i = 0; i < p->numel; i++) s += (double)p->grad[i] * p->grad[i];
        sum += s;
    }
    return sqrt(sum);
}

static void trainer_scale_grads(Trainer *t, float s) {
    for (size_t k = 0; k < t->adamw.count; k++) {
        TrainParam *p = &t->adamw.params[k];
        for (size_t i = 0; i < p->numel; i++) p->grad[i] *= s;
    }
}

/* =======================================================================================
 * 4. Checkpoints
 *
 * OUT/checkpoint-<step>/ holds
 *   adapter_config.json, adapter_model.safetensors   the PEFT adapter (03's writer), loadable by peft
 *   train_state.safetensors   every trainable tensor in fp32 (its master copy) with its AdamW
 *                             moments "<name>.exp_avg", "<name>.exp_avg_sq", and the data
 *                             order of the current epoch "data.order" [n_seqs]
 *   trainer_state.json        step, AdamW step count, data epoch and position, the RNG
 *                             states, and the settings that must not change on resume
 * The folder is written as OUT/.checkpoint-<step>.tmp.<pid> and renamed into place, so a
 * crash mid-save never leaves a half checkpoint under the real name.
 * ===================================================================================== */

#define TRAINER_STATE_FORMAT "longlora-c trainer state"
#define TRAINER_STATE_VERSION 1

/* Removes a folder of plain files (what a checkpoint holds). */
static int remove_flat_dir(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return errno == ENOENT ? 0 : set_error("cannot open the folder %s: %s", dir, strerror(errno));
    struct dirent *e;
    char path[4096];
    int rc = 0;
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        if (remove(path_join(path, sizeof path, dir, e->d_name)) != 0) rc = set_error("cannot remove %s: %s", path, strerror(errno));
    }
    closedir(d);
    if (rc == 0 && rmdir(dir) != 0) rc = set_error("cannot remove the folder %s: %s", dir, strerror(errno));
    return rc;
}

static void rng_to_hex(const Rng *r, char out[4][17]) {
    for (int i = 0; i < 4; i++) snprintf(out[i], 17, "%016llx", (unsigned long long)r->s[i]);
}
static int rng_from_json(Rng *r, const Json *arr, const char *path, const char *what) {
    if (!arr || arr->type != JSON_ARRAY || arr->count != 4) return set_error("%s: \"%s\" must be a list of 4 hex strings", path, what);
    for (int i = 0; i < 4; i++) {
        const Json *s = &arr->items[i];
        char *end;
        if (s->type != JSON_STRING || s->len != 16) return set_error("%s: \"%s\" must be a list of 4 hex strings", path, what);
        errno = 0;
        r->s[i] = (uint64_t)strtoull(s->string, &end, 16);
        if (*end != 0 || errno) return set_error("%s: \"%s\" must be a list of 4 hex strings", path, what);
    }
    if (!(r->s[0] | r->s[1] | r->s[2] | r->s[3])) return set_error("%s: \"%s\" is all zero", path, what);
    return 0;
}

static int write_trainer_state_json(const Trainer *t, const char *path, double last_loss) {
    AtomicFile af;
    if (atomic_open(&af, path) != 0) return -1;
    FILE *f = af.f;
    const TrainOptions *o = &t->opt;
    char data_rng[4][17], drop_rng[4][17];
    rng_to_hex(&t->data.rng, data_rng);
    rng_to_hex(&t->lora.drop_rng, drop_rng);
    fprintf(f, "{\n  \"format\": \"%s\",\n  \"version\": %d,\n", TRAINER_STATE_FORMAT, TRAINER_STATE_VERSION);
    fprintf(f, "  \"step\": %d,\n  \"adamw_steps\": %ld,\n  \"last_loss\": %.9g,\n", t->step, t->adamw.steps_taken, last_loss);
    fprintf(f, "  \"data\": {\"kind\": \"%s\", \"epoch\": %llu, \"position\": %zu, \"sequences\": %zu, \"fingerprint\": \"%016llx\"},\n",
            t->data.stream ? "packed" : "sft", (unsigned long long)t->data.epoch, t->data.pos, t->data.n_seqs,
            (unsigned long long)t->data.fingerprint);
    fprintf(f, "  \"data_rng\": [\"%s\", \"%s\", \"%s\", \"%s\"],\n", data_rng[0], data_rng[1], data_rng[2], data_rng[3]);
    fprintf(f, "  \"dropout_rng\": [\"%s\", \"%s\", \"%s\", \"%s\"],\n", drop_rng[0], drop_rng[1], drop_rng[2], drop_rng[3]);
    /* grad_accum is the global one (ranks x --grad-accum): the files do not depend on the world size */
    fprintf(f, "  \"world_size\": %d,\n", comm_world());
    fprintf(f, "  \"settings\": {\"ctx\": %d, \"group\": %d, \"batch\": %d, \"grad_accum\": %d, \"lora_rank\": %d, "
               "\"lora_alpha\": %.17g, \"seed\": \"%llu\", \"lr\": %.9g, \"warmup\": %d, \"max_steps\": %d}\n}\n",
            o->ctx, o->group, o->batch, o->grad_accum * comm_world(), o->lora_rank, o->lora_alpha, (unsigned long long)o->seed, o->lr, o->warmup,
            o->max_steps);
    return atomic_commit(&af);
}

/* Writes OUT/checkpoint-<step>. -1 + last_error() on failure (the previous checkpoint stays). */
static int checkpoint_save(Trainer *t, double last_loss) {
    const TrainOptions *o = &t->opt;
    char final_dir[4200], tmp_dir[4200], old_dir[4200], path[4400], name[64];
    if (make_dir(o->out_dir) != 0) return -1;
    snprintf(name, sizeof name, "checkpoint-%d", t->step);
    path_join(final_dir, sizeof final_dir, o->out_dir, name);
    snprintf(name, sizeof name, ".checkpoint-%d.tmp.%d", t->step, (int)getpid());
    path_join(tmp_dir, sizeof tmp_dir, o->out_dir, name);
    remove_flat_dir(tmp_dir);
    if (make_dir(tmp_dir) != 0) return -1;
    int rc = lora_save_adapter(&t->lora, &t->model, tmp_dir, o->model_dir);
    if (rc == 0) {
        /* fp32 trainable tensors, their moments, and the epoch's data order */
        StWriter sw = {0};
        size_t n = t->adamw.count;
        char (*names)[200] = (char (*)[200])xmalloc((3 * n + 1) * sizeof *names); /* [3n] param, m, v names */
        int64_t *order = (int64_t *)xmalloc(t->data.n_seqs * sizeof(int64_t)); /* [n_seqs] */
        for (size_t i = 0; i < t->data.n_seqs; i++) order[i] = t->data.order[i];
        for (size_t k = 0; k < n; k++) {
            const TrainParam *p = &t->adamw.params[k];
            int64_t shape[1] = {(int64_t)p->numel};
            snprintf(names[3 * k], sizeof names[0], "%s", p->name);
            snprintf(names[3 * k + 1], sizeof names[0], "%s.exp_avg", p->name);
            snprintf(names[3 * k + 2], sizeof names[0], "%s.exp_avg_sq", p->name);
            st_writer_add(&sw, names[3 * k], DT_F32, 1, shape, p->param);
            st_writer_add(&sw, names[3 * k + 1], DT_F32, 1, shape, p->m);
            st_writer_add(&sw, names[3 * k + 2], DT_F32, 1, shape, p->v);
        }
        int64_t oshape[1] = {(int64_t)t->data.n_seqs};
        st_writer_add(&sw, "data.order", DT_I64, 1, oshape, order);
        rc = st_write(&sw, path_join(path, sizeof path, tmp_dir, "train_state.safetensors"));
        st_writer_free(&sw);
        free(names);
        free(order);
    }
    if (rc == 0) rc = write_trainer_state_json(t, path_join(path, sizeof path, tmp_dir, "trainer_state.json"), last_loss);
    if (rc != 0) {
        char why[1024];
        snprintf(why, sizeof why, "%s", last_error());
        remove_flat_dir(tmp_dir);
        return set_error("saving the checkpoint of step %d failed: %s", t->step, why);
    }
    /* into place: an older folder of the same name is moved aside first, then removed */
    snprintf(name, sizeof name, ".checkpoint-%d.old.%d", t->step, (int)getpid());
    path_join(old_dir, sizeof old_dir, o->out_dir, name);
    int had_old = file_exists(final_dir);
    if (had_old && rename(final_dir, old_dir) != 0) {
        remove_flat_dir(tmp_dir);
        return set_error("cannot move the old %s aside: %s", final_dir, strerror(errno));
    }
    if (rename(tmp_dir, final_dir) != 0) {
        int e = errno;
        if (had_old) rename(old_dir, final_dir);
        remove_flat_dir(tmp_dir);
        return set_error("cannot rename %s to %s: %s", tmp_dir, final_dir, strerror(e));
    }
    if (had_old) remove_flat_dir(old_dir);
    snprintf(t->last_checkpoint, sizeof t->last_checkpoint, "%s", final_dir);
    return 0;
}

/* With --save-total-limit K, removes all but the newest K checkpoint-<step> folders of OUT. */
static void prune_checkpoints(const TrainOptions *o) {
    if (o->save_total_limit <= 0) return;
    DIR *d = opendir(o->out_dir);
    if (!d) return;
    long *steps = NULL;
    size_t n = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        long s;
        int used = 0;
        if (sscanf(e->d_name, "checkpoint-%ld%n", &s, &used) == 1 && e->d_name[used] == 0 && s >= 0) {
            steps = (long *)xrealloc(steps, (n + 1) * sizeof(long));
            steps[n++] = s;
        }
    }
    closedir(d);
    for (size_t i = 0; i < n; i++) { /* newest first */
        size_t newer = 0;
        for (size_t j = 0; j < n; j++) newer += steps[j] > steps[i];
        if (newer < (size_t)o->save_total_limit) continue;
        char name[64], path[4200];
        snprintf(name, sizeof name, "checkpoint-%ld", steps[i]);
        if (remove_flat_dir(path_join(path, sizeof path, o->out_dir, name)) != 0) fprintf(stderr, "warning: %s\n", last_error());
    }
    free(steps);
}

/* The checkpoint folder --resume DIR means: DIR itself when it holds trainer_state.json,
 * else the checkpoint-<step> inside it with the largest step. */
static int checkpoint_find(const char *dir, char *out, size_t cap) {
    char path[4096];
    if (file_exists(path_join(path, sizeof path, dir, "trainer_state.json"))) { snprintf(out, cap, "%s", dir); return 0; }
    DIR *d = opendir(dir);
    if (!d) return set_error("cannot open the --resume folder %s: %s", dir, strerror(errno));
    long best = -1;
    struct dirent *e;
    while ((e = readdir(d))) {
        long s;
        int used = 0;
        if (sscanf(e->d_name, "checkpoint-%ld%n", &s, &used) == 1 && e->d_name[used] == 0 && s > best) {
            char sub[4096];
            path_join(sub, sizeof sub, dir, e->d_name);
            if (file_exists(path_join(path, sizeof path, sub, "trainer_state.json"))) best = s;
        }
    }
    closedir(d);
    if (best < 0) return set_error("%s is not a checkpoint folder and holds no checkpoint-<step> folder", dir);
    char name[64];
    snprintf(name, sizeof name, "checkpoint-%ld", best);
    path_join(out, cap, dir, name);
    return 0;
}

static int json_int_field(const Json *obj, const char *key, double lo, double hi, double *out, const char *path) {
    const Json *v = json_get_type(obj, key, JSON_NUMBER);
    if (!v || v->number != floor(v->number) || v->number < lo || v->number > hi)
        return set_error("%s: \"%s\" is missing or not an integer in range", path, key);
    *out = v->number;
    return 0;
}

/* Restores the trainer (whose model, adapter, optimizer and data are set up as for a fresh
 * run) from checkpoint folder dir. -1 + last_error() when the checkpoint is malformed or
 * belongs to another run (other data, --ctx, --batch, --grad-accum or LoRA shape). */
static int checkpoint_load(Trainer *t, const char *dir) {
    char path[4096];
    Json *js = json_parse_file(path_join(path, sizeof path, dir, "trainer_state.json"));
    if (!js) return -1;
    const TrainOptions *o = &t->opt;
    int rc = 0;
    double step = 0, adam_steps = 0, epoch = 0, position = 0, sequences = 0;
    const Json *data = json_get_type(js, "data", JSON_OBJECT), *settings = json_get_type(js, "settings", JSON_OBJECT);
    if (js->type != JSON_OBJECT || strcmp(json_get_string(js, "format", ""), TRAINER_STATE_FORMAT) != 0)
        rc = set_error("%s is not a trainer state of this program", path);
    else if (json_get_number(js, "version", -1) != TRAINER_STATE_VERSION)
        rc = set_error("%s has version %g; this program reads version %d", path, json_get_number(js, "version", -1), TRAINER_STATE_VERSION);
    else if (!data || !settings) rc = set_error("%s lacks \"data\" or \"settings\"", path);
    else if (json_int_field(js, "step", 0, INT32_MAX, &step, path) || json_int_field(js, "adamw_steps", 0, 9e15, &adam_steps, path) ||
             json_int_field(data, "epoch", 0, 9e15, &epoch, path) || json_int_field(data, "position", 0, 9e15, &position, path) ||
             json_int_field(data, "sequences", 0, 9e15, &sequences, path))
        rc = -1;
    if (rc == 0) {
        /* the settings that shape the data stream and the tensors must match */
        const char *keys[] = {"ctx", "group", "batch", "grad_accum", "lora_rank"};
        const char *flags[] = {"--ctx", "S2-Attn group (--group-ratio / --no-s2)", "--batch", "--grad-accum (times the ranks)", "--lora-rank"};
        int now[] = {o->ctx, o->group, o->batch, o->grad_accum * comm_world(), o->lora_rank};
        for (int i = 0; i < 5 && rc == 0; i++) {
            double was = json_get_number(settings, keys[i], -1);
            if (was != now[i]) rc = set_error("the checkpoint %s was trained with %s %g but this run asks for %d; resume with the same value",
                                              dir, flags[i], was, now[i]);
        }
        if (rc == 0 && json_get_number(settings, "lora_alpha", -1) != o->lora_alpha)
            rc = set_error("the checkpoint %s was trained with --lora-alpha %g but this run asks for %g", dir,
                           json_get_number(settings, "lora_alpha", -1), o->lora_alpha);
        char fp[17];
        snprintf(fp, sizeof fp, "%016llx", (unsigned long long)t->data.fingerprint);
        if (rc == 0 && ((size_t)sequences != t->data.n_seqs || strcmp(json_get_string(data, "fingerprint", ""), fp) != 0))
            rc = set_error("the checkpoint %s was trained on other data (or another tokenizer or --template); resume with the same data", dir);
        if (rc == 0 && (size_t)position > t->data.n_seqs) rc = set_error("%s: data position %g is past the %zu sequences", path, position, t->data.n_seqs);
    }
    Rng data_rng, drop_rng;
    if (rc == 0 && (rng_from_json(&data_rng, json_get(js, "data_rng"), path, "data_rng") ||
                    rng_from_json(&drop_rng, json_get(js, "dropout_rng"), path, "dropout_rng")))
        rc = -1;
    json_free(js);
    if (rc != 0) return -1;

    /* tensors: check everything first, then copy */
    SafeTensors st;
    if (st_open(&st, path_join(path, sizeof path, dir, "train_state.safetensors")) != 0) return -1;
    size_t n = t->adamw.count;
    const StTensor **src = (const StTensor **)xcalloc(3 * n + 1, sizeof *src); /* [3n] param, m, v */
    char name[220];
    for (size_t k = 0; k < n && rc == 0; k++) {
        const TrainParam *p = &t->adamw.params[k];
        const char *suffix[3] = {"", ".exp_avg", ".exp_avg_sq"};
        for (int j = 0; j < 3 && rc == 0; j++) {
            snprintf(name, sizeof name, "%s%s", p->name, suffix[j]);
            const StTensor *x = st_find(&st, name);
            int64_t shape[1] = {(int64_t)p->numel};
            if (!x) rc = set_error("%s: tensor '%s' is missing (was the checkpoint made with other LoRA settings?)", st.path, name);
            else if (x->dtype != DT_F32) rc = set_error("%s: tensor '%s' is %s, not F32", st.path, name, DTYPE_NAMES[x->dtype]);
            else if (st_check_shape(x, 1, shape) != 0) { char why[1024]; snprintf(why, sizeof why, "%s", last_error()); rc = set_error("%s: %s", st.path, why); }
            src[3 * k + (size_t)j] = x;
        }
    }
    const StTensor *order = st_find(&st, "data.order");
    int64_t oshape[1] = {(int64_t)t->data.n_seqs};
    if (rc == 0 && (!order || order->dtype != DT_I64 || st_check_shape(order, 1, oshape) != 0))
        rc = set_error("%s: \"data.order\" is missing or is not I64 [%zu]", st.path, t->data.n_seqs);
    uint32_t *new_order = NULL;
    if (rc == 0) {
        /* must be a permutation of 0..n_seqs-1 */
        new_order = (uint32_t *)xmalloc((t->data.n_seqs ? t->data.n_seqs : 1) * sizeof(uint32_t)); /* [n_seqs] */
        uint8_t *seen = (uint8_t *)xcalloc(t->data.n_seqs ? t->data.n_seqs : 1, 1); /* [n_seqs] */
        for (size_t i = 0; i < t->data.n_seqs && rc == 0; i++) {
            int64_t v;
            memcpy(&v, order->data + 8 * i, 8);
            if (v < 0 || (uint64_t)v >= t->data.n_seqs || seen[v]) rc = set_error("%s: \"data.order\" is not a permutation of the sequences", st.path);
            else { seen[v] = 1; new_order[i] = (uint32_t)v; }
        }
        free(seen);
    }
    if (rc == 0) {
        for (size_t k = 0; k < n; k++) {
            TrainParam *p = &t->adamw.params[k];
            memcpy(p->param, src[3 * k]->data, p->numel * sizeof(float));
            memcpy(p->m, src[3 * k + 1]->data, p->numel * sizeof(float));
            memcpy(p->v, src[3 * k + 2]->data, p->numel * sizeof(float));
        }
        memcpy(t->data.order, new_order, t->data.n_seqs * sizeof(uint32_t));
        t->data.pos = (size_t)position;
        t->data.epoch = (uint64_t)epoch;
        t->data.rng = data_rng;
        t->lora.drop_rng = drop_rng;
        t->adamw.steps_taken = (long)adam_steps;
        t->step = (int)step;
        snprintf(t->last_checkpoint, sizeof t->last_checkpoint, "%s", dir);
    }
    free(new_order);
    free(src);
    st_close(&st);
    return rc;
}

/* =======================================================================================
 * 5. The step
 * ===================================================================================== */

typedef struct {
    double loss;        /* mean over the micro-batches of each one's mean target loss */
    double grad_norm;   /* before clipping */
    double lr;
} StepResult;

/* Forward and backward of grad_accum micro-batches, then clip and AdamW: the reference
 * implementation on the CPU (02's fp32 model, 03's LoRA hook and S2-Attn).
 * With K ranks (05_dist.c) the step covers K * grad_accum micro-batches: micro-batch j is
 * rank j mod K's (the others skip it), the gradients and the loss sum are all-reduced, and
 * AdamW updates this rank's ZeRO-1 slice, then the slices are all-gathered. */
static StepResult train_step_cpu(Trainer *t) {
    const TrainOptions *o = &t->opt;
    StepResult r = {0, 0, 0};
    RunOptions run = {(size_t)o->group, 0, &t->lora.hook}; /* no dW for the frozen linears */
    int K = comm_world(), rank = g_comm.rank, n_micro = K * o->grad_accum;
    trainer_zero_grads(t);
    for (int micro = 0; micro < n_micro; micro++) {
        if (micro % K != rank) { dataset_skip_batch(&t->data, o->batch); continue; }
        dataset_next_batch(&t->data, o->batch, t->inputs, t->targets);
        float loss = model_forward(&t->model, &t->acts, t->inputs, t->targets, (size_t)o->batch, (size_t)o->ctx, &run);
        r.loss += loss;
        if (!isfinite(loss)) {
            if (!comm_active()) { r.loss = loss; return r; }
            continue; /* the other ranks still wait for this one's sum: it carries the non-finite loss */
        }
        model_backward(&t->model, &t->acts, &t->grads, t->inputs, t->targets, (size_t)o->batch, (size_t)o->ctx, &run);
    }
    size_t P = flat_count(&t->adamw);
    if (comm_active()) { /* gradients and the loss sum, added over the ranks */
        flat_copy(&t->adamw, 1, t->dist_flat, 1);
        t->dist_flat[P] = (float)r.loss;
        comm_allreduce_sum(t->dist_flat, P + 1);
        flat_copy(&t->adamw, 1, t->dist_flat, 0);
        r.loss = t->dist_flat[P];
        if (!isfinite(r.loss)) return r;
    }
    r.loss /= n_micro;
    if (n_micro > 1) trainer_scale_grads(t, 1.0f / (float)n_micro);
    r.grad_norm = trainer_grad_norm(t);
    if (!isfinite(r.grad_norm)) return r;
    if (o->clip > 0 && r.grad_norm > o->clip) trainer_scale_grads(t, (float)(o->clip / (r.grad_norm + 1e-6)));
    r.lr = adamw_lr_at(&t->adamw.cfg, t->step);
    if (!comm_active()) {
        adamw_step(&t->adamw, (float)r.lr);
    } else { /* ZeRO-1: this rank's slice, then everyone's */
        size_t lo, hi;
        dist_shard(P, rank, K, &lo, &hi);
        adamw_step_range(&t->adamw, (float)r.lr, lo, hi);
        dist_gather_state(&t->adamw, 0, t->dist_flat);
    }
    return r;
}

#ifdef USE_CUDA
#include "05_train_gpu.c" /* the GPU step: 04's kernels, bf16 compute, activation checkpointing */
#endif

/* One optimizer step, on the GPU when trainer_init set one up, else on the CPU. */
static StepResult train_step(Trainer *t) {
#ifdef USE_CUDA
    if (t->gpu) return train_step_gpu(t);
#endif
    return train_step_cpu(t);
}

/* =======================================================================================
 * 6. The run: set up, loop, save
 * ===================================================================================== */

static volatile sig_atomic_t g_stop_signal = 0;
static void on_stop_signal(int sig) {
    g_stop_signal = sig;
    signal(sig, SIG_DFL); /* a second Ctrl-C ends the program at once */
}

/* Shapes for --init random: the real models' configs (and a tiny one for tests). */
typedef struct {
    const char *name;
    int dim, n_layers, n_heads, n_kv_heads, ffn_dim, vocab_size, max_pos, tied;
    float rope_theta, norm_eps;
} ShapePreset;
static const ShapePreset SHAPES[] = {
    {"llama2-7b", 4096, 32, 32, 32, 11008, 32000, 4096, 0, 10000.0f, 1e-5f},
    {"llama2-13b", 5120, 40, 40, 40, 13824, 32000, 4096, 0, 10000.0f, 1e-5f},
    {"llama2-70b", 8192, 80, 64, 8, 28672, 32000, 4096, 0, 10000.0f, 1e-5f},
    {"smollm2-135m", 576, 30, 9, 3, 1536, 49152, 8192, 1, 100000.0f, 1e-5f},
    {"tiny", 64, 2, 4, 2, 160, 256, 256, 1, 10000.0f, 1e-5f},
};

static const ShapePreset *shape_preset(const char *name) {
    for (size_t i = 0; i < sizeof SHAPES / sizeof *SHAPES; i++)
        if (!strcmp(SHAPES[i].name, name)) return &SHAPES[i];
    return NULL;
}

/* A random model of a preset shape (weights N(0, 0.02^2), norms near 1), RoPE interpolated
 * to ctx. -1 + last_error() for an unknown shape or an unreadable tokenizer. */
static void shape_config(const ShapePreset *p, Config *cfg) {
    Config c;
    memset(&c, 0, sizeof c);
    c.dim = p->dim; c.ffn_dim = p->ffn_dim; c.n_layers = p->n_layers; c.n_heads = p->n_heads;
    c.n_kv_heads = p->n_kv_heads; c.head_dim = p->dim / p->n_heads; c.vocab_size = p->vocab_size;
    c.rms_eps = p->norm_eps; c.rope_theta = p->rope_theta; c.rope_config_factor = 1.0f; c.max_pos = p->max_pos;
    c.tie_embeddings = p->tied; c.bos_id = -1; c.eos_id = -1;
    *cfg = c;
}

static int model_init_shape(Model *m, const char *shape, const char *tokenizer_path, long ctx, uint64_t seed) {
    const ShapePreset *p = shape_preset(shape);
    if (!p) return set_error("unknown --shape '%s' (llama2-7b, llama2-13b, llama2-70b, smollm2-135m or tiny)", shape);
    Config c;
    shape_config(p, &c);
    if (!strcmp(p->name, "tiny") && tokenizer_path) { /* the test shape takes its vocabulary from the tokenizer */
        Tokenizer tok;
        if (tok_load(&tok, tokenizer_path) != 0) return -1;
        c.vocab_size = tok.vocab_size;
        tok_free(&tok);
    }
    config_set_target_ctx(&c, ctx);
    model_init_random(m, &c, seed, 0.02f);
    return 0;
}

/* The CSV log: rows past the step we resume from are dropped, so the log reads as one run. */
static FILE *open_csv_log(const char *out_dir, int resume_step) {
    char path[4096];
    path_join(path, sizeof path, out_dir, "train_log.csv");
    const char *header = "step,loss,lr,grad_norm,tokens,step_seconds,tokens_per_second,mfu,peak_memory_gib\n";
    size_t len = 0;
    char *old = resume_step > 0 ? read_file(path, &len) : NULL;
    AtomicFile af;
    if (atomic_open(&af, path) != 0) die("%s", last_error());
    fputs(header, af.f);
    if (old) {
        char *line = strchr(old, '\n');
        while (line && line[1]) {
            char *next = strchr(line + 1, '\n');
            long s = strtol(line + 1, NULL, 10);
            if (s >= 1 && s <= resume_step) fwrite(line + 1, 1, next ? (size_t)(next - line) : strlen(line + 1), af.f);
            line = next;
        }
        free(old);
    }
    if (atomic_commit(&af) != 0) die("%s", last_error());
    FILE *f = fopen(path, "a");
    if (!f) die("cannot open %s: %s", path, strerror(errno));
    return f;
}

static int32_t *codec_tok_encode(void *tok, const char *text, size_t len, int add_bos, size_t *n_out) {
    return tok_encode((const Tokenizer *)tok, text, len, add_bos, n_out);
}

/* Opens the tokenizer the data code uses: --tokenizer, else the model folder's; none for
 * --init random without --tokenizer (then --data must be token files). -1 + last_error()
 * when it cannot be read or does not fit the model's vocabulary. */
static int codec_open(TextCodec *c, Tokenizer *tok, const char *path, int explicit_path, const Config *cfg) {
    memset(c, 0, sizeof *c);
    c->vocab_size = cfg->vocab_size;
    c->bos_id = cfg->bos_id;
    c->eos_id = cfg->eos_id;
    if (!path) return 0;
    struct stat st;
    char buf[4200];
    if (!explicit_path && stat(path, &st) == 0 && S_ISDIR(st.st_mode) && !file_exists(path_join(buf, sizeof buf, path, "tokenizer.model")) &&
        !file_exists(path_join(buf, sizeof buf, path, "tokenizer.json")))
        return 0; /* a model folder without a tokenizer: token files only */
    if (tok_load(tok, path) != 0) return -1;
    if (tok->vocab_size > cfg->vocab_size) {
        int v = tok->vocab_size;
        tok_free(tok);
        return set_error("the tokenizer %s has %d ids but the model's vocabulary has only %d", path, v, cfg->vocab_size);
    }
    c->tok = tok;
    c->text_encode = codec_tok_encode;
    if (tok->bos_id >= 0) c->bos_id = tok->bos_id;
    if (tok->eos_id >= 0) c->eos_id = tok->eos_id;
    return 0;
}

/* Everything before the first step: model, adapter, optimizer, data, and a resume. */
static void trainer_init(Trainer *t) {
    TrainOptions *o = &t->opt;
    /* the model: its context sets --ctx's default, --ctx sets the RoPE interpolation */
    if (o->model_dir) {
        if (model_try_load(&t->model, o->model_dir, o->ctx) != 0) die("%s", last_error());
    } else if (model_init_shape(&t->model, o->shape, o->tokenizer_path, o->ctx, o->seed) != 0) die("%s", last_error());
    const Config *c = &t->model.cfg;
    if (o->ctx == 0) o->ctx = c->max_pos;
    if (train_validate(o) != 0) die("%s", last_error());

    /* data */
    if (codec_open(&t->codec, &t->tokenizer, o->tokenizer_path ? o->tokenizer_path : o->model_dir, o->tokenizer_path != NULL, c) != 0) die("%s", last_error());
    int rc = o->sft_file ? dataset_load_sft(&t->data, &t->codec, o->sft_file, o->template_name, o->sft_pack, o->ctx)
                         : dataset_load_text(&t->data, &t->codec, o->data_files, o->n_data_files, o->ctx);
    if (rc != 0) die("%s", last_error());
    if (o->save_tokens && comm_is_root()) { /* tokenize once: later runs can read this file instead of the text */
        if (tokfile_write(o->save_tokens, t->data.stream, t->data.stream_len, c->vocab_size) != 0) die("%s", last_error());
        printf("wrote %zu tokens to %s\n", t->data.stream_len, o->save_tokens);
    }
    dataset_start(&t->data, o->seed);

    /* LoRA+ and AdamW over exactly the trainable tensors */
    if (o->adapter_dir) { /* start from an existing PEFT adapter: its rank, alpha and targets */
        if (lora_load_adapter(&t->lora, &t->model, o->adapter_dir) != 0) die("%s", last_error());
        t->lora.cfg.train_embed = t->lora.cfg.train_norms = 1; /* LoRA+ trains them whether or not it carried them */
        o->lora_rank = t->lora.cfg.rank;
        o->lora_alpha = t->lora.cfg.alpha;
    } else {
        LoraConfig lc = lora_default_config();
        lc.rank = o->lora_rank;
        lc.alpha = (float)o->lora_alpha;
        lc.seed = o->seed;
        if (lora_init(&t->lora, c, &lc) != 0) die("%s", last_error());
    }
    lora_grads_alloc(&t->grads, c); /* embed and norms only: the linears are frozen */
    memset(&t->adamw, 0, sizeof t->adamw);
    t->adamw.cfg.lr = (float)o->lr;
    t->adamw.cfg.beta1 = (float)o->beta1;
    t->adamw.cfg.beta2 = (float)o->beta2;
    t->adamw.cfg.eps = (float)o->eps;
    t->adamw.cfg.weight_decay = (float)o->weight_decay;
    t->adamw.cfg.warmup_steps = o->warmup;
    lora_register_params(&t->adamw, &t->lora, &t->model, &t->grads);

    int on_gpu = 0;
#ifdef USE_CUDA
    train_gpu_select_device(o);   /* several ranks: rank r on GPU r */
    on_gpu = train_gpu_choose(t); /* --device, else the GPU where there is one the model suits */
#endif
    if (o->shard_weights && !on_gpu) die("--shard-weights shards the frozen bf16 weights of the GPU step; this run trains on the CPU");
    /* several processes: join the others (NCCL for GPU ranks, the shared file for CPU ranks) */
    if (comm_init(o->rank, o->world_size, o->dist_file, on_gpu) != 0) die("%s", last_error());
    if (!comm_is_root()) o->quiet = 1; /* logs come from rank 0 */
    if (comm_active()) t->dist_flat = (float *)xmalloc((flat_count(&t->adamw) + 1) * sizeof(float)); /* [P + 1] */
    if (!on_gpu) act_plan(&t->acts, c, (size_t)o->batch, (size_t)o->ctx, 1);
    t->inputs = (int32_t *)xmalloc((size_t)o->batch * o->ctx * sizeof(int32_t));  /* [B, N] */
    t->targets = (int32_t *)xmalloc((size_t)o->batch * o->ctx * sizeof(int32_t)); /* [B, N] */
    t->n_params = config_param_count(c);
    for (size_t k = 0; k < t->adamw.count; k++) t->n_trainable += t->adamw.params[k].numel;
    t->flops_per_token = train_flops_per_token(c, o->ctx, o->group);

    if (o->resume_dir) {
        char dir[4096];
        if (checkpoint_find(o->resume_dir, dir, sizeof dir) != 0 || checkpoint_load(t, dir) != 0) die("%s", last_error());
        if (t->step >= o->max_steps) die("the checkpoint %s is at step %d, already at --max-steps %d; raise --max-steps to train on", dir, t->step, o->max_steps);
        if (comm_is_root()) printf("resumed from %s at step %d (epoch %llu, sequence %zu of %zu)\n", dir, t->step,
               (unsigned long long)t->data.epoch, t->data.pos, t->data.n_seqs);
    }
#ifdef USE_CUDA
    if (on_gpu) train_gpu_setup(t); /* after a resume, so the GPU starts from the checkpoint's state */
#endif
}

static void trainer_free(Trainer *t) {
#ifdef USE_CUDA
    train_gpu_free(t);
#endif
    if (t->csv) fclose(t->csv);
    free(t->dist_flat);
    free(t->inputs);
    free(t->targets);
    act_free(&t->acts);
    adamw_free(&t->adamw);
    params_free(&t->grads);
    lora_free(&t->lora);
    dataset_free(&t->data);
    if (t->codec.tok) tok_free(&t->tokenizer);
    model_free(&t->model);
    memset(t, 0, sizeof *t);
}

/* The adapter of the final step also goes into OUT itself, so OUT is a PEFT folder. */
static void save_or_die(Trainer *t, double loss, int final) {
#ifdef USE_CUDA
    train_gpu_gather_state(t); /* several ranks: every slice of the moments to every rank */
    if (t->gpu) gpu_train_download_state(t->gpu); /* the trained fp32 masters and moments back to the host */
#endif
    if (!t->gpu) { /* ZeRO-1 on the CPU: each rank updated only its slice of the moments */
        dist_gather_state(&t->adamw, 2, t->dist_flat);
        dist_gather_state(&t->adamw, 3, t->dist_flat);
    }
    if (comm_is_root()) { /* rank 0 writes what a single process writes */
        if (checkpoint_save(t, loss) != 0) die("%s", last_error());
        prune_checkpoints(&t->opt);
        if (final && lora_save_adapter(&t->lora, &t->model, t->opt.out_dir, t->opt.model_dir) != 0) die("%s", last_error());
    } else {
        char name[64];
        snprintf(name, sizeof name, "checkpoint-%d", t->step);
        path_join(t->last_checkpoint, sizeof t->last_checkpoint, t->opt.out_dir, name);
    }
    comm_barrier(); /* nobody goes on (or ends) before the checkpoint is in place */
}

/* Trains from t->step to --max-steps. Returns the exit status (0, or 130 after a signal). */
static int trainer_run(Trainer *t) {
    const TrainOptions *o = &t->opt;
    const Config *c = &t->model.cfg;
    if (make_dir(o->out_dir) != 0) die("%s", last_error());
    if (comm_is_root()) t->csv = open_csv_log(o->out_dir, t->step);
    size_t tokens_per_step = (size_t)o->batch * o->ctx * o->grad_accum * comm_world();
    if (!o->quiet) {
        char targets[64] = "";
        for (int w = 0; w < LORA_NUM_TARGETS; w++)
            if (t->lora.cfg.targets & (1u << w))
                snprintf(targets + strlen(targets), sizeof targets - strlen(targets), "%s%.*s", targets[0] ? "," : "",
                         (int)strcspn(LORA_TARGET_NAMES[w], "_"), LORA_TARGET_NAMES[w]);
        printf("model: D=%d L=%d H=%d Hk=%d d=%d F=%d V=%d, %.2fM parameters, %.3fM trainable (LoRA r=%d alpha %g on %s + embed + norms)\n",
               c->dim, c->n_layers, c->n_heads, c->n_kv_heads, c->head_dim, c->ffn_dim, c->vocab_size, t->n_params / 1e6,
               t->n_trainable / 1e6, o->lora_rank, o->lora_alpha, targets);
        if (o->adapter_dir) printf("adapter: started from %s\n", o->adapter_dir);
        if (comm_active())
            printf("ranks: %d (%s), each takes every %d-th micro-batch; AdamW state sharded (ZeRO-1)\n", comm_world(),
                   g_comm.backend == COMM_NCCL ? "NCCL" : "shared file", comm_world());
        printf("train: N=%d %s, B=%d x %d accumulation x %d ranks = %zu tokens/step, RoPE factor %g, %zu sequences/epoch, lr %g (warmup %d), %s\n",
               o->ctx, o->group ? "S2-Attn" : "full attention", o->batch, o->grad_accum, comm_world(), tokens_per_step, c->rope_factor,
               t->data.n_seqs, o->lr, o->warmup, t->device_note ? t->device_note : "on the CPU");
        if (o->group) printf("S2-Attn: G=%d (N/G=%d groups, shift %d)\n", o->group, o->ctx / o->group, o->group / 2);
        if (t->data.stream)
            printf("data: %zu tokens packed into %zu sequences of %d; an epoch is %.1f steps\n", t->data.stream_len, t->data.n_seqs, o->ctx,
                   (double)t->data.n_seqs / ((double)o->batch * o->grad_accum * comm_world()));
        else
            printf("data: SFT (%s template), %zu sequences of %d, %zu target tokens (%.1f%% of positions carry loss)\n", o->template_name,
                   t->data.n_seqs, o->ctx, t->data.loss_tokens, 100.0 * t->data.loss_tokens / ((double)t->data.n_seqs * o->ctx));
    }
    g_stop_signal = 0;
    struct sigaction sa, old_int, old_term;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_stop_signal;
    sigaction(SIGINT, &sa, &old_int);
    sigaction(SIGTERM, &sa, &old_term);
    double run_seconds = 0, loss = NAN;
    int steps_this_run = 0, status = 0;
    while (t->step < o->max_steps) {
        double t0 = now_seconds();
        StepResult r = train_step(t);
        double dt = now_seconds() - t0;
        if (!isfinite(r.loss) || !isfinite(r.grad_norm)) {
            fflush(stdout);
            if (comm_is_root()) /* every rank sees the same summed loss and norm; one says so */
                fprintf(stderr, "error: the %s is not finite at step %d, so training stops there (try a lower --lr or --clip 1); %s%s\n",
                    isfinite(r.loss) ? "gradient norm" : "loss", t->step + 1,
                    t->last_checkpoint[0] ? "the last good checkpoint is " : "no checkpoint was written", t->last_checkpoint);
            status = 1;
            break;
        }
        t->step++;
        steps_this_run++;
        run_seconds += dt;
        loss = r.loss;
        double tok_s = (double)tokens_per_step / dt;
        double mfu = o->peak_tflops > 0 ? t->flops_per_token * tok_s / (o->peak_tflops * 1e12) : -1;
        double mem = peak_memory_gib();
#ifdef USE_CUDA
        if (t->gpu) mem = tg_gib(gpu_train_used_bytes()); /* GPU memory in use (all of it is allocated up front) */
#endif
        if (t->csv) fprintf(t->csv, "%d,%.9g,%.9g,%.9g,%zu,%.6f,%.3f,%.6f,%.4f\n", t->step, r.loss, r.lr, r.grad_norm, tokens_per_step, dt, tok_s,
                mfu >= 0 ? mfu : NAN, mem); /* mfu nan: no --peak-tflops */
        if (t->csv) fflush(t->csv);
        if (!o->quiet && (t->step % o->log_every == 0 || t->step == o->max_steps || t->step == 1)) {
            char eta[32], mfu_s[32];
            format_duration(eta, sizeof eta, run_seconds / steps_this_run * (o->max_steps - t->step));
            if (mfu >= 0) snprintf(mfu_s, sizeof mfu_s, "%.1f%%", 100 * mfu);
            else snprintf(mfu_s, sizeof mfu_s, "n/a");
            printf("step %*d/%d | loss %.4f | lr %.3e | norm %.3f | %.0f tok/s | MFU %s | mem %.2f GiB | %.2f s | ETA %s\n",
                   (int)snprintf(NULL, 0, "%d", o->max_steps), t->step, o->max_steps, r.loss, r.lr, r.grad_norm, tok_s, mfu_s, mem, dt, eta);
            fflush(stdout);
        }
        if (comm_any(g_stop_signal != 0)) { /* a signal to any rank stops them all, after one checkpoint */
            if (!g_stop_signal) g_stop_signal = SIGTERM;
            save_or_die(t, loss, 0);
            if (comm_is_root()) printf("interrupted by signal %d after step %d; saved %s (continue with --resume %s)\n", (int)g_stop_signal, t->step,
                   t->last_checkpoint, o->out_dir);
            status = 130;
            break;
        }
        if (t->step < o->max_steps && o->save_every > 0 && t->step % o->save_every == 0) save_or_die(t, loss, 0);
    }
    if (status == 0) {
        save_or_die(t, loss, 1);
        if (!o->quiet) printf("done: %d steps; adapter in %s, checkpoint %s\n", t->step, o->out_dir, t->last_checkpoint);
    }
    sigaction(SIGINT, &old_int, NULL);
    sigaction(SIGTERM, &old_term, NULL);
    return status;
}

/* --shard-weights: prints what a GPU needs for this model and --ctx over K GPUs of 80 GB
 * (--world-size, else 8), replicated and sharded. Reads only the shape (no weights). A
 * single process (nothing to shard over) stops after the plan: a way to size a run. */
static void shard_weights_plan(const TrainOptions *o, int world) {
    Config c;
    if (o->model_dir) {
        char path[4200];
        Json *j = json_parse_file(path_join(path, sizeof path, o->model_dir, "config.json"));
        if (!j) die("%s", last_error());
        if (config_from_json(&c, j, o->ctx) != 0) die("%s", last_error());
        json_free(j);
    } else {
        const ShapePreset *p = o->shape ? shape_preset(o->shape) : NULL;
        if (!p) die("--shard-weights needs --model DIR or --init random --shape NAME (llama2-7b, llama2-13b, llama2-70b, smollm2-135m or tiny)");
        shape_config(p, &c);
    }
    int ctx = o->ctx ? o->ctx : c.max_pos;
    int alone = comm_alone(world, o->dist_file); /* one rank with --dist-file: a communicator of one */
    dist_print_memory_plan(stdout, o->model_dir ? o->model_dir : o->shape, &c, (size_t)ctx, alone ? 8 : world, 80.0);
    if (alone) die("--shard-weights shards the frozen weights over several GPU ranks (--world-size K, or mpirun); the plan above is for 8");
}

/* The whole program; tests call it as a function. */
static int train_main(int argc, char **argv) {
    Trainer *t = (Trainer *)xcalloc(1, sizeof(Trainer));
    train_defaults(&t->opt);
    int rc = train_parse_args(&t->opt, argc, argv);
    if (rc == 1) { train_usage(stdout); free(t); return 0; }
    if (rc != 0) die("%s", last_error());
    if (t->opt.shard_weights) {
        const char *ompi = getenv("OMPI_COMM_WORLD_SIZE");
        int world = t->opt.world_size > 0 ? t->opt.world_size : ompi ? atoi(ompi) : 1;
        const char *rank = getenv("OMPI_COMM_WORLD_RANK");
        if (world <= 1 || (t->opt.world_size > 0 ? t->opt.rank : rank ? atoi(rank) : 0) == 0) shard_weights_plan(&t->opt, world);
    }
    trainer_init(t);
    int status = trainer_run(t);
    trainer_free(t);
    comm_finish();
    free(t);
    return status;
}

#if STAGE == 5
int main(int argc, char **argv) {
    if (argc == 1) { train_usage(stderr); return 2; }
    return train_main(argc, argv);
}
#endif
