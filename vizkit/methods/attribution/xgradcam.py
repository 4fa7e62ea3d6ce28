"""XGrad-CAM (Fu et al. 2020, "Axiom-based Grad-CAM: Towards Accurate Visualization and Explanation of
CNNs", BMVC).

Grad-CAM with the gradient averaged under the activation's own weighting instead of uniformly: the
weights that best satisfy the paper's sensitivity and conservation axioms. With A the layer's
activation (``[B,K,h,w]``, channels first) and g = dS/dA the gradient of the target's score S there:

    w_k = sum_ij g_k[i, j] * A_k[i, j] / (sum_ab A_k[a, b] + 1e-7)
    L   = ReLU( sum_k w_k * A_k )

then upsampled bilinearly to the input's size, as every CAM here. The paper normalizes by the
channel's L1 norm sum |A_k|; for a ReLU's activation (a ResNet stage, a VGG block) that is the sum
above. Like pytorch-grad-cam and torchcam we divide by the plain sum, so at a layer with signed
activations (a batch norm, a transformer's norm) a channel whose sum is near 0 gets a large weight.

This is pytorch-grad-cam's ``XGradCAM`` (1.5.7) operation for operation, its 1e-7 (an activation's
units: a channel of zeros gets weight 0) included, up to its per-image min-max scaling of the map
(``vizkit.methods.attribution.gradcam`` says why that scaling is all that separates the maps).
torchcam's ``XGradCAM`` is the same with 1e-8. The map keeps the score's units, as Grad-CAM's.
"""
from __future__ import annotations

import torch

from vizkit.methods.attribution.cam import CamInputs, CamMethod


class XGradCam(CamMethod):
    name = "xgradcam"
    description = "XGrad-CAM: a layer's activations weighted by their gradients averaged under the activation (Fu et al. 2020)"

    def weights(self, inputs: CamInputs) -> torch.Tensor:
        activation = inputs.activation
        total = activation.sum((2, 3), keepdim=True)
        return (inputs.gradient * activation / (total + 1e-7)).sum((2, 3), keepdim=True)  # w_k
