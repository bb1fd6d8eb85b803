#!/usr/bin/env bash
# The checks that need a GPU, in one go (about 5 minutes on an H200):
#   1. the one-time compilation of the fused CUDA AdaBelief, cold and from Triton's cache;
#   2. the optimizer tests on CUDA (the Triton kernel compiled, the AdaBelief class on CUDA);
#   3. the fused AdaBelief's launch shapes against Adam(fused=True);
#   4. the optimizer benchmark on CUDA, ratios to Adam(fused=True);
#   5. training on CUDA against the same run on CPU (per-sample and micro-batch estimators).
# Run from the repository root with torch (CUDA), Triton and the test extra importable.
set -u
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=/tmp/cuda_check  # run directories (large); the output goes to stdout
mkdir -p "$OUT"
nvidia-smi -L
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
echo "== 1. compile cost"
for i in cold cached; do
  python3 -c "
import time; t = time.perf_counter()
from adabatch.optim.adabelief_fused import build; build('cuda')
print('build(\"cuda\") in a fresh process ($i): %.2f s' % (time.perf_counter() - t))"
done
echo "== 2. tests"
python3 -m pytest -q -p no:cacheprovider -n 8 tests/optim 2>&1 | tail -n 15
echo "== 3. launch shapes"
python3 benchmarks/fused_cuda_launch.py --sets resnet18 transformer --rounds 10
echo "== 4. optimizer benchmark"
python3 benchmarks/optimizer_step.py --device cuda --ref "torch Adam (fused)" --rounds 20 \
  2>&1 | grep -v -i "warn\|p.data.add_"
echo "== 5. training on CUDA and on CPU (digits MLP; AdaBelief picks its fused kernel)"
for run in "per-sample adagradnorm" "micro-batch adagradnorm" "per-sample adabelief"; do
  set -- $run
  for dev in cuda cpu; do
    extra=""
    [ "$1" = micro-batch ] && extra="--micro-batch 8"
    dir="$OUT/train-$1-$2-$dev"
    python3 -m adabatch.cli train --device "$dev" --estimator "$1" --optimizer "$2" $extra \
      --quiet --no-plots --out "$dir" > "$dir.log" 2>&1 || { echo "$run $dev failed:"; tail -n 20 "$dir.log"; continue; }
    python3 -c "import json, sys; d = json.load(open(sys.argv[1]))
print(sys.argv[2], {k: d[k] for k in ('device', 'test_accuracy', 'steps', 'final_batch_size', 'stat_warnings', 'wall_time_s')})" "$dir/summary.json" "$run"
  done
done
