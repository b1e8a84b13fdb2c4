#!/usr/bin/env bash
# The GPU benchmarks in one go (issue 15, "GPU readiness"), results in benchmarks/results/gpu/:
#   1. the --device tests (tests/test_gpu.py; skipped, with the reason, where there is no CUDA)
#   2. enhance ms/image at 2048x2048, alone and in batches (images/s): benchmarks.gpu_enhance;
#      2b. the node's worker on the device with [worker] batch 1 and 8: benchmarks.workers
#   3. the Table-1 full run on the device: benchmarks.table1 (hours; resumable, it reuses the
#      checkpoints already trained under var/table1-full/)
#
#   benchmarks/gpu.sh                   # on a GPU machine: everything, --device cuda
#   benchmarks/gpu.sh --device cpu --smoke
#                                       # a quick check of the script itself: small sizes, and the
#                                       # Table-1 command only parsed (--help), not run
#   benchmarks/gpu.sh --no-table1       # steps 1 and 2 only
set -euo pipefail
cd "$(dirname "$0")/.."

device=cuda
smoke=0
table1=1
while (( $# )); do
  case "$1" in
    --device) device="$2"; shift 2 ;;
    --smoke) smoke=1; shift ;;
    --no-table1) table1=0; shift ;;
    *) echo "usage: $0 [--device cuda|cuda:N|cpu] [--smoke] [--no-table1]" >&2; exit 2 ;;
  esac
done

python=.venv/bin/python
[[ -x "$python" ]] || scripts/setup
out=benchmarks/results/gpu
[[ "$smoke" == 1 ]] && out=var/gpu-smoke
mkdir -p "$out"
echo "results in $out/ (device $device$([[ $smoke == 1 ]] && echo ', smoke'))"
"$python" - <<'EOF'
import torch
print(f"torch {torch.__version__}; CUDA available: {torch.cuda.is_available()}",
      *(f"; {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())), sep="")
EOF

echo "== 1. --device tests"
"$python" -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$out/tests.txt"

echo "== 2. enhance at 2048x2048, alone and batched"
if [[ "$smoke" == 1 ]]; then
  "$python" -m benchmarks.gpu_enhance --device "$device" --size 512 --batch 1 2 --repeats 2 | tee "$out/enhance.txt"
else
  "$python" -m benchmarks.gpu_enhance --device "$device" --size 2048 --batch 1 4 8 16 32 --repeats 20 | tee "$out/enhance.txt"
fi

echo "== 2b. the node's worker on the device: images/s of 2500x2000 CR, [worker] batch 1 and 8"
if [[ "$smoke" == 1 ]]; then
  "$python" -m benchmarks.workers --device "$device" --batch 1 8 --processes 1 --n 4 --rows 256 --cols 200 --repeats 1
else
  "$python" -m benchmarks.workers --device "$device" --batch 1 8 --processes 1 --n 48 --repeats 3
fi | tee "$out/workers.txt"

echo "== 3. Table 1, the full run"
table1_cmd=("$python" -m benchmarks.table1 --device "$device" --out "$out/table1")
echo "${table1_cmd[*]}"
if [[ "$smoke" == 1 ]]; then
  "${table1_cmd[@]}" --help >/dev/null && echo "(smoke: the command parses; not run)"
elif [[ "$table1" == 1 ]]; then
  "${table1_cmd[@]}" 2>&1 | tee "$out/table1.log"
else
  echo "(--no-table1: not run)"
fi
