#!/usr/bin/env bash
# The checks that need a GPU, in one go (steps 1-5: about 3 minutes on an H200; step 6 has
# not run on a GPU yet):
#   1. the one-time compilation of the fused CUDA AdaBelief, with Triton's cache empty and warm;
#   2. the optimizer tests on CUDA (the Triton kernel compiled, the AdaBelief class on CUDA);
#   3. the fused AdaBelief's launch shapes against Adam(fused=True);
#   4. the optimizer benchmark on CUDA, ratios to Adam(fused=True);
#   5. training on CUDA against the same run on CPU (per-sample and micro-batch estimators);
#   6. the cost of the gradient statistics on CUDA (test_overhead.py, every kind and floor;
#      one run per model, so that a failure on one keeps the other's table).
# Run from the repository root with torch (CUDA), Triton and the test extra importable;
# arguments pick steps (default: all), e.g. `bash benchmarks/cuda_check.sh 1 2 4`.
set -u
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
RUNS=/tmp/cuda_check  # run directories of step 5; everything else goes to stdout
STEPS=" ${*:-1 2 3 4 5 6} "
want() { [[ "$STEPS" == *" $1 "* ]]; }
nvidia-smi -L
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

if want 1; then
  echo "== 1. compile cost (in a process with CUDA up; Triton's cache empty, then warm)"
  export TRITON_CACHE_DIR=/tmp/cuda_check_triton_cache
  rm -rf "$TRITON_CACHE_DIR"
  for i in cold cached; do
    python3 -c "
import time, torch
torch.zeros(1, device='cuda')
from adabatch.optim.fused import build
t = time.perf_counter(); build('cuda')
print('build(\"cuda\") ($i): %.2f s' % (time.perf_counter() - t))"
  done
  unset TRITON_CACHE_DIR
fi

if want 2; then
  echo "== 2. tests"
  python3 -m pytest -q -p no:cacheprovider -n 8 tests/optim 2>&1 | tail -n 15
fi

if want 3; then
  echo "== 3. launch shapes"
  python3 benchmarks/fused_cuda_launch.py --sets resnet18 transformer --rounds 10
fi

if want 4; then
  echo "== 4. optimizer benchmark"
  python3 benchmarks/optimizer_step.py --device cuda --ref "torch Adam (fused)" --rounds 20 \
    2>&1 | grep -v -i "warn\|p.data.add_\|add_(\|signatures"
fi

if want 5; then
  echo "== 5. training on CUDA and on CPU (digits MLP; AdaBelief picks its fused kernel)"
  mkdir -p "$RUNS"
  for run in "per-sample adagradnorm" "micro-batch adagradnorm" "per-sample adabelief"; do
    set -- $run
    for dev in cuda cpu; do
      extra=""
      [ "$1" = micro-batch ] && extra="--micro-batch 8"
      dir="$RUNS/train-$1-$2-$dev"
      if ! python3 -m adabatch.cli train --device "$dev" --estimator "$1" --optimizer "$2" \
          $extra --quiet --no-plots --out "$dir" > "$dir.log" 2>&1; then
        echo "$run $dev failed:"; tail -n 20 "$dir.log"; continue
      fi
      python3 -c "import json, sys; d = json.load(open(sys.argv[1]))
keys = ('device', 'test_accuracy', 'steps', 'final_batch_size', 'stat_warnings', 'wall_time_s')
print(sys.argv[2], {k: d[k] for k in keys})" "$dir/summary.json" "$run"
    done
  done
fi

if want 6; then
  echo "== 6. statistics overhead on CUDA (ratios to a plain step, distances to the floors)"
  for model in mlp cnn; do
    python3 benchmarks/test_overhead.py --device cuda --models "$model" \
      --sizes 128,1024,8192 --rounds 10 --reps 5 2>&1 | grep -v -i "warn"
  done
fi
