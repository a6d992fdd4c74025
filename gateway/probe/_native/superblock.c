/* Filesystem and container signatures, named the way blkid names them. */
#include "probe_internal.h"

/* ext feature bits (see the ext2/3/4 on-disk format) */
#define EXT_COMPAT_HAS_JOURNAL 0x0004u
#define EXT_INCOMPAT_JOURNAL_DEV 0x0008u
#define EXT_FLAGS_TEST_FILESYS 0x0004u
/* Journal location fields of the ext superblock (offsets from its start) */
#define EXT_SB_JOURNAL_UUID 0xD0u /* 16 bytes: UUID of an external journal device */
#define EXT_SB_JOURNAL_INUM 0xE0u /* inode of an internal journal, 0 for an external one */
#define EXT_SB_JOURNAL_DEV 0xE4u  /* device number of an external journal */
/* Features the ext2 and ext3 drivers understand; anything else makes it ext4 (libblkid rule). */
#define EXT2_RO_COMPAT_KNOWN 0x0007u  /* sparse_super, large_file, btree_dir */
#define EXT2_INCOMPAT_KNOWN 0x0012u   /* filetype, meta_bg */
#define EXT3_RO_COMPAT_KNOWN 0x0007u
#define EXT3_INCOMPAT_KNOWN 0x0016u   /* filetype, recover, meta_bg */

/* A journal outside the filesystem: mounting it makes the host kernel open the host block device
 * that s_journal_dev names and replay it. An internal journal has an inode and neither a device
 * number nor a journal UUID; anything else counts as external. */
static int ext_journal_is_external(const uint8_t *sb)
{
    static const uint8_t no_uuid[16];
    return get_le32(sb + EXT_SB_JOURNAL_INUM) == 0 || get_le32(sb + EXT_SB_JOURNAL_DEV) != 0
           || memcmp(sb + EXT_SB_JOURNAL_UUID, no_uuid, sizeof(no_uuid)) != 0;
}

/* ext2/3/4 by the libblkid rules; a journalled one whose journal lives elsewhere is reported as
 * "ext3-external-journal" / "ext4-external-journal", which no rootfs rule mounts. */
static const char *ext_kind(const uint8_t *buf, uint64_t have)
{
    const size_t sb = 1024;
    if (!span_ok(have, sb, 1024) || get_le16(buf + sb + 0x38) != 0xEF53)
        return NULL;
    uint32_t compat = get_le32(buf + sb + 0x5C);
    uint32_t incompat = get_le32(buf + sb + 0x60);
    uint32_t ro_compat = get_le32(buf + sb + 0x64);
    uint32_t flags = get_le32(buf + sb + 0x160);
    if (incompat & EXT_INCOMPAT_JOURNAL_DEV)
        return "jbd";
    int external = (compat & EXT_COMPAT_HAS_JOURNAL) && ext_journal_is_external(buf + sb);
    int beyond_ext3 = (ro_compat & ~EXT3_RO_COMPAT_KNOWN) || (incompat & ~EXT3_INCOMPAT_KNOWN);
    if (beyond_ext3) {
        if (flags & EXT_FLAGS_TEST_FILESYS)
            return "ext4dev"; /* never mounted either way */
        return external ? "ext4-external-journal" : "ext4";
    }
    if (compat & EXT_COMPAT_HAS_JOURNAL)
        return external ? "ext3-external-journal" : "ext3";
    if ((ro_compat & ~EXT2_RO_COMPAT_KNOWN) || (incompat & ~EXT2_INCOMPAT_KNOWN))
        return NULL; /* not reachable: ext2 knows a subset of ext3's incompat set minus recover */
    return "ext2";
}

static const char *xfs_kind(const uint8_t *buf, uint64_t have)
{
    if (!has_bytes(buf, have, 0, "XFSB", 4) || !span_ok(have, 0, 512))
        return NULL;
    uint32_t blocksize = ((uint32_t)get_be16(buf + 4) << 16) | get_be16(buf + 6);
    uint16_t sectsize = get_be16(buf + 102);
    if (!is_pow2(blocksize) || blocksize < 512 || blocksize > 65536)
        return NULL;
    if (!is_pow2(sectsize) || sectsize < 512 || sectsize > 32768)
        return NULL;
    return "xfs";
}

int vfat_boot_sector(const uint8_t *buf, uint64_t have)
{
    if (!span_ok(have, 0, 512))
        return 0;
    if (!(buf[0] == 0xE9 || (buf[0] == 0xEB && buf[2] == 0x90)))
        return 0;
    int magic = has_bytes(buf, have, 0x52, "FAT32   ", 8) || has_bytes(buf, have, 0x36, "FAT16   ", 8)
                || has_bytes(buf, have, 0x36, "FAT12   ", 8) || has_bytes(buf, have, 0x36, "FAT     ", 8)
                || has_bytes(buf, have, 0x36, "MSDOS", 5) || has_bytes(buf, have, 0x52, "MSWIN", 5);
    if (!magic)
        return 0;
    uint16_t sector_size = get_le16(buf + 11);
    uint8_t cluster = buf[13];
    uint16_t reserved = get_le16(buf + 14);
    uint8_t fats = buf[16];
    uint8_t media = buf[21];
    if (!is_pow2(sector_size) || sector_size < 512 || sector_size > 4096)
        return 0;
    if (!is_pow2(cluster) || reserved == 0 || fats == 0 || fats > 4)
        return 0;
    if (media != 0xF0 && media < 0xF8)
        return 0;
    return 1;
}

static const char *swap_kind(const uint8_t *buf, uint64_t have)
{
    for (uint64_t page = 4096; page <= 65536; page *= 2) {
        if (has_bytes(buf, have, page - 10, "SWAPSPACE2", 10)
            || has_bytes(buf, have, page - 10, "SWAP-SPACE", 10))
            return "swap";
    }
    return NULL;
}

static int is_luks(const uint8_t *buf, uint64_t have)
{
    if (!has_bytes(buf, have, 0, "LUKS\xba\xbe", 6) || !span_ok(have, 6, 2))
        return 0;
    uint16_t version = get_be16(buf + 6);
    return version == 1 || version == 2;
}

static int is_lvm2(const uint8_t *buf, uint64_t have)
{
    for (size_t sector = 0; sector < 4; sector++) {
        size_t off = sector * 512;
        if (has_bytes(buf, have, off, "LABELONE", 8) && has_bytes(buf, have, off + 24, "LVM2 001", 8))
            return 1;
    }
    return 0;
}

static const char *squashfs_kind(const uint8_t *buf, uint64_t have)
{
    if (!has_bytes(buf, have, 0, "hsqs", 4) || !span_ok(have, 0, 96))
        return NULL;
    return get_le16(buf + 28) >= 4 ? "squashfs" : "squashfs3";
}

const char *probe_superblock(const uint8_t *buf, uint64_t have, uint64_t volume_size)
{
    const char *kind;
    if (have > volume_size)
        have = volume_size;
    if (buf == NULL || have == 0)
        return NULL;
    if (is_luks(buf, have))
        return "crypto_LUKS";
    if (is_lvm2(buf, have))
        return "LVM2_member";
    if ((kind = xfs_kind(buf, have)) != NULL)
        return kind;
    if ((kind = ext_kind(buf, have)) != NULL)
        return kind;
    if (has_bytes(buf, have, 0x10040, "_BHRfS_M", 8))
        return "btrfs";
    if ((kind = squashfs_kind(buf, have)) != NULL)
        return kind;
    if (vfat_boot_sector(buf, have))
        return "vfat";
    return swap_kind(buf, have);
}
