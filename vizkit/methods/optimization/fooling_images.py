"""Fooling images (Nguyen, Yosinski & Clune 2015, "Deep Neural Networks are Easily Fooled: High
Confidence Predictions for Unrecognizable Images"), the gradient-ascent variant of the paper:

    I* = argmax_I  log softmax(f(I))_c ,   I ∈ [0, 1]   (clamped after every step)

from uniform noise (seeded) or a blank mid-gray image, with no prior. The objective is the class's
log-probability, not its logit: confidence is the point, so the other classes are pushed down too
(class_model maximizes the logit for the opposite reason). Without a prior a few small steps suffice
and the image stays, to the eye, the noise (or the gray) it started from while the network is
≥ 99 % sure of the class. The paper's evolutionary variant (MAP-Elites over direct and CPPN
encodings) is not reproduced.

``target``: as class_model's: ``class:NAME`` / ``class:INDEX``, a list of them, or ``all`` (the
default): every class of the model as one batch. ``measure`` reports each image's ``probability``
(and its logit, ``score``). It is an optimization (a ``ClassModel`` with another objective and no
prior), and runs and is listed as one, although what it shows is a failure of the network rather than
what a class looks like.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vizkit.core.errors import ConfigError
from vizkit.methods.optimization.class_model import ClassModel, ClassModelConfig, ClassModelProblem, class_indices
from vizkit.core.models import class_label, class_names, data_config
from vizkit.optimize.parameterization import make_image
from vizkit.optimize.regularizers import l2

INITS = ("noise", "blank")


@dataclass
class FoolingImagesConfig(ClassModelConfig):
    # measured on the embedded model: every class ≥ 0.99 by step 26 from noise, 35 from gray; at
    # step 50 the RMS change is ~0.13 against the noise's own 0.29 (correlation with it ~0.9)
    steps: int = 50
    lr: float = 0.02  # Adam, in pixel units
    l2: float = 0.0  # no prior (the paper's gradient-ascent images use none)
    init: str = "noise"  # noise: uniform [0, 1] drawn from `seed` | blank: mid-gray

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init not in INITS:
            raise ConfigError(f"fooling_images: init must be one of {', '.join(INITS)}, got '{self.init}'")


class FoolingImagesProblem(ClassModelProblem):
    def compute_loss(self, step):
        pixels = self.pixels()
        x = self.model_input(pixels)
        logits = self.model(self.model_input(self.transforms(pixels)) if self.transforms.specs else x)
        log_probability = logits.float().log_softmax(1).gather(1, self.indices.view(-1, 1)).squeeze(1)
        penalty = self.config.l2 * l2(x)
        return (penalty - log_probability).sum(), {"log_probability": log_probability.mean(), "l2": penalty.mean()}


class FoolingImages(ClassModel):
    name = "fooling_images"
    description = "noise the network calls a class with ≥ 99 % confidence, by gradient ascent on its log-probability (Nguyen et al. 2015)"
    Config = FoolingImagesConfig

    def setup(self, model, target, images, pixels):
        config = self.config
        known = class_names(model)
        indices = class_indices(target, model, known)
        device = pixels.mean.device
        size = config.size or int(data_config(model)["input_size"][-1])
        shape = (len(indices), 3, size, size)
        if config.init == "noise":  # its own generator: the global RNG is untouched
            # a chunk of classes (see OptimizationMethod.problems) draws its own stream: seeded by its first class
            start = torch.rand(shape, generator=torch.Generator().manual_seed(config.seed + indices[0]))
        else:
            start = torch.full(shape, 0.5)
        image = make_image("pixels", len(indices), size, size, init=start.to(device), device=device)
        names = [class_label(known, i) for i in indices]
        return FoolingImagesProblem(model, image, pixels, names, torch.tensor(indices, device=device), config)
