"""What the rows measure on, and against: the model and input under test, and the bare passes (the
floors) that several rows share."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from harness import MODEL, VIT_MODEL


def make_model(name: str = MODEL) -> nn.Module:
    """A timm model (resnet18 unless named), random weights, eval; BatchNorm gammas re-initialized to
    non-zero (timm zeroes each block's last one, which would leave every residual branch at 0)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
    return model


def make_vit_model(size: int = 224) -> nn.Module:
    """timm vit_small_patch16_224, random weights (seed 0), eval; ``size``: the ``img_size`` it is created
    for (a ViT's position embedding fixes its input size: 64 px in --quick, a 4x4 patch grid)."""
    import timm

    torch.manual_seed(0)
    kwargs = {} if size == 224 else {"img_size": size}
    return timm.create_model(VIT_MODEL, pretrained=False, **kwargs).eval()


def make_input(batch: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``[B,3,size,size]`` inputs and random class-index targets (a tensor: no "predicted" forward is timed)."""
    generator = torch.Generator().manual_seed(batch * 1000 + size)
    return torch.randn(batch, 3, size, size, generator=generator), torch.randint(1000, (batch,), generator=generator)


def hook_count(model: nn.Module) -> int:
    """Hooks registered on the model's modules: forward, forward-pre and backward hooks of every kind."""
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return sum(len(getattr(module, kind, {})) for module in model.modules() for kind in kinds)


def gradient_floor(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """One forward and one backward to the input: what saliency, guided backprop and deconvnet need."""
    x = x.detach().requires_grad_()
    score = model(x)[torch.arange(x.shape[0]), target].sum()
    (gradient,) = torch.autograd.grad(score, x)
    return gradient


def chunked_gradient_floor(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, chunk: int) -> None:
    """Forward + backward to the input for pre-built images, `chunk` images per pass."""
    for inputs, chunk_targets in zip(images.split(chunk), targets.split(chunk)):
        gradient_floor(model, inputs, chunk_targets)


def layer_gradient_floor(model: nn.Module, layer: nn.Module, x: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """One forward with a hook that keeps `layer`'s output, then autograd.grad of the target logits' sum
    w.r.t. that output: the backward stops at the layer. ``target`` None: each input's predicted class."""
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _module, _inputs, output: captured.append(output))
    try:
        logits = model(x)
    finally:
        handle.remove()
    score = logits.max(1).values if target is None else logits[torch.arange(x.shape[0]), target]
    (gradient,) = torch.autograd.grad(score.sum(), captured[0])
    return gradient


def no_grad_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One plain forward of the batch, no graph: what a forward-only method (attention rollout) needs."""
    with torch.no_grad():
        return model(x)


def block_input_gradient_floor(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A ViT's forward with a pre-hook keeping the tokens that enter its first block, then autograd.grad
    of the target logits' sum w.r.t. them: the backward through every block (no weight gradients), which
    a gradient reaching the first block's attention cannot avoid; it stops before the patch embedding."""
    captured: list[torch.Tensor] = []
    handle = model.blocks.register_forward_pre_hook(lambda _module, inputs: captured.append(inputs[0]))
    try:
        logits = model(x)
    finally:
        handle.remove()
    (gradient,) = torch.autograd.grad(logits[torch.arange(x.shape[0]), target].sum(), captured[0])
    return gradient


def input_gradient_passes(model: nn.Module, trunk: Callable[[torch.Tensor], torch.Tensor], inputs: list[torch.Tensor]) -> None:
    """Forward + backward to the input for each tensor, the model frozen (no weight gradient)."""
    from vizkit.optimize.loop import frozen

    with frozen(model):
        for x in inputs:
            x = x.detach().requires_grad_()
            torch.autograd.grad(trunk(x).sum(), x)
