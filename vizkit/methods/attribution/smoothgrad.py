"""SmoothGrad (Smilkov, Thorat, Kim, Viégas & Wattenberg 2017, "SmoothGrad: removing noise by adding
noise"): the average of a gradient method's maps over noisy copies of the input,

    M_hat(x) = 1/n sum_{k=1..n} M(x + N(0, sigma^2)),   sigma = noise * (x_max - x_min)

with ``noise`` the paper's noise level (10-20 % worked best there), x_max - x_min each input's range
in the model's input space. ``base`` is the method averaged: saliency, guided_backprop,
integrated_gradients or input_x_gradient (its own fields via ``base_config``). The base's signed,
per-channel maps are averaged, then reduced over colour channels — so for saliency this is captum's
``NoiseTunnel(Saliency(...))`` with ``abs=False`` followed by the max of |.| over channels.

Noise comes from a ``torch.Generator`` seeded with ``seed``, one [C,H,W] draw per sample in order, the
same for every input: an input gives the same map on every run, whatever ``batch_size`` and whichever
inputs share its batch; the global RNG is untouched. For one input this is the noise captum's
``NoiseTunnel(nt_samples_batch_size=1)`` draws after ``torch.manual_seed(seed)``. Noisy copies are
evaluated ``batch_size`` at a time.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict

import torch

from vizkit.core.errors import ConfigError
from vizkit.core.validate import positive_integers
from vizkit.probes.gradients import CHANNEL_REDUCTIONS, reduce_channels
from vizkit.methods.base import AttributionMethod

BASES = ("saliency", "guided_backprop", "integrated_gradients", "input_x_gradient")


@dataclass
class SmoothGradConfig:
    base: str = "saliency"  # the gradient method averaged: saliency | guided_backprop | integrated_gradients | input_x_gradient
    samples: int = 50  # noisy copies (the paper's n)
    noise: float = 0.15  # sigma as a fraction of each input's value range (the paper's noise level)
    batch_size: int = 8  # noisy copies per forward/backward pass (on CPU 8 measured faster than 16; raise it on a GPU)
    seed: int = 0
    reduce: str = "auto"  # over colour channels, after averaging: auto (the base's default), max_abs, abs_sum, sum, none
    base_config: Dict[str, Any] = field(default_factory=dict)  # the base's own fields, e.g. {steps: 16} for integrated_gradients

    def __post_init__(self) -> None:
        if self.base not in BASES:
            raise ConfigError(f"base must be one of {', '.join(BASES)}, got '{self.base}'")
        positive_integers(self, "samples", "batch_size")
        if not self.noise >= 0:
            raise ConfigError(f"noise is a non-negative fraction of the input range, got {self.noise}")
        if self.reduce not in ("auto", *CHANNEL_REDUCTIONS):
            raise ConfigError(f"reduce must be one of auto, {', '.join(CHANNEL_REDUCTIONS)}, got '{self.reduce}'")
        if "reduce" in self.base_config:
            raise ConfigError("set the channel reduction with smoothgrad's own reduce, not base_config.reduce")


class SmoothGrad(AttributionMethod):
    name = "smoothgrad"
    description = "SmoothGrad: a gradient method's maps averaged over noisy copies of the input (Smilkov et al. 2017)"
    Config = SmoothGradConfig
    target_kinds = frozenset({"class", "channel", "neuron"})

    def __init__(self, config: Any = None, **fields: Any) -> None:
        super().__init__(config, **fields)
        from vizkit.methods.registry import create_method

        self.base = create_method(self.config.base, **dict(self.config.base_config), reduce="none")
        self.reduce = create_method(self.config.base).config.reduce if self.config.reduce == "auto" else self.config.reduce

    def check(self, model):
        self.base.check(model)

    def compute(self, model, x, target, pixels):
        config = self.config
        batch = x.shape[0]
        sigma = config.noise * (x.flatten(1).amax(1) - x.flatten(1).amin(1))  # [B]
        # One [C,H,W] draw per sample, in order, shared by the inputs of a batch: an input's map then
        # depends on neither batch_size nor which inputs share its batch.
        generator = torch.Generator(device=x.device).manual_seed(config.seed)
        per_chunk = max(1, config.batch_size // batch)  # samples of every input per pass
        total = torch.zeros(0)
        for first in range(0, config.samples, per_chunk):
            count = min(per_chunk, config.samples - first)
            # one draw per sample: torch's CPU normal_ fills blocks of 16 values, so a single draw of
            # [count,C,H,W] differs from count draws of [1,C,H,W] unless C*H*W is a multiple of 16
            noise = torch.cat([torch.randn((1, *x.shape[1:]), generator=generator, device=x.device, dtype=x.dtype) for _ in range(count)])
            rows = torch.arange(batch, device=x.device).repeat(count)  # sample-major
            noisy = x[rows] + noise.repeat_interleave(batch, 0) * sigma[rows].view(-1, 1, 1, 1)
            maps = self.base.compute(model, noisy, target.take(rows), pixels)
            maps = getattr(maps, "maps", maps).float()  # a base may return an Attribution with details
            summed = maps.view(count, batch, *maps.shape[1:]).sum(0)
            total = summed if first == 0 else total + summed
        return reduce_channels(total / config.samples, self.reduce)
