"""Target strings: parsing, class names (ImageNet's, from timm), layer lookup, and their error messages."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vizkit.core.errors import ConfigError
from vizkit.core.models import class_names, find_layer
from vizkit.core.targets import TARGET_FORMS, TargetSpec, class_index, parse_target


@pytest.fixture(scope="module")
def resnet18():
    import timm

    return timm.create_model("resnet18", pretrained=False)  # 1000 classes: timm infers ImageNet names


@pytest.fixture(scope="module")
def imagenet_names(resnet18):
    names = class_names(resnet18)
    assert names is not None and len(names) == 1000
    return names


# ---------------------------------------------------------------- parse_target


@pytest.mark.parametrize(
    "text, spec",
    [
        ("predicted", TargetSpec("predicted")),
        ("class:3", TargetSpec("class", class_ref="3")),
        ("class:tabby", TargetSpec("class", class_ref="tabby")),
        ("class:tabby cat", TargetSpec("class", class_ref="tabby cat")),
        ("channel:layer4.1:7", TargetSpec("channel", layer="layer4.1", channel=7)),
        ("neuron:stages.2:3:1:0", TargetSpec("neuron", layer="stages.2", channel=3, y=1, x=0)),
        ("layer:layer3", TargetSpec("layer", layer="layer3")),
        ("  channel:layer1.0.conv2:12 ", TargetSpec("channel", layer="layer1.0.conv2", channel=12)),
        ("Channel:layer1:2", TargetSpec("channel", layer="layer1", channel=2)),
    ],
)
def test_parse_target(text, spec):
    assert parse_target(text) == spec


@pytest.mark.parametrize(
    "text", ["chanel:x:1", "neuron:layer1:1:2", "neuron:layer1:1:2:3:4", "channel::3", "class:", "predicted:3", "layer:", ""]
)
def test_unreadable_target_lists_the_accepted_forms(text):
    with pytest.raises(ConfigError) as error:
        parse_target(text)
    message = str(error.value)
    assert TARGET_FORMS in message
    assert f"'{text.strip()}'" in message


@pytest.mark.parametrize(
    "text, field, value", [("channel:layer1:x", "channel", "x"), ("neuron:layer1:1:a:2", "y", "a"), ("neuron:l:1:2:3.5", "x", "3.5")]
)
def test_non_integer_field_is_named(text, field, value):
    with pytest.raises(ConfigError, match=f"{field} must be an integer, got '{value}'"):
        parse_target(text)


def test_non_integer_field_also_lists_the_accepted_forms():
    with pytest.raises(ConfigError) as error:
        parse_target("channel:layer1:x")
    assert TARGET_FORMS in str(error.value)


LAYER_SEGMENT = st.one_of(
    st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,11}", fullmatch=True), st.integers(0, 99).map(str)
)
LAYER = st.lists(LAYER_SEGMENT, min_size=1, max_size=4).map(".".join)
INT = st.integers(-(10**6), 10**6)
CLASS_REF = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_ \-]{0,20}[A-Za-z0-9_]|[A-Za-z0-9_]", fullmatch=True)

SPECS = st.one_of(
    st.just(TargetSpec("predicted")),
    st.builds(lambda ref: TargetSpec("class", class_ref=ref), CLASS_REF),
    st.builds(lambda layer: TargetSpec("layer", layer=layer), LAYER),
    st.builds(lambda layer, c: TargetSpec("channel", layer=layer, channel=c), LAYER, INT),
    st.builds(lambda layer, c, y, x: TargetSpec("neuron", layer=layer, channel=c, y=y, x=x), LAYER, INT, INT, INT),
)


@given(SPECS)
def test_parse_round_trips(spec):
    assert parse_target(str(spec)) == spec


# ---------------------------------------------------------------- class names


def test_class_by_name(imagenet_names):
    assert class_index("tabby", imagenet_names, 1000) == 281


@pytest.mark.parametrize("ref", ["tabby cat", "Tabby", "tabby_cat", " tabby-cat "])
def test_class_name_aliases_and_spelling(ref, imagenet_names):
    assert class_index(ref, imagenet_names, 1000) == 281


def test_class_by_index_text(imagenet_names):
    assert class_index("281", imagenet_names, 1000) == 281


def test_ambiguous_class_name_lists_every_match(imagenet_names):
    with pytest.raises(ConfigError, match="ambiguous") as error:
        class_index("crane", imagenet_names, 1000)
    assert "134" in str(error.value) and "517" in str(error.value)


def test_unknown_class_name_suggests_close_names(imagenet_names):
    with pytest.raises(ConfigError, match="unknown class name 'tabbby'") as error:
        class_index("tabbby", imagenet_names, 1000)
    assert "tabby" in str(error.value).split("closest:")[1]


@pytest.mark.parametrize("ref", ["1000", "-1", "12345"])
def test_class_index_out_of_range(ref, imagenet_names):
    with pytest.raises(ConfigError, match=rf"class index {ref} is out of range.*0\.\.999"):
        class_index(ref, imagenet_names, 1000)


def test_class_name_without_names_asks_for_an_index():
    with pytest.raises(ConfigError, match="no class names; use class:INDEX"):
        class_index("tabby", None, 10)


def test_class_name_resolves_through_a_target_string(resnet18):
    import torch

    from vizkit.core.targets import resolve_target

    target = resolve_target("class:tabby", resnet18, torch.zeros(2, 3, 8, 8))
    assert target.kind == "class" and target.indices.tolist() == [281, 281]


# ---------------------------------------------------------------- layers


def test_find_layer(resnet18):
    assert find_layer(resnet18, "layer4.1.conv2") is resnet18.layer4[1].conv2


def test_unknown_layer_lists_close_names(resnet18):
    with pytest.raises(ConfigError, match="layer 'layer5' not found") as error:
        find_layer(resnet18, "layer5")
    assert "layer4" in str(error.value).split("closest:")[1]


def test_empty_layer_name_is_not_the_whole_model(resnet18):
    with pytest.raises(ConfigError, match="not found"):
        find_layer(resnet18, "")
