"""The C core under AddressSanitizer/UndefinedBehaviorSanitizer, plus a bounded libFuzzer run."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from gateway.testing.probe_images import Case, first_bytes, session_cases

ROOT = Path(__file__).resolve().parent.parent
NATIVE = ROOT / "gateway" / "probe" / "_native"
FUZZ = ROOT / "tests" / "fuzz"
CORE = [NATIVE / n for n in ("probe.c", "mbr.c", "gpt.c", "superblock.c", "crc32.c")]
FUZZ_SECONDS = int(os.environ.get("PROBE_FUZZ_SECONDS", "20"))
SAN_ENV = {
    **os.environ,
    "ASAN_OPTIONS": "abort_on_error=1:detect_leaks=1",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
}

pytestmark = pytest.mark.skipif(shutil.which("clang") is None, reason="clang not installed")


@pytest.fixture(scope="session")
def native_cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    return session_cases(lambda: tmp_path_factory.mktemp("probe-images"))


def compile_core(out: Path, driver: Path, sanitizers: str) -> Path:
    argv = ["clang", "-g", "-O1", "-std=c11", "-D_DEFAULT_SOURCE", "-Wall", "-Wextra", "-Werror",
            f"-fsanitize={sanitizers}", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer",
            f"-I{NATIVE}", *map(str, CORE), str(driver), "-o", str(out)]
    subprocess.run(argv, check=True, capture_output=True, timeout=120)
    return out


def corrupt_blobs(directory: Path, cases: dict[str, Case]) -> list[Path]:
    """Hand-made nasties next to the generated images: truncated heads, flipped tables."""
    out = []
    for name in ("gpt-multi", "mbr-logical", "gpt-4k", "mbr-ebr-loop", "gpt-absurd"):
        head = bytearray(first_bytes(cases[name].path))
        for i, pos in enumerate((0x1C6, 0x1D6, 0x200 + 80, 0x200 + 84, 0x1000 + 80, 0x400 + 32)):
            blob = bytearray(head)
            blob[pos:pos + 4] = b"\xff\xff\xff\x7f"
            path = directory / f"{name}-{i}.bin"
            path.write_bytes(bytes(blob))
            out.append(path)
    return out


@pytest.mark.timeout(180)
def test_core_under_asan_ubsan(native_cases: dict[str, Case], tmp_path: Path) -> None:
    driver = compile_core(tmp_path / "probe_driver", FUZZ / "probe_driver.c",
                          "address,undefined")
    images = [str(c.path) for c in native_cases.values()]
    images += [str(p) for p in corrupt_blobs(tmp_path, native_cases)]
    proc = subprocess.run([str(driver), *images], capture_output=True, text=True, env=SAN_ENV,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "runtime error" not in proc.stderr
    assert "AddressSanitizer" not in proc.stderr
    assert proc.stdout.count("\n") >= len(images)


@pytest.mark.timeout(FUZZ_SECONDS + 180)
def test_libfuzzer_bounded(native_cases: dict[str, Case], tmp_path: Path) -> None:
    fuzzer = compile_core(tmp_path / "probe_fuzz", FUZZ / "probe_fuzz.c",
                          "fuzzer,address,undefined")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for case in native_cases.values():
        (corpus / f"{case.name}.bin").write_bytes(first_bytes(case.path))
    for found in (FUZZ / "regressions").glob("*.bin"):  # inputs that once crashed the core
        (corpus / found.name).write_bytes(found.read_bytes())
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    proc = subprocess.run(
        [str(fuzzer), f"-max_total_time={FUZZ_SECONDS}", "-max_len=70000", "-timeout=10",
         "-rss_limit_mb=2048", f"-artifact_prefix={artifacts}/", "-print_final_stats=1",
         str(corpus)],
        capture_output=True, text=True, env=SAN_ENV, timeout=FUZZ_SECONDS + 120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list(artifacts.iterdir()), proc.stderr[-3000:]
    assert "runtime error" not in proc.stderr
