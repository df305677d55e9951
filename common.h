/* common.h: what every stage shares, written once.
 *
 * Teaches: how a C program stays honest about errors (every call checked, one clear
 * sentence for anything a user can cause), how to read the ecosystem's files without
 * trusting them (a strict JSON parser, a safetensors reader that validates every offset
 * against the file size), bf16/fp16 <-> fp32, a seedable RNG, a timer, and the token-file
 * format the stages exchange.
 * Runs on: any POSIX machine, compiled as C (gcc/clang) or as C++ (nvcc includes it too).
 * Leaves out: anything one stage alone needs (that lives in the stage).
 *
 * Shape legend used in every file: B batch, N sequence, D model width, H heads,
 * Hk kv heads, d head dim, F ffn width, V vocab, L layers, G S2 group, R LoRA rank.
 * Every size and offset is size_t (a 7B model has more than 2^32 bytes).
 *
 * Parsers never exit: they return failure and leave one sentence in last_error(), so the
 * fuzz targets can drive them and the caller decides how to end. The CLI code ends with
 * die("..."), which prints "error: <sentence>" and exits 1.
 */
#ifndef COMMON_H
#define COMMON_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* ---------------------------------------------------------------------------------------
 * API marks a function that later stages or the tests call but the program built from its
 * own stage may not, so that -Wunused-function stays quiet there; tests/test_dead_code.sh
 * checks that every function, marked or not, is called by some program or test.
 * ------------------------------------------------------------------------------------- */
#ifndef API
#define API __attribute__((unused))
#endif

/* HOT_LOOPS marks the CPU's hottest loops (the three matmuls of 02_model.c). Where GCC and
 * glibc allow it, each is built twice, for AVX2 + FMA (x86-64-v3) and for the baseline the
 * Makefile targets (x86-64-v2), and the loader picks one by the CPU it runs on: the speed of
 * -march=x86-64-v3 without giving up the older CPUs (bench/TRAIN_NOTES.md, "The CPU step"). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__GLIBC__) && !defined(__CUDACC__)
#define HOT_LOOPS __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define HOT_LOOPS
#endif

/* ---------------------------------------------------------------------------------------
 * Errors
 * ------------------------------------------------------------------------------------- */

/* The sentence of the last failure: one buffer for the whole program. Every object includes
 * this header (the C program, 04_s2attn.o, 04_layers.o, the 04_s2attn program, build/libs2attn.so,
 * each test), so the definition is weak: the linker keeps one copy, and a sentence that
 * set_error() leaves in one object is the one last_error() reads in another (a `static` buffer
 * gave each object its own, and a refusal from a .cu object reached the C caller as "unknown
 * error"). A weak definition needs no defining file to pick, so a program of any set of
 * these objects links; extern "C" keeps the one symbol name in C and in C++. */
#ifdef __cplusplus
extern "C" {
#endif
__attribute__((weak)) char g_last_error[1024];
#ifdef __cplusplus
}
#endif

/* Records one sentence describing why a parser or loader failed; returns 0 or NULL-friendly -1. */
static int set_error(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_last_error, sizeof g_last_error, fmt, ap);
    va_end(ap);
    return -1;
}
static const char *last_error(void) { return g_last_error[0] ? g_last_error : "unknown error"; }

/* Ends the program with one clear sentence: for errors a user can cause. */
#if defined(__GNUC__)
__attribute__((noreturn, format(printf, 1, 2)))
#endif
static void die(const char *fmt, ...) {
    va_list ap;
    fflush(stdout);
    fputs("error: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(1);
}

/* For failures that are the program's fault or the system's: says where. */
#define CHECK(cond, ...)                                                              \
    do {                                                                              \
        if (!(cond)) {                                                                \
            fflush(stdout);                                                           \
            fprintf(stderr, "error: ");                                               \
            fprintf(stderr, __VA_ARGS__);                                             \
            fprintf(stderr, " (%s:%d)\n", __FILE__, __LINE__);                        \
            exit(1);                                                                  \
        }                                                                             \
    } while (0)

/* ---------------------------------------------------------------------------------------
 * Checked allocation
 * ------------------------------------------------------------------------------------- */

static void *xmalloc_at(size_t bytes, const char *file, int line) {
    void *p = malloc(bytes ? bytes : 1);
    if (!p) {
        fprintf(stderr, "error: out of memory allocating %zu bytes (%.2f GiB) (%s:%d)\n", bytes,
                (double)bytes / (1024.0 * 1024.0 * 1024.0), file, line);
        exit(1);
    }
    return p;
}
static void *xcalloc_at(size_t count, size_t size, const char *file, int line) {
    if (size && count > SIZE_MAX / size) {
        fprintf(stderr, "error: allocation of %zu x %zu bytes overflows (%s:%d)\n", count, size, file, line);
        exit(1);
    }
    void *p = calloc(count ? count : 1, size ? size : 1);
    if (!p) {
        fprintf(stderr, "error: out of memory allocating %zu bytes (%.2f GiB) (%s:%d)\n", count * size,
                (double)(count * size) / (1024.0 * 1024.0 * 1024.0), file, line);
        exit(1);
    }
    return p;
}
static void *xrealloc_at(void *old, size_t bytes, const char *file, int line) {
    void *p = realloc(old, bytes ? bytes : 1);
    if (!p) {
        fprintf(stderr, "error: out of memory growing a buffer to %zu bytes (%s:%d)\n", bytes, file, line);
        exit(1);
    }
    return p;
}
#define xmalloc(bytes) xmalloc_at((bytes), __FILE__, __LINE__)
#define xcalloc(count, size) xcalloc_at((count), (size), __FILE__, __LINE__)
#define xrealloc(old, bytes) xrealloc_at((old), (bytes), __FILE__, __LINE__)

static char *xstrdup(const char *s) {
    size_t n = strlen(s) + 1;
    char *p = (char *)xmalloc(n);
    memcpy(p, s, n);
    return p;
}

/* ---------------------------------------------------------------------------------------
 * Files
 * ------------------------------------------------------------------------------------- */

/* A path for a message: one longer than 240 bytes keeps its head and tail around "...", so
 * the sentence's cause (which comes after it) always fits. */
#define PATH_MSG_MAX 240
static const char *path_for_message(const char *path, char *buf /* [PATH_MSG_MAX + 1] */) {
    size_t n = strlen(path);
    if (n <= PATH_MSG_MAX) return path;
    size_t head = PATH_MSG_MAX / 3, tail = PATH_MSG_MAX - head - 3;
    memcpy(buf, path, head);
    memcpy(buf + head, "...", 3);
    memcpy(buf + head + 3, path + n - tail, tail + 1);
    return buf;
}

/* Prefixes the error already recorded with where it happened: "<where>: <cause>". A long
 * `where` is shortened in its middle, so the cause is never cut. Returns -1. */
#if defined(__GNUC__)
__attribute__((format(printf, 1, 2)))
#endif
static int error_in(const char *where_fmt, ...) {
    char cause[1024], where[4400], buf[PATH_MSG_MAX + 1];
    snprintf(cause, sizeof cause, "%s", last_error());
    va_list ap;
    va_start(ap, where_fmt);
    vsnprintf(where, sizeof where, where_fmt, ap);
    va_end(ap);
    return set_error("%s: %s", path_for_message(where, buf), cause);
}

/* The kind of a file that is not a regular one, for "PATH is a directory". */
static const char *file_kind(mode_t mode) {
    if (S_ISDIR(mode)) return "a directory";
    if (S_ISFIFO(mode)) return "a FIFO (a named pipe)";
    if (S_ISCHR(mode)) return "a character device";
    if (S_ISBLK(mode)) return "a block device";
    if (S_ISSOCK(mode)) return "a socket";
    return "not a regular file";
}

/* Opens an input the user named as a file: a regular file, or -1 + one sentence ("is a
 * directory", "is a FIFO"). A FIFO is opened without waiting for a writer, so it never
 * hangs. Returns the descriptor (blocking again) and its size in *size. */
static int open_input_file(const char *path, size_t *size) {
    char buf[PATH_MSG_MAX + 1];
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) return set_error("cannot open %s: %s", path_for_message(path, buf), strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) { int e = errno; close(fd); return set_error("cannot read the size of %s: %s", path_for_message(path, buf), strerror(e)); }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        const char *kind = file_kind(st.st_mode);
        return set_error("%s is %s, not a regular file", path_for_message(path, buf), kind);
    }
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
    *size = (size_t)st.st_size;
    return fd;
}

/* Reads a whole file into memory (NUL-terminated for convenience). NULL + last_error() on failure. */
static char *read_file(const char *path, size_t *len_out) {
    size_t size = 0, got = 0;
    int fd = open_input_file(path, &size);
    if (fd < 0) return NULL;
    char *buf = (char *)xmalloc(size + 1);
    while (got < size) {
        ssize_t r = read(fd, buf + got, size - got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        got += (size_t)r;
    }
    close(fd);
    if (got != size) { free(buf); char b[PATH_MSG_MAX + 1]; set_error("short read from %s", path_for_message(path, b)); return NULL; }
    buf[size] = 0;
    if (len_out) *len_out = size;
    return buf;
}

/* A read-only memory map of a whole file; the OS pages it in as it is touched. */
typedef struct {
    const uint8_t *data; /* [size] */
    size_t size;
} MappedFile;

static int map_file(MappedFile *m, const char *path) {
    memset(m, 0, sizeof *m);
    char buf[PATH_MSG_MAX + 1];
    size_t size = 0;
    int fd = open_input_file(path, &size);
    if (fd < 0) return -1;
    m->size = size;
    if (m->size == 0) { close(fd); return set_error("%s is empty", path_for_message(path, buf)); }
    void *p = mmap(NULL, m->size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (p == MAP_FAILED) return set_error("cannot map %s: %s", path_for_message(path, buf), strerror(errno));
    m->data = (const uint8_t *)p;
    return 0;
}
static void unmap_file(MappedFile *m) {
    if (m->data) munmap((void *)m->data, m->size);
    memset(m, 0, sizeof *m);
}

/* Writing never destroys what the user had: write PATH.tmp.<pid>, flush, then rename. */
typedef struct {
    FILE *f;
    char final_path[4096];
    char tmp_path[4160];
} AtomicFile;

static int atomic_open(AtomicFile *af, const char *path) {
    memset(af, 0, sizeof *af);
    char b[PATH_MSG_MAX + 1];
    if (strlen(path) >= sizeof af->final_path) return set_error("path too long: %s", path_for_message(path, b));
    snprintf(af->final_path, sizeof af->final_path, "%s", path);
    snprintf(af->tmp_path, sizeof af->tmp_path, "%s.tmp.%d", path, (int)getpid());
    af->f = fopen(af->tmp_path, "wb");
    if (!af->f) return set_error("cannot create %s: %s", path_for_message(af->tmp_path, b), strerror(errno));
    return 0;
}
/* Closes and renames into place; on any write error removes the temporary and keeps the old file. */
static int atomic_commit(AtomicFile *af) {
    int bad = ferror(af->f) ? (errno ? errno : EIO) : 0;
    if (fflush(af->f) != 0) bad = errno;
    if (!bad && fsync(fileno(af->f)) != 0) bad = errno;
    if (fclose(af->f) != 0 && !bad) bad = errno;
    af->f = NULL;
    char b[PATH_MSG_MAX + 1];
    if (bad) { remove(af->tmp_path); return set_error("writing %s failed: %s", path_for_message(af->final_path, b), strerror(bad)); }
    if (rename(af->tmp_path, af->final_path) != 0) {
        int e = errno;
        remove(af->tmp_path);
        return set_error("cannot rename %s into place: %s", path_for_message(af->tmp_path, b), strerror(e));
    }
    return 0;
}
static void atomic_abort(AtomicFile *af) {
    if (af->f) fclose(af->f);
    af->f = NULL;
    remove(af->tmp_path);
}
static API int write_file_atomic(const char *path, const void *data, size_t len) {
    AtomicFile af;
    if (atomic_open(&af, path) != 0) return -1;
    if (len && fwrite(data, 1, len, af.f) != len) { int e = errno; atomic_abort(&af); return set_error("writing %s failed: %s", path, strerror(e)); }
    return atomic_commit(&af);
}

static API int file_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0;
}

/* Joins a folder and a file name into buf; a path longer than buf ends the program with a
 * sentence (a cut path would name another file). */
static API const char *path_join(char *buf, size_t cap, const char *dir, const char *name) {
    size_t n = strlen(dir);
    int k = snprintf(buf, cap, "%s%s%s", dir, (n && dir[n - 1] == '/') ? "" : "/", name);
    if (k < 0 || (size_t)k >= cap) die("the path %s/%s is longer than %zu bytes", dir, name, cap - 1);
    return buf;
}

/* Creates a folder (one level) unless it exists; -1 + last_error() if it cannot, or if the
 * path is something else. */
static API int make_dir(const char *dir) {
    char buf[PATH_MSG_MAX + 1];
    if (mkdir(dir, 0755) == 0 || errno == EEXIST) {
        struct stat st;
        if (stat(dir, &st) == 0 && S_ISDIR(st.st_mode)) return 0;
        return set_error("%s exists and is not a folder", path_for_message(dir, buf));
    }
    return set_error("cannot create the folder %s: %s", path_for_message(dir, buf), strerror(errno));
}

/* Removes a folder of plain files (what a checkpoint, an adapter or an export holds). */
static API int remove_flat_dir(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return errno == ENOENT ? 0 : set_error("cannot open the folder %s: %s", dir, strerror(errno));
    struct dirent *e;
    char path[4400];
    int rc = 0;
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        if (remove(path_join(path, sizeof path, dir, e->d_name)) != 0) rc = set_error("cannot remove %s: %s", path, strerror(errno));
    }
    closedir(d);
    if (rc == 0 && rmdir(dir) != 0) rc = set_error("cannot remove the folder %s: %s", dir, strerror(errno));
    return rc;
}

/* ---------------------------------------------------------------------------------------
 * Outputs never destroy inputs. Every program checks each output path against each input
 * it was given: the same file (through any link or spelling), a path inside an input
 * folder, or (for an output folder that may be emptied) an output folder holding an input
 * is refused with one sentence naming both flags.
 * ------------------------------------------------------------------------------------- */

typedef struct {
    const char *flag; /* "--model" */
    const char *path; /* NULL: not given */
} NamedPath;

/* The absolute path with links resolved; for a path that does not exist yet, its nearest
 * existing ancestor resolved and the rest appended. */
static void resolve_path(const char *path, char *out /* [PATH_MAX + 4096] */, size_t cap) {
    char head[PATH_MAX + 4096], tail[4096] = "";
    snprintf(head, sizeof head, "%s", path[0] ? path : ".");
    for (;;) {
        char real[PATH_MAX];
        if (realpath(head, real)) { snprintf(out, cap, "%s%s%s", real, tail[0] && strcmp(real, "/") ? "/" : "", tail); return; }
        if (!strcmp(head, ".") || !strcmp(head, "/")) { snprintf(out, cap, "%s", path); return; } /* no ancestor resolves */
        size_t n = strlen(head);
        while (n > 1 && head[n - 1] == '/') head[--n] = 0; /* "a/b/" -> "a/b" */
        char *slash = strrchr(head, '/');
        char rest[4096];
        snprintf(rest, sizeof rest, "%s%s%s", slash ? slash + 1 : head, tail[0] ? "/" : "", tail);
        snprintf(tail, sizeof tail, "%s", rest);
        if (!slash) snprintf(head, sizeof head, ".");
        else if (slash == head) snprintf(head, sizeof head, "/");
        else *slash = 0;
    }
}

/* 1 when `inner` (resolved) is `outer` (resolved) or lies inside it. */
static int path_is_within(const char *inner, const char *outer) {
    size_t n = strlen(outer);
    if (n == 1 && outer[0] == '/') return 1;
    return strncmp(inner, outer, n) == 0 && (inner[n] == 0 || inner[n] == '/');
}

/* Refuses an output (out_flag out) that is one of the inputs, or lies inside an input folder;
 * with out_may_be_emptied, also an output folder that holds an input. -1 + one sentence. */
static API int check_output_path(const char *out_flag, const char *out, int out_may_be_emptied, const NamedPath *inputs, int n_inputs) {
    if (!out) return 0;
    static char ro[PATH_MAX + 4096], ri[PATH_MAX + 4096];
    char b1[PATH_MSG_MAX + 1], b2[PATH_MSG_MAX + 1];
    struct stat so, si;
    int out_exists = stat(out, &so) == 0;
    resolve_path(out, ro, sizeof ro);
    for (int i = 0; i < n_inputs; i++) {
        const char *in = inputs[i].path;
        if (!in || stat(in, &si) != 0) continue; /* a missing input is the loader's to report */
        resolve_path(in, ri, sizeof ri);
        if ((out_exists && so.st_dev == si.st_dev && so.st_ino == si.st_ino) || !strcmp(ro, ri))
            return set_error("%s %s is the input %s %s: writing it would destroy the input; choose another output", out_flag,
                             path_for_message(out, b1), inputs[i].flag, path_for_message(in, b2));
        if (S_ISDIR(si.st_mode) && path_is_within(ro, ri))
            return set_error("%s %s lies inside the input folder %s %s; choose an output outside it", out_flag, path_for_message(out, b1),
                             inputs[i].flag, path_for_message(in, b2));
        if (out_may_be_emptied && path_is_within(ri, ro))
            return set_error("the input %s %s lies inside the output folder %s %s, which this run may empty; choose another output",
                             inputs[i].flag, path_for_message(in, b2), out_flag, path_for_message(out, b1));
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------
 * Folders that appear whole or not at all. Files are written into PARENT/.NAME.tmp.<pid>;
 * atomic_dir_commit renames that folder to PARENT/NAME (an older NAME is moved aside to
 * .NAME.old.<pid> first and removed after), atomic_dir_commit_into moves its files into an
 * existing folder with one marker file last (a folder shows the marker only once the rest
 * is in place). Temporaries of runs that died (their pid no longer exists) are removed by
 * remove_stale_temporaries, which every writer of a folder calls before it starts.
 * Used by checkpoints, the adapter (03) and the merged export (03, 06).
 * ------------------------------------------------------------------------------------- */

/* The pid in a temporary's name "<x>.tmp.<pid>" or "<x>.old.<pid>", or 0 for another name. */
static long temporary_pid(const char *name) {
    const char *p = NULL;
    for (const char *s = strstr(name, ".tmp."); s; s = strstr(s + 1, ".tmp.")) p = s;
    for (const char *s = strstr(name, ".old."); s; s = strstr(s + 1, ".old.")) if (!p || s > p) p = s;
    if (!p || !p[5]) return 0;
    char *end;
    long pid = strtol(p + 5, &end, 10);
    return (*end == 0 && pid > 0) ? pid : 0;
}

/* Removes dir's temporaries of processes that no longer run: files and flat folders named
 * "<x>.tmp.<pid>" or "<x>.old.<pid>" (only those of ".<name>." or "<name>." when name is
 * given). Returns how many it removed. */
static API int remove_stale_temporaries(const char *dir, const char *name) {
    DIR *d = opendir(dir);
    if (!d) return 0;
    int removed = 0;
    struct dirent *e;
    char path[4400], prefix[300] = "";
    if (name) snprintf(prefix, sizeof prefix, ".%s.", name);
    while ((e = readdir(d))) {
        long pid = temporary_pid(e->d_name);
        if (pid == 0 || pid == (long)getpid()) continue;
        if (name && strncmp(e->d_name, prefix, strlen(prefix)) != 0 && strncmp(e->d_name, prefix + 1, strlen(prefix) - 1) != 0) continue;
        if (kill((pid_t)pid, 0) == 0 || errno != ESRCH) continue; /* alive (or not ours to ask): keep */
        path_join(path, sizeof path, dir, e->d_name);
        struct stat st;
        if (lstat(path, &st) != 0) continue;
        if (S_ISDIR(st.st_mode) ? remove_flat_dir(path) == 0 : unlink(path) == 0) removed++;
    }
    closedir(d);
    return removed;
}

/* Makes a folder's renames durable (best effort: some file systems refuse fsync on folders). */
static void sync_dir(const char *dir) {
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd >= 0) { (void)fsync(fd); close(fd); }
}

typedef struct {
    char parent[4096];
    char final_dir[4400]; /* PARENT/NAME */
    char tmp_dir[4400];   /* PARENT/.NAME.tmp.<pid>: where the files are written */
    char old_dir[4400];   /* PARENT/.NAME.old.<pid>: an older NAME while it is replaced */
} AtomicDir;

/* Starts PARENT/NAME: removes dead runs' temporaries of NAME and creates the temporary folder. */
static API int atomic_dir_begin(AtomicDir *d, const char *parent, const char *name) {
    char where[4096];
    int k = snprintf(where, sizeof where, "%s", parent); /* parent may be one of d's own paths */
    if (k < 0 || (size_t)k >= sizeof where) return set_error("the folder path %.200s... is too long", parent);
    memset(d, 0, sizeof *d);
    snprintf(d->parent, sizeof d->parent, "%s", where);
    if (strlen(name) > 200) return set_error("the folder name %.40s... is too long", name);
    path_join(d->final_dir, sizeof d->final_dir, where, name);
    char leaf[256];
    snprintf(leaf, sizeof leaf, ".%s.tmp.%d", name, (int)getpid());
    path_join(d->tmp_dir, sizeof d->tmp_dir, where, leaf);
    snprintf(leaf, sizeof leaf, ".%s.old.%d", name, (int)getpid());
    path_join(d->old_dir, sizeof d->old_dir, where, leaf);
    remove_stale_temporaries(where, name);
    remove_flat_dir(d->tmp_dir); /* this process's own, from an earlier failed try */
    return make_dir(d->tmp_dir);
}
static API void atomic_dir_abort(AtomicDir *d) { remove_flat_dir(d->tmp_dir); }

/* Renames the temporary folder to PARENT/NAME, replacing an older one. */
static API int atomic_dir_commit(AtomicDir *d) {
    sync_dir(d->tmp_dir);
    struct stat st;
    int had_old = lstat(d->final_dir, &st) == 0;
    if (had_old && rename(d->final_dir, d->old_dir) != 0) {
        int e = errno;
        atomic_dir_abort(d);
        return set_error("cannot move the old %s aside: %s", d->final_dir, strerror(e));
    }
    if (rename(d->tmp_dir, d->final_dir) != 0) {
        int e = errno;
        if (had_old) rename(d->old_dir, d->final_dir);
        atomic_dir_abort(d);
        return set_error("cannot rename %s to %s: %s", d->tmp_dir, d->final_dir, strerror(e));
    }
    sync_dir(d->parent);
    if (had_old && remove_flat_dir(d->old_dir) != 0) fprintf(stderr, "warning: %s\n", last_error());
    return 0;
}

/* Moves the temporary folder's files into the existing folder dest, `marker` last (an older
 * marker is removed first), then removes the temporary folder. */
static API int atomic_dir_commit_into(AtomicDir *d, const char *dest, const char *marker) {
    char from[4700], to[4700];
    int rc = 0;
    sync_dir(d->tmp_dir);
    if (unlink(path_join(to, sizeof to, dest, marker)) != 0 && errno != ENOENT) rc = set_error("cannot remove the old %s: %s", to, strerror(errno));
    DIR *dh = opendir(d->tmp_dir);
    if (!dh && rc == 0) rc = set_error("cannot open the folder %s: %s", d->tmp_dir, strerror(errno));
    for (struct dirent *e; rc == 0 && (e = readdir(dh));) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..") || !strcmp(e->d_name, marker)) continue;
        if (rename(path_join(from, sizeof from, d->tmp_dir, e->d_name), path_join(to, sizeof to, dest, e->d_name)) != 0)
            rc = set_error("cannot rename %s to %s: %s", from, to, strerror(errno));
    }
    if (dh) closedir(dh);
    if (rc == 0 && rename(path_join(from, sizeof from, d->tmp_dir, marker), path_join(to, sizeof to, dest, marker)) != 0)
        rc = set_error("cannot rename %s to %s: %s", from, to, strerror(errno));
    if (rc == 0) sync_dir(dest);
    atomic_dir_abort(d);
    return rc;
}

/* ---------------------------------------------------------------------------------------
 * A 64-bit checksum of a file's bytes (not cryptographic: it catches damage, not intent).
 * ------------------------------------------------------------------------------------- */
static uint64_t checksum64(const uint8_t *p, size_t n) {
    const uint64_t P1 = 0x9e3779b185ebca87ull, P2 = 0xc2b2ae3d27d4eb4full;
    uint64_t h = 0x27d4eb2f165667c5ull ^ (uint64_t)n;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, p + i, 8);
        h ^= w * P2;
        h = ((h << 31) | (h >> 33)) * P1;
    }
    for (; i < n; i++) { h ^= p[i] * P1; h = ((h << 11) | (h >> 53)) * P2; }
    h ^= h >> 33; h *= P2; h ^= h >> 29; h *= P1; h ^= h >> 32;
    return h;
}
static API int checksum_file(const char *path, uint64_t *out) {
    MappedFile m;
    if (map_file(&m, path) != 0) return -1;
    *out = checksum64(m.data, m.size);
    unmap_file(&m);
    return 0;
}

/* ---------------------------------------------------------------------------------------
 * bf16 / fp16 <-> fp32
 * ------------------------------------------------------------------------------------- */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
/* Round to nearest even; NaN stays NaN (quiet), infinities stay infinite. */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x0040u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
    if (exp == 0) {
        if (man == 0) u = sign;
        else { /* subnormal: value = man * 2^-24 */
            float f = (float)man * 5.9604644775390625e-8f;
            memcpy(&u, &f, 4);
            u |= sign;
        }
    } else if (exp == 31) u = sign | 0x7f800000u | (man << 13);
    else u = sign | ((exp + 112u) << 23) | (man << 13);
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline uint16_t f32_to_f16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t absu = u & 0x7fffffffu;
    if (absu > 0x7f800000u) return sign | 0x7e00u;              /* NaN */
    if (absu >= 0x477ff000u) return sign | 0x7c00u;             /* overflow to inf (>= 65520) */
    if (absu < 0x38800000u) {                                   /* subnormal or zero */
        float a;
        memcpy(&a, &absu, 4);
        return sign | (uint16_t)lrintf(a * 16777216.0f);        /* a / 2^-24, round-to-even */
    }
    uint32_t r = absu + 0xfffu + ((absu >> 13) & 1u);           /* round mantissa to 10 bits */
    return sign | (uint16_t)((r - 0x38000000u) >> 13);
}

/* ---------------------------------------------------------------------------------------
 * RNG (splitmix64 seeding xoshiro256**): reproducible across machines
 * ------------------------------------------------------------------------------------- */

typedef struct { uint64_t s[4]; } Rng;

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static API void rng_seed(Rng *r, uint64_t seed) {
    for (int i = 0; i < 4; i++) r->s[i] = splitmix64(&seed);
}
static inline uint64_t rng_u64(Rng *r) {
    uint64_t *s = r->s;
    uint64_t result = ((s[1] * 5) << 7 | (s[1] * 5) >> 57) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0]; s[3] ^= s[1]; s[1] ^= s[2]; s[0] ^= s[3];
    s[2] ^= t;
    s[3] = (s[3] << 45) | (s[3] >> 19);
    return result;
}
static inline uint32_t rng_u32(Rng *r) { return (uint32_t)(rng_u64(r) >> 32); }
/* Uniform in [0, 1). */
static inline float rng_uniform(Rng *r) { return (float)(rng_u64(r) >> 40) * (1.0f / 16777216.0f); }
/* Uniform integer in [0, n). */
static inline uint64_t rng_below(Rng *r, uint64_t n) { return n ? rng_u64(r) % n : 0; }
/* Standard normal (Box-Muller). */
static inline float rng_normal(Rng *r) {
    double u1 = ((double)(rng_u64(r) >> 11) + 1.0) * (1.0 / 9007199254740993.0);
    double u2 = (double)(rng_u64(r) >> 11) * (1.0 / 9007199254740992.0);
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

/* ---------------------------------------------------------------------------------------
 * Timer
 * ------------------------------------------------------------------------------------- */

static API double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ---------------------------------------------------------------------------------------
 * JSON: strict (RFC 8259), with limits on nesting depth and size
 * ------------------------------------------------------------------------------------- */

typedef enum { JSON_NULL, JSON_BOOL, JSON_NUMBER, JSON_STRING, JSON_ARRAY, JSON_OBJECT } JsonType;

typedef struct Json {
    JsonType type;
    int boolean;        /* JSON_BOOL */
    double number;      /* JSON_NUMBER */
    char *string;       /* JSON_STRING: UTF-8, NUL-terminated (may contain \u0000 as a NUL: see len) */
    size_t len;         /* JSON_STRING: byte length */
    size_t count;       /* JSON_ARRAY / JSON_OBJECT: number of items */
    char **keys;        /* JSON_OBJECT: [count] keys (NUL-terminated) */
    size_t *key_lens;   /* JSON_OBJECT: [count] key byte lengths */
    struct Json *items; /* [count] elements or values */
} Json;

#define JSON_MAX_DEPTH 128
#define JSON_MAX_BYTES ((size_t)1 << 31)

typedef struct {
    const char *p, *end, *start;
    int depth;
} JsonParser;

static int json_fail(JsonParser *jp, const char *what) {
    return set_error("malformed JSON at byte %zu: %s", (size_t)(jp->p - jp->start), what);
}
static void json_skip_ws(JsonParser *jp) {
    while (jp->p < jp->end && (*jp->p == ' ' || *jp->p == '\t' || *jp->p == '\n' || *jp->p == '\r')) jp->p++;
}
static void json_free_children(Json *j);

static int json_hex4(JsonParser *jp, uint32_t *out) {
    if (jp->end - jp->p < 4) return json_fail(jp, "truncated \\u escape");
    uint32_t v = 0;
    for (int i = 0; i < 4; i++) {
        char c = jp->p[i];
        v <<= 4;
        if (c >= '0' && c <= '9') v |= (uint32_t)(c - '0');
        else if (c >= 'a' && c <= 'f') v |= (uint32_t)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') v |= (uint32_t)(c - 'A' + 10);
        else return json_fail(jp, "bad hex digit in \\u escape");
    }
    jp->p += 4;
    *out = v;
    return 0;
}

/* Appends the UTF-8 encoding of code point cp to buf (which has room for 4 bytes). */
static size_t utf8_encode(uint32_t cp, char *buf) {
    if (cp < 0x80) { buf[0] = (char)cp; return 1; }
    if (cp < 0x800) { buf[0] = (char)(0xc0 | (cp >> 6)); buf[1] = (char)(0x80 | (cp & 0x3f)); return 2; }
    if (cp < 0x10000) {
        buf[0] = (char)(0xe0 | (cp >> 12)); buf[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
        buf[2] = (char)(0x80 | (cp & 0x3f)); return 3;
    }
    buf[0] = (char)(0xf0 | (cp >> 18)); buf[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
    buf[2] = (char)(0x80 | ((cp >> 6) & 0x3f)); buf[3] = (char)(0x80 | (cp & 0x3f));
    return 4;
}

/* Length of the valid UTF-8 sequence starting at s (at most n bytes), or 0 if invalid. */
static size_t utf8_valid_len(const unsigned char *s, size_t n) {
    if (n == 0) return 0;
    unsigned c = s[0];
    if (c < 0x80) return 1;
    size_t len;
    uint32_t cp;
    if (c >= 0xc2 && c <= 0xdf) { len = 2; cp = c & 0x1f; }
    else if (c >= 0xe0 && c <= 0xef) { len = 3; cp = c & 0x0f; }
    else if (c >= 0xf0 && c <= 0xf4) { len = 4; cp = c & 0x07; }
    else return 0;
    if (n < len) return 0;
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xc0) != 0x80) return 0;
        cp = (cp << 6) | (s[i] & 0x3f);
    }
    if ((len == 3 && cp < 0x800) || (len == 4 && (cp < 0x10000 || cp > 0x10ffff))) return 0;
    if (cp >= 0xd800 && cp <= 0xdfff) return 0;
    return len;
}

static int json_parse_string_raw(JsonParser *jp, char **out, size_t *out_len) {
    jp->p++; /* opening quote */
    /* First pass: find the end and an upper bound on the decoded length. */
    const char *q = jp->p;
    while (q < jp->end && *q != '"') {
        if (*q == '\\') q++;
        q++;
    }
    if (q >= jp->end) return json_fail(jp, "unterminated string");
    char *buf = (char *)xmalloc((size_t)(q - jp->p) + 1);
    size_t n = 0;
    while (*jp->p != '"') {
        unsigned char c = (unsigned char)*jp->p;
        if (c < 0x20) { free(buf); return json_fail(jp, "control character in string"); }
        if (c == '\\') {
            jp->p++;
            char e = *jp->p++;
            switch (e) {
            case '"': buf[n++] = '"'; break;
            case '\\': buf[n++] = '\\'; break;
            case '/': buf[n++] = '/'; break;
            case 'b': buf[n++] = '\b'; break;
            case 'f': buf[n++] = '\f'; break;
            case 'n': buf[n++] = '\n'; break;
            case 'r': buf[n++] = '\r'; break;
            case 't': buf[n++] = '\t'; break;
            case 'u': {
                uint32_t cp;
                if (json_hex4(jp, &cp) != 0) { free(buf); return -1; }
                if (cp >= 0xd800 && cp <= 0xdbff) { /* high surrogate: a low one must follow */
                    uint32_t lo;
                    if (jp->end - jp->p < 6 || jp->p[0] != '\\' || jp->p[1] != 'u') { free(buf); return json_fail(jp, "unpaired surrogate"); }
                    jp->p += 2;
                    if (json_hex4(jp, &lo) != 0) { free(buf); return -1; }
                    if (lo < 0xdc00 || lo > 0xdfff) { free(buf); return json_fail(jp, "unpaired surrogate"); }
                    cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
                } else if (cp >= 0xdc00 && cp <= 0xdfff) { free(buf); return json_fail(jp, "unpaired surrogate"); }
                n += utf8_encode(cp, buf + n); /* an escape of >= 6 bytes decodes to <= 4 */
                break;
            }
            default: free(buf); return json_fail(jp, "bad escape in string");
            }
        } else if (c < 0x80) {
            buf[n++] = (char)c;
            jp->p++;
        } else {
            size_t len = utf8_valid_len((const unsigned char *)jp->p, (size_t)(jp->end - jp->p));
            if (len == 0 || jp->p + len > q) { free(buf); return json_fail(jp, "invalid UTF-8 in string"); }
            memcpy(buf + n, jp->p, len);
            n += len;
            jp->p += len;
        }
        if (jp->p > q) { free(buf); return json_fail(jp, "bad escape at end of string"); }
    }
    jp->p++; /* closing quote */
    buf[n] = 0;
    *out = buf;
    *out_len = n;
    return 0;
}

static int json_parse_value(JsonParser *jp, Json *out);

static int json_parse_number(JsonParser *jp, Json *out) {
    const char *s = jp->p;
    if (jp->p < jp->end && *jp->p == '-') jp->p++;
    if (jp->p >= jp->end) return json_fail(jp, "truncated number");
    if (*jp->p == '0') jp->p++;
    else if (*jp->p >= '1' && *jp->p <= '9') { while (jp->p < jp->end && *jp->p >= '0' && *jp->p <= '9') jp->p++; }
    else return json_fail(jp, "bad number");
    if (jp->p < jp->end && *jp->p == '.') {
        jp->p++;
        if (jp->p >= jp->end || *jp->p < '0' || *jp->p > '9') return json_fail(jp, "bad fraction");
        while (jp->p < jp->end && *jp->p >= '0' && *jp->p <= '9') jp->p++;
    }
    if (jp->p < jp->end && (*jp->p == 'e' || *jp->p == 'E')) {
        jp->p++;
        if (jp->p < jp->end && (*jp->p == '+' || *jp->p == '-')) jp->p++;
        if (jp->p >= jp->end || *jp->p < '0' || *jp->p > '9') return json_fail(jp, "bad exponent");
        while (jp->p < jp->end && *jp->p >= '0' && *jp->p <= '9') jp->p++;
    }
    char tmp[64];
    size_t n = (size_t)(jp->p - s);
    if (n >= sizeof tmp) { /* long literal: strtod on a heap copy */
        char *h = (char *)xmalloc(n + 1);
        memcpy(h, s, n); h[n] = 0;
        out->number = strtod(h, NULL);
        free(h);
    } else {
        memcpy(tmp, s, n); tmp[n] = 0;
        out->number = strtod(tmp, NULL);
    }
    out->type = JSON_NUMBER;
    return 0;
}

static int json_parse_value(JsonParser *jp, Json *out) {
    memset(out, 0, sizeof *out);
    json_skip_ws(jp);
    if (jp->p >= jp->end) return json_fail(jp, "unexpected end of input");
    char c = *jp->p;
    if (c == '{' || c == '[') {
        if (++jp->depth > JSON_MAX_DEPTH) return json_fail(jp, "nesting too deep");
        int is_obj = c == '{';
        char close = is_obj ? '}' : ']';
        out->type = is_obj ? JSON_OBJECT : JSON_ARRAY;
        size_t cap = 0;
        jp->p++;
        json_skip_ws(jp);
        if (jp->p < jp->end && *jp->p == close) { jp->p++; jp->depth--; return 0; }
        for (;;) {
            if (out->count == cap) {
                cap = cap ? cap * 2 : 4;
                out->items = (Json *)xrealloc(out->items, cap * sizeof(Json));
                if (is_obj) {
                    out->keys = (char **)xrealloc(out->keys, cap * sizeof(char *));
                    out->key_lens = (size_t *)xrealloc(out->key_lens, cap * sizeof(size_t));
                }
            }
            if (is_obj) {
                json_skip_ws(jp);
                if (jp->p >= jp->end || *jp->p != '"') { json_free_children(out); return json_fail(jp, "expected a string key"); }
                if (json_parse_string_raw(jp, &out->keys[out->count], &out->key_lens[out->count]) != 0) { json_free_children(out); return -1; }
                json_skip_ws(jp);
                if (jp->p >= jp->end || *jp->p != ':') { free(out->keys[out->count]); json_free_children(out); return json_fail(jp, "expected ':'"); }
                jp->p++;
            }
            if (json_parse_value(jp, &out->items[out->count]) != 0) {
                if (is_obj) free(out->keys[out->count]);
                json_free_children(out);
                return -1;
            }
            out->count++;
            json_skip_ws(jp);
            if (jp->p < jp->end && *jp->p == ',') { jp->p++; continue; }
            if (jp->p < jp->end && *jp->p == close) { jp->p++; break; }
            json_free_children(out);
            return json_fail(jp, is_obj ? "expected ',' or '}'" : "expected ',' or ']'");
        }
        jp->depth--;
        return 0;
    }
    if (c == '"') {
        out->type = JSON_STRING;
        return json_parse_string_raw(jp, &out->string, &out->len);
    }
    if (c == '-' || (c >= '0' && c <= '9')) return json_parse_number(jp, out);
    size_t left = (size_t)(jp->end - jp->p);
    if (left >= 4 && memcmp(jp->p, "true", 4) == 0) { jp->p += 4; out->type = JSON_BOOL; out->boolean = 1; return 0; }
    if (left >= 5 && memcmp(jp->p, "false", 5) == 0) { jp->p += 5; out->type = JSON_BOOL; return 0; }
    if (left >= 4 && memcmp(jp->p, "null", 4) == 0) { jp->p += 4; out->type = JSON_NULL; return 0; }
    return json_fail(jp, "unexpected character");
}

static void json_free_children(Json *j) {
    if (j->type == JSON_STRING) free(j->string);
    if (j->type == JSON_ARRAY || j->type == JSON_OBJECT) {
        for (size_t i = 0; i < j->count; i++) {
            json_free_children(&j->items[i]);
            if (j->type == JSON_OBJECT) free(j->keys[i]);
        }
        free(j->items);
        free(j->keys);
        free(j->key_lens);
    }
    memset(j, 0, sizeof *j);
}

/* Parses text[0..len) as one JSON value (trailing whitespace allowed). NULL + last_error() on failure. */
static Json *json_parse(const char *text, size_t len) {
    if (len > JSON_MAX_BYTES) { set_error("JSON document of %zu bytes is larger than the limit", len); return NULL; }
    JsonParser jp = {text, text + len, text, 0};
    Json *root = (Json *)xcalloc(1, sizeof(Json));
    if (json_parse_value(&jp, root) != 0) { free(root); return NULL; }
    json_skip_ws(&jp);
    if (jp.p != jp.end) { json_free_children(root); free(root); json_fail(&jp, "trailing characters after the value"); return NULL; }
    return root;
}
static void json_free(Json *j) {
    if (!j) return;
    json_free_children(j);
    free(j);
}
/* Reads and parses a JSON file; NULL + last_error() (naming the file) on failure. */
static API Json *json_parse_file(const char *path) {
    size_t len;
    char *text = read_file(path, &len);
    if (!text) return NULL;
    Json *j = json_parse(text, len);
    free(text);
    if (!j) error_in("%s", path);
    return j;
}

/* Lookups: NULL when absent or of another type. The last duplicate key wins, as in Python. */
static const Json *json_get(const Json *obj, const char *key) {
    if (!obj || obj->type != JSON_OBJECT) return NULL;
    for (size_t i = obj->count; i-- > 0;)
        if (strcmp(obj->keys[i], key) == 0) return &obj->items[i];
    return NULL;
}
static const Json *json_get_type(const Json *obj, const char *key, JsonType t) {
    const Json *v = json_get(obj, key);
    return (v && v->type == t) ? v : NULL;
}
static API double json_get_number(const Json *obj, const char *key, double fallback) {
    const Json *v = json_get_type(obj, key, JSON_NUMBER);
    return v ? v->number : fallback;
}
static const char *json_get_string(const Json *obj, const char *key, const char *fallback) {
    const Json *v = json_get_type(obj, key, JSON_STRING);
    return v ? v->string : fallback;
}
static API int json_get_bool(const Json *obj, const char *key, int fallback) {
    const Json *v = json_get_type(obj, key, JSON_BOOL);
    return v ? v->boolean : fallback;
}

/* Writes s as a JSON string literal (quotes and escapes). */
static API void json_write_string(FILE *f, const char *s) {
    fputc('"', f);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p == '"' || *p == '\\') { fputc('\\', f); fputc(*p, f); }
        else if (*p == '\n') fputs("\\n", f);
        else if (*p == '\t') fputs("\\t", f);
        else if (*p == '\r') fputs("\\r", f);
        else if (*p < 0x20) fprintf(f, "\\u%04x", *p);
        else fputc(*p, f);
    }
    fputc('"', f);
}

/* ---------------------------------------------------------------------------------------
 * safetensors: 8-byte little-endian header length, a JSON header, then raw tensor bytes.
 * Every tensor's dtype, shape and byte range is validated against the file; tensors may
 * not overlap or leave the data section.
 * ------------------------------------------------------------------------------------- */

typedef enum { DT_F32, DT_F16, DT_BF16, DT_F64, DT_I64, DT_I32, DT_I16, DT_I8, DT_U8, DT_BOOL, DT_COUNT } DType;
static const char *const DTYPE_NAMES[DT_COUNT] = {"F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL"};
static const size_t DTYPE_SIZES[DT_COUNT] = {4, 2, 2, 8, 8, 4, 2, 1, 1, 1};

#define ST_MAX_DIMS 8
#define ST_MAX_HEADER ((uint64_t)100 << 20) /* 100 MB, as the reference library limits it */

typedef struct {
    char *name;
    DType dtype;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    size_t numel;
    size_t nbytes;
    const uint8_t *data; /* [nbytes], inside the mapping */
} StTensor;

typedef struct {
    MappedFile file;
    StTensor *tensors; /* [count], sorted by name */
    size_t count;
    char path[1024];
} SafeTensors;

static int st_cmp_name(const void *a, const void *b) {
    return strcmp(((const StTensor *)a)->name, ((const StTensor *)b)->name);
}
typedef struct { size_t begin, end; const char *name; } StRange;
static int st_cmp_range(const void *a, const void *b) {
    const StRange *x = (const StRange *)a, *y = (const StRange *)b;
    return x->begin < y->begin ? -1 : x->begin > y->begin ? 1 : (x->end < y->end ? -1 : x->end > y->end);
}

static API void st_close(SafeTensors *st) {
    for (size_t i = 0; i < st->count; i++) free(st->tensors[i].name);
    free(st->tensors);
    unmap_file(&st->file);
    memset(st, 0, sizeof *st);
}

/* Validates and indexes a safetensors image in memory (data[0..size)). */
static int st_parse(SafeTensors *st, const uint8_t *data, size_t size, const char *path) {
    st->tensors = NULL;
    st->count = 0;
    if (size < 8) return set_error("%s is not a safetensors file (shorter than its 8-byte header length)", path);
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | data[i];
    if (hlen < 2 || hlen > ST_MAX_HEADER || hlen > size - 8)
        return set_error("%s: safetensors header length %llu does not fit the file of %zu bytes", path, (unsigned long long)hlen, size);
    Json *h = json_parse((const char *)data + 8, (size_t)hlen);
    if (!h) return error_in("%s: safetensors header", path);
    if (h->type != JSON_OBJECT) { json_free(h); return set_error("%s: safetensors header is not a JSON object", path); }
    const uint8_t *body = data + 8 + hlen;
    size_t body_len = size - 8 - (size_t)hlen;
    st->tensors = (StTensor *)xcalloc(h->count ? h->count : 1, sizeof(StTensor));
    int rc = 0;
    for (size_t i = 0; i < h->count && rc == 0; i++) {
        const char *name = h->keys[i];
        const Json *t = &h->items[i];
        if (strcmp(name, "__metadata__") == 0) {
            if (t->type != JSON_OBJECT) rc = set_error("%s: __metadata__ is not an object", path);
            continue;
        }
        if (strlen(name) != h->key_lens[i]) { rc = set_error("%s: a tensor name contains a NUL byte", path); break; }
        if (t->type != JSON_OBJECT) { rc = set_error("%s: entry for tensor '%s' is not an object", path, name); break; }
        const char *dt = json_get_string(t, "dtype", NULL);
        const Json *shape = json_get_type(t, "shape", JSON_ARRAY);
        const Json *offs = json_get_type(t, "data_offsets", JSON_ARRAY);
        if (!dt || !shape || !offs) { rc = set_error("%s: tensor '%s' lacks dtype, shape or data_offsets", path, name); break; }
        StTensor *x = &st->tensors[st->count];
        int found = -1;
        for (int d = 0; d < DT_COUNT; d++) if (strcmp(dt, DTYPE_NAMES[d]) == 0) found = d;
        if (found < 0) { rc = set_error("%s: tensor '%s' has unsupported dtype %s", path, name, dt); break; }
        x->dtype = (DType)found;
        if (shape->count > ST_MAX_DIMS) { rc = set_error("%s: tensor '%s' has %zu dimensions (at most %d)", path, name, shape->count, ST_MAX_DIMS); break; }
        x->ndim = (int)shape->count;
        size_t numel = 1;
        for (size_t d = 0; d < shape->count; d++) {
            const Json *s = &shape->items[d];
            if (s->type != JSON_NUMBER || s->number < 0 || s->number > 9.0e15 || s->number != floor(s->number)) { rc = set_error("%s: tensor '%s' has a bad shape", path, name); break; }
            x->shape[d] = (int64_t)s->number;
            if (x->shape[d] && numel > SIZE_MAX / (size_t)x->shape[d]) { rc = set_error("%s: tensor '%s' shape overflows", path, name); break; }
            numel *= (size_t)x->shape[d];
        }
        if (rc) break;
        x->numel = numel;
        if (numel > SIZE_MAX / DTYPE_SIZES[x->dtype]) { rc = set_error("%s: tensor '%s' is too large", path, name); break; }
        x->nbytes = numel * DTYPE_SIZES[x->dtype];
        if (offs->count != 2 || offs->items[0].type != JSON_NUMBER || offs->items[1].type != JSON_NUMBER) { rc = set_error("%s: tensor '%s' has bad data_offsets", path, name); break; }
        double b = offs->items[0].number, e = offs->items[1].number;
        if (b < 0 || e < b || e > (double)body_len || b != floor(b) || e != floor(e)) { rc = set_error("%s: tensor '%s' data_offsets [%.0f, %.0f) lie outside the %zu data bytes", path, name, b, e, body_len); break; }
        if ((size_t)(e - b) != x->nbytes) { rc = set_error("%s: tensor '%s' has %.0f bytes but its dtype and shape need %zu", path, name, e - b, x->nbytes); break; }
        x->data = body + (size_t)b;
        x->name = xstrdup(name);
        st->count++;
    }
    /* No two tensors may share bytes. */
    if (rc == 0 && st->count > 1) {
        StRange *r = (StRange *)xmalloc(st->count * sizeof(StRange));
        for (size_t i = 0; i < st->count; i++) {
            r[i].begin = (size_t)(st->tensors[i].data - body);
            r[i].end = r[i].begin + st->tensors[i].nbytes;
            r[i].name = st->tensors[i].name;
        }
        qsort(r, st->count, sizeof(StRange), st_cmp_range);
        for (size_t i = 1; i < st->count && rc == 0; i++)
            if (r[i].begin < r[i - 1].end) rc = set_error("%s: tensors '%s' and '%s' overlap", path, r[i - 1].name, r[i].name);
        free(r);
    }
    json_free(h);
    if (rc == 0) {
        qsort(st->tensors, st->count, sizeof(StTensor), st_cmp_name);
        for (size_t i = 1; i < st->count && rc == 0; i++)
            if (strcmp(st->tensors[i].name, st->tensors[i - 1].name) == 0) rc = set_error("%s: tensor '%s' appears twice", path, st->tensors[i].name);
    }
    if (rc != 0) {
        for (size_t i = 0; i < st->count; i++) free(st->tensors[i].name);
        free(st->tensors);
        st->tensors = NULL;
        st->count = 0;
    }
    return rc;
}

/* Opens (memory-maps) and validates a .safetensors file. -1 + last_error() on failure. */
static API int st_open(SafeTensors *st, const char *path) {
    memset(st, 0, sizeof *st);
    snprintf(st->path, sizeof st->path, "%s", path);
    if (map_file(&st->file, path) != 0) return -1;
    if (st_parse(st, st->file.data, st->file.size, path) != 0) { unmap_file(&st->file); return -1; }
    return 0;
}

/* The tensor with this name, or NULL. */
static API const StTensor *st_find(const SafeTensors *st, const char *name) {
    size_t lo = 0, hi = st->count;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        int c = strcmp(st->tensors[mid].name, name);
        if (c == 0) return &st->tensors[mid];
        if (c < 0) lo = mid + 1; else hi = mid;
    }
    return NULL;
}

/* Copies a floating-point tensor into fp32 (F32, F16, BF16 or F64). -1 + last_error() otherwise. */
static API int st_to_f32(const StTensor *t, float *out /* [numel] */) {
    const uint8_t *p = t->data;
    switch (t->dtype) {
    case DT_F32: memcpy(out, p, t->nbytes); return 0;
    case DT_F16: for (size_t i = 0; i < t->numel; i++) { uint16_t h; memcpy(&h, p + 2 * i, 2); out[i] = f16_to_f32(h); } return 0;
    case DT_BF16: for (size_t i = 0; i < t->numel; i++) { uint16_t h; memcpy(&h, p + 2 * i, 2); out[i] = bf16_to_f32(h); } return 0;
    case DT_F64: for (size_t i = 0; i < t->numel; i++) { double v; memcpy(&v, p + 8 * i, 8); out[i] = (float)v; } return 0;
    default: return set_error("tensor '%s' has dtype %s, not a floating-point type", t->name, DTYPE_NAMES[t->dtype]);
    }
}

/* Checks a tensor's shape; -1 + a sentence naming the tensor and both shapes otherwise. */
static API int st_check_shape(const StTensor *t, int ndim, const int64_t *shape) {
    int ok = t->ndim == ndim;
    for (int i = 0; ok && i < ndim; i++) ok = t->shape[i] == shape[i];
    if (ok) return 0;
    char want[128] = "", got[128] = "";
    for (int i = 0; i < ndim; i++) snprintf(want + strlen(want), sizeof want - strlen(want), "%s%lld", i ? ", " : "", (long long)shape[i]);
    for (int i = 0; i < t->ndim; i++) snprintf(got + strlen(got), sizeof got - strlen(got), "%s%lld", i ? ", " : "", (long long)t->shape[i]);
    return set_error("tensor '%s' has shape [%s] but the config needs [%s]", t->name, got, want);
}

/* Writer: collect tensors (the data is borrowed until st_write), then write atomically. */
typedef struct {
    const char *name;
    DType dtype;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    const void *data;
    size_t nbytes;
} StEntry;
typedef struct {
    StEntry *entries;
    size_t count, cap;
    char *metadata_json; /* optional: a JSON object body for "__metadata__" (string values only) */
} StWriter;

static API void st_writer_add(StWriter *w, const char *name, DType dtype, int ndim, const int64_t *shape, const void *data) {
    if (w->count == w->cap) {
        w->cap = w->cap ? 2 * w->cap : 16;
        w->entries = (StEntry *)xrealloc(w->entries, w->cap * sizeof(StEntry));
    }
    StEntry *e = &w->entries[w->count++];
    memset(e, 0, sizeof *e);
    e->name = name;
    e->dtype = dtype;
    e->ndim = ndim;
    size_t numel = 1;
    for (int i = 0; i < ndim; i++) { e->shape[i] = shape[i]; numel *= (size_t)shape[i]; }
    e->data = data;
    e->nbytes = numel * DTYPE_SIZES[dtype];
}
static API void st_writer_free(StWriter *w) {
    free(w->entries);
    memset(w, 0, sizeof *w);
}
/* Writes every tensor added (in the order added) to path, via a temporary file. */
static API int st_write(const StWriter *w, const char *path) {
    size_t cap = 256 + w->count * 160, len = 0, off = 0;
    for (size_t i = 0; i < w->count; i++) cap += strlen(w->entries[i].name) * 2;
    if (w->metadata_json) cap += strlen(w->metadata_json) + 32;
    char *hdr = (char *)xmalloc(cap);
    len += (size_t)snprintf(hdr + len, cap - len, "{");
    if (w->metadata_json) len += (size_t)snprintf(hdr + len, cap - len, "\"__metadata__\":%s", w->metadata_json);
    for (size_t i = 0; i < w->count; i++) {
        const StEntry *e = &w->entries[i];
        len += (size_t)snprintf(hdr + len, cap - len, "%s\"", (len > 1) ? "," : "");
        for (const char *c = e->name; *c; c++) { /* names are plain ASCII keys; escape the two specials */
            if (*c == '"' || *c == '\\') hdr[len++] = '\\';
            hdr[len++] = *c;
        }
        len += (size_t)snprintf(hdr + len, cap - len, "\":{\"dtype\":\"%s\",\"shape\":[", DTYPE_NAMES[e->dtype]);
        for (int d = 0; d < e->ndim; d++) len += (size_t)snprintf(hdr + len, cap - len, "%s%lld", d ? "," : "", (long long)e->shape[d]);
        len += (size_t)snprintf(hdr + len, cap - len, "],\"data_offsets\":[%zu,%zu]}", off, off + e->nbytes);
        off += e->nbytes;
    }
    len += (size_t)snprintf(hdr + len, cap - len, "}");
    while (len % 8) hdr[len++] = ' '; /* pad the header so the data starts 8-byte aligned */
    AtomicFile af;
    if (atomic_open(&af, path) != 0) { free(hdr); return -1; }
    uint8_t lenbytes[8];
    for (int i = 0; i < 8; i++) lenbytes[i] = (uint8_t)(((uint64_t)len >> (8 * i)) & 0xff);
    int ok = fwrite(lenbytes, 1, 8, af.f) == 8 && fwrite(hdr, 1, len, af.f) == len;
    for (size_t i = 0; ok && i < w->count; i++)
        if (w->entries[i].nbytes) ok = fwrite(w->entries[i].data, 1, w->entries[i].nbytes, af.f) == w->entries[i].nbytes;
    free(hdr);
    if (!ok) { int e = errno; atomic_abort(&af); return set_error("writing %s failed: %s", path, strerror(e)); }
    return atomic_commit(&af);
}

/* ---------------------------------------------------------------------------------------
 * Token files: the stages exchange tokenized text in this format.
 *   bytes 0-3   magic "LLTK"
 *   bytes 4-7   version (uint32 LE) = 1
 *   bytes 8-11  dtype (uint32 LE): 2 = uint16 ids, 4 = uint32 ids
 *   bytes 12-19 count (uint64 LE): number of tokens
 *   then count ids of that width, little-endian
 * ------------------------------------------------------------------------------------- */

#define TOKFILE_MAGIC "LLTK"
#define TOKFILE_VERSION 1u
#define TOKFILE_HEADER 20

static API int tokfile_write(const char *path, const int32_t *ids /* [count] */, size_t count, int vocab_size) {
    uint32_t width = vocab_size <= 65536 ? 2u : 4u;
    AtomicFile af;
    if (atomic_open(&af, path) != 0) return -1;
    uint8_t hdr[TOKFILE_HEADER];
    memcpy(hdr, TOKFILE_MAGIC, 4);
    uint32_t ver = TOKFILE_VERSION;
    uint64_t n = count;
    for (int i = 0; i < 4; i++) { hdr[4 + i] = (uint8_t)(ver >> (8 * i)); hdr[8 + i] = (uint8_t)(width >> (8 * i)); }
    for (int i = 0; i < 8; i++) hdr[12 + i] = (uint8_t)(n >> (8 * i));
    int ok = fwrite(hdr, 1, TOKFILE_HEADER, af.f) == TOKFILE_HEADER;
    uint8_t buf[4096];
    size_t fill = 0;
    for (size_t i = 0; ok && i < count; i++) {
        uint32_t v = (uint32_t)ids[i];
        for (uint32_t b = 0; b < width; b++) buf[fill++] = (uint8_t)(v >> (8 * b));
        if (fill + 4 > sizeof buf) { ok = fwrite(buf, 1, fill, af.f) == fill; fill = 0; }
    }
    if (ok && fill) ok = fwrite(buf, 1, fill, af.f) == fill;
    if (!ok) { int e = errno; atomic_abort(&af); return set_error("writing %s failed: %s", path, strerror(e)); }
    return atomic_commit(&af);
}

/* Reads a token file; returns malloc'd ids [*count] or NULL + last_error(). */
static API int32_t *tokfile_read(const char *path, size_t *count) {
    size_t len;
    char *raw = read_file(path, &len);
    if (!raw) return NULL;
    const uint8_t *p = (const uint8_t *)raw;
    if (len < TOKFILE_HEADER || memcmp(p, TOKFILE_MAGIC, 4) != 0) { free(raw); set_error("%s is not a token file (bad magic)", path); return NULL; }
    uint32_t ver = 0, width = 0;
    uint64_t n = 0;
    for (int i = 3; i >= 0; i--) { ver = (ver << 8) | p[4 + i]; width = (width << 8) | p[8 + i]; }
    for (int i = 7; i >= 0; i--) n = (n << 8) | p[12 + i];
    if (ver != TOKFILE_VERSION) { free(raw); set_error("%s: token file version %u is not supported (want %u)", path, ver, TOKFILE_VERSION); return NULL; }
    if (width != 2 && width != 4) { free(raw); set_error("%s: token width %u is not 2 or 4", path, width); return NULL; }
    if (n > (len - TOKFILE_HEADER) / width || n * width != len - TOKFILE_HEADER) { free(raw); set_error("%s: header says %llu tokens but the file holds %zu bytes of ids", path, (unsigned long long)n, len - TOKFILE_HEADER); return NULL; }
    int32_t *ids = (int32_t *)xmalloc((size_t)n * sizeof(int32_t) + 1);
    for (size_t i = 0; i < n; i++) {
        const uint8_t *q = p + TOKFILE_HEADER + i * width;
        uint32_t v = width == 2 ? (uint32_t)(q[0] | q[1] << 8) : (uint32_t)q[0] | (uint32_t)q[1] << 8 | (uint32_t)q[2] << 16 | (uint32_t)q[3] << 24;
        if (v > INT32_MAX) { free(raw); free(ids); set_error("%s: token %zu has id %u, out of range", path, i, v); return NULL; }
        ids[i] = (int32_t)v;
    }
    free(raw);
    *count = (size_t)n;
    return ids;
}

/* ---------------------------------------------------------------------------------------
 * Command-line numbers, parsed the same way by every stage's program: the whole string must
 * be a number inside [lo, hi]; otherwise -1 + last_error() naming the flag.
 * ------------------------------------------------------------------------------------- */
static int parse_long_arg(const char *flag, const char *s, long lo, long hi, long *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (end == s || *end != 0 || errno != 0) return set_error("%s expects an integer, got '%s'", flag, s);
    if (v < lo || v > hi) return set_error("%s expects an integer in %ld..%ld, got %ld", flag, lo, hi, v);
    *out = v;
    return 0;
}
static API int parse_int_arg(const char *flag, const char *s, long lo, long hi, int *out) {
    long v = 0;
    if (parse_long_arg(flag, s, lo < INT32_MIN ? INT32_MIN : lo, hi > INT32_MAX ? INT32_MAX : hi, &v) != 0) return -1;
    *out = (int)v;
    return 0;
}
static API int parse_u64_arg(const char *flag, const char *s, uint64_t *out) {
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (end == s || *end != 0 || errno != 0 || s[0] == '-') return set_error("%s expects a non-negative integer, got '%s'", flag, s);
    *out = (uint64_t)v;
    return 0;
}
static int parse_double_arg(const char *flag, const char *s, double lo, double hi, double *out) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (end == s || *end != 0 || errno != 0 || !isfinite(v)) return set_error("%s expects a number, got '%s'", flag, s);
    if (!(v >= lo && v <= hi)) return set_error("%s expects a number in [%g, %g], got %s", flag, lo, hi, s);
    *out = v;
    return 0;
}

/* The same for a program's main(), which stops with the sentence instead. */
static API long need_long_arg(const char *flag, const char *s, long lo, long hi) {
    long v = 0;
    if (parse_long_arg(flag, s, lo, hi, &v) != 0) die("%s", last_error());
    return v;
}
static API double need_double_arg(const char *flag, const char *s, double lo, double hi) {
    double v = 0;
    if (parse_double_arg(flag, s, lo, hi, &v) != 0) die("%s", last_error());
    return v;
}

/* ---------------------------------------------------------------------------------------
 * S2-Attn segment bounds (docs/DESIGN.md): shared by the CPU stages and the GPU kernels.
 * Sequence length N, group size G (N % G == 0; G == 0 means full causal attention). A
 * single group (G == N) is not full attention for the shifted heads, whose segments are then
 * [0, N/2) and [N/2, N): s2_group_size below maps a group ratio of 1 to G = 0 (full attention).
 * Heads h < H/2 attend causally inside [kG, (k+1)G); heads h >= H/2 are shifted by
 * S = G/2 and attend inside [0, S), [S, S+G), ..., [S+(N/G-1)G, N): no wrap-around.
 * Query i of head h may see keys j with s2_first_key(...) <= j <= i.
 * ------------------------------------------------------------------------------------- */
#ifdef __CUDACC__
#define S2_HOSTDEV __host__ __device__
#else
#define S2_HOSTDEV
#endif
static inline S2_HOSTDEV size_t s2_first_key(size_t i, int h, int H, size_t G) {
#ifdef __CUDA_ARCH__
    typedef uint32_t idx; /* on the GPU i < N <= INT_MAX: a 32-bit division, where a 64-bit one is a call */
#else
    typedef size_t idx;
#endif
    const idx ii = (idx)i, g = (idx)G;
    if (g == 0) return 0;                   /* full attention */
    if (h < H / 2) return (ii / g) * g;     /* plain groups */
    const idx S = g / 2;
    if (ii < S) return 0;                   /* the short first segment [0, S) */
    return S + ((ii - S) / g) * g;
}
/* The same segments read from the key side: one past the last query that sees key j, i.e.
 * the end of j's segment (windows only move right, so queries j..s2_segment_end - 1 see j).
 * The attention backward takes its query range per key block from it (04_s2attn.cu);
 * tests/test_common.c checks it against a scan of s2_first_key. */
static inline S2_HOSTDEV size_t s2_segment_end(size_t j, int h, int H, size_t G, size_t N) {
    const size_t first = s2_first_key(j, h, H, G);
    size_t len = G;                                  /* a plain segment, or a shifted one past the first */
    if (G == 0) len = N;                             /* full attention: one segment */
    else if (h >= H / 2 && first == 0) len = G / 2;  /* the short first segment [0, S) */
    return first + len < N ? first + len : N;        /* the last segment ends at N */
}

/* The (query, key) pairs head h attends over N tokens, segment by segment: a segment of L
 * queries holds L (L + 1) / 2 of them with the diagonal (diagonal = 1: what training's MFU
 * counts, 05_train.c), or L^2 / 2 without it (diagonal = 0: the count flash-attention
 * benchmarks use for FLOPs, 04_s2attn.cu --bench and bench/attn_ab.cu). Closed form of
 * summing i - s2_first_key(i) + 1 over the queries; tests/test_common.c checks the two agree. */
static inline double s2_head_pairs(size_t N, int h, int H, size_t G, int diagonal) {
#define S2_SEGMENT_PAIRS(L) ((double)(L) * (double)(L) / 2.0 + (diagonal ? (double)(L) / 2.0 : 0.0))
    if (G == 0) return S2_SEGMENT_PAIRS(N);          /* full attention: one segment */
    double pairs = 0;
    size_t start = 0;
    if (h >= H / 2) {                                /* shifted: the short first segment [0, S) */
        const size_t S = G / 2;
        if (N <= S) return S2_SEGMENT_PAIRS(N);
        pairs = S2_SEGMENT_PAIRS(S);
        start = S;
    }
    const size_t rest = N - start;                   /* whole segments of G, then what is left */
    pairs += (double)(rest / G) * S2_SEGMENT_PAIRS(G) + S2_SEGMENT_PAIRS(rest % G);
    return pairs;
#undef S2_SEGMENT_PAIRS
}

/* The S2-Attn group for N tokens at group ratio `ratio` (G = N * ratio, a whole number that
 * divides N), the one rule every stage uses. A ratio of 1 is one group spanning the whole
 * sequence: nothing is sparse or shifted, so that is full causal attention and *G = 0.
 * -1 + last_error() when the sizes do not fit. */
static API int s2_group_size(size_t N, double ratio, size_t *G) {
    *G = 0;
    if (!(ratio > 0.0 && ratio <= 1.0)) return set_error("the S2-Attn group ratio %g is not in (0, 1]", ratio);
    double g = (double)N * ratio;
    size_t gi = (size_t)llround(g);
    if (gi < 1 || fabs(g - (double)gi) > 1e-9)
        return set_error("the S2-Attn group G = N * ratio = %zu * %g = %g is not a whole number of tokens (pick N as a multiple of %g, "
                         "or another group ratio)", N, ratio, g, 1.0 / ratio);
    if (N % gi != 0)
        return set_error("the sequence length %zu is not a multiple of the S2-Attn group size %zu = N * %g (pick N as a multiple of %zu, "
                         "or another group ratio)", N, gi, ratio, gi);
    *G = gi >= N ? 0 : gi;
    return 0;
}

/* The GPU stage's API (04_s2attn.cu, 04_layers.cu) is declared in 04_gpu.h. */

#endif /* COMMON_H */
