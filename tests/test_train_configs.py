"""Every shipped config composes, validates and builds its objects; overrides compose as users type them."""

import re

import pytest
import torch
from conftest import ROOT, compose_train, run_cli, write_image_folder

from spartan.train.errors import ConfigError
from spartan.train.loop import Run
from spartan.train.optim import lr_factor

EXPERIMENTS = sorted(p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml"))


def test_the_issue_list_of_experiments_ships():
    expected = {
        "digits_spartan",
        "resnet50_dense",
        "resnet50_spartan_s80",
        "resnet50_spartan_s90",
        "resnet50_spartan_s95",
        "resnet50_topkast_s90",
        "resnet50_magnitude_s90",
        "resnet50_flops_s90",
        "vitb16_dense",
        "vitb16_spartan_s90",
        "vitb16_block16_s90",
    }
    assert expected <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_builds(experiment, tmp_path):
    # ImageNet is not here: the experiment's model, sparsity, schedule and optimizer on synthetic images, or (the
    # ViT recipes set RandAugment, which only the image backends have) on a tiny image folder.
    if experiment.startswith("digits"):
        data = []
    elif experiment.startswith("fmnist"):  # 1×28×28 images, as Fashion-MNIST's
        data = ["data=synthetic", "data.train_size=512", "data.val_size=4", "data.image_size=28", "data.channels=1"]
    elif experiment.startswith("vitb16"):
        data = [f"data.path={write_image_folder(tmp_path / 'images')}", "data.num_workers=0", "data.batch_size=4"]
    else:
        data = ["data=synthetic", "data.train_size=512", "data.val_size=4"]
    config = compose_train(f"experiment={experiment}", *data, "logger=none", "trainer.device=cpu")
    run = Run(config, tmp_path / "run")
    assert config.name == experiment
    method = experiment.split("_")[1]
    expected_method = {
        "dense": "dense",
        "spartan": "spartan",
        "topkast": "topkast",
        "magnitude": "magnitude",
        "flops": "spartan",
        "block16": "spartan",
    }[method]
    assert run.sparsifier.config.method == expected_method
    if expected_method != "dense":
        named = re.search(r"_s(\d+)$", experiment)  # the target the name promises; 0.9 (the default) otherwise
        assert run.sparsifier.config.target == (int(named.group(1)) / 100 if named else 0.9)
    if experiment.startswith("resnet50"):
        assert run.model.fc.out_features == 1000 and config.schedule.epochs == 100
        assert run.optimizer.param_groups[0]["initial_lr"] == pytest.approx(1.0 * 512 / 4096)  # scaled to the batch
        assert isinstance(run.optimizer, torch.optim.SGD) and run.optimizer.defaults["nesterov"]
        assert config.trainer.amp == "bf16" and config.trainer.channels_last
    if experiment.startswith("vitb16"):
        assert isinstance(run.optimizer, torch.optim.AdamW) and config.trainer.grad_clip == 1.0
        assert config.schedule.warmup_epochs == 10 and run.optimizer.param_groups[0]["weight_decay"] == 0.3
    if experiment == "vitb16_block16_s90":
        assert {t.block for t in run.sparsifier.tensors} == {(16, 16)}
        assert all(t.name.startswith("blocks.") for t in run.sparsifier.tensors)
    if experiment == "resnet50_flops_s90":
        assert config.sparsity.cost == "flops" and config.sparsity.input_shape == (3, 224, 224)
    # Norms and biases get no weight decay; every parameter is optimized exactly once.
    decayed, exempt = (set(map(id, g["params"])) for g in run.optimizer.param_groups)
    assert not decayed & exempt and len(decayed | exempt) == sum(1 for _ in run.model.parameters())
    assert all(p.ndim > 1 for p in run.model.parameters() if id(p) in decayed)
    run.close()


def test_imagenet_experiments_need_a_data_path(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.path must name a dataset folder for data=imagefolder"):
        compose_train("experiment=resnet50_spartan_s95", "logger=none")
    with pytest.raises(ConfigError, match=r"data\.path .* has no train/ folder"):
        Run(
            compose_train("experiment=resnet50_spartan_s95", f"data.path={tmp_path}", "trainer.device=cpu"),
            tmp_path / "run",
        )
    assert not (tmp_path / "run").exists()


GPU_EXPERIMENTS = [e for e in EXPERIMENTS if e.startswith(("resnet50", "vitb16"))]  # the ImageNet recipes


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here: the GPU recipes run")
def test_gpu_recipes_stop_without_cuda_before_building_anything(tmp_path, monkeypatch):
    for experiment in GPU_EXPERIMENTS:  # every ImageNet recipe uses trainer=gpu: CUDA, cuDNN autotuning
        trainer = compose_train(f"experiment={experiment}", "data.path=/x").trainer
        assert (trainer.device, trainer.cudnn_benchmark) == ("cuda", True), experiment

    def build_loaders(*args, **kwargs):
        raise AssertionError("the data was built before the device was checked")

    monkeypatch.setattr("spartan.train.loop.build_loaders", build_loaders)
    for overrides in (["trainer=gpu"], ["experiment=resnet50_spartan_s95", "data=synthetic"]):
        with pytest.raises(ConfigError, match=r"trainer\.device=cuda but CUDA is not available here"):
            Run(compose_train(*overrides, "logger=none"), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    # the command line: one error line, exit status 2, nothing written
    done = run_cli("train.py", "trainer=gpu", "logger=none", f"hydra.run.dir={tmp_path / 'cli'}", cwd=tmp_path)
    assert done.returncode == 2 and "error: trainer.device=cuda but CUDA is not available here" in done.stderr
    assert not (tmp_path / "cli").exists()


def test_cudnn_benchmark_is_a_bool():
    from hydra.errors import ConfigCompositionException

    from spartan.train.config import TrainerConfig

    assert compose_train().trainer.cudnn_benchmark is False
    assert compose_train("trainer.cudnn_benchmark=true").trainer.cudnn_benchmark is True
    with pytest.raises(ConfigCompositionException) as error:
        compose_train("trainer.cudnn_benchmark=maybe")
    assert "Value 'maybe' is not a valid bool" in str(error.value.__cause__)
    with pytest.raises(ConfigError, match=r"trainer\.cudnn_benchmark must be true or false, got 'yes'"):
        TrainerConfig(cudnn_benchmark="yes")


def test_overrides_compose_as_users_type_them():
    config = compose_train("sparsity=block", "sparsity.block=[32,32]", "sparsity.target=0.9")
    assert config.sparsity.block == (32, 32) and config.sparsity.target == 0.9
    # A group chosen on the command line beats the experiment's choice.
    config = compose_train(
        "experiment=resnet50_spartan_s95",
        "data=synthetic",
        "data.batch_size=8",
        "sparsity.method=topkast",
        "optim.lr=0.5",
        "seed=3",
        "trainer.device=cpu",
    )
    assert (config.data.name, config.data.batch_size, config.model.name) == ("synthetic", 8, "resnet50")
    assert (config.sparsity.method, config.sparsity.target, config.optim.lr, config.seed) == ("topkast", 0.95, 0.5, 3)
    config = compose_train("sparsity=cost_weighted")
    assert config.sparsity.input_shape == (1, 8, 8)  # follows the data's shape


def test_unknown_keys_and_options_are_hydra_errors():
    from hydra.errors import ConfigCompositionException, MissingConfigException

    with pytest.raises(MissingConfigException):
        compose_train("model=resnet1000")
    with pytest.raises(ConfigCompositionException, match="foo"):
        compose_train("optim.foo=1")


@pytest.mark.parametrize(
    "override, message",
    [
        ("sparsity.target=1.0", "sparsity.target"),
        ("optim.lr=0", "optim.lr"),
        ("optim.lr=-1", "optim.lr"),
        ("data.batch_size=0", "data.batch_size"),
        ("schedule.epochs=0", "schedule.epochs"),
        ("schedule.warmup_epochs=40", "schedule.warmup_epochs"),
        ("trainer.accumulate=0", "trainer.accumulate"),
        ("sparsity.method=prune", "sparsity.method"),
        ("trainer.amp=fp8", "trainer.amp"),
        ("data=imagefolder", "data.path"),
        ("data=imagefolder data.path=", "data.path"),
        ("seed=-1", "seed"),
    ],
)
def test_invalid_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        compose_train(*override.split())


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    total, warmup = 100, 10
    factors = [lr_factor(s, total, warmup, "cosine", 0.001) for s in range(total)]
    assert factors[0] == pytest.approx(0.1) and factors[warmup - 1] == pytest.approx(1.0)
    assert factors[warmup] == pytest.approx(1.0) and all(
        a >= b for a, b in zip(factors[warmup:], factors[warmup + 1 :])
    )
    assert lr_factor(total, total, warmup, "cosine", 0.001) == pytest.approx(0.001)
    assert lr_factor(55, total, warmup, "linear", 0.0) == pytest.approx(0.5)
    assert lr_factor(90, total, warmup, "constant", 0.0) == 1.0


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["data=imagefolder", "data.path=/x", "data.min_res=160"], "min_res"),
        (["data=ffcv", "data.path=/x", "data.interpolation=bilinear"], "interpolation"),
        (["data=ffcv", "data.path=/x", "data.auto_augment=randaugment"], "auto_augment"),
        (["data=ffcv", "data.path=/x", "data.repeated_augment=3"], "repeated_augment"),
        (["data=webdataset", "data.path=/x", "data.repeated_augment=3"], "repeated_augment"),
        (["data=digits", "data.path=/x"], "path"),
    ],
)
def test_a_key_of_another_data_option_fails_at_composition(overrides, key):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as error:
        compose_train(*overrides)
    assert f"Key '{key}' not in" in str(error.value.__cause__ or error.value)


@pytest.mark.parametrize(
    "override, message",
    [
        ("+data.hflip=true", "data.hflip is not a key of SyntheticConfig"),
        ("+optim.momentun=0.8", "optim.momentun is not a key of OptimConfig"),
        ("+sparsity.beta=3", "sparsity.beta is not a key of SparsityConfig"),
    ],
)
def test_a_key_added_to_a_typed_group_is_an_error(override, message):
    # Hydra's +key=value forces the key into the structured config, where it would silently do nothing.
    with pytest.raises(ConfigError, match=message):
        compose_train("data=synthetic", override)


def test_every_data_backend_is_an_option_with_its_own_schema():
    from spartan.train.data import all_backends

    options = sorted(p.stem for p in (ROOT / "configs" / "data").glob("*.yaml"))
    assert options == sorted(all_backends())
    for name, backend in all_backends().items():
        path = ["data.path=/x"] if "path" in backend.schema.__dataclass_fields__ else []
        config = compose_train(f"data={name}", *path)
        assert type(config.data) is backend.schema and config.data.name == name


GROUP_SCHEMAS = {
    "model": "ModelConfig",
    "sparsity": "SparsityConfig",
    "schedule": "ScheduleConfig",
    "optim": "OptimConfig",
    "trainer": "TrainerConfig",
    "logger": "LoggerConfig",
}


def test_group_options_do_not_repeat_their_schema_defaults():
    # Each default lives in one place, the schema: an option's YAML holds only what differs from it.
    import dataclasses

    from omegaconf import OmegaConf

    import spartan.train.config as schemas
    from spartan import SparsityConfig
    from spartan.train.data import get_backend

    for path in sorted((ROOT / "configs").glob("*/*.yaml")):
        group = path.parent.name
        if group == "experiment":
            continue
        values = OmegaConf.to_container(OmegaConf.load(path)) or {}
        values.pop("defaults", None)
        if group == "data":
            schema = get_backend(path.stem).schema
        else:
            schema = SparsityConfig if group == "sparsity" else getattr(schemas, GROUP_SCHEMAS[group])
        defaults = {
            f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(schema)
        }
        for key, value in values.items():
            default = list(defaults[key]) if isinstance(defaults[key], tuple) else defaults[key]
            assert value != default, f"{path.relative_to(ROOT)}: {key}: {value!r} repeats the schema's default"


def test_sweep_job_directories_are_named_by_their_overrides_and_fit_a_file_name():
    from spartan.train.config import job_dirname

    assert job_dirname("seed=0,sparsity.target=0.9") == "seed=0,sparsity.target=0.9"
    long = ",".join(f"sparsity.beta_final={k}" for k in range(40))
    name = job_dirname(long)
    assert len(name) == 160 and name != job_dirname(long + "0") and name.startswith(long[:100])


def test_model_kwargs_the_model_does_not_take_are_one_clear_error():
    from spartan.train.config import ModelConfig
    from spartan.train.models import build_model

    with pytest.raises(ConfigError, match=r"model.kwargs=\{'depth': 3\} rejected by builtin model 'digits_cnn'"):
        build_model(ModelConfig(kwargs={"depth": 3}), 10, 1)
