"""Untrusted config input is bounded: a YAML alias bomb, huge values, and settings no run could use are refused
in one line naming the field, with exit code 2, before anything runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from common.config import ConfigError, load_yaml_mapping, resolve_config
from orchestrator.cli import main

ROOT = Path(__file__).resolve().parents[2]

# 351 bytes (the was 346) that expand to 9^9 (387 million) strings through nested aliases ("billion laughs").
BOMB = "\n".join([
    'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]',
    *[f"{n}: &{n} [{','.join([f'*{p}'] * 9)}]" for p, n in zip("abcdefgh", "bcdefghi")],
    "name: *i",
]) + "\n"


def _limited() -> None:
    """Child process: at most 4 GiB of address space, so a regression fails fast instead of filling the box."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


def test_case8_yaml_alias_bomb_is_refused_in_one_line(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMB)
    assert len(BOMB.encode()) < 400
    try:
        done = subprocess.run([sys.executable, "-m", "orchestrator", "config", "show", "--config", str(bomb)],
                              capture_output=True, text=True, timeout=60, cwd=ROOT, preexec_fn=_limited)
    except subprocess.TimeoutExpired:
        pytest.fail("validating a 346-byte YAML file did not finish in 60 s")
    assert done.returncode == 2, done.stderr[-500:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and len(lines[0]) < 300
    assert lines[0].startswith(f"error: --config {bomb}: expands to more than")


def test_case8_runtime_env_shares_the_bounded_loader(tmp_path: Path) -> None:
    bomb = tmp_path / "env.yaml"
    bomb.write_text(BOMB)
    with pytest.raises(ConfigError, match="--runtime-env .*expands to more than 100,000 values"):
        load_yaml_mapping(str(bomb), "--runtime-env")


def test_case8_error_values_are_truncated(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "show", "--set", "seed=" + "9" * 5000 + "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: config: seed = ") and len(err) < 300 and "..." in err


def test_case8_oversized_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    big = tmp_path / "big.yaml"
    big.write_text("seed: 1\n" + "# padding\n" * 120_000)
    assert main(["config", "show", "--config", str(big)]) == 2
    assert "a config is at most 1,048,576" in capsys.readouterr().err


@pytest.mark.parametrize("overrides, line", [
    (["training.lr=.inf"], "config: training.lr = Infinity: Input should be a finite number"),
    (["sampling.cfg_scale=.inf"], "config: sampling.cfg_scale = Infinity: Input should be a finite number"),
    (["sampling.cfg_scale=.nan"], "config: sampling.cfg_scale = NaN: Input should be a finite number"),
    (["data.gmm_separation=.inf"], "config: data.gmm_separation = Infinity: Input should be a finite number"),
    (["data.source=/data/imagenet", "training.global_batch=1000000000", "clustering.num_experts=1000000000"],
     "config: clustering.num_experts = 1000000000: Input should be less than or equal to 4096"),
    (["data.source=builtin:gmm", "data.gmm_items=8", "clustering.num_experts=16", "training.global_batch=256"],
     "config: clustering.num_experts = 16 exceeds the dataset size 8"),
    (["model.size=XXL"], "config: model.size = \"XXL\": Input should be 'tiny', 'S', 'B', 'L' or 'XL'"),
    (["model.heads=5"], "config: model: width 64 is not divisible by heads 5"),
    (["router.model.width=66", "router.model.heads=2"], "config: router.model: width 66 must be divisible by 4"),
    (["model.patch_size=3"], "config: model.patch_size = 3 does not divide the latent size 8x8"),
    (["router.model.patch_size=3"], "config: router.model.patch_size = 3 does not divide the latent size 8x8"),
    (["run_uri="], 'config: run_uri = "": is empty'),
    (["run_uri=' '"], 'config: run_uri = " ": is empty'),
    (["name="], 'config: name = "": must be a plain name'),
    (["name=/etc/cron.d"], 'config: name = "/etc/cron.d": must be a plain name'),
    (["name=../../x"], 'config: name = "../../x": must be a plain name'),
    (["model.width=1000000000"], "config: model.width = 1000000000: Input should be less than or equal to 8192"),
    (["eval.inception_path=/tmp/inception.pt"], 'config: eval.inception_path = "/tmp/inception.pt": a run cannot name FID weights'),
    (["eval.strategies=[top1, single]"], "config: eval.strategies = [... 2 items]: 'single' is not a comparable strategy"),
])
def test_case10_config_refuses_what_no_run_can_use(overrides: list[str], line: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError) as err:
        resolve_config(overrides=overrides)
    assert str(err.value).startswith(line), str(err.value)
    assert main(["config", "show", *[a for o in overrides for a in ("--set", o)]]) == 2
    printed = capsys.readouterr().err.strip().splitlines()
    assert printed == [f"error: {err.value}"]


def test_case10_presets_and_usual_overrides_still_validate() -> None:
    for overrides in (["sampling.cfg_scale=4.0"], ["name=imagenet-xl2.v2"], ["model.size=S", "model.patch_size=4"],
                      ["data.source=builtin:gmm", "data.image_size=2", "model.patch_size=1",
                       "router.model.patch_size=1", "clustering.num_experts=8"]):
        resolve_config(overrides=overrides)
    resolve_config(preset="imagenet-xl2")  # VAE latents: the latent size is not known at config time
