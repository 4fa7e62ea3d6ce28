"""How occlusion gets the score drops of its windows: whole forwards of the occluded images
(``NaivePasses``), incremental inference on the clean image's kept activations (``IncrementalPasses``,
``vizkit.probes.incremental``), and Krypton's adaptive drill-down over either (``drill_down``).

A ``Passes`` answers ``drops(b, boxes)``: the drop of input b's target score when each box (y0, y1, x0,
x1) is filled, ``batch_size`` windows a pass, and says which path ran (``notes``) and what the user
should hear once (``announcements``).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

Box = tuple[int, int, int, int]  # (y0, y1, x0, x1), ends exclusive


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start offsets along one axis; the last window ends exactly at the edge."""
    window = min(window, length)
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] + window < length:
        starts.append(length - window)
    return starts


class Passes:
    def drops(self, b: int, boxes: list[Box]) -> torch.Tensor:
        raise NotImplementedError

    def notes(self) -> dict[str, Any]:
        raise NotImplementedError

    def announcements(self) -> list[str]:
        return []


class NaivePasses(Passes):
    """A whole forward per occluded image."""

    def __init__(self, model, x, target, fill, clean_score, score: Callable, batch_size: int, why: str | None) -> None:
        self.model, self.x, self.target, self.fill, self.clean_score = model, x, target, fill, clean_score
        self.score, self.batch_size, self.why = score, batch_size, why

    def drops(self, b: int, boxes: list[Box]) -> torch.Tensor:
        out = []
        for start in range(0, len(boxes), self.batch_size):
            chunk = boxes[start : start + self.batch_size]
            perturbed = self.x[b : b + 1].repeat(len(chunk), 1, 1, 1)  # a copy: x itself is never written
            for row, (y0, y1, x0, x1) in enumerate(chunk):
                perturbed[row, :, y0:y1, x0:x1] = self.fill[0]
            images = torch.full((len(chunk),), b, device=self.x.device, dtype=torch.long)
            out.append(self.clean_score[b] - self.score(self.model, perturbed, self.target.take(images)))
        return torch.cat(out) if out else self.clean_score.new_empty(0)

    def notes(self) -> dict[str, Any]:
        return {"path": "naive", "reason": self.why}


class IncrementalPasses(Passes):
    """Per input, the clean image's activations kept; each pass recomputes only what its windows change."""

    # windows per pass, in naive passes' images: an incremental pass is small until it turns dense, and a
    # small model's passes are mostly per-op overhead. Measured (1 thread): the embedded model 1.8x faster at
    # 4x (32 windows) than at 8, resnet18 at 224 px the same
    WINDOWS_PER_IMAGE = 4

    def __init__(self, engine, x, target, fill, clean_score, select: Callable, batch_size: int) -> None:
        self.engine, self.x, self.target, self.fill, self.clean_score = engine, x, target, fill, clean_score
        self.select, self.batch_size = select, batch_size * self.WINDOWS_PER_IMAGE
        self.run: Any = None
        self.run_of: int | None = None
        self.reports: list[Any] = []

    @classmethod
    def prepare(cls, model, x, target, fill, clean_score, select, batch_size, threshold) -> tuple["IncrementalPasses | None", str]:
        """(the passes, "") or (None, why not): the model traced, its graph run on every input and
        checked against the model's own score (fx may have specialized a branch at trace time, and a
        data-dependent one could hold for one input and not the next). One clean forward per input
        more than the windows' hundreds, and no mismatch can surface half-way through the windows."""
        from vizkit.probes.incremental import IncrementalModel

        engine, why = IncrementalModel.prepare(model, threshold=threshold)
        if engine is None:
            return None, why
        passes = cls(engine, x, target, fill, clean_score, select, batch_size)
        try:
            for b in range(x.shape[0]):
                passes._clean(b)
        except _Unfaithful as error:
            return None, str(error)
        except Exception as error:  # an op whose argument fx turned into a proxy, say
            text = str(error).strip()
            return None, f"the traced graph fails ({type(error).__name__}: {text.splitlines()[0][:160] if text else ''})"
        return passes, ""

    def _clean(self, b: int):
        if self.run_of != b:
            run = self.engine.clean(self.x[b : b + 1])
            output = run.output
            if not (isinstance(output, torch.Tensor) and output.dim() == 2 and output.shape[0] == 1):
                raise _Unfaithful("the traced graph does not output [1, classes] logits")
            score = self.select(output, self.target.take(torch.tensor([b], device=self.x.device)))
            expected = self.clean_score[b : b + 1]
            if not torch.allclose(score, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max().clamp_min(1e-12))):
                raise _Unfaithful("the traced graph does not reproduce the model's output")
            self.run, self.run_of = run, b
            self.reports.append(run.report)
        return self.run

    def drops(self, b: int, boxes: list[Box]) -> torch.Tensor:
        run = self._clean(b)
        out = []
        for start in range(0, len(boxes), self.batch_size):
            chunk = boxes[start : start + self.batch_size]
            tops, lefts = [box[0] for box in chunk], [box[2] for box in chunk]  # host integers: no device round trip
            y0, y1, x0, x1 = chunk[0]  # every window has one size (the last ones are flush with the edges)
            patch = self.fill[0].expand(len(chunk), -1, y1 - y0, x1 - x0)
            images = torch.full((len(chunk),), b, device=self.x.device, dtype=torch.long)
            out.append(self.clean_score[b] - self.select(run.occluded(tops, lefts, patch), self.target.take(images)))
        return torch.cat(out) if out else self.clean_score.new_empty(0)

    def notes(self) -> dict[str, Any]:
        report = self.reports[-1]
        return {"path": "incremental", "dense_from": report.dense_from, "reason": report.reason}

    def announcements(self) -> list[str]:
        unsupported = dict.fromkeys(u for report in self.reports for u in report.unsupported)
        return [f"occlusion: incremental inference turns dense at {u.removeprefix('unsupported: ')}, an op it cannot compute "
                f"locally; from there every patch costs a plain forward (the map is still exact)" for u in unsupported]


class _Unfaithful(Exception):
    """The traced graph is not the model."""


def drill_down(passes: Passes, b: int, boxes: list[Box], height: int, width: int, config: Any) -> torch.Tensor:
    """Krypton's adaptive drill-down: first the windows on a grid ``coarse_factor`` times the stride; every
    other window's drop estimated from them (bilinear in the window's position); then the share
    ``config.drill_down`` of all windows, among those not yet evaluated, whose estimate is highest,
    evaluated. [len(boxes)] drops: the evaluated ones exact, the rest estimates."""
    window, stride = config.window, config.stride
    step = config.coarse_factor * stride
    rows, cols = window_starts(height, window, step), window_starts(width, window, step)
    position = {(y0, x0): i for i, (y0, _, x0, _) in enumerate(boxes)}
    coarse = [position[(y, x)] for y in rows for x in cols]
    grid = passes.drops(b, [boxes[i] for i in coarse]).view(len(rows), len(cols))
    estimate = _bilinear(grid, rows, cols, [box[0] for box in boxes], [box[2] for box in boxes])
    estimate[coarse] = grid.flatten()
    rest = torch.ones(len(boxes), dtype=torch.bool)
    rest[coarse] = False
    candidates = torch.nonzero(rest).flatten()
    chosen = candidates[estimate[candidates].argsort(descending=True)[: math.ceil(config.drill_down * len(boxes))]]
    chosen = chosen.sort().values.tolist()
    if chosen:
        estimate[chosen] = passes.drops(b, [boxes[i] for i in chosen])
    return estimate


def _bilinear(grid: torch.Tensor, rows: list[int], cols: list[int], ys: list[int], xs: list[int]) -> torch.Tensor:
    """``grid`` [R, C] of values at window positions rows x cols, read at each (ys[k], xs[k])."""
    def weights(coordinates: list[int], knots: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        knots_t = torch.tensor(knots, dtype=torch.float64)
        at = torch.tensor(coordinates, dtype=torch.float64)
        upper = torch.searchsorted(knots_t, at).clamp(1, max(len(knots) - 1, 1))
        lower = upper - 1
        if len(knots) == 1:
            return torch.zeros_like(upper), torch.zeros_like(upper), torch.zeros_like(at)
        share = ((at - knots_t[lower]) / (knots_t[upper] - knots_t[lower])).clamp(0, 1)
        return lower, upper, share

    r0, r1, wy = weights(ys, rows)
    c0, c1, wx = weights(xs, cols)
    g = grid.double()
    value = (1 - wy) * ((1 - wx) * g[r0, c0] + wx * g[r0, c1]) + wy * ((1 - wx) * g[r1, c0] + wx * g[r1, c1])
    return value.to(grid.dtype)
