"""benchmarks/norm_speed.py and its modules: the case grid and its filters, the byte model,
the timing loop, the correctness guard, and a tiny end-to-end run that writes every output."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCH)

import norm_cases  # noqa: E402
import norm_impls  # noqa: E402
import norm_speed  # noqa: E402
import norm_timing  # noqa: E402
from norm_cases import MiB  # noqa: E402

GiB = 1024 * MiB
HAS_CPP = norm_impls.unirep_kernels.backends()["cpp"][0]
# Smoke runs in this process: no mallopt (--alloc system), minimal timing.
SMOKE = ["--smoke", "--alloc", "system", "--min-run-time", "0.001"]


def shapes(device_type="cpu", cache=260 * MiB, available=16 * GiB, suites=norm_cases.SUITES, args=()):
    return norm_cases.select_shapes(suites, list(args), device_type, cache, available)


# --------------------------------------------------------------------------------------
# Case grid.


def test_default_sweep_grid():
    cases = norm_cases.build_cases(norm_cases.GridFilter(shapes=shapes()))
    names = [c.name for c in cases]
    assert len(names) == len(set(names)) == 40
    # every shape in the main configuration, D=1 pure and D=10 mixed
    for s in shapes():
        assert f"{s.label} f32 NCHW bn D1 pure" in names and f"{s.label} f32 NCHW bn D10 mixed" in names
    # the other axis values at the sweep shape of each suite, one at a time
    for label in ("r38-c64-32x32", "bw-64MiB"):
        for other in ("bf16 NCHW bn D1 pure", "f16 NCHW bn D10 mixed", "f32 NHWC bn D10 mixed",
                      "f32 NCHW bn+ D1 pure", "f32 NCHW in D10 mixed", "f32 NCHW bn D3 pure", "f32 NCHW bn D3 mixed",
                      "f32 NCHW bn D10 pure"):
            assert f"{label} {other}" in names
    assert "r38-c16-64x64 bf16 NCHW bn D1 pure" not in names  # not swept at other shapes
    assert not any(c.mixed and c.num_domains == 1 for c in cases)
    by_norm = {c.norm: c.modes for c in cases}
    assert by_norm["bn"] == ("train_fwd", "eval_fwd", "backward", "train_fwd_bwd")
    assert by_norm["bn+"] == ("eval_fwd",)
    assert by_norm["in"] == ("train_fwd", "eval_fwd", "backward", "train_fwd_bwd")


def test_grid_filters_and_product():
    flt = norm_cases.GridFilter(shapes=shapes(args=["r38-c64-32x32", "r38-c256-8x8"]), dtypes=["bfloat16"],
                                layouts=["NHWC"], norms=["bn", "in"], domains=[1, 3], batches=["pure", "mixed"],
                                modes=["eval_fwd", "backward"])
    product = norm_cases.build_cases(flt, "product")
    # 2 shapes x 1 dtype x 1 layout x 2 norms x 3 variants (D1 pure, D3 pure, D3 mixed)
    assert len(product) == 12
    assert {c.dtype for c in product} == {"bfloat16"} and {c.layout for c in product} == {"NHWC"}
    assert all(c.modes == ("eval_fwd", "backward") for c in product)
    sweep = norm_cases.build_cases(flt, "sweep")
    assert len(sweep) < len(product)
    # bn+ has only eval_fwd: with --modes backward it drops out
    only_bwd = norm_cases.build_cases(norm_cases.GridFilter(shapes=shapes(args=["r38-c64-32x32"]), norms=["bn+"],
                                                            modes=["backward"]))
    assert only_bwd == []


def test_shape_selection_and_bandwidth_sizes():
    assert norm_cases.bandwidth_sizes("cuda", 50 * MiB, 80 * GiB) == [256 * MiB, GiB]
    assert norm_cases.bandwidth_sizes("cpu", 260 * MiB, 16 * GiB) == [64 * MiB, 256 * MiB]
    assert norm_cases.bandwidth_sizes("cpu", 32 * MiB, 16 * GiB) == [16 * MiB, 64 * MiB]
    assert norm_cases.bandwidth_sizes("cpu", 260 * MiB, 2 * GiB) == [16 * MiB, 64 * MiB]  # memory cap
    bw = shapes("cuda", 50 * MiB, 80 * GiB, suites=["bandwidth"])
    for s in bw:
        for dtype in norm_cases.DTYPES:
            case = norm_cases.Case(s, dtype, "NCHW", "bn", 1, "pure", ("eval_fwd",))
            assert case.x_bytes >= 256 * MiB
    custom = shapes(args=["8x4x5x5", "r38-c16-64x64"])
    assert [s.label for s in custom] == ["8x4x5x5", "r38-c16-64x64"] and custom[0].suite == "custom"
    with pytest.raises(ValueError, match="unknown shape"):
        shapes(args=["nonsense"])
    with pytest.raises(ValueError, match="--dtypes"):
        norm_cases.parse_list("float32,int8", list(norm_cases.DTYPES), "--dtypes")
    assert norm_cases.parse_list("bf16,f32,bf16", list(norm_cases.DTYPES), "--dtypes",
                                 norm_cases.DTYPE_ALIASES) == ["bfloat16", "float32"]
    with pytest.raises(ValueError, match="--domains"):
        norm_cases.parse_domains("1,0")


def test_byte_model_for_the_main_shape():
    shape = {s.label: s for s in shapes()}["r38-c64-32x32"]
    f32 = norm_cases.Case(shape, "float32", "NCHW", "bn", 1, "pure", tuple(norm_cases.MODES))
    assert f32.x_bytes == 128 * 64 * 32 * 32 * 4 == 32 * MiB
    expected = {("bn", "train_fwd"): 3, ("bn", "eval_fwd"): 2, ("bn", "backward"): 5, ("bn", "train_fwd_bwd"): 8,
                ("bn+", "eval_fwd"): 3, ("in", "train_fwd"): 3, ("in", "eval_fwd"): 3, ("in", "backward"): 5,
                ("in", "train_fwd_bwd"): 8}
    for (norm, mode), units in expected.items():
        assert norm_cases.bytes_moved(norm, mode, f32.x_bytes) == units * 32 * MiB
    bf16 = norm_cases.Case(shape, "bfloat16", "NHWC", "bn", 10, "mixed", ("eval_fwd",))
    assert norm_cases.bytes_moved("bn", "eval_fwd", bf16.x_bytes) == 2 * 16 * MiB
    with pytest.raises(ValueError, match="no mode"):
        norm_cases.bytes_moved("bn+", "train_fwd", f32.x_bytes)


def test_compile_selection_defaults():
    args = norm_speed.parse_args([])
    cases = norm_speed.build_case_list(args, 260 * MiB, 16 * GiB)
    chosen = norm_speed.compile_selection(args, cases)
    assert args.compile == "main"
    assert chosen == {"r38-c64-32x32 f32 NCHW bn D1 pure", "r38-c64-32x32 f32 NCHW bn D10 mixed",
                      "bw-64MiB f32 NCHW bn D1 pure", "bw-64MiB f32 NCHW bn D10 mixed"}
    quick = norm_speed.parse_args(["--quick"])
    assert quick.compile == "none" and norm_speed.compile_selection(quick, cases) == set()


def test_bad_options_give_clear_errors(capsys):
    for argv, text in ((["--dtypes", "int8"], "--dtypes: unknown value 'int8'"),
                       (["--device", "tpu"], "--device: "),
                       (["--device", "meta"], "--device must be cpu or cuda"),
                       (["--backends", "triton"], "--backends"),
                       (["--quick", "--smoke"], "exclude each other"),
                       (["--min-run-time", "0"], "--min-run-time must be positive"),
                       (["--clock", "thread"], "--clock thread measures one thread's CPU time")):
        with pytest.raises(SystemExit) as exc:
            norm_speed.parse_args(argv)
        assert exc.value.code == 2
        assert text in capsys.readouterr().err


def test_help_explains_every_option():
    out = subprocess.run([sys.executable, os.path.join(BENCH, "norm_speed.py"), "--help"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for option in ("--quick", "--smoke", "--suite", "--shapes", "--grid", "--dtypes", "--layouts", "--norms",
                   "--domains", "--batches", "--modes", "--backends", "--baselines", "--compile", "--list",
                   "--device", "--out", "--name", "--wait-idle", "--min-run-time", "--rotate-mib", "--threads",
                   "--alloc", "--no-plot", "--clock", "under a minute"):
        assert option in out.stdout


# --------------------------------------------------------------------------------------
# Timing.


def test_time_callables_interleaves_and_orders():
    calls = []

    def sleeper(name, seconds):
        def fn():
            calls.append(name)
            time.sleep(seconds)
        return fn

    plan = norm_timing.TimingPlan(min_run_time=0.03, block_time=0.004, min_blocks=3, warmup=1)
    out = norm_timing.time_callables({"a": sleeper("a", 0.002), "b": sleeper("b", 0.008)}, torch.device("cpu"),
                                     plan)
    assert set(out) == {"a", "b"}
    for t in out.values():
        assert t["blocks"] >= 3 and t["calls"] >= 3 and t["min_ms"] <= t["median_ms"]
    assert out["b"]["median_ms"] > 2 * out["a"]["median_ms"]
    timed = calls[4:]  # after warm-up and calibration: blocks alternate between the two
    assert timed.index("b") < len(timed) - 1 and "a" in timed[timed.index("b"):]


def test_thread_clock_leaves_out_time_spent_waiting():
    """--clock thread counts CPU time: a call that sleeps costs (almost) nothing."""
    plan = norm_timing.TimingPlan(min_run_time=0.02, block_time=0.01, min_blocks=2, warmup=0, clock="thread")

    def spin():
        end = time.thread_time() + 0.002
        while time.thread_time() < end:
            pass
    out = norm_timing.time_callables({"sleep": lambda: time.sleep(0.002), "spin": spin}, torch.device("cpu"), plan)
    assert out["sleep"]["median_ms"] < 0.5 < out["spin"]["median_ms"]


def test_rotating_cycles_over_copies():
    seen = []
    fn = norm_timing.rotating(seen.append, 3)
    for _ in range(7):
        fn()
    assert seen == [0, 1, 2, 0, 1, 2, 0]


# --------------------------------------------------------------------------------------
# Correctness guard and end-to-end runs.


def _tiny_case(norm="bn", num_domains=3, batch="mixed", dtype="float32", layout="NCHW"):
    shape = norm_cases.parse_shape("8x4x5x5")
    return norm_cases.Case(shape, dtype, layout, norm, num_domains, batch, tuple(
        m for m in norm_cases.MODES if norm in norm_cases.MODES[m].units))


@pytest.mark.parametrize("norm", ["bn", "bn+", "in"])
@pytest.mark.parametrize("batch", ["pure", "mixed"])
def test_every_implementation_passes_the_guard(norm, batch):
    case = _tiny_case(norm=norm, batch=batch, layout="NHWC")
    pool = norm_impls.make_pool(case.dims, case.torch_dtype, True, torch.device("cpu"), copies=2)
    tensors = norm_impls.make_case_tensors(case, torch.device("cpu"))
    names = ["reference"] + (["cpp"] if HAS_CPP else []) + ["eager_loop", "module_list"]
    if norm_impls.cannot_express("native", case) is None:
        names.append("native")
    report = norm_impls.check_case(case, pool, tensors, names, backends=["reference", "cpp"])
    assert report["ok"], report
    assert set(report["impls"]) == set(names)
    checked = {c["what"] for c in report["impls"]["reference"]["checks"]}
    assert "y_eval" in checked and (norm == "bn+" or {"y_train", "dx", "dweight", "dbias"} <= checked)
    if norm == "bn":
        assert {"running_mean", "running_var"} <= checked


def test_guard_rejects_a_wrong_implementation(monkeypatch):
    case = _tiny_case()
    pool = norm_impls.make_pool(case.dims, case.torch_dtype, False, torch.device("cpu"), copies=2)
    tensors = norm_impls.make_case_tensors(case, torch.device("cpu"))
    real = norm_impls.unirep_kernels.domain_batch_norm

    def off_by_a_bit(*args, **kwargs):
        return real(*args, **kwargs) + 1e-2
    monkeypatch.setattr(norm_impls.unirep_kernels, "domain_batch_norm", off_by_a_bit)
    report = norm_impls.check_case(case, pool, tensors, ["reference", "eager_loop"], backends=["reference"])
    assert not report["ok"]
    assert not report["impls"]["reference"]["ok"] and report["impls"]["eager_loop"]["ok"]


def _read_outputs(out_dir, name):
    with open(os.path.join(out_dir, name + ".json")) as f:
        payload = json.load(f)
    with open(os.path.join(out_dir, name + ".md")) as f:
        md = f.read()
    return payload, md


def test_smoke_run_writes_json_md_png(tmp_path):
    rc = norm_speed.main(SMOKE + ["--out", str(tmp_path), "--name", "smoke", "--modes", "eval_fwd,backward"])
    assert rc == 0
    payload, md = _read_outputs(tmp_path, "smoke")
    assert (tmp_path / "smoke.png").stat().st_size > 10_000
    assert payload["backends"][0] == ("cpp" if HAS_CPP else "reference")
    assert payload["baselines"] == list(norm_impls.BASELINES)
    assert len(payload["cases"]) == 6 and payload["copy_bandwidth"][0]["gbps"] > 0
    for r in payload["cases"]:
        assert set(r["modes"]) == set(r["case"]["modes"]) <= {"eval_fwd", "backward"}
        for mode, row in r["modes"].items():
            assert row["bytes"] == norm_cases.bytes_moved(r["case"]["norm"], mode, r["case"]["x_bytes"])
            for name, t in row["times"].items():
                assert t["median_ms"] > 0 and t["gbps"] > 0 and "pct_copy" in t
            assert r["impl_status"]["compiled"] == "not run"
            if r["case"]["batch"] == "mixed" and r["case"]["norm"] != "in":
                assert r["impl_status"]["native"] == "cannot express" and "native" not in row["times"]
            else:
                assert "native" in row["times"] and "native" in row["speedups"][payload["backends"][0]]
    header = ("| shape | dtype | layout | norm | domains | mode | backend | ms | GB/s | % copy | eager loop ms | "
              "vs eager loop | ModuleList ms | vs ModuleList | native F.* ms | vs native F.* | compiled ref ms | "
              "vs compiled ref | bg cores |")
    assert header in md
    for section in ("## Byte model", "## Copy bandwidth", "## Results", "## Headline", "![effective bandwidth"):
        assert section in md


def test_compile_failure_is_a_note_not_a_crash(tmp_path, monkeypatch):
    def broken_compile(*args, **kwargs):
        raise RuntimeError("inductor exploded (deliberately, in a test)")
    monkeypatch.setattr(norm_impls.torch, "compile", broken_compile)
    rc = norm_speed.main(SMOKE + ["--out", str(tmp_path), "--name", "c", "--no-plot", "--compile", "all",
                                  "--norms", "bn", "--modes", "eval_fwd"])
    assert rc == 0  # a baseline that raises is reported, not fatal
    payload, md = _read_outputs(tmp_path, "c")
    for r in payload["cases"]:
        assert r["impl_status"]["compiled"] == "error"
        assert any("inductor exploded" in n for n in r["notes"])
    assert "| ERR |" in md and "inductor exploded" in md


def test_wrong_backend_is_not_timed_and_fails_the_run(tmp_path, monkeypatch):
    real = norm_impls.unirep_kernels.domain_batch_norm

    def wrong_for_reference(*args, **kwargs):
        y = real(*args, **kwargs)
        return y * 1.01 if kwargs.get("backend") == "reference" else y
    monkeypatch.setattr(norm_impls.unirep_kernels, "domain_batch_norm", wrong_for_reference)
    rc = norm_speed.main(SMOKE + ["--out", str(tmp_path), "--name", "w", "--no-plot", "--norms", "bn",
                                  "--modes", "eval_fwd", "--baselines", "native"])
    assert rc == 1
    payload, md = _read_outputs(tmp_path, "w")
    for r in payload["cases"]:
        assert r["impl_status"]["reference"] == "failed"
        assert all("reference" not in row["times"] for row in r["modes"].values())
    assert "FAIL" in md and "reference differs from reference.py" in md


def test_wrong_baseline_is_left_out_not_fatal(tmp_path, monkeypatch, capsys):
    # torch.compile of the reference can lose precision on some CPUs: a baseline that fails
    # the guard is excluded from the timing and reported, and the run still succeeds
    real = norm_impls.F.batch_norm

    def wrong_batch_norm(*args, **kwargs):
        return real(*args, **kwargs) * 1.01
    monkeypatch.setattr(norm_impls.F, "batch_norm", wrong_batch_norm)
    rc = norm_speed.main(SMOKE + ["--out", str(tmp_path), "--name", "b", "--no-plot", "--norms", "bn",
                                  "--batches", "pure", "--modes", "eval_fwd", "--baselines", "native"])
    assert rc == 0
    assert "baselines left out of the timing" in capsys.readouterr().err
    payload, md = _read_outputs(tmp_path, "b")
    for r in payload["cases"]:
        assert r["impl_status"]["native"] == "failed"
        assert all("native" not in row["times"] for row in r["modes"].values())
    assert "native differs from reference.py" in md


def test_eager_loop_groups_only_mixed_batches_per_call(monkeypatch):
    """A pure batch's domain is a host int: the eager loop builds its index once, in
    preparation; a mixed batch is grouped (torch.unique) in every call, as it must be."""
    calls = []
    real = torch.unique

    def counting_unique(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    for batch, per_call in (("pure", 0), ("mixed", 1)):
        case = _tiny_case(batch=batch)
        pool = norm_impls.make_pool(case.dims, case.torch_dtype, False, torch.device("cpu"), copies=1)
        prepared = norm_impls.prepare("eager_loop", case, norm_impls.make_case_tensors(case, torch.device("cpu")))
        monkeypatch.setattr(norm_impls.torch, "unique", counting_unique)
        calls.clear()
        with torch.no_grad():
            for _ in range(3):
                prepared.run(pool.xs[0], False)
        monkeypatch.setattr(norm_impls.torch, "unique", real)
        assert len(calls) == 3 * per_call, batch


def test_compiler_is_configured_once_per_run(tmp_path, monkeypatch):
    configured, resets = [], []
    monkeypatch.setattr(norm_impls, "configure_compiler", lambda: configured.append(1))
    monkeypatch.setattr(norm_impls, "reset_compiler", lambda: resets.append(1))
    monkeypatch.setattr(norm_impls.torch, "compile", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no")))
    rc = norm_speed.main(SMOKE + ["--out", str(tmp_path), "--name", "once", "--no-plot", "--compile", "all",
                                  "--norms", "bn", "--modes", "eval_fwd", "--baselines", "compiled"])
    assert rc == 0 and len(configured) == 1 and len(resets) == 2  # 2 cases: D=1 pure, D=10 mixed


def test_benchmark_backend_lists_are_the_librarys():
    from unirep_kernels.backends import AUTO_ORDER, NAMES

    assert norm_impls.BACKENDS is NAMES and norm_impls.DEVICE_BACKENDS is AUTO_ORDER


def test_main_is_measure_print_write_exit_status(tmp_path, monkeypatch, capsys):
    """main = measure -> print_summary -> write_results -> exit_status; each usable alone."""
    args = norm_speed.parse_args(SMOKE + ["--norms", "in", "--modes", "eval_fwd", "--baselines", "native",
                                          "--batches", "pure", "--domains", "1"])
    payload = norm_speed.measure(args)
    assert [r["case"]["name"] for r in payload["cases"]] == ["16x8x6x6 f32 NCHW in D1 pure"]
    norm_speed.print_summary(payload)
    assert "16x8x6x6" in capsys.readouterr().out
    written = norm_speed.write_results(payload, str(tmp_path), "split", plot=False)
    assert sorted(os.path.basename(p) for p in written) == ["split.json", "split.md"]
    assert norm_speed.exit_status(payload) == 0
    ours = payload["backends"][0]
    payload["cases"][0]["impl_status"][ours] = "failed"
    assert norm_speed.exit_status(payload) == 1
    assert norm_speed.measure(norm_speed.parse_args(SMOKE + ["--list"])) is None


def test_error_notes_keep_the_message_not_the_advice():
    class InductorError(Exception):
        pass
    exc = InductorError("AssertionError: \n\nSet TORCHDYNAMO_VERBOSE=1 for the internal stack trace (please do this "
                        "especially if you're reporting a bug to PyTorch). For even more developer context, set "
                        'TORCH_LOGS="+dynamo"\n')
    assert norm_impls.describe_error(exc) == "InductorError: AssertionError: (no message)"
    assert norm_impls.describe_error(RuntimeError("bad shape\nmore detail")) == "RuntimeError: bad shape more detail"


# --------------------------------------------------------------------------------------
# benchmarks/gpu_check.sh: its stage bookkeeping, on a machine without a GPU, with a stand-in
# for python that fails at once (the stages themselves need a GPU; this keeps the test fast).


def _gpu_check(tmp_path, **env):
    fake_python = tmp_path / "fake-python"
    fake_python.write_text("#!/bin/sh\necho \"fake python $*\"\nexit 3\n")
    fake_python.chmod(0o755)
    out = tmp_path / "out"
    run_env = {**os.environ, "OUT": str(out), "PYTHON": str(fake_python), **env}
    proc = subprocess.run(["bash", os.path.join(BENCH, "gpu_check.sh")], env=run_env, capture_output=True, text=True,
                          timeout=60)
    with open(out / "summary.md") as f:
        return proc, f.read(), out


def test_gpu_check_times_each_stage_and_counts_failures(tmp_path):
    """Every stage runs under its cap, is timed, reported as it ends and in the summary
    printed last, and a failed (or unknown) stage counts in the exit status."""
    proc, summary, out = _gpu_check(tmp_path, STAGES="paths train nonsense")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "== paths (cap 60 s): " in proc.stdout and "== paths: FAILED (rc 3), " in proc.stdout
    for stage in ("paths", "train"):
        assert re.search(rf"^\| {stage} \| FAILED \(rc 3\) \| \d+ \|$", summary, re.M), summary
    assert "| nonsense | unknown | 0 |" in summary
    assert re.search(r"^\| total \| \| \d+ \|$", summary, re.M)
    assert proc.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])
    with open(out / "gpu-check.log") as f:
        assert "fake python benchmarks/triton_paths.py --out" in f.read()


def test_gpu_check_skips_stages_past_its_deadline(tmp_path):
    proc, summary, out = _gpu_check(tmp_path, STAGES="build tests bench", DEADLINE="0")
    assert proc.returncode == 3
    for stage in ("build", "tests", "bench"):
        assert re.search(rf"^\| {stage} \| skipped \(-?\d+ s left of the 0 s deadline\) \| 0 \|$", summary, re.M)
    with open(out / "gpu-check.log") as f:
        assert "fake python setup.py" not in f.read()


def test_gpu_check_names_a_sanitizer_that_refuses_the_machine(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sanitizer = bin_dir / "compute-sanitizer"
    sanitizer.write_text("#!/bin/sh\necho '========= Error: Device not supported'\nexit 1\n")
    sanitizer.chmod(0o755)
    proc, summary, _ = _gpu_check(tmp_path, STAGES="memcheck", PATH=f"{bin_dir}:{os.environ['PATH']}")
    assert proc.returncode == 1
    assert "| memcheck | FAILED (rc 1): compute-sanitizer does not support this machine's GPU runtime |" in summary
