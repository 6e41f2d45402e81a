#!/usr/bin/env bash
# Everything a lent GPU machine should run, in one call of the device tool, in under 10
# minutes on one H200 (torch 2.11, triton 3.6, Python 3.12, no network: it installs nothing).
#
#   bash benchmarks/gpu_check.sh                  # all stages
#   STAGES="build tests" bash benchmarks/gpu_check.sh
#
# Stages (caps, and paper estimates for a 16-core H200 machine, in docs/gpu_check.md):
#   build     the extension in place, CUDA kernels for sm_90 only (MAX_JOBS=16)
#   tests     the CUDA and Triton tests (8 pytest-xdist workers when xdist is installed)
#   memcheck  compute-sanitizer --tool memcheck on one small case (benchmarks/gpu_memcheck_case.py)
#   bench     benchmarks/norm_speed.py --device cuda --quick
#   paths     benchmarks/triton_paths.py: the Triton training forward, fused vs two-pass
#   train     benchmarks/train_step.py --device cuda, 3 steps x 2 rounds
# Each stage runs under a time cap (CAP_<stage>, seconds) and the whole run under a deadline
# (DEADLINE, 570 s): a stage gets at most what is left, and is skipped with a note when
# less than 20 s is left. A failing stage does not stop the later ones; the exit status is
# the number of failed stages. The elapsed time of every stage is printed as it ends and in
# the summary table printed last.
#
# Files under $OUT (default ./gpu-out; at most 8, as the device tool brings back): summary.md
# (device, stages, times), gpu-check.log (every stage's output), tests.xml (junit),
# norm_speed's <device>-<date>.json/.md, triton-paths.md, train-step.md.
set -uo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-$REPO/gpu-out}"
PY="${PYTHON:-python3}"
STAGES="${STAGES:-build tests memcheck bench paths train}"
DEADLINE="${DEADLINE:-570}"
mkdir -p "$OUT"
LOG="$OUT/gpu-check.log"
: >"$LOG"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"  # the lent GPUs are Hopper
# torch takes CUDA_HOME from nvcc's location when it is unset; a wrapper script in
# /usr/local/bin would give /usr/local, with no libcudart.so to link against.
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
export MAX_JOBS="${MAX_JOBS:-16}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build of this checkout
export PYTHONUNBUFFERED=1
declare -A STATUS TIME
declare -A CAP=([build]=${CAP_build:-240} [tests]=${CAP_tests:-240} [memcheck]=${CAP_memcheck:-120}
                [bench]=${CAP_bench:-120} [paths]=${CAP_paths:-60} [train]=${CAP_train:-60})
T0=$SECONDS

run_stage() {  # name, command...: capped by CAP[name] and by what is left of DEADLINE
  local name="$1"; shift
  local left=$((DEADLINE - (SECONDS - T0)))
  local cap=${CAP[$name]:-120}
  ((cap > left)) && cap=$left
  if ((cap < 20)); then
    STATUS[$name]="skipped (${left} s left of the ${DEADLINE} s deadline)"; TIME[$name]=0
    echo "== $name: skipped, ${left} s left" | tee -a "$LOG"
    return
  fi
  local start=$SECONDS rc=0
  echo "== $name (cap ${cap} s): $*" | tee -a "$LOG"
  timeout --kill-after=10 "$cap" "$@" >>"$LOG" 2>&1 || rc=$?
  TIME[$name]=$((SECONDS - start))
  if ((rc == 0)); then STATUS[$name]="ok"
  elif ((rc == 124 || rc == 137)); then STATUS[$name]="TIMED OUT at ${cap} s"
  else STATUS[$name]="FAILED (rc $rc)"; fi
  echo "== $name: ${STATUS[$name]}, ${TIME[$name]} s (total $((SECONDS - T0)) s)" | tee -a "$LOG"
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', \
torch.version.cuda, torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0).multi_processor_count, 'SMs')"
  "$PY" -c "import triton; print('triton', triton.__version__)"
  nvcc --version | tail -n 1
  echo "cores $(nproc), TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS CUDA_HOME=${CUDA_HOME:-unset}"
  date -u +"%Y-%m-%dT%H:%M:%SZ"
} >"$OUT/device.txt" 2>&1
cat "$OUT/device.txt" | tee -a "$LOG"

XDIST=()
if "$PY" -c "import xdist" 2>/dev/null; then XDIST=(-n 8); fi

cd "$REPO"
for stage in $STAGES; do
  case "$stage" in
    build)
      run_stage build "$PY" setup.py build_ext --inplace
      "$PY" -c "import unirep_kernels as u; print(u.backends())" 2>&1 | tee -a "$LOG" ;;
    tests)
      run_stage tests "$PY" -m pytest -q -p no:cacheprovider "${XDIST[@]}" --junitxml="$OUT/tests.xml" \
        tests/test_cuda_backend.py tests/test_ops_batch_norm.py tests/test_ops_instance_norm.py \
        tests/test_against_pytorch.py tests/test_registration.py tests/test_layers.py tests/test_triton.py ;;
    memcheck)
      mark=$(wc -l <"$LOG")
      run_stage memcheck compute-sanitizer --tool memcheck --error-exitcode 1 "$PY" benchmarks/gpu_memcheck_case.py
      # gVisor machines: the sanitizer refuses the device; that is no finding about the kernels.
      if [[ "${STATUS[memcheck]}" == FAILED* ]] && tail -n +"$((mark + 1))" "$LOG" | grep -q "Device not supported"; then
        STATUS[memcheck]="${STATUS[memcheck]}: compute-sanitizer does not support this machine's GPU runtime"
      fi ;;
    bench)
      run_stage bench "$PY" benchmarks/norm_speed.py --device cuda --quick --no-plot --out "$OUT" ;;
    paths)
      run_stage paths "$PY" benchmarks/triton_paths.py --out "$OUT/triton-paths.md" ;;
    train)
      run_stage train "$PY" benchmarks/train_step.py --device cuda --steps 3 --rounds 2 --out "$OUT/train-step.md" ;;
    *) echo "unknown stage $stage" | tee -a "$LOG"; STATUS[$stage]="unknown"; TIME[$stage]=0 ;;
  esac
done

failed=0
{
  echo "# GPU check"
  echo
  echo '```'
  cat "$OUT/device.txt"
  echo '```'
  echo
  echo "| stage | result | seconds |"
  echo "| --- | --- | ---: |"
  for stage in $STAGES; do
    echo "| $stage | ${STATUS[$stage]:-not run} | ${TIME[$stage]:-} |"
  done
  echo "| total | | $((SECONDS - T0)) |"
} >"$OUT/summary.md"
rm -f "$OUT/device.txt"
echo
cat "$OUT/summary.md"
for stage in $STAGES; do
  [[ "${STATUS[$stage]:-}" == ok* ]] || failed=$((failed + 1))
done
exit $failed
