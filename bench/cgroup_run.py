#!/usr/bin/env python3
"""Run one command inside a fresh cgroup v1 memory group and report what it cost.

    python bench/cgroup_run.py --mem 512M [--evict FILE]... [--json] -- CMD ARGS...

The group is /sys/fs/cgroup/memory/<name> (default fic-run-<pid>), made for this run with
memory.limit_in_bytes (and memory.memsw.limit_in_bytes where the kernel has it, so swap cannot
stretch the budget) set to --mem; the command is moved into it before it execs, so everything it
maps or allocates, and every child it starts, is charged there. Afterwards the script reports wall
time, exit code / signal, the group's memory.max_usage_in_bytes and memory.failcnt, the OOM-kill
count of memory.oom_control, peaks sampled from memory.stat while it ran (rss, page cache), and the
command's stdout; then it kills anything the command left in the group and removes the group.

Page cache matters. In cgroup v1 a file page is charged to the group that first read it; a page
already cached by someone else (say the download that wrote the model file) is not charged to the
new group when the command maps it, so it escapes the limit. --evict FILE drops FILE's clean pages
from the page cache (posix_fadvise DONTNEED) before the run and reports how much of it was resident
before and after (mincore), so a memory-capped run really has to read its weights from the disk.
(A page mapped by another live process stays resident; the report shows that.)

Needs root (cgroupfs writes). If the v1 memory controller is not mounted it is mounted at
/sys/fs/cgroup/memory; on a cgroup-v2-only host this script does not apply (use systemd-run -p
MemoryMax=... there). Load averages (/proc/loadavg) before and after go into the report: on a shared
machine a timing means little without them.

Exit status: the command's (128+signal if it was killed), 125 for a failure of this script itself.
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import mmap
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

CGROOT = Path("/sys/fs/cgroup/memory")
UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (say 512M, 1.5G, 1048576)")
    return int(float(m.group(1)) * UNITS[m.group(2).upper()])


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# ---- the page cache -----------------------------------------------------------------------------

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def resident_bytes(path: str) -> int:
    """Bytes of `path` in the page cache: mincore over a read-only mapping (libc's mmap, as Python's
    mmap gives no address of a read-only map)."""
    size = os.path.getsize(path)
    if size == 0:
        return 0
    page = mmap.PAGESIZE
    _libc.mmap.restype = ctypes.c_void_p
    _libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    _libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    _libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
    finally:
        os.close(fd)
    try:
        vec = (ctypes.c_ubyte * ((size + page - 1) // page))()
        if _libc.mincore(addr, size, vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
        pages = sum(b & 1 for b in bytes(vec))
    finally:
        _libc.munmap(addr, size)
    return min(pages * page, size)


def evict(path: str) -> dict:
    before = resident_bytes(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)  # dirty pages are not dropped: write them back first
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return {"file": path, "size": os.path.getsize(path), "resident_before": before,
            "resident_after": resident_bytes(path)}


# ---- the group ----------------------------------------------------------------------------------

def ensure_mounted() -> None:
    if (CGROOT / "memory.limit_in_bytes").exists():
        return
    CGROOT.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "cgroup", "-o", "memory", "none", str(CGROOT)],
                       capture_output=True, text=True)
    if r.returncode != 0 or not (CGROOT / "memory.limit_in_bytes").exists():
        raise SystemExit(f"cgroup_run: no cgroup v1 memory controller at {CGROOT} and mounting one failed "
                         f"({r.stderr.strip() or r.returncode}); on a v2-only host use systemd-run -p MemoryMax=")


class Group:
    def __init__(self, name: str, limit: int):
        self.path = CGROOT / name
        self.path.mkdir()  # fails if it exists: never reuse (or steal) someone else's group
        self.limit = limit
        self.memsw = (self.path / "memory.memsw.limit_in_bytes").exists()
        self.write("memory.limit_in_bytes", limit)
        if self.memsw:
            self.write("memory.memsw.limit_in_bytes", limit)  # after the plain limit: memsw >= limit
        if (self.path / "memory.swappiness").exists():
            try:
                self.write("memory.swappiness", 0)
            except OSError:
                pass

    def write(self, file: str, value) -> None:
        (self.path / file).write_text(f"{value}\n")

    def read(self, file: str) -> str:
        return (self.path / file).read_text()

    def read_int(self, file: str) -> int | None:
        try:
            return int(self.read(file).split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def keyed(self, file: str) -> dict[str, int]:
        out = {}
        try:
            for line in self.read(file).splitlines():
                k, _, v = line.partition(" ")
                if v.strip().lstrip("-").isdigit():
                    out[k] = int(v)
        except OSError:
            pass
        return out

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in self.read("cgroup.procs").split()]
        except OSError:
            return []

    def remove(self) -> str | None:
        """Kill what the command left behind (its own processes only: nothing else is in the group),
        uncharge, rmdir. Returns an error text, or None."""
        for _ in range(50):
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        try:
            self.write("memory.force_empty", 0)
        except OSError:
            pass
        for _ in range(50):
            try:
                self.path.rmdir()
                return None
            except OSError as exc:
                err = str(exc)
                time.sleep(0.1)
        return err


# ---- the run ------------------------------------------------------------------------------------

def run(args) -> tuple[dict, int]:
    ensure_mounted()
    name = args.name or f"fic-run-{os.getpid()}"
    evicted = [evict(f) for f in args.evict]
    group = Group(name, args.mem)
    procs_file = str(group.path / "cgroup.procs")

    def enter_group() -> None:  # in the child, before exec: all it does from here on is charged
        with open(procs_file, "w") as f:
            f.write(str(os.getpid()))
        os.setsid()  # its own process group, so a timeout can stop all of it

    report: dict = {"cmd": args.cmd, "cgroup": str(group.path), "mem_limit_bytes": args.mem,
                    "memsw_limit_set": group.memsw, "evicted": evicted, "load_before": loadavg()}
    stdout_chunks: list[bytes] = []
    stderr_chunks: list[bytes] = []
    peak = {"rss": 0, "cache": 0, "mapped_file": 0, "usage": 0}
    timed_out = False
    try:
        t0 = time.perf_counter()
        proc = subprocess.Popen(args.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, preexec_fn=enter_group)

        def pump(src, sink, echo):
            for chunk in iter(lambda: src.read1(65536), b""):
                sink.append(chunk)
                if echo is not None:
                    echo.write(chunk)
                    echo.flush()

        echo_err = None if args.json or args.quiet else sys.stderr.buffer
        threads = [threading.Thread(target=pump, args=(proc.stdout, stdout_chunks, None), daemon=True),
                   threading.Thread(target=pump, args=(proc.stderr, stderr_chunks, echo_err), daemon=True)]
        for t in threads:
            t.start()
        while proc.poll() is None:
            st = group.keyed("memory.stat")
            peak["rss"] = max(peak["rss"], st.get("rss", 0) + st.get("rss_huge", 0))
            peak["cache"] = max(peak["cache"], st.get("cache", 0))
            peak["mapped_file"] = max(peak["mapped_file"], st.get("mapped_file", 0))
            peak["usage"] = max(peak["usage"], group.read_int("memory.usage_in_bytes") or 0)
            if args.timeout and time.perf_counter() - t0 > args.timeout and not timed_out:
                timed_out = True
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(args.sample)
        wall = time.perf_counter() - t0
        for t in threads:
            t.join(timeout=5)
        rc = proc.returncode
        oom = group.keyed("memory.oom_control")
        report.update({
            "wall_s": round(wall, 3),
            "returncode": rc,
            "signal": signal.Signals(-rc).name if rc < 0 else None,
            "timed_out": timed_out,
            "max_usage_bytes": group.read_int("memory.max_usage_in_bytes"),
            "memsw_max_usage_bytes": group.read_int("memory.memsw.max_usage_in_bytes") if group.memsw else None,
            "failcnt": group.read_int("memory.failcnt"),
            "memsw_failcnt": group.read_int("memory.memsw.failcnt") if group.memsw else None,
            "oom_kill": oom.get("oom_kill"),  # kernels >= 4.13 count the group's OOM kills here
            "under_oom": oom.get("under_oom"),
            "peak_sampled": {k + "_bytes": v for k, v in peak.items()} | {"interval_s": args.sample},
            "load_after": loadavg(),
        })
        # OOM-killed: the kernel says so (oom_kill > 0), or (older kernels) SIGKILL with the limit hit
        report["oom_killed"] = bool(oom.get("oom_kill")) or (rc == -signal.SIGKILL and not timed_out
                                                              and ((report["failcnt"] or 0) + (report["memsw_failcnt"] or 0)) > 0
                                                              and "oom_kill" not in oom)
    finally:
        err = group.remove()
        report["cgroup_removed"] = err is None
        if err:
            report["cgroup_remove_error"] = err
    out = b"".join(stdout_chunks).decode("utf-8", "replace")
    errtext = b"".join(stderr_chunks).decode("utf-8", "replace")
    report["stdout"] = out
    report["stderr_tail"] = "\n".join(errtext.splitlines()[-args.stderr_lines:]) if args.stderr_lines else ""
    if args.stderr_file:
        Path(args.stderr_file).write_text(errtext)
    code = rc if rc >= 0 else 128 - rc
    return report, code


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description="Run CMD in a fresh cgroup v1 memory group capped at --mem; report wall time, peak "
                    "memory (memory.max_usage_in_bytes), OOM kills and CMD's stdout; remove the group.",
        epilog="example: python bench/cgroup_run.py --mem 512M --evict model.gguf --json -- "
               "fic run --mem 512M MODEL 'hello'")
    ap.add_argument("--mem", type=parse_size, required=True, help="the limit: 512M, 1G, bytes")
    ap.add_argument("--name", help="cgroup name under /sys/fs/cgroup/memory (default fic-run-<pid>); must not exist")
    ap.add_argument("--evict", action="append", default=[], metavar="FILE",
                    help="drop FILE from the page cache first (repeatable); see the module doc")
    ap.add_argument("--json", action="store_true", help="print one JSON report (stdout included) on stdout")
    ap.add_argument("--quiet", action="store_true", help="do not echo CMD's stderr while it runs")
    ap.add_argument("--timeout", type=float, default=0, help="SIGKILL the command after this many seconds")
    ap.add_argument("--sample", type=float, default=0.05, help="memory.stat sampling interval, s (0.05)")
    ap.add_argument("--stderr-lines", type=int, default=30, help="lines of CMD's stderr kept in the report (30)")
    ap.add_argument("--stderr-file", help="write CMD's whole stderr here")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    args = ap.parse_args(argv)
    if args.cmd and args.cmd[0] == "--":
        args.cmd = args.cmd[1:]
    if not args.cmd:
        ap.error("no command (put it after --)")
    if os.geteuid() != 0:
        print("cgroup_run: needs root to create cgroups", file=sys.stderr)
        return 125
    try:
        report, code = run(args)
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"cgroup_run: {exc}", file=sys.stderr)
        return 125
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        sys.stdout.write(report["stdout"])
        mib = lambda b: "?" if b is None else f"{b / 2**20:.1f} MiB"  # noqa: E731
        ps = report["peak_sampled"]
        print(f"\n[cgroup_run] limit {mib(report['mem_limit_bytes'])}; wall {report['wall_s']:.2f} s; "
              f"exit {report['returncode']}{' (' + report['signal'] + ')' if report['signal'] else ''}; "
              f"max_usage {mib(report['max_usage_bytes'])} (sampled peaks: rss {mib(ps['rss_bytes'])}, "
              f"cache {mib(ps['cache_bytes'])}); failcnt {report['failcnt']}; oom_kill {report['oom_kill']}; "
              f"OOM-killed {'yes' if report['oom_killed'] else 'no'}; load {report['load_before']} -> "
              f"{report['load_after']}", file=sys.stderr)
        for e in report["evicted"]:
            print(f"[cgroup_run] evicted {e['file']}: resident {mib(e['resident_before'])} -> "
                  f"{mib(e['resident_after'])} of {mib(e['size'])}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
