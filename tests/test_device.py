"""spartan.train.device: the backend settings (cuDNN autotuning) and the description of the device a run records."""

import json

import pytest
import torch

from spartan.train.device import configure_backend, describe_device, driver_version
from spartan.train.provenance import environment

CPU = torch.device("cpu")


@pytest.fixture
def cudnn_flag():
    before = torch.backends.cudnn.benchmark
    yield
    torch.backends.cudnn.benchmark = before


@pytest.fixture
def fake_smi(tmp_path, monkeypatch):
    """An ``nvidia-smi`` on an otherwise empty PATH that prints the driver version of two GPUs."""
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 550.54.15\necho 550.54.15\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))


def test_cudnn_benchmark_is_set_on_cuda_and_ignored_on_the_cpu(cudnn_flag):
    torch.backends.cudnn.benchmark = False
    assert configure_backend(CPU, True) == {"cudnn_benchmark": False}
    assert torch.backends.cudnn.benchmark is False  # the CPU does not use cuDNN: torch's flag is left alone
    assert configure_backend(torch.device("cuda", 0), True) == {"cudnn_benchmark": True}  # a flag: no GPU needed
    assert torch.backends.cudnn.benchmark is True
    assert configure_backend(torch.device("cuda", 0), False) == {"cudnn_benchmark": False}
    assert torch.backends.cudnn.benchmark is False


def test_the_cpu_is_described_by_its_model_and_threads():
    described = describe_device(CPU)
    assert set(described) == {"type", "name", "threads"} and all(isinstance(v, str) for v in described.values())
    assert described["type"] == "cpu" and described["name"] and described["threads"] == str(torch.get_num_threads())


def test_a_gpu_is_described_by_name_cuda_driver_and_cudnn(fake_smi, monkeypatch):
    # no GPU here: the name is faked, the rest is what torch and the (fake) nvidia-smi report
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: f"Fake GPU {device.index}")
    described = describe_device(torch.device("cuda", 1))
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    assert described == {
        "type": "cuda",
        "index": "1",
        "name": "Fake GPU 1",
        "cuda": str(torch.version.cuda),
        "driver": "550.54.15",
        "cudnn": str(cudnn) if cudnn is not None else "none",
    }


def test_the_driver_version_is_unknown_without_nvidia_smi(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert driver_version() == "unknown"
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\nexit 9\n")  # no driver loaded: nvidia-smi fails
    smi.chmod(0o755)
    assert driver_version() == "unknown"


@pytest.mark.skipif(torch.cuda.is_available(), reason="describes the GPU where CUDA is available")
def test_the_environment_records_the_device():
    env = environment(1)
    assert env["device"] == describe_device(CPU) and env["processes"] == 1
    assert environment(2, CPU)["device"] == describe_device(CPU)
    json.dumps(env)  # summary.json holds it
