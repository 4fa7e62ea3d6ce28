"""Run directories and signals, through the real `vizkit` command: a directory is claimed before Hydra
writes into it (an earlier run's `.hydra/` is never rewritten, however the value is quoted), two runs
never share one, every run says how it ended (`.vizkit-run` and results.json `status`), and SIGINT /
SIGTERM stop a run after the current batch or step with what finished written and exit 130 / 143."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import VIZKIT
from vizkit.cli.run_dirs import MARKER, RunDirError, claim


def files_of(folder: Path) -> dict[Path, tuple[bytes, int]]:
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def marker(run_dir: Path) -> dict:
    return json.loads((run_dir / MARKER).read_text())


def writers_of(run_dir: Path) -> set[str]:
    """The processes that wrote a run's event files (``events.out.tfevents.TIME.HOST.PID.N[.images]``)."""
    return {path.name.split(".")[5] for path in (run_dir / "tensorboard").glob("events.out.tfevents.*")}


def assert_refused(run, *fragments):
    assert run.returncode == 2, (run.stdout, run.stderr)
    assert "Traceback" not in run.stderr, run.stderr
    for fragment in fragments:
        assert fragment in run.stderr, run.stderr


# ---------------------------------------------------------------------------------- claiming a directory


def test_claim_appends_a_number_to_a_taken_default_directory(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run-2").mkdir()
    assert claim(tmp_path / "run", pinned=False) == tmp_path / "run-3"
    assert marker(tmp_path / "run-3")["status"] == "running" and marker(tmp_path / "run-3")["pid"] == os.getpid()


def test_claim_takes_an_empty_pinned_directory_once(tmp_path):
    (tmp_path / "mine").mkdir()
    assert claim(tmp_path / "mine", pinned=True) == tmp_path / "mine"
    with pytest.raises(RunDirError, match=r"already holds an earlier vizkit run \(running, pid \d+\)"):
        claim(tmp_path / "mine", pinned=True)


def test_claim_refuses_files_a_file_and_a_read_only_parent(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(RunDirError, match="already holds files that are not a vizkit run"):
        claim(tmp_path / "notes", pinned=True)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(RunDirError, match="is a file, not a directory"):
        claim(tmp_path / "a_file", pinned=True)
    with pytest.raises(RunDirError, match="hydra.run.dir is empty"):
        claim("", pinned=True)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        # root writes anywhere it has permissions for; sysfs refuses even root a new folder
        where = Path("/sys/vizkit") if os.access(locked, os.W_OK) else locked
        with pytest.raises(RunDirError, match=r"cannot create (the parent of )?hydra.run.dir .*(Operation not permitted|Permission denied)"):
            claim(where / "run", pinned=True)
    finally:
        locked.chmod(0o700)


def test_a_pinned_directory_quoted_on_the_command_line_is_refused_before_hydra_writes(vizkit_cli, tmp_path):
    run_dir = tmp_path / "base"
    first = vizkit_cli(f"hydra.run.dir={run_dir}", "data=shapes", "data.count=1", "trainer.progress_bar=false")
    assert first.returncode == 0, first.stderr
    assert marker(run_dir)["status"] == "finished" and json.loads((run_dir / "results.json").read_text())["status"] == "finished"
    before = files_of(run_dir)
    second = vizkit_cli(f"hydra.run.dir='{run_dir}'", "method=deconvnet", "data=shapes", "data.count=1")
    assert_refused(second, f"hydra.run.dir {run_dir} already holds an earlier vizkit run (finished)")
    assert files_of(run_dir) == before  # .hydra/config.yaml still says saliency, byte for byte, untouched


def test_an_empty_run_dir_is_refused(vizkit_cli, tmp_path):
    assert_refused(vizkit_cli("hydra.run.dir=''"), "hydra.run.dir is empty")
    assert not (tmp_path / ".hydra").exists()


def test_a_pinned_sweep_directory_is_not_reused(vizkit_cli, tmp_path):
    sweep = tmp_path / "sweep"
    first = vizkit_cli("-m", "method=saliency", f"hydra.sweep.dir={sweep}", "data=shapes", "data.count=1", "trainer.progress_bar=false")
    assert first.returncode == 0, first.stderr
    assert marker(sweep)["status"] == "finished" and marker(sweep / "0_saliency")["status"] == "finished"
    before = files_of(sweep)
    second = vizkit_cli("-m", "method=deconvnet", f"hydra.sweep.dir={sweep}", "data=shapes", "data.count=1")
    assert_refused(second, f"hydra.sweep.dir {sweep} already holds an earlier vizkit run (finished)")
    assert files_of(sweep) == before  # multirun.yaml untouched


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([str(VIZKIT), *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def test_two_runs_started_together_get_two_directories(tmp_path):
    """The experiment names one run directory for every run (as a time stamp of too coarse a grain
    would): not pinned on the command line, so the second run takes ``same-2``."""
    (tmp_path / "conf" / "experiment").mkdir(parents=True)
    (tmp_path / "conf" / "experiment" / "same_dir.yaml").write_text("# @package _global_\nhydra:\n  run:\n    dir: outputs/same\n")
    args = ["--config-dir", "conf", "+experiment=same_dir", "data=shapes", "data.count=2", "trainer.progress_bar=false"]
    runs = [_start(args, tmp_path) for _ in range(2)]
    outputs = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["same", "same-2"]
    for run_dir in (tmp_path / "outputs").iterdir():
        results = json.loads((run_dir / "results.json").read_text())
        assert results["status"] == "finished" and len(results["inputs"]) == 2
        assert len(list((run_dir / "images").iterdir())) == 2 and len(writers_of(run_dir)) == 1


def test_two_runs_pinned_to_one_directory_at_once_one_is_refused(tmp_path):
    args = [f"hydra.run.dir={tmp_path / 'shared'}", "data=shapes", "data.count=2", "trainer.progress_bar=false"]
    runs = [_start(args, tmp_path) for _ in range(2)]
    outputs = [run.communicate(timeout=300) for run in runs]
    assert sorted(run.returncode for run in runs) == [0, 2], outputs
    refused = outputs[[run.returncode for run in runs].index(2)][1]
    assert "hydra.run.dir" in refused and "Traceback" not in refused
    results = json.loads((tmp_path / "shared" / "results.json").read_text())
    assert results["status"] == "finished" and len(results["inputs"]) == 2
    assert len(writers_of(tmp_path / "shared")) == 1  # every event file is one process's: nothing mixed in


def test_a_run_that_fails_before_writing_anything_leaves_no_directory(vizkit_cli, tmp_path):
    """It failed in its stream (no input could be read): nothing of its own was written, so nothing
    is left for TensorBoard to list as an empty run; a directory the user made stays, emptied."""
    (tmp_path / "broken.png").write_bytes(b"not a png")
    run = vizkit_cli(f"hydra.run.dir={tmp_path / 'failed'}", "data=images", f"data.paths=[{tmp_path / 'broken.png'}]")
    assert run.returncode == 2 and "none of the 1 input(s) could be read" in run.stderr and "was removed" in run.stderr
    assert not (tmp_path / "failed").exists()
    (tmp_path / "mine").mkdir()
    run = vizkit_cli(f"hydra.run.dir={tmp_path / 'mine'}", "target=class:nonesuch")
    assert run.returncode == 2 and "nonesuch" in run.stderr and "was emptied" in run.stderr
    assert (tmp_path / "mine").is_dir() and not any((tmp_path / "mine").iterdir())


def test_a_run_that_fails_after_writing_keeps_it_and_says_why(tmp_path):
    from vizkit.cli.run_dirs import claim, settle_failed

    run_dir = claim(tmp_path / "run", pinned=True)
    (run_dir / "images").mkdir()
    (run_dir / "images" / "cat.png").write_bytes(b"a picture")
    assert settle_failed(run_dir, "the disk is full") == ""
    results = json.loads((run_dir / "results.json").read_text())
    assert results == {"status": "failed", "error": "the disk is full", "written": ["images/cat.png"]}
    assert marker(run_dir)["status"] == "failed"


# --------------------------------------------------------------------------------------------- signals


def _wait_for(predicate, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the run never got going"
        time.sleep(0.05)


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_signal_mid_run_writes_what_finished_and_exits_with_its_code(tmp_path, signum, code):
    run_dir = tmp_path / "run"
    process = _start([f"hydra.run.dir={run_dir}", "data=shapes", "data.count=3000", "data.batch_size=1", "trainer.progress_bar=false"], tmp_path)
    _wait_for(lambda: (run_dir / "images").is_dir() and any((run_dir / "images").iterdir()), process)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr
    assert f"interrupted by {signum.name}" in stderr and "Traceback" not in stderr
    results = json.loads((run_dir / "results.json").read_text())
    done = len(results["inputs"])
    assert results["status"] == "interrupted" and 1 <= done < 3000
    assert len(list((run_dir / "images").iterdir())) == done and marker(run_dir)["status"] == "interrupted"
    assert f"saliency on {done} input(s)" in stdout


def test_an_interrupted_optimization_keeps_its_images_and_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    process = _start([f"hydra.run.dir={run_dir}", "method=class_model", "method.steps=100000", "image_checkpoint=true", "trainer.progress_bar=false"], tmp_path)
    _wait_for(lambda: any((run_dir / "tensorboard").glob("*.images")) if (run_dir / "tensorboard").is_dir() else False, process)
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "interrupted" and 1 <= results["timings"]["steps"] < 100000
    assert len(results["images"]) == 6 and all((run_dir / image["png"]).is_file() for image in results["images"])
    assert (run_dir / "checkpoints" / "image.ckpt").is_file() and (run_dir / "images" / "grid.png").is_file()


@pytest.mark.slow
def test_sigterm_to_a_two_process_run_stops_both_ranks_without_a_hang(tmp_path):
    """`timeout` and `kill` signal the main process only; Lightning forwards SIGTERM to the rank it
    started. Each rank stops after its batch; rank 0 writes its own inputs' records without waiting
    at the rank exchange (a rank that was never signalled could keep it waiting forever)."""
    run_dir = tmp_path / "run"
    process = _start([f"hydra.run.dir={run_dir}", "trainer.devices=2", "trainer.strategy=ddp", "trainer.accelerator=cpu", "data=shapes",
                      "data.count=400", "data.batch_size=1", "trainer.progress_bar=false"], tmp_path)
    _wait_for(lambda: (run_dir / "images").is_dir() and len(list((run_dir / "images").iterdir())) >= 4, process)
    process.send_signal(signal.SIGTERM)
    try:
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 143, stderr
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "interrupted" and 1 <= len(results["inputs"]) < 400
    assert len(list((run_dir / "images").iterdir())) >= len(results["inputs"])  # every rank's pictures
    assert "summarizes rank 0's inputs only" in stdout + stderr
