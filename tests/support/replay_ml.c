/* Replays a captured ML service log inside a container, with its real timing, on its real streams,
 * from real processes laid out like gunicorn's: a master that forks one worker per worker PID of
 * the capture. Built statically (gcc -static) into a FROM scratch image by tests/support/replay.py.
 *
 *   replay_ml FILE [SPEED]
 *
 * FILE holds one line per log line: "<offset microseconds>\t<process>\t<stream>\t<text>", process 0
 * being the master and n > 0 the n-th worker, stream 1 (stdout) or 2 (stderr), text with "\\" for a
 * backslash, "\\e" for ESC and "\\n" for a newline inside one write (a Rich record's wrapped
 * lines). SPEED (default 1) divides the offsets. Each process writes each of its lines with one
 * write(2), at their offset from the master's start. A worker burns 0.3 s of CPU after its last
 * line (the exporter's per-container CPU series must see it) and, when a later
 * worker exists, exits after its last line (gunicorn replaced it); the last worker and the master
 * stay until SIGTERM, which the master forwards to its workers like gunicorn's arbiter. */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

struct line { long long at_us; int who; int fd; char *text; size_t len; };

static struct line *lines;
static int nlines, cap, nworkers;
static pid_t workers[256];
static volatile sig_atomic_t stop;

static void on_term(int sig) { (void)sig; stop = 1; }
static void on_child(int sig) { (void)sig; } /* wakes pause() to reap a replaced worker */

static void unescape(char *s, size_t *len) {
    char *r = s, *w = s;
    while (*r) {
        if (r[0] == '\\' && r[1] == 'e') { *w++ = 27; r += 2; }
        else if (r[0] == '\\' && r[1] == 'n') { *w++ = '\n'; r += 2; }
        else if (r[0] == '\\' && r[1] == '\\') { *w++ = '\\'; r += 2; }
        else *w++ = *r++;
    }
    *w++ = '\n';
    *len = (size_t)(w - s);
}

static void load(const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) { perror(path); exit(2); }
    char *buf = NULL; size_t n = 0; ssize_t got;
    while ((got = getline(&buf, &n, f)) > 0) {
        if (buf[got - 1] == '\n') buf[--got] = 0;
        char *a = strtok(buf, "\t"), *b = strtok(NULL, "\t"), *c = strtok(NULL, "\t");
        char *text = c ? c + strlen(c) + 1 : NULL;
        if (!a || !b || !c) continue;
        if (text > buf + got) text = buf + got; /* empty text */
        if (nlines == cap) { cap = cap ? cap * 2 : 256; lines = realloc(lines, sizeof *lines * cap); }
        struct line *l = &lines[nlines++];
        l->at_us = atoll(a); l->who = atoi(b); l->fd = atoi(c) == 2 ? 2 : 1;
        l->text = malloc(strlen(text) + 2); strcpy(l->text, text);
        unescape(l->text, &l->len);
        if (l->who > nworkers) nworkers = l->who;
        buf = NULL; n = 0;
    }
    fclose(f);
}

static void sleep_until(const struct timespec *t0, long long at_us, double speed) {
    long long due = (long long)(at_us / speed);
    for (;;) {
        struct timespec now; clock_gettime(CLOCK_MONOTONIC, &now);
        long long el = (now.tv_sec - t0->tv_sec) * 1000000LL + (now.tv_nsec - t0->tv_nsec) / 1000;
        if (el >= due || stop) return;
        long long d = due - el;
        struct timespec ts = { d / 1000000, (d % 1000000) * 1000 };
        nanosleep(&ts, NULL);
    }
}

static void burn(long ms) {
    struct timespec a, b; clock_gettime(CLOCK_THREAD_CPUTIME_ID, &a);
    volatile unsigned long x = 0;
    do { for (int i = 0; i < 100000; i++) x += i; clock_gettime(CLOCK_THREAD_CPUTIME_ID, &b); }
    while ((b.tv_sec - a.tv_sec) * 1000 + (b.tv_nsec - a.tv_nsec) / 1000000 < ms);
}

static void play(int who, const struct timespec *t0, double speed) {
    int last = -1;
    for (int i = 0; i < nlines; i++) if (lines[i].who == who) last = i;
    for (int i = 0; i < nlines && !stop; i++) {
        if (lines[i].who != who) continue;
        sleep_until(t0, lines[i].at_us, speed);
        if (stop) break;
        ssize_t w = write(lines[i].fd, lines[i].text, lines[i].len);
        (void)w;
        if (i == last && who > 0) {
            burn(300); /* after its lines, so the replay's timing stays the capture's */
            if (who < nworkers) _exit(0); /* replaced by a later worker */
        }
    }
}

int main(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: replay_ml FILE [SPEED]\n"); return 2; }
    double speed = argc > 2 ? atof(argv[2]) : 1.0;
    if (speed <= 0) speed = 1.0;
    load(argv[1]);
    struct sigaction sa = {0}; sa.sa_handler = on_term; sigaction(SIGTERM, &sa, NULL); sigaction(SIGINT, &sa, NULL);
    struct sigaction sc = {0}; sc.sa_handler = on_child; sigaction(SIGCHLD, &sc, NULL);
    struct timespec t0; clock_gettime(CLOCK_MONOTONIC, &t0);
    /* each worker is forked at its first line's time, as gunicorn boots it */
    int next = 1;
    for (int i = 0; i < nlines && !stop; i++) {
        while (next <= nworkers && lines[i].who == next) {
            sleep_until(&t0, lines[i].at_us, speed);
            pid_t p = fork();
            if (p == 0) {
                signal(SIGTERM, SIG_DFL);
                play(next, &t0, speed);
                while (!stop) pause();
                _exit(0);
            }
            workers[next++] = p;
        }
        if (lines[i].who == 0) {
            sleep_until(&t0, lines[i].at_us, speed);
            if (stop) break;
            ssize_t w = write(lines[i].fd, lines[i].text, lines[i].len);
            (void)w;
        }
        while (waitpid(-1, NULL, WNOHANG) > 0) {}
    }
    while (!stop) { pause(); while (waitpid(-1, NULL, WNOHANG) > 0) {} }
    for (int i = 1; i < next; i++) if (workers[i] > 0) kill(workers[i], SIGTERM);
    while (wait(NULL) > 0 || errno == EINTR) {}
    return 0;
}
