/* Round-trip client for bench_cuse.py: TPM2_GetRandom(16) COUNT times through
 * a CUSE TPM device (write the command, read the response) or through a unix
 * data socket, so the device and the socket frontend are driven by the same
 * loop.  Written in C so the client's own cost stays out of the figures.
 *
 *   rtcuse dev  /dev/vtpm-NAME COUNT WARMUP
 *   rtcuse unix PATH           COUNT WARMUP
 *
 * Prints one line: "count seconds p50_ns p99_ns".  Exit 1 on a bad reply.
 */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>
#include <errno.h>

static const unsigned char CMD[] = {0x80, 0x01, 0x00, 0x00, 0x00, 0x0c,
                                    0x00, 0x00, 0x01, 0x7b, 0x00, 0x10};

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int cmp64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* One round trip; 0 when the TPM answered with success. */
static int round_trip(int fd, unsigned char *buf) {
    if (write(fd, CMD, sizeof CMD) != (ssize_t)sizeof CMD)
        return -1;
    size_t got = 0, want = 10;
    while (got < want) {
        ssize_t n = read(fd, buf + got, 4096 - got);
        if (n <= 0) {
            if (n < 0 && errno == EINTR)
                continue;
            return -1;
        }
        got += (size_t)n;
        if (got >= 6)
            want = ((size_t)buf[2] << 24 | (size_t)buf[3] << 16 | (size_t)buf[4] << 8 | buf[5]);
        if (want < 10 || want > 4096)
            return -1;
    }
    return (buf[6] | buf[7] | buf[8] | buf[9]) ? -1 : 0;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: rtcuse dev|unix PATH COUNT WARMUP\n");
        return 2;
    }
    long count = atol(argv[3]), warmup = atol(argv[4]);
    if (count < 1 || warmup < 0)
        return 2;
    int fd;
    if (strcmp(argv[1], "dev") == 0) {
        fd = open(argv[2], O_RDWR);
    } else {
        struct sockaddr_un sa = {.sun_family = AF_UNIX};
        strncpy(sa.sun_path, argv[2], sizeof sa.sun_path - 1);
        fd = socket(AF_UNIX, SOCK_STREAM, 0);
        if (fd >= 0 && connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
            close(fd);
            fd = -1;
        }
    }
    if (fd < 0) {
        perror(argv[2]);
        return 1;
    }
    unsigned char buf[4096];
    int64_t *lat = malloc(sizeof(int64_t) * (size_t)count);
    if (!lat)
        return 1;
    for (long i = 0; i < warmup; i++)
        if (round_trip(fd, buf)) {
            fprintf(stderr, "bad reply during warm-up\n");
            return 1;
        }
    int64_t start = now_ns();
    for (long i = 0; i < count; i++) {
        int64_t t0 = now_ns();
        if (round_trip(fd, buf)) {
            fprintf(stderr, "bad reply\n");
            return 1;
        }
        lat[i] = now_ns() - t0;
    }
    int64_t total = now_ns() - start;
    qsort(lat, (size_t)count, sizeof lat[0], cmp64);
    printf("%ld %.6f %lld %lld\n", count, total / 1e9, (long long)lat[count / 2],
           (long long)lat[(count * 99) / 100]);
    close(fd);
    return 0;
}
