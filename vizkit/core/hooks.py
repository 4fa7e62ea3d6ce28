"""Forward-hook helpers that cannot outlive a call.

Every hook here is a context manager or a function that removes its hook before returning, so a
user's model never keeps a vizkit hook (lucent was measured leaving ~93 per call on resnet18).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from vizkit.core.errors import ConfigError


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """The model in eval mode for the duration, every module's own mode restored afterwards.

    A method given a model in train mode would otherwise compute with batch statistics (BatchNorm) and
    update the user's running statistics, and dropout would make its maps random. Running in eval
    mode and restoring is what a user of ``model.eval()`` expects, and leaves the model as it was;
    refusing would only move the same two lines into every caller.
    """
    modes = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for module, mode in modes:
            module.training = mode


@contextmanager
def forward_hook(module: nn.Module, hook: Callable) -> Iterator[None]:
    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class _StopForward(Exception):
    """Raised from a hook once the wanted activation is captured: the rest of the network is skipped."""


def layer_output(model: nn.Module, x: torch.Tensor, module: nn.Module, layer_name: str = "") -> torch.Tensor:
    """The output of `module` when `model` runs on `x`, computing nothing after it.

    Stopping the forward at the layer is both cheaper and exact: an in-place op that follows the layer
    (timm's ``x += shortcut; relu(inplace)``) never runs, so the captured tensor holds the layer's true
    output, still connected to `x` for gradients.
    """
    check_called_once(model, x, module, layer_name)
    captured: list[torch.Tensor] = []

    def capture(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        captured.append(output)
        raise _StopForward

    with forward_hook(module, capture):
        try:
            model(x)
        except _StopForward:
            pass
    if not captured:
        raise ConfigError(f"layer '{layer_name or module}' is not used when the model runs forward")
    output = captured[0]
    if not isinstance(output, torch.Tensor):
        raise ConfigError(f"layer '{layer_name}' returns {type(output).__name__}, not a tensor; choose a layer that outputs one")
    return output


_CALLED_ONCE: set[tuple[int, int, tuple[int, ...]]] = set()
_PROBING = False


def probing() -> bool:
    """Whether the forward running now is ``check_called_once``'s probe, which vizkit's own hooks and
    rules leave alone."""
    return _PROBING


def check_called_once(model: nn.Module, x: torch.Tensor, module: nn.Module, layer_name: str = "") -> None:
    """Refuse a layer the forward calls more than once (a module reused in a loop, a shared block):
    its "output" is ambiguous, and stopping at the first call would silently pick that one. Checked
    with one full forward of one input per model, layer and input size in a process."""
    key = (id(model), id(module), tuple(x.shape[1:]))
    if key in _CALLED_ONCE:
        return
    global _PROBING
    calls = []
    _PROBING = True  # vizkit's own recording hooks (an enclosing Grad-CAM capture) ignore this forward
    try:
        with torch.no_grad(), forward_hook(module, lambda *_: calls.append(1)):
            model(x[:1].detach())
    finally:
        _PROBING = False
    if len(calls) > 1:
        raise ConfigError(f"layer '{layer_name or module}' runs {len(calls)} times in one forward pass, so its output is ambiguous; "
                          f"choose a layer that runs once (vizkit-layers MODEL lists them)")
    _CALLED_ONCE.add(key)


@contextmanager
def capture_output(module: nn.Module, layer_name: str = "") -> Iterator[list[torch.Tensor]]:
    """Record `module`'s output while the whole model runs (for Grad-CAM: the activation and the
    logits from one forward). Yields a list that holds the output after the forward.

    The rest of the network is handed a copy of the output: an in-place op that follows the layer
    (timm's ``x += shortcut; relu(inplace)`` after ``bn2``) then changes the copy, and the recorded
    tensor keeps the layer's true values. pytorch-grad-cam and lucent were measured storing the
    tensor itself there and silently reading post-ReLU values. Gradients flow through the copy, so
    ``autograd.grad(score, recorded)`` is the gradient at the layer.
    """
    captured: list[torch.Tensor] = []

    def record(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if _PROBING:
            return None
        if not isinstance(output, torch.Tensor):
            raise ConfigError(f"layer '{layer_name or module}' returns {type(output).__name__}, not a tensor; choose a layer that outputs one")
        captured.append(output)
        return output.clone()

    with forward_hook(module, record):
        yield captured


def layer_outputs(model: nn.Module, x: torch.Tensor, modules: dict[str, nn.Module], logits: bool = False) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """Several layers' outputs from one forward (and the model's output when ``logits``).

    Without ``logits`` the forward stops once every layer has run, so nothing after the deepest one
    is computed. Each recorded output is the layer's true value (the network continues on a copy, as
    in ``capture_output``), connected to ``x`` for gradients.
    """
    captured: dict[str, torch.Tensor] = {}
    handles = []

    def recorder(name: str) -> Callable:
        def record(_module: nn.Module, _inputs: tuple, output: torch.Tensor):
            if _PROBING:
                return None
            if not isinstance(output, torch.Tensor):
                raise ConfigError(f"layer '{name}' returns {type(output).__name__}, not a tensor; choose a layer that outputs one")
            captured.setdefault(name, output)
            if not logits and len(captured) == len(modules):
                raise _StopForward
            return output.clone()  # the rest of the network may change its input in place

        return record

    output = None
    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(recorder(name)))
        try:
            output = model(x)
        except _StopForward:
            pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in modules if name not in captured]
    if missing:
        raise ConfigError(f"layers {', '.join(missing)} are not used when the model runs forward")
    return output, captured


def tensors_in(value: Any) -> list[torch.Tensor]:
    """The tensors in a call's arguments or result, however nested (what a ``TorchFunctionMode`` sees)."""
    from torch.utils._pytree import tree_leaves

    return [leaf for leaf in tree_leaves(value) if isinstance(leaf, torch.Tensor)]


class RuleMode(TorchFunctionMode):
    """A ``TorchFunctionMode`` that installs backward rules on the calls of one forward (guided
    backprop's, DeepLIFT's, LRP's). ``rule_call(func, args, kwargs)`` does a call; it is skipped (the
    call runs as it is) during ``check_called_once``'s probe and inside ``passing_through()``, where a
    rule computes a derivative of its own."""

    def __init__(self) -> None:
        super().__init__()
        self._passing = 0

    @contextmanager
    def passing_through(self) -> Iterator[None]:
        self._passing += 1
        try:
            yield
        finally:
            self._passing -= 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if probing() or self._passing:
            return func(*args, **kwargs)
        return self.rule_call(func, args, kwargs)

    def rule_call(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        raise NotImplementedError
