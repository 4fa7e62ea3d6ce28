"""One run, from typed settings to results.json: the family chosen by the method's base class, its
stages in order, the shared ending (``vizkit.run.family``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from vizkit.core.errors import ConfigError
from vizkit.methods.base import KINDS
from vizkit.output.writer import check_fresh
from vizkit.run.adversarial import AdversarialRun
from vizkit.run.attribution import AttributionRun
from vizkit.run.family import Clock, FamilyRun, end
from vizkit.run.inspection import InspectionRun
from vizkit.run.optimization import OptimizationRun
from vizkit.run.settings import RunSettings

FAMILIES: tuple[type[FamilyRun], ...] = (AttributionRun, OptimizationRun, AdversarialRun, InspectionRun)


def family_of(method_class: type) -> type[FamilyRun]:
    """The run family of a method class: the one whose ``method_base`` comes first in its MRO."""
    by_base = {family.method_base: family for family in FAMILIES}
    for base in method_class.__mro__:
        if base in by_base:
            return by_base[base]
    raise ConfigError(f"method class {method_class.__name__} subclasses none of the method bases this vizkit runs "
                      f"({', '.join(family.method_base.__name__ for family in FAMILIES)})")


def execute(settings: RunSettings, run_dir: Path) -> dict[str, Any] | None:
    """Execute one run; returns what was written to results.json (None on the non-zero ranks of a
    multi-device run)."""
    clock = Clock()
    # start-up costs, counted with the model load rather than the work: Lightning, and the TensorBoard
    # writer its logger would otherwise import inside the predict loop (~0.05 s)
    import pytorch_lightning  # noqa: F401
    import torch
    import torch.utils.tensorboard  # noqa: F401

    run_dir = Path(run_dir)
    check_fresh(run_dir)
    settings.check()
    run = family_of(type(settings.method))(settings, run_dir, clock)
    if settings.seed is not None:
        torch.manual_seed(int(settings.seed))
    run.prepare()
    if not run.execute():  # a non-zero rank of a multi-device run: rank 0 writes everything
        return None
    return end(run, run.summarize())


def report(results: dict[str, Any]) -> str:
    """The line the command prints for a finished run: what ran, on how much, where, and what it
    measured (accuracy, metric means, robust accuracy, completeness error, losses...)."""
    kind = results["method"]["kind"]
    by_kind = {family.method_base.kind: family for family in FAMILIES}
    if kind not in by_kind:
        raise ConfigError(f"results of an unknown kind '{kind}'; kinds: {', '.join(KINDS)}")
    measured = measured_line(results.get("metrics") or {})
    return by_kind[kind].report(results) + (f": {measured}" if measured else "")


SHOWN_FIGURES = 10  # a run's summary stays one readable line; results.json and results.csv hold every figure


def measured_line(metrics: dict[str, Any]) -> str:
    """``top1_accuracy 1, deletion 0.123, loss total 41.2 -> 3.05``: a run's figures in one line,
    an optimization's first and last loss as one item."""
    items, seen = [], set()
    for name, value in metrics.items():
        if not isinstance(value, (int, float)) or name in seen:
            continue
        if name.startswith("loss_") and name.endswith("_first") and f"{name[:-6]}_last" in metrics:
            last = f"{name[:-6]}_last"
            seen.add(last)
            items.append(f"loss {name[5:-6]} {value:.4g} -> {metrics[last]:.4g}")
        else:
            items.append(f"{name} {value:.4g}")
    shown = ", ".join(items[:SHOWN_FIGURES])
    return shown + (f" (+{len(items) - SHOWN_FIGURES} more in results.json)" if len(items) > SHOWN_FIGURES else "")
