"""Fine-tuning figures (issue 10, item 5): what SFT, LoRA and a classifier head buy, and at what cost.

    python bench/finetune.py sft --method lora     # (a) exact match before/after LoRA SFT of SmolLM2
    python bench/finetune.py sft --method full     # (b) the same data and steps, every weight trained
    python bench/finetune.py spam                  # (c) SpamAssassin: the fine-tuned classifier vs
                                                   #     majority class and bag-of-words logistic
                                                   #     regression on the same split
    python bench/finetune.py spam --dev ...        #     choose its settings: train on 4/5 of the
                                                   #     training split, score the other fifth
    python bench/finetune.py spam --score RUN      #     the classifier a --dev run chose, on the
                                                   #     test split, no training
    python bench/finetune.py throughput            # (d) tokens/s and MFU of LoRA and full SFT steps
    python bench/finetune.py --model small throughput --cpu-time
                                                   #     the demo model's shape; 1 thread timed
                                                   #     in CPU time (bench/train.py --cpu-time)

`sft` generates its data with the task generator (`pellucid data tasks mix`, training prompts from
seed 0, held-out prompts from seed 1; training rows whose prompt also occurs in the held-out file
are dropped by `finetune`, the count is printed), runs `pellucid.finetune.finetune` (the same code
as `pellucid finetune sft`) and reports exact match on the held-out prompts before and after, per
task family, the share of replies that contain the reference anywhere (a lenient check that tells
a format lesson from new knowledge), trainable parameters, the process's peak resident memory,
the mean step time and the wall time of the whole run (evaluation included).

`throughput` is bench/train.py's harness on fine-tuning batches: the real trainer, median tokens/s
over the last two thirds of the steps, MFU against the best fp32 matmul peak measured before and
after. It prints MFU twice: with the trainer's 6N FLOPs per token (the convention bench/train.py
and every report use) and with the FLOPs the step really does (LoRA skips the weight gradients of
the base, 4N; SFT runs the output head on reply tokens only).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import re
import resource
import statistics
import subprocess
import tempfile
import time
import types
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

from pellucid.data.finetune import ExampleSampler, encode_lm, pad_lm
from pellucid.data.jsonl import read_jsonl, split
from pellucid.data.tasks import make_tasks, normalize_answer
from pellucid.finetune import evaluate_file, finetune, load_finetune_config
from pellucid.train.evaluate import confusion_matrix, macro_f1
from pellucid.train.metrics import matmul_flops, read_metrics
from pellucid.train.objectives import sft_loss
from pellucid.train.trainer import TrainConfig, seed_everything, train
from pellucid.weights.resolve import load

MODEL = "smollm2-135m-instruct"


def machine() -> dict:
    """What the figures were measured on (RESULTS.md wants the model name, AMX, commit)."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = re.search(r"model name\s*:\s*(.*)", flags)
    commit = subprocess.run(
        ["git", "-C", str(Path(__file__).parent), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
    )
    return {
        "cpu": name.group(1).strip() if name else platform.machine(),
        "amx": " amx" in flags,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "commit": commit.stdout.strip(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "load_average": [round(x, 1) for x in __import__("os").getloadavg()],
    }


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# --- (a), (b): SFT on generated tasks ----------------------------------------------------------


def task_files(out: Path, n_train: int, n_held: int) -> tuple[Path, Path, int]:
    """The training and held-out task files, and how many training prompts are also held out."""
    out.mkdir(parents=True, exist_ok=True)
    train_rows, held_rows = make_tasks("mix", n_train, 0), make_tasks("mix", n_held, 1)
    overlap = len({r["prompt"] for r in train_rows} & {r["prompt"] for r in held_rows})
    return (
        write_jsonl(out / "train.jsonl", train_rows),
        write_jsonl(out / "held.jsonl", held_rows),
        overlap,
    )


def score_answers(held: Path, answers: list[str]) -> dict:
    """Exact match per family, and the share of replies containing the reference."""
    rows = [json.loads(x) for x in held.read_text().splitlines()][: len(answers)]
    per, contains = {}, 0
    for row, answer in zip(rows, answers, strict=True):
        hit = normalize_answer(answer) == normalize_answer(row["answer"])
        per.setdefault(row["family"], []).append(hit)
        contains += normalize_answer(row["answer"]) in normalize_answer(answer)
    return {
        "per_family": {f: round(sum(h) / len(h), 3) for f, h in sorted(per.items())},
        "family_n": {f: len(h) for f, h in sorted(per.items())},
        "contains": contains / len(answers),
    }


def cmd_sft(args: argparse.Namespace) -> dict:
    out = Path(args.out or tempfile.mkdtemp(prefix=f"ft-{args.method}-"))
    train_file, held_file, overlap = task_files(out, args.n_train, args.n_held)
    sets = [
        f"train.max_steps={args.steps}", f"train.batch_size={args.batch}",
        f"finetune.eval_data={held_file}", f"finetune.eval_max={args.n_held}",
        f"finetune.max_new_tokens={args.max_new}", "finetune.val_fraction=0.05",
        "train.progress=false", "train.log_every=10", f"train.checkpoint_every={args.steps}",
        f"lora.rank={args.rank}", f"lora.alpha={2 * args.rank}",
    ]  # fmt: skip
    if args.lr:
        sets += [f"train.lr={args.lr}", f"train.min_lr={args.lr / 10}"]
    run = load_finetune_config("sft", args.model, str(train_file), lora=args.method == "lora",
                               assignments=sets)  # fmt: skip
    t0 = time.perf_counter()
    result = finetune(run, out / "run")
    wall = time.perf_counter() - t0
    state, (n_trained, n_all) = result.state, result.params
    r = {
        "figure": "sft", "method": args.method, "steps": state.step, "batch": args.batch,
        "lr": run.train.lr, "rank": args.rank if args.method == "lora" else None,
        "n_train_rows": args.n_train, "n_held": args.n_held, "train_prompts_also_held": overlap,
        "exact_match_before": result.before["exact_match"],
        "exact_match_after": result.after["exact_match"],
        "before": score_answers(held_file, result.before["answers"]),
        "after": score_answers(held_file, result.after["answers"]),
        "val_loss_before": result.before.get("loss"), "val_loss_after": result.after.get("loss"),
        "trainable": n_trained, "params": n_all, "trainable_pct": 100 * n_trained / n_all,
        "peak_rss_mb": peak_rss_mb(), "step_s": state.train_time_s / max(1, state.step),
        "tokens_per_s": state.tokens / max(state.train_time_s, 1e-9),
        "train_s": state.train_time_s, "wall_s": wall, "cpu_s": time.process_time(),
        "run_dir": str(out / "run"), "machine": machine(),
    }  # fmt: skip
    print(
        f"{args.method}: exact match {r['exact_match_before']:.3f} -> {r['exact_match_after']:.3f} "
        f"({100 * (r['exact_match_after'] - r['exact_match_before']):+.1f} points) on "
        f"{args.n_held} held-out prompts; {n_trained:,} of {n_all:,} parameters trained "
        f"({r['trainable_pct']:.2f}%); peak RSS {r['peak_rss_mb']:.0f} MB; "
        f"{r['step_s']:.2f} s/step; {wall / 60:.1f} min wall ({state.train_time_s / 60:.1f} training)"
    )
    return r


# --- (c): SpamAssassin -------------------------------------------------------------------------

WORD = re.compile(r"[a-z0-9$!]+(?:'[a-z]+)?")


def bag_of_words(train_texts: list[str], vocab_size: int = 20_000) -> dict[str, int]:
    """The vocab_size words in the most training documents (at least two), -> column index."""
    df = Counter(w for t in train_texts for w in set(WORD.findall(t.lower())))
    common = [w for w, c in df.most_common(vocab_size) if c >= 2]
    return {w: i for i, w in enumerate(common)}


def tfidf(texts: list[str], vocab: dict[str, int], idf: torch.Tensor | None = None) -> tuple:
    """(N, V) float32 rows: log(1 + count) x idf, L2-normalised; returns (matrix, idf)."""
    X = torch.zeros(len(texts), len(vocab))
    for i, t in enumerate(texts):
        for w, c in Counter(WORD.findall(t.lower())).items():
            if w in vocab:
                X[i, vocab[w]] = math.log1p(c)
    if idf is None:
        idf = torch.log((1 + len(texts)) / (1 + (X > 0).sum(0))) + 1  # sklearn's smooth idf
    X = X * idf
    return X / X.norm(dim=1, keepdim=True).clamp_min(1e-12), idf


def logistic_regression(X: torch.Tensor, y: torch.Tensor, C: float) -> torch.Tensor:
    """Binary L2-regularised logistic regression (sklearn's objective: C x log-loss sum +
    |w|^2 / 2), fitted with L-BFGS; returns the weights with the bias last, (V + 1,)."""
    Xb = torch.cat([X, torch.ones(len(X), 1)], 1).double()
    w = torch.zeros(Xb.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=500, line_search_fn="strong_wolfe", tolerance_grad=1e-9)
    yd = y.double()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (
            C * torch.nn.functional.binary_cross_entropy_with_logits(Xb @ w, yd, reduction="sum")
            + 0.5 * (w[:-1] ** 2).sum()
        )
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def predict(w: torch.Tensor, X: torch.Tensor) -> list[int]:
    return ((torch.cat([X, torch.ones(len(X), 1)], 1).double() @ w) > 0).long().tolist()


def class_scores(truth: list[int], pred: list[int]) -> dict:
    confusion = confusion_matrix(truth, pred, 2)
    correct = sum(t == p for t, p in zip(truth, pred, strict=True))
    return {
        "accuracy": correct / len(truth),
        "macro_f1": macro_f1(confusion),
        "confusion": confusion,
    }


def bow_baseline(train_rows: list, val_rows: list, labels: list[str]) -> dict:
    """tf-idf bag of words + logistic regression; C picked on the last fifth of the training
    split (from 0.1 to 1000), then refitted on the whole training split."""
    index = {label: i for i, label in enumerate(labels)}
    texts = [r.text for r in train_rows]
    y = torch.tensor([index[r.label] for r in train_rows])
    cut = len(texts) * 4 // 5
    vocab = bag_of_words(texts[:cut])
    X_fit, idf = tfidf(texts[:cut], vocab)
    X_dev, _ = tfidf(texts[cut:], vocab, idf)
    dev = {}
    for C in (0.1, 1.0, 10.0, 100.0, 1000.0):
        dev[C] = class_scores(
            y[cut:].tolist(), predict(logistic_regression(X_fit, y[:cut], C), X_dev)
        )
    best = max(dev, key=lambda c: (dev[c]["macro_f1"], -c))
    vocab = bag_of_words(texts)
    X, idf = tfidf(texts, vocab)
    w = logistic_regression(X, y, best)
    X_val, _ = tfidf([r.text for r in val_rows], vocab, idf)
    truth = [index[r.label] for r in val_rows]
    return {**class_scores(truth, predict(w, X_val)), "C": best, "vocab": len(vocab),
            "dev_macro_f1": {str(c): round(s["macro_f1"], 4) for c, s in dev.items()}}  # fmt: skip


def cmd_spam(args: argparse.Namespace) -> dict:
    from pellucid.data.datasets import resolve_dataset

    data = read_jsonl(resolve_dataset("spam"))
    train_rows, val_rows = split(data.records, args.val_fraction, args.seed)  # finetune's split
    labels, spec, val_fraction = data.labels, "spam", args.val_fraction
    out = Path(args.out or tempfile.mkdtemp(prefix="ft-spam-"))
    if args.dev:  # choosing settings: the test emails stay unseen; a fifth of training scores
        out.mkdir(parents=True, exist_ok=True)
        rows = [{"text": r.text, "label": r.label} for r in train_rows]
        spec, val_fraction = str(write_jsonl(out / "dev.jsonl", rows)), 0.2
        train_rows, val_rows = split(train_rows, val_fraction, args.seed)  # finetune's, of it
    majority = Counter(r.label for r in train_rows).most_common(1)[0][0]
    truth = [labels.index(r.label) for r in val_rows]
    r = {
        "figure": "spam dev" if args.dev else "spam", "n_train": len(train_rows),
        "n_val": len(val_rows), "labels": labels,
        "val_label_counts": dict(Counter(r.label for r in val_rows)),
        "majority": class_scores(truth, [labels.index(majority)] * len(truth)),
    }  # fmt: skip
    t0 = time.perf_counter()
    r["bow"] = bow_baseline(train_rows, val_rows, labels)
    r["bow"]["seconds"] = time.perf_counter() - t0
    print(
        f"majority: {r['majority']['accuracy']:.4f} acc, {r['majority']['macro_f1']:.4f} macro-F1"
    )
    print(f"bag of words + LR (C={r['bow']['C']}): {r['bow']['accuracy']:.4f} acc, "
          f"{r['bow']['macro_f1']:.4f} macro-F1")  # fmt: skip
    if args.baselines_only:
        return r
    if args.score:  # a classifier trained already (a --dev run): score it on this split as it is
        t0 = time.perf_counter()
        rows = [{"text": row.text, "label": row.label} for row in val_rows]
        with tempfile.TemporaryDirectory() as tmp:
            scored = evaluate_file(args.score, str(write_jsonl(Path(tmp) / "val.jsonl", rows)))
        if scored["labels"] != labels:
            raise SystemExit(f"{args.score} has labels {scored['labels']}, this set {labels}")
        r["model"] = {k: scored[k] for k in ("accuracy", "macro_f1", "confusion", "n")} | {
            "run_dir": args.score, "wall_s": time.perf_counter() - t0,
        }  # fmt: skip
        r["machine"] = machine()
        m = r["model"]
        print(f"{args.score}: {m['accuracy']:.4f} acc, {m['macro_f1']:.4f} macro-F1 on {m['n']} "
              f"{'dev' if args.dev else 'test'} emails")  # fmt: skip
        return r
    sets = [
        f"train.max_steps={args.steps}", f"train.batch_size={args.batch}",
        f"train.lr={args.lr}", f"train.min_lr={args.lr / 10}", f"train.seed={args.seed}",
        f"finetune.val_fraction={val_fraction}", f"finetune.max_len={args.max_len}",
        "finetune.truncate=true", "train.progress=false", "train.log_every=10",
        f"train.checkpoint_every={args.steps}", f"train.dtype={args.dtype}",
        f"finetune.keep_head={args.keep_head}", f"finetune.group_by_length={str(args.group).lower()}",
    ]  # fmt: skip
    if not args.lora:
        sets.append(f"finetune.train_last={args.train_last}")
    run = load_finetune_config("classify", args.model, spec, lora=args.lora, assignments=sets)
    t0 = time.perf_counter()
    result = finetune(run, out / "run")
    r["model"] = {
        k: result.after[k] for k in ("accuracy", "macro_f1", "confusion", "n")
    } | {
        "before_accuracy": result.before["accuracy"], "method": "lora" if args.lora else
        f"head + last {args.train_last} blocks", "steps": result.state.step,
        "max_len": args.max_len, "keep_head": args.keep_head, "group": args.group,
        "dtype": args.dtype, "trainable": result.params[0], "wall_s": time.perf_counter() - t0,
        "train_s": result.state.train_time_s, "run_dir": str(out / "run"),
    }  # fmt: skip
    r["machine"] = machine()
    m = r["model"]
    print(f"SmolLM2-135M + classifier ({m['method']}, {m['steps']} steps, {args.max_len} tokens, "
          f"first {args.keep_head} + the end): {m['accuracy']:.4f} acc, {m['macro_f1']:.4f} "
          f"macro-F1 on {m['n']} {'dev' if args.dev else 'test'} emails")  # fmt: skip
    return r


# --- (d): throughput in bench/train.py's harness -----------------------------------------------


def peak_flops(clock: Callable[[], float]) -> float:
    """bench/train.py's peak: the best fp32 1024^3 matmul rate of two half-second runs."""
    return max(matmul_flops(torch.device("cpu"), torch.float32, 0.5, clock) for _ in range(2))


def real_flops_per_token(model: torch.nn.Module, lora: bool, reply_share: float, T: int) -> float:
    """FLOPs an SFT step really does per input token of width T: per weight of the blocks 2
    (forward) + 2 (input gradients) + 2 (weight gradients, full fine-tuning only); the same for
    the output head but on reply tokens only; 6 per LoRA weight; attention's 12 L H D T."""
    cfg = model.cfg
    lora_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    blocks = sum(p.numel() for p in model.blocks.parameters()) - lora_params
    per_weight = 4 if lora else 6
    head = per_weight * cfg.vocab_size * cfg.n_embd * reply_share
    return per_weight * blocks + head + 6 * lora_params + 12 * cfg.n_layer * cfg.n_embd * T


def pellucid_sized(folder: Path) -> str:
    """A run directory of the demo's model (`pellucid demo`: the `small` preset with the
    shakespeare BPE the demo caches), random weights: throughput does not depend on them."""
    from pellucid.config import to_dict
    from pellucid.model.config import PRESETS
    from pellucid.model.transformer import Transformer
    from pellucid.weights.checkpoint import save_checkpoint

    tok_files = sorted((Path.home() / ".cache/pellucid/tokenizers").glob("*/tokenizer.json"))
    if not tok_files:
        raise SystemExit("no cached pellucid tokenizer: run `pellucid demo` (or train one) first")
    tok_json = tok_files[0].read_text()
    vocab = len(json.loads(tok_json)["model"]["vocab"])
    cfg = dataclasses.replace(PRESETS["small"], vocab_size=vocab)
    torch.manual_seed(0)
    files = {"config.json": json.dumps({"model": to_dict(cfg)}), "tokenizer.json": tok_json}
    save_checkpoint(folder, 1, Transformer(cfg), None, {}, files=files)
    return str(folder)


def cmd_throughput(args: argparse.Namespace) -> dict:
    from pellucid.model.lora import apply_lora
    from pellucid.train import trainer

    tmp = Path(tempfile.mkdtemp(prefix="ft-tp-"))
    records = read_jsonl(write_jsonl(tmp / "tasks.jsonl", make_tasks("mix", 512, 0))).records
    spec = pellucid_sized(tmp / "small") if args.model == "small" else args.model
    clock = time.thread_time if args.cpu_time else time.perf_counter
    out = {"figure": "throughput", "model": args.model, "machine": machine(), "runs": []}
    for method in args.methods:
        loaded = load(spec)
        model, tok = loaded.model, loaded.tokenizer
        width = min(1024, model.cfg.context_len)  # the demo model's context is 256
        encoded = encode_lm(records, loaded.chat_template(), tok, width, truncate=True)
        seed_everything(0)
        if method == "lora":
            apply_lora(model, rank=args.rank, alpha=2 * args.rank)
        sampler = ExampleSampler(encoded, args.batch, 0, pad_lm)
        reply = sum(sum(e.mask[1:]) for e in encoded) / sum(len(e.ids) - 1 for e in encoded)
        tcfg = TrainConfig(
            max_steps=args.steps, batch_size=args.batch, warmup_steps=1, eval_every=0,
            checkpoint_every=0, dtype="float32", progress=False, log_every=10**9,
            weight_decay=0.0, lr=(lr := 1e-3 if method == "lora" else 5e-5), min_lr=lr / 10,
        )  # fmt: skip
        before = peak_flops(clock)
        with tempfile.TemporaryDirectory() as run_dir:
            if args.cpu_time:  # the trainer's step clock becomes this thread's CPU time
                trainer.time = types.SimpleNamespace(perf_counter=time.thread_time)
            try:
                train(model, sft_loss, sampler, tcfg, Path(run_dir))
            finally:
                trainer.time = time
            records_m = read_metrics(Path(run_dir) / "metrics.jsonl")
        timed = [m for m in records_m if "tokens_per_s" in m][len(records_m) // 3 :]
        peak = max(before, peak_flops(clock))  # the best of before and after: conservative MFU
        tps = statistics.median(m["tokens_per_s"] for m in timed)
        T = round(statistics.mean(len(e.ids) - 1 for e in encoded))
        real, nominal = (
            real_flops_per_token(model, method == "lora", reply, T),
            model.flops_per_token(T),
        )
        row = {
            "method": method, "batch": args.batch, "steps": args.steps, "tokens_per_s": tps,
            "mfu_6n": tps * nominal / peak, "mfu_real": tps * real / peak, "mean_width": T,
            "flops_per_token_6n": nominal, "flops_per_token_real": real,
            "reply_share": reply, "peak_tflops": peak / 1e12, "params": model.num_params(),
            "clock": "thread CPU time" if args.cpu_time else "wall",
        }  # fmt: skip
        out["runs"].append(row)
        print(f"{method:5s} batch {args.batch}: {tps:8,.0f} tok/s  MFU {100 * row['mfu_6n']:.1f}% "
              f"(6N)  {100 * row['mfu_real']:.1f}% (FLOPs done)  of {peak / 1e9:.0f} GFLOP/s")  # fmt: skip
        del model, loaded
    return out


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="figure", required=True)
    s = sub.add_parser("sft", help="(a) and (b): SFT of SmolLM2 on generated tasks")
    s.add_argument("--method", choices=["lora", "full"], default="lora")
    s.add_argument("--steps", type=int, default=100)
    s.add_argument("--batch", type=int, default=8)
    s.add_argument("--lr", type=float, help="default: pellucid's (LoRA 1e-3, full 5e-5)")
    s.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = 2 x rank)")
    s.add_argument("--n-train", type=int, default=2000)
    s.add_argument("--n-held", type=int, default=200)
    s.add_argument("--max-new", type=int, default=24, help="reply budget when answering")
    s.add_argument("--out", help="folder for the task files and the run (default: a temp dir)")
    c = sub.add_parser("spam", help="(c): SpamAssassin classification vs two baselines")
    c.add_argument("--steps", type=int, default=100)
    c.add_argument("--batch", type=int, default=16)
    c.add_argument("--lr", type=float, default=3e-4)
    c.add_argument("--max-len", type=int, default=128, help="tokens per email (its last ones)")
    c.add_argument("--keep-head", type=int, default=0, help="of those, the email's first N")
    c.add_argument("--group", action="store_true", help="batch emails of similar length")
    c.add_argument(
        "--dev",
        action="store_true",
        help="choose settings: train on 4/5 of the "
        "training split, score on its last fifth; the test split is not touched",
    )
    c.add_argument("--lora", action="store_true", help="LoRA on the trunk (default: last blocks)")
    c.add_argument("--train-last", type=int, default=2, help="blocks trained with the head")
    c.add_argument("--val-fraction", type=float, default=0.1)
    c.add_argument("--seed", type=int, default=1337)
    c.add_argument(
        "--dtype",
        default="float32",
        help="train.dtype (bfloat16: training and "
        "scoring under bf16 autocast, on CPUs with bf16 matmuls)",
    )
    c.add_argument("--baselines-only", action="store_true")
    c.add_argument(
        "--score",
        metavar="RUN",
        help="no training: score this classify run (say, a --dev run's) on the split",
    )
    c.add_argument("--out")
    t = sub.add_parser("throughput", help="(d): tokens/s and MFU of fine-tuning steps")
    t.add_argument("--methods", nargs="+", choices=["lora", "full"], default=["lora", "full"])
    t.add_argument("--steps", type=int, default=30)
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--rank", type=int, default=8)
    t.add_argument(
        "--cpu-time",
        action="store_true",
        help="time steps and peak in this thread's CPU time (a busy machine; 1 thread)",
    )
    p.add_argument(
        "--model",
        default=MODEL,
        help="base model spec; throughput also takes "
        "`small`: the demo model's shape, random weights",
    )
    p.add_argument("--json", help="also append the result as one JSON line to this file")
    args = p.parse_args()
    result = {"sft": cmd_sft, "spam": cmd_spam, "throughput": cmd_throughput}[args.figure](args)
    result["command"] = "python bench/finetune.py " + " ".join(__import__("sys").argv[1:])
    print(json.dumps(result))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
