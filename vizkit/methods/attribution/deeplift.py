"""DeepLIFT with the Rescale rule (Shrikumar, Greenside & Kundaje 2017, "Learning Important Features
Through Propagating Activation Differences").

    DL_i(x) = (x_i - x'_i) * m_i,   m = the input's multipliers for S(x) - S(x')

with S the target's score and x' a baseline. The multipliers are the chain rule with each
nonlinearity's derivative replaced by a ratio of differences from the baseline: Δout/Δin at every
elementwise activation (Rescale), and captum's rule at max pooling (``vizkit.probes.rescale``). They
satisfy summation-to-delta, so on networks of linear operations, elementwise activations and max
pooling (ReLU CNNs such as ResNets and VGGs)

    sum_i DL_i(x) = S(x) - S(x')

up to float rounding; the relative gap ``completeness_error`` = |sum_i DL_i - (S(x) - S(x'))| / |S(x) -
S(x')| is reported per input (``results.json`` -> inputs[*].details), as for integrated gradients. It
is not 0 where the network multiplies two activations (a squeeze-excite gate), normalizes by a
statistic of its input (LayerNorm) or attends (softmax): those keep their gradient, as in captum.

One forward of the inputs and their baselines concatenated in one batch (rows B..2B-1 the baselines)
and one backward to the input: the cost of two gradients. The baseline is integrated gradients':
gray (default), black, blur, uniform noise or an image file, in pixel space, converted to the model's
normalization. The map sums the signed attribution over colour channels (``reduce=none`` keeps
captum's [B,3,H,W]).

How this differs from captum 0.9's ``DeepLift`` (``multiply_by_inputs=True``, ``eps=1e-10``; compare
with ``reduce=none`` and the same baseline tensor, on a copy whose ReLUs are not in place):

* captum applies its rules to ``nn.Module`` activations only (ReLU, ELU, LeakyReLU, Sigmoid, Tanh,
  Softplus) and treats every other one as linear (its plain gradient): a functional ReLU, GELU, SiLU,
  Mish, Hardswish, ... vizkit applies Rescale to every elementwise activation in any spelling.
* captum's max-pool rule does not take effect after a ReLU module (resnet's stem, every VGG stage):
  both hook the same tensor, and the ReLU's hook reads the gradient at it before the pool's hook
  replaces it, so the pool passes its plain gradient. captum's map is then vizkit's with max pools
  differentiated plainly, and misses summation-to-delta (on the tests' random-weight resnet18 and
  VGG-11 with the gray baseline, by 1.6-6 % of S(x) - S(x'), and by 5.6x one small gap).
* where its pool rule does take effect, captum scatters the shares with ``max_unpool2d``, which keeps
  one of two overlapping windows' shares for the same input: on resnet18's 3x3, stride-2 pool that
  lost 79 % of one S(x) - S(x') in the tests. vizkit adds them.
  vizkit's map equals captum's on a copy whose max pools read a clone of their input (so their rule
  takes effect) and whose unpooling adds (the tests check both relations).
* where a pool input equals its reference (|Δin| < eps), captum falls back to the first row's
  derivative for every row (``grad_input[0]``), vizkit to each row's own; behind a ReLU that share is
  0 either way.
* captum has a rule for ``nn.Softmax`` modules; a softmax written as a function and a fused attention
  (every timm ViT) keep their gradient in both, as here for every softmax: a ViT gets a map, with its
  completeness error. Max pooling other than ``max_pool2d`` is refused by name.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vizkit.core.errors import ConfigError
from vizkit.methods.base import Attribution, AttributionMethod
from vizkit.probes.baselines import check_baseline, pixel_baseline
from vizkit.probes.gradients import ChannelReductionConfig, reduce_channels
from vizkit.probes.rescale import EPS, rescale_rules


@dataclass
class DeepLiftConfig(ChannelReductionConfig):
    baseline: str = "gray"  # gray, black, blur, uniform (noise), or the path of an image file; pixel space (as integrated_gradients)
    eps: float = EPS  # |Δin| below which a unit passes its derivative instead of Δout/Δin (captum's 1e-10)
    seed: int = 0  # for baseline=uniform
    reduce: str = "sum"  # signed sum over colour channels keeps summation-to-delta; max_abs, abs_sum, none

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not self.eps >= 0:
            raise ConfigError(f"eps must be a non-negative number, got {self.eps!r}")
        check_baseline("deeplift", self.baseline, allow_path=True)


class DeepLift(AttributionMethod):
    name = "deeplift"
    description = "DeepLIFT, Rescale rule: differences from a baseline propagated as multipliers (Shrikumar et al. 2017)"
    Config = DeepLiftConfig
    target_kinds = frozenset({"class", "channel", "neuron"})

    def compute(self, model, x, target, pixels):
        config = self.config
        baseline = pixels.from_pixels(pixel_baseline(config.baseline, pixels.to_pixels(x), seed=config.seed))
        batch = x.shape[0]
        # the targets of [inputs; baselines]; a 'predicted' target reads its classes here, outside the rules
        paired = target.take(torch.arange(batch, device=x.device).repeat(2))
        leaf = x.detach().requires_grad_(True)
        with torch.enable_grad(), rescale_rules(batch, self.name, float(config.eps), source=leaf) as rules:
            scores = paired.score(model, torch.cat([leaf, baseline.to(x.dtype)]))
            rules.check()
            (multipliers,) = torch.autograd.grad(scores.sum(), leaf)
        accumulate = torch.promote_types(x.dtype, torch.float32)  # float32 at least (half-precision inputs)
        attribution = ((x - baseline) * multipliers).to(accumulate)
        scores = scores.detach().to(accumulate)
        score_gap = scores[:batch] - scores[batch:]
        completeness_error = (attribution.flatten(1).sum(1) - score_gap).abs() / score_gap.abs().clamp_min(1e-12)
        return Attribution(reduce_channels(attribution, config.reduce), {"completeness_error": completeness_error})
