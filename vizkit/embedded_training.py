"""Train the embedded default model: timm's ``test_resnet`` on the *shapes* data set.

The result ships in ``vizkit/assets/embedded/``: ``model.safetensors`` (the plain timm state
dict) and ``card.json`` (architecture, classes, preprocessing, held-out accuracy and how it was
trained). Run it with::

    vizkit-train-embedded --epochs 6 --train-size 16000 --seed 0
    python -m vizkit.embedded_training --out /tmp/embedded

Training uses PyTorch Lightning on the CPU by default. The training images come from the
``train`` split of `vizkit.shapes` (rendered into memory once), progress is checked on ``val``,
and the accuracy written to the card is measured afterwards on the ``test`` split, which the
training never sees. Augmentation is the eight flips/rotations of the square, under which every
shape class is unchanged.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from vizkit.shapes import IMAGE_SIZE, SHAPE_CLASSES, render_many, render_shape, split_seed

ARCHITECTURE = "test_resnet"
DEFAULT_OUT = Path(__file__).resolve().parent / "assets" / "embedded"
DEFAULT_SAMPLES = Path(__file__).resolve().parent / "assets" / "samples"
DEFAULT_EPOCHS = 6
DEFAULT_TRAIN_SIZE = 16000
DEFAULT_VAL_SIZE = 1000
HELD_OUT_SPLIT = "test"
HELD_OUT_COUNT = 2000


# --------------------------------------------------------------------------- data
def _render_chunk(args: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    start, count, seed = args
    images, _, labels = render_many(count, seed=seed, start=start)
    return images, labels


def render_split(split: str, count: int, *, workers: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, H, W, 3) uint8 and labels (N,) int64 for indices 0..count-1 of `split`."""
    seed = split_seed(split)
    chunk = 1000
    jobs = [(s, min(chunk, count - s), seed) for s in range(0, count, chunk)]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            parts = list(pool.map(_render_chunk, jobs))
    else:
        parts = [_render_chunk(j) for j in jobs]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def to_tensor_u8(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 array -> (N, 3, H, W) uint8 tensor."""
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images scaled to [0, 1], rounded to 4 decimals."""
    x = images.reshape(-1, 3).astype(np.float64) / 255.0
    return [round(float(v), 4) for v in x.mean(0)], [round(float(v), 4) for v in x.std(0)]


def normalize(x_u8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32 ``(x / 255 - mean) / std``."""
    return (x_u8.float().div_(255.0) - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


def dihedral_augment(x: torch.Tensor) -> torch.Tensor:
    """Apply a random one of the 8 square symmetries to each image of a (N, C, H, W) batch."""
    n = x.shape[0]
    pick = torch.randint(0, 2, (3, n, 1, 1, 1), dtype=torch.bool)
    x = torch.where(pick[0], x.flip(3), x)
    x = torch.where(pick[1], x.flip(2), x)
    return torch.where(pick[2], x.transpose(2, 3), x)


# --------------------------------------------------------------------------- model
def build_model(num_classes: int = len(SHAPE_CLASSES)) -> torch.nn.Module:
    import timm

    return timm.create_model(ARCHITECTURE, num_classes=num_classes, pretrained=False)


@torch.no_grad()
def evaluate(model: torch.nn.Module, images_u8: torch.Tensor, labels: torch.Tensor, mean: Sequence[float], std: Sequence[float], batch_size: int = 250) -> float:
    """Top-1 accuracy of `model` (put in eval mode) on uint8 (N, 3, H, W) images."""
    model.eval()
    m, s = torch.tensor(mean), torch.tensor(std)
    correct = 0
    for i in range(0, len(labels), batch_size):
        x = normalize(images_u8[i : i + batch_size], m, s).contiguous(memory_format=torch.channels_last)
        correct += int((model(x).argmax(1) == labels[i : i + batch_size]).sum())
    return correct / len(labels)


def _lightning_module(model: torch.nn.Module, mean: Sequence[float], std: Sequence[float], lr: float, weight_decay: float, total_steps: int):
    import pytorch_lightning as pl

    class ShapesClassifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.register_buffer("mean", torch.tensor(mean), persistent=False)
            self.register_buffer("std", torch.tensor(std), persistent=False)

        def _inputs(self, x_u8: torch.Tensor, augment: bool) -> torch.Tensor:
            x = normalize(x_u8, self.mean, self.std)
            if augment:
                x = dihedral_augment(x)
            return x.contiguous(memory_format=torch.channels_last)

        def training_step(self, batch, batch_idx):
            x, y = batch
            logits = self.model(self._inputs(x, augment=True))
            loss = torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.05)
            acc = (logits.argmax(1) == y).float().mean()
            self.log("loss", loss, prog_bar=True)
            self.log("acc", acc, prog_bar=True)
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            logits = self.model(self._inputs(x, augment=False))
            self.log("val_acc", (logits.argmax(1) == y).float().mean(), prog_bar=True, on_epoch=True)

        def configure_optimizers(self):
            decay, no_decay = [], []
            for p in self.model.parameters():
                (decay if p.ndim > 1 else no_decay).append(p)
            opt = torch.optim.AdamW(
                [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
            )
            sched = torch.optim.lr_scheduler.OneCycleLR(
                opt, max_lr=lr, total_steps=total_steps, pct_start=0.15, anneal_strategy="cos"
            )
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return ShapesClassifier()


# --------------------------------------------------------------------------- outputs
def save_samples(directory: Path, split: str = HELD_OUT_SPLIT) -> list[Path]:
    """Write the first image of each class in `split` as ``<class>_<index>.png``."""
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    seed, found, index = split_seed(split), {}, 0
    while len(found) < len(SHAPE_CLASSES):
        sample = render_shape(index, seed=seed)
        if sample.label not in found:
            found[sample.label] = (index, sample)
        index += 1
    paths = []
    for label in range(len(SHAPE_CLASSES)):
        i, sample = found[label]
        path = directory / f"{SHAPE_CLASSES[label]}_{i}.png"
        Image.fromarray(sample.image).save(path)
        paths.append(path)
    return paths


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="vizkit-train-embedded",
        description="Train the embedded default model (timm test_resnet) on the procedural shapes data set.",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder for model.safetensors and card.json (default: {DEFAULT_OUT})")
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help=f"training epochs (default: {DEFAULT_EPOCHS})")
    p.add_argument("--train-size", type=int, default=DEFAULT_TRAIN_SIZE, help=f"training images rendered from the train split (default: {DEFAULT_TRAIN_SIZE})")
    p.add_argument("--seed", type=int, default=0, help="seed for weights, shuffling and augmentation (default: 0)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    p.add_argument("--batch-size", type=int, default=64, help="batch size (default: 64)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of the one-cycle schedule (default: 3e-3)")
    p.add_argument("--accelerator", default="cpu", help="Lightning accelerator (default: cpu)")
    p.add_argument("--samples-dir", type=Path, default=DEFAULT_SAMPLES, help=f"where to write one sample PNG per class (default: {DEFAULT_SAMPLES})")
    p.add_argument("--no-samples", action="store_true", help="do not write the sample PNGs")
    args = p.parse_args(argv)
    for name in ("epochs", "train_size", "threads", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    import pytorch_lightning as pl
    import timm
    from safetensors.torch import save_file

    torch.set_num_threads(args.threads)
    pl.seed_everything(args.seed, workers=True, verbose=False)
    workers = max(1, min(args.threads, os.cpu_count() or 1))

    train_np, train_labels = render_split("train", args.train_size, workers=workers)
    val_np, val_labels = render_split("val", DEFAULT_VAL_SIZE, workers=workers)
    test_np, test_labels = render_split(HELD_OUT_SPLIT, HELD_OUT_COUNT, workers=workers)
    mean, std = channel_stats(train_np)

    train_x, val_x, test_x = to_tensor_u8(train_np), to_tensor_u8(val_np), to_tensor_u8(test_np)
    del train_np, val_np, test_np
    train_y, val_y, test_y = (torch.from_numpy(a) for a in (train_labels, val_labels, test_labels))

    from torch.utils.data import DataLoader, TensorDataset

    generator = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(TensorDataset(train_x, train_y), batch_size=args.batch_size, shuffle=True, drop_last=True, generator=generator)
    val_loader = DataLoader(TensorDataset(val_x, val_y), batch_size=250)
    steps = args.epochs * (len(train_y) // args.batch_size)

    model = build_model().to(memory_format=torch.channels_last)
    module = _lightning_module(model, mean, std, lr=args.lr, weight_decay=0.05, total_steps=max(1, steps))

    with tempfile.TemporaryDirectory(prefix="vizkit-train-") as root, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
        trainer = pl.Trainer(
            accelerator=args.accelerator,
            devices=1,
            max_epochs=args.epochs,
            logger=False,
            enable_checkpointing=False,
            default_root_dir=root,
            log_every_n_steps=10,
            num_sanity_val_steps=0,
        )
        start = time.perf_counter()
        trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader)
        train_seconds = time.perf_counter() - start

    model = module.model.cpu()
    accuracy = evaluate(model, test_x, test_y, mean, std)

    state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items() if v.is_floating_point()}
    state.update({k: v.detach().contiguous() for k, v in model.state_dict().items() if not v.is_floating_point()})
    args.out.mkdir(parents=True, exist_ok=True)
    weights_path = args.out / "model.safetensors"
    save_file(state, str(weights_path), metadata={"architecture": ARCHITECTURE, "format": "pt"})

    card = {
        "architecture": ARCHITECTURE,
        "num_classes": len(SHAPE_CLASSES),
        "classes": list(SHAPE_CLASSES),
        "input_size": [3, IMAGE_SIZE, IMAGE_SIZE],
        "mean": mean,
        "std": std,
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "held_out_accuracy": round(accuracy, 4),
        "held_out_split": HELD_OUT_SPLIT,
        "held_out_count": HELD_OUT_COUNT,
        "train_size": args.train_size,
        "epochs": args.epochs,
        "seed": args.seed,
        "train_seconds": round(train_seconds, 1),
        "train_command": f"vizkit-train-embedded --epochs {args.epochs} --train-size {args.train_size} --seed {args.seed}",
        "torch_version": torch.__version__,
        "timm_version": timm.__version__,
    }
    card_path = args.out / "card.json"
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    sample_paths = [] if args.no_samples else save_samples(args.samples_dir)

    print(f"held-out accuracy on {HELD_OUT_COUNT} '{HELD_OUT_SPLIT}' images: {accuracy:.4f}")  # user-facing
    print(f"trained {args.epochs} epochs on {args.train_size} images in {train_seconds:.0f} s")  # user-facing
    print(f"wrote {weights_path} ({weights_path.stat().st_size / 1e6:.2f} MB) and {card_path}")  # user-facing
    if sample_paths:
        print(f"wrote {len(sample_paths)} sample images to {args.samples_dir}")  # user-facing
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
