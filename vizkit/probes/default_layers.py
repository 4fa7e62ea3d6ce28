"""The layers each family looks at when the user names none, read from the model itself.

timm's ``feature_info`` lists a backbone's stages, shallow to deep (``act1, layer1 … layer4`` for a
ResNet, ``stages.0 … stages.3`` for ConvNeXt, ``blocks.0 … blocks.11`` for a ViT). Every default is
a position in that list, or a property of the forward, so that it exists on any timm model:

    gradcam      the last stage (a ViT: the last block's norm1; ``vizkit.core.models.default_layer``)
    inversion    the network's first nonlinearity (Mahendran & Vedaldi's relu1: the code closest to
                 the pixels that is still a feature): the first activation module the forward runs
                 once on a feature map (not an SE gate), else the first stage
    deep_dream   the stage before the last (Mordvintsev et al. dream at a high but not the top layer)
    neural_style content: the middle stage; style: up to four stages spread over all but the last
                 (Gatys et al.: conv4_2 for content, relu1_1 … relu5_1 for style)
    top_patches  the deepest stage whose receptive field is at most 3/4 of the model's input side, so
                 that a patch shows a part of the image rather than all of it (a ViT: its Grad-CAM
                 layer; each token's crop is its own patch, ``top_patches``)

On the embedded model (timm's test_resnet) these are conv1.2, layer3, layer2 and [act1, layer1,
layer2, layer3], and layer3 (a 71 px field on 128 px images; layer4's is 167 px).
"""
from __future__ import annotations

from weakref import WeakKeyDictionary

import torch
from torch import nn

from vizkit.core.errors import ConfigError
from vizkit.core.hooks import evaluating
from vizkit.core.models import data_config, default_layer, fixed_input_size, token_model

# leaf activation modules by class name, lower case: torch's and timm's own (timm.layers.activations)
ACTIVATIONS = frozenset({
    "relu", "relu6", "gelu", "gelutanh", "quickgelu", "silu", "swish", "swishme", "hardswish", "hardswishme", "mish",
    "mishme", "hardmish", "elu", "leakyrelu", "selu", "celu", "prelu", "softplus", "tanh", "hardtanh", "starrelu",
})
SCAN_FIELD_FRACTION = 0.75
STYLE_LAYERS = 4
_scan_layers: "WeakKeyDictionary[nn.Module, str]" = WeakKeyDictionary()


def feature_stages(model: nn.Module) -> list[str]:
    """The modules of timm's ``feature_info``, shallow to deep, or a one-line refusal."""
    info = getattr(model, "feature_info", None)
    stages = [str(entry["module"]) for entry in info or [] if isinstance(entry, dict) and entry.get("module")]
    if not stages:
        raise ConfigError(f"{type(model).__name__} has no timm feature_info to choose default layers from; "
                          f"name the layers in the method's fields (vizkit-layers MODEL lists them)")
    return stages


def first_activation(model: nn.Module, x: torch.Tensor) -> str:
    """The name of the first activation module the forward of ``x`` runs whose output is a feature map
    of the input (batch-major, more than one position) and that runs once (a module shared by several
    places has no one output to invert); a squeeze-excitation gate or a position-bias MLP is not one.
    A model with none (its activations inside its norms: EvoNorm) gets its first feature stage."""
    probe = x[:1].expand(2, *x.shape[1:])  # batch 2: a batch-major output is told from a table of positions
    calls: dict[str, int] = {}
    maps: set[str] = set()

    def hook(name: str):
        def record(_module, _inputs, output):
            calls[name] = calls.get(name, 0) + 1
            if isinstance(output, torch.Tensor) and output.dim() >= 3 and output.shape[0] == 2 and output[0].numel() > output.shape[1]:
                maps.add(name)
        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in model.named_modules()
               if name and not any(module.children()) and type(module).__name__.lower() in ACTIVATIONS]
    try:
        with torch.no_grad(), evaluating(model):
            model(probe)
    finally:
        for handle in handles:
            handle.remove()
    found = [name for name, count in calls.items() if count == 1 and name in maps]  # in call order
    return found[0] if found else feature_stages(model)[0]


def dream_layer(model: nn.Module) -> str:
    stages = feature_stages(model)
    return stages[-2] if len(stages) > 1 else stages[-1]


def content_layer(model: nn.Module) -> str:
    stages = feature_stages(model)
    return stages[len(stages) // 2]


def style_layers(model: nn.Module) -> list[str]:
    stages = feature_stages(model)
    candidates = stages[:-1] or stages
    if len(candidates) <= STYLE_LAYERS:
        return candidates
    picks = [round(i * (len(candidates) - 1) / (STYLE_LAYERS - 1)) for i in range(STYLE_LAYERS)]
    return [candidates[i] for i in picks]


def scan_layer(model: nn.Module) -> str:
    """top_patches' default (see the module's docstring), computed once per model."""
    if model in _scan_layers:
        return _scan_layers[model]
    if token_model(model):
        chosen = default_layer(model)
    else:
        from vizkit.probes.receptive_field import receptive_field

        side = min(fixed_input_size(model) or [int(s) for s in data_config(model)["input_size"][-2:]])
        stages = feature_stages(model)
        chosen, traced, failure = None, False, None
        for stage in reversed(stages):  # deepest first: the first that fits is the answer
            try:
                size = max(receptive_field(model, stage, input_size=(side, side)).size)
            except ConfigError as error:  # a stage past an op the tracer does not know (Swin's window partition)
                failure = error
                continue
            traced = True
            if size <= SCAN_FIELD_FRACTION * side:
                chosen = stage
                break
        if not traced:
            raise ConfigError(f"top_patches crops each patch at its receptive field, and none of "
                              f"{type(model).__name__}'s stages has one vizkit can trace: {failure}")
        chosen = chosen or stages[0]
    _scan_layers[model] = chosen
    return chosen


def default_roles(model: nn.Module, x: torch.Tensor) -> dict[str, list[str]]:
    """layer -> the defaults that pick it (``gradcam``, ``inversion``, ...), for ``vizkit-layers``; a
    default this model cannot have (top_patches on Swin) is left out."""
    first_conv = next((name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)), None)
    choosers = [
        ("gradcam", lambda: [default_layer(model)]),
        ("inversion", lambda: [first_activation(model, x)]),
        ("deep_dream", lambda: [dream_layer(model)]),
        ("neural_style content", lambda: [content_layer(model)]),
        ("neural_style style", lambda: style_layers(model)),
        ("top_patches", lambda: [scan_layer(model)]),
        ("filters", lambda: [first_conv] if first_conv else []),
    ]
    roles: dict[str, list[str]] = {}
    for role, choose in choosers:
        try:
            layers = choose()
        except ConfigError:
            continue
        for layer in layers:
            roles.setdefault(layer, []).append(role)
    return roles
