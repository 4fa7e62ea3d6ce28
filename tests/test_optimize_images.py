"""Image parameterizations and transformation robustness for the optimization family."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vizkit.core.errors import ConfigError
from vizkit.optimize.parameterization import FourierImage, PixelImage, make_image
from vizkit.optimize.transforms import STANDARD, Transforms

# ---------------------------------------------------------------------------------------------- pixels


def test_pixel_image_forward_is_its_parameter():
    init = torch.rand(2, 3, 16, 16)
    image = PixelImage(init)
    assert image() is image.pixels
    assert [name for name, _ in image.named_parameters()] == ["pixels"]
    assert torch.equal(image(), init)
    assert image.pixels.data_ptr() != init.data_ptr()  # a copy: optimizing it leaves the caller's tensor


def test_pixel_image_project_clamps_into_unit_range():
    image = PixelImage(torch.full((1, 3, 8, 8), 0.5))
    with torch.no_grad():
        image.pixels[:, 0] = 1.7
        image.pixels[:, 1] = -0.3
    image.project_()
    assert image.pixels.min() == 0.0 and image.pixels.max() == 1.0
    assert torch.all(image.pixels[:, 2] == 0.5)


def test_pixel_image_rejects_non_rgb_batches():
    with pytest.raises(ConfigError, match=r"\[B,3,H,W\]"):
        PixelImage(torch.rand(3, 8, 8))


# --------------------------------------------------------------------------------------------- fourier


def test_fourier_image_is_valid_pixels_of_the_asked_shape():
    image = FourierImage(2, 24, 31, generator=torch.Generator().manual_seed(0))
    pixels = image()
    assert pixels.shape == (2, 3, 24, 31) and pixels.dtype == torch.float32
    assert pixels.min() > 0 and pixels.max() < 1
    assert [name for name, _ in image.named_parameters()] == ["spectrum"]
    assert list(image.state_dict()) == ["spectrum"]


def test_fourier_image_is_deterministic_per_seed():
    first, again, other = (make_image("fourier", 1, 32, 32, seed=seed)() for seed in (3, 3, 4))
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_fourier_image_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    make_image("fourier", 2, 16, 20, seed=5)()
    FourierImage(1, 16, 16, generator=torch.Generator().manual_seed(5))()
    assert torch.equal(torch.random.get_rng_state(), state)


def test_fourier_image_gradient_reaches_the_spectrum():
    image = make_image("fourier", 1, 32, 32)
    image()[:, 0].mean().backward()
    assert image.spectrum.grad is not None and image.spectrum.grad.abs().sum() > 0


def lucent_fft_rgb(spectrum: np.ndarray, height: int, width: int, decay_power: float = 1.0) -> np.ndarray:
    """lucent's fft_image + to_valid_rgb(decorrelate=True), in numpy; `spectrum` shaped as lucent's
    parameter ([B,3,H,W//2+1 (+1 if W is odd),2])."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.fftfreq(width)[: width // 2 + (2 if width % 2 else 1)]
    freqs = np.sqrt(fx * fx + fy * fy)
    scale = 1.0 / np.maximum(freqs, 1.0 / max(width, height)) ** decay_power
    scaled = (spectrum[..., 0] + 1j * spectrum[..., 1]) * scale
    image = np.fft.irfftn(scaled, s=(height, width), axes=(-2, -1), norm="ortho")[:, :, :height, :width] / 4.0
    correlation = np.asarray([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
    normalized = correlation / np.max(np.linalg.norm(correlation, axis=0))
    rgb = (image.transpose(0, 2, 3, 1) @ normalized.T).transpose(0, 3, 1, 2)
    return 1.0 / (1.0 + np.exp(-rgb))


@pytest.mark.parametrize("height,width,decay_power", [(12, 16, 1.0), (11, 15, 1.0), (10, 9, 1.5)])
def test_fourier_image_matches_lucent(height, width, decay_power):
    image = FourierImage(2, height, width, decay_power=decay_power)
    rng = np.random.default_rng(0)
    spectrum = rng.normal(size=tuple(image.spectrum.shape))  # well away from 0.5 gray, unlike the init
    with torch.no_grad():
        image.spectrum.copy_(torch.from_numpy(spectrum))
    if width % 2:  # lucent keeps one more frequency column for odd widths; irfft with s=(H,W) drops it
        spectrum = np.concatenate([spectrum, rng.normal(size=spectrum[:, :, :, :1].shape)], axis=3)
    expected = lucent_fft_rgb(spectrum, height, width, decay_power)
    assert np.abs(expected - 0.5).max() > 0.1
    np.testing.assert_allclose(image().detach().numpy(), expected, atol=1e-5)


def test_fourier_scale_is_lucids_too():
    """lucid scales the spectrum by sqrt(H*W) but inverts without normalization: the same image as
    lucent's orthonormal inverse without the factor, which is what FourierImage computes."""
    height, width = 12, 16
    spectrum = np.random.default_rng(1).normal(size=(3, height, width // 2 + 1)) * (1 + 1j)
    freqs = np.sqrt(np.fft.rfftfreq(width)[None] ** 2 + np.fft.fftfreq(height)[:, None] ** 2)
    scale = 1.0 / np.maximum(freqs, 1.0 / max(height, width))
    lucid = np.fft.irfft2(spectrum * scale * np.sqrt(width * height), s=(height, width))
    lucent = np.fft.irfft2(spectrum * scale, s=(height, width), norm="ortho")
    np.testing.assert_allclose(lucid, lucent, atol=1e-12)


# ----------------------------------------------------------------------------------------- make_image


def test_make_image_pixels_defaults_to_gray_and_broadcasts_init():
    assert torch.all(make_image("pixels", 2, 8, 8)() == 0.5)
    single = torch.rand(3, 8, 10)
    image = make_image("pixels", 2, 8, 10, init=single)
    assert image().shape == (2, 3, 8, 10) and torch.equal(image()[1], single)
    with torch.no_grad():  # the expanded init was cloned: the batch items are separate pixels
        image.pixels[0] = 0
    assert torch.equal(image()[1], single)


@pytest.mark.parametrize(
    "kind,kwargs,message",
    [
        ("voxels", {}, r"unknown image parameterization 'voxels'; choose pixels, fourier"),
        ("pixels", {"init": torch.rand(1, 3, 9, 8)}, r"\[2,3,8,8\] or \[3,8,8\]"),
        ("pixels", {"init": torch.rand(1, 1, 8, 8)}, r"does not fit"),
        ("fourier", {"init": torch.rand(1, 3, 8, 8)}, r"init is only for the 'pixels'"),
    ],
)
def test_make_image_errors(kind, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        make_image(kind, 2, 8, 8, **kwargs)


# ---------------------------------------------------------------------------------------- transforms


def test_empty_transforms_are_the_identity():
    pixels = torch.rand(2, 3, 16, 16)
    assert Transforms([])(pixels) is pixels


def test_transforms_are_deterministic_per_seed_and_replay_after_reset():
    pixels = torch.rand(2, 3, 48, 48)
    first, again, other = Transforms(STANDARD, seed=1), Transforms(STANDARD, seed=1), Transforms(STANDARD, seed=2)
    draws = [first(pixels) for _ in range(4)]
    assert all(torch.equal(a, again(pixels)) for a in draws)
    assert any(a.shape != b.shape or not torch.equal(a, b) for a, b in zip(draws, (other(pixels) for _ in range(4))))
    first.reset()
    assert all(torch.equal(a, first(pixels)) for a in draws)


def test_transforms_leave_global_rng_alone():
    state = torch.random.get_rng_state()
    transforms = Transforms(STANDARD, seed=0)
    for _ in range(3):
        transforms(torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(torch.random.get_rng_state(), state)


def test_standard_is_lucents_standard_transforms():
    assert STANDARD[:2] == ["pad:12", "jitter:8"] and STANDARD[4] == "jitter:4"
    assert [float(v) for v in STANDARD[2].split(":")[1].split(",")] == [1 + (i - 5) / 50.0 for i in range(11)]
    assert [float(v) for v in STANDARD[3].split(":")[1].split(",")] == list(range(-10, 11)) + 5 * [0]


def test_pad_grows_by_twice_n_with_gray():
    pixels = torch.rand(1, 3, 16, 20)
    padded = Transforms(["pad:3"])(pixels)
    assert padded.shape == (1, 3, 22, 26)
    assert torch.equal(padded[..., 3:-3, 3:-3], pixels)
    assert torch.all(padded[..., :3, :] == 0.5) and torch.all(padded[..., :, -3:] == 0.5)


def test_jitter_crops_by_n_at_a_random_offset():
    pixels = torch.arange(20 * 24, dtype=torch.float32).reshape(1, 1, 20, 24).expand(2, 3, 20, 24)
    transforms = Transforms(["jitter:4"], seed=0)
    offsets = set()
    for _ in range(40):
        cropped = transforms(pixels)
        assert cropped.shape == (2, 3, 16, 20)
        assert torch.equal(cropped[0], cropped[1])  # one draw for the whole batch
        top_left = int(cropped[0, 0, 0, 0])
        offset = divmod(top_left, 24)
        assert torch.equal(cropped, pixels[..., offset[0] : offset[0] + 16, offset[1] : offset[1] + 20])
        offsets.add(offset)
    assert {0, 4} <= {y for y, _ in offsets} and {0, 4} <= {x for _, x in offsets}  # both ends reachable


def test_jitter_larger_than_the_image_is_a_config_error():
    with pytest.raises(ConfigError, match=r"jitter:8.*larger than 8 px; got 8x8"):
        Transforms(["jitter:8"])(torch.rand(1, 3, 8, 8))


@pytest.mark.parametrize("factor,size", [(0.5, (16, 20)), (1.5, (48, 60)), (1.0, (32, 40))])
def test_scale_resizes_by_the_factor(factor, size):
    pixels = torch.rand(2, 3, 32, 40)
    scaled = Transforms([f"scale:{factor}"])(pixels)
    assert scaled.shape == (2, 3, *size)
    assert torch.allclose(scaled.mean(), pixels.mean(), atol=0.05)


def test_scale_draws_from_its_list():
    transforms = Transforms(["scale:0.5,1,2"], seed=0)
    sizes = {transforms(torch.rand(1, 3, 8, 8)).shape[-1] for _ in range(30)}
    assert sizes == {4, 8, 16}


def test_rotate_by_zero_is_the_identity():
    pixels = torch.rand(2, 3, 17, 23)
    assert torch.allclose(Transforms(["rotate:0"])(pixels), pixels, atol=1e-5)


def test_rotate_positive_is_counter_clockwise_as_rot90():
    pixels = torch.rand(2, 3, 16, 16)
    rotated = Transforms(["rotate:90"])(pixels)
    assert torch.allclose(rotated, torch.rot90(pixels, 1, (-2, -1)), atol=1e-5)
    assert torch.allclose(Transforms(["rotate:-90"])(pixels), torch.rot90(pixels, -1, (-2, -1)), atol=1e-5)


def test_rotate_turns_pixels_not_the_normalized_square():
    """On a non-square image the centred square turns as a square (the aspect is accounted for)."""
    pixels = torch.rand(1, 3, 12, 20)
    rotated = Transforms(["rotate:90"])(pixels)
    square = slice(4, 16)
    assert torch.allclose(rotated[..., square], torch.rot90(pixels[..., square], 1, (-2, -1)), atol=1e-5)


def test_transforms_are_differentiable():
    pixels = torch.rand(2, 3, 40, 40, requires_grad=True)
    out = Transforms(["pad:4", "jitter:4", "scale:1.1", "rotate:7", "jitter:2"])(pixels)
    out.square().sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "specs,message",
    [
        (["pad:12", "blur:3"], r"unknown transform 'blur:3'; forms: pad:N, jitter:N, scale:F"),
        (["jiter:4"], r"unknown transform 'jiter:4'; closest: jitter; forms:"),
        (["pad"], r"transform 'pad' has no value"),
        (["pad:1.5"], r"'pad:1.5': pad takes one whole number of pixels, at least 1"),
        (["jitter:0"], r"'jitter:0': jitter takes one whole number"),
        (["scale:1,big"], r"'scale:1,big': scale takes a comma-separated list of numbers, as 'scale:0.95,1,1.05'"),
        (["scale:1,0"], r"'scale:1,0': scale values must be finite and positive"),
        (["rotate:-5,nan"], r"'rotate:-5,nan': rotate values must be finite"),
        ("pad:12", r"a list of strings, not one string"),
        ([12], r"transform 12 is not a string"),
    ],
)
def test_bad_specs_are_config_errors(specs, message):
    with pytest.raises(ConfigError, match=message):
        Transforms(specs)


# ------------------------------------------------------------------------------------ L-BFGS restart


def _stalled_lbfgs(optimizer_class):
    """An L-BFGS whose memory holds a curvature pair recorded across a projection's jump: (s, y) =
    (1e-6·e, 1e6·e) scales every direction by ~1e-12, so the loss changes by less than float32
    resolves and the strong Wolfe line search returns a step of 0 (how neural style stalled)."""
    centre = torch.rand(100, generator=torch.Generator().manual_seed(0))
    x = torch.nn.Parameter(torch.zeros(100))
    optimizer = optimizer_class([x], lr=1, max_iter=1, history_size=50, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = (x - centre).pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    state = optimizer.state[x]
    e = torch.full((100,), 0.1)
    state.update(old_dirs=[1e6 * e], old_stps=[1e-6 * e], ro=[1.0 / float((1e6 * e) @ (1e-6 * e))], H_diag=1e-12,
                 d=torch.zeros(100), t=0.0)
    with torch.no_grad():
        state["prev_flat_grad"] = 2 * (x - centre)
    losses = []
    for _ in range(3):
        optimizer.step(closure)
        losses.append(float(closure().detach()))
    return losses


def test_lbfgs_restarts_when_a_step_cannot_move():
    from vizkit.optimize.problem import ProjectedLBFGS, make_optimizer

    assert isinstance(make_optimizer("lbfgs", [torch.nn.Parameter(torch.zeros(2))], 1.0), ProjectedLBFGS)
    stuck = _stalled_lbfgs(torch.optim.LBFGS)
    assert stuck[0] == stuck[1] == stuck[2]  # torch's own stays put for good: the failure being guarded
    restarted = _stalled_lbfgs(ProjectedLBFGS)
    assert restarted[0] < stuck[0] and restarted[-1] < 1e-6 * stuck[0]
