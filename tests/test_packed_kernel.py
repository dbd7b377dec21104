"""The ``packed`` sparse inference kernel: its C library (built on first use, cached per CPU, optional) and
:class:`~spartan.inference.PackedLinear`, which must equal the dense layer on every shape, pattern, input layout
and thread count, and do no work on zeros where the pattern allows."""

import copy
import subprocess
import warnings

import pytest
import torch
from helpers.sparse_layers import block_sparse, sparse_mlp, unstructured
from torch import nn

from spartan import inference, native
from spartan.inference import PACKED_ROWS, PackedLinear, SparseLinear, sparsify_for_inference


@pytest.fixture
def fresh_library(tmp_path, monkeypatch):
    """An empty kernel cache and no library loaded yet (the loaded one comes back afterwards)."""
    monkeypatch.setenv("SPARTAN_CACHE_DIR", str(tmp_path / "cache"))
    native.packed_linear_library.cache_clear()
    inference._warn_once.cache_clear()
    yield tmp_path / "cache"
    native.packed_linear_library.cache_clear()
    inference._warn_once.cache_clear()


def linear_with(weight: torch.Tensor, bias: bool = True) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias)
    with torch.no_grad():
        linear.weight.copy_(weight)
    return linear


PATTERNS = {
    "16x16 blocks": (block_sparse(96, 128, 16, 0.25), (16, 16)),
    "8x8 blocks, 104 rows": (block_sparse(104, 64, 8, 0.3), (8, 8)),  # a short last strip, strips of two block rows
    "32x32 blocks": (block_sparse(64, 96, 32, 0.4), (32, 32)),
    "unstructured": (unstructured((40, 24), 0.1), (1, 1)),
}


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("threads", [1, 2])
def test_packed_linear_equals_the_dense_layer(pattern, threads):
    weight, block = PATTERNS[pattern]
    linear = linear_with(weight, bias=pattern != "unstructured")
    packed = PackedLinear(linear, block)
    x = torch.randn(3, 53, weight.shape[1])  # 159 tokens: full tiles of 8, a tail, and a split between threads
    inputs = {
        "batched": x,
        "one token": x[0, 0],
        "every other token": x[:, ::2],
        "rows with a stride": torch.randn(37, 2 * weight.shape[1])[:, : weight.shape[1]],  # read in place
        "features with a stride": x.transpose(0, 1).contiguous().transpose(0, 1),
        "a transposed view": torch.randn(weight.shape[1], 20).t(),
        "no tokens": x[:, :0],
    }
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            for name, tokens in inputs.items():
                out = packed(tokens)
                assert out.shape == linear(tokens).shape, name
                assert torch.allclose(out, linear(tokens), atol=1e-5, rtol=1e-5), name
    finally:
        torch.set_num_threads(before)


def test_packed_linear_stores_only_the_kept_blocks_when_they_fill_its_strips():
    weight, block = PATTERNS["16x16 blocks"]
    packed = PackedLinear(linear_with(weight), block)
    assert packed.values.numel() == weight.count_nonzero() == int(weight.ne(0).sum())
    short = PackedLinear(linear_with(PATTERNS["8x8 blocks, 104 rows"][0]), (8, 8))
    assert short.values.shape[2] == PACKED_ROWS and short.strip_ptr.numel() == 104 // PACKED_ROWS + 2


def test_packed_linear_rejects_what_it_cannot_compute():
    weight, block = PATTERNS["16x16 blocks"]
    packed = PackedLinear(linear_with(weight), block)
    with pytest.raises(ValueError, match=r"takes float32 CPU input with 128 features, got \(2, 128\) torch.float64"):
        packed(torch.randn(2, 128, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"with 128 features, got \(2, 64\)"):
        packed(torch.randn(2, 64))
    with pytest.raises(ValueError, match="its weights were moved to torch.float16 on cpu: sparsify the model again"):
        PackedLinear(linear_with(weight), block).half()(torch.randn(2, 128))
    with pytest.raises(ValueError, match="takes a float32 CPU weight, got torch.float64"):
        PackedLinear(linear_with(weight).double(), block)
    with pytest.raises(ValueError, match="the block width 48 must divide in_features 128"):
        PackedLinear(linear_with(weight), (16, 48))


def test_sparsify_for_inference_offers_packed_and_keeps_the_outputs():
    model = sparse_mlp()
    x = torch.randn(4, 197, 64)
    with torch.inference_mode():
        expected = model(x)
    choices = sparsify_for_inference(model, x, kernels=("dense", "blocks", "packed"), repeats=1)
    assert all(set(c.times_ms) == {"dense", "blocks", "packed"} for c in choices)
    with torch.inference_mode():
        assert torch.allclose(model(x), expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(copy.deepcopy(model)(x), model(x))  # a sparsified model copies like any other


def test_a_sparse_layer_feeding_a_packed_one_returns_the_usual_layout():
    model = sparse_mlp()
    x = torch.randn(2, 33, 64)
    with torch.inference_mode():
        expected = model(x)
    layers = {"fc1": SparseLinear(model.fc1, "blocks", (16, 16)), "fc2": PackedLinear(model.fc2, (16, 16))}
    inference._swap(model, layers)
    inference._choose_output_layouts(model, x, layers)
    assert not model.fc1.transposed_output  # packed reads (tokens, features): a transposed product would be copied
    with torch.inference_mode():
        assert torch.allclose(model(x), expected, atol=1e-5, rtol=1e-5)


def test_the_library_is_built_once_per_cpu_and_reused(fresh_library, monkeypatch):
    compiles = []
    real_run = subprocess.run
    monkeypatch.setattr(native.subprocess, "run", lambda *a, **k: compiles.append(a) or real_run(*a, **k))
    first = native._build("packed_linear")
    assert native._build("packed_linear") == first and len(compiles) == 1
    assert list(fresh_library.iterdir()) == [first]  # the temporary build folder is gone
    monkeypatch.setattr(native, "_cpu_signature", lambda: "another CPU")  # e.g. a cluster node of another kind
    assert native._build("packed_linear") != first and len(compiles) == 2


@pytest.mark.parametrize(
    ("compiler", "reason"), [("/nonexistent/cc", "no C compiler '/nonexistent/cc'"), ("false", "exit code 1")]
)
def test_without_a_working_compiler_the_other_kernels_are_used(fresh_library, monkeypatch, compiler, reason):
    monkeypatch.setenv("CC", compiler)
    assert native.packed_linear_library() is None and reason in native.build_error()
    with pytest.raises(RuntimeError, match="the packed kernel is unavailable"):
        PackedLinear(linear_with(PATTERNS["16x16 blocks"][0]), (16, 16))
    model = sparse_mlp(fc2=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        choices = sparsify_for_inference(model, torch.randn(2, 20, 64), kernels=("dense", "packed"), repeats=1)
    assert [c.times_ms.keys() for c in choices] == [{"dense"}]
    assert [str(w.message) for w in caught if "packed" in str(w.message)] == [
        f"the packed sparse kernel is unavailable, other kernels are used: {native.build_error()}"
    ]
