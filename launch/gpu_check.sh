#!/usr/bin/env bash
# The GPU check of deterministic mode, in one go (about 4-5 minutes on one H200):
#   1. configs/digits.py:smoke trained twice in deterministic GPU mode (the default), each
#      compiling from scratch (no compile cache), and their final state hashes compared;
#   2. the ResNet-50 train step at 224x224 (Adam, augmentation, the project's real step):
#      images/s in fp32 and bf16, deterministic mode on and off, one process each (XLA reads
#      its flags when the backend starts): jaxrepro bench speed.
#
# usage: launch/gpu_check.sh [--tiny] [--dry-run] [OUT_DIR]      (run from the repo root)
#   --tiny     a CPU-sized version (short smoke runs, resnet_tiny at 32x32): checks the plumbing
#   --dry-run  print the commands, run nothing
# env: PYTHON (default python3), BATCH (128), STEPS (20), STEP_TIMEOUT (150 s per setting).
# Writes OUT_DIR (default gpu_check_out)/: smoke_{a,b}/ (run workdirs), speed.json, summary.txt.
set -euo pipefail

TINY=0
DRY=0
OUT=gpu_check_out
for arg in "$@"; do
  case "$arg" in
    --tiny) TINY=1 ;;
    --dry-run) DRY=1 ;;
    -*) echo "gpu_check: unknown option $arg" >&2; exit 2 ;;
    *) OUT=$arg ;;
  esac
done
PYTHON=${PYTHON:-python3}
BATCH=${BATCH:-128}
STEPS=${STEPS:-20}
STEP_TIMEOUT=${STEP_TIMEOUT:-150}
cd "$(dirname "$0")/.."

run() {  # print the command; run it unless --dry-run
  echo "+ $*"
  if [ "$DRY" = 0 ]; then "$@"; fi
}

SMOKE=(--config=configs/digits.py:smoke)
SPEED=(batch="$BATCH" steps="$STEPS")
if [ "$TINY" = 1 ]; then
  SMOKE+=(--config.pretrain.steps=4 --config.finetune.steps=2 --config.pretrain.eval_every=0
          --config.finetune.eval_every=0)
  SPEED=(tiny=1)
fi

if [ "$DRY" = 0 ]; then
  mkdir -p "$OUT"
  rm -rf "$OUT/smoke_a" "$OUT/smoke_b" "$OUT/speed.json"
  "$PYTHON" -c "import jax, jaxrepro; print('devices:', jax.devices())" || {
    echo "gpu_check: needs the project importable with jax (pip install -e . in this env)" >&2
    exit 1
  }
fi

# 1. Same config twice, deterministic mode, nothing reused from a compile cache.
export JAXREPRO_COMPILE_CACHE=0
export JAXREPRO_DATA_DIR=${JAXREPRO_DATA_DIR:-$OUT/tfds}
for name in smoke_a smoke_b; do
  run "$PYTHON" -m jaxrepro train "${SMOKE[@]}" --workdir="$OUT/$name"
done

# 2. Train-step speed: fp32 / bf16 x deterministic on / off, one child process each.
run "$PYTHON" -m jaxrepro bench speed "${SPEED[@]}" dtype=float32,bfloat16 deterministic=1,0 \
  timeout="$STEP_TIMEOUT" --out="$OUT"

[ "$DRY" = 1 ] && exit 0
"$PYTHON" - "$OUT" <<'EOF' | tee "$OUT/summary.txt"
import json, os, sys

out = sys.argv[1]
runs = [json.load(open(os.path.join(out, n, "run.json"))) for n in ("smoke_a", "smoke_b")]
hashes = [r.get("final_state_hash") for r in runs]
same = hashes[0] is not None and hashes[0] == hashes[1]
det = runs[0].get("determinism", {})
print(f"backend {runs[0]['platform']['backend']} ({runs[0]['platform']['device_kind']})")
print(f"deterministic mode active: {det.get('active')}  XLA_FLAGS: {det.get('xla_flags')!r}")
print(f"smoke twice: {'BITWISE IDENTICAL' if same else 'DIFFERENT'} final state "
      f"({str(hashes[0])[:16]} vs {str(hashes[1])[:16]})")
print(f"{'dtype':9} {'deterministic':>13} {'images/s':>10} {'step ms':>9} {'compile s':>10}")
for r in json.load(open(os.path.join(out, "speed.json")))["settings"]:
    if "error" in r:
        print(f"{r['dtype']:9} {bool(r['deterministic'])!s:>13}  failed: {r['error']}")
        continue
    print(f"{r['dtype']:9} {r['deterministic']!s:>13} {r['images_per_s']:>10} "
          f"{r['step_ms']:>9} {r['compile_s']:>10}   ({r['arch']} {r['size']}px batch {r['batch']})")
sys.exit(0 if same else 1)
EOF
