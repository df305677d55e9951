/* 05_dist.c: data-parallel training over several processes (05_train.c includes it).
 *
 * Teaches: how one training step is spread over K processes ("ranks") so that the result
 * is the one a single process gets with K times the gradient accumulation.
 *   - A communicator (Comm) with the few collectives training needs: all-reduce (sum) of a
 *     flat fp32 buffer, all-gather of a flat buffer each rank owns one slice of, broadcast,
 *     barrier. Two backends:
 *       shm   the CPU path: the K processes map one shared file (--dist-file) and meet at a
 *             sense-reversing barrier; the sum adds the ranks' buffers in rank order, so
 *             every rank gets bit-identical results;
 *       nccl  the GPU path (one process per GPU): NCCL on device buffers; the unique id
 *             travels through --dist-file (rank 0 writes it, the others wait for it).
 *     Ranks come from --rank/--world-size, or from Open MPI's OMPI_COMM_WORLD_RANK/SIZE
 *     when launched with mpirun (no MPI library is needed to build).
 *   - Data: every rank holds the same seeded shuffle. An optimizer step consumes K*A
 *     micro-batches of B sequences (A = --grad-accum); micro-batch j goes to rank j mod K.
 *     So K ranks x A see exactly the micro-batches one rank sees with A' = K*A, and the
 *     data position (global) is the same on every rank, which keeps checkpoints world-size
 *     free.
 *   - Gradients: each rank sums its A micro-batches, one all-reduce adds the ranks (the
 *     loss rides along as the last element), then everything is scaled by 1/(K*A).
 *   - ZeRO-1: the trainable tensors are one flat vector; rank r owns the slice
 *     [K_lo(r), K_hi(r)) and runs AdamW only there (its moments are the only ones it
 *     updates), then the updated masters are all-gathered.
 *   - Checkpoints: the moments are gathered, rank 0 writes exactly the files a single
 *     process writes (settings.grad_accum is the global K*A), so a run saved with K ranks
 *     resumes with any K' that divides K*A.
 *   - Logs, the CSV and checkpoint writes come from rank 0. A rank that dies (die() runs
 *     exit, and an atexit hook marks the segment) makes every other rank stop at its next
 *     collective with one sentence naming it; so does a rank that vanished (its pid is gone).
 *   - --shard-weights (ZeRO-3 for the frozen bf16 weights, 05_train_gpu.c): each rank keeps
 *     1/K of every layer's matrices and all-gathers a layer into a double buffer before it
 *     runs (forward and recompute), the next layer's gather overlapping this one's compute;
 *     dist_print_memory_plan says what a GPU needs, replicated and sharded.
 * Runs on: the CPU (shm backend, any Linux); NCCL on GPUs where the build has NCCL.
 * Checked by: tests/test_dist.c (the shm collectives with K processes, ZeRO-1's AdamW slices
 * (03's adamw_step_range) against 03's adamw_step, the data split, the memory plan) and tests/test_dist_train.sh
 * (K = 2, 3 processes give the losses and adapter of one process with K-times accumulation;
 * save with K=2, resume with K=1 and K=3).
 * What has run where: the shm backend with K = 1, 2 and 3 processes (the CPU tests above);
 * NCCL with one rank on one H200 (tests/test_gpu_dist.sh, plain and --shard-weights, against
 * one GPU without a communicator). NCCL with K >= 2 ranks (the K = 2 half of that test) has
 * not run yet: no machine with several GPUs was at hand.
 * Leaves out: overlapping the all-reduce with the backward (the GPU step all-reduces once
 * per step, all tensors in one NCCL group: for 7B at 32k that is ~0.56 GB of fp32 gradients,
 * mostly embed_tokens, against a ~3 s step), sharding the moments' memory on the GPU (the
 * work and the checkpoint are sharded, the buffers are full size), sharding an untied
 * lm_head (it stays replicated), LoRA dropout across ranks (each rank would draw its own).
 *
 * Shape legend: K ranks (world size), P trainable parameters (flat), B batch, N sequence.
 */
#ifndef DIST_C
#define DIST_C

#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef USE_NCCL
#include "04_gpu.h" /* CUDA_CHECK */
#include <nccl.h>
#endif

#define DIST_SHM_MAGIC 0x4c4c444953543031ull /* "LLDIST01" */
#define DIST_SHM_SLOT_FLOATS ((size_t)1 << 20) /* per rank: 4 MiB of fp32 per round */

/* =======================================================================================
 * 1. The communicator
 * ===================================================================================== */

typedef enum { COMM_NONE = 0, COMM_SHM, COMM_NCCL } CommBackend;

/* The shared file of the shm backend: this header, then K slots of SLOT_FLOATS fp32. */
typedef struct {
    uint64_t magic;
    uint32_t world;
    uint32_t joined;        /* ranks that have attached (atomic) */
    uint32_t arrived;       /* ranks waiting at the barrier (atomic) */
    uint32_t generation;    /* bumped by the last rank to arrive (atomic) */
    uint32_t failed;        /* 0, or 1 + the rank that stopped with an error (atomic) */
    uint32_t pad;
    int32_t pids[DIST_MAX_RANKS];
    uint64_t slot_floats;
} ShmHeader;

typedef struct {
    CommBackend backend;
    int rank, world;
    char path[4096];        /* --dist-file */
    /* shm */
    ShmHeader *shm;         /* the mapping */
    float *slots;           /* [K, SLOT_FLOATS] */
    size_t map_bytes;
    int finished;           /* comm_finish ran: exiting is not a failure */
    int path_removed;       /* rank 0 has unlinked --dist-file */
#ifdef USE_NCCL
    ncclComm_t nccl;
    cudaStream_t stream;
    float *scratch;         /* [1] on the GPU: barriers and flags */
#endif
} Comm;

static Comm g_comm; /* one per process; backend COMM_NONE when training alone */

static int comm_is_root(void) { return g_comm.rank == 0; }
static int comm_world(void) { return g_comm.backend == COMM_NONE ? 1 : g_comm.world; }
/* 1 where the collectives run: several ranks, or one given --dist-file */
static int comm_active(void) { return g_comm.backend != COMM_NONE; }
/* The rule comm_init follows: one process without --dist-file trains alone, with no communicator. */
static int comm_alone(int world, const char *dist_file) { return world <= 1 && !dist_file; }

/* The slice of a flat vector of n values rank r owns: [lo, hi), sizes differing by <= 1. */
static void dist_shard(size_t n, int rank, int world, size_t *lo, size_t *hi) {
    size_t base = n / (size_t)world, extra = n % (size_t)world, r = (size_t)rank;
    *lo = r * base + (r < extra ? r : extra);
    *hi = *lo + base + (r < extra ? 1 : 0);
}

/* ---- the shm backend -------------------------------------------------------------------- */

/* Dies (exit 1, which marks this rank as failed) when another rank failed or vanished. */
static void shm_check_peers(void) {
    ShmHeader *h = g_comm.shm;
    uint32_t f = __atomic_load_n(&h->failed, __ATOMIC_SEQ_CST);
    if (f) {
        g_comm.finished = 1; /* not this rank's failure */
        die("rank %u of %d stopped with an error (its message is above), so rank %d stops too", f - 1, g_comm.world, g_comm.rank);
    }
    for (int r = 0; r < g_comm.world; r++) {
        pid_t pid = (pid_t)__atomic_load_n(&h->pids[r], __ATOMIC_SEQ_CST);
        if (pid > 0 && kill(pid, 0) != 0 && errno == ESRCH) {
            __atomic_store_n(&h->failed, (uint32_t)r + 1, __ATOMIC_SEQ_CST);
            g_comm.finished = 1;
            die("rank %d of %d (pid %d) ended without a word, so rank %d stops too", r, g_comm.world, (int)pid, g_comm.rank);
        }
    }
}

/* Sense-reversing barrier: the last rank in resets the count and bumps the generation.
 * timeout_s > 0: dies when the others have not all arrived by then (used while joining). */
static void shm_barrier_timeout(double timeout_s) {
    ShmHeader *h = g_comm.shm;
    double t0 = now_seconds();
    uint32_t gen = __atomic_load_n(&h->generation, __ATOMIC_SEQ_CST);
    if (__atomic_add_fetch(&h->arrived, 1, __ATOMIC_SEQ_CST) == (uint32_t)g_comm.world) {
        __atomic_store_n(&h->arrived, 0, __ATOMIC_SEQ_CST);
        __atomic_add_fetch(&h->generation, 1, __ATOMIC_SEQ_CST);
        return;
    }
    for (unsigned long spins = 0; __atomic_load_n(&h->generation, __ATOMIC_SEQ_CST) == gen; spins++) {
        if (spins < 2000) { sched_yield(); continue; }
        struct timespec ts = {0, 50000}; /* 50 us */
        nanosleep(&ts, NULL);
        if (spins % 2000 == 0) {
            shm_check_peers();
            if (timeout_s > 0 && now_seconds() - t0 > timeout_s)
                die("rank %d waited %.0f s for all %d ranks to join through --dist-file %s; start every rank with the same --world-size and --dist-file",
                    g_comm.rank, timeout_s, g_comm.world, g_comm.path);
        }
    }
}
static void shm_barrier(void) { shm_barrier_timeout(0); }

/* Marks the segment when this process exits before comm_finish: the others stop. */
static void comm_atexit(void) {
    if (g_comm.backend == COMM_SHM && g_comm.shm && !g_comm.finished) {
        uint32_t zero = 0;
        __atomic_compare_exchange_n(&g_comm.shm->failed, &zero, (uint32_t)g_comm.rank + 1, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    }
    /* rank 0 stopped inside the joining barrier (a rank failed just after arriving): once every
     * rank has mapped the file its name is not needed, so it goes as on the good path */
    if (g_comm.backend == COMM_SHM && g_comm.shm && g_comm.rank == 0 && !g_comm.path_removed &&
        __atomic_load_n(&g_comm.shm->joined, __ATOMIC_SEQ_CST) >= (uint32_t)g_comm.world) {
        unlink(g_comm.path);
        g_comm.path_removed = 1;
    }
#ifdef USE_NCCL
    if (g_comm.backend == COMM_NCCL && !g_comm.finished) {
        /* a marker beside the id file: the other ranks poll for it while they wait */
        char mark[4200];
        snprintf(mark, sizeof mark, "%s.failed", g_comm.path);
        FILE *f = fopen(mark, "w");
        if (f) { fprintf(f, "%d\n", g_comm.rank); fclose(f); }
        ncclCommAbort(g_comm.nccl);
    }
#endif
}

/* Rank 0 creates the shared file (under a temporary name, then renamed, so the others never
 * map a half-made one); the others wait for it, up to 120 s. Everyone registers its pid; once
 * all have joined, rank 0 removes the name (the mapping stays), so no stale file is left. */
static int shm_open_comm(Comm *c) {
    size_t bytes = sizeof(ShmHeader) + (size_t)c->world * DIST_SHM_SLOT_FLOATS * sizeof(float);
    int fd = -1;
    if (c->rank == 0) {
        if (file_exists(c->path)) return set_error("--dist-file %s already exists (left from another run?); remove it or name a new one", c->path);
        char tmp[4200];
        snprintf(tmp, sizeof tmp, "%s.tmp.%d", c->path, (int)getpid());
        fd = open(tmp, O_RDWR | O_CREAT | O_EXCL, 0600);
        if (fd < 0) return set_error("cannot create %s: %s", tmp, strerror(errno));
        if (ftruncate(fd, (off_t)bytes) != 0) { int e = errno; close(fd); unlink(tmp); return set_error("cannot size %s: %s", tmp, strerror(e)); }
        ShmHeader h;
        memset(&h, 0, sizeof h);
        h.magic = DIST_SHM_MAGIC;
        h.world = (uint32_t)c->world;
        h.slot_floats = DIST_SHM_SLOT_FLOATS;
        if (pwrite(fd, &h, sizeof h, 0) != (ssize_t)sizeof h) { int e = errno; close(fd); unlink(tmp); return set_error("cannot write %s: %s", tmp, strerror(e)); }
        if (rename(tmp, c->path) != 0) { int e = errno; close(fd); unlink(tmp); return set_error("cannot rename %s to %s: %s", tmp, c->path, strerror(e)); }
    } else {
        for (int waited = 0; fd < 0; waited++) {
            fd = open(c->path, O_RDWR);
            struct stat st;
            if (fd >= 0 && (fstat(fd, &st) != 0 || (size_t)st.st_size != bytes)) { close(fd); fd = -1; }
            if (fd >= 0) break;
            if (waited >= 120 * 20) return set_error("rank %d waited 120 s for rank 0 to create --dist-file %s; is rank 0 running with the same --world-size?", c->rank, c->path);
            struct timespec ts = {0, 50000000}; /* 50 ms */
            nanosleep(&ts, NULL);
        }
    }
    void *map = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (map == MAP_FAILED) return set_error("cannot map %s: %s", c->path, strerror(errno));
    c->shm = (ShmHeader *)map;
    c->slots = (float *)((char *)map + sizeof(ShmHeader));
    c->map_bytes = bytes;
    if (c->shm->magic != DIST_SHM_MAGIC || c->shm->world != (uint32_t)c->world || c->shm->slot_floats != DIST_SHM_SLOT_FLOATS)
        return set_error("--dist-file %s belongs to another run (other --world-size or program); remove it", c->path);
    __atomic_store_n(&c->shm->pids[c->rank], (int32_t)getpid(), __ATOMIC_SEQ_CST);
    uint32_t joined = __atomic_add_fetch(&c->shm->joined, 1, __ATOMIC_SEQ_CST);
    if (joined > (uint32_t)c->world) return set_error("--dist-file %s already has %d ranks: it is left from another run; remove it", c->path, c->world);
    atexit(comm_atexit);
    shm_barrier_timeout(300);
    if (c->rank == 0) { unlink(c->path); c->path_removed = 1; }
#ifdef _OPENMP
    /* K processes share the machine's cores: each takes its share (unless OMP_NUM_THREADS says) */
    if (!getenv("OMP_NUM_THREADS")) {
        int share = omp_get_num_procs() / c->world;
        omp_set_num_threads(share > 0 ? share : 1);
    }
#endif
    return 0;
}

/* ---- the NCCL backend (device buffers) ---------------------------------------------- */

#ifdef USE_NCCL
#define NCCL_CHECK(call)                                                                                        \
    do {                                                                                                        \
        ncclResult_t nc_err_ = (call);                                                                          \
        if (nc_err_ != ncclSuccess) die("%s:%d: %s failed: %s", __FILE__, __LINE__, #call, ncclGetErrorString(nc_err_)); \
    } while (0)

/* Waits for the NCCL work on the stream; stops with one sentence when another rank failed
 * (its marker file appears) or NCCL reports an asynchronous error. */
static void nccl_wait(void) {
    char mark[4200];
    snprintf(mark, sizeof mark, "%s.failed", g_comm.path);
    for (unsigned long spins = 0;; spins++) {
        cudaError_t e = cudaStreamQuery(g_comm.stream);
        if (e == cudaSuccess) return;
        if (e != cudaErrorNotReady) die("waiting for NCCL on rank %d: %s", g_comm.rank, cudaGetErrorString(e));
        if (spins % 1000 == 999) {
            ncclResult_t async = ncclSuccess;
            ncclCommGetAsyncError(g_comm.nccl, &async);
            if (async != ncclSuccess) die("NCCL failed on rank %d: %s", g_comm.rank, ncclGetErrorString(async));
            if (file_exists(mark)) {
                g_comm.finished = 1;
                ncclCommAbort(g_comm.nccl);
                die("another rank stopped with an error (its message is above; %s names it), so rank %d stops too", mark, g_comm.rank);
            }
        }
        struct timespec ts = {0, 20000}; /* 20 us */
        nanosleep(&ts, NULL);
    }
}

/* Rank 0 makes the unique id and writes it (temporary name, then rename); the others read it. */
static int nccl_open_comm(Comm *c) {
    ncclUniqueId id;
    if (c->rank == 0) {
        if (file_exists(c->path)) return set_error("--dist-file %s already exists (left from another run?); remove it or name a new one", c->path);
        char mark[4200];
        snprintf(mark, sizeof mark, "%s.failed", c->path);
        unlink(mark); /* a failure marker left by an earlier run */
        NCCL_CHECK(ncclGetUniqueId(&id));
        if (write_file_atomic(c->path, &id, sizeof id) != 0) return -1;
    } else {
        for (int waited = 0;; waited++) {
            size_t len = 0;
            char *raw = file_exists(c->path) ? read_file(c->path, &len) : NULL;
            if (raw && len == sizeof id) { memcpy(&id, raw, sizeof id); free(raw); break; }
            free(raw);
            if (waited >= 120 * 20) return set_error("rank %d waited 120 s for rank 0 to write the NCCL id to --dist-file %s", c->rank, c->path);
            struct timespec ts = {0, 50000000};
            nanosleep(&ts, NULL);
        }
    }
    int n_dev = 0;
    if (cudaGetDeviceCount(&n_dev) != cudaSuccess || n_dev == 0) return set_error("rank %d sees no CUDA GPU; NCCL training needs one per rank", c->rank);
    int dev = -1;
    if (cudaGetDevice(&dev) != cudaSuccess) return set_error("rank %d cannot query its GPU", c->rank); /* 05_train chose it (rank mod GPUs) */
    if (cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking) != cudaSuccess) return set_error("rank %d cannot create a CUDA stream", c->rank);
    if (cudaMalloc((void **)&c->scratch, sizeof(float)) != cudaSuccess) return set_error("rank %d cannot allocate 4 bytes on its GPU", c->rank);
    ncclResult_t r = ncclCommInitRank(&c->nccl, c->world, id, c->rank); /* returns once every rank has joined */
    if (r != ncclSuccess) return set_error("NCCL could not connect rank %d of %d: %s", c->rank, c->world, ncclGetErrorString(r));
    atexit(comm_atexit);
    if (c->rank == 0) unlink(c->path); /* everyone has read the id */
    return 0;
}
#endif

/* ---- set-up and the collectives ------------------------------------------------------- */

/* Joins the K processes: rank and world from the flags, else from Open MPI's environment
 * (mpirun), else a single process (no communicator). backend_gpu picks NCCL. One process
 * given --dist-file (--world-size 1) still opens a communicator, of one rank: the collective
 * code paths then run on a machine of one GPU, and must change nothing. */
/* This process's rank and the world size: from the flags (--world-size > 0), else from
 * Open MPI's environment (mpirun), else a single process. */
static void dist_rank_world(int flag_rank, int flag_world, int *rank, int *world) {
    const char *er = getenv("OMPI_COMM_WORLD_RANK"), *ew = getenv("OMPI_COMM_WORLD_SIZE");
    if (flag_world > 0) { *rank = flag_rank; *world = flag_world; }
    else if (er && ew) { *rank = atoi(er); *world = atoi(ew); }
    else { *rank = 0; *world = 1; }
    if (*world <= 0) *world = 1;
}

static int comm_init(int flag_rank, int flag_world, const char *dist_file, int backend_gpu) {
    memset(&g_comm, 0, sizeof g_comm);
    int rank, world;
    dist_rank_world(flag_rank, flag_world, &rank, &world);
    if (comm_alone(world, dist_file)) { g_comm.backend = COMM_NONE; g_comm.rank = 0; g_comm.world = 1; return 0; }
    if (world > DIST_MAX_RANKS) return set_error("--world-size %d is more than the %d ranks supported", world, DIST_MAX_RANKS);
    if (rank < 0 || rank >= world) return set_error("--rank %d is outside 0..%d (--world-size %d)", rank, world - 1, world);
    if (!dist_file) return set_error("with --world-size %d, give --dist-file PATH: a file path all ranks see (rank 0 creates it)", world);
    g_comm.rank = rank;
    g_comm.world = world;
    snprintf(g_comm.path, sizeof g_comm.path, "%s", dist_file);
    if (backend_gpu) {
#ifdef USE_NCCL
        g_comm.backend = COMM_NCCL;
        return nccl_open_comm(&g_comm);
#else
        return set_error("several GPU ranks need NCCL, and this build has none (install NCCL and rebuild), or train with --device cpu");
#endif
    }
    g_comm.backend = COMM_SHM;
    return shm_open_comm(&g_comm);
}

/* A clean end: every rank arrives, then the mapping goes. */
static void comm_finish(void) {
    if (g_comm.backend == COMM_SHM) {
        shm_barrier();
        g_comm.finished = 1;
        munmap(g_comm.shm, g_comm.map_bytes);
        g_comm.shm = NULL;
    }
#ifdef USE_NCCL
    if (g_comm.backend == COMM_NCCL) {
        g_comm.finished = 1;
        NCCL_CHECK(ncclCommDestroy(g_comm.nccl));
        CUDA_CHECK(cudaFree(g_comm.scratch));
        CUDA_CHECK(cudaStreamDestroy(g_comm.stream));
    }
#endif
    g_comm.backend = COMM_NONE;
}

static void comm_barrier(void) {
    if (g_comm.backend == COMM_SHM) shm_barrier();
#ifdef USE_NCCL
    if (g_comm.backend == COMM_NCCL) { /* a one-value all-reduce (NCCL skips zero-size ones) */
        CUDA_CHECK(cudaDeviceSynchronize());
        NCCL_CHECK(ncclAllReduce(g_comm.scratch, g_comm.scratch, 1, ncclFloat32, ncclSum, g_comm.nccl, g_comm.stream));
        nccl_wait();
    }
#endif
}

/* buf [n] (host, fp32) becomes the sum over ranks, added in rank order: the same bits on
 * every rank. (NCCL: a device buffer.) */
static void comm_allreduce_sum(float *buf, size_t n) {
    if (g_comm.backend == COMM_SHM) {
        size_t cap = DIST_SHM_SLOT_FLOATS, K = (size_t)g_comm.world;
        for (size_t at = 0; at < n; at += cap) {
            size_t m = n - at < cap ? n - at : cap;
            memcpy(g_comm.slots + (size_t)g_comm.rank * cap, buf + at, m * sizeof(float));
            shm_barrier();
            for (size_t i = 0; i < m; i++) {
                float s = g_comm.slots[i];
                for (size_t r = 1; r < K; r++) s += g_comm.slots[r * cap + i];
                buf[at + i] = s;
            }
            shm_barrier(); /* nobody overwrites its slot before everyone has read */
        }
    }
#ifdef USE_NCCL
    if (g_comm.backend == COMM_NCCL) {
        NCCL_CHECK(ncclAllReduce(buf, buf, n, ncclFloat32, ncclSum, g_comm.nccl, g_comm.stream));
        nccl_wait();
    }
#endif
}

/* buf [n]: rank r's slice dist_shard(n, r) is valid on rank r; afterwards all of it is on
 * every rank. elem: bytes per value (4: fp32). Host buffers (shm). */
static void comm_allgather_shards(void *buf, size_t n, size_t elem) {
    CHECK(g_comm.backend != COMM_NCCL, "comm_allgather_shards takes host buffers (the shm backend); GPU ranks gather with NCCL");
    if (g_comm.backend != COMM_SHM) return;
    /* values per round: the K slots together are one window */
    size_t lo, hi, cap = DIST_SHM_SLOT_FLOATS * sizeof(float) / elem * (size_t)g_comm.world;
    dist_shard(n, g_comm.rank, g_comm.world, &lo, &hi);
    char *window = (char *)g_comm.slots, *b = (char *)buf;
    for (size_t at = 0; at < n; at += cap) {
        size_t end = n - at < cap ? n : at + cap;
        size_t a = lo > at ? lo : at, z = hi < end ? hi : end;
        if (a < z) memcpy(window + (a - at) * elem, b + a * elem, (z - a) * elem);
        shm_barrier();
        memcpy(b + at * elem, window, (end - at) * elem);
        shm_barrier();
    }
}

/* buf [bytes] from rank `root` to every rank (host buffers, shm). */
static API void comm_broadcast(void *buf, size_t bytes, int root) {
    CHECK(g_comm.backend != COMM_NCCL, "comm_broadcast takes host buffers (the shm backend); GPU ranks broadcast with NCCL");
    if (g_comm.backend != COMM_SHM) return;
    size_t cap = DIST_SHM_SLOT_FLOATS * sizeof(float) * (size_t)g_comm.world;
    char *window = (char *)g_comm.slots, *b = (char *)buf;
    for (size_t at = 0; at < bytes; at += cap) {
        size_t m = bytes - at < cap ? bytes - at : cap;
        if (g_comm.rank == root) memcpy(window, b + at, m);
        shm_barrier();
        if (g_comm.rank != root) memcpy(b + at, window, m);
        shm_barrier();
    }
}

/* 1 on every rank when flag is set on any rank. */
static int comm_any(int flag) {
    if (g_comm.backend == COMM_NONE) return flag;
    float f = flag ? 1.0f : 0.0f;
#ifdef USE_NCCL
    if (g_comm.backend == COMM_NCCL) {
        CUDA_CHECK(cudaMemcpy(g_comm.scratch, &f, sizeof f, cudaMemcpyHostToDevice));
        comm_allreduce_sum(g_comm.scratch, 1);
        CUDA_CHECK(cudaMemcpy(&f, g_comm.scratch, sizeof f, cudaMemcpyDeviceToHost));
        return f > 0;
    }
#endif
    comm_allreduce_sum(&f, 1);
    return f > 0;
}

/* =======================================================================================
 * 2. The trainable tensors as one flat vector (ZeRO-1's unit)
 * ===================================================================================== */

static size_t flat_count(const AdamW *opt) {
    size_t n = 0;
    for (size_t k = 0; k < opt->count; k++) n += opt->params[k].numel;
    return n;
}

/* which: 0 param, 1 grad, 2 m, 3 v. */
static float *train_param_array(TrainParam *p, int which) {
    return which == 0 ? p->param : which == 1 ? p->grad : which == 2 ? p->m : p->v;
}

/* flat [P] = the tensors' `which` arrays, in the optimizer's order (to_flat) or back. */
static void flat_copy(AdamW *opt, int which, float *flat, int to_flat) {
    size_t at = 0;
    for (size_t k = 0; k < opt->count; k++) {
        TrainParam *p = &opt->params[k];
        float *a = train_param_array(p, which);
        if (to_flat) memcpy(flat + at, a, p->numel * sizeof(float));
        else memcpy(a, flat + at, p->numel * sizeof(float));
        at += p->numel;
    }
}

/* After a ZeRO-1 step: every rank gets every rank's slice of `which` (params each step,
 * the moments before a checkpoint). flat [P] is scratch. */
static void dist_gather_state(AdamW *opt, int which, float *flat) {
    if (g_comm.backend != COMM_SHM) return;
    flat_copy(opt, which, flat, 1);
    comm_allgather_shards(flat, flat_count(opt), sizeof(float));
    flat_copy(opt, which, flat, 0);
}

/* =======================================================================================
 * 3. The CPU step over K ranks
 *
 * 05_train.c's train_step_cpu, spread: the step covers K * grad_accum micro-batches, micro-
 * batch j is rank j mod K's (the others skip it), the gradients and the loss sum are
 * all-reduced, and AdamW updates this rank's ZeRO-1 slice, then the slices are all-gathered.
 * ===================================================================================== */

static StepResult train_step_cpu_ranks(Trainer *t) {
    const TrainOptions *o = &t->opt;
    StepResult r = {0, 0, 0};
    int K = comm_world(), rank = g_comm.rank, n_micro = K * o->grad_accum;
    lora_trainer_zero_grads(&t->lt);
    for (int micro = 0; micro < n_micro; micro++) {
        if (micro % K != rank) { dataset_skip_batch(&t->data, o->batch); continue; }
        dataset_next_batch(&t->data, o->batch, t->inputs, t->targets);
        /* a non-finite loss rides along in the sum: the other ranks wait for this one's */
        r.loss += lora_trainer_accumulate(&t->lt, t->inputs, t->targets, (size_t)o->batch, (size_t)o->ctx);
    }
    size_t P = flat_count(&t->lt.opt);
    flat_copy(&t->lt.opt, 1, t->dist_flat, 1); /* gradients and the loss sum, added over the ranks */
    t->dist_flat[P] = (float)r.loss;
    comm_allreduce_sum(t->dist_flat, P + 1);
    flat_copy(&t->lt.opt, 1, t->dist_flat, 0);
    r.loss = t->dist_flat[P];
    if (step_finish_grads(t, &r, n_micro) == 0) {
        size_t lo, hi;
        dist_shard(P, rank, K, &lo, &hi);
        adamw_step_range(&t->lt.opt, (float)r.lr, lo, hi);
        dist_gather_state(&t->lt.opt, 0, t->dist_flat);
    }
    return r;
}

/* =======================================================================================
 * 4. Memory plan for --shard-weights (ZeRO-3 of the frozen bf16 weights)
 *
 * Per GPU: frozen bf16 weights (all of them, or 1/K plus two layers' worth of gather
 * buffers), the trainable fp32 state (master, grad and the two moments: full size; ZeRO-1
 * shards the moments' work and the checkpoint gather, not yet their memory), and the
 * activations of 05_train_gpu.c's checkpointed step: the kept layer inputs [L+1, N, D] bf16
 * plus one layer's work buffers (05_plan.c's terms, keeping no attention outputs, the MLP untiled).
 * ===================================================================================== */

typedef struct {
    double frozen, gather, trainable, moments, activations, total; /* bytes per GPU */
} DistMemPlan;

static DistMemPlan dist_memory_plan(const Config *c, size_t N, size_t R, int K, int shard_weights) {
    DistMemPlan p;
    memset(&p, 0, sizeof p);
    double D = c->dim, F = c->ffn_dim, V = c->vocab_size, L = c->n_layers;
    double Hd = (double)c->n_heads * c->head_dim, Hkd = (double)c->n_kv_heads * c->head_dim;
    double per_layer = D * Hd + 2 * D * Hkd + Hd * D + 3 * D * F;              /* frozen linears of one layer */
    double frozen = (double)config_param_count(c) * 2.0;                        /* bf16 */
    double trainable = V * D + L * 2 * D + D + L * R * ((D + Hd) + 2 * (D + Hkd) + (Hd + D)); /* embed, norms, LoRA q,k,v,o */
    p.frozen = shard_weights ? frozen / K : frozen;
    p.gather = shard_weights ? 2 * per_layer * 2.0 : 0;                       /* double buffer, bf16 */
    p.trainable = trainable * (4 + 4) + L * R * ((D + Hd) + 2 * (D + Hkd) + (Hd + D)) * 2; /* master, grad; LoRA bf16 copies */
    p.moments = trainable * 8.0; /* the GPU step keeps full-size moment buffers (it updates only its slice) */
    /* activations: 05_plan.c's plan for B = 1 keeping no attention outputs, nothing on the host (its
     * attention workspace left out): kept inputs [L+1, N, D], five [N, D] work buffers,
     * q k v, one attention output and lse, LoRA's xa, the MLP arena, 8192 rows of logits */
    double n = (double)N, H = c->n_heads, mlp = 3 * n * F, attn = n * (2 * Hd + 2 * Hkd);
    p.activations = (L + 1) * n * D * 2 + 5 * n * D * 2 + 2 * n * 4 + (n * Hd + 2 * n * Hkd) * 2 + 3 * n * 4 + (n * Hd * 2 + H * n * 4) +
                    8 * n * (double)R * 2 + (mlp > attn ? mlp : attn) * 2 + 8192.0 * V * 6 + n * 4;
    p.total = p.frozen + p.gather + p.trainable + p.moments + p.activations + 1.0 * (1 << 30); /* + 1 GiB CUDA context, workspaces */
    return p;
}

static void dist_print_memory_plan(FILE *f, const char *name, const Config *c, size_t N, int K, double gpu_gib) {
    const double G = 1024.0 * 1024.0 * 1024.0;
    for (int shard = 0; shard <= 1; shard++) {
        DistMemPlan p = dist_memory_plan(c, N, 8, K, shard);
        fprintf(f, "%-12s N=%-6zu K=%d %-16s frozen %6.2f + gather %5.2f + trainable %5.2f + moments %5.2f + activations %6.2f = %6.2f GiB per GPU: %s %g GiB\n",
                name, N, K, shard ? "--shard-weights" : "(replicated)", p.frozen / G, p.gather / G, p.trainable / G, p.moments / G,
                p.activations / G, p.total / G, p.total / G <= gpu_gib ? "fits" : "does not fit", gpu_gib);
    }
}

#endif /* DIST_C */
