"""Shared fixtures: run the real `vizkit` command, compose real Hydra configs, read real event files."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VIZKIT = Path(sys.executable).parent / "vizkit"
# Under pytest-xdist (make test: two workers) each worker gets its share of the cores: torch's default
# of one thread per core would put both workers' OpenMP threads on every core, spinning against each
# other (the compare_attribution sweep: 39 s alone, 152 s beside the other worker). Tests that need two
# threads set them themselves.
THREADS = str(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))) \
    if os.environ.get("PYTEST_XDIST_WORKER") else "2"


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(int(THREADS))


class Run:
    def __init__(self, completed: subprocess.CompletedProcess, cwd: Path) -> None:
        self.returncode = completed.returncode
        self.stdout = completed.stdout
        self.stderr = completed.stderr
        self.cwd = cwd

    @property
    def run_dir(self) -> Path:
        for line in self.stdout.splitlines():
            if " -> " in line and line.startswith("vizkit:"):
                return Path(line.rsplit(" -> ", 1)[1].strip())
        raise AssertionError(f"no run directory in output:\n{self.stdout}\n{self.stderr}")

    @property
    def results(self) -> dict:
        return json.loads((self.run_dir / "results.json").read_text())


@pytest.fixture
def vizkit_cli(tmp_path):
    """Run the installed `vizkit` command in a fresh working directory (outputs/ lands there)."""

    def run(*args: str, env: dict | None = None, timeout: int = 300) -> Run:
        environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": THREADS, **(env or {})}
        completed = subprocess.run([str(VIZKIT), *args], cwd=tmp_path, capture_output=True, text=True, timeout=timeout, env=environment)
        return Run(completed, tmp_path)

    return run


@pytest.fixture
def compose():
    """The composed config for a list of overrides (Hydra's compose API, the same conf/ tree)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    from vizkit.cli.app import CONF_DIR, setup

    setup()

    def make(*overrides: str):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name="config", overrides=["trainer.progress_bar=false", *overrides])

    return make


@pytest.fixture(scope="module")
def embedded():
    """The embedded model (trained on the shapes set, 128 px, 6 classes), in eval mode."""
    import vizkit

    return vizkit.load_model("embedded")


@pytest.fixture(scope="module")
def embedded_samples(embedded):
    """The default data: the embedded model's sample images (one per class), pixels [6,3,128,128]."""
    import torch

    from vizkit.core.data import load_samples
    from vizkit.core.models import EMBEDDED_DIR, data_config

    found = load_samples({"kind": "images", "paths": [str(EMBEDDED_DIR.parent / "samples")]}, data_config(embedded))
    return torch.stack([sample.pixels for sample in found])


def model_state(model):
    """What a method must leave as it found it: parameters' requires_grad, modules' modes, hook count."""
    return ([p.requires_grad for p in model.parameters()], [m.training for m in model.modules()],
            sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()))


def read_events(log_dir: Path):
    """Every image and scalar TensorBoard holds for a run (default size guidance keeps only 4 images)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def images_in(run_dir: Path) -> dict[str, list]:
    """TensorBoard image tags -> events, over all event files of the run."""
    tags: dict[str, list] = {}
    for events in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        accumulator = read_events(events)
        for tag in accumulator.Tags()["images"]:
            tags.setdefault(tag, []).extend(accumulator.Images(tag))
    return tags


def hparams_in(run_dir: Path) -> dict[str, bytes]:
    """The hparams plugin's records (tags -> serialized content) over all event files of the run."""
    content: dict[str, bytes] = {}
    for events in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        try:
            content.update(read_events(events).PluginTagToContent("hparams"))
        except KeyError:  # this event file holds no hparams records
            pass
    return content


def write_image(path: Path, size=(80, 60), mode="RGB", seed=0) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    width, height = size
    if mode in ("I;16", "I"):
        array = rng.integers(0, 65535, (height, width)).astype(np.uint16)
        Image.fromarray(array).save(path)
    else:
        channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
        array = rng.integers(0, 255, (height, width, channels)).astype(np.uint8).squeeze()
        Image.fromarray(array, mode=mode).save(path)
    return path


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    see ``tiny_models.single_thread``."""
    from tiny_models import single_thread

    with single_thread():
        yield
