"""Sparse export: the compressed format, sparse inference modules, ONNX, and ``scripts/export.py`` on a real run."""

import io
import json
import subprocess
import sys

import pytest
import torch
import torchvision
from conftest import clean_env, run_cli
from helpers.sparse_layers import block_sparse, sparse_mlp, unstructured
from torch import nn

from spartan import Sparsifier, SparsityConfig, compressed, inference
from spartan.inference import (
    BLOCK_KERNELS,
    MATMUL_KERNELS,
    SparseConv1x1,
    SparseLinear,
    sparsify_for_inference,
)
from spartan.train.models import digits_cnn

NEGATIVE_ZERO = -(2**31)  # the bits of −0.0 as an int32


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def entry_bytes(entry: dict) -> int:
    return sum(t.numel() * t.element_size() for key, t in entry.items() if key in ("data", "mask", "values"))


def roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(compressed.compress(state, {"model": "test"}), buffer)
    buffer.seek(0)
    return compressed.decompress(torch.load(buffer, weights_only=True))


def test_compressed_files_decompress_bit_for_bit():
    conv = unstructured((64, 32, 3, 3), 0.05)
    conv[conv == 0] = torch.where(torch.rand_like(conv) < 0.01, -0.0, 0.0)[conv == 0]  # a few −0.0 among zeros
    state = {
        "conv": conv,
        "conv_cl": conv.to(memory_format=torch.channels_last),
        "linear": block_sparse(128, 256, 16, 0.1),
        "half": block_sparse(64, 64, 8, 0.2).half(),
        "bf16": unstructured((100,), 0.3).bfloat16(),
        "bias": torch.randn(64),
        "steps": torch.tensor(7),
        "ids": torch.arange(10),
        "flags": torch.rand(33) < 0.5,
        "empty": torch.zeros(32, 32),
    }
    restored = roundtrip(state)
    assert list(restored) == list(state)
    for name, tensor in state.items():
        assert restored[name].dtype == tensor.dtype and restored[name].shape == tensor.shape, name
        assert torch.equal(bits(restored[name]), bits(tensor)), name
    assert int((restored["conv"].view(torch.int32) == NEGATIVE_ZERO).sum()) > 0  # −0.0 survives


def test_each_tensor_gets_its_smallest_encoding():
    packed = compressed.compress(
        {
            "blocks": block_sparse(256, 512, 16, 0.1),
            "entries": unstructured((256, 512), 0.05),
            "dense": torch.randn(256, 512),
            "conv": unstructured((128, 64, 3, 3), 0.05),
        }
    )
    encodings = {name: (e["encoding"], e.get("block")) for name, e in packed["tensors"].items()}
    assert encodings == {
        "blocks": ("blocks", [16, 16]),
        "entries": ("blocks", [1, 1]),
        "dense": ("dense", None),
        "conv": ("blocks", [1, 1]),
    }
    dense_bytes = 256 * 512 * 4
    sizes = {name: entry_bytes(e) / dense_bytes for name, e in packed["tensors"].items()}
    assert sizes["blocks"] < 0.11 and sizes["entries"] < 0.09  # values + one bit per block / entry


def test_a_95_percent_sparse_resnet_compresses_to_at_most_012_of_its_dense_file():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    sparsifier = Sparsifier(model, SparsityConfig(method="magnitude", target=0.95, warmup_frac=0, finetune_frac=0), 1)
    sparsifier.step()
    state = sparsifier.finalize().state_dict()
    dense, packed = io.BytesIO(), io.BytesIO()
    torch.save(state, dense)
    torch.save(compressed.compress(state), packed)
    assert packed.getbuffer().nbytes / dense.getbuffer().nbytes <= 0.12
    # finalize() writes every zero as +0.0, so zeros cost no values
    assert all(int((t.view(torch.int32) == NEGATIVE_ZERO).sum()) == 0 for t in state.values() if t.is_floating_point())


def test_unknown_files_and_encodings_are_named():
    with pytest.raises(ValueError, match=r"not a spartan.compressed/1 file \(format: 'spartan.checkpoint/1'\)"):
        compressed.decompress({"format": "spartan.checkpoint/1"})
    with pytest.raises(ValueError, match="unknown tensor encoding 'csr'"):
        compressed.decode({"encoding": "csr"})


@pytest.mark.parametrize("kernel", MATMUL_KERNELS)
def test_sparse_linear_equals_the_dense_layer(kernel):
    torch.manual_seed(0)
    linear = nn.Linear(128, 96)
    with torch.no_grad():
        linear.weight.copy_(block_sparse(96, 128, 16, 0.25))
    sparse = SparseLinear(linear, kernel, (16, 16) if kernel in BLOCK_KERNELS else (1, 1))
    x = torch.randn(3, 50, 128)
    with torch.inference_mode():
        expected = linear(x)
        assert torch.allclose(sparse(x), expected, atol=1e-5, rtol=1e-5)
        sparse.transposed_output = True
        transposed = sparse(x)
        assert torch.allclose(transposed, expected, atol=1e-5, rtol=1e-5)
        assert transposed.reshape(-1, 96).t().is_contiguous()  # the next sparse layer reads it without a copy
        assert torch.allclose(sparse(x[:, ::2]), linear(x[:, ::2]), atol=1e-5, rtol=1e-5)  # a strided input


@pytest.mark.parametrize("kernel", MATMUL_KERNELS)
@pytest.mark.parametrize("stride", [1, 2])
def test_sparse_1x1_convolution_equals_the_dense_layer(kernel, stride):
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 32, 1, stride=stride, bias=False)
    with torch.no_grad():
        conv.weight.copy_(block_sparse(32, 64, 8, 0.3).view(32, 64, 1, 1))
    sparse = SparseConv1x1(conv, kernel, (8, 8) if kernel in BLOCK_KERNELS else (1, 1))
    x = torch.randn(2, 64, 9, 9).to(memory_format=torch.channels_last)
    with torch.inference_mode():
        assert torch.allclose(sparse(x), conv(x), atol=1e-5, rtol=1e-5)


def test_sparse_modules_reject_what_they_cannot_compute():
    with pytest.raises(ValueError, match="kernel must be one of"):
        SparseLinear(nn.Linear(4, 4), "dense")
    with pytest.raises(ValueError, match="SparseConv1x1 takes a 1×1 convolution"):
        SparseConv1x1(nn.Conv2d(4, 4, 3), "csr")
    with pytest.raises(ValueError, match="kernels must include 'dense'"):
        sparsify_for_inference(nn.Linear(4, 4), torch.randn(1, 4), kernels=("csr",))


def test_sparsify_for_inference_keeps_the_outputs_and_passes_activations_transposed():
    model = sparse_mlp()
    x = torch.randn(4, 197, 64)
    with torch.inference_mode():
        expected = model(x)
    choices = sparsify_for_inference(model, x, kernels=("dense", "blocks"), repeats=1)
    assert [c.name for c in choices] == ["fc1", "fc2"]  # the dense head is not a candidate
    assert all(c.block == (16, 16) and set(c.times_ms) == {"dense", "blocks"} for c in choices)
    replaced = {c.name for c in choices if c.kernel != "dense"}
    assert all(isinstance(getattr(model, name), SparseLinear) for name in replaced)
    if replaced == {"fc1", "fc2"}:
        assert model.fc1.transposed_output and not model.fc2.transposed_output  # fc2's output meets the residual
    with torch.inference_mode():
        assert torch.allclose(model(x), expected, atol=1e-5, rtol=1e-5)


def test_a_kernel_that_cannot_run_the_input_is_skipped_with_a_warning():
    model = sparse_mlp(fc2=False)
    model = model.to(torch.bfloat16)
    x = torch.randn(2, 20, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        expected = model(x)
    inference._warn_once.cache_clear()
    with pytest.warns(
        UserWarning, match=r"the bsr kernel cannot run on torch.bfloat16 input on cpu, skipped: .*BFloat"
    ):
        choices = sparsify_for_inference(model, x, kernels=("dense", "bsr", "blocks"), repeats=1)
    assert [set(c.times_ms) for c in choices] == [{"dense", "blocks"}]  # fc2 is dense: not a candidate
    with torch.inference_mode():
        assert torch.allclose(model(x), expected, atol=2e-2, rtol=2e-2)


def test_onnx_export_matches_onnxruntime(tmp_path):
    from spartan.onnx_export import export_onnx, onnx_session, run_onnx

    torch.manual_seed(0)
    model = digits_cnn().eval()
    export_onnx(model, torch.randn(2, 1, 8, 8), tmp_path / "m.onnx")
    session = onnx_session(tmp_path / "m.onnx")
    images = torch.randn(5, 1, 8, 8)  # another batch size than the example's
    with torch.inference_mode():
        assert torch.allclose(run_onnx(session, images), model(images), atol=1e-5)


def test_export_script_then_eval_of_the_compressed_file(tmp_path):
    from spartan.train.errors import ConfigError
    from spartan.train.evaluation import evaluate_run, find_weights, run_config
    from spartan.train.export import expand

    run_dir = tmp_path / "run"
    done = run_cli("train.py", "logger=none", "schedule.epochs=3", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    done = run_cli("scripts/export.py", str(run_dir), "--onnx", "--sparse-modules", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((run_dir / "export.json").read_text())
    assert result["compressed"]["ratio"] < 0.25  # a small CNN: BatchNorm and biases stay dense
    assert result["onnx"]["top1"] == result["onnx"]["top1_torch"] == summary["val_top1"]
    assert result["onnx"]["predictions_differ"] == 0 and result["onnx"]["max_abs_logit_diff"] < 1e-4
    assert result["sparse_modules"]["top1"] == summary["val_top1"]

    # eval.py checkpoint=RUN/model_sparse.pt: the run found from the file, the final model's top-1
    found, weights = find_weights(None, run_dir / "model_sparse.pt")
    assert found == run_dir
    assert evaluate_run(run_config(run_dir, {}), run_dir, weights)["val_top1"] == summary["val_top1"]

    # Expanded once, the file needs only torch: the plain model loads it with weights_only=True, bit for bit.
    expand(run_dir / "model_sparse.pt", tmp_path / "m.pt")
    code = (
        "import sys, torch; sys.modules['spartan'] = None;"  # spartan cannot be imported
        f"s = torch.load({str(tmp_path / 'm.pt')!r}, weights_only=True);"
        f"f = torch.load({str(run_dir / 'model_final.pt')!r}, weights_only=True);"
        "print(set(s) == set(f) and all(torch.equal(s[k].reshape(-1).view(torch.uint8),"
        " f[k].reshape(-1).view(torch.uint8)) for k in s))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=clean_env(tmp_path), capture_output=True, text=True)
    assert out.stdout.strip() == "True", out.stderr

    with pytest.raises(ConfigError, match=r"is not a readable spartan.compressed/1 file \(UnpicklingError"):
        expand(run_dir / "summary.json", tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()
    with pytest.raises(ConfigError, match="is not a directory"):
        find_weights(tmp_path / "nope", None)
