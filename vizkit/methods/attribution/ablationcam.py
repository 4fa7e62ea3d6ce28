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
pairs (``ForwardCam`` in ``scorecam.py`` does the chunking). Every row of an input sees the same layers
before the ablated one, so they run once per input and chunk, on one copy: the hook expands the layer's
output to the chunk's rows, and only the layers after it run per row (on resnet18's ``layer4`` a
quarter of the network). A model that cannot take that (checked once per call: two unablated rows
must give the clean score; a shape fixed at the start of the forward, a target read before the layer)
runs whole forwards per row, as pytorch-grad-cam always does (it skips only the ablated layer). The
hook is removed when the chunks end, however they end, so the model is left as it was, also when a
forward raises. Memory: ``batch_size`` ablated layer outputs plus the layers after it for
``batch_size`` rows, whatever the channel count (never K ablated activations at once). Cost: B x K
forwards of the layers after the ablated one, B x ceil(K / batch_size) of those before it, plus the
capture's forward, one for S and the two-row check.
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
        # S, from a forward of the unchanged model, before any ablation
        self._clean = inputs.target.score(model, x).float()[:, None]

        def ablate(_module, _inputs, output: torch.Tensor) -> torch.Tensor | None:
            if probing():  # a target's check that its own layer runs once: leave that forward alone
                return None
            rows, channels = chunk["rows"], chunk["channels"]
            if chunk["shared"]:  # the layers before ran on one copy of the input: the ablated rows start here
                output = output.expand(len(rows), *output.shape[1:])
            ablated = output.clone()  # the prefix tokens of a token layer stay the forward's own
            view = channels_first(ablated, model, inputs.layer, x.shape[-2:], inputs.layout)
            if view.shape != (len(rows), *activation.shape[1:]) or view.untyped_storage().data_ptr() != ablated.untyped_storage().data_ptr():
                raise ConfigError(f"{self.name}: layer '{inputs.layer}' gave {tuple(output.shape)} for {len(rows)} inputs; cannot ablate its channels")
            view.copy_(activation[rows])  # the clean activation: the same for any batch_size
            ablating = channels >= 0  # -1: none (the check below)
            view[torch.arange(len(rows), device=view.device)[ablating], channels[ablating]] = 0
            return ablated

        def run(rows: torch.Tensor, channels: torch.Tensor, shared: bool) -> torch.Tensor:
            chunk.update(rows=rows, channels=channels, shared=shared)
            return inputs.target.take(rows).score(model, x[rows[:1]] if shared else x[rows])

        def score(rows: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:  # S_k
            if not chunk["shared_prefix"]:
                return run(rows, channels, False)
            starts = [0] + [i for i in range(1, len(rows)) if rows[i] != rows[i - 1]] + [len(rows)]
            return torch.cat([run(rows[a:b], channels[a:b], True) for a, b in zip(starts, starts[1:])])

        with forward_hook(find_layer(model, inputs.layer), ablate):  # removed however the chunks end
            chunk["shared_prefix"] = self._prefix_can_be_shared(run, x)
            yield score

    def _prefix_can_be_shared(self, run, x: torch.Tensor) -> bool:
        """Whether the layers before the ablated one can run once per input rather than once per row:
        two rows of the first input, nothing ablated, run that way must give its clean score twice (the
        model after the layer takes a batch other than the input's: a skip connection from before the
        layer broadcasts, as it holds the same values for every row). A model where that fails (a shape
        fixed at the start of its forward, a target read before the layer) gets full forwards per row."""
        rows = torch.zeros(2, dtype=torch.long, device=x.device)
        try:
            scores = run(rows, torch.full_like(rows, -1), True).float()
        except (RuntimeError, ConfigError):
            return False
        clean = self._clean[0].expand(2, *self._clean.shape[2:])  # a target set's scores are [rows, T]
        # equal up to float32 rounding in a batch of another size (a GEMM's blocking): far below any
        # structural difference, which would change the score at its first digit
        return scores.shape == clean.shape and bool(torch.allclose(scores, clean, rtol=1e-3, atol=1e-3 * float(clean.abs().max())))

    def weigh(self, inputs: CamInputs, scores: torch.Tensor) -> torch.Tensor:
        clean, self._clean = self._clean, None
        off = clean == 0  # S = 0: the relative drop is undefined, the weights 0
        return torch.where(off, 0.0, (clean - scores) / torch.where(off, 1.0, clean))  # w_k
