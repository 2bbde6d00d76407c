/* msnf-watchdog: run one program and make sure it ends.
 *
 *   msnf-watchdog --lifetime SECONDS [--grace SECONDS] [--remove DIR] [--pidfile FILE]
 *                 [--batch SECONDS] -- PROG ARGS...
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
 * --batch SECONDS relays PROG's stdout through us in batches: PROG (tcpdump -U, one write per
 * packet) writes into a pipe of ours, and we pass its bytes on to our stdout once SECONDS have
 * passed since the oldest byte not yet passed on, or once BATCH_BYTES are waiting, or at its
 * end; PROG's first write (tcpdump's file header) goes on at once. Each write to an exec stream
 * becomes a WebSocket frame that the client pays for, so a busy PROG's packets go on in few
 * large frames; a quiet PROG's packet waits at most SECONDS, so that little is lost with us
 * when the container we run in is killed. Backpressure is kept: with RELAY_BYTES waiting we stop reading the pipe, PROG's writes
 * block and the kernel drops (and counts) what its capture buffer cannot hold. Our stdout is
 * non-blocking, so a stalled reader never keeps us from the lifetime, stdin or signals; once
 * PROG has ended, what is left is passed on for up to the grace period, then given up.
 *
 * Static and libc-only so that it runs in any Linux container of its architecture.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
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
          "[--pidfile FILE] [--batch SECONDS] -- PROG ARGS...\n", stderr);
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

#define RELAY_BYTES (256 * 1024)
#define BATCH_BYTES (64 * 1024)

static unsigned char relay[RELAY_BYTES];
static size_t relay_start, relay_end;  /* waiting bytes: relay[relay_start .. relay_end) */

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
    double lifetime = -1, grace = 5, batch = -1;
    const char *remove_dir = NULL, *pidfile = NULL;
    int i = 1;
    for (; i < argc; i++) {
        if (strcmp(argv[i], "--") == 0) { i++; break; }
        if (i + 1 >= argc) usage();
        if (strcmp(argv[i], "--lifetime") == 0) lifetime = seconds_arg(argv[++i]);
        else if (strcmp(argv[i], "--grace") == 0) grace = seconds_arg(argv[++i]);
        else if (strcmp(argv[i], "--remove") == 0) remove_dir = argv[++i];
        else if (strcmp(argv[i], "--pidfile") == 0) pidfile = argv[++i];
        else if (strcmp(argv[i], "--batch") == 0) batch = seconds_arg(argv[++i]);
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

    /* With --batch, PROG's stdout is a pipe of ours (read end non-blocking); ours is made
     * non-blocking too, which only we use: PROG writes to the pipe. */
    int pipe_fds[2] = {-1, -1};
    if (batch >= 0) {
        if (pipe2(pipe_fds, O_CLOEXEC) != 0) { perror("msnf-watchdog: pipe"); return 125; }
        int flags = fcntl(1, F_GETFL);
        if (flags < 0 || fcntl(1, F_SETFL, flags | O_NONBLOCK) != 0 ||
            fcntl(pipe_fds[0], F_SETFL, O_NONBLOCK) != 0) {
            perror("msnf-watchdog: O_NONBLOCK");
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
        if (pipe_fds[1] >= 0) {
            /* dup2 clears FD_CLOEXEC on the copy; the originals close at exec. Our stdout was
             * made non-blocking, so PROG gets a blocking description of its own: the pipe. */
            if (dup2(pipe_fds[1], 1) < 0) { perror("msnf-watchdog: dup2"); _exit(126); }
        }
        /* execvp would hand a file the kernel cannot run to /bin/sh as a script: for a path,
         * exec exactly that file. */
        if (strchr(argv[i], '/') != NULL) execv(argv[i], &argv[i]);
        else execvp(argv[i], &argv[i]);
        fprintf(stderr, "msnf-watchdog: cannot run %s: %s\n", argv[i], strerror(errno));
        _exit(errno == ENOENT ? 127 : 126);
    }
    int relay_fd = -1;  /* the pipe's read end while PROG may still write to it */
    if (pipe_fds[1] >= 0) {
        close(pipe_fds[1]);
        relay_fd = pipe_fds[0];
    }

    double stop_at = now() + lifetime, kill_at = 0, give_up_at = 0, oldest = 0;
    int stopping = 0, status = 0, stdin_open = 1, child_alive = 1, stdout_ok = 1;
    int passed_on = 0;  /* whether any of PROG's bytes went out yet: its header goes at once */
    for (;;) {
        double t = now();
        if (!stopping && t >= stop_at) {
            kill(child, SIGINT);
            stopping = 1;
            kill_at = t + grace;
            give_up_at = t + 2 * grace;  /* until then, what PROG wrote last is passed on */
        }
        if (stopping && child_alive && t >= kill_at) {
            kill(child, SIGKILL);
            kill_at = t + 3600;  /* only the exit is left to wait for */
        }
        int giving_up = stopping && t >= give_up_at;
        if (!stdout_ok || giving_up) relay_start = relay_end = 0;
        if (!child_alive && (relay_fd < 0 || giving_up) && relay_end == relay_start) break;
        if (relay_start > 0 && relay_end == RELAY_BYTES) {
            memmove(relay, relay + relay_start, relay_end - relay_start);
            relay_end -= relay_start;
            relay_start = 0;
        }

        /* A batch goes out when it is old enough, big enough, PROG's first, or PROG's stream
         * has ended. */
        size_t waiting = relay_end - relay_start;
        int flush = waiting > 0 && (relay_fd < 0 || waiting >= BATCH_BYTES || !passed_on ||
                                    t >= oldest + batch);
        double wake = stopping ? (child_alive ? kill_at : give_up_at) : stop_at;
        if (waiting > 0 && !flush && oldest + batch < wake) wake = oldest + batch;
        struct pollfd fds[4] = {
            {.fd = sfd, .events = POLLIN},
            {.fd = stdin_open ? 0 : -1, .events = POLLIN},
            {.fd = relay_fd >= 0 && relay_end < RELAY_BYTES ? relay_fd : -1, .events = POLLIN},
            {.fd = flush ? 1 : -1, .events = POLLOUT},
        };
        if (poll(fds, 4, wait_timeout_ms(wake)) < 0 && errno != EINTR) {
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
                if (stop_at > now()) stop_at = now();  /* the stream is gone: stop now */
            }
        }
        if (fds[0].revents) {
            struct signalfd_siginfo info;
            if (read(sfd, &info, sizeof info) == sizeof info && info.ssi_signo != SIGCHLD &&
                info.ssi_signo != SIGPIPE && stop_at > now())
                stop_at = now();
        }
        if (fds[2].revents) {
            ssize_t n = read(relay_fd, relay + relay_end, RELAY_BYTES - relay_end);
            if (n > 0) {
                if (relay_end == relay_start) oldest = now();
                relay_end += (size_t)n;
            } else if (n == 0 || (errno != EINTR && errno != EAGAIN)) {
                close(relay_fd);  /* PROG closed its stdout: it ended */
                relay_fd = -1;
            }
        }
        if (fds[3].revents) {
            ssize_t n = write(1, relay + relay_start, relay_end - relay_start);
            if (n > 0) {
                passed_on = 1;
                relay_start += (size_t)n;
                if (relay_start == relay_end) relay_start = relay_end = 0;
            } else if (n < 0 && errno != EINTR && errno != EAGAIN) {
                stdout_ok = 0;  /* nobody reads us any more: stop PROG */
                if (stop_at > now()) stop_at = now();
            }
        }
        if (child_alive && waitpid(child, &status, WNOHANG) == child) {
            child_alive = 0;
            if (!stopping) {  /* ended by itself (tcpdump -c): pass the rest on, then go */
                stopping = 1;
                give_up_at = now() + grace;
            }
        }
    }

    if (pidfile != NULL) unlink(pidfile);
    if (remove_dir != NULL)
        nftw(remove_dir, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
    if (WIFEXITED(status)) return WEXITSTATUS(status);
    if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
    return 125;
}
