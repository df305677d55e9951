/* check.h: the one assertion the C tests share.
 * EXPECT(cond, fmt, ...) counts a check; when cond is false it prints "FAIL file:line: message"
 * and counts a failure, and the test goes on, so one run shows every failing check.
 * check_counted(ok) counts one check whose outcome a test's own helper has worked out and
 * printed (a comparison of whole arrays that prints its "ok"/"FAIL" line); it returns ok.
 * A test ends with: printf("...: %d checks, %d failed\n", g_checks, g_failures);
 *                   return g_failures ? 1 : 0;
 * A test that cannot run here (no GPU, no reference library, no shared data) prints
 * "skip: why" as its last line and returns 77.
 */
#ifndef TESTS_CHECK_H
#define TESTS_CHECK_H
#include <stdio.h>

static int g_checks, g_failures;

static int check_counted(int ok) {
    g_checks++;
    if (!ok) g_failures++;
    return ok;
}

#define EXPECT(cond, ...)                                                   \
    do {                                                                    \
        if (!check_counted(!!(cond))) {                                     \
            printf("FAIL %s:%d: ", __FILE__, __LINE__);                     \
            printf(__VA_ARGS__);                                            \
            printf("\n");                                                   \
        }                                                                   \
    } while (0)

#endif
