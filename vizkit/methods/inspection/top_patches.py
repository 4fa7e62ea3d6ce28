"""Top activating patches (Zeiler & Fergus 2014; Girshick et al. 2014, fig. 4 "six pool5 units").

What does a channel respond to across a data set? Stream the images, and for every channel of the
layer keep, on the device, the ``k`` images whose strongest activation of that channel is highest
(one patch per image and channel: its maximum over positions), with where that maximum was. At the end
crop each one's exact receptive field (``vizkit.probes.receptive_field``) from its source image.

* The state is small and exact to merge: per channel the top-k values and their (image, y, x). Several
  devices' states merge into the same answer as one device: candidates are ordered by value, ties by
  the image's index in the data set, the same total order everywhere.
* Crops are the receptive field's full size; where it runs past the image the crop is filled with a
  striped gray so that padding is never mistaken for image content.
* Pictures: one grid per chosen channel (``top_patches/LAYER/channel_C``, its k patches best first,
  each labelled with its activation) and one summary grid (one row per channel under a caption
  "channel C", like the lecture's six pool5 neurons).

``channels``: ``top:N`` (the N channels whose best activation is highest, the default ``top:6``),
``all``, or a list of channel indices. ``layer``: a feature map (``[B,C,H,W]``, or channels-last)
layer's ``named_modules`` name; by default the deepest stage in timm's ``feature_info`` whose
receptive field is at most 3/4 of the model's input side (``vizkit.probes.default_layers``), so that a
patch is a part of the image (the embedded model's layer3: 71 px of 128; layer4 sees 167 px).

On a vision transformer's token layer (``[B, prefix + H*W, C]``; ``vizkit.core.layouts``) a channel is
an embedding dimension over the patch tokens, and each token's crop is its own patch (the patch
embedding's receptive field): after the first attention every token's receptive field is the whole
image, so the exact field would crop the whole image every time; the token's own patch is where its
content entered the network and what the literature shows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vizkit.core import pictures as render
from vizkit.core.errors import ConfigError
from vizkit.core.hooks import layer_output
from vizkit.core.layouts import channels_first, layout_of
from vizkit.methods.base import Inspection, InspectionMethod
from vizkit.core.models import find_layer


@dataclass
class TopPatchesConfig:
    layer: str = ""  # default: the deepest feature stage whose receptive field is at most 3/4 of the input
    channels: Any = "top:6"  # top:N | all | [c1, c2, ...]
    k: int = 9  # patches per channel
    scale: int = 1  # nearest upscaling of each patch in the pictures

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ConfigError(f"k must be a positive integer, got {self.k!r}")
        if not isinstance(self.scale, int) or self.scale < 1:
            raise ConfigError(f"scale must be a positive integer, got {self.scale!r}")
        parse_channels(self.channels)


def parse_channels(channels: Any) -> tuple[str, Any]:
    """("top", N) | ("all", None) | ("list", [c, ...])."""
    if isinstance(channels, str):
        text = channels.strip().lower()
        if text == "all":
            return "all", None
        if text.startswith("top:") and text[4:].isdigit() and int(text[4:]) > 0:
            return "top", int(text[4:])
        if text.isdigit():
            return "list", [int(text)]
    elif isinstance(channels, int) and not isinstance(channels, bool) and channels >= 0:
        return "list", [channels]
    elif isinstance(channels, (list, tuple)) or hasattr(channels, "__iter__"):
        values = list(channels)
        if values and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in values):
            return "list", values
    raise ConfigError(f"channels must be top:N, all, or a list of channel indices such as [0,5,7]; got {channels!r}")


def _ranked(values: torch.Tensor, images: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, k: int):
    """Per channel (row), the k best candidates: highest value first, ties by lower image index."""
    by_image = torch.argsort(images, dim=1, stable=True)
    values, images, ys, xs = (t.gather(1, by_image) for t in (values, images, ys, xs))
    order = torch.argsort(-values, dim=1, stable=True)[:, :k]
    return tuple(t.gather(1, order) for t in (values, images, ys, xs))


def _striped(mask: torch.Tensor) -> torch.Tensor:
    """[3,h,w] stripes (two grays) where ``mask`` [1,h,w] is True: padding, unmistakable for image."""
    h, w = mask.shape[-2:]
    diagonal = (torch.arange(h).view(-1, 1) + torch.arange(w).view(1, -1)) // 3 % 2
    return (0.45 + 0.15 * diagonal.float()).expand(3, h, w)


class TopPatches(InspectionMethod):
    name = "top_patches"
    description = "the data set's top-k activating patches of a layer's channels, cropped at their exact receptive field (Zeiler & Fergus 2014)"
    Config = TopPatchesConfig
    needs_data = True

    def layer_name(self, model) -> str:
        if self.config.layer:
            return self.config.layer
        from vizkit.probes.default_layers import scan_layer

        return scan_layer(model)

    def check(self, model) -> None:
        find_layer(model, self.layer_name(model))

    def start(self, model, space):
        return None  # sized by the first batch (the channel count)

    def update(self, state, model, pixels, indices, space):
        name = self.layer_name(model)
        output = layer_output(model, space.from_pixels(pixels), find_layer(model, name), name)
        activation = channels_first(output, model, name, pixels.shape[-2:])
        if activation.dim() != 4:
            raise ConfigError(f"layer '{name}' outputs shape {tuple(output.shape[1:])}, neither a [C,H,W] feature map nor a vision "
                              f"transformer's tokens; choose a convolutional layer or a transformer block")
        batch, channels, height, width = activation.shape
        if state is None:  # the first batch: a listed channel the layer lacks is refused now, not after the scan
            self.chosen({"values": activation.new_zeros(channels, 1)})
        best, where = activation.float().flatten(2).max(2)  # [B,C]: each image's strongest response per channel
        candidates = (best.T, indices.view(1, -1).expand(channels, -1), (where // width).T, (where % width).T)
        if state is not None:
            candidates = tuple(torch.cat([old.to(new.device), new], 1) for old, new in zip(
                (state["values"], state["images"], state["ys"], state["xs"]), candidates))
        values, images, ys, xs = _ranked(*candidates, self.config.k)
        return {"values": values, "images": images, "ys": ys, "xs": xs}

    def merge(self, states):
        states = [s for s in states if s is not None]
        if not states:
            return None
        joined = [torch.cat([s[key].cpu() for s in states], 1) for key in ("values", "images", "ys", "xs")]
        values, images, ys, xs = _ranked(*joined, self.config.k)
        return {"values": values, "images": images, "ys": ys, "xs": xs}

    def chosen(self, state) -> list[int]:
        kind, argument = parse_channels(self.config.channels)
        count = state["values"].shape[0]
        if kind == "all":
            return list(range(count))
        if kind == "top":
            return torch.argsort(-state["values"][:, 0].cpu(), stable=True)[: min(argument, count)].tolist()
        bad = [c for c in argument if c >= count]
        if bad:
            raise ConfigError(f"channel {bad[0]} is out of range: layer '{self.config.layer or 'default'}' has {count} channels (0..{count - 1})")
        return list(argument)

    def finish(self, state, model, space, fetch) -> Inspection:
        from vizkit.probes.receptive_field import receptive_field

        if state is None:
            raise ConfigError("top_patches saw no images")
        name = self.layer_name(model)
        first = fetch(int(state["images"][0, 0]))
        field = receptive_field(model, self._field_layer(model, name, space, first), input_size=tuple(first.shape[-2:]))
        pictures, tags, records, rows = {}, {}, [], []
        for channel in self.chosen(state):
            patches, entries = [], []
            for rank in range(state["values"].shape[1]):
                image, y, x = (int(state[key][channel, rank]) for key in ("images", "ys", "xs"))
                crop, mask = field.crop(fetch(image).float().cpu(), y, x)
                crop = torch.where(mask, _striped(mask), crop)
                patches.append(self._picture(crop))
                entries.append({"image": image, "y": y, "x": x, "value": float(state["values"][channel, rank]),
                                "box": list(field.box(y, x)), "padded": bool(mask.any())})
            pictures[f"channel_{channel}"] = render.grid(patches, labels=[f"{entry['value']:.3g}" for entry in entries])
            tags[f"channel_{channel}"] = f"{self.name}/{name}/channel_{channel}"
            rows.append(render.caption(render.panel(patches), [f"channel {channel}"]))
            records.append({"channel": channel, "patches": entries})
        pictures["summary"] = render.grid(rows, columns=1)
        tags["summary"] = f"{self.name}/{name}/summary"
        metrics = {"channels": len(records), "k": state["values"].shape[1], "receptive_field": field.size[0],
                   "mean_top_activation": float(np.mean([r["patches"][0]["value"] for r in records]))}
        return Inspection(pictures, tags, metrics, records)

    def _field_layer(self, model, name: str, space, pixels: torch.Tensor) -> str:
        """The layer whose receptive field crops the patches: the layer itself, or for a token layer the
        patch embedding's convolution (each token's own patch; see the module's docstring)."""
        with torch.no_grad():
            output = layer_output(model, space.from_pixels(pixels[None].to(space.mean.device)), find_layer(model, name), name)
        if layout_of(output, model, name, pixels.shape[-2:]) != "tokens":
            return name
        embedding = getattr(model.patch_embed, "proj", None)
        if not isinstance(embedding, torch.nn.Conv2d):
            raise ConfigError(f"top_patches: {type(model).__name__}'s patch embedding is not one convolution; its tokens' patches are unknown")
        return next(n for n, m in model.named_modules() if m is embedding)

    def _picture(self, crop: torch.Tensor) -> np.ndarray:
        picture = render.to_uint8(crop)
        scale = self.config.scale
        return picture.repeat(scale, 0).repeat(scale, 1) if scale > 1 else picture
