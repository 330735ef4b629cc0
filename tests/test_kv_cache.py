"""KVCache: cached decoding equals the uncached forward, ragged batches equal one-by-one runs,
and the cache's bookkeeping (advance, keep_rows, truncate, bounds)."""

import pytest
import torch

from pellucid.errors import ConfigError, PellucidError
from pellucid.model.config import ModelConfig
from pellucid.model.kv_cache import KVCache
from pellucid.model.layers import Trace
from pellucid.model.transformer import Transformer

SMALL = {"vocab_size": 50, "context_len": 32, "n_layer": 2, "n_head": 4, "n_embd": 32}


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


def make(**changes) -> Transformer:
    return Transformer(ModelConfig(**{**SMALL, **changes})).eval()


def decode_in_steps(model: Transformer, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Prefill `prefill` tokens, then feed the rest one at a time; all logits (B, T, V)."""
    cache = KVCache(model.cfg, ids.shape[0], max_len=ids.shape[1])
    out = [model(ids[:, :prefill], cache=cache)]
    cache.advance(prefill)
    for t in range(prefill, ids.shape[1]):
        out.append(model(ids[:, t : t + 1], cache=cache))
        cache.advance(1)
    assert cache.lengths.tolist() == [ids.shape[1]] * ids.shape[0]
    return torch.cat(out, dim=1)


@pytest.mark.parametrize(
    "arch",
    [
        {"pos": "learned", "norm": "layernorm", "mlp": "gelu", "bias": True},
        {"pos": "sinusoidal"},
        {"pos": "rope", "n_kv_head": 2, "qk_norm": True},
        {"pos": "rope", "n_kv_head": 1, "tie_embeddings": False},
    ],
)
def test_cached_decoding_equals_uncached(arch):
    model = make(**arch)
    ids = torch.randint(0, 50, (2, 14))
    torch.testing.assert_close(
        decode_in_steps(model, ids, prefill=5), model(ids), rtol=0, atol=1e-5
    )


def test_ragged_batch_equals_one_by_one():
    """Right-padded prompts of lengths 7 and 3 prefilled together, then decoded together."""
    model = make(n_kv_head=2)
    lengths = [7, 3]
    prompts = [torch.randint(0, 50, (n,)) for n in lengths]
    continuations = torch.randint(0, 50, (2, 5))
    padded = torch.zeros(2, 7, dtype=torch.long)
    for row, p in enumerate(prompts):
        padded[row, : len(p)] = p
        padded[row, len(p) :] = 49  # padding the mask must hide
    cache = KVCache(model.cfg, 2, max_len=16)
    prefill = model(padded, cache=cache)
    cache.advance(torch.tensor(lengths))
    steps = []
    for t in range(5):
        steps.append(model(continuations[:, t : t + 1], cache=cache))
        cache.advance(1)
    steps = torch.cat(steps, dim=1)  # (2, 5, V)
    for row, p in enumerate(prompts):
        alone = model(torch.cat([p, continuations[row]])[None])[0]  # (len + 5, V)
        n = len(p)
        torch.testing.assert_close(prefill[row, :n], alone[:n], rtol=0, atol=1e-5)
        torch.testing.assert_close(steps[row], alone[n:], rtol=0, atol=1e-5)


def test_traced_cached_decoding_gives_weights_over_the_cache():
    model = make(n_kv_head=2)
    ids = torch.randint(0, 50, (2, 6))
    cache = KVCache(model.cfg, 2, max_len=8)
    model(ids[:, :4], cache=cache)
    cache.advance(torch.tensor([4, 2]))  # row 1's prompt was only 2 long
    trace = Trace()
    model(ids[:, 4:6], cache=cache, trace=trace)
    weights = trace.attn_weights[0]
    assert weights.shape == (2, 4, 2, 6)  # S = max(lengths) + T
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 2))
    assert (weights[1, :, 0, 3:] == 0).all()  # row 1, query at position 2 sees positions 0..2
    assert (weights[1, :, 1, 4:] == 0).all()


def test_prepare_positions_and_mask():
    cache = KVCache(ModelConfig(**SMALL), 2, max_len=8)
    cache.advance(torch.tensor([3, 1]))
    pos, mask = cache.prepare(2)
    assert pos.tolist() == [[3, 4], [1, 2]]
    assert mask.shape == (2, 1, 2, 5)
    assert mask[0, 0].int().tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert mask[1, 0].int().tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]]


def test_update_writes_each_row_at_its_own_positions():
    cfg = ModelConfig(**SMALL)
    cache = KVCache(cfg, 2, max_len=8)
    cache.advance(torch.tensor([2, 0]))
    pos, mask = cache.prepare(3)
    k = torch.arange(2 * 4 * 3 * 8, dtype=torch.float32).view(2, 4, 3, 8)
    keys, _ = cache.update(0, k, -k, pos, mask.shape[-1])
    assert keys.shape == (2, 4, 5, 8)
    torch.testing.assert_close(cache.k[0][0, :, 2:5], k[0])
    torch.testing.assert_close(cache.k[0][1, :, 0:3], k[1])
    torch.testing.assert_close(cache.v[0][1, :, 0:3], -k[1])
    assert (cache.k[0][0, :, :2] == 0).all() and (cache.k[1] == 0).all()


def test_layout_and_bookkeeping():
    cfg = ModelConfig(**SMALL, n_kv_head=2)
    cache = KVCache(cfg, 3, max_len=10, dtype=torch.bfloat16)
    assert len(cache.k) == len(cache.v) == 2
    assert cache.k[0].shape == (3, 2, 10, 8) and cache.k[0].dtype == torch.bfloat16
    assert cache.lengths.dtype == torch.int64
    cache.advance(4)
    cache.advance(torch.tensor([1, 0, 2]))
    assert cache.lengths.tolist() == [5, 4, 6]
    cache.truncate(5)
    assert cache.lengths.tolist() == [5, 4, 5]
    cache.truncate(torch.tensor([1, 2, 3]))
    assert cache.lengths.tolist() == [1, 2, 3]
    cache.keep_rows(torch.tensor([2, 0]))
    assert cache.lengths.tolist() == [3, 1] and cache.k[1].shape == (2, 2, 10, 8)
    cache.reset()
    assert cache.lengths.tolist() == [0, 0]


def test_keep_rows_then_decode_matches():
    model = make(n_kv_head=2)
    ids = torch.randint(0, 50, (3, 9))
    cache = KVCache(model.cfg, 3, max_len=9)
    model(ids[:, :6], cache=cache)
    cache.advance(6)
    cache.keep_rows(torch.tensor([2, 0]))  # row 1 finished; the others go on, in a new order
    steps = []
    for t in range(6, 9):
        steps.append(model(ids[[2, 0], t : t + 1], cache=cache))
        cache.advance(1)
    torch.testing.assert_close(torch.cat(steps, 1), model(ids[[2, 0]])[:, 6:], rtol=0, atol=1e-5)


def test_truncate_reuses_a_prefix():
    """Roll back to a shared prefix, feed a different ending: same as running the new text."""
    model = make()
    first = torch.randint(0, 50, (1, 10))
    second = torch.cat([first[:, :6], torch.randint(0, 50, (1, 4))], dim=1)
    cache = KVCache(model.cfg, 1, max_len=12)
    model(first, cache=cache)
    cache.advance(10)
    cache.truncate(6)
    logits = model(second[:, 6:], cache=cache)
    torch.testing.assert_close(logits, model(second)[:, 6:], rtol=0, atol=1e-5)


def test_bounds():
    model = make()
    with pytest.raises(ConfigError, match="context_len=32"):
        KVCache(model.cfg, 1, max_len=33)
    cache = KVCache(model.cfg, 1, max_len=8)
    model(torch.zeros(1, 6, dtype=torch.long), cache=cache)
    cache.advance(6)
    with pytest.raises(PellucidError, match="context length exceeded") as err:
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
    assert "\n" not in str(err.value)
    assert cache.lengths.tolist() == [6]
    with pytest.raises(PellucidError, match="holds 8"):
        cache.advance(3)
    with pytest.raises(PellucidError, match="batch of 2 rows"):
        model(torch.zeros(2, 1, dtype=torch.long), cache=cache)
    with pytest.raises(PellucidError, match="negative"):
        cache.truncate(-1)
