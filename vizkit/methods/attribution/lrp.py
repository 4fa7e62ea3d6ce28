"""Layer-wise relevance propagation (Bach et al. 2015, "On Pixel-Wise Explanations for Non-Linear
Classifier Decisions by Layer-Wise Relevance Propagation"; the composites of Montavon et al. 2019 and
Kohlbrenner et al. 2020) with zennit's rules and composites.

The target's score S(x) (a class logit) is the relevance at the output; each layer divides its outputs'
relevance among its inputs by a rule (``vizkit.probes.lrp_rules`` writes them out), down to the
pixels. The map is the input's relevance summed over colour channels; where every rule conserves
relevance it sums to S(x), and ``relevance_conserved`` (per input, in ``results.json``' details) says
what share of S(x) reached the input (biases and stabilizers take the rest).

A composite chooses the rule per kind of layer, by zennit's names (``epsilon_plus`` and
``epsilon-plus`` alike):

    composite                  first layer   other convolutions   linear layers
    epsilon_plus (default)     zplus         zplus                epsilon
    epsilon_plus_flat          flat          zplus                epsilon
    epsilon_gamma_box          zbox          gamma                epsilon
    epsilon_alpha2_beta1       alpha2beta1   alpha2beta1          epsilon
    epsilon_alpha2_beta1_flat  flat          alpha2beta1          epsilon

``first``, ``conv`` and ``linear`` override one kind's rule (zplus is alpha1beta0). The first layer is
the one that reads the pixels; zbox bounds it by the lowest and highest pixel, 0 and 1 in the model's
normalization. Everywhere: sums and average pools by the normalization rule, activations pass relevance,
max pools pass it to the maximum, and BatchNorm is folded into the convolution before it, on copies
of the parameters (the model is never modified).

This equals zennit's ``Gradient`` attributor with the composite of the same name, the canonizers that
fold each BatchNorm (``SequentialMergeBatchNorm``) and, in a ResNet, a ``Sum`` module in place of each
block's addition, and the target's logit as the output relevance (zennit's ``attr_output``). zennit
maps rules to modules: an operation written as a function (timm's VGG head pools a small feature map up
to 7x7 with ``F.adaptive_avg_pool2d``) keeps its gradient there, the normalization rule here.

Refused, with the operation's name: anything on the path to the target with no rule (a multiplication
such as a squeeze-excitation gate, a softmax, LayerNorm, attention): that is, a vision transformer and
most modern CNNs. A BatchNorm that does not directly follow a convolution is refused too.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vizkit.core.errors import ConfigError, did_you_mean
from vizkit.methods.base import Attribution, AttributionMethod
from vizkit.probes.gradients import ChannelReductionConfig, reduce_channels
from vizkit.probes.lrp_rules import AFFINE_RULES, AffineRule, lrp_rules

# composite -> (first layer, convolutions, linear layers); "" for the first: the convolutions' rule
COMPOSITES = {
    "epsilon_plus": ("", "zplus", "epsilon"),
    "epsilon_plus_flat": ("flat", "zplus", "epsilon"),
    "epsilon_gamma_box": ("zbox", "gamma", "epsilon"),
    "epsilon_alpha2_beta1": ("", "alpha2beta1", "epsilon"),
    "epsilon_alpha2_beta1_flat": ("flat", "alpha2beta1", "epsilon"),
}


@dataclass
class LRPConfig(ChannelReductionConfig):
    composite: str = "epsilon_plus"  # epsilon_plus | epsilon_plus_flat | epsilon_gamma_box | epsilon_alpha2_beta1 | epsilon_alpha2_beta1_flat
    first: str = ""  # the first layer's rule, "" = the composite's: epsilon, zplus (= alpha1beta0), alpha2beta1, gamma, zbox, flat
    conv: str = ""  # the other convolutions' rule, "" = the composite's
    linear: str = ""  # linear layers' rule, "" = the composite's
    epsilon: float = 1e-6  # the epsilon rule's stabilizer (larger values absorb weak, contradictory relevance)
    gamma: float = 0.25  # the gamma rule's extra weight on positive contributions
    stabilizer: float = 1e-6  # every other rule's denominator offset
    reduce: str = "sum"  # relevance adds up: the signed sum over colour channels; max_abs, abs_sum, none

    def __post_init__(self) -> None:
        super().__post_init__()
        self.composite = self.composite.replace("-", "_")
        if self.composite not in COMPOSITES:
            raise ConfigError(f"composite must be one of {', '.join(COMPOSITES)}, got '{self.composite}'"
                              f"{did_you_mean(self.composite, COMPOSITES, 1)}")
        for field in ("first", "conv", "linear"):
            value = getattr(self, field)
            if value and value not in AFFINE_RULES:
                raise ConfigError(f"{field} must be one of {', '.join(AFFINE_RULES)} (or empty for the composite's), got '{value}'"
                                  f"{did_you_mean(value, AFFINE_RULES, 1)}")
        if (self.conv or COMPOSITES[self.composite][1]) == "zbox" or (self.linear or COMPOSITES[self.composite][2]) == "zbox":
            raise ConfigError("zbox bounds the pixels: it is a rule for the first layer only (first=zbox)")
        for field in ("epsilon", "stabilizer", "gamma"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ConfigError(f"{field} must be a non-negative number, got {value!r}")

    def rules(self) -> dict[str, str]:
        first, conv, linear = COMPOSITES[self.composite]
        conv = self.conv or conv
        return {"first": self.first or first or conv, "conv": conv, "linear": self.linear or linear}


class LRP(AttributionMethod):
    name = "lrp"
    description = "layer-wise relevance propagation with zennit's rules and composites (Bach et al. 2015)"
    Config = LRPConfig
    target_kinds = frozenset({"class", "channel", "neuron"})

    def compute(self, model, x, target, pixels):
        config = self.config
        low = pixels.from_pixels(torch.zeros(1, x.shape[1], 1, 1, device=x.device, dtype=x.dtype))
        high = pixels.from_pixels(torch.ones(1, x.shape[1], 1, 1, device=x.device, dtype=x.dtype))
        rules = {kind: AffineRule(name, epsilon=config.epsilon, gamma=config.gamma, stabilizer=config.stabilizer,
                                  low=low, high=high) for kind, name in config.rules().items()}
        leaf = x.detach().requires_grad_(True)
        with torch.enable_grad():
            with lrp_rules(rules.__getitem__, leaf, self.name, config.stabilizer):
                score = target.score(model, leaf)
            (relevance,) = torch.autograd.grad(score, leaf, grad_outputs=score.detach())
        conserved = relevance.flatten(1).sum(1) / torch.where(score == 0, torch.ones_like(score), score).detach()
        return Attribution(reduce_channels(relevance.detach(), config.reduce), {"relevance_conserved": conserved.detach()})
