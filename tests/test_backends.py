"""Backend selection (backend=, use_backend, UNIREP_BACKEND, auto) and the fallback when the
compiled extension cannot be loaded."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import unirep_kernels as uk
from conftest import CPU_BACKENDS

backends_mod = sys.modules["unirep_kernels.backends"]  # the attribute `backends` is the function

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_backends_reports_every_backend_with_a_reason():
    status = uk.backends()
    assert set(status) == {"reference", "cpp", "cuda", "triton"}
    for available, reason in status.values():
        assert isinstance(available, bool) and isinstance(reason, str) and reason
    assert status["reference"][0]
    if not torch.cuda.is_available():
        assert not status["cuda"][0]


def test_auto_prefers_compiled_backend_on_cpu():
    expected = "cpp" if CPU_BACKENDS else "reference"
    assert backends_mod.resolve_backend(None, torch.device("cpu")) == expected
    assert backends_mod.resolve_backend("auto", torch.device("cpu")) == expected


def test_precedence_keyword_over_context_over_environment(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("UNIREP_BACKEND", "reference")
    assert backends_mod.resolve_backend(None, cpu) == "reference"
    if CPU_BACKENDS:
        with uk.use_backend("cpp"):
            assert backends_mod.resolve_backend(None, cpu) == "cpp"
            with uk.use_backend("reference"):
                assert backends_mod.resolve_backend(None, cpu) == "reference"
            assert backends_mod.resolve_backend("reference", cpu) == "reference"
    monkeypatch.setenv("UNIREP_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="backend must be one of"):
        backends_mod.resolve_backend(None, cpu)


def test_unavailable_or_misplaced_backend_raises_with_reason():
    cpu = torch.device("cpu")
    if not uk.backends()["triton"][0]:
        with pytest.raises(RuntimeError, match="backend 'triton' is not available"):
            uk.domain_batch_norm(torch.randn(4, 3, 2, 2), 0, num_domains=1, use_batch_stats=True, backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        with uk.use_backend("fast"):
            pass
    if CPU_BACKENDS and not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
            backends_mod.resolve_backend("cuda", cpu)


@pytest.mark.skipif(not CPU_BACKENDS, reason="needs the compiled extension")
def test_selected_backend_really_runs(monkeypatch):
    """The selection reaches the kernels: count calls into each implementation."""
    calls = []
    real_ref = uk.reference.domain_batch_norm
    monkeypatch.setattr(uk.ops.reference, "domain_batch_norm", lambda *a, **k: calls.append("reference") or
                        real_ref(*a, **k))
    x = torch.randn(4, 3, 2, 2)
    uk.domain_batch_norm(x, 0, num_domains=1, use_batch_stats=True, backend="cpp")
    assert calls == []
    with uk.use_backend("reference"):
        uk.domain_batch_norm(x, 0, num_domains=1, use_batch_stats=True)
    assert calls == ["reference"]
    monkeypatch.setenv("UNIREP_BACKEND", "reference")
    uk.domain_batch_norm(x, 0, num_domains=1, use_batch_stats=True)
    assert calls == ["reference", "reference"]


def test_missing_extension_falls_back_to_reference_and_warns_once():
    code = textwrap.dedent("""
        import sys, warnings
        sys.modules["unirep_kernels._C"] = None  # makes `from unirep_kernels import _C` fail
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch, unirep_kernels as uk
            x = torch.randn(6, 3, 4, 4)
            for _ in range(3):
                y = uk.domain_batch_norm(x, torch.tensor([0, 1, 0, 1, 0, 1]), num_domains=2, use_batch_stats=True)
        ours = [w for w in caught if "unirep_kernels._C" in str(w.message)]
        assert len(ours) == 1, [str(w.message) for w in caught]
        assert "falling back to the pure-PyTorch reference backend" in str(ours[0].message)
        status = uk.backends()
        assert not status["cpp"][0] and "extension not loaded" in status["cpp"][1]
        ref = uk.reference.domain_batch_norm(x, torch.tensor([0, 1, 0, 1, 0, 1]), None, None, None, None,
                                             num_domains=2, use_batch_stats=True)
        assert torch.equal(y, ref)
        print("OK")
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


@pytest.mark.skipif(not CPU_BACKENDS, reason="needs the compiled extension")
def test_a_backend_is_one_entry_of_the_dispatch_table(monkeypatch):
    """A new entry (here: the C++ kernels under another name) is all the ops need to run a
    backend: checks, its compiled namespace, then the running-stat update."""
    from dataclasses import replace

    monkeypatch.setitem(backends_mod.BACKENDS, "mine", replace(backends_mod.BACKENDS["cpp"], name="mine", auto=()))
    x, domain = torch.randn(6, 3, 4, 4), torch.tensor([0, 1, 0, 1, 1, 0])
    stats = {name: (torch.zeros(2, 3), torch.ones(2, 3)) for name in ("mine", "reference")}
    ys = {name: uk.domain_batch_norm(x, domain, None, None, *stats[name], num_domains=2, use_batch_stats=True,
                                     backend=name) for name in stats}
    torch.testing.assert_close(ys["mine"], ys["reference"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats["mine"], stats["reference"], atol=1e-5, rtol=1e-5)
    assert not torch.equal(stats["mine"][0], torch.zeros(2, 3))  # the update ran
    assert uk.backends()["mine"] == uk.backends()["cpp"]
    with pytest.raises(ValueError, match="backend 'mine' runs on cpu tensors, but x is on cuda"):
        backends_mod.resolve_backend("mine", torch.device("cuda"))
    assert backends_mod.resolve_backend("mine", torch.device("meta")) == "mine"  # shapes only: any backend


def test_backend_resolution_needs_no_recompile_under_compile(monkeypatch):
    """Everything the dispatch reads about the backends is fixed at import: the first
    compiled call does not fill a module-level cache that the next call's guards see
    changed (before: a recompile on the second call of a fresh process)."""
    import torch._dynamo.testing

    monkeypatch.setattr(backends_mod, "_status_cache", None, raising=False)  # as in a fresh process
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    layer = uk.DomainBatchNorm2d(4, 3)
    compiled = torch.compile(layer, backend=counter, fullgraph=True)
    x, domain = torch.randn(6, 4, 3, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    for step in range(3):
        compiled(x + step, domain)
    assert counter.frame_count == 1
    assert int(layer.num_batches_tracked) == 3


@pytest.mark.parametrize("value,expected", [("1", True), ("true", True), ("Yes", True), ("y", True), ("ON", True),
                                            ("0", False), ("", False), ("no", False)])
def test_one_triton_interpreting_helper(monkeypatch, value, expected):
    """One test of TRITON_INTERPRET, read as triton reads it, used by the backend selection
    and by the Triton kernels alike."""
    monkeypatch.setenv("TRITON_INTERPRET", value)
    monkeypatch.delitem(sys.modules, "triton", raising=False)  # before triton is imported: the variable
    assert backends_mod.triton_interpreting() is expected
    monkeypatch.undo()
    pytest.importorskip("triton")
    from unirep_kernels.triton import kernels

    assert kernels.interpreting is backends_mod.triton_interpreting
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert backends_mod.triton_interpreting() is expected  # triton imported: its own setting
