"""Rows of issue 18's attacks and metrics: method rows of C&W, APGD (CE, DLR, targeted), FAB-T, Square
and AutoAttack against torchattacks, and metric rows of ROAD (MoRF, LeRF), average drop, increase in
confidence, infidelity and max-sensitivity against pytorch-grad-cam and captum (README.md says what
each times).

Attack rows call ``attack(model, x, labels)`` on resnet18's normalized input, ε 8/255 (L∞; C&W is an
L2 attack without a budget), and torchattacks' class on a copy of the model with
``set_normalization_used(mean, std)``: it takes the same normalized ``x``, maps it to pixels, attacks
them and normalizes the result. ``labels`` are the model's clean predictions, computed once, untimed:
with the row's random targets as labels every input would count as misclassified already, and APGD,
FAB, Square and AutoAttack would attack nothing.

An attack's work depends on the data: APGD and FAB attack only the inputs still classified as their
label (each later target class only those the earlier left), Square stops querying a broken input,
AutoAttack runs each member on what the earlier left. So every call of the method and of the peer
counts the model's forwards (a forward pre-hook on the top module, removed after the call: a few µs a
forward), and the floor replays the passes the attack cannot avoid at the batch sizes the method's
own call met (the method runs first in each round). A gradient pass is attack_row's: forward of the
normalized pixels, cross-entropy, autograd.grad to the input.

  cw          its gradient passes: steps per round (fewer where the early stop ended a round)
  apgd_*      one no-grad forward of the clean batch + (steps + 1) gradient passes per run (the start's
              gradient, then one per step), each on the inputs that run attacked
  fab_t       one no-grad forward of the clean batch + steps gradient passes per target run + one no-grad
              forward of each run's result (its success check). FAB's no-grad forward after every step
              (the reference code's, and torchattacks') is not in it: the next step's forward could
              read the same logits
  square      every forward it made: its queries, no gradient
  autoattack  the sum of its members' floors, each member run alone (untimed, forwards counted) on the
              inputs the earlier members left; the ensemble's own clean forward and its check after
              each member are on top

Metric rows call ``evaluate`` on saliency maps of x and the row's class targets
(``rows_methods.metric_inputs``). Floors: ROAD the percentiles x B imputed images (pre-built) forwarded
``batch_size`` at a time (the imputation's sparse solves are timed once, while building them, and
reported beside: ``imputation_seconds``); average drop and increase in confidence one forward of the
clean batch and one of the masked batch; infidelity one forward of the clean batch and the samples x B
perturbed copies (pre-built), ``batch_size`` at a time; max-sensitivity the samples x B perturbed
copies' saliency, one forward and one backward to the input per ``batch_size`` copies.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from floors import chunked_gradient_floor
from harness import Inner, Row, time_alternating
from peers import captum_infidelity, captum_sensitivity_max, pytorch_grad_cam_metric, torchattacks_robustness
from rows_methods import metric_inputs

STEPS = 10  # APGD's and FAB's iterations and C&W's Adam steps: torchattacks' defaults, which its AutoAttack keeps
TARGET_CLASSES = 3  # APGD-T's and FAB-T's target classes: torchattacks' n_classes=4
EPS = "8/255"
ATTACKS = {  # row -> (vizkit method, its fields, the floor's kind)
    "cw": ("cw", {"binary_search_steps": 1, "steps": STEPS, "c": 1.0, "lr": 0.01}, "cw"),
    "apgd_ce": ("apgd", {"eps": EPS, "steps": STEPS, "loss": "ce"}, "apgd"),
    "apgd_dlr": ("apgd", {"eps": EPS, "steps": STEPS, "loss": "dlr"}, "apgd"),
    "apgd_t": ("apgd", {"eps": EPS, "steps": STEPS, "loss": "dlr", "target_classes": TARGET_CLASSES}, "apgd"),
    "fab_t": ("fab", {"eps": EPS, "steps": STEPS, "target_classes": TARGET_CLASSES}, "fab"),
    "square": ("square", {"eps": EPS, "queries": 100}, "square"),
    # torchattacks' AutoAttack gives its members their own default 10 steps (it passes none) and Square 5000 queries
    "autoattack": ("autoattack", {"eps": EPS, "steps": STEPS, "target_classes": TARGET_CLASSES, "queries": 5000}, "ensemble"),
}
MEMBER_KINDS = {"apgd-ce": "apgd", "apgd-dlr": "apgd", "apgd-t": "apgd", "fab": "fab", "fab-t": "fab", "square": "square"}
METRICS = ("road_morf", "road_lerf", "average_drop", "increase_in_confidence", "infidelity", "sensitivity_max")
CLASSES = {"apgd": "APGD", "cw": "CW", "fab": "FAB", "square": "Square", "autoattack": "AutoAttack"}

Passes = list[tuple[int, bool]]  # (images, with a gradient to the input) per forward


def create_attack(name: str, **fields: Any):
    """The registered method, or (while its entry point is not in pyproject.toml yet) its class."""
    import importlib

    import vizkit
    from vizkit.core.errors import ConfigError

    try:
        return vizkit.create_method(name, **fields)
    except ConfigError as error:
        if not str(error).startswith("unknown method"):
            raise
        return getattr(importlib.import_module(f"vizkit.methods.adversarial.{name}"), CLASSES[name])(**fields)


@contextlib.contextmanager
def counted(model: nn.Module) -> Iterator[Passes]:
    """The model's forwards while inside: (images, whether the input requires a gradient) each."""
    seen: Passes = []

    def record(_module: nn.Module, args: tuple[Any, ...]) -> None:
        seen.append((int(args[0].shape[0]), bool(torch.is_grad_enabled() and args[0].requires_grad)))

    handle = model.register_forward_pre_hook(record)
    try:
        yield seen
    finally:
        handle.remove()


def run_lengths(passes: Passes) -> list[list[Any]]:
    """[[images, "grad" | "forward", consecutive count], ...]: a row's readable record of passes."""
    runs: list[list[Any]] = []
    for images, gradient in passes:
        kind = "grad" if gradient else "forward"
        if runs and runs[-1][:2] == [images, kind]:
            runs[-1][2] += 1
        else:
            runs.append([images, kind, 1])
    return runs


def floor_passes(kind: str, seen: Passes, steps: int) -> Passes:
    """The passes of ``seen`` (one counted call) an attack of ``kind`` cannot avoid (module docstring)."""
    gradients = [(images, True) for images, gradient in seen if gradient]
    if kind == "cw":
        return gradients
    if kind == "square":
        return list(seen)
    clean = [seen[0]] if seen and not seen[0][1] else []
    if kind == "apgd":
        return clean + gradients
    checks = [(images, False) for images, _ in gradients[::steps]]  # fab: a run is `steps` gradient passes
    return clean + gradients + checks


def replay(model: nn.Module, space: Any, pixels: torch.Tensor, labels: torch.Tensor, passes: Passes) -> None:
    """The floor: each pass on the first ``images`` inputs, a gradient pass as attack_row's."""
    for images, gradient in passes:
        if gradient:
            point = pixels[:images].detach().requires_grad_()
            loss = F.cross_entropy(model(space.from_pixels(point)), labels[:images])
            torch.autograd.grad(loss, point)
        else:
            with torch.no_grad():
                model(space.from_pixels(pixels[:images]))


def still_correct(model: nn.Module, adversarial: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(adversarial).argmax(1) == labels


def ensemble_floor(method: Any, model: nn.Module, x: torch.Tensor, labels: torch.Tensor, classes: int) -> tuple[Passes, dict[str, Any]]:
    """AutoAttack's floor: each member run alone on the inputs the earlier ones left (forwards counted),
    its own floor summed; and per member, the inputs it got and its floor's run lengths."""
    config = method.config
    robust = torch.arange(x.shape[0])
    passes: Passes = []
    members: dict[str, Any] = {}
    for name in config.attacks:
        if robust.numel() == 0:
            break
        member = method.member(name, classes)
        with counted(model) as seen:
            found = member.attack(model, x[robust], labels[robust])
        own = floor_passes(MEMBER_KINDS[name], seen, config.steps)
        passes += own
        members[name] = {"inputs": int(robust.numel()), "floor_passes": run_lengths(own)}
        robust = robust[still_correct(model, found, labels[robust])]
    return passes, members


def attack_row(name: str, model: nn.Module, x: torch.Tensor, repeats: int) -> Row:
    from vizkit.core.pixels import PixelSpace

    method_name, fields, kind = ATTACKS[name]
    method = create_attack(method_name, **fields)
    space = PixelSpace.for_model(model)
    pixels = space.to_pixels(x).clamp(0, 1)
    space_x = space.from_pixels(pixels)
    with torch.no_grad():
        logits = model(space_x)
    labels = logits.argmax(1)  # the clean predictions: every input starts correctly classified
    copied, peer, peer_name = torchattacks_robustness(name, model)
    seen: dict[str, Passes] = {}  # each call's forwards, counted by a pre-hook (a few µs a forward)
    results: dict[str, torch.Tensor] = {}
    extra: dict[str, Any] = {}

    def method_call():
        with counted(model) as passes:
            result = method.attack_with_details(model, space_x, labels)
        seen["method"], results["method"] = passes, result.pixels
        if kind == "ensemble":
            extra["broken_by"] = result.details["broken_by"].tolist()

    def peer_call():
        with counted(copied) as passes:
            results["peer"] = peer(space_x, labels)
        seen["peer"] = passes

    if kind == "ensemble":  # untimed: the members alone, on what the earlier left
        ensemble, extra["members"] = ensemble_floor(method, model, space_x, labels, logits.shape[1])
        unavoidable = lambda: ensemble
    else:  # from the method's own call, which comes first in every round
        unavoidable = lambda: floor_passes(kind, seen["method"], STEPS)
    replay(model, space, pixels, labels, [(x.shape[0], True)])  # the warm-up: a call is 10-100 passes, one pass warms them
    times = time_alternating({
        "method": method_call,
        "floor": lambda: replay(model, space, pixels, labels, unavoidable()),
        "peer": peer_call,
    }, repeats, warmup=False)
    robust = {"method": int(still_correct(model, results["method"], labels).sum()),
              "peer": int(still_correct(model, results["peer"], labels).sum()), "of": x.shape[0]}
    passes = unavoidable()
    return Row.timed(name, x, times, peer_name, passes=sum(n for n, gradient in passes if gradient),
                     floor_forwards=sum(n for n, gradient in passes if not gradient), settings={"method": method_name, **fields},
                     floor_passes=run_lengths(passes), method_forwards=run_lengths(seen["method"]), peer_forwards=run_lengths(seen["peer"]),
                     robust=robust, **extra, note=attack_note(kind, robust))


def attack_note(kind: str, robust: dict[str, int]) -> str:
    floors = {
        "cw": "floor: its gradient passes (forward + cross-entropy + autograd.grad to the input), steps per round, as counted",
        "apgd": "floor: one no-grad forward of the clean batch + (steps + 1) gradient passes per run on the inputs that run "
                "attacked (counted: an input broken by a run is not attacked by the next target's)",
        "fab": "floor: one no-grad forward of the clean batch + steps gradient passes per target run on the inputs it attacked + "
               "one no-grad forward of each run's result; FAB's (and torchattacks') no-grad forward after every step is not in it",
        "square": "floor: every forward it made (counted), no_grad, at the sizes it made them: its queries",
        "ensemble": "floor: the sum of the members' floors, each member run alone (untimed) on the inputs the earlier ones left; "
                    "on a random-weight resnet18 at 8/255 APGD-CE may break every input, and then the later members do "
                    "nothing: that is the real work (members says what each got)",
    }
    peer = "; torchattacks' CW also computes every weight gradient (cost.backward())" if kind == "cw" else ""
    return (floors[kind] + peer + "; labels: the model's clean predictions; torchattacks on a copy, given the same normalized x with "
            f"set_normalization_used(mean, std); robust: inputs still classified as their label after the last call "
            f"(method {robust['method']}, peer {robust['peer']} of {robust['of']})")


# ------------------------------------------------------------------ metrics


def road_row(name: str, model: nn.Module, x: torch.Tensor, target: torch.Tensor, repeats: int) -> Row:
    from vizkit.metrics import create_metric
    from vizkit.metrics.road import removal_masks, road_images

    metric = create_metric(name)
    config = metric.config
    inputs = metric_inputs(model, x, target)
    removed = removal_masks(inputs.maps, config.percentiles, metric.most_relevant_first)
    warm = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    warm[..., 1, 1] = True
    next(road_images(x[:1, :, :4, :4], warm, config.noise, config.seed))  # scipy's imports and first solve, untimed
    imputation = Inner()
    with imputation:  # the sparse solves, once: not the floor's, reported beside it
        images = torch.stack(list(road_images(x, removed, config.noise, config.seed)))

    def floor():
        with torch.no_grad():
            for chunk in images.split(config.batch_size):
                model(chunk)

    percentiles = [100 - p for p in config.percentiles]
    run_peer, peer_name = pytorch_grad_cam_metric(name, percentiles)
    cams = inputs.maps.sum(1).numpy()
    times = time_alternating({
        "method": lambda: metric.evaluate(inputs),
        "floor": floor,
        "peer": lambda: run_peer(x, cams, target, model),
    }, repeats, warmup=False)  # warm: building the floor's images ran the imputation
    seconds, solves = times["method"].median, imputation.timing.wall[0]
    return Row.timed(name, x, times, peer_name, stage="metric", passes=len(images),
                     settings={"percentiles": config.percentiles, "noise": config.noise, "batch_size": config.batch_size,
                               "peer_percentiles": percentiles},
                     imputation_seconds=solves, imputation_cpu=imputation.timing.cpu[0],
                     ratio_vs_floor_plus_imputation=seconds / (times["floor"].median + solves),
                     note=f"floor: the percentiles x B imputed images (pre-built), forwarded {config.batch_size} per pass, no_grad; "
                          f"imputation_seconds: building them once (a sparse solve per input and percentile, the metric's own "
                          f"road_images); pytorch-grad-cam keeps 100 - p % of the pixels, forwards B images at a time and the "
                          f"clean batch again at every percentile; maps: saliency of x")


def confidence_row(name: str, model: nn.Module, x: torch.Tensor, target: torch.Tensor, repeats: int) -> Row:
    from vizkit.metrics import create_metric
    from vizkit.metrics.confidence import explanation_images, unit_maps

    metric = create_metric(name)
    inputs = metric_inputs(model, x, target)
    masked = explanation_images(inputs, metric.config.space)

    def floor():
        with torch.no_grad():
            model(x)
            model(masked)

    run_peer, peer_name = pytorch_grad_cam_metric(name)
    cams = unit_maps(inputs.maps)[:, 0].numpy()  # the peer multiplies by the maps it is given: ours, normalized
    times = time_alternating({
        "method": lambda: metric.evaluate(inputs),
        "floor": floor,
        "peer": lambda: run_peer(x, cams, target, model),
    }, repeats)
    return Row.timed(name, x, times, peer_name, stage="metric", passes=2 * x.shape[0], settings={"space": metric.config.space},
                     note="floor: one no_grad forward of the clean batch, one of the masked batch (pre-built); the metric also "
                          "min-max normalizes the maps and multiplies in pixel space; pytorch-grad-cam (CamMultImageConfidenceChange; "
                          "torchcam's ClassificationMetric computes its own CAMs and takes no maps) gets the normalized maps and "
                          "multiplies the normalized input; maps: saliency of x")


def infidelity_row(model: nn.Module, x: torch.Tensor, target: torch.Tensor, repeats: int, warmup: bool) -> Row:
    from vizkit.metrics import create_metric

    metric = create_metric("infidelity")
    config = metric.config
    inputs = metric_inputs(model, x, target)
    sigma = inputs.pixels.std
    batch = x.shape[0]
    generator = torch.Generator().manual_seed(config.seed)
    draws = torch.stack([torch.randn(x.shape[1:], generator=generator) * config.std for _ in range(config.samples)])
    rows = torch.arange(batch).repeat(config.samples)  # sample-major, as the metric
    copies = x[rows] - draws.repeat_interleave(batch, 0) / sigma

    def floor():
        with torch.no_grad():
            for chunk in x.split(config.batch_size):
                model(chunk)
            for chunk in copies.split(config.batch_size):
                model(chunk)

    run_peer, peer_name = captum_infidelity(model, config.std / sigma, config.samples, config.batch_size, config.seed)
    attributions = inputs.maps.expand_as(x).contiguous()  # captum needs the input's shape
    times = time_alternating({
        "method": lambda: metric.evaluate(inputs),
        "floor": floor,
        "peer": lambda: run_peer(x, attributions, target),
    }, repeats, warmup)
    return Row.timed("infidelity", x, times, peer_name, stage="metric", passes=batch * (config.samples + 1),
                     settings={"samples": config.samples, "std": config.std, "normalize": config.normalize, "score": config.score,
                               "batch_size": config.batch_size, "peer_max_examples_per_batch": config.batch_size},
                     note=f"floor: one no_grad forward of the clean batch and the samples x B perturbed copies (pre-built), "
                          f"{config.batch_size} per pass; captum with a perturb_func drawing one Gaussian [C,H,W] per sample "
                          f"shared by the inputs (the metric's kind), max_examples_per_batch={config.batch_size}, on the map expanded "
                          f"to the input's channels; it also forwards the clean batch again for every chunk; maps: saliency of x")


def sensitivity_row(model: nn.Module, x: torch.Tensor, target: torch.Tensor, repeats: int, warmup: bool) -> Row:
    from vizkit.metrics import create_metric

    metric = create_metric("sensitivity_max")
    config = metric.config
    inputs = metric_inputs(model, x, target)
    sigma = inputs.pixels.std
    batch = x.shape[0]
    generator = torch.Generator().manual_seed(config.seed)
    draws = torch.stack([torch.empty(x.shape[1:]).uniform_(-config.radius, config.radius, generator=generator)
                         for _ in range(config.samples)])
    rows = torch.arange(batch).repeat(config.samples)  # sample-major, as the metric
    copies = x[rows] + draws.repeat_interleave(batch, 0) / sigma
    radius = config.radius / float(sigma.mean())  # captum's default perturbation takes one radius, in input units
    run_peer, peer_name = captum_sensitivity_max(model, radius, config.samples, config.batch_size)
    times = time_alternating({
        "method": lambda: metric.evaluate(inputs),
        "floor": lambda: chunked_gradient_floor(model, copies, target[rows], config.batch_size),
        "peer": lambda: run_peer(x, target),
    }, repeats, warmup)
    return Row.timed("sensitivity_max", x, times, peer_name, stage="metric", passes=batch * config.samples,
                     settings={"samples": config.samples, "radius": config.radius, "batch_size": config.batch_size,
                               "method": "saliency", "peer_perturb_radius": radius, "peer_max_examples_per_batch": config.batch_size},
                     note=f"floor: saliency's passes on the samples x B perturbed copies (pre-built): forward + backward to the "
                          f"input, {config.batch_size} copies per pass; captum: Saliency(abs=True).attribute as explanation_func, "
                          f"its default uniform perturbation with the radius over the mean normalization std, "
                          f"max_examples_per_batch={config.batch_size}; it also explains the clean batch once more")


# ------------------------------------------------------------------ dispatch


def robustness_method_row(name: str, model: nn.Module, x: torch.Tensor, plan: Any) -> Row:
    """At 224 px a call makes ~10-100 passes of the batch (batch 8: ~2-60 s on 1 thread): the plan's
    ``many_forward_repeats`` (2 at batch 1, 1 at batch 8), and one gradient pass as the warm-up."""
    return attack_row(name, model, x, plan.many_forward_repeats[x.shape[0]])


def robustness_metric_row(name: str, model: nn.Module, x: torch.Tensor, target: torch.Tensor, plan: Any) -> Row:
    """ROAD makes ~9 x B sparse solves a call (0.1-0.9 s each at 224 px): ``many_forward_repeats``, no
    warm-up; infidelity and max-sensitivity 10 x B forwards (with backwards): ``perturbation_repeats``,
    a warm-up at batch 1 only; the confidence metrics two forwards: ``repeats``, with a warm-up."""
    batch = x.shape[0]
    if name in ("road_morf", "road_lerf"):
        return road_row(name, model, x, target, plan.many_forward_repeats[batch])
    if name == "infidelity":
        return infidelity_row(model, x, target, plan.perturbation_repeats[batch], warmup=batch == 1)
    if name == "sensitivity_max":
        return sensitivity_row(model, x, target, plan.perturbation_repeats[batch], warmup=batch == 1)
    return confidence_row(name, model, x, target, plan.repeats[batch])
