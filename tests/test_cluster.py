"""Running on a cluster: Slurm's environment mapped to DDP ranks, the Slurm preset's submissions, and a submitit job
of 2 tasks that is preempted mid-epoch, requeued and finishes bitwise like ``torchrun --nproc_per_node=2``."""

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import torch
from conftest import ROOT, clean_env

SLURM = {
    "SUBMITIT_EXECUTOR": "slurm",
    "SLURM_JOB_ID": "4242",
    "SLURM_NTASKS": "8",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_JOB_NODELIST": "gpu[07-08]",
}
EXPORTED = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def exported_in_slurm_task(procid: int, localid: int, nodeid: int, tmp_path: Path) -> dict:
    code = (
        "import json, os; from spartan.train.distributed import export_submitit_environment as export; "
        f"rank = export(); print(json.dumps({{k: os.environ.get(k) for k in {EXPORTED!r} + ('CUDA_VISIBLE_DEVICES',)}}"
        " | {'returned': rank}))"
    )
    env = {k: v for k, v in clean_env(tmp_path).items() if k not in EXPORTED}
    env.update(
        SLURM,
        SLURM_PROCID=str(procid),
        SLURM_LOCALID=str(localid),
        SLURM_NODEID=str(nodeid),
        CUDA_VISIBLE_DEVICES="0,1,2,3",
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_slurm_task_becomes_its_ddp_rank(tmp_path):
    # 2 nodes × 4 tasks: task 5 is the second task of the second node.
    task = exported_in_slurm_task(5, 1, 1, tmp_path)
    assert (task["RANK"], task["LOCAL_RANK"], task["WORLD_SIZE"], task["LOCAL_WORLD_SIZE"]) == ("5", "1", "8", "4")
    assert task["MASTER_ADDR"] == "gpu07" and 20000 <= int(task["MASTER_PORT"]) <= 60000 and task["returned"] == 5
    assert task["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"  # every task sees the node's GPUs and takes cuda:LOCAL_RANK
    first = exported_in_slurm_task(0, 0, 0, tmp_path)
    assert first["RANK"] == "0" and first["MASTER_PORT"] == task["MASTER_PORT"]  # one rendezvous for the job


def fake_slurm_commands(bin_dir: Path) -> None:
    """``sbatch`` that accepts a job and keeps its script, ``sacct``/``squeue`` that know nothing."""
    bin_dir.mkdir()
    scripts = {
        "sbatch": 'cp "${@: -1}" "$(dirname "$0")/submitted.sh"; echo "Submitted batch job 4242"',
        "srun": "exit 1",
        "sacct": "exit 0",
        "squeue": "exit 0",
        "scancel": "exit 0",
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(stat.S_IRWXU)


def test_the_slurm_preset_submits_one_array_of_multi_gpu_jobs(tmp_path):
    bin_dir = tmp_path / "bin"
    fake_slurm_commands(bin_dir)
    env = {**clean_env(tmp_path), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        "-m",
        "hydra/launcher=slurm",
        "seed=0,1,2",
        "logger=none",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.gpus_per_node=4",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    driver = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    submitted = bin_dir / "submitted.sh"
    deadline = time.monotonic() + 120
    while not submitted.exists() and time.monotonic() < deadline and driver.poll() is None:
        time.sleep(0.5)
    driver.kill()  # the fake cluster never runs the jobs
    driver.wait()
    script = submitted.read_text()
    for line in (
        "#SBATCH --array=0-2",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --cpus-per-task=10",
        "#SBATCH --partition=gpu",
        "#SBATCH --signal=USR2@300",
        "#SBATCH --time=2880",
    ):
        assert line in script, f"{line} not in the submission:\n{script}"


def task_pids(sweep: Path) -> dict[int, int]:
    """``{global rank: pid}`` of the running submitit tasks of jobs writing into ``sweep``."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            environ = dict(
                item.split("=", 1)
                for item in Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
                if "=" in item
            )
        except OSError:
            continue
        if b"submitit.core._submit" in cmdline and str(sweep) in " ".join(c.decode() for c in cmdline):
            found[int(environ["SUBMITIT_LOCAL_GLOBALID"])] = int(pid)
    return found


def test_a_preempted_submitit_job_is_requeued_and_ends_bitwise_like_torchrun(tmp_path):
    overrides = ("logger=none", "schedule.epochs=6", "trainer.threads=1", "trainer.log_every=1", "seed=0")
    reference = tmp_path / "torchrun"
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(ROOT / "train.py"),
        *overrides,
        f"hydra.run.dir={reference}",
    ]
    done = subprocess.run(torchrun, cwd=tmp_path, env=clean_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    sweep = tmp_path / "sweep"
    driver = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "-m",
            "hydra/launcher=local",
            "hydra.launcher.tasks_per_node=2",
            *overrides,
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
        env=clean_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    job = sweep / "0_logger=none,schedule.epochs=6,seed=0,trainer.log_every=1,trainer.threads=1"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # preempt (SIGUSR2 to rank 0, as Slurm via submitit does) in epoch 2 or so
        steps = (
            [json.loads(line)["step"] for line in (job / "metrics.jsonl").read_text().splitlines()]
            if (job / "metrics.jsonl").exists()
            else []
        )
        if steps and max(steps) >= 13:
            os.kill(task_pids(sweep)[0], signal.SIGUSR2)
            break
        time.sleep(0.05)
    out, _ = driver.communicate(timeout=600)
    assert driver.returncode == 0, out.decode()[-3000:]
    logs = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*_0_log.*"))
    assert "stopped by SIGUSR2 in epoch" in logs and "Requeued job" in logs  # checkpointed, then requeued
    assert "resumed from" in (job / "train.log").read_text()
    a = torch.load(reference / "model_final.pt", weights_only=True)
    b = torch.load(job / "model_final.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (
        json.loads((job / "summary.json").read_text())["val_top1"]
        == json.loads((reference / "summary.json").read_text())["val_top1"]
    )


def test_a_failing_job_fails_its_sweep_with_the_error(tmp_path):
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        "-m",
        "hydra/launcher=local",
        "hydra.launcher.tasks_per_node=2",
        "logger=none",
        "data=imagefolder",
        "data.path=/nope",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    done = subprocess.run(command, cwd=tmp_path, env=clean_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "error: data.path '/nope' is not a directory" in done.stdout + done.stderr


def rank_pid(rank: int, run_dir: Path) -> int | None:
    """The pid of the torchrun worker of ``rank`` training into ``run_dir``."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            str(run_dir).encode() in cmdline
            and b"torch.distributed.run" not in cmdline
            and f"RANK={rank}".encode() in environ
        ):
            return int(pid)
    return None


def test_torchrun_restarts_after_rank_0_dies_recover_bitwise(tmp_path):
    overrides = (
        "logger=none",
        "schedule.epochs=6",
        "trainer.log_every=1",
        "trainer.checkpoint_every_steps=3",
        "resume=auto",
    )
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]

    def run(run_dir: Path, restarts: int = 0) -> subprocess.Popen:
        command = [
            *torchrun,
            f"--max-restarts={restarts}",
            str(ROOT / "train.py"),
            *overrides,
            f"hydra.run.dir={run_dir}",
        ]
        return subprocess.Popen(
            command, cwd=tmp_path, env=clean_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    reference = tmp_path / "reference"
    assert run(reference).wait(timeout=300) == 0
    expected = torch.load(reference / "model_final.pt", weights_only=True)
    for trial in range(5):  # the restart used to fail or hang in about half of the trials
        run_dir = tmp_path / f"trial{trial}"
        process = run(run_dir, restarts=1)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # kill rank 0 in epoch 2, after a checkpoint within that epoch
            metrics = run_dir / "metrics.jsonl"
            lines = metrics.read_text().split("\n")[:-1] if metrics.exists() else []  # complete lines only
            steps = [json.loads(line)["step"] for line in lines]
            if steps and max(steps) >= 12 + trial and (pid := rank_pid(0, run_dir)):
                os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.02)
        assert process.wait(timeout=300) == 0, f"trial {trial}: the restarted run failed"
        got = torch.load(run_dir / "model_final.pt", weights_only=True)
        assert all(torch.equal(expected[k], got[k]) for k in expected), f"trial {trial} differs"
        assert "resumed from" in (run_dir / "train.log").read_text()


def test_when_one_process_fails_the_others_fail_instead_of_hanging(tmp_path):
    # What the launchers rely on: a failed process leaves the group at once, so the barrier the others reach at
    # the end of the job (or their next collective) raises instead of waiting forever.
    code = (
        "import os, sys, torch.distributed as dist\n"
        "from spartan.train.distributed import all_processes_reach_this_point, init_process_group, shutdown\n"
        "init_process_group()\n"
        "if dist.get_rank() == 1:\n"
        "    shutdown(); os._exit(3)  # the failed rank\n"
        "try:\n"
        "    all_processes_reach_this_point()\n"
        "except RuntimeError:\n"
        "    os._exit(7)\n"
        "os._exit(0)\n"
    )
    port = __import__("socket").socket()
    port.bind(("127.0.0.1", 0))
    env = {
        **clean_env(tmp_path),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port.getsockname()[1]),
        "WORLD_SIZE": "2",
    }
    port.close()
    workers = [
        subprocess.Popen([sys.executable, "-c", code], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
        for r in range(2)
    ]
    assert [w.wait(timeout=120) for w in workers] == [7, 3]
