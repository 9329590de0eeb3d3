#!/usr/bin/env python3
"""Plant plausible bugs in the C core, one at a time, and see whether the tests notice.

    python tools/mutate_c.py                 # every mutant in MUTANTS
    python tools/mutate_c.py --list          # names, files and covering tests
    python tools/mutate_c.py ffn_skip_first_token crc_only_direct   # some of them
    python tools/mutate_c.py --group issue13 # the bugs issue 13 found passing

Each mutant is one exact text replacement in one source file, with the tests that cover that code
(a pytest selection: the run stays minutes, not the whole suite per mutant). The script copies the
repository (the files git knows, committed or not) into a temporary directory, checks that the
covering tests pass there unmutated, then for each mutant: restores the pristine file, applies the
replacement, rebuilds the C core in place when a C file changed (csrc/build_ffi.py), runs the
covering tests against the copy (PYTHONPATH) and reports KILLED (a test failed, or the run timed
out), SURVIVED (all passed: a gap in the tests, or an equivalent mutant), NO TESTS (the selection
matched none), STALE (the text is no longer in the source:
update the mutant) or BUILD (it does not compile). The working tree is never touched.

Run it by hand before closing an issue that touches the hot path; record the survivors and what
was done about them in the closing note, and add mutants as new code (arena, router, MoE) lands.
A few of the mutants are in Python (wiring of features through the Engine, the CLI and the chat
template): bugs of issue 13 that mutmut's operators would not plant. Exit status: 1 if any mutant
survived or went stale, else 0.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str          # relative to the repository root
    old: str           # exact text, must occur exactly once
    new: str
    tests: tuple[str, ...]  # pytest arguments: files, node ids, -k expressions
    why: str
    groups: tuple[str, ...] = field(default=())


FFN_TESTS = ("tests/test_ffn.py", "-k", "coef or mixed_gate_up")
CRC_TESTS = ("tests/test_stream.py", "tests/test_fmt.py", "-k", "crc or corrupted or flipped")

MUTANTS: list[Mutant] = [
    # ---- ffn.c: the fused FFN, which MoE routing leans on -------------------------------------
    Mutant("ffn_skip_first_token", "csrc/ffn.c",
           "while (i < t && coef[i * n_experts + (int64_t)e] == 0.0f) i++;\n            skip[e] = i == t;",
           "(void)i;\n            skip[e] = coef[(int64_t)e] == 0.0f;",
           FFN_TESTS, "an expert is skipped when the first token's coefficient is 0", ("issue13",)),
    Mutant("ffn_zero_token_stops_loop", "csrc/ffn.c",
           "memset(hi, 0, (size_t)nr * sizeof *hi);\n                    continue;",
           "memset(hi, 0, (size_t)nr * sizeof *hi);\n                    break;",
           FFN_TESTS, "a token with coefficient 0 ends phase 1 for the tokens after it"),
    Mutant("ffn_t1_ignores_coef", "csrc/ffn.c",
           "for (int64_t k = 0; k < nr; k++) h[r + k] = c * silu(h[r + k]) * u[k];",
           "for (int64_t k = 0; k < nr; k++) h[r + k] = silu(h[r + k]) * u[k]; (void)c;",
           FFN_TESTS, "t = 1: the router's coefficient is not applied"),
    Mutant("ffn_silu_sign", "csrc/ffn.c",
           "static inline float silu(float g) { return g / (1.0f + expf(-g)); }",
           "static inline float silu(float g) { return g / (1.0f + expf(g)); }",
           FFN_TESTS, "silu with the wrong sign"),
    # ---- kernels_scalar.c / kernels_avx2.c: dequantization and the float paths -----------------------------------
    Mutant("q4_1_min_sign", "csrc/kernels_scalar.c",
           "out[j] = d * (float)(blk->qs[j] & 15) + mn;",
           "out[j] = d * (float)(blk->qs[j] & 15) - mn;",
           ("tests/test_kernels.py", "-k", "matvec_matches_numpy and q4_1"),
           "Q4_1 reference: the block minimum subtracted in the low half"),
    Mutant("f32_avx2_tail_dropped", "csrc/kernels_avx2.c",
           "        for (; i < k; i++) extra += w[i] * x[i];\n        break;\n    }\n    case FIC_F16: {\n"
           "        const uint16_t *w = (const uint16_t *)row;\n        int64_t i = 0;\n        for (; i + 16 <= k; i += 16) {\n"
           "            __m256 w0 = _mm256_cvtph_ps",
           "        for (; i + 1 < k; i++) extra += w[i] * x[i];\n        break;\n    }\n    case FIC_F16: {\n"
           "        const uint16_t *w = (const uint16_t *)row;\n        int64_t i = 0;\n        for (; i + 16 <= k; i += 16) {\n"
           "            __m256 w0 = _mm256_cvtph_ps",
           ("tests/test_kernels.py", "-k", "matvec_matches_numpy and f32"),
           "AVX2 f32 dot: the last element of an odd tail is dropped"),
    Mutant("axpy_avx2_tail_dropped", "csrc/kernels_avx2.c",
           "        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(w + i), _mm256_loadu_ps(y + i)));\n"
           "    for (; i < n; i++) y[i] += a * w[i];",
           "        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(w + i), _mm256_loadu_ps(y + i)));\n"
           "    for (; i + 1 < n; i++) y[i] += a * w[i];",
           ("tests/test_kernels.py", "tests/test_ffn.py", "-k", "accum_rows or (matches_numpy and rows)"),
           "AVX2 axpy (accum_rows, rows-layout FFN): the last element of a tail is dropped"),
    # ---- pool.c ---------------------------------------------------------------------------------
    Mutant("pool_last_chunk_short", "csrc/pool.c",
           "int64_t end = n - begin > chunk ? begin + chunk : n;",
           "int64_t end = n - begin > chunk ? begin + chunk : n - 1;",
           ("tests/test_pool.py", "tests/test_kernels.py", "-k", "under_load or (matvec_matches_numpy and 2threads)"),
           "a pooled job's last chunk stops one short"),
    # ---- stream.c: reads and CRC ----------------------------------------------------------------
    Mutant("crc_only_direct", "csrc/stream.c",
           "if (q->status == FIC_OK && q->check_crc && fic_crc32c(",
           "if (r->direct && q->status == FIC_OK && q->check_crc && fic_crc32c(",
           CRC_TESTS, "the CRC is checked on O_DIRECT reads only", ("issue13",)),
    Mutant("crc3_constants_swapped", "csrc/stream.c",
           "return crc32c_shift_clmul((uint32_t)c0, k[1]) ^ crc32c_shift_clmul((uint32_t)c1, k[0]) ^ (uint32_t)c2;",
           "return crc32c_shift_clmul((uint32_t)c0, k[0]) ^ crc32c_shift_clmul((uint32_t)c1, k[1]) ^ (uint32_t)c2;",
           ("tests/test_stream.py", "-k", "crc32c"), "three-stream CRC joined with the shifts swapped"),
    Mutant("direct_length_unchecked", "csrc/stream.c",
           "else if (r->direct && ((q->offset | q->length) % DIRECT_ALIGN || (uintptr_t)q->dst % DIRECT_ALIGN))",
           "else if (r->direct && (q->offset % DIRECT_ALIGN || (uintptr_t)q->dst % DIRECT_ALIGN))",
           ("tests/test_stream.py", "-k", "bad_requests"), "an O_DIRECT request of unaligned length is not refused"),
    Mutant("buffered_pages_kept", "csrc/stream.c",
           "(void)posix_fadvise(r->fd, (off_t)start, (off_t)(end - start), POSIX_FADV_DONTNEED);",
           "(void)posix_fadvise(r->fd, (off_t)start, (off_t)(end - start), POSIX_FADV_NORMAL);",
           ("tests/test_stream.py", "-k", "drop_their_pages"), "buffered reads leave their pages in the page cache"),
    # ---- Python wiring (issue 13's bugs that passed) --------------------------------------------
    Mutant("engine_top_p_ignored", "flashinfer_cli/engine.py",
           "gen.SamplingParams(temperature, top_k, top_p, min_p, seed)",
           "gen.SamplingParams(temperature, top_k, 1.0, min_p, seed)",
           ("tests/test_engine_cli.py", "-k", "sampling or nucleus"), "Engine.stream replaces top_p by 1.0",
           ("issue13", "python")),
    Mutant("cli_min_p_dropped", "flashinfer_cli/cli.py",
           '("max_tokens", "temperature", "top_k", "top_p", "min_p", "seed")',
           '("max_tokens", "temperature", "top_k", "top_p", "seed")',
           ("tests/test_engine_cli.py", "-k", "sampling"), "fic run/chat drop --min-p", ("issue13", "python")),
    Mutant("chat_template_no_lstrip", "flashinfer_cli/tokenizer.py",
           "ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,",
           "ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=False,",
           ("tests/test_tokenizer.py", "-k", "render_chat"), "chat templates rendered without lstrip_blocks",
           ("issue13", "python")),
    Mutant("top_p_boundary_strict", "flashinfer_cli/generate.py",
           "n = int(np.searchsorted(cum, p.top_p * (1 - 1e-12))) + 1",
           "n = int(np.searchsorted(cum, p.top_p * (1 - 1e-12), side=\"right\")) + 1",
           ("tests/test_generate.py",),
           "top-p keeps one token past an exact cumulative sum (equivalent while the 1e-12 slack stands: a known survivor)",
           ("python",)),
]

for _m in MUTANTS:  # C mutants form the group "c"
    if not _m.file.endswith(".py"):
        object.__setattr__(_m, "groups", _m.groups + ("c",))


def copy_repo(dest: Path) -> None:
    """The files git knows (committed, staged or new and not ignored), with the built core if any."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, check=True).stdout.decode()
    for rel in filter(None, out.split("\0")):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def build(root: Path, log: Path) -> bool:
    for old in (root / "flashinfer_cli").glob("_fic*.so"):
        old.unlink()
    with open(log, "w") as f:
        r = subprocess.run([sys.executable, "csrc/build_ffi.py"], cwd=root, stdout=f, stderr=subprocess.STDOUT)
    return r.returncode == 0 and any((root / "flashinfer_cli").glob("_fic*.so"))


def run_tests(root: Path, tests: tuple[str, ...], log: Path, timeout: float) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not slow", *tests]
    try:
        r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        log.write_text("timeout")
        return -1, "timeout"
    log.write_text(r.stdout + r.stderr)
    failed = [ln for ln in r.stdout.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    summary = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    return r.returncode, (failed[0] if failed else summary)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="mutants to run (default: all, or --group)")
    ap.add_argument("--group", help="run the mutants of a group (c, python, issue13)")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copy (its path is printed)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per test run")
    ap.add_argument("--tests-from", metavar="REV",
                    help="use tests/ as of this git revision (to see what the tests of an older commit caught)")
    args = ap.parse_args(argv)

    chosen = [m for m in MUTANTS if (not args.names or m.name in args.names)
              and (args.group is None or args.group in m.groups)]
    unknown = set(args.names) - {m.name for m in MUTANTS}
    if unknown:
        ap.error(f"unknown mutants: {', '.join(sorted(unknown))}")
    if args.list:
        for m in chosen:
            print(f"{m.name:28} {m.file:28} {' '.join(m.tests)}\n{'':28} {m.why}")
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="fic-mutate-"))
    root = tmp / "repo"
    root.mkdir()
    logs = tmp / "logs"
    logs.mkdir()
    print(f"copy of {REPO} in {root}", flush=True)
    try:
        copy_repo(root)
        if args.tests_from:
            shutil.rmtree(root / "tests")
            archive = subprocess.run(["git", "archive", args.tests_from, "tests"], cwd=REPO, capture_output=True,
                                     check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
            print(f"tests/ as of {args.tests_from}", flush=True)
        pristine = {m.file: (root / m.file).read_text() for m in chosen}
        if not build(root, logs / "baseline-build.log"):
            print(f"the unmutated core does not build: {logs / 'baseline-build.log'}")
            return 2
        suites = sorted({m.tests for m in chosen})
        for tests in suites:  # the covering tests pass unmutated, or the results mean nothing
            rc, what = run_tests(root, tests, logs / "baseline-tests.log", args.timeout)
            if rc not in (0, 5):  # 5: no test selected (older tests): the mutants get NO TESTS
                print(f"baseline fails ({' '.join(tests)}): {what}\n{(logs / 'baseline-tests.log').read_text()[-3000:]}")
                return 2
        results = []
        for m in chosen:
            t0 = time.perf_counter()
            path = root / m.file
            text = pristine[m.file]
            if text.count(m.old) != 1:
                results.append((m, "STALE", f"text found {text.count(m.old)} times in {m.file}", 0.0))
                print(f"{m.name:28} STALE", flush=True)
                continue
            path.write_text(text.replace(m.old, m.new))
            is_c = not m.file.endswith(".py")
            try:
                if is_c and not build(root, logs / f"{m.name}-build.log"):
                    status, what = "BUILD", str(logs / f"{m.name}-build.log")
                else:
                    rc, what = run_tests(root, m.tests, logs / f"{m.name}.log", args.timeout)
                    status = {0: "SURVIVED", 1: "KILLED", -1: "KILLED", 5: "NO TESTS"}.get(rc, f"ERROR({rc})")
            finally:
                path.write_text(text)
            if is_c:  # back to the unmutated core for the next mutant
                build(root, logs / "restore-build.log")
            results.append((m, status, what, time.perf_counter() - t0))
            print(f"{m.name:28} {status:9} {time.perf_counter() - t0:6.0f} s  {what}", flush=True)
        print("\nmutant                       result     why")
        for m, status, what, _ in results:
            print(f"{m.name:28} {status:9}  {m.why}")
        survivors = [m.name for m, s, _, _ in results if s in ("SURVIVED", "STALE", "NO TESTS")]
        print(f"\n{sum(s == 'KILLED' for _, s, _, _ in results)} killed, {len(survivors)} survived or stale"
              + (f": {', '.join(survivors)}" if survivors else ""))
        return 1 if survivors else 0
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
