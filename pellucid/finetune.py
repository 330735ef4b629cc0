"""Fine-tuning runs: `sft` and `classify` over any model pellucid loads, through the one trainer.

    run = load_finetune_config("sft", "smollm2-135m-instruct", "tasks.jsonl", lora=True,
                               assignments=["train.max_steps=200"])
    result = finetune(run, Path("runs/sft"))

A run config composes `finetune` (FinetuneConfig: split, lengths, packing, held-out data),
`lora` (LoraConfig) and `train` (TrainConfig) around the base model spec and the data file.
The run directory is a model spec like any other (weights/resolve.py loads base + what was
trained) and holds

    config.json  finetune.json  metrics.jsonl  loss.png  report.md  eval.json
    checkpoints/step_*/   (trainable tensors only: LoRA's A and B, or all weights for full)
    adapter/              (LoRA runs: adapter_config.json + adapter.safetensors, the adapter alone)

`--resume RUN_DIR` continues from the newest good checkpoint, bit-exact on the CPU.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from pellucid import config
from pellucid.align.dpo import DPOConfig
from pellucid.data.datasets import resolve_dataset
from pellucid.data.finetune import (
    ExampleSampler,
    collate_packed,
    encode_lm,
    encode_text,
    pack_rows,
    pad_lm,
    pad_text,
)
from pellucid.data.jsonl import LM_SHAPES, Dataset, drop_overlap, read_jsonl, split
from pellucid.data.preferences import is_pairs_file
from pellucid.errors import ConfigError, DataError
from pellucid.files import atomic_write, sha256_file
from pellucid.model.lora import DEFAULT_TARGETS
from pellucid.recipes import config_hash, default_run_dir, run_mfu
from pellucid.train.evaluate import class_metrics, exact_match, lm_metrics
from pellucid.train.memory import check_fits
from pellucid.train.metrics import PLOT_FILE, plot_curves, read_metrics
from pellucid.train.objectives import class_loss, sft_loss
from pellucid.train.precision import autocast, resolve_dtype
from pellucid.train.trainer import TrainConfig, TrainState, seed_everything, train
from pellucid.weights import adapter
from pellucid.weights.checkpoint import read_json
from pellucid.weights.resolve import DEFAULT_MODEL, LoadedModel, load

log = logging.getLogger("pellucid")


@dataclass(kw_only=True)
class FinetuneConfig:
    """What to fine-tune on and how to cut it (the `finetune.*` keys)."""

    val_fraction: float = 0.1  # seeded split of --data; the validation rows never train
    eval_data: str = (
        ""  # a held-out JSONL: rows whose prompt occurs in it are dropped from training
    )
    eval_max: int = 200  # at most this many held-out rows are answered before and after (task data)
    max_new_tokens: int = 64  # reply budget when answering task prompts
    max_len: int = 0  # tokens per example (0: the model's context, capped at 1024)
    truncate: bool = False  # cut longer examples (else they are refused, with a count)
    keep_head: int = 0  # classify, truncate: keep a long text's first N tokens + its end
    group_by_length: bool = False  # batch rows of similar length: less padding (unpacked)
    pack: bool = False  # SFT: several examples per row, block-diagonal attention
    train_last: int = -1  # classify without LoRA: train the head + the last N blocks (-1: all)
    pad_side: Literal["right", "left"] = "right"  # classify: where padding goes


@dataclass(kw_only=True)
class LoraConfig:
    """LoRA settings (the `lora.*` keys); `--lora` sets enabled."""

    enabled: bool = False
    rank: int = 8
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # on the adapter's input
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))  # name patterns


@dataclass(kw_only=True)
class FinetuneRun:
    """A whole fine-tuning run."""

    task: Literal["sft", "classify", "reward", "dpo"] = "sft"
    model: str = DEFAULT_MODEL  # the base: any model spec (loaded in float32)
    data: str = ""  # training JSONL (or a registered dataset name)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)  # task "dpo" only

    def __post_init__(self) -> None:
        """A `finetune.*` key that would shape training, set on a run that never reads it, is
        refused: left to be silently ignored, it would claim a run that did not happen."""
        ft, default = self.finetune, FinetuneConfig()
        for key, tasks in TASK_KEYS.items():
            if getattr(ft, key) != getattr(default, key) and self.task not in tasks:
                raise ConfigError(
                    f"config key 'finetune.{key}' applies to {' and '.join(tasks)} runs, not "
                    f"to this {self.task} run"
                )
        if ft.train_last != default.train_last and self.lora.enabled:
            raise ConfigError("config key 'finetune.train_last' trains whole blocks; with LoRA "
                              "the adapters train instead: use one or the other")  # fmt: skip
        if ft.keep_head and not ft.truncate:
            raise ConfigError("config key 'finetune.keep_head' shapes how long texts are cut: "
                              "it needs finetune.truncate=true")  # fmt: skip


# The `finetune.*` keys that shape what a run trains on and that only some tasks read. (The
# scoring budgets, eval_max and max_new_tokens, are left out: one list of settings may serve runs
# of every task, and an unused budget changes nothing a run learns.)
TASK_KEYS = {
    "pack": ("sft",),
    "keep_head": ("classify",),
    "train_last": ("classify",),
    "pad_side": ("classify",),
    "group_by_length": ("sft", "classify"),
}


# Fine-tuning starts from a trained model: a short warmup, few steps, no weight decay, and a
# learning rate about 10x higher for LoRA's small fresh matrices than for the whole model.
DEFAULTS = [
    "train.max_steps=100", "train.batch_size=8", "train.warmup_steps=10", "train.lr=5e-5",
    "train.min_lr=5e-6", "train.weight_decay=0", "train.eval_every=0",
    "train.checkpoint_every=50", "train.log_every=10", "train.dtype=float32",
]  # fmt: skip
LORA_DEFAULTS = ["lora.enabled=true", "train.lr=1e-3", "train.min_lr=1e-4"]
# DPO pushes log-probability ratios apart with no target to stop at: LoRA at 1e-3 left SmolLM2
# worse than it started in 60 steps (win rate 42%, reply KL 9.3, bits per byte 2.31 -> 3.39), at
# 1e-4 better (59%, KL 1.2; bench/RESULTS.md, "The README's alignment path").
DPO_LORA_DEFAULTS = ["train.lr=1e-4", "train.min_lr=1e-5"]


@dataclass
class FinetuneResult:
    """What a finished run produced."""

    run_dir: Path
    state: TrainState
    before: dict[str, Any]
    after: dict[str, Any]
    params: tuple[int, int]  # (trained, all) parameter counts


def load_finetune_config(
    task: str, model: str | None, data: str, *, lora: bool = False, assignments: list[str] = ()
) -> FinetuneRun:
    """Defaults <- LoRA defaults (with `lora`; DPO's own rate) <- key=value assignments."""
    run = FinetuneRun(task=task, model=model or DEFAULT_MODEL, data=data)
    head = DEFAULTS + (LORA_DEFAULTS if lora else [])
    if lora and task == "dpo":
        head += DPO_LORA_DEFAULTS
    return config.override(run, head + list(assignments))


def _data_path(spec: str) -> Path:
    """A registered dataset name (python-faq, spam, ...) -> its cached file; else the path."""
    return resolve_dataset(spec)


def _base_id(spec: str, loaded: LoadedModel) -> str:
    """How finetune.json names the base: a model name as given, a path made absolute."""
    return str(Path(loaded.source).resolve()) if Path(spec).exists() else spec


def _meta(run: FinetuneRun, base_id: str, base_sha: str, labels: list[str] | None) -> dict:
    lora = run.lora
    return {
        "format": adapter.FORMAT,
        "base": base_id,
        "base_sha256": base_sha,
        "task": run.task,
        "method": "lora" if lora.enabled else "full",
        "lora": dataclasses.asdict(lora) if lora.enabled else None,
        "labels": labels,
        "train_last": run.finetune.train_last,  # -1 unless a classify run without LoRA
    }


@dataclass
class _Prepared:
    """Data and model of a run, ready for the trainer."""

    model: torch.nn.Module
    batches: ExampleSampler
    objective: Any
    evaluate: Any  # model -> validation metrics (None without validation rows)
    scores: Any  # model -> the before/after numbers of the report
    meta: dict
    data: Dataset
    held_out: Dataset | None
    n_train: int
    n_dropped: int  # training rows dropped because their prompt is in the held-out file


def _base(run: FinetuneRun, labels: list[str] | None) -> tuple[LoadedModel, dict, Any]:
    """The base model (float32: training never touches quantized weights), the run's
    finetune.json metadata, and the module tree to train (head, LoRA) built over the base."""
    loaded = load(run.model)
    if loaded.tokenizer is None:
        raise ConfigError(f"model '{run.model}' has no tokenizer; fine-tuning needs one")
    meta = _meta(run, _base_id(run.model, loaded), adapter.spec_sha256(loaded.source), labels)
    seed_everything(run.train.seed)  # LoRA's A and a head are drawn from the run's seed
    return loaded, meta, adapter.build(loaded.model, meta)


def _prepare_pairs(run: FinetuneRun) -> _Prepared:
    """Reward-model and DPO runs (align/): preference pairs, split by prompt."""
    from pellucid.align import dpo, reward
    from pellucid.align.pairs import read_pair_data

    ft = run.finetune
    loaded, meta, model = _base(run, None)
    d = read_pair_data(
        run.data, ft.eval_data, held_pairs=run.task == "reward", val_fraction=ft.val_fraction,
        seed=run.train.seed, tokenizer=loaded.tokenizer, template=loaded.chat_template(),
        max_len=min(ft.max_len or 1024, loaded.model.cfg.context_len), truncate=ft.truncate,
    )  # fmt: skip
    if run.task == "reward":
        parts = reward.prepare(model, d, run.train)
    else:
        parts = dpo.prepare(model, loaded, d, run.train, run.dpo, ft.eval_max)
    return _Prepared(model, *parts, meta, d.data, d.held_out, len(d.train), d.n_dropped)


def _prepare(run: FinetuneRun) -> _Prepared:
    if run.task in ("reward", "dpo"):
        return _prepare_pairs(run)
    ft, seed = run.finetune, run.train.seed
    shapes = LM_SHAPES if run.task == "sft" else ("classification",)
    data = read_jsonl(_data_path(run.data), shapes)
    held = read_jsonl(_data_path(ft.eval_data), shapes) if ft.eval_data else None
    train_rows, val_rows = split(data.records, ft.val_fraction, seed)
    n_dropped = 0
    if held is not None:
        train_rows, n_dropped = drop_overlap(train_rows, held.records)
        log.info("dropped %d training rows that also occur in %s", n_dropped, held.path)
    if not train_rows:
        raise DataError(f"{data.path}: no training rows left after the split")
    labels = data.labels if run.task == "classify" else None
    loaded, meta, model = _base(run, labels)
    tok, template = loaded.tokenizer, loaded.chat_template()
    max_len = min(ft.max_len or 1024, loaded.model.cfg.context_len)
    B = run.train.batch_size
    if run.task == "sft":
        where = str(data.path)
        enc = encode_lm(train_rows, template, tok, max_len, ft.truncate, where)
        val = encode_lm(val_rows, template, tok, max_len, ft.truncate, where) if val_rows else []
        items, collate = (pack_rows(enc, max_len), collate_packed) if ft.pack else (enc, pad_lm)
        objective = sft_loss
        scored = (held.records if held else val_rows)[: ft.eval_max]
        is_task = (held or data).shape == "task"

        def evaluate(m: torch.nn.Module) -> dict[str, float]:
            r = lm_metrics(m, val, B)
            return {
                "val_loss": r["loss"],
                "val_ppl": r["perplexity"],
                "val_bpb": r["bits_per_byte"],
            }

        def scores(m: torch.nn.Module) -> dict[str, Any]:
            out: dict[str, Any] = lm_metrics(m, val, B) if val else {}
            if is_task and scored:
                em = exact_match(m, tok, template, scored, ft.max_new_tokens)
                out["exact_match"], out["n_exact"] = em["exact_match"], em["n"]
                out["answers"] = em["answers"]  # eval.json keeps them, for reading the misses
            return out

    else:
        where, head = str(data.path), ft.keep_head
        enc = encode_text(train_rows, tok, labels, max_len, ft.truncate, where, head)
        val = encode_text(val_rows, tok, labels, max_len, ft.truncate, where, head)
        items, objective = enc, class_loss
        if ft.truncate:  # `eval` cuts texts as training did: the classifier knows no other view
            meta["cut"] = {"max_len": max_len, "keep_head": head}

        def collate(rows: list) -> Any:
            return pad_text(rows, ft.pad_side)

        def evaluate(m: torch.nn.Module) -> dict[str, float]:
            r = class_metrics(m, val, len(labels), B)
            return {"val_accuracy": r["accuracy"], "val_macro_f1": r["macro_f1"]}

        def scores(m: torch.nn.Module) -> dict[str, Any]:
            return class_metrics(m, val, len(labels), B) if val else {}

    packed = ft.pack  # (SFT only) rows of max_len tokens, several examples each
    longest = max_len if packed else max(len(e.ids) for e in enc)
    check_fits(loaded.model.cfg, B, context_len=longest)  # before a batch of B rows is drawn
    lengths = [len(e.ids) for e in items] if ft.group_by_length and not packed else None
    batches = ExampleSampler(items, B, seed, collate, lengths)
    # Without validation rows there is nothing to evaluate during training (it would log NaN).
    return _Prepared(
        model, batches, objective, evaluate if val else None, scores, meta, data, held, len(enc),
        n_dropped,
    )  # fmt: skip


def finetune(
    run: FinetuneRun, out_dir: Path | None = None, *, resume: bool = False
) -> FinetuneResult:
    """Fine-tune `run.model` on `run.data` into `out_dir` (or continue it with `resume`)."""
    run_dir = Path(out_dir) if out_dir is not None else default_run_dir(run.task)
    if not resume and ((run_dir / "checkpoints").exists() or (run_dir / "metrics.jsonl").exists()):
        raise ConfigError(
            f"{run_dir} already holds a run: pass --resume {run_dir} or another --out"
        )
    if not run.data:
        raise ConfigError("fine-tuning needs --data FILE.jsonl")
    t0 = time.perf_counter()  # the report's wall time: loading, scoring and training
    prep = _prepare(run)
    model = prep.model
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    log.info(
        "%s, %s: %d training examples, %s of %s parameters train (%.2f%%)",
        run.task, prep.meta["method"], prep.n_train, f"{n_train:,}", f"{n_all:,}",
        100 * n_train / n_all,
    )  # fmt: skip
    files = {
        "config.json": json.dumps(config.to_dict(run), indent=1) + "\n",
        adapter.META_FILE: json.dumps(prep.meta, indent=1) + "\n",
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        atomic_write(run_dir / name, text)
    eval_file = run_dir / "eval.json"
    if resume and eval_file.is_file():
        before = read_json(eval_file).get("before", {})
    else:
        before = _scored(prep, model, run.train.dtype)
        atomic_write(eval_file, json.dumps({"before": before}, indent=1))
    # Without periodic evaluation the trainer would score the validation rows only at the end,
    # which `after` does below: one full pass over them, not two (minutes on a CPU).
    periodic = run.train.eval_every > 0 or run.train.eval_every_minutes > 0
    state = train(
        model, prep.objective, prep.batches, run.train, run_dir,
        evaluate=prep.evaluate if periodic else None, resume=resume, files=files,
    )  # fmt: skip
    after = _scored(prep, model, run.train.dtype)
    atomic_write(eval_file, json.dumps({"before": before, "after": after}, indent=1))
    wall = time.perf_counter() - t0
    if prep.meta["method"] == "lora":
        adapter.save_adapter(model, prep.meta, run_dir)
    plot_curves(read_metrics(run_dir / "metrics.jsonl"), run_dir / PLOT_FILE)
    write_report(run_dir, run, prep, state, before, after, wall, (n_train, n_all))
    return FinetuneResult(run_dir, state, before, after, (n_train, n_all))


def _scored(prep: _Prepared, model: torch.nn.Module, dtype: str) -> dict[str, Any]:
    """The before/after scores, in the precision the run trains in (`train.dtype`), as the
    trainer's own evaluation is: a bf16 run is scored at bf16 speed."""
    log.info("evaluating on the held-out rows ...")
    device = next(model.parameters()).device
    with torch.no_grad(), autocast(device, resolve_dtype(dtype, device)):
        return prep.scores(model)


def resume(run_dir: Path, assignments: list[str] | None = None) -> FinetuneResult:
    """Continue a fine-tuning run from its newest good checkpoint, with its own config."""
    run = config.from_dict(FinetuneRun, read_json(Path(run_dir) / "config.json"))
    return finetune(config.override(run, assignments or []), run_dir, resume=True)


# --- report --------------------------------------------------------------------------------------


def _fmt(scores: dict[str, Any]) -> str:
    keys = ("exact_match", "accuracy", "macro_f1", "loss", "perplexity", "bits_per_byte",
            "pairwise_accuracy", "margin", "reward_accuracy", "win_rate", "kl")  # fmt: skip
    parts = [f"{k} {scores[k]:.4f}" for k in keys if isinstance(scores.get(k), float)]
    return ", ".join(parts) or "n/a"


def write_report(
    run_dir: Path, run: FinetuneRun, prep: _Prepared, state: TrainState, before: dict,
    after: dict, wall_s: float, counts: tuple[int, int],
) -> None:  # fmt: skip
    """report.md: what was tuned on what, how, and the held-out numbers before and after."""
    meta, ft = prep.meta, run.finetune
    tps = state.tokens / state.train_time_s if state.train_time_s else 0.0
    data_files = [prep.data.path] + ([prep.held_out.path] if prep.held_out else [])
    where = (
        "the held-out file" if prep.held_out else f"the validation split ({ft.val_fraction:.0%})"
    )
    lines = [
        f"# {run_dir.name}: {run.task} ({meta['method']})",
        "",
        "## Result",
        f"- before: {_fmt(before)}",
        f"- after:  {_fmt(after)}  ({state.step} steps; scores on {where})",
        f"- curves: ![loss]({PLOT_FILE}) (per-step numbers in `metrics.jsonl`, scores in `eval.json`)",
        *(
            [
                f"- confusion after (rows: true {meta['labels']}, columns: predicted): {after['confusion']}"
            ]
            if "confusion" in after
            else []
        ),
        "",
        "## Lineage",
        f"- base model: `{meta['base']}` sha256 {meta['base_sha256']}",
        *[f"- data: `{p.resolve()}` sha256 {sha256_file(p)}" for p in data_files],
        f"- {prep.data.shape} rows: {len(prep.data.records)}, {prep.n_train} trained on"
        + (f" ({prep.n_dropped} dropped: also in the held-out file)" if prep.held_out else ""),
        f"- method: {meta['method']}"
        + (
            f" (rank {run.lora.rank}, alpha {run.lora.alpha}, targets {run.lora.targets})"
            if run.lora.enabled
            else ""
        )
        + f"; {counts[0]:,} of {counts[1]:,} parameters trained ({100 * counts[0] / counts[1]:.2f}%)",
        f"- parent checkpoint: {state.resumed_from or 'none'}; last: {state.checkpoint}",
        f"- config sha256: {config_hash(run)}; command: `{' '.join(sys.argv)}`",
        "",
        "## Compute",
        f"- {state.step} steps, {state.tokens:,} tokens in {state.train_time_s:.0f} s of training "
        f"steps; {wall_s:.0f} s wall time in all (loading, scoring before and after, training; "
        "this session)",
        f"- {tps:,.0f} tokens/s on {torch.get_num_threads()} thread(s), {_mfu(state, run.train)}",
        "",
        "## Config",
        f"```json\n{json.dumps(config.to_dict(run), indent=1)}\n```",
        "",
    ]
    if math.isnan(state.last_loss):
        lines.insert(4, "- (no training step was taken)")
    atomic_write(run_dir / "report.md", "\n".join(lines))


def _mfu(state: TrainState, cfg: TrainConfig) -> str:
    mfu = run_mfu(state, cfg)
    if mfu > 1:  # the peak was timed while other processes held the CPU: it came out too low
        return "MFU not measurable here (the matmul peak was timed on a busy machine)"
    return f"MFU {100 * mfu:.1f}% of this machine's measured matmul peak"


# --- pellucid eval -------------------------------------------------------------------------------


def evaluate_file(
    spec: str | None, path: str, *, max_new_tokens: int = 64, batch_size: int = 8, limit: int = 0,
    truncate: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """`pellucid eval`: score model `spec` on a JSONL file, with the metrics its shape allows.

    chat / instruction / prompt-completion: assistant-token loss, perplexity, bits per byte;
    task: those and the exact match of greedy answers; classification (a classify run only):
    accuracy, macro-F1, confusion matrix; a reward model on preference pairs: pairwise accuracy
    and margin. `limit` > 0 scores the first `limit` rows only. Rows longer than the model's
    context are refused, or cut to it with `truncate`; a classify run that cut its texts
    (finetune.truncate) cuts them the same way here.
    """
    if is_pairs_file(_data_path(path)):  # preference pairs: a reward model's accuracy
        from pellucid.align.reward import evaluate_pairs

        return evaluate_pairs(spec or DEFAULT_MODEL, _data_path(path), batch_size)
    data = read_jsonl(_data_path(path))
    records = data.records[:limit] if limit > 0 else data.records
    loaded = load(spec or DEFAULT_MODEL)
    if loaded.tokenizer is None:
        raise ConfigError(f"model '{spec}' has no tokenizer to read the data with")
    tok, ctx = loaded.tokenizer, loaded.model.cfg.context_len
    out: dict[str, Any] = {"n": len(records), "shape": data.shape}
    if data.shape == "classification":
        if loaded.classifier is None:
            raise ConfigError(
                f"{data.path} holds classification rows, but '{spec}' is not a classifier "
                "(train one with `pellucid finetune classify`)"
            )
        cut = (loaded.meta or {}).get("cut")  # the run cut its texts: score them the same way
        max_len, head = (cut["max_len"], cut["keep_head"]) if cut else (ctx, 0)
        enc = encode_text(
            records, tok, loaded.labels, max_len, truncate or bool(cut), str(data.path), head
        )
        scores = class_metrics(loaded.classifier, enc, len(loaded.labels), batch_size)
        return {**out, **scores, "labels": loaded.labels}
    template = loaded.chat_template()
    enc = encode_lm(records, template, tok, ctx - 1, truncate, str(data.path))
    lm = lm_metrics(loaded.model, enc, batch_size)
    out.update({k: lm[k] for k in ("loss", "perplexity", "bits_per_byte")})
    if data.shape == "task":
        em = exact_match(loaded.model, tok, template, records, max_new_tokens, 2 * batch_size)
        out["exact_match"] = em["exact_match"]
        out["answers"] = em["answers"]
    return out
