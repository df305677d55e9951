/* 05_train.c: the LongLoRA fine-tuning loop.
 *
 * Teaches: how a fine-tuning run is put together around the model of 02 and the LoRA+,
 * S2-Attn and AdamW of 03. Read in this order: the trainer (what a run holds), the step
 * (gradient accumulation over micro-batches, clipping, AdamW at a warmup-then-constant
 * learning rate, or transformers' cosine or linear decay: --lr-scheduler), then the run
 * (set-up, the loop with its progress line: tokens/s, MFU, peak memory, ETA; a CSV log;
 * checkpoints). Around it, in their own files:
 *   05_flags.c       the command line (flags a user of llm.c or the HF Trainer would guess)
 *   05_data.c        data: documents joined with EOS and packed into N-token sequences, or
 *                    instruction records with the prompt masked out of the loss; a seeded
 *                    shuffle, reshuffled each epoch
 *   05_checkpoint.c  checkpoints that resume exactly: the adapter in PEFT's format, the fp32
 *                    trainable weights with their AdamW moments, the data position and the
 *                    RNG state, written under a temporary name and renamed into place
 *   05_dist.c        several processes (data parallel, ZeRO-1, --shard-weights)
 *   05_train_gpu.c   the GPU step, with 05_plan.c, its memory plan (--gpu-mem, --host-mem)
 * Runs on: the GPU where the build has CUDA and the machine a GPU (05_train_gpu.c: bf16
 * weights read from the files straight to the GPU by 04_load.c, no fp32 host copy of the
 * frozen ones; 04's kernels, activation checkpointing; --device cpu|gpu chooses by
 * 04_load.c's device_choose, the startup line says which and why), else the CPU, with the fp32 code of 02 and 03. The CPU trains
 * tiny models end to end on a laptop or in CI; a real model there is correct but slow
 * (SmolLM2-135M: about 15 tokens/s on 2 busy cores). train_step() dispatches; the CPU step
 * is the reference the GPU step is checked against (tests/test_gpu_train.c).
 * Several processes: --world-size K with --rank and --dist-file (or mpirun's environment)
 * train data-parallel (05_dist.c): the same losses and adapter as one process with K times
 * the gradient accumulation; CPU ranks share a file, GPU ranks talk through NCCL.
 * Checked by: tests/test_train.c (flags, data, SFT masking, exact resume, SIGINT, non-finite
 * loss), tests/test_train_e2e.c (a tiny model learns; its adapter reloads and helps on
 * held-out text), tests/test_train_ref.c (the step against transformers + peft + torch
 * AdamW), tests/test_train_text.sh (text and SFT through a real tokenizer),
 * tests/test_dist_train.sh and tests/test_dist.c (several processes, 05_dist.c).
 * What trains: LoRA+ (LoRA, embed_tokens and every RMSNorm weight), or less for ablations
 * (--no-train-embed, --no-train-norms): a frozen tensor is no optimizer entry, so it has no
 * fp32 state on the GPU, no place in the checkpoint and none in the adapter's modules_to_save.
 * Leaves out: transformers' other schedules (polynomial, cosine with restarts, ...), LoRA
 * dropout on the GPU, mixed CPU and GPU ranks.
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
#include "04_load.c"  /* where the step runs (device_choose), the GPU's peak, the GPU loader */
#include "05_flags.c" /* TrainOptions: the command line */
#include "05_data.c"  /* Dataset: packed text or SFT records, the seeded shuffle */

#include <dirent.h>
#include <signal.h>
#include <sys/types.h>

/* =======================================================================================
 * 1. The trainer: model, adapter, optimizer, data, and where the step runs
 * ===================================================================================== */

typedef struct {
    TrainOptions opt;
    Model model;                /* fp32 base weights (frozen) and the LoRA+ embed/norms (trained unless --no-train-*) */
    LoraAdapter lora;           /* A, B of q,k,v,o (and their gradients) */
    LoraTrainer lt;             /* 03's: the gradients of embed and the norms, the CPU step's
                                   activations for one [B, N] micro-batch, AdamW (the fp32
                                   masters are the tensors themselves; m, v there) */
    Dataset data;
    Tokenizer tokenizer;        /* stage 01's, when there is one */
    TextCodec codec;            /* what the data code calls */
    int32_t *inputs;            /* [B, N] */
    int32_t *targets;           /* [B, N] */
    int step;                   /* optimizer steps completed */
    char last_checkpoint[4400]; /* "" until one is written */
    /* progress */
    double flops_per_token;     /* model FLOPs: 6 * params + attention, per trained token */
    double peak_tflops;         /* the device's peak for MFU: --peak-tflops, else the GPU's from 04's table (0: n/a) */
    char peak_note[400];        /* where that peak comes from, for the startup line */
    size_t n_params, n_trainable;
    FILE *csv;                  /* OUT/train_log.csv */
    struct GpuTrainer *gpu;     /* the GPU step's state (05_train_gpu.c), or NULL: the step runs on the CPU */
    char device_note[320];      /* where the step runs and why, for the startup line */
    char load_note[400];        /* how the weights were loaded: time, bytes read, peak host RSS */
    float *dist_flat;           /* [P + 1] several ranks: the flat gradients (+ the loss sum) they add up */
    int out_lock_fd;            /* OUT/.lock, held while the run lives (rank 0; 0: none) */
} Trainer;

/* =======================================================================================
 * 2. The step
 * ===================================================================================== */

typedef struct {
    double loss;        /* mean over the micro-batches of each one's mean target loss */
    double grad_norm;   /* before clipping */
    double lr;
} StepResult;

/* After n_micro micro-batches whose losses add up to r->loss and whose gradients were
 * added up: the mean loss, the mean gradients, their global norm, clipping to --clip, and
 * this step's learning rate. 0 when AdamW may run, -1 when the loss or the norm is not
 * finite (the step stops there). */
static int step_finish_grads(Trainer *t, StepResult *r, int n_micro) {
    if (!isfinite(r->loss)) return -1;
    r->loss /= n_micro;
    if (n_micro > 1) lora_trainer_scale_grads(&t->lt, 1.0f / (float)n_micro);
    r->grad_norm = lora_trainer_grad_norm(&t->lt);
    if (!isfinite(r->grad_norm)) return -1;
    double clip = t->opt.clip;
    if (clip > 0 && r->grad_norm > clip) lora_trainer_scale_grads(&t->lt, (float)(clip / (r->grad_norm + 1e-6)));
    r->lr = adamw_lr_at(&t->lt.opt.cfg, t->step);
    return 0;
}

/* Forward and backward of --grad-accum micro-batches, then clip and AdamW: the reference
 * implementation on the CPU (02's fp32 model, 03's LoRA hook and S2-Attn), one process.
 * (05_dist.c's train_step_cpu_ranks is the same step spread over several processes.) */
static StepResult train_step_cpu(Trainer *t) {
    const TrainOptions *o = &t->opt;
    StepResult r = {0, 0, 0};
    lora_trainer_zero_grads(&t->lt);
    for (int micro = 0; micro < o->grad_accum; micro++) {
        dataset_next_batch(&t->data, o->batch, t->inputs, t->targets);
        float loss = lora_trainer_accumulate(&t->lt, t->inputs, t->targets, (size_t)o->batch, (size_t)o->ctx);
        if (!isfinite(loss)) { r.loss = loss; return r; }
        r.loss += loss;
    }
    if (step_finish_grads(t, &r, o->grad_accum) == 0) adamw_step(&t->lt.opt, (float)r.lr);
    return r;
}

#include "05_dist.c" /* several processes: the communicator, the data-parallel CPU step, ZeRO-1 */
#ifdef USE_CUDA
#include "05_train_gpu.c" /* the GPU step: 04's kernels, bf16 compute, activation checkpointing */
#endif

/* One optimizer step: on the GPU when trainer_init set one up, else on the CPU (over the
 * ranks when there are several). */
static StepResult train_step(Trainer *t) {
#ifdef USE_CUDA
    if (t->gpu) return train_step_gpu(t);
#endif
    return comm_active() ? train_step_cpu_ranks(t) : train_step_cpu(t);
}

#include "05_checkpoint.c" /* checkpoint_save, checkpoint_find, checkpoint_load, prune_checkpoints */

/* =======================================================================================
 * 3. The run: set up, loop, save
 * ===================================================================================== */

/* ---- progress: model FLOPs (for MFU), memory, time ------------------------------------- */

/* FLOPs per token of one training step: 6 per parameter (forward 2, backward 4) plus the
 * attention matmuls (QK^T and PV: 4 H d per visible key forward, twice that backward),
 * counting only the keys a query really sees under S2-Attn's causal groups. A step's FLOPs
 * are this x B x N x accumulation x ranks (the startup line prints them); MFU is those per
 * second over the peak (--peak-tflops, else the GPU's dense bf16 peak from 04_load.c). The
 * count is the model's, as MFU is defined: the GPU step's recompute is not counted. */
static double train_flops_per_token(const Config *c, int N, int G) {
    double visible = 0; /* keys per query, averaged over positions and heads */
    for (int h = 0; h < c->n_heads; h++) visible += s2_head_pairs((size_t)N, h, c->n_heads, (size_t)G, 1);
    visible /= (double)N * c->n_heads;
    double attn = 12.0 * c->n_layers * (double)c->n_heads * c->head_dim * visible;
    return 6.0 * (double)config_param_count(c) + attn;
}

static void format_duration(char *buf, size_t cap, double s) {
    if (!(s >= 0) || s > 1e8) { snprintf(buf, cap, "?"); return; }
    long t = (long)(s + 0.5);
    if (t >= 3600) snprintf(buf, cap, "%ldh%02ldm", t / 3600, (t / 60) % 60);
    else if (t >= 60) snprintf(buf, cap, "%ldm%02lds", t / 60, t % 60);
    else snprintf(buf, cap, "%lds", t);
}

/* ---- the loop -------------------------------------------------------------------------- */

static volatile sig_atomic_t g_stop_signal = 0;
static void on_stop_signal(int sig) {
    g_stop_signal = sig;
    signal(sig, SIG_DFL); /* a second Ctrl-C ends the program at once */
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

/* The adapter of the final step also goes into OUT itself, so OUT is a PEFT folder. */
static void save_or_die(Trainer *t, double loss, int final) {
#ifdef USE_CUDA
    train_gpu_gather_state(t); /* several ranks: every slice of the moments to every rank */
    if (t->gpu) gpu_train_download_state(t->gpu); /* the trained fp32 masters and moments back to the host */
#endif
    if (!t->gpu) { /* ZeRO-1 on the CPU: each rank updated only its slice of the moments */
        dist_gather_state(&t->lt.opt, 2, t->dist_flat);
        dist_gather_state(&t->lt.opt, 3, t->dist_flat);
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
    if (t->step >= o->max_steps) { /* resumed from the last step's checkpoint of a run that ended before its final adapter */
        if (comm_is_root() && lora_save_adapter(&t->lora, &t->model, o->out_dir, o->model_dir) != 0) die("%s", last_error());
        if (!o->quiet) printf("done: the run had reached step %d; wrote its final adapter into %s\n", t->step, o->out_dir);
        return 0;
    }
    if (comm_is_root()) t->csv = open_csv_log(o->out_dir, t->step);
    size_t tokens_per_step = (size_t)o->batch * o->ctx * o->grad_accum * comm_world();
    if (!o->quiet) {
        char targets[64] = "";
        for (int w = 0; w < LORA_NUM_TARGETS; w++)
            if (t->lora.cfg.targets & (1u << w))
                snprintf(targets + strlen(targets), sizeof targets - strlen(targets), "%s%.*s", targets[0] ? "," : "",
                         (int)strcspn(LORA_TARGET_NAMES[w], "_"), LORA_TARGET_NAMES[w]);
        printf("model: D=%d L=%d H=%d Hk=%d d=%d F=%d V=%d, %.2fM parameters, %.3fM trainable (LoRA r=%d alpha %g on %s%s)\n",
               c->dim, c->n_layers, c->n_heads, c->n_kv_heads, c->head_dim, c->ffn_dim, c->vocab_size, t->n_params / 1e6,
               t->n_trainable / 1e6, o->lora_rank, o->lora_alpha, targets, train_parts(o));
        if (o->adapter_dir) printf("adapter: started from %s\n", o->adapter_dir);
        if (comm_active())
            printf("ranks: %d (%s), each takes every %d-th micro-batch; AdamW state sharded (ZeRO-1)\n", comm_world(),
                   g_comm.backend == COMM_NCCL ? "NCCL" : "shared file", comm_world());
        printf("train: N=%d %s, B=%d x %d accumulation x %d ranks = %zu tokens/step, RoPE %s factor %g, %zu sequences/epoch, "
               "lr %g (warmup %d, then %s%s), %s\n",
               o->ctx, o->group ? "S2-Attn" : "full attention", o->batch, o->grad_accum, comm_world(), tokens_per_step,
               ROPE_TYPE_NAMES[c->rope_type], c->rope_factor, t->data.n_seqs, o->lr, o->warmup, LR_SCHEDULE_NAMES[o->lr_scheduler],
               o->lr_scheduler == LR_CONSTANT ? "" : " decay to 0 at --max-steps", t->device_note);
        printf("load: %s\n", t->load_note);
        /* the model FLOPs of one step, what MFU divides by the peak */
        printf("MFU: %.3g model FLOPs per step (6 x parameters + attention, per token x %zu tokens) against %s\n",
               t->flops_per_token * (double)tokens_per_step, tokens_per_step, t->peak_note);
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
        double mfu = t->peak_tflops > 0 ? t->flops_per_token * tok_s / (t->peak_tflops * 1e12) : -1;
        double rss = peak_rss_bytes(), mem = rss < 0 ? -1 : rss / (1024.0 * 1024.0 * 1024.0); /* the process's peak resident memory (04_load.c) */
#ifdef USE_CUDA
        if (t->gpu) mem = tg_gib(gpu_train_used_bytes()); /* GPU memory in use (all of it is allocated up front) */
#endif
        if (t->csv) fprintf(t->csv, "%d,%.9g,%.9g,%.9g,%zu,%.6f,%.3f,%.6f,%.4f\n", t->step, r.loss, r.lr, r.grad_norm, tokens_per_step, dt, tok_s,
                mfu >= 0 ? mfu : NAN, mem); /* mfu nan: no peak known (the CPU, an unknown GPU) and no --peak-tflops */
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

/* ---- set-up: model, adapter, optimizer, data, a resume ------------------------------------ */

/* A random model of a preset shape (02's config_from_shape; weights N(0, 0.02^2), norms
 * near 1), RoPE interpolated to ctx; the test shape "tiny" takes its vocabulary from the
 * tokenizer when there is one. -1 + last_error() for an unknown shape or an unreadable tokenizer. */
static int model_init_shape(Model *m, const char *shape, const char *tokenizer_path, long ctx, uint64_t seed) {
    Config c;
    if (config_from_shape(shape, &c) != 0) return -1;
    if (!strcmp(shape, "tiny") && tokenizer_path) {
        Tokenizer tok;
        if (tok_load(&tok, tokenizer_path) != 0) return -1;
        c.vocab_size = tok.vocab_size;
        tok_free(&tok);
    }
    config_set_target_ctx(&c, ctx);
    model_init_random(m, &c, seed, 0.02f);
    return 0;
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

/* Outputs never destroy inputs: --out and --save-tokens against every input (common.h's
 * check_output_path); --resume counts only with --overwrite, which may empty --out. */
static int check_train_outputs(const TrainOptions *o) {
    NamedPath in[TRAIN_MAX_DATA_FILES + 6];
    int n = 0;
    in[n++] = (NamedPath){"--model", o->model_dir};
    in[n++] = (NamedPath){"--tokenizer", o->tokenizer_path};
    in[n++] = (NamedPath){"--adapter", o->adapter_dir};
    in[n++] = (NamedPath){"--sft", o->sft_file};
    for (int i = 0; i < o->n_data_files; i++) in[n++] = (NamedPath){"--data", o->data_files[i]};
    if (check_output_path("--save-tokens", o->save_tokens, 0, in, n) != 0) return -1;
    if (o->overwrite) in[n++] = (NamedPath){"--resume", o->resume_dir};
    return check_output_path("--out", o->out_dir, o->overwrite, in, n);
}

/* Where the step runs: 04_load.c's device_choose, with the GPU step's reasons not to
 * (05_train_gpu.c's train_gpu_why_not); sets the startup line's words and the peak MFU is
 * measured against (--peak-tflops, else the GPU's from 04's table). 1: the GPU. */
static int train_choose_device(Trainer *t, const Config *c, double lora_dropout) {
    const TrainOptions *o = &t->opt;
    const char *gpu = NULL, *why_not = NULL;
    int has_cuda = 0;
#ifdef USE_CUDA
    char name[256];
    has_cuda = 1;
    train_gpu_select_device(o); /* several ranks: rank r on GPU r */
    gpu = gpu_visible_name(name, sizeof name);
    why_not = train_gpu_why_not(c, lora_dropout);
#else
    (void)c;
    (void)lora_dropout;
#endif
    int on_gpu = device_choose(o->device, has_cuda, gpu, why_not, "trains", t->device_note, sizeof t->device_note);
    if (on_gpu < 0) die("%s", last_error());
    t->peak_tflops = o->peak_tflops;
    if (o->peak_tflops > 0) snprintf(t->peak_note, sizeof t->peak_note, "a peak of %g TFLOP/s (--peak-tflops)", o->peak_tflops);
    else if (!on_gpu) snprintf(t->peak_note, sizeof t->peak_note, "no peak on the CPU: MFU is n/a unless --peak-tflops gives one");
    else if ((t->peak_tflops = gpu_peak_tflops(gpu)) > 0)
        snprintf(t->peak_note, sizeof t->peak_note, "the %s's dense bf16 peak, %g TFLOP/s (--peak-tflops overrides)", gpu ? gpu : "GPU", t->peak_tflops);
    else
        snprintf(t->peak_note, sizeof t->peak_note, "no peak: the %s is not in the table (A100, H100, H200), so MFU is n/a; give --peak-tflops", gpu ? gpu : "GPU");
    return on_gpu;
}

/* Everything before the first step: model, adapter, optimizer, data, and a resume. */
static void trainer_init(Trainer *t) {
    TrainOptions *o = &t->opt;
    /* the --out folder first: one run at a time (05_checkpoint.c's out_lock) */
    int rank0 = 0, world0 = 1;
    dist_rank_world(o->rank, o->world_size, &rank0, &world0);
    if (check_train_outputs(o) != 0 || (rank0 == 0 && out_lock(t) != 0)) die("%s", last_error());
    /* where the step runs, decided from the model's config before its weights are read: on
     * the GPU, the host keeps only embed and the norms in fp32 (the trained tensors' masters)
     * and train_gpu_setup reads the frozen matrices from the files straight to the GPU */
    Config file_cfg;
    if (o->model_dir) {
        if (model_read_config(&file_cfg, o->model_dir, o->ctx) != 0) die("%s", last_error());
    } else if (model_init_shape(&t->model, o->shape, o->tokenizer_path, o->ctx, o->seed) != 0) die("%s", last_error());
    int on_gpu = train_choose_device(t, o->model_dir ? &file_cfg : &t->model.cfg, o->adapter_dir ? lora_adapter_dropout(o->adapter_dir) : 0);
    /* the model: its context sets --ctx's default, --ctx sets the RoPE interpolation */
    double load_seconds = now_seconds();
    if (o->model_dir && model_try_load_host(&t->model, o->model_dir, o->ctx, !on_gpu) != 0) die("%s", last_error());
    load_seconds = now_seconds() - load_seconds;
    if (o->rope_scaling && config_extend(&t->model.cfg, o->ctx, (RopeExtend)o->rope_scaling) != 0) die("%s", last_error());
    const Config *c = &t->model.cfg;
    if (o->ctx == 0) o->ctx = c->max_pos;
    if (train_validate(o) != 0) die("%s", last_error());

    /* data */
    if (codec_open(&t->codec, &t->tokenizer, o->tokenizer_path ? o->tokenizer_path : o->model_dir, o->tokenizer_path != NULL, c) != 0) die("%s", last_error());
    int rc = o->sft_file ? dataset_load_sft(&t->data, &t->codec, o->sft_file, o->template_name, o->sft_pack, o->ctx)
                         : dataset_load_text(&t->data, &t->codec, o->data_files, o->n_data_files, o->ctx);
    if (rc != 0) die("%s", last_error());
    dataset_start(&t->data, o->seed);

    /* LoRA+ (less what --no-train-embed / --no-train-norms freeze) and AdamW over exactly the trainable tensors */
    if (o->adapter_dir) { /* start from an existing PEFT adapter: its rank, alpha and targets */
        if (lora_load_adapter(&t->lora, &t->model, o->adapter_dir) != 0 || lora_set_trained(&t->lora, o->train_embed, o->train_norms, o->adapter_dir) != 0)
            die("%s", last_error());
        o->lora_rank = t->lora.cfg.rank;
        o->lora_alpha = t->lora.cfg.alpha;
    } else {
        LoraConfig lc = lora_default_config();
        lc.rank = o->lora_rank;
        lc.alpha = (float)o->lora_alpha;
        lc.seed = o->seed;
        lc.train_embed = o->train_embed;
        lc.train_norms = o->train_norms;
        if (lora_init(&t->lora, c, &lc) != 0) die("%s", last_error());
    }
    AdamWConfig oc = {(float)o->lr, (float)o->beta1, (float)o->beta2, (float)o->eps, (float)o->weight_decay, o->warmup, o->lr_scheduler, o->max_steps};
    lora_trainer_init(&t->lt, &t->model, &t->lora, &oc, 0, 0, (size_t)o->group); /* activations below, for the CPU step only */

    if (o->shard_weights && !on_gpu) die("--shard-weights shards the frozen bf16 weights of the GPU step; this run trains on the CPU");
    /* several processes: join the others (NCCL for GPU ranks, the shared file for CPU ranks) */
    if (comm_init(o->rank, o->world_size, o->dist_file, on_gpu) != 0) die("%s", last_error());
    if (!comm_is_root()) o->quiet = 1; /* logs come from rank 0 */
    /* this run's identity into --out, once it may write there (05_checkpoint.c's out_claim) */
    if (comm_is_root() && out_claim(t) != 0) die("%s", last_error());
    if (o->save_tokens && comm_is_root()) { /* tokenize once: later runs can read this file instead of the text */
        if (tokfile_write(o->save_tokens, t->data.stream, t->data.stream_len, c->vocab_size) != 0) die("%s", last_error());
        printf("wrote %zu tokens to %s\n", t->data.stream_len, o->save_tokens);
    }
    if (comm_active()) t->dist_flat = (float *)xmalloc((flat_count(&t->lt.opt) + 1) * sizeof(float)); /* [P + 1] */
    if (!on_gpu) act_plan(&t->lt.act, c, (size_t)o->batch, (size_t)o->ctx, 1);
    else lora_trainer_drop_plus_grads(&t->lt); /* the GPU step keeps its gradients on the GPU */
    t->inputs = (int32_t *)xmalloc((size_t)o->batch * o->ctx * sizeof(int32_t));  /* [B, N] */
    t->targets = (int32_t *)xmalloc((size_t)o->batch * o->ctx * sizeof(int32_t)); /* [B, N] */
    t->n_params = config_param_count(c);
    for (size_t k = 0; k < t->lt.opt.count; k++) t->n_trainable += t->lt.opt.params[k].numel;
    t->flops_per_token = train_flops_per_token(c, o->ctx, o->group);

    if (o->resume_dir) {
        char dir[4096];
        if (checkpoint_find(o->resume_dir, dir, sizeof dir) != 0 || checkpoint_load(t, dir) != 0) die("%s", last_error());
        char adapter[4400];
        int final_missing = !file_exists(path_join(adapter, sizeof adapter, o->out_dir, "adapter_config.json"));
        if (t->step >= o->max_steps && !(t->step == o->max_steps && final_missing)) /* a run that ended mid-save may finish it */
            die("the checkpoint %s is at step %d, already at --max-steps %d; raise --max-steps to train on", dir, t->step, o->max_steps);
        if (comm_is_root()) printf("resumed from %s at step %d (epoch %llu, sequence %zu of %zu)\n", dir, t->step,
               (unsigned long long)t->data.epoch, t->data.pos, t->data.n_seqs);
    }
    const char *src = !o->model_dir ? "random weights (--init random)" : on_gpu ? "embed and the norms in fp32 on the host" : "fp32 weights on the host";
    snprintf(t->load_note, sizeof t->load_note, "%s in %.1f s, peak host RSS %.2f GB", src, load_seconds, peak_rss_bytes() / 1e9);
#ifdef USE_CUDA
    if (on_gpu) {
        double t0 = now_seconds();
        train_gpu_setup(t); /* after a resume, so the GPU starts from the checkpoint's state */
        double s = now_seconds() - t0;
        if (t->gpu->load_note[0])
            snprintf(t->load_note, sizeof t->load_note, "frozen weights straight to the GPU in bf16: %s; %.1f s for the whole load (%.1f s of it embed and the norms in fp32 on the host)",
                     t->gpu->load_note, load_seconds + s, load_seconds);
        else
            snprintf(t->load_note + strlen(t->load_note), sizeof t->load_note - strlen(t->load_note), ", then bf16 to the GPU in %.1f s, peak host RSS %.2f GB", s, peak_rss_bytes() / 1e9);
    }
#endif
}

static void trainer_free(Trainer *t) {
#ifdef USE_CUDA
    train_gpu_free(t);
#endif
    if (t->csv) fclose(t->csv);
    if (t->out_lock_fd > 0) close(t->out_lock_fd); /* lets go of OUT/.lock */
    free(t->dist_flat);
    free(t->inputs);
    free(t->targets);
    lora_trainer_free(&t->lt);
    lora_free(&t->lora);
    dataset_free(&t->data);
    if (t->codec.tok) tok_free(&t->tokenizer);
    model_free(&t->model);
    memset(t, 0, sizeof *t);
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
        if (!o->shape) die("--shard-weights needs --model DIR or --init random --shape NAME (" SHAPE_NAMES ")");
        if (config_from_shape(o->shape, &c) != 0) die("%s", last_error());
    }
    int ctx = o->ctx ? o->ctx : c.max_pos;
    int alone = comm_alone(world, o->dist_file); /* one rank with --dist-file: a communicator of one */
    dist_print_memory_plan(stdout, o->model_dir ? o->model_dir : o->shape, &c, (size_t)ctx, alone ? 8 : world, 80.0);
    if (alone) die("--shard-weights shards the frozen weights over several GPU ranks (--world-size K, or mpirun); the plan above is for 8");
}

/* The whole program; tests call it as a function. */
static API int train_main(int argc, char **argv) {
    Trainer *t = (Trainer *)xcalloc(1, sizeof(Trainer));
    train_defaults(&t->opt);
    int rc = train_parse_args(&t->opt, argc, argv);
    if (rc == 1) { train_usage(stdout); free(t); return 0; }
    if (rc != 0) die("%s", last_error());
    if (t->opt.shard_weights) {
        int rank, world;
        dist_rank_world(t->opt.rank, t->opt.world_size, &rank, &world);
        if (world <= 1 || rank == 0) shard_weights_plan(&t->opt, world);
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

