/* 05_plan.c: the GPU step's memory plan (05_train_gpu.c includes it), plain host arithmetic:
 * no CUDA here, so tests/test_train_plan.c checks it on any machine.
 *
 * Teaches: how a B x N LongLoRA step is fitted into a GPU memory budget (--gpu-mem) and a
 * pinned host memory budget (--host-mem), before anything is allocated. Per layer the step
 * keeps one checkpoint, the layer's input [T, D] bf16 (T = B*N); the rest is one layer's
 * work buffers, reused by every layer. The plan decides, in this order of preference:
 *   1. the MLP tile: the forward, recompute and backward of the MLP run over the tokens in
 *      tiles of mlp_tile rows, so its [T, F] temporaries (gate, up, h) shrink to
 *      [mlp_tile, F] and never outgrow the attention's own work buffers (datt, dq, dk, dv,
 *      [T, 2 H*d + 2 Hk*d], which the same arena holds in the backward); the loss over the
 *      vocabulary is already chunked (ce_chunk rows of [rows, V] logits at a time);
 *   2. how many layers keep their attention output and lse (their recompute runs no
 *      attention): only where a query sees 4096 keys or more, as many as fit with 2 GiB to
 *      spare (bench/TRAIN_NOTES.md has the numbers);
 *   3. how many layer inputs live in pinned host memory (n_host: layers 0 .. n_host-1, the
 *      ones the forward writes first and the backward reads last): as few as needed. They
 *      pass through two GPU staging buffers (copied out during the forward, brought back one
 *      layer ahead during the backward, both on a side stream).
 *   Keeping attention outputs comes before keeping checkpoints on the GPU, since a host
 *   checkpoint costs copies that overlap compute, and a recomputed attention costs time.
 *   4. when nothing fits so (and S2-Attn is on, with an even number of heads and kv heads),
 *      the attention block in chunks: under S2 each group is independent, the shifted half
 *      of the heads too (its groups start G/2 later, common.h's s2_first_key), so each half's
 *      q, k, v projection, RoPE, attention forward and backward and the projections'
 *      backward run over attn_chunk rows of whole groups at a time (tp_pieces
 *      lists the calls); q, k, v, their gradients, the normed input and the fp32 dQ accumulator
 *      shrink from [T, ...] to [attn_chunk, ...] (one half's heads), sharing the arena with
 *      the MLP tile. The fewest chunks that fit (whole groups each), like the MLP tile.
 * Leaves out: chunking full causal attention (G = 0: every query sees every earlier key),
 * and the [T, D] buffers the chunked path still keeps (x2, xn2, dx, dtmp, att).
 *
 * Shape legend: B batch, N sequence, T = B*N tokens, D model width, H heads, Hk kv heads,
 * d head dim, F ffn width, V vocab, L layers, R LoRA rank.
 */
#ifndef TRAIN_PLAN_C
#define TRAIN_PLAN_C

#define TP_GIB (1024.0 * 1024.0 * 1024.0)

typedef struct {
    /* what is asked */
    size_t B, N, G, R;          /* batch, sequence, S2 group (0: full), LoRA rank */
    int lora_down;              /* the down projection has an adapter (one more [tile, F] buffer) */
    double gpu_avail;           /* bytes the plan may allocate on the GPU (budget or free memory, minus what is in use) */
    double host_avail;          /* bytes of pinned host memory the checkpoints may take */
    double attn_ws_bytes;       /* 04's attention backward workspace for B x N (attn_backward_workspace_bytes) */
    int keep_att_policy;        /* -1: by cost and memory; k >= 0: at most k (tests) */
    int host_policy;            /* -1: as few as fit; k >= 0: exactly k layer inputs on the host (tests) */
    size_t tile_policy;         /* 0: chosen (above); else mlp_tile rows (tests) */
    long chunk_policy;          /* 0: chunk only when nothing fits otherwise; -1: never; k > 0: always, k groups a chunk (tests) */
    /* what the plan decides */
    size_t T, mlp_tile, ce_chunk, n_keep_att, n_host;
    size_t attn_chunk;          /* rows of one half's attention chunk (a multiple of G); 0: the whole layer at once */
    double chunk_bytes;         /* the chunk's buffers in the arena + its attention workspace (0 unchunked) */
    double slot_bytes;          /* one checkpoint: T x D bf16 */
    double ckpt_gpu_bytes;      /* the checkpoints on the GPU + the staging buffers of the host ones */
    double ckpt_host_bytes;     /* pinned host memory: n_host checkpoints */
    double keep_att_bytes;      /* the kept attention outputs and lse */
    double work_bytes;          /* one layer's work buffers, the loss's chunk and the kernels' workspaces */
    double gpu_bytes;           /* all of it on the GPU: ckpt_gpu + keep_att + work */
} TrainPlan;

/* One call of the chunked attention: heads [half * H/2, (half+1) * H/2) over n_seg groups of
 * seg_len tokens each, rows row0 .. row0 + n_seg * seg_len of the batch (positions pos0 ..
 * in their sequence); its lse [n_seg, H/2, seg_len] at lse_off of the layer's [B, H, N]. */
typedef struct {
    size_t row0, pos0, n_seg, seg_len, lse_off;
    int half;
} TpPiece;

static const double tp_margin = 768.0 * 1024 * 1024;   /* cuBLAS workspaces and fragmentation */
static const double tp_keep_spare = 2.0 * TP_GIB;      /* kept attention outputs leave this free */

/* Elements of the attention's part of the arena: unchunked, datt, dq [T, H*d], dk, dv
 * [T, Hk*d] of the backward; chunked, one half's xn1, dxn1 [chunk, D], q, o, do, dq
 * [chunk, H*d/2], k, v, dk, dv [chunk, Hk*d/2]. */
static size_t tp_attn_elems(const Config *c, size_t T, size_t attn_chunk) {
    size_t D = (size_t)c->dim, Hd = (size_t)c->n_heads * c->head_dim, Hkd = (size_t)c->n_kv_heads * c->head_dim;
    return attn_chunk ? attn_chunk * (2 * D + 2 * Hd + 2 * Hkd) : T * (2 * Hd + 2 * Hkd);
}

/* Elements of the arena: the MLP's gate, up, h (and dh) over one tile in the forward and
 * backward; the attention's part (above) otherwise. */
static size_t tp_arena_elems(const Config *c, const TrainPlan *p) {
    size_t mlp = (p->lora_down ? 4 : 3) * p->mlp_tile * (size_t)c->ffn_dim, attn = tp_attn_elems(c, p->T, p->attn_chunk);
    return mlp > attn ? mlp : attn;
}

/* The MLP tile: the fewest tiles whose [tile, F] buffers fit in the attention's part of the
 * arena; a tile is a multiple of 64 rows (whole GEMM tiles) unless it is all of T. */
static size_t tp_mlp_tile(const Config *c, size_t T, size_t attn_chunk, int lora_down) {
    size_t per_row = (lora_down ? 4 : 3) * (size_t)c->ffn_dim, attn = tp_attn_elems(c, T, attn_chunk);
    for (size_t n = 1; n <= T; n++) {
        size_t tile = (T + n - 1) / n;
        if (tile < T) tile = (tile + 63) / 64 * 64;
        if (tile >= T) tile = T;
        if (tile * per_row <= attn || tile <= 64) return tile;
    }
    return T;
}

/* The chunk's attention workspace: 04's, scaled from the whole layer's (H heads, T rows) to
 * half the heads over attn_chunk rows, plus its 256-byte alignment. (04 may round each
 * group's rows up to 64, which this leaves to tp_margin: a few MB where G is not a multiple
 * of 64, none where it is.) */
static double tp_chunk_ws_bytes(const TrainPlan *p) {
    return p->attn_chunk ? p->attn_ws_bytes * (double)p->attn_chunk / (2.0 * (double)p->T) + 256.0 : 0.0;
}

/* One layer's work buffers and the workspaces, for the plan's T, tile and chunk (no
 * checkpoints, no kept attention outputs; the shared attention output when some layer keeps
 * none). Sets chunk_bytes. */
static double tp_work_bytes(const Config *c, TrainPlan *p) {
    size_t T = p->T, D = (size_t)c->dim, H = (size_t)c->n_heads;
    size_t Hd = H * c->head_dim, Hkd = (size_t)c->n_kv_heads * c->head_dim, R = p->R ? p->R : 1, V = (size_t)c->vocab_size;
    double b = 0;
    if (p->attn_chunk) /* x2 xn2 dx, dtmp (datt in the attention's backward: [T, max(D, H*d)]), rstd1 rstd2 */
        b += 3.0 * T * D * 2 + (double)T * (D > Hd ? D : Hd) * 2 + 2.0 * T * 4;
    else
        b += 5.0 * T * D * 2 + 2.0 * T * 4 + (T * Hd + 2.0 * T * Hkd) * 2; /* xn1 x2 xn2 dx dtmp, rstd1 rstd2, q k v */
    b += 3.0 * T * 4;                                   /* tokens, targets, rstd_final */
    if (p->n_keep_att < (size_t)c->n_layers) b += T * Hd * 2.0 + (double)p->B * H * p->N * 4; /* att, lse of a layer that keeps none */
    b += (double)N_PROJ * T * R * 2 + (double)T * R * 2; /* xa, LoRA's dxa workspace */
    b += (double)tp_arena_elems(c, p) * 2;
    p->chunk_bytes = p->attn_chunk ? (double)tp_attn_elems(c, T, p->attn_chunk) * 2 + tp_chunk_ws_bytes(p) : 0.0;
    b += p->attn_chunk ? tp_chunk_ws_bytes(p) : p->attn_ws_bytes;
    size_t rows = p->ce_chunk < T ? p->ce_chunk : T;
    b += (double)rows * V * 6 + (double)T * 4;          /* cross-entropy logits (fp32), dlogits (bf16), row losses */
    return b;
}

/* Fills the plan's byte counts for its n_keep_att and n_host. */
static void tp_count(const Config *c, TrainPlan *p) {
    size_t L = (size_t)c->n_layers, H = (size_t)c->n_heads, Hd = H * c->head_dim;
    p->slot_bytes = (double)p->T * c->dim * 2;
    size_t staging = p->n_host < 2 ? p->n_host : 2;
    p->ckpt_gpu_bytes = (double)(L + 1 - p->n_host + staging) * p->slot_bytes; /* the top output (slot L) stays */
    p->ckpt_host_bytes = (double)p->n_host * p->slot_bytes;
    p->keep_att_bytes = (double)p->n_keep_att * ((double)p->T * Hd * 2 + (double)p->B * H * p->N * 4);
    p->work_bytes = tp_work_bytes(c, p);
    p->gpu_bytes = p->ckpt_gpu_bytes + p->keep_att_bytes + p->work_bytes;
}

/* Does the plan fit its budgets (with the margin, and the spare kept attention outputs leave)? */
static int tp_fits(const TrainPlan *p) {
    double spare = tp_margin + (p->n_keep_att ? tp_keep_spare : 0.0);
    return p->gpu_bytes + spare <= p->gpu_avail && p->ckpt_host_bytes <= p->host_avail;
}

/* Can the attention block run in chunks of whole groups? S2 on, and each half of the query
 * heads has its own half of the kv heads. */
static int tp_can_chunk(const Config *c, const TrainPlan *p) {
    return p->G > 0 && p->G % 2 == 0 && c->n_heads % 2 == 0 && c->n_kv_heads % 2 == 0 && p->chunk_policy >= 0;
}

/* The kept attention outputs and host checkpoints (above) for the plan's tile and chunk: 0
 * when some choice fits. */
static int tp_decide_memory(const Config *c, TrainPlan *p) {
    size_t L = (size_t)c->n_layers;
    double keys_seen = p->G ? (double)p->G / 2.0 : (double)p->N / 2.0;
    size_t want = p->keep_att_policy < 0 ? (keys_seen >= 4096.0 ? L : 0) : (size_t)p->keep_att_policy;
    if (want > L) want = L;
    size_t host_lo = 0, host_hi = L;
    if (p->host_policy >= 0) host_lo = host_hi = (size_t)p->host_policy < L ? (size_t)p->host_policy : L;
    for (size_t keep = want + 1; keep-- > 0;)
        for (size_t n_host = host_lo; n_host <= host_hi; n_host++) {
            p->n_keep_att = keep;
            p->n_host = n_host;
            tp_count(c, p);
            if (p->ckpt_host_bytes > p->host_avail) break; /* more on the host fits even less */
            if (tp_fits(p)) return 0;
        }
    return -1;
}

/* The MLP tile for a chunk of attn_chunk rows (0: none), then the memory choices above. */
static int tp_try(const Config *c, TrainPlan *p, size_t attn_chunk) {
    p->attn_chunk = attn_chunk;
    p->mlp_tile = p->tile_policy ? (p->tile_policy < p->T ? p->tile_policy : p->T) : tp_mlp_tile(c, p->T, attn_chunk, p->lora_down);
    return tp_decide_memory(c, p);
}

/* Decides the tile, the kept attention outputs, the host checkpoints and the attention
 * chunk (above) for the inputs in p. Returns 0, or -1 with the byte counts of the smallest
 * plan left in p. */
static int train_plan_decide(const Config *c, TrainPlan *p) {
    size_t L = (size_t)c->n_layers;
    p->T = p->B * p->N;
    p->ce_chunk = 2048;
    size_t groups = p->G ? p->N / p->G : 0, k_hi = 0, k_lo = 1; /* chunks of k = k_hi .. k_lo whole groups */
    int whole = 1;                                                   /* try the unchunked layer first */
    if (tp_can_chunk(c, p)) {
        k_hi = p->chunk_policy > 0 ? ((size_t)p->chunk_policy < groups ? (size_t)p->chunk_policy : groups) : groups;
        k_lo = p->chunk_policy > 0 ? k_hi : 1;
        whole = p->chunk_policy == 0;
    }
    if (whole && tp_try(c, p, 0) == 0) return 0;
    for (size_t k = k_hi; k >= k_lo && k > 0; k--)
        if (tp_try(c, p, k * p->G) == 0) return 0;
    /* nothing fits: report the plan with no kept attention outputs and the most the host holds */
    size_t most = (size_t)(p->host_avail / ((double)p->T * c->dim * 2));
    p->n_keep_att = 0;
    p->n_host = p->host_policy >= 0 ? (p->host_policy < (int)L ? (size_t)p->host_policy : L) : (most < L ? most : L);
    tp_count(c, p);
    return -1;
}

/* The longest N in [0, p->N) whose plan fits the same budgets, with the same number of S2
 * groups (N a multiple of 64 per group, so G = N / groups is one too) and the attention
 * workspace scaled with N; 0 if none. For the sentence of a plan that does not fit. */
static size_t train_plan_longest(const Config *c, const TrainPlan *asked) {
    size_t groups = asked->G ? asked->N / asked->G : 1, step = 64 * groups;
    size_t lo = 0, hi = (asked->N - 1) / step;
    while (lo < hi) {
        size_t mid = (lo + hi + 1) / 2;
        TrainPlan q = *asked;
        q.N = mid * step;
        q.G = asked->G ? q.N / groups : 0;
        q.attn_ws_bytes = asked->attn_ws_bytes * (double)q.N / (double)asked->N;
        if (train_plan_decide(c, &q) == 0) lo = mid; else hi = mid - 1;
    }
    return lo * step;
}

/* The chunked attention's pieces for chunks of `chunk` rows (whole groups of G): per
 * sequence, the plain half's groups [kG, (k+1)G) chunk/G at a time, then the shifted half's:
 * its short first group [0, G/2), its groups [G/2 + kG, G/2 + (k+1)G) chunk/G at a time, its
 * short last group [N - G/2, N) (common.h's s2_first_key: the same windows, so each call is
 * plain causal attention over its groups). Returns the count written to out (NULL: counts). */
static size_t tp_pieces(size_t B, size_t N, size_t G, size_t H, size_t chunk, TpPiece *out) {
    size_t n = 0, lse = 0, per = chunk / G, S = G / 2;
    for (size_t b = 0; b < B; b++)
        for (int half = 0; half < 2; half++) {
            size_t first = half ? S : 0, full = half ? N / G - 1 : N / G; /* where the full groups start, and how many */
            if (half) { /* the short first group */
                if (out) out[n] = (TpPiece){b * N, 0, 1, S, lse, half};
                n++; lse += S * H / 2;
            }
            for (size_t k = 0; k < full; k += per) {
                size_t n_seg = full - k < per ? full - k : per, pos = first + k * G;
                if (out) out[n] = (TpPiece){b * N + pos, pos, n_seg, G, lse, half};
                n++; lse += n_seg * G * H / 2;
            }
            if (half) { /* the short last group */
                if (out) out[n] = (TpPiece){b * N + N - S, N - S, 1, S, lse, half};
                n++; lse += S * H / 2;
            }
        }
    return n;
}

/* One line: what stays on the GPU, what goes to the host, what is recomputed, with bytes. */
static void train_plan_describe(const Config *c, const TrainPlan *p, char *out, size_t cap) {
    size_t L = (size_t)c->n_layers, n_tiles = (p->T + p->mlp_tile - 1) / p->mlp_tile;
    size_t att_recomputed = p->n_keep_att + 1 >= L ? 0 : L - 1 - p->n_keep_att; /* the top layer's is still in the buffers */
    char host[200] = "host: nothing", chunk[160] = "";
    if (p->attn_chunk)
        snprintf(chunk, sizeof chunk, ", attention in chunks of %zu tokens per half of the heads %.2f GiB of them", p->attn_chunk, p->chunk_bytes / TP_GIB);
    if (p->n_host)
        snprintf(host, sizeof host, "host: %.2f GiB pinned = the inputs of layers 0-%zu (copied out during the forward, back one layer ahead in the backward)",
                 p->ckpt_host_bytes / TP_GIB, p->n_host - 1);
    snprintf(out, cap,
             "plan for %zu x %zu tokens: GPU %.2f GiB = the inputs of %zu of %zu layers and the last output%s %.2f GiB, %zu kept attention outputs %.2f GiB, "
             "one layer's work buffers %.2f GiB (MLP in %zu tile%s of %zu tokens%s, loss in chunks of %zu); %s; recomputed: the attention of %zu layers, "
             "each MLP tile's gate and up%s",
             p->B, p->N, p->gpu_bytes / TP_GIB, L - p->n_host, L, p->n_host ? " + 2 staging buffers" : "", p->ckpt_gpu_bytes / TP_GIB, p->n_keep_att,
             p->keep_att_bytes / TP_GIB, p->work_bytes / TP_GIB, n_tiles, n_tiles == 1 ? "" : "s", p->mlp_tile, chunk, p->ce_chunk, host, att_recomputed,
             p->attn_chunk ? ", each attention chunk's normed input, q, k and v in the backward" : "");
}

/* Host memory the checkpoints may take by default: the cgroup's limit where one is set (the
 * device machines' RAM "starts small and grows", so MemTotal and MemAvailable read too low
 * there, while the limit is the whole from the start), else the physical pages
 * (sysconf); less an eighth (at least 4 GiB) for the system and the rest of this program.
 * *source names which. */
static double train_host_mem_default(const char **source) {
    double phys = (double)sysconf(_SC_PHYS_PAGES) * (double)sysconf(_SC_PAGESIZE), limit = 0;
    const char *files[] = {"/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"};
    for (int i = 0; i < 2 && limit == 0; i++) {
        FILE *f = fopen(files[i], "r");
        if (!f) continue;
        char line[64] = "";
        if (fgets(line, sizeof line, f)) {
            double v = strtod(line, NULL);
            if (v > 0 && v < 1e18) limit = v; /* "max" or a huge number: no limit */
        }
        fclose(f);
    }
    double total = limit > 0 ? limit : phys;
    *source = limit > 0 ? "the cgroup memory limit" : "the physical memory (sysconf)";
    double keep = total / 8 > 4.0 * TP_GIB ? total / 8 : 4.0 * TP_GIB;
    return total > keep ? total - keep : 0;
}

#endif /* TRAIN_PLAN_C */
