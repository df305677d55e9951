/* split_args.h: a command line written as one string, cut into argv as a shell would without
 * quoting (at spaces), for the tests that run 05_train's main or parser on one. */
#ifndef TESTS_SPLIT_ARGS_H
#define TESTS_SPLIT_ARGS_H
#include <string.h>

/* Cuts line up at spaces into argv[0..cap-2], argv[argc] = NULL; returns argc. Words past
 * cap - 1 are dropped. */
static inline int split_args(char *line, char **argv, int cap) {
    int argc = 0;
    for (char *tok = strtok(line, " "); tok && argc < cap - 1; tok = strtok(NULL, " ")) argv[argc++] = tok;
    argv[argc] = NULL;
    return argc;
}

#endif
