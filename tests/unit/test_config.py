"""Config: presets validate, overrides are typed, errors are one line naming the field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from common.config import ConfigError, RunConfig, resolve_config
from common.presets import PRESETS
from orchestrator.cli import main


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_validates(name: str) -> None:
    config = PRESETS[name]()
    assert RunConfig.model_validate(config.model_dump(mode="json")) == config


def test_contract_keys_exist() -> None:
    config = resolve_config(overrides=["data.source=builtin:gmm", "clustering.num_experts=2",
                                       "clustering.method=random", "seed=7"])
    assert (config.data.source, config.clustering.num_experts, config.clustering.method, config.seed) == \
        ("builtin:gmm", 2, "random", 7)


def test_overrides_are_typed_including_lists_and_dicts() -> None:
    config = resolve_config(overrides=["eval.t_grid=[0.1, 0.5]", "islands.assignment={0: island-a, 1: island-b, 2: island-a, 3: island-b}",
                                       "training.lr=3e-4"])
    assert config.eval.t_grid == [0.1, 0.5] and config.islands.assignment[1] == "island-b"
    assert isinstance(config.training.lr, float)


@pytest.mark.parametrize("override, field", [
    ("clustering.num_experts=0", "clustering.num_experts"),
    ("training.global_batch=250", "training.global_batch"),
    ("clustering.num_experts=2000", "clustering.num_experts"),
    ("islands.assignment={0: nowhere}", "islands.assignment"),
    ("model.bogus=1", "model.bogus"),
    ("training.lr=fast", "training.lr"),
    ("seed=-1", "seed"),
    ("islands.pool=[{name: a, num_workers: 3}]", "island a"),
])
def test_bad_values_name_the_field(override: str, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        resolve_config(overrides=[override])
    message = str(err.value)
    assert field in message and "\n" not in message


@pytest.mark.parametrize("overrides, message", [
    (["hires.image_size=8"], "hires.image_size = 8 must exceed data.image_size = 8"),
    (["hires.image_size=17"], "hires.image_size = 17: model.patch_size = 2 does not divide the latent size 17x17"),
    (["hires.image_size=16", "data.buckets.enabled=true", "data.buckets.sizes=[[8, 8]]"], "leave data.buckets.sizes unset"),
])
def test_hires_settings_are_checked_at_config_time(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve_config(overrides=overrides)


def test_hires_run_config_is_the_run_at_the_larger_size_with_the_stage_budgets() -> None:
    config = resolve_config("shapes", overrides=["data.buckets.enabled=true", "data.buckets.target_area=256",
                                                 "hires.image_size=32", "hires.total_nimg=4000", "hires.lr=0.002"])
    hires = config.hires_run_config()
    assert (hires.data.image_size, hires.data.buckets.target_area, hires.hires) == (32, 1024, None)
    assert (hires.expert_nimg, hires.training.lr) == (4000 // config.clustering.num_experts, 0.002)
    assert hires.router_nimg == config.hires.router_nimg and hires.model == config.model


def test_islands_must_split_the_router_batch_too() -> None:
    with pytest.raises(ConfigError, match="island a: .*router.training.global_batch 40"):
        resolve_config(overrides=["islands.pool=[{name: a, per_worker_batch: 16}]", "router.training.global_batch=40"])
    resolve_config(overrides=["islands.pool=[{name: a, per_worker_batch: 16}]", "router.training.global_batch=48"])


def test_yaml_file_with_base_preset(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"preset": "gmm", "clustering": {"num_experts": 2}, "seed": 3}))
    config = resolve_config(config_file=str(path))
    assert config.name == "gmm" and config.clustering.num_experts == 2 and config.data.source == "builtin:gmm"


def test_cli_config_show_and_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "show", "--set", "seed=5"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["seed"] == 5
    assert main(["config", "show", "--set", "clustering.num_experts=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "clustering.num_experts" in err and "Traceback" not in err
    assert main(["config", "show", "--preset", "nope"]) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert main(["no-such-command"]) == 2


def test_console_script_exit_code() -> None:
    done = subprocess.run([sys.executable, "-m", "orchestrator", "config", "show", "--set", "clustering.num_experts=0"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert "clustering.num_experts" in done.stderr


def test_total_nimg_makes_every_k_flop_matched(capsys: pytest.CaptureFixture[str]) -> None:
    from worker.budget import training_budget

    budgets = {}
    for k in (1, 8):
        assert main(["config", "show", "--set", "training.total_nimg=192000", "--set", f"clustering.num_experts={k}"]) == 0
        out = capsys.readouterr().out
        assert yaml.safe_load(out)["training"]["total_nimg"] == 192000          # comments keep it valid YAML
        assert f"experts total (K = {k}): 192,000 images" in out and "router:" in out
        budgets[k] = training_budget(resolve_config(overrides=["training.total_nimg=192000", f"clustering.num_experts={k}"]))
    assert budgets[1]["per_expert_nimg"] == 192_000 and budgets[8]["per_expert_nimg"] == 24_000
    assert budgets[1]["per_expert_steps"] == budgets[8]["per_expert_steps"] == 750  # batch 256 vs 8 x 32
    assert budgets[1]["experts_train_flops"] == budgets[8]["experts_train_flops"] > 0
    assert budgets[1]["router_train_flops"] == budgets[8]["router_train_flops"] > 0


def test_duration_nimg_is_an_explicit_per_expert_override() -> None:
    demo = resolve_config()
    assert demo.training.duration_nimg is None and demo.expert_nimg == 48_000  # the demo's budget, K = 4
    assert resolve_config(overrides=["clustering.num_experts=1"]).expert_nimg == 192_000
    override = resolve_config(overrides=["training.duration_nimg=5000", "clustering.num_experts=8"])
    assert override.expert_nimg == 5000                                       # the override wins
    assert resolve_config(overrides=["router.training.duration_nimg=700"]).router_nimg == 700
    assert demo.router_nimg == 32_000 and demo.router.training.timestep_sampling == "uniform"
    with pytest.raises(ConfigError, match="training.total_nimg = 3 leaves no images per expert"):
        resolve_config(overrides=["training.total_nimg=3"])


def test_expert_and_router_jobs_carry_the_derived_duration() -> None:
    from common.config import IslandConfig
    from worker.train import expert_job, router_job

    config = resolve_config(overrides=["training.total_nimg=64000", "clustering.num_experts=8"])
    island = IslandConfig(name="local")
    assert expert_job(config, 3, island).training.duration_nimg == 8000
    assert router_job(config, island).training.duration_nimg == config.router_nimg


def test_config_show_prints_the_hires_budget_at_its_size(capsys) -> None:
    assert main(["config", "show", "--set", "hires.image_size=16", "--set", "hires.total_nimg=96000"]) == 0
    out = capsys.readouterr().out
    assert "# hires budget (hires.total_nimg split over K; latents 1x16x16;" in out
    assert "#   per expert: 24,000 images = 375 steps of batch 64" in out
    assert yaml.safe_load(out)["hires"]["image_size"] == 16  # the output stays a loadable config
