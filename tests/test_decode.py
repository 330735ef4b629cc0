"""The decode step's fast path (infer/decode.py on kernels.py): the model's numbers, faster."""

import dataclasses
import platform
import subprocess
import sys
import weakref

import numpy as np
import pytest
import torch
from torch import Tensor

from pellucid.errors import PellucidError
from pellucid.infer import kernels
from pellucid.infer.decode import FAST_PREFILL, FastDecoder, runner_for
from pellucid.infer.engine import Engine
from pellucid.infer.quant import dequantize, pack, quantize_model
from pellucid.infer.sampling import SamplingParams
from pellucid.model.config import PRESETS
from pellucid.model.kv_cache import KVCache
from pellucid.model.transformer import Transformer

CFG = dataclasses.replace(PRESETS["tiny"], vocab_size=256, ffn_dim=96)  # 64 wide, 4 heads on 2 KV


def _model(mode="q4", **changes):
    torch.manual_seed(0)
    return quantize_model(Transformer(dataclasses.replace(CFG, **changes)).eval(), mode)


@pytest.mark.parametrize("mode", ["q4", "q8", "f32"])
@pytest.mark.parametrize("rows", [1, 3, 4, 9])  # one row, the remainder loop, groups of 4, both
def test_kernels_equal_the_dequantized_product(mode, rows):
    torch.manual_seed(rows)
    w, x = torch.randn(40, 96), torch.randn(rows, 96)
    mat = pack(w, mode)
    want = (x @ dequantize(mat).T).numpy()
    out = np.ones((rows, 40), np.float32)
    kernels.matmul(mat, x.numpy(), out, True)  # accumulates onto what is there
    np.testing.assert_allclose(out, want + 1, atol=1e-4, rtol=1e-4)
    kernels.matmul(mat, x.numpy(), out, False)
    np.testing.assert_allclose(out, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("mode", ["q4", "q8"])
def test_fast_decoder_equals_the_models_forward(mode, qk_norm):
    model = _model(mode, qk_norm=qk_norm)
    fast = FastDecoder.build(model)
    assert fast is not None
    ids = torch.randint(0, CFG.vocab_size, (3, 12), generator=torch.Generator().manual_seed(1))
    ours, theirs = KVCache(model.cfg, 3, 32), KVCache(model.cfg, 3, 32)
    with torch.inference_mode():
        for cache in (ours, theirs):  # ragged rows: 6, 2 and 4 tokens cached
            model.forward_hidden(ids[:, :6], cache=cache)
            cache.advance(torch.tensor([6, 2, 4]))
        for start, T in ((6, 1), (7, 1), (8, 3)):  # decode steps, then a few tokens per row
            new = ids[:, start : start + T]
            torch.testing.assert_close(
                fast.forward_hidden(new, cache=ours),
                model.forward_hidden(new, cache=theirs),
                atol=1e-5,
                rtol=1e-5,
            )
            for a, b in zip(ours.k + ours.v, theirs.k + theirs.v, strict=True):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)  # same K/V written
            ours.advance(T)
            theirs.advance(T)


def test_engine_decodes_on_the_fast_path_with_the_models_tokens():
    model = _model("q8")
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]
    params = SamplingParams(temperature=0, max_new_tokens=10, top_logprobs=3)
    runs = []
    for fast in (True, False):
        engine = Engine(model)
        assert engine._fast is not None
        if not fast:
            engine._fast = None  # every step through the model's forward
        steps = [s for batch in engine.generate(prompts, params) for s in batch]
        runs.append(steps)
    assert [s.id for s in runs[0]] == [s.id for s in runs[1]]
    for a, b in zip(*runs, strict=True):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)


def test_fast_decoder_only_takes_what_it_runs():
    torch.manual_seed(0)
    assert FastDecoder.build(Transformer(CFG).eval()) is None  # float weights: the model's path
    gpt2 = {"pos": "learned", "norm": "layernorm", "mlp": "gelu"}
    assert FastDecoder.build(_model("q8", **gpt2)) is None
    assert FastDecoder.build(_model("q8", bias=True)) is None


def test_decode_steps_and_short_prefills_run_on_the_fast_path_long_prefills_on_the_model():
    model = _model("q8")
    fast, cache = FastDecoder.build(model), KVCache(model.cfg, 4, 8)
    short, long = [1] * FAST_PREFILL, [1] * (FAST_PREFILL + 1)
    assert runner_for(model, fast, [short], cache) is fast  # a chat prompt's prefill
    assert runner_for(model, fast, [[1]] * 32, cache) is fast  # a decode step of 32 rows
    assert runner_for(model, fast, [[1] * 5] * 32, cache) is fast  # ... each with 4 draft tokens
    assert runner_for(model, fast, [long], cache) is model
    assert runner_for(model, fast, [short[:40]] * 2, cache) is model
    assert runner_for(model, fast, [short], None) is model  # uncached: the whole sequence again
    assert runner_for(model, None, [[1]], cache) is model


def test_fast_decoder_refuses_to_run_past_the_cache():
    model = _model("q8")
    cache = KVCache(model.cfg, 1, 4)
    cache.advance(4)
    with pytest.raises(PellucidError, match="context length exceeded"):
        FastDecoder.build(model).forward_hidden(torch.tensor([[1]]), cache=cache)


def test_fast_decoder_gives_the_same_bits_on_any_number_of_threads(monkeypatch):
    """forward's threads take jobs as they come; one thread alone, or more parts than threads,
    run every job all the same (nothing waits for a part that is not running)."""
    import numba

    model = _model("q4")
    fast = FastDecoder.build(model)
    ids = torch.randint(0, CFG.vocab_size, (3, 5), generator=torch.Generator().manual_seed(2))

    def run() -> tuple[Tensor, Tensor]:
        cache = KVCache(model.cfg, 3, 16)
        cache.advance(torch.tensor([2, 0, 4]))
        with torch.inference_mode():
            return fast.forward_hidden(ids, cache=cache), cache.k[-1].clone()

    want = run()
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        got_one_thread = run()
    finally:
        numba.set_num_threads(before)
    monkeypatch.setattr(fast, "threads", lambda: 5)  # 5 parts on the threads there are
    for got in (got_one_thread, run()):
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_the_pools_buffers_are_freed_when_nothing_is_live():
    """The FastDecoder keeps views of the KV buffers between steps; when the pool frees them (no
    sequence left) those views must go too: they held SmolLM2's 1.4 GB for 8 rows of 4,032
    tokens after the last sequence had finished."""
    engine = Engine(_model("q4"), None)
    assert engine._fast is not None
    steps = engine.generate([[1, 2, 3], [4, 5]], SamplingParams(temperature=0, max_new_tokens=9))
    next(steps), next(steps)  # prefill, then a decode step on the FastDecoder
    buffers = [weakref.ref(t) for t in engine.pool.k]
    assert buffers
    steps.close()  # cancels both
    assert engine.kv_bytes_used == 0
    assert all(b() is None for b in buffers)


_VECTOR_CHECK = """
from pellucid.infer.quant import pack, prefer_256_bit_vectors
prefer_256_bit_vectors()
import numba, numpy as np, torch
from pellucid.infer import kernels
groups = numba.njit(fastmath=True, error_model="numpy")(kernels._q4_groups.py_func)
mat, x = pack(torch.randn(16, 64), "q4"), np.ones((8, 64), np.float32)
prep = kernels._q4_prepare(x)
groups(mat[1], mat[2], mat[3], prep[0], np.empty((8, 16), np.float32), False, prep[1], 0, 16)
asm = groups.inspect_asm(groups.signatures[0])
print("zmm" in asm, "gather" in asm)
"""


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 only")
def test_prefer_256_bit_vectors_keeps_the_row_group_loop_to_8_lanes():
    """On Zen 4, LLVM compiled the row-group loop for 16 lanes, fetching block scales with
    gathers: 1.6-1.8x slower at 8 rows. A fresh process: numba fixes its target once."""
    out = subprocess.run(
        [sys.executable, "-c", _VECTOR_CHECK], capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["False", "False"]
