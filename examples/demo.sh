#!/usr/bin/env bash
# The README's demo: extract two layers of ResNet-18 for the bundled sample images, then export.
# Uses torchvision's pretrained weights when they can be had (internet or torch hub cache);
# otherwise it says so loudly and runs on explicitly random weights. (The library itself
# never falls back: this choice is made here, in the demo, and recorded in the manifest.)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=${OUT:-demo-out}
weights=pretrained
if ! "$BIN/python" -c "import layertap as lt; lt.load_model('resnet18', 'pretrained')" >/dev/null 2>&1; then
  weights=random
  echo "=====================================================================" >&2
  echo " DEMO: pretrained ResNet-18 weights could not be downloaded here."    >&2
  echo " Running on RANDOM, UNTRAINED weights (seed 0) to show the pipeline."  >&2
  echo " These activations mean nothing scientifically."                      >&2
  echo "=====================================================================" >&2
fi
"$BIN/layertap" extract --model resnet18 --weights "$weights" --layers layer4 avgpool --flatten \
  --images examples/images --out "$OUT" --batch-size 8 --overwrite --format npy
"$BIN/python" - "$OUT" <<'PY'
import sys
import numpy as np
import layertap as lt
run = lt.open_run(sys.argv[1])
print(run)
for layer in run.layers:
    a = run[layer]
    print(f"  {layer}: {a.shape} {a.dtype}  mean {np.asarray(a).mean():+.4f}")
print("  weights:", run.manifest["model"]["weights"])
print("  classes:", run.classes)
print(f"  exported .npy files and images.csv in {run.path / 'export-npy'}")
PY
