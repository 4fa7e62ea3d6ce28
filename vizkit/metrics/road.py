"""ROAD, RemOve And Debias (Rong, Leemann, Borisov, Kasneci & Kasneci 2022, "A Consistent and Efficient
Evaluation Strategy for Attribution Methods", ICML).

Removing pixels by painting them a colour leaks the removal mask's shape into the score; ROAD removes
them by noisy linear imputation instead, which leaks little, so no retraining is needed.

For each percentile p of ``percentiles`` (pytorch-grad-cam's ROADCombined's 10, 20, ..., 90 by default)
a set R_p of pixels is removed, with A the map summed over channels and P_q(.) numpy's default
(linear) percentile over the pixels:

    road_morf (most relevant first):   R_p = { i : A_i >= P_(100-p)(A) }          lower is better
    road_lerf (least relevant first):  R_p = { i : -A_i >= P_(100-p)(-A) }         higher is better
                                           = { i : A_i <= P_p(A) }

Ties: every pixel equal to the threshold is removed, so equal values can make R_p larger than p % of
the image (a Grad-CAM map that is 0 on 40 % of the image removes all of that 40 % under LeRF at
p = 10, 20 and 30, and everything under MoRF at p = 90 when over 10 % is 0); a constant map removes every
pixel at every percentile. The threshold is computed with numpy's arithmetic (interpolation weight
rounded to the map's dtype, its two-sided lerp), so it is numpy's bit for bit.

Noisy linear imputation, per channel of the model's input x: each removed pixel takes the weighted
mean of its in-image 8 neighbours (1/6 for the four edge neighbours, 1/12 for the four diagonal ones),
known neighbours at their values:

    sum_{j in N(i)} w_ij * x_i  -  sum_{j in N(i), j removed} w_ij * x_j  =  sum_{j in N(i), j kept} w_ij * x_j

one equation per removed pixel, one right-hand side per channel, a sparse system solved by scipy's
``spsolve`` (SuperLU) in float64; then x_i += sigma * e_i with e_i ~ N(0, 1) and sigma = ``noise``.
The curve is the target class's softmax probability on the imputed image at each percentile, and the
value is the curve's mean.

The peer, pytorch-grad-cam's ``ROADMostRelevantFirst``/``ROADLeastRelevantFirst`` (its
``NoisyLinearImputer`` is the authors' code):

* Its ``percentile`` q is the share of pixels *kept*: ROADMostRelevantFirst(q) removes A >= P_q(A),
  which is our p = 100 - q (likewise for LeRF). Its score (``return_diff=True``) is the difference
  p_c(x_q) - p_c(x), so ``ROADMostRelevantFirstAverage(percentiles=[100 - p for p in ours])`` is
  ``road_morf - p_c(x)`` per input (the default 10..90 is its own mirror image), the same for LeRF,
  and ``ROADCombined`` is ``(road_lerf - road_morf) / 2``.
* Same neighbour weights in the same order, the same equations, right-hand sides summed in the same
  order in float64 from float32 products, the same canonical CSC matrix: the same solution, bit for
  bit, rounded to float32 the same way (float64 inputs stay float64 here; the peer rounds the
  solution to float32).
* Noise: the peer draws from the global RNG; here one N(0, 1) image [C,H,W] per (input, percentile),
  drawn on the CPU in float32 from a ``torch.Generator`` seeded with ``seed``, input-major (all of
  input 0's percentiles in order, then input 1's, ...), whatever the ``batch_size``; its values at
  the removed pixels (row-major) are used.
* LeRF: the peer thresholds 1 - A in float32, which rounds (every value below 2^-25 becomes 1, a
  tie); we negate, which is exact. For maps in [0, 1] on which 1 - A is exact the pixels are the same.
* A map that removes every pixel leaves no known value: the system is singular (each row sums to 0)
  and the peer's ``spsolve`` returns NaN. Here the removed image is 0, the model input's origin (the
  normalization's mean colour; black for a model without one), plus the noise.

Like the peer and the authors' code the imputation works on the model's input. Its equations are
unchanged by a per-channel affine map (their weights on the left sum to those on the right), so the
space only sets the noise's unit: sigma = 0.01 in input units is 0.01 * std in pixels (~0.0023 with
ImageNet's std).

Cost: one sparse solve on the CPU per input and percentile; the forwards are batched, ``batch_size``
imputed images at a time.
"""
from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, List

from vizkit.core.errors import ConfigError
from vizkit.metrics.base import Metric, MetricInputs, MetricResult, positive_int
from vizkit.metrics.perturbation import check_inputs

if TYPE_CHECKING:
    import numpy as np
    import torch

# (row offset, column offset, weight) of each neighbour, in the authors' order: the order fixes how the
# float sums round, so the system is theirs bit for bit
NEIGHBOUR_WEIGHTS = (
    (1, 1, 1 / 12), (0, 1, 1 / 6), (-1, 1, 1 / 12), (1, -1, 1 / 12),
    (0, -1, 1 / 6), (-1, -1, 1 / 12), (1, 0, 1 / 6), (-1, 0, 1 / 6),
)
PERCENTILES = [10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0]  # pytorch-grad-cam's ROADCombined


@dataclass
class RoadConfig:
    metric: ClassVar[str] = "road"  # the metric's name, for error messages
    percentiles: List[float] = field(default_factory=lambda: list(PERCENTILES))  # % of pixels removed, each in (0, 100)
    noise: float = 0.01  # std of the Gaussian noise added to imputed values, in the model's input units
    seed: int = 0  # seeds the noise
    batch_size: int = 16  # imputed images per forward pass

    def __post_init__(self) -> None:
        name = self.metric
        values = self.percentiles
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise ConfigError(f"{name}: percentiles must be a list of percentages of pixels to remove, such as [10, 50, 90], got {values!r}")
        if not values:
            raise ConfigError(f"{name}: percentiles is empty; give at least one percentage of pixels to remove, each between 0 and 100")
        for value in values:
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < 100:
                raise ConfigError(f"{name}: percentiles must lie strictly between 0 and 100 (the % of pixels removed), got {value!r} in {list(values)}")
        self.percentiles = [float(value) for value in values]
        if isinstance(self.noise, bool) or not isinstance(self.noise, numbers.Real) or not 0 <= self.noise < math.inf:
            raise ConfigError(f"{name}: noise must be a non-negative number (the noise's std in the model's input units; the paper's 0.01), got {self.noise!r}")
        self.noise = float(self.noise)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ConfigError(f"{name}: seed must be an integer in [0, 2**63), got {self.seed!r}")
        positive_int(name, "batch_size", self.batch_size)


@dataclass
class RoadMorfConfig(RoadConfig):
    metric: ClassVar[str] = "road_morf"


@dataclass
class RoadLerfConfig(RoadConfig):
    metric: ClassVar[str] = "road_lerf"


def sorted_percentile(ordered: "torch.Tensor", percentile: float) -> "torch.Tensor":
    """[B]: ``numpy.percentile(row, percentile)`` of each row of ``ordered`` ([B,N], sorted ascending),
    with numpy's arithmetic: index (N-1)·q/100, its fraction rounded to the values' dtype, and the lerp
    taken from the nearer end."""
    count = ordered.shape[1]
    position = (count - 1) * (percentile / 100)
    lower = min(math.floor(position), count - 1)
    upper = min(lower + 1, count - 1)
    fraction = position - math.floor(position)
    below, above = ordered[:, lower], ordered[:, upper]
    difference = above - below
    return above - difference * (1 - fraction) if fraction >= 0.5 else below + difference * fraction


def removal_masks(maps: "torch.Tensor", percentiles: Sequence[float], most_relevant_first: bool) -> "torch.Tensor":
    """[B,K,H,W] bool: the pixels ROAD removes from each input at each of the K percentiles (see the
    module docstring); ``maps`` [B,C,H,W] are summed over channels first."""
    import torch

    saliency = maps.sum(1) if maps.dim() == 4 else maps
    if saliency.dtype not in (torch.float32, torch.float64):
        saliency = saliency.float()
    scores = (saliency if most_relevant_first else -saliency).flatten(1)
    ordered = scores.sort(dim=1).values
    thresholds = torch.stack([sorted_percentile(ordered, 100 - p) for p in percentiles], 1)  # [B,K]
    return (scores.unsqueeze(1) >= thresholds.unsqueeze(2)).view(saliency.shape[0], len(percentiles), *saliency.shape[1:])


def linear_imputation(image: "np.ndarray", removed: "np.ndarray") -> "np.ndarray":
    """[N,C] float64: the removed pixels' values (``removed`` [H,W] bool, N of them, row-major) that
    are the weighted mean of their neighbours in ``image`` [C,H,W], every channel at once. At least
    one pixel must be kept (else the system is singular)."""
    import numpy as np
    from scipy.sparse import csc_matrix
    from scipy.sparse.linalg import spsolve

    channels = image.shape[0]
    height, width = removed.shape
    flat_removed = removed.reshape(-1)
    values = image.reshape(channels, -1)
    unknown = np.flatnonzero(flat_removed)
    count = unknown.size
    variable = np.zeros(height * width, dtype=np.int64)
    variable[unknown] = np.arange(count)
    rows, columns = np.divmod(unknown, width)
    neighbour_weight_sum = np.ones(count)
    rhs = np.zeros((count, channels))
    equations, variables, weights = [], [], []
    for row_offset, column_offset, weight in NEIGHBOUR_WEIGHTS:
        row, column = rows + row_offset, columns + column_offset
        inside = (row >= 0) & (column >= 0) & (row < height) & (column < width)
        neighbour_weight_sum[~inside] -= weight
        equation = np.flatnonzero(inside)
        neighbour = (row * width + column)[inside]
        known = ~flat_removed[neighbour]
        rhs[equation[known]] -= weight * values[:, neighbour[known]].T  # the product in the image's dtype, as the peer
        equations.append(equation[~known])
        variables.append(variable[neighbour[~known]])
        weights.append(np.full(int((~known).sum()), weight))
    diagonal = np.arange(count)
    system = csc_matrix(
        (np.concatenate([*weights, -neighbour_weight_sum]), (np.concatenate([*equations, diagonal]), np.concatenate([*variables, diagonal]))),
        shape=(count, count),
    )
    return np.asarray(spsolve(system, rhs)).reshape(count, channels)


def noisy_linear_imputation(image: "torch.Tensor", removed: "np.ndarray", draws: "torch.Tensor", noise: float) -> "torch.Tensor":
    """``image`` [C,H,W] (CPU) with its ``removed`` pixels ([H,W] bool) linearly imputed plus
    ``noise`` times ``draws`` ([C,H,W] standard normal) there."""
    import numpy as np
    import torch

    channels = image.shape[0]
    unknown = np.flatnonzero(removed)
    if unknown.size == removed.size:  # nothing left to interpolate from: see the module docstring
        solution = torch.zeros(channels, unknown.size, dtype=image.dtype)
    else:
        solution = torch.from_numpy(linear_imputation(image.numpy(), removed)).to(image.dtype).t()
    index = torch.from_numpy(unknown)
    imputed = image.reshape(channels, -1).clone()
    imputed[:, index] = solution + noise * draws.reshape(channels, -1)[:, index].to(image.dtype)
    return imputed.view_as(image)


def road_images(x: "torch.Tensor", removed: "torch.Tensor", noise: float, seed: int) -> Iterator["torch.Tensor"]:
    """The imputed images [C,H,W] (on the CPU) of every input of ``x`` [B,C,H,W] at every percentile of
    ``removed`` [B,K,H,W], input-major (b=0: k=0..K-1, then b=1, ...), the noise drawn in that order."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    images = x.detach().to("cpu")
    if images.dtype not in (torch.float32, torch.float64):
        images = images.float()
    masks = removed.to("cpu").numpy()
    for b in range(masks.shape[0]):
        for k in range(masks.shape[1]):
            draws = torch.randn(images.shape[1:], generator=generator)
            yield noisy_linear_imputation(images[b], masks[b, k], draws, noise)


class _Road(Metric):
    """MoRF and LeRF: the same imputation of opposite ends of the map's order."""

    needs_class = True
    most_relevant_first: ClassVar[bool]

    def evaluate(self, inputs: MetricInputs) -> MetricResult:
        import torch

        check_inputs(self.name, inputs)
        config = self.config
        x = inputs.x.detach()
        removed = removal_masks(inputs.maps.detach(), config.percentiles, self.most_relevant_first)
        batch, steps = removed.shape[:2]
        images = road_images(x, removed, config.noise, config.seed)
        pairs = [(b, k) for b in range(batch) for k in range(steps)]  # road_images' order
        curve = torch.empty(batch, steps, device=x.device, dtype=torch.float32)
        with torch.no_grad():
            for first in range(0, len(pairs), config.batch_size):
                chunk = pairs[first : first + config.batch_size]
                imputed = torch.stack(list(itertools.islice(images, len(chunk)))).to(x.device, x.dtype)
                rows = torch.tensor([b for b, _ in chunk], device=x.device)
                ks = torch.tensor([k for _, k in chunk], device=x.device)
                chunk_target = inputs.target.take(rows)
                probabilities = chunk_target.logits(inputs.model, imputed).float().softmax(1)
                curve[rows, ks] = chunk_target.select(probabilities)
        return MetricResult(values=curve.mean(1), curve=curve, curve_steps=tuple(config.percentiles))


class RoadMorf(_Road):
    name = "road_morf"
    description = "ROAD MoRF: class probability with the most relevant p % of pixels imputed, mean over p (Rong et al. 2022)"
    better = "lower"
    Config = RoadMorfConfig
    most_relevant_first = True


class RoadLerf(_Road):
    name = "road_lerf"
    description = "ROAD LeRF: class probability with the least relevant p % of pixels imputed, mean over p (Rong et al. 2022)"
    better = "higher"
    Config = RoadLerfConfig
    most_relevant_first = False
