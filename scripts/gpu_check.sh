#!/usr/bin/env bash
# Every GPU measurement of docs/speed.md in one call of under 10 minutes, each
# part writing under OUT as it goes (a part cut at its time limit keeps what it has):
#   1. the CUDA tests: tests/test_triton.py (fused kernel against the plain path, a
#      training step) first, then tests/test_optim.py (the fused SGD update against torch's
#      default), then tests/test_precision.py (bf16 against fp32, CUDA graphs: most of the
#      tests that compile, last, so a cut loses mostly them);
#   2. `scripts/bench.py` at this device's full size, most important first, the sections
#      BENCH_ONLY names (default all but `runs`: its runs per hour are step 3's);
#   3. `scripts/step_times.py`: seconds per step of every preset configuration, then runs per
#      hour at CONCURRENCY runs at once, into OUT/step_times.json (STEP_OUT). Copy it to
#      results/step_times/<device slug>.json, where `DRY_RUN=1` and `RUNS_PER_GPU=auto`
#      read it;
#   4. (only when PARTS names it) `scripts/profile_step.py` on each entry of PROFILE_PRESETS,
#      `preset[:override...]` (e.g. t1_cifar10_resnet56_bn:trainer.compile=reduce-overhead):
#      the kernels with the most device time, the ops with the most host time, into
#      OUT/profile.jsonl.
# Usage: scripts/gpu_check.sh [OUT]   (default results/gpu_check; `make gpu-check`)
# Environment: PARTS (tests,bench,steps by default; profile too: which of 1-4 to run; a second
# call can finish what the first cut), PY (python3), PROFILE_PRESETS (t2_cifar10_elu_per
# t1_cifar10_resnet56_per), PROFILE_S (120), CONCURRENCY (1,2,4; empty skips it), STEP_OUT,
# BENCH_ONLY (sections, or ';'-separated groups `sections@seconds`, each its own process and
# limit: "epoch@220;compiled_lm,per_grad@200"), BENCH_ARGS, STEP_ARGS, and the time limits TEST_S,
# BENCH_S, STEP_S in seconds (250, 330, 160), and TOTAL_S (570), the budget of the whole
# call: each part's limit is cut to what is left of it, less 15 s to stop, and a part with
# under 20 s left is skipped (named), so a call ends before the device's 10-minute cap.
# On an NVIDIA H200 the parts took, in separate calls: the tests 72-76 s (10 tests; the
# three compiling ones of the 5 added since took 62-84 s each on CPU: about 185-235 s in all expected);
# the bench's step, per_grad and lm sections about 55 s; its compiled section over 120 s
# (ResNet-56 done, ResNet-110 still compiling at the cut) and the loader about 40 s; the
# step-time rows and runs per hour over 240 s at 20 steps after 3 (the default here is 5
# after 2). On a fresh machine, per_grad + ResNet-56 compiled + the start of compiled_lm
# took about 240 s, and the epoch section's bare step and the start of its run over 115 s:
# the compiling sections need more than BENCH_S's 330 s together. Not yet run as one call.
# A box with torch but no internet and no Hydra needs only three pure-Python wheels (W&B
# is imported only when logging is on). Make them where pip works:
#   pip wheel --no-deps -w .whl hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3
# then, on the box, from the repository root:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   PYTHONPATH=/tmp/site bash scripts/gpu_check.sh "$OUT"
set -uo pipefail
set -f    # no globbing: the variables below split on spaces only ("[...]" or ".*" in an argument)
OUT=${1:-results/gpu_check}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # per/, experiments/ without an install
CONCURRENCY=${CONCURRENCY-1,2,4}
concurrency=()
[[ -n $CONCURRENCY ]] && concurrency=(--concurrency "$CONCURRENCY")
{ nvidia-smi || echo "nvidia-smi: not available"; } > "$OUT/nvidia-smi.txt" 2>&1
"$PY" -c "import torch, sys; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA device')" > "$OUT/versions.txt" 2>&1
PARTS=",${PARTS:-tests,bench,steps},"
for part in ${PARTS//,/ }; do
    [[ $part == tests || $part == bench || $part == steps || $part == profile ]] || {
        echo "[gpu-check] unknown part '$part' in PARTS; valid: tests, bench, steps, profile" >&2; exit 2; }
done
for name in TEST_S BENCH_S STEP_S PROFILE_S TOTAL_S; do
    [[ ${!name:-1} =~ ^[1-9][0-9]*$ ]] || { echo "[gpu-check] $name=${!name}: expected whole seconds >= 1" >&2; exit 2; }
done
status=0
# The limit of the next part: the smaller of its own ($1 s) and what is left of TOTAL_S less
# 15 s to stop; 0 (skip it) where under 20 s would be left.
limit() {
    local left=$(( ${TOTAL_S:-570} - SECONDS - 15 ))
    (( left < 20 )) && { echo 0; return; }
    echo $(( $1 < left ? $1 : left ))
}
# Run "$@" under `timeout` with limit $1 (seconds), or say it is skipped. TIMEOUT_SIGNAL: the
# signal sent at the limit (TERM; the tests take INT, on which pytest still prints its
# failures and summary), then KILL 15 s later.
within() {
    local s; s=$(limit "$1"); shift
    if (( s == 0 )); then
        echo "[gpu-check] skipped (TOTAL_S=${TOTAL_S:-570} spent): $*" >&2; return 1
    fi
    timeout -s "${TIMEOUT_SIGNAL:-TERM}" -k 15 "$s" "$@"
}
# BENCH_ONLY: ';'-separated groups of sections, each run by its own bench process with its
# own limit (`sections@seconds`, else BENCH_S), so a group cut short costs only its own time.
# Checked before anything runs, section names included: device time is scarce.
runs=()
if [[ $PARTS == *,bench,* ]]; then
    valid=$(sed -n 's/^SECTIONS = (\(.*\))$/\1/p' scripts/bench.py | tr -d '" ')   # bench.py's SECTIONS
    IFS=';' read -r -a groups <<< "${BENCH_ONLY:-step,per_grad,optimizer,lm,compiled,loader,compiled_lm,epoch}"
    for group in "${groups[@]}"; do
        group=${group//[[:space:]]/}
        [[ -z $group ]] && continue
        sections=${group%@*}
        seconds=$([[ $group == *@* ]] && echo "${group##*@}" || echo "${BENCH_S:-330}")
        [[ -n $sections && $seconds =~ ^[1-9][0-9]*$ ]] || {
            echo "[gpu-check] bad BENCH_ONLY group '$group': expected sections[@seconds]" >&2; exit 2; }
        IFS=',' read -r -a names <<< "$sections"
        for name in "${names[@]}"; do
            [[ ,$valid, == *",$name,"* ]] || {
                echo "[gpu-check] unknown bench section '$name' in BENCH_ONLY; valid: $valid" >&2; exit 2; }
        done
        runs+=("$sections@$seconds")
    done
fi
# The test files are named: collecting all of tests/ would import test-only packages (POT).
[[ $PARTS == *,tests,* ]] && { TIMEOUT_SIGNAL=INT within "${TEST_S:-250}" "$PY" -m pytest -q -rP -m gpu -p no:cacheprovider \
    --log-level=WARNING tests/test_triton.py tests/test_optim.py tests/test_precision.py 2>&1 | tee "$OUT/pytest_gpu.txt" \
    || status=1; }
if [[ $PARTS == *,bench,* ]]; then
    : > "$OUT/bench.log"
    for run in "${runs[@]}"; do
        within "${run##*@}" "$PY" scripts/bench.py --only "${run%@*}" --out "$OUT/bench.jsonl" \
            ${BENCH_ARGS:-} 2>&1 | tee -a "$OUT/bench.log" || status=1
    done
fi
[[ $PARTS == *,steps,* ]] && { within "${STEP_S:-160}" "$PY" scripts/step_times.py --out "${STEP_OUT:-$OUT/step_times.json}" \
    ${concurrency[@]+"${concurrency[@]}"} ${STEP_ARGS:-} 2>&1 | tee "$OUT/step_times.log" || status=1; }  # rows written as measured
if [[ $PARTS == *,profile,* ]]; then
    for entry in ${PROFILE_PRESETS:-t2_cifar10_elu_per t1_cifar10_resnet56_per}; do
        IFS=: read -r -a preset <<< "$entry"    # preset[:override[:override...]]; no ":" inside one
        within "${PROFILE_S:-120}" "$PY" scripts/profile_step.py "${preset[@]}" --out "$OUT/profile.jsonl" \
            ${PROFILE_ARGS:-} || status=1
    done
fi
echo "[gpu-check] results in $OUT (exit $status)"
exit $status
