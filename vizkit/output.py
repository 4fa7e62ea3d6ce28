"""What a run leaves behind, inside Hydra's run directory:

    .hydra/            the composed config (written by Hydra)
    tensorboard/       event files: one picture per input tagged METHOD/INPUT, scalars, hparams
    images/INPUT.png   the same picture: input | map | overlay, side by side
    maps.npz           the raw maps, by input name
    results.json       predictions, targets, metrics, timings

Nothing is ever overwritten: a directory that already holds results is refused.

Writing the pictures used to cost more than a gradient method itself (4 PNG encodes per input, and
TensorBoard's writer checksums every record with a pure-Python CRC-32C holding the GIL: ~17 ms per
224-px picture). So each input gets one picture, the input | map | overlay panel, PNG-encoded once
(``render.png``) and used twice: as the file on disk and as the TensorBoard image, which goes to an
event file of its own in the same TensorBoard directory, framed here with Google's C CRC-32C
(TensorBoard merges the event files of a directory). One panel costs half of the four encodes it
replaced (three TensorBoard images and the panel) and shows the same pixels in both places. Scalars
and hparams still go through the logger's writer.
"""
from __future__ import annotations

import errno
import itertools
import json
import os
import shutil
import socket
import struct
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from vizkit import render
from vizkit.errors import VizkitError

RESULTS = "results.json"
MAPS = "maps.npz"
TENSORBOARD_DIR = "tensorboard"
IMAGE_EVENTS_SUFFIX = ".images"  # ends the name of the event file that holds the pictures
_EVENT_FILES = itertools.count()  # distinguishes image event files of one process started in the same second


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

    def __init__(self, run_dir: Path, method_name: str, writer: Any, log_dir: Path | None = None, rank: int = 0) -> None:
        self.run_dir = run_dir
        self.method_name = method_name
        self.writer = writer
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.rank = rank
        self.maps = MapArchive(run_dir / (MAPS if rank == 0 else f".maps-rank{rank}.npz"))
        self.image_events: ImageEventFile | None = None
        (run_dir / "images").mkdir(parents=True, exist_ok=True)

    def add_attribution(self, name: str, pixels: torch.Tensor, attribution: torch.Tensor) -> str:
        """Log one input's map; returns the PNG's path relative to the run directory."""
        return self.add_attributions([(name, pixels, attribution)])[0]

    def _render(self, name: str, pixels: torch.Tensor, attribution: torch.Tensor, tag: bool) -> tuple[str, bytes, np.ndarray]:
        """Draw one input's panel, encode it once, write it to disk; returns the panel's relative path,
        its TensorBoard record (the same PNG bytes; empty when ``tag`` is false) and the map."""
        heat = render.colorize(attribution)
        picture = render.panel([render.to_uint8(pixels), heat, render.overlay(pixels, attribution, heat=heat)])
        encoded = render.png(picture)
        relative = f"images/{name}.png"
        with open(self.run_dir / relative, "xb") as file:  # never replace an earlier picture
            file.write(encoded)
        record = image_record(f"{self.method_name}/{name}", picture, encoded=encoded) if tag else b""
        return relative, record, attribution.float().cpu().numpy()

    def add_attributions(self, items: list[tuple[str, torch.Tensor, torch.Tensor]], tensorboard: list[bool] | None = None) -> list[str]:
        """``add_attribution`` for many inputs at once, rendered in parallel (zlib and numpy release
        the GIL), the TensorBoard records written in input order; ``tensorboard``: which of them
        also become TensorBoard images (all by default; every one is on disk)."""
        tags = tensorboard or [True] * len(items)
        workers = max(1, min(len(items), os.cpu_count() or 1, 8))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            rendered = list(pool.map(lambda item: self._render(*item[0], item[1]), zip(items, tags)))
        for (name, _, _), (_, _, attribution) in zip(items, rendered):
            self.maps.add(name, attribution)
        self._write_events(b"".join(record for _, record, _ in rendered))
        return [relative for relative, _, _ in rendered]

    def add_image_batch(self, names: list[str], pixels: torch.Tensor, step: int) -> None:
        """A batch of images (pixels [B,3,H,W] in [0, 1]) at one optimization step, tagged METHOD/NAME:
        TensorBoard's step slider then shows each image forming."""
        pictures = [render.to_uint8(image) for image in pixels]
        self._events().write(b"".join(image_record(f"{self.method_name}/{name}", picture, step=step) for name, picture in zip(names, pictures)))

    def save_picture(self, name: str, picture: np.ndarray) -> str:
        """A picture as images/NAME.png; returns its path relative to the run directory."""
        relative = f"images/{name}.png"
        with open(self.run_dir / relative, "xb") as file:  # never replace an earlier picture
            file.write(render.png(picture))
        return relative

    def add_picture(self, name: str, tag: str, picture: np.ndarray) -> str:
        """A picture encoded once, written as images/NAME.png and as the TensorBoard image TAG;
        returns the path relative to the run directory."""
        encoded = render.png(picture)
        relative = f"images/{name}.png"
        with open(self.run_dir / relative, "xb") as file:  # never replace an earlier picture
            file.write(encoded)
        self._events().write(image_record(tag, picture, encoded=encoded))
        return relative

    def add_panels(self, items: list[tuple[str, str, list[np.ndarray]]], tensorboard: list[bool] | None = None) -> list[str]:
        """Pictures side by side, one panel per item ``(name, tag, pictures)``: encoded once (in
        parallel), written as images/NAME.png and (``tensorboard``: which; all by default) as the
        TensorBoard image TAG; returns the paths."""

        def encode(item: tuple[tuple[str, str, list[np.ndarray]], bool]) -> tuple[str, bytes]:
            (name, tag, pictures), to_tensorboard = item
            picture = render.panel(pictures)
            encoded = render.png(picture)
            relative = f"images/{name}.png"
            with open(self.run_dir / relative, "xb") as file:  # never replace an earlier picture
                file.write(encoded)
            return relative, image_record(tag, picture, encoded=encoded) if to_tensorboard else b""

        with ThreadPoolExecutor(max_workers=max(1, min(len(items), os.cpu_count() or 1, 8))) as pool:
            encoded = list(pool.map(encode, zip(items, tensorboard or [True] * len(items))))
        self._write_events(b"".join(record for _, record in encoded))
        return [relative for relative, _ in encoded]

    def _write_events(self, records: bytes) -> None:
        if records:
            self._events().write(records)

    def _events(self) -> "ImageEventFile":
        if self.image_events is None:
            self.image_events = ImageEventFile(self.log_dir if self.log_dir is not None else Path(self.writer.get_logdir()))
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

    def finish(self, results: dict[str, Any]) -> Path:
        """results.json, with the run's ``status`` first: ``finished``, or ``interrupted`` when a
        signal stopped the run early (what finished is in it)."""
        from vizkit import interrupt

        self.maps.close()
        results["status"] = "interrupted" if interrupt.received() is not None else "finished"
        path = write_json_once(self.run_dir / RESULTS, {"status": results["status"], **results})
        if self.image_events is not None:
            self.image_events.close()
        self.writer.flush()
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


class MapArchive:
    """maps.npz written one map at a time, as ``np.savez`` writes it (a zip of NAME.npy; ``np.load``
    reads it the same), so a data set's maps never sit in memory together. Created on the first map.

    The archive grows under a hidden name (``.maps.npz.partial``) and takes its own name when closed:
    a run that dies half-way (a full disk, SIGKILL) leaves no maps.npz that ``np.load`` cannot read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.partial = path.with_name(f".{path.name}.partial")
        self.zip: zipfile.ZipFile | None = None
        self.created = False

    def _open(self) -> zipfile.ZipFile:
        if self.zip is None:  # "x" the first time: never add to an earlier run's archive
            if self.created and self.path.exists():  # closed once already (rank 0 then adopts the other ranks')
                os.replace(self.path, self.partial)
            elif not self.created and self.path.exists():
                raise FileExistsError(errno.EEXIST, "an earlier run's maps are there", str(self.path))
            self.zip = zipfile.ZipFile(self.partial, "a" if self.created else "x", allowZip64=True)
            self.created = True
        return self.zip

    def add(self, name: str, array: np.ndarray) -> None:
        with self._open().open(f"{name}.npy", "w", force_zip64=True) as file:
            np.lib.format.write_array(file, np.ascontiguousarray(array), allow_pickle=False)

    def adopt(self, other: Path) -> None:
        """Every map of another archive (then removed), copied as stored."""
        if not other.exists():
            return
        archive = self._open()
        with zipfile.ZipFile(other) as source:
            for info in source.infolist():
                with source.open(info) as reader, archive.open(info.filename, "w", force_zip64=True) as writer:
                    shutil.copyfileobj(reader, writer, 1 << 20)
        other.unlink()

    def close(self) -> None:
        if self.zip is not None:
            self.zip.close()
            self.zip = None
            os.link(self.partial, self.path)  # whole, under its name; never over an earlier file
            self.partial.unlink()


# ------------------------------------------------------------------ TensorBoard image events


def image_record(tag: str, picture: np.ndarray, step: int = 0, encoded: bytes | None = None) -> bytes:
    """One TensorBoard image event framed as a TFRecord; ``encoded``: the picture's PNG bytes when
    they already exist (encoded here otherwise)."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary

    height, width = picture.shape[:2]
    channels = picture.shape[2] if picture.ndim == 3 else 1
    image = Summary.Image(height=height, width=width, colorspace=channels, encoded_image_string=render.png(picture) if encoded is None else encoded)
    event = Event(wall_time=time.time(), step=step, summary=Summary(value=[Summary.Value(tag=tag, image=image)]))
    return tf_record(event.SerializeToString())


class ImageEventFile:
    """A TensorBoard event file of its own for the pictures, next to the logger's. Named as
    TensorBoard's writer names its files (``events.out.tfevents.TIME.HOST.PID.N``), ending in
    ``.images``; created on the first write."""

    def __init__(self, log_dir: Path) -> None:
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{next(_EVENT_FILES)}{IMAGE_EVENTS_SUFFIX}"
        self.path = log_dir / name
        self.file: BinaryIO | None = None

    def write(self, records: bytes) -> None:
        if self.file is None:
            from tensorboard.compat.proto.event_pb2 import Event

            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "xb")
            self.file.write(tf_record(Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString()))
        self.file.write(records)
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def tf_record(data: bytes) -> bytes:
    """TFRecord framing: uint64 length, masked CRC-32C of the length, data, masked CRC-32C of the data."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


def masked_crc32c(data: bytes) -> int:
    """TFRecord's checksum: CRC-32C (Google's C implementation; TensorBoard's own is pure Python and
    cost ~17 ms per 224-px picture), rotated and offset."""
    import google_crc32c

    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
