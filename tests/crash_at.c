/* crash_at.c: an LD_PRELOAD library for tests/test_kill_save.sh (built there, not by make).
 * It counts the calls by which a program changes its files (fopen for writing, rename,
 * mkdir, rmdir, unlink, remove, fsync) and, with CRASH_AT=k, kills its process with SIGKILL
 * just before the k-th: a kill -9 at a chosen point of a save, every point in turn. With
 * CRASH_LOG=path it appends one line "k call path" per call, so a test can find the calls of
 * the save it aims at. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static long g_count, g_at = -1;
static FILE *g_log;
static FILE *(*real_fopen)(const char *, const char *);

static void hit(const char *call, const char *path) {
    g_count++;
    if (g_log) { fprintf(g_log, "%ld %s %s\n", g_count, call, path ? path : "-"); fflush(g_log); }
    if (g_count == g_at) raise(SIGKILL);
}

__attribute__((constructor)) static void crash_at_init(void) {
    real_fopen = (FILE *(*)(const char *, const char *))dlsym(RTLD_NEXT, "fopen");
    const char *at = getenv("CRASH_AT"), *log = getenv("CRASH_LOG");
    if (at) g_at = atol(at);
    if (log) g_log = real_fopen(log, "a");
}

/* the libc function this one wraps, looked up once */
#define REAL(name, ...) static __VA_ARGS__; if (!real) *(void **)&real = dlsym(RTLD_NEXT, name)

FILE *fopen(const char *path, const char *mode) {
    if (!real_fopen) crash_at_init();
    if (strpbrk(mode, "wa+")) hit("fopen", path);
    return real_fopen(path, mode);
}
int rename(const char *from, const char *to) {
    REAL("rename", int (*real)(const char *, const char *));
    hit("rename", to);
    return real(from, to);
}
int mkdir(const char *path, mode_t mode) {
    REAL("mkdir", int (*real)(const char *, mode_t));
    hit("mkdir", path);
    return real(path, mode);
}
int rmdir(const char *path) {
    REAL("rmdir", int (*real)(const char *));
    hit("rmdir", path);
    return real(path);
}
int unlink(const char *path) {
    REAL("unlink", int (*real)(const char *));
    hit("unlink", path);
    return real(path);
}
int remove(const char *path) {
    REAL("remove", int (*real)(const char *));
    hit("remove", path);
    return real(path);
}
int fsync(int fd) {
    REAL("fsync", int (*real)(int));
    hit("fsync", NULL);
    return real(fd);
}
