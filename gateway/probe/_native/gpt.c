/* GPT: primary header at LBA 1 (512- or 4096-byte sectors), backup at the last LBA. */
#include <stdio.h>
#include "probe_internal.h"

#define GPT_SIGNATURE "EFI PART"
#define GPT_MIN_HEADER 92u

struct gpt_header {
    uint64_t my_lba;
    uint64_t entries_lba;
    uint32_t num_entries;
    uint32_t entry_size;
    uint32_t entries_crc;
};

enum header_check { HEADER_OK = 0, HEADER_BAD = 1, HEADER_ABSURD = 2 };

/* Validate signature, size, CRC and position; absurd entry arrays are reported separately. */
static int parse_header(const uint8_t *buf, uint32_t have, uint32_t ss, uint64_t want_lba,
                        struct gpt_header *out)
{
    if (!has_bytes(buf, have, 0, GPT_SIGNATURE, 8) || have < GPT_MIN_HEADER)
        return HEADER_BAD; /* every field below lies in the first 92 bytes */
    uint32_t hsize = get_le32(buf + 12);
    if (hsize < GPT_MIN_HEADER || hsize > ss || hsize > have)
        return HEADER_BAD;
    uint8_t copy[4096];
    memcpy(copy, buf, hsize);
    memset(copy + 16, 0, 4);
    if (crc32_le(copy, hsize) != get_le32(buf + 16))
        return HEADER_BAD;
    out->my_lba = get_le64(buf + 24);
    if (out->my_lba != want_lba)
        return HEADER_BAD;
    out->entries_lba = get_le64(buf + 72);
    out->num_entries = get_le32(buf + 80);
    out->entry_size = get_le32(buf + 84);
    out->entries_crc = get_le32(buf + 88);
    if (out->entry_size < 128 || out->entry_size > 4096 || out->entry_size % 8 != 0)
        return HEADER_ABSURD;
    if ((uint64_t)out->num_entries * out->entry_size > PROBE_GPT_MAX_ARRAY)
        return HEADER_ABSURD;
    return HEADER_OK;
}

static void guid_string(char *out, size_t len, const uint8_t *g)
{
    snprintf(out, len,
             "%08x-%04x-%04x-%02x%02x-%02x%02x%02x%02x%02x%02x",
             get_le32(g), get_le16(g + 4), get_le16(g + 6), g[8], g[9], g[10], g[11], g[12], g[13],
             g[14], g[15]);
}

static int is_zero(const uint8_t *b, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (b[i])
            return 0;
    return 1;
}

static int list_entries(struct probe *p, const struct gpt_header *h, const uint8_t *array,
                        uint32_t ss)
{
    p->res.nparts = 0;
    for (uint32_t i = 0; i < h->num_entries; i++) {
        const uint8_t *e = array + (size_t)i * h->entry_size;
        if (is_zero(e, 16))
            continue;
        uint64_t first = get_le64(e + 32);
        uint64_t last = get_le64(e + 40);
        uint64_t start, count, size;
        if (last < first)
            return probe_fail(p, "GPT: entry %u ends before it starts", i + 1);
        count = last - first + 1;
        if (count == 0 || __builtin_mul_overflow(first, (uint64_t)ss, &start)
            || __builtin_mul_overflow(count, (uint64_t)ss, &size))
            return probe_fail(p, "GPT: entry %u has an extent beyond 2^64 bytes", i + 1);
        char type[PROBE_TYPE_LEN];
        guid_string(type, sizeof(type), e);
        if (probe_add_part(p, i + 1, start, size, type, 0))
            return STEP_ERROR;
    }
    p->res.table = PROBE_TABLE_GPT;
    p->res.sector_size = ss;
    return STEP_DONE;
}

/* Result of trying one header: STEP_DONE (table listed), STEP_PENDING, STEP_ERROR, or 2 (bad). */
#define TRY_BAD 2

static int try_header(struct probe *p, const uint8_t *hbuf, uint32_t hhave, uint32_t ss,
                      uint64_t lba)
{
    struct gpt_header h;
    int rc = parse_header(hbuf, hhave, ss, lba, &h);
    if (rc == HEADER_BAD)
        return TRY_BAD;
    if (rc == HEADER_ABSURD)
        return probe_fail(p, "GPT: refusing an entry array of %u entries of %u bytes",
                          h.num_entries, h.entry_size);
    uint64_t off;
    uint32_t len = h.num_entries * h.entry_size; /* <= 1 MiB, checked above */
    if (__builtin_mul_overflow(h.entries_lba, (uint64_t)ss, &off) || off >= p->disk_size
        || len > p->disk_size - off)
        return TRY_BAD;
    uint32_t got;
    const uint8_t *array;
    PROBE_WANT(p, array, off, len, got);
    if (got < len || crc32_le(array, len) != h.entries_crc)
        return TRY_BAD;
    return list_entries(p, &h, array, ss);
}

int gpt_step(struct probe *p, const uint8_t *head, uint32_t have)
{
    static const uint32_t sizes[2] = { 512, 4096 };
    int rc;
    int seen[2] = { 0, 0 };
    for (int i = 0; i < 2; i++) {
        uint32_t ss = sizes[i];
        if (!has_bytes(head, have, ss, GPT_SIGNATURE, 8))
            continue;
        seen[i] = 1;
        rc = try_header(p, head + ss, have - ss, ss, 1);
        if (rc != TRY_BAD)
            return rc;
    }
    /* Primary unusable: the backup header sits in the last LBA. Unknown sector size: try both. */
    int any = seen[0] || seen[1];
    const uint8_t *bufs[2] = { NULL, NULL };
    uint32_t gots[2] = { 0, 0 };
    int pending = 0;
    for (int i = 0; i < 2; i++) {
        if (any && !seen[i])
            continue;
        uint64_t last = p->disk_size / sizes[i];
        if (last < 2)
            continue;
        last -= 1;
        bufs[i] = probe_want(p, last * sizes[i], sizes[i], &gots[i]);
        if (bufs[i] == NULL) {
            if (gots[i] == UINT32_MAX)
                return STEP_ERROR;
            pending = 1;
        }
    }
    if (pending)
        return STEP_PENDING;
    for (int i = 0; i < 2; i++) {
        if (bufs[i] == NULL)
            continue;
        rc = try_header(p, bufs[i], gots[i], sizes[i], p->disk_size / sizes[i] - 1);
        if (rc != TRY_BAD)
            return rc;
    }
    return probe_fail(p, "GPT: protective MBR present but neither the primary nor the backup "
                         "header is valid");
}
