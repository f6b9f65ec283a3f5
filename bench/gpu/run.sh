#!/usr/bin/env bash
# bcam-jax on one GPU in one command that ends inside $BUDGET_S seconds (default 540):
#
#   setup    install the carried wheels (.whl/), record versions and the card (env.json)
#   smoke    3 training steps of simple_cnn; if they fail, stop here (fail fast)
#   table1   three Table 1 cells (configs/grids/gpu_table1.py), one process each, in the
#            background from the start; paused (SIGSTOP) while speed is timed
#   tests    the tests that matter on a GPU (lowering, Batch-CAM vs the naive loops,
#            bfloat16, sharded steps on a one-GPU mesh, a train.py killed and resumed on
#            the GPU)
#   speed    bench/gpu/speed.py: ours against the PyTorch twins, MFU, memory, compile time
#   report   summary.md; the Table 1 results (or each cell's progress when the time ran
#            out: the cells resume from their checkpoints on the next call)
#
# Everything goes to $OUT: run.log, summary.md and gpu_results.tar.gz (speed.json/md,
# tests log, Table 1 results.md/csv and prototype figures, env.json). Before the call, in
# the checkout: bench/gpu/prepare.sh (wheels into .whl/, IDX files into .gpu_data/).
#
#   bench/gpu/run.sh              # everything, on the GPU (device tool: carry .whl .gpu_data)
#   bench/gpu/run.sh table1       # on the same warm machine: resume the Table 1 cells
#   DRY=1 BUDGET_S=1500 bench/gpu/run.sh   # CPU dry run: tiny sizes, 1-epoch cells on
#                                          # generated data
set -o pipefail
export PYTHONUNBUFFERED=1
# Every JAX process (tests, their train.py subprocesses, the three cells, the benchmark,
# which shares its process with PyTorch) takes GPU memory as it needs it, not 75% up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
cd "$(dirname "$0")/../.." || exit 1
REPO=$PWD
MODE=${1:-all}
DRY=${DRY:-0}
BUDGET_S=${BUDGET_S:-540}
OUT=${OUT:-/tmp/bcam_gpu_out}
RUNS=${RUNS:-/tmp/bcam_gpu_runs}  # workdirs: outside $OUT, kept while the machine is warm
STAGE=$RUNS/results               # what the archive holds
START=$(date +%s)
mkdir -p "$OUT" "$STAGE"
exec > >(tee -a "$OUT/run.log") 2>&1

elapsed() { echo $(($(date +%s) - START)); }
left() { echo $((BUDGET_S - $(elapsed))); }
log() { echo "[$(elapsed) s] $*"; }
archive() {
  tar czf "$OUT/gpu_results.tar.gz.tmp" -C "$RUNS" results && mv "$OUT/gpu_results.tar.gz.tmp" "$OUT/gpu_results.tar.gz"
}

# --- setup ---------------------------------------------------------------------------------
if [ "$DRY" != 1 ] && ls .whl/*.whl >/dev/null 2>&1; then  # wheels for the GPU's Python 3.12
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { log "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$REPO
else
  export PYTHONPATH=$REPO
fi
if [ "$DRY" = 1 ]; then
  export JAX_PLATFORMS=cpu
  PLATFORM=cpu
  GRID_ARG=",epochs=1"
  SPEED_ARGS="--models=resnet18 --sizes=8 --dtypes=float32 --batch=8 --steps=1 --rounds=1 \
    --max_batch_groups= --compile_groups="
  export BCAM_DATA_DIR=$RUNS/dry_data
  [ -d "$BCAM_DATA_DIR" ] || python3 -c "
from tests import synthetic
for name in ('mnist', 'fashion_mnist'):
    synthetic.write_dataset('$BCAM_DATA_DIR/' + name, n_train=5128, n_test=100)"
else
  PLATFORM=cuda
  GRID_ARG=""
  SPEED_ARGS=""
  [ -d .gpu_data ] && export BCAM_DATA_DIR=$REPO/.gpu_data
fi
python3 - "$STAGE/env.json" <<'EOF'
import importlib.metadata as md, json, subprocess, sys
import jax
env = {'devices': [str(d) for d in jax.devices()], 'backend': jax.default_backend()}
for name in ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'chex', 'numpy', 'torch',
             'tensorflow-datasets', 'ml-collections', 'dm-pix'):
    try:
        env[name] = md.version(name)
    except md.PackageNotFoundError:
        env[name] = None
try:
    env['nvidia-smi'] = subprocess.run(
        ['nvidia-smi', '--query-gpu=name,memory.total,driver_version,clocks.max.sm',
         '--format=csv,noheader'], capture_output=True, text=True, timeout=20).stdout.strip()
except (OSError, subprocess.SubprocessError):
    env['nvidia-smi'] = None
json.dump(env, open(sys.argv[1], 'w'), indent=2)
print(json.dumps(env))
EOF

# --- smoke ---------------------------------------------------------------------------------
if [ "$MODE" = all ]; then
  log "smoke: 3 steps of simple_cnn"
  python3 -c "from tests import synthetic; synthetic.write_dataset('$RUNS/idx')" &&
    timeout 180 python3 train.py --config=experiment:model=simple_cnn --workdir="$RUNS/smoke" \
      --config.data.source=idx --config.data.idx_dir="$RUNS/idx" --config.data.val_size=40 \
      --config.train.batch_size=8 --config.train.num_steps=3 --config.eval.batch_size=40 \
      >"$STAGE/smoke.log" 2>&1
  smoke=$?
  tail -5 "$STAGE/smoke.log"
  if [ $smoke != 0 ]; then
    log "smoke FAILED (exit $smoke): stopping; see smoke.log in the archive"
    echo "smoke failed (exit $smoke)" >"$STAGE/summary.md"
    tail -40 "$STAGE/smoke.log" >>"$STAGE/summary.md"
    cp "$STAGE/summary.md" "$OUT/"
    archive
    exit 1
  fi
fi

# --- table1 (background) --------------------------------------------------------------------
CELLS="resnet18_baseline resnet18_bcpl_l2 convnext_bcpl_l1"
PIDS=()
for cell in $CELLS; do
  python3 reproduce.py \
    --grid="configs/grids/gpu_table1.py:$cell$GRID_ARG" --workdir="$RUNS" \
    --results_dir="$STAGE/cells/$cell" >>"$STAGE/table1_$cell.log" 2>&1 &
  PIDS+=($!)
done
log "table1: cells started (pids ${PIDS[*]})"

# --- tests -----------------------------------------------------------------------------------
if [ "$MODE" = all ]; then
  # Four pytest workers where pytest-xdist is installed (it is on the GPU image): the
  # killed-and-resumed train.py alone takes about 2 minutes there.
  workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 4")
  log "tests (budget 200 s)"
  BCAM_TEST_XLA_OPTIMIZE=1 BCAM_TEST_SUBPROCESS_PLATFORMS=$PLATFORM timeout 200 python3 -m pytest -v $workers -p no:cacheprovider \
    tests/test_conv.py tests/test_cam.py tests/test_train.py \
    -k "auto_lowering or model_same or batch_cam or grad_cam_equals or gradients_same \
or bfloat16 or killed_run or bcpl_training_lowers" \
    >"$STAGE/tests.log" 2>&1
  log "tests: exit $? ($(grep -c PASSED "$STAGE/tests.log") passed, $(grep -c FAILED "$STAGE/tests.log") failed)"
  archive
fi

# --- speed (Table 1 cells paused) ------------------------------------------------------------
if [ "$MODE" = all ]; then
  kill -STOP "${PIDS[@]}" 2>/dev/null
  budget=$(($(left) - 130))
  [ $budget -gt 300 ] && budget=300
  log "speed (budget $budget s; Table 1 cells paused)"
  timeout $((budget + 60)) python3 bench/gpu/speed.py \
    --budget_s=$budget --out_dir="$STAGE" $SPEED_ARGS >"$STAGE/speed.log" 2>&1
  log "speed: exit $?"
  kill -CONT "${PIDS[@]}" 2>/dev/null
  archive
fi

# --- table1: until 40 s before the end ------------------------------------------------------
while [ "$(left)" -gt 40 ]; do
  alive=0
  for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
  [ $alive = 0 ] && break
  sleep 5
done
for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null; done
wait "${PIDS[@]}" 2>/dev/null
finished=$(python3 -c "
import os
from bcam_jax import grids
from bcam_jax.configs.grids import gpu_table1
for key in gpu_table1.CELLS:
    (cell,) = grids.expand(gpu_table1.get_config(key + '$GRID_ARG'))
    if os.path.exists(os.path.join('$RUNS', 'gpu_table1', cell.name, 'cell.json')):
        print(key)")
log "table1: finished: $(echo $finished)"
if [ -n "$finished" ]; then
  # The finished cells' results.md/csv and prototype figures (their training is skipped).
  timeout 60 python3 reproduce.py --grid="configs/grids/gpu_table1.py:$(echo $finished | tr ' ' '+')$GRID_ARG" \
    --workdir="$RUNS" --results_dir="$STAGE/table1" >>"$STAGE/table1_report.log" 2>&1
fi
python3 - "$RUNS/gpu_table1" "$STAGE/table1_progress.md" <<'EOF'
import glob, json, os, sys
lines = ['| cell | finished | last step | last val accuracy | test accuracy |', '|---|---|---|---|---|']
for cell in sorted(glob.glob(os.path.join(sys.argv[1], '*', ''))):
    records = []
    if os.path.exists(os.path.join(cell, 'metrics.jsonl')):
        records = [json.loads(l) for l in open(os.path.join(cell, 'metrics.jsonl')) if l.strip()]
    val = [r for r in records if r.get('split') == 'val']
    test = [r for r in records if r.get('split') == 'test']
    step = max((r.get('step', 0) for r in records), default=0)
    fmt = lambda rs: f"{100 * rs[-1]['accuracy']:.2f}%" if rs else '-'
    done = os.path.exists(os.path.join(cell, 'cell.json'))
    lines.append(f'| {os.path.basename(cell[:-1])} | {done} | {step} | {fmt(val)} | {fmt(test)} |')
open(sys.argv[2], 'w').write('\n'.join(lines) + '\n')
print('\n'.join(lines))
EOF

# --- report ----------------------------------------------------------------------------------
{
  echo "# bcam-jax GPU run ($(date -u +%Y-%m-%dT%H:%MZ), $(elapsed) s, mode $MODE)"
  echo
  echo '```'
  cat "$STAGE/env.json"
  echo '```'
  echo
  [ -f "$STAGE/tests.log" ] && echo "Tests:" && grep -E "PASSED|FAILED" "$STAGE/tests.log" && echo
  [ -f "$STAGE/speed.md" ] && cat "$STAGE/speed.md" && echo
  echo "## Table 1 cells"
  echo
  if [ -f "$STAGE/table1/results.md" ]; then cat "$STAGE/table1/results.md"; fi
  cat "$STAGE/table1_progress.md"
} >"$STAGE/summary.md"
cp "$STAGE/summary.md" "$OUT/summary.md"
archive
log "done; $OUT holds run.log, summary.md, gpu_results.tar.gz"
