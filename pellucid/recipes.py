"""Named end-to-end runs built from the parts: `pretrain` (and `resume`) and `demo`.

A run config only composes the sections that live beside their code: `model` (ModelConfig, with
`model.preset=NAME` picking the starting point from PRESETS), `data` (DataConfig, here) and `train`
(TrainConfig). A run directory ends up holding

    config.json  tokenizer.json  metrics.jsonl  loss.png  report.md  checkpoints/step_*/
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import logging
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pellucid import config
from pellucid.data.batches import WindowSampler, eval_batches
from pellucid.data.shards import ENDOFTEXT, Shards, build_shards, corpus_hash, split_documents
from pellucid.data.sources import Document, load_corpus
from pellucid.data.stream import as_shards, open_mix
from pellucid.errors import ConfigError
from pellucid.files import atomic_write, pellucid_home
from pellucid.history.ladder import LadderConfig, Rung, climb
from pellucid.history.report import write_outputs
from pellucid.infer.engine import Engine
from pellucid.infer.sampling import SamplingParams
from pellucid.model.config import PRESETS, ModelConfig
from pellucid.model.transformer import Transformer
from pellucid.tokenizer.bpe import Tokenizer
from pellucid.tokenizer.formats import load_tokenizer
from pellucid.train import distributed
from pellucid.train.memory import check_fits
from pellucid.train.metrics import PLOT_FILE, measure_peak_flops, plot_curves, read_metrics
from pellucid.train.objectives import lm_loss
from pellucid.train.precision import resolve_dtype
from pellucid.train.trainer import (
    TrainConfig,
    TrainState,
    evaluate_objective,
    resolve_device,
    seed_everything,
    train,
)
from pellucid.weights.checkpoint import load_model_weights, read_json
from pellucid.weights.resolve import checkpoint_folder
from pellucid.weights.resolve import load as load_spec

log = logging.getLogger("pellucid")


@dataclass(kw_only=True)
class DataConfig:
    """What to train on (the `data.*` keys)."""

    corpus: str = "shakespeare"  # a corpus name, file, folder or glob (see data/sources.py)
    tokenizer: str = "train"  # "train": a BPE trained on the train split (cached); or a path
    vocab_size: int = 2048  # for tokenizer = "train", special tokens included
    val_fraction: float = 0.1  # the last part of the concatenated text is validation
    # Prepared datasets (`pellucid data prepare`) streamed from disk instead of `corpus`:
    # "DIR" or "a:0.7,b:0.3" (rows drawn by weight); their own tokenizer is used.
    mix: str = ""

    def __post_init__(self) -> None:
        # Checked here, before a tokenizer is trained on what would be an empty train split.
        if not 0 < self.val_fraction < 1:
            raise ConfigError(
                f"config key 'data.val_fraction' must be in (0, 1), got {self.val_fraction}"
            )
        if self.vocab_size < 257:
            raise ConfigError(
                f"config key 'data.vocab_size' must be >= 257 (256 bytes + <|endoftext|>), "
                f"got {self.vocab_size}"
            )


@dataclass(kw_only=True)
class RunConfig:
    """A whole run: each part gets only its own section."""

    model: ModelConfig = field(default_factory=lambda: dataclasses.replace(PRESETS["small"]))
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# The demo: a model this small wins at a 5-minute CPU budget because it takes many more steps (see
# bench/RESULTS.md for the sweep). Untied embeddings and a high peak lr helped; QK-norm was neutral.
DEMO_MODEL = [
    "model.n_embd=96", "model.n_layer=4", "model.n_head=3", "model.n_kv_head=3",
    "model.ffn_dim=256", "model.context_len=128", "model.tie_embeddings=false",
    "model.qk_norm=true", "model.dropout=0",
]  # fmt: skip
DEMO_TRAIN = [
    "train.batch_size=16", "train.lr=5e-3", "train.min_lr=5e-4", "train.weight_decay=0.1",
    "train.eval_batches=0", "train.checkpoint_every=0", "train.device=cpu", "train.dtype=auto",
    "train.warmup_steps=50", "train.log_every=100",
]  # fmt: skip
DEMO_PROMPTS = ("\n", "KING.\n", "Enter ")
_SAMPLING = SamplingParams(temperature=0.8, top_k=50, max_new_tokens=160, seed=1234)


@dataclass
class RunResult:
    """What a finished run produced."""

    run_dir: Path
    state: TrainState
    samples: list[tuple[str, str]]  # (prompt, generated text)
    val_bpb: float
    main: bool = True  # False on the other ranks of a torchrun job: they print nothing
    split: str = ""  # the key of the shards it trained and was scored on (data/shards.py)


# --- config --------------------------------------------------------------------------------------


def load_run_config(
    path: str | Path | None = None, assignments: list[str] | None = None
) -> RunConfig:
    """Defaults <- preset (`model.preset`, from the file or the overrides) <- TOML file <- key=value."""
    data = _read_toml(path) if path is not None else {}
    rest = list(assignments or [])
    model = data.get("model")
    preset = model.pop("preset", "small") if isinstance(model, dict) else "small"
    for item in list(rest):
        key, eq, value = item.partition("=")
        if eq and key.strip() == "model.preset":  # without '=', override() names the mistake
            preset = value.strip()
            rest.remove(item)
    if not isinstance(preset, str):  # a TOML number or list; would fail deep in difflib
        raise ConfigError(f"config key 'model.preset' expects a preset name, got {preset!r:.60}")
    if preset not in PRESETS:
        near = difflib.get_close_matches(preset, PRESETS, n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else f" (known: {', '.join(PRESETS)})"
        raise ConfigError(f"unknown model preset '{preset}' for config key 'model.preset'{hint}")
    base = RunConfig(model=dataclasses.replace(PRESETS[preset]))
    merged = config.to_dict(base)
    config._deep_update(merged, data)
    return config.override(config.from_dict(RunConfig, merged), rest)


def _read_toml(path: str | Path) -> dict[str, Any]:
    # config.load reads TOML too, but the preset has to be applied before the file's other keys.
    try:
        return config.tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except (config.tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None


def config_hash(run: RunConfig) -> str:
    """sha256 of the resolved config as canonical JSON (the run's identity in its lineage)."""
    return hashlib.sha256(json.dumps(config.to_dict(run), sort_keys=True).encode()).hexdigest()


def default_run_dir(name: str = "") -> Path:
    """./runs/<name>-<timestamp>."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / (f"{name}-{stamp}" if name else stamp)


# --- data and tokenizer --------------------------------------------------------------------------


def get_tokenizer(data: DataConfig, docs: list[Document]) -> Tokenizer:
    """The configured tokenizer; "train" trains a BPE on the train split once and caches it."""
    if data.tokenizer != "train":
        return load_tokenizer(data.tokenizer)
    key = hashlib.sha256(
        json.dumps([corpus_hash(docs), data.vocab_size, data.val_fraction, ENDOFTEXT]).encode()
    ).hexdigest()[:16]
    path = pellucid_home() / "tokenizers" / key / "tokenizer.json"
    if path.is_file():
        return Tokenizer.load(path)
    train_texts = [p.text for p in split_documents(docs, data.val_fraction)[0]]
    log.info(
        "training a %d-token BPE tokenizer on %s (cached afterwards) ...",
        data.vocab_size,
        data.corpus,
    )
    tokenizer = Tokenizer.train(train_texts, data.vocab_size, special_tokens=[ENDOFTEXT])
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(path)
    return tokenizer


def _tokenizer_bytes(tokenizer: Tokenizer) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save(Path(tmp) / "tokenizer.json")
        return (Path(tmp) / "tokenizer.json").read_bytes()


def _evaluator(shards: Shards, context_len: int, cfg: TrainConfig) -> Any:
    """Validation loss, perplexity and bits per byte over the first `eval_batches` (0: all)."""

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        n = cfg.eval_batches or None
        batches = eval_batches(shards.val, 4 * cfg.batch_size, context_len, n)
        loss, _ = evaluate_objective(model, lm_loss, batches)
        return {
            "val_loss": loss,
            "val_ppl": math.exp(min(loss, 50.0)),
            "val_bpb": shards.bits_per_byte(loss),
        }

    return evaluate


# --- runs ----------------------------------------------------------------------------------------


def pretrain(run: RunConfig, out_dir: Path, *, resume: bool = False) -> RunResult:
    """Train a language model from scratch (or continue `out_dir` when `resume`).

    Under torchrun every rank runs this: rank 0 builds the tokenizer and shards first (the
    others then find them cached), trains with the others, and alone writes the report.
    """
    run_dir = Path(out_dir)
    if not resume and ((run_dir / "checkpoints").exists() or (run_dir / "metrics.jsonl").exists()):
        raise ConfigError(
            f"{run_dir} already holds a run: pass --resume {run_dir} or another --out"
        )
    device = resolve_device(run.train.device)
    world = distributed.init_distributed(device, run.train.dist_timeout_s)
    weights = None
    if run.data.mix:  # streamed from disk: nothing to build
        datasets, weights = open_mix(run.data.mix)
        tokenizer = Tokenizer.load(datasets[0].folder / "tokenizer.json")
        shards = as_shards(datasets, run.data.mix)
        train_tokens = [d.train for d in datasets]
    else:
        with distributed.rank_zero_first():
            docs = load_corpus(run.data.corpus)
            saved_tok = run_dir / "tokenizer.json"
            tokenizer = (
                Tokenizer.load(saved_tok)
                if resume and saved_tok.is_file()
                else get_tokenizer(run.data, docs)
            )
            shards = build_shards(docs, tokenizer, run.data.val_fraction)
        train_tokens = shards.train
    run = dataclasses.replace(
        run, model=dataclasses.replace(run.model, vocab_size=tokenizer.vocab_size)
    )
    if device.type == "cpu":  # GPU memory is the device's to report
        check_fits(run.model, max(1, run.train.batch_size // world.size))
    seed_everything(run.train.seed)
    model = Transformer(run.model)
    # Pinned host batches let the copy to the GPU overlap the previous step's compute.
    sampler = WindowSampler(
        train_tokens, run.train.batch_size, run.model.context_len, run.train.seed,
        pin_memory=device.type == "cuda", weights=weights,
    )  # fmt: skip
    files = {
        "config.json": json.dumps(config.to_dict(run), indent=1) + "\n",
        "tokenizer.json": _tokenizer_bytes(tokenizer),
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        if world.is_main:
            atomic_write(run_dir / name, data)
    log.info("run directory: %s (%s parameters)", run_dir, f"{model.num_params():,}")
    t0 = time.perf_counter()
    state = train(
        model, lm_loss, sampler, run.train, run_dir,
        evaluate=_evaluator(shards, run.model.context_len, run.train) if len(shards.val) > 1 else None,
        resume=resume, files=files,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    if world.size > 1:
        distributed.finish_distributed()
        if not world.is_main:
            return RunResult(run_dir, state, [], state.last_eval.get("val_bpb", math.nan), False)
        # FSDP left `model` sharded: sample from the full weights of the last checkpoint instead.
        model = Transformer(run.model)
        load_model_weights(Path(state.checkpoint), model)
    records = read_metrics(run_dir / "metrics.jsonl")
    plot_curves(records, run_dir / PLOT_FILE)
    samples = generate_samples(model.eval(), tokenizer, DEMO_PROMPTS)
    val_bpb = state.last_eval.get("val_bpb", math.nan)
    write_report(run_dir, run, state, shards, tokenizer, model, samples, wall)
    return RunResult(run_dir, state, samples, val_bpb, split=shards.meta.get("key", ""))


def resume(run_dir: Path, assignments: list[str] | None = None) -> RunResult:
    """Continue a run from its newest good checkpoint, with the config it was started with."""
    run = config.from_dict(RunConfig, read_json(Path(run_dir) / "config.json"))
    return pretrain(config.override(run, assignments or []), run_dir, resume=True)


def generate_samples(
    model: Transformer, tokenizer: Tokenizer, prompts: tuple[str, ...]
) -> list[tuple[str, str]]:
    """One sampled continuation per prompt (temperature 0.8, top-k 50, fixed seed)."""
    engine = Engine(model, tokenizer)
    return [(p, engine.complete(tokenizer.encode(p), _SAMPLING).text) for p in prompts]


def demo_config(minutes: float = 5.0, corpus: str = "shakespeare") -> RunConfig:
    """The demo's run: its small model on `corpus`, trained for `minutes` of the clock.

    The run is time-budgeted (`train.max_minutes`): the cosine schedule follows the clock and
    ends when the time is up, however fast this machine (or however busy) turns out to be.
    """
    if not 0.05 <= minutes <= 24 * 60:
        raise ConfigError(f"--minutes must be between 0.05 and 1440, got {minutes}")
    schedule = {
        "max_minutes": minutes,
        "max_steps": 10**9,  # only the clock ends the run
        "eval_every": 0,
        "eval_every_minutes": minutes / 4,  # a validation curve of 4 points, plus the end
    }
    run = load_run_config(None, DEMO_MODEL + DEMO_TRAIN)
    run = config.override(run, [f"train.{k}={v}" for k, v in schedule.items()])
    return dataclasses.replace(run, data=dataclasses.replace(run.data, corpus=corpus))


def demo(minutes: float = 5.0, out_dir: Path | None = None) -> RunResult:
    """`pellucid demo`: a tokenizer, then a small model trained on Shakespeare for `minutes` on the CPU."""
    return pretrain(demo_config(minutes), out_dir or default_run_dir("demo"))


def ladder(
    corpus: str = "shakespeare", minutes: float = 5.0, out_dir: Path | None = None,
    run_dir: Path | None = None, on_rung: Callable[[Rung], None] | None = None,
) -> list[Rung]:  # fmt: skip
    """`pellucid ladder`: every rung of history/ladder.py, then the demo's transformer, on the demo's
    tokenizer and split of `corpus`; writes ladder.json, ladder.png and ladder.html in `out_dir`.

    The transformer trains for `minutes` (as `pellucid demo --minutes`), or is the model of an
    existing `run_dir`, scored on the same text split with its own tokenizer.
    """
    run = demo_config(minutes, corpus)
    out = Path(out_dir or default_run_dir("ladder"))
    if any((out / name).exists() for name in ("ladder.json", "vectors", "neural", "transformer")):
        raise ConfigError(f"{out} already holds a ladder: give another --out")
    docs = load_corpus(corpus)
    tokenizer = get_tokenizer(run.data, docs)
    shards = build_shards(docs, tokenizer, run.data.val_fraction)
    cfg = LadderConfig(device=run.train.device, seed=run.train.seed)
    rungs = climb(shards, tokenizer, minutes, out, DEMO_PROMPTS, _SAMPLING, cfg, on_rung)
    if run_dir is None:  # train the demo's model, then score it as any existing run
        result = pretrain(run, out / "transformer")
        run_dir, name, samples = out / "transformer", "transformer (the demo's)", result.samples
    else:
        run_dir, name, samples = Path(run_dir), f"transformer ({Path(run_dir).name})", None
    top = _scored_run(run_dir, docs, run.data.val_fraction, name, samples)
    rungs.append(top)
    if on_rung is not None:
        on_rung(top)
    write_outputs(out, rungs)
    return rungs


def _scored_run(
    run_dir: Path, docs: list[Document], val_fraction: float, name: str,
    samples: list[tuple[str, str]] | None = None,
) -> Rung:  # fmt: skip
    """The transformer rung of a run: scored on the split, its training time read back.

    Scored in float32, as the rungs below it train and score, whatever precision the run trained
    in: under bf16 autocast the same weights score about 1e-4 bits per byte apart, and a ladder
    scored twice must print one number. `samples`: the run's own, else sampled here.
    """
    loaded = load_spec(run_dir)
    shards = build_shards(docs, loaded.tokenizer, val_fraction)
    cfg = TrainConfig(batch_size=16, eval_batches=0)
    bpb = _evaluator(shards, loaded.model.cfg.context_len, cfg)(loaded.model)["val_bpb"]
    state = read_json(checkpoint_folder(run_dir) / "state.json")["train_state"]
    if samples is None:
        samples = generate_samples(loaded.model, loaded.tokenizer, DEMO_PROMPTS)
    size = loaded.model.num_params()
    return Rung(name, "transformer", bpb, state["train_time_s"], size, samples, shards.meta["key"])


# --- report --------------------------------------------------------------------------------------


def run_mfu(state: TrainState, cfg: TrainConfig) -> float:
    """Model FLOP/s over the steps / the measured matmul peak of the dtype the run computed in."""
    if not state.train_time_s:
        return 0.0
    device = resolve_device(cfg.device)  # a state saved before peaks were kept: measure again
    peak = state.peak_flops or measure_peak_flops(str(device), resolve_dtype(cfg.dtype, device))
    return state.flops / state.train_time_s / peak


def write_report(
    run_dir: Path, run: RunConfig, state: TrainState, shards: Shards, tokenizer: Tokenizer,
    model: Transformer, samples: list[tuple[str, str]], wall_s: float,
) -> None:  # fmt: skip
    """report.md: a model card of the run (config, data, size, curves, samples, compute, lineage)."""
    meta = shards.meta
    bpt = meta["train_bytes"] / max(1, meta["train_tokens"])
    ev = state.last_eval
    tps = state.tokens / state.train_time_s if state.train_time_s else 0.0
    cfg_json = json.dumps(config.to_dict(run), indent=1)
    lines = [
        f"# {run_dir.name}",
        "",
        "## Result",
        f"- validation loss {ev.get('val_loss', math.nan):.4f} nats/token, perplexity "
        f"{ev.get('val_ppl', math.nan):.2f}, **{ev.get('val_bpb', math.nan):.4f} bits per byte** "
        f"after {state.step} steps",
        f"- curves: ![loss and bits per byte]({PLOT_FILE}) (per-step numbers in `metrics.jsonl`)",
        "",
        "## Model",
        f"- {model.num_params():,} parameters ({model.num_params(exclude_embeddings=True):,} "
        "without embeddings)",
        "",
        "## Data and tokenizer",
        f"- corpus `{run.data.mix or run.data.corpus}`: {meta['train_bytes']:,} train bytes, {meta['val_bytes']:,} "
        f"val bytes (the last {run.data.val_fraction:.0%})",
        f"- tokenizer: {tokenizer.vocab_size} tokens, {bpt:.2f} bytes per token on the train split "
        f"({meta['train_tokens']:,} train tokens)",
        "",
        "## Compute",
        f"- {state.flops:.3g} FLOPs in {state.train_time_s:.0f} s of training steps "
        f"({wall_s:.0f} s wall time with evaluation and checkpoints, this session)",
        f"- {state.tokens:,} tokens, {tps:,.0f} tokens/s on {run.train.device} "
        f"({torch.get_num_threads()} threads), MFU {100 * run_mfu(state, run.train):.1f}% of this "
        "machine's measured matmul peak",
        f"- precision: {state.precision or run.train.dtype}; MFU's peak: "
        f"{state.peak_flops / 1e9:,.0f} GFLOP/s, measured in that dtype",
        "",
        "## Samples (temperature 0.8, top-k 50)",
        *[f"**{p!r}** ->\n\n```\n{p}{text}\n```\n" for p, text in samples],
        "## Lineage",
        f"- parent checkpoint: {state.resumed_from or 'none (trained from scratch)'}",
        f"- last checkpoint: {state.checkpoint}",
        f"- config sha256: {config_hash(run)}",
        f"- data: corpus sha256 {meta.get('corpus_sha256', '?')}, tokenizer sha256 "
        f"{meta.get('tokenizer_sha256', '?')}, shards {meta.get('key', '?')[:16]}",
        f"- command: `{' '.join(sys.argv)}`",
        "",
        "## Config",
        f"```json\n{cfg_json}\n```",
        "",
    ]
    atomic_write(run_dir / "report.md", "\n".join(lines))
