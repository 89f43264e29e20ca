"""Encoding speed on the two supported stacks, side by side in one run: ``benchmarks/encode.py`` in the 2025
environment (``.venv-2025``: torch 2.11, transformers 4.57) and in the current one (``.venv``: torch 2.14.1,
transformers 5.24), alternated A B A B ... so that both see the same machine load, then each row's speed-up
over the reference recipe (the median over the rounds) on the current stack divided by that on the 2025 stack.

    python benchmarks/encode_stacks.py [--rounds 2] [--layers 6] [--repeat 3] [--json out.json]

A ratio of 1.0 means the pack keeps its speed-up on the current stack; the target is within 10 %.
Both environments must exist (``make env`` and ``make env STACK=2025``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STACKS = {"2025": ".venv-2025", "current": ".venv"}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--layers", type=int, default=6, help="decoder layers of the 0.5B shape to run (encode.py)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--presets", default="training,comfyui,scripts")
    ap.add_argument("--json", default=None)
    return ap.parse_args(argv)


def run_once(stack: str, args, out: str) -> dict:
    py = os.path.join(ROOT, STACKS[stack], "bin", "python")
    cmd = [py, os.path.join(ROOT, "benchmarks", "encode.py"), "--no-quant", "--layers", str(args.layers),
           "--repeat", str(args.repeat), "--presets", args.presets, "--json", out]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    with open(out, encoding="utf-8") as fh:
        return json.load(fh)


def main(argv=None) -> None:
    args = parse_args(argv)
    runs: dict[str, list[dict]] = {s: [] for s in STACKS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for stack in STACKS:
                runs[stack].append(run_once(stack, args, os.path.join(tmp, f"{stack}-{r}.json")))
    speed = {s: {} for s in STACKS}
    for stack, results in runs.items():
        for res in results:
            for row in res["rows"]:
                speed[stack].setdefault((row["preset"], row["prompt"]), []).append(row["speedup_vs_reference"])
    table = []
    print(f"{'preset':9} {'prompt':26} {'2025 x':>8} {'current x':>10} {'current/2025':>13}")
    for key in speed["2025"]:
        old, new = statistics.median(speed["2025"][key]), statistics.median(speed["current"][key])
        table.append({"preset": key[0], "prompt": key[1], "speedup_2025": old, "speedup_current": new,
                      "current_over_2025": new / old})
        print(f"{key[0]:9} {key[1]:26} {old:8.2f} {new:10.2f} {new / old:13.3f}")
    meta = {s: {k: runs[s][0][k] for k in ("torch", "transformers", "cpu_matmul", "layers", "threads")} for s in STACKS}
    print(json.dumps(meta))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"stacks": meta, "rows": table, "rounds": args.rounds}, fh, indent=2)


if __name__ == "__main__":
    sys.exit(main())
