/*
 * spawn: tiny launcher used by bench.py to time one command and read its
 * peak RSS.
 *
 *   spawn OUTFILE ERRFILE CMD [ARGS...]
 *
 * Forks, redirects the child's stdout/stderr to OUTFILE/ERRFILE, execs CMD,
 * waits with wait4() and prints "WALL_SECONDS MAXRSS_KIB EXIT_CODE" on stdout.
 *
 * Why not spawn from bench.py directly: on Linux a process's ru_maxrss keeps
 * the high-water mark of the address space it had before execve(). A child
 * forked (or vforked) from the benchmark driver, which holds numpy and has
 * loaded whole checkpoints, would report the driver's peak instead of its own.
 * This launcher is a fresh, ~1 MiB process, so the floor it adds is tiny
 * (bench.py measures and reports it by running /bin/true).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: spawn OUTFILE ERRFILE CMD [ARGS...]\n");
        return 2;
    }
    int out = open(argv[1], O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    int err = open(argv[2], O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    int in = open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (out < 0 || err < 0 || in < 0) {
        perror("spawn: open");
        return 2;
    }
    double t0 = now();
    pid_t pid = fork();
    if (pid < 0) {
        perror("spawn: fork");
        return 2;
    }
    if (pid == 0) {
        dup2(in, 0);
        dup2(out, 1);
        dup2(err, 2);
        execvp(argv[3], argv + 3);
        fprintf(stderr, "spawn: exec %s: %s\n", argv[3], strerror(errno));
        _exit(127);
    }
    int status = 0;
    struct rusage ru;
    memset(&ru, 0, sizeof ru);
    while (wait4(pid, &status, 0, &ru) < 0) {
        if (errno != EINTR) {
            perror("spawn: wait4");
            return 2;
        }
    }
    double wall = now() - t0;
    int code = WIFEXITED(status) ? WEXITSTATUS(status)
             : WIFSIGNALED(status) ? 128 + WTERMSIG(status) : 255;
    printf("%.6f %ld %d\n", wall, ru.ru_maxrss, code);
    return 0;
}
