#!/usr/bin/env bash
# The one prepared call for a lent GPU (issue 7): environment, then bench/benchmark.py
# for the Fashion-MNIST and CIFAR-10 configs, results into $OUT, table last.
#
#   bash bench/run_gpu.sh [fashion|cifar10]  # from the repository root; $OUT: where results go
#   bash bench/run_gpu.sh profile            # the conv-formulation study and kernel profiles
#
# On a cold H100 the Fashion-MNIST run takes ~8 minutes and CIFAR-10 ~3, most of it XLA
# and torch.compile compiling: more than one 10-minute call, so BENCHMARKS.md runs them
# as two calls (FASHION_LIMIT / CIFAR_LIMIT: each process's time limit, s). Each config
# runs in its own process (JAX's peak-memory counter is per process, and a timeout keeps
# the parts done); inside a process every part is caught, and the JSON is rewritten after
# each part. JAX and PyTorch share the GPU in one process (JAX allocates on demand).
# CIFAR-10 skips sampling and torch.compile (CIFAR_PARTS: its parts, default train,bf16).
# TRACE=1 adds the JAX steps' top GPU kernels (~50 s more per config).
# Files back: env.txt, run.log, <config>.json, table.md.
set -u -o pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT="${OUT:-$(mktemp -d)}"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
mkdir -p "$OUT"
echo "results in $OUT; python $PY"
# The project installs beside the image's own JAX (jax 0.11.x on Python 3.12): setup.cfg
# accepts jax 0.10.2-0.12.x, so `pip install -e .` changes no JAX package and no JAX wheel
# is carried. The machine reaches no registry: --no-index, the image's setuptools, and
# --no-deps, since TensorFlow and TFDS (needed only to prepare TFDS data, not here) are
# not in the image. Its one missing dependency, ml-collections (pure Python), comes from
# .whl/ when carried (see BENCHMARKS.md); elsewhere plain `pip install -e .` does it all.
"$PY" -m pip install -q --no-index --no-build-isolation --no-deps -e . \
  || echo "pip install -e . failed; running from the source tree"
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps .whl/*.whl
fi

{
  date -u
  nvidia-smi
  uptime
  "$PY" -c 'import sys, jax, jaxlib, flax, optax, numpy, torch
print("python", sys.version.split()[0], "jax", jax.__version__, "jaxlib", jaxlib.__version__,
      "flax", flax.__version__, "optax", optax.__version__, "numpy", numpy.__version__,
      "torch", torch.__version__, "cuda", torch.version.cuda)
print("jax devices:", jax.devices())'
} 2>&1 | tee "$OUT/env.txt"

# `run_gpu.sh profile`: the formulation study (bench/gpu_profile.py) instead of the benchmark.
if [ "${1:-}" = profile ]; then
  timeout --signal=TERM --kill-after=10 "${PROFILE_LIMIT:-330}" "$PY" bench/gpu_profile.py \
    --out "$OUT" --deadline "${PROFILE_DEADLINE:-280}" 2>&1 | tee "$OUT/profile.log"
  exit "${PIPESTATUS[0]}"
fi

run() {  # run <name> <time limit s> <benchmark args...>
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s): $*"
  timeout --signal=TERM --kill-after=10 "$limit" "$PY" bench/benchmark.py "$@" \
    --out "$OUT/$name.json" ${TRACE:+--trace-dir /tmp/traces}
  echo "=== $name exit $?"
}

CONFIGS="${1:-fashion cifar10}"
{
  for config in $CONFIGS; do
    case $config in
      # Fashion-MNIST: training f32/bf16, sampling, 200-step bf16-vs-f32 losses, torch.compile.
      fashion) run fashion "${FASHION_LIMIT:-480}" --configs fashion --steps 10 --warmup 3 \
                 --loss-steps 200 ;;
      # CIFAR-10: training f32/bf16 against PyTorch eager.
      cifar10) run cifar10 "${CIFAR_LIMIT:-240}" --configs cifar10 --frameworks jax,torch \
                 --steps 10 --warmup 3 --parts "${CIFAR_PARTS:-train,bf16}" ;;
      *) echo "unknown config $config; valid: fashion, cifar10, profile"; exit 2 ;;
    esac
  done
  "$PY" bench/benchmark.py --report "$OUT"/*.json | tee "$OUT/table.md"
} 2>&1 | tee "$OUT/run.log"
