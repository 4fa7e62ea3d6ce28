"""Small, deterministic models for the attribution tests (random weights, never downloaded).

* ``timm_model``: a timm CNN with usable random weights: BatchNorm gammas re-initialized (timm zero-inits
  each block's last gamma, which would switch every residual branch off) and running statistics
  calibrated on random data, so activations and logits have a sane scale; eval mode.
* ``TinyReLUNet(style)``: one small ReLU CNN written three ways (ReLU modules, in-place ReLU modules,
  functional ReLUs of every spelling) with identical weights for one seed.
* ``OtherActivationNet`` / ``NoReLUNet``: models that guided backprop and the deconvnet must refuse.
* ``ReluProbe``: one ReLU between the input and the logit, so each ReLU rule's gradient is known exactly.
* ``RegionModel``: class 0's logit is a weighted sum over one known image region; for occlusion.
"""
from __future__ import annotations

import copy
import functools
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


def reinit_batchnorm(model: nn.Module, seed: int = 0, calibrate_size: int = 32) -> nn.Module:
    """Random BN affine parameters, then running statistics measured on random inputs; eval mode."""
    generator = torch.Generator().manual_seed(seed)
    batchnorms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for bn in batchnorms:
            bn.weight.copy_(torch.rand(bn.weight.shape, generator=generator) * 0.5 + 0.5)
            bn.bias.copy_(torch.randn(bn.bias.shape, generator=generator) * 0.1)
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the calibration batch
        model.train()
        model(torch.randn(8, 3, calibrate_size, calibrate_size, generator=generator))
    for bn in batchnorms:
        bn.momentum = 0.1
    return model.eval()


def timm_model(name: str, num_classes: int = 10, seed: int = 0, **kwargs) -> nn.Module:
    """A timm model with random (BN re-initialized, calibrated) weights, in eval mode; ``kwargs`` go to
    ``timm.create_model``."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    return reinit_batchnorm(model, seed=seed)


@functools.cache
def differential_model(name: str) -> nn.Module:
    """The differential tests' model, built once per process (never modify it: copy it first): a timm
    model as ``timm_model``; a VGG's classifier hidden width cut 16x (timm's ``mlp_ratio``), its features
    as they are, so building and copying it is quick (8M parameters instead of 129M)."""
    return timm_model(name, mlp_ratio=1 / 16) if name.startswith("vgg") else timm_model(name)


def captum_copy(model: nn.Module) -> nn.Module:
    """A deep copy whose ReLU modules are not in-place (captum's guided backprop/deconvolution need that)."""
    clone = copy.deepcopy(model)
    for module in clone.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    return clone


def pixel_batch(batch: int, height: int, width: int | None = None, seed: int = 0) -> torch.Tensor:
    """Random pixels in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, height, width or height, generator=generator)


def normalized_batch(model: nn.Module, batch: int, size: int, seed: int = 0) -> torch.Tensor:
    """Random pixels normalized with the model's timm mean/std (what the model expects as input)."""
    cfg = model.pretrained_cfg
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    return (pixel_batch(batch, size, seed=seed) - mean) / std


# ---------------------------------------------------------------- one ReLU CNN, three spellings

RELU_STYLES = ("module", "module_inplace", "functional")


class TinyReLUNet(nn.Module):
    """conv-relu-conv(+residual)-relu-pool-conv-relu-conv1x1-relu-pool-fc-relu-fc; 5 classes.

    ``style``: ``module`` (``nn.ReLU()`` modules), ``module_inplace`` (``nn.ReLU(inplace=True)``), or
    ``functional`` (``F.relu``, ``F.relu(x, inplace=True)``, ``torch.relu``, ``Tensor.relu`` and
    ``Tensor.relu_``, one per ReLU site). Weights depend only on ``seed``, never on the style.
    """

    def __init__(self, style: str = "module", seed: int = 0, num_classes: int = 5) -> None:
        super().__init__()
        if style not in RELU_STYLES:
            raise ValueError(style)
        self.style = style
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 12, 3, padding=1)
        self.conv4 = nn.Conv2d(12, 12, 1)
        self.fc1 = nn.Linear(12, 16)
        self.fc2 = nn.Linear(16, num_classes)
        with torch.no_grad():  # He init and small biases: a fair share of units on and off, and logits
            for layer in (self.conv1, self.conv2, self.conv3, self.conv4, self.fc1, self.fc2):  # that vary
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")  # with the input
                layer.bias.normal_(0, 0.1)
        if style != "functional":
            inplace = style == "module_inplace"
            self.act1 = nn.ReLU(inplace=inplace)
            self.act2 = nn.ReLU(inplace=inplace)
            self.act3 = nn.ReLU(inplace=inplace)
            self.act4 = nn.ReLU(inplace=inplace)
            self.act5 = nn.ReLU(inplace=inplace)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.style == "functional":
            h = F.relu(self.conv1(x))
            h = F.relu(self.conv2(h) + h, inplace=True)
            h = F.max_pool2d(h, 2)
            h = torch.relu(self.conv3(h))
            h = self.conv4(h).relu_()
            h = F.max_pool2d(h, 2).mean((2, 3))
            h = self.fc1(h).relu()
            return self.fc2(h)
        h = self.act1(self.conv1(x))
        h = self.act2(self.conv2(h) + h)
        h = F.max_pool2d(h, 2)
        h = self.act3(self.conv3(h))
        h = self.act4(self.conv4(h))
        h = F.max_pool2d(h, 2).mean((2, 3))
        h = self.act5(self.fc1(h))
        return self.fc2(h)


def tiny_relu_net(style: str, seed: int = 0) -> TinyReLUNet:
    """The same weights for every style."""
    reference = TinyReLUNet("module", seed=seed)
    model = TinyReLUNet(style, seed=seed)
    model.load_state_dict(reference.state_dict())
    return model.eval()


# ---------------------------------------------------------------- models the ReLU rules must refuse

OTHER_ACTIVATIONS = {
    # id: (module or function, the name the error must mention)
    "GELU-module": (nn.GELU(), "GELU"),
    "SiLU-module": (nn.SiLU(), "SiLU"),
    "ReLU6-module": (nn.ReLU6(), "ReLU6"),
    "LeakyReLU-module": (nn.LeakyReLU(0.1), "LeakyReLU"),
    "GELU-functional": (F.gelu, "GELU"),
    "SiLU-functional": (F.silu, "SiLU"),
    "ReLU6-functional": (F.relu6, "ReLU6"),
    "LeakyReLU-functional": (lambda t: F.leaky_relu(t, 0.1), "LeakyReLU"),
}


class OtherActivationNet(nn.Module):
    """A ReLU CNN that also uses one other activation (a module, or a function called in forward)."""

    def __init__(self, activation, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        if isinstance(activation, nn.Module):
            self.other = activation
        else:
            self._other_fn = activation
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.conv1(x))
        other = self.other if hasattr(self, "other") else self._other_fn
        h = other(self.conv2(h))
        return self.fc(h.mean((2, 3)))


class NoReLUNet(nn.Module):
    """Convolutions with tanh and a sigmoid gate: no rectifier at all."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.act = nn.Tanh()
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.conv(x))
        h = h * torch.sigmoid(h)
        return self.fc(h.mean((2, 3)))


# ---------------------------------------------------------------- models with known gradients / occlusion maps


class ReluProbe(nn.Module):
    """logit_0 = sum(w * relu(x)), logit_1 = -logit_0, with a fixed signed weight map w [3,H,W].

    d logit_0 / dx: plain ``w * (x > 0)``; guided ``relu(w) * (x > 0)``; deconvnet ``relu(w)``.
    """

    def __init__(self, height: int, width: int, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("w", torch.randn(3, height, width, generator=generator))
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = (self.w * self.relu(x)).sum((1, 2, 3))
        return torch.stack([score, -score], 1)


class RegionModel(nn.Module):
    """Class 0's logit is ``scale * sum(x)`` over rows ``rows`` and columns ``cols`` (all channels) and
    nothing else; class 1's logit is 0. Inputs are taken as pixels (no timm data config)."""

    def __init__(self, rows: slice, cols: slice, scale: float = 1.0) -> None:
        super().__init__()
        self.rows, self.cols, self.scale = rows, cols, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = self.scale * x[:, :, self.rows, self.cols].sum((1, 2, 3))
        return torch.stack([score, torch.zeros_like(score)], 1)


# ---------------------------------------------------------------- comparison


def assert_maps_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """Equal up to ``rel`` times the expected map's largest magnitude (and the map must not be all 0)."""
    scale = float(expected.abs().max())
    assert scale > 0, "the reference map is all zero: the comparison would prove nothing"
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=0, atol=rel * scale)


@contextmanager
def single_thread():
    """One intra-op thread for the duration: on a busy 2-core machine, OpenMP's spinning threads made a
    tiny CNN's forward ~100x slower (0.2 s instead of 2 ms); results do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------- a model left as it was


def state(model):
    """What a method must leave as it was: modules' modes, parameters' flags, every value in the state dict."""
    return ([m.training for m in model.modules()], [p.requires_grad for p in model.parameters()],
            {k: v.clone() for k, v in model.state_dict().items()})


def assert_untouched(model, before):
    """No hook left, no gradient accumulated, and modes, flags and values as ``state`` recorded them."""
    modes, flags, values = before
    assert not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(torch.equal(v, values[k]) for k, v in model.state_dict().items())


# ---------------------------------------------------------------- float32 error bounds


def rounding(model, layer):
    """A float32 layer output's rounding error relative to its norm, from the arithmetic: every conv /
    linear output is a dot product of K = fan-in terms (≈ 6e-8·√K each), summed over the convs up to
    and including ``layer`` in module order (embedded: conv1.2 3.1e-7, layer1 3.8e-6, layer2 6.4e-6,
    layer3 8.9e-6; measured against a float64 model: 1.4e-7, 3.5e-7, -, 2.0e-7)."""
    total = 0.0
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            total += module.weight[0].numel() ** 0.5
        if name == layer or name.startswith(layer + "."):
            bound = total
    return 6e-8 * bound
