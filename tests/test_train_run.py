"""The trainer end to end on digits: the out-of-the-box run and eval, sweeps, torchrun, resume, bad input."""

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import compose_train, run_cli, write_image_folder

from spartan.train.errors import ConfigError
from spartan.train.loop import train
from spartan.train.models import digits_cnn


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_out_of_the_box_run_then_eval_agrees(tmp_path):
    # The default command, shortened; no W&B key on this "fresh machine": W&B must go offline, not fail.
    run_dir = tmp_path / "run"
    done = run_cli("train.py", "schedule.epochs=3", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    log = done.stdout + done.stderr
    assert "W&B: offline (no API key configured)" in log and "spartan run summary" in log
    assert list((run_dir / "wandb").glob("offline-run-*"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["sparsity_all"] == pytest.approx(0.9, abs=1e-4)  # exact: every parameter counted
    assert summary["flops_reduction"] > 1 and summary["steps"] == 3 * (1347 // 64)
    config = (run_dir / ".hydra" / "config.yaml").read_text()
    assert "name: digits_spartan" in config and "target: 0.9" in config
    records = read_jsonl(run_dir / "metrics.jsonl")
    train_records = [r for r in records if r["kind"] == "train"]
    assert {
        "loss",
        "lr",
        "img_per_s",
        "sparsity_target",
        "sparsity_all",
        "beta",
        "solver_iterations",
        "flip_rate",
    } <= set(train_records[0])
    assert [r["epoch"] for r in records if r["kind"] in ("val", "final")] == [1, 2, 3]
    assert any(r["kind"] == "layers" for r in records)

    # model_final.pt is a plain state_dict: it loads into the vanilla model with weights_only=True.
    model = digits_cnn()
    model.load_state_dict(torch.load(run_dir / "model_final.pt", weights_only=True))
    zeros = sum(int((p == 0).sum()) for p in model.parameters())
    assert zeros / sum(p.numel() for p in model.parameters()) >= 0.9 - 1e-4

    done = run_cli("eval.py", f"run_dir={run_dir}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["val_top1"] == summary["val_top1"] and result["val_top5"] == summary["val_top5"]
    assert result["sparsity_all"] == pytest.approx(summary["sparsity_all"])
    assert result["flops_sparse"] == summary["flops_sparse"] and len(result["layers"]) == 4
    assert f"val top-1 {100 * summary['val_top1']:.2f}%" in done.stdout
    # eval.py takes keys of every data option, checked against the run's own.
    done = run_cli("eval.py", f"run_dir={run_dir}", "data.min_res=160", cwd=tmp_path)
    assert done.returncode == 2 and "data.min_res is not a key of data=digits" in done.stderr


@pytest.mark.parametrize(
    "content, cause",
    [
        (b"not a checkpoint", "UnpicklingError: Unsupported operand"),  # the weights-only unpickler's reason
        (None, "RuntimeError: PytorchStreamReader failed reading zip archive"),  # a truncated file
    ],
)
def test_an_unreadable_checkpoint_is_named_with_its_cause(finished_run, tmp_path, content, cause):
    bad = tmp_path / "last.pt"
    bad.write_bytes(content if content is not None else (finished_run / "checkpoints" / "last.pt").read_bytes()[:4000])
    done = run_cli("train.py", "logger=none", f"resume={bad}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert done.returncode == 2 and f"is not a readable checkpoint ({cause}" in done.stderr, done.stderr


def test_sweep_runs_one_job_per_value(tmp_path):
    done = run_cli(
        "train.py",
        "-m",
        "sparsity.target=0.5,0.8",
        "logger=none",
        "schedule.epochs=1",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # Job directories are named by their overrides; the runs of one sweep share a W&B group (the sweep's name).
    jobs = [
        tmp_path / "sweep" / f"{k}_logger=none,schedule.epochs=1,sparsity.target={t}" for k, t in ((0, 0.5), (1, 0.8))
    ]
    summaries = [json.loads((job / "summary.json").read_text()) for job in jobs]
    assert [round(s["sparsity_all"], 4) for s in summaries] == [0.5, 0.8]
    assert all("group: sweep" in (job / ".hydra" / "config.yaml").read_text() for job in jobs)


def test_torchrun_two_processes_share_one_run_dir_and_masks(tmp_path):
    masks_dir = tmp_path / "masks"
    masks_dir.mkdir()
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    import os

    os.environ["MASKS_DIR"] = str(masks_dir)
    try:
        done = run_cli(
            "tests/helpers/torchrun_train.py", "logger=none", "schedule.epochs=2", cwd=tmp_path, launcher=launcher
        )
    finally:
        del os.environ["MASKS_DIR"]
    assert done.returncode == 0, done.stderr[-3000:]
    run_dirs = list((tmp_path / "outputs" / "digits_spartan").iterdir())
    assert len(run_dirs) == 1  # both ranks agreed on rank 0's timestamp
    summary = json.loads((run_dirs[0] / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 2 * (1347 // (2 * 64))
    masks = [torch.load(masks_dir / f"masks_rank{r}.pt") for r in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*masks))
    model = digits_cnn()
    model.load_state_dict(torch.load(run_dirs[0] / "model_final.pt", weights_only=True))
    for mask, weight in zip(masks[0], [model[0].weight, model[3].weight, model[7].weight, model[12].weight]):
        assert torch.equal(weight != 0, mask != 0)
    # eval.py on the run reproduces the 2-process final validation (every image counted once).
    done = run_cli("eval.py", f"run_dir={run_dirs[0]}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((run_dirs[0] / "eval.json").read_text())["val_top1"] == summary["val_top1"]


def test_resume_reproduces_the_uninterrupted_run(tmp_path, tiny_digits):
    straight = train(compose_train(*tiny_digits), tmp_path / "straight")
    interrupted = compose_train(*tiny_digits, "trainer.stop_after_epochs=1")
    assert train(interrupted, tmp_path / "resumed") is None
    assert not (tmp_path / "resumed" / "model_final.pt").exists()
    resumed = train(compose_train(*tiny_digits, "resume=auto"), tmp_path / "resumed")
    a = torch.load(tmp_path / "straight" / "model_final.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "model_final.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["val_top1"] == straight["val_top1"] and resumed["steps"] == straight["steps"]


def test_resume_from_another_run_dir_and_after_the_freeze(tmp_path, tiny_digits):
    # Five epochs: masks freeze in epoch 5 (the last 20%); stop after 4 and resume from the run dir's path.
    overrides = (*tiny_digits, "schedule.epochs=5")
    straight = train(compose_train(*overrides), tmp_path / "straight")
    train(compose_train(*overrides, "trainer.stop_after_epochs=4"), tmp_path / "first")
    resumed = train(compose_train(*overrides, f"resume={tmp_path / 'first'}"), tmp_path / "second")
    a = torch.load(tmp_path / "straight" / "model_final.pt", weights_only=True)
    b = torch.load(tmp_path / "second" / "model_final.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a) and resumed["val_top1"] == straight["val_top1"]


def test_a_checkpoint_from_before_a_config_field_existed_resumes_with_its_default(tmp_path, tiny_digits):
    # sparsity.beta_scale came after checkpoints were first written; its default (raw) is the earlier behaviour.
    assert train(compose_train(*tiny_digits, "trainer.stop_after_epochs=1"), tmp_path / "run") is None
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    state = torch.load(path, weights_only=True)
    del state["train_config"]["sparsity"]["beta_scale"], state["sparsifier"]["fingerprint"]["config"]["beta_scale"]
    torch.save(state, path)
    with pytest.raises(ConfigError, match="sparsity.beta_scale='raw', this run has sparsity.beta_scale='kept_mean'"):
        train(compose_train(*tiny_digits, f"resume={path}", "sparsity.beta_scale=kept_mean"), tmp_path / "other")
    resumed = train(compose_train(*tiny_digits, "resume=auto"), tmp_path / "run")
    straight = train(compose_train(*tiny_digits), tmp_path / "straight")
    a = torch.load(tmp_path / "straight" / "model_final.pt", weights_only=True)
    b = torch.load(tmp_path / "run" / "model_final.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a) and resumed["val_top1"] == straight["val_top1"]


def snapshot(run_dir: Path) -> dict[str, str]:
    return {
        str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.name != "train.log"
    }


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory) -> Path:
    """A run stopped after epoch 1 of 2 (what a requeued job continues)."""
    run_dir = tmp_path_factory.mktemp("stopped") / "run"
    train(
        compose_train("logger=none", "schedule.epochs=2", "trainer.stop_after_epochs=1"),
        run_dir,
        files={".hydra/config.yaml": "name: digits_spartan\n"},
    )
    return run_dir


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    train(
        compose_train("logger=none", "schedule.epochs=1"),
        run_dir,
        files={".hydra/config.yaml": "name: digits_spartan\n"},
    )
    return run_dir


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["sparsity.target=1.0"], "sparsity.target must be a sparsity in [0, 1), got 1.0"),
        (["optim.lr=0"], "optim.lr must be a finite number > 0, got 0.0"),
        (["data.batch_size=0"], "data.batch_size must be an integer > 0, got 0"),
        (["schedule.epochs=0"], "schedule.epochs must be an integer > 0, got 0"),
        (["data=imagefolder"], "data.path must name a dataset folder for data=imagefolder, got None"),
        (["data=imagefolder", "data.path=/no/such/dir"], "data.path '/no/such/dir' is not a directory"),
        # A resumed run compares its config with the checkpoint's first, before building anything.
        (["sparsity=block", "sparsity.block=[3,3]"], "was trained with sparsity.block=(1, 1), this run has sparsity"),
        (["resume=/no/such/checkpoint.pt"], "resume='/no/such/checkpoint.pt' does not exist"),
        (["sparsity.target=0.8"], "was trained with sparsity.target=0.9, this run has sparsity.target=0.8"),
        (["model=resnet18", "data=synthetic"], "was trained with model.name='digits_cnn'"),
        (["optim=adamw"], "was trained with optim.name='sgd'"),
        (["seed=5"], "was trained with seed=0"),
        (["+model.kwargs.depth=3"], "was trained with model.kwargs.depth=None, this run has model.kwargs.depth=3"),
    ],
)
def test_bad_input_is_one_error_line_and_leaves_the_run_dir_untouched(stopped_run, overrides, message):
    before = snapshot(stopped_run)
    # Continuing the stopped run (resume=auto) with one bad value: caught before anything is written.
    done = run_cli(
        "train.py",
        "logger=none",
        "schedule.epochs=2",
        f"hydra.run.dir={stopped_run}",
        "resume=auto",
        *overrides,
        cwd=stopped_run.parent,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"error: {done.stderr.strip()[7:]}"]  # exactly one line
    assert message in done.stderr
    assert snapshot(stopped_run) == before


def test_continuing_a_finished_run_with_another_config_is_refused(finished_run):
    before = snapshot(finished_run)
    done = run_cli(
        "train.py",
        "logger=none",
        "schedule.epochs=1",
        "sparsity.target=0.8",
        "resume=auto",
        f"hydra.run.dir={finished_run}",
        cwd=finished_run.parent,
    )
    assert (
        done.returncode == 2 and "was trained with sparsity.target=0.9, this run has sparsity.target=0.8" in done.stderr
    )
    assert snapshot(finished_run) == before


def test_a_fresh_start_does_not_overwrite_an_earlier_run(finished_run):
    before = snapshot(finished_run)
    done = run_cli(
        "train.py", "logger=none", "schedule.epochs=1", f"hydra.run.dir={finished_run}", cwd=finished_run.parent
    )
    assert done.returncode == 2 and "already holds a run" in done.stderr and "resume=auto" in done.stderr
    assert snapshot(finished_run) == before


def test_a_failed_start_leaves_no_new_run_dir(tmp_path):
    done = run_cli("train.py", "optim.lr=-1", cwd=tmp_path)
    assert done.returncode == 2
    runs = tmp_path / "outputs" / "digits_spartan"
    assert runs.is_dir() and not any(runs.iterdir())  # Hydra's timestamped directory was removed again


def test_forced_online_wandb_without_a_key_fails_before_writing(tmp_path):
    done = run_cli("train.py", "logger.mode=online", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert done.returncode == 2 and "needs a W&B API key" in done.stderr
    assert not (tmp_path / "run").exists()


def test_unreachable_wandb_server_falls_back_to_offline(tmp_path):
    # A key is configured but the server cannot be reached (a compute node without network).
    env = {"WANDB_API_KEY": "0" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9"}
    done = run_cli(
        "train.py",
        "schedule.epochs=1",
        "logger.init_timeout=3",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "W&B: offline (online start failed" in done.stdout + done.stderr
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert "0" * 40 not in (tmp_path / "run" / ".hydra" / "config.yaml").read_text()


def test_resume_auto_drops_metrics_logged_after_the_checkpoint(tmp_path, tiny_digits):
    run_dir = tmp_path / "run"
    train(compose_train(*tiny_digits, "schedule.epochs=3", "trainer.stop_after_epochs=1"), run_dir)
    checkpoint_step = max(r["step"] for r in read_jsonl(run_dir / "metrics.jsonl"))
    with (run_dir / "metrics.jsonl").open("a") as f:  # a crashed job logged past its last checkpoint
        f.write(json.dumps({"kind": "train", "step": checkpoint_step + 5, "loss": 9.9}) + "\n")
    train(compose_train(*tiny_digits, "schedule.epochs=3", "resume=auto"), run_dir)
    steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == sorted(steps) and 9.9 not in [r.get("loss") for r in read_jsonl(run_dir / "metrics.jsonl")]


def test_imagefolder_with_workers_resumes_bitwise(tmp_path):
    # Random crops and flips in 2 worker processes: a resumed run must draw the same augmentations.
    data = write_image_folder(tmp_path / "images")
    overrides = (
        "logger=none",
        "model=resnet18",
        "data=imagefolder",
        f"data.path={data}",
        "data.image_size=32",
        "data.batch_size=8",
        "data.num_workers=2",
        "schedule.epochs=2",
        "sparsity.target=0.5",
    )
    straight = train(compose_train(*overrides), tmp_path / "straight")
    train(compose_train(*overrides, "trainer.stop_after_epochs=1"), tmp_path / "resumed")
    resumed = train(compose_train(*overrides, "resume=auto"), tmp_path / "resumed")
    a = torch.load(tmp_path / "straight" / "model_final.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "model_final.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a) and resumed["val_top1"] == straight["val_top1"]
    assert straight["sparsity_all"] == pytest.approx(0.5, abs=1e-4)


def test_unknown_keys_fail_in_hydra_before_anything_runs(tmp_path):
    done = run_cli("train.py", "optim.momentun=0.8", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert done.returncode == 1 and "Key 'momentun' not in 'OptimConfig'" in done.stderr
    assert not (tmp_path / "run").exists()


def test_eval_errors_are_one_line(tmp_path):
    done = run_cli("eval.py", f"run_dir={tmp_path}", cwd=tmp_path)
    assert done.returncode == 2 and "has no model_final.pt" in done.stderr
    done = run_cli("eval.py", f"checkpoint={tmp_path / 'nope.pt'}", cwd=tmp_path)
    assert done.returncode == 2 and "does not exist" in done.stderr


def test_vanilla_torchvision_model_loads_the_final_weights(tmp_path):
    import torchvision

    config = compose_train(
        "model=resnet18",
        "data=synthetic",
        "data.image_size=32",
        "data.num_classes=10",
        "data.train_size=64",
        "data.val_size=16",
        "data.batch_size=32",
        "schedule.epochs=1",
        "logger=none",
        "sparsity.target=0.8",
        "sparsity.warmup_frac=0.5",
        "sparsity.finetune_frac=0.5",
    )
    summary = train(config, tmp_path)
    model = torchvision.models.resnet18(num_classes=10)
    model.load_state_dict(torch.load(tmp_path / "model_final.pt", weights_only=True))
    total = sum(p.numel() for p in model.parameters())
    assert sum(int((p == 0).sum()) for p in model.parameters()) / total == pytest.approx(0.8, abs=1e-4)
    assert summary["sparsity_all"] == pytest.approx(0.8, abs=1e-4)


def test_gradient_accumulation_and_channels_last(tmp_path, tiny_digits):
    summary = train(
        compose_train(
            *tiny_digits,
            "data.batch_size=32",
            "trainer.accumulate=2",
            "trainer.channels_last=true",
            "trainer.grad_clip=1.0",
        ),
        tmp_path,
    )
    assert summary["steps"] == 2 * (1347 // 32 // 2)
    assert summary["sparsity_all"] == pytest.approx(0.9, abs=1e-4)


def test_dense_method_trains_without_masks(tmp_path, tiny_digits):
    summary = train(compose_train(*tiny_digits, "sparsity.method=dense"), tmp_path)
    assert summary["sparsity_all"] < 0.01 and summary["flops_reduction"] == pytest.approx(1.0, abs=0.01)


@pytest.mark.slow
def test_out_of_the_box_run_reaches_the_target_accuracy(tmp_path):
    done = run_cli("train.py", f"hydra.run.dir={tmp_path / 'run'}", "logger=none", cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["val_top1"] >= 0.95 and summary["sparsity_all"] == pytest.approx(0.9, abs=1e-4)


@pytest.mark.slow
def test_compiled_model_trains(tmp_path, tiny_digits):
    summary = train(compose_train(*tiny_digits, "trainer.compile=true"), tmp_path)
    assert summary["sparsity_all"] == pytest.approx(0.9, abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["spartan", "topkast", "magnitude"])
def test_compiled_model_gives_the_eager_gradients(method):
    from spartan import Sparsifier, SparsityConfig

    def gradients(compiled: bool) -> list[list[torch.Tensor]]:
        torch.manual_seed(0)
        torch._dynamo.reset()
        model = digits_cnn()
        config = SparsityConfig(
            method=method, target=0.8, warmup_frac=0.0, finetune_frac=0.0, beta_init=5, beta_final=5
        )
        sparsifier = Sparsifier(model, config, total_steps=10)
        runner = torch.compile(model) if compiled else model
        x, y = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.arange(16) % 10
        steps = []
        for _ in range(2):
            torch.nn.functional.cross_entropy(runner(x), y).backward()
            sparsifier.finish_backward()  # the global term accumulated inside the compiled backward
            steps.append([t.weight.grad.clone() for t in sparsifier.tensors])
            with torch.no_grad():
                for t in sparsifier.tensors:
                    t.weight.sub_(0.1 * t.weight.grad)
                    t.weight.grad = None
            sparsifier.step()
        return steps

    for eager, compiled in zip(gradients(False), gradients(True)):
        for a, b in zip(eager, compiled):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
