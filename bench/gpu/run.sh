#!/usr/bin/env bash
# bcam-jax on one GPU, most valuable stage first, each stage inside what is left of
# $BUDGET_S seconds (default 540, under the device tool's 600 s per call):
#
#   finetune       train.py fine-tuning a pretrained-layout ResNet-50 at 224 px bfloat16 with
#                  BCPL on a generated folder, 300 steps (bench/finetune.py)
#   speed224       ResNet-50 and ViT-S/16 at 224 px bfloat16: ours (ce, bcpl) against PyTorch
#                  eager, channels_last and torch.compile (bench/gpu/speed.py)
#   finetune_more  the CA-Stream (frozen backbone) and Soft-CAM protocols, 100 steps each
#
#   ab       the speed A/B: ResNet18 at 112 px bfloat16, ce and bcpl, our step in every
#            variant of $AB_VARIANTS (BatchNorm forms, XLA flag sets, deterministic ops)
#            against PyTorch eager (NCHW, channels_last) and torch.compile, one interleaved
#            loop (bench/gpu/speed.py --variants)
#   speed    the full speed table (speed.py's GROUPS in order until its budget is spent),
#            our step with $SPEED_VARIANTS (default: the library's defaults), plus the
#            largest batch that fits
#   tests    the tests that never ran on a GPU (test_cam.py, test_bfloat16.py,
#            test_batch_norm.py, bfloat16 and BCPL training), on the GPU
#   resume   a train.py killed mid-epoch and resumed on the GPU, compared bit for bit with
#            an uninterrupted run; again with --xla_gpu_deterministic_ops=true if it differs
#   table1   three Table 1 cells (configs/grids/gpu_table1.py) until the budget ends; they
#            resume from their checkpoints on the next call
#
# Stages are named on the command line (default: ab speed tests resume table1; the three
# above run when named); setup (the carried wheels, env.json) runs first every time. Everything goes to $OUT: run.log, summary.md and
# gpu_results.tar.gz (ab.json/md, speed.json/md, tests.log, resume.log, Table 1
# results.md/csv and prototype figures, env.json). Before the first call, in the checkout:
# bench/gpu/prepare.sh (wheels into .whl/, IDX files into .gpu_data/).
#
#   bench/gpu/run.sh ab speed               # call 1 (device tool: carry .whl .gpu_data)
#   bench/gpu/run.sh tests resume table1    # call 2, on the same warm machine
#   DRY=1 BUDGET_S=1500 bench/gpu/run.sh    # CPU dry run: tiny sizes, 1-epoch cells on
#                                           # generated data
set -o pipefail
export PYTHONUNBUFFERED=1
# Every JAX process (tests, their train.py subprocesses, the three cells, the benchmark,
# which shares its process with PyTorch) takes GPU memory as it needs it, not 75% up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
cd "$(dirname "$0")/../.." || exit 1
REPO=$PWD
STAGES=${*:-ab speed tests resume table1}
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
  AB_ARGS="--sizes=8 --dtypes=float32 --batch=8 --steps=1 --rounds=1 --compile_groups="
  export BCAM_DATA_DIR=$RUNS/dry_data
  [ -d "$BCAM_DATA_DIR" ] || python3 -c "
from tests import synthetic
for name in ('mnist', 'fashion_mnist'):
    synthetic.write_dataset('$BCAM_DATA_DIR/' + name, n_train=5128, n_test=100)"
else
  PLATFORM=cuda
  GRID_ARG=""
  SPEED_ARGS=""
  AB_ARGS="--sizes=112 --dtypes=bfloat16 --compile_groups=resnet18:112:bfloat16"
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

# --- stages ----------------------------------------------------------------------------------
want() { [[ " $STAGES " == *" $1 "* ]]; }
# The A/B's variants: our step as it is, each BatchNorm form, autotuning off and at level 2
# (default 4), the fusion autotuner, cuDNN conv fusion, and the cost of deterministic ops.
# A flag this jaxlib lacks fails its variant only (ab.md says which).
AB_VARIANTS=${AB_VARIANTS:-default,batch_norm=custom_vjp,batch_norm=flax_fast_variance,\
xla_gpu_autotune_level=0,xla_gpu_autotune_level=2,\
xla_gpu_experimental_enable_fusion_autotuner=true,\
xla_gpu_experimental_enable_conv_fusion=true,xla_gpu_deterministic_ops=true}
SPEED_VARIANTS=${SPEED_VARIANTS:-default}
[ "$DRY" = 1 ] && AB_VARIANTS=default,batch_norm=custom_vjp,xla_gpu_autotune_level=0

# Fine-tuning at 224 px through train.py (issue 32): a pretrained-layout ResNet-50 (random
# weights stand in) on a generated folder of 256 px JPEGs, BCPL first, then CA-Stream on the
# frozen backbone and Soft-CAM with what is left (bench/finetune.py).
if [ "$DRY" = 1 ]; then
  FINETUNE_ARGS="--batch=4 --steps=2 --log_every=1 --per_class=2"
  FINETUNE_MORE_ARGS="--batch=4 --steps=2 --log_every=1 --per_class=2"
else
  FINETUNE_ARGS="--batch=128 --steps=300 --log_every=50 --dtype=bfloat16 --per_class=100"
  FINETUNE_MORE_ARGS="--batch=128 --steps=100 --log_every=25 --dtype=bfloat16 --per_class=100"
fi
if want finetune; then
  budget=$(($(left) - 60))
  [ $budget -gt 240 ] && budget=240
  log "finetune (budget $budget s): bcpl"
  timeout $budget python3 bench/finetune.py --protocols=bcpl $FINETUNE_ARGS \
    --work_dir="$RUNS/finetune" --out_dir="$STAGE/finetune" >"$STAGE/finetune.log" 2>&1
  log "finetune: exit $?"
  archive
fi

if want speed224; then
  budget=$(($(left) - 150))
  log "speed224 (budget $budget s): ResNet-50 and ViT-S/16 at 224 px bfloat16"
  if [ $budget -gt 60 ]; then
    if [ "$DRY" = 1 ]; then
      args="--sizes=32 --dtypes=float32 --batch=2 --steps=1 --rounds=1 --compile_groups="
    else
      args="--sizes=224 --dtypes=bfloat16"
    fi
    timeout $((budget + 90)) python3 bench/gpu/speed.py --models=resnet50,vit_s16 \
      --losses=ce,bcpl --max_batch_groups= --budget_s=$budget --out_dir="$STAGE/speed224" \
      $args >"$STAGE/speed224.log" 2>&1
    log "speed224: exit $?"
    archive
  fi
fi

if want finetune_more && [ "$(left)" -gt 100 ]; then
  log "finetune_more (budget $(($(left) - 40)) s): ca_stream, softcam"
  timeout $(($(left) - 40)) python3 bench/finetune.py --protocols=ca_stream,softcam \
    $FINETUNE_MORE_ARGS --work_dir="$RUNS/finetune" --out_dir="$STAGE/finetune_more" \
    >"$STAGE/finetune_more.log" 2>&1
  log "finetune_more: exit $?"
  archive
fi

if want ab; then
  budget=$(($(left) - 60))
  [ $budget -gt 240 ] && budget=240
  log "ab (budget $budget s): $AB_VARIANTS"
  mkdir -p "$STAGE/ab"
  timeout $((budget + 120)) python3 bench/gpu/speed.py --models=resnet18 --losses=ce,bcpl \
    --variants="$AB_VARIANTS" --max_batch_groups= --budget_s=$budget --out_dir="$STAGE/ab" \
    $AB_ARGS >"$STAGE/ab.log" 2>&1
  status=$?
  log "ab: exit $status"
  archive
  if [ $status != 0 ] && ! grep -q '| ours |' "$STAGE/ab/speed.md" 2>/dev/null; then
    # Nothing of ours ran: the environment is broken and every later stage would fail too.
    log "ab FAILED before any row: stopping; see ab.log in the archive"
    { echo "ab failed (exit $status)"; tail -40 "$STAGE/ab.log"; } >"$STAGE/summary.md"
    cp "$STAGE/summary.md" "$OUT/"
    archive
    exit 1
  fi
fi

if want speed; then
  budget=$(($(left) - 100))
  log "speed (budget $budget s; variants $SPEED_VARIANTS)"
  if [ $budget -gt 60 ]; then
    timeout $((budget + 90)) python3 bench/gpu/speed.py --variants="$SPEED_VARIANTS" \
      --budget_s=$budget --out_dir="$STAGE" $SPEED_ARGS >"$STAGE/speed.log" 2>&1
    log "speed: exit $?"
    archive
  fi
fi

# Tests run with XLA's optimiser on (as users run), their train.py subprocesses on the GPU;
# four pytest workers where pytest-xdist is installed.
workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n $([ "$DRY" = 1 ] && echo 2 || echo 4)")
GPU_PYTEST=(env BCAM_TEST_XLA_OPTIMIZE=1 BCAM_TEST_SUBPROCESS_PLATFORMS=$PLATFORM
  python3 -m pytest -v -p no:cacheprovider -o addopts=)

if want tests && [ "$(left)" -gt 90 ]; then
  budget=$(($(left) - 60))
  [ $budget -gt 240 ] && budget=240
  log "tests (budget $budget s)"
  timeout $budget "${GPU_PYTEST[@]}" $workers --dist loadfile tests/test_cam.py tests/test_bfloat16.py \
    tests/test_batch_norm.py \
    "tests/test_train.py::test_bfloat16_compute_trains" \
    "tests/test_train.py::test_bcpl_training_lowers_both_terms" >"$STAGE/tests.log" 2>&1
  log "tests: exit $? ($(grep -c PASSED "$STAGE/tests.log") passed, $(grep -c FAILED "$STAGE/tests.log") failed)"
  archive
fi

if want resume && [ "$(left)" -gt 90 ]; then
  test=tests/test_train.py::test_killed_run_resumes_to_bitwise_identical_parameters
  log "resume (budget $(($(left) - 40)) s)"
  begin=$(date +%s)
  timeout $(($(left) - 40)) "${GPU_PYTEST[@]}" "$test" >"$STAGE/resume.log" 2>&1
  status=$?
  log "resume: exit $status in $(($(date +%s) - begin)) s"
  if [ $status = 1 ] && [ "$(left)" -gt 90 ]; then
    log "resume differs: again with --xla_gpu_deterministic_ops=true"
    begin=$(date +%s)
    XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_deterministic_ops=true" \
      timeout $(($(left) - 40)) "${GPU_PYTEST[@]}" "$test" >"$STAGE/resume_deterministic.log" 2>&1
    log "resume deterministic: exit $? in $(($(date +%s) - begin)) s"
  fi
  archive
fi

# --- table1: until 40 s before the end ------------------------------------------------------
if want table1 && [ "$(left)" -gt 60 ]; then  # the lines below, unindented, are this stage
CELLS="resnet18_baseline resnet18_bcpl_l2 convnext_bcpl_l1"
PIDS=()
for cell in $CELLS; do
  python3 reproduce.py \
    --grid="configs/grids/gpu_table1.py:$cell$GRID_ARG" --workdir="$RUNS" \
    --results_dir="$STAGE/cells/$cell" >>"$STAGE/table1_$cell.log" 2>&1 &
  PIDS+=($!)
done
log "table1: cells started (pids ${PIDS[*]})"
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
fi

# --- report ----------------------------------------------------------------------------------
{
  echo "# bcam-jax GPU run ($(date -u +%Y-%m-%dT%H:%MZ), $(elapsed) s, stages: $STAGES)"
  echo
  echo '```'
  cat "$STAGE/env.json"
  echo
  echo '```'
  echo
  for f in finetune finetune_more; do
    if [ -f "$STAGE/$f.log" ]; then echo "## $f"; echo; grep -A12 '^resnet50 at 224' "$STAGE/$f.log" || tail -5 "$STAGE/$f.log"; echo; fi
  done
  if [ -f "$STAGE/speed224/speed.md" ]; then echo "## Speed at 224"; sed 1d "$STAGE/speed224/speed.md"; echo; fi
  if [ -f "$STAGE/ab/speed.md" ]; then echo "## A/B"; sed 1d "$STAGE/ab/speed.md"; echo; fi
  if [ -f "$STAGE/speed.md" ]; then echo "## Speed"; sed 1d "$STAGE/speed.md"; echo; fi
  for log in tests resume resume_deterministic; do
    [ -f "$STAGE/$log.log" ] || continue
    echo "## $log"
    echo
    grep -E "PASSED|FAILED|ERROR|passed|failed" "$STAGE/$log.log" | tail -40
    echo
  done
  if [ -f "$STAGE/table1_progress.md" ]; then
    echo "## Table 1 cells"
    echo
    if [ -f "$STAGE/table1/results.md" ]; then cat "$STAGE/table1/results.md"; fi
    cat "$STAGE/table1_progress.md"
  fi
} >"$STAGE/summary.md"
cp "$STAGE/summary.md" "$OUT/summary.md"
archive
log "done; $OUT holds run.log, summary.md, gpu_results.tar.gz"
