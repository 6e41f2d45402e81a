#!/usr/bin/env bash
# Link check of the CUDA build, without a GPU: build unirep_kernels._C with its CUDA kernels
# against a CUDA build of torch, load it, and check that every op has a CUDA kernel.
#
#   bash benchmarks/cuda_link_check.sh
#
# What CI cannot do (tests/test_cuda_compile.py compiles each .cu file against the CPU
# wheel's headers, which is no link): in a throwaway venv, `pip install torch==$TORCH_VERSION`
# (the CUDA build, ~5.5 GB; on this project's machines it comes from local disk), build a
# copy of the working tree with UNIREP_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0, then check:
#   - `import unirep_kernels` loads _C (unresolved symbols fail the load), built with CUDA;
#   - every unirep:: op has a CUDA kernel (its own, or a device-generic one);
#   - the kernels' resources (cuobjdump: registers, stack, local memory);
#   - tests/test_cuda_backend.py and tests/test_registration.py pass or skip cleanly.
# The per-file compile times (ninja's log) go into the summary too.
# Prints a summary and writes it to benchmarks/results/cuda-link-check-<date>.md. The venv
# and the build copy are deleted at the end (KEEP=1 keeps them). Not part of .ci/run (the
# download is several GB): re-run it whenever csrc/cuda (or anything else in csrc/) changes.
#
# Environment: TORCH_VERSION (2.14.1), TORCH_CUDA_ARCH_LIST (9.0), MAX_JOBS (2), PYTHON
# (python3), WORK (a new temporary folder), OUT (the summary file).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.14.1}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"
export UNIREP_FORCE_CUDA=1
# torch takes CUDA_HOME from nvcc's location when it is unset; a wrapper such as
# /usr/local/bin/nvcc gives /usr/local, which has no libcudart.so to link against.
if [ -z "${CUDA_HOME:-}" ]; then
  for d in /usr/local/cuda "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"; do
    if [ -x "$d/bin/nvcc" ] && ls "$d"/lib*/libcudart.so >/dev/null 2>&1; then export CUDA_HOME="$d"; break; fi
  done
fi
echo "CUDA_HOME=${CUDA_HOME:-unset, torch guesses}"
WORK="${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/unirep-cuda-link.XXXXXX")}"
OUT="${OUT:-$REPO/benchmarks/results/cuda-link-check-$(date -u +%Y-%m-%d).md}"
VENV="$WORK/venv"
SRC="$WORK/src"
LOG="$WORK/log"
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT
mkdir -p "$SRC" "$LOG"

declare -a STAGES
t_all=$SECONDS
stage() {  # name, command...: run with its output in $LOG/<name>.log, time it, stop on failure
  local name="$1"; shift
  local start=$SECONDS
  echo "== $name: $*"
  if ! "$@" >"$LOG/$name.log" 2>&1; then
    tail -n 40 "$LOG/$name.log"
    echo "FAILED: $name (log above; full log in $LOG/$name.log, kept)" >&2
    trap - EXIT
    exit 1
  fi
  STAGES+=("| $name | $((SECONDS - start)) s |")
  echo "   $((SECONDS - start)) s"
}

echo "df -h $WORK:"; df -h "$WORK" | tail -n 1
load_before=$(cut -d' ' -f1-3 /proc/loadavg)

stage venv "$PY" -m venv "$VENV"
stage install_torch "$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION" numpy pytest setuptools wheel ninja pybind11
# The working tree as it is (tracked and untracked-not-ignored files), without build outputs.
(cd "$REPO" && git ls-files -z --cached --others --exclude-standard | \
  tar --null --ignore-failed-read -T - -cf - 2>/dev/null) | tar -C "$SRC" -xf -
stage build bash -c "cd '$SRC' && nice -n 5 '$VENV/bin/python' setup.py build_ext --inplace"

NINJA_TIMES="$(awk 'NR > 1 {sub(/.*\/csrc\//, "csrc/", $4); printf "| %s | %.0f s |\n", $4, ($2 - $1) / 1000}' \
  "$SRC"/build/temp*/.ninja_log 2>/dev/null || true)"
export NINJA_TIMES
cd "$SRC"
export LINK_SUMMARY="$WORK/summary.json"
stage check "$VENV/bin/python" - <<'EOF'
import json
import os
import re
import shutil
import subprocess

import importlib

import torch

backends = importlib.import_module("unirep_kernels.backends")  # the module (the package re-exports a function)

loaded = backends.extension_loaded()
assert loaded, f"unirep_kernels._C did not load: {backends.backends()['cpp'][1]}"
import unirep_kernels._C as C  # noqa: E402

assert getattr(C, "with_cuda", False), "unirep_kernels._C was built without CUDA kernels"
ops = sorted(name for name in torch._C._dispatch_get_all_op_names() if name.startswith("unirep::"))
assert ops, "no unirep:: ops registered"
has = torch._C._dispatch_has_kernel_for_dispatch_key
computed = getattr(torch._C, "_dispatch_has_computed_kernel_for_dispatch_key", None)
rows, bad = [], []
for op in ops:
    cuda, cpu = has(op, "CUDA"), has(op, "CPU")
    generic = has(op, "CompositeExplicitAutograd") or has(op, "CompositeImplicitAutograd")
    via = computed(op, "CUDA") if computed else (cuda or generic)
    rows.append((op, cpu, cuda, generic, via))
    if not via or (cpu and not cuda):
        bad.append(op)
so = C.__file__
try:  # torch's CUDA wheels bring triton, which brings cuobjdump; else CUDA's own
    cuobjdump = os.path.join(os.path.dirname(__import__("triton").__file__), "backends", "nvidia", "bin", "cuobjdump")
except ImportError:
    cuobjdump = shutil.which("cuobjdump") or "cuobjdump"
usage = subprocess.run([cuobjdump, "--dump-resource-usage", so], capture_output=True, text=True).stdout
funcs = re.findall(r"Function ([^:\s]+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
archs = sorted(set(re.findall(r"arch = (sm_\d+)", subprocess.run([cuobjdump, "--list-elf", so], capture_output=True,
                                                                 text=True).stdout + usage)))
summary = dict(
    extension=so, torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(),
    backends={k: list(v) for k, v in backends.backends().items()},
    ops=[dict(op=o, cpu=c, cuda=k, generic=g, cuda_dispatch=v) for o, c, k, g, v in rows],
    kernels=len(funcs), max_registers=max((int(f[1]) for f in funcs), default=0),
    max_stack=max((int(f[2]) for f in funcs), default=0), max_local=max((int(f[4]) for f in funcs), default=0),
    archs=archs, missing=bad)
print(json.dumps(summary, indent=1))
with open(os.environ["LINK_SUMMARY"], "w") as f:
    json.dump(summary, f)
assert not bad, f"ops without a CUDA kernel: {bad}"
assert funcs, "cuobjdump found no kernels in the extension"
EOF
stage tests "$VENV/bin/python" -m pytest -q -rs -p no:cacheprovider tests/test_cuda_backend.py tests/test_registration.py

# Summary: printed and written to $OUT.
STAGE_TIMES="$(printf '%s\n' "${STAGES[@]}")"
export STAGE_TIMES TOTAL=$((SECONDS - t_all)) LOAD_BEFORE="$load_before" LOAD_AFTER="$(cut -d' ' -f1-3 /proc/loadavg)" \
  TESTS_LOG="$LOG/tests.log" NVCC="$(nvcc --version | tail -n 1)" OUT
"$VENV/bin/python" - <<'EOF'
import collections
import datetime
import json
import os
import platform
import re

s = json.load(open(os.environ["LINK_SUMMARY"]))
tests = [line for line in open(os.environ["TESTS_LOG"]).read().splitlines() if line.strip()]
result = tests[-1].strip("= ") if tests else "(no output)"
skips = collections.Counter()
for line in tests:  # "SKIPPED [count] file:line: reason"
    m = re.match(r"SKIPPED \[(\d+)\] \S+?:\d+: (.*)", line)
    if m:
        skips[m.group(2)] += int(m.group(1))
yes = {True: "yes", False: "no"}
lines = [
    f"# CUDA link check ({datetime.date.today().isoformat()})",
    "",
    "`bash benchmarks/cuda_link_check.sh`: the CUDA build of unirep_kernels._C against a CUDA build of torch, "
    "linked and loaded on a machine without a GPU. Re-run whenever csrc/ changes.",
    "",
    f"- machine: {platform.machine()} CPU, {os.cpu_count()} cores, no GPU; load average {os.environ['LOAD_BEFORE']} "
    f"before, {os.environ['LOAD_AFTER']} after (shared with other jobs)",
    f"- torch {s['torch']} (CUDA {s['torch_cuda']}); nvcc: {os.environ['NVCC']}; "
    f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')}, MAX_JOBS={os.environ.get('MAX_JOBS')}, "
    f"UNIREP_FORCE_CUDA=1, CUDA_HOME={os.environ.get('CUDA_HOME', '(unset)')}",
    f"- `import unirep_kernels` loaded `_C`, built with CUDA kernels (Python loads extensions with RTLD_NOW: an "
    f"unresolved symbol would fail the import); "
    f"torch.cuda.is_available() = {s['cuda_available']}",
    f"- device code: {s['kernels']} kernels ({', '.join(s['archs']) or 'arch not listed'}); at most "
    f"{s['max_registers']} registers, stack {s['max_stack']} bytes, local memory {s['max_local']} bytes "
    "(cuobjdump --dump-resource-usage)",
    f"- tests/test_cuda_backend.py and tests/test_registration.py: {result}",
    "",
    "| op | CPU kernel | CUDA kernel | device-generic kernel | dispatches on CUDA |",
    "|---|---|---|---|---|",
]
for o in s["ops"]:
    lines.append(f"| `{o['op']}` | {yes[o['cpu']]} | {yes[o['cuda']]} | {yes[o['generic']]} | {yes[o['cuda_dispatch']]} |")
lines += ["", "| stage | time |", "|---|---|", *os.environ["STAGE_TIMES"].splitlines(),
          f"| total | {os.environ['TOTAL']} s |", ""]
if os.environ.get("NINJA_TIMES"):
    lines += [f"Compile time per file (ninja, MAX_JOBS={os.environ.get('MAX_JOBS')} on the loaded machine above):", "",
              "| object | wall time |", "|---|---|", *os.environ["NINJA_TIMES"].splitlines(), ""]
if skips:
    lines += ["Skip reasons:", "", *[f"- {reason} ({count})" for reason, count in skips.most_common()], ""]
text = "\n".join(lines)
print(text)
with open(os.environ["OUT"], "w") as f:
    f.write(text)
print(f"wrote {os.environ['OUT']}")
EOF
