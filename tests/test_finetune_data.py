"""Fine-tuning data (data/jsonl.py, data/finetune.py, ChatTemplate.encode_with_mask).

The loss mask is the guard against nanochat#570 (an SFT loss that silently covered the prompt):
for every data shape, the tokens that carry loss decode to exactly the assistant replies and
their end-of-turn tokens, nothing else.
"""

import json

import pytest
import torch
from finetune_helpers import CFG, tokenizer, write_jsonl

from pellucid.data.batches import IGNORE_INDEX
from pellucid.data.finetune import (
    ExampleSampler,
    collate_packed,
    encode_lm,
    encode_text,
    pack_rows,
    pad_lm,
    pad_text,
)
from pellucid.data.jsonl import drop_overlap, read_jsonl, split
from pellucid.errors import DataError, TokenizerError
from pellucid.model.transformer import Transformer
from pellucid.tokenizer.chat import CHATML, ChatTemplate

# SmolLM2's template: a default system prompt when the conversation brings none.
SMOL = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

ROWS = {
    "chat": [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Is 3 odd?"},
                {"role": "assistant", "content": "yes odd"},
                {"role": "user", "content": "And 4?"},
                {"role": "assistant", "content": "even"},
            ]
        }
    ],
    "instruction": [{"instruction": "Say hello", "input": "to the fox", "output": "hello fox"}],
    "prompt_completion": [{"prompt": "The quick brown", "completion": "fox jumps"}],
    "task": [{"prompt": "Is 12 even or odd?", "answer": "even", "family": "parity"}],
}


def _replies(row):
    if "messages" in row:
        return [m["content"] for m in row["messages"] if m["role"] == "assistant"]
    return [row.get("output") or row.get("completion") or row["answer"]]


@pytest.mark.parametrize("source", [CHATML, SMOL])
@pytest.mark.parametrize("shape", list(ROWS))
def test_only_assistant_tokens_carry_loss(tmp_path, shape, source):
    tok = tokenizer()
    data = read_jsonl(write_jsonl(tmp_path / "d.jsonl", ROWS[shape]))
    assert data.shape == shape
    (enc,) = encode_lm(data.records, ChatTemplate(source), tok, max_len=CFG.context_len)
    batch = pad_lm([enc])
    targets = batch.targets[0]
    # the loss-carrying targets, grouped into runs, decode to each reply + its end-of-turn token
    runs, cur = [], []
    for t in targets.tolist():
        if t == IGNORE_INDEX:
            if cur:
                runs.append(cur)
            cur = []
        else:
            cur.append(t)
    runs += [cur] if cur else []
    assert [tok.decode(r) for r in runs] == [f"{r}<|im_end|>" for r in _replies(ROWS[shape][0])]
    # and the ids are the whole rendered conversation; inputs are all but the last id
    text = ChatTemplate(source).render(data.records[0].messages, add_generation_prompt=False)
    assert tok.decode(list(enc.ids)) == text
    assert batch.inputs[0].tolist() == list(enc.ids[:-1])


def test_a_template_that_rewrites_history_is_refused(tmp_path):
    # renders only the last message: prefixes do not extend one another
    odd = "{{ messages[-1]['content'] }}{% if add_generation_prompt %}>{% endif %}"
    msgs = ROWS["chat"][0]["messages"]
    with pytest.raises(TokenizerError, match="re-renders"):
        ChatTemplate(odd).encode_with_mask(tokenizer(), msgs)


BAD = [
    (b'{"prompt": "a", "answer": "b"}\n{"prompt": "a"\n', 2, "not valid JSON"),
    (b'{"prompt": "a", "answer": "b"}\n\xff\xfe\n', 2, "UTF-8"),
    (b'{"prompt": "a", "answer": "b"}\n\n', 2, "blank line"),
    (b'{"prompt": "a", "answer": 3}\n', 1, "'answer' must be a string"),
    (b'{"prompt": "a", "answer": "b"}\n{"text": "a", "label": "x"}\n', 2, "classification row"),
    (b'{"messages": [{"role": "user", "content": "hi"}]}\n', 1, "end with a non-empty assistant"),
    (b'{"messages": [{"role": "bot", "content": "hi"}]}\n', 1, "messages\\[0\\].role"),
    (b'{"instruction": "a", "output": ""}\n', 1, "'output' is empty"),
    (b'{"foo": 1}\n', 1, "unknown shape"),
    (b"[1, 2]\n", 1, "expected a JSON object"),
    (b"", 0, "empty"),
]


@pytest.mark.parametrize(("content", "line", "why"), BAD)
def test_bad_jsonl_names_the_file_line_and_field(tmp_path, content, line, why):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=why) as err:
        read_jsonl(path)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg
    if line:
        assert f"bad.jsonl:{line}:" in msg


def test_cli_reports_bad_data_in_one_line(tmp_path, capsys):
    from pellucid.cli import main

    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": 1, "answer": "b"}\n')
    assert main(["eval", "--data", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pellucid: error:") and "bad.jsonl:2" in err and "'prompt'" in err


def test_split_is_seeded_and_overlap_with_eval_rows_is_dropped(tmp_path):
    rows = [{"prompt": f"q{i}", "answer": "a"} for i in range(50)]
    data = read_jsonl(write_jsonl(tmp_path / "d.jsonl", rows))
    a, b = split(data.records, 0.2, seed=3), split(data.records, 0.2, seed=3)
    assert a == b and len(a[1]) == 10 and not {r.line for r in a[0]} & {r.line for r in a[1]}
    assert split(data.records, 0.2, seed=4)[1] != a[1]
    held = read_jsonl(
        write_jsonl(tmp_path / "h.jsonl", [*rows[:7], {"prompt": "new", "answer": "x"}])
    )
    kept, dropped = drop_overlap(data.records, held.records)
    assert dropped == 7 and len(kept) == 43


def test_too_long_examples_are_refused_with_a_count_or_truncated(tmp_path):
    tok = tokenizer()
    rows = [{"prompt": "fox " * 60, "answer": "odd"}, {"prompt": "Is 3 odd?", "answer": "yes odd"}]
    data = read_jsonl(write_jsonl(tmp_path / "d.jsonl", rows))
    with pytest.raises(
        DataError, match=r"^d.jsonl: 1 of 2 examples are longer than 40 tokens.*line 1"
    ):
        encode_lm(data.records, ChatTemplate(CHATML), tok, max_len=40, source="d.jsonl")
    # truncation keeps the start; the long row loses its reply entirely and is dropped (logged)
    enc = encode_lm(data.records, ChatTemplate(CHATML), tok, max_len=40, truncate=True)
    assert [e.line for e in enc] == [2] and all(len(e.ids) <= 41 for e in enc)


def test_eval_and_finetune_refuse_too_long_rows_unless_told_to_truncate(tmp_path, capsys):
    from finetune_helpers import base_run

    from pellucid import finetune
    from pellucid.cli import main

    base = base_run(tmp_path / "base")  # context 128
    long_row = {"messages": [{"role": "user", "content": "fox " * 200},
                             {"role": "assistant", "content": "odd"}]}  # fmt: skip
    short = {
        "messages": [
            {"role": "user", "content": "Is 3 odd?"},
            {"role": "assistant", "content": "yes"},
        ]
    }
    path = write_jsonl(tmp_path / "long.jsonl", [short, long_row, short])
    assert main(["eval", "--model", str(base), "--data", str(path), "--json"]) == 2
    err = capsys.readouterr().err
    assert f"{path}: 1 of 3 examples are longer than 127 tokens" in err and "--truncate" in err
    assert main(["eval", "--model", str(base), "--data", str(path), "--json", "--truncate"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 3
    run = finetune.load_finetune_config(
        "sft", str(base), str(path), assignments=["train.max_steps=1", "train.progress=false"]
    )
    with pytest.raises(DataError, match=rf"^{path}: 1 of 2 examples are longer than 128 tokens"):
        finetune.finetune(run, tmp_path / "out")


def test_text_the_tokenizer_cannot_encode_names_its_line(tmp_path):
    from pellucid.tokenizer.bpe import Tokenizer

    tok = tokenizer()
    vocab = list(tok.vocab)
    vocab[vocab.index(b"\x1d")] = b"\x1d" * 5  # a vocabulary without byte 0x1d, like SmolLM2's
    lacking = Tokenizer(vocab, tok.merges, tok.special_tokens, tok.pattern, eos_id=0)
    rows = [{"text": "fine", "label": "ham"}, {"text": "odd\x1d byte", "label": "spam"}]
    data = read_jsonl(write_jsonl(tmp_path / "c.jsonl", rows))
    with pytest.raises(DataError, match=r"^c.jsonl:2: cannot encode .* byte 0x1d"):
        encode_text(data.records, lacking, data.labels, 64, source="c.jsonl")
    chat = [{"prompt": "Is 3 odd?", "answer": "yes"}, {"prompt": "x\x1d", "answer": "no"}]
    data = read_jsonl(write_jsonl(tmp_path / "t.jsonl", chat))
    with pytest.raises(DataError, match=r"^t.jsonl:2: cannot encode"):
        encode_lm(data.records, ChatTemplate(CHATML), lacking, 64, source="t.jsonl")


def test_packing_never_attends_across_examples(tmp_path):
    torch.manual_seed(0)
    tok = tokenizer()
    model = Transformer(CFG).eval()
    make = lambda p: {"prompt": p, "answer": "odd"}  # noqa: E731
    rows_a = [make("Is 3 odd?"), make("Is 12 even or odd?"), make("the quick brown fox")]
    rows_b = [make("Hello there, spam ham ham"), *rows_a[1:]]  # example 1 changed only
    logits = []
    for rows in (rows_a, rows_b):
        data = read_jsonl(write_jsonl(tmp_path / "p.jsonl", rows))
        enc = encode_lm(data.records, ChatTemplate(CHATML), tok, max_len=CFG.context_len)
        (row,) = pack_rows(enc, CFG.context_len)
        assert len(row) == 3
        batch = collate_packed([row])
        n1 = len(enc[0].ids) - 1
        with torch.no_grad():
            out = model(batch.inputs, segments=batch.segments)[0, n1:]  # examples 2 and 3
        logits.append(out[: sum(len(e.ids) - 1 for e in enc[1:])])
        # each packed example's logits equal the example run alone
        e2 = torch.tensor([enc[1].ids[:-1]])
        with torch.no_grad():
            alone = model(e2)[0]
        torch.testing.assert_close(out[: e2.shape[1]], alone, rtol=1e-5, atol=1e-5)
    # the same up to float summation order (the rows' lengths differ)
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)
    # the control: without segments, example 1 does leak into the others
    with torch.no_grad():
        plain = model(batch.inputs)[0, n1:][: logits[1].shape[0]]
    assert (plain - logits[1]).abs().max() > 1e-2


def test_packed_targets_match_padded_targets(tmp_path):
    tok = tokenizer()
    data = read_jsonl(write_jsonl(tmp_path / "d.jsonl", ROWS["chat"] * 5))
    enc = encode_lm(data.records, ChatTemplate(CHATML), tok, max_len=CFG.context_len)
    rows = pack_rows(enc, CFG.context_len)
    assert 1 < len(rows) < 5 and all(
        sum(len(e.ids) - 1 for e in r) <= CFG.context_len for r in rows
    )
    packed, padded = collate_packed(rows), pad_lm(enc)
    assert packed.n_targets == padded.n_targets  # the same targets, fewer rows
    assert packed.inputs.shape[0] == len(rows) and (packed.segments == 0).any()  # padding: 0


def test_sampler_is_a_function_of_seed_and_step():
    items = list(range(10))
    collate = lambda xs: pad_text([type("E", (), {"ids": (x + 1,), "label": 0})() for x in xs])  # noqa: E731
    a = ExampleSampler(items, 4, seed=1, collate=collate)
    first = [next(a).inputs.flatten().tolist() for _ in range(5)]
    seen = sorted(first[0] + first[1] + first[2][:2])  # one epoch = 10 items, each once
    assert seen == [x + 1 for x in items]
    b = ExampleSampler(items, 4, seed=1, collate=collate)
    b.load_state({"seed": 1, "step": 3})
    assert next(b).inputs.flatten().tolist() == first[3]


def test_long_texts_keep_their_head_and_tail_under_keep_head(tmp_path):
    tok = tokenizer()
    text = " ".join(f"w{i}" for i in range(60))
    data = read_jsonl(write_jsonl(tmp_path / "c.jsonl", [{"text": text, "label": "a"}]))
    full = tok.encode(text)
    assert len(full) > 20
    tail = encode_text(data.records, tok, data.labels, 20, truncate=True)[0].ids
    both = encode_text(data.records, tok, data.labels, 20, truncate=True, keep_head=6)[0].ids
    assert list(tail) == full[-20:]
    assert list(both) == full[:6] + full[-14:]
    with pytest.raises(DataError, match=r"finetune\.keep_head must be in"):
        encode_text(data.records, tok, data.labels, 20, truncate=True, keep_head=20)


def test_grouped_sampler_batches_similar_lengths_and_still_sees_every_item_once():
    lengths = [(7 * i) % 97 + 1 for i in range(400)]  # 400 distinct-ish lengths, shuffled
    collate = lambda xs: xs  # noqa: E731
    plain = ExampleSampler(range(400), 8, seed=3, collate=collate)
    grouped = ExampleSampler(range(400), 8, seed=3, collate=collate, lengths=lengths)
    epoch = [next(grouped) for _ in range(50)]
    assert sorted(i for b in epoch for i in b) == list(range(400))  # one epoch: each item once

    def padding(batches):
        return sum(
            max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches
        )

    assert padding(epoch) < padding([next(plain) for _ in range(50)]) / 10
    resumed = ExampleSampler(range(400), 8, seed=3, collate=collate, lengths=lengths)
    resumed.load_state({"seed": 3, "step": 20})
    assert next(resumed) == epoch[20]


def test_classification_rows_encode_with_labels_and_padding(tmp_path):
    tok = tokenizer()
    rows = [{"text": "spam spam ham", "label": "spam"}, {"text": "hello", "label": 1}]
    data = read_jsonl(write_jsonl(tmp_path / "c.jsonl", rows))
    assert data.labels == ["1", "spam"]
    enc = encode_text(data.records, tok, data.labels, max_len=64)
    right, left = pad_text(enc, "right"), pad_text(enc, "left")
    assert right.targets.tolist() == [1, 0] == left.targets.tolist()
    assert (right.segments.sum(1) == left.segments.sum(1)).all()
    assert left.segments[1, -1] == 1 and right.segments[1, 0] == 1
    json.dumps(data.labels)


@pytest.mark.parametrize("packed", [False, True])
def test_sft_loss_equals_lm_loss(tmp_path, packed):
    from pellucid.train.objectives import lm_loss, sft_loss

    torch.manual_seed(0)
    model = Transformer(CFG).eval()
    data = read_jsonl(write_jsonl(tmp_path / "d.jsonl", ROWS["chat"] * 3))
    enc = encode_lm(data.records, ChatTemplate(CHATML), tokenizer(), max_len=CFG.context_len)
    batch = collate_packed(pack_rows(enc, CFG.context_len)) if packed else pad_lm(enc)
    a, b = lm_loss(model, batch), sft_loss(model, batch)
    assert a.n_targets == b.n_targets > 0
    torch.testing.assert_close(a.loss_sum, b.loss_sum, rtol=1e-5, atol=1e-4)
