#!/usr/bin/env python3
"""fic against its peers, in one run, with ratios a reader can repeat.

    python bench/compare.py resident MODEL [--vs llama.cpp[=BUILD]] [--threads 2] [--reps 3]
                                           [--max-tokens 64] [--long 2000] [--out r.json]
    python bench/compare.py budget MODEL --mem 512M --build BUILD [--reps 2] [--max-tokens 16]
                                         [--fic-mem SIZE] [--quality-texts 2] [--out r.json]

resident: everything in memory on both sides: `fic bench MODEL --vs ...` (flashinfer_cli/peer.py):
a short prompt and a ~2,000-token one, same ids, same threads, greedy, the engines alternated,
medians, prefill and decode ratios, the load average beside every step.

budget: every engine in its own fresh cgroup v1 memory group of --mem (bench/cgroup_run.py: the
group also charges the page cache, and each run's files are evicted from the page cache first, so
what is not in the group's memory is read from the disk), one prompt (the code question through the
chat template, the same text on both sides), --ctx 1024, --threads 2:

    llama.cpp mmap      llama-completion --no-repack: its weights are the mmapped GGUF, held only by
                        the page cache inside the group (the naive flash baseline: the kernel's LRU
                        over 4 KiB pages; with repacking it is killed at 512 MB: peer_llamacpp.py)
    fic exact           fic bench --mem FIC_MEM: the prompt's experts pinned, the rest streamed
    fic exact, no pins  the same with --policy none: no per-prompt selection, the arena an LRU of
                        what tokens ask for (what MoE offloading engines do; for a dense model every
                        token needs every expert, so an LRU smaller than the FFN never hits)
    fic prune           --mode prune at the largest --active that fits; its quality is measured
                        after (fic bench --quality at that active fraction, --quality-texts texts)

Each repetition runs the four, the order reversed every other repetition; medians; ratios against
llama.cpp's. Root is needed (cgroups). fic runs as `python -m flashinfer_cli` from this checkout.
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the package beside this script, when not installed
from flashinfer_cli import peer  # noqa: E402
from peer_llamacpp import cgroup_run  # noqa: E402  (cgroup_run.py with its JSON report and llama.cpp's perf)

BUDGET_CTX = 1024
FIC = [sys.executable, "-m", "flashinfer_cli"]


def _env_note() -> str:
    return f"{peer.loadavg()} (1/5/15-min load)"


# ---- resident --------------------------------------------------------------------------------

def resident(args) -> dict:
    spec = peer.parse_vs(args.vs)
    rep = peer.run_comparison(args.model, spec, threads=args.threads, reps=args.reps, max_tokens=args.max_tokens,
                              long_tokens=args.long, say=lambda s: print(s, file=sys.stderr))
    print("\n".join(rep.lines()))
    print(f"repeat: fic bench {args.model} --vs {args.vs} --threads {args.threads} --runs {args.reps} "
          f"--max-tokens {args.max_tokens} --long {args.long}")
    return rep.as_dict()


# ---- under a budget --------------------------------------------------------------------------

def model_files(model_dir: Path) -> list[str]:
    return [str(p) for p in sorted(model_dir.iterdir()) if p.is_file()]


def chat_text(model_dir: Path) -> str:
    """The code question through the model's chat template: fic templates it itself (bench
    --prompts), llama.cpp reads this text."""
    from flashinfer_cli import fmt
    from flashinfer_cli.tokenizer import Tokenizer

    man = fmt.parse_manifest(model_dir / fmt.MANIFEST_FILE)
    tok = Tokenizer.from_model_dir(model_dir, man.tokenizer)
    return tok.render_chat([{"role": "user", "content": peer.SHORT_PROMPT}])


def run_llama(args, gguf: Path, text_file: str, logs: Path, tag: str) -> dict:
    binary = peer.BinLlama(args.build, gguf, threads=args.threads, ctx=BUDGET_CTX)
    cmd = binary.command(text_file, args.max_tokens) + ["--no-repack"]
    rep = cgroup_run(args.mem, cmd, evict=[str(gguf)], timeout=args.timeout, stderr_file=logs / f"{tag}.stderr")
    p = rep["llama_perf"]
    return {"engine": "llama.cpp mmap", "cmd": shlex.join(rep["cgroup_run_cmd"]),
            "prefill_tps": p.get("prompt_eval_time_tok_s"), "decode_tps": p.get("eval_time_tok_s"),
            "prompt_tokens": p.get("prompt_eval_time_tokens"), "gen_tokens": (p.get("eval_time_tokens") or 0) + 1,
            **_cgroup_summary(rep)}


def run_fic(args, model_dir: Path, prompts_file: str, logs: Path, tag: str, name: str, extra: list[str]) -> dict:
    cmd = FIC + ["bench", str(model_dir), "--mem", args.fic_mem, "--ctx", str(BUDGET_CTX), "--threads",
                 str(args.threads), "--prompts", prompts_file, "--max-tokens", str(args.max_tokens), "--json",
                 "--no-progress"] + extra
    rep = cgroup_run(args.mem, cmd, evict=model_files(model_dir), timeout=args.timeout,
                     stderr_file=logs / f"{tag}.stderr")
    out = {"engine": name, "cmd": shlex.join(rep["cgroup_run_cmd"]), **_cgroup_summary(rep)}
    try:
        d = json.loads(rep["stdout"])
    except json.JSONDecodeError:
        tail = (Path(logs / f"{tag}.stderr").read_text(errors="replace").strip().splitlines() or ["?"])[-1]
        return out | {"prefill_tps": None, "decode_tps": None, "error": tail}
    p = d["prompts"][0]
    return out | {"prefill_tps": d["prefill_tps"], "decode_tps": d["decode_tps"], "prompt_tokens": p["prompt_tokens"],
                  "gen_tokens": p["tokens"], "bytes_read": d["bytes_read"], "hit_rate": d["hit_rate"],
                  "peak_rss_bytes": d["peak_rss_bytes"], "mode": d["mode"], "policy": d["policy"],
                  "active_fraction": d["active_fraction"], "active_params": d["active_params"]}


def _cgroup_summary(rep: dict) -> dict:
    return {"returncode": rep["returncode"], "oom_killed": rep["oom_killed"], "timed_out": rep["timed_out"],
            "wall_s": rep["wall_s"], "max_usage_bytes": rep["max_usage_bytes"], "failcnt": rep["failcnt"],
            "evicted": [{k: e[k] for k in ("file", "resident_before", "resident_after")} for e in rep["evicted"]],
            "load_before": rep["load_before"], "load_after": rep["load_after"]}


def quality_at(model_dir: Path, active: float, texts: int, tokens: int) -> dict:
    cmd = FIC + ["bench", str(model_dir), "--quality", "--policy", "exact", "--active", f"{active:.6g}",
                 "--texts", str(texts), "--max-tokens", str(tokens), "--json"]
    load = peer.loadavg()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return {"cmd": shlex.join(cmd), "error": (r.stderr.strip().splitlines() or ["?"])[-1]}
    d = json.loads(r.stdout)
    pts = [p for p in d["points"] if p.get("policy") in (None, "exact")] or d["points"]
    return {"cmd": shlex.join(cmd), "load": load, "full_ppl": d["full_ppl"], "points": pts}


def budget(args) -> dict:
    from flashinfer_cli.pull import resolve_model

    model_dir = Path(resolve_model(args.model))
    gguf = peer.source_gguf(model_dir, [Path(d) for d in args.cache])
    peer.completion_binary(args.build)
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="fic-compare-"))
    text_file = tmp / "prompt.txt"
    text_file.write_text(chat_text(model_dir), encoding="utf-8")
    prompts_file = tmp / "prompts.json"
    prompts_file.write_text(json.dumps([{"id": "code", "prompt": peer.SHORT_PROMPT}]), encoding="utf-8")
    steps = [("llama", lambda tag: run_llama(args, gguf, str(text_file), logs, tag)),
             ("exact", lambda tag: run_fic(args, model_dir, str(prompts_file), logs, tag, "fic exact", [])),
             ("nopin", lambda tag: run_fic(args, model_dir, str(prompts_file), logs, tag, "fic exact, no pins",
                                          ["--policy", "none"])),
             ("prune", lambda tag: run_fic(args, model_dir, str(prompts_file), logs, tag, "fic prune",
                                          ["--mode", "prune"]))]
    runs = []
    for rep in range(1, args.reps + 1):
        for key, step in (steps if rep % 2 else steps[::-1]):
            r = step(f"{key}-{rep}") | {"rep": rep}
            runs.append(r)
            print(f"rep {rep} {r['engine']}: prefill {r['prefill_tps']} tok/s, decode {r['decode_tps']} tok/s, "
                  f"max_usage {(r['max_usage_bytes'] or 0) / 2**20:.0f} MiB, exit {r['returncode']}"
                  f"{' OOM' if r['oom_killed'] else ''}; load {r['load_before']} -> {r['load_after']}", file=sys.stderr)
    rows = budget_rows(runs)
    prune = next((r for r in runs if r["engine"] == "fic prune" and r.get("active_fraction")), None)
    quality = quality_at(model_dir, prune["active_fraction"], args.quality_texts, args.quality_tokens) \
        if prune and args.quality_texts else None
    rec = {"model": model_dir.name, "gguf": str(gguf), "mem": args.mem, "fic_mem": args.fic_mem, "ctx": BUDGET_CTX,
           "threads": args.threads, "max_tokens": args.max_tokens, "reps": args.reps,
           "date": time.strftime("%Y-%m-%d %H:%M %Z"), "rows": rows, "runs": runs, "quality": quality}
    print("\n".join(budget_lines(rec)))
    return rec


def budget_rows(runs: list[dict]) -> list[dict]:
    """Per engine: medians of its repetitions that finished, and ratios against llama.cpp's."""
    rows = []
    for engine in dict.fromkeys(r["engine"] for r in runs):
        ok = [r for r in runs if r["engine"] == engine and r.get("decode_tps")]

        def med(k: str):
            return statistics.median(r[k] for r in ok) if ok and all(r.get(k) is not None for r in ok) else None
        rows.append({"engine": engine, "finished": len(ok), "of": sum(r["engine"] == engine for r in runs),
                     "prefill_tps": med("prefill_tps"), "decode_tps": med("decode_tps"),
                     "max_usage_bytes": med("max_usage_bytes"), "peak_rss_bytes": med("peak_rss_bytes"),
                     "bytes_read": med("bytes_read"),
                     "active_fraction": med("active_fraction"),
                     "loads": [r["load_before"] for r in runs if r["engine"] == engine]})
    base = next((r for r in rows if r["engine"] == "llama.cpp mmap"), None)
    for r in rows:
        for k in ("prefill_tps", "decode_tps"):
            r[k.replace("_tps", "_ratio")] = peer.ratio(r[k], base[k]) if base and r[k] and base[k] else None
    return rows


def budget_lines(rec: dict) -> list[str]:
    f = lambda x, spec: format(x, spec) if x is not None else "-"  # noqa: E731
    out = [f"{rec['model']} in a {rec['mem']} cgroup (page cache charged, files evicted before each run), fic --mem "
           f"{rec['fic_mem']}, ctx {rec['ctx']}, {rec['threads']} threads, {rec['max_tokens']} tokens, "
           f"{rec['reps']} reps alternated; {rec['date']}",
           f"{'engine':<20}{'done':>6}{'prefill/s':>11}{'x llama':>9}{'decode/s':>10}{'x llama':>9}{'max MiB':>9}{'rss MiB':>9}"
           f"{'read GB':>9}{'active':>8}  load before each step"]
    for r in rec["rows"]:
        out.append(f"{r['engine']:<20}{str(r['finished']) + '/' + str(r['of']):>6}{f(r['prefill_tps'], '.2f'):>11}"
                   f"{f(r['prefill_ratio'], '.2f'):>9}{f(r['decode_tps'], '.3f'):>10}{f(r['decode_ratio'], '.2f'):>9}"
                   f"{f(r['max_usage_bytes'] and r['max_usage_bytes'] / 2**20, '.0f'):>9}"
                   f"{f(r['peak_rss_bytes'] and r['peak_rss_bytes'] / 2**20, '.0f'):>9}"
                   f"{f(r['bytes_read'] and r['bytes_read'] / 1e9, '.2f'):>9}{f(r['active_fraction'], '.3f'):>8}"
                   f"  {'; '.join(r['loads'])}")
    q = rec.get("quality")
    if q and "error" not in q:
        for p in q["points"]:
            out.append(f"prune quality at active {p.get('active')}: continuation perplexity x{p.get('ppl_ratio'):.3g} "
                       f"of the full model's {q['full_ppl']:.3g}, greedy agreement {p.get('agreement'):.3f} "
                       f"(load {q['load']}; {q['cmd']})")
    elif q:
        out.append(f"prune quality: failed: {q['error']}")
    out.append("max MiB: the group's memory.max_usage_in_bytes (page cache included); rss MiB: fic's VmHWM "
               "(interpreter and shared libraries included, some of them charged to other groups)")
    out.append("commands: " + "; ".join(dict.fromkeys(r["cmd"] for r in rec["runs"] if r["rep"] == 1)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    r = sub.add_parser("resident", help="both engines unconstrained: short and long prompts")
    r.add_argument("model")
    r.add_argument("--vs", default="llama.cpp", help="llama.cpp (llama-cpp-python) or llama.cpp=BUILD_DIR")
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--reps", type=int, default=3)
    r.add_argument("--max-tokens", type=int, default=64)
    r.add_argument("--long", type=int, default=peer.DEFAULT_LONG_TOKENS)
    b = sub.add_parser("budget", help="every engine in a memory cgroup of --mem")
    b.add_argument("model")
    b.add_argument("--mem", default="512M", help="the cgroup's limit (512M)")
    b.add_argument("--fic-mem", default=None, help="fic's --mem inside that group (default: --mem)")
    b.add_argument("--build", required=True, help="llama.cpp build directory (bin/llama-completion)")
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--reps", type=int, default=2)
    b.add_argument("--max-tokens", type=int, default=16)
    b.add_argument("--timeout", type=float, default=900, help="kill a run after this many seconds")
    b.add_argument("--quality-texts", type=int, default=2, help="texts for prune's quality (0: skip)")
    b.add_argument("--quality-tokens", type=int, default=256, help="tokens of each quality text")
    b.add_argument("--cache", action="append", default=[], help="a store cache dir to find the GGUF in (repeatable)")
    b.add_argument("--logs", default="/tmp/fic-compare-logs", help="each run's stderr goes here")
    for p in (r, b):
        p.add_argument("--out", help="write the JSON record here (temp file + rename)")
    args = ap.parse_args(argv)
    if args.what == "budget":
        args.fic_mem = args.fic_mem or args.mem
        from flashinfer_cli.store import Store
        args.cache = args.cache + [str(Store().cache_dir)]
    print(f"load at start: {_env_note()}", file=sys.stderr)
    try:
        rec = resident(args) if args.what == "resident" else budget(args)
    except (ValueError, OSError) as exc:  # CompareError, a model or file that is not there
        print(f"compare: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return 1
    if args.out:
        out = Path(args.out)
        part = out.with_name(out.name + ".part")
        part.write_text(json.dumps(rec, indent=1))
        part.replace(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
