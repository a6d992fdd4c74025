"""The native probe (gateway.probe._native._probe), built with cffi in out-of-line API mode.

`python build_native.py` (make native) compiles it in place for a checkout; setup.py hands
`ffibuilder` to setuptools, so pip install, pip wheel and sdist builds compile the same module.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from cffi import FFI

ROOT = Path(__file__).resolve().parent
NATIVE = ROOT / "gateway" / "probe" / "_native"
SOURCES = ("probe.c", "mbr.c", "gpt.c", "superblock.c", "crc32.c")
BUILD = ROOT / "build" / "native"

CDEF = """
#define PROBE_MAX_PARTS 256
#define PROBE_TYPE_LEN 40
#define PROBE_FS_LEN 24
#define PROBE_ERROR_LEN 200
struct probe_request { uint64_t offset; uint32_t length; };
struct probe_part {
    uint32_t number; uint32_t is_container; uint64_t start; uint64_t size;
    char type[40]; char fs[24];
};
struct probe_result {
    int status; int table; uint32_t sector_size; uint32_t reads; uint32_t nparts;
    char whole_fs[24]; char error[200]; struct probe_part parts[256];
};
struct probe;
struct probe *probe_new(uint64_t disk_size);
void probe_free(struct probe *p);
int probe_next_requests(struct probe *p, struct probe_request *out, int max);
int probe_feed(struct probe *p, uint64_t offset, const uint8_t *data, uint32_t len);
void probe_get_result(const struct probe *p, struct probe_result *out);
const char *probe_superblock(const uint8_t *buf, uint64_t have, uint64_t volume_size);
"""


def make_ffi(relative: bool = False) -> FFI:
    """The one definition of the native module. `relative`: source paths relative to the project
    root, as setuptools wants them when it builds a wheel or an sdist (`ffibuilder` below)."""
    native = NATIVE.relative_to(ROOT) if relative else NATIVE
    ffi = FFI()
    ffi.cdef(CDEF)
    ffi.set_source(
        "gateway.probe._native._probe",
        '#include "probe.h"',
        sources=[str(native / name) for name in SOURCES],
        include_dirs=[str(native)],
        extra_compile_args=["-O2", "-std=c11", "-D_DEFAULT_SOURCE", "-Wall", "-Wextra"],
    )
    return ffi


# What setup.py's `cffi_modules=["build_native.py:ffibuilder"]` builds (pip install, pip wheel,
# python -m build): the same definition as `make native`, which compiles in place.
ffibuilder = make_ffi(relative=True)


def main() -> int:
    BUILD.mkdir(parents=True, exist_ok=True)
    built = Path(make_ffi().compile(tmpdir=str(BUILD), verbose=False))
    target = NATIVE / built.name
    for old in NATIVE.glob("_probe*.so"):
        if old != target:
            old.unlink()
    shutil.copy2(built, target)
    print(f"built {target.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
