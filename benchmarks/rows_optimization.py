"""Optimization rows: an optimization method's fit as the ``vizkit`` command runs it (the run's own
Trainer and fit, ``vizkit.run.optimization``), per optimizer step, against one forward + backward to the
input per step at the sizes the method's forwards see, the plain torch loop, and (feature_viz) lucent."""
from __future__ import annotations

import dataclasses
import importlib.util
import statistics
import tempfile
from collections import OrderedDict
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from floors import hook_count, input_gradient_passes
from harness import Inner, Row, per_step, second_peer, set_threads, time_alternating
from peers import lucent_fns

# What each optimization row optimizes on resnet18 (its Config fields, applied where the Config has them;
# methods still being written may name their layer fields differently: the row says which fields it used)
OPTIMIZATION_METHODS = ("class_model", "feature_viz", "inversion", "deep_dream", "neural_style")
FEATURE_VIZ_TARGET = ("layer3", 5)  # channel:layer3:5; lucent names it "layer3:5"
OPTIMIZATION_FIELDS: dict[str, dict[str, Any]] = {
    "class_model": {},
    "feature_viz": {},
    "inversion": {"layer": "layer3", "layers": ["layer3"]},
    "deep_dream": {"layer": "layer3", "layers": ["layer3"]},
    "neural_style": {"content_layer": "layer3", "style_layers": ["act1", "layer1", "layer2", "layer3"]},
}


class Skipped(Exception):
    """An optimization row that cannot run here (its method is not written yet, or refuses the model)."""


def optimization_method(name: str, steps: int, size: int, batch: int):
    """(the method configured for the row, its target, the fields given) or Skipped."""
    from vizkit.core.errors import VizkitError
    from vizkit.methods.registry import create_method, get

    try:
        entry = get(name)
    except VizkitError as error:  # not registered, or its module does not import (yet)
        raise Skipped(f"not available: {error}") from None
    fields = {f.name for f in dataclasses.fields(entry.cls.Config)}
    wanted = {"steps": steps, "size": size, **OPTIMIZATION_FIELDS.get(name, {})}
    if "batch" in fields:
        wanted["batch"] = batch
    given = {key: value for key, value in wanted.items() if key in fields}
    try:
        method = create_method(name, **given)
    except VizkitError as error:
        raise Skipped(f"config {given} refused: {error}") from None
    if name == "class_model":
        target: Any = "class:1" if batch == 1 else [f"class:{c}" for c in range(1, batch + 1)]
    elif name == "feature_viz":
        target = "channel:{}:{}".format(*FEATURE_VIZ_TARGET)
    else:
        target = None
    return method, target, given


def warmup_method(method: Any) -> Any:
    """The same method with a short fit's steps: 2, or as few as its config allows (deep_dream wants a
    step per octave). The run's Trainer and fit take their steps from ``method.config.steps``."""
    from vizkit.core.errors import ConfigError

    config = method.config
    for steps in (2, getattr(config, "octaves", 2)):
        try:
            return type(method)(config, steps=steps)
        except (ConfigError, TypeError, ValueError):
            continue
    return method


def probe_passes(model: nn.Module, problem: Any, config: Any) -> tuple[list[list[tuple[int, ...]]], list[str]]:
    """One untimed plain run of the problem with hooks that record, for every evaluation of the loss
    (L-BFGS evaluates it several times per step), the input shape of each model forward (the transforms
    change the size), and which of the model's top-level modules ran (vizkit stops a forward after the
    deepest layer it reads). The hooks are removed afterwards; it also warms the plain loop."""
    from vizkit.optimize.loop import run_steps

    evaluations: list[list[tuple[int, ...]]] = []
    ran: set[str] = set()
    inside = [False]

    def before(_module, args):
        if inside[0]:
            evaluations[-1].append(tuple(args[0].shape))

    handles = [model.register_forward_pre_hook(before)]
    for child_name, child in model.named_children():
        handles.append(child.register_forward_hook(lambda _m, _i, _o, child_name=child_name: ran.add(child_name) if inside[0] else None))
    loss = problem.loss

    def counted(step, max_loss=float("inf")):
        evaluations.append([])
        inside[0] = True
        try:
            return loss(step, max_loss)
        finally:
            inside[0] = False

    problem.loss = counted
    try:
        run_steps(problem, config)
    finally:
        del problem.loss
        for handle in handles:
            handle.remove()
    order = [child_name for child_name, _ in model.named_children()]
    return evaluations, [child_name for child_name in order if child_name in ran]


def trunk_for(model: nn.Module, children_ran: list[str]) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """The model's forward up to the deepest top-level module the method's forward reached: the model
    itself when that is the last one, else its children up to there as a Sequential (checked against
    the model's own forward once)."""
    children = list(model.named_children())
    deepest = max(i for i, (child_name, _) in enumerate(children) if child_name in children_ran)
    if deepest == len(children) - 1:
        return model, "the whole model"
    trunk = nn.Sequential(OrderedDict(children[: deepest + 1]))
    captured: list[torch.Tensor] = []
    handle = children[deepest][1].register_forward_hook(lambda _m, _i, output: captured.append(output.clone()))
    probe = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    try:
        with torch.no_grad():
            model(probe)
            same = torch.allclose(trunk(probe), captured[0], atol=1e-5)
    finally:
        handle.remove()
    if not same:
        raise RuntimeError(f"the children of {type(model).__name__} up to {children[deepest][0]} are not its forward; give the floor a stop hook")
    return trunk, f"the model's children up to {children[deepest][0]} (the method's forward stops there)"


def optimization_row(name: str, model: nn.Module, batch: int, size: int, steps: int, repeats: int, workdir: Path,
                     with_peer: bool = True) -> Row:
    """Seconds per optimizer step of the Lightning fit the `vizkit` command runs, against one forward +
    backward to the input per step at the sizes the method's forwards see (its transforms change the
    size), the plain torch loop, and (feature_viz) lucent's render_vis."""
    from vizkit.core.data import unique_names
    from vizkit.optimize.loop import run_steps
    from vizkit.output.writer import RunWriter
    from vizkit.run.optimization import fit_problem, optimization_trainer
    from vizkit.run.settings import TrainerConfig

    method, target, given = optimization_method(name, steps, size, batch)
    config = method.config
    images = None
    if method.needs_images:  # random pixel images, a fixed generator
        images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(size * 10 + batch))
    try:
        method.check(model)
        problem = method.problem(model, target, images)
    except Exception as error:  # a method being written may refuse resnet18's layers: the row says why
        raise Skipped(f"{type(error).__name__}: {error}") from None
    for parameter in model.parameters():
        parameter.grad = None
    hooks_before = hook_count(model)
    evaluations, children_ran = probe_passes(model, problem, config)  # untimed; warms the plain loop
    trunk, floor_depth = trunk_for(model, children_ran)
    generator = torch.Generator().manual_seed(11)
    floor_inputs = [torch.randn(shape, generator=generator) for passes in evaluations for shape in passes]
    passes_per_evaluation = len(floor_inputs) / len(evaluations)
    nominal = [torch.randn(batch, 3, size, size, generator=generator)] * min(steps, 8)

    trainers, fits, plains, problems = Inner(), Inner(), Inner(), Inner()
    counts: dict[str, list[int]] = {"fit": [], "plain": []}
    trainer_config = TrainerConfig(accelerator="cpu", progress_bar=False)

    def count_evaluations(problem_: Any, key: str) -> None:
        loss = problem_.loss

        def counted(step, max_loss=float("inf")):
            counts[key][-1] += 1
            return loss(step, max_loss)

        counts[key].append(0)
        problem_.loss = counted

    def fit(fitted: Any = method, record: bool = True) -> None:
        """The run's fit (``vizkit.run.optimization``): ``optimization_trainer`` (TensorBoard logger, loss
        scalars every min(log_every, 8) steps, the image's checkpoint when the fit ends; progress bar off)
        and ``fit_problem`` (the model frozen, the images at step 0, every log_every and the last), for
        ``fitted.config.steps`` steps."""
        with problems if record else nullcontext():
            problem_ = fitted.problem(model, target, images)
        problem_.names = unique_names(problem_.names)
        run_dir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=workdir))
        with trainers if record else nullcontext():
            trainer, logger = optimization_trainer(fitted, trainer_config, run_dir)
            writer = RunWriter(run_dir, logger.experiment)
        if record:
            count_evaluations(problem_, "fit")
        with fits if record else nullcontext():
            fit_problem(trainer, fitted, model, problem_, writer)
        if writer.image_events is not None:
            writer.image_events.close()
        logger.finalize("success")
        set_threads()

    def plain() -> None:
        problem_ = method.problem(model, target, images)
        count_evaluations(problem_, "plain")
        with plains:
            run_steps(problem_, config)

    fns: dict[str, Callable[[], Any]] = {
        "method": fit,
        "floor": lambda: input_gradient_passes(model, trunk, floor_inputs),
        "plain": plain,
        "floor_nominal": lambda: input_gradient_passes(model, trunk, nominal),
    }
    lucent = with_peer and name == "feature_viz"
    peer_extra: dict[str, Any] = {}
    if lucent and importlib.util.find_spec("lucent") is None:  # a peer, not a dependency: the bench extra has it
        lucent, peer_extra["peer_note"] = False, "lucent is not installed: `make bench` installs the bench extra (torch-lucent)"
    if lucent:
        fns.update(lucent_fns(model, *FEATURE_VIZ_TARGET, size, batch, steps, peer_extra))
    # warm-ups: a short fit (Lightning's first fit pays one-time costs), one pass of each floor; the
    # probe warmed the plain loop, lucent_fns warmed lucent
    fit(warmup_method(method), record=False)
    input_gradient_passes(model, trunk, floor_inputs[:1])
    input_gradient_passes(model, trunk, nominal[:1])
    times = time_alternating(fns, repeats, warmup=False)
    hooks_after = hook_count(model)
    weight_grads = any(parameter.grad is not None for parameter in model.parameters())

    evaluations_per_step = len(evaluations) / steps
    floor_per_pass = per_step(times["floor"], len(floor_inputs))  # one forward + backward at the method's sizes
    floor_per_step = per_step(floor_per_pass, 1 / passes_per_evaluation)  # one evaluation's passes (1 for all methods here)
    times_per_step = {"method": per_step(fits.timing, steps), "floor": floor_per_step}
    if lucent:
        times_per_step["peer"] = per_step(times["peer"], steps)
        times_per_step["peer2"] = per_step(times["peer2"], steps)
    plain_seconds = statistics.median(plains.timing.wall) / steps
    seconds = statistics.median(fits.timing.wall) / steps
    sizes = [shape[-1] for passes in evaluations for shape in passes]
    floor_nominal = statistics.median(times["floor_nominal"].wall) / len(nominal)
    extra: dict[str, Any] = {
        "steps": steps,
        "plain_seconds": plain_seconds, "plain_min": min(plains.timing.wall) / steps,
        "plain_cpu_seconds": statistics.median(plains.timing.cpu) / steps,
        "plain_ratio": plain_seconds / floor_per_step.median, "lightning_share": seconds / plain_seconds - 1,
        "trainer_seconds": statistics.median(trainers.timing.wall), "problem_seconds": statistics.median(problems.timing.wall),
        "evaluations_per_step": evaluations_per_step,
        "evaluations_fit": counts["fit"], "evaluations_plain": counts["plain"],
        "seconds_per_evaluation": seconds / evaluations_per_step,
        "ratio_per_evaluation": seconds / evaluations_per_step / floor_per_step.median,
        "floor_nominal_seconds": floor_nominal, "ratio_vs_nominal_floor": seconds / floor_nominal,
        "forward_sizes": {"min": min(sizes), "mean": statistics.mean(sizes), "max": max(sizes)},
        "floor_depth": floor_depth,
        "hooks_before": hooks_before, "hooks_after_vizkit": hooks_after, "weight_grads_after_vizkit": weight_grads,
        "settings": {"target": target, "fields": given, "images": "torch.rand, fixed generator" if images is not None else None,
                     "optimizer": config.optimizer, "lr": config.lr, "log_every": config.log_every,
                     "transforms": list(getattr(config, "transforms", []) or [])},
    }
    peer_name = None
    if lucent:
        peer_name = "lucent.render_vis(unfrozen model)"
        peer2_name = "lucent.render_vis(frozen model)"
        extra.update(second_peer({"peer2": times_per_step["peer2"]}, peer2_name, seconds))
        peer_floor = statistics.median(times["peer_floor"].wall) / peer_extra["peer_floor_passes"]
        peer_extra.update(peer_floor_seconds=peer_floor,
                          peer_over_own_floor=times_per_step["peer"].median / peer_floor,
                          peer2_over_own_floor=times_per_step["peer2"].median / peer_floor)
        peer_extra.pop("peer_floor_passes")
    extra.update(peer_extra)
    row_times = {k: v for k, v in times_per_step.items() if k != "peer2"}
    note = ("seconds: the run's own fit per step (vizkit.run.optimization: optimization_trainer's Trainer with its TensorBoard "
            "logger, loss scalars and image checkpoint, then fit_problem: the model frozen, images at step 0, every log_every "
            "and the last, and the run's end-of-fit checkpoint of the image, checkpoints/image.ckpt; Trainer and problem "
            "construction excluded); floor: one forward + backward "
            f"to the input per step, model frozen, at the sizes the method's forwards saw (replayed), through {floor_depth}; "
            "plain_seconds: run_steps (the plain loop, its final no-grad measure() forward included) per step")
    return Row.timed(name, torch.empty(batch, 3, size, size), row_times, peer_name, stage="optimization", **extra, note=note)
