"""On a CUDA device the one engine and the one training loop do what they do on the CPU.

Skipped where there is no CUDA (conftest.py); run them on a GPU machine with `pytest -m gpu`.
"""

import dataclasses

import numpy as np
import pytest
import torch

from pellucid.data.batches import WindowSampler
from pellucid.infer.engine import Engine
from pellucid.infer.sampling import SamplingParams
from pellucid.model.config import PRESETS
from pellucid.model.transformer import Transformer
from pellucid.train.metrics import read_metrics
from pellucid.train.objectives import lm_loss
from pellucid.train.trainer import TrainConfig, train

pytestmark = pytest.mark.gpu

PROMPTS = [[1, 2, 3, 4, 5], [9, 8, 7], [42] * 20]


def tiny(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(PRESETS["tiny"]).eval()


def tokens_of(model: Transformer, params: SamplingParams) -> list[list[int]]:
    out = [[] for _ in PROMPTS]
    for steps in Engine(model).generate(PROMPTS, params):
        for s in steps:
            out[s.row].append(s.id)
    return out


def test_greedy_and_seeded_samples_on_cuda_equal_the_cpus_in_fp32():
    # The sampler draws its uniform numbers on the CPU in float64, so a seed picks the same
    # tokens on every device (sampling.sample's promise); fp32 logits differ by ~1e-6 only.
    cpu = tiny()
    gpu = tiny().to("cuda")
    for params in (
        SamplingParams(temperature=0, max_new_tokens=24),
        SamplingParams(temperature=0.9, top_p=0.95, top_k=50, max_new_tokens=24, seed=5),
    ):
        assert tokens_of(gpu, params) == tokens_of(cpu, params)


def test_cached_decode_on_cuda_equals_the_uncached_model_in_bf16():
    model = tiny().to("cuda", torch.bfloat16)
    params = SamplingParams(temperature=0, max_new_tokens=16)
    engine = Engine(model)
    assert engine.pool.device.type == "cuda"
    cached = [[s.id for s in step] for step in engine.generate(PROMPTS[:1], params)]
    uncached = [
        [s.id for s in step] for step in engine.generate(PROMPTS[:1], params, use_cache=False)
    ]
    # bf16 rounding can flip a near-tie late in a random model's run: the first tokens agree.
    assert cached[:8] == uncached[:8]


def test_training_on_cuda_picks_bf16_autocast_for_auto_and_lowers_the_loss(tmp_path):
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(PRESETS["tiny"], context_len=16))
    stream = (np.arange(8192) * 7 % PRESETS["tiny"].vocab_size).astype(np.uint16)
    sampler = WindowSampler(stream, 8, 16, seed=0, pin_memory=True)
    tcfg = TrainConfig(
        max_steps=60, batch_size=8, lr=3e-3, warmup_steps=5, eval_every=0, checkpoint_every=30,
        device="cuda", dtype="auto", progress=False, seed=3,
    )  # fmt: skip
    state = train(model, lm_loss, sampler, tcfg, tmp_path)
    losses = [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert state.precision == "bfloat16 (train.dtype=auto on cuda)"
    assert next(model.parameters()).device.type == "cuda"
    assert losses[-1] < 0.5 * losses[0]
