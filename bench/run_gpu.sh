#!/usr/bin/env bash
# The one prepared call for a lent GPU: environment, then bench/benchmark.py, results into
# $OUT, table last: every measurement in ONE call (~9 minutes on a cold H100), since a lent
# machine's time counts from its start.
#
#   bash bench/run_gpu.sh                    # from the repository root; $OUT: where results go
#   bash bench/run_gpu.sh fashion cifar10    # some of the runs below only
#
# Runs, in order of priority, each its own process under a time limit (s; a timeout keeps
# the parts done, the JSON is rewritten after each part):
#   fashion (FASHION_LIMIT 320)  f32, batch 128: JAX with steps_per_call 1 and 8 against
#                PyTorch eager, torch.compile default and mode='reduce-overhead' (CUDA
#                graphs); 64 x 200 DDPM and 64 x 50 DDIM sampling against the PyTorch loops.
#   cifar10 (CIFAR_LIMIT 120)    bf16, batch 128, JAX only: MFU against the bf16 peak.
#   fashion_nocb (NOCB_LIMIT 90) the Fashion JAX step (k = 1) again with XLA's command buffers
#                (CUDA graphs) off, XLA_FLAGS=--xla_gpu_enable_command_buffer= (the rows
#                "fashion nocb"; the fashion run has XLA's default command buffers).
# Every JAX row carries its MFU (bench/flops.py). BENCH_ARGS is appended to every
# benchmark call (the CPU check: BENCH_ARGS="--quick --batch 8 --steps 1 --warmup 1
# --ddpm-steps 2 --ddim-steps 2"). TRACE=1 adds the JAX steps' top GPU kernels.
# Files back: env.txt, run.log, <run>.json, table.md.
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

run() {  # run <name> <time limit s> <benchmark args...>
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s): $* ${BENCH_ARGS:-}"
  timeout --signal=TERM --kill-after=10 "$limit" "$PY" -m bench.benchmark "$@" \
    --out "$OUT/$name.json" ${TRACE:+--trace-dir /tmp/traces} ${BENCH_ARGS:-}
  echo "=== $name exit $?"
}

RUNS="${*:-fashion cifar10 fashion_nocb}"
{
  for name in $RUNS; do
    case $name in
      fashion) run fashion "${FASHION_LIMIT:-320}" --configs fashion --parts train,sample \
                 --frameworks jax,torch,torch_compile,torch_compile_ro --steps-per-call 1,8 \
                 --steps 10 --warmup 2 ;;
      cifar10) run cifar10 "${CIFAR_LIMIT:-120}" --configs cifar10 --parts bf16 \
                 --frameworks jax --steps 10 --warmup 2 ;;
      fashion_nocb) (export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer="
                 run fashion_nocb "${NOCB_LIMIT:-90}" --configs fashion --parts train \
                 --frameworks jax --steps 10 --warmup 2 --label nocb) ;;
      *) echo "unknown run $name; valid: fashion, cifar10, fashion_nocb"; exit 2 ;;
    esac
  done
  "$PY" -m bench.benchmark --report "$OUT"/*.json | tee "$OUT/table.md"
} 2>&1 | tee "$OUT/run.log"
