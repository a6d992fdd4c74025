/* Little helpers for reading on-disk integers without alignment or bounds surprises. */
#ifndef GATEWAY_PROBE_BYTES_H
#define GATEWAY_PROBE_BYTES_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

static inline uint16_t get_le16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static inline uint16_t get_be16(const uint8_t *p) { return (uint16_t)((p[0] << 8) | p[1]); }

static inline uint32_t get_le32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static inline uint64_t get_le64(const uint8_t *p)
{
    return (uint64_t)get_le32(p) | ((uint64_t)get_le32(p + 4) << 32);
}

/* True when [off, off+len) lies inside a buffer of `have` bytes (no overflow). */
static inline int span_ok(size_t have, size_t off, size_t len)
{
    return off <= have && len <= have - off;
}

/* Compare `len` bytes at `off` with `magic`, bounds-checked. */
static inline int has_bytes(const uint8_t *buf, size_t have, size_t off, const char *magic, size_t len)
{
    return span_ok(have, off, len) && memcmp(buf + off, magic, len) == 0;
}

static inline int is_pow2(uint64_t v) { return v != 0 && (v & (v - 1)) == 0; }

#endif
