/* libFuzzer target: the input is a disk image (its bytes, then zeros up to a size taken from the
 * input's first byte so backup-GPT and far-away reads are exercised too). */
#include <stdlib.h>
#include <string.h>
#include "probe.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    uint64_t disk = size;
    if (size > 0 && (data[0] & 1))
        disk = (uint64_t)size + ((uint64_t)data[size - 1] << 12);
    struct probe *p = probe_new(disk);
    struct probe_request reqs[32];
    int n;
    if (p == NULL)
        return 0;
    while ((n = probe_next_requests(p, reqs, 32)) > 0) {
        for (int i = 0; i < n; i++) {
            uint8_t *buf = calloc(1, reqs[i].length ? reqs[i].length : 1);
            if (buf == NULL)
                abort();
            if (reqs[i].offset < size) {
                size_t avail = size - (size_t)reqs[i].offset;
                memcpy(buf, data + reqs[i].offset, avail < reqs[i].length ? avail : reqs[i].length);
            }
            probe_feed(p, reqs[i].offset, buf, reqs[i].length);
            free(buf);
        }
    }
    struct probe_result *res = malloc(sizeof(*res));
    if (res != NULL) {
        probe_get_result(p, res);
        if (res->status == 0 && res->nparts > PROBE_MAX_PARTS)
            abort();
        free(res);
    }
    probe_free(p);
    probe_superblock(data, size, size);
    return 0;
}
