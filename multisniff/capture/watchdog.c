/* msnf-watchdog: run one program and make sure it ends.
 *
 *   msnf-watchdog --lifetime SECONDS [--grace SECONDS] [--remove DIR] -- PROG ARGS...
 *
 * A capture started over an exec stream must not outlive that stream, and closing an exec
 * stream does not reliably kill the process it started. So PROG (tcpdump) runs as our child
 * with stdin=/dev/null and our stdout/stderr, and we read our own stdin: its EOF means the
 * client closed the stream (or died). On EOF, when the lifetime has elapsed, or on
 * SIGTERM/SIGINT/SIGHUP we send PROG SIGINT (tcpdump flushes and prints its statistics), and
 * SIGKILL after the grace period. We exit with PROG's status (128+N when signal N ended it),
 * and with --remove delete DIR recursively first: the uploaded bundle we were started from.
 * --pidfile writes our PID to FILE (removed at exit), for clients whose exec protocol cannot
 * close stdin alone: they stop us with `kill -INT` instead.
 *
 * Static and libc-only so that it runs in any Linux container of its architecture.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void usage(void) {
    fputs("usage: msnf-watchdog --lifetime SECONDS [--grace SECONDS] [--remove DIR] "
          "[--pidfile FILE] -- PROG ARGS...\n", stderr);
    exit(2);
}

static double seconds_arg(const char *text) {
    char *end;
    errno = 0;
    double value = strtod(text, &end);
    if (errno != 0 || end == text || *end != '\0' || !(value >= 0)) {
        fprintf(stderr, "msnf-watchdog: %s is not a number of seconds\n", text);
        exit(2);
    }
    return value;
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int remove_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw) {
    (void)st; (void)flag; (void)ftw;
    if (remove(path) != 0 && errno != ENOENT)
        fprintf(stderr, "msnf-watchdog: cannot remove %s: %s\n", path, strerror(errno));
    return 0;
}

static int wait_timeout_ms(double deadline) {
    double left = deadline - now();
    if (left <= 0) return 0;
    if (left > 86400.0) return 86400 * 1000;
    return (int)(left * 1000.0) + 1;
}

int main(int argc, char **argv) {
    double lifetime = -1, grace = 5;
    const char *remove_dir = NULL, *pidfile = NULL;
    int i = 1;
    for (; i < argc; i++) {
        if (strcmp(argv[i], "--") == 0) { i++; break; }
        if (i + 1 >= argc) usage();
        if (strcmp(argv[i], "--lifetime") == 0) lifetime = seconds_arg(argv[++i]);
        else if (strcmp(argv[i], "--grace") == 0) grace = seconds_arg(argv[++i]);
        else if (strcmp(argv[i], "--remove") == 0) remove_dir = argv[++i];
        else if (strcmp(argv[i], "--pidfile") == 0) pidfile = argv[++i];
        else usage();
    }
    if (lifetime < 0 || i >= argc) usage();

    /* A shell starts background jobs with SIGINT ignored; an ignored signal is discarded even
     * while blocked, and the child would inherit it: take the defaults back. */
    const int handled[] = {SIGTERM, SIGINT, SIGHUP, SIGPIPE};
    for (size_t k = 0; k < sizeof handled / sizeof handled[0]; k++) signal(handled[k], SIG_DFL);

    sigset_t mask, old;
    sigemptyset(&mask);
    sigaddset(&mask, SIGCHLD);
    sigaddset(&mask, SIGTERM);
    sigaddset(&mask, SIGINT);
    sigaddset(&mask, SIGHUP);
    sigaddset(&mask, SIGPIPE);
    sigprocmask(SIG_BLOCK, &mask, &old);
    int sfd = signalfd(-1, &mask, SFD_CLOEXEC);
    if (sfd < 0) { perror("msnf-watchdog: signalfd"); return 125; }

    if (pidfile != NULL) {
        FILE *f = fopen(pidfile, "w");
        if (f == NULL || fprintf(f, "%d\n", (int)getpid()) < 0 || fclose(f) != 0) {
            fprintf(stderr, "msnf-watchdog: cannot write %s: %s\n", pidfile, strerror(errno));
            return 125;
        }
    }

    pid_t child = fork();
    if (child < 0) { perror("msnf-watchdog: fork"); return 125; }
    if (child == 0) {
        sigprocmask(SIG_SETMASK, &old, NULL);
        int null = open("/dev/null", O_RDONLY);
        if (null < 0 || dup2(null, 0) < 0) { perror("msnf-watchdog: /dev/null"); _exit(126); }
        if (null > 0) close(null);
        /* execvp would hand a file the kernel cannot run to /bin/sh as a script: for a path,
         * exec exactly that file. */
        if (strchr(argv[i], '/') != NULL) execv(argv[i], &argv[i]);
        else execvp(argv[i], &argv[i]);
        fprintf(stderr, "msnf-watchdog: cannot run %s: %s\n", argv[i], strerror(errno));
        _exit(errno == ENOENT ? 127 : 126);
    }

    double stop_at = now() + lifetime, kill_at = 0;
    int stopping = 0, status = 0, stdin_open = 1;
    for (;;) {
        if (!stopping && now() >= stop_at) {
            kill(child, SIGINT);
            stopping = 1;
            kill_at = now() + grace;
        }
        if (stopping && now() >= kill_at) {
            kill(child, SIGKILL);
            kill_at = now() + 3600;  /* only the exit is left to wait for */
        }
        struct pollfd fds[2] = {{.fd = sfd, .events = POLLIN},
                                {.fd = stdin_open ? 0 : -1, .events = POLLIN}};
        int timeout = wait_timeout_ms(stopping ? kill_at : stop_at);
        if (poll(fds, 2, timeout) < 0 && errno != EINTR) {
            perror("msnf-watchdog: poll");
            kill(child, SIGKILL);
            waitpid(child, &status, 0);
            break;
        }
        if (fds[1].revents) {
            char buf[4096];
            ssize_t n = read(0, buf, sizeof buf);
            if (n == 0 || (n < 0 && errno != EINTR && errno != EAGAIN)) {
                stdin_open = 0;
                stop_at = now();  /* the stream is gone: stop now */
            }
        }
        if (fds[0].revents) {
            struct signalfd_siginfo info;
            if (read(sfd, &info, sizeof info) == sizeof info && info.ssi_signo != SIGCHLD &&
                info.ssi_signo != SIGPIPE)
                stop_at = now();
        }
        pid_t done = waitpid(child, &status, WNOHANG);
        if (done == child) break;
    }

    if (pidfile != NULL) unlink(pidfile);
    if (remove_dir != NULL)
        nftw(remove_dir, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
    if (WIFEXITED(status)) return WEXITSTATUS(status);
    if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
    return 125;
}
