"""Training memory is estimated from the config and checked before any tensor is allocated."""

import dataclasses

import pytest

from pellucid.cli import main
from pellucid.errors import ConfigError
from pellucid.model.config import PRESETS
from pellucid.model.transformer import Transformer
from pellucid.train.memory import check_fits, estimate, parameter_count

VARIANTS = {
    "tiny": {},
    "untied qk-norm": {"qk_norm": True, "tie_embeddings": False},
    "gpt2 block": {"pos": "learned", "norm": "layernorm", "mlp": "gelu", "bias": True},
    "swiglu bias": {"bias": True},
}


@pytest.mark.parametrize("name", VARIANTS)
def test_parameter_count_from_the_config_equals_the_model(name):
    cfg = dataclasses.replace(PRESETS["tiny"], **VARIANTS[name])
    assert parameter_count(cfg) == Transformer(cfg).num_params()


def test_estimate_grows_with_batch_and_depth():
    cfg = PRESETS["tiny"]
    one, eight = estimate(cfg, 1), estimate(cfg, 8)
    assert eight.state_bytes == one.state_bytes == 16 * parameter_count(cfg)
    assert eight.activation_bytes == 8 * one.activation_bytes
    deeper = estimate(dataclasses.replace(cfg, n_layer=20), 1)
    assert deeper.total_bytes > 5 * one.total_bytes


def test_check_fits_names_what_it_needs():
    cfg = PRESETS["tiny"]
    assert check_fits(cfg, 4, available=1 << 40).total_bytes > 0
    with pytest.raises(ConfigError, match=r"needs about .* GB .*train.batch_size=4") as e:
        check_fits(cfg, 4, available=1 << 20)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "override", ["model.n_layer=10000", "train.batch_size=1000000", "model.ffn_dim=1000000"]
)
def test_train_refuses_a_run_that_cannot_fit_before_allocating(override, tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("to be or not to be, that is the question. " * 200)
    args = ["train", f"data.corpus={corpus}", "data.vocab_size=300", "model.preset=tiny", override]
    assert main([*args, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "needs about" in err and "available" in err
    assert not (tmp_path / "run" / "checkpoints").exists()
