"""``vizkit-layers MODEL``: the addressable layers of a model, with their output shapes and the
defaults that pick them.

These ``named_modules()`` names are what ``target=channel:LAYER:C``, ``neuron:LAYER:C:Y:X`` and
methods' ``layer`` fields take. The last column marks the layers each family uses when none is named
(``vizkit.probes.default_layers``): Grad-CAM's, inversion's, Deep Dream's, neural style's, top
patches' and the filters'. A shape is shown channels first; a layer kept channels-last or as
transformer tokens says so (a channel of it is still ``channel:LAYER:C``).
"""
from __future__ import annotations

import argparse
import sys

from vizkit.core.errors import VizkitError


def layer_table(model, input_size) -> list[tuple[str, str, str, str]]:
    """(name, type, output shape, the defaults that pick it) for every named module, from one forward
    on a zero input."""
    import torch

    from vizkit.core.layouts import channels_first, layout_of
    from vizkit.probes.default_layers import default_roles

    size = tuple(input_size[-2:])
    shapes: dict[str, str] = {}
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue
        def record(_m, _i, out, name=name):
            if name in shapes:
                return
            if not isinstance(out, torch.Tensor):
                shapes[name] = type(out).__name__
                return
            layout = layout_of(out, model, name, size)
            shown = channels_first(out, model, name, size) if layout != "nchw" else out
            shapes[name] = "x".join(map(str, shown.shape[1:])) + {"nchw": "", "nhwc": " (channels-last)", "tokens": " (tokens)"}[layout]
        handles.append(module.register_forward_hook(record))
    x = torch.zeros(1, *input_size)
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    roles = default_roles(model, x)
    return [(name, type(module).__name__, shapes.get(name, "(unused)"), ", ".join(roles.get(name, [])))
            for name, module in model.named_modules() if name]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vizkit-layers", description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="embedded", help="'embedded' or a timm model name")
    parser.add_argument("--checkpoint", default=None, help="local .safetensors or .pth weights")
    parser.add_argument("--num-classes", type=int, default=None)
    parser.add_argument("--filter", default="", help="only names containing this text")
    args = parser.parse_args(argv)
    try:
        from vizkit.core.models import data_config, load_model

        model = load_model(args.model, checkpoint=args.checkpoint, num_classes=args.num_classes)
        rows = [row for row in layer_table(model, data_config(model)["input_size"]) if args.filter in row[0]]
    except VizkitError as error:
        print(f"vizkit-layers: error: {error}", file=sys.stderr)  # user-facing
        sys.exit(2)
    width = max((len(name) for name, _, _, _ in rows), default=4)
    shape_width = max((len(shape) for _, _, shape, _ in rows), default=18)
    print(f"{'layer':<{width}}  {'type':<22} {'output (C x H x W)':<{shape_width}}  default for")  # user-facing
    for name, kind, shape, roles in rows:
        print(f"{name:<{width}}  {kind:<22} {shape:<{shape_width}}  {roles}".rstrip())  # user-facing


if __name__ == "__main__":
    main()
