"""Inverting a representation (Mahendran & Vedaldi 2015, "Understanding Deep Image Representations
by Inverting Them"; CS7015 lecture 13.7): which image does a layer's code describe?

    x* = argmin_x  ‖Φ(x) − Φ0‖² / ‖Φ0‖²  +  λ_α R_α(x)  +  λ_V R_Vβ(x),      Φ0 = Φ(x0)

Φ is the network up to a layer, x0 an input image. The data term is normalized by ‖Φ0‖² as in the
paper, so one weight suits layers of any scale. The priors act on x in the model's normalized input
space (0 = the dataset mean) and, following the paper's §3.3, are divided by the image size and by
the range raised to the prior's power, so each is a per-pixel mean in units of the range:

    R_α(x)  = Σ |x / B|^α / (H W)                                     α-norm (α = 6): stay in range
    R_Vβ(x) = Σ ((x[i,j+1] − x[i,j])² + (x[i+1,j] − x[i,j])²)^(β/2) / (H W B^β)   total variation

B is the largest |x| a valid pixel reaches in normalized space (max over channels of
max(mean, 1 − mean) / std): a jump across the whole range costs about 1 per pixel. With this scale a
weight of 1 would let the priors outweigh the data term (they are ~0.1 at the sample images, while a
relative error of 0.1 costs 0.01), so the defaults are 0.05: enough to wash out the initial noise,
small enough that early layers invert to a few percent. Deeper layers need stronger priors for a
natural-looking image (the paper raises λ_V with depth).

The image is the parameter itself (plain pixels), clamped to [0, 1] after each step; it starts from
seeded noise around mid-gray (the paper's random initialization) or from mid-gray.

Several layers invert in one batch of B × L images, input-major (row ``b * L + l`` is input b
reconstructed from layer l, named ``input<b>@<layer>``): one forward per step records every layer
(``vizkit.core.hooks.layer_outputs``, stopping after the deepest) and each row's loss reads its own layer.
A run's grid has ceil(sqrt(B·L)) columns: it reads input by row, layer by column when B is L or L − 1.
``measure()`` reports ``relative_error`` = ‖Φ(x) − Φ0‖ / ‖Φ0‖ per image.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vizkit.core.errors import ConfigError
from vizkit.core.hooks import layer_outputs
from vizkit.methods.base import OptimizationMethod
from vizkit.core.models import accepted_input_size, find_layer
from vizkit.optimize.loop import frozen
from vizkit.optimize.parameterization import make_image
from vizkit.optimize.problem import OptimizationConfig, Problem, resized_to
from vizkit.probes.default_layers import first_activation
from vizkit.optimize.regularizers import alpha_norm, total_variation

INITS = ("noise", "gray")
NOISE_STD = 0.1  # of the "noise" init, in pixels around mid-gray: far from x0, still a valid image


@dataclass
class InversionConfig(OptimizationConfig):
    steps: int = 200
    lr: float = 0.05  # Adam, in pixel units
    # []: the model's first nonlinearity (vizkit.probes.default_layers), the embedded model's conv1.2
    # (stem conv, BN, ReLU): ~0.03 relative error in 200 steps, where its first stage act1 (after three
    # convolutions) is at ~0.23 and layer1 ~0.2 (measured on the sample images)
    layers: list[str] = field(default_factory=list)
    alpha: float = 6.0  # α of the α-norm prior (the paper's 6)
    alpha_weight: float = 0.05  # λ_α, on the normalized prior (see the module docstring)
    tv_beta: float = 2.0  # β of the total-variation prior (the paper's 2)
    tv_weight: float = 0.05  # λ_V, on the normalized prior
    init: str = "noise"  # noise | gray

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.layers, str):
            raise ConfigError(f"layers is a list of layer names, e.g. layers=[{self.layers}]")
        self.layers = list(self.layers)
        if not all(isinstance(name, str) and name for name in self.layers):
            raise ConfigError(f"layers must name layers, e.g. layers=[conv1.2,layer1] ([]: the model's first nonlinearity); got {self.layers}")
        repeated = sorted({name for name in self.layers if self.layers.count(name) > 1})
        if repeated:
            raise ConfigError(f"layers lists {', '.join(repeated)} more than once")
        if not self.alpha >= 1:
            raise ConfigError(f"alpha must be at least 1 (the paper uses 6), got {self.alpha}")
        if not self.tv_beta >= 1:
            raise ConfigError(f"tv_beta must be at least 1 (the paper uses 2; below 1 the prior is not convex), got {self.tv_beta}")
        for name in ("alpha_weight", "tv_weight"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name} must be non-negative, got {getattr(self, name)}")
        if self.init not in INITS:
            raise ConfigError(f"init must be one of {', '.join(INITS)}, got '{self.init}'")


class InversionProblem(Problem):
    def __init__(self, model, image, pixels, names, modules: dict, references: list[torch.Tensor], config: InversionConfig) -> None:
        super().__init__(model, image, pixels, names)
        self.modules = modules
        self.config = config
        for index, reference in enumerate(references):  # buffers: they follow the problem to its device
            self.register_buffer(f"reference_{index}", reference)
        # B: the largest |x| of a valid pixel in normalized space (the paper's image range)
        self.range = float(torch.maximum(self.mean, 1 - self.mean).div(self.std).max())

    def references(self) -> list[torch.Tensor]:
        return [getattr(self, f"reference_{index}") for index in range(len(self.modules))]

    def squared_errors(self, x: torch.Tensor) -> torch.Tensor:
        """‖Φ_l(x) − Φ0‖² / ‖Φ0‖² per row [B*L], from one forward; row b*L + l reads layer l."""
        _, activations = layer_outputs(self.model, x, self.modules)
        layer_count = len(self.modules)
        errors = []
        for index, (name, reference) in enumerate(zip(self.modules, self.references())):
            features = activations[name][index::layer_count].float()
            difference = (features - reference).flatten(1).pow(2).sum(1)
            errors.append(difference / reference.flatten(1).pow(2).sum(1).clamp_min(1e-12))  # a dead layer: no 0/0
        return torch.stack(errors, 1).flatten()  # [B, L] -> input-major rows

    def compute_loss(self, step):
        x = self.model_input(self.pixels())
        area = x.shape[-2] * x.shape[-1]
        feature = self.squared_errors(x)
        alpha = self.config.alpha_weight * alpha_norm(x / self.range, self.config.alpha) / area
        tv = self.config.tv_weight * total_variation(x / self.range, self.config.tv_beta) / area
        return (feature + alpha + tv).sum(), {"feature": feature.mean(), "alpha": alpha.mean(), "tv": tv.mean()}

    @torch.no_grad()
    def measure(self):
        return {"relative_error": self.squared_errors(self.model_input(self.pixels())).sqrt()}


class Inversion(OptimizationMethod):
    name = "inversion"
    description = "reconstruct each input from its code at chosen layers, with α-norm and TV priors (Mahendran & Vedaldi 2015)"
    Config = InversionConfig
    needs_images = True

    def check(self, model):
        for name in self.config.layers:
            find_layer(model, name)

    def setup(self, model, target, images, pixels):
        config = self.config
        x = pixels.from_pixels(resized_to(images, accepted_input_size(model, images.shape[-2:])))
        with torch.no_grad(), frozen(model):  # Φ0 in eval mode (BatchNorm's running statistics), as the loop runs
            layers = config.layers or [first_activation(model, x[:1])]
            modules = {name: find_layer(model, name) for name in layers}
            _, activations = layer_outputs(model, x, modules)
            references = [activations[name].detach().float().clone() for name in modules]
        batch, _, height, width = images.shape
        layer_count = len(modules)
        if config.init == "noise":
            generator = torch.Generator().manual_seed(config.seed)  # its own: the global RNG is untouched
            init = (0.5 + NOISE_STD * torch.randn(batch * layer_count, 3, height, width, generator=generator)).clamp(0, 1)
        else:
            init = torch.full((batch * layer_count, 3, height, width), 0.5)
        image = make_image("pixels", batch * layer_count, height, width, init=init.to(images.device), device=images.device)
        origins = [(row, name) for row in range(batch) for name in modules]
        problem = InversionProblem(model, image, pixels, [""] * len(origins), modules, references, config).from_inputs(origins)
        if layer_count > 1:  # images/grid.png: one row per input, its reconstructions from each layer side by side
            problem.grid_columns = layer_count
        return problem
