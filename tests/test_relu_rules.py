"""Guided backprop and the deconvnet: one rule whichever way the activations are written, equal to
captum on ReLUs, equal to the written-out formula on every other activation with a rule, refusing
activations without one (and every non-ReLU with relu_only), leaving the user's model exactly as it was."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torch.nn.modules.module as module_globals
from torch import nn

import vizkit
from tiny_models import (
    OTHER_ACTIVATIONS,
    NoReLUNet,
    OtherActivationNet,
    ReluProbe,
    assert_maps_close,
    pixel_batch,
    single_thread,
    tiny_relu_net,
    timm_model,
)
from vizkit.core.errors import ConfigError

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*did not already require gradients.*:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*backward hooks on ReLU.*:UserWarning"),
]

RULE_METHODS = ("guided_backprop", "deconvnet")
SIZE = 20
TARGETS = [0, 2, 4]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def x():
    # centred pixels: a fair share of negative inputs, so ReLU gates matter from the first layer on
    return pixel_batch(3, SIZE, seed=1) - 0.5


def rule_map(method: str, model: nn.Module, x: torch.Tensor, target=TARGETS) -> torch.Tensor:
    return vizkit.create_method(method, reduce="none").attribute(model, x, target)


# ---------------------------------------------------------------- one rule for every spelling of ReLU


@pytest.mark.parametrize("method", RULE_METHODS)
@pytest.mark.parametrize("style", ["module_inplace", "functional"])
def test_relu_spelling_does_not_change_the_map(method, style, x):
    reference = rule_map(method, tiny_relu_net("module"), x)
    other = rule_map(method, tiny_relu_net(style), x)
    torch.testing.assert_close(other, reference, rtol=0, atol=0)


@pytest.mark.parametrize(
    "method, captum_class", [("guided_backprop", "GuidedBackprop"), ("deconvnet", "Deconvolution")]
)
def test_rule_equals_captum_on_relu_modules(method, captum_class, x):
    import captum.attr

    model = tiny_relu_net("module")
    expected = getattr(captum.attr, captum_class)(model).attribute(x.clone(), target=TARGETS)
    assert_maps_close(rule_map(method, model, x), expected, rel=1e-6)


@pytest.mark.parametrize("method", RULE_METHODS)
def test_functional_relus_get_the_rule_too(method, x):
    """captum treats functional ReLUs as plain ReLUs; vizkit must not: its map on the functional
    model equals captum's on the module model, not captum's on the functional one."""
    import captum.attr

    captum_class = {"guided_backprop": captum.attr.GuidedBackprop, "deconvnet": captum.attr.Deconvolution}[method]
    on_modules = captum_class(tiny_relu_net("module")).attribute(x.clone(), target=TARGETS)
    on_functions = captum_class(tiny_relu_net("functional")).attribute(x.clone(), target=TARGETS)
    assert not torch.allclose(on_modules, on_functions, atol=1e-3 * float(on_modules.abs().max()))
    assert_maps_close(rule_map(method, tiny_relu_net("functional"), x), on_modules, rel=1e-6)


# ---------------------------------------------------------------- the rule itself


@pytest.fixture(scope="module")
def probe_input():
    return torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(3))


def test_probe_plain_gradient(probe_input):
    probe = ReluProbe(6, 6)
    got = vizkit.create_method("saliency", reduce="none").attribute(probe, probe_input, 0)
    torch.testing.assert_close(got, probe.w * (probe_input > 0), rtol=0, atol=0)


def test_probe_guided_gradient_drops_negative_gradients(probe_input):
    probe = ReluProbe(6, 6)
    got = rule_map("guided_backprop", probe, probe_input, 0)
    torch.testing.assert_close(got, probe.w.clamp(min=0) * (probe_input > 0), rtol=0, atol=0)


def test_probe_deconvnet_ignores_the_forward_gate(probe_input):
    probe = ReluProbe(6, 6)
    got = rule_map("deconvnet", probe, probe_input, 0)
    torch.testing.assert_close(got, probe.w.clamp(min=0).expand_as(probe_input), rtol=0, atol=0)


@pytest.mark.parametrize("method", RULE_METHODS)
def test_rule_changes_the_gradient_of_a_real_cnn(method, x):
    model = tiny_relu_net("module_inplace")
    plain = vizkit.create_method("saliency", reduce="none").attribute(model, x, TARGETS)
    ruled = rule_map(method, model, x)
    assert ruled.abs().max() > 0
    assert not torch.allclose(ruled, plain, atol=1e-2 * float(plain.abs().max()))


# ---------------------------------------------------------------- the user's model is left as it was


def snapshot(model: nn.Module) -> dict:
    modules = {}
    for name, module in model.named_modules():
        modules[name] = dict(
            identity=id(module),
            training=module.training,
            inplace=getattr(module, "inplace", None),
            hooks=[
                dict(getattr(module, attr))
                for attr in (
                    "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                    "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
                )
            ],
            full_backward_hook=module._is_full_backward_hook,
        )
    return dict(
        modules=modules,
        parameters={
            name: (id(p), p.detach().clone(), p.requires_grad, p.grad) for name, p in model.named_parameters()
        },
        buffers={name: b.clone() for name, b in model.named_buffers()},
    )


def global_hook_counts() -> list[int]:
    names = (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks",
        "_global_forward_hooks_with_kwargs", "_global_forward_hooks_always_called",
    )
    return [len(getattr(module_globals, name)) for name in names]


def assert_untouched(model: nn.Module, before: dict, globals_before: list[int]) -> None:
    after = snapshot(model)
    assert after["modules"].keys() == before["modules"].keys()
    for name, state in after["modules"].items():
        assert all(not hooks for hooks in state["hooks"]), f"hooks left on module '{name}': {state['hooks']}"
        assert state == before["modules"][name], f"module '{name}' changed"
    for name, (identity, value, requires_grad, grad) in after["parameters"].items():
        old_identity, old_value, old_requires_grad, _ = before["parameters"][name]
        assert identity == old_identity, f"parameter {name} was replaced"
        assert torch.equal(value, old_value), f"parameter {name} changed"
        assert requires_grad == old_requires_grad, f"requires_grad of {name} changed"
        assert grad is None, f"a .grad was created on {name}"
    for name, value in after["buffers"].items():
        assert torch.equal(value, before["buffers"][name]), f"buffer {name} changed"
    assert global_hook_counts() == globals_before
    assert torch._C._len_torch_function_stack() == 0, "a TorchFunctionMode outlived the call"


def prepared_tiny_model() -> nn.Module:
    """Mixed training flags and a frozen parameter, so a reset to defaults would show."""
    model = tiny_relu_net("module_inplace")
    model.fc1.train()
    model.conv1.weight.requires_grad_(False)
    return model


CALLS = [
    ("saliency", {}, TARGETS),
    ("guided_backprop", {}, TARGETS),
    ("deconvnet", {"reduce": "none"}, None),
    ("guided_backprop", {}, "channel:conv3:2"),
    ("deconvnet", {}, "neuron:act2:1:3:4"),
    ("occlusion", {"window": 8, "stride": 6, "batch_size": 5}, TARGETS),
]


@pytest.mark.parametrize("method, fields, target", CALLS, ids=[f"{m}-{t}" for m, _, t in CALLS])
def test_tiny_model_left_untouched(method, fields, target, x):
    model = prepared_tiny_model()
    before, globals_before = snapshot(model), global_hook_counts()
    vizkit.create_method(method, **fields).attribute(model, x, target)
    assert_untouched(model, before, globals_before)


@pytest.mark.parametrize("method", ["guided_backprop", "deconvnet", "saliency"])
def test_timm_model_left_untouched(method):
    model = timm_model("test_resnet")  # 12 in-place ReLU modules, BN, residual adds
    x = pixel_batch(2, 32)
    before, globals_before = snapshot(model), global_hook_counts()
    vizkit.create_method(method).attribute(model, x, [1, 2])
    vizkit.create_method(method).attribute(model, x, "channel:layer2.0.bn2:5")
    assert_untouched(model, before, globals_before)
    assert all(m.inplace for m in model.modules() if isinstance(m, nn.ReLU))


# ---------------------------------------------------------------- refusing other rectifiers


@pytest.mark.parametrize("method", RULE_METHODS)
@pytest.mark.parametrize("activation", list(OTHER_ACTIVATIONS), ids=list(OTHER_ACTIVATIONS))
def test_relu_only_refuses_every_other_activation(method, activation, x):
    """relu_only=true: the papers' rule, for ReLU networks only."""
    fn, name = OTHER_ACTIVATIONS[activation]
    model = OtherActivationNet(fn).eval()
    with pytest.raises(ConfigError, match=f"relu_only=true defines its backward rule for ReLU only, but this model also uses {name}") as error:
        vizkit.create_method(method, relu_only=True).attribute(model, x, 0)
    assert method in str(error.value)
    maps = vizkit.create_method(method).attribute(model, x, 0)  # by default the activation has its rule
    assert torch.isfinite(maps).all() and maps.abs().sum() > 0


@pytest.mark.parametrize("method", [*RULE_METHODS, "guided_gradcam"])
@pytest.mark.parametrize("activation, name", [(nn.SELU(), "SELU"), (nn.Softplus(), "Softplus"), (nn.CELU(), "CELU"),
                                              (nn.Hardtanh(), "Hardtanh"), (nn.PReLU(), "PReLU")],
                         ids=["SELU", "Softplus", "CELU", "Hardtanh", "PReLU"])
def test_an_activation_without_a_rule_is_refused_by_name(method, activation, name, x):
    fields = {"layer": "conv2"} if method == "guided_gradcam" else {}
    with pytest.raises(ConfigError, match=f"{method} has no backward rule for {name}, which this model uses"):
        vizkit.create_method(method, **fields).attribute(OtherActivationNet(activation).eval(), x, 0)


# ---------------------------------------------------------------- the rule on other activations, by hand

def _derivative(name: str, z: torch.Tensor) -> torch.Tensor:
    """Each activation's derivative written out (float64), independent of torch's autograd."""
    sigmoid, phi = torch.sigmoid(z), torch.exp(-z * z / 2) / (2 * torch.pi) ** 0.5
    if name == "GELU":
        return 0.5 * (1 + torch.erf(z / 2 ** 0.5)) + z * phi
    if name == "GELU-tanh":
        inner = (2 / torch.pi) ** 0.5 * (z + 0.044715 * z ** 3)
        return 0.5 * (1 + torch.tanh(inner)) + 0.5 * z * (1 - torch.tanh(inner) ** 2) * (2 / torch.pi) ** 0.5 * (1 + 3 * 0.044715 * z ** 2)
    if name == "SiLU":
        return sigmoid * (1 + z * (1 - sigmoid))
    if name == "Hardswish":
        return torch.where(z < -3, 0.0, torch.where(z > 3, 1.0, (2 * z + 3) / 6))
    if name == "Mish":
        softplus = F.softplus(z)
        return torch.tanh(softplus) + z * (1 - torch.tanh(softplus) ** 2) * sigmoid
    if name == "ELU":
        return torch.where(z > 0, 1.0, 0.7 * torch.exp(z))
    if name == "LeakyReLU":  # the slope as a float64 tensor: a Python float in torch.where would be float32's 0.1
        return torch.where(z > 0, torch.ones_like(z), torch.full_like(z, 0.1))
    if name == "ReLU6":
        return ((z > 0) & (z < 6)).to(z.dtype)
    raise KeyError(name)


RULED = {
    "GELU": (nn.GELU(), "GELU"), "GELU-tanh": (nn.GELU(approximate="tanh"), "GELU-tanh"), "GELU-functional": (F.gelu, "GELU"),
    "SiLU": (nn.SiLU(), "SiLU"), "SiLU-inplace": (nn.SiLU(inplace=True), "SiLU"), "SiLU-functional": (F.silu, "SiLU"),
    "Hardswish": (nn.Hardswish(), "Hardswish"), "Hardswish-inplace": (nn.Hardswish(inplace=True), "Hardswish"),
    "Mish": (nn.Mish(), "Mish"), "ELU": (nn.ELU(0.7), "ELU"), "ELU-inplace": (nn.ELU(0.7, inplace=True), "ELU"),
    "ELU_": (lambda t: F.elu_(t, 0.7), "ELU"), "LeakyReLU": (nn.LeakyReLU(0.1), "LeakyReLU"),
    "LeakyReLU-inplace": (nn.LeakyReLU(0.1, inplace=True), "LeakyReLU"), "LeakyReLU_": (lambda t: F.leaky_relu_(t, 0.1), "LeakyReLU"),
    "ReLU6": (nn.ReLU6(), "ReLU6"), "ReLU6-inplace": (nn.ReLU6(inplace=True), "ReLU6"), "ReLU6-functional": (F.relu6, "ReLU6"),
    "hardtanh_-from-0": (lambda t: F.hardtanh_(t, 0.0, 6.0), "ReLU6"),
}


class ConvActivationLinear(nn.Module):
    """One conv, one activation, one linear layer: the net whose ruled gradient is written out by hand."""

    def __init__(self, activation) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(3, 5, 3, padding=1).double()
        with torch.no_grad():
            self.conv.weight.mul_(4)  # pre-activations over [-6, 6]: every piece of every activation is used
        self.activation = activation
        self.fc = nn.Linear(5 * 6 * 6, 4).double()

    def forward(self, x):
        return self.fc(self.activation(self.conv(x)).flatten(1))


@pytest.mark.parametrize("rule_method", RULE_METHODS)
@pytest.mark.parametrize("case", list(RULED), ids=list(RULED))
def test_the_rule_equals_its_formula_on_every_activation(rule_method, case):
    """guided: conv^T( f'(z) · relu(W_fc[c]) ); deconvnet: conv^T( relu(W_fc[c]) ), z = conv(x). Both in
    float64, so the two computations agree to its rounding (the conv's 27-term sums: 1e-12 relative)."""
    activation, name = RULED[case]
    model = ConvActivationLinear(activation).eval()
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    got = vizkit.create_method(rule_method, reduce="none").attribute(model, x, [1, 3])
    z = model.conv(x).detach()
    assert (z < -3).any() and (z > 6).any() and ((z > 0) & (z < 3)).any()
    incoming = model.fc.weight[[1, 3]].detach().reshape(2, 5, 6, 6).clamp(min=0)
    at_z = incoming * _derivative(name, z) if rule_method == "guided_backprop" else incoming
    leaf = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(model.conv(leaf), leaf, at_z)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12 * float(expected.abs().max()))


@pytest.mark.parametrize("method", [*RULE_METHODS, "guided_gradcam"])
@pytest.mark.parametrize("name", ["test_convnext", "test_efficientnet", "test_nfnet", "test_byobnet"])
def test_timm_families_with_other_activations_get_maps_and_stay_untouched(method, name):
    """GELU (ConvNeXt), SiLU (EfficientNet), GELU/SiLU (NFNet), ...: finite, non-zero maps of the input's
    size, and the model exactly as it was."""
    model = timm_model(name)
    x = pixel_batch(2, 64)
    before, globals_before = snapshot(model), global_hook_counts()
    maps = vizkit.create_method(method).attribute(model, x, [1, 2])
    assert maps.shape == (2, 1, 64, 64) and torch.isfinite(maps).all() and maps.abs().sum() > 0
    assert_untouched(model, before, globals_before)


@pytest.mark.parametrize("method", RULE_METHODS)
def test_model_without_relu_is_refused(method, x):
    with pytest.raises(ConfigError, match="no ReLU"):
        vizkit.create_method(method).attribute(NoReLUNet().eval(), x, 0)


def test_target_before_any_relu_is_refused(x):
    """The rule is only checked up to the target: a layer before the first ReLU has nothing to change."""
    with pytest.raises(ConfigError, match="no ReLU"):
        vizkit.create_method("guided_backprop").attribute(tiny_relu_net("module"), x, "channel:conv1:0")


@pytest.mark.parametrize(
    "model_factory",
    [lambda: OtherActivationNet(nn.SELU()), lambda: OtherActivationNet(F.softplus), lambda: NoReLUNet()],
    ids=["SELU-module", "Softplus-functional", "no-ReLU"],
)
def test_refused_model_is_untouched_and_still_usable(model_factory, x):
    model = model_factory().eval()
    saliency = vizkit.create_method("saliency")
    expected = saliency.attribute(model, x, 1)
    before, globals_before = snapshot(model), global_hook_counts()
    with pytest.raises(ConfigError):
        vizkit.create_method("guided_backprop").attribute(model, x, 1)
    assert_untouched(model, before, globals_before)
    torch.testing.assert_close(saliency.attribute(model, x, 1), expected, rtol=0, atol=0)


def test_error_inside_the_ruled_forward_leaves_nothing_behind(x):
    """An error raised mid-forward (channel out of range) must still pop the ReLU rule: afterwards,
    ReLUs have their ordinary gradient again."""
    model = tiny_relu_net("module_inplace")
    saliency = vizkit.create_method("saliency", reduce="none")
    expected = saliency.attribute(model, x, TARGETS)
    before, globals_before = snapshot(model), global_hook_counts()
    with pytest.raises(ConfigError, match="out of range"):
        vizkit.create_method("guided_backprop").attribute(model, x, "channel:conv3:99")
    assert_untouched(model, before, globals_before)
    torch.testing.assert_close(saliency.attribute(model, x, TARGETS), expected, rtol=0, atol=0)
    plain = x.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(F.relu(plain).sum(), plain)
    torch.testing.assert_close(gradient, (x > 0).float())
