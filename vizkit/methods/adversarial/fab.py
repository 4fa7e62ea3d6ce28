"""FAB, the fast adaptive boundary attack (Croce & Hein 2020, "Minimally distorted adversarial
examples with a fast adaptive boundary attack", ICML): the smallest L∞ or L2 change that flips the
prediction, searched by projecting onto the linearized decision boundary, then kept only if it lies
within ε.

Per step, at the current point x_k with clean input x_0 and label y, each other class j gives the
linearized boundary f_j(x_k) − f_y(x_k) + ⟨∇(f_j − f_y)(x_k), z − x_k⟩ = 0; the closest one, at
distance |f_j − f_y| / ‖∇(f_j − f_y)‖_q (q the dual norm: L1 for L∞, L2 for L2), is the hyperplane
π = {z: ⟨w, z⟩ = b}. Let P(x) be the minimal-norm step from x onto π ∩ [0, 1]^d (or, if the box
cannot reach π, the step to the box corner nearest it), and

    δ_k = P(x_k),  δ_0 = P(x_0),  α = min(‖δ_k‖ / (‖δ_k‖ + ‖δ_0‖), α_max)
    x_{k+1} = clip_[0,1]((1 − α)(x_k + η δ_k) + α (x_0 + η δ_0))

(η > 1 steps past the boundary; α biases the step towards the clean input when it is far). When
x_{k+1} is adversarial, it is remembered if closer to x_0 than the best so far, and pulled back,
x_{k+1} ← x_0 + β (x_{k+1} − x_0), to search closer. After ``steps`` the best is kept if its
distance is at most ε; otherwise the input is returned unchanged, as is an input the model gets
wrong to begin with. A restart starts from
x_0 + ε/2 · t / ‖t‖ (t uniform in [−1, 1]^d for L∞, normal for L2), clipped to [0, 1]; restarts and
target classes run only on the inputs not yet broken.

FAB-T (``target_classes`` = N): instead of the closest of all classes, the hyperplane of one target t
per run, the N most likely other classes of the clean logits in turn (2nd, 3rd, ...), each run on
the inputs still unbroken. Success is still any misclassification, as in the paper and AutoAttack.
Untargeted FAB needs the gradient of every logit per step; FAB-T only that of f_t − f_y.

Step for step this is ``torchattacks.FAB`` (norms Linf and L2; ``target_classes=N`` is its
``multi_targeted=True, n_classes=N+1``), which is the reference code of fra31/auto-attack: the same
projections, extrapolation, backward step, restarts and ε rule, in the same float operations.
What differs:

* the untargeted step's gradients: torchattacks runs one backward per class and stores the whole
  [B, K, C, H, W] Jacobian; here batched backwards (``is_grads_batched``, ``batch_size`` (input,
  class) rows at a time) give the same per-logit gradients, ∇f_y is subtracted as torchattacks does,
  and only the closest class's difference is kept, so memory is one chunk. A batched backward rounds
  as the per-class ones (measured here, 1 and 2 threads), so the images are
  torchattacks' bit for bit; a CPU whose kernels round a larger batch differently would move the last
  bits, and FAB's discrete choices could then take another path (the tests say by how much). When
  the classes take more than one chunk, ∇f_y is one extra row of the first (K + 1 rows, not K);
* the random restarts draw exactly torchattacks' numbers, in its order (one seeded stream per call,
  a [n, C, H, W] draw for the n inputs still unbroken at each restart), from a private CPU
  ``torch.Generator`` seeded with ``seed``: torchattacks seeds the global RNG, which is left alone
  here. As in torchattacks, an input's restart draw therefore depends on which inputs of its batch
  are still unbroken;
* FAB-T's targets are ranked once from the clean batch's logits (torchattacks re-ranks the inputs
  still unbroken by a new forward: the same ranking, up to a tie that a forward of another batch size
  rounds the other way);
* a user target (``target=class:X``) runs FAB-T towards that class, from the clean prediction, on
  the inputs not yet classified as it, and counts success only when the prediction becomes the
  target. torchattacks' targeted FAB starts from the label and counts any misclassification,
  which is not what a targeted attack promises.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from vizkit.core.errors import ConfigError
from vizkit.core.validate import positive_integers
from vizkit.methods.adversarial.budget import check_norm, pixel_amount
from vizkit.methods.base import AdversarialMethod

NOT_FOUND = 1e10  # torchattacks' distance of "no adversarial point yet"
DIVISION_GUARD = 1e-12  # torchattacks' guard on a gradient's dual norm
NORM_FLOOR = 1e-8  # torchattacks' floor on ‖δ‖ in α = ‖δ_k‖ / (‖δ_k‖ + ‖δ_0‖)


@dataclass
class FABConfig:
    norm: str = "linf"  # linf | l2: the distance minimized, and the ball the result must lie in
    eps: Any = "8/255"  # the ball's radius in pixel units: 0.03, 8/255 (text, as written); 0 returns the input
    steps: int = 100  # iterations per run (the paper's and AutoAttack's; torchattacks' default is 10)
    restarts: int = 1  # runs per target; later ones start at a random point, on the inputs still unbroken
    alpha_max: float = 0.1  # the largest weight α of the step taken from the clean input
    eta: float = 1.05  # η ≥ 1: the overshoot past the linearized boundary
    beta: float = 0.9  # β in (0, 1]: the pull back towards the clean input after a success
    seed: int = 0  # of the restarts' random starts (its own generator; the global RNG is untouched)
    target_classes: int = 0  # 0: untargeted FAB; N: FAB-T over the N most likely other classes in turn
    batch_size: int = 128  # inputs × classes through one batched backward of untargeted FAB's gradients

    def __post_init__(self) -> None:
        try:
            check_norm(self.norm)
            self.eps = pixel_amount("eps", self.eps)
            positive_integers(self, "steps", "restarts", "batch_size")
        except ConfigError as error:
            raise ConfigError(f"fab: {error}") from None
        if not _number(self.alpha_max) or not 0 <= self.alpha_max <= 1:
            raise ConfigError(f"fab: alpha_max must be a number in [0, 1] (the paper's 0.1), got {self.alpha_max!r}")
        if not _number(self.eta) or not 1 <= self.eta < math.inf:
            raise ConfigError(f"fab: eta must be a number ≥ 1 (the overshoot past the boundary; the paper's 1.05), got {self.eta!r}")
        if not _number(self.beta) or not 0 < self.beta <= 1:
            raise ConfigError(f"fab: beta must be a number in (0, 1] (the pull back after a success; the paper's 0.9), got {self.beta!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"fab: seed must be an integer, got {self.seed!r}")
        if isinstance(self.target_classes, bool) or not isinstance(self.target_classes, int) or self.target_classes < 0:
            raise ConfigError(f"fab: target_classes must be an integer ≥ 0 (0: untargeted; N: FAB-T over the N most likely "
                              f"other classes), got {self.target_classes!r}")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class FAB(AdversarialMethod):
    name = "fab"
    description = "fast adaptive boundary attack: the smallest L∞ or L2 change onto the linearized boundary, kept within ε (Croce & Hein 2020)"
    Config = FABConfig

    def perturb(self, model, pixels, labels, targets, space):
        config = self.config
        if targets is not None and config.target_classes:
            raise ConfigError(f"fab: target=... and target_classes={config.target_classes} both choose the target classes; "
                              "choose one (drop target=..., or set target_classes=0)")
        clean = pixels.detach().float()
        if config.eps == 0:
            return clean.clone()
        with torch.no_grad():
            logits = model(space.from_pixels(clean)).float()
        predicted = logits.argmax(1)
        if targets is not None:  # from wherever the input is, to the target
            sources, unbroken, runs = predicted, predicted != targets, [targets]
        else:
            sources, unbroken = labels, predicted == labels
            count = min(config.target_classes, logits.shape[1] - 1)
            ranked = logits.sort(dim=-1)[1]  # ascending, as torchattacks: column -r is the r-th most likely
            runs = [ranked[:, -rank] for rank in range(2, count + 2)] if count else [None]
        adversarial = clean.clone()
        generator = torch.Generator().manual_seed(config.seed)  # torchattacks: torch.manual_seed(seed) once per call
        for run_targets in runs:
            for restart in range(config.restarts):
                rows = unbroken.nonzero().squeeze(1)
                if rows.numel() == 0:
                    break
                start = self.random_start(clean[rows], generator) if restart > 0 else clean[rows]
                found = self.search(model, space, clean[rows], start, sources[rows],
                                    None if run_targets is None else run_targets[rows], user_target=targets is not None)
                with torch.no_grad():
                    now = model(space.from_pixels(found)).argmax(1)
                fooled = now == targets[rows] if targets is not None else now != sources[rows]
                broken = fooled & ~(self.distance(found - clean[rows]) > config.eps)  # the ε rule: farther is no success
                adversarial[rows[broken]] = found[broken]
                unbroken[rows[broken]] = False
        return adversarial

    def search(self, model, space, clean, start, sources, targets, user_target):
        """One FAB run (torchattacks' ``attack_single_run``/``_targeted``) from ``start``: the closest
        adversarial point found to ``clean``, or ``clean`` where none was found. ``targets``: FAB-T's
        class per input, or None for the closest boundary of all classes."""
        config = self.config
        count = clean.shape[0]
        flat_clean = clean.reshape(count, -1)
        best, best_distance = clean.clone(), torch.full((count,), NOT_FOUND, device=clean.device)
        current = start
        for _ in range(config.steps):
            if targets is None:
                gap, gradient = self.closest_boundary(model, space, current, sources)
            else:
                gap, gradient = target_boundary(model, space, current, sources, targets)
            with torch.no_grad():
                w = gradient.reshape(count, -1)
                b = -gap + (gradient * current).view(count, -1).sum(dim=-1)  # π = {z: ⟨w, z⟩ = b}
                project = project_linf if config.norm == "linf" else project_l2
                steps = project(torch.cat((current.reshape(count, -1), flat_clean), 0), torch.cat((w, w), 0), torch.cat((b, b), 0))
                from_current, from_clean = steps[:count].reshape(current.shape), steps[count:].reshape(current.shape)
                lengths = self.row_norm(steps).clamp_min(NORM_FLOOR).view(-1, 1, 1, 1)
                alpha = (lengths[:count] / (lengths[:count] + lengths[count:])).clamp(0, config.alpha_max)
                current = ((current + config.eta * from_current) * (1 - alpha)
                           + (clean + from_clean * config.eta) * alpha).clamp(0.0, 1.0)
                now = model(space.from_pixels(current)).argmax(1)
                adversarial = (now == targets if user_target else now != sources).nonzero().squeeze(1)
                if adversarial.numel():
                    distance = self.distance(current[adversarial] - clean[adversarial])
                    closer = distance < best_distance[adversarial]
                    best[adversarial] = torch.where(closer.view(-1, 1, 1, 1), current[adversarial], best[adversarial])
                    best_distance[adversarial] = torch.where(closer, distance, best_distance[adversarial])
                    current[adversarial] = clean[adversarial] + (current[adversarial] - clean[adversarial]) * config.beta
        return best

    def closest_boundary(self, model, space, current, sources):
        """Untargeted FAB's hyperplane per input: the gap f_j − f_y and the gradient ∇f_j − ∇f_y of
        the class j ≠ y whose linearized boundary is closest, |f_j − f_y| / ‖∇f_j − ∇f_y‖_q.

        The gradients come from batched backwards, ``batch_size`` (input, class) rows at a time, each
        row the gradient of one logit, as torchattacks' backward per class computes it (the same bits:
        a batched backward is the per-row one, measured); only the closest class's is kept."""
        x = current.detach().requires_grad_(True)
        logits = model(space.from_pixels(x)).float()
        count, classes = logits.shape
        device = x.device
        rows = torch.arange(count, device=device)
        gaps = (logits - logits[rows, sources].unsqueeze(1)).detach()
        closest = torch.full((count,), math.inf, device=device)
        gap, gradient = torch.zeros(count, device=device), torch.zeros_like(x)
        per_chunk = max(1, self.config.batch_size // count)
        label_gradient = None  # ∇f_y per input: gathered from the one chunk, or the first chunk's extra row
        for first in range(0, classes, per_chunk):
            chunk = torch.arange(first, min(first + per_chunk, classes), device=device)
            cotangents = torch.zeros(len(chunk), count, classes, device=device, dtype=logits.dtype)
            cotangents[torch.arange(len(chunk), device=device), :, chunk] = 1  # row (k, i): ∇f_chunk[k] of input i
            extra = label_gradient is None and len(chunk) < classes
            if extra:
                cotangents = torch.cat((F.one_hot(sources, classes).to(cotangents).unsqueeze(0), cotangents))
            last = first + per_chunk >= classes
            (gradients,) = torch.autograd.grad(logits, x, cotangents, retain_graph=not last, is_grads_batched=True)
            with torch.no_grad():
                if extra:
                    label_gradient, gradients = gradients[0], gradients[1:]
                elif label_gradient is None:
                    label_gradient = gradients[sources, rows]
                differences = gradients - label_gradient
                if self.config.norm == "linf":
                    dual = differences.abs().view(len(chunk), count, -1).sum(dim=-1)
                else:
                    dual = (differences ** 2).view(len(chunk), count, -1).sum(dim=-1).sqrt()
                distance = gaps[:, chunk].T.abs() / (DIVISION_GUARD + dual)
                distance[chunk.unsqueeze(1) == sources] = math.inf  # y itself is no boundary (torchattacks: gap 1e10)
                nearest, index = distance.min(dim=0)
                better = nearest < closest  # strict: the first of equals wins, as torchattacks' argmin
                closest = torch.where(better, nearest, closest)
                gap = torch.where(better, gaps[rows, chunk[index]], gap)
                gradient = torch.where(better.view(-1, 1, 1, 1), differences[index, rows], gradient)
        return gap, gradient

    def random_start(self, clean, generator):
        """torchattacks' restart point: x_0 + ε/2 · t/‖t‖, t uniform in [−1, 1]^d (L∞) or normal (L2),
        drawn on the CPU as it does, clipped to [0, 1]."""
        count = clean.shape[0]
        radius = torch.full((count, 1, 1, 1), self.config.eps, device=clean.device)  # float32 ε, as min(1e10, ε)
        if self.config.norm == "linf":
            t = (2 * torch.rand(clean.shape, generator=generator) - 1).to(clean.device)
            scale = t.reshape([count, -1]).abs().max(dim=1, keepdim=True)[0].reshape(-1, 1, 1, 1)
        else:
            t = torch.randn(clean.shape, generator=generator).to(clean.device)
            scale = (t ** 2).view(count, -1).sum(dim=-1).sqrt().view(-1, 1, 1, 1)
        return (clean + radius * t / scale * 0.5).clamp(0.0, 1.0)

    def row_norm(self, rows: torch.Tensor) -> torch.Tensor:
        """Each row's L∞ or L2 norm, [N]: torchattacks' reductions, so that ties and the ε rule agree."""
        if self.config.norm == "linf":
            return rows.abs().max(dim=1)[0]
        return (rows ** 2).sum(dim=1).sqrt()

    def distance(self, delta: torch.Tensor) -> torch.Tensor:
        return self.row_norm(delta.reshape(delta.shape[0], -1))


def target_boundary(model, space, current, sources, targets):
    """FAB-T's hyperplane per input: the gap f_t − f_y and its gradient (one backward of the sum)."""
    x = current.detach().requires_grad_(True)
    logits = model(space.from_pixels(x)).float()
    rows = torch.arange(x.shape[0], device=x.device)
    gap = -(logits[rows, sources] - logits[rows, targets])
    (gradient,) = torch.autograd.grad(gap.sum(), x)
    return gap.detach(), gradient


# ---------------------------------------------------------------- projections onto π ∩ [0, 1]^d
#
# Both solve min ‖d‖ s.t. ⟨w, t + d⟩ = b, t + d ∈ [0, 1]^d, for each row t (or, where the box cannot
# reach π, return the step to the box point nearest it) by sorting the coordinates' breakpoints and
# a binary search over them. They are torchattacks' ``projection_linf``/``projection_l2`` (from the
# FAB authors' code) operation for operation, so that the same inputs give the same bits.


def project_linf(points: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The L∞-minimal step d per row of ``points`` [N, D] onto {⟨w, z⟩ = b} within [0, 1]^D."""
    t, w, b = points, w.clone(), b.clone()
    side = 2 * ((w * t).sum(1) - b >= 0) - 1  # flip so that ⟨w, t⟩ − b ≥ 0: ⟨w, d⟩ must decrease
    w.mul_(side.unsqueeze(1))
    b.mul_(side)
    corner = (w < 0).float()  # the box corner that decreases ⟨w, z⟩ fastest
    d = (corner - t) * (w != 0).float()  # all the way to it
    room = corner - t * (2 * corner - 1)  # |corner − t|: how far each coordinate can move
    order = torch.argsort(room, dim=1)
    b = b - (w * t).sum(1)  # the change of ⟨w, ·⟩ needed
    b0 = (w * d).sum(1)  # the change at the corner
    descending = order.flip((1,))
    w_sorted = w.gather(1, descending)
    s = torch.cumsum(w_sorted.abs(), dim=1)
    sb = torch.cumsum(-w_sorted * d.gather(1, descending), dim=1) + b0.unsqueeze(1)
    # change when every coordinate moves by λ = the smallest room: enough already?
    b2 = sb[:, -1] - s[:, -1] * room.gather(1, order[:, 0:1]).squeeze(1)
    unsaturated = b - b2 > 0
    search = (b - b0 > 0) & ~unsaturated  # reachable, with some coordinates at the box
    lower = torch.zeros(int(search.sum()), dtype=torch.long, device=t.device)
    upper = torch.full_like(lower, w.shape[1] - 1)
    order_, sb_, s_, room_, b_ = order[search], sb[search], s[search], room[search], b[search]
    for _ in range(math.ceil(math.log2(w.shape[1]))):
        middle = (lower + upper) // 2
        at = middle.unsqueeze(1)
        breakpoint_ = order_.gather(1, order_.size(1) - 1 - at)
        reached = b_ - (sb_.gather(1, at) - s_.gather(1, at) * room_.gather(1, breakpoint_)).squeeze(1) > 0
        lower = torch.where(reached, middle, lower)
        upper = torch.where(reached, upper, middle)
    if unsaturated.any():
        step = torch.clamp_min((b[unsaturated] - sb[unsaturated, -1]) / (-s[unsaturated, -1]), min=0).unsqueeze(-1)
        d[unsaturated] = (2 * corner[unsaturated] - 1) * step
    step = torch.clamp_min((b[search] - sb[search, lower]) / (-s[search, lower]), min=0).unsqueeze(-1)
    d[search] = torch.min(step, d[search]) * corner[search] + torch.max(-step, d[search]) * (1 - corner[search])
    return d * (w != 0).float()


def project_l2(points: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The L2-minimal step d per row of ``points`` [N, D] onto {⟨w, z⟩ = b} within [0, 1]^D."""
    t, w = points, w.clone()
    c = (w * t).sum(1) - b
    side = 2 * (c >= 0) - 1  # flip so that c = ⟨w, t⟩ − b ≥ 0: d = −λ w (clipped), λ ≥ 0
    w.mul_(side.unsqueeze(1))
    c.mul_(side)
    # λ at which coordinate i reaches the box (1e12: never, w_i ≈ 0)
    r = torch.max(t / w, (t - 1) / w).clamp(min=-1e12, max=1e12)
    r.masked_fill_(w.abs() < 1e-8, 1e12)
    r[r == -1e12] *= -1
    rs, order = torch.sort(r, dim=1)
    rs_next = F.pad(rs[:, 1:], (0, 1))
    rs.masked_fill_(rs == 1e12, 0)
    rs_next.masked_fill_(rs_next == 1e12, 0)
    w2_sorted = (w ** 2).gather(1, order)
    w2_total = w2_sorted.sum(dim=1, keepdim=True)
    w2_free = w2_total - torch.cumsum(w2_sorted, dim=1)  # ‖w‖² of the coordinates not yet at the box
    d = -(r * w)  # every coordinate at the box
    d.mul_((w.abs() > 1e-8).float())
    # the change of ⟨w, ·⟩ at each breakpoint
    s = torch.cat((-w2_total * rs[:, 0:1], torch.cumsum((-rs_next + rs) * w2_free, dim=1) - w2_total * rs[:, 0:1]), 1)
    unclipped = s[:, 0] + c < 0  # reached before any coordinate hits the box
    unreachable = (d * w).sum(dim=1) + c > 0
    search = ~(unclipped | unreachable)
    lower = torch.zeros(int(search.sum()), dtype=torch.long, device=t.device)
    upper = torch.full_like(lower, w.shape[1] - 1)
    s_, c_ = s[search], c[search]
    for _ in range(math.ceil(math.log2(w.shape[1]))):
        middle = (lower + upper) // 2
        reached = s_.gather(1, middle.unsqueeze(1)).squeeze(1) + c_ > 0
        lower = torch.where(reached, middle, lower)
        upper = torch.where(reached, upper, middle)
    if unclipped.any():
        step = c[unclipped] / w2_total[unclipped].squeeze(-1)
        d[unclipped] = -step.unsqueeze(-1) * w[unclipped]
    if search.any():
        step = (s[search, lower] + c[search]) / w2_free[search, lower] + rs[search, lower]
        step[w2_free[search, lower] == 0] = 0
        clipped = (step.unsqueeze(-1) > r[search]).float()
        d[search] = d[search] * clipped - step.unsqueeze(-1) * w[search] * (1 - clipped)
    return d * (w.abs() > 1e-8).float()
