"""Occlusion (Zeiler & Fergus 2014, "Visualizing and Understanding Convolutional Networks", sec. 4.2).

Slide a square patch of a constant pixel value over the image; for every position, record how much
the target's probability drops. Each pixel's attribution is the mean drop over the windows that cover
it, so the map has the input's resolution:

    A(p) = mean over windows w containing p of [ P_c(x) - P_c(x with w filled) ]

Windows start at 0, stride, 2*stride, ...; when that grid does not reach the last row or column a final
window flush with the edge is added, so every pixel is covered. Where the grid fits exactly this equals
captum's ``Occlusion`` with ``sliding_window_shapes=(C, window, window)``, ``strides=(C, stride,
stride)`` and the fill as baseline, applied to the softmax output (captum leaves uncovered pixels 0/0).
Perturbed images are evaluated ``batch_size`` at a time; the clean image is evaluated once.

By default the perturbed images are evaluated incrementally (``vizkit.probes.incremental``, after
Nakandala et al. 2019, "Krypton"): each patch changes every layer's output only inside its projection
through the layers so far, so the clean image's activations are kept and only that region is recomputed,
batched over patch positions, until it covers most of a map; from there on the batch runs as plain
inference. The map equals the naive one up to float32 rounding. A model torch.fx cannot trace, or whose
traced graph does not reproduce its output, takes the naive path (``incremental=false`` asks for it)
and the run says so once; so does an op the engine cannot compute locally (it runs dense from there).
``notes()`` (results.json's ``method.notes``) records which path ran and where it turned dense.

``approximate=true`` is Krypton's approximate occlusion, labelled as such in results.json, the captions
and the TensorBoard tags (``NAME/panel_approximate``):

* adaptive drill-down: the windows on a grid ``coarse_factor`` (2) times the stride are evaluated; every
  other window's drop is estimated from them (bilinear in its position); the share ``drill_down`` (0.1)
  of all windows with the highest estimates is then evaluated, the rest keep their estimates. About
  35 % of the passes at the defaults. Measured against the exact maps (``benchmarks/approximate_limits.py``):
  the embedded model on 50 held-out shapes, mean Pearson correlation 0.985 (lowest 0.881), the same most
  important pixel in all 50; a random-weight resnet18 (224 px, 6 shapes upscaled) 0.868, the same pixel in
  5 of 6: below 0.95 there, and no rule for the drilled windows gets there with fewer passes: drilling
  exactly where the estimate is most wrong (an oracle) gives 0.943 at the defaults and 0.90 with the 30 %
  of the passes a 10x speed-up allows. On random weights the drops of windows two strides apart correlate
  0.18 (trained, embedded: 0.40), so the coarse pass says little about the windows between.
* projective-field thresholding: ``projective_threshold`` τ < 1 caps every changed region's side at τ of
  its map's, keeping its middle (the cells beyond are taken as unchanged). Off by default: at τ = 0.5 the
  correlation with the exact map fell to 0.59 (embedded) and 0.70 (resnet18) for a 1.4× gain over exact
  incremental inference on resnet18, because these models' last maps are 4-7 cells wide and a patch's
  influence there is not concentrated in the middle of its projective field.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from vizkit.core.errors import ConfigError
from vizkit.methods.attribution.occlusion_passes import IncrementalPasses, NaivePasses, Passes, drill_down, window_starts
from vizkit.methods.base import AttributionMethod

SCORES = ("probability", "logit")
__all__ = ["Occlusion", "OcclusionConfig", "window_starts"]


@dataclass
class OcclusionConfig:
    window: int = 16  # side of the square patch, in input pixels
    stride: int = 8  # step between patch positions
    fill: float = 0.5  # the patch's pixel value in [0, 1] (0.5: mid-gray), converted to the model's normalization
    batch_size: int = 8  # perturbed images per forward pass (on CPU, 4-8 measured fastest; raise it on a GPU); incremental passes take 4x
    score: str = "probability"  # drop of the target's softmax probability (the paper) or of its logit
    incremental: bool = True  # recompute only what each patch changes (exact); false: a whole forward per patch
    approximate: bool = False  # Krypton's approximate occlusion (the two fields below); results.json and the tags say so
    drill_down: float = 0.1  # approximate: share of the windows evaluated after the coarse pass, where its estimate is highest
    coarse_factor: int = 2  # approximate: the coarse pass's stride, in strides
    projective_threshold: float = 1.0  # approximate: a changed region's side grows to at most this share of its map's (1: no cap)

    def __post_init__(self) -> None:
        for field_name in ("window", "stride", "batch_size", "coarse_factor"):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"occlusion: {field_name} must be a positive integer, got {value!r}")
        if self.stride > self.window:
            raise ConfigError(f"occlusion: a stride ({self.stride}) larger than the window ({self.window}) leaves pixels no patch covers; use stride <= window")
        if not 0.0 <= self.fill <= 1.0:
            raise ConfigError(f"occlusion: fill is a pixel value in [0, 1], got {self.fill}")
        if self.score not in SCORES:
            raise ConfigError(f"occlusion: score must be one of {', '.join(SCORES)}, got '{self.score}'")
        if not 0.0 < self.projective_threshold <= 1.0:
            raise ConfigError(f"occlusion: projective_threshold is a share of a map's side in (0, 1], got {self.projective_threshold}")
        if not 0.0 <= self.drill_down <= 1.0:
            raise ConfigError(f"occlusion: drill_down is a share of the windows in [0, 1], got {self.drill_down}")


class Occlusion(AttributionMethod):
    name = "occlusion"
    description = "occlusion: drop of the target's probability under a sliding gray patch (Zeiler & Fergus 2014)"
    Config = OcclusionConfig

    def compute(self, model, x, target, pixels):
        config = self.config
        batch, _, height, width = x.shape
        if config.window > min(height, width):  # refused as captum does: the map would be constant along that side
            raise ConfigError(f"occlusion: the window ({config.window} px) is larger than the input ({height}x{width}): it would cover "
                              f"a whole side at every position and the map would not vary along it; use window <= {min(height, width)}")
        boxes = self._windows(height, width)  # (y0, y1, x0, x1) per window
        fill = pixels.fill(config.fill, x)  # [1,C,1,1]
        with torch.no_grad():
            clean_score = self._score(model, x, target)
            passes = self._passes(model, x, target, fill, clean_score)
            drops = torch.stack([drill_down(passes, b, boxes, height, width, config) if config.approximate else passes.drops(b, boxes)
                                 for b in range(batch)])  # [B, N], a target set's [B, N, K]
        self._record(passes)
        masks = torch.zeros(len(boxes), height, width, dtype=drops.dtype, device=x.device)
        for w, (y0, y1, x0, x1) in enumerate(boxes):
            masks[w, y0:y1, x0:x1] = 1
        masks = masks.flatten(1)  # [N, H*W]
        if drops.dim() == 3:
            drops = drops.transpose(1, 2)
        attribution = (drops @ masks) / masks.sum(0)  # mean drop over the windows covering each pixel
        return attribution.view(batch, *drops.shape[1:-1], 1, height, width)

    def compute_targets(self, model, x, targets, pixels):
        """A target set's maps from the same passes: every window's forward gives all K scores. The
        approximate mode picks its windows per target, so it runs once per target."""
        if self.config.approximate:
            return super().compute_targets(model, x, targets, pixels)
        return self.compute(model, x, targets, pixels)

    def _passes(self, model, x, target, fill, clean_score) -> Passes:
        """Incremental passes where the model and target allow, else whole forwards (and why, announced
        once when the cause is the model)."""
        config = self.config
        why = "incremental=false" if not config.incremental else None
        if why is None:
            threshold = config.projective_threshold if config.approximate else None
            passes, why = IncrementalPasses.prepare(model, x, target, fill, clean_score, self._select, config.batch_size, threshold)
            if passes is not None:
                return passes
            self._announce(f"occlusion: {why}, so every patch costs a whole forward (naive occlusion)")
        return NaivePasses(model, x, target, fill, clean_score, self._score, config.batch_size, why)

    def _record(self, passes: Passes) -> None:
        notes = passes.notes()
        if self.config.approximate:
            notes.update(approximate=True, drill_down=self.config.drill_down,
                         projective_threshold=self.config.projective_threshold if notes["path"] == "incremental" else None)
        self._notes = notes
        for message in passes.announcements():
            self._announce(message)

    def _announce(self, message: str) -> None:
        announced = self.__dict__.setdefault("_announced", set())
        if message not in announced:
            announced.add(message)
            warnings.warn(message, stacklevel=3)

    def notes(self) -> dict:
        return dict(self.__dict__.get("_notes", {}))

    def _windows(self, height: int, width: int) -> list[tuple[int, int, int, int]]:
        window, stride = self.config.window, self.config.stride
        wy, wx = min(window, height), min(window, width)
        return [(y, y + wy, x, x + wx) for y in window_starts(height, window, stride) for x in window_starts(width, window, stride)]

    def _score(self, model, x, target) -> torch.Tensor:
        return self._select(target.logits(model, x), target)

    def _select(self, logits, target) -> torch.Tensor:
        if self.config.score == "probability":
            return target.select(logits.softmax(1))
        return target.select(logits)
