/* Test driver for the native probe under ASan/UBSan: probes each image file given on the command
 * line with pread, prints one line per image. Also probes every prefix-truncated view of each
 * image's head so short disks are exercised. Exit status 0 unless an I/O error occurs. */
#ifndef _DEFAULT_SOURCE
#define _DEFAULT_SOURCE
#endif
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include "probe.h"

static int run_fd(int fd, uint64_t size, const char *name)
{
    struct probe *p = probe_new(size);
    struct probe_request reqs[64];
    struct probe_result *res = malloc(sizeof(*res));
    int n;
    if (p == NULL || res == NULL)
        return 1;
    while ((n = probe_next_requests(p, reqs, 64)) > 0) {
        for (int i = 0; i < n; i++) {
            uint8_t *buf = malloc(reqs[i].length ? reqs[i].length : 1);
            if (buf == NULL)
                return 1;
            ssize_t got = pread(fd, buf, reqs[i].length, (off_t)reqs[i].offset);
            if (got < 0) {
                perror(name);
                return 1;
            }
            probe_feed(p, reqs[i].offset, buf, (uint32_t)got);
            free(buf);
        }
    }
    probe_get_result(p, res);
    printf("%s: status=%d table=%d ss=%u parts=%u reads=%u fs=%s %s\n", name, res->status,
           res->table, res->sector_size, res->nparts, res->reads, res->whole_fs, res->error);
    probe_free(p);
    free(res);
    return 0;
}

int main(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        int fd = open(argv[i], O_RDONLY);
        struct stat st;
        if (fd < 0 || fstat(fd, &st) != 0) {
            perror(argv[i]);
            return 1;
        }
        if (run_fd(fd, (uint64_t)st.st_size, argv[i]))
            return 1;
        /* the same bytes as smaller disks: every table and superblock read gets clipped */
        static const uint64_t cuts[] = { 0, 1, 511, 512, 1024, 4096, 4097, 20000, 69632 };
        for (size_t c = 0; c < sizeof(cuts) / sizeof(cuts[0]); c++)
            if (cuts[c] < (uint64_t)st.st_size && run_fd(fd, cuts[c], argv[i]))
                return 1;
        close(fd);
    }
    return 0;
}
