#!/usr/bin/env python3
"""Ships a train-namm run's NAMM inside the package: pymemory/data/namm/NAME.gguf plus NAME.json (the training
command, settings and the log's summary), and the run's log and curve as docs/results/namm_training_NAME.{json,png}.

    .venv/bin/python tools/ship_namm.py --run runs/smollm2 --name smollm2
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def command_line(config: dict) -> str:
    flags = []
    for key, value in config.items():
        flag = "--out" if key == "out_dir" else "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags += [flag] if value else []
        elif isinstance(value, list):
            flags += [flag, ",".join(value)]
        else:
            flags += [flag, str(value)]
    return "pymemory train-namm " + " ".join(flags)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--commit", default=None, help="the commit the run trained at (default: HEAD now)")
    args = p.parse_args()
    run = Path(args.run)
    log = json.loads((run / "log.json").read_text())
    config = json.loads((run / "config.json").read_text())

    from pymemory.namm import load_gguf

    vector, _ = load_gguf(run / "namm.gguf")  # refuses a broken file before anything is copied
    data = ROOT / "pymemory" / "data" / "namm"
    data.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run / "namm.gguf", data / f"{args.name}.gguf")
    commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                           text=True).stdout.strip()
    record = {
        "name": args.name,
        "command": command_line(config),
        "commit": commit,
        "machine": log.get("machine"),
        "config": config,
        "source": vector.source,
        "generation": log["best_generation"],
        "generations_run": log["generation"],
        "best_heldout_loss": log["best_heldout_loss"],
        "heldout": log["heldout"],
        "heldout_baselines": log["heldout_baselines"],
        "warm_start": log.get("warm_start"),
        "seconds_per_generation_median": log["seconds_per_generation_median"],
        "wall_seconds": log["wall_seconds"],
        "feature_mean": log["feature_mean"],
        "feature_var": log["feature_var"],
    }
    (data / f"{args.name}.json").write_text(json.dumps(record, indent=1))
    results = ROOT / "docs" / "results"
    shutil.copyfile(run / "log.json", results / f"namm_training_{args.name}.json")
    shutil.copyfile(run / "curve.png", results / f"namm_training_{args.name}.png")
    print(f"shipped {data / (args.name + '.gguf')} (generation {record['generation']}, held-out loss "
          f"{record['best_heldout_loss']:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
