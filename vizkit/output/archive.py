"""maps.npz written one map at a time, never half a file under its own name."""
from __future__ import annotations

import errno
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np


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
