#!/usr/bin/env python3
"""Peer measurement: llama.cpp decoding a GGUF, unconstrained and held to a memory budget by a cgroup.

    python bench/peer_llamacpp.py --build /tmp/peer/build --gguf MODEL.gguf [--mem 512M] [--out r.json]

--build is a llama.cpp CMake build directory with bin/llama-bench and bin/llama-completion (Release;
no llama.cpp code lives in this repository: build it from its own sources). Root is needed (cgroups).
What it runs, in order, recording /proc/loadavg beside each step (the machine is shared):

1. llama-bench -m GGUF -t BENCH_THREADS -p 128 -n 64 -r REPS                      (pp128 and tg64)
2. llama-completion, the coding prompt through the GGUF's chat template (jinja), greedy (--temp 0),
   -c 1024 -n N_FREE, in a cgroup with a limit far above the model (--free-mem, 16G): tokens/s and
   peak memory with nothing held back.
3. the same with -n N_CAPPED and --no-repack in a fresh --mem (512M) cgroup, the GGUF evicted from
   the page cache first (bench/cgroup_run.py --evict: a page cached by someone else is not charged
   to the group, and the run would not really be held to the budget).
4. step 3 without --no-repack: the CPU backend repacks Q4_K weights into anonymous buffers, which
   cannot be paged back to the file (expected: OOM-killed). --skip-repack leaves it out.

Tokens/s are llama.cpp's own figures (llama_perf_context_print: "eval time" is decode, "prompt eval
time" is prefill). A JSON of everything (commands, loads, cgroup reports, answers) goes to --out; a
markdown summary is printed.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the package beside this script, when not installed
from flashinfer_cli.peer import loadavg, parse_perf  # noqa: E402  (llama.cpp's perf lines, parsed once)
# tests/test_qwen.py's QUESTION: the project's own test asks exactly this
PROMPT = "Write a Python function is_prime(n) that returns True if n is prime."

def cgroup_run(mem: str, cmd: list[str], *, evict: list[str], timeout: float, stderr_file: Path) -> dict:
    full = [sys.executable, str(HERE / "cgroup_run.py"), "--mem", mem, "--json", "--stderr-lines", "0",
            "--stderr-file", str(stderr_file), "--timeout", str(timeout)]
    for f in evict:
        full += ["--evict", f]
    r = subprocess.run(full + ["--"] + cmd, capture_output=True, text=True)
    if not r.stdout.strip():
        raise SystemExit(f"cgroup_run failed ({r.returncode}): {r.stderr.strip()}")
    rep = json.loads(r.stdout)
    rep["llama_perf"] = parse_perf(stderr_file.read_text(errors="replace")) if stderr_file.exists() else {}
    rep["cgroup_run_cmd"] = full + ["--"] + cmd
    return rep


def completion_cmd(args, n: int, repack: bool) -> list[str]:
    cmd = [str(Path(args.build) / "bin" / "llama-completion"), "-m", args.gguf, "-t", str(args.threads),
           "-c", "1024", "-n", str(n), "--temp", "0", "--seed", "0", "-cnv", "-st", "--jinja",
           "-p", PROMPT, "--no-display-prompt", "--no-warmup"]
    if not repack:
        cmd.append("--no-repack")
    return cmd


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", required=True, help="llama.cpp build dir (holds bin/llama-bench, bin/llama-completion)")
    ap.add_argument("--gguf", required=True, help="the model file")
    ap.add_argument("--threads", type=int, default=2, help="threads of the llama-completion runs (2)")
    ap.add_argument("--bench-threads", default="1,2",
                    help="llama-bench -t list (1,2: on a loaded 2-core machine 2 threads can collapse)")
    ap.add_argument("--mem", default="512M", help="the budget of the capped runs (512M)")
    ap.add_argument("--free-mem", default="16G", help="the limit of the 'unconstrained' run (16G)")
    ap.add_argument("--n-free", type=int, default=160, help="tokens generated unconstrained (160, as test_qwen)")
    ap.add_argument("--n-capped", type=int, default=32, help="tokens generated in the capped runs (32)")
    ap.add_argument("--reps", type=int, default=3, help="llama-bench repetitions (3)")
    ap.add_argument("--timeout", type=float, default=900, help="kill a capped run after this many s (900)")
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--skip-free", action="store_true")
    ap.add_argument("--skip-repack", action="store_true", help="leave out step 4 (capped, with repacking)")
    ap.add_argument("--out", help="write the JSON record here")
    ap.add_argument("--logs", default="/tmp/peer-llamacpp-logs", help="full stderr of each run goes here")
    args = ap.parse_args(argv)
    args.gguf = str(Path(args.gguf).resolve())
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    rec: dict = {"gguf": args.gguf, "threads": args.threads, "prompt": PROMPT,
                 "uname": " ".join(subprocess.run(["uname", "-srm"], capture_output=True, text=True).stdout.split())}
    lines: list[str] = []

    if not args.skip_bench:
        cmd = [str(Path(args.build) / "bin" / "llama-bench"), "-m", args.gguf, "-t", args.bench_threads,
               "-p", "128", "-n", "64", "-r", str(args.reps), "-o", "json"]
        before = loadavg()
        r = subprocess.run(cmd, capture_output=True, text=True)
        after = loadavg()
        (logs / "bench.stderr").write_text(r.stderr)
        try:
            rows = json.loads(r.stdout)
        except json.JSONDecodeError:
            raise SystemExit(f"llama-bench failed ({r.returncode}):\n{r.stderr[-2000:]}")
        rec["bench"] = {"cmd": cmd, "load_before": before, "load_after": after, "rows": rows}
        for row in rows:
            test = f"pp{row['n_prompt']}" if row["n_prompt"] else f"tg{row['n_gen']}"
            lines.append(f"llama-bench {test}: {row['avg_ts']:.2f} +- {row['stddev_ts']:.2f} tokens/s "
                         f"(threads {row['n_threads']}, reps {len(row.get('samples_ts', []))}; load {before} -> {after})")

    runs = []
    if not args.skip_free:
        runs.append(("free", args.free_mem, args.n_free, True, []))
    runs.append(("capped_no_repack", args.mem, args.n_capped, False, [args.gguf]))
    if not args.skip_repack:
        runs.append(("capped_repack", args.mem, args.n_capped, True, [args.gguf]))
    for name, mem, n, repack, evict in runs:
        cmd = completion_cmd(args, n, repack)
        rep = cgroup_run(mem, cmd, evict=evict, timeout=args.timeout, stderr_file=logs / f"{name}.stderr")
        rec[name] = rep
        p = rep["llama_perf"]
        mib = (rep["max_usage_bytes"] or 0) / 2**20
        ev = "; ".join(f"evicted, resident {e['resident_before'] / 2**20:.0f} -> {e['resident_after'] / 2**20:.0f} MiB"
                       for e in rep["evicted"])
        lines.append(
            f"{name} ({mem}{', --no-repack' if not repack else ''}): exit {rep['returncode']}"
            f"{' OOM-KILLED' if rep['oom_killed'] else ''}{' TIMEOUT' if rep['timed_out'] else ''}; "
            f"decode {p.get('eval_time_tok_s', float('nan')):.2f} tok/s ({p.get('eval_time_tokens', '?')} tokens), "
            f"prefill {p.get('prompt_eval_time_tok_s', float('nan')):.2f} tok/s ({p.get('prompt_eval_time_tokens', '?')} tokens), "
            f"load {p.get('load_time_ms', float('nan')) / 1000:.1f} s, wall {rep['wall_s']:.1f} s; "
            f"max_usage {mib:.1f} MiB (sampled rss peak {rep['peak_sampled']['rss_bytes'] / 2**20:.1f} MiB); "
            f"failcnt {rep['failcnt']}; {ev + '; ' if ev else ''}load {rep['load_before']} -> {rep['load_after']}")
        answer = rep["stdout"].strip()
        if answer:
            lines.append("    answer: " + "\n    ".join(answer.splitlines()[:12]))
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text(json.dumps(rec, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
