#!/usr/bin/env bash
# The one prepared call for a lent GPU (issue 7): environment, then bench/benchmark.py
# for the Fashion-MNIST and CIFAR-10 configs, results and logs into $OUT, table last.
#
#   bash bench/run_gpu.sh          # from the repository root; $OUT: where results go
#
# ~5 minutes on an H100 (most of it XLA and torch.compile compiling). Each config runs
# in its own process under a time limit (JAX's peak-memory counter is per process, and
# a crash or timeout in one config keeps the other's results); inside a process every
# part is caught, and the JSON is rewritten after each part. If JAX and PyTorch cannot
# share the GPU in one process, each framework gets its own process instead.
# Set JAX_COMPILATION_CACHE_DIR to reuse compiled programs on a rerun (the reported
# compile times are then cache hits).
set -u -o pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT="${OUT:-$(mktemp -d)}"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
mkdir -p "$OUT"
echo "results in $OUT; python $PY"
# The GPU image lacks ml_collections: bring its wheel in .whl/ (see BENCHMARKS.md).
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
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

# Can JAX and PyTorch both run a convolution on the GPU in one process?
if timeout 120 "$PY" - <<'EOF' 2>&1 | tee "$OUT/preflight.txt"
import os
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
import jax, jax.numpy as jnp
x = jnp.ones((2, 8, 8, 4))
print("jax conv", float(jax.lax.conv_general_dilated(
    x, jnp.ones((3, 3, 4, 4)), (1, 1), "SAME",
    dimension_numbers=("NHWC", "HWIO", "NHWC")).sum()), jax.devices()[0].device_kind)
import torch
y = torch.nn.functional.conv2d(torch.ones(2, 4, 8, 8, device="cuda"),
                               torch.ones(4, 4, 3, 3, device="cuda"), padding=1)
print("torch conv", float(y.sum()), torch.cuda.get_device_name())
EOF
then
  FRAMEWORK_SETS=("jax,torch,torch_compile")
  LIMITS=(170 230)  # seconds for fashion, cifar10: the whole call stays well under 10 minutes
else
  echo "JAX and PyTorch failed together in one process: running them in separate processes"
  FRAMEWORK_SETS=("jax" "torch,torch_compile")
  LIMITS=(85 115)
fi

run() {  # run <name> <time limit s> <benchmark args...>
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s): $*"
  timeout --signal=TERM --kill-after=10 "$limit" "$PY" bench/benchmark.py "$@" \
    --out "$OUT/$name.json" 2>&1 | tee "$OUT/$name.log"
  echo "=== $name exit ${PIPESTATUS[0]}"
}

n=0
for frameworks in "${FRAMEWORK_SETS[@]}"; do
  n=$((n + 1))
  # Fashion-MNIST: training f32/bf16, sampling, torch.compile, 200-step bf16-vs-f32 losses.
  run "fashion_$n" "${LIMITS[0]}" --configs fashion --frameworks "$frameworks" --steps 20 --warmup 3 \
    --loss-steps 200
  # CIFAR-10: the same without the loss check.
  run "cifar10_$n" "${LIMITS[1]}" --configs cifar10 --frameworks "$frameworks" --steps 20 --warmup 3 \
    --parts train,bf16,sample
done

"$PY" bench/benchmark.py --report "$OUT"/fashion_*.json "$OUT"/cifar10_*.json \
  | tee "$OUT/table.md"
