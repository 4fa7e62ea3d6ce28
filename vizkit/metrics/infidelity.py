"""Infidelity (Yeh, Hsieh, Suggala, Inouye & Ravikumar 2019, "On the (In)fidelity and Sensitivity of
Explanations", NeurIPS, Definition 2.1): how badly a map Phi predicts what the model does when its
input moves by a random perturbation I,

    INFD(Phi, f, x) = E_I[ (I . Phi - (f(x) - f(x - I)))^2 ]

estimated over ``samples`` draws I_1..I_S as (1/S) sum_s (I_s . Phi - (f(x) - f(x - I_s)))^2. Lower is
better. With ``normalize`` (captum's option; the authors' code always does it) the map is first scaled
by the best factor, beta = E[(I . Phi)(f(x) - f(x - I))] / E[(I . Phi)^2], which leaves

    INFD = (beta^2 A0 - 2 beta A1 + A2) / S,   A0 = sum (I . Phi)^2, A1 = sum (I . Phi) df, A2 = sum df^2

(beta = 0 when A0 = 0, as captum's ``safe_div``). The value then does not depend on the map's scale, so
maps in different units (a logit gradient, a probability drop) compare; that is why it is on by default
here, where captum's default is off.

The choices captum leaves to the caller, made here:

* f is the target class's logit (``score=logit``): the number vizkit's class targets explain
  (``ClassTarget.score``) and what captum reads from a model that returns logits. ``score=probability``
  uses its softmax probability instead, for maps of a probability (occlusion).
* I = eps / sigma, eps ~ N(0, std^2) per element in pixel units, sigma the model's per-channel
  normalization std (1 without one): ``std`` is noise as a user sees it on a [0, 1] image, and I lives
  in the model's input space, where the map was computed (a gradient's units are per unit of the
  model's input), so I . Phi and f(x - I) see the same I. x - I is not clamped to valid pixels
  (captum does not clamp; clamping would make I depend on x and stop it being zero-mean Gaussian).
* A one-channel map ``[B,1,H,W]`` stands for every colour channel: I . Phi = sum_hw M_hw sum_c I_chw,
  which is captum's value for the map expanded to the input's shape (captum needs that shape).
* One draw per sample, ``[C,H,W]`` from a ``torch.Generator`` seeded with ``seed`` on the CPU, shared by
  every input of the batch (as smoothgrad's noise): an input's value depends neither on ``batch_size``
  nor on which inputs share its batch, and the global RNG is untouched. Captum draws through a
  ``perturb_func``; given one that returns these draws it computes the same value (sums here are
  accumulated in float64, captum's in the input's dtype: they differ by rounding).

The authors' own experiments perturb differently (their "Gaussian" moves x towards a noisy black
baseline, x - I ~ N(0, 0.2^2) clipped to the image range); this is the noise around x of the paper's
definition, as captum is used. The S x B perturbed copies go through the model ``batch_size`` at a time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

from vizkit.core.errors import ConfigError
from vizkit.methods.adversarial.budget import pixel_amount
from vizkit.metrics.base import Metric, MetricInputs, MetricResult, positive_int
from vizkit.metrics.perturbation import check_inputs

if TYPE_CHECKING:
    import torch

SCORES = ("logit", "probability")


def check_seed(owner: str, seed: Any) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ConfigError(f"{owner}: seed must be an integer in [0, 2**63), got {seed!r}")


@dataclass
class InfidelityConfig:
    samples: int = 10  # S: perturbations per input (captum's n_perturb_samples default)
    std: Any = 0.1  # the Gaussian noise's standard deviation in pixel units (0.1, 25/255)
    normalize: bool = True  # scale the map by the best beta first (scale-invariant; captum's default: false)
    score: str = "logit"  # f: the target class's logit | probability
    batch_size: int = 16  # perturbed copies per forward pass
    seed: int = 0

    def __post_init__(self) -> None:
        positive_int("infidelity", "samples", self.samples)
        positive_int("infidelity", "batch_size", self.batch_size)
        self.std = pixel_amount("infidelity: std", self.std, allow_zero=False)
        if not isinstance(self.normalize, bool):
            raise ConfigError(f"infidelity: normalize must be true or false, got {self.normalize!r}")
        if self.score not in SCORES:
            raise ConfigError(f"infidelity: score must be one of {', '.join(SCORES)}, got {self.score!r}")
        check_seed("infidelity", self.seed)


def sample_major_copies(
    batch: int, samples: int, batch_size: int, draw: Callable[[], "torch.Tensor"]
) -> Iterator[tuple["torch.Tensor", "torch.Tensor"]]:
    """``(rows, draws)`` per chunk of at most ``batch_size`` of the ``samples * batch`` perturbed copies,
    in sample-major order (copy k perturbs input k % batch with sample k // batch): ``rows`` [n] the
    inputs, ``draws`` [n,...] their samples' draws. ``draw()`` is called once per sample, in order, and
    only a chunk's own draws are held, so they do not depend on ``batch_size`` and memory does not grow
    with ``samples``."""
    import torch

    total = batch * samples
    draws: dict[int, torch.Tensor] = {}
    drawn = 0
    for start in range(0, total, batch_size):
        copies = torch.arange(start, min(start + batch_size, total))
        sample_of = (copies // batch).tolist()
        while drawn <= sample_of[-1]:
            draws[drawn] = draw()
            drawn += 1
        draws = {s: noise for s, noise in draws.items() if s >= sample_of[0]}
        yield copies % batch, torch.stack([draws[s] for s in sample_of])


def widened(values: "torch.Tensor") -> "torch.Tensor":
    """float32, or float64 if already: sums of half-precision logits would round away the differences."""
    import torch

    return values if values.dtype == torch.float64 else values.float()


class Infidelity(Metric):
    name = "infidelity"
    description = "infidelity: squared error of the map's prediction I.Phi of the score drop under Gaussian noise I (Yeh et al. 2019)"
    better = "lower"
    needs_class = True
    Config = InfidelityConfig

    def scores(self, target: Any, model: "torch.nn.Module", x: "torch.Tensor") -> "torch.Tensor":
        logits = widened(target.logits(model, x))
        return target.select(logits.softmax(1) if self.config.score == "probability" else logits)

    def evaluate(self, inputs: MetricInputs) -> MetricResult:
        import torch

        check_inputs(self.name, inputs)
        config = self.config
        x, maps = inputs.x.detach(), inputs.maps.detach()
        batch, channels = x.shape[:2]
        if maps.shape[1] not in (1, channels):
            raise ConfigError(f"{self.name}: maps have {maps.shape[1]} channels; it needs 1 (one value per pixel) or the input's {channels}")
        sigma = inputs.pixels.std.to(x)
        generator = torch.Generator().manual_seed(config.seed)

        def draw() -> torch.Tensor:  # pixel units, on the CPU
            return torch.randn(x.shape[1:], generator=generator) * config.std

        # A0 = sum (I.Phi)^2, A1 = sum (I.Phi) df, A2 = sum df^2, E = sum (I.Phi - df)^2 per input, in
        # float64 on the CPU (MPS has no float64): E and beta's A2 - A1^2/A0 cancel
        sums = torch.zeros(4, batch, dtype=torch.float64)
        with torch.no_grad():
            clean = torch.cat([self.scores(inputs.target.take(rows), inputs.model, x[rows])
                               for rows in torch.arange(batch, device=x.device).split(config.batch_size)])
            for rows, noise in sample_major_copies(batch, config.samples, config.batch_size, draw):
                on_device = rows.to(x.device)
                perturbation = noise.to(x.device, x.dtype) / sigma  # into the model's input space
                predicted = (maps[on_device] * perturbation).flatten(1).sum(1)  # I . Phi
                drop = clean[on_device] - self.scores(inputs.target.take(on_device), inputs.model, x[on_device] - perturbation)
                predicted, drop = predicted.to("cpu", torch.float64), drop.to("cpu", torch.float64)
                sums.index_add_(1, rows, torch.stack([predicted.square(), predicted * drop, drop.square(), (predicted - drop).square()]))
        squared_predicted, product, squared_drop, squared_error = sums
        if config.normalize:
            beta = product / torch.where(squared_predicted == 0, 1.0, squared_predicted)
            # >= 0 (the least squared error over the scale), but A2 - A1^2/A0 cancels to rounding when the
            # map predicts every drop up to scale, and rounding may fall below 0
            squared_error = (beta.square() * squared_predicted - 2 * beta * product + squared_drop).clamp(min=0)
        return MetricResult(values=(squared_error / config.samples).to(x.device, widened(maps).dtype))
