"""Chat (infer/conversation.py and `pellucid chat`), `generate --chat/--json` and `export`, on a
tiny random Llama saved as GGUF / HF with a ChatML tokenizer (see test_resolve.py)."""

import io
import json
import re

import gguf
import pytest
import torch
from test_resolve import CFG, TEMPLATE, tiny_model, tiny_tokenizer

from pellucid.cli import main
from pellucid.errors import PellucidError
from pellucid.infer.conversation import Conversation, stop_token_ids
from pellucid.infer.engine import Engine
from pellucid.infer.sampling import SamplingParams
from pellucid.tokenizer.chat import ChatTemplate
from pellucid.weights.gguf import gguf_names, save_gguf
from pellucid.weights.hf import save_hf
from pellucid.weights.resolve import load

GREEDY = SamplingParams(temperature=0, max_new_tokens=6, stop_token_ids=[2])


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(), tiny_tokenizer()


@pytest.fixture
def gguf_file(tmp_path, tiny):
    model, tok = tiny
    return save_gguf(model, tmp_path / "tiny.gguf", tokenizer=tok, chat_template=TEMPLATE)


def _chat(tiny, system=None):
    model, tok = tiny
    return Conversation(Engine(model, tok), ChatTemplate(TEMPLATE), system=system)


# --- the conversation ------------------------------------------------------------------------


def test_second_turn_prefills_only_the_new_tokens(tiny):
    model, tok = tiny
    chat = _chat(tiny, system="Be brief.")
    deltas = []
    first = chat.say("Paris is the capital", GREEDY, on_text=deltas.append)
    assert first.completion.timing.prefill_tokens == first.prompt_tokens  # nothing cached yet
    assert "".join(deltas) == first.completion.text and len(deltas) > 1  # streamed
    second = chat.say("of France", GREEDY)
    held = first.prompt_tokens + len(first.completion.ids) - 1  # the last token is not yet fed
    new = second.prompt_tokens - held
    assert second.completion.timing.prefill_tokens == new
    # what the model was shown is exactly the rendered conversation ...
    rendered = ChatTemplate(TEMPLATE).render(chat.messages[:-1])
    seen = tok.decode(first.completion.prompt_ids + first.completion.ids)
    assert rendered.startswith(seen)
    # ... of which only what the template added after the first reply (+ that reply's last
    # token, never fed) was prefilled
    assert new == 1 + len(tok.encode(rendered[len(seen) :], allowed_special="all"))
    assert new < second.prompt_tokens / 2
    assert tok.decode(second.completion.prompt_ids) == rendered
    # ... and reusing the cache changes nothing: a fresh engine gives the same reply
    fresh = Engine(model, tok).complete(second.completion.prompt_ids, GREEDY)
    assert fresh.ids == second.completion.ids
    chat.reset()
    assert chat.messages == [{"role": "system", "content": "Be brief."}]
    again = chat.say("Paris is the capital", GREEDY)
    assert again.completion.ids == first.completion.ids
    assert again.completion.timing.prefill_tokens == again.prompt_tokens


def test_context_overflow_drops_the_oldest_turns_and_says_which(tiny):
    chat = _chat(tiny, system="Sys")
    params = SamplingParams(temperature=0, max_new_tokens=8, stop_token_ids=[2])
    heard = []
    turns = [
        chat.say(f"message {i}: the quick brown fox", params, on_drop=heard.append)
        for i in range(6)
    ]
    dropped = [t.dropped for t in turns if t.dropped]
    assert dropped and heard == dropped  # told before the reply, and the same messages
    assert dropped[0][0] == {"role": "user", "content": "message 0: the quick brown fox"}
    assert chat.messages[0] == {"role": "system", "content": "Sys"}
    assert chat.messages[1]["role"] == "user"  # still alternating after the cut
    assert all(t.prompt_tokens + 8 <= CFG.context_len for t in turns)
    with pytest.raises(PellucidError, match=r"too long.*context of 96"):
        chat.say("fox " * 200, params)
    assert chat.messages[-1]["role"] == "assistant"  # the refused message is not kept


def test_stop_token_ids_are_eos_and_end_of_turn_tokens(tiny):
    _, tok = tiny
    assert stop_token_ids(tok) == [0, 2]  # <|endoftext|>, <|im_end|> (also EOS)


# --- `pellucid chat` with piped stdin --------------------------------------------------------


def _run_chat(monkeypatch, capsys, lines, *args):
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(f"{line}\n" for line in lines)))
    code = main(["chat", *args, "--temperature", "0", "--max-new-tokens", "6", "--stats"])
    out, err = capsys.readouterr()
    return code, out, err


def test_chat_cli_multi_turn_reset_and_exit(monkeypatch, capsys, gguf_file, tiny):
    lines = ["Paris is the capital", "of France", "/reset", "Paris is the capital", "/exit", "x"]
    code, out, err = _run_chat(monkeypatch, capsys, lines, "--model", str(gguf_file))
    assert code == 0
    stats = re.findall(r"prompt (\d+) tokens, prefilled (\d+) \((\d+) reused", err)
    assert len(stats) == 3  # three turns; "x" after /exit is never read
    (p1, f1, r1), (p2, f2, r2), (p3, f3, r3) = [tuple(map(int, s)) for s in stats]
    # turn 2 reuses the first prompt and reply from the cache; after /reset nothing is reused
    assert r1 == 0 and f1 == p1 and r2 > p1 and f2 + r2 == p2 and (p3, f3, r3) == (p1, p1, 0)
    assert "[conversation reset]" in err and "/reset starts over" in err
    replies = out.splitlines()
    assert len(replies) == 3 and replies[0] == replies[2]  # after /reset: the same first answer
    chat = _chat(tiny)
    assert (
        replies[0]
        == chat.say(
            "Paris is the capital", SamplingParams(**{**vars(GREEDY), "stop_token_ids": [0, 2]})
        ).completion.text
    )


def test_chat_cli_says_what_it_dropped_when_the_context_is_full(monkeypatch, capsys, gguf_file):
    lines = [f"turn {i}: the quick brown fox jumps" for i in range(6)]
    code, _, err = _run_chat(monkeypatch, capsys, [*lines, "fox " * 200], "--model", str(gguf_file))
    assert code == 0
    assert (
        "no longer fits the 96-token context: dropped the 2 oldest messages (user 'turn 0:" in err
    )
    assert "pellucid: the message is too long" in err  # one line, and the chat goes on


def test_chat_cli_system_prompt_is_rendered(monkeypatch, capsys, gguf_file, tiny):
    code, _, err = _run_chat(
        monkeypatch, capsys, ["hi"], "--model", str(gguf_file), "--system", "Sys"
    )
    assert code == 0
    _, tok = tiny
    want = ChatTemplate(TEMPLATE).encode(
        tok, [{"role": "system", "content": "Sys"}, {"role": "user", "content": "hi"}]
    )
    assert f"prompt {len(want)} tokens" in err


# --- `pellucid generate` on every kind of spec ------------------------------------------------


def _generate_json(capsys, *args):
    assert main(["generate", *args, "--json", "--temperature", "0", "--max-new-tokens", "5"]) == 0
    return json.loads(capsys.readouterr().out)


def test_generate_raw_and_chat_prompts_on_gguf_and_hf(tmp_path, capsys, gguf_file, tiny):
    model, tok = tiny
    hf_dir = save_hf(model, tmp_path / "hf", tokenizer=tok, chat_template=TEMPLATE)
    messages = [{"role": "system", "content": "Sys"}, {"role": "user", "content": "The fox"}]
    chat_ids = ChatTemplate(TEMPLATE).encode(tok, messages)
    outputs = []
    for spec in (gguf_file, hf_dir):
        raw = _generate_json(capsys, "The fox", "--model", str(spec), "--top-logprobs", "3")
        assert raw["prompt_ids"] == tok.encode("The fox")
        step = raw["steps"][0]
        assert set(step) >= {"id", "logprob", "top"} and len(step["top"]) == 3
        assert step["top"][0]["id"] == step["id"]  # greedy takes the best
        assert set(raw["timing"]) >= {"prefill_tokens_per_s", "decode_tokens_per_s"}
        chat = _generate_json(capsys, "The fox", "--model", str(spec), "--chat", "--system", "Sys")
        assert chat["prompt_ids"] == chat_ids and len(chat["steps"][0]["top"]) == 5
        outputs.append((raw["ids"], chat["ids"]))
    assert outputs[0] == outputs[1]  # the same model either way
    assert main(["generate", "x", "--model", str(gguf_file), "--system", "S"]) == 2
    assert "--system needs --chat" in capsys.readouterr().err


# --- `pellucid export` -----------------------------------------------------------------------


@pytest.mark.parametrize("qtype", ["f32", "f16", "q8_0"])
def test_export_gguf_reads_back_with_tokenizer_and_template(
    tmp_path, capsys, gguf_file, tiny, qtype
):
    model, tok = tiny
    out = tmp_path / f"out-{qtype}.gguf"
    assert (
        main(
            [
                "export",
                "--model",
                str(gguf_file),
                "--format",
                "gguf",
                "--qtype",
                qtype,
                "--out",
                str(out),
            ]
        )
        == 0
    )
    said = capsys.readouterr()
    assert "wrote" in said.out
    # Libraries' INFO lines stay out of pellucid's log (gguf's writer says "Little Endian only").
    assert "Endian" not in said.err
    back = load(out)
    assert back.tokenizer.encode("The quick fox") == tok.encode("The quick fox")
    assert back.template.source == TEMPLATE
    ids = torch.tensor([tok.encode("The quick brown fox")])
    with torch.no_grad():
        a, b = model(ids), back.model(ids)
    assert (
        float((a - b).abs().max() / a.abs().max())
        <= {"f32": 0, "f16": 1e-3, "q8_0": 0.1}[qtype]  # Q8_0 noise
    )
    reader = gguf.GGUFReader(out)
    assert {t.name for t in reader.tensors} == set(gguf_names(CFG).values())
    assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == 2


@pytest.mark.parity
def test_export_hf_loads_in_transformers_with_same_logits_and_tokenizer(
    tmp_path, capsys, gguf_file, tiny
):
    transformers = pytest.importorskip("transformers")
    model, tok = tiny
    assert (
        main(["export", "--model", str(gguf_file), "--format", "hf", "--out", str(tmp_path / "hf")])
        == 0
    )
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.tensor([tok.encode("The quick brown fox")])
    with torch.no_grad():
        a, b = model(ids), theirs(ids).logits.float()
    assert float((a - b).abs().max() / b.abs().max()) < 1e-5
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "Paris is the capital of France! 42"
    assert hf_tok.encode(text) == tok.encode(text)
    assert hf_tok.eos_token == "<|im_end|>"
    messages = [{"role": "user", "content": "hi"}]
    assert hf_tok.apply_chat_template(messages, tokenize=False) == ChatTemplate(TEMPLATE).render(
        messages, add_generation_prompt=False
    )


def test_interrupted_reply_withdraws_its_message_and_the_chat_goes_on(tiny):
    chat = _chat(tiny)
    first = chat.say("Paris is the capital", GREEDY)

    def interrupt(text):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        chat.say("of France", GREEDY, on_text=interrupt)
    assert [m["role"] for m in chat.messages] == ["user", "assistant"]
    turn = chat.say("of France", GREEDY)  # as if the interrupted one never happened
    fresh = _chat(tiny)
    fresh.say("Paris is the capital", GREEDY)
    assert turn.completion.ids == fresh.say("of France", GREEDY).completion.ids
    assert first.completion.ids


def test_nonfinite_weights_refused_unless_allowed(tmp_path, capsys, tiny):
    _, tok = tiny
    broken = tiny_model()
    with torch.no_grad():
        broken.blocks[0].mlp_norm.weight[3] = float("nan")
    path = save_gguf(broken, tmp_path / "nan.gguf", tokenizer=tok)
    args = ["generate", "hi", "--model", str(path), "--max-new-tokens", "2"]
    args += ["--temperature", "0"]
    assert main(args) == 2
    errors = [x for x in capsys.readouterr().err.splitlines() if x.startswith("pellucid: error:")]
    assert len(errors) == 1 and "'blocks.0.mlp_norm.weight' has 1 NaN/Inf" in errors[0]
    assert main([*args, "--allow-nonfinite"]) == 2  # loads, but a NaN model has no next token
    assert "produced NaN logits" in capsys.readouterr().err
