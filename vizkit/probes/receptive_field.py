"""Exact receptive fields: which input pixels can influence each position of a layer's feature map.

Traced, not tabulated: the model runs once on a probe image under a torch function mode that sees every
op between the image and the layer (modules and functional calls alike: ``x += shortcut``, ``F.pad``,
``permute``) and carries, for each tensor and each image axis, where that axis lives in the tensor and
how its positions map to image pixels. A sliding window (kernel k, stride s, padding p, dilation d) over
positions ``jump`` pixels apart whose boxes are ``size`` pixels wide, the first starting at pixel ``start``,
gives (Araujo et al. 2019, "Computing receptive fields of convolutional neural networks")::

    start' = start - p * jump        jump' = jump * s        size' = size + d * (k - 1) * jump

so output position i's box is [start' + i * jump', start' + i * jump' + size'), first and last pixel
included. Branches that meet (a residual sum, a concatenation) take the union of their boxes.

That grid of boxes is the ideal one and runs past the image. Next to it every axis carries each
position's exact span of image pixels, narrowed level by level: a tap that falls on zero padding sees
nothing, a reflect-padding tap sees the pixel it mirrors, and rows a stride never reaches (rows 68 and 69
of a 70 px image under a 4x4 stride-4 stem) are in no span. So ``ReceptiveField.seen`` and ``clipped``
are exact at the borders too, asymmetric TF "same" padding included. The tests check them against the
nonzero-gradient pixels of a probe on several timm architectures.

A global pooling on the path (squeeze-excitation gates, a softmax over positions) makes every activation
depend a little on the whole image. The box then stays the local one, where the feature's spatial content
comes from, and ``global_context`` says so.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any, Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakTensorKeyDictionary

from vizkit.core.errors import ConfigError
from vizkit.core.hooks import layer_output
from vizkit.core.models import data_config, find_layer

Box = tuple[int, int, int, int]  # (top, left, bottom, right), bottom and right exclusive

_FAR = 1 << 62
_NOTHING = (_FAR, -_FAR)  # the span of a position that sees no image pixel (a padding position)


@dataclass(frozen=True)
class ReceptiveField:
    """The receptive field of every position of a layer's feature map, in input pixels.

    ``size``, ``jump`` and ``start`` are (rows, columns): position (y, x) sees the box
    ``[start[0] + y * jump[0], ... + size[0]) x [start[1] + x * jump[1], ... + size[1])``, which may run
    past the image. ``rows[y]`` / ``cols[x]`` are the exact [first, end) image rows / columns that
    position influences at ``input_size`` ((0, 0) where it sees only padding).
    """

    size: tuple[int, int]
    jump: tuple[int, int]
    start: tuple[int, int]
    input_size: tuple[int, int]
    rows: tuple[tuple[int, int], ...] = field(repr=False)
    cols: tuple[tuple[int, int], ...] = field(repr=False)
    global_context: bool = False  # the layer also sees the whole image through a global pooling

    @property
    def grid_size(self) -> tuple[int, int]:
        """(height, width) of the layer's feature map at ``input_size``."""
        return len(self.rows), len(self.cols)

    def box(self, y: int, x: int) -> Box:
        """Position (y, x)'s unclipped box (top, left, bottom, right); bottom and right exclusive."""
        self._check(y, x)
        top = self.start[0] + y * self.jump[0]
        left = self.start[1] + x * self.jump[1]
        return top, left, top + self.size[0], left + self.size[1]

    def seen(self, y: int, x: int) -> Box | None:
        """The bounding box of the image pixels that influence (y, x) (None when it sees only padding)."""
        self._check(y, x)
        (top, bottom), (left, right) = self.rows[y], self.cols[x]
        return (top, left, bottom, right) if bottom > top and right > left else None

    def clipped(self, y: int, x: int, height: int | None = None, width: int | None = None) -> tuple[Box, Box]:
        """(the part of the box that shows image pixels (y, x) sees, the padding (top, left, bottom,
        right)): how far the unclipped box reaches past that part on each side, outside the image or
        onto image rows the layer's grid never reaches. ``height``/``width``, when given, must be
        ``input_size``. Equal to ``seen`` except where reflect or replicate padding hands a border
        position mirrored pixels from beyond its box (BlurPool's does not)."""
        if (height, width) != (None, None) and (height, width) != self.input_size:
            raise ConfigError(
                f"this receptive field was computed for {self.input_size[0]}x{self.input_size[1]} inputs, not "
                f"{height}x{width}; call receptive_field(model, layer, input_size=({height}, {width}))"
            )
        top, left, bottom, right = self.box(y, x)
        first_row, end_row = _within(self.rows[y], top, bottom)
        first_col, end_col = _within(self.cols[x], left, right)
        inside = (first_row, first_col, end_row, end_col)
        return inside, (first_row - top, first_col - left, bottom - end_row, right - end_col)

    def crop(self, pixels: torch.Tensor, y: int, x: int, fill: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
        """``crop(pixels, box, fill, inside)`` for position (y, x) of an ``input_size`` image."""
        self._check_image(pixels)
        inside, _padding = self.clipped(y, x)
        return crop(pixels, self.box(y, x), fill, inside)

    def _check(self, y: int, x: int) -> None:
        rows, cols = self.grid_size
        if not (0 <= y < rows and 0 <= x < cols):
            raise ConfigError(f"position ({y}, {x}) is outside the layer's {rows}x{cols} feature map")

    def _check_image(self, pixels: torch.Tensor) -> None:
        if tuple(pixels.shape[-2:]) != self.input_size:
            raise ConfigError(f"image is {pixels.shape[-2]}x{pixels.shape[-1]}, the receptive field was computed for "
                              f"{self.input_size[0]}x{self.input_size[1]}")


def _within(span: tuple[int, int], first: int, end: int) -> tuple[int, int]:
    first, end_inside = max(span[0], first), min(span[1], end)
    return (first, end_inside) if end_inside > first else (end, end)  # nothing: empty, at the far edge


def crop(pixels: torch.Tensor, box: Box, fill: float = 0.5, inside: Box | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``box`` (top, left, bottom, right) of ``pixels`` [C,H,W] at its full size: a [C,h,w] crop
    filled with ``fill`` where the box shows no image, and a [1,h,w] mask, True there.

    ``inside`` is the part that shows the image (``ReceptiveField.clipped``'s first box); by default the
    box's overlap with the image.
    """
    channels, height, width = pixels.shape
    top, left, bottom, right = box
    if bottom <= top or right <= left:
        raise ConfigError(f"box {box} is empty; expected (top, left, bottom, right) with bottom > top and right > left")
    if inside is None:
        inside = (max(top, 0), max(left, 0), min(bottom, height), min(right, width))
    first_row, first_col, end_row, end_col = inside
    out = pixels.new_full((channels, bottom - top, right - left), fill)
    mask = torch.ones(1, bottom - top, right - left, dtype=torch.bool, device=pixels.device)
    if end_row > first_row and end_col > first_col:
        if not (top <= first_row and left <= first_col and end_row <= bottom and end_col <= right
                and first_row >= 0 and first_col >= 0 and end_row <= height and end_col <= width):
            raise ConfigError(f"inside {inside} must lie within both the box {box} and the {height}x{width} image")
        rows = slice(first_row - top, end_row - top)
        cols = slice(first_col - left, end_col - left)
        out[:, rows, cols] = pixels[:, first_row:end_row, first_col:end_col]
        mask[:, rows, cols] = False
    return out, mask


def receptive_field(model: nn.Module, layer: str, input_size: tuple[int, int] | None = None) -> ReceptiveField:
    """The exact receptive field of `layer` (a ``named_modules`` name) for ``input_size`` (height,
    width) inputs, by default the model's own (timm's data config).

    One forward on a zero image, in eval mode and without gradients, stopped at the layer; the model's
    modes are restored. Raises ConfigError naming the op when the path to the layer holds an op whose
    effect on positions is not known (upsampling, attention, a linear layer over a spatial axis).
    """
    module = find_layer(model, layer)
    config = data_config(model)
    stem = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)  # timm's cfg keeps 3 for in_chans=1
    channels = stem.in_channels if stem is not None else int(config["input_size"][0])
    height, width = (int(n) for n in (input_size or config["input_size"][1:]))
    parameter = next(model.parameters(), None)
    image = torch.zeros(1, channels, height, width,
                        device=parameter.device if parameter is not None else None,
                        dtype=parameter.dtype if parameter is not None and parameter.is_floating_point() else None)
    tracer = _Tracer()
    tracer.geometry[image] = _Grid((2, 3), (_Axis.of_image(height), _Axis.of_image(width)))
    modes = [(m, m.training) for m in model.modules()]
    model.eval()  # batch statistics would tie every position to the whole batch
    try:
        with torch.no_grad(), tracer:
            output = layer_output(model, image, module, layer)
    finally:
        for m, training in modes:
            m.training = training
    geometry = tracer.geometry.get(output)
    where = f"'{layer}' in {type(model).__name__}"
    if isinstance(geometry, _Unfollowed):
        raise ConfigError(
            f"cannot compute the receptive field of {where}: {geometry.reason}. Known: convolutions, "
            f"pooling, padding, slicing, pointwise and shape ops, residual sums and concatenations"
        )
    if isinstance(geometry, _Whole):
        raise ConfigError(f"layer {where} has no spatial grid: a global pooling or a reduction over rows or columns "
                          f"comes before it; choose a layer that outputs a feature map")
    if geometry is None:
        raise ConfigError(f"the output of layer {where} does not depend on the input image")
    rows, cols = geometry.axes
    return ReceptiveField(
        size=(rows.size, cols.size), jump=(rows.jump, cols.jump), start=(rows.start, cols.start),
        input_size=(height, width), rows=_public(rows.spans), cols=_public(cols.spans),
        global_context=geometry.global_context,
    )


def _public(spans: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
    return tuple(span if span[1] > span[0] else (0, 0) for span in spans)


# ---------------------------------------------------------------- geometry of one tensor


@dataclass(frozen=True)
class _Axis:
    """How one tensor axis maps to one image axis: the ideal grid, and each position's exact span."""

    start: int
    jump: int
    size: int
    spans: tuple[tuple[int, int], ...]  # per position: [first, end) of the image pixels it sees

    @classmethod
    def of_image(cls, length: int) -> _Axis:
        return cls(0, 1, 1, tuple((i, i + 1) for i in range(length)))

    def window(self, kernel: int, stride: int, padding: int, dilation: int, length: int) -> _Axis:
        """A sliding window; `padding` is the count before the first position (any after it is implied)."""
        spans = [
            _union(self.spans[tap] for tap in range(i * stride - padding, i * stride - padding + dilation * (kernel - 1) + 1, dilation)
                   if 0 <= tap < len(self.spans))
            for i in range(length)
        ]
        return _Axis(self.start - padding * self.jump, self.jump * stride, self.size + dilation * (kernel - 1) * self.jump, tuple(spans))

    def pad(self, before: int, mode: str, length: int) -> _Axis:
        count = len(self.spans)
        source: Callable[[int], int | None] = {
            "constant": lambda i: i if 0 <= i < count else None,
            "reflect": lambda i: abs(i) if i < count else 2 * (count - 1) - i,  # reflect pads less than count
            "replicate": lambda i: min(max(i, 0), count - 1),
            "circular": lambda i: i % count,
        }[mode]
        spans = []
        for i in range(length):
            tap = source(i - before)
            spans.append(self.spans[tap] if tap is not None else _NOTHING)
        return _Axis(self.start - before * self.jump, self.jump, self.size, tuple(spans))

    def slice(self, begin: int, step: int, length: int) -> _Axis:
        spans = tuple(self.spans[begin + i * step] for i in range(length))
        return _Axis(self.start + begin * self.jump, self.jump * step, self.size, spans)

    def union(self, other: _Axis) -> _Axis:
        if other.jump != self.jump or len(other.spans) != len(self.spans):
            raise _CannotFollow(f"it joins grids of {len(self.spans)} positions {self.jump} px apart and "
                                f"{len(other.spans)} positions {other.jump} px apart")
        start = min(self.start, other.start)
        size = max(self.start + self.size, other.start + other.size) - start
        return _Axis(start, self.jump, size, tuple(_union(pair) for pair in zip(self.spans, other.spans)))


def _union(spans) -> tuple[int, int]:
    first, end = _NOTHING
    for span in spans:
        first, end = min(first, span[0]), max(end, span[1])
    return first, end


@dataclass(frozen=True)
class _Grid:
    """A tensor with the image's rows at tensor dim ``dims[0]`` and its columns at ``dims[1]``."""

    dims: tuple[int, int]
    axes: tuple[_Axis, _Axis]
    global_context: bool = False


@dataclass(frozen=True)
class _Whole:
    """A tensor without a spatial grid that depends on the whole image (after a global pooling)."""


@dataclass(frozen=True)
class _Unfollowed:
    reason: str  # the op whose effect on positions is unknown, and why


class _CannotFollow(Exception):
    pass


# ---------------------------------------------------------------- the tracer


class _Tracer(TorchFunctionMode):
    """Records the geometry of every tensor computed from the image (weakly keyed: no activation is
    kept alive). An op it cannot follow marks its outputs; that matters only if they reach the layer."""

    def __init__(self) -> None:
        super().__init__()
        self.geometry = WeakTensorKeyDictionary()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        outputs = _tensors(result)
        if not outputs:
            return result
        inputs = [(t, self.geometry[t]) for t in _tensors((args, kwargs)) if t in self.geometry]
        if inputs:
            geometry = _follow(func, args, kwargs, inputs, result)
            for tensor in outputs:
                self.geometry[tensor] = geometry
        return result


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors(item)]
    return []


def _op_name(func: Any) -> str:
    name = getattr(func, "__name__", None) or repr(func)
    return _DUNDER.get(name, name)


def _follow(func, args: tuple, kwargs: dict, inputs: list, result: Any):
    name = _op_name(func)
    for _tensor, geometry in inputs:
        if isinstance(geometry, _Unfollowed):
            return geometry
    grids = [(t, g) for t, g in inputs if isinstance(g, _Grid)]
    if not grids:
        return _Whole()
    rule = _RULES.get(name) or (_pointwise if _is_pointwise(name) else None)
    if rule is None:
        return _Unfollowed(f"'{name}' is an op whose effect on spatial positions vizkit does not know")
    try:
        geometry = rule(args, kwargs, grids, result)
    except _CannotFollow as why:
        return _Unfollowed(f"'{name}': {why}")
    # a gate computed from a global pooling (squeeze-excitation) lets every position see the whole image
    seen_whole = len(grids) < len(inputs) or any(grid.global_context for _t, grid in grids)
    if isinstance(geometry, _Grid) and seen_whole and not geometry.global_context:
        geometry = replace(geometry, global_context=True)
    return geometry


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else default


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    values = tuple(int(v) for v in value)
    return values if len(values) == 2 else (values[0], values[0])


def _first_output(result: Any) -> torch.Tensor:
    return result if isinstance(result, torch.Tensor) else _tensors(result)[0]


def _input_grid(args: tuple, kwargs: dict, grids: list) -> tuple[torch.Tensor, _Grid]:
    tensor = args[0] if args else kwargs.get("input", kwargs.get("self"))
    for t, geometry in grids:
        if t is tensor:
            return t, geometry
    raise _CannotFollow("its parameters (a kernel or weight) depend on the image")


def _spatial_last(tensor: torch.Tensor, grid: _Grid) -> None:
    if grid.dims != (tensor.dim() - 2, tensor.dim() - 1):
        raise _CannotFollow(f"it slides over the last two dims, but the image's rows and columns are dims {grid.dims}")


# ---------------------------------------------------------------- rules: one per kind of op


def _sliding(kernel_of: Callable, defaults: dict[str, Any]) -> Callable:
    """A rule for a 2-D sliding window whose kernel comes from `kernel_of(args, kwargs)`."""
    def rule(args, kwargs, grids, result):
        tensor, grid = _input_grid(args, kwargs, grids)
        _spatial_last(tensor, grid)
        values = {name: _arg(args, kwargs, index, name, default) for name, (index, default) in defaults.items()}
        kernel = _pair(kernel_of(args, kwargs))
        stride = _pair(values["stride"] or kernel)  # pools default to a stride of one kernel
        dilation = _pair(values.get("dilation") or 1)
        padding = values.get("padding") or 0
        if isinstance(padding, str):  # torch's 'same' puts an odd padding pixel after the last position
            padding = (0, 0) if padding == "valid" else tuple(d * (k - 1) // 2 for d, k in zip(dilation, kernel))
        padding = _pair(padding)
        output = _first_output(result)
        axes = tuple(
            axis.window(kernel[i], stride[i], padding[i], dilation[i], output.shape[-2 + i]) for i, axis in enumerate(grid.axes)
        )
        return _Grid(grid.dims, axes)

    return rule


_conv = _sliding(lambda args, kwargs: _arg(args, kwargs, 1, "weight").shape[-2:],
                 {"stride": (3, 1), "padding": (4, 0), "dilation": (5, 1)})
_max_pool = _sliding(lambda args, kwargs: _arg(args, kwargs, 1, "kernel_size"),
                     {"stride": (2, None), "padding": (3, 0), "dilation": (4, 1)})
_avg_pool = _sliding(lambda args, kwargs: _arg(args, kwargs, 1, "kernel_size"), {"stride": (2, None), "padding": (3, 0)})
_lp_pool = _sliding(lambda args, kwargs: _arg(args, kwargs, 2, "kernel_size"), {"stride": (3, None)})


def _adaptive_pool(args, kwargs, grids, result):
    tensor, grid = _input_grid(args, kwargs, grids)
    _spatial_last(tensor, grid)
    inputs, outputs = tensor.shape[-2:], _first_output(result).shape[-2:]
    if tuple(outputs) == (1, 1) and tuple(inputs) != (1, 1):
        return _Whole()
    axes = []
    for axis, n_in, n_out in zip(grid.axes, inputs, outputs):
        if n_in % n_out:
            raise _CannotFollow(f"adaptive pooling from {n_in} to {n_out} positions uses windows of unequal size")
        axes.append(axis.window(n_in // n_out, n_in // n_out, 0, 1, n_out))
    return _Grid(grid.dims, tuple(axes))


def _pad(args, kwargs, grids, result):
    tensor, grid = _input_grid(args, kwargs, grids)
    amounts = list(_arg(args, kwargs, 1, "pad"))
    mode = _arg(args, kwargs, 2, "mode", "constant")
    output = _first_output(result)
    axes = []
    for dim, axis in zip(grid.dims, grid.axes):
        pair = tensor.dim() - 1 - dim  # pad lists (before, after) from the last dim backwards
        before = amounts[2 * pair] if len(amounts) > 2 * pair else 0
        axes.append(axis.pad(before, mode, output.shape[dim]))
    return _Grid(grid.dims, tuple(axes))


def _pointwise(args, kwargs, grids, result):
    """Elementwise (with broadcasting): each output position sees the union of its inputs' positions."""
    output = _first_output(result)
    aligned = []
    for tensor, grid in grids:
        dims = tuple(output.dim() - tensor.dim() + d for d in grid.dims)  # broadcasting aligns the ends
        if any(output.shape[d] != len(axis.spans) for d, axis in zip(dims, grid.axes)):
            raise _CannotFollow("it broadcasts a feature map over a grid of another size")
        aligned.append(replace(grid, dims=dims))
    return _join(aligned)


def _join(grids: list[_Grid]) -> _Grid:
    """Where branches meet: the union of their boxes, position by position."""
    joined = grids[0]
    for grid in grids[1:]:
        if grid.dims != joined.dims:
            raise _CannotFollow(f"it combines tensors whose rows and columns sit at dims {joined.dims} and {grid.dims}")
        axes = tuple(a.union(b) for a, b in zip(joined.axes, grid.axes))
        joined = _Grid(joined.dims, axes, joined.global_context or grid.global_context)
    return joined


def _normalizing(reduced_dims: Callable) -> Callable:
    """Pointwise after statistics over `reduced_dims(args, kwargs, tensor)`: over channels that stays
    local; over rows or columns every position also sees the whole image."""

    def rule(args, kwargs, grids, result):
        tensor, grid = _input_grid(args, kwargs, grids)
        geometry = _pointwise(args, kwargs, grids, result)
        dims = {d % tensor.dim() for d in reduced_dims(args, kwargs, tensor)}
        return replace(geometry, global_context=True) if dims & set(grid.dims) else geometry

    return rule


_layer_norm = _normalizing(lambda args, kwargs, t: range(t.dim() - len(_arg(args, kwargs, 1, "normalized_shape")), t.dim()))
_over_positions = _normalizing(lambda args, kwargs, t: range(2, t.dim()))  # group_norm, instance_norm
_softmax = _normalizing(lambda args, kwargs, t: [_arg(args, kwargs, 1, "dim")])
_normalize = _normalizing(lambda args, kwargs, t: [_arg(args, kwargs, 2, "dim", 1)])


def _batch_norm(args, kwargs, grids, result):
    geometry = _pointwise(args, kwargs, grids, result)
    training = _arg(args, kwargs, 5, "training", False)
    return replace(geometry, global_context=True) if training else geometry


def _linear(args, kwargs, grids, result):
    tensor, grid = _input_grid(args, kwargs, grids)
    if tensor.dim() - 1 in grid.dims:
        raise _CannotFollow("a linear layer over a spatial axis mixes all its positions")
    return _pointwise(args, kwargs, grids, result)


_REDUCTION_DIM = {"norm": 2}  # the positional index of `dim`, where it is not 1


def _reduction(name: str) -> Callable:
    def rule(args, kwargs, grids, result):
        tensor, grid = _input_grid(args, kwargs, grids)
        dim = _arg(args, kwargs, _REDUCTION_DIM.get(name, 1), "dim")
        if isinstance(dim, torch.Tensor):  # torch.max(a, b): elementwise
            return _pointwise(args, kwargs, grids, result)
        if dim is None or isinstance(dim, bool):
            return _Whole()
        reduced = {d % tensor.dim() for d in ([dim] if isinstance(dim, int) else dim)}
        if any(tensor.shape[d] > 1 for d in reduced & set(grid.dims)):
            return _Whole()
        output = _first_output(result)
        if output.dim() == tensor.dim():  # keepdim
            return grid
        if reduced & set(grid.dims):
            return _Whole()
        return _Grid(tuple(d - sum(r < d for r in reduced) for d in grid.dims), grid.axes, grid.global_context)

    return rule


def _permute(args, kwargs, grids, result):
    tensor, grid = _input_grid(args, kwargs, grids)
    order = _arg(args, kwargs, 1, "dims")
    if isinstance(order, int):  # Tensor.permute(0, 2, 3, 1)
        order = args[1:]
    order = [d % tensor.dim() for d in order]
    return _Grid(tuple(order.index(d) for d in grid.dims), grid.axes, grid.global_context)


def _transpose(args, kwargs, grids, result):
    tensor, grid = _input_grid(args, kwargs, grids)
    first, second = (_arg(args, kwargs, 1, "dim0") % tensor.dim(), _arg(args, kwargs, 2, "dim1") % tensor.dim())
    swap = {first: second, second: first}
    return _Grid(tuple(swap.get(d, d) for d in grid.dims), grid.axes, grid.global_context)


def _movedim(args, kwargs, grids, result):
    tensor, grid = _input_grid(args, kwargs, grids)
    source, destination = _arg(args, kwargs, 1, "source"), _arg(args, kwargs, 2, "destination")
    source = [source] if isinstance(source, int) else list(source)
    destination = [destination] if isinstance(destination, int) else list(destination)
    n = tensor.dim()
    order: list[int | None] = [None] * n
    for s, d in zip(source, destination):
        order[d % n] = s % n
    rest = iter(d for d in range(n) if d not in {s % n for s in source})
    order = [d if d is not None else next(rest) for d in order]
    return _Grid(tuple(order.index(d) for d in grid.dims), grid.axes, grid.global_context)


def _reshape(args, kwargs, grids, result):
    """view/reshape/flatten/squeeze...: a dim survives where the sizes before it multiply alike."""
    tensor, grid = _input_grid(args, kwargs, grids)
    output = _first_output(result)
    before_in = [1]
    for n in tensor.shape:
        before_in.append(before_in[-1] * n)
    before_out = [1]
    for n in output.shape:
        before_out.append(before_out[-1] * n)
    dims = []
    for d in grid.dims:
        found = [e for e in range(output.dim()) if output.shape[e] == tensor.shape[d] and before_out[e] == before_in[d]]
        if not found and tensor.shape[grid.dims[0]] == tensor.shape[grid.dims[1]] == 1:
            return _Whole()  # a 1x1 map flattened to a vector: no grid any more
        if not found:
            raise _CannotFollow(f"it reshapes {tuple(tensor.shape)} to {tuple(output.shape)}, merging or splitting "
                                f"the image's rows or columns")
        dims.append(found[0])
    return _Grid(tuple(dims), grid.axes, grid.global_context)


def _getitem(args, kwargs, grids, result):
    tensor, grid = _input_grid(args, kwargs, grids)
    index = args[1] if isinstance(args[1], tuple) else (args[1],)
    if sum(i is Ellipsis for i in index) > 1 or any(isinstance(i, (torch.Tensor, list)) for i in index):
        raise _CannotFollow("advanced indexing")
    consumed = sum(i is not None and i is not Ellipsis for i in index)
    expanded: list[Any] = []
    for item in index:
        expanded.extend([slice(None)] * (tensor.dim() - consumed) if item is Ellipsis else [item])
    expanded.extend([slice(None)] * (tensor.dim() + expanded.count(None) - len(expanded)))
    source_dim, output_dim, new_dims, axes = 0, 0, {}, {}
    for item in expanded:
        if item is None:
            output_dim += 1
            continue
        if source_dim in grid.dims:
            if not isinstance(item, slice):
                raise _CannotFollow("it selects a single row or column of the feature map")
            begin, _stop, step = item.indices(tensor.shape[source_dim])
            axis = grid.axes[grid.dims.index(source_dim)]
            new_dims[source_dim] = output_dim
            axes[source_dim] = axis.slice(begin, step, _first_output(result).shape[output_dim])
        if isinstance(item, slice):
            output_dim += 1
        source_dim += 1
    return _Grid(tuple(new_dims[d] for d in grid.dims), tuple(axes[d] for d in grid.dims), grid.global_context)


def _along(dim_index: int, change: int = 0) -> Callable:
    """cat and split/chunk (``change`` 0), stack (+1: a new dim), unbind (-1: the dim goes): fine along
    channels, unknown along the image's rows or columns."""

    def rule(args, kwargs, grids, result):
        joined = _join([grid for _tensor, grid in grids])
        dim = _arg(args, kwargs, dim_index, "dim", 0) % (grids[0][0].dim() + max(change, 0))
        if change == 1:
            return replace(joined, dims=tuple(d + (d >= dim) for d in joined.dims))
        if dim in joined.dims:
            raise _CannotFollow("it joins or splits along the image's rows or columns")
        return replace(joined, dims=tuple(d - (change == -1 and d > dim) for d in joined.dims))

    return rule


_RULES: dict[str, Callable] = {
    "conv2d": _conv,
    "max_pool2d": _max_pool, "max_pool2d_with_indices": _max_pool, "_max_pool2d": _max_pool,
    "avg_pool2d": _avg_pool, "lp_pool2d": _lp_pool,
    "adaptive_avg_pool2d": _adaptive_pool, "adaptive_max_pool2d": _adaptive_pool,
    "adaptive_max_pool2d_with_indices": _adaptive_pool,
    "pad": _pad,
    "batch_norm": _batch_norm, "layer_norm": _layer_norm, "group_norm": _over_positions,
    "instance_norm": _over_positions, "softmax": _softmax, "log_softmax": _softmax, "normalize": _normalize,
    "linear": _linear,
    "permute": _permute, "transpose": _transpose, "swapaxes": _transpose, "swapdims": _transpose,
    "movedim": _movedim, "moveaxis": _movedim,
    **{name: _reshape for name in ("view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as")},
    "__getitem__": _getitem,
    "cat": _along(1), "concat": _along(1), "concatenate": _along(1), "stack": _along(1, change=1),
    "chunk": _along(2), "split": _along(2), "tensor_split": _along(2), "unbind": _along(1, change=-1),
    **{name: _reduction(name) for name in ("mean", "sum", "amax", "amin", "max", "min", "std", "var", "prod",
                                           "logsumexp", "norm", "nanmean", "nansum", "median", "argmax", "argmin")},
    # elementwise, but not tagged so in ATen (or composite there): dropout, copies, dtype moves, activations
    **{name: _pointwise for name in ("dropout", "dropout2d", "alpha_dropout", "feature_alpha_dropout", "contiguous", "to",
                                "float", "double", "half", "bfloat16", "type", "type_as", "detach", "requires_grad_",
                                "cpu", "cuda", "hardswish", "hardsigmoid", "mish", "elu", "selu", "celu", "leaky_relu",
                                "hardtanh", "relu6", "softplus", "prelu", "rrelu", "threshold", "local_response_norm",
                                "silu", "gelu", "relu", "sigmoid", "tanh")},
}

_DUNDER = {
    f"__{prefix}{op}__": op + ("_" if prefix == "i" else "")
    for op in ("add", "sub", "mul", "floordiv", "div", "pow", "mod", "matmul")
    for prefix in ("", "r", "i")
} | {"__neg__": "neg", "__abs__": "abs", "__truediv__": "div", "__rtruediv__": "div", "__itruediv__": "div_"}


@lru_cache(maxsize=None)
def _is_pointwise(name: str) -> bool:
    """ATen's own tag: an elementwise op (relu, add_, sigmoid, where, clamp, ...)."""
    try:
        op = getattr(torch.ops.aten, name)
    except (AttributeError, RuntimeError):
        return False
    if not hasattr(op, "overloads"):
        return False
    return any(torch.Tag.pointwise in getattr(op, overload).tags for overload in op.overloads())
