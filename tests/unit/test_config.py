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
