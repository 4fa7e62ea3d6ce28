"""GradientSHAP (Lundberg & Lee 2017, "A Unified Approach to Interpreting Model Predictions"): expected
gradients (Erion et al. 2021) over a set of baselines, with SmoothGrad's noise on the input:

    GS_i(x) = 1/n sum_{k=1..n} (x~_k - x'_k)_i * dS(x'_k + a_k (x~_k - x'_k))/dx_i,
    x~_k = x + N(0, stdev^2),   x'_k drawn from the baselines,   a_k ~ U(0, 1)

with S the target's score. Its expectation over a_k is integrated gradients from x'_k to x~_k, so the
map sums to about S(x) - E[S(x')] (exactly only as n grows and for stdev 0).

``baselines`` is the set x'_k is drawn from, uniformly: names of integrated gradients' baselines in
pixel space (black, gray, blur, uniform, or an image file), converted to the model's normalization.
A name may repeat: each ``uniform`` is a noise image of its own. Where captum takes a tensor of
baseline images, vizkit takes their names; ``stdev`` is captum's ``stdevs``, in the model's input
space (default 0, as captum's and the SHAP library's ``GradientExplainer``); ``samples`` is captum's
``n_samples`` (5 there: vizkit's default averages 50 draws, as SmoothGrad does).

Draws come from a ``torch.Generator`` seeded with ``seed``, never the global RNG: first one [1,C,H,W]
image per ``uniform`` baseline, then for each sample in order its baseline's index, a_k and the
standard-normal noise [1,C,H,W] (drawn even when stdev is 0, so the others do not change with it);
a sample's draws are shared by every input of a batch, so an input's map depends on neither
``batch_size`` nor which inputs share its batch. (``references`` and ``draws`` give them.) Given the same
draws this equals captum's ``GradientShap`` (``reduce=none`` keeps its [B,3,H,W]; the default sums
the signed attribution over colour channels). Noisy, interpolated images are evaluated ``batch_size``
at a time, each one forward and one backward to the input only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, List

import torch

from vizkit.core.errors import ConfigError
from vizkit.core.validate import positive_integers
from vizkit.methods.base import AttributionMethod
from vizkit.probes.baselines import check_baseline, pixel_baseline
from vizkit.probes.gradients import ChannelReductionConfig, input_gradient, reduce_channels


@dataclass
class GradientShapConfig(ChannelReductionConfig):
    samples: int = 50  # draws of (baseline, noise, a) averaged (captum's n_samples)
    baselines: List[str] = field(default_factory=lambda: ["black", "gray", "uniform"])  # drawn uniformly; pixel space; a repeated uniform is another noise image
    stdev: float = 0.0  # standard deviation of the noise added to the input, in the model's input space (captum's stdevs)
    batch_size: int = 8  # images per forward/backward pass
    seed: int = 0
    reduce: str = "sum"  # signed sum over colour channels; max_abs, abs_sum, none

    def __post_init__(self) -> None:
        super().__post_init__()
        positive_integers(self, "samples", "batch_size")
        if isinstance(self.stdev, bool) or not isinstance(self.stdev, (int, float)) or not self.stdev >= 0:
            raise ConfigError(f"stdev must be a non-negative number, got {self.stdev!r}")
        if isinstance(self.baselines, str) or not list(self.baselines):
            raise ConfigError(f"baselines must be a non-empty list of baselines (e.g. [black, gray, uniform]), got {self.baselines!r}")
        for name in self.baselines:
            check_baseline("gradient_shap", str(name), allow_path=True)


class GradientShap(AttributionMethod):
    name = "gradient_shap"
    description = "GradientSHAP: expected gradients over a set of baselines, with noise on the input (Lundberg & Lee 2017)"
    Config = GradientShapConfig
    target_kinds = frozenset({"class", "channel", "neuron"})

    def references(self, x, pixels, generator: torch.Generator) -> list[torch.Tensor]:
        """The baselines in the model's input space, one per name: [1,C,H,W] ([B,C,H,W] for blur, which
        depends on the input); each ``uniform`` draws its noise image from ``generator``."""
        images = pixels.to_pixels(x)
        references = []
        for name in self.config.baselines:
            if name == "uniform":
                image = torch.rand((1, *x.shape[1:]), generator=generator, device=x.device, dtype=x.dtype)
            else:
                image = pixel_baseline(str(name), images)
                image = image if name == "blur" else image[:1]
            references.append(pixels.from_pixels(image))
        return references

    def draws(self, generator: torch.Generator, x) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Each sample's (baseline index, a [1], standard-normal noise [1,C,H,W]), in order."""
        for _ in range(self.config.samples):
            index = int(torch.randint(len(self.config.baselines), (1,), generator=generator, device=x.device))
            alpha = torch.rand((1,), generator=generator, device=x.device, dtype=x.dtype)
            noise = torch.randn((1, *x.shape[1:]), generator=generator, device=x.device, dtype=x.dtype)
            yield index, alpha, noise

    def compute(self, model, x, target, pixels):
        config = self.config
        generator = torch.Generator(device=x.device).manual_seed(config.seed)
        references = self.references(x, pixels, generator)
        draws = self.draws(generator, x)
        batch = x.shape[0]
        accumulate = torch.promote_types(x.dtype, torch.float32)  # float32 at least (half-precision inputs)
        total = torch.zeros_like(x, dtype=accumulate)
        # (sample, input) pairs, sample-major, evaluated batch_size at a time
        pairs = [(k, b) for k in range(config.samples) for b in range(batch)]
        drawn: dict[int, tuple[int, torch.Tensor, torch.Tensor]] = {}  # the samples the current chunk needs
        for start in range(0, len(pairs), config.batch_size):
            chunk = pairs[start : start + config.batch_size]
            while max(drawn, default=-1) < chunk[-1][0]:
                drawn[max(drawn, default=-1) + 1] = next(draws)
            rows = torch.tensor([b for _, b in chunk], device=x.device)
            reference = torch.cat([references[drawn[k][0]][b if references[drawn[k][0]].shape[0] > 1 else 0][None] for k, b in chunk])
            alpha = torch.cat([drawn[k][1] for k, _ in chunk]).view(-1, 1, 1, 1)
            noisy = x[rows] + torch.cat([drawn[k][2] for k, _ in chunk]) * config.stdev
            # captum's interpolation, a x~ + (1 - a) x'
            gradient = input_gradient(model, alpha * noisy + (1 - alpha) * reference, target.take(rows))
            total.index_add_(0, rows, ((noisy - reference) * gradient).to(accumulate))
            drawn = {k: sample for k, sample in drawn.items() if k == chunk[-1][0]}
        return reduce_channels(total / config.samples, config.reduce)
