"""Compare the trained models, pick the best, and write a report."""

import argparse
import json
import os

from cairn import Run

parser = argparse.ArgumentParser()
parser.add_argument("--models", nargs="+", required=True)
parser.add_argument("--output", required=True)
args = parser.parse_args()

results = []
for folder in args.models:
    with open(os.path.join(folder, "metrics.json")) as f:
        results.append(json.load(f))
results.sort(key=lambda m: (m["accuracy"], m["f1"]), reverse=True)
best = results[0]

run = Run.get_context()
run.log_table("comparison", {"model": [r["model"] for r in results],
                             "accuracy": [r["accuracy"] for r in results],
                             "f1": [r["f1"] for r in results]})
run.log("best_accuracy", best["accuracy"])
run.tag("best_model", best["model"])

os.makedirs(args.output, exist_ok=True)
lines = ["# Model comparison", "", "| model | accuracy | F1 |", "|---|---|---|"]
lines += [f"| {r['model']} | {r['accuracy']:.4f} | {r['f1']:.4f} |" for r in results]
lines += ["", f"Best model: **{best['model']}** (accuracy {best['accuracy']:.4f})", ""]
with open(os.path.join(args.output, "report.md"), "w") as f:
    f.write("\n".join(lines))
print("\n".join(lines))
