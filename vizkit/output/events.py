"""TensorBoard image events written directly: TFRecord framing with Google's C CRC-32C."""
from __future__ import annotations

import itertools
import os
import socket
import struct
import time
from pathlib import Path
from typing import BinaryIO

import numpy as np

from vizkit.output.png import png

IMAGE_EVENTS_SUFFIX = ".images"  # ends the name of the event file that holds the pictures
_EVENT_FILES = itertools.count()  # distinguishes image event files of one process started in the same second


def image_record(tag: str, picture: np.ndarray, step: int = 0, encoded: bytes | None = None, description: str = "") -> bytes:
    """One TensorBoard image event framed as a TFRecord; ``encoded``: the picture's PNG bytes when
    they already exist (encoded here otherwise); ``description``: what TensorBoard shows under the
    card's title for this run (markdown), e.g. the target explained and its probability."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata

    height, width = picture.shape[:2]
    channels = picture.shape[2] if picture.ndim == 3 else 1
    image = Summary.Image(height=height, width=width, colorspace=channels, encoded_image_string=png(picture) if encoded is None else encoded)
    value = Summary.Value(tag=tag, image=image)
    if description:
        value.metadata.CopyFrom(SummaryMetadata(summary_description=description))
    event = Event(wall_time=time.time(), step=step, summary=Summary(value=[value]))
    return tf_record(event.SerializeToString())


class EventFile:
    """A TensorBoard event file of vizkit's own, next to the logger's: the pictures (``.images``), a
    run's HParams session, a sweep's experiment. Named as TensorBoard's writer names its files
    (``events.out.tfevents.TIME.HOST.PID.N``), ending in ``suffix``; created on the first write."""

    def __init__(self, log_dir: Path, suffix: str = IMAGE_EVENTS_SUFFIX) -> None:
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{next(_EVENT_FILES)}{suffix}"
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

    def __enter__(self) -> "EventFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
