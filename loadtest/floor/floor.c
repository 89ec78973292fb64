/*
 * The kernel's own floor for one presence delivery: one small write to one loopback TCP socket.
 *
 * A writer (pinned to one core) accepts N connections from a reader process (pinned to the
 * other core) and writes `bytes` bytes to each in turn, `rounds` times, like a gateway fanning
 * one update out to N watchers with no framing, no runtime and no presence work at all. The
 * reader drains with epoll, one read per readiness event. Both report their CPU (user + system,
 * from getrusage) per message. On loopback the kernel charges the receiving side's TCP work
 * (softirq) to the sender, so the writer's figure is what any gateway pays per delivery before
 * doing anything of its own.
 *
 * Build and run: loadtest/floor/run.sh [sockets] [bytes] [rounds]
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

static long long read_total;

static void pin(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (sched_setaffinity(0, sizeof set, &set) != 0) perror("sched_setaffinity");
}

static void cpu_s(double *user, double *sys) {
    struct rusage r;
    getrusage(RUSAGE_SELF, &r);
    *user = r.ru_utime.tv_sec + r.ru_utime.tv_usec / 1e6;
    *sys = r.ru_stime.tv_sec + r.ru_stime.tv_usec / 1e6;
}

static int report_fd = -1;

static void reader_done(int sig) {
    (void)sig;
    double u, s;
    cpu_s(&u, &s);
    char line[128];
    int n = snprintf(line, sizeof line, "%lld %.6f %.6f\n", read_total, u, s);
    if (write(report_fd, line, n) < 0) _exit(1);
    _exit(0);
}

static void reader(struct sockaddr_in addr, int n, int to_parent) {
    pin(1);
    report_fd = to_parent;
    signal(SIGTERM, reader_done);
    int ep = epoll_create1(0);
    for (int i = 0; i < n; i++) {
        int s = socket(AF_INET, SOCK_STREAM, 0);
        if (s < 0 || connect(s, (struct sockaddr *)&addr, sizeof addr) != 0) {
            perror("reader connect");
            _exit(1);
        }
        fcntl(s, F_SETFL, O_NONBLOCK);
        struct epoll_event e = {.events = EPOLLIN, .data.fd = s};
        epoll_ctl(ep, EPOLL_CTL_ADD, s, &e);
    }
    static char buf[65536];
    struct epoll_event ev[1024];
    for (;;) {
        int k = epoll_wait(ep, ev, 1024, -1);
        for (int i = 0; i < k; i++) {
            ssize_t r = read(ev[i].data.fd, buf, sizeof buf);
            if (r > 0) read_total += r;
        }
    }
}

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 10000;
    int bytes = argc > 2 ? atoi(argv[2]) : 60;
    int rounds = argc > 3 ? atoi(argv[3]) : 100;
    if (n < 1 || bytes < 1 || rounds < 1) {
        fprintf(stderr, "usage: floor [sockets] [bytes] [rounds]\n");
        return 2;
    }
    int ls = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = 0};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof addr;
    if (bind(ls, (struct sockaddr *)&addr, sizeof addr) != 0 || listen(ls, 65535) != 0 ||
        getsockname(ls, (struct sockaddr *)&addr, &len) != 0) {
        perror("listen");
        return 1;
    }
    int report[2];
    if (pipe(report) != 0) return 1;
    pid_t child = fork();
    if (child == 0) reader(addr, n, report[1]);

    pin(0);
    int *fd = malloc(n * sizeof(int));
    int one = 1;
    for (int i = 0; i < n; i++) {
        fd[i] = accept(ls, NULL, NULL);
        if (fd[i] < 0) {
            perror("accept");
            kill(child, SIGKILL);
            return 1;
        }
        setsockopt(fd[i], IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        fcntl(fd[i], F_SETFL, O_NONBLOCK);
    }
    char *msg = malloc(bytes);
    memset(msg, 'x', bytes);
    double u0, s0, u1, s1;
    struct timeval t0, t1;
    long long written = 0, blocked = 0;
    cpu_s(&u0, &s0);
    gettimeofday(&t0, NULL);
    for (int r = 0; r < rounds; r++)
        for (int i = 0; i < n; i++) {
            if (write(fd[i], msg, bytes) == bytes) written++;
            else blocked++;
        }
    gettimeofday(&t1, NULL);
    cpu_s(&u1, &s1);
    usleep(500000); /* let the reader drain */
    kill(child, SIGTERM);
    long long got = 0;
    double ru = 0, rs = 0;
    FILE *f = fdopen(report[0], "r");
    if (!f || fscanf(f, "%lld %lf %lf", &got, &ru, &rs) != 3) fprintf(stderr, "no reader report\n");
    waitpid(child, NULL, 0);
    double wall = (t1.tv_sec - t0.tv_sec) + (t1.tv_usec - t0.tv_usec) / 1e6;
    double w = (u1 - u0) + (s1 - s0);
    printf("sockets %d, %d B per write, %d rounds: %lld writes (%lld would block), %.2f s\n", n, bytes,
           rounds, written, blocked, wall);
    printf("writer: %.2f us CPU per write (user %.2f, system %.2f), %.0f writes/s on one core\n",
           w / written * 1e6, (u1 - u0) / written * 1e6, (s1 - s0) / written * 1e6, written / wall);
    printf("reader: %.2f us CPU per message (whole run, connects included), %lld of %lld bytes read\n",
           (ru + rs) / written * 1e6, got, written * bytes);
    return got == written * bytes ? 0 : 1;
}
