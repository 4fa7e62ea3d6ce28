"""DeepLIFT's backward rules (Shrikumar, Greenside & Kundaje 2017), for one forward of inputs and their
references in one batch: rows ``[0, B)`` are the inputs, rows ``[B, 2B)`` their references (row ``b``'s
at ``b + B``), as captum's ``DeepLift`` runs them. Forward, every operation is itself; backward, the
nonlinearities below pass *multipliers* instead of derivatives (``g``: the incoming gradient, Δ: a
row's value minus its reference's, the same multiplier for both rows of a pair):

* **Rescale**, on every elementwise activation: ``g · Δout / Δin``, or the activation's own
  derivative where ``|Δin| < eps`` (captum's fallback, where the quotient is 0/0). ReLU in every
  spelling (modules, in-place modules, ``F.relu``, ``torch.relu``, ``Tensor.relu_``, ...), ReLU6 and
  Hardtanh, LeakyReLU, PReLU, ELU, SELU, CELU, GELU, SiLU, Mish, Hardswish, Hardsigmoid, Softplus,
  LogSigmoid, sigmoid and tanh.
* **max pooling** (``F.max_pool2d``, ``nn.MaxPool2d``): captum's rule. Of a pair, the one with the
  larger output decides where the output's Δ goes: the input's own argmax takes
  ``g · (max(o, o') − o')``, the reference's argmax ``g · (o − max(o, o'))``; the shares are added and
  divided by that input's Δin (the derivative where ``|Δin| < eps``). Where overlapping windows
  (resnet's 3x3, stride-2 stem pool) pick the same input, their shares add up, as the gradient's do.

With these rules the multipliers satisfy summation-to-delta on networks of linear operations,
elementwise activations and max pooling: the input's multipliers times Δx sum to ΔS exactly (up to
float rounding). Every other operation (convolutions,
BatchNorm in eval mode, additions, pooling by averages) keeps its ordinary gradient, which is exact
for linear ones; for a product of two activations (a squeeze-excite gate, GLU), LayerNorm, a softmax or
a vision transformer's attention it is the gradient's linearization, as in captum (whose softmax rule
reaches only ``nn.Softmax`` modules, which timm's attention does not use), and summation-to-delta then
holds only approximately: each input's ``completeness_error`` says by how much, so the map is never
silently off. On a transformer it is large (random-weight ``test_vit`` and ``vit_tiny_patch16_224``:
0.5-1.8 of S(x) - S(x')): there DeepLIFT is a linearization, and integrated gradients, whose error
shrinks with its steps, is the method to trust.

Max pooling other than ``max_pool2d`` without indices (adaptive, fractional, 1-D, 3-D, Lp) is refused
by name rather than given a silently wrong map. As in ``vizkit.probes.relu_rules`` the rules are installed with a
``TorchFunctionMode`` for the duration of the forward: nothing on the model is touched (no hooks, no
flags), so in-place activations and activations written as functions are handled alike.
``vizkit.methods.attribution.deeplift`` lists how captum's ``DeepLift`` differs.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from vizkit.core import hooks
from vizkit.core.hooks import tensors_in as _tensors
from vizkit.core.errors import ConfigError

EPS = 1e-10  # captum's: |Δin| below it takes the derivative instead of Δout/Δin

# activation call -> (its name, the out-of-place function, the position of its `inplace` argument
# (None: it has none), whether the call is in place by its name)
_RESCALED: dict[Callable, tuple[str, Callable, int | None, bool]] = {
    F.relu: ("ReLU", torch.relu, 1, False),
    torch.relu: ("ReLU", torch.relu, None, False),
    torch.Tensor.relu: ("ReLU", torch.relu, None, False),
    F.relu_: ("ReLU", torch.relu, None, True),
    torch.relu_: ("ReLU", torch.relu, None, True),
    torch.Tensor.relu_: ("ReLU", torch.relu, None, True),
    F.relu6: ("ReLU6", F.relu6, 1, False),
    F.hardtanh: ("Hardtanh", F.hardtanh, 3, False),
    F.hardtanh_: ("Hardtanh", F.hardtanh, None, True),
    F.leaky_relu: ("LeakyReLU", F.leaky_relu, 2, False),
    F.leaky_relu_: ("LeakyReLU", F.leaky_relu, None, True),
    torch.prelu: ("PReLU", torch.prelu, None, False),
    F.elu: ("ELU", F.elu, 2, False),
    F.elu_: ("ELU", F.elu, None, True),
    F.selu: ("SELU", F.selu, 1, False),
    F.celu: ("CELU", F.celu, 2, False),
    F.gelu: ("GELU", F.gelu, None, False),
    F.silu: ("SiLU", F.silu, 1, False),
    F.mish: ("Mish", F.mish, 1, False),
    F.hardswish: ("Hardswish", F.hardswish, 1, False),
    F.hardsigmoid: ("Hardsigmoid", F.hardsigmoid, 1, False),
    F.softplus: ("Softplus", F.softplus, None, False),
    F.logsigmoid: ("LogSigmoid", F.logsigmoid, None, False),
    torch.sigmoid: ("Sigmoid", torch.sigmoid, None, False),
    torch.Tensor.sigmoid: ("Sigmoid", torch.sigmoid, None, False),
    torch.sigmoid_: ("Sigmoid", torch.sigmoid, None, True),
    torch.Tensor.sigmoid_: ("Sigmoid", torch.sigmoid, None, True),
    torch.tanh: ("Tanh", torch.tanh, None, False),
    torch.Tensor.tanh: ("Tanh", torch.tanh, None, False),
    torch.tanh_: ("Tanh", torch.tanh, None, True),
    torch.Tensor.tanh_: ("Tanh", torch.tanh, None, True),
}
_RELU = torch.relu
# operations with no DeepLIFT rule here: refused by name
_REFUSED = {
    F.max_pool1d: "max_pool1d", F.max_pool3d: "max_pool3d",
    F.adaptive_max_pool1d: "adaptive_max_pool1d", F.adaptive_max_pool2d: "adaptive_max_pool2d", F.adaptive_max_pool3d: "adaptive_max_pool3d",
    F.fractional_max_pool2d: "fractional_max_pool2d", F.fractional_max_pool3d: "fractional_max_pool3d",
    F.lp_pool1d: "lp_pool1d", F.lp_pool2d: "lp_pool2d",
}
_MAX_POOL_ARGUMENTS = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")


def _differences(tensor: torch.Tensor) -> torch.Tensor:
    """Each input's row minus its reference's: ``[B, ...]`` of a ``[2B, ...]`` tensor."""
    half = tensor.shape[0] // 2
    return tensor[:half] - tensor[half:]


def _both_halves(gradient: torch.Tensor, factor: torch.Tensor, divisor: torch.Tensor) -> torch.Tensor:
    """(gradient · factor) / divisor in captum's order of operations, the [B] factor and divisor applied
    to both halves of the [2B] gradient (without concatenating copies of them)."""
    half = divisor.shape[0]
    result = torch.empty_like(gradient)
    torch.div(gradient[:half] * factor, divisor, out=result[:half])
    torch.div(gradient[half:] * factor, divisor, out=result[half:])
    return result


class _Rescale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, function, arguments, keywords, inplace, eps, mode):
        ctx.function, ctx.arguments, ctx.keywords, ctx.eps, ctx.mode = function, arguments, keywords, eps, mode
        delta_in = _differences(x.detach())  # before an in-place activation overwrites x
        # ReLU's derivative needs its output only; another activation's, its input
        before = None if function is _RELU else x.detach().clone() if inplace else x
        if inplace:
            ctx.mark_dirty(x)
            output = torch.relu_(x) if function is _RELU else x.copy_(function(x, *arguments, **keywords))
        else:
            output = function(x, *arguments, **keywords)
        ctx.save_for_backward(delta_in, output, before)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        delta_in, output, before = ctx.saved_tensors
        multiplier = _both_halves(grad_output, _differences(output), delta_in)
        small = delta_in.abs() < ctx.eps
        if bool(small.any()):  # captum's fallback: the derivative where Δout/Δin is 0/0 or nearly
            multiplier = torch.where(torch.cat([small, small]), _derivative(ctx, before, output, grad_output), multiplier)
        return multiplier, None, None, None, None, None, None


def _derivative(ctx, before: torch.Tensor | None, output: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """The activation's ordinary backward: ReLU's own kernel, any other by autograd at the saved input."""
    if ctx.function is _RELU:
        return torch.ops.aten.threshold_backward(grad_output, output, 0)
    with torch.enable_grad(), ctx.mode.passing_through():
        leaf = before.detach().requires_grad_(True)
        (gradient,) = torch.autograd.grad(ctx.function(leaf, *ctx.arguments, **ctx.keywords), leaf, grad_output)
    return gradient


def _scatter(values: torch.Tensor, indices: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Each pooled value added at its window's argmax (flat indices per [H, W] plane) in a tensor of the
    pool input's ``shape``: max pooling's own backward, and captum's unpooling with overlaps summed."""
    planes = values.new_zeros(shape[0], shape[1], shape[2] * shape[3])
    return planes.scatter_add_(2, indices.flatten(2), values.flatten(2)).view(shape)


class _MaxPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, keywords, eps):
        output, indices = F.max_pool2d(x, **keywords, return_indices=True)
        ctx.eps, ctx.shape = eps, x.shape
        ctx.mark_non_differentiable(indices)
        ctx.save_for_backward(_differences(x.detach()), output, indices)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        delta_in, output, indices = ctx.saved_tensors
        half = delta_in.shape[0]
        # captum's rule: the pair's larger output decides whose argmax takes the difference
        larger = torch.max(output[:half], output[half:])
        shares_of_rows = torch.empty_like(grad_output)
        torch.mul(grad_output[:half], larger - output[half:], out=shares_of_rows[:half])
        torch.mul(grad_output[half:], output[:half] - larger, out=shares_of_rows[half:])
        spread = _scatter(shares_of_rows, indices, ctx.shape)
        multiplier = (spread[:half] + spread[half:]) / delta_in
        multiplier = torch.cat([multiplier, multiplier])
        small = delta_in.abs() < ctx.eps
        if bool(small.any()):
            multiplier = torch.where(torch.cat([small, small]), _scatter(grad_output, indices, ctx.shape), multiplier)
        return multiplier, None, None


class _DeepLiftMode(hooks.RuleMode):
    def __init__(self, rows: int, method: str, eps: float, source: torch.Tensor | None = None) -> None:
        super().__init__()
        # tensors computed from ``source`` (the inputs), where the rules apply: an activation of tensors
        # made from parameters alone (a relative-position MLP) is not per example and keeps its gradient
        self._path: dict[int, torch.Tensor] | None = None if source is None else {id(source): source}
        self.rows = rows
        self.method = method
        self.eps = eps
        self.refused: set[str] = set()
        self.unpaired: set[str] = set()  # activations on tensors whose rows are not the batch's pairs

    def rule_call(self, func, args, kwargs):
        if self._path is None:
            return self._ruled(func, args, kwargs)
        if not any(id(t) in self._path for t in _tensors((args, kwargs))):
            return func(*args, **kwargs)
        result = self._ruled(func, args, kwargs)
        self._path.update((id(t), t) for t in _tensors(result) if t.requires_grad)
        return result

    def _ruled(self, func, args, kwargs):
        if func in _RESCALED:
            name, function, inplace_at, inplace = _RESCALED[func]
            arguments, keywords = list(args[1:]), dict(kwargs)
            if inplace_at is not None:
                if "inplace" in keywords:
                    inplace = bool(keywords.pop("inplace"))
                elif len(arguments) >= inplace_at:
                    inplace = bool(arguments.pop(inplace_at - 1))
            if self._paired(args[0], name):
                return _Rescale.apply(args[0], function, tuple(arguments), keywords, inplace, self.eps, self)
        elif func is F.max_pool2d:
            keywords = {**dict(zip(_MAX_POOL_ARGUMENTS, args[1:])), **kwargs}
            if keywords.pop("return_indices", False):
                self.refused.add("max_pool2d with return_indices")
            elif args[0].dim() == 4 and self._paired(args[0], "max_pool2d"):
                return _MaxPool.apply(args[0], keywords, self.eps)
            else:
                self.refused.add("max_pool2d on an unbatched input")
        elif func in _REFUSED:
            self.refused.add(_REFUSED[func])
        return func(*args, **kwargs)

    def _paired(self, tensor: torch.Tensor, name: str) -> bool:
        if tensor.dim() and tensor.shape[0] == self.rows:
            return True
        self.unpaired.add(name)
        return False

    def check(self) -> None:
        """Refuse, after the forward and before any backward, a model with an operation that has no rule."""
        method = self.method
        if self.refused:
            raise ConfigError(f"{method} has no rule for {', '.join(sorted(self.refused))}, which this model uses: the map would be "
                              f"silently wrong. Of the max pools, only max_pool2d has a rule; use integrated_gradients instead.")
        if self.unpaired:
            raise ConfigError(f"{method} runs each input and its baseline as rows of one batch, but this model applies "
                              f"{', '.join(sorted(self.unpaired))} to a tensor whose first dimension is not that batch "
                              f"({self.rows} rows); use integrated_gradients instead.")


@contextmanager
def rescale_rules(batch: int, method: str, eps: float = EPS, source: torch.Tensor | None = None) -> Iterator[_DeepLiftMode]:
    """DeepLIFT's rules for the forward (and its backward) of ``2 * batch`` rows: ``batch`` inputs, then
    their references in the same order. Call ``check()`` on what it yields after the forward: it refuses
    (``ConfigError``, naming ``method``) a forward that used an operation with no rule. ``source``: the
    inputs' leaf, where the rules' reach starts (None: every call)."""
    mode = _DeepLiftMode(2 * batch, method, eps, source)
    with mode:
        yield mode
