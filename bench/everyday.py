"""Everyday questions for choosing the default model.

Runs a fixed set of everyday questions through `fic run MODEL --max-tokens 64 --verbose QUESTION`
(greedy, the default sampling, the chat template) for each model, saves the answers and the decode
rate to a JSON file, and prints a table. Each answer is graded by a simple, stated check: every
group of expected keywords must match (case-insensitive), where a group matches if any of its
alternatives occurs in the answer; numbers are matched as whole numbers (so "8" does not match
"18"). The check is crude on purpose; read the answers too (they are all in the JSON).

    python bench/everyday.py                          # the three catalog models, store as it is
    python bench/everyday.py smollm2-135m /path/x.gguf --out bench/everyday.json
    python bench/everyday.py --grade bench/everyday.json --show   # regrade and reprint, no runs
    python bench/everyday.py --max-tokens 256 --only apples,train,km-to-m,python \
        --out bench/everyday-256.json        # the answers that 64 tokens cut short

FIC selects the fic executable (default: `fic` next to this Python, else on PATH). Models not in
the store are pulled first by `fic run` itself (use FIC_HOME to keep that out of your store).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

CATALOG = ["smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]
MAX_TOKENS = 64

FRUITS = ["apple", "banana", "orange", "grape", "strawberr", "mango", "pear", "peach", "cherr",
          "pineapple", "watermelon", "kiwi", "lemon", "lime", "plum", "blueberr", "raspberr",
          "apricot", "melon", "papaya", "coconut", "avocado", "fig", "pomegranate"]

# (id, question, check). A check is a list of groups; every group must match; a group matches if
# any of its alternatives is in the answer (case-insensitive). "#N" is the whole number N
# (digits, optional thousands separators); ("fruits", k) needs k different fruit names.
QUESTIONS: list[tuple[str, str, list]] = [
    ("capital-italy", "What is the capital of Italy?", [["rome", "roma"]]),
    ("capital-japan", "What is the capital of Japan?", [["tokyo"]]),
    ("capital-australia", "What is the capital of Australia?", [["canberra"]]),
    ("apples", "Tom has 3 apples and buys 5 more. How many apples does he have now?",
     [["$8"]]),
    ("train", "A train travels at 60 km per hour for 3 hours. How far does it travel?",
     [["$180"]]),
    ("km-to-m", "How many meters are in 5 kilometers?", [["#5000"]]),
    ("photosynthesis", "Which gas do plants take in from the air for photosynthesis?",
     [["carbon dioxide", "co2", "co₂"]]),
    ("boiling", "At what temperature in degrees Celsius does water boil at sea level?",
     [["#100"]]),
    ("birthday", "Write a one-sentence birthday message for my friend Anna.",
     [["birthday"], ["anna"]]),
    ("french", "Translate 'good morning' into French.", [["bonjour"]]),
    ("python", "Write a Python function that returns the square of a number.",
     [["def "], ["**2", "** 2", "* x", "*x", "* n", "*n", "* num", "*num", "* number", "pow("]]),
    ("noun", "In one sentence, what is a noun?", [["person", "place", "thing", "name"]]),
    ("fruits", "List three fruits.", [("fruits", 3)]),
    ("shakespeare", "Who wrote the play Romeo and Juliet?", [["shakespeare"]]),
]


_NUMBER = re.compile(r"(?<![\d.,])\d{1,3}(?:[, \u202f]\d{3})+(?![\d,]*\d)|(?<![\d.,])\d+")


def _numbers(text: str) -> list[str]:
    return [re.sub(r"[, \u202f]", "", m.group()) for m in _NUMBER.finditer(text)]


def grade(answer: str, check: list) -> bool:
    text = answer.lower()
    for group in check:
        if isinstance(group, tuple) and group[0] == "fruits":
            if sum(1 for f in FRUITS if re.search(r"\b" + f, text)) < group[1]:
                return False
            continue
        ok = False
        for alt in group:
            if alt.startswith("#"):
                ok = alt[1:] in _numbers(text)
            elif alt.startswith("$"):
                ok = _numbers(text)[-1:] == [alt[1:]]
            else:
                ok = alt.lower() in text
            if ok:
                break
        if not ok:
            return False
    return True


def fic_exe() -> str:
    if os.environ.get("FIC"):
        return os.environ["FIC"]
    here = Path(sys.executable).parent / "fic"
    return str(here) if here.exists() else (shutil.which("fic") or "fic")


def ask(fic: str, model: str, question: str, max_tokens: int = MAX_TOKENS) -> dict:
    cmd = [fic, "run", model, "--max-tokens", str(max_tokens), "--verbose", question]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    stats = {}
    for key in ("eval rate", "eval count", "prompt eval rate", "load duration"):
        m = re.search(r"^" + key + r":\s+([\d.]+)\s*(\w+)", proc.stderr, re.M)
        if m:
            stats[key] = float(m.group(1)) / (1000.0 if m.group(2) == "ms" else 1.0) \
                if key == "load duration" else float(m.group(1))
    return {"answer": proc.stdout.strip(), "wall_s": round(wall, 2), **stats}


def table(results: dict) -> str:
    rows = [("model", "right", "decode tok/s (median)", "mean wall s")]
    for model, res in results.items():
        qs = res["answers"]
        right = sum(1 for qid, _, c in QUESTIONS if qid in qs and grade(qs[qid]["answer"], c))
        rates = sorted(a["eval rate"] for a in qs.values() if "eval rate" in a)
        med = rates[len(rates) // 2] if rates else float("nan")
        wall = sum(a["wall_s"] for a in qs.values()) / max(1, len(qs))
        rows.append((model, f"{right}/{len(qs)}", f"{med:.1f}", f"{wall:.1f}"))
    lines = []
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    lines.append("")
    for qid, question, check in QUESTIONS:
        marks = []
        for model, res in results.items():
            a = res["answers"].get(qid)
            marks.append(f"{model}={'-' if a is None else 'ok' if grade(a['answer'], check) else 'NO'}")
        lines.append(f"{qid:18} " + "  ".join(marks))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="*", help=f"models (default: {' '.join(CATALOG)})")
    ap.add_argument("--out", default="bench/everyday.json", help="JSON file (merged, by model)")
    ap.add_argument("--grade", metavar="JSON", help="only regrade and print this file")
    ap.add_argument("--show", action="store_true", help="also print every answer")
    ap.add_argument("--max-tokens", type=int, default=MAX_TOKENS, help=f"(default {MAX_TOKENS})")
    ap.add_argument("--only", metavar="ID,ID", help="ask only these questions (ids as in the table)")
    args = ap.parse_args()

    if args.grade:
        results = json.loads(Path(args.grade).read_text())
    else:
        out = Path(args.out)
        results = json.loads(out.read_text()) if out.exists() else {}
        fic = fic_exe()
        only = set(args.only.split(",")) if args.only else None
        for model in args.models or CATALOG:
            answers = {}
            for qid, question, _ in QUESTIONS:
                if only is not None and qid not in only:
                    continue
                answers[qid] = {"question": question, **ask(fic, model, question, args.max_tokens)}
                print(f"[{model}] {qid}: {answers[qid]['answer'][:100]!r}", file=sys.stderr)
            results[model] = {"max_tokens": args.max_tokens, "answers": answers}
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    for model, res in results.items():
        for qid, question, check in QUESTIONS:
            if qid in res["answers"]:
                res["answers"][qid]["correct"] = grade(res["answers"][qid]["answer"], check)
    if args.show:
        for model, res in results.items():
            print(f"== {model}")
            for qid, a in res["answers"].items():
                print(f"-- {qid} [{'ok' if a['correct'] else 'NO'}] {a['question']}\n{a['answer']}")
        print()
    print(table(results))


if __name__ == "__main__":
    main()
