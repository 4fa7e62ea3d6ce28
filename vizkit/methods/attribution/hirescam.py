"""HiResCAM (Draelos & Carin 2020, "Use HiResCAM instead of Grad-CAM for faithful explanations of
convolutional neural networks").

Grad-CAM without the pooling: each activation is weighed by its own gradient. With A the layer's
activation (``[B,K,h,w]``, channels first) and g = dS/dA the gradient of the target's score S there:

    L = ReLU( sum_k g_k * A_k )        (elementwise, per position)

then upsampled bilinearly to the input's size, as every CAM here. Where the score is a linear function
of A (a global-average-pooled last stage followed by a linear head), g_k is constant over positions
and HiResCAM equals Grad-CAM; elsewhere they differ, and only HiResCAM's map (before the ReLU) sums to
sum_ijk g * A, the first-order term of S in A: the paper's faithfulness argument.

A layer whose only consumer is a per-position normalization (a LayerNorm over channels: the output of a
ConvNeXt or MambaOut stage, which the next stage's downsampling normalizes first) gets a map of ~0: the
score does not change when one position's activation is scaled, so sum_k g_k A_k = 0 there (Euler's
theorem; up to the norm's eps). Measured on timm's test_convnext ``stages.1``: |map| <= 1e-5, where
XGrad-CAM's reaches 0.1 (the other CAMs' weights do not vanish there).

This is pytorch-grad-cam's ``HiResCAM`` (1.5.7), up to its per-image min-max scaling of the map
(``vizkit.methods.attribution.gradcam`` says why that scaling is all that separates the maps); its
``eigen_smooth`` option, which the paper's guarantee does not cover, is not offered. The map keeps the
score's units, as Grad-CAM's.
"""
from __future__ import annotations

import torch

from vizkit.methods.attribution.cam import CamInputs, CamMethod


class HiResCam(CamMethod):
    name = "hirescam"
    description = "HiResCAM: a layer's activations times their own gradients, summed over channels (Draelos & Carin 2020)"

    def weights(self, inputs: CamInputs) -> torch.Tensor:
        return inputs.gradient  # per position: [B,K,h,w]
