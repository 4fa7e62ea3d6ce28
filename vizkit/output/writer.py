"""What a run leaves behind, inside Hydra's run directory:

    .hydra/            the composed config (written by Hydra)
    tensorboard/       event files: one picture per input tagged INPUT/panel, scalars, the HParams session
    images/INPUT.png   the same picture: a caption over input | map | overlay, side by side
    maps.npz           the raw maps, by input name
    results.json       predictions, targets, metrics, timings
    results.csv        one row per input: its name, target, prediction, metrics

Nothing is ever overwritten: a directory that already holds results is refused.

Writing the pictures used to cost more than a gradient method itself (4 PNG encodes per input, and
TensorBoard's writer checksums every record with a pure-Python CRC-32C holding the GIL: ~17 ms per
224-px picture). So each input gets one picture, the input | map | overlay panel, PNG-encoded once
(``vizkit.output.png``) and used twice: as the file on disk and as the TensorBoard image, which goes to an
event file of its own in the same TensorBoard directory, framed here with Google's C CRC-32C
(TensorBoard merges the event files of a directory). One panel costs half of the four encodes it
replaced (three TensorBoard images and the panel) and shows the same pixels in both places. Scalars
still go through the logger's writer.

Tags name what is shown (``INPUT/panel``), never the method or a setting: TensorBoard compares runs
within one card, so the same input of a sweep over methods or over ε lines up, one run per row. What
differs between runs (the target and its probability, the method, a perturbation's amplification)
goes into the picture's caption and the image's description.
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vizkit.core import pictures
from vizkit.core.errors import VizkitError
from vizkit.output.archive import MapArchive
from vizkit.output.events import EventFile, image_record
from vizkit.output.png import png

RESULTS = "results.json"
RESULTS_CSV = "results.csv"  # one row per input, for a spreadsheet or pandas
MAPS = "maps.npz"
TENSORBOARD_DIR = "tensorboard"


def check_fresh(run_dir: Path) -> None:
    if (run_dir / RESULTS).exists():
        raise VizkitError(f"{run_dir} already holds the results of an earlier run; choose another hydra.run.dir")


class RunWriter:
    """Writes one run's pictures, maps and results; ``writer``: a TensorBoard SummaryWriter for the
    scalars (the logger's; rank 0's only in a multi-device run), ``log_dir``: its directory, which
    also receives this process's image event file.

    In a multi-device run every rank has a RunWriter: each writes its own inputs' pictures (to disk
    and to an image event file of its own) and its maps to an archive of its own, which rank 0 adds
    to maps.npz (``adopt_rank_maps``) before it writes the results.
    """

    def __init__(self, run_dir: Path, writer: Any, log_dir: Path | None = None, rank: int = 0,
                 render: pictures.Render | None = None) -> None:
        self.run_dir = run_dir
        self.render = render or pictures.Render()
        self.writer = writer
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.rank = rank
        self.maps = MapArchive(run_dir / (MAPS if rank == 0 else f".maps-rank{rank}.npz"))
        self.image_events: EventFile | None = None
        (run_dir / "images").mkdir(parents=True, exist_ok=True)

    def add_attribution(self, name: str, pixels: torch.Tensor, attribution: torch.Tensor, caption: str = "") -> str:
        """Log one input's map; returns the PNG's path relative to the run directory."""
        return self.add_attributions([(name, pixels, attribution, caption)])[0]

    def _render(self, name: str, pixels: torch.Tensor, attribution: torch.Tensor, caption: str, tag: bool,
                panel: str = "panel") -> tuple[str, bytes, np.ndarray]:
        """Draw one input's panel (``caption`` above it), encode it once, write it to disk; returns the
        panel's relative path, its TensorBoard record (the same PNG bytes; empty when ``tag`` is
        false) and the map."""
        heat, overlay = pictures.heat_and_overlay(pixels, attribution, self.render)
        picture = pictures.panel([pictures.to_uint8(pixels), heat, overlay])
        if caption:
            picture = pictures.caption(picture, [caption])
        encoded = png(picture)
        relative = f"images/{name}.png"
        with open(self.run_dir / relative, "xb") as file:  # never replace an earlier picture
            file.write(encoded)
        record = image_record(f"{name}/{panel}", picture, encoded=encoded, description=caption) if tag else b""
        return relative, record, attribution.float().cpu().numpy()

    def add_attributions(self, items: list[tuple[str, torch.Tensor, torch.Tensor, str]], tensorboard: list[bool] | None = None,
                         panel: str = "panel") -> list[str]:
        """``add_attribution`` for many inputs ``(name, pixels, map, caption)`` at once, rendered in
        parallel (zlib and numpy release the GIL), the TensorBoard records written in input order;
        ``tensorboard``: which of them also become TensorBoard images (all by default; every one is on disk)."""
        tags = tensorboard or [True] * len(items)
        workers = max(1, min(len(items), os.cpu_count() or 1, 8))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            rendered = list(pool.map(lambda item: self._render(*item[0], item[1], panel), zip(items, tags)))
        for (name, *_), (_, _, attribution) in zip(items, rendered):
            self.maps.add(name, attribution)
        self._write_events(b"".join(record for _, record, _ in rendered))
        return [relative for relative, _, _ in rendered]

    def add_image_batch(self, names: list[str], pixels: torch.Tensor, step: int, descriptions: list[str] | None = None) -> None:
        """A batch of images (pixels [B,3,H,W] in [0, 1]) at one optimization step, tagged NAME/image:
        TensorBoard's step slider then shows each image forming."""
        shown = [pictures.to_uint8(image) for image in pixels]
        descriptions = descriptions or [""] * len(names)
        self._events().write(b"".join(image_record(f"{name}/image", picture, step=step, description=description)
                                      for name, picture, description in zip(names, shown, descriptions)))

    def save_picture(self, name: str, picture: np.ndarray) -> str:
        """A picture as images/NAME.png; returns its path relative to the run directory."""
        relative = f"images/{name}.png"
        with open(self.run_dir / relative, "xb") as file:  # never replace an earlier picture
            file.write(png(picture))
        return relative

    def add_picture(self, name: str, tag: str, picture: np.ndarray, description: str = "") -> str:
        """A picture encoded once, written as images/NAME.png and as the TensorBoard image TAG;
        returns the path relative to the run directory."""
        encoded = png(picture)
        relative = f"images/{name}.png"
        with open(self.run_dir / relative, "xb") as file:  # never replace an earlier picture
            file.write(encoded)
        self._events().write(image_record(tag, picture, encoded=encoded, description=description))
        return relative

    def add_panels(self, items: list[tuple[str, str, list[np.ndarray], str]], tensorboard: list[bool] | None = None) -> list[str]:
        """Pictures side by side, one panel per item ``(name, tag, pictures, caption)`` (the caption
        above them, and the image's description): encoded once (in parallel), written as
        images/NAME.png and (``tensorboard``: which; all by default) as the TensorBoard image TAG;
        returns the paths."""

        def encode(item: tuple[tuple[str, str, list[np.ndarray], str], bool]) -> tuple[str, bytes]:
            (name, tag, parts, caption), to_tensorboard = item
            picture = pictures.panel(parts)
            if caption:
                picture = pictures.caption(picture, [caption])
            encoded = png(picture)
            relative = f"images/{name}.png"
            with open(self.run_dir / relative, "xb") as file:  # never replace an earlier picture
                file.write(encoded)
            return relative, image_record(tag, picture, encoded=encoded, description=caption) if to_tensorboard else b""

        with ThreadPoolExecutor(max_workers=max(1, min(len(items), os.cpu_count() or 1, 8))) as pool:
            encoded = list(pool.map(encode, zip(items, tensorboard or [True] * len(items))))
        self._write_events(b"".join(record for _, record in encoded))
        return [relative for relative, _ in encoded]

    def _write_events(self, records: bytes) -> None:
        if records:
            self._events().write(records)

    def _events(self) -> "EventFile":
        if self.image_events is None:
            self.image_events = EventFile(self.log_dir if self.log_dir is not None else Path(self.writer.get_logdir()))
        return self.image_events

    def end_rank(self) -> None:
        """This process's part of a streamed run is written: its maps archive is closed, and on the
        other ranks (which write nothing more) the image event file too."""
        self.maps.close()
        if self.rank != 0 and self.image_events is not None:
            self.image_events.close()

    def adopt_rank_maps(self, world_size: int) -> None:
        """Rank 0: the other ranks' maps (their archives, closed before the gather's barrier) into maps.npz."""
        for rank in range(1, world_size):
            self.maps.adopt(self.run_dir / f".maps-rank{rank}.npz")

    def add_scalars(self, values: dict[str, float], step: int = 0) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def finish(self, results: dict[str, Any], rows: list[dict[str, Any]] | None = None, failed: bool = False) -> Path:
        """results.csv (``rows``: one per input) and results.json, with the run's ``status`` first:
        ``finished``, ``interrupted`` when a signal stopped the run early (what finished is in it), or
        ``failed`` (what was done before is in it, ``error`` says why)."""
        from vizkit.core import interrupt

        self.maps.close()
        results["status"] = "failed" if failed else "interrupted" if interrupt.received() is not None else "finished"
        if rows:
            write_csv_once(self.run_dir / RESULTS_CSV, rows)
        path = write_json_once(self.run_dir / RESULTS, {"status": results["status"], **results})
        if self.image_events is not None:
            self.image_events.close()
        self.writer.flush()
        return path


def write_csv_once(path: Path, rows: list[dict[str, Any]]) -> Path:
    """``rows`` as CSV at ``path`` (which must not exist), the columns in first-seen order: rows
    that lack a column leave it empty."""
    import csv
    import io

    columns = list(dict.fromkeys(column for row in rows for column in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    with open(path, "x", newline="") as file:  # never replaces an earlier run's
        file.write(text.getvalue())
    return path


def write_json_once(path: Path, value: Any) -> Path:
    """`value` as JSON at `path`, all or nothing: written to a temporary name, then linked to `path`,
    which must not exist (an earlier run's file is never replaced, a reader never sees half a file)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "x") as file:
            json.dump(value, file, indent=2)
            file.flush()
            os.fsync(file.fileno())
        os.link(temporary, path)  # fails if `path` exists
    finally:
        temporary.unlink(missing_ok=True)
    return path
