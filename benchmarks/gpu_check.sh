#!/usr/bin/env bash
# The one-GPU check of issue 10: a real `skcdf train synapse_20p` on a paper-size phantom, the data
# streams, prediction and the training step, in one go, with one markdown table at the end
# (docs/performance.md says where its figures go). A time budget (default 480 s) keeps it within 8
# minutes: step measurements that would start after it are reported as skipped.
#
#   bash benchmarks/gpu_check.sh [--toy] [WORKDIR]
#
#   --toy     the same stages on the CPU at toy size: the smoke test that tests/test_benchmarks.py runs
#   WORKDIR   where the phantom, the run and results.jsonl go (default: a new temporary folder)
#   env       PYTHON (interpreter with skcdf installed; default python), GPU_CHECK_BUDGET (seconds, default
#             480), GPU_CHECK_EPOCHS (epochs of the training run; default 21, i.e. 20 timed epochs with
#             2 checkpoints at the preset's save_every: 10)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python}
toy=false
if [[ ${1:-} == --toy ]]; then
  toy=true
  shift
fi
work=${1:-$(mktemp -d -t skcdf-gpu-check.XXXXXX)}
mkdir -p "$work"
results=$work/results.jsonl
: >"$results"
deadline=$(($(date +%s) + ${GPU_CHECK_BUDGET:-480} - 10)) # 10 s kept for the table

if $toy; then
  shape=(32 48 48)
  epochs=3
  train_settings=(device=cpu patch_size=[32,32,32] filters=4 num_workers=0 iterations_per_epoch=2)
  data_args=(--patch 32 32 32 --epochs 2)
  predict_args=(--quick --device cpu --repeats 1)
  step_args=(--configs toy --devices cpu --variants fp32 bf16_cl --repeats 2)
else
  shape=(80 160 160)
  epochs=${GPU_CHECK_EPOCHS:-21}
  train_settings=()  # the preset as it is; amp and channels_last are auto: bf16 + channels_last_3d on CUDA
  data_args=(--epochs 5)
  predict_args=(--device cuda --repeats 5)
  step_args=(--configs paper phantom --devices cuda --variants fp32 bf16 bf16_cl compiled graphed
    --repeats 15 --timeout 150)
fi

# A stage that fails leaves a row saying so; the others still run.
failed() { # benchmark name, message
  printf '{"benchmark": "%s", "error": "%s"}\n' "$1" "$2" >>"$results"
}

echo "== skcdf phantom --shape ${shape[*]}"
"$python" -m skcdf phantom "$work/phantom" --shape "${shape[@]}"

echo "== skcdf train synapse_20p: $epochs epochs"
start=$(date +%s.%N)
if timeout $((deadline - $(date +%s))) "$python" -m skcdf train synapse_20p --data "$work/phantom" \
  --out "$work/run" --set "epochs=$epochs" ${train_settings[@]+"${train_settings[@]}"}; then
  wall=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { print b - a }')
  "$python" "$here/gpu_check_report.py" train-row "$work/run" "$work/phantom" "$wall" 1500 >>"$results" ||
    failed train "could not time the run (see above)"
else
  failed train "skcdf train failed or ran past the time budget (exit status $?)"
fi

echo "== benchmarks/data_epoch.py: the data side of an epoch, num_workers 0 and 2"
"$python" "$here/data_epoch.py" "$work/phantom" --workers 0 2 "${data_args[@]}" --jsonl "$results" ||
  failed data "data_epoch.py failed (see above)"

echo "== benchmarks/predict.py"
"$python" "$here/predict.py" "${predict_args[@]}" --jsonl "$results" || failed predict "predict.py failed (see above)"

echo "== benchmarks/train_step.py"
"$python" "$here/train_step.py" "${step_args[@]}" --deadline "$deadline" --jsonl "$results" ||
  failed step "train_step.py failed (see above)"

echo
"$python" -c 'import torch; print("== gpu_check:", torch.cuda.get_device_name() if torch.cuda.is_available()
                                    else "no CUDA device", "- torch", torch.__version__)'
"$python" "$here/gpu_check_report.py" table "$results"
