"""ModelConfig: derived sizes, presets, and one-line errors naming the bad key."""

import dataclasses
import json

import pytest
import torch

from pellucid import config as config_parser
from pellucid.errors import ConfigError
from pellucid.model.config import PRESETS, ModelConfig
from pellucid.model.transformer import Transformer


def test_sizes_are_derived_when_left_out():
    cfg = ModelConfig(n_embd=96, n_head=6, mlp="swiglu")
    assert (cfg.head_dim, cfg.n_kv_head, cfg.ffn_dim) == (16, 6, 256)
    assert ModelConfig(n_embd=96, n_head=6, mlp="gelu").ffn_dim == 384


def test_replace_derives_again_but_keeps_explicit_values():
    small = dataclasses.replace(PRESETS["small"], n_embd=512, n_head=8)
    assert (small.head_dim, small.n_kv_head) == (64, 8)
    assert small.ffn_dim == PRESETS["small"].ffn_dim  # ffn_dim was given explicitly in the preset
    widened = dataclasses.replace(ModelConfig(n_embd=64), n_embd=128)
    assert widened.ffn_dim == ModelConfig(n_embd=128).ffn_dim
    # Explicit head_dim with n_head * head_dim != n_embd (allowed, as in some real models).
    odd = ModelConfig(n_embd=64, n_head=4, head_dim=32)
    assert dataclasses.replace(odd, n_layer=3).head_dim == 32


def test_config_parser_round_trip_and_override():
    cfg = PRESETS["llama"]
    data = json.loads(json.dumps(config_parser.to_dict(cfg)))
    assert config_parser.from_dict(ModelConfig, data) == cfg
    wider = config_parser.override(PRESETS["tiny"], ["n_embd=128", "n_layer=3"])
    assert (wider.n_embd, wider.n_layer, wider.head_dim) == (128, 3, 32)
    with pytest.raises(ConfigError, match="did you mean 'n_embd'"):
        config_parser.override(PRESETS["tiny"], ["n_embed=128"])


def test_presets():
    assert set(PRESETS) >= {"tiny", "small", "gpt2-124m", "llama"}
    with torch.device("meta"):  # shapes only: no memory, no init time
        gpt2 = Transformer(PRESETS["gpt2-124m"])
        llama = Transformer(PRESETS["llama"])
    assert 123.5e6 < gpt2.num_params() < 125e6
    assert 134e6 < llama.num_params() < 135e6  # SmolLM2-135M
    llama_cfg = PRESETS["llama"]
    assert (llama_cfg.n_kv_head, llama_cfg.head_dim, llama_cfg.rope_theta) == (3, 64, 1e5)


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"n_embd": 65, "n_head": 4}, "n_embd"),
        ({"n_head": 4, "n_kv_head": 3}, "n_kv_head"),
        ({"n_head": 4, "n_kv_head": 8}, "n_kv_head"),
        ({"n_layer": 0}, "n_layer"),
        ({"n_head": 0}, "n_head"),
        ({"head_dim": 0}, "head_dim"),
        ({"n_kv_head": 0}, "n_kv_head"),
        ({"n_layer": 20_000}, "n_layer"),
        ({"vocab_size": 2**31 + 1}, "vocab_size"),
        ({"context_len": -5}, "context_len"),
        ({"n_embd": 2**40}, "n_embd"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"dropout": float("nan")}, "dropout"),
        ({"rope_theta": float("inf")}, "rope_theta"),
        ({"rope_theta": 0.0}, "rope_theta"),
        ({"norm_eps": 0.0}, "norm_eps"),
        ({"head_dim": 15}, "head_dim"),
        ({"pos": "alibi"}, "pos"),
        ({"norm": "batchnorm"}, "norm"),
        ({"mlp": "relu"}, "mlp"),
        ({"n_head": "4"}, "n_head"),
        ({"n_layer": True}, "n_layer"),
        ({"bias": 1}, "bias"),
        ({"rope_theta": "big"}, "rope_theta"),
    ],
)
def test_bad_config_is_one_line_naming_the_key(changes, key):
    with pytest.raises(ConfigError) as err:
        ModelConfig(**changes)
    message = str(err.value)
    assert "\n" not in message
    assert f"'{key}'" in message


def test_sinusoidal_needs_even_width():
    with pytest.raises(ConfigError, match="'n_embd'"):
        ModelConfig(pos="sinusoidal", n_embd=63, n_head=7)
