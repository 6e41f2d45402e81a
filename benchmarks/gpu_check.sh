#!/usr/bin/env bash
# Everything a lent GPU machine should run, in one call (device tool):
#   build the package with its CUDA kernels, run the CUDA tests, memcheck a small case, and
#   run the benchmarks; logs and results go under $OUT (default ./gpu-out).
#
#   bash benchmarks/gpu_check.sh            # all steps
#   STEPS="build tests" bash benchmarks/gpu_check.sh
#
# Each step logs to $OUT/<step>.log and the summary table is printed last. A failing step
# does not stop the later ones (their results are still worth having); the exit status is
# the number of failed steps.
set -uo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-$REPO/gpu-out}"
PY="${PYTHON:-python3}"
STEPS="${STEPS:-build tests memcheck bench}"
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"  # the lent GPUs are Hopper
export MAX_JOBS="${MAX_JOBS:-16}"
declare -A STATUS

run_step() {  # name, command...
  local name="$1"; shift
  local start=$SECONDS
  echo "== $name: $*" | tee "$OUT/$name.log"
  if "$@" >>"$OUT/$name.log" 2>&1; then STATUS[$name]="ok"; else STATUS[$name]="FAILED (rc $?)"; fi
  STATUS[$name]="${STATUS[$name]} in $((SECONDS - start)) s"
  tail -n 5 "$OUT/$name.log"
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
  nvcc --version | tail -n 2
  date -u +"%Y-%m-%dT%H:%M:%SZ"
} >"$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

for step in $STEPS; do
  case "$step" in
    build)
      run_step build "$PY" -m pip install --no-build-isolation --no-deps -v "$REPO"
      "$PY" -c "import unirep_kernels as u; print(u.backends())" | tee -a "$OUT/build.log" ;;
    tests)
      # From outside the repository, so that `import unirep_kernels` finds the installed
      # package (with its CUDA kernels), not the source folder.
      pushd /tmp >/dev/null
      run_step tests "$PY" -m pytest -q -p no:cacheprovider --junitxml="$OUT/tests.xml" \
        "$REPO/tests/test_cuda_backend.py" "$REPO/tests/test_ops_batch_norm.py" "$REPO/tests/test_ops_instance_norm.py" \
        "$REPO/tests/test_against_pytorch.py" "$REPO/tests/test_registration.py" "$REPO/tests/test_layers.py" \
        "$REPO/tests/test_triton.py"
      popd >/dev/null ;;
    memcheck)
      pushd /tmp >/dev/null
      run_step memcheck compute-sanitizer --tool memcheck --error-exitcode 1 "$PY" "$REPO/benchmarks/gpu_memcheck_case.py"
      popd >/dev/null ;;
    bench)
      pushd /tmp >/dev/null
      run_step bench "$PY" "$REPO/benchmarks/norm_speed.py" --device cuda --out "$OUT" --compile main
      popd >/dev/null ;;
    *) echo "unknown step $step" >&2; STATUS[$step]="unknown" ;;
  esac
done

echo
echo "| step | result |"
echo "| --- | --- |"
failed=0
for step in $STEPS; do
  echo "| $step | ${STATUS[$step]:-not run} |"
  [[ "${STATUS[$step]:-}" == ok* ]] || failed=$((failed + 1))
done
exit $failed
