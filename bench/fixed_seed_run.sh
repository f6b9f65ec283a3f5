#!/bin/bash
# A fixed-seed training run of REPO (a checkout) into WORKDIR, to compare metrics.jsonl record
# for record between two revisions (timing fields aside). Usage: bench/fixed_seed_run.sh REPO WORKDIR
# MNIST IDX from $BCAM_IDX_DIR (default ../shared/data/mnist).
cd "$1" && PYTHONPATH="$1" python train.py --config=configs/experiment.py:model=simple_cnn,loss=bcpl \
  --config.data.source=idx --config.data.idx_dir="${BCAM_IDX_DIR:-/work/shared/data/mnist}" --config.data.val_size=500 \
  --config.train.num_steps=40 --config.train.eval_every_steps=20 --config.train.log_every_steps=10 \
  --config.train.checkpoint_every_steps=20 --config.eval.batch_size=500 --workdir="$2" > "$2.log" 2>&1
echo rc=$?
