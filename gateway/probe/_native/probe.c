/* The probe state machine: queues reads, keeps fed bytes, runs the table and superblock steps. */
#include <stdio.h>
#include <stdlib.h>
#include "probe_internal.h"

enum phase { PHASE_TABLE = 0, PHASE_FS = 1, PHASE_DONE = 2 };

static const uint8_t empty_bytes[1];

struct probe *probe_new(uint64_t disk_size)
{
    struct probe *p = calloc(1, sizeof(*p));
    if (p == NULL)
        return NULL;
    p->disk_size = disk_size;
    p->phase = PHASE_TABLE;
    p->res.sector_size = 512;
    return p;
}

static void drop_requests(struct probe *p)
{
    for (int i = 0; i < p->nreqs; i++)
        free(p->reqs[i].buf);
    p->nreqs = 0;
}

void probe_free(struct probe *p)
{
    if (p == NULL)
        return;
    drop_requests(p);
    free(p);
}

int probe_fail(struct probe *p, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(p->res.error, sizeof(p->res.error), fmt, ap);
    va_end(ap);
    p->res.status = -1;
    return STEP_ERROR;
}

int probe_add_part(struct probe *p, uint32_t number, uint64_t start, uint64_t size,
                   const char *type, int is_container)
{
    if (p->res.nparts >= PROBE_MAX_PARTS)
        return probe_fail(p, "partition table: more than %d partitions", PROBE_MAX_PARTS);
    struct probe_part *part = &p->res.parts[p->res.nparts++];
    memset(part, 0, sizeof(*part));
    part->number = number;
    part->start = start;
    part->size = size;
    part->is_container = is_container ? 1u : 0u;
    snprintf(part->type, sizeof(part->type), "%s", type);
    return STEP_DONE;
}

static struct pending *queue(struct probe *p, uint64_t offset, uint32_t length, int kind,
                             uint32_t part)
{
    if (p->nreqs >= PROBE_MAX_REQS) {
        probe_fail(p, "probe: more than %d reads needed", PROBE_MAX_REQS);
        return NULL;
    }
    struct pending *r = &p->reqs[p->nreqs++];
    memset(r, 0, sizeof(*r));
    r->offset = offset;
    r->length = length;
    r->kind = kind;
    r->part = part;
    p->res.reads++;
    return r;
}

const uint8_t *probe_want(struct probe *p, uint64_t offset, uint32_t length, uint32_t *got)
{
    *got = 0;
    if (offset >= p->disk_size || length == 0)
        return empty_bytes;
    if (length > p->disk_size - offset)
        length = (uint32_t)(p->disk_size - offset);
    for (int i = 0; i < p->nreqs; i++) {
        struct pending *r = &p->reqs[i];
        if (r->kind != REQ_TABLE)
            continue;
        if (r->offset == offset && !r->fed)
            return NULL;
        if (r->offset == offset && r->length == length) {
            *got = r->got;
            return r->buf ? r->buf : empty_bytes;
        }
        if (r->fed && r->buf && offset >= r->offset && offset - r->offset <= r->got
            && length <= r->got - (offset - r->offset)) {
            *got = length;
            return r->buf + (offset - r->offset);
        }
    }
    if (queue(p, offset, length, REQ_TABLE, 0) == NULL)
        *got = UINT32_MAX; /* signals failure: the result already carries the error */
    return NULL;
}

static void detect_part_fs(struct probe *p, uint32_t index, const uint8_t *buf, uint32_t have)
{
    struct probe_part *part = &p->res.parts[index];
    uint64_t avail = have;
    if (avail > part->size)
        avail = part->size;
    const char *fs = probe_superblock(buf, avail, part->size);
    snprintf(part->fs, sizeof(part->fs), "%s", fs ? fs : "");
}

/* Decide the table from the head read; partitions are listed but not probed yet. */
static int table_step(struct probe *p)
{
    uint32_t have;
    const uint8_t *head = probe_want(p, 0, PROBE_HEAD_LEN, &have);
    if (head == NULL)
        return have == UINT32_MAX ? STEP_ERROR : STEP_PENDING;
    p->res.nparts = 0;
    p->res.table = PROBE_TABLE_NONE;
    p->res.sector_size = 512;
    if (mbr_is_protective(head, have))
        return gpt_step(p, head, have);
    if (mbr_looks_valid(head, have))
        return mbr_step(p, head, have);
    const char *fs = probe_superblock(head, have, p->disk_size);
    snprintf(p->res.whole_fs, sizeof(p->res.whole_fs), "%s", fs ? fs : "");
    return STEP_DONE;
}

/* Queue one superblock window per data partition; windows inside the head are served from it. */
static int start_fs_phase(struct probe *p)
{
    uint32_t head_have = 0;
    uint8_t *head_copy = NULL; /* the head buffer, taken over from its request */
    for (int i = 0; i < p->nreqs; i++) {
        if (p->reqs[i].offset == 0 && p->reqs[i].fed && p->reqs[i].buf && head_copy == NULL) {
            head_copy = p->reqs[i].buf;
            head_have = p->reqs[i].got;
            p->reqs[i].buf = NULL;
        }
    }
    drop_requests(p);
    for (uint32_t i = 0; i < p->res.nparts; i++) {
        struct probe_part *part = &p->res.parts[i];
        if (part->is_container || part->start >= p->disk_size || part->size == 0)
            continue;
        uint64_t len = PROBE_WINDOW_LEN;
        if (len > part->size)
            len = part->size;
        if (len > p->disk_size - part->start)
            len = p->disk_size - part->start;
        if (head_copy != NULL && part->start + len <= head_have) {
            detect_part_fs(p, i, head_copy + part->start, (uint32_t)len);
            continue;
        }
        if (queue(p, part->start, (uint32_t)len, REQ_FS, i) == NULL) {
            free(head_copy);
            return STEP_ERROR;
        }
    }
    free(head_copy);
    return STEP_DONE;
}

static int all_fed(const struct probe *p)
{
    for (int i = 0; i < p->nreqs; i++)
        if (!p->reqs[i].fed)
            return 0;
    return 1;
}

static void finish(struct probe *p)
{
    drop_requests(p);
    p->phase = PHASE_DONE;
}

static void advance(struct probe *p)
{
    while (p->phase != PHASE_DONE && all_fed(p)) {
        if (p->phase == PHASE_TABLE) {
            int rc = table_step(p);
            if (rc == STEP_ERROR) {
                finish(p);
            } else if (rc == STEP_DONE) {
                p->phase = PHASE_FS;
                if (start_fs_phase(p) == STEP_ERROR)
                    finish(p);
            }
        } else {
            finish(p);
        }
    }
}

int probe_next_requests(struct probe *p, struct probe_request *out, int max)
{
    advance(p);
    if (p->phase == PHASE_DONE)
        return 0;
    int n = 0;
    for (int i = 0; i < p->nreqs && n < max; i++) {
        if (p->reqs[i].fed)
            continue;
        out[n].offset = p->reqs[i].offset;
        out[n].length = p->reqs[i].length;
        n++;
    }
    return n;
}

int probe_feed(struct probe *p, uint64_t offset, const uint8_t *data, uint32_t len)
{
    for (int i = 0; i < p->nreqs; i++) {
        struct pending *r = &p->reqs[i];
        if (r->fed || r->offset != offset)
            continue;
        if (len > r->length)
            len = r->length;
        r->fed = 1;
        if (r->kind == REQ_FS) {
            detect_part_fs(p, r->part, data, len);
            return 0;
        }
        r->buf = malloc(len ? len : 1);
        if (r->buf == NULL) {
            probe_fail(p, "probe: out of memory");
            finish(p);
            return -1;
        }
        if (len)
            memcpy(r->buf, data, len);
        r->got = len;
        return 0;
    }
    return -1;
}

void probe_get_result(const struct probe *p, struct probe_result *out)
{
    *out = p->res;
    if (p->phase != PHASE_DONE && out->status == 0) {
        out->status = -1;
        snprintf(out->error, sizeof(out->error), "probe: result requested before the probe finished");
    }
}
