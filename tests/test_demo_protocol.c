/* test_demo_protocol.c: demo/reference_eval.py, the PyTorch reference for the demo's
 * evaluation, must build exactly 06_infer.c's passkey prompts and perplexity windows.
 *
 * For a fresh random seed it runs `$PYTHON demo/reference_eval.py --dump-protocol SEED`
 * (standard-library Python: common.h's generator re-written there) and compares every line
 * with 06_infer.c's own functions: for 7 target lengths x 3 trials the filler size, the
 * depth, the key and every byte of the prompt; for 6 (tokens, seq_len, stride) grids every
 * window start. Exact equality; any difference fails.
 */
#define STAGE 0
#include "06_infer.c"
#include "check.h"

static void check_line(const char *line, uint64_t seed) {
    char kind[16];
    if (!check_counted(sscanf(line, "%15s", kind) == 1)) { printf("FAIL unreadable line: %.80s\n", line); return; }
    if (!strcmp(kind, "passkey")) {
        size_t target, trial, n_garbage_py, depth_py;
        long key_py;
        int used = 0;
        if (!check_counted(sscanf(line, "passkey %zu %zu %zu %zu %ld %n", &target, &trial, &n_garbage_py, &depth_py, &key_py, &used) == 5)) {
            printf("FAIL unreadable line: %.80s\n", line); return;
        }
        const char *hex = line + used;
        size_t n_garbage = passkey_garbage_chars(target), depth;
        long key;
        passkey_draw(seed + trial, n_garbage, &depth, &key);
        char *prompt = passkey_prompt(n_garbage, depth, key);
        int same = n_garbage == n_garbage_py && depth == depth_py && key == key_py;
        size_t len = strlen(prompt);
        for (size_t i = 0; same && i < len; i++) {
            unsigned v;
            same = sscanf(hex + 2 * i, "%2x", &v) == 1 && v == (unsigned char)prompt[i];
        }
        same = same && (hex[2 * len] == '\n' || hex[2 * len] == 0);
        if (!check_counted(same)) {
            printf("FAIL passkey target %zu trial %zu: C n_garbage %zu depth %zu key %ld, Python %zu %zu %ld (or the prompt text differs)\n",
                   target, trial, n_garbage, depth, key, n_garbage_py, depth_py, key_py);
        }
        free(prompt);
    } else if (!strcmp(kind, "windows")) {
        size_t tokens, seq_len, stride;
        int used = 0;
        if (!check_counted(sscanf(line, "windows %zu %zu %zu%n", &tokens, &seq_len, &stride, &used) == 3)) {
            printf("FAIL unreadable line: %.80s\n", line); return;
        }
        size_t *starts;
        size_t count = ppl_window_starts(tokens, seq_len, stride, &starts);
        const char *p = line + used;
        size_t k = 0, v;
        int n, same = 1;
        while (sscanf(p, " %zu%n", &v, &n) == 1) {
            same = same && k < count && starts[k] == v;
            k++;
            p += n;
        }
        if (!check_counted(same && k == count)) {
            printf("FAIL windows %zu %zu %zu: C has %zu starts, Python %zu (or they differ)\n", tokens, seq_len, stride, count, k);
        }
        free(starts);
    } else {
        EXPECT(0, "unknown line kind %s", kind);
    }
}

int main(void) {
    const char *py = getenv("PYTHON");
    if (!py || !*py) py = "python3";
    uint64_t seed;
    FILE *urandom = fopen("/dev/urandom", "rb");
    if (!urandom || fread(&seed, sizeof seed, 1, urandom) != 1) die("cannot read /dev/urandom");
    fclose(urandom);
    seed %= 1000000007ull;
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "'%s' demo/reference_eval.py --dump-protocol %llu", py, (unsigned long long)seed);
    FILE *f = popen(cmd, "r");
    if (!f) die("cannot run %s", cmd);
    size_t cap = 1 << 20, lines = 0;
    char *line = (char *)xmalloc(cap); /* a 32k-token prompt is ~123k characters, 246k as hex */
    while (fgets(line, (int)cap, f)) {
        check_line(line, seed);
        lines++;
    }
    free(line);
    int rc = pclose(f);
    if (rc != 0) {
        printf("skip: '%s demo/reference_eval.py --dump-protocol' did not run (exit %d)\n", py, rc);
        return 77;
    }
    EXPECT(lines == 7 * 3 + 6, "expected 27 protocol lines, got %zu", lines);
    printf("%s: %zu protocol lines from reference_eval.py (seed %llu), %d of %d checks differ from 06_infer\n",
           g_failures ? "FAIL" : "ok", lines, (unsigned long long)seed, g_failures, g_checks);
    return g_failures ? 1 : 0;
}
