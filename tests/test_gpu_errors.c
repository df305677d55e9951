/* test_gpu_errors.c: a refusal in a GPU object reaches the C caller as its own sentence.
 *
 * The program is several objects (build/04_s2attn.o, build/04_layers.o, this C file with the
 * stages it includes), each including common.h; set_error() in one and last_error() in
 * another must share one buffer (common.h's g_last_error: one weak definition). With a
 * buffer per object a refusal from a .cu object reached the C side as "unknown error".
 *  1. No GPU needed (every refusal here comes before any CUDA call): each attention entry
 *     point, given arguments it does not support, returns -1, and last_error() read here
 *     holds the sentence of 04_s2attn.o (the buffer holds another sentence before each call).
 *  2. With a GPU: 05_train_gpu.c's training step, its S2 group spoilt after planning, ends
 *     its process (a child: CUDA is never touched in this one) with
 *     "error: GPU attention: <the sentence of 04_s2attn.o>", not "unknown error".
 * Exits 1 on a failed check, 77 when part 1 passed and no GPU is there for part 2.
 */
#define STAGE 0
#include "05_train.c"
#include "05_train_gpu.c"

#include <sys/wait.h>

#include "check.h"
#include "gpu_tiny.h"

static const char POISON[] = "a sentence left over from an earlier failure";

/* rc and last_error() after a refused call: -1, and the sentence contains `want` */
static void expect_refusal(const char *call, int rc, const char *want) {
    EXPECT(rc == -1, "%s returned %d, not -1", call, rc);
    EXPECT(strstr(last_error(), want) != NULL, "%s: last_error() is '%s', not the GPU object's sentence (containing '%s')", call,
           last_error(), want);
    printf("  %-40s -> %s\n", call, last_error());
    set_error("%s", POISON);
}

static void test_refusals(void) {
    set_error("%s", POISON);
    expect_refusal("attn_forward with head dim 96", attn_forward(NULL, NULL, NULL, NULL, NULL, 1, 100, 4, 4, 96, 0),
                   "head dim 96 is not supported");
    expect_refusal("attn_forward with N=100, G=30", attn_forward(NULL, NULL, NULL, NULL, NULL, 1, 100, 4, 4, 64, 30),
                   "S2 group 30 does not divide N=100");
    expect_refusal("attn_forward with H=6, Hk=4", attn_forward(NULL, NULL, NULL, NULL, NULL, 1, 100, 6, 4, 64, 0),
                   "H=6 is not a multiple of Hk=4");
    expect_refusal("attn_backward without a workspace",
                   attn_backward(NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, 1, 100, 4, 4, 64, 0), "no workspace");
    expect_refusal("attn_decode with 10 keys in a cache of 5", attn_decode(NULL, NULL, NULL, NULL, NULL, 1, 4, 4, 64, 5, 10),
                   "10 keys do not fit a cache of 5");
    expect_refusal("attn_set_tile_variant(99, 0)", attn_set_tile_variant(99, 0), "tile variant (99, 0) does not exist");
    expect_refusal("attn_forward_naive with head dim 48", attn_forward_naive(NULL, NULL, NULL, NULL, NULL, 1, 10, 2, 2, 48, 0, 0),
                   "head dim 48 is not supported");
    expect_refusal("attn_forward_naive with H=6, Hk=4", attn_forward_naive(NULL, NULL, NULL, NULL, NULL, 1, 10, 6, 4, 64, 0, 0),
                   "H=6 is not a multiple of Hk=4");
}

/* In the child: a tiny model's training step on the GPU with its S2 group spoilt after
 * planning (G = 24 does not divide N = 64), so 04_s2attn.o refuses the attention and
 * 05_train_gpu.c dies with what last_error() says. Exit 77 without a GPU. */
static void spoilt_step(void) {
    int n_dev = 0;
    if (cudaGetDeviceCount(&n_dev) != cudaSuccess || n_dev == 0) _exit(77);
    TinyTrainer t;
    tiny_trainer_init(&t, 1, 1, 5);
    const size_t N = 64;
    if (gpu_train_plan(&t.g, 1, N, N / 2) != 0) die("%s", last_error());
    t.g.G = 24;
    int32_t tokens[64], targets[64]; /* [N] */
    for (size_t i = 0; i < N; i++) { tokens[i] = (int32_t)(i % 100); targets[i] = (int32_t)((i + 1) % 100); }
    set_error("%s", POISON);
    gpu_train_forward_backward(&t.g, tokens, targets);
    _exit(0); /* not reached: the step dies */
}

/* Part 2: runs spoilt_step in a child, its stderr into a pipe. 1 if it ran, 0 if no GPU. */
static int test_caller_message(void) {
    int fd[2];
    CHECK(pipe(fd) == 0, "pipe: %s", strerror(errno));
    fflush(stdout);
    pid_t pid = fork();
    CHECK(pid >= 0, "fork: %s", strerror(errno));
    if (pid == 0) {
        close(fd[0]);
        dup2(fd[1], 2);
        spoilt_step();
    }
    close(fd[1]);
    char err[4096];
    size_t len = 0;
    ssize_t got;
    while (len + 1 < sizeof err && (got = read(fd[0], err + len, sizeof err - 1 - len)) > 0) len += (size_t)got;
    err[len] = 0;
    close(fd[0]);
    int status = 0;
    CHECK(waitpid(pid, &status, 0) == pid, "waitpid: %s", strerror(errno));
    if (WIFEXITED(status) && WEXITSTATUS(status) == 77) return 0;
    printf("  the training step with G=24, N=64 -> %s", err);
    EXPECT(WIFEXITED(status) && WEXITSTATUS(status) == 1, "the spoilt step ended with status %d, not exit 1", status);
    EXPECT(strstr(err, "error: GPU attention: ") && strstr(err, "S2 group 24 does not divide N=64"),
           "the step's message is not 'error: GPU attention: <04_s2attn.o's sentence>': '%s'", err);
    EXPECT(!strstr(err, "unknown error") && !strstr(err, POISON), "the step's message carries no stale sentence: '%s'", err);
    return 1;
}

int main(void) {
    printf("refusals, read through last_error() in the C test:\n");
    test_refusals();
    printf("the training step's message:\n");
    int ran = test_caller_message();
    printf("test_gpu_errors: %d checks, %d failed\n", g_checks, g_failures);
    if (g_failures) return 1;
    if (!ran) { printf("skip: the refusals pass; the training step needs a GPU (none found)\n"); return 77; }
    return 0;
}
