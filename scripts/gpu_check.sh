#!/usr/bin/env bash
# Every GPU measurement of the README's Speed section in one go, each step writing under OUT
# as it goes (a run cut short keeps what it has):
#   1. the CUDA tests (`pytest -m gpu`: the Triton kernel and a training step against the
#      plain path, bf16 against fp32),
#   2. `scripts/bench.py` at this device's full size (its runs-per-hour part is step 3's),
#   3. `scripts/step_times.py`: seconds per step of every preset configuration and runs per
#      hour at CONCURRENCY runs at once, into this device's table in results/step_times/
#      (which `DRY_RUN=1` and `RUNS_PER_GPU=auto` read; STEP_OUT writes it elsewhere), then
#      copied into OUT.
# Usage: scripts/gpu_check.sh [OUT]   (default results/gpu_check; `make gpu-check`)
# Environment: PARTS (tests,bench,steps: which of 1-3 to run), PY (python), CONCURRENCY
# (1,2,4,8; empty skips it), STEP_OUT, BENCH_ARGS, STEP_ARGS, and the time limits TEST_S,
# BENCH_S, STEP_S in seconds. Not yet timed on a GPU: compiling for reduce-overhead and
# starting 15 processes for the runs per hour take minutes, so where a session is
# limited to 10 minutes a call, run PARTS=tests,bench and PARTS=steps apart.
# A box with torch but no internet and no Hydra needs only three pure-Python wheels (W&B
# is imported only when logging is on). Make them where pip works:
#   pip wheel --no-deps -w .whl hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3
# then, on the box, from the repository root:
#   pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   PYTHONPATH=/tmp/site:$PWD bash scripts/gpu_check.sh "$OUT"
set -uo pipefail
OUT=${1:-results/gpu_check}
PY=${PY:-python}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
CONCURRENCY=${CONCURRENCY-1,2,4,8}
concurrency=()
[[ -n $CONCURRENCY ]] && concurrency=(--concurrency "$CONCURRENCY")
{ nvidia-smi || echo "nvidia-smi: not available"; } > "$OUT/nvidia-smi.txt" 2>&1
"$PY" -c "import torch, sys; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA device')" > "$OUT/versions.txt" 2>&1
PARTS=",${PARTS:-tests,bench,steps},"
for part in ${PARTS//,/ }; do
    [[ $part == tests || $part == bench || $part == steps ]] || {
        echo "[gpu-check] unknown part '$part' in PARTS; valid: tests, bench, steps" >&2; exit 2; }
done
status=0
[[ $PARTS == *,tests,* ]] && { timeout "${TEST_S:-240}" "$PY" -m pytest -q -m gpu -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.txt" || status=1; }
[[ $PARTS == *,bench,* ]] && { timeout "${BENCH_S:-480}" "$PY" scripts/bench.py --only step,compiled,lm,per_grad,loader --out "$OUT/bench.jsonl" \
    ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" || status=1; }
[[ $PARTS == *,steps,* ]] && { timeout "${STEP_S:-600}" "$PY" scripts/step_times.py ${STEP_OUT:+--out "$STEP_OUT"} ${concurrency[@]+"${concurrency[@]}"} \
    ${STEP_ARGS:-} 2>&1 | tee "$OUT/step_times.log" || status=1
    table=$(sed -n 's/^device: .*, table: //p' "$OUT/step_times.log")
    [[ -n $table && -f $table ]] && cp "$table" "$OUT/step_times.json"; }  # rows are written as measured
echo "[gpu-check] results in $OUT (exit $status)"
exit $status
