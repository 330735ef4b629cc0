"""The config parser: TOML + key=value overrides into nested dataclasses, with one-line errors."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from pellucid import config
from pellucid.errors import ConfigError


@dataclass
class Optim:
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)


@dataclass
class Run:
    name: str = "x"
    steps: int = 10
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool = False
    seed: int | None = None
    optim: Optim = field(default_factory=Optim)


def test_override_parses_by_annotation():
    cfg = config.override(
        Run(), ["steps=20", "optim.lr=1e-3", "device=cpu", "compile=true", "seed=none"]
    )
    assert (cfg.steps, cfg.optim.lr, cfg.device, cfg.compile, cfg.seed) == (
        20,
        1e-3,
        "cpu",
        True,
        None,
    )
    assert config.override(Run(), ["optim.betas=0.8,0.9"]).optim.betas == (0.8, 0.9)
    assert config.override(Run(), ["seed=7"]).seed == 7


@pytest.mark.parametrize(
    ("assignment", "needle"),
    [
        ("optim.lrr=1", "unknown config key 'optim.lrr' (did you mean 'optim.lr'?)"),
        ("steps=ten", "config key 'steps' expects an integer"),
        ("steps=1.5", "config key 'steps' expects an integer"),
        ("device=tpu", "config key 'device' must be one of"),
        ("compile=maybe", "config key 'compile' expects true or false"),
        ("optim.lr=nan", "config key 'optim.lr' must be finite"),
        ("optim=3", "is a section"),
        ("steps", "must look like key=value"),
    ],
)
def test_bad_overrides_name_the_key(assignment, needle):
    with pytest.raises(ConfigError) as e:
        config.override(Run(), [assignment])
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_toml_file_then_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('name = "demo"\nsteps = 5\n[optim]\nlr = 0.01\n')
    cfg = config.load(Run, path, ["steps=6"])
    assert (cfg.name, cfg.steps, cfg.optim.lr, cfg.optim.betas) == ("demo", 6, 0.01, (0.9, 0.95))
    assert config.from_dict(Run, config.to_dict(cfg)) == cfg


def test_bad_toml_files(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("steps = = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(Run, bad)
    with pytest.raises(ConfigError, match="cannot read config file"):
        config.load(Run, tmp_path / "missing.toml")
    typo = tmp_path / "typo.toml"
    typo.write_text("[optim]\nlearning_rate = 1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.learning_rate'"):
        config.load(Run, typo)
