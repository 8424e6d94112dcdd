/* Round-trip client for bench_socket.py: a fixed request, a blocking read of
 * the whole reply, COUNT times, on a unix stream socket.  Written in C so the
 * client costs well under a microsecond per round trip and the server is what
 * gets measured.
 *
 *   rtclient data PATH COUNT WARMUP   TPM2_GetRandom(16) on a data socket
 *   rtclient ctrl PATH COUNT WARMUP   CMD_GET_CAPABILITY on a control socket
 *
 * Prints one line: "count seconds p50_ns p99_ns".  Exit 1 on a bad reply.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

static const unsigned char GETRANDOM16[] = {0x80, 0x01, 0x00, 0x00, 0x00, 0x0c,
                                            0x00, 0x00, 0x01, 0x7b, 0x00, 0x10};
static const unsigned char GETCAP[] = {0x00, 0x00, 0x00, 0x01};

static int read_full(int fd, unsigned char *buf, size_t want) {
    size_t got = 0;
    while (got < want) {
        ssize_t n = read(fd, buf + got, want - got);
        if (n <= 0) {
            if (n < 0 && errno == EINTR)
                continue;
            return -1;
        }
        got += (size_t)n;
    }
    return 0;
}

/* One round trip; 0 when the reply is a success. */
static int round_trip(int fd, int data, unsigned char *buf) {
    const unsigned char *req = data ? GETRANDOM16 : GETCAP;
    size_t len = data ? sizeof GETRANDOM16 : sizeof GETCAP;
    if (write(fd, req, len) != (ssize_t)len)
        return -1;
    if (data) {
        if (read_full(fd, buf, 10) < 0)
            return -1;
        uint32_t size = (uint32_t)buf[2] << 24 | (uint32_t)buf[3] << 16 |
                        (uint32_t)buf[4] << 8 | buf[5];
        if (size < 10 || size > 4096 || read_full(fd, buf + 10, size - 10) < 0)
            return -1;
        return (buf[6] | buf[7] | buf[8] | buf[9]) ? -1 : 0;
    }
    if (read_full(fd, buf, 8) < 0)
        return -1;
    return (buf[0] | buf[1] | buf[2] | buf[3]) ? -1 : 0;
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s data|ctrl PATH COUNT WARMUP\n", argv[0]);
        return 2;
    }
    int data = strcmp(argv[1], "data") == 0;
    long count = strtol(argv[3], NULL, 10), warmup = strtol(argv[4], NULL, 10);
    if ((!data && strcmp(argv[1], "ctrl") != 0) || count < 1 || count > 10000000 ||
        warmup < 0 || warmup > 10000000) {
        fprintf(stderr, "bad arguments\n");
        return 2;
    }
    struct sockaddr_un addr;
    memset(&addr, 0, sizeof addr);
    addr.sun_family = AF_UNIX;
    if (strlen(argv[2]) >= sizeof addr.sun_path) {
        fprintf(stderr, "socket path too long\n");
        return 2;
    }
    strcpy(addr.sun_path, argv[2]);
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        perror("connect");
        return 1;
    }
    uint64_t *lat = malloc((size_t)count * sizeof *lat);
    if (!lat)
        return 1;
    unsigned char buf[4096];
    for (long i = 0; i < warmup; i++) {
        if (round_trip(fd, data, buf) < 0) {
            fprintf(stderr, "bad reply during warm-up\n");
            return 1;
        }
    }
    uint64_t start = now_ns(), prev = start;
    for (long i = 0; i < count; i++) {
        if (round_trip(fd, data, buf) < 0) {
            fprintf(stderr, "bad reply at request %ld\n", i);
            return 1;
        }
        uint64_t t = now_ns();
        lat[i] = t - prev;
        prev = t;
    }
    double secs = (double)(prev - start) / 1e9;
    qsort(lat, (size_t)count, sizeof *lat, cmp_u64);
    printf("%ld %.9f %llu %llu\n", count, secs, (unsigned long long)lat[count / 2],
           (unsigned long long)lat[(count * 99) / 100]);
    close(fd);
    free(lat);
    return 0;
}
