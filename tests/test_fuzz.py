"""Issue 16 item 5: the file fuzzer's seeded corpus (tests/fuzz/), and a test for each bug it found.

Every mutated file (structure-aware: wrong types per field, missing keys, huge and negative sizes,
NaN, deep nesting; truncations and byte flips) of every format must end in one PellucidError line,
or still read, within 5 s of CPU and 1 GiB of extra address space: never another exception, a
crash or a hang. 20 cases per format run here; `python bench/fuzz.py --n 500` is the full run.
"""

import json
import struct

import finetune_helpers as h
import pytest
from fuzz import FINE, FORMATS, fuzz, make_seeds
from fuzz.mutate import gguf_fields

from pellucid import config, finetune, recipes
from pellucid.data.jsonl import read_jsonl
from pellucid.errors import ConfigError, DataError, WeightsFormatError
from pellucid.weights.hf import config_from_hf
from pellucid.weights.safety import read_safetensors_header

N_PER_FORMAT = 20


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    return make_seeds(tmp_path_factory.mktemp("fuzz") / "seeds")


@pytest.mark.slow
def test_seeded_corpus_of_every_format_ends_in_one_line_errors(seeds, tmp_path):
    counts, failures = fuzz(list(FORMATS), N_PER_FORMAT, 0, seeds, tmp_path / "work")
    assert not failures, "\n".join(map(str, failures))
    for name, c in counts.items():
        assert sum(c[k] for k in FINE) == N_PER_FORMAT, (name, c)
        assert c["error"] >= N_PER_FORMAT // 4, (name, c)  # the mutations do reach the checks


def test_the_gguf_walk_finds_every_header_field(seeds):
    data = (seeds / "gguf" / "model.gguf").read_bytes()
    fields = gguf_fields(data)
    whats = [w for _, _, w in fields]
    assert whats[:2] == ["tensor count", "metadata count"]
    n_tensors = int.from_bytes(data[8:16], "little")
    assert sum(w.endswith(" offset") for w in whats) == n_tensors
    assert fields[-1][0] + fields[-1][1] <= len(data)


# --- the bugs it found, each one line now --------------------------------------------------------


def _safetensors(tmp_path, header):
    text = json.dumps(header).encode() if isinstance(header, dict) else header
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(8))
    return path


def test_safetensors_dtype_of_the_wrong_type(tmp_path):
    bad = {"w": {"dtype": [1, "a"], "shape": [2], "data_offsets": [0, 8]}}  # was a TypeError
    with pytest.raises(WeightsFormatError, match="tensor 'w' has unknown dtype"):
        read_safetensors_header(_safetensors(tmp_path, bad))


def test_safetensors_shape_whose_size_has_thousands_of_digits(tmp_path):
    bad = {"w": {"dtype": "F32", "shape": [320, 64] * 1000, "data_offsets": [0, 8]}}
    with pytest.raises(WeightsFormatError, match=r"needs more than 10\^30 bytes"):  # ValueError
        read_safetensors_header(_safetensors(tmp_path, bad))


def test_safetensors_header_nested_too_deeply(tmp_path):
    deep = b'{"w": ' + b"[" * 5000 + b"]" * 5000 + b"}"  # was a RecursionError
    with pytest.raises(WeightsFormatError, match="header: JSON nested too deeply"):
        read_safetensors_header(_safetensors(tmp_path, deep))


def test_hf_config_setting_of_the_wrong_type():
    c = {"architectures": ["LlamaForCausalLM"], "hidden_act": [[]]}  # was "unhashable type"
    with pytest.raises(WeightsFormatError, match="field 'hidden_act' must be a string, got a list"):
        config_from_hf(c)


def test_jsonl_line_nested_too_deeply(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "answer": ' + "[" * 5000 + "]" * 5000 + "}\n")
    with pytest.raises(DataError, match=r"d.jsonl:1: JSON nested too deeply"):  # RecursionError
        read_jsonl(path)


def test_list_value_nested_too_deeply():
    with pytest.raises(ConfigError, match=r"'train.betas' expects a list.*nested too deeply"):
        config.override(finetune.FinetuneRun(), ["train.betas=" + "[" * 5000])


def test_preset_assignment_without_equals():
    with pytest.raises(ConfigError, match=r"'model.preset' must look like key=value"):
        recipes.load_run_config(None, ["model.preset"])  # was an IndexError


def test_preference_run_reports_the_pairs_dropped_as_held_out(tmp_path):
    h.base_run(tmp_path / "base")
    rows = [{"prompt": r["prompt"], "chosen": r["answer"], "rejected": "No."}
            for r in h.parity_rows(30, seed=0)]  # fmt: skip
    h.write_jsonl(tmp_path / "pairs.jsonl", rows)
    h.write_jsonl(tmp_path / "held.jsonl", rows[:5])
    run = finetune.load_finetune_config(
        "reward", str(tmp_path / "base"), str(tmp_path / "pairs.jsonl"), lora=True,
        assignments=["train.max_steps=1", "train.progress=false", "train.batch_size=4",
                     f"finetune.eval_data={tmp_path / 'held.jsonl'}"],
    )  # fmt: skip
    finetune.finetune(run, tmp_path / "rm")  # was a TypeError: _Prepared lacked n_dropped
    held = {r["prompt"] for r in rows[:5]}
    assert (
        f"({sum(r['prompt'] in held for r in rows)} dropped"
        in (tmp_path / "rm" / "report.md").read_text()
    )
