#!/bin/bash
# Copies the small files of finished runs into OUT/<run>/ (config, policy, versions, metrics, eval rows and table) and
# renders the comparison with `retrorl report`. The eval rows are recomputed from each run's stored trajectories
# with the current cluster/evaluation.py, so runs made before a change to the metric definitions report alike.
# Trajectories, adapters and checkpoints stay in the run folders.
# usage: results/collect.sh OUT RUN_DIR...   (OUT: a folder directly under results/, e.g. results/fp32-16games)
#        The first run is the baseline of the report's game-by-game table.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$1
shift
dirs=()
for run in "$@"; do
  name=$(basename "$run")
  mkdir -p "$out/$name/eval"
  cp "$run/config.yaml" "$run/metrics.jsonl" "$out/$name/"
  if [ -f "$run/versions.json" ]; then cp "$run/versions.json" "$out/$name/"; fi  # runs before it have none
  if [ -f "$run/policy.yaml" ]; then cp "$run/policy.yaml" "$out/$name/"; fi  # `retrorl eval` of a checkpoint
  .venv/bin/python - "$run" "$out/$name" <<'PY'
import json, sys
from pathlib import Path

import pandas as pd
import yaml

from agents.trajectory import Episode
from cluster.evaluation import eval_phase, evaluate, markdown_table
from cluster.run_dir import read_metrics
from rollout.store import write_atomic

run, out = Path(sys.argv[1]), Path(sys.argv[2])
trials = yaml.safe_load((run / "config.yaml").read_text())["eval"]["trials"]
frame = pd.read_parquet(run / "trajectories")
labels = [r["label"] for r in read_metrics(run / "metrics.jsonl") if r.get("event") == "eval"]
rows = []
for label in labels:
    episodes = [Episode.from_dict(json.loads(r)) for r in frame[frame["phase"] == eval_phase(label)]["record"]]
    rows += evaluate(episodes, label, trials)
write_atomic(out / "eval" / "results.json", (json.dumps(rows, indent=2, sort_keys=True) + "\n").encode())
write_atomic(out / "eval" / "table.md", markdown_table(rows).encode())
PY
  dirs+=("$name")
done
printf '%s\n' "${dirs[@]}" > "$out/runs.txt"  # the report's run list, baseline first (render.sh reads it)
results/render.sh "$(basename "$out")"
