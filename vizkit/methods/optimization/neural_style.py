"""Neural style transfer (Gatys, Ecker & Bethge 2016, "Image Style Transfer Using Convolutional
Neural Networks", CVPR; CS7015 lecture 13.9).

    x* = argmin_x  α L_content(x, c) + β L_style(x, s) + γ TV(x)

    L_content = mean (F_l(x) − F_l(c))²                     one layer l (``content_layer``)
    L_style   = Σ_l w_l · ¼ Σ_ij (G_l(x) − A_l)_ij²,  w_l = 1/|L|      layers L (``style_layers``)
    G_l(x)    = F Fᵀ / (C·H·W),  F the layer's output as C x (H·W)

Normalization. With the Gram matrix divided by C·H·W (N·M in the paper's notation) the style term
¼ Σ (G − A)² *is* the paper's E_l = 1/(4N²M²) Σ (FFᵀ − A)²: one number for any layer size, so
equal weights w_l (the paper's choice) weigh layers equally. The content term is a mean rather than
the paper's ½ Σ, so ``content_weight`` does not depend on the content layer's size either; only the
ratio α/β matters, and ours is not the paper's 1e-3 because both terms are scaled differently.

Several style images (``style: [a, b]``): their Gram matrices are averaged into one target per layer.
Each style image is resized to the content images' size first: a Gram matrix has no spatial axes,
so any size would do, but the network sees a texture at a scale, and matching sizes keeps the
style's strokes as large relative to the picture as they were in the style image.

Style images: a file path, ``sample:NAME`` (the embedded model's sample images in
``vizkit/assets/samples``, e.g. ``sample:star_2``) or ``shapes:SPLIT:INDEX`` (one image of the
procedural shapes set, as ``data=shapes`` draws it). The default, ``shapes:train:7``, works offline
and is none of the default content images (a sample style would be one of them, with nothing to
transfer to itself).

Layers are ``named_modules()`` names (``vizkit-layers MODEL`` lists them). As the paper, take
post-ReLU outputs at several depths for style (its relu1_1 … relu5_1) and one deeper layer for content
(its relu4_2, at 1/8 of the input's resolution):

    embedded (timm test_resnet)  style act1, layer1, layer2, layer3          content layer2 (the default)
    timm resnet18/50             style act1, layer1, layer2, layer3, layer4  content layer2 (layer3: looser)
    timm vgg19 (the paper's)     style features.1, features.6, features.11, features.20, features.29
                                 content features.22
    timm vgg16                   style features.1, features.6, features.11, features.18, features.25
                                 content features.20

The content bound. ``content_error`` = ‖F(x) − F(c)‖² / ‖F(c)‖² at the content layer: the squared
feature error relative to the content's own feature energy; below 1 the result's content features are
closer to the content image's than an empty feature map is. With the defaults on the embedded model
(its 6 samples, 128 px) the style loss falls ≥ 10× from the content image (``style_ratio`` ≤ 0.1)
while ``content_error`` ≤ ``CONTENT_ERROR_BOUND`` = 1, checked by ``tests/test_optimization_style.py``.
Measured with 60 steps: ≥ 28× (ratio ≤ 0.036) and content_error ≤ 0.48; under a 1e-6 relative
jitter on every gradient (another CPU's rounding, emulated; 8 draws) the worst image still fell 24.7×
with content_error ≤ 0.50. 40 steps gave 21× here but stalled at 9.4× on another CPU before L-BFGS
restarted after a failed line search (``vizkit.optimize.problem.ProjectedLBFGS``). The bound belongs
to the defaults: raise ``style_weight`` and the content gives way, as it should.

Per image, ``measure`` reports ``style_loss``, ``content_loss`` (the unweighted terms above) and their
values at the initial image (``*_initial``), ``style_ratio`` (final / initial style loss) and
``content_error`` (with ``content_error_initial``).

Optimizer: L-BFGS, the paper's choice (one step is one outer iteration with a strong-Wolfe line
search, about two loss evaluations; ``lr`` 1 is its natural step). Adam moves pixels by about ``lr``
a step: ``method.optimizer=adam method.lr=0.03 method.steps=100``. Pixels are clamped to [0, 1] after
every step (the shared pixel parameterization), so the result is always a valid image.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
import numpy as np
import torch

from vizkit.core.errors import ConfigError, did_you_mean
from vizkit.core.hooks import layer_outputs
from vizkit.methods.base import OptimizationMethod
from vizkit.core.layouts import channels_first
from vizkit.core.models import find_layer
from vizkit.probes.default_layers import content_layer, style_layers
from vizkit.optimize.loop import frozen
from vizkit.optimize.parameterization import make_image
from vizkit.optimize.problem import OptimizationConfig, Problem
from vizkit.optimize.regularizers import total_variation

SAMPLES_DIR = Path(__file__).resolve().parents[2] / "assets" / "samples"
INITS = ("content", "noise", "style")
CONTENT_ERROR_BOUND = 1.0  # content_error the defaults stay under on the embedded model (see the module docstring)


@dataclass
class NeuralStyleConfig(OptimizationConfig):
    steps: int = 60  # the 10x style drop with margin on every sample image (module docstring)
    log_every: int = 10  # the image forming, in TensorBoard: steps 0, 10, ..., 60
    lr: float = 1.0  # L-BFGS: its line search scales the step; Adam moves pixels by ~lr a step: use 0.03
    optimizer: str = "lbfgs"  # the paper's choice; adam works with more steps
    style: list[str] = field(default_factory=lambda: ["shapes:train:7"])  # paths, sample:NAME or shapes:SPLIT:INDEX; several: Gram targets averaged
    content_layer: str = ""  # "": the model's middle feature stage (the embedded model's layer2)
    style_layers: list[str] = field(default_factory=list)  # []: up to 4 stages over all but the last (act1, layer1, layer2, layer3)
    content_weight: float = 1.0  # α
    style_weight: float = 100.0  # β, shared equally by the style layers
    tv_weight: float = 0.0  # γ, on the mean squared pixel difference between neighbours
    init: str = "content"  # content | noise (seeded uniform noise, as the paper) | style (the first style image)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.style = [self.style] if isinstance(self.style, str) else list(self.style)
        self.style_layers = [self.style_layers] if isinstance(self.style_layers, str) else list(self.style_layers)
        if not self.style:
            raise ConfigError("style needs at least one style image: a path, sample:NAME or shapes:SPLIT:INDEX")
        for name in ("content_weight", "style_weight", "tv_weight"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value >= 0 and value < float("inf")):
                raise ConfigError(f"{name} must be a finite non-negative number, got {value!r}")
        if self.style_weight == 0:
            raise ConfigError("style_weight must be positive: without a style term there is nothing to transfer")
        repeated = sorted({name for name in self.style_layers if self.style_layers.count(name) > 1})
        if repeated:
            raise ConfigError(f"style_layers names {', '.join(repeated)} more than once; each layer's weight is already 1/len(style_layers)")
        if self.optimizer == "adam" and self.lr > 0.25:
            raise ConfigError(f"optimizer=adam moves every pixel by about lr per step, and lr={self.lr:g} (the L-BFGS default is 1) "
                              f"jumps across the whole [0, 1] range: use method.lr=0.03 method.steps=100")
        if self.init not in INITS:
            raise ConfigError(f"init must be one of {', '.join(INITS)}, got '{self.init}'")
        for source in self.style:  # a missing file fails with the config, before the model loads
            resolve_style(source)


def resolve_style(source: str) -> Path | tuple[str, int]:
    """A style source as a file path, or ``(split, index)`` of a shapes image; ConfigError if missing."""
    text = str(source).strip()
    if text.startswith("shapes:"):
        parts = text.split(":")
        if len(parts) != 3 or not parts[2].isdigit():
            raise ConfigError(f"style '{text}': write a shapes image as shapes:SPLIT:INDEX, e.g. shapes:train:7")
        from vizkit.core.shapes import split_seed

        try:
            split_seed(parts[1])
        except ValueError as error:
            raise ConfigError(f"style '{text}': {error}") from None
        return parts[1], int(parts[2])
    if text.startswith("sample:"):
        name = text[len("sample:"):]
        path = SAMPLES_DIR / (name if Path(name).suffix else f"{name}.png")
        if not path.is_file():
            names = sorted(p.stem for p in SAMPLES_DIR.glob("*.png"))
            raise ConfigError(f"style '{text}': no sample image '{name}'{did_you_mean(name, names) or '; samples: ' + ', '.join(names)}")
        return path
    path = Path(text).expanduser()
    if not path.is_file():
        folder = path.parent
        if folder.is_dir():
            names = sorted(p.name for p in folder.iterdir() if p.is_file())
            hint = did_you_mean(path.name, names) or "; style takes an image file, sample:NAME or shapes:SPLIT:INDEX"
        else:
            hint = f"; folder {folder} does not exist"
        raise ConfigError(f"style image not found: {path}{hint}")
    return path


def load_style(source: str, like: torch.Tensor) -> torch.Tensor:
    """The style image as pixels [1,3,H,W] in [0, 1], resized to `like`'s size."""
    from vizkit.probes.baselines import image_file

    resolved = resolve_style(source)
    if isinstance(resolved, Path):
        return image_file(resolved, like[:1])[:1].clone()
    from PIL import Image

    from vizkit.core.shapes import render_shape, split_seed

    split, index = resolved
    image = Image.fromarray(render_shape(index, seed=split_seed(split)).image)
    height, width = like.shape[-2:]
    image = image.resize((width, height), Image.BILINEAR)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return pixels.unsqueeze(0).to(like)


def gram(features: torch.Tensor) -> torch.Tensor:
    """G = F Fᵀ / (C·H·W) per image: [B,C,H,W] -> [B,C,C], in float32."""
    batch, channels, height, width = features.shape
    flat = features.float().reshape(batch, channels, height * width)
    return flat @ flat.transpose(1, 2) / (channels * height * width)


class NeuralStyleProblem(Problem):
    def __init__(self, model, image, pixels, names, config: NeuralStyleConfig, content: torch.Tensor, style: torch.Tensor,
                 content_layer: str, style_layers: list[str]) -> None:
        super().__init__(model, image, pixels, names)
        self.config = config
        self.content_layer, self.style_layers = content_layer, list(style_layers)
        modules = dict(model.named_modules())
        self.layers = {name: modules[name] for name in dict.fromkeys([content_layer, *style_layers])}
        with torch.no_grad(), frozen(model):
            content_features, _ = self.features(content)
            _, style_grams = self.features(style)
            self.register_buffer("content_target", content_features)
            for index, style_gram in enumerate(style_grams):  # several style images: their Gram matrices averaged
                self.register_buffer(f"style_target_{index}", style_gram.mean(0, keepdim=True))
            initial = self.losses(self.pixels())
        self.register_buffer("content_energy", content_features.float().pow(2).flatten(1).mean(1))
        self.register_buffer("content_loss_initial", initial["content"])
        self.register_buffer("style_loss_initial", initial["style"])

    def features(self, pixels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(the content layer's features, the style layers' Gram matrices) from one forward."""
        x = self.model_input(pixels)
        _, outputs = layer_outputs(self.model, x, self.layers)
        maps = {name: channels_first(output, self.model, name, x.shape[-2:]) for name, output in outputs.items()}
        for name, output in maps.items():
            if output.dim() != 4:
                raise ConfigError(f"neural_style: layer '{name}' outputs shape {list(outputs[name].shape)}, neither a feature map "
                                  f"[B,C,H,W] nor a vision transformer's tokens; choose a convolutional layer or a transformer block")
        return maps[self.content_layer].float(), [gram(maps[name]) for name in self.style_layers]

    def losses(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-image (name -> [B]) content and style losses, and the total variation."""
        content, grams = self.features(pixels)
        targets = [getattr(self, f"style_target_{i}") for i in range(len(grams))]
        style = sum(0.25 * (g - a).pow(2).sum((1, 2)) for g, a in zip(grams, targets)) / len(grams)
        content_loss = (content - self.content_target).pow(2).flatten(1).mean(1)
        height, width = pixels.shape[-2:]
        tv = total_variation(pixels) / (height * width) if self.config.tv_weight else torch.zeros_like(style)
        return {"content": content_loss, "style": style, "tv": tv}

    def compute_loss(self, step):
        config = self.config
        parts = self.losses(self.pixels())
        total = config.content_weight * parts["content"] + config.style_weight * parts["style"] + config.tv_weight * parts["tv"]
        named = {"content": parts["content"].mean(), "style": parts["style"].mean()}
        if config.tv_weight:
            named["tv"] = parts["tv"].mean()
        return total.sum(), named

    @torch.no_grad()
    def measure(self):
        final = self.losses(self.pixels())
        initial = self.style_loss_initial
        ratio = torch.where(initial > 0, final["style"] / initial.clamp_min(torch.finfo(initial.dtype).tiny),
                            torch.where(final["style"] > 0, torch.full_like(initial, float("inf")), torch.ones_like(initial)))
        energy = self.content_energy.clamp_min(torch.finfo(self.content_energy.dtype).tiny)
        return {
            "style_loss": final["style"],
            "style_loss_initial": initial,
            "style_ratio": ratio,
            "content_loss": final["content"],
            "content_loss_initial": self.content_loss_initial,
            "content_error": final["content"] / energy,
            "content_error_initial": self.content_loss_initial / energy,
        }


class NeuralStyle(OptimizationMethod):
    name = "neural_style"
    description = "repaint the input images in a style image's textures: content at one layer, Gram matrices at several (Gatys et al. 2016)"
    Config = NeuralStyleConfig
    needs_images = True

    def layers(self, model) -> tuple[str, list[str]]:
        """(the content layer, the style layers): the config's, or the model's defaults (``vizkit.probes.default_layers``)."""
        return self.config.content_layer or content_layer(model), list(self.config.style_layers) or style_layers(model)

    def check(self, model):
        content, styles = self.layers(model)
        for field_name, layer in [("content_layer", content), *(("style_layers", name) for name in styles)]:
            try:
                find_layer(model, layer)
            except ConfigError as error:
                raise ConfigError(f"{self.name}.{field_name}: {error}") from None

    def setup(self, model, target, images, pixels):
        config = self.config
        self.check(model)
        device = images.device
        styles = torch.cat([load_style(source, images) for source in config.style])
        if config.init == "content":
            init = images
        elif config.init == "style":
            init = styles[:1].expand_as(images)
        else:  # the paper starts from white noise; our own generator keeps the global RNG untouched
            generator = torch.Generator().manual_seed(config.seed)
            init = torch.rand(images.shape, generator=generator).to(device)
        batch, _, height, width = images.shape
        image = make_image("pixels", batch, height, width, init=init, device=device)
        return NeuralStyleProblem(model, image, pixels, [""] * batch, config, images, styles, *self.layers(model)).from_inputs(
            [(row, "") for row in range(batch)])
