"""Feature visualization (Olah, Mordvintsev & Schubert 2017, "Feature Visualization", Distill).

The image that most excites a unit — a channel, a neuron, a whole layer, a class, or a weighted sum
of several — found with the three ingredients that make such images readable rather than
high-frequency noise: a Fourier-space parameterization with decorrelated colour (the optimizer's
steps are spread over frequencies and colours as in natural images), transformation robustness
(random pad, jitter, scale and rotation before every forward; lucent's ``standard_transforms``), and,
for a batch, a diversity term that pushes the images' Gram matrices apart.

    loss = − mean_b objective(T(image_b)) + diversity · mean pairwise cosine(Gram_b, Gram_b')

``target``: ``channel:LAYER:C`` (the channel's mean activation), ``neuron:LAYER:C:Y:X``,
``layer:LAYER`` (mean squared activation), ``class:NAME``, or a list of targets / of
``{target, weight}`` mappings (a weighted sum, one forward for all of them). Defaults as lucent's
``render_vis``: Adam, lr 0.05, 128 px, 256 steps here (lucent's default threshold is 512). A model
that takes one input size only (ViT, Swin) gets images of that size, and what the transforms make of
them is resized back to it (``Problem.model_input``). On a ViT block a channel is an embedding
dimension, averaged over the patch tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vizkit.core.errors import ConfigError
from vizkit.methods.base import OptimizationMethod
from vizkit.core.layouts import channels_first
from vizkit.core.models import find_layer, fixed_input_size
from vizkit.optimize.objectives import Objective, diversity, parse_terms
from vizkit.optimize.parameterization import KINDS, make_image
from vizkit.optimize.problem import OptimizationConfig, Problem
from vizkit.optimize.transforms import STANDARD, Transforms
from vizkit.core.targets import ClassTarget


DEFAULT_SIZE = 128


@dataclass
class FeatureVizConfig(OptimizationConfig):
    steps: int = 256
    lr: float = 0.05
    batch: int = 1  # images per run; with diversity > 0 they are pushed apart
    size: int = 0  # image side in pixels; 0: a fixed-input model's own size (ViT, Swin), else 128 (lucent's default)
    parameterization: str = "fourier"  # fourier (decorrelated colour) | pixels
    transforms: list[str] = field(default_factory=lambda: list(STANDARD))  # [] for none
    diversity: float = 0.0  # weight of the diversity term (needs batch > 1)
    diversity_layer: str = ""  # the layer whose Gram matrices are compared; default: the first target's layer

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch < 1 or (self.size and self.size < 8) or self.size < 0:
            raise ConfigError(f"batch must be >= 1 and size 0 (the model's) or >= 8, got batch={self.batch}, size={self.size}")
        if self.parameterization not in KINDS:
            raise ConfigError(f"parameterization must be one of {', '.join(KINDS)}, got '{self.parameterization}'")
        if self.diversity < 0:
            raise ConfigError(f"diversity must be >= 0, got {self.diversity}")
        Transforms(list(self.transforms))  # a bad spec fails with the config, not mid-run


class FeatureVizProblem(Problem):
    total_over_batch = "mean"  # the objective's mean, and the diversity of the whole batch

    def __init__(self, model, image, pixels, names, objective: Objective, config: FeatureVizConfig, diversity_layer: str | None) -> None:
        super().__init__(model, image, pixels, names)
        self.objective = objective
        self.config = config
        self.diversity_layer = diversity_layer
        self.transforms = Transforms(list(config.transforms), seed=config.seed)

    def compute_loss(self, step):
        x = self.model_input(self.transforms(self.pixels()))
        score, activations, _ = self.objective.evaluate(self.model, x)
        parts = {"objective": score.mean()}
        total = -score.mean()
        if self.diversity_layer is not None:
            layer = self.diversity_layer
            similarity = diversity(channels_first(activations[layer], self.model, layer, x.shape[-2:]))
            total = total + self.config.diversity * similarity
            parts["similarity"] = similarity
        return total, parts

    @torch.no_grad()
    def measure(self):
        score, _, _ = self.objective.evaluate(self.model, self.model_input(self.pixels()))
        return {"objective": score.float()}


class FeatureViz(OptimizationMethod):
    name = "feature_viz"
    description = "the image a channel, neuron or layer likes most: Fourier parameterization, decorrelated colour, transformation robustness (Olah et al. 2017)"
    Config = FeatureVizConfig
    target_kinds = frozenset({"channel", "neuron", "layer", "class"})
    chunkable = False  # the diversity term couples a batch's images

    def setup(self, model, target, images, pixels):
        config = self.config
        terms = parse_terms(target, model, config.batch)
        wrong = [str(t.target) for t in terms if t.target.kind not in self.target_kinds]
        if wrong:
            raise ConfigError(f"feature_viz cannot optimize {', '.join(wrong)}")
        diversity_layer = None
        extra = {}
        if config.diversity > 0 and config.batch > 1:
            diversity_layer = config.diversity_layer or next((t.target.layer for t in terms if not isinstance(t.target, ClassTarget)), "")
            if not diversity_layer:
                raise ConfigError("a class objective has no layer to compare: set method.diversity_layer=LAYER")
            extra[diversity_layer] = find_layer(model, diversity_layer)
        objective = Objective(terms, extra)
        device = pixels.mean.device
        size = config.size or (fixed_input_size(model) or (DEFAULT_SIZE, DEFAULT_SIZE))[0]
        image = make_image(config.parameterization, config.batch, size, size, seed=config.seed, device=device)
        label = str(objective).replace(":", "_").replace("*", "x").replace(" + ", "+")
        names = [label] if config.batch == 1 else [f"{label}_{i}" for i in range(config.batch)]
        return FeatureVizProblem(model, image, pixels, names, objective, config, diversity_layer)
