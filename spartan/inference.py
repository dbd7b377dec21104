"""Sparse inference: a finalized model's Linear layers and 1×1 convolutions computed from their non-zero weights.

:func:`sparsify_for_inference` times, for every layer with zeros, each kernel that fits its pattern on the input
the layer really sees (one forward pass of an example batch, at the current ``torch.get_num_threads()``), and
swaps in a :class:`PackedLinear`, :class:`SparseLinear` or :class:`SparseConv1x1` running the fastest one, or
leaves the layer as it is when dense wins. ``packed`` computes ``x @ Wᵀ`` in the activations' own layout; the
others compute ``W @ xᵀ``, the sparse weight being the left operand as MKL's sparse routines and small GEMMs
want it:

- ``csr`` / ``bsr``: ``torch.addmm`` of the weight as a sparse CSR / BSR tensor and the dense activations;
- ``block_rows``: for weights zero in whole ``bh × bw`` blocks, one dense GEMM per row of blocks over the
  activation rows its kept blocks read (gathered with ``index_select``): small dense GEMMs instead of a sparse one;
- ``blocks``: one ``bh × bw`` GEMM per kept block, accumulated into its rows of the output: no gather, one call
  per block (wins with many tokens, loses to the call overhead with few);
- ``packed`` (Linear layers, float32 on the CPU): the C kernel of :mod:`spartan.native`, which computes
  ``x @ Wᵀ`` in the usual ``(tokens, features)`` layout from the weight cut into strips of 16 output rows, each
  keeping only its column groups (``bw`` columns wide) that hold a non-zero, packed as 16-float columns: one
  vector FMA per kept weight column and token, no sparse-format overhead, no transposes. With ``bh`` a multiple
  of 16 it does no work on zeros; on other patterns a strip computes the union of its rows' kept groups.

A ``W @ xᵀ`` layer whose output goes (through elementwise ops) to another such layer returns it transposed, as a
``(tokens, features)`` view of the ``(features, tokens)`` product, so that a chain such as fc1 → GELU → fc2 passes
activations without transposing copies; other outputs are copied back to the usual layout. Outputs equal the
dense layer's within float32 rounding; the modules work under ``torch.inference_mode()``.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from spartan import native

MATMUL_KERNELS = ("csr", "bsr", "block_rows", "blocks")
"""The kernels of :class:`SparseMatmul`, which compute ``W @ xᵀ``."""
SPARSE_KERNELS = (*MATMUL_KERNELS, "packed")
"""Every sparse kernel; ``packed`` is :class:`PackedLinear`'s."""
BLOCK_KERNELS = ("bsr", "block_rows", "blocks")
"""The kernels that need the weight to be zero in whole blocks."""
KERNELS = ("dense", *SPARSE_KERNELS)
PACKED_ROWS = 16
"""Output rows per strip of the ``packed`` kernel: its vector width, fixed in ``csrc/packed_linear.c``."""


class SparseMatmul(nn.Module):
    """``W @ xt + b[:, None]`` for a fixed ``(out, in)`` weight ``W`` in one of :data:`MATMUL_KERNELS`."""

    def __init__(self, weight: Tensor, bias: Tensor | None, kernel: str, block: tuple[int, int] = (1, 1)):
        super().__init__()
        if kernel not in MATMUL_KERNELS:
            raise ValueError(f"kernel must be one of {MATMUL_KERNELS}, got {kernel!r}")
        weight = weight.detach().contiguous()
        self.kernel, self.block = kernel, block
        self.out_features, self.in_features = weight.shape
        bias = weight.new_zeros(self.out_features) if bias is None else bias.detach()
        self.register_buffer("bias", bias.reshape(-1, 1).clone(), persistent=False)
        self.row_groups: list[tuple[int, Tensor, Tensor]] = []
        self.blocks: list[tuple[int, int, Tensor]] = []
        if kernel in ("csr", "bsr"):
            with warnings.catch_warnings():  # torch's "sparse CSR/BSR support is in beta", once per layer
                warnings.filterwarnings("ignore", message="Sparse (CSR|BSR) tensor support is in beta")
                sparse = weight.to_sparse_csr() if kernel == "csr" else weight.to_sparse_bsr(block)
            self.register_buffer("weight", sparse, persistent=False)
        elif kernel == "block_rows":
            self.row_groups = _row_groups(weight, block)
        else:
            self.blocks = _kept_blocks(weight, block)

    def forward(self, xt: Tensor) -> Tensor:
        """``xt``: ``(in, tokens)``; returns ``(out, tokens)``."""
        if self.kernel in ("csr", "bsr"):
            return torch.addmm(self.bias, self.weight, xt)
        # Starting from a copy of the bias measured faster than a first GEMM with beta=0 per row and the bias added
        # in the copy to the output layout (a transposing add is slower than torch's transposing copy), and
        # copy_() into an empty tensor twice as fast as expand().contiguous().
        tokens, (bh, bw) = xt.shape[1], self.block
        out = torch.empty(self.out_features, tokens, dtype=xt.dtype, device=xt.device).copy_(
            self.bias.expand(-1, tokens)
        )
        out_rows = out.view(-1, bh, tokens).unbind(0)  # views made in one call: a slice per GEMM costs more
        for row, columns, weights in self.row_groups:
            out_rows[row].addmm_(weights, xt.index_select(0, columns))
        if self.blocks:
            in_rows = xt.view(-1, bw, tokens).unbind(0)
            for row, column, weights in self.blocks:
                out_rows[row].addmm_(weights, in_rows[column])
        return out


def _kept(weight: Tensor, block: tuple[int, int]) -> Tensor:
    """Which ``block``s of ``weight`` hold a non-zero: ``(out/bh, in/bw)`` bools."""
    (bh, bw), (out_features, in_features) = block, weight.shape
    return weight.reshape(out_features // bh, bh, in_features // bw, bw).ne(0).any(3).any(1)


def _row_groups(weight: Tensor, block: tuple[int, int]) -> list[tuple[int, Tensor, Tensor]]:
    """Per row of blocks with any kept block: (its index, the input rows it reads, its weights on them)."""
    (bh, bw), groups = block, []
    for row, kept in enumerate(_kept(weight, block)):
        columns = (kept.nonzero().flatten()[:, None] * bw + torch.arange(bw)).flatten()
        if columns.numel():
            groups.append((row, columns, weight[row * bh : (row + 1) * bh, columns].contiguous()))
    return groups


def _kept_blocks(weight: Tensor, block: tuple[int, int]) -> list[tuple[int, int, Tensor]]:
    """Per kept block: (its row of blocks, its column of blocks, its ``bh × bw`` weights)."""
    bh, bw = block
    return [
        (row, column, weight[row * bh : (row + 1) * bh, column * bw : (column + 1) * bw].contiguous())
        for row, column in _kept(weight, block).nonzero().tolist()
    ]


class SparseLayer(nn.Module):
    """A layer computed by a :class:`SparseMatmul` on its input as ``(in, tokens)``.

    With ``transposed_output`` the result is returned as a view of the ``(out, tokens)`` product, which saves a
    transposing copy when the next sparse layer reads it (through elementwise ops); otherwise it is copied to the
    layer's usual layout, which other consumers (attention, dense convolutions) need for their fast paths.
    :func:`sparsify_for_inference` sets it from where the outputs go."""

    def __init__(self, matmul: SparseMatmul):
        super().__init__()
        self.matmul = matmul
        self.transposed_output = False

    def tokens_first(self, x: Tensor) -> Tensor:
        """The input with its features first: contiguous when ``x`` is a transposed output, else a strided view."""
        raise NotImplementedError

    def output_view(self, out: Tensor, x: Tensor, xt: Tensor) -> Tensor:
        """The ``(out, tokens)`` product viewed in the layer's output shape."""
        raise NotImplementedError

    def reads_without_copy(self, x: Tensor) -> bool:
        return self.tokens_first(x).is_contiguous()

    def forward(self, x: Tensor) -> Tensor:
        xt = self.tokens_first(x)
        view = self.output_view(self.matmul(xt.contiguous().view(self.matmul.in_features, -1)), x, xt)
        return view if self.transposed_output else view.contiguous()


class SparseLinear(SparseLayer):
    """An ``nn.Linear`` on ``(..., in_features)``."""

    def __init__(self, linear: nn.Linear, kernel: str, block: tuple[int, int] = (1, 1)):
        super().__init__(SparseMatmul(linear.weight, linear.bias, kernel, block))
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def tokens_first(self, x: Tensor) -> Tensor:
        return x.reshape(-1, self.in_features).t()

    def output_view(self, out: Tensor, x: Tensor, xt: Tensor) -> Tensor:
        return out.t().view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, kernel={self.matmul.kernel}"


class SparseConv1x1(SparseLayer):
    """A 1×1 ``nn.Conv2d`` (any stride, no groups or padding) on ``(N, in, H, W)``, every pixel a token."""

    def __init__(self, conv: nn.Conv2d, kernel: str, block: tuple[int, int] = (1, 1)):
        if not is_sparse_conv_candidate(conv):
            raise ValueError(f"SparseConv1x1 takes a 1×1 convolution without groups or padding, got {conv}")
        super().__init__(SparseMatmul(conv.weight.flatten(1), conv.bias, kernel, block))
        self.stride = conv.stride
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels

    def tokens_first(self, x: Tensor) -> Tensor:
        """``(in, N, H', W')``: the pixels the stride keeps."""
        return x[:, :, :: self.stride[0], :: self.stride[1]].transpose(0, 1)

    def output_view(self, out: Tensor, x: Tensor, xt: Tensor) -> Tensor:
        return out.view(self.out_channels, *xt.shape[1:]).transpose(0, 1)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}, kernel={self.matmul.kernel}"


class PackedLinear(nn.Module):
    """An ``nn.Linear`` on float32 ``(..., in_features)`` CPU input computed by the ``packed`` C kernel (see the
    module's docstring), in the usual layout. Inference only: its output carries no gradient."""

    transposed_output = False  # its output is always in the usual layout, which every consumer reads directly

    def __init__(self, linear: nn.Linear, block: tuple[int, int] = (1, 1)):
        super().__init__()
        if native.packed_linear_library() is None:
            raise RuntimeError(f"the packed kernel is unavailable: {native.build_error()}")
        weight = linear.weight.detach()
        if weight.dtype != torch.float32 or weight.device.type != "cpu":
            raise ValueError(f"PackedLinear takes a float32 CPU weight, got {weight.dtype} on {weight.device}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        if self.in_features % block[1]:
            raise ValueError(f"the block width {block[1]} must divide in_features {self.in_features}")
        self.width = block[1]
        strip_ptr, columns, values = _packed_strips(weight, self.width)
        bias = torch.zeros(len(strip_ptr) * PACKED_ROWS - PACKED_ROWS)
        if linear.bias is not None:
            bias[: self.out_features] = linear.bias.detach()
        for name, tensor in (("strip_ptr", strip_ptr), ("columns", columns), ("values", values), ("bias", bias)):
            self.register_buffer(name, tensor, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        for buffer in (self.values, self.bias):  # .to() / .half() on the model would hand the C code other memory
            if buffer.dtype != torch.float32 or buffer.device.type != "cpu":
                raise ValueError(
                    f"PackedLinear runs in float32 on the CPU only; its weights were moved to {buffer.dtype} on "
                    f"{buffer.device}: sparsify the model again for that dtype and device"
                )
        if x.dtype != torch.float32 or x.device.type != "cpu" or x.shape[-1] != self.in_features:
            raise ValueError(
                f"PackedLinear({self.in_features}, {self.out_features}) takes float32 CPU input with "
                f"{self.in_features} features, got {tuple(x.shape)} {x.dtype} on {x.device}"
            )
        rows = x.reshape(-1, self.in_features)
        if rows.stride(1) != 1:  # the kernel takes any row stride
            rows = rows.contiguous()
        out = torch.empty(rows.shape[0], self.out_features)
        if rows.shape[0]:
            native.packed_linear_library().packed_linear(  # looked up per call: a module attribute would not copy
                rows.data_ptr(), rows.stride(0), out.data_ptr(), self.out_features, rows.shape[0], self.out_features,
                self.strip_ptr.data_ptr(), self.columns.data_ptr(), self.values.data_ptr(), self.width,
                self.bias.data_ptr(), torch.get_num_threads(),
            )  # fmt: skip
        return out.view(*x.shape[:-1], self.out_features)

    def reads_without_copy(self, x: Tensor) -> bool:
        return x.reshape(-1, self.in_features).stride(1) == 1

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, kernel=packed, width={self.width}"


def _packed_strips(weight: Tensor, width: int) -> tuple[Tensor, Tensor, Tensor]:
    """``weight`` as strips of :data:`PACKED_ROWS` rows (the last zero-padded) keeping their column groups of
    ``width`` columns that hold a non-zero: per strip the index of its first group (and the end), each group's
    first column, and the groups' weights as ``(groups, width, PACKED_ROWS)``."""
    out_features, in_features = weight.shape
    strips = -(-out_features // PACKED_ROWS)
    padded = weight.new_zeros(strips * PACKED_ROWS, in_features)
    padded[:out_features] = weight
    groups = padded.view(strips, PACKED_ROWS, in_features // width, width)
    kept = groups.ne(0).any(3).any(1)
    strip_ptr = torch.zeros(strips + 1, dtype=torch.int64)
    strip_ptr[1:] = kept.sum(1).cumsum(0)
    strip, group = kept.nonzero(as_tuple=True)
    return strip_ptr, group * width, groups[strip, :, group, :].transpose(1, 2).contiguous()


def is_sparse_conv_candidate(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.Conv2d)
        and module.kernel_size == (1, 1)
        and module.groups == 1
        and module.padding in ((0, 0), "valid")
        and module.dilation == (1, 1)
    )


@dataclass(frozen=True)
class Choice:
    """What :func:`sparsify_for_inference` measured for one layer (milliseconds per call, median)."""

    name: str
    shape: tuple[int, int]
    density: float
    block: tuple[int, int]
    times_ms: dict[str, float]
    kernel: str
    transposed_output: bool = False

    @property
    def speedup(self) -> float:
        """Dense time over the chosen kernel's time."""
        return self.times_ms["dense"] / self.times_ms[self.kernel]


def sparsify_for_inference(
    model: nn.Module,
    example: Tensor,
    *,
    kernels: Sequence[str] = KERNELS,
    max_density: float = 0.5,
    repeats: int = 5,
) -> list[Choice]:
    """Replace, in place, each Linear / 1×1 conv of ``model`` whose weight density (fraction of non-zeros) is at
    most ``max_density`` by a sparse module with the kernel measured fastest (median of ``repeats``) on the input
    it gets from ``example``; layers where ``dense`` is fastest stay. If the whole model is then not faster on
    ``example``, every layer stays dense (``kernel`` is ``dense`` in every choice). Returns what was measured, one
    :class:`Choice` per layer timed. Run it on the device, dtype and thread count the model will serve with."""
    unknown = [k for k in kernels if k not in KERNELS]
    if unknown or "dense" not in kernels:
        raise ValueError(f"kernels must include 'dense' and be among {KERNELS}, got {tuple(kernels)!r}")
    candidates = {
        name: module
        for name, module in model.named_modules()
        if (isinstance(module, nn.Linear) or is_sparse_conv_candidate(module))
        and _density(module.weight) <= max_density
    }
    choices: list[Choice] = []
    layers: dict[str, SparseLayer] = {}  # the winning sparse modules, as timed

    def measure(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            choice, winner = _choose(name, module, args[0], kernels, repeats)
            choices.append(choice)
            if choice.kernel != "dense":
                layers[name] = winner

        return hook

    _run_with_pre_hooks(model, example, {module: measure(name) for name, module in candidates.items()})
    if not layers:
        return choices
    _swap(model, layers)
    _choose_output_layouts(model, example, layers)
    sparse_ms = median_ms(model, example, repeats)
    _swap(model, {name: candidates[name] for name in layers})
    if sparse_ms < median_ms(model, example, repeats):
        _swap(model, layers)
        return [
            dataclasses.replace(c, transposed_output=layers[c.name].transposed_output) if c.name in layers else c
            for c in choices
        ]
    return [dataclasses.replace(c, kernel="dense") for c in choices]


def _run_with_pre_hooks(model: nn.Module, example: Tensor, hooks: dict[nn.Module, Callable]) -> None:
    """One inference pass of ``example`` with each hook called before its module's forward."""
    handles = [module.register_forward_pre_hook(hook) for module, hook in hooks.items()]
    try:
        with torch.inference_mode():
            model(example)
    finally:
        for handle in handles:
            handle.remove()


def _swap(model: nn.Module, modules: dict[str, nn.Module]) -> None:
    for name, module in modules.items():
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, module)


def _choose_output_layouts(model: nn.Module, example: Tensor, layers: dict[str, SparseLayer]) -> None:
    """A sparse layer returns its product transposed when the next sparse layer to run then reads its input without
    a copy (e.g. fc1 → GELU → fc2), as seen in one pass with every product transposed."""
    order, reads_free = [], {}

    def record(name: str) -> Callable:
        def hook(module: SparseLayer | PackedLinear, args: tuple) -> None:
            order.append(name)
            reads_free[name] = module.reads_without_copy(args[0])

        return hook

    transposable = {name: layer for name, layer in layers.items() if isinstance(layer, SparseLayer)}
    for layer in transposable.values():
        layer.transposed_output = True
    _run_with_pre_hooks(model, example, {layer: record(name) for name, layer in layers.items()})
    for layer in transposable.values():
        layer.transposed_output = False
    for name, following in zip(order, order[1:]):
        if name in transposable:
            transposable[name].transposed_output = reads_free[following]


def _sparse_module(module: nn.Module, kernel: str, block: tuple[int, int]) -> nn.Module:
    if kernel == "packed":
        return PackedLinear(module, block)
    return (SparseLinear if isinstance(module, nn.Linear) else SparseConv1x1)(module, kernel, block)


def _packed_fits(module: nn.Module, x: Tensor) -> bool:
    """Whether the ``packed`` kernel can compute ``module`` on ``x`` here (warns once if its library cannot be
    built on this machine)."""
    if not (isinstance(module, nn.Linear) and module.weight.dtype == x.dtype == torch.float32):
        return False
    if module.weight.device.type != "cpu" or x.device.type != "cpu":
        return False
    if native.packed_linear_library() is None:
        _warn_once(f"the packed sparse kernel is unavailable, other kernels are used: {native.build_error()}")
        return False
    return True


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def _density(weight: Tensor) -> float:
    return float(weight.count_nonzero()) / weight.numel()


def _choose(name: str, module: nn.Module, x: Tensor, kernels: Sequence[str], repeats: int) -> tuple[Choice, nn.Module]:
    """What was measured for ``module`` on ``x``, and the fastest layer (``module`` itself when dense wins)."""
    weight = module.weight.detach().flatten(1)
    block = _largest_zero_block(weight)
    times, layers = {}, {}
    for kernel in kernels:
        if (kernel in BLOCK_KERNELS and block == (1, 1)) or (kernel == "packed" and not _packed_fits(module, x)):
            continue
        try:
            layers[kernel] = module if kernel == "dense" else _sparse_module(module, kernel, block)
            times[kernel] = median_ms(layers[kernel].forward, x, repeats)  # forward(): not this pre-hook again
        except (RuntimeError, NotImplementedError) as err:  # e.g. MKL's sparse products have no bfloat16
            if kernel == "dense":
                raise
            layers.pop(kernel, None)
            _warn_once(f"the {kernel} kernel cannot run on {x.dtype} input on {x.device.type}, skipped: {err}")
    kernel = min(times, key=times.get)
    return Choice(name, tuple(weight.shape), _density(weight), block, times, kernel), layers[kernel]


def _largest_zero_block(weight: Tensor) -> tuple[int, int]:
    """The largest square block (side 2 to 64) that the non-zeros fill (kept blocks at least 95% non-zero) with at
    most half the blocks kept: the block the block kernels use; ``(1, 1)`` if none."""
    nonzero = weight.ne(0)
    for side in (64, 32, 16, 8, 4, 2):
        rows, cols = weight.shape
        if rows % side or cols % side:
            continue
        blocks = nonzero.reshape(rows // side, side, cols // side, side).any(3).any(1)
        if blocks.float().mean() < 0.5 and int(blocks.sum()) * side * side <= 1.05 * int(nonzero.sum()):
            return side, side
    return 1, 1


def median_ms(call: Callable[[Tensor], Tensor], x: Tensor, repeats: int) -> float:
    """Median milliseconds of ``call(x)`` over ``repeats`` calls after one warm-up, under inference mode (on CUDA
    each call is waited for: kernels run asynchronously)."""
    wait = torch.cuda.synchronize if x.is_cuda else lambda: None
    with torch.inference_mode():
        call(x)
        times = []
        for _ in range(repeats):
            wait()
            start = time.perf_counter()
            call(x)
            wait()
            times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[len(times) // 2]
