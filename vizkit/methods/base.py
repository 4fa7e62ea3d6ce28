"""The plugin contract: what a vizkit method is.

A method is a class that subclasses one of the four kinds' bases below (its ``kind``:
"attribution", "optimization", "adversarial" or "inspection", comes from that base and decides how a
run executes it; a class cannot declare another) and has three class attributes:

    name: str         the name users type: ``vizkit method=<name>``, ``vizkit.create_method("<name>")``
    description: str  one line, shown by ``vizkit --help``
    Config: type      a ``@dataclass`` whose fields are the method's parameters, each with a default and
                      a type OmegaConf understands (int, float, bool, str, Optional, List, Enum, nested
                      dataclasses). Validate values in ``__post_init__`` by raising ``ConfigError``.

It is constructed as ``Method(config)`` or ``Method(**fields)`` and registered through the entry-point
group ``vizkit.methods`` of its distribution's ``pyproject.toml``::

    [project.entry-points."vizkit.methods"]
    my_rise = "my_package.rise:Rise"

At start-up vizkit stores every ``Config`` in Hydra's ConfigStore under group ``method``, so
``vizkit method=my_rise method.masks=2000`` is type-checked exactly like a built-in.

The method does the math on tensors; the runner owns devices, batching, precision, progress and
logging, and the same object works from plain Python without Hydra or Lightning. Each kind has a base
class below that does its argument handling, so a method file is only its idea:

* ``AttributionMethod``: implement ``compute(model, x, target, pixels) -> [B,1,H,W]`` (or ``[B,C,H,W]``),
  or an ``Attribution(maps, details)`` when it also measures something per input (integrated
  gradients' completeness error); callers use ``attribute(model, x, target)`` for the maps and
  ``explain(...)`` for both. ``attribute_targets(model, x, "top:5")`` gives K maps per input,
  ``[B,K,1,H,W]``, by calling ``compute`` once per target unless the method overrides
  ``compute_targets(model, x, targets, pixels)`` to share its passes (``targets`` is a
  ``vizkit.core.target_sets.TargetSet``: ``targets.scores(model, x)`` is ``[B,K]`` from one forward).

* ``OptimizationMethod``: implement ``setup(model, target, images, pixels) -> Problem`` (see
  ``vizkit.optimize.problem``): an image parameterization, a loss and its between-step hooks. Callers
  use ``optimize(model, target, images)``, a plain torch loop; the ``vizkit`` command runs the same
  problem as a Lightning ``fit``. Its ``Config`` subclasses ``OptimizationConfig`` (steps, lr,
  optimizer, log_every, seed, max_loss).

* ``AdversarialMethod``: implement ``perturb(model, pixels, labels, targets, space) -> adversarial
  pixels`` (pixel space [0, 1]; ``space`` normalizes for the model), or a ``Perturbed(pixels,
  details)`` when it also records something per input (which of an ensemble's attacks broke it);
  callers use ``attack(model, x, labels, target=...)`` in the model's input space, and
  ``attack_with_details`` for both. ε and step sizes are pixel units (``eps="8/255"`` as written).
  ``report(records)`` may add run-level figures computed from those details.

* ``InspectionMethod``: looks at the network itself (its weights, or what excites it over a data set)
  and returns ``Inspection(pictures, tags, metrics, records)``. A data-free method (``filters``)
  implements ``finish`` only; a data-set scan (``needs_data = True``) also ``start``, ``update``
  (per batch, on the device) and ``merge`` (one state per device → one). Callers use
  ``inspect(model, images)``; the ``vizkit`` command streams ``data=`` through ``Trainer.predict``.

What ``compute`` can rely on, and what it owes:

* ``x`` is detached, on the model's device; a class ``target`` has its indices on that device too.
  ``target.score(model, x)`` gives one differentiable number per input; for a class target,
  ``target.logits(model, x)`` and ``target.select(...)`` split that, and ``target.take(rows)`` gives
  the targets of perturbed copies (``rows`` = which input each copy came from). The default
  target, each input's predicted class, is read from the first ``target.logits(model, x)`` call on
  the clean ``x``: start with that forward and the prediction costs no extra pass.
* Gradients are enabled (the runner predicts inside ``torch.enable_grad()``); a method that needs none
  wraps its forwards in ``torch.no_grad()``. Under ``trainer.precision=bf16-mixed`` the runner's
  forward runs under autocast: accumulate in float32 and return float maps.
* Never modify the model (hooks, flags, modes): use ``vizkit.core.hooks`` context managers.
* A method with randomness takes a ``seed`` field and draws from its own ``torch.Generator``; the
  global RNG is never touched, so a result does not depend on what ran before.
* A method with many forward passes batches them itself (a ``batch_size`` field, as occlusion).
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar

from vizkit.core.configured import Configured, NoConfig
from vizkit.core.errors import ConfigError

if TYPE_CHECKING:  # the contract module itself needs no torch
    import numpy as np
    import torch

    from vizkit.core.pixels import PixelSpace
    from vizkit.core.targets import Target

KINDS = ("attribution", "optimization", "adversarial", "inspection")


@dataclasses.dataclass
class Attribution:
    """What an attribution method returns when it has more to say than the maps."""

    maps: "torch.Tensor"  # [B,1,H,W] (or [B,C,H,W]) float, detached
    details: dict[str, "torch.Tensor"] = dataclasses.field(default_factory=dict)  # name -> [B] per-input numbers


@dataclasses.dataclass
class Perturbed:
    """What an adversarial method returns when it has more to say than the adversarial pixels."""

    pixels: "torch.Tensor"  # [B,3,H,W] adversarial pixels in [0, 1] (from ``perturb``) or model inputs (from ``attack_with_details``)
    details: dict[str, "torch.Tensor"] = dataclasses.field(default_factory=dict)  # name -> [B] per-input numbers


class Method(Configured):
    """Base of every method; see the module docstring for the contract."""

    name: ClassVar[str]
    kind: ClassVar[str]  # set by the kind's base class only
    description: ClassVar[str]
    Config: ClassVar[type] = NoConfig

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        base = next((base for base in cls.__mro__[1:] if base in _KIND_BASES), None)
        declared = cls.__dict__.get("kind")
        if base is not None and declared is not None and declared != base.kind:
            raise TypeError(f"{cls.__name__} declares kind={declared!r} but subclasses {base.__name__}, so it runs as "
                            f"'{base.kind}': the kind comes from the base class (drop kind=, or subclass another base)")


    def notes(self) -> dict[str, Any]:
        """What the calls so far decided that a reader of results.json should know (its ``method.notes``):
        which code path ran, say (occlusion's incremental or naive inference). JSON-able; default none."""
        return {}


_KIND_BASES: list[type] = []  # AttributionMethod, OptimizationMethod, ...: the only classes that set ``kind``


class AttributionMethod(Method):
    """Which input pixels drive a target.

    Subclasses implement ``compute``; callers use ``attribute``, which normalizes the target and works
    out how to reach pixel space. ``target_kinds`` lists the target kinds the method can explain:
    ``"class"`` (a logit or probability), ``"channel"`` (a layer channel's summed activation) and
    ``"neuron"`` (one activation at a spatial position).
    """

    kind: ClassVar[str] = "attribution"
    target_kinds: ClassVar[frozenset[str]] = frozenset({"class"})

    def attribute(
        self,
        model: "torch.nn.Module",
        x: "torch.Tensor",
        target: Any = None,
        *,
        mean: Any = None,
        std: Any = None,
    ) -> "torch.Tensor":
        """Attribution maps for the batch ``x`` (the model's input, ``[B,3,H,W]``, on its device).

        ``target``: ``None`` (each input's predicted class), a class index, one index per input
        (sequence or tensor), a string such as ``"class:3"``, ``"class:tabby"``,
        ``"channel:layer4:7"``, ``"neuron:layer3.1:5:2:2"``, or a resolved ``vizkit.core.targets`` object.
        ``mean``/``std``: how ``x`` was normalized from pixels in [0, 1]; by default taken from the
        model's timm data config, and if it has none ``x`` is taken as pixels already.
        Returns ``[B,1,H,W]`` float maps (``[B,C,H,W]`` where a method documents it), detached.
        The model is not modified: no hooks, flags or modes outlive the call.
        """
        return self.explain(model, x, target, mean=mean, std=std).maps

    def explain(
        self,
        model: "torch.nn.Module",
        x: "torch.Tensor",
        target: Any = None,
        *,
        mean: Any = None,
        std: Any = None,
    ) -> Attribution:
        """``attribute``, plus the per-input ``details`` a method measured along the way."""
        from vizkit.core.hooks import evaluating
        from vizkit.core.target_sets import SET_FORMS, is_target_set
        from vizkit.core.targets import resolve_target

        if is_target_set(target):
            raise ConfigError(f"{self.name}: target {target!r} asks for several maps per input ({SET_FORMS}); "
                              f"use attribute_targets(model, x, targets), which returns [B, K, 1, H, W]")
        pixels = self._checked_pixels(model, x, mean, std)
        with evaluating(model):
            resolved = resolve_target(target, model, x)
            self._check_kind(resolved.kind, resolved)
            if resolved.kind == "class":
                resolved = resolved.to(x.device)
            result = self.compute(model, x.detach(), resolved, pixels)
        return _detached(result)

    def attribute_targets(self, model: "torch.nn.Module", x: "torch.Tensor", targets: Any, *, mean: Any = None, std: Any = None) -> "torch.Tensor":
        """One map per input and target: ``[B, K, 1, H, W]`` (``[B, K, C, H, W]`` where ``attribute``
        gives C channels), map ``[b, k]`` equal to ``attribute(model, x[b:b+1], column k)``.

        ``targets``: ``"top:K"`` (each input's K most probable classes, most probable first), a list
        of target strings (``["class:3", "class:7"]``, ``["channel:layer4:3", "channel:layer4:9"]``),
        or a ``vizkit.core.target_sets.TargetSet``. Methods that can share their passes among the
        targets do (``compute_targets``): one forward and K vector-Jacobian products for the gradient
        methods and the gradient CAMs, the K scores read off the same forwards for occlusion, Score-CAM
        and Ablation-CAM.
        """
        return self.explain_targets(model, x, targets, mean=mean, std=std).maps

    def explain_targets(self, model: "torch.nn.Module", x: "torch.Tensor", targets: Any, *, mean: Any = None, std: Any = None) -> Attribution:
        """``attribute_targets``, plus the per-input and per-target ``details`` (``[B, K]``)."""
        from vizkit.core.hooks import evaluating
        from vizkit.core.target_sets import resolve_target_set

        pixels = self._checked_pixels(model, x, mean, std)
        with evaluating(model):
            resolved = resolve_target_set(targets, model, x)
            for kind in sorted(resolved.kinds):
                self._check_kind(kind, resolved)
            result = self.compute_targets(model, x.detach(), resolved.to(x.device), pixels)
        return _detached(result)

    def compute_targets(self, model: "torch.nn.Module", x: "torch.Tensor", targets: Any, pixels: "PixelSpace") -> "torch.Tensor | Attribution":
        """Maps for every target of a ``TargetSet``, ``[B, K, ...]`` (details ``[B, K]``). By default
        ``compute`` once per column; a method that can share passes among targets overrides this."""
        results = [self.compute(model, x, column, pixels) for column in targets.columns()]
        results = [result if isinstance(result, Attribution) else Attribution(result) for result in results]
        return stacked(results)

    def _checked_pixels(self, model: "torch.nn.Module", x: "torch.Tensor", mean: Any, std: Any) -> "PixelSpace":
        from vizkit.core.pixels import PixelSpace
        from vizkit.core.validate import check_batch, warn_unnormalized

        check_batch(self.name, model, x)
        pixels = PixelSpace.for_model(model, mean=mean, std=std, device=x.device)
        warn_unnormalized(self.name, pixels, x)
        return pixels

    def _check_kind(self, kind: str, resolved: Any) -> None:
        if kind not in self.target_kinds:
            raise ConfigError(f"{self.name} cannot explain a {kind} target ({resolved}); it takes: {', '.join(sorted(self.target_kinds))}")

    def check(self, model: "torch.nn.Module") -> None:
        """Refuse, with a ``ConfigError``, a model this method cannot explain (a layer it does not
        have), before any work starts. The runner calls it once after loading the model; by default
        every model is fine."""

    def compute(self, model: "torch.nn.Module", x: "torch.Tensor", target: "Target", pixels: "PixelSpace") -> "torch.Tensor | Attribution":
        """The method's math. ``target`` is resolved (its ``kind`` is in ``target_kinds``), ``pixels``
        converts between the model's input space and pixels in [0, 1]. Return ``[B,1,H,W]`` maps, or
        an ``Attribution`` carrying per-input ``details`` too."""
        raise NotImplementedError


def stacked(results: list[Attribution]) -> Attribution:
    """Per-target results as one: maps ``[B, K, ...]``, details ``[B, K]``."""
    import torch

    return Attribution(torch.stack([r.maps for r in results], 1),
                       {name: torch.stack([r.details[name] for r in results], 1) for name in results[0].details})


def _detached(result: "torch.Tensor | Attribution") -> Attribution:
    if not isinstance(result, Attribution):
        result = Attribution(result)
    return Attribution(result.maps.detach(), {k: v.detach() for k, v in result.details.items()})


class OptimizationMethod(Method):
    """Create images by optimizing them through a frozen network.

    Class attributes: ``target_kinds`` (the target kinds ``target=`` may name; empty: the method takes
    none), ``default_target`` (used when none is given, e.g. every class), ``needs_images`` (it starts
    from input images: Deep Dream, inversion, style transfer). Such a method names its results after
    their inputs with ``Problem.from_inputs``; a run shows each input's own name there.
    """

    kind: ClassVar[str] = "optimization"
    target_kinds: ClassVar[frozenset[str]] = frozenset()
    default_target: ClassVar["str | None"] = None
    needs_images: ClassVar[bool] = False
    # whether the images are independent, so that a batch too large for memory may run in chunks
    # (``split``); a method whose loss couples them (feature_viz's diversity) says False
    chunkable: ClassVar[bool] = True

    def default_target_for(self, model: "torch.nn.Module") -> "str | None":
        """The target when none is given: ``default_target``, unless the method reads it from the model."""
        return self.default_target

    def optimize(self, model: "torch.nn.Module", target: Any = None, images: "torch.Tensor | None" = None, *,
                 mean: Any = None, std: Any = None, on_step: Any = None):
        """Run the optimization in plain torch; returns ``vizkit.optimize.loop.Optimized`` (images as
        pixels in [0, 1], per-image metrics, the loss history).

        ``target``: a target string (``"class:star"``, ``"channel:layer3:5"``), a list of them or of
        ``{target, weight}`` mappings (a weighted sum), or None for ``default_target``.
        ``images``: ``[B,3,H,W]`` pixels in [0, 1] for methods that start from images.
        ``mean``/``std``: the model's input normalization; by default from its timm data config.
        ``on_step(step, problem)``: called after every step (and once before the first, step 0).
        The model is not modified: its flags and mode are restored, no hook outlives the call.
        """
        from vizkit.optimize.loop import join, run_steps

        return join([run_steps(problem, self.config, on_step) for problem in self.problems(model, target, images, mean=mean, std=std)])

    def problem(self, model: "torch.nn.Module", target: Any = None, images: "torch.Tensor | None" = None, *,
                mean: Any = None, std: Any = None):
        """The ``Problem`` for these arguments (checked), on the model's device, all images in one batch:
        refused when they cannot fit in memory together (``problems`` splits them instead)."""
        problem = self._problem(model, target, images, mean, std)
        budget = self.budget(model, problem)
        if budget.fitting(len(problem.names)) < len(problem.names):
            raise budget.refuse(self.name, len(problem.names))
        return problem

    def problems(self, model: "torch.nn.Module", target: Any = None, images: "torch.Tensor | None" = None, *,
                 mean: Any = None, std: Any = None) -> list:
        """The ``Problem``s for these arguments: one, or, when its images cannot fit in memory together
        and the method is ``chunkable``, one per chunk of as many as fit (``split``), optimized one
        after the other. Their results are the same images as one batch would give, up to the
        optimizer's coupling of a batch (L-BFGS's shared line search)."""
        whole = self._problem(model, target, images, mean, std)
        count = len(whole.names)
        budget = self.budget(model, whole)
        fitting = budget.fitting(count)
        if self.config.chunk_size and self.chunkable:
            fitting = min(fitting, self.config.chunk_size)
        if fitting >= count:
            whole.memory_bytes = budget.per_image * count
            return [whole]
        # a chunk holds whole inputs (inversion makes one result per input and layer), or classes
        per_unit = max(1, count // images.shape[0]) if images is not None else 1
        if not self.chunkable or fitting < per_unit:
            raise budget.refuse(self.name, count, "" if self.chunkable else f", and {self.name}'s images are optimized together")
        del whole
        problems = []
        offset = 0
        for part_target, part_images in self.split(model, target, images, fitting // per_unit):
            problem = self._problem(model, part_target, part_images, mean, std)
            problem.memory_bytes = budget.per_image * len(problem.names)
            if problem.origins is not None:  # rows of the whole batch, not of the chunk
                problem.from_inputs([(row + offset, part) for row, part in problem.origins])
                offset += part_images.shape[0]
            problems.append(problem)
        return problems

    def split(self, model: "torch.nn.Module", target: Any, images: "torch.Tensor | None", size: int) -> list[tuple[Any, Any]]:
        """(target, images) of each chunk: by default `size` input images at a time."""
        if images is None:
            raise ConfigError(f"{self.name} cannot split its batch; choose fewer images")
        return [(target, images[start:start + size]) for start in range(0, images.shape[0], size)]

    def budget(self, model: "torch.nn.Module", problem):
        """What one of `problem`'s images costs in memory and how many fit (``vizkit.core.memory``)."""
        from vizkit.core.hooks import evaluating
        from vizkit.core.memory import Budget

        one = problem.pixels()[:1].detach()
        with evaluating(model):
            # per image: its parameters, their gradient and Adam's two moments, in float32
            return Budget(model, problem.model_input(one), per_image_extra=4 * 4 * one.numel())

    def _problem(self, model, target, images, mean, std):
        import torch

        from vizkit.core.pixels import PixelSpace

        device = next((p.device for p in model.parameters()), None)
        if isinstance(target, str) and target.strip().lower() == "predicted":
            target = None
        target = target if target is not None else self.default_target_for(model)
        if target is not None and not self.target_kinds:
            raise ConfigError(f"{self.name} takes no target; its fields say what to optimize (see `vizkit method={self.name} --cfg job`)")
        if target is None and self.target_kinds:
            raise ConfigError(f"{self.name} needs a target: one of {', '.join(sorted(self.target_kinds))} (e.g. target=channel:LAYER:C)")
        if self.needs_images:
            from vizkit.core.validate import check_pixels

            if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3 or images.shape[0] == 0:
                raise ConfigError(f"{self.name} starts from images: give a [B,3,H,W] batch of pixels in [0, 1]")
            check_pixels(self.name, images)
            images = images.detach().float().to(device)
        pixels = PixelSpace.for_model(model, mean=mean, std=std, device=device)
        return self.setup(model, target, images, pixels)

    def check(self, model: "torch.nn.Module") -> None:
        """Refuse a model this method cannot work on (a layer it does not have) before any work."""

    def setup(self, model: "torch.nn.Module", target: Any, images: "torch.Tensor | None", pixels: "PixelSpace"):
        """The method's idea: build and return a ``vizkit.optimize.problem.Problem``."""
        raise NotImplementedError


class AdversarialMethod(Method):
    """Change the network's mind by a small change of the input (or make it see a class in nothing).

    Subclasses implement ``perturb``, in pixel space; callers use ``attack`` in the model's input space.
    ``targeted``: whether the method can drive inputs to a chosen class (``target=class:...``).
    """

    kind: ClassVar[str] = "adversarial"
    targeted: ClassVar[bool] = True

    def attack(self, model: "torch.nn.Module", x: "torch.Tensor", labels: Any = None, *, target: Any = None,
               mean: Any = None, std: Any = None) -> "torch.Tensor":
        """Adversarial versions of the batch ``x`` (the model's input ``[B,3,H,W]``, normalized as it
        expects; from a plain ``nn.Module`` with no data config and no ``mean``/``std``, ``x`` is taken
        as pixels in [0, 1], as torchattacks does), detached, in the same space as ``x``.

        ``labels``: the true classes ([B] indices, a sequence, or None for the model's clean
        prediction): an untargeted attack moves away from them. ``target``: None (untargeted) or a
        class for every input (``"class:star"``, an index, or [B] indices): a targeted attack moves
        towards it. The model is not modified.
        """
        return self.attack_with_details(model, x, labels, target=target, mean=mean, std=std).pixels

    def attack_with_details(self, model: "torch.nn.Module", x: "torch.Tensor", labels: Any = None, *, target: Any = None,
                            mean: Any = None, std: Any = None) -> Perturbed:
        """``attack``, plus the per-input ``details`` the method recorded (empty for most)."""
        import torch

        from vizkit.core.hooks import evaluating
        from vizkit.core.pixels import PixelSpace
        from vizkit.core.validate import check_batch, refuse_unnormalized

        check_batch(self.name, model, x)
        space = PixelSpace.for_model(model, mean=mean, std=std, device=x.device)
        refuse_unnormalized(self.name, space, x)
        pixels = space.to_pixels(x.detach()).clamp(0, 1)
        with evaluating(model):
            labels = self.labels(model, x, labels)
            targets = self.targets(model, x, target)
            with torch.enable_grad():
                result = as_perturbed(self.perturb(model, pixels, labels, targets, space))
        return Perturbed(space.from_pixels(result.pixels.detach()).to(x.dtype), result.details)

    def report(self, records: list[dict[str, Any]]) -> dict[str, float]:
        """Run-level figures beyond those every attack gets (clean and robust accuracy, success rate,
        norms), from the run's per-input records (each holds ``details``: this method's per-input
        numbers, ``clean_correct`` and ``adversarial_correct``). Default: none."""
        return {}

    def labels(self, model: "torch.nn.Module", x: "torch.Tensor", labels: Any) -> "torch.Tensor":
        """[B] long labels on x's device: those given, else the model's clean top-1 prediction."""
        import torch

        if labels is None:
            with torch.no_grad():
                return model(x).argmax(1)
        labels = torch.as_tensor(labels, dtype=torch.long, device=x.device).reshape(-1)
        if labels.numel() == 1:
            labels = labels.expand(x.shape[0])
        if labels.numel() != x.shape[0]:
            raise ConfigError(f"{self.name}: {labels.numel()} labels for a batch of {x.shape[0]}")
        return labels

    def targets(self, model: "torch.nn.Module", x: "torch.Tensor", target: Any) -> "torch.Tensor | None":
        """[B] long target classes, or None for an untargeted attack."""
        from vizkit.core.targets import ClassTarget, resolve_target

        if target is None or (isinstance(target, str) and target.strip().lower() == "predicted"):
            return None
        if not self.targeted:
            raise ConfigError(f"{self.name} is untargeted: it takes no target (drop target=...)")
        resolved = resolve_target(target, model, x)
        if not isinstance(resolved, ClassTarget):
            raise ConfigError(f"{self.name} drives inputs to a class: use target=class:NAME or class:INDEX, not {resolved}")
        return resolved.indices.to(x.device)

    def perturb(self, model: "torch.nn.Module", pixels: "torch.Tensor", labels: "torch.Tensor",
                targets: "torch.Tensor | None", space: "PixelSpace") -> "torch.Tensor | Perturbed":
        """The method's math, in pixel space: ``pixels`` [B,3,H,W] in [0, 1] (detached), ``labels`` [B],
        ``targets`` [B] or None; the model takes ``space.from_pixels(p)``. Return adversarial pixels,
        valid ([0, 1]) and within the method's budget, or a ``Perturbed`` with per-input details.
        Gradients are enabled; ask autograd for the input's gradient only (``torch.autograd.grad``),
        never the weights'."""
        raise NotImplementedError


def as_perturbed(result: Any) -> Perturbed:
    """``perturb``'s result as a ``Perturbed`` (a bare tensor has no details)."""
    return result if isinstance(result, Perturbed) else Perturbed(result)


@dataclasses.dataclass
class Inspection:
    """What an inspection method returns: pictures, where TensorBoard shows them, numbers, notes."""

    pictures: dict[str, "np.ndarray"]  # name -> HxWx3 uint8; the name is also the PNG's (images/NAME.png)
    tags: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> TensorBoard tag; missing: METHOD/NAME
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # scalars, HParams, results.json
    records: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # JSON-able details for results.json


class InspectionMethod(Method):
    """Look inside the network: its weights, or what excites it over a data set.

    The work is split so that a data-set scan runs at the speed of plain inference on any number of
    devices (top-k on the device, one state per device, merged at the end):

    * ``start(model, space) -> state``: the empty state, on ``space``'s device (default ``None``).
    * ``update(state, model, pixels, indices, space) -> state``: one batch; ``pixels`` ``[B,3,H,W]``
      in [0, 1] on the device (the model takes ``space.from_pixels(pixels)``), ``indices`` ``[B]``
      long, the samples' positions in the data set, on the device too. Gradients are off.
    * ``merge(states) -> state``: the states of several devices (each saw a disjoint part of the data
      set) as one, as if one device had seen everything (default: the single state).
    * ``finish(state, model, space, fetch) -> Inspection``: the pictures and numbers; ``fetch(index)``
      gives a sample's pixels ``[3,H,W]`` back (to crop a patch), so a state need only keep indices.

    A state is plain data: tensors, numbers, strings and lists/dicts of them (it crosses processes
    through ``torch.load(weights_only=True)``). ``needs_data``: whether ``update`` must see images; a
    method that needs none implements ``finish`` only. Never modify the model.
    """

    kind: ClassVar[str] = "inspection"
    needs_data: ClassVar[bool] = False

    def inspect(self, model: "torch.nn.Module", images: "torch.Tensor | None" = None, *, mean: Any = None, std: Any = None,
                batch_size: int = 32) -> Inspection:
        """``start`` → ``update`` over ``images`` (pixels ``[N,3,H,W]`` in [0, 1]; required when
        ``needs_data``) in batches of ``batch_size`` on the model's device → ``finish``.
        ``mean``/``std``: the model's input normalization; by default from its timm data config."""
        import torch

        from vizkit.core.pixels import PixelSpace

        from vizkit.core.hooks import evaluating
        from vizkit.core.validate import check_pixels

        if images is None and self.needs_data:
            raise ConfigError(f"{self.name} scans images: give a [N,3,H,W] batch of pixels in [0, 1]")
        if images is not None and (not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3 or images.shape[0] == 0):
            raise ConfigError(f"{self.name}: expected images [N,3,H,W] (pixels in [0, 1]), got {tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
        if images is not None:
            check_pixels(self.name, images)
        if batch_size < 1:
            raise ConfigError(f"{self.name}: batch_size must be positive, got {batch_size}")
        self.check(model)
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        space = PixelSpace.for_model(model, mean=mean, std=std, device=device)

        def fetch(index: int) -> "torch.Tensor":
            if images is None:
                raise ConfigError(f"{self.name} was given no images to fetch sample {index} from")
            return images[index].detach().float()

        with torch.no_grad(), evaluating(model):
            state = self.start(model, space)
            for first in range(0, 0 if images is None else images.shape[0], batch_size):
                pixels = images[first:first + batch_size].detach().to(device, torch.float32)
                indices = torch.arange(first, first + pixels.shape[0], device=device)
                state = self.update(state, model, pixels, indices, space)
            return self.conclude(state, model, space, fetch)

    def conclude(self, state: Any, model: "torch.nn.Module", space: "PixelSpace", fetch: Any) -> Inspection:
        """``finish``, checked, with every picture's tag filled in (``METHOD/NAME`` by default)."""
        inspection = self.finish(state, model, space, fetch)
        for name, picture in inspection.pictures.items():
            if not name or "/" in name or "\\" in name:  # it names a file in images/
                raise ValueError(f"{self.name}: picture name {name!r} must be a non-empty file name without slashes")
            if picture.ndim != 3 or picture.shape[2] != 3 or picture.dtype.name != "uint8":
                raise TypeError(f"{self.name}: picture '{name}' must be an HxWx3 uint8 array, got {picture.dtype} {picture.shape}")
        inspection.tags = {name: inspection.tags.get(name, f"{self.name}/{name}") for name in inspection.pictures}
        inspection.metrics = {name: float(value) for name, value in inspection.metrics.items()}
        return inspection

    def check(self, model: "torch.nn.Module") -> None:
        """Refuse a model this method cannot inspect (a layer it does not have) before any work."""

    def start(self, model: "torch.nn.Module", space: "PixelSpace") -> Any:
        """The state before any batch."""
        return None

    def update(self, state: Any, model: "torch.nn.Module", pixels: "torch.Tensor", indices: "torch.Tensor", space: "PixelSpace") -> Any:
        """The state after one more batch."""
        return state

    def merge(self, states: list[Any]) -> Any:
        """One state from the states of several devices (in rank order)."""
        if len(states) != 1:
            raise NotImplementedError(f"{self.name} cannot merge the states of {len(states)} devices; implement merge")
        return states[0]

    def finish(self, state: Any, model: "torch.nn.Module", space: "PixelSpace", fetch: Any) -> Inspection:
        """The method's result from its final state."""
        raise NotImplementedError


_KIND_BASES.extend([AttributionMethod, OptimizationMethod, AdversarialMethod, InspectionMethod])
