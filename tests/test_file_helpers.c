/* test_file_helpers.c: common.h's file handling, each helper on its own.
 *
 * open_input_file: a regular file opens; a folder, a FIFO (without hanging: no writer ever
 * comes) and a character device are refused naming their kind; read_file and map_file go
 * through it. check_output_path: the same file (by path, through a symlink, through a hard
 * link), a path inside an input folder, a new path inside one, and (when the output may be
 * emptied) an input inside the output folder are refused naming both flags; unrelated paths,
 * a sibling whose name only starts like the input's, and missing inputs pass. AtomicDir: a
 * commit renames the folder whole and replaces an older one, leaving no temporaries; an abort
 * leaves the old folder untouched; commit_into moves the marker last. remove_stale_temporaries
 * removes only the temporaries of dead pids, and only the named ones when asked. checksum64
 * changes with any single flipped bit. error_in keeps the cause of an error behind a long path.
 */
#define STAGE 0
#include "common.h"
#include <sys/wait.h>
#pragma GCC diagnostic ignored "-Wformat-truncation" /* scratch paths are short */

#include "check.h"

static char g_tmp[256];

static const char *at(char *buf, const char *name) {
    snprintf(buf, 600, "%s/%s", g_tmp, name);
    return buf;
}
static void put(const char *path, const char *text) { CHECK(write_file_atomic(path, text, strlen(text)) == 0, "%s", last_error()); }
static char *get(const char *path) { return read_file(path, NULL); }

static void test_open_input(void) {
    char p[600];
    put(at(p, "plain.txt"), "hello");
    size_t len = 0;
    char *s = read_file(p, &len);
    EXPECT(s && len == 5 && !strcmp(s, "hello"), "a regular file reads");
    free(s);
    EXPECT(read_file(g_tmp, NULL) == NULL && strstr(last_error(), "is a directory"), "a folder is refused: %s", last_error());
    CHECK(mkfifo(at(p, "fifo"), 0600) == 0, "mkfifo: %s", strerror(errno));
    double t0 = now_seconds();
    EXPECT(read_file(p, NULL) == NULL && strstr(last_error(), "is a FIFO"), "a FIFO is refused: %s", last_error());
    MappedFile m;
    EXPECT(map_file(&m, p) != 0 && strstr(last_error(), "is a FIFO"), "map_file refuses a FIFO: %s", last_error());
    EXPECT(now_seconds() - t0 < 5, "a FIFO without a writer does not hang (%.1f s)", now_seconds() - t0);
    EXPECT(read_file("/dev/null", NULL) == NULL && strstr(last_error(), "character device"), "a device is refused: %s", last_error());
    EXPECT(read_file(at(p, "missing"), NULL) == NULL && strstr(last_error(), "No such file"), "a missing file says so: %s", last_error());
}

static void test_output_paths(void) {
    char model[600], data[600], out[600], lnk[600], hard[600], sib[600];
    at(model, "model");
    make_dir(model);
    put(at(data, "data.txt"), "text");
    NamedPath in[3] = {{"--model", model}, {"--data", data}, {"--adapter", NULL}};
    EXPECT(check_output_path("--out", at(out, "out"), 1, in, 3) == 0, "an unrelated new folder passes: %s", last_error());
    EXPECT(check_output_path("--out", NULL, 1, in, 3) == 0, "no output passes");
    EXPECT(check_output_path("--out", data, 0, in, 3) != 0 && strstr(last_error(), "--out") && strstr(last_error(), "is the input --data"),
           "the same file is refused: %s", last_error());
    CHECK(symlink(data, at(lnk, "data_link.txt")) == 0, "symlink");
    EXPECT(check_output_path("--out", lnk, 0, in, 3) != 0 && strstr(last_error(), "is the input --data"), "a symlink to an input is refused: %s", last_error());
    CHECK(link(data, at(hard, "data_hard.txt")) == 0, "link");
    EXPECT(check_output_path("--out", hard, 0, in, 3) != 0 && strstr(last_error(), "is the input --data"), "a hard link to an input is refused: %s", last_error());
    char spelled[700];
    snprintf(spelled, sizeof spelled, "%s/./../%s/model/", g_tmp, strrchr(g_tmp, '/') + 1);
    EXPECT(check_output_path("--export", spelled, 1, in, 3) != 0 && strstr(last_error(), "is the input --model"), "another spelling of an input folder is refused: %s", last_error());
    snprintf(out, sizeof out, "%s/new/deeper", model);
    EXPECT(check_output_path("--export", out, 1, in, 3) != 0 && strstr(last_error(), "inside the input folder --model"), "a new path inside an input folder is refused: %s", last_error());
    EXPECT(check_output_path("--out", g_tmp, 1, in, 3) != 0 && strstr(last_error(), "lies inside the output folder --out"),
           "an output folder that may be emptied may not hold an input: %s", last_error());
    EXPECT(check_output_path("--out", g_tmp, 0, in, 3) == 0, "... which is fine when nothing is emptied: %s", last_error());
    make_dir(at(sib, "model2"));
    EXPECT(check_output_path("--out", sib, 1, in, 3) == 0, "a sibling named like the input (model2 beside model) passes: %s", last_error());
    NamedPath missing[1] = {{"--data", "/no/such/input"}};
    EXPECT(check_output_path("--out", "/no/such/input", 0, missing, 1) == 0, "a missing input is the loader's to report");
}

static int count_entries(const char *dir, const char *part) {
    DIR *d = opendir(dir);
    int n = 0;
    for (struct dirent *e; d && (e = readdir(d));) n += strstr(e->d_name, part) != NULL;
    if (d) closedir(d);
    return n;
}

static void test_atomic_dir(void) {
    char parent[600], p[800];
    make_dir(at(parent, "atomic"));
    AtomicDir d;
    EXPECT(atomic_dir_begin(&d, parent, "X") == 0, "begin: %s", last_error());
    put(path_join(p, sizeof p, d.tmp_dir, "a.txt"), "one");
    EXPECT(count_entries(parent, "X") == 1 && count_entries(parent, ".X.tmp.") == 1, "while written, only the temporary exists");
    EXPECT(atomic_dir_commit(&d) == 0, "commit: %s", last_error());
    char *s = get(path_join(p, sizeof p, d.final_dir, "a.txt"));
    EXPECT(s && !strcmp(s, "one") && count_entries(parent, ".X.") == 0, "committed whole, no temporaries");
    free(s);
    /* a replacement, then an abort that leaves the replacement alone */
    EXPECT(atomic_dir_begin(&d, parent, "X") == 0, "begin again");
    put(path_join(p, sizeof p, d.tmp_dir, "b.txt"), "two");
    EXPECT(atomic_dir_commit(&d) == 0, "commit over the old: %s", last_error());
    EXPECT(!file_exists(path_join(p, sizeof p, d.final_dir, "a.txt")) && file_exists(path_join(p, sizeof p, d.final_dir, "b.txt")) &&
           count_entries(parent, ".X.") == 0, "the old folder is replaced whole");
    EXPECT(atomic_dir_begin(&d, parent, "X") == 0, "begin a third");
    put(path_join(p, sizeof p, d.tmp_dir, "c.txt"), "three");
    atomic_dir_abort(&d);
    EXPECT(file_exists(path_join(p, sizeof p, d.final_dir, "b.txt")) && count_entries(parent, ".X.") == 0, "an abort leaves the folder as it was");
    /* into an existing folder, the marker last */
    EXPECT(atomic_dir_begin(&d, d.final_dir, "adapter") == 0, "begin into");
    char dest[600];
    snprintf(dest, sizeof dest, "%s/X", parent);
    put(path_join(p, sizeof p, dest, "marker.json"), "old");
    put(path_join(p, sizeof p, d.tmp_dir, "marker.json"), "new");
    put(path_join(p, sizeof p, d.tmp_dir, "weights.bin"), "w");
    EXPECT(atomic_dir_commit_into(&d, dest, "marker.json") == 0, "commit into: %s", last_error());
    s = get(path_join(p, sizeof p, dest, "marker.json"));
    EXPECT(s && !strcmp(s, "new") && file_exists(path_join(p, sizeof p, dest, "weights.bin")) && file_exists(path_join(p, sizeof p, dest, "b.txt")) &&
           count_entries(dest, ".adapter.") == 0, "files moved in beside what was there, no temporary left");
    free(s);
}

static void test_stale(void) {
    char dir[600], p[800];
    make_dir(at(dir, "stale"));
    pid_t child = fork();
    if (child == 0) _exit(0);
    waitpid(child, NULL, 0); /* a pid that just died */
    char dead[32], live[32];
    snprintf(dead, sizeof dead, "%d", (int)child);
    snprintf(live, sizeof live, "%d", (int)getppid());
    snprintf(p, sizeof p, "%s/.checkpoint-4.tmp.%s", dir, dead); make_dir(p);
    snprintf(p, sizeof p, "%s/.checkpoint-4.tmp.%s/x", dir, dead); put(p, "x");
    snprintf(p, sizeof p, "%s/train_log.csv.tmp.%s", dir, dead); put(p, "x");
    snprintf(p, sizeof p, "%s/.X.old.%s", dir, dead); make_dir(p);
    snprintf(p, sizeof p, "%s/.checkpoint-5.tmp.%s", dir, live); make_dir(p);
    snprintf(p, sizeof p, "%s/notes.tmp.txt", dir); put(p, "mine");
    EXPECT(remove_stale_temporaries(dir, "X") == 1 && count_entries(dir, ".X.old.") == 0 && count_entries(dir, ".checkpoint-4.") == 1,
           "with a name, only that name's temporaries go");
    EXPECT(remove_stale_temporaries(dir, NULL) == 2, "the dead pid's two others go");
    EXPECT(count_entries(dir, ".checkpoint-5.tmp.") == 1 && count_entries(dir, "notes.tmp.txt") == 1 && count_entries(dir, "train_log") == 0,
           "a live pid's temporary and a file that only looks like one stay");
}

static void test_checksum_and_errors(void) {
    uint8_t buf[1003];
    Rng r;
    rng_seed(&r, (uint64_t)time(NULL));
    for (size_t i = 0; i < sizeof buf; i++) buf[i] = (uint8_t)rng_below(&r, 256);
    uint64_t h = checksum64(buf, sizeof buf);
    int all_differ = 1;
    for (size_t i = 0; i < sizeof buf * 8; i++) {
        buf[i / 8] ^= (uint8_t)(1u << (i % 8));
        all_differ &= checksum64(buf, sizeof buf) != h;
        buf[i / 8] ^= (uint8_t)(1u << (i % 8));
    }
    EXPECT(all_differ, "every single flipped bit changes the checksum");
    EXPECT(checksum64(buf, sizeof buf - 1) != h, "a shorter file changes it");
    char path[2000] = "/no/such";
    while (strlen(path) < 1500) strcat(path, "/directory-with-a-long-name");
    EXPECT(read_file(path, NULL) == NULL && strstr(last_error(), "No such file or directory") && strstr(last_error(), "..."),
           "a 1500-byte path is shortened and the cause kept: %s", last_error());
    set_error("the cause");
    error_in("%s", path);
    EXPECT(strlen(last_error()) < 400 && strstr(last_error(), ": the cause"), "error_in keeps the cause: %s", last_error());
}

int main(void) {
    snprintf(g_tmp, sizeof g_tmp, "%s/test_file_helpers_XXXXXX", file_exists("build") ? "build" : "/tmp");
    if (!mkdtemp(g_tmp)) die("cannot create a scratch folder %s: %s", g_tmp, strerror(errno));
    char real[PATH_MAX];
    if (realpath(g_tmp, real)) snprintf(g_tmp, sizeof g_tmp, "%s", real);
    test_open_input();
    test_output_paths();
    test_atomic_dir();
    test_stale();
    test_checksum_and_errors();
    if (g_failures == 0) {
        char cmd[600];
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_tmp);
        if (system(cmd) != 0) {}
    } else printf("scratch files kept in %s\n", g_tmp);
    printf("test_file_helpers: %d checks, %d failed\n", g_checks, g_failures);
    return g_failures ? 1 : 0;
}
