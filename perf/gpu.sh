#!/usr/bin/env bash
# The GPU checks and benchmarks, as one script for a lent GPU machine (see perf/README.md).
#
#   bash perf/gpu.sh OUT_DIR [quick]
#
# Runs the CUDA tests (tests/test_gpu.py, marked gpu), then the explain, fit and precision
# benchmarks with --device cuda; logs and result JSON go to OUT_DIR. Uses the machine's own
# python3 and torch; captum and zennit from wheels in .whl/ if present (no network there).
# Each step has its own time limit, so one stuck step does not cost the others.
set -u
out=${1:?usage: gpu.sh OUT_DIR [quick]}
quick=${2:-}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src:$PWD/tests:${PYTHONPATH:-}
if [ -f .gpudata/t10k-images-idx3-ubyte.gz ]; then
    export PATTERNNET_FASHION=$PWD/.gpudata/t10k-images-idx3-ubyte.gz
fi
log=$out/gpu.log
step() {  # step SECONDS NAME COMMAND...
    local limit=$1 name=$2
    shift 2
    local start=$SECONDS
    echo "=== $name" | tee -a "$log"
    timeout "$limit" "$@" >>"$log" 2>&1
    echo "=== $name: exit $? in $((SECONDS - start)) s" | tee -a "$log"
    # results so far, packed after every step (a later step cut off by a limit loses nothing)
    tar -czf "$out/results.tgz" perf/results/*cuda*.json 2>/dev/null
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >>"$log" 2>&1
python3 -c 'import torch, sys; print("torch", torch.__version__, "python", sys.version.split()[0],
"cuda", torch.version.cuda, torch.cuda.get_device_name(0))' >>"$log" 2>&1
step 240 tests python3 -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider -rfE
if [ "$quick" != quick ]; then  # the whole CPU suite, on this machine's torch, with CUDA present
    step 300 "whole suite" python3 -m pytest -q -p no:cacheprovider -rfE -n 8 tests
fi
rounds=20
[ "$quick" = quick ] && rounds=5
for model in vgg16 resnet50; do
    step 60 "syncs $model" python3 -m perf.syncs --device cuda --model "$model"
    step 150 "explain $model" python3 -m perf.explain --device cuda --model "$model" \
        --batch 8 --rounds "$rounds"
done
step 90 "fit vgg16 a+ float32" python3 -m perf.fit --device cuda --model vgg16 \
    --batches 9 --no-negative --precision float32
step 90 "fit vgg16 a+ a- float32" python3 -m perf.fit --device cuda --model vgg16 \
    --batches 9 --precision float32
step 90 "fit vgg16 linear float32" python3 -m perf.fit --device cuda --model vgg16 \
    --batches 9 --estimator linear --precision float32
step 90 "fit vgg16 a+ a- float64" python3 -m perf.fit --device cuda --model vgg16 \
    --batches 9 --precision float64
step 90 "fit vgg16 a+ float32 batch 64" python3 -m perf.fit --device cuda --model vgg16 \
    --batches 9 --batch 64 --no-negative --precision float32
step 90 "fit resnet50 a+ float32" python3 -m perf.fit --device cuda --model resnet50 \
    --batches 9 --no-negative --precision float32
step 120 "precision vgg16" python3 -m perf.precision --device cuda --model vgg16 \
    --batches 8 --batch 8
echo "=== done in $SECONDS s" | tee -a "$log"
