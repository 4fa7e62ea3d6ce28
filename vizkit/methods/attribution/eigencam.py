"""Eigen-CAM (Muhammad & Yeasin 2020, "Eigen-CAM: Class Activation Map using Principal Components",
IJCNN).

The layer's first principal component, with no gradient and no target: the direction in channel
space along which the activation varies most over the image's positions. With A the layer's
activation (``[B,K,h,w]``, channels first) read as a matrix of h*w positions by K channels:

    M = A - (mean over positions of A)             (each channel centred)
    M = U S V^T                                    (SVD; v = V's first column, |v| = 1)
    L = ReLU( M v ), with v's sign such that sum_k v_k >= 0

reshaped to (h, w), then upsampled bilinearly to the input's size, as every CAM here. The map is in
the activation's units (a projection onto a unit vector), not the score's.

Eigen-CAM is class-agnostic: the map does not depend on the target. It takes the targets the other
CAMs take (class, channel, neuron), which are resolved and checked as theirs (the layer must run
before the target, once) and change nothing; the capture is one forward under no_grad.

The sign. A singular vector is defined up to sign (M v and -M v are both a first principal
component's scores), and after the ReLU the two signs give different maps, one showing what the
other hides. pytorch-grad-cam's ``EigenCAM`` (``utils.svd_on_activations.get_2d_projection``)
takes the sign LAPACK returns (numpy's ``np.linalg.svd``, VT's first row, no correction), which is
not a convention: another LAPACK, or torch's SVD on another device, may return the other. We fix
one: v points where the channels grow together (sum_k v_k >= 0; equivalently, over the positions, the map
correlates positively with the centred channels' sum sum_k M_k), so for a ReLU's activation the map is
high where the layer is active. pytorch-grad-cam's ``SegEigenCAM`` corrects by another rule (flip
when |min| > |max|, Seg-Eigen-CAM's eq. 13). So our map is pytorch-grad-cam's ``EigenCAM`` (1.5.7)
up to its per-image min-max scaling (``vizkit.methods.attribution.gradcam`` says why that scaling is
all that separates the maps) wherever LAPACK's sign agrees with ours, and otherwise its map for -v
(the tests compare both ways). Where the first two singular values are close the component itself
is ill-defined, in every implementation. pytorch-grad-cam also sets NaN activations to 0; here a NaN
stays a NaN.
"""
from __future__ import annotations

import torch

from vizkit.methods.attribution.cam import CamInputs, CamMethod


def first_component(activation: torch.Tensor) -> torch.Tensor:
    """The centred activation ``[B,K,h,w]`` projected on its first principal direction (signed as the
    module docstring says), ``[B,1,h,w]`` float32 on the activation's device. Computed in float64 on
    the CPU: the component's float32 error grows as sigma_1 / (sigma_1 - sigma_2) (measured 9e-6 of the
    map on a random-weight resnet18, sigma_2 / sigma_1 = 0.97), and one LAPACK serves every device."""
    batch, _, height, width = activation.shape
    centred = activation.detach().to("cpu", torch.float64).flatten(2).transpose(1, 2)  # [B, h*w, K]
    centred = centred - centred.mean(1, keepdim=True)
    direction = torch.linalg.svd(centred, full_matrices=False).Vh[:, 0]  # [B, K]
    direction = direction * torch.where(direction.sum(1, keepdim=True) < 0, -1.0, 1.0)
    projection = (centred @ direction.unsqueeze(2)).view(batch, 1, height, width)
    return projection.to(activation.device, torch.float32)


class EigenCam(CamMethod):
    name = "eigencam"
    description = "Eigen-CAM: a layer's first principal component over positions, class-agnostic, no gradient (Muhammad & Yeasin 2020)"
    needs_gradient = False

    def combine(self, inputs: CamInputs) -> torch.Tensor:
        return first_component(inputs.activation)
