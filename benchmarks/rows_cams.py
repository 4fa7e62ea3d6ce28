"""Method rows of the CAM family beyond Grad-CAM, each against its floor and pytorch-grad-cam's class of
the same name on resnet18's layer4 (README.md says what each times).

The gradient CAMs (Grad-CAM++, XGrad-CAM, HiRes-CAM, Layer-CAM) need what Grad-CAM needs: one forward
and a backward that stops at the layer (``layer_gradient_floor``). Eigen-CAM needs one forward. Score-CAM
and Ablation-CAM need one forward and then one forward per channel of the layer (512 for layer4), batched:
their floor is those forwards, ``batch_size`` inputs at a time, on copies of the input (the masking and
the ablation hook are the methods' own work).
"""
from __future__ import annotations

import torch
from torch import nn

from floors import layer_gradient_floor, no_grad_forward
from harness import Row, time_alternating
from peers import pytorch_grad_cam

GRADIENT_CAMS = {"gradcam_plus_plus": "GradCAMPlusPlus", "xgradcam": "XGradCAM", "hirescam": "HiResCAM", "layercam": "LayerCAM"}
FORWARD_CAMS = {"eigencam": "EigenCAM", "scorecam": "ScoreCAM", "ablationcam": "AblationCAM"}
CAMS = (*GRADIENT_CAMS, *FORWARD_CAMS)
MANY_FORWARDS = ("scorecam", "ablationcam")  # one forward per channel: at batch 8 ~4,000 forwards a call (rows.Plan repeats them less)
CAM_BATCH_SIZE = 32  # forwards per batch for the many-forward CAMs, theirs and pytorch-grad-cam's alike


def channel_forwards_floor(model: nn.Module, x: torch.Tensor, channels: int, batch_size: int) -> None:
    """One forward of x, then ``channels`` forwards per input, ``batch_size`` inputs at a time (copies of
    the inputs: the floor does not mask or ablate anything), no graph."""
    no_grad_forward(model, x)
    with torch.no_grad():
        for image in x:
            for start in range(0, channels, batch_size):
                model(image.unsqueeze(0).expand(min(batch_size, channels - start), -1, -1, -1))


def cam_row(name: str, model: nn.Module, x: torch.Tensor, target: torch.Tensor, repeats: int, warmup: bool = True) -> Row:
    import vizkit

    many = name in MANY_FORWARDS
    settings = {"layer": "layer4", **({"batch_size": CAM_BATCH_SIZE} if many else {})}
    method = vizkit.create_method(name, **settings)
    channels = model.layer4[-1].conv2.out_channels if hasattr(model.layer4[-1], "conv2") else 512
    if name in GRADIENT_CAMS:
        floor, note = (lambda: layer_gradient_floor(model, model.layer4, x, target)), \
            "floor: one forward keeping layer4's output, autograd.grad of the target logits' sum w.r.t. it"
    elif many:
        floor, note = (lambda: channel_forwards_floor(model, x, channels, CAM_BATCH_SIZE)), \
            f"floor: one forward, then {channels} forwards per input ({CAM_BATCH_SIZE} at a time), no graph"
    else:
        floor, note = (lambda: no_grad_forward(model, x)), "floor: one forward, no graph"
    cam_class = GRADIENT_CAMS.get(name) or FORWARD_CAMS[name]
    with pytorch_grad_cam(model, target, cam_class=cam_class, **({"batch_size": CAM_BATCH_SIZE} if many else {})) as (run_peer, peer_name):
        times = time_alternating({
            "method": lambda: method.attribute(model, x, target),
            "floor": floor,
            "peer": lambda: run_peer(x),
        }, repeats, warmup=warmup)
    return Row.timed(name, x, times, peer_name, settings=settings,
                     note=note + "; pytorch-grad-cam runs on a copy (its hooks stay while it lives)"
                     + (" and also computes every weight gradient" if name in GRADIENT_CAMS else ""))
