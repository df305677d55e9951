/* check.h: the one assertion the C tests share.
 * EXPECT(cond, fmt, ...) counts a check; when cond is false it prints "FAIL file:line: message"
 * and counts a failure, and the test goes on, so one run shows every failing check.
 * A test ends with: printf("...: %d checks, %d failed\n", g_checks, g_failures);
 *                   return g_failures ? 1 : 0;
 */
#ifndef TESTS_CHECK_H
#define TESTS_CHECK_H
#include <stdio.h>

static int g_checks, g_failures;
#define EXPECT(cond, ...)                                                   \
    do {                                                                    \
        g_checks++;                                                         \
        if (!(cond)) {                                                      \
            g_failures++;                                                   \
            printf("FAIL %s:%d: ", __FILE__, __LINE__);                     \
            printf(__VA_ARGS__);                                            \
            printf("\n");                                                   \
        }                                                                   \
    } while (0)

#endif
