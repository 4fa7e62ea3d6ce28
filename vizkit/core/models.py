"""Models: timm loading, the embedded default, checkpoints, layer lookup, data config, class names.

``load_model("embedded")`` is the small ReLU CNN that ships in the package (trained on the shapes set,
see ``assets/embedded/card.json``); any other name is a timm model. Checkpoints load from
safetensors or from a torch file with ``weights_only=True`` (a pickle can run code).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from torch import nn

from vizkit.core.errors import ConfigError, VizkitError, did_you_mean

EMBEDDED = "embedded"
EMBEDDED_DIR = Path(__file__).resolve().parents[1] / "assets" / "embedded"


@lru_cache(maxsize=1)
def embedded_card() -> dict[str, Any]:
    """The embedded model's card: architecture, classes, input size, mean/std, held-out accuracy."""
    return json.loads((EMBEDDED_DIR / "card.json").read_text())


@dataclass
class ModelConfig:
    """Which network a run looks inside (``model=`` on the command line); the defaults of every field."""

    name: str = EMBEDDED  # "embedded" or any timm model name
    pretrained: bool = False  # true: timm downloads its weights (needs network or a warm Hugging Face cache)
    checkpoint: str | None = None  # a local .safetensors or torch state dict (loaded with weights_only=True)
    num_classes: int | None = None  # None: the model's own, or the checkpoint's

    def load(self) -> nn.Module:
        return load_model(self.name, pretrained=self.pretrained, checkpoint=self.checkpoint, num_classes=self.num_classes)


def load_model(
    name: str = EMBEDDED,
    *,
    pretrained: bool = False,
    checkpoint: str | Path | None = None,
    num_classes: int | None = None,
) -> nn.Module:
    """A model in eval mode. ``name`` is ``"embedded"`` or any timm model name (``resnet18``,
    ``convnext_tiny.fb_in1k``). ``checkpoint`` is a local ``.safetensors`` or torch file; its class count
    is read from the checkpoint when ``num_classes`` is not given."""
    import timm

    if pretrained and checkpoint:
        raise ConfigError("give either model.pretrained=true or model.checkpoint=PATH, not both")
    if name == EMBEDDED:
        return _load_embedded(checkpoint)
    _check_model_name(name)
    state_dict = _read_checkpoint(checkpoint) if checkpoint else None
    kwargs: dict[str, Any] = {}
    if num_classes is None and state_dict is not None:
        num_classes = _checkpoint_num_classes(name, state_dict)
    if num_classes is not None:
        if num_classes < 1:
            raise ConfigError(f"model.num_classes must be positive, got {num_classes}")
        kwargs["num_classes"] = num_classes
    if pretrained:
        model = _create_pretrained(name, kwargs)
    else:
        model = timm.create_model(name, pretrained=False, **kwargs)
    if state_dict is not None:
        _load_state_dict(model, state_dict, checkpoint)
    return model.eval()


def _check_model_name(name: str) -> None:
    import timm

    if not timm.is_model(name):
        known = [EMBEDDED, *timm.list_models()]
        raise ConfigError(f"unknown model '{name}' (not a timm model name){did_you_mean(name.split('.')[0], known)}")


def _hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached (one TCP connection, 3 s at most), or None. Without
    this, an offline ``pretrained=True`` spends ~70 s in the hub client's retries before failing.
    ``HF_HUB_OFFLINE=1`` skips the probe: the client then reads its cache only."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return None
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((endpoint.hostname or "huggingface.co", endpoint.port or 443), timeout=3).close()
    except OSError as error:
        return f"{endpoint.hostname} is unreachable ({error.strerror or error})"
    return None


def _create_pretrained(name: str, kwargs: dict[str, Any]) -> nn.Module:
    import timm

    advice = (f"Without network access, fetch the weights on a machine that has it (or copy the Hugging Face cache) and run "
              f"with model.checkpoint=PATH/TO/weights.safetensors (or a .pth state dict) instead of model.pretrained=true; "
              f"with the weights in the local Hugging Face cache, set HF_HUB_OFFLINE=1.")
    unreachable = _hub_unreachable()
    if unreachable is not None:
        raise VizkitError(f"could not load pretrained weights for '{name}': {unreachable}.\n{advice}")
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except (OSError, RuntimeError, ConnectionError, ValueError) as error:
        raise VizkitError(
            f"could not load pretrained weights for '{name}': {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}\n{advice}"
        ) from None


def _load_embedded(checkpoint: str | Path | None) -> nn.Module:
    import timm

    card = embedded_card()
    model = timm.create_model(card["architecture"], pretrained=False, num_classes=card["num_classes"])
    state_dict = _read_checkpoint(checkpoint or EMBEDDED_DIR / "model.safetensors")
    _load_state_dict(model, state_dict, checkpoint or "the embedded model")
    data_cfg = {key: card[key] for key in ("input_size", "mean", "std", "interpolation", "crop_pct")}
    # our own instance: record the card where timm's data config and our class-name lookup read it
    model.pretrained_cfg = {
        **model.pretrained_cfg,
        **data_cfg,
        "input_size": tuple(card["input_size"]),
        "mean": tuple(card["mean"]),
        "std": tuple(card["std"]),
        "crop_mode": "center",
        "num_classes": card["num_classes"],
        "label_names": list(card["classes"]),
        "architecture": card["architecture"],
        "tag": EMBEDDED,
    }
    model.default_cfg = model.pretrained_cfg
    return model.eval()


def _read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state_dict = load_file(str(path))
        else:
            import torch

            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a corrupt or foreign file: say which, and what is accepted
        raise VizkitError(
            f"cannot read checkpoint {path}: {type(error).__name__}: {error}. "
            f"Expected a .safetensors file or a torch state dict loadable with weights_only=True."
        ) from None
    if isinstance(state_dict, dict) and isinstance(state_dict.get("state_dict"), dict):
        state_dict = state_dict["state_dict"]  # Lightning checkpoints
    if not isinstance(state_dict, dict):
        raise VizkitError(f"checkpoint {path} holds a {type(state_dict).__name__}, not a state dict")
    for prefix in ("module.", "model."):  # DDP and LightningModule wrappers
        if state_dict and all(key.startswith(prefix) for key in state_dict):
            state_dict = {key[len(prefix):]: value for key, value in state_dict.items()}
    return state_dict


def _checkpoint_num_classes(name: str, state_dict: dict[str, Any]) -> int | None:
    import timm

    classifier = timm.models.get_pretrained_cfg_value(name.split(".")[0], "classifier") or ""
    classifiers = classifier if isinstance(classifier, (list, tuple)) else [classifier]
    for head in classifiers:
        weight = state_dict.get(f"{head}.weight")
        if weight is not None:
            return int(weight.shape[0])
    return None


def _load_state_dict(model: nn.Module, state_dict: dict[str, Any], source: Any) -> None:
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).splitlines()[1:4]]
        raise VizkitError(
            f"checkpoint {source} does not fit {type(model).__name__}: " + " ".join(lines)[:600]
            + " (is model.name the architecture the checkpoint was trained with? set model.num_classes if the head differs)"
        ) from None


def data_config(model: nn.Module) -> dict[str, Any]:
    """timm's resolved data config: input_size, interpolation, mean, std, crop_pct, crop_mode."""
    import timm.data

    return timm.data.resolve_model_data_config(model)


def num_classes(model: nn.Module) -> int | None:
    value = getattr(model, "num_classes", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def class_names(model: nn.Module) -> list[str] | None:
    """Human-readable class names: the card's for the embedded model, ImageNet's (from timm) for
    ImageNet classifiers, else None."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("label_names") and cfg.get("tag") == EMBEDDED:
        return list(cfg["label_names"])
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = infer_imagenet_subset(model)
    except Exception:
        subset = None
    if subset:
        info = ImageNetInfo(subset)
        return [info.index_to_description(i) for i in range(info.num_classes())]
    return None


def class_label(model_class_names: list[str] | None, index: int) -> str:
    """A short name for display: the first alias of the class description, or the index."""
    if model_class_names and 0 <= index < len(model_class_names):
        return model_class_names[index].split(",")[0].strip()
    return str(index)


def find_layer(model: nn.Module, name: str) -> nn.Module:
    """The module called `name` in ``model.named_modules()``, or an error listing the closest names."""
    modules = dict(model.named_modules())
    if name in modules and name:
        return modules[name]
    names = [n for n in modules if n]
    raise ConfigError(f"layer '{name}' not found in {type(model).__name__}{did_you_mean(name, names)}")


def token_model(model: nn.Module) -> bool:
    """Whether the model is a vision transformer that lays its features out as tokens ``[B, prefix + H*W, C]``
    (timm's ViT, DeiT, EVA, BEiT: a ``patch_embed`` and ``num_prefix_tokens``)."""
    return hasattr(model, "patch_embed") and hasattr(model, "num_prefix_tokens") and hasattr(model, "blocks")


def token_grid(model: nn.Module, input_size: tuple[int, int]) -> tuple[int, int, int]:
    """(prefix tokens, grid height, grid width) of a token model at this input size."""
    embed = model.patch_embed
    if hasattr(embed, "dynamic_feat_size"):
        height, width = embed.dynamic_feat_size(tuple(input_size))
    else:
        height, width = embed.grid_size
    return int(model.num_prefix_tokens), int(height), int(width)


def fixed_input_size(model: nn.Module) -> tuple[int, int] | None:
    """(height, width) for a model that takes only its own input size (timm's ``fixed_input_size``:
    ViT, Swin, MaxViT, CoAtNet; a ViT made with ``dynamic_img_size=True`` takes any), else None."""
    config = getattr(model, "pretrained_cfg", None) or {}
    embed = getattr(model, "patch_embed", None)
    if not config.get("fixed_input_size") or getattr(model, "dynamic_img_size", False) or getattr(embed, "dynamic_img_size", False):
        return None
    # the patch embedding's own size is the one it checks (a model made with img_size=... keeps timm's default config)
    size = getattr(embed, "img_size", None) or data_config(model)["input_size"][-2:]
    height, width = (size, size) if isinstance(size, int) else size
    return int(height), int(width)


def accepted_input_size(model: nn.Module, size: tuple[int, int]) -> tuple[int, int]:
    """The input size nearest ``size`` that the model takes: its fixed size (``fixed_input_size``), a
    multiple of the patch for a ViT of dynamic size that does not pad, else ``size`` itself."""
    fixed = fixed_input_size(model)
    if fixed is not None:
        return fixed
    embed = getattr(model, "patch_embed", None)
    patch = getattr(embed, "patch_size", None)
    if patch is None or getattr(embed, "dynamic_img_pad", False):
        return int(size[0]), int(size[1])
    patch = (patch, patch) if isinstance(patch, int) else patch
    return tuple(max(int(p), int(p) * round(int(s) / int(p))) for s, p in zip(size, patch))  # type: ignore[return-value]


def default_layer(model: nn.Module) -> str:
    """The last feature stage from timm's ``feature_info`` (where Grad-CAM looks and a channel scan
    starts), or an error that says how to choose one.

    A token model's is its last block's first norm (``blocks.11.norm1``), as pytorch-grad-cam's ViT
    recipe: the class token alone reaches the head, so the last block's *output* patch tokens get no
    gradient at all; at the last block's input norm the gradient still flows to every patch token
    through that block's attention."""
    blocks = getattr(model, "blocks", None)
    if token_model(model) and isinstance(blocks, nn.Sequential) and len(blocks) and hasattr(blocks[-1], "norm1"):
        return f"blocks.{len(blocks) - 1}.norm1"
    info = getattr(model, "feature_info", None)
    if isinstance(info, (list, tuple)) and info and isinstance(info[-1], dict) and info[-1].get("module"):
        return str(info[-1]["module"])
    raise ConfigError(f"{type(model).__name__} has no timm feature_info to find its last feature stage; "
                      f"choose a layer with method.layer=NAME (vizkit-layers MODEL lists them)")
