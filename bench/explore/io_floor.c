/*
 * io_floor: the least time any converter needs to read a checkpoint and write a file of a given size on this
 * machine, with no quantization at all (exploration for the GGUF speed target; not run by CI).
 *
 *   cc -O3 -pthread -o /tmp/io_floor bench/explore/io_floor.c
 *   /tmp/io_floor IN OUT OUT_BYTES [mmap|populate|read]
 *
 * Two threads each read half of IN (mmap: load every 32-bit word of a mapping; populate: the same with MAP_POPULATE; read: pread into a 4 MiB buffer and load it), XOR-ing
 * the words, while the main thread writes OUT_BYTES of zeros to OUT with write() in 4 MiB pieces, as ckpt's writer
 * does; OUT is unlinked first. Prints the wall time and the XOR (so the reads are not optimised away). The GGUF
 * Q8_0 file of bench/work's 1.22 GB checkpoint is 327 MB, the Q4_0 one 176 MB.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

enum { piece = 4 << 20 };

struct job { int fd; const unsigned *map; size_t first, count; int use_read; unsigned sum; };

static void *reader(void *arg) {
    struct job *j = arg;
    unsigned sum = 0;  /* XOR of the bit patterns: vectorises, so the reads, not the adds, set the pace */
    if (!j->use_read) {
        for (size_t i = j->first; i < j->first + j->count; i++) sum ^= j->map[i];
    } else {
        unsigned *buffer = malloc(piece);
        for (size_t done = 0; done < j->count * 4;) {
            size_t want = j->count * 4 - done < piece ? j->count * 4 - done : piece;
            ssize_t got = pread(j->fd, buffer, want, (off_t)(j->first * 4 + done));
            if (got <= 0) { perror("pread"); exit(1); }
            for (ssize_t i = 0; i < got / 4; i++) sum ^= buffer[i];
            done += (size_t)got;
        }
        free(buffer);
    }
    j->sum = sum;
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 4) { fprintf(stderr, "usage: io_floor IN OUT OUT_BYTES [mmap|populate|read]\n"); return 2; }
    int use_read = argc > 4 && strcmp(argv[4], "read") == 0;
    int populate = argc > 4 && strcmp(argv[4], "populate") == 0;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    int fd = open(argv[1], O_RDONLY);
    if (fd < 0) { perror(argv[1]); return 1; }
    struct stat st;
    fstat(fd, &st);
    size_t floats = (size_t)st.st_size / 4;
    const unsigned *map = use_read ? NULL : mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE | (populate ? MAP_POPULATE : 0), fd, 0);
    if (map == MAP_FAILED) { perror("mmap"); return 1; }
    struct job jobs[2] = {{fd, map, 0, floats / 2, use_read, 0}, {fd, map, floats / 2, floats - floats / 2, use_read, 0}};
    pthread_t threads[2];
    for (int k = 0; k < 2; k++) pthread_create(&threads[k], NULL, reader, &jobs[k]);
    unlink(argv[2]);
    int out = open(argv[2], O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (out < 0) { perror(argv[2]); return 1; }
    char *zeros = calloc(1, piece);
    for (long long left = atoll(argv[3]); left > 0;) {
        ssize_t wrote = write(out, zeros, left < piece ? (size_t)left : piece);
        if (wrote <= 0) { perror("write"); return 1; }
        left -= wrote;
    }
    close(out);
    for (int k = 0; k < 2; k++) pthread_join(threads[k], NULL);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    printf("%.3f s (xor %08x)\n", (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9, jobs[0].sum ^ jobs[1].sum);
    return 0;
}
