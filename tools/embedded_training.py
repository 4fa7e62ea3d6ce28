"""Train the embedded default model: timm's ``test_resnet`` on the *shapes* data set.

The result ships in ``vizkit/assets/embedded/``: ``model.safetensors`` (the plain timm state
dict) and ``card.json`` (architecture, classes, preprocessing, held-out accuracy and how it was
trained). Run it with::

    python tools/embedded_training.py --epochs 6 --train-size 20000 --seed 0
    python tools/embedded_training.py --out /tmp/embedded

Training uses PyTorch Lightning on the CPU by default. The training images come from the
``train`` split of `vizkit.core.shapes` (rendered into memory once), progress is checked on ``val``,
and the accuracy written to the card is measured afterwards on the ``test`` split, which the
training never sees. There is no augmentation: the generator already draws every rotation,
colour, size and position, so more rendered images serve better than transformed copies. To save
time, the first epochs run on a half-resolution copy of the training images (about five times
cheaper per image); the last epochs and all evaluation run at the native `IMAGE_SIZE`.

Localisation term (``--cam-weight``, default 0.5; 0 turns it off). Trained on labels alone, the
model's class-activation map on its last stage (a 4 x 4 grid at 128 px) lands on the object but
peaks, in about a quarter of the images, on a cell at the object's rim whose centre lies outside
the object (Grad-CAM pointing game ~0.75-0.80). Because the masks are known, training adds a
small cross-entropy between the softmax over grid cells of the true class's CAM
(``fc.weight[y] . features``; for this global-average-pool + linear head it has the same argmax
as Grad-CAM on ``layer4``) and the share of each cell covered by the target mask (restricted to
cells whose centre is on the object). The model is thereby *taught* to keep its last-stage
evidence on the object: attribution checks on it test an implementation, not the claim that
Grad-CAM localises well on models trained without such a term.
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
from torch.utils.data import Dataset

from vizkit.core.shapes import IMAGE_SIZE, SHAPE_CLASSES, render_many, render_shape, split_seed

ARCHITECTURE = "test_resnet"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "vizkit" / "assets" / "embedded"
DEFAULT_SAMPLES = Path(__file__).resolve().parents[1] / "vizkit" / "assets" / "samples"
DEFAULT_EPOCHS = 6
DEFAULT_LOW_RES_EPOCHS = 4
DEFAULT_TRAIN_SIZE = 20000
DEFAULT_CAM_WEIGHT = 0.5
DEFAULT_VAL_SIZE = 1000
HELD_OUT_SPLIT = "test"
HELD_OUT_COUNT = 2000


# --------------------------------------------------------------------------- data
def cell_targets(masks: np.ndarray, grid: int) -> np.ndarray:
    """(N, H, W) bool masks -> (N, grid, grid) float32 target distribution over grid cells.

    Each cell gets the share of its pixels on the object, kept only where the cell's centre
    (the 2 x 2 central pixels) is on the object too; rows sum to 1 (plain coverage is the
    fallback when no cell centre is on the object).
    """
    n, h, w = masks.shape
    ch, cw = h // grid, w // grid
    cells = masks[:, : ch * grid, : cw * grid].reshape(n, grid, ch, grid, cw)
    coverage = cells.mean(axis=(2, 4))
    centre = cells[:, :, ch // 2 - 1 : ch // 2 + 1, :, cw // 2 - 1 : cw // 2 + 1].mean(axis=(2, 4))
    target = coverage * centre
    empty = target.sum(axis=(1, 2)) == 0
    target[empty] = coverage[empty]
    return (target / np.maximum(target.sum(axis=(1, 2), keepdims=True), 1e-12)).astype(np.float32)


def _render_chunk(args: tuple[int, int, int, tuple[int, ...]]) -> tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]:
    start, count, seed, grids = args
    images, masks, labels = render_many(count, seed=seed, start=start)
    return images, labels, {g: cell_targets(masks, g) for g in grids}


def render_split(split: str, count: int, *, workers: int = 1, grids: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]:
    """Indices 0..count-1 of `split`: images (N, H, W, 3) uint8, labels (N,) int64 and, for
    each grid size in `grids`, the `cell_targets` of the masks (the masks themselves are dropped)."""
    seed = split_seed(split)
    chunk = 1000
    jobs = [(s, min(chunk, count - s), seed, tuple(grids)) for s in range(0, count, chunk)]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            parts = list(pool.map(_render_chunk, jobs))
    else:
        parts = [_render_chunk(j) for j in jobs]
    targets = {g: np.concatenate([p[2][g] for p in parts]) for g in grids}
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), targets


def half_resolution(images: torch.Tensor, chunk: int = 1000) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, H/2, W/2, 3) uint8, antialiased bilinear downsampling."""
    parts = []
    for i in range(0, len(images), chunk):
        x = images[i : i + chunk].permute(0, 3, 1, 2).float()
        x = torch.nn.functional.interpolate(x, scale_factor=0.5, mode="bilinear", antialias=True)
        parts.append(x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous())
    return torch.cat(parts)


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images scaled to [0, 1], rounded to 4 decimals."""
    counts = np.zeros((3, 256), dtype=np.int64)  # exact, via per-channel histograms of the byte values
    for i in range(0, len(images), 1000):
        chunk = images[i : i + 1000].reshape(-1, 3)
        for c in range(3):
            counts[c] += np.bincount(chunk[:, c], minlength=256)
    values = np.arange(256, dtype=np.float64)
    n = counts.sum(1)
    mean = counts @ values / n
    std = np.sqrt(counts @ values**2 / n - mean**2)
    return [round(float(v) / 255.0, 4) for v in mean], [round(float(v) / 255.0, 4) for v in std]


def normalize(x_u8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W) ``(x / 255 - mean) / std``, channels-last memory."""
    x = x_u8.permute(0, 3, 1, 2).float()  # a channels-last view: no copy of the pixels
    scale = (1.0 / (255.0 * std)).view(1, 3, 1, 1)
    return ((x * scale) - (mean / std).view(1, 3, 1, 1)).contiguous(memory_format=torch.channels_last)


class _TwoScaleImages(Dataset):
    """Training images, labels and CAM cell targets at native and half resolution; `low_res`
    picks which resolution is served."""

    def __init__(self, full: torch.Tensor, half: torch.Tensor | None, labels: torch.Tensor, full_targets: torch.Tensor, half_targets: torch.Tensor | None) -> None:
        self.full, self.half, self.labels = full, half, labels
        self.full_targets, self.half_targets = full_targets, half_targets
        self.low_res = half is not None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        if self.low_res:
            return self.half[i], self.labels[i], self.half_targets[i]
        return self.full[i], self.labels[i], self.full_targets[i]


# --------------------------------------------------------------------------- model
def build_model(num_classes: int = len(SHAPE_CLASSES)) -> torch.nn.Module:
    import timm

    return timm.create_model(ARCHITECTURE, num_classes=num_classes, pretrained=False)


@torch.no_grad()
def evaluate(model: torch.nn.Module, images_u8: torch.Tensor, labels: torch.Tensor, mean: Sequence[float], std: Sequence[float], batch_size: int = 250) -> float:
    """Top-1 accuracy of `model` (put in eval mode) on uint8 (N, H, W, 3) images."""
    model.eval()
    m, s = torch.tensor(mean), torch.tensor(std)
    correct = 0
    for i in range(0, len(labels), batch_size):
        x = normalize(images_u8[i : i + batch_size], m, s)
        correct += int((model(x).argmax(1) == labels[i : i + batch_size]).sum())
    return correct / len(labels)


def class_activation_map(model: torch.nn.Module, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CAM of class `labels` from last-stage features (N, C, h, w): ``fc.weight[y] . features``."""
    return torch.einsum("nchw,nc->nhw", features, model.get_classifier().weight[labels])


def _lightning_module(model: torch.nn.Module, mean: Sequence[float], std: Sequence[float], lr: float, weight_decay: float, total_steps: int, low_res_epochs: int, train_set: _TwoScaleImages, cam_weight: float):
    import pytorch_lightning as pl

    class ShapesClassifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.register_buffer("mean", torch.tensor(mean), persistent=False)
            self.register_buffer("std", torch.tensor(std), persistent=False)

        def on_train_epoch_start(self) -> None:
            train_set.low_res = train_set.half is not None and self.current_epoch < low_res_epochs

        def training_step(self, batch, batch_idx):
            x, y, target = batch
            features = self.model.forward_features(normalize(x, self.mean, self.std))
            logits = self.model.forward_head(features)
            loss = torch.nn.functional.cross_entropy(logits, y)
            self.log("acc", (logits.argmax(1) == y).float().mean(), prog_bar=True)
            if cam_weight > 0:
                cam = class_activation_map(self.model, features, y).flatten(1)
                cam_loss = -(target.flatten(1) * torch.log_softmax(cam, dim=1)).sum(1).mean()
                self.log("cam_loss", cam_loss, prog_bar=True)
                loss = loss + cam_weight * cam_loss
            self.log("loss", loss, prog_bar=True)
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            logits = self.model(normalize(x, self.mean, self.std))
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
        prog="tools/embedded_training.py",
        description="Train the embedded default model (timm test_resnet) on the procedural shapes data set.",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder for model.safetensors and card.json (default: {DEFAULT_OUT})")
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help=f"training epochs (default: {DEFAULT_EPOCHS})")
    p.add_argument("--train-size", type=int, default=DEFAULT_TRAIN_SIZE, help=f"training images rendered from the train split (default: {DEFAULT_TRAIN_SIZE})")
    p.add_argument("--seed", type=int, default=0, help="seed for the initial weights and the shuffling (default: 0); the data never changes")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    p.add_argument("--batch-size", type=int, default=64, help="batch size (default: 64)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of the one-cycle schedule (default: 3e-3)")
    p.add_argument("--low-res-epochs", type=int, default=DEFAULT_LOW_RES_EPOCHS, help=f"leading epochs trained at half resolution, which is ~5x cheaper (default: {DEFAULT_LOW_RES_EPOCHS}, capped at epochs - 1)")
    p.add_argument("--cam-weight", type=float, default=DEFAULT_CAM_WEIGHT, help=f"weight of the term that keeps the last-stage class-activation map on the object mask; 0 = labels only (default: {DEFAULT_CAM_WEIGHT})")
    p.add_argument("--accelerator", default="cpu", help="Lightning accelerator (default: cpu)")
    p.add_argument("--samples-dir", type=Path, default=DEFAULT_SAMPLES, help=f"where to write one sample PNG per class (default: {DEFAULT_SAMPLES})")
    p.add_argument("--no-samples", action="store_true", help="do not write the sample PNGs")
    args = p.parse_args(argv)
    for name in ("epochs", "train_size", "threads", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def _train_command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run (options left at their defaults are omitted)."""
    command = f"python tools/embedded_training.py --epochs {args.epochs} --train-size {args.train_size} --seed {args.seed}"
    for flag, value, default in (
        ("--low-res-epochs", args.low_res_epochs, DEFAULT_LOW_RES_EPOCHS),
        ("--batch-size", args.batch_size, 64),
        ("--lr", args.lr, 3e-3),
        ("--cam-weight", args.cam_weight, DEFAULT_CAM_WEIGHT),
    ):
        if value != default:
            command += f" {flag} {value}"
    return command


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    import pytorch_lightning as pl
    import timm
    from safetensors.torch import save_file

    torch.set_num_threads(args.threads)
    pl.seed_everything(args.seed, workers=True, verbose=False)
    workers = max(1, min(args.threads, os.cpu_count() or 1))

    full_grid, half_grid = max(1, IMAGE_SIZE // 32), max(1, IMAGE_SIZE // 64)  # last-stage grids (stride 32)
    train_np, train_labels, targets = render_split("train", args.train_size, workers=workers, grids=(full_grid, half_grid))
    val_np, val_labels, _ = render_split("val", DEFAULT_VAL_SIZE, workers=workers)
    test_np, test_labels, _ = render_split(HELD_OUT_SPLIT, HELD_OUT_COUNT, workers=workers)
    mean, std = channel_stats(train_np)

    train_x, val_x, test_x = (torch.from_numpy(a) for a in (train_np, val_np, test_np))  # (N, H, W, 3) uint8
    train_y, val_y, test_y = (torch.from_numpy(a) for a in (train_labels, val_labels, test_labels))
    low_res = max(0, min(args.low_res_epochs, args.epochs - 1))
    train_set = _TwoScaleImages(
        train_x,
        half_resolution(train_x) if low_res else None,
        train_y,
        torch.from_numpy(targets[full_grid]),
        torch.from_numpy(targets[half_grid]) if low_res else None,
    )

    from torch.utils.data import DataLoader, TensorDataset

    generator = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=True, generator=generator)
    val_loader = DataLoader(TensorDataset(val_x, val_y), batch_size=250)
    steps = args.epochs * (len(train_y) // args.batch_size)

    model = build_model().to(memory_format=torch.channels_last)
    module = _lightning_module(
        model, mean, std, lr=args.lr, weight_decay=0.05, total_steps=max(1, steps), low_res_epochs=low_res, train_set=train_set,
        cam_weight=args.cam_weight,
    )

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
    os.chmod(weights_path, 0o644)  # safetensors creates the file owner-only; it ships as package data

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
        "cam_weight": args.cam_weight,
        "training_note": ("labels plus a localisation term (cam_weight) that keeps the last stage's class-activation map "
                          "on the object mask: Grad-CAM pointing-game scores on this model check an implementation, "
                          "they do not show that Grad-CAM localises well in general") if args.cam_weight > 0 else "labels only",
        "train_command": _train_command(args),
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
