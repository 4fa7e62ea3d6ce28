"""Layer-wise relevance propagation's rules, installed for one forward pass without touching the model.

LRP (Bach et al. 2015; Montavon et al. 2019, "Layer-Wise Relevance Propagation: An Overview") sends the
target's score back through the network layer by layer, each layer dividing the relevance R of its
outputs among its inputs by a rule. The rules here are zennit's (0.5), term for term: an affine layer
z = W x + b (a convolution, or a linear layer) computes one or more modified copies of itself and
divides R by their stabilized sum. With a+ = max(a, 0), a- = min(a, 0) and stab(z) = z + δ·sign(z)
(sign(0) = +1; δ the ``stabilizer``, ε for the ε rule):

    epsilon      R_in = x ⊙ Wᵀ[R / stab(Wx + b)]
    zplus        z = W+x+ + W-x- + b+;        R_in = x+ ⊙ W+ᵀ[R/stab(z)] + x- ⊙ W-ᵀ[R/stab(z)]  (= alpha1beta0)
    alpha2beta1  2·(the zplus share) − 1·(the same with W+ and W- swapped, bias b-)
    gamma        W+γW+ on positive evidence, W+γW- on negative, each side where z = Wx + b has its sign
    zbox         z = Wx + b − W+l − W-h (l, h: the input's lowest and highest values);
                 R_in = x ⊙ Wᵀs − l ⊙ W+ᵀs − h ⊙ W-ᵀs,  s = R/stab(z)  (for the first layer: pixels)
    flat         R_in = 1ᵀ[R / stab(1ᵀ1)]: relevance spread evenly over each output's receptive field

Sums (a ResNet's skip connection x1 + x2) and average pools p(x) use the normalization rule
R_i = x_i ⊙ pᵀ[R / stab(p(x))], so each summand gets its share; activations (ReLU and its kin) pass
relevance unchanged; max pools pass it to the maximum (their gradient), as in zennit's composites.

A BatchNorm that directly follows a convolution (whose output nothing else reads) is folded into it
for the pass, as zennit's ``MergeBatchNorm`` canonizer does, but on copies of the parameters: the
convolution's weight becomes W·γ/√(var+eps) and its bias (b − mean)·γ/√(var+eps) + β, and the BatchNorm
is the identity. zennit's canonizer writes the folded values into the model and restores them after;
here nothing on the model changes, so a model shared with another thread, or one interrupted midway,
is never left folded.

The rules are attached with a ``TorchFunctionMode`` to every *call* (``F.conv2d``, ``F.linear``,
``F.batch_norm``, ``+``, ``F.adaptive_avg_pool2d``, ``mean``, ``F.relu`` ...), so activations written as
functions and timm's in-place ReLUs are handled alike, and a ResNet's addition needs no canonizer
rewriting the block's ``forward``. Any other operation on the relevance path (a multiplication, a
softmax, a LayerNorm, an attention) has no rule and is refused by name after the forward: the map would
be silently wrong.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from vizkit.core import hooks
from vizkit.core.hooks import tensors_in as _tensors
from vizkit.core.errors import ConfigError

AFFINE_RULES = ("epsilon", "zplus", "alpha1beta0", "alpha2beta1", "gamma", "zbox", "flat")


def stabilize(z: torch.Tensor, delta: float) -> torch.Tensor:
    """z moved away from 0 by delta, keeping its sign (0 counts as positive), as zennit's ``stabilize``."""
    return z + delta * ((z == 0).to(z) + z.sign())


@dataclass(frozen=True)
class AffineRule:
    """One rule for an affine layer and its settings: ``name`` one of ``AFFINE_RULES``; ``epsilon`` the ε
    rule's stabilizer, ``stabilizer`` every other rule's; ``low``/``high`` zbox's input bounds."""

    name: str
    epsilon: float = 1e-6
    gamma: float = 0.25
    stabilizer: float = 1e-6
    low: torch.Tensor | None = None
    high: torch.Tensor | None = None


def _terms(rule: AffineRule, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """The rule's modified copies of the layer: (input, weight, bias) per term, zennit's order."""
    zero = None if bias is None else torch.zeros_like(bias)

    def pos(t):
        return None if t is None else t.clamp(min=0)

    def neg(t):
        return None if t is None else t.clamp(max=0)

    def plus_gamma(t, part):  # zennit's GammaMod: the parameter plus gamma times its clamped part
        return None if t is None else t + rule.gamma * part(t)

    if rule.name == "epsilon":
        return [(x, weight, bias)]
    if rule.name in ("zplus", "alpha1beta0"):
        return [(pos(x), pos(weight), pos(bias)), (neg(x), neg(weight), zero)]
    if rule.name == "alpha2beta1":
        return [(pos(x), pos(weight), pos(bias)), (neg(x), neg(weight), zero),
                (pos(x), neg(weight), neg(bias)), (neg(x), pos(weight), zero)]
    if rule.name == "gamma":  # (zennit's fifth term, the plain layer, is the forward's own output)
        return [(pos(x), plus_gamma(weight, pos), plus_gamma(bias, pos)), (neg(x), plus_gamma(weight, neg), zero),
                (pos(x), plus_gamma(weight, neg), plus_gamma(bias, neg)), (neg(x), plus_gamma(weight, pos), zero)]
    if rule.name == "zbox":
        low, high = rule.low.to(x).expand_as(x), rule.high.to(x).expand_as(x)
        return [(x, weight, bias), (low, pos(weight), pos(bias)), (high, neg(weight), neg(bias))]
    if rule.name == "flat":
        return [(torch.ones_like(x), torch.ones_like(weight), zero)]
    raise ConfigError(f"unknown LRP rule '{rule.name}'; choose one of: {', '.join(AFFINE_RULES)}")


def affine_relevance(rule: AffineRule, layer: Callable, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     relevance: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """The relevance of ``layer(x, weight, bias)``'s input, given its output's, by ``rule``; ``output``
    is ``layer(x, weight, bias)`` itself, from the forward."""
    inputs, outputs = [], []
    with torch.enable_grad():
        for term_input, term_weight, term_bias in _terms(rule, x.detach(), weight.detach(), None if bias is None else bias.detach()):
            term_input = term_input.detach().requires_grad_(True)
            inputs.append(term_input)
            outputs.append(layer(term_input, term_weight, term_bias))
    delta = rule.stabilizer
    if rule.name == "epsilon":
        shares = [relevance / stabilize(outputs[0], rule.epsilon)]
    elif rule.name in ("zplus", "alpha1beta0", "flat"):
        shares = [relevance / stabilize(sum(outputs), delta)] * len(outputs)
    elif rule.name == "alpha2beta1":
        shares = [relevance / stabilize(outputs[0] + outputs[1], delta)] * 2 + [relevance / stabilize(outputs[2] + outputs[3], delta)] * 2
    elif rule.name == "gamma":  # each side only where the plain output has its sign
        shares = [(output > 0).to(output) * relevance / stabilize(outputs[0] + outputs[1], delta)] * 2 \
            + [(output < 0).to(output) * relevance / stabilize(outputs[2] + outputs[3], delta)] * 2
    else:  # zbox
        shares = [relevance / stabilize(outputs[0] - outputs[1] - outputs[2], delta)] * 3
    gradients = torch.autograd.grad(outputs, inputs, grad_outputs=shares)
    if rule.name == "flat":
        return gradients[0]
    if rule.name == "alpha2beta1":
        return 2 * (inputs[0] * gradients[0] + inputs[1] * gradients[1]) - (inputs[2] * gradients[2] + inputs[3] * gradients[3])
    if rule.name == "zbox":
        return inputs[0] * gradients[0] - inputs[1] * gradients[1] - inputs[2] * gradients[2]
    return sum(term * gradient for term, gradient in zip(inputs, gradients))


def normalized_relevance(function: Callable, inputs: tuple[torch.Tensor, ...], relevance: torch.Tensor, delta: float) -> tuple[torch.Tensor, ...]:
    """The normalization rule for a sum or an average pool ``function(*inputs)``: x_i ⊙ ∂ᵀ[R / stab(f(x))]."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) for t in inputs]
        output = function(*leaves)
    gradients = torch.autograd.grad(output, leaves, grad_outputs=relevance / stabilize(output.detach(), delta))
    return tuple(leaf.detach() * gradient for leaf, gradient in zip(leaves, gradients))


class _AffineLayer(torch.autograd.Function):
    """A convolution or linear layer, forward as it is, backward by its LRP rule."""

    @staticmethod
    def forward(ctx, x, layer, weight, bias, rule):
        ctx.layer, ctx.weight, ctx.bias, ctx.rule = layer, weight, bias, rule
        output = layer(x, weight, bias)
        # the gamma rule's signs come from the output; a later in-place op (x += shortcut) must not change them
        ctx.output = output.detach().clone() if rule.name == "gamma" else None
        ctx.save_for_backward(x)
        return output

    @staticmethod
    def backward(ctx, relevance):
        (x,) = ctx.saved_tensors
        return affine_relevance(ctx.rule, ctx.layer, x, ctx.weight, ctx.bias, relevance, ctx.output), None, None, None, None


class _Normalized(torch.autograd.Function):
    """A sum of two tensors or an average pool, backward by the normalization rule."""

    @staticmethod
    def forward(ctx, function, delta, inplace, *inputs):
        ctx.function, ctx.delta = function, delta
        ctx.inputs = tuple(t.detach().clone() if inplace else t.detach() for t in inputs)
        output = function(*inputs)
        if inplace:  # x += y: the result goes into x, as the model asked
            ctx.mark_dirty(inputs[0])
            return inputs[0].copy_(output)
        return output

    @staticmethod
    def backward(ctx, relevance):
        return (None, None, None, *normalized_relevance(ctx.function, ctx.inputs, relevance, ctx.delta))


class _Pass(torch.autograd.Function):
    """An activation, forward as it is, relevance passed through unchanged."""

    @staticmethod
    def forward(ctx, x, function, inplace):
        output = function(x)
        if inplace:
            ctx.mark_dirty(x)
            return x.copy_(output)
        return output

    @staticmethod
    def backward(ctx, relevance):
        return relevance, None, None


def _name(func: Callable) -> str:
    return getattr(func, "__name__", str(func))


# activations (relevance passes): name -> whether the call is in place by its name
_ACTIVATIONS = {"relu": False, "relu_": True, "gelu": False, "silu": False, "hardswish": False, "mish": False,
                "elu": False, "elu_": True, "leaky_relu": False, "leaky_relu_": True, "relu6": False,
                "hardtanh": False, "hardtanh_": True}
_SUMS = {"add": False, "__add__": False, "__radd__": False, "add_": True, "__iadd__": True}
_AVERAGES = {"adaptive_avg_pool2d", "avg_pool2d", "adaptive_avg_pool1d", "avg_pool1d", "mean", "sum"}  # and a channel target's sum
# the gradient is the rule: rearrangements, the identity, and max pools (relevance to the maximum)
_GRADIENT = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "permute", "transpose", "contiguous", "clone",
             "to", "float", "__getitem__", "dropout", "max_pool2d", "max_pool2d_with_indices", "_max_pool2d",
             "max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool2d_with_indices", "_adaptive_max_pool2d",
             "boolean_dispatch", "pad", "cat", "stack", "expand", "expand_as", "split", "chunk", "narrow", "identity",
             "gather", "select", "index_select"}  # the last three: the target's score picked from the logits


class _LrpMode(hooks.RuleMode):
    """Attaches ``rule_for(kind)`` to every affine call and the fixed rules to the rest (see the module)."""

    def __init__(self, rule_for: Callable[[str], AffineRule], first_input: torch.Tensor, stabilizer: float) -> None:
        super().__init__()
        self.rule_for = rule_for
        self.first_input = first_input
        self.stabilizer = stabilizer
        self.unruled: set[str] = set()
        self.affine_calls = 0
        self.folded = 0
        # a convolution's output -> (its input, the conv as a function of (x, weight, bias), weight, bias, rule)
        self._convolutions: dict[int, tuple] = {}
        self._used_raw: set[int] = set()  # outputs something else read before a BatchNorm could take them
        self._folded_outputs: dict[int, torch.Tensor] = {}
        # tensors computed from the input, where relevance flows (held for the forward: ids stay unique)
        self._path: dict[int, torch.Tensor] = {id(first_input): first_input}

    def rule_call(self, func, args, kwargs):
        tensors = _tensors(args) + _tensors(kwargs)
        if not any(self._on_path(t) for t in tensors):  # parameters alone (a standardized weight): no relevance there
            return func(*args, **kwargs)
        result = self._ruled(func, _name(func), args, kwargs)
        # what no gradient flows through (an argmax, a comparison, a detached copy) carries no relevance
        self._path.update((id(t), t) for t in _tensors(result) if t.requires_grad)
        return result

    def _on_path(self, value: Any) -> bool:
        return isinstance(value, torch.Tensor) and id(value) in self._path

    def _ruled(self, func, name, args, kwargs):
        if name in ("conv2d", "conv1d", "linear"):
            return self._affine(func, name, args, kwargs)
        if name == "batch_norm":
            return self._batch_norm(func, args, kwargs)
        if name in _ACTIVATIONS:
            return self._activation(func, name, args, kwargs)
        if name in _SUMS and len(args) == 2 and not kwargs and all(self._on_path(a) for a in args):
            self._mark_read(args)
            operation = torch.add
            return _Normalized.apply(operation, self.stabilizer, _SUMS[name], args[0], args[1])
        if name in _AVERAGES and isinstance(args[0], torch.Tensor):
            self._mark_read(args)
            rest = args[1:]
            return _Normalized.apply(lambda t: func(t, *rest, **kwargs), self.stabilizer, False, args[0])
        result = func(*args, **kwargs)
        if any(t.requires_grad for t in _tensors(result)):
            self._mark_read(args)
            dropout = {**dict(zip(("input", "p", "training"), args)), **kwargs}
            if name == "dropout" and dropout.get("training", True) and dropout.get("p", 0.5) > 0:
                self.unruled.add("dropout in training mode (model.eval())")
            elif name not in _GRADIENT and not (name in _SUMS and self._adds_a_constant(args, kwargs)):
                self.unruled.add(name)
        return result

    def _adds_a_constant(self, args, kwargs) -> bool:
        """x + c with c a constant (not from the input, not learned): the relevance passes unchanged. A
        learned shift (x + a parameter) would take a share as a bias does: it has no rule here."""
        return (not kwargs and len(args) == 2 and sum(self._on_path(a) for a in args) == 1
                and not any(isinstance(a, torch.Tensor) and a.requires_grad and not self._on_path(a) for a in args))

    def _mark_read(self, args) -> None:
        for tensor in _tensors(args):
            if id(tensor) in self._folded_outputs:
                self.unruled.add("a convolution output read both by its BatchNorm and elsewhere (the fold would change it)")
            if id(tensor) in self._convolutions:
                self._used_raw.add(id(tensor))

    def _affine(self, func, name, args, kwargs):
        self._mark_read(args)
        x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        extra_args, extra_kwargs = args[3:], {k: v for k, v in kwargs.items() if k not in ("input", "weight", "bias")}

        def layer(inp, w, b):
            return func(inp, w, b, *extra_args, **extra_kwargs)

        rule = self.rule_for("first" if x is self.first_input else ("linear" if name == "linear" else "conv"))
        self.affine_calls += 1
        output = _AffineLayer.apply(x, layer, weight.detach(), None if bias is None else bias.detach(), rule)
        if name != "linear":
            self._convolutions[id(output)] = (output, x, layer, weight.detach(), None if bias is None else bias.detach(), rule)
        return output

    def _batch_norm(self, func, args, kwargs):
        names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
        values = {**dict(zip(names, args)), **kwargs}
        x = values["input"]
        convolution = self._convolutions.get(id(x))
        if values.get("training") or values.get("running_mean") is None:
            self.unruled.add("batch_norm in training mode (LRP explains the model in eval mode: model.eval())")
            return func(*args, **kwargs)
        if convolution is None or id(x) in self._used_raw:
            self.unruled.add("batch_norm (not right after a convolution)")
            return func(*args, **kwargs)
        _, conv_input, layer, weight, bias, rule = convolution
        scale = values["weight"].detach() / (values["running_var"] + values.get("eps", 1e-5)) ** 0.5
        if values.get("weight") is None:
            scale = 1 / (values["running_var"] + values.get("eps", 1e-5)) ** 0.5
        shift = values["bias"].detach() if values.get("bias") is not None else 0.0
        index = (slice(None),) + (None,) * (weight.dim() - 1)
        folded_weight = weight * scale[index]
        folded_bias = ((bias if bias is not None else torch.zeros(1, dtype=weight.dtype, device=weight.device))
                       - values["running_mean"]) * scale + shift
        self.folded += 1
        output = _AffineLayer.apply(conv_input, layer, folded_weight, folded_bias, rule)
        self._folded_outputs[id(x)] = x
        return output

    def _activation(self, func, name, args, kwargs):
        self._mark_read(args)
        x = args[0]
        inplace = _ACTIVATIONS[name] or bool(kwargs.get("inplace", False))
        if name in ("relu", "gelu", "silu", "hardswish", "mish", "relu6") and len(args) > 1 and not isinstance(args[1], torch.Tensor):
            inplace = inplace or bool(args[1] if name != "gelu" else False)
        if name.startswith("hardtanh") and float(({**dict(zip(("input", "min_val"), args)), **kwargs}).get("min_val", -1.0)) != 0.0:
            self.unruled.add("hardtanh (a clip from below zero)")
            return func(*args, **kwargs)
        rest = {k: v for k, v in kwargs.items() if k != "inplace"}
        positional = tuple(a for a in args[1:] if not isinstance(a, bool))
        out_of_place = getattr(F, name.rstrip("_"), None) or getattr(torch, name.rstrip("_"))

        def activation(t):
            return out_of_place(t, *positional, **rest)

        return _Pass.apply(x, activation, inplace)


@contextmanager
def lrp_rules(rule_for: Callable[[str], AffineRule], first_input: torch.Tensor, method: str, stabilizer: float = 1e-6) -> Iterator[_LrpMode]:
    """Run a forward with LRP's rules attached; backward through its output then propagates relevance.

    ``rule_for(kind)`` gives the rule of each affine call: kind "first" (a layer reading
    ``first_input``, the pixels), "conv" or "linear". Raises ``ConfigError`` after the block for any
    operation on the relevance path with no rule, or a forward with no affine layer at all.
    """
    mode = _LrpMode(rule_for, first_input, stabilizer)
    with mode:
        yield mode
    if mode.unruled:
        raise ConfigError(f"{method} has no rule for {', '.join(sorted(mode.unruled))} on this model's path to the target: "
                          f"the relevance would be silently wrong. LRP runs on ReLU networks of convolutions, linear layers, "
                          f"BatchNorms after convolutions, additions and pools (timm's ResNets, VGGs); "
                          f"use a gradient method (integrated_gradients, deeplift) for others")
    if mode.affine_calls == 0:
        raise ConfigError(f"{method} found no convolution or linear layer between the input and the target: nothing to propagate through")
