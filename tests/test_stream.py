"""Expert streaming (csrc/stream.c through kernels.Reader) and CRC32C.

References are independent of the code under test: published CRC32C vectors, a bitwise CRC
written here from the definition, and the file's bytes as plain Python reads them.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import random
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from flashinfer_cli import kernels
from flashinfer_cli.kernels import ReadError, Reader, ReadRequest, aligned_buffer, crc32c

ALIGN = 4096
FILE_SIZE = 24 * 1024 * 1024 + 1000  # not a multiple of 4096: the last block is partial

# ---- CRC32C ----------------------------------------------------------------------------------

# RFC 3720 (iSCSI) appendix B.4; the CRC is written there as bytes, least significant first.
ISCSI_READ_PDU = bytes.fromhex(
    "01c00000000000000000000000000000"
    "14000000000004000000001400000018"
    "28000000000000000200000000000000")
VECTORS = [
    (b"", 0x00000000),
    (b"123456789", 0xE3069283),
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
    (ISCSI_READ_PDU, 0xD9963A56),
]


def crc32c_bitwise(data: bytes) -> int:
    """CRC32C straight from its definition: reflected polynomial 0x82F63B78, inverted in and out."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


@pytest.mark.parametrize("impl", ["auto", "ref"])
@pytest.mark.parametrize("data,expected", VECTORS)
def test_crc32c_known_vectors(impl: str, data: bytes, expected: int) -> None:
    assert crc32c(data, impl=impl) == expected


def test_crc32c_bitwise_reference_agrees_with_vectors() -> None:
    # The Python reference used below must itself be right.
    for data, expected in VECTORS:
        assert crc32c_bitwise(data) == expected


@pytest.mark.parametrize("impl", ["auto", "ref"])
def test_crc32c_matches_bitwise_reference(impl: str) -> None:
    rng = random.Random(1)
    for _ in range(40):
        data = rng.randbytes(rng.randrange(0, 300))
        assert crc32c(data, impl=impl) == crc32c_bitwise(data)


def test_crc32c_hardware_equals_table_any_length_and_alignment() -> None:
    rng = np.random.default_rng(2)
    buf = rng.integers(0, 256, 1 << 16, dtype=np.uint8)
    for _ in range(500):
        start = int(rng.integers(0, 64))
        length = int(rng.integers(0, 1 << 15)) if rng.random() < 0.5 else int(rng.integers(0, 40))
        piece = buf[start:start + length]
        assert crc32c(piece) == crc32c(piece, impl="ref")


@pytest.mark.parametrize("impl", ["auto", "ref"])
def test_crc32c_chains(impl: str) -> None:
    rng = random.Random(3)
    data = rng.randbytes(10_000)
    whole = crc32c(data, impl=impl)
    for cut in (0, 1, 7, 8, 9, 4095, 5000, 10_000):
        assert crc32c(data[cut:], crc32c(data[:cut], impl=impl), impl=impl) == whole
    assert crc32c(b"6789", crc32c(b"12345", impl=impl), impl=impl) == 0xE3069283


# The three-stream hardware path works in blocks of 3 x 8192 and 3 x 256 bytes: lengths on and
# next to those boundaries, and both sides of the 768-byte threshold below which it is not used.
BLOCK_EDGES = sorted({k * b + d for b in (768, 3 * 8192) for k in (1, 2, 3, 5) for d in (-9, -8, -1, 0, 1, 7, 8)})


def test_crc32c_hardware_equals_table_large_buffers_every_offset() -> None:
    rng = np.random.default_rng(5)
    buf = rng.integers(0, 256, (3 << 20) + 64, dtype=np.uint8)
    lengths = [int(rng.integers(0, (3 << 20) + 1)) for _ in range(24)] + [3 << 20, 1 << 20, 65536]
    for i, length in enumerate(lengths):
        start = i % 64
        piece = buf[start:start + length]
        assert crc32c(piece) == crc32c(piece, impl="ref"), (start, length)
    for start in range(64):  # every alignment of the start, against block-edge lengths
        for length in BLOCK_EDGES[start % 7::7]:
            piece = buf[start:start + length]
            assert crc32c(piece) == crc32c(piece, impl="ref"), (start, length)


def test_crc32c_hardware_chains_over_large_buffers() -> None:
    rng = random.Random(6)
    data = rng.randbytes(1 << 20)
    whole = crc32c(data, impl="ref")
    assert crc32c(data) == whole
    for cut in [rng.randrange(0, len(data) + 1) for _ in range(20)] + [1, 768, 24576, len(data) - 1]:
        assert crc32c(data[cut:], crc32c(data[:cut])) == whole
    pieces, crc, pos = [], 0, 0  # many uneven pieces
    while pos < len(data):
        step = rng.choice([1, 7, 767, 769, 24575, 100_000])
        crc = crc32c(data[pos:pos + step], crc)
        pos += step
    assert crc == whole


# ---- the combine, tested directly: a harness that includes csrc/stream.c ----------------------

CSRC = Path(__file__).resolve().parent.parent / "csrc"
HARNESS = r"""
#include "stream.c"
uint32_t h_combine(uint32_t crc1, uint32_t crc2, uint64_t len2) { return crc32c_combine(crc1, crc2, len2); }
uint32_t h_shift(uint32_t r, uint64_t n) { return crc32c_shift(r, n); }
uint32_t h_xpow(uint64_t e) { return crc32c_xpow(e); }
#if defined(FIC_CRC_3WAY)
int h_three_way(void) { return 1; }
uint32_t h_shift_clmul(uint32_t r, uint32_t k) { return crc32c_shift_clmul(r, k); }
void h_constants(uint32_t *out)
{
    out[0] = crc32c_k_long[0]; out[1] = crc32c_k_long[1]; out[2] = crc32c_k_short[0]; out[3] = crc32c_k_short[1];
    out[4] = CRC_LONG; out[5] = CRC_SHORT;
}
#else
int h_three_way(void) { return 0; }
#endif
"""


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    directory = tmp_path_factory.mktemp("crc-harness")
    (directory / "h.c").write_text(HARNESS, encoding="utf-8")
    cc = os.environ.get("CC", "cc")
    try:
        subprocess.run([cc, "-O2", "-std=gnu11", "-pthread", "-fPIC", "-shared", "-Wall", "-Wextra", "-Werror",
                        "-Wno-unused-parameter", "-Wno-missing-prototypes", f"-I{CSRC}", str(directory / "h.c"),
                        "-o", str(directory / "h.so")], check=True, capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no C compiler")
    except subprocess.CalledProcessError as err:
        pytest.fail(f"harness did not compile:\n{err.stderr}")
    lib = ctypes.CDLL(str(directory / "h.so"))
    u32, u64 = ctypes.c_uint32, ctypes.c_uint64
    for name, args in (("h_combine", [u32, u32, u64]), ("h_shift", [u32, u64]), ("h_xpow", [u64])):
        getattr(lib, name).argtypes = args
        getattr(lib, name).restype = u32
    if lib.h_three_way():
        lib.h_shift_clmul.argtypes = [u32, u32]
        lib.h_shift_clmul.restype = u32
        lib.h_constants.argtypes = [ctypes.POINTER(u32)]
    return lib


def test_crc32c_combine_equals_reference_on_random_splits(harness: ctypes.CDLL) -> None:
    rng = random.Random(7)
    data = rng.randbytes(200_000)
    for _ in range(200):
        a = rng.randrange(0, len(data))
        b = rng.randrange(a, min(len(data), a + rng.choice([16, 1000, 100_000])) + 1)
        cut = rng.randrange(a, b + 1)
        left, right = data[a:cut], data[cut:b]
        combined = harness.h_combine(crc32c_bitwise(left) if len(left) < 64 else crc32c(left, impl="ref"),
                                     crc32c(right, impl="ref"), len(right))
        assert combined == crc32c(data[a:b], impl="ref"), (a, cut, b)
    assert harness.h_combine(0xE3069283, 0, 0) == 0xE3069283
    assert harness.h_combine(crc32c(b"12345"), crc32c(b"6789"), 4) == 0xE3069283


def test_crc32c_shift_is_zero_bytes(harness: ctypes.CDLL) -> None:
    # A register r shifted over n zero bytes is what the table reference does to it (without the
    # inversions fic_crc32c_ref adds on the way in and out).
    rng = random.Random(8)
    for n in [0, 1, 3, 4, 5, 8, 255, 256, 8192, 16384, 100_003] + [rng.randrange(0, 3 << 20) for _ in range(8)]:
        r = rng.getrandbits(32)
        assert harness.h_shift(r, n) == crc32c(bytes(n), r ^ 0xFFFFFFFF, impl="ref") ^ 0xFFFFFFFF, n
    assert harness.h_xpow(0) == 1 << 31  # the polynomial 1, in the CRC's reflected bit order
    assert harness.h_xpow(32) == 0x82F63B78  # x^32 mod P is the polynomial's own low terms


def test_crc32c_clmul_shift_and_constants(harness: ctypes.CDLL) -> None:
    if not harness.h_three_way():
        pytest.skip("no three-stream path in this build (not x86-64)")
    consts = (ctypes.c_uint32 * 6)()
    harness.h_constants(consts)
    long_, short = consts[4], consts[5]
    assert list(consts[:4]) == [harness.h_xpow(8 * n - 33) for n in (long_, 2 * long_, short, 2 * short)]
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
        if " pclmulqdq" not in f.read():
            pytest.skip("CPU without PCLMULQDQ")
    rng = random.Random(9)
    for n in [5, 8, 9, 256, 512, 8192, 16384] + [rng.randrange(5, 1 << 24) for _ in range(50)]:
        r = rng.getrandbits(32)
        assert harness.h_shift_clmul(r, harness.h_xpow(8 * n - 33)) == harness.h_shift(r, n), n


# AArch64 (crc32cx, three streams joined with crc32c_multmodp): cross-compiled and run under
# qemu-user when both are installed. The program exits 1 on the first mismatch.
AARCH64_CHECK = r"""
#include "stream.c"
int main(void)
{
    enum { SIZE = (3 << 20) + 64 };
    uint8_t *b = malloc(SIZE);
    if (!b)
        return 2;
    uint64_t s = 88172645463325252ull;
    for (size_t i = 0; i < SIZE; i++) {
        s ^= s << 13; s ^= s >> 7; s ^= s << 17;
        b[i] = (uint8_t)s;
    }
    for (int t = 0; t < 400; t++) {
        s ^= s << 13; s ^= s >> 7; s ^= s << 17;
        size_t off = t % 64, len = t < 40 ? (size_t)(s % (3u << 20)) : (size_t)(s % 30000);
        size_t cut = len ? (size_t)(s >> 32) % len : 0;
        uint32_t want = fic_crc32c_ref(0, b + off, len);
        if (fic_crc32c(0, b + off, len) != want ||
            fic_crc32c(fic_crc32c(0, b + off, cut), b + off + cut, len - cut) != want ||
            crc32c_combine(fic_crc32c(0, b + off, cut), fic_crc32c(0, b + off + cut, len - cut), len - cut) != want)
            return 1;
    }
    return 0;
}
"""


def test_crc32c_aarch64_under_qemu(tmp_path: Path) -> None:
    cc, qemu = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")
    if cc is None or qemu is None:
        pytest.skip("needs aarch64-linux-gnu-gcc and qemu-aarch64")
    (tmp_path / "check.c").write_text(AARCH64_CHECK, encoding="utf-8")
    build = subprocess.run([cc, "-O2", "-std=gnu11", "-pthread", "-march=armv8-a+crc", "-static", "-Wall", "-Wextra",
                            "-Werror", "-Wno-unused-parameter", f"-I{CSRC}", str(tmp_path / "check.c"),
                            "-o", str(tmp_path / "check")], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    assert subprocess.run([qemu, str(tmp_path / "check")], timeout=120).returncode == 0


# ---- fixtures --------------------------------------------------------------------------------

def _fs_type(path: Path) -> str:
    """Filesystem type of the mount holding path, from /proc/self/mounts (longest prefix)."""
    best, fstype = "", "unknown"
    path_s = str(path.resolve())
    with open("/proc/self/mounts", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            mnt = fields[1]
            if (path_s == mnt or path_s.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, fstype = mnt, fields[2]
    return fstype


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """A file of random bytes on a disk filesystem, with its contents."""
    directory = tmp_path_factory.mktemp("stream")
    if _fs_type(directory) in ("tmpfs", "ramfs"):
        directory = Path(__file__).resolve().parent.parent / "bench" / "out" / "test-stream"
        directory.mkdir(parents=True, exist_ok=True)
    path = directory / "bundles.bin"
    data = np.random.default_rng(4).integers(0, 256, FILE_SIZE, dtype=np.uint8).tobytes()
    path.write_bytes(data)
    yield path, data
    path.unlink()


def _backends() -> list[str]:
    return ["io_uring", "pread"]


def _open(path: Path, backend: str, **kw) -> Reader:
    try:
        return Reader(path, backend=backend, **kw)
    except NotImplementedError:
        pytest.skip(f"{backend} is not available on this system")


def _aligned_requests(rng: random.Random, n: int, size: int) -> tuple[list[tuple[int, int]], int]:
    """n random 4 KiB-aligned (offset, length) pairs inside the file, and their total length."""
    reqs = []
    for _ in range(n):
        length = ALIGN * rng.randrange(1, 17)
        offset = ALIGN * rng.randrange(0, (size - length) // ALIGN + 1)
        reqs.append((offset, length))
    return reqs, sum(length for _, length in reqs)


# ---- aligned reads, every backend ------------------------------------------------------------

@pytest.mark.parametrize("backend,depth,threads", [
    ("io_uring", 1, 1), ("io_uring", 8, 1), ("io_uring", 32, 1), ("io_uring", 3, 1),
    ("pread", 1, 1), ("pread", 1, 4)])
def test_random_aligned_reads_match_file(data_file, backend: str, depth: int, threads: int) -> None:
    path, data = data_file
    with _open(path, backend, queue_depth=depth, n_threads=threads) as reader:
        assert reader.backend == backend
        assert reader.direct  # a disk filesystem takes O_DIRECT
        assert reader.size == len(data)
        rng = random.Random(f"{backend}{depth}{threads}")
        for batch in range(4):
            pairs, total = _aligned_requests(rng, 500, len(data))
            arena = aligned_buffer(total)
            requests, pos = [], 0
            for i, (offset, length) in enumerate(pairs):
                # Every other request carries its CRC (computed from the Python-read bytes).
                expected_crc = crc32c(data[offset:offset + length]) if i % 2 else None
                requests.append(ReadRequest(offset, length, arena[pos:pos + length], expected_crc))
                pos += length
            results = reader.read(requests)
            assert all(r.status == "ok" for r in results)
            for rq, res in zip(requests, results):
                assert res.n_read == rq.length
                assert rq.dst.tobytes() == data[rq.offset:rq.offset + rq.length]


@pytest.mark.parametrize("backend", _backends())
def test_buffered_unaligned_reads_match_file(data_file, backend: str) -> None:
    path, data = data_file
    with _open(path, backend, queue_depth=16, n_threads=3, direct=False) as reader:
        assert not reader.direct
        rng = random.Random(5)
        requests = []
        for _ in range(1000):
            length = rng.randrange(1, 70_000)
            offset = rng.randrange(0, len(data) - length)
            dst = np.zeros(length + 1, dtype=np.uint8)[1:]  # deliberately off alignment
            requests.append(ReadRequest(offset, length, dst, crc32c(data[offset:offset + length])))
        results = reader.read(requests)
        for rq, res in zip(requests, results):
            assert (res.status, res.n_read) == ("ok", rq.length)
            assert rq.dst.tobytes() == data[rq.offset:rq.offset + rq.length]


@pytest.mark.parametrize("backend", _backends())
def test_large_request_and_empty_batch(data_file, backend: str) -> None:
    path, data = data_file
    with _open(path, backend) as reader:
        assert reader.read([]) == []
        length = (len(data) // ALIGN) * ALIGN
        dst = aligned_buffer(length)
        reader.read_checked([ReadRequest(0, length, dst, crc32c(data[:length]))])
        assert dst.tobytes() == data[:length]


def test_concurrent_callers_share_a_reader(data_file) -> None:
    import threading
    path, data = data_file
    errors: list[str] = []
    with _open(path, "auto") as reader:
        def work(seed: int) -> None:
            rng = random.Random(seed)
            pairs, total = _aligned_requests(rng, 100, len(data))
            arena, pos, requests = aligned_buffer(total), 0, []
            for offset, length in pairs:
                requests.append(ReadRequest(offset, length, arena[pos:pos + length]))
                pos += length
            reader.read_checked(requests)
            if any(rq.dst.tobytes() != data[rq.offset:rq.offset + rq.length] for rq in requests):
                errors.append(f"thread {seed}: wrong bytes")
        threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []


# ---- errors, each with its own status, the rest of the batch unharmed -------------------------

@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("direct", [True, False])
def test_end_of_file_is_short(data_file, backend: str, direct: bool) -> None:
    path, data = data_file
    size = len(data)
    last_block = size // ALIGN * ALIGN  # 1000 bytes of file remain from here
    with _open(path, backend, direct=direct) as reader:
        straddle = ReadRequest(last_block, 2 * ALIGN, aligned_buffer(2 * ALIGN))
        beyond = ReadRequest(last_block + 4 * ALIGN, ALIGN, aligned_buffer(ALIGN))
        good = ReadRequest(0, ALIGN, aligned_buffer(ALIGN))
        results = reader.read([straddle, beyond, good])
        assert (results[0].status, results[0].n_read) == ("short", size - last_block)
        assert straddle.dst[:size - last_block].tobytes() == data[last_block:]
        assert (results[1].status, results[1].n_read) == ("short", 0)
        assert (results[2].status, results[2].n_read) == ("ok", ALIGN)
        assert good.dst.tobytes() == data[:ALIGN]
        with pytest.raises(ReadError) as info:
            reader.read_checked([good, straddle])
        assert info.value.status == "short"


@pytest.mark.parametrize("backend", _backends())
def test_buffered_short_read_straddling_eof_unaligned(data_file, backend: str) -> None:
    # A partial read (bytes, then 0 at EOF) must come back as short with the bytes that exist.
    path, data = data_file
    with _open(path, backend, direct=False) as reader:
        offset = len(data) - 777
        rq = ReadRequest(offset, 5000, np.zeros(5000, dtype=np.uint8))
        (res,) = reader.read([rq])
        assert (res.status, res.n_read) == ("short", 777)
        assert rq.dst[:777].tobytes() == data[offset:]


@pytest.mark.parametrize("backend", _backends())
def test_corrupted_byte_is_crc_error(tmp_path: Path, backend: str) -> None:
    data = bytearray(random.Random(6).randbytes(16 * ALIGN))
    crcs = [crc32c_bitwise(bytes(data[i * ALIGN:(i + 1) * ALIGN])) for i in range(16)]
    data[5 * ALIGN + 123] ^= 0x10  # bundle 5 rots on disk after its CRC was recorded
    path = tmp_path / "rot.bin"
    path.write_bytes(bytes(data))
    with _open(path, backend) as reader:
        requests = [ReadRequest(i * ALIGN, ALIGN, aligned_buffer(ALIGN), crcs[i]) for i in range(16)]
        results = reader.read(requests)
        assert [r.status for r in results] == ["crc" if i == 5 else "ok" for i in range(16)]
        assert all(r.n_read == ALIGN for r in results)
        with pytest.raises(ReadError) as info:
            reader.read_checked(requests)
        assert info.value.status == "crc"


def _rotten_bundles(directory: Path, direct: bool, seed: int) -> tuple[Path, list[tuple[int, int, int]], set[int]]:
    """A file of 24 bundles of 1 to 20 pages (unaligned sizes and places for buffered reads), their
    CRCs recorded, then one byte flipped in every third bundle: at its first byte, about 100 bytes
    in, past its first 4 KiB (deep inside), or at its last byte, in turn. Returns the path, the
    (offset, length, crc) of each bundle and the indices of the rotten ones."""
    rng = random.Random(seed)
    bundles, pos = [], 0
    for i in range(24):
        pages = 1 if i % 6 == 0 else rng.randrange(2, 21)
        length = pages * ALIGN if direct else pages * ALIGN - rng.randrange(0, 4000)
        if not direct:
            pos += rng.randrange(0, 100)
        bundles.append((pos, length))
        pos = (pos + length + (ALIGN - 1)) // ALIGN * ALIGN if direct else pos + length
    data = bytearray(rng.randbytes(pos + 100))
    table = [(off, length, crc32c_bitwise(bytes(data[off:off + length]))) for off, length in bundles]
    rotten = set()
    for n, i in enumerate(range(0, 24, 3)):
        off, length, _ = table[i]
        where = [0, 100, rng.randrange(ALIGN, length) if length > ALIGN else length // 2, length - 1][n % 4]
        data[off + min(where, length - 1)] ^= 1 << rng.randrange(8)
        rotten.add(i)
    path = directory / f"rot-{seed}.bin"
    path.write_bytes(bytes(data))
    return path, table, rotten


def _check_rotten(path: Path, table, rotten: set[int], backend: str, direct: bool, expect_direct: bool) -> None:
    with _open(path, backend, queue_depth=4, n_threads=2, direct=direct) as reader:
        assert reader.direct is expect_direct
        requests = []
        for off, length, crc in table:
            # buffered: destinations off the 4 KiB alignment too
            dst = aligned_buffer(length) if expect_direct else np.zeros(length + 3, dtype=np.uint8)[3:]
            requests.append(ReadRequest(off, length, dst, crc))
        results = reader.read(requests)
        assert [r.status for r in results] == ["crc" if i in rotten else "ok" for i in range(len(table))]
        assert all(r.n_read == rq.length for r, rq in zip(results, requests))
        # the same requests without CRCs read fine: the status is the checksum's doing
        plain = [ReadRequest(rq.offset, rq.length, rq.dst) for rq in requests]
        assert all(r.status == "ok" for r in reader.read(plain))
        with pytest.raises(ReadError) as info:
            reader.read_checked(requests)
        assert info.value.status == "crc"


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
def test_flipped_bytes_anywhere_in_bundles_are_crc_errors(tmp_path: Path, backend: str, direct: bool) -> None:
    if direct and _fs_type(tmp_path) in ("tmpfs", "ramfs"):
        pytest.skip("the temporary directory is not on a disk filesystem")
    path, table, rotten = _rotten_bundles(tmp_path, direct, seed=10 + direct)
    _check_rotten(path, table, rotten, backend, direct, expect_direct=direct)


@pytest.mark.parametrize("backend", _backends())
def test_flipped_bytes_are_crc_errors_without_o_direct(ramfs_dir: Path, backend: str) -> None:
    """A filesystem that refuses O_DIRECT: asked for direct reads, the reader reads buffered, and
    still checks every CRC."""
    path, table, rotten = _rotten_bundles(ramfs_dir, True, seed=12)
    _check_rotten(path, table, rotten, backend, True, expect_direct=False)


@pytest.mark.parametrize("direct", [True, False])
def test_missing_file_is_enoent(tmp_path: Path, direct: bool) -> None:
    with pytest.raises(OSError) as info:
        Reader(tmp_path / "absent.bin", direct=direct)
    assert info.value.errno == errno.ENOENT


@pytest.mark.parametrize("backend", _backends())
def test_bad_requests_are_arg_errors(data_file, backend: str) -> None:
    path, data = data_file
    with _open(path, backend) as reader:
        buf = aligned_buffer(4 * ALIGN)
        requests = [
            ReadRequest(100, ALIGN, buf[:ALIGN]),                 # offset off alignment
            ReadRequest(0, 1000, buf[:ALIGN]),                     # length off alignment
            ReadRequest(0, ALIGN, buf[1:ALIGN + 1]),               # dst off alignment
            ReadRequest(0, 0, buf[:ALIGN]),                        # empty
            ReadRequest(-ALIGN, ALIGN, buf[:ALIGN]),               # negative offset
            ReadRequest(8 * ALIGN, ALIGN, buf[2 * ALIGN:3 * ALIGN]),  # fine
        ]
        results = reader.read(requests)
        assert [r.status for r in results] == ["arg"] * 5 + ["ok"]
        assert buf[2 * ALIGN:3 * ALIGN].tobytes() == data[8 * ALIGN:9 * ALIGN]


@pytest.mark.parametrize("backend", _backends())
def test_mixed_batch_each_request_its_own_status(data_file, backend: str) -> None:
    path, data = data_file
    with _open(path, backend, queue_depth=2) as reader:
        good = [ReadRequest(i * ALIGN, ALIGN, aligned_buffer(ALIGN)) for i in range(6)]
        wrong_crc = ReadRequest(0, ALIGN, aligned_buffer(ALIGN), crc32c_bitwise(data[:ALIGN]) ^ 1)
        past_end = ReadRequest(len(data) // ALIGN * ALIGN + ALIGN, ALIGN, aligned_buffer(ALIGN))
        misaligned = ReadRequest(1, ALIGN, aligned_buffer(ALIGN))
        batch = [good[0], wrong_crc, good[1], past_end, good[2], misaligned] + good[3:]
        statuses = [r.status for r in reader.read(batch)]
        assert statuses == ["ok", "crc", "ok", "short", "ok", "arg", "ok", "ok", "ok"]
        for rq in good:
            assert rq.dst.tobytes() == data[rq.offset:rq.offset + ALIGN]


@pytest.mark.parametrize("backend", _backends())
def test_read_error_from_the_kernel_is_io(tmp_path: Path, backend: str) -> None:
    # read(2) on a directory fails with EISDIR: a real error from the kernel, not from fic.
    with _open(tmp_path, backend) as reader:
        results = reader.read([ReadRequest(0, ALIGN, aligned_buffer(ALIGN)) for _ in range(3)])
        assert [(r.status, r.errno) for r in results] == [("io", errno.EISDIR)] * 3


def test_reader_rejects_bad_parameters(data_file) -> None:
    path, _ = data_file
    with pytest.raises(ValueError):
        Reader(path, queue_depth=0)
    with pytest.raises(ValueError):
        Reader(path, backend="mmap")


# ---- choice of backend and of O_DIRECT -------------------------------------------------------

@pytest.mark.parametrize("env,expected", [("pread", "pread"), ("io_uring", "io_uring")])
def test_fic_io_environment_variable(data_file, monkeypatch: pytest.MonkeyPatch, env: str, expected: str) -> None:
    path, _ = data_file
    monkeypatch.setenv("FIC_IO", env)
    try:
        reader = Reader(path)
    except NotImplementedError:
        pytest.skip(f"{env} is not available on this system")
    with reader:
        assert reader.backend == expected


def _check_whole_file(path: Path, data: bytes, direct: bool) -> None:
    for backend in _backends():
        with _open(path, backend) as reader:
            assert reader.direct is direct
            length = len(data) // ALIGN * ALIGN
            rq = ReadRequest(0, length, aligned_buffer(length), crc32c_bitwise(data[:length]))
            reader.read_checked([rq])
            assert rq.dst.tobytes() == data[:length]


def test_filesystem_without_o_direct_falls_back_to_buffered(ramfs_dir: Path) -> None:
    data = random.Random(7).randbytes(64 * ALIGN + 10)
    path = ramfs_dir / "bundles.bin"
    path.write_bytes(data)
    _check_whole_file(path, data, direct=False)


def test_dev_shm_reads_correctly() -> None:
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    data = random.Random(8).randbytes(64 * ALIGN + 10)
    path = Path("/dev/shm") / f"fic-test-{os.getpid()}.bin"
    path.write_bytes(data)
    try:
        with Reader(path) as reader:
            shm_direct = reader.direct  # older kernels refuse O_DIRECT on tmpfs, 6.6+ accept it
        _check_whole_file(path, data, direct=shm_direct)
    finally:
        path.unlink()


# ---- buffered reads leave no pages behind ----------------------------------------------------

def _resident_pages(path: Path) -> int:
    """Pages of the file in the page cache, by mincore(2) on a shared read-only mapping."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    size = path.stat().st_size
    n_pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap")
        try:
            vec = ctypes.create_string_buffer(n_pages)
            if libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
            return sum(b & 1 for b in vec.raw)
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


@pytest.mark.parametrize("backend", _backends())
def test_buffered_reads_drop_their_pages(tmp_path: Path, backend: str) -> None:
    data = random.Random(9).randbytes(256 * ALIGN)
    path = tmp_path / "cached.bin"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages cannot be dropped
        assert os.pread(fd, len(data), 0) == data
    finally:
        os.close(fd)
    if _resident_pages(path) == 0:
        pytest.skip("the page cache does not keep this file's pages; nothing to observe")
    with _open(path, backend, direct=False) as reader:
        requests = [ReadRequest(i * 16 * ALIGN + 5, 16 * ALIGN - 10, np.zeros(16 * ALIGN, dtype=np.uint8))
                    for i in range(16)]
        reader.read_checked(requests)
        assert all(rq.dst[:rq.length].tobytes() == data[rq.offset:rq.offset + rq.length] for rq in requests)
    assert _resident_pages(path) == 0


# ---- non-blocking reads: submit now, wait later ------------------------------------------------

def _batch(data: bytes, rng: random.Random, n: int, direct: bool) -> list[ReadRequest]:
    """n requests at random places (aligned when direct), every other one with its CRC from the
    Python-read bytes, into one arena."""
    if direct:
        pairs, total = _aligned_requests(rng, n, len(data))
    else:
        pairs = []
        for _ in range(n):
            length = rng.randrange(1, 70_000)
            pairs.append((rng.randrange(0, len(data) - length), length))
        total = sum(length for _, length in pairs)
    arena = aligned_buffer(total + ALIGN)
    requests, pos = [], 0 if direct else 1  # buffered: destinations off alignment on purpose
    for i, (offset, length) in enumerate(pairs):
        crc = crc32c_bitwise(data[offset:offset + length]) if i % 2 and length < 9000 else (
            crc32c(data[offset:offset + length]) if i % 2 else None)
        requests.append(ReadRequest(offset, length, arena[pos:pos + length], crc))
        pos += length
    return requests


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("direct", [True, False])
def test_submit_wait_equals_read_and_file(data_file, backend: str, direct: bool) -> None:
    # 300 requests at queue depth 4: the I/O thread refills the queue 75 times over.
    path, data = data_file
    with _open(path, backend, queue_depth=4, n_threads=3, direct=direct) as reader:
        assert reader.direct is direct
        rng = random.Random(f"submit{backend}{direct}")
        for _ in range(3):
            requests = _batch(data, rng, 300, direct)
            pending = reader.submit(requests)
            results = pending.wait()
            assert pending.done() and not reader.busy
            assert pending.wait() is results  # collected once, the same answer after
            for rq, res in zip(requests, results):
                assert (res.status, res.n_read, res.errno) == ("ok", rq.length, 0)
                assert rq.dst.tobytes() == data[rq.offset:rq.offset + rq.length]
            again = [ReadRequest(rq.offset, rq.length, np.zeros(rq.length, dtype=np.uint8) if not direct
                                 else aligned_buffer(rq.length), rq.crc32c) for rq in requests]
            assert reader.read(again) == results
            assert all(a.dst.tobytes() == rq.dst.tobytes() for a, rq in zip(again, requests))


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("direct", [True, False])
def test_submit_errors_are_per_request(data_file, backend: str, direct: bool) -> None:
    path, data = data_file
    size = len(data)
    last_block = size // ALIGN * ALIGN
    with _open(path, backend, queue_depth=2, direct=direct) as reader:
        good = [ReadRequest(i * ALIGN, ALIGN, aligned_buffer(ALIGN)) for i in range(5)]
        wrong_crc = ReadRequest(0, ALIGN, aligned_buffer(ALIGN), crc32c_bitwise(data[:ALIGN]) ^ 1)
        straddle = ReadRequest(last_block, 2 * ALIGN, aligned_buffer(2 * ALIGN))
        past_end = ReadRequest(last_block + 4 * ALIGN, ALIGN, aligned_buffer(ALIGN))
        batch = [good[0], wrong_crc, good[1], straddle, good[2], past_end] + good[3:]
        results = reader.submit(batch).wait()
        assert [(r.status, r.n_read) for r in results] == [
            ("ok", ALIGN), ("crc", ALIGN), ("ok", ALIGN), ("short", size - last_block), ("ok", ALIGN),
            ("short", 0), ("ok", ALIGN), ("ok", ALIGN)]
        assert straddle.dst[:size - last_block].tobytes() == data[last_block:]
        for rq in good:
            assert rq.dst.tobytes() == data[rq.offset:rq.offset + ALIGN]
        with pytest.raises(ReadError) as info:
            reader.submit([good[0], straddle, wrong_crc]).wait_checked()
        assert info.value.status == "short"
        reader.submit(good).wait_checked()  # and the reader goes on


@pytest.mark.parametrize("backend", _backends())
def test_second_submit_is_refused_until_wait(data_file, backend: str) -> None:
    path, data = data_file
    with _open(path, backend) as reader:
        first = [ReadRequest(i * ALIGN, ALIGN, aligned_buffer(ALIGN)) for i in range(64)]
        second = [ReadRequest(0, ALIGN, aligned_buffer(ALIGN))]
        pending = reader.submit(first)
        # Refused whether or not the first batch's I/O is over: it has not been collected.
        with pytest.raises(RuntimeError, match="in flight"):
            reader.submit(second)
        assert second[0].dst.tobytes() == bytes(ALIGN)  # the refused batch was not read
        assert all(r.status == "ok" for r in pending.wait())
        assert reader.submit(second).wait() == [kernels.ReadResult("ok", ALIGN, 0)]
        assert second[0].dst.tobytes() == data[:ALIGN]
        assert reader.submit([]).wait() == []


@pytest.mark.parametrize("backend", _backends())
def test_read_while_a_batch_is_submitted(data_file, backend: str) -> None:
    # A blocking read waits for the submitted batch's I/O (not for its wait) and then runs.
    path, data = data_file
    with _open(path, backend, queue_depth=4) as reader:
        rng = random.Random(11)
        submitted, blocking = _batch(data, rng, 100, True), _batch(data, rng, 50, True)
        pending = reader.submit(submitted)
        assert all(r.status == "ok" for r in reader.read(blocking))
        assert all(r.status == "ok" for r in pending.wait())
        for rq in submitted + blocking:
            assert rq.dst.tobytes() == data[rq.offset:rq.offset + rq.length]


@pytest.mark.parametrize("backend", _backends())
def test_close_with_a_batch_in_flight(data_file, backend: str) -> None:
    path, data = data_file
    rng = random.Random(12)
    # Through Python: close() finishes the batch; its results stay with the PendingRead.
    reader = _open(path, backend, queue_depth=2)
    requests = _batch(data, rng, 200, True)
    pending = reader.submit(requests)
    reader.close()
    assert all(r.status == "ok" for r in pending.wait())
    assert all(rq.dst.tobytes() == data[rq.offset:rq.offset + rq.length] for rq in requests)
    # Dropped unwaited, with its reader: nothing may be freed under the I/O thread.
    reader = _open(path, backend, queue_depth=2)
    requests = _batch(data, rng, 200, True)
    reader.submit(requests)
    del reader
    import gc
    gc.collect()
    assert all(rq.dst.tobytes() == data[rq.offset:rq.offset + rq.length] for rq in requests)
    # ... and in a reference cycle with its PendingRead: the collector finalizes both in any order
    # (the C reader's destructor first was a use after free: .ci/sanitizers runs this under ASan).
    for _ in range(4):
        cycle = {"reader": _open(path, backend, queue_depth=2)}
        requests = _batch(data, rng, 50, True)
        cycle["pending"] = cycle["reader"].submit(requests)
        cycle["self"] = cycle
        del cycle
        gc.collect()
        assert all(rq.dst.tobytes() == data[rq.offset:rq.offset + rq.length] for rq in requests)
    # The C API alone: fic_reader_close must let the batch finish before freeing the reader.
    ffi, lib = kernels.ffi, kernels.lib
    out, err = ffi.new("fic_reader **"), ffi.new("int *")
    assert lib.fic_reader_open(str(path).encode(), kernels.IO_BACKENDS[backend], 2, 2, 0, ffi.NULL, out, err) == lib.FIC_OK
    n = 100
    arena = aligned_buffer(n * 4 * ALIGN)
    reqs = ffi.new("fic_read_req[]", n)
    offsets = [ALIGN * rng.randrange(0, len(data) // ALIGN - 4) for _ in range(n)]
    for i, off in enumerate(offsets):
        reqs[i].offset, reqs[i].length = off, 4 * ALIGN
        reqs[i].dst = ffi.from_buffer("uint8_t[]", arena[i * 4 * ALIGN:(i + 1) * 4 * ALIGN])
    assert lib.fic_reader_submit(out[0], reqs, n) == lib.FIC_OK
    lib.fic_reader_close(out[0])
    for i, off in enumerate(offsets):
        assert (reqs[i].status, reqs[i].n_read) == (lib.FIC_OK, 4 * ALIGN)
        assert arena[i * 4 * ALIGN:(i + 1) * 4 * ALIGN].tobytes() == data[off:off + 4 * ALIGN]


def test_c_api_argument_checks(data_file) -> None:
    path, _ = data_file
    ffi, lib = kernels.ffi, kernels.lib
    assert lib.fic_reader_submit(ffi.NULL, ffi.NULL, 0) == lib.FIC_ERR_ARG
    assert lib.fic_reader_wait(ffi.NULL) == lib.FIC_ERR_ARG
    assert lib.fic_reader_busy(ffi.NULL) == 0
    with Reader(path) as reader:
        assert lib.fic_reader_submit(reader._ptr, ffi.NULL, 1) == lib.FIC_ERR_ARG
        assert lib.fic_reader_submit(reader._ptr, ffi.NULL, -1) == lib.FIC_ERR_ARG
        assert lib.fic_reader_wait(reader._ptr) == lib.FIC_OK  # nothing in flight
        assert not reader.busy


def test_caller_is_free_while_the_read_blocks_on_a_fifo(tmp_path: Path) -> None:
    # Reads from a FIFO block until someone writes: the test thread writes the data itself, one
    # 4 KiB piece at a time, after submit returned and while the batch is in flight. The batch
    # cannot finish before the last piece exists, so it must still be in flight until then.
    # (pread refuses pipes, ESPIPE; io_uring reads them.)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    wfd = os.open(fifo, os.O_RDWR)  # never blocks on Linux, and lets the reader's open go through
    try:
        with _open(fifo, "io_uring", queue_depth=1, direct=False) as reader:
            pieces = [random.Random(13 + i).randbytes(ALIGN) for i in range(8)]
            requests = [ReadRequest(0, ALIGN, np.zeros(ALIGN, dtype=np.uint8)) for _ in pieces]
            pending = reader.submit(requests)
            for piece in pieces:
                assert not pending.done() and reader.busy
                assert os.write(wfd, piece) == ALIGN  # atomic: a pipe write of <= PIPE_BUF bytes
            results = pending.wait()
            assert [(r.status, r.n_read) for r in results] == [("ok", ALIGN)] * len(pieces)
            assert [rq.dst.tobytes() for rq in requests] == pieces  # queue depth 1: in order
    finally:
        os.close(wfd)


def _userfaultfd_buffer(size: int):
    """An anonymous mapping whose pages are missing until the test says so: any access (a
    pread's copy, an O_DIRECT pin) blocks in the kernel. Returns (uffd, mapping, array, address),
    or None where userfaultfd is not allowed."""
    import mmap as mmap_mod
    nr = {"x86_64": 323, "aarch64": 282}.get(os.uname().machine)
    if nr is None:
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    uffd = libc.syscall(ctypes.c_long(nr), ctypes.c_long(os.O_CLOEXEC | os.O_NONBLOCK))
    if uffd < 0:
        return None
    api = (ctypes.c_uint64 * 3)(0xAA, 0, 0)  # struct uffdio_api {api, features, ioctls}
    if libc.ioctl(uffd, ctypes.c_ulong(0xC018AA3F), api) != 0:  # UFFDIO_API
        os.close(uffd)
        return None
    mapping = mmap_mod.mmap(-1, size, flags=mmap_mod.MAP_PRIVATE | mmap_mod.MAP_ANONYMOUS)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
    reg = (ctypes.c_uint64 * 4)(addr, size, 1, 0)  # {range.start, range.len, MODE_MISSING, ioctls}
    if libc.ioctl(uffd, ctypes.c_ulong(0xC020AA00), reg) != 0:  # UFFDIO_REGISTER
        os.close(uffd)
        return None
    return uffd, mapping, np.frombuffer(mapping, dtype=np.uint8), addr


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("direct", [True, False])
def test_caller_is_free_while_the_read_blocks_on_its_destination(data_file, backend: str, direct: bool) -> None:
    # The destination's pages are held missing by userfaultfd: the I/O thread's read blocks on
    # them (the kernel reports the fault to the test), and cannot finish until the test lets the
    # pages in. So submit returned, and the test ran, while the read was in progress.
    import select
    path, data = data_file
    size = 64 * ALIGN
    made = _userfaultfd_buffer(size)
    if made is None:
        pytest.skip("userfaultfd not allowed here")
    uffd, mapping, dst, addr = made
    try:
        with _open(path, backend, direct=direct) as reader:
            rq = ReadRequest(8 * ALIGN, size, dst, crc32c(data[8 * ALIGN:8 * ALIGN + size]))
            pending = reader.submit([rq])
            poller = select.poll()
            poller.register(uffd, select.POLLIN)
            assert poller.poll(60_000), "the read never touched its destination"
            assert not pending.done() and reader.busy  # blocked on a page only we can supply
            libc = ctypes.CDLL(None, use_errno=True)
            rng = (ctypes.c_uint64 * 2)(addr, size)
            assert libc.ioctl(uffd, ctypes.c_ulong(0x8010AA01), rng) == 0  # UFFDIO_UNREGISTER wakes it
            assert pending.wait() == [kernels.ReadResult("ok", size, 0)]
            assert dst.tobytes() == data[8 * ALIGN:8 * ALIGN + size]
    finally:
        os.close(uffd)
        del dst


def test_reader_harness_under_tsan(tmp_path: Path) -> None:
    # tests/reader_harness.c: submit/wait/read/close from two threads, every backend, O_DIRECT and
    # buffered, closes with batches in flight, then again with injected faults (retried kinds, and
    # EIO among them) and the rules set again between batches; under ThreadSanitizer when the
    # compiler has it.
    cc = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler")
    root = CSRC.parent
    file = Path(__file__).resolve().parent.parent / "bench" / "out" / f"reader-harness-{os.getpid()}.bin"
    file.parent.mkdir(parents=True, exist_ok=True)
    for flags, iters in ((["-O1", "-g", "-fsanitize=thread"], "40"), (["-O2"], "200")):
        exe = tmp_path / "reader_harness"
        build = subprocess.run([cc, *flags, "-std=gnu11", "-pthread", "-Wall", "-Wextra", "-Werror",
                                "-Wno-unused-parameter", f"-I{CSRC}", str(root / "tests" / "reader_harness.c"),
                                str(CSRC / "stream.c"), "-o", str(exe)], capture_output=True, text=True)
        if build.returncode != 0:
            if "-fsanitize=thread" in flags:
                continue  # no ThreadSanitizer in this compiler: the plain run still goes
            pytest.fail(build.stderr)
        env = dict(os.environ, TSAN_OPTIONS="halt_on_error=1 exitcode=66")
        r = subprocess.run([str(exe), str(file), iters], capture_output=True, text=True, timeout=600, env=env)
        assert r.returncode == 0 and "WARNING: ThreadSanitizer" not in r.stderr, r.stderr
        assert "reader stress ok: 14 configurations" in r.stdout
        hits = dict(re.findall(r"(eio|eagain|eintr|short|slow) (\d+)", r.stdout))
        assert sorted(hits) == ["eagain", "eintr", "eio", "short", "slow"] and min(map(int, hits.values())) > 0, r.stdout


# ---- fault injection (FIC_FAULTS) --------------------------------------------------------------
# The reader counts its read operations (each pread call, each io_uring completion, retries
# included) and a rule replaces the result of every N-th one: kernels.parse_faults, csrc/fic.h.

MAX_RETRIES = 32  # csrc/stream.c: EAGAIN/EINTR in a row without progress before the request fails


def test_parse_faults_syntax() -> None:
    f = kernels.parse_faults("eio:every=7,short:every=3,eagain:every=5,slow:ms=2,seed=1")
    assert f.seed == 1 and f.uring_setup_errno == 0
    assert f.rules == {"eio": kernels.FaultRule(every=7), "short": kernels.FaultRule(every=3),
                       "eagain": kernels.FaultRule(every=5), "slow": kernels.FaultRule(every=1, arg=2000)}
    f = kernels.parse_faults(" eintr : every=4 : count=2 : after=10 , slow:us=50:every=9 ")
    assert f.rules == {"eintr": kernels.FaultRule(every=4, count=2, after=10), "slow": kernels.FaultRule(every=9, arg=50)}
    assert kernels.parse_faults("eio").rules == {"eio": kernels.FaultRule(every=1)}  # every read
    assert kernels.parse_faults("uring_setup:EPERM").uring_setup_errno == errno.EPERM
    assert kernels.parse_faults("uring_setup:enosys").uring_setup_errno == errno.ENOSYS
    assert kernels.parse_faults("uring_setup:13").uring_setup_errno == 13
    assert not kernels.parse_faults("") and not kernels.parse_faults(None) and not kernels.parse_faults(" , ")
    for bad, words in [("eio:every=0", "every must be an integer >= 1"), ("eio:every=x", "every must be"),
                       ("eoi", "unknown fault 'eoi'"), ("eio:ms=2", "'ms=2' is not one of"),
                       ("short:count=-1", "count must be"), ("eio,eio:every=2", "given twice"),
                       ("uring_setup", "say which errno"), ("uring_setup:EWHAT", "unknown errno"),
                       ("seed=1:x", "no parameters"), ("eio:every", "'every' is not one of")]:
        with pytest.raises(ValueError, match=words) as info:
            kernels.parse_faults(bad)
        assert str(info.value).startswith("FIC_FAULTS=")


def _check_against_file(requests, results, data: bytes) -> None:
    for rq, res in zip(requests, results):
        assert (res.status, res.n_read, res.errno) == ("ok", rq.length, 0), (rq.offset, rq.length, res)
        assert rq.dst.tobytes() == data[rq.offset:rq.offset + rq.length]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("direct", [True, False])
def test_retried_faults_leave_every_read_right(data_file, monkeypatch, backend: str, direct: bool) -> None:
    # Short reads, EAGAIN, EINTR and slow reads are retried (the remainder, the whole operation):
    # every byte arrives and every checksum holds, through read() and submit()/wait() alike.
    path, data = data_file
    monkeypatch.setenv("FIC_FAULTS", "short:every=2,eagain:every=3,eintr:every=5,slow:us=200:every=7,seed=3")
    with _open(path, backend, queue_depth=4, n_threads=3, direct=direct) as reader:
        assert "faults injected (FIC_FAULTS=short:every=2," in reader.describe()
        rng = random.Random(f"faults{backend}{direct}")
        for _ in range(2):
            requests = _batch(data, rng, 120, direct)
            _check_against_file(requests, reader.read(requests), data)
            requests = _batch(data, rng, 120, direct)
            _check_against_file(requests, reader.submit(requests).wait(), data)
        hits = reader.fault_hits()
    assert hits["eio"] == 0 and min(hits[k] for k in ("short", "eagain", "eintr", "slow")) > 10, hits
    # each kind hits about its share of the operations (short only where a read can be cut)
    assert hits["eagain"] >= hits["ops"] // 3 - 8 and hits["slow"] >= hits["ops"] // 7 - 8, hits


@pytest.mark.parametrize("backend", _backends())
def test_injected_eio_is_a_clear_error_naming_file_and_offset(data_file, backend: str) -> None:
    path, data = data_file
    with _open(path, backend, queue_depth=1, n_threads=1, faults="eio:every=4") as reader:
        requests = [ReadRequest(i * 2 * ALIGN, 2 * ALIGN, aligned_buffer(2 * ALIGN)) for i in range(10)]
        results = reader.read(requests)
        # one operation per request at depth 1: operations 4 and 8 are requests 3 and 7
        assert [r.status for r in results] == ["ok"] * 3 + ["io"] + ["ok"] * 3 + ["io"] + ["ok"] * 2
        assert all(r.errno == errno.EIO for r in results if r.status == "io")
        assert requests[3].dst.tobytes() == b"\xe5" * 2 * ALIGN  # scribbled: nothing passes for read
        _check_against_file([rq for rq, r in zip(requests, results) if r.status == "ok"],
                            [r for r in results if r.status == "ok"], data)
        reader.set_faults("eio:every=4")  # the count restarts: operation 4 is request 3 again
        with pytest.raises(ReadError) as info:
            reader.submit(requests).wait_checked()
        assert info.value.status == "io"
        assert str(info.value) == f"{path}: Input/output error reading {2 * ALIGN} bytes at offset {3 * 2 * ALIGN} (0 read)"
        assert reader.fault_hits()["eio"] == 4
        reader.set_faults(None)  # faults off: the same reader reads the same batch right
        _check_against_file(requests, reader.read(requests), data)
        assert reader.fault_hits()["eio"] == 4


@pytest.mark.parametrize("backend", _backends())
def test_eagain_for_ever_fails_after_bounded_retries(data_file, backend: str) -> None:
    path, data = data_file
    with _open(path, backend, queue_depth=2, n_threads=2, faults="eagain") as reader:
        requests = [ReadRequest(i * ALIGN, ALIGN, aligned_buffer(ALIGN)) for i in range(3)]
        assert [(r.status, r.errno) for r in reader.read(requests)] == [("io", errno.EAGAIN)] * 3
        hits = reader.fault_hits()
        assert hits["eagain"] == hits["ops"] == 3 * (MAX_RETRIES + 1)
        with pytest.raises(ReadError, match="Resource temporarily unavailable reading 4096 bytes at offset 0"):
            reader.read_checked(requests)
    # the bound exactly: MAX_RETRIES in a row are retried, one more fails the request
    for kind in ("eagain", "eintr"):
        for count, want in ((MAX_RETRIES, ("ok", 0)), (MAX_RETRIES + 1, ("io", getattr(errno, kind.upper())))):
            with _open(path, backend, queue_depth=1, n_threads=1, faults=f"{kind}:count={count}") as reader:
                rq = ReadRequest(0, ALIGN, aligned_buffer(ALIGN))
                res = reader.read([rq])[0]
                assert (res.status, res.errno) == want and reader.fault_hits()[kind] == count
    # the bound is per request and in a row: EAGAIN on every other operation never fails, though
    # it hits far more than MAX_RETRIES times in the batch (and in one request, between short reads)
    with _open(path, backend, queue_depth=1, n_threads=1, faults="eagain:every=2") as reader:
        requests = [ReadRequest(i * ALIGN, ALIGN, aligned_buffer(ALIGN)) for i in range(100)]
        _check_against_file(requests, reader.read(requests), data)
        assert reader.fault_hits()["eagain"] >= 90
    with _open(path, backend, direct=False, faults="eintr:every=2,short") as reader:
        requests = [ReadRequest(3, 1 << 20, np.zeros(1 << 20, dtype=np.uint8))]
        _check_against_file(requests, reader.read(requests), data)
        assert reader.fault_hits()["eintr"] >= 18 and reader.fault_hits()["short"] >= 18


def test_injection_is_deterministic_and_the_same_on_both_backends(data_file) -> None:
    # At queue depth 1 and one pread thread the operations come in one order, so a spec hits the
    # same requests on every run and on either backend.
    path, data = data_file
    spec = "eio:every=9,short:every=4,eagain:every=6,eintr:every=10,seed=5"
    rng = random.Random(21)
    pairs, _ = _aligned_requests(rng, 80, len(data))
    outcomes = []
    for backend in ("io_uring", "pread", "io_uring", "pread"):
        with _open(path, backend, queue_depth=1, n_threads=1, faults=spec) as reader:
            requests = [ReadRequest(o, n, aligned_buffer(n)) for o, n in pairs]
            results = reader.read(requests)
            outcomes.append(([(r.status, r.errno, r.n_read) for r in results], reader.fault_hits()))
            _check_against_file([rq for rq, r in zip(requests, results) if r.status == "ok"],
                                [r for r in results if r.status == "ok"], data)
    assert all(o == outcomes[0] for o in outcomes), outcomes
    statuses = [s for s, _, _ in outcomes[0][0]]
    assert 0 < statuses.count("io") < len(statuses) and set(statuses) == {"ok", "io"}
    assert all(outcomes[0][1][k] > 0 for k in ("eio", "short", "eagain", "eintr"))
    # another seed moves the hits
    with _open(path, "pread", queue_depth=1, n_threads=1, faults=spec.replace("seed=5", "seed=6")) as reader:
        other = [(r.status, r.errno, r.n_read) for r in reader.read([ReadRequest(o, n, aligned_buffer(n)) for o, n in pairs])]
    assert other != outcomes[0][0]


def test_short_faults_keep_o_direct_alignment(data_file) -> None:
    # Under O_DIRECT a short read must end on a block: one-block requests cannot be cut (not hit),
    # longer ones are cut to whole blocks and finished.
    path, data = data_file
    with _open(path, "pread", faults="short") as reader:
        assert reader.direct
        one = [ReadRequest(i * ALIGN, ALIGN, aligned_buffer(ALIGN)) for i in range(4)]
        _check_against_file(one, reader.read(one), data)
        assert reader.fault_hits()["short"] == 0
        big = [ReadRequest(ALIGN, 16 * ALIGN, aligned_buffer(16 * ALIGN))]
        _check_against_file(big, reader.read(big), data)
        assert reader.fault_hits()["short"] == 4  # 16 -> 8 -> 4 -> 2 -> 1 blocks asked, each cut in half
    with _open(path, "pread", faults="short", direct=False) as reader:
        odd = [ReadRequest(5, 1000, np.zeros(1000, dtype=np.uint8))]
        _check_against_file(odd, reader.read(odd), data)
        assert reader.fault_hits()["short"] == 10  # cuts of 500, 250, 125, 62, 31, 16, 8, 4, 2, 1 bytes


@pytest.mark.parametrize("backend", _backends())
def test_set_faults_is_refused_while_a_batch_is_in_flight(data_file, backend: str) -> None:
    path, data = data_file
    with _open(path, backend, faults="slow:ms=5") as reader:
        requests = [ReadRequest(i * ALIGN, ALIGN, aligned_buffer(ALIGN)) for i in range(8)]
        pending = reader.submit(requests)
        with pytest.raises(RuntimeError, match="in flight"):
            reader.set_faults(None)
        _check_against_file(requests, pending.wait(), data)
        reader.set_faults("")
        assert not reader.faults and "faults injected" not in reader.describe()
    ffi, lib = kernels.ffi, kernels.lib
    bad = ffi.new("fic_faults *")
    bad.rules[0].every = -1
    out, err = ffi.new("fic_reader **"), ffi.new("int *")
    assert lib.fic_reader_open(str(path).encode(), lib.FIC_IO_AUTO, 2, 2, 0, bad, out, err) == lib.FIC_ERR_ARG
    bad.rules[0].every, bad.reserved = 1, 1
    assert lib.fic_reader_open(str(path).encode(), lib.FIC_IO_AUTO, 2, 2, 0, bad, out, err) == lib.FIC_ERR_ARG
    assert lib.fic_reader_fault_hits(ffi.NULL, 0) == lib.FIC_ERR_ARG
    with Reader(path, faults="") as reader:
        assert lib.fic_reader_set_faults(reader._ptr, bad) == lib.FIC_ERR_ARG
        assert lib.fic_reader_fault_hits(reader._ptr, lib.FIC_FAULT_KINDS + 1) == lib.FIC_ERR_ARG
        assert reader.fault_hits() == {"eio": 0, "eagain": 0, "eintr": 0, "short": 0, "slow": 0, "ops": 0}


@pytest.mark.parametrize("name", ["EPERM", "ENOSYS"])
def test_refused_io_uring_falls_back_to_pread_and_says_why(data_file, monkeypatch, name: str) -> None:
    # io_uring_setup refused (as a seccomp policy or an old kernel refuses it), injected.
    path, data = data_file
    monkeypatch.delenv("FIC_IO", raising=False)
    monkeypatch.setenv("FIC_FAULTS", f"uring_setup:{name}")
    with Reader(path) as reader:
        assert reader.backend == "pread" and reader.uring_errno == getattr(errno, name)
        assert reader.pread_reason == f"io_uring refused: {name}, injected by FIC_FAULTS"
        assert reader.describe() == f"pread (io_uring refused: {name}, injected by FIC_FAULTS), O_DIRECT"
        requests = [ReadRequest(i * 3 * ALIGN, 3 * ALIGN, aligned_buffer(3 * ALIGN)) for i in range(20)]
        _check_against_file(requests, reader.submit(requests).wait(), data)
    with pytest.raises(NotImplementedError, match=f"io_uring refused \\({name}, injected by FIC_FAULTS\\)"):
        Reader(path, backend="io_uring")
    monkeypatch.delenv("FIC_FAULTS")
    with Reader(path, backend="pread") as reader:  # asked for: no refusal to report
        assert reader.uring_errno == 0 and reader.pread_reason == "asked for"
    monkeypatch.setenv("FIC_IO", "pread")
    with Reader(path) as reader:
        assert reader.pread_reason == "FIC_IO=pread"


# Python that installs a real seccomp filter in its own process: io_uring_setup (425 on x86-64 and
# AArch64 alike) fails with EPERM, as under Docker's default profile; everything else is allowed.
# Prints NOSECCOMP and exits 0 where the kernel or a sandbox refuses filters.
SECCOMP_PRELUDE = r"""
import ctypes, errno, struct, sys
ld_nr, jeq, ret = 0x20, 0x15, 0x06
prog = [(ld_nr, 0, 0, 0), (jeq, 0, 1, 425), (ret, 0, 0, 0x00050000 | errno.EPERM), (ret, 0, 0, 0x7FFF0000)]
buf = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *f) for f in prog))
class Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
fprog = Fprog(len(prog), ctypes.cast(buf, ctypes.c_void_p))
libc = ctypes.CDLL(None, use_errno=True)
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or \
        libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
    print("NOSECCOMP", ctypes.get_errno())
    sys.exit(0)
"""
SECCOMP_CHILD = SECCOMP_PRELUDE + r"""
from flashinfer_cli.kernels import Reader, ReadRequest, aligned_buffer
with Reader(sys.argv[1]) as r:
    rq = ReadRequest(0, 4096, aligned_buffer(4096))
    print(r.backend, r.uring_errno, r.pread_reason, r.read([rq])[0].status, rq.dst.tobytes() == open(sys.argv[1], "rb").read(4096))
"""


def test_io_uring_refused_by_a_real_seccomp_filter(data_file) -> None:
    import platform
    import sys

    if platform.machine() not in ("x86_64", "aarch64"):
        pytest.skip("the filter names io_uring_setup by its x86-64/AArch64 number")
    path, _ = data_file
    env = {k: v for k, v in os.environ.items() if k not in ("FIC_IO", "FIC_FAULTS")}
    r = subprocess.run([sys.executable, "-c", SECCOMP_CHILD, str(path)], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    if r.stdout.startswith("NOSECCOMP"):
        pytest.skip(f"this kernel or sandbox refuses seccomp filters: {r.stdout.strip()}")
    assert r.stdout.split() == ["pread", str(errno.EPERM), "io_uring", "refused:", "EPERM", "ok", "True"]
