"""How much memory a batch of images will take through a model, and how much there is: so that a
method which makes many images at once (``class_model`` on ImageNet's 1,000 classes) is refused up
front with the numbers, instead of dying in one huge allocation halfway."""
from __future__ import annotations

import torch
from torch import nn

from vizkit.core.errors import ConfigError

# share of the free memory a batch may plan to use: the estimate leaves out the allocator's slack
BUDGET = 0.7


def activation_bytes(model: nn.Module, x_one: torch.Tensor) -> int:
    """Bytes of every leaf module's output for one input: what autograd keeps for the backward."""
    total = 0

    def count(_module, _inputs, output) -> None:
        nonlocal total
        for tensor in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()

    leaves = [module for module in model.modules() if not list(module.children())]
    handles = [module.register_forward_hook(count) for module in leaves]
    try:
        with torch.no_grad():
            model(x_one)
    finally:
        for handle in handles:
            handle.remove()
    return total


def available_bytes(device: torch.device) -> int | None:
    """Free memory on the device (CUDA: the driver's figure; CPU: MemAvailable), or None if unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class Budget:
    """What one image of a batch costs and how many fit: the activations twice (kept for the backward,
    and the gradients flowing back through them) plus ``per_image_extra`` (the image's parameters and
    optimizer state), against ``BUDGET`` of the free memory."""

    def __init__(self, model: nn.Module, x_one: torch.Tensor, per_image_extra: int = 0) -> None:
        self.per_image = 2 * activation_bytes(model, x_one) + per_image_extra
        self.free = available_bytes(x_one.device)
        self.device = x_one.device

    def fitting(self, count: int) -> int:
        """How many of `count` images fit together (all of them when the free memory is unknown)."""
        if self.free is None:
            return count
        return min(count, int(BUDGET * self.free // max(self.per_image, 1)))

    def refuse(self, owner: str, count: int, why: str = "") -> ConfigError:
        needed = self.per_image * count
        return ConfigError(f"{owner} would optimize {count} images together, about {needed / 2**30:.1f} GiB "
                           f"({self.per_image / 2**20:.0f} MiB each) with {(self.free or 0) / 2**30:.1f} GiB free on {self.device}: "
                           f"about {self.fitting(count)} fit{why}; choose fewer (e.g. target=[class:0,class:1,...] or fewer input images)")
