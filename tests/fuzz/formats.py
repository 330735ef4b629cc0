"""The fuzzed formats: for each, where its valid file lies in the seed folders, how it is mutated,
and the target, the library path that reads it as a user's command would (load a model, read a
tokenizer, resume a run, read a config or a data file).

`make_seeds(root)` writes the valid files once: a tiny model as a Hugging Face folder (config.json,
tokenizer.json, tokenizer_config.json with a chat template, model.safetensors), as a GGUF file, as a
training run with one resumable checkpoint (manifest.json, state.json), a run config and key=value
lists, and SFT and preference JSONL.
"""

import dataclasses
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import finetune_helpers as h
import numpy as np
import torch

from fuzz import mutate
from pellucid import config, finetune, recipes
from pellucid.align.pairs import read_pair_data
from pellucid.data.batches import WindowSampler
from pellucid.data.finetune import encode_lm
from pellucid.data.jsonl import LM_SHAPES, read_jsonl
from pellucid.files import read_json
from pellucid.model.transformer import Transformer
from pellucid.tokenizer.chat import CHATML, ChatTemplate
from pellucid.tokenizer.formats import load_tokenizer_json
from pellucid.train.memory import check_fits
from pellucid.train.objectives import lm_loss
from pellucid.train.trainer import TrainConfig, train
from pellucid.weights.gguf import save_gguf
from pellucid.weights.hf import save_hf
from pellucid.weights.resolve import load

CKPT = "checkpoints/step_000001"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


@dataclass(frozen=True)
class Format:
    """One fuzzed format: the seed folder a case copies, the file in it that gets mutated, the
    mutator, and the target run on the case folder."""

    folder: str
    file: str
    mutate: Callable[[random.Random, bytes], tuple[bytes, str]]
    target: Callable[[Path], object]


def _use_model(folder: Path, spec: str = "") -> None:
    """Load a model as `generate` would, then use its tokenizer and chat template."""
    loaded = load(folder / spec if spec else folder)
    if loaded.tokenizer is not None:
        ids = loaded.chat_template().encode(loaded.tokenizer, MESSAGES)
        loaded.tokenizer.decode(ids)


def _tokenizer(folder: Path) -> None:
    tok = load_tokenizer_json(folder / "tokenizer.json")
    tok.decode(tok.encode("Hello <|im_start|> world\n\n  x"))


def _resume(folder: Path) -> None:
    """Resume the one-checkpoint run for a step, as `train --resume` does."""
    torch.manual_seed(0)
    train(Transformer(h.CFG), lm_loss, _windows(), _train_cfg(max_steps=2), folder, resume=True)


def _run_config(folder: Path) -> None:
    run = config.from_dict(recipes.RunConfig, read_json(folder / "run.json"))
    check_fits(run.model, run.train.batch_size)


def _assignments(path: Path) -> None:
    head, *items = path.read_text("utf-8", "surrogatepass").splitlines()
    if head == "run":
        run = recipes.load_run_config(None, items)
        check_fits(run.model, run.train.batch_size)
    else:
        ft = finetune.load_finetune_config("sft", "m", "d.jsonl", lora=True, assignments=items)
        check_fits(h.CFG, ft.train.batch_size)


def _sft(folder: Path) -> None:
    data = read_jsonl(folder / "sft.jsonl", LM_SHAPES)
    encode_lm(data.records, ChatTemplate(CHATML), h.tokenizer(), 64, False, str(data.path))


def _pairs(folder: Path) -> None:
    read_pair_data(
        str(folder / "pairs.jsonl"), "", held_pairs=False, val_fraction=0.2, seed=0,
        tokenizer=h.tokenizer(), template=ChatTemplate(CHATML), max_len=64,
    )  # fmt: skip


FORMATS: dict[str, Format] = {
    "gguf": Format("gguf", "model.gguf", mutate.mutate_gguf, lambda d: _use_model(d, "model.gguf")),
    "safetensors": Format("hf", "model.safetensors", mutate.mutate_safetensors, _use_model),
    "hf_config": Format("hf", "config.json", mutate.mutate_json, _use_model),
    "tokenizer_json": Format("hf", "tokenizer.json", mutate.mutate_json, _tokenizer),
    "tokenizer_config": Format("hf", "tokenizer_config.json", mutate.mutate_json, _use_model),
    "manifest": Format("run", f"{CKPT}/manifest.json", mutate.mutate_json, _use_model),
    "state": Format("run", f"{CKPT}/state.json", mutate.mutate_json, _resume),
    "run_config": Format("cfg", "run.json", mutate.mutate_json, _run_config),
    "run_kv": Format("cfg", "run.txt", mutate.mutate_kv, lambda d: _assignments(d / "run.txt")),
    "finetune_kv": Format(
        "cfg", "finetune.txt", mutate.mutate_kv, lambda d: _assignments(d / "finetune.txt")
    ),
    "sft_jsonl": Format("data", "sft.jsonl", mutate.mutate_jsonl, _sft),
    "pairs_jsonl": Format("data", "pairs.jsonl", mutate.mutate_jsonl, _pairs),
}

# --- the valid files -------------------------------------------------------------------------------


def _windows() -> WindowSampler:
    tokens = (np.arange(2048) * 7 % h.CFG.vocab_size).astype(np.uint16)
    return WindowSampler(tokens, 2, 16, seed=0)


def _train_cfg(max_steps: int = 1) -> TrainConfig:
    return TrainConfig(
        max_steps=max_steps, batch_size=2, warmup_steps=1, eval_every=0, checkpoint_every=1,
        device="cpu", dtype="float32", progress=False,
    )  # fmt: skip


def make_seeds(root: Path) -> Path:
    """Write every format's valid file under `root` (see the module docstring); returns `root`."""
    tok = h.tokenizer()
    torch.manual_seed(0)
    model = Transformer(h.CFG)
    template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    )
    save_hf(model, root / "hf", tokenizer=tok, chat_template=template)
    (root / "gguf").mkdir(parents=True)
    save_gguf(model, root / "gguf" / "model.gguf", tokenizer=tok, chat_template=template)
    files = {"config.json": json.dumps({"model": config.to_dict(h.CFG)})}
    train(model, lm_loss, _windows(), _train_cfg(), root / "run", files=files)
    (root / "cfg").mkdir()
    run = recipes.RunConfig(model=dataclasses.replace(h.CFG))
    (root / "cfg" / "run.json").write_text(json.dumps(config.to_dict(run)))
    common = [
        "train.batch_size=4",
        "train.max_steps=10",
        "train.betas=[0.9, 0.95]",
        "train.lr=1e-3",
    ]
    run_kv = ["run", "model.preset=tiny", *common, "model.n_layer=2", "data.val_fraction=0.1"]
    ft_kv = ["finetune", *common, "lora.rank=4", "lora.alpha=8", "finetune.max_len=64"]
    (root / "cfg" / "run.txt").write_text("\n".join(run_kv))
    (root / "cfg" / "finetune.txt").write_text("\n".join(ft_kv))
    (root / "data").mkdir()
    rows = h.parity_rows(6, seed=0)
    rows += [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
    ]
    h.write_jsonl(root / "data" / "sft.jsonl", rows)
    pairs = [{"prompt": r["prompt"], "chosen": r["answer"], "rejected": "No."} for r in rows[:6]]
    h.write_jsonl(root / "data" / "pairs.jsonl", pairs)
    return root
