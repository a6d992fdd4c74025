/* Shared state of the sans-I/O probe; private to the C core. */
#ifndef GATEWAY_PROBE_INTERNAL_H
#define GATEWAY_PROBE_INTERNAL_H

#include <stdarg.h>
#include "bytes.h"
#include "probe.h"

/* First read: MBR, both GPT header positions, a 128-entry array and every superblock position
 * of a whole-disk filesystem (btrfs sits at 64 KiB, swap may end a 64 KiB page). */
#define PROBE_HEAD_LEN 0x11000u
/* Superblock window read at the start of each partition. */
#define PROBE_WINDOW_LEN 0x11000u
#define PROBE_MAX_REQS 320
#define PROBE_MAX_EBR 128
#define PROBE_GPT_MAX_ARRAY (1u << 20)

enum step { STEP_DONE = 0, STEP_PENDING = 1, STEP_ERROR = -1 };
enum req_kind { REQ_TABLE = 0, REQ_FS = 1 };

struct pending {
    uint64_t offset;
    uint32_t length;
    uint32_t got;
    uint8_t *buf;
    int fed;
    int kind;
    uint32_t part;
};

struct probe {
    uint64_t disk_size;
    int phase;
    int nreqs;
    struct pending reqs[PROBE_MAX_REQS];
    struct probe_result res;
};

/* The bytes [offset, offset+length) clipped to the disk, if already fed; otherwise queues a read
 * and returns NULL. *got receives how many bytes are available (short at end of disk). */
const uint8_t *probe_want(struct probe *p, uint64_t offset, uint32_t length, uint32_t *got);
int probe_fail(struct probe *p, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
int probe_add_part(struct probe *p, uint32_t number, uint64_t start, uint64_t size,
                   const char *type, int is_container);

/* Fetch a range inside a step function, returning from it while the bytes are not there yet. */
#define PROBE_WANT(p, ptr, offset, length, got)                                   \
    do {                                                                          \
        (ptr) = probe_want((p), (offset), (length), &(got));                      \
        if ((ptr) == NULL)                                                        \
            return (got) == UINT32_MAX ? STEP_ERROR : STEP_PENDING;               \
    } while (0)

/* Partition tables: STEP_DONE when decided (res.table set), STEP_PENDING, or STEP_ERROR. */
int mbr_is_protective(const uint8_t *sector, uint32_t have);
int mbr_looks_valid(const uint8_t *sector, uint32_t have);
int mbr_step(struct probe *p, const uint8_t *head, uint32_t have);
int gpt_step(struct probe *p, const uint8_t *head, uint32_t have);

uint32_t crc32_le(const uint8_t *buf, size_t len);
int vfat_boot_sector(const uint8_t *buf, uint64_t have);

#endif
