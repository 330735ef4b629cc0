"""Chat templates render exactly as transformers' apply_chat_template renders them."""

import json

import pytest

from pellucid.errors import TokenizerError
from pellucid.tokenizer.chat import CHATML, ChatTemplate, from_gguf_metadata, from_hf_dir

SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)
# Llama-3 style: bos_token, whitespace control by trim/lstrip_blocks, namespace, loop controls.
LLAMA3ISH = """{{ bos_token }}
{% set ns = namespace(n=0) %}
{% for message in messages %}
    {% if message['role'] == 'tool' %}{% continue %}{% endif %}
    {% set ns.n = ns.n + 1 %}
    {{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}
{% endfor %}
{% if add_generation_prompt %}
    {{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{% endif %}
{{ ns.n | tojson }} {{ {'k': '<&>'} | tojson }}{{ eos_token }}"""
STRICT = (
    "{% for m in messages %}{% if m['role'] == 'system' and not loop.first %}"
    "{{ raise_exception('system must come first') }}{% endif %}{{ m['content'] }}|{% endfor %}"
)

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "  Hi  "},
        {"role": "assistant", "content": "Hello! <b>ok</b>"},
        {"role": "tool", "content": "{}"},
        {"role": "user", "content": "Unicode: café 日本 🙂"},
    ],
]


def _hf_tokenizer(template):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", chat_template=template
    )


@pytest.mark.parity
@pytest.mark.parametrize("source", [SMOLLM2, LLAMA3ISH, CHATML, STRICT])
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_matches_transformers(source, conversation, add_generation_prompt):
    messages = CONVERSATIONS[conversation]
    hf = _hf_tokenizer(source)
    expected = hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    ours = ChatTemplate(source, bos_token="<s>", eos_token="</s>")
    assert ours.render(messages, add_generation_prompt=add_generation_prompt) == expected


def test_raise_exception_and_sandbox_become_one_line_errors():
    messages = [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]
    with pytest.raises(TokenizerError, match="system must come first"):
        ChatTemplate(STRICT).render(messages)
    escape = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(TokenizerError, match="chat template failed"):
        ChatTemplate(escape).render(messages[:1])
    with pytest.raises(TokenizerError, match="does not parse"):
        ChatTemplate("{% for %}").render(messages[:1])


@pytest.mark.parametrize(
    "bad",
    [[{"role": "user"}], [{"role": "wizard", "content": "x"}], ["hello"], [{"content": 3}]],
)
def test_bad_messages_rejected(bad):
    with pytest.raises(TokenizerError, match="chat message 0"):
        ChatTemplate(CHATML).render(bad)


def test_templates_from_hf_folder_and_gguf_metadata(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "chat_template": [{"name": "default", "template": SMOLLM2}],
                "bos_token": {"content": "<s>"},
                "eos_token": "</s>",
            }
        )
    )
    t = from_hf_dir(tmp_path)
    assert t == ChatTemplate(SMOLLM2, bos_token="<s>", eos_token="</s>")
    (tmp_path / "chat_template.jinja").write_text(CHATML)
    assert from_hf_dir(tmp_path).source == CHATML
    assert from_hf_dir(tmp_path / "missing") is None

    meta = {
        "tokenizer.chat_template": SMOLLM2,
        "tokenizer.ggml.tokens": ["<unk>", "<|im_start|>", "<|im_end|>"],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
    }
    assert from_gguf_metadata(meta) == ChatTemplate(SMOLLM2, "<|im_start|>", "<|im_end|>")
    assert from_gguf_metadata({**meta, "tokenizer.ggml.eos_token_id": 99}).eos_token == ""
    assert from_gguf_metadata({}) is None


def test_encode_turns_template_specials_into_ids():
    class FakeTokenizer:
        def encode(self, text, allowed_special=frozenset()):
            assert allowed_special == "all"
            return [len(text)]

    messages = [{"role": "user", "content": "Hi"}]
    text = ChatTemplate(CHATML).render(messages)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert ChatTemplate(CHATML).encode(FakeTokenizer(), messages) == [len(text)]


HOSTILE = {
    "repetition": "{{ 'x' * 10**10 }}",
    "list repetition": "{{ ([1] * 10**9)|length }}",
    "filter width": "{{ 'x'|center(10**10) }}",
    "method width": "{{ 'x'.ljust(10**10) }}",
    "power": "{{ 10 ** (10 ** 9) }}",
    "doubling": (
        "{% set ns = namespace(s='xx') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}"
        "{% endfor %}{{ ns.s|length }}"
    ),
    "nested loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "long output": "{% for i in range(90000) %}{{ 'y' * 100 }}{% endfor %}",
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_templates_stop_with_one_line_within_limits(name):
    # A GGUF or tokenizer_config.json is untrusted: these used to exhaust memory or hang for ever.
    import resource
    import time

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.thread_time()  # CPU time: a busy machine's wait is not the render's cost
    with pytest.raises(TokenizerError, match="chat template") as e:
        ChatTemplate(HOSTILE[name]).render([{"role": "user", "content": "hi"}])
    assert "\n" not in str(e.value)
    assert time.thread_time() - start < 5
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 1500


def test_real_templates_render_well_inside_the_limits():
    import time

    long_chat = [{"role": r, "content": "word " * 200} for r in ["user", "assistant"] * 20]
    start = time.thread_time()
    text = ChatTemplate(SMOLLM2).render(long_chat)
    assert len(text) > 40 * 1000 and time.thread_time() - start < 1


def test_the_render_time_limit_counts_cpu_time_not_a_busy_machines_wall_time(monkeypatch):
    """A render preempted for longer than the limit on a loaded machine is not a hostile one
    (the limit was wall-clock time, and honest renders could fail under load)."""
    import time

    from pellucid.tokenizer import chat

    monkeypatch.setattr(chat, "MAX_SECONDS", 0.2)
    # The thread waits 0.3 s without running, as when other processes hold the cores.
    monkeypatch.setattr(chat, "_strftime_now", lambda fmt: time.sleep(0.3) or "2026")
    source = "{{ strftime_now('%Y') }}{% for i in range(600) %}.{% endfor %}"
    assert ChatTemplate(source).render([{"role": "user", "content": "hi"}]) == "2026" + "." * 600


def test_a_non_string_template_is_an_error_not_chatml(tmp_path):
    with pytest.raises(TokenizerError, match="chat_template must be a string"):
        from_gguf_metadata({"tokenizer.chat_template": 42})
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": {"a": 1}}))
    with pytest.raises(TokenizerError, match="chat_template must be a string"):
        from_hf_dir(tmp_path)
