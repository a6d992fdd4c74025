/* CRC-32 (IEEE 802.3, reflected 0xEDB88320) as used by GPT, slicing-by-8. The tables are filled
 * once when the library loads (constructor), so there is no lazy-init race. */
#include "probe_internal.h"

static uint32_t tables[8][256];

__attribute__((constructor)) static void crc32_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c >> 1) ^ ((c & 1u) ? 0xEDB88320u : 0u);
        tables[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            tables[t][i] = (tables[t - 1][i] >> 8) ^ tables[0][tables[t - 1][i] & 0xffu];
}

uint32_t crc32_le(const uint8_t *buf, size_t len)
{
    uint32_t crc = 0xffffffffu;
    size_t i = 0;
    for (; len - i >= 8; i += 8) {
        uint32_t lo = crc ^ get_le32(buf + i);
        uint32_t hi = get_le32(buf + i + 4);
        crc = tables[7][lo & 0xffu] ^ tables[6][(lo >> 8) & 0xffu] ^ tables[5][(lo >> 16) & 0xffu]
              ^ tables[4][lo >> 24] ^ tables[3][hi & 0xffu] ^ tables[2][(hi >> 8) & 0xffu]
              ^ tables[1][(hi >> 16) & 0xffu] ^ tables[0][hi >> 24];
    }
    for (; i < len; i++)
        crc = (crc >> 8) ^ tables[0][(crc ^ buf[i]) & 0xffu];
    return crc ^ 0xffffffffu;
}
