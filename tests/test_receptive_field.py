"""Receptive fields: the traced analytic box against a gradient probe, on several timm architectures.

The probe is the reference: the input pixels with a nonzero gradient of one output position. ReLU dead
zones and max-pool argmaxes would hide pixels from it, so it runs on a linearized copy: activations are
identities and max pools are average pools with the same window (neither changes which pixels a position
can see), and squeeze-excitation gates are removed (they make every position see the whole image, which
``global_context`` reports instead). Its box is clipped to the image, as is ``ReceptiveField.clipped``.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import vizkit
from conftest import model_state
from tiny_models import single_thread, timm_model, tiny_relu_net
from vizkit.core.errors import ConfigError
from vizkit.core.hooks import layer_output
from vizkit.core.models import find_layer
from vizkit.probes.receptive_field import ReceptiveField, crop, receptive_field

ACTIVATIONS = {"ReLU", "ReLU6", "SiLU", "Swish", "GELU", "GELUTanh", "Hardswish", "HardSwish", "LeakyReLU"}


def linearized(model: nn.Module, keep_squeeze_excite: bool = False) -> nn.Module:
    probe = copy.deepcopy(model)
    for parent in list(probe.modules()):
        for name, child in list(parent.named_children()):
            kind = type(child).__name__
            if kind in ACTIVATIONS or (kind == "SqueezeExcite" and not keep_squeeze_excite):
                setattr(parent, name, nn.Identity())
            elif isinstance(child, nn.MaxPool2d):
                assert child.dilation in (1, (1, 1))
                setattr(parent, name, nn.AvgPool2d(child.kernel_size, child.stride, child.padding, child.ceil_mode))
    for parameter in probe.parameters():
        parameter.requires_grad_(False)
    return probe.eval()


def probe_boxes(probe: nn.Module, layer: str, size: tuple[int, int], positions: list[tuple[int, int]]) -> list[tuple]:
    """For each output position, the bounding box (top, left, bottom, right) of the input pixels with a
    nonzero gradient: one backward for all positions, one image each."""
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(len(positions), 3, *size, generator=generator).requires_grad_()
    output = layer_output(probe, image, find_layer(probe, layer), layer)
    score = sum(output[i, :, y, x].sum() for i, (y, x) in enumerate(positions))
    (gradient,) = torch.autograd.grad(score, image)
    boxes = []
    for seen in gradient.abs().sum(1) > 0:
        rows, cols = seen.any(1).nonzero().flatten(), seen.any(0).nonzero().flatten()
        boxes.append((int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1) if len(rows) else None)
    return boxes


def clipped_boxes(field: ReceptiveField, positions: list[tuple[int, int]]) -> list[tuple | None]:
    """Each position's clipped box (None where it sees only padding), checked to sum up to its box."""
    boxes = []
    for y, x in positions:
        inside, padding = field.clipped(y, x)
        top, left, bottom, right = field.box(y, x)
        assert min(padding) >= 0
        assert (top + padding[0], left + padding[1], bottom - padding[2], right - padding[3]) == inside
        boxes.append(inside if inside[2] > inside[0] and inside[3] > inside[1] else None)
    return boxes


def probe_positions(rows: int, cols: int) -> list[tuple[int, int]]:
    """Corners, centre and edge midpoints."""
    candidates = [(0, 0), (0, cols - 1), (rows - 1, 0), (rows - 1, cols - 1), (rows // 2, cols // 2),
                  (0, cols // 2), (rows // 2, cols - 1)]
    return list(dict.fromkeys(candidates))


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(name: str) -> nn.Module:
        if name not in cache:
            cache[name] = vizkit.load_model("embedded") if name == "embedded" else timm_model(name)
        return cache[name]

    return get


CASES = [  # (model, layer, input size): residual unions, stride-2 shortcuts, deep stems, odd sizes
    ("resnet18", "layer1", 96),
    ("resnet18", "layer2.0.conv1", 96),
    ("resnet18", "layer3", 96),
    ("resnet18", "layer4", 96),
    ("resnet18", "layer3", 75),  # strides leave the last rows out of some windows
    ("vgg11", "features.5", 64),
    ("vgg11", "features.14", 64),
    ("vgg11", "features.20", 64),
    ("efficientnet_b0", "blocks.1", 64),  # depthwise, stride 2
    ("efficientnet_b0", "blocks.2", 64),
    ("tf_efficientnet_b0", "blocks.2", 65),  # TF "same" padding: asymmetric, depends on the size
    ("embedded", "layer2", 64),  # test_resnet: deep stem, average-pool downsample shortcuts
    ("embedded", "layer4", 64),
    ("convnext_atto", "stages.0", 70),  # 4x4 patchify stem: rows 68, 69 are never seen
    ("convnext_atto", "stages.1", 64),  # 7x7 depthwise, LayerNorm2d, 2x2 stride-2 downsample
    ("resnetblur18", "layer2", 64),  # BlurPool anti-aliasing: reflect padding
]


@pytest.mark.parametrize("name, layer, size", CASES, ids=[f"{n}-{l}-{s}" for n, l, s in CASES])
def test_matches_gradient_probe(models, name, layer, size):
    model = models(name)
    with single_thread():
        field = receptive_field(model, layer, (size, size))
        positions = probe_positions(*field.grid_size)
        expected = probe_boxes(linearized(model), layer, (size, size), positions)
    assert [field.seen(y, x) for y, x in positions] == expected
    assert clipped_boxes(field, positions) == expected
    if field.size[0] <= size // 2:  # the centre's box lies inside the image: its full size is checked
        centre = positions[4]
        assert field.clipped(*centre)[1] == (0, 0, 0, 0)


def test_known_sizes(models):
    """Published and hand-derived values: ResNet-18's last stage sees 435 px (Araujo et al. 2019)."""
    resnet = models("resnet18")
    field = receptive_field(resnet, "layer4", (224, 224))
    assert (field.size, field.jump, field.start, field.grid_size) == ((435, 435), (32, 32), (-217, -217), (7, 7))
    assert receptive_field(resnet, "conv1", (32, 32)) .size == (7, 7)
    assert receptive_field(resnet, "maxpool", (32, 32)).size == (11, 11)
    vgg = receptive_field(models("vgg11"), "features.20", (64, 64))  # pool5
    assert (vgg.size, vgg.jump) == ((150, 150), (32, 32))


def test_functional_ops_and_in_place_residuals():
    """F.relu(conv2(h) + h, inplace=True), F.max_pool2d, .relu_(): conv1 3 px, + conv2 (union with the
    identity) 5 px, pool 6 px every 2, conv3 10 px, the same for every spelling of the ReLUs."""
    fields = {style: receptive_field(tiny_relu_net(style), "conv4", (16, 16)) for style in ("module", "module_inplace", "functional")}
    assert {(f.size, f.jump, f.start) for f in fields.values()} == {((10, 10), (2, 2), (-4, -4))}


class Residual(nn.Module):
    def __init__(self, identity_first: bool) -> None:
        super().__init__()
        self.identity_first = identity_first
        self.conv = nn.Conv2d(3, 3, 5)
        self.out = nn.Identity()

    def forward(self, x):
        branch = self.conv(F.pad(x, (2, 2, 1, 3)))  # rows [-1, 4), columns [-2, 3) around each pixel
        return self.out(x + branch if self.identity_first else branch + x)


@pytest.mark.parametrize("identity_first", [True, False])
def test_union_takes_the_wider_branch(identity_first):
    field = receptive_field(Residual(identity_first), "out", (12, 12))
    assert (field.size, field.start) == ((5, 5), (-1, -2))
    assert field.clipped(5, 5) == ((4, 3, 9, 8), (0, 0, 0, 0))


class Zoo(nn.Module):
    """Ops that timm layers seldom use but a receptive field must follow."""

    def __init__(self) -> None:
        super().__init__()
        self.pad = nn.ZeroPad2d((2, 0, 1, 3))  # left, right, top, bottom
        self.dilated = nn.Conv2d(3, 4, 3, dilation=2)
        self.same = nn.Conv2d(4, 4, (4, 2), padding="same")  # even kernels: the odd pixel goes after
        self.wide = nn.Conv2d(4, 4, 5, padding=(3, 2))  # a residual branch wider than the identity
        self.pool = nn.MaxPool2d(3, 2, padding=1, ceil_mode=True)
        self.reflect = nn.ReflectionPad2d(2)
        self.strided = nn.Conv2d(8, 4, 3, stride=(2, 1))
        self.out = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        h = self.same(self.dilated(self.pad(x)))
        h = h + self.wide(h)[:, :, 1:-1]
        h = torch.cat([h, h.permute(0, 1, 3, 2).transpose(2, 3).contiguous() * 2], dim=1)
        h = self.pool(h)[:, :, 1:, ::2]
        h = self.strided(self.reflect(h))
        return self.out(h.reshape(h.shape[0], 2, -1, *h.shape[2:]).flatten(1, 2))  # channels only


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("size", [(23, 29), (24, 24)])
def test_padding_dilation_ceil_mode_slicing(size):
    torch.manual_seed(0)
    model = Zoo().eval()
    field = receptive_field(model, "out", size)
    positions = [(y, x) for y in range(field.grid_size[0]) for x in range(field.grid_size[1])]
    expected = probe_boxes(linearized(model), "out", size, positions)
    assert [field.seen(y, x) for y, x in positions] == expected
    clipped_boxes(field, positions)


LAYER_KINDS = st.sampled_from(["conv", "maxpool", "avgpool", "zeropad", "reflectpad"])


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.lists(st.tuples(LAYER_KINDS, st.integers(1, 5), st.integers(1, 3), st.integers(0, 3), st.integers(1, 3)), min_size=1, max_size=4),
       st.integers(9, 40), st.integers(9, 40))
def test_random_stacks_match_gradient_probe(layers, height, width):
    """Any stack of windows, strides, paddings and dilations: the clipped box is the probe's, everywhere."""
    modules = []
    for kind, kernel, stride, padding, dilation in layers:
        if kind == "conv":
            modules.append(nn.Conv2d(3, 3, kernel, stride, min(padding, kernel - 1), dilation))
        elif kind in ("maxpool", "avgpool"):
            pool = nn.MaxPool2d if kind == "maxpool" else nn.AvgPool2d
            modules.append(pool(max(kernel, 2), stride, min(padding, max(kernel, 2) // 2)))
        else:
            modules.append((nn.ZeroPad2d if kind == "zeropad" else nn.ReflectionPad2d)((padding, kernel - 1, stride - 1, padding)))
    torch.manual_seed(0)
    model = nn.Sequential(*modules, nn.Identity()).eval()
    try:
        model(torch.zeros(1, 3, height, width))
    except RuntimeError:  # the stack does not fit this input size
        return
    layer = str(len(modules))
    field = receptive_field(model, layer, (height, width))
    positions = probe_positions(*field.grid_size)
    expected = probe_boxes(linearized(model), layer, (height, width), positions)
    assert [field.seen(y, x) for y, x in positions] == expected
    clipped_boxes(field, positions)


def test_squeeze_excitation_is_reported_as_global_context(models):
    efficientnet = models("efficientnet_b0")
    field = receptive_field(efficientnet, "blocks.2", (64, 64))
    assert field.global_context and field.size == (67, 67)
    assert not receptive_field(models("resnet18"), "layer3", (64, 64)).global_context
    with single_thread():  # what the flag stands for: with the gates kept, a corner sees the whole image
        (seen,) = probe_boxes(linearized(efficientnet, keep_squeeze_excite=True), "blocks.2", (64, 64), [(0, 0)])
    assert seen == (0, 0, 64, 64)


def test_crop_marks_padding():
    pixels = torch.rand(3, 10, 12)
    patch, mask = crop(pixels, (-2, -3, 4, 5), fill=0.25)
    assert patch.shape == (3, 6, 8) and mask.shape == (1, 6, 8) and mask.dtype == torch.bool
    assert torch.equal(patch[:, 2:, 3:], pixels[:, :4, :5])
    assert not mask[:, 2:, 3:].any() and mask[:, :2].all() and mask[:, :, :3].all()
    assert (patch[:, :2] == 0.25).all() and (patch[:, :, :3] == 0.25).all()
    patch, mask = crop(pixels, (7, 9, 13, 15))  # past the bottom-right corner
    assert torch.equal(patch[:, :3, :3], pixels[:, 7:, 9:]) and mask[:, 3:].all() and mask[:, :, 3:].all()
    assert not mask[:, :3, :3].any()


def test_crop_marks_rows_the_grid_never_sees(models):
    """convnext's 4x4 stem on a 70 px image never reads rows and columns 68 and 69: inside the image,
    yet padding for every position."""
    field = receptive_field(models("convnext_atto"), "stem", (70, 70))
    assert field.grid_size == (17, 17) and field.box(16, 16) == (64, 64, 68, 68)
    pixels = torch.rand(3, 70, 70)
    patch, mask = field.crop(pixels, 16, 16)
    assert torch.equal(patch, pixels[:, 64:68, 64:68]) and not mask.any()
    field = receptive_field(models("convnext_atto"), "stages.0", (70, 70))
    inside, padding = field.clipped(16, 16)
    assert inside == (40, 40, 68, 68) and padding == (0, 0, 24, 24)
    patch, mask = field.crop(pixels, 16, 16)
    assert mask[0, 28:].all() and mask[0, :, 28:].all() and not mask[0, :28, :28].any()
    assert torch.equal(patch[:, :28, :28], pixels[:, 40:68, 40:68]) and (patch[:, 28:] == 0.5).all()


def test_default_input_size_is_the_models(models):
    field = receptive_field(models("embedded"), "layer3")
    assert field.input_size == (128, 128) and field.grid_size == (8, 8)


def test_restores_the_model(models):
    model = models("resnet18")
    model.train()
    try:
        state = model_state(model)
        receptive_field(model, "layer2", (32, 32))
        assert model_state(model) == state
    finally:
        model.eval()


class Upsampling(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.after = nn.Conv2d(4, 4, 3)

    def forward(self, x):
        h = self.conv(x)
        return self.after(F.interpolate(h, scale_factor=2))


def test_unknown_op_on_the_path_is_named():
    model = Upsampling().eval()
    with pytest.raises(ConfigError, match="'interpolate'"):
        receptive_field(model, "after", (16, 16))
    assert receptive_field(model, "conv", (16, 16)).size == (3, 3)  # an op after the layer does not matter


def test_bad_requests(models):
    resnet = models("resnet18")
    with pytest.raises(ConfigError, match="no spatial grid"):
        receptive_field(resnet, "global_pool", (64, 64))
    with pytest.raises(ConfigError, match="closest: layer4"):
        receptive_field(resnet, "layer5", (32, 32))
    field = receptive_field(resnet, "layer2", (32, 32))
    with pytest.raises(ConfigError, match="outside the layer's 4x4"):
        field.box(4, 0)
    with pytest.raises(ConfigError, match=r"input_size=\(64, 64\)"):
        field.clipped(0, 0, 64, 64)
    assert field.clipped(0, 0, 32, 32) == field.clipped(0, 0)
    assert isinstance(field, ReceptiveField)
