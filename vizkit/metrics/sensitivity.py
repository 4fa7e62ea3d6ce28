"""Max-sensitivity (Yeh, Hsieh, Suggala, Inouye & Ravikumar 2019, "On the (In)fidelity and Sensitivity
of Explanations", NeurIPS, Definition 3.1): how far the map moves when the input moves a little,

    SENS_MAX(Phi, f, x, r) = max_{||d||_inf <= r} ||Phi(x + d) - Phi(x)|| / ||Phi(x)||

as captum's ``sensitivity_max`` computes it: relative to the clean map's norm (the paper's definition
has no denominator; dividing makes maps of different scales comparable), the max estimated over
``samples`` draws d uniform in [-r, r] per element, || . || the Frobenius norm of the whole map (all its
channels), and a clean map of norm 0 divided by 1. Lower is better.

Phi(x + d) is the method run again (``inputs.method.attribute``) on each perturbed copy, for the target
the clean map explained (``target.take``: the same class, not what the copy is predicted as; a channel
or neuron target as it is), in batches of ``batch_size`` copies. Phi(x) is the clean map the method
already returned (captum computes it once more). The cost is ``samples`` runs of the method per input:
10 by default, as captum; lower ``samples`` for an expensive method.

As captum leaves the perturbation to the caller (its default adds the noise to whatever tensor it is
given), the choices here are those of ``vizkit.metrics.infidelity``: the radius is in pixel units (0.02,
captum's default number, is about 5/255 of a [0, 1] image) and d = u / sigma in the model's input space,
u ~ U[-r, r] drawn in pixels, sigma the model's normalization std; one ``[C,H,W]`` draw per sample from a
``torch.Generator`` seeded with ``seed`` on the CPU, shared by every input of the batch, so a value
depends neither on ``batch_size`` nor on the batch's other inputs. x + d is not clamped to valid
pixels. Captum given a ``perturb_func`` that returns these copies computes the same value.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vizkit.core.errors import ConfigError
from vizkit.methods.adversarial.budget import pixel_amount
from vizkit.metrics.base import Metric, MetricInputs, MetricResult, positive_int
from vizkit.metrics.infidelity import check_seed, sample_major_copies, widened


@dataclass
class SensitivityMaxConfig:
    samples: int = 10  # perturbed copies per input, each a run of the method (captum's n_perturb_samples)
    radius: Any = 0.02  # r: the L-inf ball's radius in pixel units (0.02, 5/255)
    batch_size: int = 8  # perturbed copies per run of the method
    seed: int = 0

    def __post_init__(self) -> None:
        positive_int("sensitivity_max", "samples", self.samples)
        positive_int("sensitivity_max", "batch_size", self.batch_size)
        self.radius = pixel_amount("sensitivity_max: radius", self.radius, allow_zero=False)
        check_seed("sensitivity_max", self.seed)


class SensitivityMax(Metric):
    name = "sensitivity_max"
    description = "max-sensitivity: largest relative change of the map under small uniform noise; costs `samples` (10) reruns of the method (Yeh et al. 2019)"
    better = "lower"
    Config = SensitivityMaxConfig

    def evaluate(self, inputs: MetricInputs) -> MetricResult:
        import torch

        config = self.config
        if inputs.method is None:
            raise ConfigError(f"{self.name} runs the method again on perturbed inputs; pass the method that made the maps (MetricInputs.method)")
        x, clean = inputs.x.detach(), inputs.maps.detach()
        batch = x.shape[0]
        if clean.dim() < 2 or clean.shape[0] != batch:
            raise ConfigError(f"{self.name}: maps of shape {tuple(clean.shape)} do not fit the input {tuple(x.shape)}; it needs one map per input")
        sigma = inputs.pixels.std.to(x)
        generator = torch.Generator().manual_seed(config.seed)

        def draw() -> torch.Tensor:  # pixel units, on the CPU
            return torch.empty(x.shape[1:]).uniform_(-config.radius, config.radius, generator=generator)

        clean_norms = torch.linalg.vector_norm(widened(clean).flatten(1), dim=1)
        clean_norms = torch.where(clean_norms == 0, 1.0, clean_norms)  # captum's: a zero map's change is absolute
        worst = torch.zeros(batch, dtype=clean_norms.dtype, device=x.device)  # every ratio is >= 0
        for rows, noise in sample_major_copies(batch, config.samples, config.batch_size, draw):
            rows = rows.to(x.device)
            perturbed = x[rows] + noise.to(x.device, x.dtype) / sigma
            with torch.enable_grad():
                maps = inputs.method.attribute(inputs.model, perturbed, inputs.target.take(rows), mean=inputs.pixels.mean, std=inputs.pixels.std)
            change = torch.linalg.vector_norm((widened(clean[rows]) - widened(maps)).flatten(1), dim=1)
            worst.scatter_reduce_(0, rows, (change / clean_norms[rows]).to(worst.dtype), "amax")
        return MetricResult(values=worst)
