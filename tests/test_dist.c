/* test_dist.c: the pieces of 05_dist.c, on the CPU.
 *   1. dist_shard: the K slices tile [0, n) in order, sizes within 1 (many n, K).
 *   2. The shm communicator with K = 3 processes (fork): all-reduce of a fresh random buffer
 *      of 2.5 slots + 7 values (several rounds, a ragged last one) equals the sum in rank
 *      order computed locally, bit for bit, on every rank; all-gather of a flat vector longer
 *      than the window (ragged slices); broadcast of an odd number of bytes from the last
 *      rank; comm_any; a stale --dist-file is refused.
 *   3. ZeRO-1's AdamW: adamw_step_range over the K slices (K = 1..5, ragged tensors) gives
 *      exactly (bit for bit) 03's adamw_step over all tensors, for 3 steps with weight decay.
 *   4. The data split: a rank that reads micro-batches j = r mod K and skips the others sees
 *      exactly those micro-batches of the one-process order, across epoch reshuffles, and
 *      ends at the same position, epoch and order.
 *   5. The memory plan: sharding divides the frozen bytes by K; 70B at 32k fits 8 x 80 GB
 *      only sharded, 13B at 65k fits sharded.
 */
#define STAGE 0
#include "05_train.c"
#include "tests/check.h"
#include <sys/wait.h>

static void fill_random(float *x, size_t n, uint64_t seed) {
    Rng r;
    rng_seed(&r, seed);
    for (size_t i = 0; i < n; i++) x[i] = (float)rng_normal(&r);
}

/* One rank of the collectives test: returns the number of failed checks. */
static int collectives_rank(int rank, int K, const char *path, uint64_t seed) {
    if (comm_init(rank, K, path, 0) != 0) { printf("FAIL rank %d: %s\n", rank, last_error()); return 1; }
    int bad = 0;
    /* all-reduce */
    size_t n = DIST_SHM_SLOT_FLOATS * 5 / 2 + 7;
    float *mine = (float *)xmalloc(n * sizeof(float)), *want = (float *)xcalloc(n, sizeof(float)), *tmp = (float *)xmalloc(n * sizeof(float));
    for (int r = 0; r < K; r++) {
        fill_random(tmp, n, seed + (uint64_t)r);
        for (size_t i = 0; i < n; i++) want[i] = r == 0 ? tmp[i] : want[i] + tmp[i];
    }
    fill_random(mine, n, seed + (uint64_t)rank);
    comm_allreduce_sum(mine, n);
    if (memcmp(mine, want, n * sizeof(float)) != 0) { printf("FAIL rank %d: all-reduce differs from the rank-order sum\n", rank); bad++; }
    /* all-gather of a vector longer than the window */
    size_t m = DIST_SHM_SLOT_FLOATS * (size_t)K * 2 + 13, lo, hi;
    float *v = (float *)xmalloc(m * sizeof(float)), *vw = (float *)xmalloc(m * sizeof(float));
    fill_random(vw, m, seed ^ 0x5eedull);
    dist_shard(m, rank, K, &lo, &hi);
    for (size_t i = 0; i < m; i++) v[i] = (i >= lo && i < hi) ? vw[i] : -999.0f;
    comm_allgather_shards(v, m, sizeof(float));
    if (memcmp(v, vw, m * sizeof(float)) != 0) { printf("FAIL rank %d: all-gather differs\n", rank); bad++; }
    /* broadcast of an odd byte count from the last rank */
    size_t nb = 4 * DIST_SHM_SLOT_FLOATS * (size_t)K + 3;
    unsigned char *b = (unsigned char *)xmalloc(nb);
    for (size_t i = 0; i < nb; i++) b[i] = rank == K - 1 ? (unsigned char)(i * 31 + seed) : 0;
    comm_broadcast(b, nb, K - 1);
    size_t wrong = 0;
    for (size_t i = 0; i < nb; i++) wrong += b[i] != (unsigned char)(i * 31 + seed);
    if (wrong) { printf("FAIL rank %d: broadcast: %zu bytes differ\n", rank, wrong); bad++; }
    /* any */
    if (comm_any(rank == 1) != 1 || comm_any(0) != 0) { printf("FAIL rank %d: comm_any\n", rank); bad++; }
    comm_finish();
    free(mine); free(want); free(tmp); free(v); free(vw); free(b);
    return bad;
}

int main(void) {
    double t0 = now_seconds();
    uint64_t seed = (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 20);
    printf("seed %llu\n", (unsigned long long)seed);

    /* 1. shards */
    for (size_t n = 0; n < 40; n++)
        for (int K = 1; K <= 9; K++) {
            size_t at = 0, lo, hi, mn = SIZE_MAX, mx = 0;
            int ok = 1;
            for (int r = 0; r < K; r++) {
                dist_shard(n, r, K, &lo, &hi);
                ok &= lo == at && hi >= lo;
                at = hi;
                if (hi - lo < mn) mn = hi - lo;
                if (hi - lo > mx) mx = hi - lo;
            }
            EXPECT(ok && at == n && mx - mn <= 1, "dist_shard(n=%zu, K=%d) does not tile [0, n) evenly", n, K);
        }

    /* 2. collectives with K processes */
    {
        int K = 3;
        char path[256];
        mkdir("build", 0755);
        snprintf(path, sizeof path, "build/test_dist_%d.shm", (int)getpid());
        unlink(path);
        fflush(stdout);
        pid_t pids[8];
        for (int r = 0; r < K; r++) {
            pids[r] = fork();
            if (pids[r] == 0) _exit(collectives_rank(r, K, path, seed) ? 1 : 0);
        }
        for (int r = 0; r < K; r++) {
            int st = 0;
            waitpid(pids[r], &st, 0);
            EXPECT(WIFEXITED(st) && WEXITSTATUS(st) == 0, "rank %d of the collectives test failed (status %d)", r, st);
        }
        EXPECT(!file_exists(path), "the shared file %s is left behind", path);
        /* a stale file: rank 0 refuses to start over it */
        FILE *f = fopen(path, "w");
        if (f) { fputs("stale", f); fclose(f); }
        Comm saved = g_comm;
        EXPECT(comm_init(0, 2, path, 0) != 0 && strstr(last_error(), "already exists"), "a stale --dist-file is not refused (%s)", last_error());
        g_comm = saved;
        unlink(path);
        EXPECT(comm_init(0, 2, NULL, 0) != 0 && strstr(last_error(), "--dist-file"), "--world-size 2 without --dist-file is not refused");
        EXPECT(comm_init(2, 2, path, 0) != 0 && strstr(last_error(), "--rank 2"), "--rank 2 of 2 is not refused");
        memset(&g_comm, 0, sizeof g_comm);
    }

    /* 3. ZeRO-1's AdamW slices against adamw_step */
    for (int K = 1; K <= 5; K++) {
        size_t sizes[4] = {37, 1, 250, 13};
        AdamW full = {0}, sliced = {0};
        AdamWConfig cfg = {1e-2f, 0.9f, 0.95f, 1e-8f, 0.1f, 0, LR_CONSTANT, 0};
        full.cfg = sliced.cfg = cfg;
        float *w[2][4], *g[4];
        for (int k = 0; k < 4; k++) {
            g[k] = (float *)xmalloc(sizes[k] * sizeof(float));
            for (int s = 0; s < 2; s++) w[s][k] = (float *)xmalloc(sizes[k] * sizeof(float));
            fill_random(w[0][k], sizes[k], seed + 100 + (uint64_t)k);
            memcpy(w[1][k], w[0][k], sizes[k] * sizeof(float));
            adamw_add(&full, "t", w[0][k], g[k], sizes[k]);
            adamw_add(&sliced, "t", w[1][k], g[k], sizes[k]);
            full.params[k].no_decay = sliced.params[k].no_decay = k == 1;
        }
        size_t P = flat_count(&full);
        for (int step = 0; step < 3; step++) {
            for (int k = 0; k < 4; k++) fill_random(g[k], sizes[k], seed + 200 + (uint64_t)(10 * step + k));
            adamw_step(&full, 1e-2f);
            for (int r = 0; r < K; r++) {
                size_t lo, hi;
                dist_shard(P, r, K, &lo, &hi);
                adamw_step_range(&sliced, 1e-2f, lo, hi);
                if (r + 1 < K) sliced.steps_taken--; /* every rank counts the step once; here one process plays them all */
            }
        }
        int same = 1;
        for (int k = 0; k < 4; k++)
            same &= !memcmp(w[0][k], w[1][k], sizes[k] * 4) && !memcmp(full.params[k].m, sliced.params[k].m, sizes[k] * 4) &&
                    !memcmp(full.params[k].v, sliced.params[k].v, sizes[k] * 4);
        EXPECT(same, "K=%d: AdamW over the ZeRO-1 slices differs from adamw_step", K);
        adamw_free(&full);
        adamw_free(&sliced);
        for (int k = 0; k < 4; k++) { free(g[k]); free(w[0][k]); free(w[1][k]); }
    }

    /* 4. the data split */
    for (int K = 2; K <= 4; K++) {
        int B = 2, A = 3, N = 5, steps = 7;
        Dataset one, mine;
        memset(&one, 0, sizeof one);
        one.n_seqs = 11; /* not a multiple of K*A*B: epochs end mid-step */
        one.N = N;
        one.stream = (int32_t *)xmalloc((one.n_seqs * (size_t)N + 1) * sizeof(int32_t));
        for (size_t i = 0; i < one.n_seqs * (size_t)N + 1; i++) one.stream[i] = (int32_t)i;
        mine = one;
        mine.stream = (int32_t *)xmalloc((one.n_seqs * (size_t)N + 1) * sizeof(int32_t));
        memcpy(mine.stream, one.stream, (one.n_seqs * (size_t)N + 1) * sizeof(int32_t));
        dataset_start(&one, seed);
        dataset_start(&mine, seed);
        int32_t in1[2 * 5], tg1[2 * 5], in2[2 * 5], tg2[2 * 5];
        int rank = K - 1, ok = 1;
        for (int s = 0; s < steps; s++)
            for (int j = 0; j < K * A; j++) {
                dataset_next_batch(&one, B, in1, tg1);
                if (j % K != rank) { dataset_skip_batch(&mine, B); continue; }
                dataset_next_batch(&mine, B, in2, tg2);
                ok &= !memcmp(in1, in2, sizeof in1) && !memcmp(tg1, tg2, sizeof tg1);
            }
        ok &= one.pos == mine.pos && one.epoch == mine.epoch && !memcmp(one.order, mine.order, one.n_seqs * sizeof(uint32_t));
        EXPECT(ok && one.epoch >= 2, "K=%d: rank %d's micro-batches are not the one-process order's (epochs %llu)", K, rank, (unsigned long long)one.epoch);
        dataset_free(&one);
        dataset_free(&mine);
    }

    /* 5. the memory plan */
    {
        Config c13, c70;
        EXPECT(config_from_shape("llama2-13b", &c13) == 0 && config_from_shape("llama2-70b", &c70) == 0, "%s", last_error());
        const double GiB = 1024.0 * 1024.0 * 1024.0;
        DistMemPlan r70 = dist_memory_plan(&c70, 32768, 8, 8, 0), s70 = dist_memory_plan(&c70, 32768, 8, 8, 1);
        DistMemPlan s13 = dist_memory_plan(&c13, 65536, 8, 8, 1);
        EXPECT(fabs(s70.frozen * 8 - r70.frozen) < 1.0 && fabs(r70.frozen - 2.0 * config_param_count(&c70)) < 1.0,
               "sharding does not divide the frozen bytes by K");
        EXPECT(r70.total / GiB > 80 && s70.total / GiB < 80, "70B at 32k: replicated %.1f GiB, sharded %.1f GiB per GPU", r70.total / GiB, s70.total / GiB);
        EXPECT(s13.total / GiB < 80, "13B at 65k sharded needs %.1f GiB per GPU", s13.total / GiB);
        dist_print_memory_plan(stdout, "llama2-13b", &c13, 65536, 8, 80);
        dist_print_memory_plan(stdout, "llama2-70b", &c70, 32768, 8, 80);
    }

    printf("test_dist: %d checks, %d failed (%.1f s)\n", g_checks, g_failures, now_seconds() - t0);
    return g_failures ? 1 : 0;
}
