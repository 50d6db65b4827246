/*
 * The CPU one replication round trip costs on this machine, at the least: a SIZE-byte
 * message (default 4 KiB) over loopback TCP to another process and an 8-byte answer back, with
 * DEPTH messages in flight (as a replicated write at that queue depth adds one to
 * the primary's stream and one acknowledgement back), in plain C with blocking
 * sockets and TCP_NODELAY, so nothing of Bulwark's is in it.
 *
 * Prints the CPU seconds (user + system, both processes, from getrusage) per 1000
 * round trips. scripts/bench-replication compares it with the CPU of a single-copy
 * write: on a machine whose cores are busy, replicated / single cannot exceed
 * single / (single + this).
 *
 * Usage: loopback-cost COUNT DEPTH [SIZE]
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#define ANSWER 8

static void die(const char *what)
{
    perror(what);
    exit(1);
}

static void read_full(int fd, char *buf, size_t len)
{
    size_t got = 0;
    while (got < len) {
        ssize_t n = read(fd, buf + got, len - got);
        if (n <= 0)
            die("read");
        got += (size_t)n;
    }
}

static void write_full(int fd, const char *buf, size_t len)
{
    size_t put = 0;
    while (put < len) {
        ssize_t n = write(fd, buf + put, len - put);
        if (n <= 0)
            die("write");
        put += (size_t)n;
    }
}

static double cpu_seconds(int who)
{
    struct rusage u;
    if (getrusage(who, &u) != 0)
        die("getrusage");
    return u.ru_utime.tv_sec + u.ru_utime.tv_usec / 1e6 + u.ru_stime.tv_sec +
           u.ru_stime.tv_usec / 1e6;
}

int main(int argc, char **argv)
{
    if (argc != 3 && argc != 4) {
        fprintf(stderr, "usage: loopback-cost COUNT DEPTH [SIZE]\n");
        return 2;
    }
    long count = atol(argv[1]);
    long depth = atol(argv[2]);
    long size = argc == 4 ? atol(argv[3]) : 4096;
    if (count < 1 || depth < 1 || depth > count || size < 1 || size > (64L << 20)) {
        fprintf(stderr, "COUNT and DEPTH must be positive, DEPTH at most COUNT, SIZE 1 to 64 MiB\n");
        return 2;
    }
    size_t MSG = (size_t)size;
    char *buf = malloc(MSG);
    if (!buf)
        die("malloc");
    memset(buf, 'x', MSG);
    int one = 1;
    int srv = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = 0 };
    inet_pton(AF_INET, "127.0.0.2", &a.sin_addr);
    socklen_t alen = sizeof a;
    if (srv < 0 || bind(srv, (struct sockaddr *)&a, sizeof a) != 0 || listen(srv, 1) != 0 ||
        getsockname(srv, (struct sockaddr *)&a, &alen) != 0)
        die("listen on 127.0.0.2");
    pid_t child = fork();
    if (child < 0)
        die("fork");
    if (child == 0) {
        /* The replica: take each message whole, answer it. */
        int c = accept(srv, NULL, NULL);
        if (c < 0)
            die("accept");
        setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        char ack[ANSWER] = { 0 };
        for (long i = 0; i < count; i++) {
            read_full(c, buf, MSG);
            write_full(c, ack, ANSWER);
        }
        return 0;
    }
    close(srv);
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (s < 0 || connect(s, (struct sockaddr *)&a, sizeof a) != 0)
        die("connect");
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    char *msg = buf, ack[ANSWER];
    double before = cpu_seconds(RUSAGE_SELF);
    long sent = 0;
    for (; sent < depth; sent++)
        write_full(s, msg, MSG);
    for (long done = 0; done < count; done++) {
        read_full(s, ack, ANSWER);
        if (sent < count) {
            write_full(s, msg, MSG);
            sent++;
        }
    }
    double mine = cpu_seconds(RUSAGE_SELF) - before;
    int status;
    if (waitpid(child, &status, 0) != child || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        fprintf(stderr, "the answering process failed\n");
        return 1;
    }
    /* The child's CPU includes its accept and setup: negligible against COUNT. */
    double theirs = cpu_seconds(RUSAGE_CHILDREN);
    printf("%.4f\n", (mine + theirs) / (double)count * 1000.0);
    return 0;
}
