"""TensorBoard HParams that compare runs.

TensorBoard's hparams plugin builds its table from an *experiment* (the column definitions) and one
*session* per run (that run's values). When it finds an experiment summary in any run it takes that
one and ignores the rest, so a run that wrote its own (as Lightning's ``log_hyperparams`` does) gave a
sweep the columns of whichever run was read first: occlusion's ``window`` missing beside integrated
gradients' ``steps``, and ``differs`` false even for the ε a sweep varied.

So a run writes only its session (``session_records``: its hparams at the start, its status at the
end), and its metrics stay the plain scalars ``metrics/NAME`` it logs anyway (no ``hparams/NAME``
copies). A sweep writes the one experiment (``write_experiment``) into its own directory once every
job has ended: the union of all runs' hparams and metrics, each hparam marked ``differs`` when its
value is not the same in every run (present in some runs only counts as differing). Without an
experiment (single runs) TensorBoard computes one from the sessions, which is also a union.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Iterable

import yaml

from vizkit.output.events import EventFile, tf_record

HPARAMS_FILE = "hparams.yaml"  # beside the run's event files: what its session says, for the sweep to read back
EXPERIMENT_SUFFIX = ".experiment"


def hparam_value(value: Any) -> bool | float | int | str:
    """What TensorBoard's HParams hold: numbers, strings and booleans (anything else as its text)."""
    if isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)):
        return value if math.isfinite(value) else str(value)
    return str(value)


def _record(tag: str, data: Any) -> bytes:
    """One hparams plugin summary (``data``: an ``HParamsPluginData``) as a framed event. Built here
    rather than by ``tensorboard.plugins.hparams.summary``, which imports TensorFlow."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import metadata

    summary = Summary(value=[Summary.Value(tag=tag, metadata=metadata.create_summary_metadata(data), tensor=metadata.NULL_TENSOR)])
    return tf_record(Event(wall_time=time.time(), step=0, summary=summary).SerializeToString())


def session_records(hparams: dict[str, Any], finished: bool, started: float | None = None) -> bytes:
    """A run's session: its hparams (start) and its status (end), as TFRecord-framed events."""
    from google.protobuf import struct_pb2
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    start = plugin_data_pb2.SessionStartInfo(start_time_secs=started or time.time())
    for name, value in hparams.items():
        value = hparam_value(value)
        start.hparams[name].CopyFrom(struct_pb2.Value(bool_value=value) if isinstance(value, bool) else
                                     struct_pb2.Value(number_value=value) if isinstance(value, (int, float)) else struct_pb2.Value(string_value=value))
    end = plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS if finished else api_pb2.STATUS_FAILURE, end_time_secs=time.time())
    return (_record(metadata.SESSION_START_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_start_info=start))
            + _record(metadata.SESSION_END_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_end_info=end)))


def write_session(log_dir: Path, hparams: dict[str, Any], finished: bool, started: float | None = None) -> None:
    """The session into an event file of its own in ``log_dir``, and ``hparams.yaml`` beside it."""
    hparams = {name: hparam_value(value) for name, value in hparams.items()}
    with EventFile(log_dir, ".session") as events:
        events.write(session_records(hparams, finished, started))
    with open(log_dir / HPARAMS_FILE, "x") as file:  # never replaces an earlier run's
        yaml.safe_dump(hparams, file, sort_keys=False)


def read_session(log_dir: Path) -> dict[str, Any] | None:
    """The hparams a run's ``write_session`` left in ``log_dir``, or None."""
    try:
        value = yaml.safe_load((log_dir / HPARAMS_FILE).read_text())
    except (OSError, yaml.YAMLError):
        return None
    return value if isinstance(value, dict) else None


def experiment_record(sessions: list[dict[str, Any]], metric_tags: Iterable[str]) -> bytes:
    """The experiment over ``sessions`` (each run's hparams): every name any run has, its type, its
    values, and ``differs``; ``metric_tags``: the scalar tags to show as metric columns."""
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    names = list(dict.fromkeys(name for session in sessions for name in session))
    infos = []
    for name in names:
        values = [session[name] for session in sessions if name in session]
        kinds = {type(value) if not isinstance(value, (int, float)) or isinstance(value, bool) else float for value in values}
        kind = kinds.pop() if len(kinds) == 1 else str
        info = api_pb2.HParamInfo(name=name, differs=len(values) < len(sessions) or len({repr(v) for v in values}) > 1)
        if kind is float:
            info.type = api_pb2.DATA_TYPE_FLOAT64
            info.domain_interval.min_value, info.domain_interval.max_value = min(values), max(values)
        elif kind is bool:
            info.type = api_pb2.DATA_TYPE_BOOL
            info.domain_discrete.extend(sorted(set(values)))
        else:
            info.type = api_pb2.DATA_TYPE_STRING
            info.domain_discrete.extend(sorted({str(value) for value in values}))
        infos.append(info)
    metrics = [api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag), display_name=tag) for tag in metric_tags]
    experiment = api_pb2.Experiment(hparam_infos=infos, metric_infos=metrics, time_created_secs=time.time())
    return _record(metadata.EXPERIMENT_TAG, plugin_data_pb2.HParamsPluginData(experiment=experiment))


def write_experiment(directory: Path, sessions: list[dict[str, Any]], metric_tags: Iterable[str]) -> Path:
    """The experiment as an event file of its own in ``directory`` (a sweep's); returns its path."""
    with EventFile(directory, EXPERIMENT_SUFFIX) as events:
        events.write(experiment_record(sessions, metric_tags))
    return events.path
