#!/usr/bin/env python
"""Paired A/B timing of two source trees of this repository: the models' eager float32 eval forward and training
step, old tree and new tree alternating in fresh processes, round after round.

    python benchmarks/bench_ab.py --before /tmp/before --after . [--rounds 3] [--models ...]

Each tree's packages are put first on PYTHONPATH (its compiled op too, when the tree has one built). Alternating
the two trees within each round (in ABBA order) means a slow period of a shared machine hits both alike; the reported figure is,
per model and step, the median over rounds of time(after) / time(before). Use it for a change that must not move
speed, where `nox -s bench`'s ratios to resnet50 are too noisy to show a few percent.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ["unified_convnext_tiny", "unified_halo_tiny", "unified_pvt_tiny", "unified_swin_tiny", "unified_dcn_v3_tiny"]

CHILD = r"""
import json, sys, time, torch, timm, stm_backbones
torch.manual_seed(0)
batch, size, repeats = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
out = {"stm_backbones": stm_backbones.__file__}
for name in sys.argv[4:]:
    model = timm.create_model(name, num_classes=1000)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 1000, (batch,))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    def evaluate():
        with torch.inference_mode():
            model(x)
    times = {}
    for label, fn in (("eval", evaluate), ("train", step)):
        model.train(label == "train")
        fn()  # warm-up
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        times[label] = min(samples)
    out[name] = times
print(json.dumps(out))
"""


def run_tree(tree: Path, args) -> dict:
    paths = [str(tree / "packages" / "backbones"), str(tree / "packages" / "cuda_ops")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(args.batch), str(args.size), str(args.repeats),
                           *args.models], env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"the run in {tree} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if not result["stm_backbones"].startswith(str(tree.resolve())):
        raise SystemExit(f"{tree}: stm_backbones was imported from {result['stm_backbones']}, not from the tree")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True, help="the reference tree (e.g. a git worktree)")
    parser.add_argument("--after", type=Path, default=Path("."), help="the tree under test (default: this one)")
    parser.add_argument("--models", nargs="*", default=MODELS)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per step (the minimum is kept)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--out", type=Path, default=RESULTS / "ab_models_cpu")
    args = parser.parse_args(argv)
    args.before, args.after = args.before.resolve(), args.after.resolve()
    rounds = []
    for i in range(args.rounds):
        if i % 2 == 0:  # ABBA order: neither tree always runs first
            before, after = run_tree(args.before, args), run_tree(args.after, args)
        else:
            after, before = run_tree(args.after, args), run_tree(args.before, args)
        rounds.append({m: {k: after[m][k] / before[m][k] for k in ("eval", "train")} for m in args.models})
        print(f"round {i + 1}: " + ", ".join(f"{m} {r['eval']:.3f}/{r['train']:.3f}" for m, r in rounds[-1].items()),
              flush=True)
    median = {m: {k: statistics.median(r[m][k] for r in rounds) for k in ("eval", "train")} for m in args.models}
    lines = ["| model | eval after/before | train after/before | rounds (eval / train) |", "|---|---:|---:|---|"]
    for m in args.models:
        per_round = "; ".join(f"{r[m]['eval']:.3f} / {r[m]['train']:.3f}" for r in rounds)
        lines.append(f"| {m} | {median[m]['eval']:.3f} | {median[m]['train']:.3f} | {per_round} |")
    table = "\n".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(dict(before=str(args.before), after=str(args.after),
                                                             batch=args.batch, size=args.size, rounds=rounds,
                                                             median=median), indent=1))
    args.out.with_suffix(".md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
