"""The ``vizkit`` command: compose the Hydra config, hand typed settings to ``vizkit.run``, report where results are.

Importing this module discovers the method plugins and stores their configs (and a help page that
lists them) in Hydra's ConfigStore, before ``@hydra.main`` composes anything. torch, timm and
Lightning are imported only once a run starts, so ``vizkit --help`` stays quick.
"""
from __future__ import annotations

import contextlib
import sys
import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from vizkit.cli import config_sources, configs
from vizkit.methods import registry
from vizkit.core.errors import VizkitError

CONF_DIR = config_sources.conf_dir()
ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"

HELP_TEMPLATE = """vizkit: what does this network see?

Runs a method (attribution, optimization, adversarial, inspection) on a timm model and images, and
writes PNGs, results.json and TensorBoard logs into the run directory under outputs/.

== Methods (method=NAME; fields: vizkit method=NAME --cfg job) ==
{methods}

== Metrics (metrics=[NAME,...]; fields: metrics.NAME.FIELD=...) ==
{metrics}

== Configuration groups (group=option) ==
$APP_CONFIG_GROUPS
== Targets (target=...) ==
  predicted | class:INDEX | class:NAME | channel:LAYER:C | neuron:LAYER:C:Y:X | layer:LAYER
  optimization: also a list, [channel:layer3:5,class:star], or all (class_model: every class)
  attribution: also top:K or a list, [class:3,class:7]: one map per input and target
  (layers: vizkit-layers MODEL)

== Examples ==
  vizkit
  vizkit method=occlusion method.window=16 method.stride=8 target=class:3
  vizkit -m method=saliency,guided_backprop
  vizkit method=gradcam data=shapes metrics=[deletion,insertion,pointing_game]
  vizkit -m +experiment=compare_attribution
  vizkit method=class_model
  vizkit method=feature_viz target=channel:layer3:5 method.batch=4 method.diversity=1
  vizkit model.name=resnet18 model.checkpoint=weights.safetensors data=images data.paths=[cat.jpg]
  vizkit method=top_patches data=imagefolder data.root=val/ data.workers=8 method.channels=top:6

== Config ==
$CONFIG
Use --hydra-help to view Hydra's own options."""


def setup() -> None:
    """Register method configs, plugins' config folders, the help page and the ``vizkit_asset``
    resolver (idempotent)."""
    from hydra.core.config_store import ConfigStore

    from vizkit import metrics

    configs.store_schemas()
    configs.store_method_configs()
    config_sources.register()
    configs.store_metric_configs()
    methods = registry.describe_methods().replace("${", "\\${")
    every_metric = f"  metrics={metrics.ALL} selects every metric above (as +experiment=compare_attribution does)"
    metric_lines = f"{metrics.describe_metrics()}\n{every_metric}".replace("${", "\\${")
    ConfigStore.instance().store(
        group="hydra/help", name="vizkit",
        node={"app_name": "vizkit", "header": "", "footer": "", "template": HELP_TEMPLATE.format(methods=methods, metrics=metric_lines)},
    )
    if not OmegaConf.has_resolver("vizkit_asset"):
        OmegaConf.register_new_resolver("vizkit_asset", lambda name: str(ASSETS_DIR / name))
    if not OmegaConf.has_resolver("vizkit_run_name"):  # a sweep's job directory: 3_pgd_eps=2⁄255
        from vizkit.cli.sweep_review import run_name

        OmegaConf.register_new_resolver("vizkit_run_name", run_name)
    if not OmegaConf.has_resolver("vizkit_methods"):  # "a,b,c": a sweep over the methods of one kind
        OmegaConf.register_new_resolver("vizkit_methods", lambda kind: ",".join(registry.names_of_kind(kind)))


def _run_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


_JOBS = {"finished": 0, "failed": 0}  # this process's jobs of a multirun


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.get().mode == RunMode.MULTIRUN


def _review_dir(run_dir: Path) -> Path:
    """The directory TensorBoard should open: the sweep's for a multirun (one HParams table)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    config = HydraConfig.get()
    return Path(config.sweep.dir).resolve() if config.mode == RunMode.MULTIRUN else run_dir


def _explained(error: BaseException, run_dir: Path) -> str | None:
    """The one line for an error a user can act on, or None."""
    if isinstance(error, VizkitError):
        return str(error)
    if isinstance(error, InterpolationResolutionError):  # a value with ${...} in it, such as a file name
        where = f" in {error.full_key}" if error.full_key else ""
        return (f"{str(error).splitlines()[0]}{where}: the config reads '${{...}}' as an interpolation; "
                f"a literal '${{' in a value, such as a file name, is written '\\${{'")
    if isinstance(error, OSError):  # a full disk, a read-only file system, a file that vanished
        where = f": {error.filename}" if error.filename else ""
        return f"{error.strerror or error}{where}; what was written before is kept in {run_dir}"
    return None


def run(cfg: DictConfig, run_dir: Path) -> dict | None:
    """One run of a composed config: its typed settings (``vizkit.cli.configs``) executed by
    ``vizkit.run``; returns what results.json holds (None on the secondary ranks of a multi-device run)."""
    from vizkit.run.execute import execute

    return execute(configs.run_settings(cfg), run_dir)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _main(cfg: DictConfig) -> None:
    from vizkit.cli import run_dirs
    from vizkit.core import interrupt
    from vizkit.run.execute import report

    run_dir = _run_dir()
    run_dirs.claim_job_dir(run_dir)  # a multirun's job; a single run claimed its directory before Hydra wrote into it
    if not run_dirs.is_secondary_rank():  # before any progress: a long run can be watched while it goes
        print(f"vizkit: writing to {run_dir}; watch with: tensorboard --logdir {_review_dir(run_dir)}", flush=True)  # user-facing
    with interrupt.graceful(), _vizkit_warnings_as_notes():
        try:
            results = run(cfg, run_dir)
        except BaseException as error:
            message = _explained(error, run_dir)
            settled = run_dirs.settle_failed(run_dir, message or f"{type(error).__name__}: {error}",
                                             _review_dir(run_dir) if _in_multirun() else None)
            if message is None:  # not the user's doing: the traceback is the report
                raise
            print(f"vizkit: error: {message}" + (f" ({settled})" if settled else ""), file=sys.stderr)  # user-facing
            if _in_multirun():  # one job refused (a method that does not apply to the model): the sweep goes on
                _JOBS["failed"] += 1
                return
            sys.exit(2)
        signum = interrupt.received()
    if results is None:  # a secondary rank of a multi-device run
        return
    _JOBS["finished"] += 1
    run_dirs.mark(run_dir, "finished" if signum is None else "interrupted")
    print(f"vizkit: {report(results)} -> {run_dir}", flush=True)  # user-facing
    print(f"vizkit: review with: tensorboard --logdir {_review_dir(run_dir)}")  # user-facing
    if signum is not None:
        said = "what finished is written above, results.json says status 'interrupted'"
        print(f"vizkit: interrupted by {interrupt.name(signum)}: {said}", file=sys.stderr)  # user-facing
        sys.exit(128 + signum)  # 130 for SIGINT, 143 for SIGTERM: what shells and schedulers expect


@contextlib.contextmanager
def _vizkit_warnings_as_notes():
    """vizkit's own warnings (occlusion's naive fallback, an unnormalized input) as one line each,
    ``vizkit: warning: ...``, without Python's file:line prefix and source line, never glued to the progress
    bar's line; others as Python shows them."""
    package = str(Path(__file__).resolve().parents[1])
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if str(Path(filename).resolve()).startswith(package) and issubclass(category, UserWarning):
            from tqdm import tqdm

            tqdm.write(f"vizkit: warning: {message}", file=sys.stderr)  # user-facing; on its own line, the progress bar redrawn below
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


def _check_metric_names(argv: list[str]) -> None:
    """``metrics=[deletoin]``: Hydra only says it cannot load 'metrics/deletoin'; name the close match."""
    from vizkit.metrics import ALL, get_metric

    for arg in argv:
        key, _, value = arg.partition("=")
        if key.lstrip("+~") != "metrics" or not value or "(" in value:
            continue
        for name in value.replace("[", ",").replace("]", ",").split(","):
            if name.strip() and name.strip() != ALL:  # 'all' is an option of the group, not a metric
                get_metric(name.strip())


def _default_choice(group: str) -> str | None:
    for entry in OmegaConf.load(CONF_DIR / "config.yaml").get("defaults", []):
        if isinstance(entry, DictConfig) and group in entry:
            return str(entry[group])
    return None


def _preset_fields(group: str, option: str) -> list[str] | None:
    """The fields of the dataclass a preset of ``model``, ``data`` or ``trainer`` extends (its
    ``base_*`` default), or None for a preset vizkit does not know (a user's own folder)."""
    import dataclasses

    from vizkit.core.data import DATA_KINDS
    from vizkit.core.models import ModelConfig
    from vizkit.run.settings import TrainerConfig

    path = CONF_DIR / group / f"{option}.yaml"
    if not path.is_file():
        return None
    bases = [str(entry) for entry in OmegaConf.load(path).get("defaults", []) if str(entry).startswith("base_")]
    schemas = {"base_model": ModelConfig, "base_trainer": TrainerConfig, **{f"base_{kind}": cls for kind, cls in DATA_KINDS.items()}}
    return [field.name for field in dataclasses.fields(schemas[bases[0]])] if bases and bases[0] in schemas else None


def _check_group_fields(argv: list[str]) -> None:
    """``data.cont=3``, ``model.nme=...``: Hydra says only that the key is not in the schema; name the
    fields of the chosen preset and the close match. Experiments (which may choose presets) are left
    to Hydra."""
    from vizkit.core.errors import ConfigError, did_you_mean

    keys = [arg.partition("=")[0] for arg in argv]
    if any(key.lstrip("+~").split(".")[0] == "experiment" for key in keys):
        return
    for group in ("model", "data", "trainer"):
        chosen = next((arg.partition("=")[2] for arg in reversed(argv) if arg.partition("=")[0] == group), None) or _default_choice(group)
        fields = _preset_fields(group, chosen) if chosen else None
        for key in keys:
            if fields is not None and key.startswith(f"{group}.") and key.split(".")[1] not in fields:
                name = key.split(".")[1]
                raise ConfigError(f"{group}={chosen} has no field '{name}'{did_you_mean(name, fields)}; its fields: {', '.join(fields)}")


def _check_method_fields(argv: list[str]) -> None:
    """``method.windw=8``: Hydra would first answer "To append to your config use +method.windw=8", and
    only after that hint the method says which fields it has. Name them, and the close match, at once.
    Presets, sweeps over methods and experiments (which may choose the method) are left to Hydra."""
    import dataclasses

    from vizkit.core.errors import ConfigError, did_you_mean

    keys = [arg.partition("=")[0] for arg in argv]
    if any(key.lstrip("+~").split(".")[0] == "experiment" for key in keys):
        return
    chosen = next((arg.partition("=")[2] for arg in reversed(argv) if arg.partition("=")[0] == "method"), None) or _default_choice("method")
    entry = registry.discover().get(chosen or "")
    if entry is None:
        return
    fields = [field.name for field in dataclasses.fields(entry.cls.Config)]
    for key in keys:
        if key.startswith("method.") and key.split(".")[1] not in fields:
            name = key.split(".")[1]
            raise ConfigError(f"method {chosen} has no field '{name}'{did_you_mean(name, fields)}; its fields: {', '.join(fields)} "
                              f"(vizkit method={chosen} --cfg job shows them with their defaults)")


def main() -> None:
    try:
        _check_method_fields(sys.argv[1:])
        _check_group_fields(sys.argv[1:])
        _check_metric_names(sys.argv[1:])
        setup()
    except VizkitError as error:  # e.g. two plugins claiming one method name
        print(f"vizkit: error: {error}", file=sys.stderr)  # user-facing
        sys.exit(2)
    _main()
    if _JOBS["failed"] and not _JOBS["finished"]:  # a sweep whose every job was refused (each said why above)
        sys.exit(2)


if __name__ == "__main__":
    main()
