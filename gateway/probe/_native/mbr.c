/* MBR partition table: four primary slots plus the EBR chain of an extended container. */
#include <stdio.h>
#include "probe_internal.h"

#define MBR_TABLE_OFFSET 446u
#define MBR_ENTRY_SIZE 16u
#define SECTOR 512u

struct mbr_entry {
    uint8_t boot;
    uint8_t type;
    uint32_t start; /* LBA */
    uint32_t count; /* sectors */
};

static struct mbr_entry read_entry(const uint8_t *sector, unsigned slot)
{
    const uint8_t *e = sector + MBR_TABLE_OFFSET + slot * MBR_ENTRY_SIZE;
    struct mbr_entry out = { e[0], e[4], get_le32(e + 8), get_le32(e + 12) };
    return out;
}

static int has_signature(const uint8_t *sector, uint32_t have)
{
    return have >= SECTOR && sector[510] == 0x55 && sector[511] == 0xAA;
}

static int is_extended(uint8_t type) { return type == 0x05 || type == 0x0f || type == 0x85; }

static int is_used(const struct mbr_entry *e) { return e->type != 0 && e->count != 0; }

int mbr_is_protective(const uint8_t *sector, uint32_t have)
{
    if (!has_signature(sector, have))
        return 0;
    for (unsigned i = 0; i < 4; i++)
        if (read_entry(sector, i).type == 0xEE)
            return 1;
    return 0;
}

int mbr_looks_valid(const uint8_t *sector, uint32_t have)
{
    if (!has_signature(sector, have))
        return 0;
    int used = 0;
    for (unsigned i = 0; i < 4; i++) {
        struct mbr_entry e = read_entry(sector, i);
        if (e.boot != 0 && e.boot != 0x80)
            return 0;
        used |= is_used(&e);
    }
    /* A FAT boot sector ends in 0x55AA too; an empty table is no table either. */
    if (vfat_boot_sector(sector, have))
        return 0;
    return used;
}

static void type_name(char *out, size_t len, uint8_t type)
{
    snprintf(out, len, "0x%02x", type);
}

static int walk_ebr_chain(struct probe *p, uint64_t ext_start, uint64_t ext_sectors)
{
    uint64_t visited[PROBE_MAX_EBR];
    unsigned hops = 0;
    uint32_t number = 5;
    uint64_t ebr = ext_start;
    uint64_t disk_sectors = p->disk_size / SECTOR;
    (void)ext_sectors;
    for (;;) {
        if (ebr >= disk_sectors)
            return STEP_DONE;
        for (unsigned i = 0; i < hops; i++)
            if (visited[i] == ebr)
                return probe_fail(p, "MBR: EBR chain loops back to sector %llu",
                                  (unsigned long long)ebr);
        if (hops >= PROBE_MAX_EBR)
            return probe_fail(p, "MBR: EBR chain longer than %d links", PROBE_MAX_EBR);
        visited[hops++] = ebr;
        uint32_t got;
        const uint8_t *sector;
        PROBE_WANT(p, sector, ebr * SECTOR, SECTOR, got);
        if (!has_signature(sector, got))
            return STEP_DONE;
        struct mbr_entry data = read_entry(sector, 0);
        struct mbr_entry link = read_entry(sector, 1);
        if (is_used(&data) && !is_extended(data.type)) {
            char type[PROBE_TYPE_LEN];
            type_name(type, sizeof(type), data.type);
            uint64_t start = (ebr + data.start) * SECTOR; /* < 2^33 * 2^9: no overflow */
            if (probe_add_part(p, number++, start, (uint64_t)data.count * SECTOR, type, 0))
                return STEP_ERROR;
        }
        if (!is_extended(link.type) || link.start == 0)
            return STEP_DONE;
        ebr = ext_start + link.start;
    }
}

int mbr_step(struct probe *p, const uint8_t *head, uint32_t have)
{
    int ext_slot = -1;
    p->res.table = PROBE_TABLE_MBR;
    p->res.sector_size = SECTOR;
    for (unsigned i = 0; i < 4; i++) {
        struct mbr_entry e = read_entry(head, i);
        if (!is_used(&e))
            continue;
        char type[PROBE_TYPE_LEN];
        type_name(type, sizeof(type), e.type);
        int container = is_extended(e.type);
        if (container && ext_slot < 0)
            ext_slot = (int)i;
        if (probe_add_part(p, i + 1, (uint64_t)e.start * SECTOR, (uint64_t)e.count * SECTOR, type,
                           container))
            return STEP_ERROR;
    }
    (void)have;
    if (ext_slot < 0)
        return STEP_DONE;
    struct mbr_entry ext = read_entry(head, (unsigned)ext_slot);
    return walk_ebr_chain(p, ext.start, ext.count);
}
