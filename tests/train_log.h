/* train_log.h: one column of a run's OUT/train_log.csv (05_train's log: a header, then one row
 * a step: step,loss,lr,...), the reader the trainer tests share. Needs common.h's read_file
 * (the tests include 05_train.c first). */
#ifndef TESTS_TRAIN_LOG_H
#define TESTS_TRAIN_LOG_H
#include <stdlib.h>
#include <string.h>

enum { TRAIN_LOG_LOSS = 1, TRAIN_LOG_LR = 2 }; /* column numbers, 0 being the step */

/* Column `col` of the CSV at path, rows in order, into out[0..cap); returns how many rows
 * (0 when the file cannot be read). */
static int train_log_column(const char *path, int col, double *out, int cap) {
    char *csv = read_file(path, NULL);
    int n = 0;
    for (char *line = csv ? strchr(csv, '\n') : NULL; line && line[1] && n < cap; line = strchr(line + 1, '\n')) {
        char *c = line + 1;
        for (int k = 0; k < col && c; k++) {
            c = strchr(c, ',');
            if (c) c++;
        }
        if (!c) break;
        out[n++] = strtod(c, NULL);
    }
    free(csv);
    return n;
}

#endif
