/*
 * Sans-I/O disk probe: partition tables (MBR with EBR chains, GPT) and filesystem superblocks.
 *
 * The caller owns all I/O. Loop:
 *     p = probe_new(disk_size);
 *     while ((n = probe_next_requests(p, reqs, max)) > 0)
 *         for each request: read it, probe_feed(p, offset, data, got);
 *     probe_get_result(p, &result);   (result.status != 0: result.error holds one line)
 *     probe_free(p);
 * Requests never reach past disk_size. Every value taken from the disk is range-checked.
 */
#ifndef GATEWAY_PROBE_H
#define GATEWAY_PROBE_H

#include <stdint.h>

#define PROBE_MAX_PARTS 256
#define PROBE_TYPE_LEN 40
#define PROBE_FS_LEN 24
#define PROBE_ERROR_LEN 200

enum probe_table { PROBE_TABLE_NONE = 0, PROBE_TABLE_MBR = 1, PROBE_TABLE_GPT = 2 };

struct probe_request {
    uint64_t offset;
    uint32_t length;
};

struct probe_part {
    uint32_t number;           /* Linux numbering: MBR 1-4 primary, 5+ logical; GPT entry index + 1 */
    uint32_t is_container;     /* MBR extended container (0x05, 0x0f, 0x85) */
    uint64_t start;            /* bytes */
    uint64_t size;             /* bytes */
    char type[PROBE_TYPE_LEN]; /* "0x83" or a lowercase GPT type GUID */
    char fs[PROBE_FS_LEN];     /* blkid-style name, "" when nothing was recognised */
};

struct probe_result {
    int status;                /* 0 ok, -1 error (see error) */
    int table;                 /* enum probe_table */
    uint32_t sector_size;
    uint32_t reads;            /* read requests issued */
    uint32_t nparts;
    char whole_fs[PROBE_FS_LEN]; /* filesystem at offset 0 of the disk (only when table == NONE) */
    char error[PROBE_ERROR_LEN];
    struct probe_part parts[PROBE_MAX_PARTS];
};

struct probe;

struct probe *probe_new(uint64_t disk_size);
void probe_free(struct probe *p);
/* Fill up to `max` outstanding requests; 0 when the probe is finished. */
int probe_next_requests(struct probe *p, struct probe_request *out, int max);
/* Supply the bytes of a request (`len` may be short at end of data). 0 ok, -1 unknown request. */
int probe_feed(struct probe *p, uint64_t offset, const uint8_t *data, uint32_t len);
/* Copy the result out; valid once probe_next_requests returned 0. */
void probe_get_result(const struct probe *p, struct probe_result *out);

/* Identify a filesystem/container signature in a window that starts at the volume's offset 0.
 * Returns a blkid-style name or NULL. Exposed for tests and fuzzing. */
const char *probe_superblock(const uint8_t *buf, uint64_t have, uint64_t volume_size);

#endif
