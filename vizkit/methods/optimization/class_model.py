"""Class model visualization (Simonyan, Vedaldi & Zisserman 2014, "Deep Inside Convolutional Networks").

    I* = argmax_I  S_c(I) − λ ‖I‖²

S_c is the class's unnormalized score (the logit: maximizing the softmax would also push the other
classes down), I the image with the dataset mean subtracted, i.e. the model's normalized input, so
the "zero image" the paper starts from is the mean colour. The image is the parameter itself (plain
pixels), kept a valid picture by clamping to [0, 1] after every step.

Optional, from Yosinski et al. 2015: random jitter before each forward (``transforms``), L2 decay, blur
every k steps and clipping of small-norm or small-contribution pixels (``yosinski.*``).

``target``: ``class:NAME`` / ``class:INDEX``, a list of them, or ``all`` (the default): every class
of the model as one batch, one image each (the run also writes them as a grid).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from vizkit.core.errors import ConfigError
from vizkit.methods.base import OptimizationMethod
from vizkit.core.models import class_label, class_names, data_config, num_classes
from vizkit.optimize.objectives import term_score
from vizkit.optimize.parameterization import make_image
from vizkit.optimize.problem import OptimizationConfig, Problem
from vizkit.optimize.regularizers import YosinskiConfig, l2, yosinski_step
from vizkit.optimize.transforms import Transforms
from vizkit.core.targets import ClassTarget, class_index, parse_target


@dataclass
class ClassModelConfig(OptimizationConfig):
    steps: int = 100
    lr: float = 0.05  # Adam, in pixel units
    l2: float = 0.001  # λ, on the mean-subtracted (normalized) image
    size: int = 0  # image side in pixels; 0: the model's input size
    transforms: list[str] = field(default_factory=list)  # e.g. ["jitter:8"] (Yosinski et al.)
    yosinski: YosinskiConfig = field(default_factory=YosinskiConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.l2 < 0 or self.size < 0:
            raise ConfigError("l2 and size must be non-negative")
        Transforms(list(self.transforms))  # a bad spec fails with the config, not mid-run
        if isinstance(self.yosinski, dict):
            self.yosinski = YosinskiConfig(**self.yosinski)


def class_indices(target: Any, model: torch.nn.Module, names: list[str] | None) -> list[int]:
    """``all``, one class reference, or a list of them, as class indices (``names``: the model's class names)."""
    count = num_classes(model)
    if isinstance(target, str) and target.strip().lower() in ("all", "class:all"):
        if count is None:
            raise ConfigError("target=all needs a model with a classifier; name the classes with target=class:INDEX")
        return list(range(count))
    indices = []
    for item in [target] if isinstance(target, str) else list(target):
        spec = parse_target(str(item))
        if spec.kind != "class":
            raise ConfigError(f"class_model optimizes class scores; got target '{item}' (use class:NAME, class:INDEX or all)")
        indices.append(class_index(spec.class_ref, names, count))
    return indices


class ClassModelProblem(Problem):
    def __init__(self, model, image, pixels, names, indices: torch.Tensor, config: ClassModelConfig) -> None:
        super().__init__(model, image, pixels, names)
        self.register_buffer("indices", indices)
        self.config = config
        self.transforms = Transforms(list(config.transforms), seed=config.seed)

    def compute_loss(self, step):
        pixels = self.pixels()
        x = self.model_input(pixels)
        logits = self.model(self.model_input(self.transforms(pixels)) if self.transforms.specs else x)
        score = term_score(ClassTarget(self.indices), logits, {})  # the logit of each image's class
        penalty = self.config.l2 * l2(x)
        return (penalty - score).sum(), {"score": score.mean(), "l2": penalty.mean()}

    def after_step(self, step):
        yosinski = self.config.yosinski
        if yosinski.active:
            pixels = self.image.pixels
            x = self.model_input(pixels.detach())
            gradient = None if pixels.grad is None else -pixels.grad * self.std  # ∂S/∂x, roughly (the loss's sign flipped)
            yosinski_step(x, gradient, step, yosinski)
            with torch.no_grad():
                pixels.copy_(x * self.std + self.mean)
        super().after_step(step)

    @torch.no_grad()
    def measure(self):
        logits = self.model(self.model_input(self.pixels()))
        probabilities = logits.float().softmax(1)
        rows = torch.arange(len(self.indices), device=logits.device)
        return {"probability": probabilities[rows, self.indices], "score": logits[rows, self.indices].float()}


class ClassModel(OptimizationMethod):
    name = "class_model"
    description = "the image a class's score likes most, from a zero image with an L2 prior (Simonyan et al. 2014)"
    Config = ClassModelConfig
    target_kinds = frozenset({"class"})
    default_target = "all"

    def split(self, model, target, images, size):
        """Chunks of `size` classes, in class order."""
        if target is None or (isinstance(target, str) and target.strip().lower() == "predicted"):
            target = self.default_target
        indices = class_indices(target, model, class_names(model))
        return [([f"class:{i}" for i in indices[start:start + size]], None) for start in range(0, len(indices), size)]

    def setup(self, model, target, images, pixels):
        config = self.config
        known = class_names(model)  # timm builds ImageNet's names on each call: once per run
        indices = class_indices(target, model, known)
        device = pixels.mean.device
        size = config.size or int(data_config(model)["input_size"][-1])
        mean_image = pixels.mean.reshape(1, -1, 1, 1).expand(len(indices), 3, size, size)  # the normalized zero image
        image = make_image("pixels", len(indices), size, size, init=mean_image.to(device), device=device)
        names = [class_label(known, i) for i in indices]
        return ClassModelProblem(model, image, pixels, names, torch.tensor(indices, device=device), config)
