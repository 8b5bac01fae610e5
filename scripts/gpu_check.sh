#!/usr/bin/env bash
# The GPU check of issue #5, prepared for the lent device machine (one CUDA GPU; torch, torchvision,
# pandas, pyarrow, scipy, matplotlib and tqdm there, no Ray, no network): profile ResNet-50 at batch 64
# in fp16 channels_last on the GPU, prune it to 0.5 of dense and measure the variant, then validate
# the table with 10 random variants. Tables and variants go to $WORK; $OUT gets seven small files (the
# device machine returns at most eight): environment.txt, profile.log, prune.log, validate.log,
# prune_report.json, validation.csv and table.csv. The figures are absolute GPU times.
#
#   bash scripts/gpu_check.sh --fetch      # here, once: the torch-pruning wheel into .wheels/ (git-ignored)
#                                          # and the CIFAR-10 file into .benchcache/gpu/ (for --accuracy)
#   device run, carry [".wheels"], command "bash scripts/gpu_check.sh"            # there
#   device run, carry [".wheels", ".benchcache/gpu"], timeout_s 540,
#       command "bash scripts/gpu_check.sh --accuracy"    # issue 15 instead: scripts/gpu_accuracy.sh
#   DEVICES=cpu MODEL=resnet18 DTYPE=fp32 INPUT=64 BATCH=2 VARIANTS=2 STEPS=2 OUT=/tmp/gc \
#       PY=.venv/bin/python bash scripts/gpu_check.sh                             # smoke run on a CPU
#
# Sized for the 15 minutes a session gets there: units of 32 channels with at most 4 choices per group
# (ROUND_TO, MAX_CHOICES) keep ResNet-50's table to 284 configurations (898 with 8 choices). Not yet
# timed on a GPU: the protocol spends >= 0.2 s of timed calls plus warm-up per configuration, so
# expect a few minutes; give the run a timeout_s of 600.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--fetch" ]; then
  version=$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("torch-pruning"))')
  ls .wheels/torch_pruning-"$version"-*.whl >/dev/null 2>&1 \
    || .venv/bin/python -m pip download --no-deps -d .wheels "torch-pruning==$version"
  data=${FLEETPRUNE_CIFAR:-../shared/data/cifar10-jpeg.parquet}
  if [ -f "$data" ]; then mkdir -p .benchcache/gpu && cp -u "$data" .benchcache/gpu/cifar10-jpeg.parquet; fi
  exit 0
fi
if [ "${1:-}" = "--accuracy" ]; then
  exec bash scripts/gpu_accuracy.sh
fi

PY=${PY:-python3}
OUT=${OUT:-/tmp/fleetprune-gpu-check}
WORK=${WORK:-/tmp/fleetprune-gpu-work}
MODEL=${MODEL:-resnet50}
BATCH=${BATCH:-64}
DTYPE=${DTYPE:-fp16}
INPUT=${INPUT:-224}
ROUND_TO=${ROUND_TO:-32}
MAX_CHOICES=${MAX_CHOICES:-4}
STEPS=${STEPS:-10}
VARIANTS=${VARIANTS:-10}
DEVICES=${DEVICES:-gpu}
mkdir -p "$OUT" "$WORK"
tables="$WORK/tables"

if ! "$PY" -c "import torch_pruning" 2>/dev/null; then
  ls .wheels/torch_pruning-*.whl >/dev/null 2>&1 \
    || { echo "error: torch-pruning is missing and .wheels/ holds no wheel of it: run 'bash scripts/gpu_check.sh --fetch' here and carry .wheels" >&2; exit 2; }
  "$PY" -m pip install -q --no-index --no-deps --find-links .wheels torch-pruning
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
fp() { "$PY" -m fleetprune "$@"; }

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  git rev-parse --short HEAD 2>/dev/null || true
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
  echo "model $MODEL input $INPUT batch $BATCH $DTYPE nhwc round_to $ROUND_TO max_choices $MAX_CHOICES steps $STEPS variants $VARIANTS"
} 2>&1 | tee "$OUT/environment.txt"

common=(--batch "$BATCH" --dtype "$DTYPE" --memory-format nhwc --round-to "$ROUND_TO" --input-size "$INPUT"
        --max-choices "$MAX_CHOICES")
t0=$(date +%s)
fp profile "$MODEL" "${common[@]}" --tables "$tables" --devices "$DEVICES" \
  --ray-address none 2>&1 | tr '\r' '\n' | { grep -v '%|' || true; } | tee "$OUT/profile.log"
t1=$(date +%s)
key=$(fp tables ls --tables "$tables" 2>/dev/null | awk 'NR > 1 && $1 != "" {print $1; exit}')
[ -n "$key" ] || { echo "error: no table was written under $tables" >&2; exit 1; }
fp prune "$MODEL" "${common[@]}" --tables "$tables" --device "$key" --budget 0.5 \
  --steps "$STEPS" --out "$WORK/variants" --overwrite --no-report 2>&1 | tee "$OUT/prune.log"
t2=$(date +%s)
fp validate "$MODEL" "${common[@]}" --tables "$tables" --device "$key" --variants "$VARIANTS" 2>&1 \
  | tr '\r' '\n' | { grep -v 'measurement/s\|s/measurement' || true; } | tee "$OUT/validate.log"
t3=$(date +%s)
cp "$WORK/variants/$key/report.json" "$OUT/prune_report.json"
"$PY" - "$tables" "$key" "$OUT" <<'PYEOF'
import sys
import pandas as pd
from fleetprune.tables import TableStore
root, key, out = sys.argv[1:]
TableStore(root).read(key).frame.to_csv(f"{out}/table.csv", index=False)
pd.read_parquet(f"{root}/validation.parquet").to_csv(f"{out}/validation.csv", index=False)
PYEOF
echo "profile $((t1 - t0)) s, prune $((t2 - t1)) s, validate $((t3 - t2)) s" | tee -a "$OUT/environment.txt"
