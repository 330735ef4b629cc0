"""Weight-only quantization: packing, the numba kernels, and the quality guard on SmolLM2."""

import dataclasses
import logging
import math
import weakref

import gguf
import numpy as np
import pytest
import torch
from test_gguf_weights import CFG as GGUF_CFG
from test_gguf_weights import _reference_weights, _write

from pellucid.errors import ConfigError
from pellucid.infer.engine import Engine
from pellucid.infer.quant import BLOCK, KIND, QuantLinear, dequantize, pack, quantize_model
from pellucid.infer.sampling import SamplingParams
from pellucid.model.config import PRESETS
from pellucid.model.transformer import Transformer


@pytest.fixture(scope="module")
def linear():
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 40, bias=True)
    with torch.no_grad():
        lin.weight[3] = 0.0  # an all-zero row must not divide by zero
    return lin


def test_q8_blocks_by_hand():
    w = torch.zeros(1, 32)
    w[0, :4] = torch.tensor([1.27, -0.635, 0.01, 0.0])
    kind, q, s, _ = pack(w, "q8")
    assert kind == KIND["q8"] and s[0, 0] == pytest.approx(0.01)
    assert q.view(np.int8)[0, :4].tolist() == [127, -64, 1, 0]  # round(-63.5) = -64 (half to even)


def test_q4_blocks_by_hand_and_nibble_layout():
    w = torch.arange(32, dtype=torch.float32)[None] / 31 * 15 + 2.0  # min 2, max 17: d = 1
    w = torch.cat([w, 20 - w], dim=1)  # a second block, its elements in the other order
    _, p, d, m = pack(w, "q4")
    assert d[0].tolist() == pytest.approx([1.0, 1.0]) and m[0].tolist() == pytest.approx([2, 3])
    q = [round(v) for v in (w[0, :32] - 2).tolist()] + [round(v) for v in (w[0, 32:] - 3).tolist()]
    # GGUF's byte j of a block holds element j (low nibble) and j + 16 (high); the kernels' order
    # puts bytes 0-7 of every block first, then bytes 8-15 of every block
    gguf_bytes = [q[32 * b + j] | (q[32 * b + j + 16] << 4) for b in (0, 1) for j in range(16)]
    assert p[0].tolist() == gguf_bytes[0:8] + gguf_bytes[16:24] + gguf_bytes[8:16] + gguf_bytes[24:]
    want = torch.tensor(q, dtype=torch.float32) + torch.tensor([2.0, 3.0]).repeat_interleave(32)
    torch.testing.assert_close(dequantize((KIND["q4"], p, d, m))[0], want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["q8", "q4"])
@pytest.mark.parametrize("rows", [1, 3, 8, 40])
def test_kernels_equal_the_dequantized_matmul(linear, mode, rows):
    ql = QuantLinear(linear, mode)
    x = torch.randn(rows, 96)
    want = torch.nn.functional.linear(x, ql.dequantize(), linear.bias)
    torch.testing.assert_close(ql(x), want, atol=1e-4, rtol=1e-4)
    assert ql(x[None]).shape == (1, rows, 40)


@pytest.mark.parametrize("rows", [4, 8, 13])
def test_q4_row_groups_across_tiles_equal_the_dequantized_matmul(rows):
    """K = 640: a row's Q4 inputs fill one whole tile of the group kernel (kernels.TILE bytes per
    half) and part of a second; 13 rows run as a group of 8, a group of 4 and one row alone."""
    from pellucid.infer import kernels

    assert 640 // 4 > kernels.TILE > 640 // 8
    torch.manual_seed(1)
    lin = torch.nn.Linear(640, 24, bias=False)
    ql = QuantLinear(lin, "q4")
    x = torch.randn(rows, 640)
    want = x @ ql.dequantize().T
    torch.testing.assert_close(ql(x), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("mode", "tol"), [("q8", 0.01), ("q4", 0.1)])
def test_quantization_error_is_small(linear, mode, tol):
    w = linear.weight.detach()
    err = (QuantLinear(linear, mode).dequantize() - w).abs().max()
    assert err <= tol * w.abs().max()


def test_requantizing_q4_weights_is_exact():
    # weights already on a q4 grid (what a Q4_1 GGUF dequantizes to) come back unchanged
    torch.manual_seed(1)
    q = torch.randint(0, 16, (8, 64)).float()
    q[:, ::32] = 0
    q[:, 1::32] = 15
    d, m = torch.rand(8, 2, 1) + 0.1, torch.randn(8, 2, 1)
    w = (q.view(8, 2, 32) * d + m).view(8, 64)
    lin = torch.nn.Linear(64, 8, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    torch.testing.assert_close(QuantLinear(lin, "q4").dequantize(), w, atol=1e-5, rtol=1e-5)


def test_quantize_model_swaps_every_linear_and_keeps_the_head_8_bit():
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(PRESETS["tiny"], n_embd=64, vocab_size=256)).eval()
    ids = torch.randint(0, 256, (2, 10))
    ref = model(ids)
    n = model.num_params()
    quantize_model(model, "q4")
    assert model.num_params() == n  # quantized weights still count, a tied head once
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert model.lm_head.mode == "q8" and model.blocks[0].mlp.down_proj.mode == "q4"
    attn = model.blocks[0].attn
    assert attn.q_proj.fused is attn.k_proj.fused is attn.v_proj.fused  # one matrix, one call
    assert model.blocks[0].mlp.gate_proj.fused.mode == "q4"
    out = model(ids)
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8
    with pytest.raises(ConfigError, match="unknown quantization"):
        quantize_model(model, "q3")


def test_fused_parts_equal_separate_projections_and_never_go_stale():
    torch.manual_seed(0)
    lins = [torch.nn.Linear(64, n) for n in (32, 16, 16)]
    from pellucid.infer.quant import FusedPart

    fused = QuantLinear(lins, "q8")
    parts = [FusedPart(fused, a, b) for a, b in ((0, 32), (32, 48), (48, 64))]
    for _ in range(2):
        x = torch.randn(1, 3, 64)  # a new input each time: the shared product must follow it
        for lin, part in zip(lins, parts, strict=True):
            torch.testing.assert_close(part(x), QuantLinear(lin, "q8")(x), atol=1e-5, rtol=1e-5)


def test_fused_parts_let_go_of_their_input_and_product_once_all_have_read_them():
    """A prefill's fused products are large: held after the forward (until the layer's next
    call), a 4,096-token prefill of SmolLM2 kept 2.4 GB of them."""
    from pellucid.infer.quant import FusedPart

    fused = QuantLinear([torch.nn.Linear(64, 32), torch.nn.Linear(64, 16)], "q8")
    parts = [FusedPart(fused, 0, 32), FusedPart(fused, 32, 48)]
    x = torch.randn(40, 64)  # 40 rows: the BLAS path, as in a prefill
    first = parts[0](x)
    product = weakref.ref(first._base)  # the whole (40, 48) product the parts slice
    second = parts[1](x)
    assert second._base is first._base  # computed once
    seen = weakref.ref(x)
    del x, first, second
    assert seen() is None and product() is None


def test_cached_decoding_with_quantized_weights_matches_uncached():
    torch.manual_seed(0)
    model = quantize_model(
        Transformer(dataclasses.replace(PRESETS["tiny"], vocab_size=256)).eval(), "q8"
    )
    engine = Engine(model, None)
    params = SamplingParams(temperature=0, max_new_tokens=12)
    ids = engine.complete([5, 6, 7], params).ids
    seq = [5, 6, 7]
    for _ in range(12):  # uncached: the whole sequence every step, through the BLAS path
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert ids == seq[3:]


def test_bad_shapes_are_refused():
    with pytest.raises(ConfigError, match="multiple of 32"):
        QuantLinear(torch.nn.Linear(40, 8), "q8")
    assert BLOCK == 32


# --- the default: a GGUF file's own blocks ----------------------------------------------------


def _modes(model):
    return {n: m.mode for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def _logits(model, seed=0):
    ids = torch.randint(
        0, GGUF_CFG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(seed)
    )
    with torch.inference_mode():
        return torch.cat([model(ids[:, :8])[:, -1], model(ids[:, 8:])[:, -1]])  # many rows, few


@pytest.mark.parametrize(
    ("qtype", "kind"), [("Q4_0", "q4"), ("Q4_1", "q4"), ("Q8_0", "q8"), ("Q4_K", "f32")]
)
def test_default_runs_the_files_own_blocks(tmp_path, qtype, kind):
    """Each matrix keeps its file's format (K-quants: their exact dequantized values), so the
    default model is the file's model: same weights bit for bit, same logits to float rounding."""
    from pellucid.weights.gguf import load_gguf

    _write(tmp_path / "m.gguf", _reference_weights(), gguf.GGMLQuantizationType[qtype])
    fp32 = load_gguf(tmp_path / "m.gguf").eval()
    model = quantize_model(load_gguf(tmp_path / "m.gguf").eval(), "auto")
    assert set(_modes(model).values()) == {kind}
    assert not hasattr(model, "file_blocks")  # the file's map is let go
    state = fp32.state_dict()
    assert torch.equal(
        model.blocks[0].mlp.down_proj.dequantize(), state["blocks.0.mlp.down_proj.weight"]
    )
    torch.testing.assert_close(_logits(model), _logits(fp32), atol=2e-5, rtol=1e-5)


def test_default_requantizes_only_what_is_not_the_files_any_more(tmp_path):
    from pellucid.weights.gguf import load_gguf

    _write(tmp_path / "m.gguf", _reference_weights(), gguf.GGMLQuantizationType.Q4_1)
    model = load_gguf(tmp_path / "m.gguf").eval()
    with torch.no_grad():  # e.g. a LoRA merged into the loaded weights
        model.blocks[0].attn.o_proj.weight.mul_(1.01)
    modes = _modes(quantize_model(model, "auto"))
    assert modes.pop("blocks.0.attn.o_proj") == "q8" and set(modes.values()) == {"q4"}
    _write(tmp_path / "f.gguf", _reference_weights())  # float tensors: quantized as any float model
    assert set(_modes(quantize_model(load_gguf(tmp_path / "f.gguf"), "auto")).values()) == {"q8"}


@pytest.mark.slow
def test_default_equals_the_files_model_on_smollm2(real_home):
    """The shipped Q4_1 file: through the engine (prefill, then decode steps on the kernels), the
    top-5 next-token logprobs of the default mode are within 2e-3 of the fp32-dequantized model's."""
    from pellucid.tokenizer.formats import load_tokenizer
    from pellucid.weights.gguf import load_gguf, smollm2_gguf_path

    path = smollm2_gguf_path()
    tok = load_tokenizer(path)
    prompts = [
        tok.encode(p) for p in ("The capital of France is", "def fibonacci(n):", "Once upon a time")
    ]
    params = SamplingParams(temperature=0, max_new_tokens=12, top_logprobs=5)
    fp32 = load_gguf(path).eval()
    model = quantize_model(load_gguf(path).eval(), "auto")
    assert set(_modes(model).values()) == {"q4", "q8"}  # Q4_1 matrices, the Q8_0 (tied) head
    engine = Engine(model, tok)
    assert engine._fast is not None
    worst = 0.0
    for prompt, steps in zip(
        prompts, [engine.complete(p, params).steps for p in prompts], strict=True
    ):
        ids = prompt + [s.id for s in steps]
        with torch.inference_mode():
            ref = torch.log_softmax(fp32(torch.tensor([ids]))[0, len(prompt) - 1 : -1], -1)
        for step, want in zip(steps, ref, strict=True):
            top = want.topk(5)
            assert step.id == top.indices[0]  # greedy: fp32's first choice
            got = torch.tensor([lp for _, lp in step.top])  # ours, best first
            worst = max(worst, float((got - top.values).abs().max()))
    print(f"largest top-5 logprob difference from fp32: {worst:.2e}")
    assert worst <= 2e-3


@pytest.mark.slow
def test_quality_guard_on_smollm2(real_home):
    """Each fast mode: greedy text equals fp32's for 32 tokens on most of 16 prompts, and the
    perplexity on held-out text is within 2% (q8) / 5% (q4) of fp32's."""
    from pellucid.data.sources import load_corpus
    from pellucid.tokenizer.formats import load_tokenizer
    from pellucid.weights.gguf import load_gguf, smollm2_gguf_path

    path = smollm2_gguf_path()
    tok = load_tokenizer(path)
    prompts = [
        "The capital of France is",
        "def fibonacci(n):",
        "Once upon a time",
        "The three laws of",
        "In 1492, Columbus",
        "Water boils at",
        "My favourite recipe for",
        "import numpy as np\n",
        "The mitochondria is",
        "To be, or not to be,",
        "The quick brown fox",
        "Photosynthesis is",
        "List of prime numbers: 2, 3, 5,",
        "Dear Sir or Madam,",
        "The stock market",
        "SELECT * FROM",
    ]
    text = "".join(d.text for d in load_corpus("shakespeare"))[-20_000:]
    ids = torch.tensor([tok.encode(text)[:1024]])

    def run(mode):
        model = quantize_model(load_gguf(path).eval(), mode)
        params = SamplingParams(temperature=0, max_new_tokens=32)
        outs = [[] for _ in prompts]
        for steps in Engine(model, tok).generate([tok.encode(p) for p in prompts], params):
            for step in steps:  # batched decoding: one step per unfinished row
                outs[step.row].append(step.id)
        with torch.inference_mode():
            nll = torch.nn.functional.cross_entropy(model(ids[:, :-1])[0], ids[0, 1:])
        return outs, math.exp(nll.item())

    ref, ppl = run("fp32")
    fp32 = load_gguf(path).eval()
    for mode, limit in (("q8", 0.02), ("q4", 0.05)):
        outs, p = run(mode)
        same = sum(a == b for a, b in zip(outs, ref, strict=True))
        print(
            f"{mode}: {same}/16 greedy outputs equal fp32's for 32 tokens; ppl {p:.4f} vs {ppl:.4f}"
        )
        assert same > 8, f"{mode}: only {same}/16 greedy outputs equal fp32's"
        assert abs(p / ppl - 1) <= limit, f"{mode}: perplexity {p:.3f} vs fp32 {ppl:.3f}"
        for prompt, a, b in zip(prompts, outs, ref, strict=True):
            if a == b:
                continue
            # where they part, fp32's own top two must be nearly tied: a wrong top token is not
            i = next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
            with torch.inference_mode():
                logits = fp32(torch.tensor([tok.encode(prompt) + b[:i]]))[0, -1]
            top2 = logits.topk(2).values
            assert top2[0] - top2[1] < 0.5, (
                f"{mode} differs at a clear fp32 choice: {prompt!r} step {i}"
            )


def test_weights_changed_after_loading_run_as_q8_and_are_reported_in_one_line(tmp_path, caplog):
    # A merged LoRA adapter changes every matrix: the log once held one line per matrix (210
    # for SmolLM2) before the first token.
    from pellucid.weights.gguf import load_gguf

    _write(tmp_path / "m.gguf", _reference_weights(), gguf.GGMLQuantizationType.Q4_0)
    model = load_gguf(tmp_path / "m.gguf").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("blocks.") and p.dim() == 2:
                p.add_(0.01)
    with caplog.at_level(logging.INFO, logger="pellucid"):
        modes = _modes(quantize_model(model, "auto"))
    changed = [r for r in caplog.records if "changed after loading" in r.getMessage()]
    assert len(changed) == 1 and changed[0].getMessage().endswith(", ...")
    assert {m for n, m in modes.items() if n.startswith("blocks.")} == {"q8"}
