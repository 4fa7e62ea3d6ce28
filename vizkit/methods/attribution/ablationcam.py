"""Ablation-CAM (Desai & Ramaswamy 2020, "Ablation-CAM: Visual Explanations for Deep Convolutional Network
via Gradient-free Localization", WACV).

A channel's weight is the share of the target's score that is lost when the channel is switched off.
With A the layer's activation (``[B,K,h,w]``, channels first), S the target's score (a class logit; a
channel's or neuron's value) and S_k the score when channel k of the layer's output is set to 0 at every
position, everything else unchanged:

    w_k = (S - S_k) / S                                                      (the paper's "slope")
    L   = ReLU( sum_k w_k * A_k )

then upsampled bilinearly (align_corners=False) to the input's size, as every CAM here. Where S is
exactly 0 (a channel or neuron target that is off) the ratio is undefined: the weights are 0, and so is
the map. A negative S (a class the model rejects) flips the signs, as the formula says.

This is pytorch-grad-cam's ``AblationCAM`` (1.5.7) with its default ``ratio_channels_to_ablate=1.0``,
up to its per-image min-max scaling of the map: the same score (``ClassifierOutputTarget``: the logit)
and formula (original score minus ablated, over original). Two differences:

* ``ratio_channels_to_ablate`` is not offered. pytorch-grad-cam calls it experimental: it ranks the
  channels by their overlap with an Eigen-CAM mask and ablates the top and the bottom ``ratio`` of them
  (so 0.5 ablates all, and above 0.5 some twice); the others get weight 0. It saves forwards by guessing
  which weights are 0; here every channel is measured.
* pytorch-grad-cam sets the channel to 0 only when the layer's smallest output is exactly 0 (after a
  ReLU, as the tests' layers); otherwise it writes (smallest value - 1e7), lowered again for every row of
  its batch, so there its result depends on its batch size. Here the channel is always 0 (the paper).

On a channels-last stage the channel is the last axis; on a vision transformer's tokens it is embedding
dimension k of the patch tokens, the same values that make A_k (the class and other prefix tokens keep
theirs; pytorch-grad-cam's ``AblationLayerVit`` changes them too). torchcam has no Ablation-CAM.

How: a forward hook on the layer replaces its output with the clean activation (recorded by the
capture's forward) with one channel zeroed per row, for a chunk of ``batch_size`` (input, channel)
pairs run on copies of their inputs (``ForwardCam`` in ``scorecam.py`` does the chunking). The hook is
removed when the chunks end, however they end, so the model is left as it was, also when a forward
raises. Memory: ``batch_size`` input copies and ablated layer outputs plus one forward of ``batch_size``
inputs, whatever the channel count (never K ablated activations at once); measured on resnet18's
``layer4``, one 224 px image, CPU: peak RSS +56 MB (batch_size 8), +269 MB (32; pytorch-grad-cam
+281 MB at its 32), at about pytorch-grad-cam's speed. Cost: B x K forwards of the whole model (the
layers before the ablated one run again for every pair, as in pytorch-grad-cam, which skips the ablated
layer itself), plus the capture's and one for S.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from vizkit.core.errors import ConfigError
from vizkit.core.hooks import forward_hook, probing
from vizkit.core.layouts import channels_first
from vizkit.core.models import find_layer
from vizkit.methods.attribution.cam import CamInputs
from vizkit.methods.attribution.scorecam import ForwardCam, ForwardCamConfig, PairScores


@dataclass
class AblationCamConfig(ForwardCamConfig):
    """layer, layout, relu, batch_size (ablated channels per forward pass)."""


class AblationCam(ForwardCam):
    name = "ablationcam"
    description = "Ablation-CAM: a layer's channels weighted by the target's relative score drop when each is zeroed (Desai & Ramaswamy 2020)"
    Config = AblationCamConfig

    @contextmanager
    def pair_scores(self, inputs: CamInputs) -> Iterator[PairScores]:
        activation, x, model = inputs.activation, inputs.x, inputs.model
        chunk: dict[str, torch.Tensor] = {}

        def ablate(_module, _inputs, output: torch.Tensor) -> torch.Tensor | None:
            if probing():  # a target's check that its own layer runs once: leave that forward alone
                return None
            rows, channels = chunk["rows"], chunk["channels"]
            ablated = output.clone()  # the prefix tokens of a token layer stay the forward's own
            view = channels_first(ablated, model, inputs.layer, x.shape[-2:], inputs.layout)
            if view.shape != (len(rows), *activation.shape[1:]) or view.untyped_storage().data_ptr() != ablated.untyped_storage().data_ptr():
                raise ConfigError(f"{self.name}: layer '{inputs.layer}' gave {tuple(output.shape)} for {len(rows)} inputs; cannot ablate its channels")
            view.copy_(activation[rows])  # the clean activation: the same for any batch_size
            view[torch.arange(len(rows), device=view.device), channels] = 0
            return ablated

        def score(rows: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:  # S_k
            chunk.update(rows=rows, channels=channels)
            return inputs.target.take(rows).score(model, x[rows])

        with forward_hook(find_layer(model, inputs.layer), ablate):  # removed however the chunks end
            yield score

    def weigh(self, inputs: CamInputs, scores: torch.Tensor) -> torch.Tensor:
        clean = inputs.target.score(inputs.model, inputs.x).float()[:, None]  # S, from a forward of the unchanged model
        off = clean == 0  # S = 0: the relative drop is undefined, the weights 0
        return torch.where(off, 0.0, (clean - scores) / torch.where(off, 1.0, clean))  # w_k
