"""How runs end and continue: stop signals, checkpoints within an epoch, exit statuses, finished runs, full disks,
progress lines without a terminal, and W&B after a resume."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import ROOT, clean_env, compose_train, write_image_folder

from spartan.train import loop
from spartan.train.checkpoint import LAST, Checkpoint
from spartan.train.errors import ConfigError
from spartan.train.lifecycle import ExitStatus, Interrupted, RunError
from spartan.train.loop import train
from spartan.train.tracking import MetricLogger

TINY = ("logger=none", "schedule.epochs=2", "trainer.log_every=5")  # 2 epochs of 21 steps


def records(run_dir: Path, drop=("img_per_s",)) -> list[dict]:
    """metrics.jsonl without the timing fields (the rest is bitwise reproducible)."""
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        out.append({k: v for k, v in record.items() if k not in drop})
    return out


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "model_final.pt", weights_only=True)


def assert_same_run(a: Path, b: Path) -> None:
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert records(a) == records(b)


def signal_at_step(monkeypatch, step: int, signum: int) -> None:
    """Send ``signum`` to this process right after optimizer step ``step`` (as a preemption would, any time)."""
    optimizer_step = loop.Run.optimizer_step

    def stepping(self, **kwargs):
        telemetry = optimizer_step(self, **kwargs)
        if self.progress.step == step:
            os.kill(os.getpid(), signum)
        return telemetry

    monkeypatch.setattr(loop.Run, "optimizer_step", stepping)


def crash_after_step(monkeypatch, step: int) -> None:
    """The process dies (as a killed node would) when it is about to take the step after ``step``."""
    optimizer_step = loop.Run.optimizer_step

    def stepping(self, **kwargs):
        if self.progress.step == step:
            raise RuntimeError("the node went down")
        return optimizer_step(self, **kwargs)

    monkeypatch.setattr(loop.Run, "optimizer_step", stepping)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    train(compose_train(*TINY), run_dir)
    return run_dir


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT])
def test_a_signal_mid_epoch_checkpoints_and_the_resumed_run_is_bitwise_the_same(
    straight, tmp_path, monkeypatch, signum
):
    run_dir = tmp_path / "run"
    before = signal.getsignal(signum)
    signal_at_step(monkeypatch, 30, signum)  # epoch 2, step 9 of 21
    with pytest.raises(Interrupted) as stop:
        train(compose_train(*TINY), run_dir)
    assert signal.getsignal(signum) == before  # the handlers are put back
    assert (stop.value.signum, stop.value.epoch, stop.value.step) == (signum, 2, 30)
    state = Checkpoint.load(run_dir / LAST).state
    assert state["progress"]["epoch_step"] == 9 and len(state["within_epoch"]["ranks"]) == 1
    assert not (run_dir / "model_final.pt").exists()
    monkeypatch.undo()
    train(compose_train(*TINY, "resume=auto"), run_dir)
    assert_same_run(straight, run_dir)


def test_an_image_folder_read_by_two_augmenting_workers_resumes_mid_epoch_bitwise(tmp_path, monkeypatch):
    # Random crops and flips in 2 worker processes, Mixup in this one: all must continue as they would have.
    data = write_image_folder(tmp_path / "images")
    overrides = (
        "logger=none",
        "model=resnet18",
        "data=imagefolder",
        f"data.path={data}",
        "data.image_size=32",
        "data.batch_size=4",
        "data.num_workers=2",
        "data.mixup_alpha=0.2",
        "schedule.epochs=2",
        "sparsity.target=0.5",
        "trainer.log_every=2",
    )
    train(compose_train(*overrides), tmp_path / "straight")
    signal_at_step(monkeypatch, 8, signal.SIGTERM)  # epoch 2 (6 steps each), step 2
    with pytest.raises(Interrupted):
        train(compose_train(*overrides), tmp_path / "resumed")
    monkeypatch.undo()
    train(compose_train(*overrides, "resume=auto"), tmp_path / "resumed")
    assert_same_run(tmp_path / "straight", tmp_path / "resumed")


def test_periodic_checkpoints_within_an_epoch_survive_a_crash(straight, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    crash_after_step(monkeypatch, 33)
    with pytest.raises(RuntimeError, match="the node went down"):
        train(compose_train(*TINY, "trainer.checkpoint_every_steps=4"), run_dir)
    assert Checkpoint.load(run_dir / LAST).state["progress"]["step"] == 32  # the last multiple of 4 before it
    monkeypatch.undo()
    train(compose_train(*TINY, "trainer.checkpoint_every_steps=4", "resume=auto"), run_dir)
    assert_same_run(straight, run_dir)


def test_a_mid_epoch_checkpoint_continues_only_with_as_many_processes(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    signal_at_step(monkeypatch, 5, signal.SIGUSR1)
    with pytest.raises(Interrupted):
        train(compose_train(*TINY), run_dir)
    checkpoint = Checkpoint.load(run_dir / LAST)
    checkpoint.state["within_epoch"]["ranks"].append(checkpoint.state["within_epoch"]["ranks"][0])
    checkpoint.save(run_dir / LAST)  # as if 2 processes had written it
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="written mid-epoch by 2 process\\(es\\); it continues with as many"):
        train(compose_train(*TINY, "resume=auto"), run_dir)


def run_train(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd,
        env=clean_env(cwd),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def snapshot(run_dir: Path) -> dict[str, str]:
    return {
        str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file()
    }


def test_exit_statuses_of_stopped_and_finished_runs(tmp_path):
    run_dir = tmp_path / "run"
    done = run_train(*TINY, "trainer.stop_after_epochs=1", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert done.returncode == ExitStatus.STOPPED == 3, done.stderr[-2000:]
    done = run_train(*TINY, "resume=auto", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert done.returncode == ExitStatus.FINISHED, done.stderr[-2000:]
    before = snapshot(run_dir)
    # Requeued again after it finished: says so, changes nothing (no second final record, no rewritten .hydra/).
    done = run_train(*TINY, "resume=auto", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert done.returncode == 0 and "nothing to do" in done.stdout and "holds a finished run" in done.stdout
    assert snapshot(run_dir) == before


def test_ctrl_c_stops_at_a_step_boundary_in_one_line_and_the_run_continues(tmp_path):
    run_dir = tmp_path / "run"
    command = [sys.executable, str(ROOT / "train.py"), "logger=none", "trainer.log_every=1", f"hydra.run.dir={run_dir}"]
    process = subprocess.Popen(
        command, cwd=tmp_path, env=clean_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    for line in process.stdout:  # without a terminal, a progress line per logged step
        if "step 3/630" in line:
            assert "img/s" in line and "ETA" in line and "lr" in line and "sparsity" in line
            process.send_signal(signal.SIGINT)
            break
    out, err = process.communicate(timeout=120)
    assert process.returncode == ExitStatus.INTERRUPTED, err[-2000:]
    assert "Traceback" not in err
    stopped = [line for line in err.splitlines() if line.startswith("stopped by SIGINT")]
    assert len(stopped) == 1 and f"hydra.run.dir={run_dir} resume=auto" in stopped[0]
    assert "step" in (run_dir / "train.log").read_text()  # the progress lines are in train.log too
    done = run_train(
        "logger=none", "schedule.epochs=30", f"hydra.run.dir={run_dir}", "resume=auto", cwd=tmp_path, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]


def small_disk(tmp_path: Path, size_bytes: int) -> Path:
    """A directory on a tmpfs of ``size_bytes`` (needs root; the line-level test below injects ENOSPC instead)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = (
        os.geteuid() == 0
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(disk)], capture_output=True
        ).returncode
        == 0
    )
    if not mounted:
        pytest.skip("needs root to mount a small tmpfs")
    return disk


def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    # Size the disk from a real checkpoint: room for one (and the logs), not for its temporary successor.
    probe = tmp_path / "probe"
    train(compose_train(*TINY, "schedule.epochs=1"), probe)
    size = (probe / LAST).stat().st_size
    disk = small_disk(tmp_path, int(1.5 * size))
    try:
        run_dir = disk / "run"
        with pytest.raises(
            RunError,
            match=r"no space left on the device holding .*: writing last\.pt needs about "
            r"[\d,]+ bytes, [\d,]+ are free; the previous last\.pt is intact",
        ):
            train(compose_train(*TINY), run_dir)
        assert not list(run_dir.rglob("*.tmp"))  # the partial file was removed
        state = Checkpoint.load(run_dir / LAST).state  # the previous checkpoint is intact
        assert state["progress"]["epoch"] == 1
        [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]  # every line whole
        done = run_train(*TINY, "resume=auto", f"hydra.run.dir={run_dir}", cwd=tmp_path)
        assert done.returncode == ExitStatus.FAILED and done.stderr.count("\n") == 1
        assert done.stderr.startswith("error: no space left on the device holding")
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], capture_output=True)  # torch may still hold the failed file


def test_a_full_disk_while_logging_keeps_metrics_whole(tmp_path, monkeypatch):
    from spartan.train import files

    path = tmp_path / "metrics.jsonl"
    files.append_line(path, '{"step": 1}')
    real_write = os.write

    def short_write(fd, data):  # the disk fills in the middle of a line
        if len(data) > 4:
            real_write(fd, bytes(data[:4]))
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(files.os, "write", short_write)
    monkeypatch.setattr(files.shutil, "disk_usage", lambda _: types.SimpleNamespace(free=0))
    with pytest.raises(RunError, match="writing metrics.jsonl needs about"):
        files.append_line(path, '{"step": 2, "loss": 0.5}')
    assert path.read_text() == '{"step": 1}\n'  # cut back to the last whole line


class FakeWandbRun:
    def __init__(self):
        self.logged = []

    def log(self, values):
        self.logged.append(values["step"])


def test_a_resumed_run_does_not_send_w_and_b_records_it_already_sent(tmp_path):
    logger = MetricLogger(tmp_path, None, None, run_name="r", run_config={}, enabled=True, resumed=True, already_sent=2)
    logger.wandb_run = FakeWandbRun()
    for step in (21, 21, 25, 30):  # the last training record and the validation record share a step
        logger.log({"kind": "train", "loss": 1.0}, step=step)
    assert logger.wandb_run.logged == [25, 30]
    assert [r["step"] for r in records(tmp_path)] == [21, 21, 25, 30]  # metrics.jsonl gets them all back


def test_resume_auto_counts_what_the_killed_job_had_logged(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    crash_after_step(monkeypatch, 28)
    with pytest.raises(RuntimeError):
        train(compose_train(*TINY), run_dir)  # after the epoch-1 checkpoint (step 21) it logged step 25
    monkeypatch.undo()
    seen = {}
    start = loop.MetricLogger.__init__

    def remember(self, *args, **kwargs):
        seen["already_sent"] = kwargs["already_sent"]
        start(self, *args, **kwargs)

    monkeypatch.setattr(loop.MetricLogger, "__init__", remember)
    train(compose_train(*TINY, "resume=auto"), run_dir)
    assert seen["already_sent"] == 1


def test_frozen_masks_are_stored_as_bits():
    from spartan import Sparsifier, SparsityConfig

    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 10))
    sparsifier = Sparsifier(
        model, SparsityConfig(method="topkast", target=0.9, warmup_frac=0.0, finetune_frac=1.0), total_steps=4
    )
    assert sparsifier.frozen
    state = sparsifier.state_dict()
    kept = state["frozen_keep"][0]
    assert kept["values"] is None and kept["kept"]["bits"].numel() == 64 * 64 // 8  # one bit per entry
    assert state["groups"][0]["hard"]["bits"].dtype == torch.uint8
    twin = Sparsifier(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 10)), sparsifier.config, 4)
    twin.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(sparsifier.masks().values(), twin.masks().values()))


def test_time_based_checkpoints(tmp_path, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(loop.time, "monotonic", lambda: clock[0])
    optimizer_step = loop.Run.optimizer_step

    def slow_steps(self, **kwargs):
        clock[0] += 10.0  # every step takes 10 s
        return optimizer_step(self, **kwargs)

    monkeypatch.setattr(loop.Run, "optimizer_step", slow_steps)
    written = []
    save = loop.Run.save_checkpoint

    def record(self, within_epoch=False):
        written.append((self.progress.step, within_epoch))
        save(self, within_epoch)

    monkeypatch.setattr(loop.Run, "save_checkpoint", record)
    train(compose_train(*TINY, "trainer.checkpoint_every_minutes=1"), tmp_path / "run")
    assert written[:4] == [(6, True), (12, True), (18, True), (21, False)]  # then the epoch's own checkpoint


def test_the_requeue_signal_wins_over_one_that_comes_with_it():
    from spartan.train.lifecycle import StopSignals, precedence, signal_of

    signals = StopSignals()
    signals._record(signal.SIGTERM, None)
    signals._record(signal.SIGUSR2, None)  # Slurm's warning after (or with) a SIGTERM
    signals._record(signal.SIGTERM, None)
    assert signals.received == signal.SIGUSR2
    # over processes the largest precedence is agreed on: one rank's SIGUSR2 beats another's SIGTERM
    assert signal_of(max(precedence(signal.SIGTERM), precedence(signal.SIGUSR2))) == signal.SIGUSR2
    assert signal_of(precedence(None)) is None


def test_a_stopped_job_does_not_end_its_sweep(tmp_path):
    done = run_train(
        "-m", "seed=0,1", *TINY, "trainer.stop_after_epochs=1", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-2000:]
    jobs = sorted((tmp_path / "sweep").glob("*_*"))
    assert len(jobs) == 2 and all(Checkpoint.load(job / LAST).state["epoch"] == 1 for job in jobs)
