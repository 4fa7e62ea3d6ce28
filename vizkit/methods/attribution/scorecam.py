"""Score-CAM (Wang et al. 2020, "Score-CAM: Score-Weighted Visual Explanations for Convolutional Neural
Networks", CVPR workshops).

A channel's weight is how strongly the target responds to the input seen through that channel's map,
with no gradient. With A the layer's activation (``[B,K,h,w]``, channels first), x the input
(``[B,3,H,W]``) and S the target's score (a class logit; a channel's or neuron's value):

    U_k   = upsample(A_k) to (H, W), bilinear, align_corners=True          (nn.UpsamplingBilinear2d)
    M_k   = (U_k - min U_k) / (max U_k - min U_k + 1e-8)                      (per channel, in [0, 1])
    s_k   = S(x * M_k)                                                        (one forward per channel)
    w_k   = softmax over k of s_k
    L     = ReLU( sum_k w_k * A_k )

then upsampled bilinearly (align_corners=False) to the input's size, as every CAM here. A constant
channel (a dead ReLU's zeros) gets M_k = 0, so x * M_k is the all-zero input (the mean image in the
model's normalization): its score still enters the softmax, as in pytorch-grad-cam; the authors' own
code skipped such channels instead.

This is pytorch-grad-cam's ``ScoreCAM`` (1.5.7) exactly, up to its per-image min-max scaling of the map
(``vizkit.methods.attribution.gradcam`` says why that scaling is all that separates the maps): the same
masks, the same score (``ClassifierOutputTarget``: the class logit, not a probability) and a softmax
over channels, not over classes. torchcam's ``ScoreCAM`` weighs with softmax_k(S(x * M_k) - S(x)), the
paper's "increase of confidence" against the clean input, which is the same weight (a softmax does not
change when one number is subtracted from all its inputs), but builds its masks differently: min-max at
the layer's resolution, then upsampled with align_corners=False. The authors' released code weighs each
channel by the class's softmax probability of the masked input (no softmax over channels), upsamples
with align_corners=False and skips constant channels.

Memory: ``ForwardCam`` (below, shared with Ablation-CAM) scores ``batch_size`` (input, channel) pairs a
forward, and each chunk upsamples only its own channels: the extra memory is ``batch_size`` masks and
masked inputs plus one forward of ``batch_size`` inputs, whatever the channel count. pytorch-grad-cam
builds all K upsampled masks and K masked inputs of an image first (on a ResNet's ``layer4`` at 224 px:
512 x 4 x 224 x 224 floats, 411 MB). Measured on resnet18's ``layer4``, one 224 px image, CPU: peak RSS
+89 MB here (batch_size 8) against +505 MB for pytorch-grad-cam (batch 8). The masked inputs go
channels-last, so the convolutions take their NHWC path: on resnet18's ``layer4`` at 224 px, batch 1,
25.7 s against pytorch-grad-cam's 27.6 s (benchmarks, batch_size 32 for both).
Cost: B x K forwards, plus the capture's one under no_grad.

Layouts: the masks come from the channels-first activation, so channels-last stages and a vision
transformer's patch tokens (their grid, prefix tokens dropped) work as they do for Grad-CAM.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from vizkit.core.errors import ConfigError
from vizkit.core.models import default_layer
from vizkit.core.target_sets import TargetSet
from vizkit.methods.attribution.cam import CamConfig, CamInputs, CamMethod

PairScores = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (rows, channels) [n] -> the target's scores [n] (a set's [n, T])


@dataclass
class ForwardCamConfig(CamConfig):
    """layer, layout, relu (``CamConfig``) and ``batch_size``, for CAMs that weigh channels by forwards."""

    batch_size: int = 8  # (input, channel) pairs per forward pass, the extra memory's bound (on CPU ~8; raise it on a GPU)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size <= 0:
            raise ConfigError(f"batch_size must be a positive integer, got {self.batch_size!r}")


class ForwardCam(CamMethod):
    """A CAM weighted by forwards of its own (Score-CAM, Ablation-CAM). The activation comes from one
    forward under no_grad; then the B*K (input, channel) pairs, image-major, are scored ``batch_size``
    at a time (a chunk may hold channels of two inputs), under no_grad, and ``weigh`` turns the
    ``[B,K]`` scores into the channels' weights. Subclasses implement ``pair_scores``: a context
    manager that yields the function scoring one chunk (and holds whatever the chunks need, such as
    a hook, until they are done), and ``weigh``."""

    Config = ForwardCamConfig
    needs_gradient = False

    def pair_scores(self, inputs: CamInputs) -> Iterator[PairScores]:
        raise NotImplementedError

    def weigh(self, inputs: CamInputs, scores: torch.Tensor) -> torch.Tensor:
        """The weights ``[B,K]`` from the pairs' scores ``[B,K]`` (float32)."""
        raise NotImplementedError

    def weights(self, inputs: CamInputs) -> torch.Tensor:
        return self._weighed(inputs)[:, :, None, None]

    def _weighed(self, inputs: CamInputs) -> torch.Tensor:
        """The channels' weights, ``[B,K]``; for a target set of T targets ``[B,K,T]``, from the same forwards."""
        batch, channels = inputs.activation.shape[:2]
        total, size, device = batch * channels, self.config.batch_size, inputs.x.device
        per_pair = (len(inputs.target),) if isinstance(inputs.target, TargetSet) else ()  # a set's forward scores every target
        scores = torch.empty(total, *per_pair, dtype=torch.float32, device=device)
        with torch.no_grad(), self.pair_scores(inputs) as score:
            for start in range(0, total, size):
                pairs = torch.arange(start, min(start + size, total), device=device)
                scores[start : start + len(pairs)] = score(pairs // channels, pairs % channels).float()
        with torch.no_grad():
            return self.weigh(inputs, scores.view(batch, channels, *per_pair))

    def compute_targets(self, model, x, targets, pixels):
        """A target set's maps from one set of forwards: each (input, channel) pair's forward gives every
        target's score, so T targets cost the forwards of one."""
        if type(self).capture is not CamMethod.capture or type(self).compute is not CamMethod.compute:
            return super().compute_targets(model, x, targets, pixels)
        layer = self.config.layer or default_layer(model)
        (inputs,) = self._set_captures(model, x, targets, layer, per_target=False)  # the set is the pairs' target
        weights = self._weighed(inputs)
        return torch.stack([self._upsampled((weights[..., t, None, None] * inputs.activation).sum(1, keepdim=True), x.shape[-2:])
                            for t in range(len(targets))], 1)


@dataclass
class ScoreCamConfig(ForwardCamConfig):
    """layer, layout, relu, batch_size (masked inputs per forward pass)."""


class ScoreCam(ForwardCam):
    name = "scorecam"
    description = "Score-CAM: a layer's channels weighted by the target's score of the input masked by each (Wang et al. 2020)"
    Config = ScoreCamConfig

    @contextmanager
    def pair_scores(self, inputs: CamInputs) -> Iterator[PairScores]:
        x = inputs.x

        def score(rows: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:  # s_k = S(x * M_k)
            masks = F.interpolate(inputs.activation[rows, channels].unsqueeze(1), size=x.shape[-2:], mode="bilinear", align_corners=True)
            low, high = masks.amin((2, 3), keepdim=True), masks.amax((2, 3), keepdim=True)
            masks = (masks - low) / (high - low + 1e-8)  # M_k, pytorch-grad-cam's epsilon
            # channels-last: the convolutions take their NHWC path, ~22 % faster on CPU (oneDNN; resnet18, 32
            # images at 224 px, 1 thread: 1.75 s against 2.31 s a forward), the same values up to rounding
            masked = (x[rows] * masks.to(x.dtype)).contiguous(memory_format=torch.channels_last)
            return inputs.target.take(rows).score(inputs.model, masked)

        yield score

    def weigh(self, inputs: CamInputs, scores: torch.Tensor) -> torch.Tensor:
        return scores.softmax(1)  # w_k
