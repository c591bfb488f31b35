#!/bin/bash
# Several text-to-image GAN variants at once on one device, each with FID-FM tracked and its best step kept, then
# `vislang generate-eval` on each and one summary line per run. A GPU has room for many of these small runs side by
# side; the H200 rows of docs/gan-fashion-mnist.md were made this way (five runs, MINUTES=6.5 THREADS=3).
#
#   bash examples/gan_sweep.sh OUT_DIR "NAME=FLAGS" ["NAME=FLAGS" ...]
#   bash examples/gan_sweep.sh runs/sweep "b256=--batch_size=256 --gan.model.g_width=32 --gan.model.d_width=32" "b128=--batch_size=128"
#
# Environment: MINUTES (training time per run, 6.5), DEVICE (auto), THREADS (3), JUDGE (runs/finetune/scratch/model,
# from `vislang finetune --model fmnist-cnn --method scratch --out runs/finetune`), TEXT_MODEL (runs/demo/model),
# FID_IMAGES (5000, tracked), N_PER_CLASS (1000, generate-eval), VISLANG (.venv/bin/vislang).
set -u
if [ $# -lt 2 ]; then sed -n 2,12p "$0"; exit 2; fi
OUT=$1; shift
MINUTES=${MINUTES:-6.5} DEVICE=${DEVICE:-auto} THREADS=${THREADS:-3} VISLANG=${VISLANG:-.venv/bin/vislang}
JUDGE=${JUDGE:-runs/finetune/scratch/model} TEXT_MODEL=${TEXT_MODEL:-runs/demo/model}
PY=$(dirname "$VISLANG")/python; [ -x "$PY" ] || PY=python3  # the Python that has vislang's torch
EVAL_DEVICE=$DEVICE; [ "$DEVICE" = auto ] && EVAL_DEVICE=$("$PY" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")' 2>/dev/null || echo cpu)
for d in "$JUDGE" "$TEXT_MODEL"; do [ -f "$d/config.json" ] || { echo "no model directory at $d (see the header of $0)"; exit 2; }; done
mkdir -p "$OUT"
names=()
for v in "$@"; do
  name=${v%%=*}; flags=${v#*=}
  [ "$name" != "$v" ] || { echo "variant '$v' is not NAME=FLAGS"; exit 2; }
  [ -e "$OUT/$name" ] && { echo "$OUT/$name exists: choose another name or OUT_DIR"; exit 2; }
  names+=("$name")
  # shellcheck disable=SC2086  # FLAGS are meant to split into arguments
  ( "$VISLANG" train --config gan --gan.text_model="$TEXT_MODEL" --epochs=100000 --time_budget_min="$MINUTES" \
      --device="$DEVICE" --threads="$THREADS" --progress=false --gan.judge="$JUDGE" --gan.fid_every=1000 \
      --gan.fid_images="${FID_IMAGES:-5000}" --gan.keep_best=true $flags --out_dir="$OUT/$name" > "$OUT/$name.train.log" 2>&1 \
    && "$VISLANG" generate-eval --model "$OUT/$name" --judge "$JUDGE" --device "$EVAL_DEVICE" \
      --n-per-class "${N_PER_CLASS:-1000}" > "$OUT/$name.eval.log" 2>&1
    echo "$name finished (exit $?)" ) &
done
wait
for name in "${names[@]}"; do
  "$PY" - "$OUT/$name" <<'PY'
import json, sys
run = sys.argv[1]
try:
    r = json.load(open(f"{run}/eval/results.json"))
    t = json.load(open(f"{run}/model/config.json"))["train"]
except (OSError, KeyError) as e:
    sys.exit(print(f"{run}: no result ({e}); see {run}.train.log and {run}.eval.log"))
print(f"{run}: {t['steps']} steps, kept {t.get('generator_step')}: FID-FM {r['fid_fm']:.4f} "
      f"({r['fid_fm_over_floor']:.1f}x the floor), KID {r['kid_fm']:.4f}, class consistency {r['class_consistency']:.1%}, "
      f"IS {r['is_generated']:.2f}")
PY
done
