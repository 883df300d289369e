#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: the kernel tests compiled natively, then every op checked
# against float64 and timed (memzoo's Mosaic GPU and Triton kernels, the XLA path, fla's Triton
# kernels) at B4 T4096 H16 d128 and B8 T2048 H16 d64, in about 8 minutes. Writes
# $OUT/gpu.jsonl (JSON lines: one "check" per case, one "time" and one "peer" per case and shape),
# $OUT/tests.log, $OUT/case_*.log and prints the tables for benchmarks/RESULTS.md. Wheels for
# packages the machine lacks (fla) are read from .whl/ if there.
#
#   bash benchmarks/device.sh            (OUT defaults to ./device-out)
#   CASES="gla delta_rule" GPU_SHAPES=d128 CASE_S=300 bash benchmarks/device.sh   (a cut run)
#
# Every case runs in its own process, all at once: each compiles its programs (XLA's, Triton's
# and ptxas' CPU work: the GPU is idle then), then takes an exclusive lock on the GPU for its
# float64 check and its timings, so those never overlap; fla compiles and autotunes outside the
# lock (that can overlap another case's timings). A case killed at
# CASE_S keeps the lines it already wrote.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false
# a second run on the same machine may find its executables here
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/memzoo-jax-cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=-1
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
$PY -c 'import jax, jaxlib; print("jax", jax.__version__, jax.devices())' | tee -a "$OUT/device.txt"
$PY -c 'import fla, torch, triton; print("fla", fla.__version__, "torch", torch.__version__, "triton", triton.__version__)' \
  2>&1 | tail -1 | tee -a "$OUT/device.txt"

cases=${CASES:-$($PY -m benchmarks.gpu --list --mosaic-only)}
start=$(date +%s)
lock="$OUT/gpu.lock"
# 1. The kernel tests with the compiled ("pallas_native") runner, in the background while the
#    cases compile.
if [ "${TESTS_S:-120}" != 0 ]; then
  (timeout ${TESTS_S:-120} $PY -m pytest tests/pallas_kernels -m kernel -k "pallas_native" -q -n 4 \
     -p no:cacheprovider -W ignore::DeprecationWarning > "$OUT/tests.log" 2>&1
   echo "rc=$?" >> "$OUT/tests.log") &
  tests=$!
fi
# 2. Every case: compile (threads), check, then time under the lock.
read -ra case_list <<< "$cases"
pids=()
for c in "${case_list[@]}"; do
  timeout ${CASE_S:-390} $PY -m benchmarks.gpu "$c" --json "$OUT/gpu.jsonl" --gpu-lock "$lock" \
    --threads ${THREADS:-3} > "$OUT/case_$c.log" 2>&1 &
  pids+=($!)
done
for i in "${!pids[@]}"; do
  wait "${pids[$i]}" || echo "case ${case_list[$i]}: rc $? (124: CASE_S reached)"
done
echo "cases done after $(( $(date +%s) - start )) s"
if [ -n "${tests:-}" ]; then wait $tests; tail -3 "$OUT/tests.log"; fi
$PY -m benchmarks.gpu --table "$OUT/gpu.jsonl"
