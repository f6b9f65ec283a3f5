#!/usr/bin/env bash
# Prepares, in this checkout, what bench/gpu/run.sh needs on a GPU machine that can download
# nothing: .whl/ (the wheels of bench/gpu/wheels.txt for Python 3.12 on x86-64) and
# .gpu_data/ (the MNIST and Fashion-MNIST IDX files, SHA-256 verified). Both are
# git-ignored; name them in the device tool's `carry`. Together about 52 MB.
#
#   bench/gpu/prepare.sh                          # IDX files downloaded from the mirrors
#   BCAM_DATA_DIR=../shared/data bench/gpu/prepare.sh   # copied from <dir>/<name>/ first
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .whl .gpu_data
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
  manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
grep -v -e '^#' -e '^promise' bench/gpu/wheels.txt >.whl/requirements.txt
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d .whl -r .whl/requirements.txt
python -m pip wheel -q --no-deps -w .whl "$(grep '^promise' bench/gpu/wheels.txt)"
rm .whl/requirements.txt
for name in mnist fashion_mnist; do
  if [ -n "${BCAM_DATA_DIR:-}" ] && [ -d "$BCAM_DATA_DIR/$name" ]; then
    mkdir -p ".gpu_data/$name"
    cp "$BCAM_DATA_DIR/$name"/*-ubyte* ".gpu_data/$name/"
  fi
done
# Verifies what was copied and fetches what is missing.
python -m bcam_jax.commands.data download --dataset=mnist --dataset=fashion_mnist --dest=.gpu_data
du -sh .whl .gpu_data
