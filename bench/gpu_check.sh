#!/usr/bin/env bash
# On a machine with a GPU and this repo (plus data/gpu_carry from bench/gpu_prepare.sh): train on
# BCCD, test, and run the two benchmarks, printing the figures the GPU targets are about:
#   training time (proposals excluded: they come from the carried file) and fine-tuning it/s,
#   test mAP, `bench/detect_stages.py` total_s and its stages, `bench/spp_vs_rcnn.py` speed-ups.
# Needs torch, torchvision and timm there; installs the carried wheels into /tmp/site.
set -euo pipefail
cd "$(dirname "$0")/.."
C=${CARRY:-data/gpu_carry}
PY=${PY:-python3}
if ls "$C"/whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$C"/whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
P="--proposals $C/bccd_proposals.npz"
$PY -c "import torch; print('gpu:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"
rm -rf "$C/run" "$C/cache"
start=$($PY -c "import time; print(time.time())")
$PY tools/train.py --dataset "$C/BCCD" --out "$C/run" --cache "$C/cache" --config configs/bccd.yaml $P --quiet \
  ${EXTRA_TRAIN:-} | grep -E "stages run|fine-tuning:|model written"
$PY -c "import time; print(f'train_s = {time.time() - $start:.1f}  # whole tools/train.py, proposals from the file (target <= 120)')"
$PY - "$C/run/stages.json" <<'PYEOF'
import json, sys
s = json.load(open(sys.argv[1]))
ft = s["finetune"]
print(f"finetune_it_per_s = {ft['iterations'] / ft['seconds']:.1f}  # target >= 150")
PYEOF
$PY tools/test_voc.py --model "$C/run/model.safetensors" --dataset "$C/BCCD" --split test $P --quiet | tail -8
$PY bench/detect_stages.py --model "$C/run/model.safetensors" --dataset "$C/BCCD" $P | tail -22
$PY bench/spp_vs_rcnn.py --model "$C/run/model.safetensors" --dataset "$C/BCCD" $P --timing-only \
    --rcnn-time-images 3 | tail -12
