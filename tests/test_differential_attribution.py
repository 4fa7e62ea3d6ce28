"""vizkit's Grad-CAM family, integrated gradients, input x gradient and SmoothGrad against captum 0.9 and
pytorch-grad-cam 1.5.7, on random-weight timm ResNets (eval mode, 64 px).

Semantics aligned as documented in each vizkit method:

* ``gradcam`` = captum ``LayerGradCam(relu_attributions=True)`` + ``LayerAttribution.interpolate(...,
  "bilinear")``; = pytorch-grad-cam's ``GradCAM`` after a per-image min-max scaling of vizkit's map.
* ``guided_gradcam`` (``reduce="none"``) = captum ``GuidedGradCam(interpolate_mode="bilinear")`` on a
  copy with non-in-place ReLUs (captum's guided backprop hooks ``nn.ReLU`` modules).
* ``integrated_gradients`` (``reduce="none"``) = captum ``IntegratedGradients`` with the same rule and
  steps, the pixel-space baseline converted with the model's normalization; its completeness error =
  captum's |convergence delta| / |S(x) - S(x')|. Exception: ``riemann_trapezoid`` (see its test).
* ``input_x_gradient`` (``reduce="none"``) = captum ``InputXGradient``.
* ``smoothgrad`` (``reduce="none"``) = captum ``NoiseTunnel(nt_type="smoothgrad", abs=False)`` on each
  input alone, with the global RNG seeded like vizkit's generator and captum's nt_samples_batch_size =
  vizkit's batch_size // B: the noise itself coincides, so the maps are equal (at sizes where C*H*W is a
  multiple of 16; vizkit draws one [1,C,H,W] per sample, which captum matches with nt_samples_batch_size=1
  at any size).

Measured on CPU (torch 2.14, timm 1.0.31): every comparison under ``assert_maps_close`` agrees to
<= 6e-7 of the map scale (most bit-exactly), so the default 1e-5 tolerance has a wide margin.
"""
from __future__ import annotations

import copy
import functools

import pytest
import torch

import vizkit
from tiny_models import assert_maps_close, captum_copy, normalized_batch, single_thread, timm_model
from vizkit.probes.baselines import pixel_baseline
from vizkit.core.models import find_layer
from vizkit.core.pixels import PixelSpace

captum_attr = pytest.importorskip("captum.attr")

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*did not already require gradients.*:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*backward hooks on ReLU.*:UserWarning"),
]

MODELS = ("resnet18", "test_resnet")
TARGETS = [3, 7]
STAGES = ("layer3", "layer4")  # 4x4 and 2x2 feature maps at 64 px
IN_BLOCK = "layer1.0.bn2"  # followed by timm's in-place `x += shortcut; act2(x)` (an inplace ReLU)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread():
        yield


@functools.lru_cache(maxsize=None)
def cached_model(name: str) -> torch.nn.Module:
    return timm_model(name)


@pytest.fixture(scope="module", params=MODELS)
def model(request):
    return cached_model(request.param)


@pytest.fixture(scope="module")
def x(model):
    return normalized_batch(model, 2, 64, seed=5)


@pytest.fixture(scope="module")
def resnet18():
    return cached_model("resnet18")


def min_max(maps: torch.Tensor) -> torch.Tensor:
    """Each map scaled to [0, 1] (the map must not be constant)."""
    flat = maps.flatten(1)
    low, high = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    assert (high - low).min() > 0, "a constant map: min-max scaling is undefined"
    return ((flat - low) / (high - low)).view_as(maps)


def pytorch_grad_cam(model, layer: str, x: torch.Tensor, targets, reshape_transform=None):
    """pytorch-grad-cam's ``GradCAM`` as [B,1,H,W], the activation it stored, and the model copy it ran on.

    It runs on a deep copy (same in-place ReLUs): it calls ``backward()``, filling parameter ``.grad``,
    and hooks the layer. Its hooks are released explicitly (its ``__exit__`` swallows IndexError)."""
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    clone = copy.deepcopy(model)
    cam = pgc.GradCAM(clone, target_layers=[find_layer(clone, layer)], reshape_transform=reshape_transform)
    try:
        maps = cam(x.clone(), targets=[ClassifierOutputTarget(c) for c in targets])
        (stored,) = cam.activations_and_grads.activations
        stored = stored.clone()
    finally:
        cam.activations_and_grads.release()
    return torch.from_numpy(maps).unsqueeze(1), stored, clone


# ---------------------------------------------------------------- Grad-CAM vs captum


def captum_gradcam(model, layer: str, x, relu: bool = True) -> torch.Tensor:
    cam = captum_attr.LayerGradCam(model, find_layer(model, layer)).attribute(x.clone(), TARGETS, relu_attributions=relu)
    return captum_attr.LayerAttribution.interpolate(cam.detach(), tuple(x.shape[-2:]), "bilinear")


@pytest.mark.parametrize("layer", STAGES)
def test_gradcam_equals_captum_layer_gradcam(model, x, layer):
    got = vizkit.create_method("gradcam", layer=layer).attribute(model, x, TARGETS)
    assert_maps_close(got, captum_gradcam(model, layer, x))


def test_gradcam_default_layer_is_the_last_stage(model, x):
    got = vizkit.create_method("gradcam").attribute(model, x, TARGETS)
    assert_maps_close(got, captum_gradcam(model, "layer4", x))


def test_gradcam_without_relu_equals_captum_raw(model, x):
    expected = captum_gradcam(model, "layer3", x, relu=False)
    assert expected.min() < 0, "no negative evidence: relu=False would not be exercised"
    got = vizkit.create_method("gradcam", layer="layer3", relu=False).attribute(model, x, TARGETS)
    assert_maps_close(got, expected)


def test_gradcam_reads_the_true_output_of_an_in_block_layer(model, x):
    """At ``bn2`` (overwritten in place by ``x += shortcut`` and the in-place ReLU) vizkit equals captum's
    LayerGradCam on a copy with non-in-place ReLUs, which stores a clone of the layer output."""
    got = vizkit.create_method("gradcam", layer=IN_BLOCK).attribute(model, x, TARGETS)
    assert_maps_close(got, captum_gradcam(captum_copy(model), IN_BLOCK, x))


# ---------------------------------------------------------------- Grad-CAM vs pytorch-grad-cam


@pytest.mark.parametrize("layer", STAGES)
def test_gradcam_equals_pytorch_grad_cam_after_min_max(model, x, layer):
    """pytorch-grad-cam returns minmax(resize(minmax(relu(cam)))): it min-max scales the low-res cam,
    resizes with cv2 (bilinear, half-pixel centres = torch's align_corners=False), then min-max scales
    again (``aggregate_multi_layers``). A bilinear resize is linear with weights summing to 1, so it
    commutes with the positive affine min-max map, and the second min-max undoes the first: the result
    is minmax(vizkit's map) exactly, up to its 1e-7 epsilon. The order of the operations costs nothing;
    measured <= 5e-7 on these [0, 1] maps, so the default 1e-5 holds."""
    expected, _, _ = pytorch_grad_cam(model, layer, x, TARGETS)
    got = vizkit.create_method("gradcam", layer=layer).attribute(model, x, TARGETS)
    assert_maps_close(min_max(got), expected)


def test_pytorch_grad_cam_releases_its_hooks(resnet18):
    """Guard for the helper above: nothing of pytorch-grad-cam stays on the model it ran on."""
    _, _, clone = pytorch_grad_cam(resnet18, "layer4", normalized_batch(resnet18, 1, 64, seed=5), [3])
    assert not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in clone.modules())


def test_pytorch_grad_cam_reads_post_relu_values_at_an_in_block_layer(resnet18):
    """The in-place pitfall (PITFALLS.md, Peers), as a measurement: at ``layer1.0.bn2`` pytorch-grad-cam
    stores the hooked output without copying it, so it holds the block's output (bn2 + shortcut, after
    the in-place ReLU), not bn2's; its map then differs from the true one — vizkit's, which equals
    captum's on a non-in-place copy (test above). Measured: max |difference| 0.65 on [0, 1] maps."""
    x = normalized_batch(resnet18, 2, 64, seed=5)
    got = vizkit.create_method("gradcam", layer=IN_BLOCK).attribute(resnet18, x, TARGETS)
    assert_maps_close(got, captum_gradcam(captum_copy(resnet18), IN_BLOCK, x))

    peer, stored, _ = pytorch_grad_cam(resnet18, IN_BLOCK, x, TARGETS)
    with torch.no_grad():
        block_output = resnet18.layer1[0](resnet18.maxpool(resnet18.act1(resnet18.bn1(resnet18.conv1(x)))))
    torch.testing.assert_close(stored, block_output)  # what it read: post-ReLU, never negative
    assert stored.min() >= 0
    assert (peer - min_max(got)).abs().max() > 0.1


# ---------------------------------------------------------------- guided Grad-CAM


def captum_guided_gradcam(model, layer: str, x) -> torch.Tensor:
    clone = captum_copy(model)
    return captum_attr.GuidedGradCam(clone, find_layer(clone, layer)).attribute(
        x.clone(), TARGETS, interpolate_mode="bilinear"
    ).detach()


@pytest.mark.parametrize("layer", STAGES)
def test_guided_gradcam_equals_captum_bilinear(model, x, layer):
    """captum upsamples nearest by default; vizkit (like the paper) bilinear, so captum is asked for it."""
    got = vizkit.create_method("guided_gradcam", layer=layer, reduce="none").attribute(model, x, TARGETS)
    assert_maps_close(got, captum_guided_gradcam(model, layer, x))


def test_guided_gradcam_default_is_captum_abs_max(model, x):
    got = vizkit.create_method("guided_gradcam").attribute(model, x, TARGETS)
    assert_maps_close(got, captum_guided_gradcam(model, "layer4", x).abs().amax(1, keepdim=True))


# ---------------------------------------------------------------- integrated gradients

STEPS = 8
IG_BATCH = 6  # interpolated images per pass, both libraries (captum: 3 steps of the 2 inputs)


def captum_ig(model, x, baseline: str = "black", rule: str = "gausslegendre", delta: bool = False):
    """captum's IG from vizkit's baseline: chosen in pixel space, converted with the model's normalization."""
    pixels = PixelSpace.for_model(model)
    baselines = pixels.from_pixels(pixel_baseline(baseline, pixels.to_pixels(x)))
    result = captum_attr.IntegratedGradients(model).attribute(
        x.clone(), baselines=baselines, target=TARGETS, n_steps=STEPS, method=rule,
        internal_batch_size=IG_BATCH, return_convergence_delta=delta,
    )
    return (*result, baselines) if delta else result


def vizkit_ig(**fields):
    fields = {"steps": STEPS, "batch_size": IG_BATCH, "reduce": "none", **fields}
    return vizkit.create_method("integrated_gradients", **fields)


@pytest.mark.parametrize("baseline", ["black", "gray", "blur"])
def test_integrated_gradients_equals_captum(model, x, baseline):
    got = vizkit_ig(baseline=baseline).attribute(model, x, TARGETS)
    assert_maps_close(got, captum_ig(model, x, baseline))


@pytest.mark.parametrize("rule", ["riemann_left", "riemann_right", "riemann_middle"])
def test_integrated_gradients_riemann_rules_equal_captum(resnet18, rule):
    x = normalized_batch(resnet18, 2, 64, seed=5)
    got = vizkit_ig(rule=rule, baseline="gray").attribute(resnet18, x, TARGETS)
    assert_maps_close(got, captum_ig(resnet18, x, "gray", rule))


@pytest.mark.parametrize("baseline", ["black", "blur"])
def test_integrated_gradients_trapezoid_is_captums_times_n_over_n_minus_1(resnet18, baseline):
    """A documented discrepancy with captum, not float noise. Both evaluate the n points linspace(0, 1, n),
    but captum's ``riemann_trapezoid`` weighs them 1/n (ends 1/(2n)): its weights sum to (n-1)/n, not 1.
    vizkit uses the textbook trapezoid rule on that grid, spacing 1/(n-1) (weights sum to 1, so a
    constant gradient integrates exactly). Every weight differs by the same factor, so vizkit's map is
    exactly n/(n-1) times captum's (8/7 here; measured max |vizkit - captum| = 1/7 of captum's scale).
    vizkit's docstring ("with the same rule and steps this equals captum's") does not hold for this rule."""
    x = normalized_batch(resnet18, 2, 64, seed=5)
    expected = captum_ig(resnet18, x, baseline, "riemann_trapezoid")
    got = vizkit_ig(rule="riemann_trapezoid", baseline=baseline).attribute(resnet18, x, TARGETS)
    assert (got - expected).abs().max() > 0.1 * expected.abs().max()  # not equal ...
    assert_maps_close(got, expected * STEPS / (STEPS - 1))  # ... but rescaled exactly


def test_integrated_gradients_default_is_captum_channel_sum(model, x):
    got = vizkit_ig(reduce="sum").attribute(model, x, TARGETS)
    assert_maps_close(got, captum_ig(model, x, "gray").sum(1, keepdim=True))


@pytest.mark.parametrize("baseline", ["black", "gray"])
def test_completeness_error_is_captum_delta_over_score_gap(model, x, baseline):
    """vizkit reports |sum IG - (S(x) - S(x'))| / |S(x) - S(x')|; captum's delta is the signed numerator.

    The ratio is ill-conditioned in float32: its numerator is the difference of a sum of C*H*W*steps
    gradient terms (sum |IG_i| ~ 3e3 on resnet18) and a score gap that can be < 1, so rounding that
    depends on the CPU moved it by 1.4e-4 relative on one machine. So both run in float64 (vizkit
    accumulates in the input's precision when that is wider than float32; it then equals a hand-written
    float64 loop bit for bit). The tolerance is derived, not measured:
    * captum casts its quadrature weights to float32 (``torch.tensor(step_sizes).float()``), each off by
      at most 2^-24 relative, so its sum of IG may be off by 2^-24 * sum_i |IG_i| (4x: the per-step
      terms of one IG_i may cancel);
    * float64 rounding of either sum: sqrt(n) * u64 * sum_i |IG_i| for n = C*H*W terms (64x).
    Divided by |gap|, that bounds the ratio's difference (measured 300-3000x inside it)."""
    model, x = copy.deepcopy(model).double(), x.double()
    attribution, delta, baselines = captum_ig(model, x, baseline, delta=True)
    with torch.no_grad():
        rows = torch.arange(len(TARGETS))
        gap = model(x)[rows, TARGETS] - model(baselines)[rows, TARGETS]
    assert gap.abs().min() > 1e-3, "a vanishing score gap: the relative error would be ill-conditioned"
    details = vizkit_ig(baseline=baseline).explain(model, x, TARGETS).details
    assert details["completeness_error"].dtype == torch.float64
    magnitude = attribution.abs().flatten(1).sum(1)
    float32_weights = 4 * 2.0**-24 * magnitude
    float64_sums = 64 * attribution[0].numel() ** 0.5 * torch.finfo(torch.float64).eps * magnitude
    error = (details["completeness_error"] - delta.abs() / gap.abs()).abs()
    assert torch.all(error <= (float32_weights + float64_sums) / gap.abs()), error


# ---------------------------------------------------------------- input x gradient


def test_input_x_gradient_equals_captum(model, x):
    expected = captum_attr.InputXGradient(model).attribute(x.clone(), target=TARGETS).detach()
    got = vizkit.create_method("input_x_gradient", reduce="none").attribute(model, x, TARGETS)
    assert_maps_close(got, expected)


def test_input_x_gradient_default_is_captum_channel_sum(model, x):
    expected = captum_attr.InputXGradient(model).attribute(x.clone(), target=TARGETS).detach().sum(1, keepdim=True)
    got = vizkit.create_method("input_x_gradient").attribute(model, x, TARGETS)
    assert_maps_close(got, expected)


# ---------------------------------------------------------------- SmoothGrad

NOISE, SEED = 0.15, 11


def captum_smoothgrad(base, x, target: int, samples: int, chunk: int, **kwargs) -> torch.Tensor:
    """captum's NoiseTunnel on ONE input (it takes one stdev per input tensor; vizkit's sigma is
    noise * (x.max - x.min) per input), with the global RNG seeded as vizkit seeds its generator.

    captum draws ``torch.normal(0, stdev)`` (the same stream as ``randn * stdev``) once per chunk of
    ``nt_samples_batch_size`` samples; vizkit draws ``randn`` once per chunk of ``batch_size // B``
    samples, the same draw for each of its B inputs. With equal chunks the noise is identical."""
    assert len(x) == 1
    torch.manual_seed(SEED)
    return captum_attr.NoiseTunnel(base).attribute(
        x.clone(), nt_type="smoothgrad", nt_samples=samples, nt_samples_batch_size=chunk,
        stdevs=float(NOISE * (x.max() - x.min())), target=target, **kwargs,
    )


def vizkit_smoothgrad(**fields):
    return vizkit.create_method("smoothgrad", **{"noise": NOISE, "seed": SEED, **fields})


@pytest.mark.parametrize(("samples", "batch_size"), [(5, 2), (4, 4), (3, 8)], ids=["remainder", "one-chunk", "batch>samples"])
def test_smoothgrad_equals_captum_noise_tunnel(model, samples, batch_size):
    """Batch 1; chunks of 2+2+1, 4, and 3 samples (captum: min(samples, nt_samples_batch_size))."""
    x = normalized_batch(model, 1, 64, seed=5)
    expected = captum_smoothgrad(captum_attr.Saliency(model), x, TARGETS[0], samples, batch_size, abs=False)
    got = vizkit_smoothgrad(samples=samples, batch_size=batch_size, reduce="none").attribute(model, x, TARGETS[:1])
    assert_maps_close(got, expected)


def test_smoothgrad_default_is_captum_abs_max(resnet18):
    x = normalized_batch(resnet18, 1, 64, seed=5)
    expected = captum_smoothgrad(captum_attr.Saliency(resnet18), x, TARGETS[0], 4, 2, abs=False)
    got = vizkit_smoothgrad(samples=4, batch_size=2).attribute(resnet18, x, TARGETS[:1])
    assert_maps_close(got, expected.abs().amax(1, keepdim=True))


def test_smoothgrad_input_x_gradient_equals_captum_noise_tunnel(model):
    x = normalized_batch(model, 1, 64, seed=5)
    expected = captum_smoothgrad(captum_attr.InputXGradient(model), x, TARGETS[0], 5, 2)
    got = vizkit_smoothgrad(base="input_x_gradient", samples=5, batch_size=2, reduce="none").attribute(model, x, TARGETS[:1])
    assert_maps_close(got, expected)


def test_smoothgrad_each_input_of_a_batch_equals_captum_on_it_alone(resnet18):
    """Batch 2 (different value ranges, so different sigmas): vizkit adds the same draw to every input,
    so each input's map is captum's on that input alone. batch_size 4 = 2 samples per pass = captum's
    nt_samples_batch_size=2. (captum on the batch would draw independent noise per input instead.)"""
    x = normalized_batch(resnet18, 2, 64, seed=5) * torch.tensor([1.0, 0.7]).view(2, 1, 1, 1)
    got = vizkit_smoothgrad(samples=5, batch_size=4, reduce="none").attribute(resnet18, x, TARGETS)
    for i, target in enumerate(TARGETS):
        expected = captum_smoothgrad(captum_attr.Saliency(resnet18), x[i : i + 1], target, 5, 2, abs=False)
        assert_maps_close(got[i : i + 1], expected)


@pytest.mark.parametrize(
    "size",
    [
        64,
        31,  # 3*31*31 is not a multiple of 16: torch's CPU normal_ draws blocks of 16; vizkit draws per sample
    ],
)
def test_smoothgrad_noise_does_not_depend_on_batch_size(size):
    """vizkit's docstring: one [C,H,W] draw per sample in order, whatever batch_size; for one input, the
    noise captum's NoiseTunnel(nt_samples_batch_size=1) draws. Checked with batch_size 4."""
    model = cached_model("test_resnet")
    x = normalized_batch(model, 1, size, seed=5)
    expected = captum_smoothgrad(captum_attr.Saliency(model), x, TARGETS[0], 4, 1, abs=False)
    got = vizkit_smoothgrad(samples=4, batch_size=4, reduce="none").attribute(model, x, TARGETS[:1])
    assert_maps_close(got, expected)


def test_smoothgrad_noise_matters(resnet18):
    """Guard for the comparisons above: another seed gives another map (the noise is not negligible)."""
    x = normalized_batch(resnet18, 1, 64, seed=5)
    maps = [vizkit_smoothgrad(samples=3, batch_size=4, seed=s, reduce="none").attribute(resnet18, x, TARGETS[:1]) for s in (SEED, SEED + 1)]
    assert (maps[0] - maps[1]).abs().max() > 0.05 * maps[0].abs().max()


# ---------------------------------------------------------------- Grad-CAM on a vision transformer


def vit_reshape_transform(tensor, height: int = 14, width: int = 14):
    """pytorch-grad-cam's documented ViT recipe (its tutorial's ``reshape_transform``): drop the class
    token, tokens to the 14x14 grid, channels first."""
    result = tensor[:, 1:, :].reshape(tensor.size(0), height, width, tensor.size(2))
    return result.transpose(2, 3).transpose(1, 2)


@pytest.mark.parametrize("layer", ["", "blocks.6.norm1"])
def test_gradcam_on_a_vit_equals_pytorch_grad_cam_with_its_reshape_transform(layer):
    """vit_tiny_patch16_224, random weights: vizkit drops the prefix token and reshapes to the grid
    itself (sizes from the model); the default layer is the last block's norm1, pytorch-grad-cam's
    documented ViT layer. Compared after min-max, as for CNNs above (the same argument holds)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10).eval()  # no BatchNorm to redraw
    x = normalized_batch(model, 2, 224, seed=4)
    with single_thread():
        expected, _, _ = pytorch_grad_cam(model, layer or "blocks.11.norm1", x, TARGETS, reshape_transform=vit_reshape_transform)
        got = vizkit.create_method("gradcam", layer=layer).attribute(model, x, TARGETS)
    assert_maps_close(min_max(got), expected)
