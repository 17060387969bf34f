"""The paper's main table for this project: offline BC (the base) vs SOP + HG-DAgger vs SOP + RECAP, per task.

Reads results written by benchmarks/sop_experiment.py (same tasks, demos, base recipe, robots and wall-clock budget;
one run per algorithm) and writes benchmarks/results/sop_comparison.json, a markdown table on stdout and a plot.

    .venv/bin/python benchmarks/compare_algorithms.py --runs hg_dagger=sop_hg_dagger,recap=sop_recap

- success: the final checkpoint's evaluation without interventions (``--eval-episodes`` per task); the base's for BC.
- throughput: episodes ended per hour per robot-fleet during the online phase (failures and timeouts included), and
  the mean episode length, from the online episodes (with the simulated operator's help). BC has no online phase:
  its throughput comes from its evaluation episodes' lengths at the same control rate, so it is an upper bound.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def load(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="hg_dagger=sop_hg_dagger,recap=sop_recap",
                   help="label=result-name pairs, comma separated")
    p.add_argument("--name", default="sop_comparison")
    args = p.parse_args()
    runs = {label: load(name) for label, name in (pair.split("=") for pair in args.runs.split(","))}
    first = next(iter(runs.values()))
    def task_list(r):
        tasks = r["params"]["tasks"]
        return tasks.split(",") if isinstance(tasks, str) else list(tasks)

    tasks = task_list(first)
    for label, r in runs.items():
        if task_list(r) != tasks:
            raise SystemExit(f"{label} ran other tasks: {r['params']['tasks']} != {tasks}")

    rows: dict[str, dict] = {}
    # Each experiment pretrains its own base with the same recipe; they differ (demo noise, thread timing), so each
    # run's offline-BC base is shown next to it.
    for label, r in runs.items():
        base = r["base"]
        rows[f"offline BC base v1 ({label} run)"] = {
            "mean_success": base["mean_success"],
            "tasks": {t: {"success": base["tasks"][t]["success"], "mean_length": base["tasks"][t].get("mean_length")}
                      for t in tasks},
        }
    for label, r in runs.items():
        final, online = r["final"], r["online"]
        rows[f"SOP + {label} (v{final['version']})"] = {
            "mean_success": final["mean_success"],
            "base_mean_success": r["base"]["mean_success"],
            "online_minutes": r["online_phase_min"],
            "tasks": {t: {"success": final["tasks"][t]["success"],
                          "eval_mean_length": final["tasks"][t].get("mean_length"),
                          "online_episodes_per_hour": online.get(t, {}).get("episodes_per_hour"),
                          "online_mean_length": online.get(t, {}).get("mean_length"),
                          "online_success": online.get(t, {}).get("success_rate_online"),
                          "interventions_per_episode": online.get(t, {}).get("interventions_per_episode")}
                      for t in tasks},
        }
    out = {"benchmark": "sop_comparison", "command": "python " + " ".join(["benchmarks/compare_algorithms.py",
                                                                            *sys.argv[1:]]),
           "sources": {label: r["command"] for label, r in runs.items()}, "tasks": tasks, "rows": rows}
    (RESULTS / f"{args.name}.json").write_text(json.dumps(out, indent=2) + "\n")

    def fmt(x, spec="{:.2f}"):
        return "-" if x is None else spec.format(x)

    print("| method | " + " | ".join(tasks) + " | mean |")
    print("|---" * (len(tasks) + 2) + "|")
    for label, row in rows.items():
        print(f"| {label} success | " + " | ".join(fmt(row["tasks"][t]["success"]) for t in tasks)
              + f" | {fmt(row['mean_success'])} |")
    for label, row in rows.items():
        if "online_minutes" not in row:
            continue
        print(f"| {label} episodes/h (online) | " + " | ".join(
            fmt(row["tasks"][t]["online_episodes_per_hour"], "{:.0f}") for t in tasks) + " | |")
        print(f"| {label} mean length (online) | " + " | ".join(
            fmt(row["tasks"][t]["online_mean_length"], "{:.0f}") for t in tasks) + " | |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(9, 3.8))
    width = 0.8 / len(rows)
    x = np.arange(len(tasks) + 1)
    for i, (label, row) in enumerate(rows.items()):
        values = [row["tasks"][t]["success"] for t in tasks] + [row["mean_success"]]
        ax.bar(x + (i - (len(rows) - 1) / 2) * width, values, width, label=label)
    ax.set_xticks(x, [*tasks, "mean"], rotation=0, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("success rate (no interventions)")
    ax.set_title("Offline BC vs SOP + HG-DAgger vs SOP + RECAP (same base recipe, robots and budget)", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = ROOT / "docs" / "img" / f"{args.name}.png"
    fig.savefig(path, dpi=110)
    print(f"wrote {RESULTS / (args.name + '.json')} and {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
