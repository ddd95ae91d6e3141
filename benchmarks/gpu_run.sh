#!/bin/bash
# The GPU rows of the README in one call, within a time budget (seconds, default 480):
# benchmarks/gpu.py on ResNet-18 x 50k (at most --resnet_share percent of the budget, default 60)
# and on the GPT-2-small-shaped decoder (the rest). JSON and logs go to $OUT (default
# /tmp/gpu_out). Wheels in .whl/ (ml-collections, which the GPU image lacks) are installed to
# /tmp/site first. $RESNET_ARGS and $GPT_ARGS add flags (a CPU check of the script:
# RESNET_ARGS="--resnet_examples=64 --resnet_width=4 --batch_size=32"
# GPT_ARGS="--gpt_examples=64 --gpt_width=32 --gpt_depth=1 --gpt_heads=2").
#
#   bash benchmarks/gpu_run.sh 480
set -u
out=${OUT:-/tmp/gpu_out}
mkdir -p "$out"
budget=${1:-480}
resnet_share=${2:-60}
deadline=$(( $(date +%s) + budget ))
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__,
'optax', optax.__version__, jax.devices())"; } 2>&1 | tee "$out/env.txt"

step() {  # step NAME SHARE_OF_WHAT_IS_LEFT ARGS...
  local name=$1 share=$2; shift 2
  local left=$(( deadline - $(date +%s) ))
  local limit=$(( left * share / 100 ))
  if (( limit < 1 )); then echo "== $name: no time left"; return; fi
  echo "== $name: $limit s of $left left"
  timeout --signal=KILL "$limit" python3 benchmarks/gpu.py --problem="$name" \
    --json_out="$out/$name.json" "$@" > "$out/$name.log" 2>&1
  echo "== $name: exit $? after $(( $(date +%s) + left - deadline )) s"
  grep -v "^[IW][0-9]" "$out/$name.log" | cut -c1-600 | tail -n 12
}
step resnet "$resnet_share" --noexplicit ${RESNET_ARGS:-}
step gpt 100 ${GPT_ARGS:-}
