#!/usr/bin/env bash
# The benchmark suite on one GPU, in one prepared command, in under 8 minutes; results go to the folder given.
#
#   benchmarks/gpu.sh OUT_DIR          # e.g. benchmarks/gpu.sh benchmarks/results/gpu-h100
#   PYTHON=/path/to/python BUDGET_S=470 benchmarks/gpu.sh OUT_DIR
#
# Needs a Python with jax[cuda] and diffbio_eqx's dependencies (run from a checkout; the package is put on
# PYTHONPATH). Peer tools (harmonypy, scanpy, umap-learn) are optional: a comparison whose peer is missing is
# recorded as failed and the rest goes on. Steps, in order of priority, each under `timeout` and all within
# BUDGET_S seconds (a step is skipped when the budget is spent):
#   0. warm start (issue 23, the open figures): `diffbio-eqx run` at 5k cells twice (cold, then cached
#      compilation) against scanpy's workflow on the CPU cores, with the training floor -> front_door.json
#   1. scaling: every stage at 10k and 100k cells, those on embeddings at 1M too (VAE training at batch 1024 and
#      128) -> scaling.json
#      (the GPU targets: Harmony on 1M x 50 in < 1 s, VAE training >= 300k cells/s, inference >= 1M cells/s)
#   2. doublets: our Scrublet (GPU) vs scanpy.pp.scrublet (CPU) at 20k cells -> doublets.json (issue 15)
#   3. harmony: ours on the GPU vs harmonypy (CPU) at 100k cells
#   4. vmap: 16-theta Harmony sweep at 100k cells, 16-seed VAE ensemble at 20k cells, retrace checks
#   5. pipeline: the scanpy pipeline (CPU) vs ours (GPU) at 20k cells
#   6. umap: embedding new cells vs umap-learn's transform
#   7. study: issue 26's vmapped grid (one compiled call vs a Python loop) -> end_to_end.json
# Then benchmarks/render.py writes OUT_DIR/summary.md and OUT_DIR/scaling.png. To put GPU figures in the README,
# copy OUT_DIR under benchmarks/results/ and run `python benchmarks/render.py` (it reads subfolders too).
#
# Status: run once on an H200 (2026-12-04, README "The first GPU run"): in 8 minutes it finished scaling (cut
# during vae_infer), one doublets round and harmony, and ran out in vmap; all seven steps need about 15 minutes,
# more than one 10-minute command of this workplace's device tool: raise BUDGET_S where a run may take longer.
# Step 0 (the warm start) was added on 2026-12-05 and has not run on a GPU yet.
set -u -o pipefail

OUT=${1:?usage: benchmarks/gpu.sh OUT_DIR}
PYTHON=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-470}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/gpu.log"
: > "$LOG"

export EQX_ON_ERROR=${EQX_ON_ERROR:-raise}     # equinox's default, what users run (issue 27)
export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}            # fail loudly rather than benchmark the CPU by mistake
# Parents and per-stage child processes share the GPU: allocate on demand instead of each process grabbing 75%.
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

if ! "$PYTHON" -c 'import jax, sys; print("devices:", jax.devices()); sys.exit(jax.default_backend() != "gpu")' \
    2>&1 | tee -a "$LOG"; then
  echo "gpu.sh: JAX sees no GPU (install jax[cuda]); nothing measured" | tee -a "$LOG"
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.csv" 2>/dev/null || true

step() {  # step NAME MAX_SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET_S - SECONDS))
  if ((left < 30)); then
    echo "== $name: skipped, budget spent" | tee -a "$LOG"
    return 0
  fi
  ((limit > left)) && limit=$left
  echo "== $name (at most ${limit} s; ${SECONDS} s elapsed)" | tee -a "$LOG"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  echo "== $name: exit ${PIPESTATUS[0]} after ${SECONDS} s" | tee -a "$LOG"
}

SUITE=("$PYTHON" "$HERE/run.py" --gpu --no-readme --out "$OUT" --only)  # `timeout` needs a command, not a function

# issue 23's warm start: on an accelerator compiling may dominate the job, unlike on 2 CPU cores
WARM_WORK=$(mktemp -d)
step warm_start 240 "$PYTHON" "$HERE/bench_front_door.py" --warm-start 5000 --rounds 1 --training-floor \
  --work "$WARM_WORK" --out "$OUT/front_door.json"
rm -rf "$WARM_WORK"
step scaling 260 "${SUITE[@]}" scaling
# issue 15's Scrublet at 20k cells: ours on the GPU against scanpy.pp.scrublet on this machine's CPU cores
step doublets 110 "$PYTHON" "$HERE/bench_doublets.py" --sizes 20000 --tools scrublet scanpy --rounds 2 \
  --results "$OUT/doublets.json"
step harmony 60 "${SUITE[@]}" harmony
step vmap 60 "${SUITE[@]}" vmap
step pipeline 90 "${SUITE[@]}" pipeline
step umap 45 "${SUITE[@]}" umap
# issue 26's vmapped study (theta x temperature x 8 seeds in one call vs a Python loop); no datasets, grid only
step study 45 "$PYTHON" "$HERE/study_end_to_end.py" --datasets none --out "$OUT/end_to_end.json"
"$PYTHON" "$HERE/render.py" --results "$OUT" --no-readme 2>&1 | tee -a "$LOG"
echo "gpu.sh: done in ${SECONDS} s; results in $OUT" | tee -a "$LOG"
