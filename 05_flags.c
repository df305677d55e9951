/* 05_flags.c: the command line of 05_train (05_train.c includes it).
 *
 * Teaches: flags a user of llm.c or the HF Trainer would guess (HF's spellings work too),
 * every value checked on its own (common.h's parse_*_arg) and every rule between flags
 * checked once the model's context is known (train_validate), each refusal one sentence.
 * Checked by: tests/test_train.c (every flag, every rule, the HF aliases).
 */
#ifndef TRAIN_FLAGS_C
#define TRAIN_FLAGS_C

#define TRAIN_MAX_DATA_FILES 64
#define DIST_MAX_RANKS 256 /* --world-size at most (05_dist.c) */

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
    int rope_scaling;               /* --rope-scaling linear|yarn: 02's RopeExtend (0: automatic) */
    int batch;                      /* --batch B */
    int grad_accum;                 /* --grad-accum: micro-batches per optimizer step */
    int s2;                         /* --s2 / --no-s2 */
    double group_ratio;             /* --group-ratio: G = N * ratio */
    int group;                      /* G, derived by common.h's s2_group_size (0 = full attention) */
    /* LoRA */
    int lora_rank;                  /* --lora-rank R */
    double lora_alpha;              /* --lora-alpha */
    int train_embed, train_norms;   /* 1: embed_tokens / every RMSNorm trains too (LoRA+); --no-train-embed, --no-train-norms: 0 */
    /* optimiser */
    int max_steps;                  /* --max-steps */
    double lr;                      /* --lr */
    double beta1, beta2;            /* --betas B1,B2 */
    double eps;                     /* --eps */
    double weight_decay;            /* --weight-decay */
    int warmup;                     /* --warmup: linear warmup steps */
    LrSchedule lr_scheduler;        /* --lr-scheduler: after the warmup, constant or cosine / linear decay over --max-steps */
    double clip;                    /* --clip: max global grad norm (0 = off) */
    uint64_t seed;                  /* --seed */
    /* output */
    const char *out_dir;            /* --out DIR */
    const char *resume_dir;         /* --resume DIR: a checkpoint folder, or an --out folder */
    int overwrite;                  /* --overwrite: clear what an earlier run left in --out first */
    int save_every;                 /* --save-every K (0: only at the end) */
    int save_total_limit;           /* --save-total-limit K: keep the newest K checkpoints (0: all) */
    int log_every;                  /* --log-every K: progress lines */
    double peak_tflops;             /* --peak-tflops: the device's peak, for MFU (0: the GPU's from 04_load.c's table; n/a on the CPU) */
    int quiet;                      /* --quiet: no progress lines (the CSV is still written) */
    const char *device;             /* --device cpu|gpu (NULL: the GPU where this build has one, else the CPU) */
    /* several processes (05_dist.c) */
    int rank, world_size;           /* --rank R --world-size K (0: from mpirun's environment, else 1) */
    const char *dist_file;          /* --dist-file PATH: where the ranks meet (rank 0 creates it) */
    int shard_weights;              /* --shard-weights: ZeRO-3 for the frozen bf16 weights */
    /* memory budgets of the GPU step (05_plan.c) */
    double gpu_mem_gib;             /* --gpu-mem GiB: the GPU memory the run may use in all (0: what is free) */
    double host_mem_gib;            /* --host-mem GiB: pinned host memory for checkpoints (< 0: what the machine has) */
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
    o->train_embed = o->train_norms = 1;
    o->max_steps = 1000;
    o->lr = 2e-5;
    o->beta1 = 0.9;
    o->beta2 = 0.95;
    o->eps = 1e-8;
    o->weight_decay = 0.0;
    o->warmup = 20;
    o->lr_scheduler = LR_CONSTANT;
    o->clip = 0.0;
    o->seed = 42;
    o->out_dir = "out";
    o->save_every = 0;
    o->log_every = 1;
    o->host_mem_gib = -1;
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
        "  --rope-scaling KIND    how RoPE reaches --ctx: linear (position interpolation, LongLoRA's;\n"
        "                         the default, but a yarn model keeps yarn) or yarn\n"
        "  --batch B              sequences per micro-batch (default 1)\n"
        "  --grad-accum K         micro-batches per optimizer step (default 1)\n"
        "  --s2 / --no-s2         S2-Attn (default on) or full causal attention\n"
        "  --group-ratio R        S2-Attn group G = N * R, N %% G == 0 (default 0.25)\n"
        "  --lora-rank R          LoRA rank (default 8)\n"
        "  --lora-alpha A         LoRA alpha (default 16)\n"
        "  --no-train-embed       keep embed_tokens (and a tied lm_head) frozen: LoRA + norms\n"
        "  --no-train-norms       keep every RMSNorm weight frozen (both: plain LoRA); the adapter\n"
        "                         lists only what trained as modules_to_save\n"
        "optimizer (AdamW, linear warmup, then constant or a decay):\n"
        "  --max-steps S          optimizer steps (default 1000)\n"
        "  --lr LR                peak learning rate (default 2e-5)\n"
        "  --betas B1,B2          (default 0.9,0.95)\n"
        "  --eps E                (default 1e-8)\n"
        "  --weight-decay W       (default 0)\n"
        "  --warmup W             warmup steps (default 20)\n"
        "  --lr-scheduler KIND    after the warmup: constant (LongLoRA's, the default), cosine or linear\n"
        "                         (transformers' decays to 0 at --max-steps)\n"
        "  --clip C               clip the global gradient norm to C (default 0 = off)\n"
        "  --seed S               data shuffle and LoRA init (default 42)\n"
        "output:\n"
        "  --out DIR              adapter, checkpoints and train_log.csv (default out)\n"
        "  --save-every K         checkpoint every K steps (default 0: at the end only)\n"
        "  --save-total-limit K   keep only the newest K checkpoints (default 0: keep all)\n"
        "  --resume DIR           continue from a checkpoint folder (or the newest in an --out folder)\n"
        "  --overwrite            start over in an --out folder that holds another run (its checkpoints,\n"
        "                         adapter and log are removed first); without it, or --resume, that is refused\n"
        "  --log-every K          a progress line every K steps (default 1)\n"
        "  --peak-tflops T        the device's peak TFLOP/s, for MFU (default: the GPU's dense bf16 peak, n/a on the CPU)\n"
        "  --quiet                no progress lines\n"
        "  --device cpu|gpu       where the step runs (default: the GPU when this build and machine have one)\n"
        "  --gpu-mem GiB          plan the GPU step for this much GPU memory in all (default: what is free);\n"
        "                         layer inputs that do not fit go to host memory, attention outputs are recomputed\n"
        "  --host-mem GiB         pinned host memory the step may keep layer inputs in (default: the cgroup's\n"
        "                         limit, else the physical memory, less an eighth)\n"
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
        "--lr_scheduler_type, --max_grad_norm, --output_dir, --model_name_or_path, --model_max_length,\n"
        "--save_steps).\n");
}

/* HF Trainer spellings a user may reach for, and the flag each means here. */
static const char *const FLAG_ALIASES[][2] = {
    {"--model-name-or-path", "--model"}, {"--output-dir", "--out"}, {"--learning-rate", "--lr"},
    {"--model-max-length", "--ctx"}, {"--per-device-train-batch-size", "--batch"},
    {"--gradient-accumulation-steps", "--grad-accum"}, {"--warmup-steps", "--warmup"}, {"--max-grad-norm", "--clip"},
    {"--save-steps", "--save-every"}, {"--logging-steps", "--log-every"}, {"--adam-epsilon", "--eps"},
    {"--resume-from-checkpoint", "--resume"}, {"--data-path", "--data"}, {"--lora-r", "--lora-rank"},
    {"--lr-scheduler-type", "--lr-scheduler"},
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
        if (!strcmp(a, "--no-train-embed")) { o->train_embed = 0; continue; }
        if (!strcmp(a, "--no-train-norms")) { o->train_norms = 0; continue; }
        if (!strcmp(a, "--overwrite") || !strcmp(a, "--overwrite-output-dir")) { o->overwrite = 1; continue; }
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
        else if (!strcmp(a, "--rope-scaling")) {
            if (!strcmp(v, "linear")) o->rope_scaling = ROPE_EXTEND_LINEAR;
            else if (!strcmp(v, "yarn")) o->rope_scaling = ROPE_EXTEND_YARN;
            else return set_error("--rope-scaling must be linear or yarn, got '%s'", v);
        }
        else if (!strcmp(a, "--gpu-mem")) { if (parse_double_arg(a, v, 1.0 / 1024, 1 << 20, &o->gpu_mem_gib)) return -1; }
        else if (!strcmp(a, "--host-mem")) { if (parse_double_arg(a, v, 0, 1 << 20, &o->host_mem_gib)) return -1; }
        else if (!strcmp(a, "--batch")) { if (parse_int_arg(a, v, 1, 1 << 16, &o->batch)) return -1; }
        else if (!strcmp(a, "--grad-accum")) { if (parse_int_arg(a, v, 1, 1 << 20, &o->grad_accum)) return -1; }
        else if (!strcmp(a, "--group-ratio")) {
            if (parse_double_arg(a, v, -HUGE_VAL, HUGE_VAL, &x)) return -1;
            if (!(x > 0 && x <= 1)) return set_error("--group-ratio must be in (0, 1], got %s", v);
            o->group_ratio = x;
        }
        else if (!strcmp(a, "--lora-rank")) { if (parse_int_arg(a, v, 1, 65536, &o->lora_rank)) return -1; }
        else if (!strcmp(a, "--lora-alpha")) {
            if (parse_double_arg(a, v, -HUGE_VAL, HUGE_VAL, &x)) return -1;
            if (!(x > 0)) return set_error("--lora-alpha must be positive, got %s", v);
            o->lora_alpha = x;
        }
        else if (!strcmp(a, "--max-steps")) { if (parse_int_arg(a, v, 1, INT32_MAX, &o->max_steps)) return -1; }
        else if (!strcmp(a, "--lr")) {
            if (parse_double_arg(a, v, -HUGE_VAL, HUGE_VAL, &x)) return -1;
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
            if (parse_double_arg(a, b1, -HUGE_VAL, HUGE_VAL, &o->beta1) || parse_double_arg(a, b2, -HUGE_VAL, HUGE_VAL, &o->beta2)) return -1;
            if (!(o->beta1 >= 0 && o->beta1 < 1 && o->beta2 >= 0 && o->beta2 < 1))
                return set_error("--betas must both lie in [0, 1), got '%s'", v);
        }
        else if (!strcmp(a, "--eps")) {
            if (parse_double_arg(a, v, -HUGE_VAL, HUGE_VAL, &x)) return -1;
            if (!(x > 0)) return set_error("--eps must be positive, got %s", v);
            o->eps = x;
        }
        else if (!strcmp(a, "--weight-decay")) {
            if (parse_double_arg(a, v, -HUGE_VAL, HUGE_VAL, &x)) return -1;
            if (!(x >= 0)) return set_error("--weight-decay must not be negative, got %s", v);
            o->weight_decay = x;
        }
        else if (!strcmp(a, "--warmup")) { if (parse_int_arg(a, v, 0, INT32_MAX, &o->warmup)) return -1; }
        else if (!strcmp(a, "--lr-scheduler")) { if (lr_schedule_parse(a, v, &o->lr_scheduler)) return -1; }
        else if (!strcmp(a, "--clip")) {
            if (parse_double_arg(a, v, -HUGE_VAL, HUGE_VAL, &x)) return -1;
            if (!(x >= 0)) return set_error("--clip must not be negative (0 turns clipping off), got %s", v);
            o->clip = x;
        }
        else if (!strcmp(a, "--seed")) { if (parse_u64_arg(a, v, &o->seed)) return -1; }
        else if (!strcmp(a, "--out")) o->out_dir = v;
        else if (!strcmp(a, "--rank")) { if (parse_int_arg(a, v, 0, DIST_MAX_RANKS - 1, &o->rank)) return -1; }
        else if (!strcmp(a, "--world-size")) { if (parse_int_arg(a, v, 1, DIST_MAX_RANKS, &o->world_size)) return -1; }
        else if (!strcmp(a, "--dist-file")) o->dist_file = v;
        else if (!strcmp(a, "--resume")) o->resume_dir = v;
        else if (!strcmp(a, "--save-every")) { if (parse_int_arg(a, v, 0, INT32_MAX, &o->save_every)) return -1; }
        else if (!strcmp(a, "--save-total-limit")) { if (parse_int_arg(a, v, 0, INT32_MAX, &o->save_total_limit)) return -1; }
        else if (!strcmp(a, "--log-every")) { if (parse_int_arg(a, v, 1, INT32_MAX, &o->log_every)) return -1; }
        else if (!strcmp(a, "--peak-tflops")) {
            if (parse_double_arg(a, v, -HUGE_VAL, HUGE_VAL, &x)) return -1;
            if (!(x > 0)) return set_error("--peak-tflops must be positive, got %s", v);
            o->peak_tflops = x;
        }
        else return set_error("unknown flag %s (see --help)", a);
    }
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
    size_t G = 0;
    if (o->s2 && s2_group_size((size_t)o->ctx, o->group_ratio, &G) != 0) return -1;
    o->group = (int)G; /* 0: full attention (--no-s2, or a ratio of 1) */
    if (o->save_every > o->max_steps) o->save_every = 0;
    return 0;
}

/* What trains beside LoRA, in words for the startup line and the run's recipe: " + embed +
 * norms" (LoRA+, the default), " + embed", " + norms" or "" (plain LoRA). */
static const char *train_parts(const TrainOptions *o) {
    static const char *const words[4] = {"", " + norms", " + embed", " + embed + norms"};
    return words[2 * (o->train_embed != 0) + (o->train_norms != 0)];
}

#endif /* TRAIN_FLAGS_C */
