#!/bin/bash
# Re-renders every committed results table from committed files only: for each results/<set>/runs.txt (run folders
# relative to the set, the report's baseline first), `retrorl report` rewrites <set>/report.md and report.png from
# the runs' eval/results.json, config.yaml and metrics.jsonl. Nothing in a table is typed by hand;
# tests/test_results.py checks that every committed report.md is what this renders.
# usage: results/render.sh [SET...]   (default: every set)
set -euo pipefail
cd "$(dirname "$0")"
sets=("$@")
if [ ${#sets[@]} -eq 0 ]; then
  for f in */runs.txt; do sets+=("$(dirname "$f")"); done
fi
for set in "${sets[@]}"; do
  mapfile -t runs < "$set/runs.txt"
  (cd "$set" && ../../.venv/bin/retrorl report "${runs[@]}" --out . > /dev/null)
  echo "rendered results/$set/report.md"
done
