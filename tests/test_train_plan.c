/* test_train_plan.c: 05_plan.c's arithmetic, on any machine (no GPU, no CUDA).
 *
 * LLaMA-2-7B's shape at the lengths of bench/TRAIN_NOTES.md, within an 80 GiB and a 139 GiB
 * card and 112 GiB of host memory; a tiny shape for the edges. Checks:
 *   - the byte counts add up, and each term is what its buffers hold (a 7B layer input at
 *     262,144 tokens is exactly 2 GiB);
 *   - the MLP tile's [tile, F] buffers never outgrow the attention's part of the arena,
 *     and the tile is a multiple of 64 rows or all of them;
 *   - a plan fits its budgets, and is the least offloading one: one layer input fewer on the
 *     host would not fit; kept attention outputs only where a query sees >= 4096 keys;
 *   - a plan that does not fit says so, and train_plan_longest's length is the longest that
 *     fits (one step more does not);
 *   - 524,288 tokens within 80 GiB: the attention block in chunks of whole S2 groups, its
 *     bytes added up by hand; shorter contexts keep the unchunked layer; full attention and
 *     odd head counts never chunk;
 *   - the describe line names the GPU, the host and the recompute, with bytes;
 *   - the chunked attention's pieces (tp_pieces): every row of every sequence in exactly one
 *     piece per half of the heads, each group of a piece exactly the keys common.h's
 *     s2_first_key lets its queries see (so a piece is plain causal attention over its
 *     groups), no piece above the chunk, and the lse slices tiling [B, H, N].
 */
#define STAGE 0
#include "05_train.c"
#include "05_plan.c"

#include "check.h"

static const double GiB = 1024.0 * 1024.0 * 1024.0;

/* 04's attention backward workspace (04_gpu.h: fp32 dQ [B, N, H, d] + row sums [B, H, N];
 * 04 rounds N up to 64 rows; every N here is a multiple of 64) */
static double attn_ws(const Config *c, size_t B, size_t N) { return (double)B * N * c->n_heads * (c->head_dim + 1) * 4.0; }

static TrainPlan ask(const Config *c, size_t N, double gpu_avail, double host_avail) {
    TrainPlan p;
    memset(&p, 0, sizeof p);
    p.B = 1; p.N = N; p.G = N / 4; p.R = 8;
    p.gpu_avail = gpu_avail; p.host_avail = host_avail;
    p.attn_ws_bytes = attn_ws(c, 1, N);
    p.keep_att_policy = -1; p.host_policy = -1;
    return p;
}

/* The sums and the rules every plan keeps. */
static void check_plan(const Config *c, const TrainPlan *p, const char *what) {
    size_t L = (size_t)c->n_layers, F = (size_t)c->ffn_dim, Hd = (size_t)c->n_heads * c->head_dim, Hkd = (size_t)c->n_kv_heads * c->head_dim;
    double slot = (double)p->T * c->dim * 2;
    size_t staging = p->n_host < 2 ? p->n_host : 2;
    EXPECT(p->slot_bytes == slot && p->ckpt_gpu_bytes == (double)(L + 1 - p->n_host + staging) * slot && p->ckpt_host_bytes == (double)p->n_host * slot,
           "%s: %zu of %zu layer inputs on the host: %.3f GiB there, %.3f GiB of checkpoints and staging on the GPU", what, p->n_host, L,
           p->ckpt_host_bytes / GiB, p->ckpt_gpu_bytes / GiB);
    EXPECT(p->gpu_bytes == p->ckpt_gpu_bytes + p->keep_att_bytes + p->work_bytes &&
               p->keep_att_bytes == (double)p->n_keep_att * ((double)p->T * Hd * 2 + (double)p->B * c->n_heads * p->N * 4),
           "%s: GPU %.3f GiB = checkpoints %.3f + %zu attention outputs %.3f + work %.3f", what, p->gpu_bytes / GiB, p->ckpt_gpu_bytes / GiB,
           p->n_keep_att, p->keep_att_bytes / GiB, p->work_bytes / GiB);
    (void)Hd; (void)Hkd;
    EXPECT((p->mlp_tile == p->T || p->mlp_tile % 64 == 0) && 3 * p->mlp_tile * F <= tp_attn_elems(c, p->T, p->attn_chunk),
           "%s: MLP tile %zu of %zu tokens: [tile, F] x 3 = %.2f GiB within the attention's %.2f GiB", what, p->mlp_tile, p->T,
           3.0 * p->mlp_tile * F * 2 / GiB, (double)tp_attn_elems(c, p->T, p->attn_chunk) * 2 / GiB);
    EXPECT(p->attn_chunk == 0 || (p->G && p->attn_chunk % p->G == 0 && p->attn_chunk <= p->N),
           "%s: an attention chunk of %zu rows is whole groups of %zu", what, p->attn_chunk, p->G);
}

static void test_7b(void) {
    Config c;
    memset(&c, 0, sizeof c);
    if (config_from_shape("llama2-7b", &c) != 0) die("%s", last_error());
    double weights = 14.6 * GiB, context = 0.6 * GiB; /* what train_bench has in use before planning */
    double host = 112 * GiB;
    struct { size_t N; double card; } runs[] = {{100000, 80}, {100000, 139}, {262144, 80}, {262144, 139}, {524288, 80}, {524288, 139}, {8192, 80}};
    for (size_t i = 0; i < sizeof runs / sizeof *runs; i++) {
        TrainPlan p = ask(&c, runs[i].N, runs[i].card * GiB - weights - context, host);
        char what[64];
        snprintf(what, sizeof what, "7B N=%zu in %.0f GiB", runs[i].N, runs[i].card);
        int rc = train_plan_decide(&c, &p);
        char line[1024];
        train_plan_describe(&c, &p, line, sizeof line);
        printf("     %s: %s: %s\n", what, rc == 0 ? "fits" : "does not fit", line);
        EXPECT(rc == 0, "%s: fits", what);
        check_plan(&c, &p, what);
        EXPECT(p.gpu_bytes + tp_margin + (p.n_keep_att ? tp_keep_spare : 0) <= p.gpu_avail && p.ckpt_host_bytes <= p.host_avail,
               "%s: %.2f GiB planned within %.2f GiB, %.2f GiB of host within %.0f", what, p.gpu_bytes / GiB, p.gpu_avail / GiB,
               p.ckpt_host_bytes / GiB, host / GiB);
        if (p.n_host > 0) { /* the least offloading plan: one fewer on the host does not fit */
            TrainPlan q = p;
            q.host_policy = (int)p.n_host - 1;
            q.keep_att_policy = (int)p.n_keep_att;
            q.chunk_policy = p.attn_chunk ? (long)(p.attn_chunk / p.G) : -1; /* the same chunk */
            EXPECT(train_plan_decide(&c, &q) != 0 || q.n_keep_att < p.n_keep_att,
                   "%s: with %zu layer inputs on the host instead of %zu, the %zu kept attention outputs do not fit", what, p.n_host - 1, p.n_host,
                   p.n_keep_att);
        }
        EXPECT(runs[i].N >= 524288 || p.attn_chunk == 0, "%s: the unchunked layer where it fits (chunk %zu)", what, p.attn_chunk);
        EXPECT(p.n_keep_att == 0 || p.G / 2 >= 4096, "%s: attention outputs kept (%zu) only where a query sees 4096 keys or more (%zu)", what,
               p.n_keep_att, p.G / 2);
        EXPECT(strstr(line, "GiB") && strstr(line, "host") && strstr(line, "recomputed"), "%s: the plan line names GPU, host and recompute", what);
    }
    /* 524,288 tokens in 80 GiB: chunks of two groups of 131,072 tokens, the bytes by hand */
    TrainPlan h = ask(&c, 524288, 80 * GiB - weights - context, host);
    EXPECT(train_plan_decide(&c, &h) == 0 && h.attn_chunk == 262144 && h.n_keep_att == 0 && h.n_host == 28,
           "7B N=524288 in 80 GiB: fits with the attention in chunks of 262144 rows (%zu), 28 layer inputs on the host (%zu), no kept attention "
           "output (%zu)", h.attn_chunk, h.n_host, h.n_keep_att);
    {
        const double MiB = 1024.0 * 1024.0, T = 524288;
        /* x2 xn2 dx dtmp [T, 4096] bf16: 4 GiB each; the shared attention output 4 GiB and its lse
         * [32, T] fp32 64 MiB; the arena: the chunk's xn1 dxn1 [262144, 4096], q o do dq k v dk dv
         * [262144, 2048], all bf16: 12 GiB (the MLP's 3 x [174784, 11008] is 10.75 GiB); the chunk's
         * dQ accumulator [262144, 16, 128] fp32 and row sums [16, 262144] fp32: 2 GiB + 16 MiB
         * (+ 256 bytes of alignment); rstd1 rstd2 tokens targets rstd_final row losses [T] x 4
         * bytes: 12 MiB; xa [7, T, 8] and dxa [T, 8] bf16: 64 MiB; logits and dlogits [2048,
         * 32000] fp32 + bf16: 375 MiB */
        double by_hand = 16 * GiB + 4 * GiB + 64 * MiB + 12 * GiB + 2 * GiB + 16 * MiB + 256 + 12 * MiB + 64 * MiB + 2048.0 * 32000 * 6;
        double chunk = 12 * GiB + 2 * GiB + 16 * MiB + 256;
        EXPECT(h.mlp_tile == 174784 && fabs(h.work_bytes - by_hand) < 1 && fabs(h.chunk_bytes - chunk) < 1,
               "7B N=524288 in 80 GiB: one layer's work buffers %.6f GiB (%.6f by hand), the chunk's %.6f GiB (%.6f), MLP tile %zu (174784)",
               h.work_bytes / GiB, by_hand / GiB, h.chunk_bytes / GiB, chunk / GiB, h.mlp_tile);
        double ckpt = (32 + 1 - 28 + 2) * T * 4096 * 2;      /* 5 layer inputs + the last output + 2 staging: 28 GiB */
        EXPECT(h.ckpt_gpu_bytes == ckpt && h.ckpt_host_bytes == 28 * 4 * GiB && h.gpu_bytes == ckpt + by_hand,
               "7B N=524288 in 80 GiB: checkpoints %.2f GiB on the GPU (28), %.2f GiB on the host (112), %.3f GiB in all", h.ckpt_gpu_bytes / GiB,
               h.ckpt_host_bytes / GiB, h.gpu_bytes / GiB);
        TrainPlan whole = h; /* one chunk fewer (the whole sequence per half) does not fit */
        whole.chunk_policy = 4;
        EXPECT(train_plan_decide(&c, &whole) != 0, "7B N=524288 in 80 GiB: chunks of 4 groups do not fit (%.2f GiB of work buffers)",
               whole.work_bytes / GiB);
        TrainPlan none = h; /* nor the unchunked layer */
        none.chunk_policy = -1;
        EXPECT(train_plan_decide(&c, &none) != 0 && none.attn_chunk == 0, "7B N=524288 in 80 GiB: unchunked it does not fit (%.2f GiB of work buffers)",
               none.work_bytes / GiB);
        char line[1024];
        train_plan_describe(&c, &h, line, sizeof line);
        EXPECT(strstr(line, "attention in chunks of 262144 tokens"), "7B N=524288 in 80 GiB: the plan line names the chunk: %s", line);
        TrainPlan full = h; /* full attention (G = 0) does not chunk */
        full.G = 0;
        EXPECT(train_plan_decide(&c, &full) != 0 && full.attn_chunk == 0, "7B N=524288 in 80 GiB, full attention: no chunks, does not fit");
    }
    /* 1,048,576 tokens do not fit 80 GiB; the longest that does, with the same 4 groups (a step of 256 tokens) */
    {
        TrainPlan p = ask(&c, 1048576, 80 * GiB - weights - context, host);
        EXPECT(train_plan_decide(&c, &p) == -1, "7B N=1048576 in 80 GiB: does not fit (%.2f GiB of work buffers)", p.work_bytes / GiB);
        size_t longest = train_plan_longest(&c, &p);
        TrainPlan a = ask(&c, longest, p.gpu_avail, host), b = ask(&c, longest + 256, p.gpu_avail, host);
        printf("     7B in 80 GiB with %.0f GiB of host memory: the longest context is %zu tokens\n", host / GiB, longest);
        EXPECT(longest >= 524288 && longest % 256 == 0 && train_plan_decide(&c, &a) == 0 && train_plan_decide(&c, &b) != 0,
               "7B in 80 GiB: the longest that fits is %zu tokens (256 more do not)", longest);
    }
    /* what bench/train_mem_device.sh runs (the H200: 139 GiB, host memory by default 110 GiB):
     * 524,288 in 80 GiB, and the longest in 80 GiB and on the whole card */
    {
        double dev_host = 110 * GiB;
        TrainPlan p = ask(&c, 524288, 80 * GiB - weights - context, dev_host);
        EXPECT(train_plan_decide(&c, &p) == 0 && p.n_host == 26 && p.attn_chunk == 131072,
               "7B N=524288 in 80 GiB with 110 GiB of host memory: fits, 26 layer inputs on the host (%zu), chunks of one group (%zu rows)", p.n_host,
               p.attn_chunk);
        char line[1024];
        train_plan_describe(&c, &p, line, sizeof line);
        printf("     7B N=524288 in 80 GiB with 110 GiB of host memory: %s\n", line);
        double cards[] = {80, 139};
        for (int i = 0; i < 2; i++) {
            TrainPlan q = ask(&c, 1048576, cards[i] * GiB - weights - context, dev_host);
            size_t longest = train_plan_longest(&c, &q);
            printf("     7B in %.0f GiB with %.0f GiB of host memory: the longest context is %zu tokens\n", cards[i], dev_host / GiB, longest);
            EXPECT(longest >= 524288, "7B in %.0f GiB with 110 GiB of host memory: %zu tokens fit (524288 or more)", cards[i], longest);
        }
    }
    /* the exact sizes at 262,144 tokens in 80 GiB */
    TrainPlan p = ask(&c, 262144, 80 * GiB - weights - context, host);
    train_plan_decide(&c, &p);
    EXPECT(p.slot_bytes == 2 * GiB && p.n_host >= 3, "7B N=262144 in 80 GiB: a layer input is %.3f GiB (2 expected), %zu of them on the host",
           p.slot_bytes / GiB, p.n_host);
    /* no host memory: nothing goes there, and 262,144 tokens do not fit 80 GiB */
    TrainPlan none = ask(&c, 262144, 80 * GiB - weights - context, 0);
    EXPECT(train_plan_decide(&c, &none) != 0 && none.n_host == 0, "7B N=262144 in 80 GiB without host memory: does not fit (%zu on the host)",
           none.n_host);
    /* the whole H200 at 100,000 tokens: every layer keeps its attention output, nothing on the host */
    TrainPlan big = ask(&c, 100000, 139 * GiB - weights - context, host);
    EXPECT(train_plan_decide(&c, &big) == 0 && big.n_host == 0 && big.n_keep_att == 32,
           "7B N=100000 in 139 GiB: %zu kept attention outputs (32), %zu layer inputs on the host (0)", big.n_keep_att, big.n_host);
}

static void test_tiny(void) {
    Config c;
    memset(&c, 0, sizeof c);
    c.dim = 192; c.n_layers = 4; c.n_heads = 3; c.n_kv_heads = 1; c.head_dim = 64; c.ffn_dim = 328; c.vocab_size = 397;
    /* forced choices are kept: every layer on the host, a 37-row tile */
    TrainPlan p = ask(&c, 96, 1e12, 1e12);
    p.B = 2; p.host_policy = 4; p.tile_policy = 37; p.attn_ws_bytes = attn_ws(&c, 2, 96);
    EXPECT(train_plan_decide(&c, &p) == 0 && p.n_host == 4 && p.mlp_tile == 37 && p.T == 192, "tiny: forced 4 on the host (%zu), tile 37 (%zu)",
           p.n_host, p.mlp_tile);
    EXPECT(p.ckpt_gpu_bytes == 3 * (double)p.slot_bytes, "tiny: all 4 on the host leave the last output and 2 staging buffers (%.0f bytes, %.0f each)",
           p.ckpt_gpu_bytes, p.slot_bytes);
    /* a tile is never above T */
    TrainPlan q = ask(&c, 96, 1e12, 1e12);
    q.tile_policy = 1000;
    train_plan_decide(&c, &q);
    EXPECT(q.mlp_tile == 96, "tiny: a tile of 1000 rows over 96 tokens is cut to 96 (%zu)", q.mlp_tile);
    /* a host budget of 0 with a GPU budget too small: -1, nothing on the host */
    TrainPlan r = ask(&c, 96, 1000, 0);
    EXPECT(train_plan_decide(&c, &r) == -1 && r.n_host == 0 && train_plan_longest(&c, &r) == 0,
           "tiny: 1000 bytes of GPU fit nothing (%zu on the host)", r.n_host);
    const char *source = NULL;
    double host = train_host_mem_default(&source);
    EXPECT(host > 0 && source, "the default host budget: %.2f GiB from %s", host / GiB, source ? source : "?");
}

/* tp_pieces against s2_first_key, for B sequences of N tokens, group G, H heads, chunks of `chunk` rows. */
static void check_pieces(size_t B, size_t N, size_t G, int H, size_t chunk) {
    size_t n = tp_pieces(B, N, G, (size_t)H, chunk, NULL), T = B * N, lse = 0, bad = 0;
    TpPiece *pc = (TpPiece *)xcalloc(n, sizeof(TpPiece));
    EXPECT(tp_pieces(B, N, G, (size_t)H, chunk, pc) == n, "pieces B=%zu N=%zu G=%zu: counted and written alike", B, N, G);
    unsigned char *seen = (unsigned char *)xcalloc(2 * T, 1); /* [T, 2]: pieces holding row t for each half */
    for (size_t i = 0; i < n; i++) {
        const TpPiece *p = &pc[i];
        size_t rows = p->n_seg * p->seg_len, seq = p->row0 / N;
        if (rows > chunk || p->lse_off != lse || p->row0 - seq * N != p->pos0 || p->pos0 + rows > N) bad++;
        lse += rows * (size_t)H / 2;
        for (size_t s = 0; s < p->n_seg; s++)
            for (size_t j = 0; j < p->seg_len; j++) {
                size_t pos = p->pos0 + s * p->seg_len + j, start = p->pos0 + s * p->seg_len;
                int h_lo = p->half * H / 2, h_hi = h_lo + H / 2 - 1; /* the half's first and last head */
                if (s2_first_key(pos, h_lo, H, G) != start || s2_first_key(pos, h_hi, H, G) != start) bad++;
                if (pos < N) seen[2 * (seq * N + pos) + (size_t)p->half]++;
            }
    }
    size_t once = 0;
    for (size_t t = 0; t < 2 * T; t++) once += seen[t] == 1;
    EXPECT(bad == 0 && once == 2 * T && lse == T * (size_t)H,
           "pieces B=%zu N=%zu G=%zu H=%d chunk %zu: %zu pieces, %zu of %zu (row, half) pairs in exactly one, lse %zu of %zu, %zu rows that break a rule",
           B, N, G, H, chunk, n, once, 2 * T, lse, T * (size_t)H, bad);
    free(seen);
    free(pc);
}

static void test_pieces(void) {
    check_pieces(2, 96, 24, 4, 24);           /* test_gpu_train_offload's chunk1 */
    check_pieces(2, 96, 24, 4, 48);           /* and chunk2: the shifted half's 3 groups as 2 + 1 */
    check_pieces(2, 96, 24, 4, 96);           /* a whole sequence a chunk */
    check_pieces(3, 640, 128, 8, 384);        /* 5 groups in chunks of 3 */
    check_pieces(1, 524288, 131072, 32, 131072); /* LLaMA-2-7B at 524,288 tokens, chunks of one group */
}

int main(void) {
    test_pieces();
    test_7b();
    test_tiny();
    printf("test_train_plan: %d checks, %d failed\n", g_checks, g_failures);
    return g_failures ? 1 : 0;
}
