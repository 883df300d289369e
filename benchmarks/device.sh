#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: the kernel tests compiled natively, then every op checked
# against float64 and timed against fla's Triton kernels, in about 8 minutes. Writes
# $OUT/gpu.jsonl (one JSON line per case and phase), $OUT/tests.log and prints the table for
# benchmarks/RESULTS.md. Wheels for packages the machine lacks (fla) are read from .whl/ if there.
#
#   bash benchmarks/device.sh            (OUT defaults to ./device-out)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/memzoo-jax-cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=-1
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
$PY -c 'import jax, jaxlib; print("jax", jax.__version__, jax.devices())' | tee -a "$OUT/device.txt"

cases=$($PY -m benchmarks.gpu --list)
start=$(date +%s)
# 1. The kernel tests with the compiled ("pallas_native") runner, in the background while the
#    cases compile: XLA's and Triton's compilers are CPU-bound, the GPU is idle then.
(timeout ${TESTS_S:-150} $PY -m pytest tests/pallas_kernels -m kernel -k "pallas_native" -q -n 8 -p no:cacheprovider \
   -W ignore::DeprecationWarning > "$OUT/tests.log" 2>&1; echo "rc=$?" >> "$OUT/tests.log") &
tests=$!
# 2. Check + compile every case in parallel (fills the compilation cache).
for c in $cases; do
  timeout ${CHECK_S:-150} $PY -m benchmarks.gpu "$c" --phase check --json "$OUT/gpu.jsonl" \
    > "$OUT/check_$c.log" 2>&1 &
done
wait $(jobs -p | grep -v "^$tests$") 2>/dev/null
echo "checks done after $(( $(date +%s) - start )) s"
# 3. Timings one case at a time (nothing else on the GPU).
wait $tests
# The matrix-state ops first: they have peers.
for c in ${TIME_CASES:-$cases}; do
  timeout ${TIME_S:-30} $PY -m benchmarks.gpu "$c" --phase time --json "$OUT/gpu.jsonl" \
    > "$OUT/time_$c.log" 2>&1 || echo "$c: time phase failed or timed out (rc $?)"
done
echo "all done after $(( $(date +%s) - start )) s"
tail -3 "$OUT/tests.log"
$PY - "$OUT/gpu.jsonl" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
chk = {r["case"]: r for r in rows if r["phase"] == "check"}
tim = {r["case"]: r for r in rows if r["phase"] == "time"}
f = lambda x: "n/a" if x is None else (f"{x:.3g}" if isinstance(x, float) else str(x))
print("| op | check f32 / bf16 (rel RMSE vs f64) | pallas fwd / fwd+bwd ms | xla fwd / fwd+bwd ms | peer | peer fwd / fwd+bwd ms | pallas vs peer fwd+bwd |")
print("|---|---|---|---|---|---|---|")
for c in chk.keys() | tim.keys():
    a, b = chk.get(c, {}), tim.get(c, {})
    e = a.get("check_rel_rmse") or {}
    chk_s = f"{f(e.get('float32'))} / {f(e.get('bfloat16'))}" if e else a.get("check_error", "n/a")[:60]
    ratio = (b["peer_fwdbwd_ms"] / b["pallas_fwdbwd_ms"]) if b.get("peer_fwdbwd_ms") and b.get("pallas_fwdbwd_ms") else None
    print(f"| {c} | {chk_s} | {f(b.get('pallas_fwd_ms'))} / {f(b.get('pallas_fwdbwd_ms'))}"
          f"{' ' + b['pallas_error'][:60] if 'pallas_error' in b else ''} | "
          f"{f(b.get('xla_fwd_ms'))} / {f(b.get('xla_fwdbwd_ms'))} | {b.get('peer', b.get('peer_error', 'n/a'))[:40]} | "
          f"{f(b.get('peer_fwd_ms'))} / {f(b.get('peer_fwdbwd_ms'))} | {f(ratio)}x |")
PYEOF
