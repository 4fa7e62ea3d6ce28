"""Model loading: timm names, checkpoints (safetensors, weights_only torch files), the embedded model."""
from __future__ import annotations

import os
import pickle

import pytest
import timm
import torch
from safetensors.torch import save_file

from vizkit.core.errors import ConfigError, VizkitError
from vizkit.core.models import EMBEDDED_DIR, class_names, data_config, embedded_card, find_layer, load_model


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=4).eval()
    return model, torch.randn(2, 3, 64, 64)


def test_safetensors_checkpoint_round_trip_infers_class_count(reference, tmp_path):
    model, x = reference
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    loaded = load_model("test_resnet", checkpoint=tmp_path / "w.safetensors")
    assert loaded.num_classes == 4 and not loaded.training
    torch.testing.assert_close(loaded(x), model(x))


def test_torch_checkpoint_with_lightning_prefix(reference, tmp_path):
    model, x = reference
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "w.ckpt")
    torch.testing.assert_close(load_model("test_resnet", checkpoint=tmp_path / "w.ckpt")(x), model(x))


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_torch_checkpoint_that_would_run_code_is_refused(tmp_path):
    with open(tmp_path / "evil.pth", "wb") as file:
        pickle.dump({"fc.weight": _Exploit()}, file)
    with pytest.raises(VizkitError, match="weights_only=True"):
        load_model("test_resnet", checkpoint=tmp_path / "evil.pth")


def test_checkpoint_for_another_architecture_says_so(reference, tmp_path):
    model, _ = reference
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    with pytest.raises(VizkitError, match="does not fit"):
        load_model("resnet18", checkpoint=tmp_path / "w.safetensors")


def test_missing_checkpoint():
    with pytest.raises(ConfigError, match="checkpoint not found"):
        load_model("test_resnet", checkpoint="/nonexistent/w.safetensors")


def test_unknown_model_name_lists_close_matches():
    with pytest.raises(ConfigError, match="unknown model 'convnext_tiyn'.*convnext_tiny"):
        load_model("convnext_tiyn")


def test_mean_std_and_size_come_from_timm():
    config = data_config(load_model("resnet18"))
    assert config["input_size"] == (3, 224, 224) and config["mean"] == pytest.approx((0.485, 0.456, 0.406))


def test_imagenet_models_get_imagenet_class_names():
    names = class_names(load_model("resnet18"))
    assert len(names) == 1000 and names[281].startswith("tabby")
    assert class_names(load_model("resnet18", num_classes=7)) is None


def test_find_layer_lists_closest_names():
    model = load_model("resnet18")
    assert find_layer(model, "layer4.1.conv2") is model.layer4[1].conv2
    with pytest.raises(ConfigError, match="layer 'layer4.2' not found.*closest:.*layer4"):
        find_layer(model, "layer4.2")


def test_embedded_model_card_and_checkpoint():
    card = embedded_card()
    assert card["held_out_accuracy"] >= 0.97
    assert (EMBEDDED_DIR / "model.safetensors").stat().st_size <= 8_000_000
    assert card["train_command"].startswith("python tools/embedded_training.py")
    model = load_model("embedded")
    assert class_names(model) == card["classes"]
    config = data_config(model)
    assert tuple(config["input_size"]) == tuple(card["input_size"])
    assert config["mean"] == pytest.approx(tuple(card["mean"]))
    activations = {type(m).__name__ for m in model.modules()} & {"ReLU", "GELU", "SiLU", "ReLU6", "LeakyReLU", "Hardswish"}
    assert activations == {"ReLU"}  # a ReLU CNN: guided backprop and deconvnet apply


def test_embedded_model_is_accurate_on_held_out_shapes():
    from vizkit.core.data import load_shapes

    model = load_model("embedded")
    config = data_config(model)
    samples = load_shapes(240, "test", 0, config)
    x = torch.stack([s.pixels for s in samples])
    x = (x - torch.tensor(config["mean"]).view(1, 3, 1, 1)) / torch.tensor(config["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        predicted = model(x).argmax(1)
    accuracy = (predicted == torch.tensor([s.label for s in samples])).float().mean().item()
    assert accuracy >= 0.97
