"""Incremental inference for occlusion (Nakandala, Kumar & Papakonstantinou, SIGMOD 2019, "Incremental
and Approximate Inference for Faster Occlusion-based Deep CNN Explanations", the Krypton system).

An occluded image differs from the clean one only inside its patch, so each layer's output differs from
the clean output only inside the patch's projection through the layers so far. The model is traced
once with torch.fx (timm's untraceable modules kept whole, as timm's own feature extraction does); the
clean image runs once through the graph and every node's output is kept. A batch of B patch positions
then runs through the same graph as ``Patch``es: per node, the clean output, each position's box
(``top``, ``left``) and the values inside it, one box size for the whole batch (the largest
position's, shifted inside the map at its borders: the extra cells are recomputed and equal the
clean ones). Per node:

  window     convolutions (``Conv2d``, timm's ``Conv2dSame``, ``F.conv2d``), max and average pooling:
             the output box is every position whose window meets the input box; the op runs with
             padding 0 on the input window gathered around it (cells outside the map take the op's
             padding value: 0, or -inf for max pooling; average pooling divides by its own count)
  pointwise  BatchNorm in eval mode, elementwise activations, dropout in eval mode, identity,
             arithmetic with a number or a tensor the image does not change and that has no
             spatial extent (a per-channel scale): the box is unchanged
  merge      add, subtract, multiply two patched tensors; concatenation along channels: the union box
  pad        a constant ``F.pad``: the box moves with the padding

When a box covers ``dense_at`` of its map, or a node is none of the above (a global pooling, a
squeeze-excitation gate, a linear layer, anything unknown), the patches become ordinary tensors (the
clean output repeated, each box written in) and the rest of the graph runs as plain batched
inference. The result equals naive inference up to float32 rounding (a convolution over a window
may sum in another order than over the whole map).

Approximate inference (``threshold`` τ < 1, Krypton's projective-field thresholding) caps every box's side
at τ of its map's, keeping its middle: the cells beyond are taken as unchanged.

``IncrementalModel.prepare(model)`` traces a model once (None and a reason where fx cannot);
``engine.clean(image)`` runs a clean image and keeps its activations; ``clean.occluded(top, left,
values)`` is the model's output for that image with each box replaced, batched.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node, Tracer

Starts = tuple[int, ...]  # a box's first row (or column), per position

DENSE_AT = 0.6  # share of a map a box may cover before plain batched inference is cheaper (measured on resnet18)

_POINTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
                      nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Hardtanh, nn.Softplus, nn.PReLU, nn.Identity, nn.Dropout,
                      nn.Dropout2d)
_POINTWISE_FUNCTIONS = {F.relu, F.relu6, F.leaky_relu, F.silu, F.gelu, F.hardswish, F.hardsigmoid, F.sigmoid, F.tanh, F.elu,
                        F.selu, F.celu, F.mish, F.hardtanh, F.softplus, F.dropout, torch.relu, torch.sigmoid, torch.tanh,
                        torch.clamp, torch.clip, torch.neg, torch.exp, operator.neg, F.batch_norm}
_POINTWISE_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "clamp", "clamp_", "clip", "neg", "exp", "contiguous"}
_MERGE_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.imul, torch.add,
                    torch.sub, torch.mul, torch.div}
_MERGE_METHODS = {"add", "add_", "sub", "mul", "mul_", "div"}


@dataclass
class Patch:
    """A batch of tensors equal to ``clean`` (batch 1) except inside one box each: rows ``top[b]`` to
    ``top[b] + h``, columns ``left[b]`` to ``left[b] + w`` hold ``values[b]``."""

    clean: torch.Tensor  # [1, C, H, W]
    top: Starts  # per position: host integers, so placing boxes never waits on the device
    left: Starts
    values: torch.Tensor  # [B, C, h, w]

    @property
    def batch(self) -> int:
        return self.values.shape[0]

    def dense(self) -> torch.Tensor:
        """The full tensors [B, C, H, W]."""
        full = self.clean.expand(self.batch, *self.clean.shape[1:]).clone()
        h, w = self.values.shape[-2:]
        for b, (top, left) in enumerate(zip(self.top, self.left)):
            full[b, :, top:top + h, left:left + w] = self.values[b]
        return full

    def gather(self, top: Starts, left: Starts, h: int, w: int, fill: float | None = None) -> torch.Tensor:
        """The full tensors' values in boxes of h x w at (top, left) [B, C, h, w]; cells outside the map
        get ``fill`` (every cell must be inside when it is None)."""
        if fill is None and (h, w) == tuple(self.values.shape[-2:]) and top == self.top and left == self.left:
            return self.values
        out = gather_clean(self.clean, top, left, h, w, fill, self.batch)
        ph, pw = self.values.shape[-2:]
        # one slice copy per position (Python ints): faster than advanced indexing at these sizes
        for b, (t, l, pt, pl) in enumerate(zip(top, left, self.top, self.left)):
            r0, r1, c0, c1 = max(t, pt), min(t + h, pt + ph), max(l, pl), min(l + w, pl + pw)
            if r0 < r1 and c0 < c1:
                out[b, :, r0 - t:r1 - t, c0 - l:c1 - l] = self.values[b, :, r0 - pt:r1 - pt, c0 - pl:c1 - pl]
        return out


def gather_clean(clean: torch.Tensor, top: Starts, left: Starts, h: int, w: int, fill: float | None, batch: int) -> torch.Tensor:
    """``clean`` [1, C, H, W] in boxes of h x w at (top[b], left[b]): [B, C, h, w], a new tensor; cells
    outside the map get ``fill``."""
    tops, lefts = top, left
    _, channels, height, width = clean.shape
    above, below = max(0, -min(tops)), max(0, max(tops) + h - height)
    before, after = max(0, -min(lefts)), max(0, max(lefts) + w - width)
    if above or below or before or after:
        if fill is None:
            raise ValueError("a box runs past the map and there is no padding value")
        clean = F.pad(clean, (before, after, above, below), value=fill)
    out = clean.new_empty((batch, channels, h, w))
    for b, (t, l) in enumerate(zip(tops, lefts)):
        out[b] = clean[0, :, t + above:t + above + h, l + before:l + before + w]
    return out


def _grid(start: Starts, length: int, device: torch.device) -> torch.Tensor:
    return torch.tensor(start, device=device)[:, None] + torch.arange(length, device=device)


@dataclass(frozen=True)
class Window:
    """A sliding-window op along both axes: kernel, stride, dilation and the padding before the first
    row/column (the padding after follows from the output size)."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    before: tuple[int, int]

    def reach(self, axis: int) -> int:
        return (self.kernel[axis] - 1) * self.dilation[axis] + 1

    def output_box(self, top: Starts, size: int, axis: int, out_size: int) -> tuple[Starts, int]:
        """The output positions whose windows meet input rows [top, top + size): (first per position,
        count), one count for the batch, the boxes shifted inside [0, out_size)."""
        stride, before, reach = self.stride[axis], self.before[axis], self.reach(axis)
        first = [max((t + before - reach + stride) // stride, 0) for t in top]  # ceil((t + before - reach + 1) / stride)
        last = [min((t + size - 1 + before) // stride, out_size - 1) for t in top]
        count = min(max(max(l - f for f, l in zip(first, last)) + 1, 1), out_size)
        return tuple(min(f, out_size - count) for f in first), count

    def input_box(self, first: Starts, count: int, axis: int) -> tuple[Starts, int]:
        """The input rows output positions [first, first + count) read (padding cells included)."""
        return tuple(f * self.stride[axis] - self.before[axis] for f in first), (count - 1) * self.stride[axis] + self.reach(axis)


def _pair(value: Any) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _same_before(size: int, kernel: int, stride: int, dilation: int) -> int:
    """TF "same" padding before the first row (timm's ``pad_same``: the odd cell goes after)."""
    total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2


@dataclass(frozen=True)
class WindowOp:
    """How to compute a window node on a gathered window (the op with padding 0). ``counted`` is set
    for an average pooling: ``run`` then returns window sums, divided by the count of the window's
    cells within ``counted`` cells of the map (its padding when PyTorch counts it, else 0)."""

    window: Window
    fill: float  # what the cells outside the map hold
    run: Callable[[torch.Tensor], torch.Tensor]  # window [B, C, h, w] -> output [B, C', h', w']
    counted: tuple[int, int] | None = None


def _conv(weight: torch.Tensor, bias: torch.Tensor | None, stride: Any, dilation: Any, groups: int, before: tuple[int, int]) -> WindowOp:
    stride, dilation = _pair(stride), _pair(dilation)
    window = Window(tuple(weight.shape[-2:]), stride, dilation, before)
    return WindowOp(window, 0.0, lambda x: F.conv2d(x, weight, bias, stride, 0, dilation, groups))


def _max_pool(kernel: Any, stride: Any, before: Any, dilation: Any) -> WindowOp:
    kernel, dilation = _pair(kernel), _pair(dilation)
    stride = _pair(stride) if stride not in (None, ()) else kernel
    return WindowOp(Window(kernel, stride, dilation, _pair(before)), -math.inf, lambda x: F.max_pool2d(x, kernel, stride, 0, dilation))


def _avg_pool(kernel: Any, stride: Any, padding: Any, count_include_pad: bool, divisor_override: int | None) -> WindowOp:
    kernel = _pair(kernel)
    stride = _pair(stride) if stride not in (None, ()) else kernel
    window = Window(kernel, stride, (1, 1), _pair(padding))
    if divisor_override:
        return WindowOp(window, 0.0, lambda x: F.avg_pool2d(x, kernel, stride, 0, divisor_override=divisor_override))
    counted = _pair(padding) if count_include_pad else (0, 0)
    return WindowOp(window, 0.0, lambda x: F.avg_pool2d(x, kernel, stride, 0, divisor_override=1), counted)


class _LeafTracer(Tracer):
    """fx tracing that keeps timm's untraceable modules whole (``timm.layers.get_notrace_modules``)."""

    def __init__(self) -> None:
        from timm.layers import get_notrace_functions, get_notrace_modules

        super().__init__(autowrap_functions=tuple(get_notrace_functions()))
        self.leaves = tuple(get_notrace_modules())

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, self.leaves) or super().is_leaf_module(module, qualified_name)


def trace(model: nn.Module) -> GraphModule:
    """The model as an fx graph (its own modules and parameters, not copies)."""
    tracer = _LeafTracer()
    graph = tracer.trace(model)
    return GraphModule(tracer.root, graph)


@dataclass
class Report:
    """Where a batch of occlusions stopped being local, and why."""

    dense_from: str | None = None  # the first node that ran as plain batched inference
    reason: str = ""  # "covers 64% of its 14x14 map", "global: AdaptiveAvgPool2d", "unsupported: MyModule at block.gate"
    unsupported: list[str] = field(default_factory=list)  # nodes of a kind the engine does not know (global ops are known)


# exact types: a subclass (timm's StdConv2d, a weight-standardized conv) may compute something else
_WINDOW_MODULES = {nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d}
_WINDOW_MODULE_NAMES = {"Conv2dSame", "MaxPool2dSame"}  # timm's TF "same" padding: its before-padding depends on the size
_BATCH_NORMS = {nn.BatchNorm2d}
_BATCH_NORM_ACT_NAMES = {"BatchNormAct2d", "FrozenBatchNormAct2d"}
_GLOBAL_MODULES = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten, nn.Linear)
_GLOBAL_FUNCTIONS = {torch.flatten, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.linear, torch.mean, torch.amax, torch.sum}
_GLOBAL_METHODS = {"mean", "amax", "sum", "flatten", "view", "reshape", "max", "permute", "transpose"}
_SHAPE_ATTRIBUTES = {"shape", "ndim", "dtype", "device"}
_INPLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}


class IncrementalModel:
    """A traced model that evaluates many occlusions of one image incrementally."""

    def __init__(self, graph: GraphModule, dense_at: float = DENSE_AT, threshold: float | None = None) -> None:
        self.graph = graph
        self.dense_at = dense_at
        self.threshold = threshold  # approximate: a box's side is capped at this share of its map's (Krypton's τ)
        self.modules = dict(graph.named_modules())
        self.nodes = list(graph.graph.nodes)

    @classmethod
    def prepare(cls, model: nn.Module, dense_at: float = DENSE_AT, threshold: float | None = None) -> tuple["IncrementalModel | None", str]:
        """(the engine, "") or (None, why the model cannot be traced). ``threshold`` makes it approximate."""
        try:
            return cls(trace(model), dense_at, threshold), ""
        except Exception as error:  # fx raises many kinds (TraceError, TypeError, AttributeError from a proxy)
            text = str(error).strip()
            first = text.splitlines()[0] if text else type(error).__name__
            return None, f"torch.fx cannot trace {type(model).__name__} ({type(error).__name__}: {first[:160]})"

    def clean(self, image: torch.Tensor) -> "CleanRun":
        """Run ``image`` [1, C, H, W] and keep every node's output (``output``: the model's)."""
        values: dict[Node, Any] = {}
        for node in self.nodes:
            if node.op == "output":
                return CleanRun(self, values, _substitute(node.args[0], values))
            if node.op == "placeholder":
                values[node] = image
            else:
                values[node] = self.call(node, _substitute(node.args, values), _substitute(node.kwargs, values))
        raise RuntimeError("the traced graph has no output")

    def call(self, node: Node, args: tuple, kwargs: dict) -> Any:
        """Run one node on these arguments (an in-place node on a copy of its first: every node's value is kept)."""
        if node.op == "get_attr":
            return _fetch_attr(self.graph, node.target)
        if self.inplace(node) and args and isinstance(args[0], torch.Tensor):
            args = (args[0].clone(), *args[1:])
        if node.op == "call_module":
            return self.modules[node.target](*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        raise RuntimeError(f"unexpected fx node {node.op}")

    def inplace(self, node: Node) -> bool:
        if node.op == "call_module":
            return bool(getattr(self.modules[node.target], "inplace", False))
        if node.op == "call_method":
            return str(node.target).endswith("_")
        return node.target in _INPLACE_FUNCTIONS or bool(node.kwargs.get("inplace", False))

    def describe(self, node: Node) -> str:
        if node.op == "call_module":
            return f"{type(self.modules[node.target]).__name__} at {node.target}"
        if node.op == "call_method":
            return f".{node.target}() ({node.name})"
        return f"{getattr(node.target, '__name__', str(node.target))} ({node.name})"

    def cap(self, first: Starts, count: int, limit: int) -> tuple[Starts, int]:
        """Approximate inference's projective-field threshold: a box wider than ``threshold`` of its map's
        side keeps only its middle (the cells farther out are taken as unchanged: a patch's influence
        fades towards the edge of its projective field). Exact inference keeps every box whole."""
        if self.threshold is None:
            return first, count
        most = max(1, math.ceil(self.threshold * limit))
        if count <= most:
            return first, count
        return tuple(f + (count - most) // 2 for f in first), most

    def kind(self, node: Node) -> str:
        """window | pointwise | merge | pad | shape, or "global: ..." / "unsupported: ..."."""
        if node.op == "call_module":
            module = self.modules[node.target]
            name = type(module).__name__
            if type(module) in _WINDOW_MODULES or name in _WINDOW_MODULE_NAMES:
                return "window"
            if isinstance(module, _POINTWISE_MODULES) or (type(module) in _BATCH_NORMS and not module.training):
                return "pointwise"
            if name in _BATCH_NORM_ACT_NAMES and not module.training and isinstance(module.act, _POINTWISE_MODULES) \
                    and isinstance(module.drop, _POINTWISE_MODULES):
                return "pointwise"
            if isinstance(module, _GLOBAL_MODULES):
                return f"global: {name}"
        elif node.op == "call_function":
            target = node.target
            if target in (F.conv2d, F.max_pool2d, F.avg_pool2d):
                return "window"
            if target is F.pad:
                return "pad"
            if target in _MERGE_FUNCTIONS or target is torch.cat:
                return "merge"
            if target in _POINTWISE_FUNCTIONS and not (target is F.batch_norm and (_bind(node) or {}).get("training")):
                return "pointwise"
            if target is getattr and node.args[1] in _SHAPE_ATTRIBUTES:
                return "shape"
            if target in _GLOBAL_FUNCTIONS:
                return f"global: {getattr(target, '__name__', target)}"
        elif node.op == "call_method":
            if node.target in _POINTWISE_METHODS:
                return "pointwise"
            if node.target in _MERGE_METHODS:
                return "merge"
            if node.target in ("size", "dim"):
                return "shape"
            if node.target in _GLOBAL_METHODS:
                return f"global: .{node.target}()"
        return f"unsupported: {self.describe(node)}"

    def window_op(self, node: Node, size: tuple[int, int], clean: dict[Node, Any]) -> WindowOp | None:
        """The window node's op on an input of ``size`` (None where it is not a plain one)."""
        if node.op == "call_module":
            module = self.modules[node.target]
            name = type(module).__name__
            if isinstance(module, nn.Conv2d):
                if module.padding_mode != "zeros":  # reflect or replicate padding: cells outside hold no constant
                    return None
                if name == "Conv2dSame":
                    before = tuple(_same_before(size[a], module.kernel_size[a], module.stride[a], module.dilation[a]) for a in range(2))
                elif module.padding == "same":  # PyTorch's "same" (stride 1): the odd cell goes after
                    before = tuple(module.dilation[a] * (module.kernel_size[a] - 1) // 2 for a in range(2))
                elif module.padding == "valid":
                    before = (0, 0)
                else:
                    before = _pair(module.padding)
                return _conv(module.weight, module.bias, module.stride, module.dilation, module.groups, before)
            if isinstance(module, nn.MaxPool2d):
                if module.return_indices:
                    return None
                if name == "MaxPool2dSame":
                    kernel, stride, dilation = _pair(module.kernel_size), _pair(module.stride), _pair(module.dilation)
                    return _max_pool(kernel, stride, tuple(_same_before(size[a], kernel[a], stride[a], dilation[a]) for a in range(2)), dilation)
                return _max_pool(module.kernel_size, module.stride, module.padding, module.dilation)
            return _avg_pool(module.kernel_size, module.stride, module.padding, module.count_include_pad, module.divisor_override)
        bound = _bind(node)
        if bound is None:
            return None
        if node.target is F.conv2d:
            padding = bound.get("padding", 0)
            if isinstance(padding, str):
                return None
            weight, bias = (clean[v] if isinstance(v, Node) else v for v in (bound["weight"], bound.get("bias")))
            return _conv(weight, bias, bound.get("stride", 1), bound.get("dilation", 1), bound.get("groups", 1), _pair(padding))
        if node.target is F.max_pool2d:
            if bound.get("return_indices"):
                return None
            return _max_pool(bound["kernel_size"], bound.get("stride"), bound.get("padding", 0), bound.get("dilation", 1))
        return _avg_pool(bound["kernel_size"], bound.get("stride"), bound.get("padding", 0), bound.get("count_include_pad", True),
                         bound.get("divisor_override"))


def _fetch_attr(module: nn.Module, target: str) -> Any:
    value: Any = module
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _substitute(value: Any, env: dict[Node, Any]) -> Any:
    return torch.fx.node.map_arg(value, lambda node: env[node])


_PARAMETERS = {  # the functional ops the engine reads arguments of, in their positional order
    F.conv2d: ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    F.max_pool2d: ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
    F.avg_pool2d: ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
    F.pad: ("input", "pad", "mode", "value"),
    torch.cat: ("tensors", "dim"),
    F.batch_norm: ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
}


def _bind(node: Node) -> dict[str, Any] | None:
    """A call_function node's arguments by parameter name (None for a function not in ``_PARAMETERS``:
    many torch functions are builtins with no signature to inspect)."""
    names = _PARAMETERS.get(node.target)
    if names is None or len(node.args) > len(names):
        return None
    return {**dict(zip(names, node.args)), **node.kwargs}


_STATIC = object()  # a node the occlusion does not change: its value is the clean run's


class _NotLocal(Exception):
    """A node that looked local but is not (the message says why)."""


class CleanRun:
    """One clean image's activations, ready for batches of occlusions."""

    def __init__(self, engine: IncrementalModel, values: dict[Node, Any], output: Any) -> None:
        self.engine = engine
        self.values = values
        self.output = output  # the traced graph's output for the clean image
        self.report = Report()

    def occluded(self, top: Sequence[int] | torch.Tensor, left: Sequence[int] | torch.Tensor, patch: torch.Tensor) -> torch.Tensor:
        """The model's output [B, ...] for the clean image with box b (``patch[b]``: [C, h, w]) written at
        (``top[b]``, ``left[b]``)."""
        env: dict[Node, Any] = {}
        for node in self.engine.nodes:
            if node.op == "output":
                return torch.fx.node.map_arg(node.args[0], lambda n: _dense(self._value(env, n)))
            if node.op == "placeholder":
                env[node] = Patch(self.values[node], _starts(top), _starts(left), patch)
            elif node.op == "get_attr":
                env[node] = _STATIC
            else:
                env[node] = self._step(node, env)
        raise RuntimeError("the traced graph has no output")

    def _value(self, env: dict[Node, Any], node: Node) -> Any:
        value = env[node]
        return self.values[node] if value is _STATIC else value

    def _step(self, node: Node, env: dict[Node, Any]) -> Any:
        changed = [env[n] for n in node.all_input_nodes if env[n] is not _STATIC]
        if not changed:
            return _STATIC
        if not all(isinstance(value, Patch) for value in changed):
            return self._run_dense(node, env, None)
        kind = self.engine.kind(node)
        if kind == "shape":
            return self._shape(node, env)
        compute = {"window": self._window, "pointwise": self._pointwise, "merge": self._merge, "pad": self._pad}.get(kind)
        if compute is None:
            return self._run_dense(node, env, kind)
        try:
            out = compute(node, env)
        except _NotLocal as why:
            return self._run_dense(node, env, str(why))
        height, width = out.clean.shape[-2:]
        h, w = out.values.shape[-2:]
        if h * w >= self.engine.dense_at * height * width:
            self._note(node, f"covers {h * w / (height * width):.0%} of its {height}x{width} map")
            return out.dense()
        return out

    def _shape(self, node: Node, env: dict[Node, Any]) -> Any:
        """A shape query answers for the full batch without building it."""
        def stand_in(n: Node) -> Any:
            value = self._value(env, n)
            if isinstance(value, Patch):
                return torch.empty((value.batch, *value.clean.shape[1:]), device="meta", dtype=value.clean.dtype)
            return value

        args, kwargs = torch.fx.node.map_arg(node.args, stand_in), torch.fx.node.map_arg(node.kwargs, stand_in)
        result = getattr(args[0], node.target)(*args[1:], **kwargs) if node.op == "call_method" else node.target(*args, **kwargs)
        if isinstance(result, torch.device):  # the stand-in lives on the meta device; the tensors do not
            return next(v for v in (self._value(env, n) for n in node.all_input_nodes) if isinstance(v, Patch)).clean.device
        return result

    def _window(self, node: Node, env: dict[Node, Any]) -> Patch:
        source = node.args[0] if node.args else None
        patched = [n for n in node.all_input_nodes if isinstance(env[n], Patch)]
        if patched != [source]:  # a weight that depends on the image, say
            raise _NotLocal(f"unsupported: {self.engine.describe(node)} with an input-dependent parameter")
        patch: Patch = env[source]
        op = self.engine.window_op(node, tuple(patch.clean.shape[-2:]), self.values)
        if op is None:
            raise _NotLocal(f"unsupported: {self.engine.describe(node)} (its padding or options)")
        out_clean = self.values[node]
        top, h = self.engine.cap(*op.window.output_box(patch.top, patch.values.shape[-2], 0, out_clean.shape[-2]), out_clean.shape[-2])
        left, w = self.engine.cap(*op.window.output_box(patch.left, patch.values.shape[-1], 1, out_clean.shape[-1]), out_clean.shape[-1])
        (in_top, in_h), (in_left, in_w) = op.window.input_box(top, h, 0), op.window.input_box(left, w, 1)
        values = op.run(patch.gather(in_top, in_left, in_h, in_w, op.fill))
        if op.counted is not None:
            values = values / self._count(op, patch.clean, in_top, in_left, in_h, in_w)
        return Patch(out_clean, top, left, values)

    @staticmethod
    def _count(op: WindowOp, clean: torch.Tensor, top: Starts, left: Starts, h: int, w: int) -> torch.Tensor:
        """An average pooling's divisor per output cell: its window's cells within ``op.counted`` of the map."""
        _, _, height, width = clean.shape
        (pad_y, pad_x), rows, cols = op.counted, _grid(top, h, clean.device), _grid(left, w, clean.device)
        valid = ((rows >= -pad_y) & (rows < height + pad_y))[:, :, None] & ((cols >= -pad_x) & (cols < width + pad_x))[:, None, :]
        kernel, stride = op.window.kernel, op.window.stride
        return F.avg_pool2d(valid[:, None].to(clean.dtype), kernel, stride, 0, divisor_override=1)

    def _pointwise(self, node: Node, env: dict[Node, Any]) -> Patch:
        patched = [n for n in node.all_input_nodes if isinstance(env[n], Patch)]
        spatial = [n for n in node.all_input_nodes if n not in patched and _spatial(self.values[n])]
        if len(patched) != 1 or spatial:
            return self._merge(node, env)
        (source,) = patched
        patch: Patch = env[source]
        values = self._apply(node, env, {source: patch.values})
        if values.shape[0] != patch.batch or values.shape[-2:] != patch.values.shape[-2:] or values.dim() != 4:
            raise _NotLocal(f"unsupported: {self.engine.describe(node)} changes the shape")
        return Patch(self.values[node], patch.top, patch.left, values)

    def _merge(self, node: Node, env: dict[Node, Any]) -> Patch:
        """An op on several tensors of one map size: each gathered on the union of the patched boxes."""
        if node.target is torch.cat and (_bind(node) or {}).get("dim", 0) not in (1, -3):
            raise _NotLocal(f"unsupported: {self.engine.describe(node)} not along channels")
        out_clean = self.values[node]
        size = tuple(out_clean.shape[-2:]) if isinstance(out_clean, torch.Tensor) and out_clean.dim() == 4 else None
        tensors = [n for n in node.all_input_nodes if isinstance(self.values[n], torch.Tensor)]
        if size is None or any(self.values[n].dim() == 4 and tuple(self.values[n].shape[-2:]) not in (size, (1, 1)) for n in tensors):
            raise _NotLocal(f"unsupported: {self.engine.describe(node)} on maps of other sizes")
        patches = [env[n] for n in tensors if isinstance(env[n], Patch)]
        boxes = []
        for axis, limit in enumerate(size):
            starts = [p.top if axis == 0 else p.left for p in patches]
            sizes = [p.values.shape[-2 + axis] for p in patches]
            first = [min(column) for column in zip(*starts)]
            last = [max(s + size for s, size in zip(column, sizes)) for column in zip(*starts)]
            count = min(max(l - f for f, l in zip(first, last)), limit)
            boxes.append(self.engine.cap(tuple(min(max(f, 0), limit - count) for f in first), count, limit))
        (top, h), (left, w) = boxes
        replaced = {}
        for n in tensors:
            value = env[n]
            if isinstance(value, Patch):
                replaced[n] = value.gather(top, left, h, w)
            elif _spatial(self.values[n]):
                replaced[n] = gather_clean(self.values[n], top, left, h, w, None, patches[0].batch)
        return Patch(out_clean, top, left, self._apply(node, env, replaced))

    def _pad(self, node: Node, env: dict[Node, Any]) -> Patch:
        bound = _bind(node) or {}
        pad = list(bound.get("pad", ()))
        if bound.get("mode", "constant") != "constant" or len(pad) != 4 or min(pad) < 0:
            raise _NotLocal(f"unsupported: {self.engine.describe(node)} (only a constant padding of the last two dimensions)")
        patch: Patch = env[node.args[0]]
        return Patch(self.values[node], tuple(t + pad[2] for t in patch.top), tuple(l + pad[0] for l in patch.left), patch.values)

    def _apply(self, node: Node, env: dict[Node, Any], replaced: dict[Node, torch.Tensor]) -> torch.Tensor:
        def value(n: Node) -> Any:
            return replaced[n] if n in replaced else self._value(env, n)

        return self.engine.call(node, torch.fx.node.map_arg(node.args, value), torch.fx.node.map_arg(node.kwargs, value))

    def _run_dense(self, node: Node, env: dict[Node, Any], reason: str | None) -> Any:
        if reason is not None:
            self._note(node, reason)
        args = torch.fx.node.map_arg(node.args, lambda n: _dense(self._value(env, n)))
        kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: _dense(self._value(env, n)))
        return self.engine.call(node, args, kwargs)

    def _note(self, node: Node, reason: str) -> None:
        if self.report.dense_from is None:
            self.report.dense_from, self.report.reason = self.engine.describe(node), reason
        if reason.startswith("unsupported") and reason not in self.report.unsupported:
            self.report.unsupported.append(reason)


def _starts(values: Sequence[int] | torch.Tensor) -> Starts:
    return tuple(values.tolist()) if isinstance(values, torch.Tensor) else tuple(int(v) for v in values)


def _dense(value: Any) -> Any:
    return value.dense() if isinstance(value, Patch) else value


def _spatial(value: Any) -> bool:
    """A tensor with a map: it varies over rows and columns."""
    return isinstance(value, torch.Tensor) and value.dim() == 4 and value.shape[-2:].numel() > 1
