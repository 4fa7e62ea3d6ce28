"""What a run is told: typed settings, with every default in one place.

``vizkit.cli`` builds a ``RunSettings`` from Hydra's composed config (the same dataclasses are Hydra's
schemas there); from Python, build one directly. Nothing in ``vizkit.run`` reads a DictConfig.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vizkit.core.data import DataConfig, ImagesData
from vizkit.core.pictures import Render
from vizkit.core.errors import ConfigError
from vizkit.core.models import ModelConfig
from vizkit.core.validate import whole_number

ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
PRECISIONS = ("32-true", "32", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true", "64", "transformer-engine")
ALL = 1 << 62  # tensorboard_images=all


@dataclass
class TrainerConfig:
    """The Lightning Trainer's settings (``trainer=`` on the command line): GPU when present, else CPU."""

    accelerator: str = "auto"  # auto | cpu | gpu | cuda | mps | tpu
    devices: Any = 1  # a count, a list of device ids, auto or -1 (every device Lightning finds)
    strategy: str = "auto"  # auto | ddp | ... (Lightning's)
    precision: Any = "32-true"  # 32-true | 16-mixed | bf16-mixed | 64-true | ...
    progress_bar: bool = True

    def check(self) -> None:
        """Refuse settings Lightning would take badly, before anything loads."""
        import torch

        if str(self.accelerator) not in ACCELERATORS:
            raise ConfigError(f"trainer.accelerator must be one of {', '.join(ACCELERATORS)}, got '{self.accelerator}'")
        if str(self.accelerator) in ("gpu", "cuda") and not torch.cuda.is_available():
            raise ConfigError(f"trainer.accelerator={self.accelerator}, but no GPU is visible to torch here: use trainer.accelerator=auto "
                              f"(a GPU when there is one, else the CPU) or cpu")
        if str(self.devices).strip() not in ("auto", "-1") and not isinstance(self.devices, (list, tuple)):
            whole_number("trainer.devices", self.devices, 1)  # -1 and auto: every device Lightning finds
        if str(self.precision) not in PRECISIONS:
            raise ConfigError(f"trainer.precision must be one of {', '.join(PRECISIONS)}, got '{self.precision}'")


@dataclass
class RunSettings:
    """One run: a method (configured), a model, data, the Trainer, and the top-level fields."""

    method: Any = None  # a vizkit.methods.base.Method, configured
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=ImagesData)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    metrics: list[Any] = field(default_factory=list)  # vizkit.metrics.base.Metric instances (attribution runs)
    target: Any = "predicted"  # predicted | class:... | channel:... | ..., or a list (optimization: a weighted sum; attribution: a target set, as top:K)
    seed: int | None = 0  # torch's global seed before the run (None: left alone)
    tensorboard_images: Any = 100  # pictures of the first N inputs also go to TensorBoard (N | all)
    render: Render = field(default_factory=Render)  # how maps are drawn: colormap, overlay opacity, percentile clipping
    image_checkpoint: bool = False  # optimization: Lightning's checkpoint of the image and its optimizer (checkpoints/image.ckpt)

    def check(self) -> None:
        if self.method is None:
            raise ConfigError("no method: choose one with method=NAME")
        if self.seed is not None:
            self.seed = whole_number("seed", self.seed, 0, 2**63 - 1)
        if self.tensorboard_images is not None and str(self.tensorboard_images) != "all":
            try:
                whole_number("tensorboard_images", self.tensorboard_images, 0)
            except ConfigError as error:
                raise ConfigError(f"{error}; or 'all'") from None
        self.trainer.check()
        self.render.check()

    @property
    def pictures_to_tensorboard(self) -> int:
        """How many inputs' pictures also go to TensorBoard (the first N by input order, whatever the
        devices): every picture is in images/, but 50,000 in one event file would not open."""
        limit = self.tensorboard_images
        return ALL if limit is None or str(limit) == "all" else int(limit)
