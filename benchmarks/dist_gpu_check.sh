#!/usr/bin/env bash
# What DDP and FSDP2 cost per rank: the same small run three times on one GPU —
#   plain `dpls train` (no process group), then `torchrun --nproc_per_node=1` (NCCL) with
#   --parallel=ddp and with --parallel=fsdp — and the throughput of each, as ratios.
# With one rank there is nothing to overlap the communication with and nothing to gain, so
# the ratio is the wrappers' own overhead (hooks, bucket copies, FSDP2's all-gather /
# reduce-scatter calls and parameter casts), the number for benchmarks/RESULTS.md.
#
#   benchmarks/dist_gpu_check.sh                 # small preset, 120 steps
#   PRESET=124m ITERS=200 BATCH=8 benchmarks/dist_gpu_check.sh
#   NPROC=8 benchmarks/dist_gpu_check.sh         # also a torchrun run on 8 GPUs (scaling)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
TORCHRUN=${TORCHRUN:-.venv/bin/torchrun}
PRESET=${PRESET:-small}
ITERS=${ITERS:-120}
BATCH=${BATCH:-8}
NPROC=${NPROC:-1}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu (gloo) only to smoke-test this script without a GPU
WORK=${WORK:-$(mktemp -d -t dpls-dist-check-XXXX)}
mkdir -p "$WORK"
DATA=${DATA:-$WORK/data}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

if [ "$DEVICE" = cuda ]; then
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'dist_gpu_check.sh needs a CUDA GPU')"
fi
[ -f "$DATA/meta.json" ] || "$PY" -m dpls prepare stdlib --out "$DATA"

# Evaluate only at the start and the end, checkpoint only at the end: the timed steps are training.
COMMON=(--model="$PRESET" --data_dir="$DATA" --device="$DEVICE" --max_iters="$ITERS" --batch_size="$BATCH"
        --gradient_accumulation_steps="$NPROC" --log_interval=5 --eval_interval="$ITERS" --eval_iters=2
        --checkpoint_interval="$ITERS" --keep_checkpoints=1 --warmup_iters=10 --progress=false)

run() {  # name, launcher words...
  local name=$1; shift
  echo "== $name: $*" >&2
  rm -rf "${WORK:?}/$name"
  "$@" "${COMMON[@]}" --out_dir="$WORK/$name" > "$WORK/$name.log" 2>&1 || { cat "$WORK/$name.log" >&2; exit 1; }
}
run plain "$PY" -m dpls train
run ddp   "$TORCHRUN" --standalone --nproc_per_node=1 -m dpls train --parallel=ddp
run fsdp  "$TORCHRUN" --standalone --nproc_per_node=1 -m dpls train --parallel=fsdp
NAMES="plain ddp fsdp"
if [ "$NPROC" -gt 1 ]; then
  run "ddp_x$NPROC"  "$TORCHRUN" --standalone --nproc_per_node="$NPROC" -m dpls train --parallel=ddp
  run "fsdp_x$NPROC" "$TORCHRUN" --standalone --nproc_per_node="$NPROC" -m dpls train --parallel=fsdp
  NAMES="$NAMES ddp_x$NPROC fsdp_x$NPROC"
fi

"$PY" - "$WORK" "$PRESET" "$NPROC" $NAMES <<'PYEOF'
import json, statistics, sys
from pathlib import Path

import torch

work, preset, nproc, names = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4:]


def rows(name):
    lines = (work / name / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "tokens_per_s" in r]


runs = {n: rows(n) for n in names}
# Drop the first quarter of the logged intervals: allocator warm-up, cuDNN/cuBLAS autotuning.
tps = {n: statistics.median(r["tokens_per_s"] for r in rs[len(rs) // 4 :]) for n, rs in runs.items()}
base = tps["plain"]
device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
print(f"device: {device}; preset {preset}; torch {torch.__version__}")
print(f"{'run':<12}{'tokens/s':>14}{'per rank':>14}{'vs plain':>10}{'overhead':>10}{'max |dloss|':>13}")
for n in names:
    ranks = nproc if "_x" in n else 1
    per_rank = tps[n] / ranks
    ratio = per_rank / base
    common = min(len(runs[n]), len(runs["plain"]))
    dloss = max(abs(a["loss"] - b["loss"]) for a, b in zip(runs[n][:common], runs["plain"][:common]))
    print(f"{n:<12}{tps[n]:>14,.0f}{per_rank:>14,.0f}{ratio:>10.3f}{(1 / ratio - 1) * 100:>9.1f}%{dloss:>13.2e}")
print("overhead = extra time per token of one rank relative to the plain single-process run;")
print("max |dloss| compares the logged training losses with the plain run (same seed and data).")
PYEOF
echo "(runs and logs in $WORK)"
