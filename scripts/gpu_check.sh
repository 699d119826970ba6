#!/usr/bin/env bash
# On the GPU machine: keep the bundle parts this call carried (see scripts/gpu_bundle.sh); given a
# results path, install the bundle once and run scripts/gpu_check.py.
#
#   bash scripts/gpu_check.sh --stash                        # a call that only carries a part
#   bash scripts/gpu_check.sh $OUT/gpu_results.json [opts]   # the check; opts go to gpu_check.py
#
# The bundle is unpacked into its own folder put first on PYTHONPATH, so its onnxruntime-gpu shadows the
# image's CPU onnxruntime without touching the image; a rerun on the warm machine reuses it.
set -uo pipefail
cd "$(dirname "$0")/.."
PARTS=/tmp/embedder-gpu-parts
SITE=/tmp/embedder-gpu-site
mkdir -p "$PARTS"
for f in .gpu/part-* .gpu/SHA256SUMS; do
    [ -f "$f" ] && cp -f "$f" "$PARTS/"
done
if [ "${1:-}" = "--stash" ]; then
    ls -l "$PARTS"
    exit 0
fi
if [ $# -lt 1 ]; then
    echo "usage: bash scripts/gpu_check.sh --stash | RESULTS.json [gpu_check.py options]" >&2
    exit 2
fi
if [ ! -f "$SITE/.installed" ]; then
    if ! (cd "$PARTS" && sha256sum --quiet -c SHA256SUMS); then
        echo "gpu_check: bundle parts missing or damaged in $PARTS; carry every part again" >&2
        exit 3
    fi
    rm -rf "$SITE" && mkdir -p "$SITE"
    cat "$PARTS"/part-* | python3 -c 'import sys, tarfile; tarfile.open(fileobj=sys.stdin.buffer, mode="r|xz").extractall(sys.argv[1], filter="data")' "$SITE" || exit 3
    touch "$SITE/.installed"
fi
# CUDA 13 and cuDNN 9 from the image's nvidia-* wheels (torch's own), also for the child processes:
# onnxruntime's preload_dlls may miss them where they are not in the first site-packages.
NVLIBS=$(python3 -c 'import glob, os, nvidia; print(":".join(sorted({d for p in nvidia.__path__ for d in glob.glob(os.path.join(p, "*", "lib"))})))' 2>/dev/null)
[ -n "$NVLIBS" ] && export LD_LIBRARY_PATH="$NVLIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
results=$1
shift
exec python3 scripts/gpu_check.py --out "$results" "$@"
