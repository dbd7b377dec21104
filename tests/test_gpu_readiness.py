"""Properties the GPU paths rely on, checked on the CPU: few host reads per step, a traceable backward."""

import pytest
import torch
import torchvision

from spartan import Sparsifier, SparsityConfig, kernels
from spartan.diagnostics import HostReads


@pytest.fixture
def eager_kernels():
    kernels.set_compile(False)  # the counts are the same on both paths; eager keeps this test fast
    yield
    kernels.set_compile(True)


def sgd_step(model: torch.nn.Module, x: torch.Tensor, sparsifier: Sparsifier) -> list[str]:
    """forward, backward, the Sparsifier's backward hook, a plain SGD update; returns finish_backward's reads."""
    model(x).square().mean().backward()
    with HostReads() as reads:
        sparsifier.finish_backward()
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(0.05 * p.grad)
            p.grad = None
    return reads.calls


@pytest.mark.parametrize(
    "method, allocation",
    [("spartan", "global"), ("spartan", "uniform"), ("spartan", "erk"), ("topkast", "erk"), ("magnitude", "uniform")],
)
def test_a_step_reads_the_host_at_most_8_times(eager_kernels, method, allocation):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)  # 21 masked tensors: 21 groups when not global
    config = SparsityConfig(method=method, target=0.9, allocation=allocation)
    sparsifier = Sparsifier(model, config, total_steps=2000)
    x = torch.randn(2, 3, 32, 32)
    for step in range(4):
        assert sgd_step(model, x, sparsifier) == []  # finish_backward never waits for the device
        with HostReads() as reads:
            telemetry = sparsifier.step()
        if step > 0:  # the first step after the dense start solves cold, from a sample
            assert reads.count <= 8, reads.calls
    assert 0 <= float(telemetry["flip_rate"]) <= 1  # telemetry stays on the device until read


@pytest.mark.parametrize("method", ["spartan", "topkast"])  # magnitude's forward is topkast's without a backward
def test_the_masked_forward_and_backward_trace_as_one_graph(method):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    Sparsifier(model, SparsityConfig(method=method, target=0.9, warmup_frac=0.0), total_steps=10)
    explained = torch._dynamo.explain(model)(torch.randn(2, 3, 32, 32))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons[:3]


def test_the_kernel_path_is_reported():
    assert kernels.path() == "compiled"
    kernels.set_compile(False)
    try:
        assert kernels.path().startswith("eager: turned off")
    finally:
        kernels.set_compile(True)


def test_a_compile_failure_falls_back_on_the_cpu_and_raises_on_cuda(monkeypatch):
    def broken(*args):
        raise ValueError("no Triton here")

    u = torch.rand(kernels.COMPILE_MIN_NUMEL, dtype=torch.float64)
    scalars = torch.tensor([0.5, 0.0, 1.0], dtype=torch.float64).unbind(0)
    kernels.set_compile(False)
    expected = kernels.launch(kernels.soft_mask_pass, u, None, torch.empty_like(u), *scalars)
    kernels.set_compile(True)
    monkeypatch.setitem(kernels._compiled, kernels.soft_mask_pass, broken)
    try:
        with pytest.warns(RuntimeWarning, match=r"failed \(ValueError: no Triton here\); falling back to eager"):
            got = kernels.launch(kernels.soft_mask_pass, u, None, torch.empty_like(u), *scalars)
        assert torch.equal(got, expected)  # the step that hit the failure still gets its result
        assert kernels.path() == "eager: torch.compile failed (ValueError: no Triton here)"
    finally:
        kernels.set_compile(True)
    with pytest.raises(RuntimeError, match=r"failed on cuda:0 \(ValueError: no Triton here\).*SPARTAN_COMPILE=0"):
        kernels._compile_failed(torch.device("cuda", 0), ValueError("no Triton here"))
    assert kernels.path() == "compiled"  # raising leaves the path as it was


def _doubled(x: torch.Tensor) -> torch.Tensor:
    return x * 2


def test_a_kernel_past_its_variant_limit_runs_eagerly_without_turning_compilation_off(monkeypatch):
    monkeypatch.setattr(kernels, "RECOMPILE_LIMIT", 1)
    x = torch.rand(kernels.COMPILE_MIN_NUMEL)
    with torch._dynamo.config.patch(recompile_limit=1):  # (monkeypatch would delete the key when undoing)
        assert torch.equal(kernels.fuse(_doubled, x), x * 2)  # the one variant allowed
        with pytest.warns(RuntimeWarning, match=r"_doubled reached 1 compiled variants.*run eagerly"):
            assert torch.equal(kernels.fuse(_doubled, x.double()), x.double() * 2)  # a second dtype: eager
        assert kernels.path() == "compiled"  # not a broken toolchain: nothing turned off, nothing raises on CUDA
        assert torch.equal(kernels.fuse(_doubled, x), x * 2)
    assert _doubled in kernels._compiled


def test_the_grad_mode_of_the_caller_does_not_recompile_the_kernels():
    from torch._dynamo.utils import counters

    u = torch.rand(kernels.COMPILE_MIN_NUMEL, dtype=torch.float64)
    scalars = torch.tensor([0.5, 0.0, 1.0], dtype=torch.float64).unbind(0)
    with torch.no_grad():
        kernels.launch(kernels.soft_mask_pass, u, None, torch.empty_like(u), *scalars)
    graphs = counters["stats"]["unique_graphs"]
    with torch.enable_grad():  # dynamo's recompile limit is small: each variant of a kernel uses up one entry
        kernels.launch(kernels.soft_mask_pass, u, None, torch.empty_like(u), *scalars)
    assert counters["stats"]["unique_graphs"] == graphs and kernels.path() == "compiled"


def test_the_gpu_check_dry_runs_every_section_on_the_cpu(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
    out = tmp_path / "check.json"
    command = [sys.executable, str(script), "--quick", "--device", "cpu", "--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    sections = json.loads(out.read_text())["sections"]
    assert {name: s["status"] for name, s in sections.items()} == dict.fromkeys(
        ("env", "kernels", "determinism", "syncs", "steps", "ddp", "sparse_inference", "ffcv"), "ok"
    )
    assert "| steps | ok |" in done.stdout
