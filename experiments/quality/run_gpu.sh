#!/usr/bin/env bash
# The one prepared GPU call of the quality benchmark (experiments/quality/run.py): recipes x samplers at
# an equal budget, against the design's sampler on the design's recipe. Needs no TFDS, Grain
# or network: the data, the classifier and the ml-collections wheel travel in .gpu/
# (carry it), written here once by
#
#   TFDS_DATA_DIR=.cache/tfds DDPM_JAX_MANUAL_DIR=../shared/data/fashion_mnist \
#     python -m experiments.quality.data --classifier_dir=CLS --out_dir=.gpu
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .gpu/whl ml-collections==1.1.0
#
# and run from the repository root as the device command `bash experiments/quality/run_gpu.sh`.
# The budget is in environment variables (defaults: each recipe 1,200 steps at batch 64,
# 1,000 samples per variant; about 7 minutes estimated on an H200, most of it compiling and
# training): RECIPES, T, SOLVER (the DPM-Solver++ variants), STEPS, BATCH, STEPS_PER_CALL, SAMPLES, CHUNK, DESIGN_VARIANTS,
# RECIPE_VARIANTS, MAX_TRAIN_S (every network stops training at the first 200-step mark past
# it), LIMIT (s, run.py's time limit; the results so far are kept), QUALITY_ARGS
# (appended; QUALITY_ARGS=--check_only SKIP_WHEELS=1 checks the arguments on any machine). SKIP_WHEELS=1 skips the wheel install (a machine that has
# ml-collections). Files back in $OUT: env.txt, run.log, quality.json, table.md and
# results.tar.gz (grids/, features.npz) in parts of at most 15 MiB.
set -u -o pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1  # bootstrap: 1 BLAS thread
OUT="${OUT:-$(mktemp -d)}"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
WORK="${WORK:-/tmp/quality}"
mkdir -p "$OUT" "$WORK"
if [ "${SKIP_WHEELS:-0}" != 1 ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$WORK/site" .gpu/whl/*.whl || exit 1
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
  date -u
  nvidia-smi
  "$PY" -c 'import sys, jax, flax, optax, numpy, torch, ml_collections
print("python", sys.version.split()[0], "jax", jax.__version__, "flax", flax.__version__,
      "optax", optax.__version__, "numpy", numpy.__version__, "torch", torch.__version__)
print("jax devices:", jax.devices())'
} 2>&1 | tee "$OUT/env.txt"

T="${T:-200}"  # the config's timesteps, in the variant names
RECIPES="${RECIPES:-design scaled scaled-v scaled-v-minsnr zero-v-minsnr scaled-x0 scaled-x0-minsnr scaled-eps-minsnr}"
SOLVER="${SOLVER-ema-dpmpp2m20-clip ema-dpmpp2m10-clip ema-dpmpp2m15-clip ema-dpmpp2m20time-clip}"
RECIPE_VARIANTS="${RECIPE_VARIANTS:-ema-ddpm$T-clip $SOLVER ema-ddim50-clip}"
DESIGN_VARIANTS="${DESIGN_VARIANTS:-raw-ddpm$T-eq11 ema-ddpm$T-clip $SOLVER ema-ddim50-clip raw-ddpm$T-clip}"
# shellcheck disable=SC2086  # the lists split into arguments
timeout --signal=TERM --kill-after=15 "${LIMIT:-470}" "$PY" -m experiments.quality.run \
  --data_npz .gpu/fashion_mnist.npz --classifier_dir .gpu/classifier.msgpack \
  --out_dir "$WORK" --recipes $RECIPES --variants $DESIGN_VARIANTS \
  --recipe_variants $RECIPE_VARIANTS --steps "${STEPS:-1200}" --batch_size "${BATCH:-64}" \
  --steps_per_call "${STEPS_PER_CALL:-1}" --num_samples "${SAMPLES:-1000}" \
  --chunk_size "${CHUNK:-1000}" --bpd_images 0 --no_torch --no_params \
  --compile_threads 12 --log_every 200 --max_train_s "${MAX_TRAIN_S:-230}" \
  ${QUALITY_ARGS:-} 2>&1 | tee "$OUT/run.log"
echo "run.py exit ${PIPESTATUS[0]}" | tee -a "$OUT/run.log"

if [ -f "$WORK/quality.json" ]; then
  cp "$WORK/quality.json" "$OUT/"
  "$PY" -c 'import json, sys; from experiments.quality import variants as q
print(q.table(json.load(open(sys.argv[1]))))' "$WORK/quality.json" | tee "$OUT/table.md"
  tar -C "$WORK" -czf - grids features.npz | split -b 15M - "$OUT/results.tar.gz.part-"
fi
ls -la "$OUT"
