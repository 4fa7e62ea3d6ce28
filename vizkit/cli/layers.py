"""``vizkit-layers MODEL``: the addressable layers of a model, with their output shapes.

These ``named_modules()`` names are what ``target=channel:LAYER:C``, ``neuron:LAYER:C:Y:X`` and
methods' ``layer`` fields take.
"""
from __future__ import annotations

import argparse
import sys

from vizkit.core.errors import VizkitError


def layer_table(model, input_size) -> list[tuple[str, str, str]]:
    """(name, type, output shape) for every named module, from one forward on a zero input."""
    import torch

    shapes: dict[str, str] = {}
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue
        def record(_m, _i, out, name=name):
            shapes.setdefault(name, "x".join(map(str, out.shape[1:])) if isinstance(out, torch.Tensor) else type(out).__name__)
        handles.append(module.register_forward_hook(record))
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_size))
    finally:
        for handle in handles:
            handle.remove()
    return [(name, type(module).__name__, shapes.get(name, "(unused)")) for name, module in model.named_modules() if name]


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
    width = max((len(name) for name, _, _ in rows), default=4)
    print(f"{'layer':<{width}}  {'type':<22} output (C x H x W)")  # user-facing
    for name, kind, shape in rows:
        print(f"{name:<{width}}  {kind:<22} {shape}")  # user-facing


if __name__ == "__main__":
    main()
