#!/usr/bin/env bash
# Issue 15 on the lent GPU in ONE device call of at most 9 minutes (torch 2.11, torchvision 0.26, pandas,
# pyarrow, Python 3.12, no Ray, no network there):
#   1. profile resnet20 and resnet56 on the GPU without Ray (batch 256, bf16, nhwc, units of 8 channels;
#      the two share every layer configuration, so resnet56 measures nothing new);
#   2. time a few training iterations of each model on the device pipeline and fit the dense epochs to
#      the seconds this script gives each model (below);
#   3. per model: `fleetprune train` on the device pipeline (data on the GPU, augmented there, NHWC, bf16
#      autocast), a plain state_dict at $OUT/checkpoints/cifar10-MODEL.pt and its command, seed, epochs
#      and test top-1 at $OUT/checkpoints/cifar10-MODEL.json; then `benchmarks/cifar_accuracy.py --gpu`:
#      sp_lamp, uniform, l1 and random, each to 0.5 and 0.25 of the dense model's measured latency by
#      prune's closed loop on the GPU (the same K steps and fine-tuning iterations for every method),
#      evaluated, then all measured side by side; one line per network in $OUT/accuracy.csv (model,
#      method, budget, seed, top1, measured_ms, fraction_of_dense, ...), rewritten after every variant, and
#      every figure in $OUT/accuracy-MODEL.json.
# $OUT gets at most 8 files (what the device machine returns): gpu_accuracy.log (environment, every
# command and its output, phase times), the 4 checkpoint files, accuracy.csv and 2 JSONs.
#
#   bash scripts/gpu_check.sh --fetch       # here, once: torch-pruning wheel to .wheels/, data to .benchcache/gpu/
#   device run, carry [".wheels", ".benchcache/gpu"], timeout_s 540,
#       command "PYTHONUNBUFFERED=1 bash scripts/gpu_check.sh --accuracy"                     # there
#   DEVICE=cpu OUT=/tmp/ga PY=.venv/bin/python bash scripts/gpu_accuracy.sh                 # CPU smoke run
#
# Time (BUDGET_S=480 s, so a 540 s timeout leaves a minute of slack): nothing here has run on a GPU yet,
# so every phase is budgeted by measurement, not by my estimate. The estimate, from figures measured here: ResNet-20's table is 174 configurations at
# round_to 8 (BENCHMARKS.md); the timing protocol spends >= 0.2 s timed + 50 ms warm-up on each, so
# about 0.3 s each, ~60 s. Training on an H100/H200 is launch-bound for these small nets (a ResNet-20
# step is ~16 GFLOP, microseconds of tensor-core work, but ~300 kernel launches at ~10 us each), so a
# step costs about 3-5 ms (ResNet-20) and 10-14 ms (ResNet-56) almost whatever the batch: at batch 256
# ~0.8-1 s and ~2.5 s per epoch. Hence TRAIN_S20=70 s (~60-80 epochs of ResNet-20, ~91-92%) and
# TRAIN_S56=90 s (~35 epochs of ResNet-56, ~92-93%), and each variant ~10-20 s (K=4 steps of
# scoring and knapsack on the host, up to 3 closed-loop rounds of two networks timed for ~0.3 s each,
# 2 fine-tune epochs). Phases: setup 15 s, profile 65 s, probe 15 s, ResNet-20 train 70 + 12 s and its
# variants until T0+280 s (~7-9 of 8-10), ResNet-56 train 90 + 12 s and its variants until T0+480 s
# (~5: the 0.5 rows come first; those that would end later are skipped and say so). The probe (step 2) replaces my
# per-step guess by a measurement before any epoch count is fixed.
#
# Knobs (environment): MODELS ("resnet20 resnet56"), BUDGET_S, TRAIN_S20, TRAIN_S56, PRUNE_S56 (seconds
# kept for ResNet-56's variants), EPOCHS (fixed epochs: no probe), MAX_EPOCHS, TRAIN_BATCH (256),
# TRAIN_LR (0.2), WARMUP (1 epoch), LAT_BATCH (256), DTYPE (bf16), STEPS (4), FT_EPOCHS (2),
# VERIFY_ROUNDS (3), SEED (0), SUBSET/TEST (images; default all), DATA, WEIGHTS_DIR (start from
# cifar10-MODEL.pt there instead of training), DEVICE (cuda; cpu = smoke run with tiny settings).
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)

PY=${PY:-python3}
OUT=${OUT:-/tmp/fleetprune-gpu-accuracy}
WORK=${WORK:-/tmp/fleetprune-gpu-accuracy-work}
DEVICE=${DEVICE:-cuda}
MODELS=${MODELS:-resnet20 resnet56}
SEED=${SEED:-0}
if [ "$DEVICE" = cpu ]; then
  # Smoke run: a few hundred images, one epoch, quick timing, everything else as on the GPU.
  BUDGET_S=${BUDGET_S:-1500}; EPOCHS=${EPOCHS-1}; SUBSET=${SUBSET:-256}; TEST=${TEST:-200}
  LAT_BATCH=${LAT_BATCH:-16}; DTYPE=${DTYPE:-fp32}; TRAIN_BATCH=${TRAIN_BATCH:-64}; STEPS=${STEPS:-2}
  FT_EPOCHS=${FT_EPOCHS:-0.5}; VERIFY_ROUNDS=${VERIFY_ROUNDS:-2}; FINAL_ROUNDS=${FINAL_ROUNDS:-1}
  PROFILE_ARGS=(--devices cpu --threads 1 --quick); BENCH_ARGS=(--device cpu --timing quick --closed-loop
  --channels-last --timing-threads 1)
else
  BUDGET_S=${BUDGET_S:-480}; LAT_BATCH=${LAT_BATCH:-256}; DTYPE=${DTYPE:-bf16}; TRAIN_BATCH=${TRAIN_BATCH:-256}
  STEPS=${STEPS:-4}; FT_EPOCHS=${FT_EPOCHS:-2}; VERIFY_ROUNDS=${VERIFY_ROUNDS:-3}; FINAL_ROUNDS=${FINAL_ROUNDS:-3}
  PROFILE_ARGS=(--devices gpu); BENCH_ARGS=(--gpu)
fi
TRAIN_LR=${TRAIN_LR:-0.2}
WARMUP=${WARMUP:-1}
ROUND_TO=${ROUND_TO:-8}
MIN_EPOCHS=${MIN_EPOCHS:-5}
MAX_EPOCHS=${MAX_EPOCHS:-200}
TRAIN_S20=${TRAIN_S20:-70}
TRAIN_S56=${TRAIN_S56:-90}
PRUNE_S56=${PRUNE_S56:-90}
AMP=${AMP:-bf16}
DATA=${DATA:-}
if [ -z "$DATA" ]; then
  for d in .benchcache/gpu/cifar10-jpeg.parquet ../shared/data/cifar10-jpeg.parquet; do
    [ -f "$d" ] && { DATA=$d; break; }
  done
fi
[ -n "$DATA" ] && [ -f "$DATA" ] || { echo "error: no cifar10-jpeg.parquet: run 'bash scripts/gpu_check.sh --fetch' here and carry .benchcache/gpu, or set DATA" >&2; exit 2; }

mkdir -p "$OUT/checkpoints" "$WORK"
LOG="$OUT/gpu_accuracy.log"
: >"$LOG"
tables="$WORK/tables"
deadline=$((T0 + BUDGET_S))
left() { echo $((deadline - $(date +%s))); }
say() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a "$LOG"; }
# Run a command, its output (progress bars dropped) into the log; never longer than the time left + 30 s.
run() {
  local limit=$(( $(left) + 30 )); [ "$limit" -lt 30 ] && limit=30
  echo "\$ $*" >>"$LOG"
  timeout --signal=TERM --kill-after=10 "$limit" "$@" 2>&1 | tr '\r' '\n' | { grep -v '%|' || true; } | tee -a "$LOG"
  return "${PIPESTATUS[0]}"
}

if ! "$PY" -c "import torch_pruning" 2>/dev/null; then
  ls .wheels/torch_pruning-*.whl >/dev/null 2>&1 \
    || { echo "error: torch-pruning is missing and .wheels/ holds no wheel of it: run 'bash scripts/gpu_check.sh --fetch' here and carry .wheels" >&2; exit 2; }
  "$PY" -m pip install -q --no-index --no-deps --find-links .wheels torch-pruning 2>&1 | tee -a "$LOG"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 \
  PYTHONUNBUFFERED=1
FP=("$PY" -m fleetprune)  # an array, not a function: `timeout` runs programs only

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  git rev-parse --short HEAD 2>/dev/null || true
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
  echo "device $DEVICE models $MODELS seed $SEED budget ${BUDGET_S}s data $DATA"
  echo "latency: batch $LAT_BATCH $DTYPE nhwc round_to $ROUND_TO; training: batch $TRAIN_BATCH lr $TRAIN_LR warmup $WARMUP amp $AMP; pruning: K=$STEPS, $FT_EPOCHS fine-tune epochs per variant, $VERIFY_ROUNDS closed-loop rounds"
} 2>&1 | tee -a "$LOG"

# 1. the table: every configuration the pruner may choose, on this device, without Ray
say "profile"
for m in $MODELS; do
  run "${FP[@]}" profile "$m" --batch "$LAT_BATCH" --dtype "$DTYPE" --memory-format nhwc --round-to "$ROUND_TO" \
    --tables "$tables" --ray-address none "${PROFILE_ARGS[@]}" || say "profile $m failed (rc $?)"
done
key=$("${FP[@]}" tables ls --tables "$tables" 2>/dev/null | awk 'NR > 1 && $1 != "" {print $1; exit}')
say "table device key: ${key:-none}"

# 2. seconds per training step of each model on the device pipeline (synthetic images, same settings)
declare -A SEC_PER_IT
if [ -z "${EPOCHS:-}" ]; then
  say "probe"
  while read -r m s; do SEC_PER_IT[$m]=$s; done < <(run "$PY" - "$DEVICE" "$TRAIN_BATCH" "$AMP" $MODELS <<'PYEOF' | awk '$1 == "probe" {print $2, $3}'
import sys
import torch
from fleetprune import models
from fleetprune.training import ImageData, Split, TrainConfig, train
device, batch, amp, names = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
if device == "cuda":
    torch.backends.cudnn.benchmark = True
g = torch.Generator().manual_seed(0)
n = batch * 30
split = Split(torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8), torch.randint(0, 10, (n,), generator=g))
data = ImageData({"train": split, "test": split})
for name in names:
    cfg = TrainConfig(epochs=2, batch_size=batch, device=device, data_on_device=True, channels_last=True,
                      amp=None if amp == "none" else amp, progress=False)
    last = train(models.create(name), data, cfg).history[-1]  # epoch 1 pays for cuDNN's autotuning
    print("probe", name, f"{last.seconds / last.iterations:.6f}", flush=True)
PYEOF
)
  for m in $MODELS; do say "probe $m: ${SEC_PER_IT[$m]:-?} s per step at batch $TRAIN_BATCH"; done
fi

train_n=${SUBSET:-50000}
per_epoch=$(( train_n / TRAIN_BATCH )); [ "$per_epoch" -lt 1 ] && per_epoch=1
fit_epochs() {  # seconds -> epochs that fit, within MIN_EPOCHS..MAX_EPOCHS
  "$PY" -c "import sys; s, it, n, lo, hi = map(float, sys.argv[1:]); print(int(max(lo, min(hi, s // max(it * n, 1e-9)))))" \
    "$1" "$2" "$per_epoch" "$MIN_EPOCHS" "$MAX_EPOCHS"
}

models_arr=($MODELS)
for i in "${!models_arr[@]}"; do
  m=${models_arr[$i]}
  later=0  # seconds kept for the models after this one
  if [ $((i + 1)) -lt ${#models_arr[@]} ]; then later=$((TRAIN_S56 + PRUNE_S56 + 20)); fi
  if [ "$m" = resnet20 ]; then want=$TRAIN_S20; prune_min=60; else want=$TRAIN_S56; prune_min=$PRUNE_S56; fi
  ckpt="$OUT/checkpoints/cifar10-$m.pt"

  # 3a. the dense model
  if [ -n "${WEIGHTS_DIR:-}" ] && [ -f "$WEIGHTS_DIR/cifar10-$m.pt" ]; then
    cp "$WEIGHTS_DIR/cifar10-$m.pt" "$ckpt"
    [ -f "$WEIGHTS_DIR/cifar10-$m.json" ] && cp "$WEIGHTS_DIR/cifar10-$m.json" "$OUT/checkpoints/"
    say "$m: dense weights from $WEIGHTS_DIR"
  else
    avail=$(( $(left) - later - prune_min - 15 ))
    secs=$(( want < avail ? want : avail ))
    if [ -n "${EPOCHS:-}" ]; then
      epochs=$EPOCHS
    elif [ "$secs" -lt 20 ] || [ -z "${SEC_PER_IT[$m]:-}" ]; then
      say "$m: skipped (${secs} s left for training, or no probe figure)"; continue
    else
      epochs=$(fit_epochs "$secs" "${SEC_PER_IT[$m]}")
    fi
    say "$m: train $epochs epochs (${secs} s given; ${SEC_PER_IT[$m]:-?} s/step x $per_epoch steps/epoch)"
    t=$(date +%s)
    run "${FP[@]}" -v train "$m" --data "$DATA" --epochs "$epochs" --batch-size "$TRAIN_BATCH" --lr "$TRAIN_LR" \
      --warmup-epochs "$WARMUP" --seed "$SEED" --device "$DEVICE" --data-on-device --channels-last --amp "$AMP" \
      --cache "$WORK/cache/data" --out "$ckpt" --state "$WORK/state/$m.state" \
      --json "$OUT/checkpoints/cifar10-$m.json" --no-progress \
      ${SUBSET:+--subset "$SUBSET"} ${TEST:+--test-subset "$TEST"} || { say "$m: training failed (rc $?)"; continue; }
    say "$m: trained in $(( $(date +%s) - t )) s"
  fi

  # 3b. every method to every budget, fine-tuned alike, evaluated, measured side by side
  stop_at=$(( deadline - later ))
  say "$m: prune with every method until T0+$(( stop_at - T0 )) s"
  t=$(date +%s)
  run "$PY" benchmarks/cifar_accuracy.py "${BENCH_ARGS[@]}" --model "$m" --data "$DATA" --cache "$WORK/cache" \
    --tables "$tables" --dense-weights "$ckpt" --batch "$LAT_BATCH" --dtype "$DTYPE" --amp "$AMP" \
    --round-to "$ROUND_TO" --steps "$STEPS" --finetune-epochs "$FT_EPOCHS" --verify-rounds "$VERIFY_ROUNDS" \
    --final-rounds "$FINAL_ROUNDS" --seed "$SEED" --keep-going --stop-at "$stop_at" \
    --csv "$OUT/accuracy.csv" --json "$OUT/accuracy-$m.json" \
    ${SUBSET:+--subset "$SUBSET"} ${TEST:+--test "$TEST"} || say "$m: the accuracy run failed (rc $?)"
  say "$m: pruned in $(( $(date +%s) - t )) s"
done

say "done in $(( $(date +%s) - T0 )) s"
[ -f "$OUT/accuracy.csv" ] && column -s, -t <"$OUT/accuracy.csv" 2>/dev/null | tee -a "$LOG" || true
ls -la "$OUT" "$OUT/checkpoints" >>"$LOG" 2>&1
