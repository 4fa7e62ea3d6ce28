"""The README's support matrix, measured: every built-in method on every timm family.

Each method runs on every architecture of a family (timm's own tiny ``test_*`` models and a few real
ones, random weights, small inputs): an attribution method with cheap fields (few steps, a coarse
occlusion), the others with their defaults but for fewer steps. A cell says what happened there:

    works                 a finite map of the input's size, not all zero, on every architecture (the
                          other families: finite images, adversarial inputs or pictures)
    works (N)             the same, with a definition that differs from the paper's (note N says how)
    refused (N)           a one-line ConfigError on every architecture (note N is its reason)
    works on …; refused … some of each

    .venv/bin/python tools/support_matrix.py            # print the table
    .venv/bin/python tools/support_matrix.py --write    # put it in README.md, between the markers
    .venv/bin/python tools/support_matrix.py --check    # exit 1 if README.md shows another table

``tests/test_support_matrix.py`` runs the same matrix, checks every cell's maps, and fails when the
README's table is not the measured one. Anything but a map or a ConfigError (a traceback, a NaN, an
all-zero map, a wrong shape) is a bug and raises here.
"""
from __future__ import annotations

import argparse
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- support-matrix:start -->", "<!-- support-matrix:end -->"
SIZE = 64  # input side where the model takes any size; fixed-size models get their own
MEAN_STD = {"mean": (0.5,) * 3, "std": (0.5,) * 3}

# column -> (timm name, creation arguments); Swin and the real ViT made small, as the "small inputs"
FAMILIES: dict[str, list[tuple[str, dict]]] = {
    "ResNet": [("test_resnet", {})],
    "ByobNet": [("test_byobnet", {})],
    "NFNet": [("test_nfnet", {})],
    "ConvNeXt": [("test_convnext", {}), ("test_convnext2", {}), ("test_convnext3", {}), ("convnext_atto", {})],
    "EfficientNet": [("test_efficientnet", {}), ("test_efficientnet_evos", {}), ("test_efficientnet_gn", {}),
                     ("test_efficientnet_ln", {}), ("efficientnet_b0", {})],
    "MobileNetV3": [("mobilenetv3_small_100", {})],
    "MambaOut": [("test_mambaout", {})],
    "MaxViT, CoAtNet": [("test_maxvit", {}), ("test_coatnet", {})],
    # Swin's four stages kept, each narrower and shallower (~5x faster: Score-CAM alone took 10 s on the full width)
    "Swin": [("swin_tiny_patch4_window7_224", {"img_size": 64, "window_size": 2, "embed_dim": 48, "depths": (1, 1, 2, 1),
                                               "num_heads": (2, 4, 8, 16)})],
    "ViT": [("test_vit", {}), ("test_vit2", {}), ("test_vit3", {}), ("test_vit4", {}), ("test_vit_relpos", {}),
            ("vit_tiny_patch16_224", {"img_size": 64})],
}
# cheap settings: the matrix asks whether a method runs and gives a map, not how good the map is
FIELDS = {"occlusion": {"window": 16, "stride": 16}, "integrated_gradients": {"steps": 4}, "smoothgrad": {"samples": 2}, "gradient_shap": {"samples": 2},
          "smoothgradcam_plus_plus": {"relu": False, "samples": 2},
          # random weights may leave a class no positive evidence: without the ReLU an all-zero CAM can
          # only mean that no gradient reached the layer
          "gradcam": {"relu": False}, "guided_gradcam": {"relu": False},
          **{cam: {"relu": False} for cam in ("gradcam_plus_plus", "xgradcam", "hirescam", "layercam", "eigencam")},
          # and the channel-forward CAMs a small chunk: the matrix's models are small, the defaults sized for 224 px
          "scorecam": {"relu": False, "batch_size": 64}, "ablationcam": {"relu": False, "batch_size": 64}}
RULE_METHODS = ("guided_backprop", "deconvnet", "guided_gradcam")
CAM_METHODS = ("gradcam", "guided_gradcam", "gradcam_plus_plus", "xgradcam", "hirescam", "layercam", "eigencam", "scorecam", "ablationcam",
               "fullgrad", "smoothgradcam_plus_plus")
NOTES = {
    "rules": "On GELU, SiLU, Hardswish, Mish, ELU, LeakyReLU and ReLU6 the papers' ReLU rule is generalized: guided "
             "f'(x)·relu(g), deconvnet relu(g) (`vizkit/probes/relu_rules.py`); `relu_only=true` refuses them instead.",
    "tokens": "The patch tokens of a `[B, prefix + H·W, C]` layer, reshaped to the patch grid (the class and register "
              "tokens dropped), are the feature map: pytorch-grad-cam's ViT recipe, equal to it (tested).",
}


@dataclass(frozen=True)
class Outcome:
    family: str
    model: str
    method: str
    refusal: str | None  # the ConfigError's message, the model's class name replaced by "the model"
    notes: tuple[str, ...] = ()


def methods() -> list[str]:
    """vizkit's own attribution methods (plugins document their own support)."""
    from vizkit.methods.registry import discover

    return sorted(name for name, entry in discover().items() if entry.kind == "attribution" and entry.distribution.split()[0] == "vizkit")


def make_model(name: str, kwargs: dict) -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return timm.create_model(name, pretrained=False, num_classes=5, **kwargs).eval()


def smooth_activations(model: torch.nn.Module) -> bool:
    from vizkit.probes.default_layers import ACTIVATIONS

    return any(type(m).__name__.lower() in ACTIVATIONS - {"relu"} for m in model.modules())


def run_cell(family: str, name: str, model: torch.nn.Module, method: str) -> Outcome:
    """One method on one model: a checked map, or the refusal; anything else raises."""
    import vizkit
    from vizkit.core.errors import ConfigError
    from vizkit.core.models import accepted_input_size, token_model

    height, width = accepted_input_size(model, (SIZE, SIZE))
    x = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(1))
    try:
        maps = vizkit.create_method(method, **FIELDS.get(method, {})).attribute(model, x, [2], **MEAN_STD)
    except ConfigError as error:
        message = str(error).replace(type(model).__name__, "the model")
        # a rule-based method names every operation it has no rule for: one note for all of them
        message = re.sub(r"has no rule for (.+?) on this model's path to the target", "has no rule for some operations on this "
                         "model's path to the target (the message names them: a gate's mul, layer_norm, attention, ...)", message)
        if not message or "\n" in message:
            raise AssertionError(f"{method} on {name}: a refusal must be one line, got {message!r}") from error
        return Outcome(family, name, method, message)
    if tuple(maps.shape) != (1, 1, height, width) or not torch.isfinite(maps).all() or not maps.abs().sum() > 0:
        raise AssertionError(f"{method} on {name}: maps of shape {tuple(maps.shape)}, finite {bool(torch.isfinite(maps).all())}, "
                             f"|sum| {float(maps.abs().sum()):.3g}; expected a finite, non-zero (1, 1, {height}, {width})")
    notes = (("rules",) if method in RULE_METHODS and smooth_activations(model) else ()) + \
            (("tokens",) if method in CAM_METHODS and token_model(model) else ())
    return Outcome(family, name, method, None, notes)


def measure(families: dict[str, list[tuple[str, dict]]] = FAMILIES, on_model=None) -> list[Outcome]:
    """Every method on every model. ``on_model(name, model, state)`` after each model's methods, with
    its state dict from before them (the tests check there that the model was left as it was)."""
    outcomes = []
    attribution, others = methods(), other_methods()
    for family, members in families.items():
        for name, kwargs in members:
            model = make_model(name, kwargs)
            state = {key: value.clone() for key, value in model.state_dict().items()} if on_model else None
            mine = [run_cell(family, name, model, method) for method in attribution]
            mine += [Outcome(family, name, method, run_defaults(name, model, method)) for method in others]
            if on_model is not None:
                on_model(name, model, state)
            outcomes += mine
    return outcomes


# the other families with their defaults, only fewer steps: the matrix asks whether the defaults run
QUICK = {"class_model": {"steps": 1}, "feature_viz": {"steps": 1}, "inversion": {"steps": 1}, "deep_dream": {"steps": 3},
         "neural_style": {"steps": 1}, "fooling_images": {"steps": 1}, "pgd": {"steps": 1}, "deepfool": {"steps": 1},
         "top_patches": {"k": 1}, "cw": {"steps": 1, "binary_search_steps": 1}, "apgd": {"steps": 1}, "fab": {"steps": 1},
         "square": {"queries": 2}, "autoattack": {"steps": 1, "queries": 2}}


def other_methods() -> list[str]:
    """vizkit's own optimization, adversarial and inspection methods."""
    from vizkit.methods.registry import discover

    return sorted(name for name, entry in discover().items() if entry.kind != "attribution" and entry.distribution.split()[0] == "vizkit")


def run_defaults(name: str, model: torch.nn.Module, method: str) -> str | None:
    """One optimization, adversarial or inspection method with its defaults (fewer steps) on one model:
    None when it gave finite images, or its one-line refusal; anything else raises."""
    import vizkit
    from vizkit.core.errors import ConfigError
    from vizkit.core.models import accepted_input_size
    from vizkit.methods.base import AdversarialMethod, InspectionMethod
    from vizkit.probes.default_layers import dream_layer

    height, width = accepted_input_size(model, (SIZE, SIZE))
    pixels = torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(2))
    created = vizkit.create_method(method, **QUICK.get(method, {}))
    try:
        if isinstance(created, InspectionMethod):
            pictures = list(created.inspect(model, pixels if created.needs_data else None, **MEAN_STD).pictures.values())
            outputs = [torch.as_tensor(picture).float() for picture in pictures]
        elif isinstance(created, AdversarialMethod):
            outputs = [created.attack(model, (pixels - 0.5) / 0.5, **MEAN_STD)]
        else:  # feature_viz has no default target: the channel 0 of the layer Deep Dream would pick
            target = f"channel:{dream_layer(model)}:0" if method == "feature_viz" else None
            outputs = [created.optimize(model, target, pixels if created.needs_images else None, **MEAN_STD).images]
    except ConfigError as error:
        message = str(error).replace(type(model).__name__, "the model")
        # a rule-based method names every operation it has no rule for: one note for all of them
        message = re.sub(r"has no rule for (.+?) on this model's path to the target", "has no rule for some operations on this "
                         "model's path to the target (the message names them: a gate's mul, layer_norm, attention, ...)", message)
        if not message or "\n" in message:
            raise AssertionError(f"{method} on {name}: a refusal must be one line, got {message!r}") from error
        return message
    if not outputs or not all(o.numel() and torch.isfinite(o).all() for o in outputs):
        raise AssertionError(f"{method} on {name}: no output, or not finite")
    return None


def render(outcomes: list[Outcome]) -> str:
    """The markdown table and its numbered notes."""
    families = list(dict.fromkeys(o.family for o in outcomes))
    notes: dict[str, int] = {}

    def mark(text: str) -> str:
        notes.setdefault(text, len(notes) + 1)
        return f"({notes[text]})"

    def cell(found: list[Outcome]) -> str:
        working = [o for o in found if o.refusal is None]
        refused = [o for o in found if o.refusal is not None]
        marks = " ".join(mark(NOTES[n]) for n in dict.fromkeys(n for o in working for n in o.notes))
        reasons = " ".join(mark(r) for r in dict.fromkeys(o.refusal for o in refused))
        if not refused:
            return f"works {marks}".strip()
        if not working:
            return f"refused {reasons}"
        return (f"works on {', '.join(o.model for o in working)} {marks}".rstrip()
                + f"; refused on {', '.join(o.model for o in refused)} {reasons}")

    rows = ["| method | " + " | ".join(families) + " |", "|---|" + "---|" * len(families)]
    for method in dict.fromkeys(o.method for o in outcomes):
        cells = [cell([o for o in outcomes if o.method == method and o.family == family]) for family in families]
        rows.append(f"| `{method}` | " + " | ".join(cells) + " |")
    members = "; ".join(f"{family}: {', '.join(_described(name, kwargs) for name, kwargs in FAMILIES.get(family, []))}" for family in families)
    listed = [f"{number}. {text}" for text, number in notes.items()]
    return "\n".join(rows + ["", f"Measured on (random weights, {SIZE} px or the model's fixed size; attribution with cheap fields, "
                      f"the others with their defaults in fewer steps): {members}.", ""] + listed)


def _described(name: str, kwargs: dict) -> str:
    """A member's name, and what the matrix changed in its architecture beyond the input size."""
    changed = {key: value for key, value in kwargs.items() if key not in ("img_size", "window_size")}
    return name + (f" ({', '.join(f'{key}={value}' for key, value in changed.items())})" if changed else "")


def readme_table(text: str) -> str:
    match = re.search(re.escape(START) + r"\n(.*?)\n" + re.escape(END), text, flags=re.S)
    if match is None:
        raise SystemExit(f"README.md has no {START} ... {END} block")
    return match.group(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", action="store_true", help="replace the table in README.md")
    group.add_argument("--check", action="store_true", help="exit 1 if README.md shows another table")
    options = parser.parse_args(argv)
    table = render(measure())
    text = README.read_text()
    if options.write:
        start, end = text.index(START) + len(START), text.index(END)
        README.write_text(text[:start] + "\n" + table + "\n" + text[end:])
    elif options.check:
        if readme_table(text) != table:
            print("README.md's support matrix is not the measured one: run tools/support_matrix.py --write", file=sys.stderr)  # user-facing
            return 1
    else:
        print(table)  # user-facing
    return 0


if __name__ == "__main__":
    sys.exit(main())
