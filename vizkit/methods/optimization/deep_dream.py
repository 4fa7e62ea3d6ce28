"""Deep Dream (Mordvintsev, Olah & Tyka 2015, "Inceptionism: Going Deeper into Neural Networks";
CS7015 lecture 13.8): whatever a layer sees in an image, make it see more of it.

    x ← x + η g / mean|g|,   g = ∂ obj(roll(x, jitter)) / ∂x,   obj = mean a_L(x)²  (or a channel's mean)

gradient *ascent* from the input image itself, with the two tricks of the original notebook:

* **jitter**: the image is rolled by a random shift of up to ``jitter`` pixels before each forward
  (and the gradient, through autograd, is rolled back), so the dream cannot settle on patterns tied to
  one pixel grid. Shifts come from the problem's own generator, re-seeded per step from ``seed`` and
  the step (L-BFGS re-evaluates a step with the same shift; the global RNG is never touched).
* **octaves**: the optimization runs coarse to fine, ``steps`` split evenly over ``octaves`` scales,
  each ``octave_scale`` times the next. The original keeps one image per octave and carries the
  "detail" up; here there is one full-resolution image (a single parameter, as a Lightning fit wants)
  and during octave o the model sees it bilinearly downscaled (antialiased, differentiable) to
  size / octave_scale^(octaves − 1 − o): coarse octaves then change the image at low frequencies,
  the last one at full detail.

The original normalizes each step by the gradient's mean magnitude. Adam (the default optimizer)
divides by a running gradient scale per pixel, which serves the same purpose: the step is ``lr`` in
pixel units whatever the layer's scale. With ``optimizer=sgd`` the gradient is normalized as the
original does, g / mean|g| per image, so ``lr`` is the mean step per pixel (not with ``lbfgs``, whose
line search needs the loss's true gradient). The image stays a valid picture by clamping to [0, 1]
after each step; that clamp is what bounds the dream (on the embedded model the gain levels off
after ~130 steps at lr 0.03, the defaults: ‖a_layer3‖ grows 5.8 to 8.6 times on the sample images).

``target``: ``layer:LAYER`` (the default: the stage before the model's last, ``layer:layer3`` on the embedded model), or
``channel:LAYER:C`` to dream one feature; a list sums them. One channel reacts far more sharply than
a whole layer: at the default ``lr`` its first steps overshoot and can switch it off (measured on
the embedded model), so give it ``lr`` ≈ 0.005. ``measure()`` reports ``score`` (the objective of
the final image at full resolution, without jitter) and ``activation_gain`` = score / the original
input's score (read it where that is positive, as a layer's always is); for a layer objective the
activation norm ‖a_L‖ grew by its square root.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vizkit.core.errors import ConfigError
from vizkit.methods.base import OptimizationMethod
from vizkit.optimize.loop import frozen
from vizkit.optimize.objectives import Objective, parse_terms
from vizkit.optimize.parameterization import make_image
from vizkit.core.models import accepted_input_size
from vizkit.optimize.problem import OptimizationConfig, Problem, resized_to
from vizkit.probes.default_layers import dream_layer

MIN_OCTAVE_SIDE = 16  # pixels: below this a CNN's deeper layers see a point or less


@dataclass
class DeepDreamConfig(OptimizationConfig):
    steps: int = 128
    lr: float = 0.03  # Adam, in pixel units per step
    octaves: int = 3  # scales, coarse to fine; 1: full resolution only
    octave_scale: float = 1.4  # size ratio between consecutive octaves (the original notebook's)
    jitter: int = 8  # largest random shift in pixels, each axis, at each octave's size; 0: none

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.octaves, bool) or not isinstance(self.octaves, int) or self.octaves < 1:
            raise ConfigError(f"octaves must be a positive integer, got {self.octaves!r}")
        if self.octaves > self.steps:
            raise ConfigError(f"octaves ({self.octaves}) cannot exceed steps ({self.steps}): every octave needs at least one step")
        if not self.octave_scale >= 1:
            raise ConfigError(f"octave_scale must be at least 1 (each octave this many times smaller than the next; e.g. 1.4), got {self.octave_scale}")
        if isinstance(self.jitter, bool) or not isinstance(self.jitter, int) or self.jitter < 0:
            raise ConfigError(f"jitter must be a whole number of pixels >= 0, got {self.jitter!r}")


class _NormalizedGradient(torch.autograd.Function):
    """The identity, whose backward divides each image's gradient by its mean magnitude: the
    original's g / mean|g| step, for plain SGD."""

    @staticmethod
    def forward(ctx, pixels):
        return pixels.view_as(pixels)

    @staticmethod
    def backward(ctx, gradient):
        return gradient / gradient.abs().mean((1, 2, 3), keepdim=True).clamp_min(1e-12)


def octave_sizes(height: int, width: int, config: DeepDreamConfig) -> list[tuple[int, int]]:
    """The size the model sees at each octave, coarsest first; the last is the image's own."""
    sizes = []
    for octave in range(config.octaves):
        factor = config.octave_scale ** (config.octaves - 1 - octave)
        sizes.append((max(1, round(height / factor)), max(1, round(width / factor))))
    return sizes


class DeepDreamProblem(Problem):
    def __init__(self, model, image, pixels, names, objective: Objective, original_score: torch.Tensor, config: DeepDreamConfig) -> None:
        super().__init__(model, image, pixels, names)
        self.objective = objective
        self.config = config
        self.register_buffer("original_score", original_score)
        self.sizes = octave_sizes(image.height, image.width, config)
        self.generator = torch.Generator()

    def octave(self, step: int) -> int:
        """Steps 1..steps split evenly over the octaves, coarse to fine."""
        return min((step - 1) * self.config.octaves // self.config.steps, self.config.octaves - 1)

    def view(self, step: int) -> torch.Tensor:
        """The image as the model sees it at this step: downscaled to the octave, then rolled."""
        pixels = self.pixels()
        if self.config.optimizer == "sgd":
            pixels = _NormalizedGradient.apply(pixels)
        size = self.sizes[self.octave(step)]
        if size != tuple(pixels.shape[-2:]):
            pixels = F.interpolate(pixels, size=size, mode="bilinear", align_corners=False, antialias=True)
        if self.config.jitter:
            self.generator.manual_seed(self.config.seed * 1_000_003 + step)  # the same shift if the step is re-evaluated
            shift_y, shift_x = torch.randint(-self.config.jitter, self.config.jitter + 1, (2,), generator=self.generator).tolist()
            pixels = torch.roll(pixels, shifts=(shift_y, shift_x), dims=(-2, -1))
        return pixels

    def compute_loss(self, step):
        score, _, _ = self.objective.evaluate(self.model, self.model_input(self.view(step)))
        score = score.float()
        return -score.sum(), {"score": score.mean()}

    @torch.no_grad()
    def measure(self):
        score, _, _ = self.objective.evaluate(self.model, self.model_input(self.pixels()))
        score = score.float()
        return {"score": score, "activation_gain": score / self.original_score}


class DeepDream(OptimizationMethod):
    name = "deep_dream"
    description = "amplify what a layer sees in each input: gradient ascent with octaves and jitter (Mordvintsev et al. 2015)"
    Config = DeepDreamConfig
    target_kinds = frozenset({"layer", "channel"})
    default_target = "layer:STAGE"  # the stage before the model's last (vizkit.probes.default_layers): the embedded model's layer3
    needs_images = True

    def default_target_for(self, model):
        return f"layer:{dream_layer(model)}"

    def setup(self, model, target, images, pixels):
        config = self.config
        batch, _, height, width = images.shape
        terms = parse_terms(target, model, batch)
        for term in terms:
            kind = getattr(term.target, "kind", "class")
            if kind not in self.target_kinds:
                raise ConfigError(f"deep_dream amplifies a layer or a channel; got a {kind} target ({term.target}): use layer:LAYER or channel:LAYER:C")
        coarsest = octave_sizes(height, width, config)[0]
        if min(coarsest) < MIN_OCTAVE_SIDE:
            raise ConfigError(
                f"{config.octaves} octaves of scale {config.octave_scale:g} shrink the {height}x{width} images to "
                f"{coarsest[0]}x{coarsest[1]} at the coarsest; use fewer octaves or a smaller octave_scale"
            )
        objective = Objective(terms)
        with torch.no_grad(), frozen(model):  # the baseline of activation_gain, in eval mode as the loop runs
            original_score = objective.evaluate(model, pixels.from_pixels(resized_to(images, accepted_input_size(model, images.shape[-2:]))))[0].float()
        image = make_image("pixels", batch, height, width, init=images, device=images.device)
        return DeepDreamProblem(model, image, pixels, [""] * batch, objective, original_score, config).from_inputs([(row, "") for row in range(batch)])
