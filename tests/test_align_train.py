"""Reward model and DPO: the losses against hand computations, what a step may and may not
touch (RELIABILITY.md A7), and the runs end to end on a tiny base (tests/finetune_helpers.py)."""

import json
import math

import finetune_helpers as h
import pytest
import torch
from torch import nn

from pellucid import finetune
from pellucid.align.dpo import AdaptersOff, make_reference, with_reference
from pellucid.align.evaluate import reply_kl
from pellucid.align.oracle import get_oracle
from pellucid.align.pairs import oracle_pairs, read_pair_data, sample_responses
from pellucid.cli import main
from pellucid.data.finetune import ExampleSampler, in_order
from pellucid.data.preferences import (
    PreferenceBatch,
    PreferencePair,
    PromptRow,
    collate_pairs,
    encode_pairs,
    write_pairs,
    write_prompts,
)
from pellucid.model.lora import apply_lora
from pellucid.model.transformer import Transformer
from pellucid.tokenizer.chat import CHATML, ChatTemplate
from pellucid.train import evaluate as train_evaluate
from pellucid.train.distributed import World, rank_slice
from pellucid.train.objectives import dpo_loss, pairwise_reward_loss
from pellucid.train.trainer import TrainConfig, train
from pellucid.weights.resolve import load

QUIET = ["train.progress=false", "train.log_every=1000"]
TEMPLATE = ChatTemplate(CHATML)


def parity_pairs(n, seed, lo=0, hi=10_000):
    """Pairs whose chosen reply is the parity of the number asked about (computed) and whose
    rejected one a generic refusal (one of DATA.md's corruptions)."""
    rows = h.parity_rows(n, seed, lo, hi)
    return [PreferencePair(r["prompt"], r["answer"], "I do not know.") for r in rows]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("align")
    h.base_run(d / "base")
    write_pairs(d / "pairs.jsonl", parity_pairs(160, seed=0))
    write_pairs(d / "held.jsonl", parity_pairs(40, seed=1, lo=10_000, hi=20_000))
    return d


class FixedRewards(nn.Module):
    """A stand-in reward model returning given rewards, one per row."""

    def __init__(self, rewards):
        super().__init__()
        self.rewards = torch.tensor(rewards)

    def reward(self, inputs, *, segments):
        return self.rewards


def test_bradley_terry_loss_and_accuracy_by_hand():
    batch = PreferenceBatch(
        torch.zeros(4, 3, dtype=torch.long), torch.zeros(4, 3, dtype=torch.long)
    )
    # rows interleaved (chosen, rejected): pairs (2 vs 1) and (0 vs 1) -> differences +1 and -1
    out = pairwise_reward_loss(FixedRewards([2.0, 1.0, 0.0, 1.0]), batch)
    by_hand = math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1))
    assert out.loss_sum.item() == pytest.approx(by_hand, rel=1e-6)
    assert out.n_targets == 2
    assert out.metrics == {"pairwise_accuracy": 0.5, "margin": 0.0}


def _zero_model():
    """Every weight zero: hidden states are 0 after the final norm, so every next token has
    probability 1 / V: a reply of n tokens has log-prob -n ln V, computable by hand."""
    model = Transformer(h.CFG)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model


def test_dpo_loss_by_hand():
    tok = h.tokenizer()
    pairs = encode_pairs([PreferencePair("Is 3 even or odd?", "odd", "it is even, clearly")],
                         TEMPLATE, tok, 100)  # fmt: skip
    n_c = sum(pairs[0].chosen.mask[1:])  # reply tokens (targets) of each half
    n_r = sum(pairs[0].rejected.mask[1:])
    assert n_r > n_c
    ref_c, ref_r = -3.0, -7.5  # given reference log-probs
    batch = collate_pairs([pairs[0].__class__(pairs[0].chosen, pairs[0].rejected, (ref_c, ref_r))])
    beta, lnV = 0.1, math.log(h.CFG.vocab_size)
    out = dpo_loss(_zero_model(), batch, beta=beta)
    z = beta * ((-n_c * lnV - ref_c) - (-n_r * lnV - ref_r))
    assert out.loss_sum.item() == pytest.approx(-math.log(1 / (1 + math.exp(-z))), rel=1e-5)
    assert out.metrics["margin"] == pytest.approx(z, rel=1e-5)
    assert out.metrics["reward_accuracy"] == float(z > 0)
    assert out.n_targets == 1


def test_a_ranks_slice_of_a_preference_batch_holds_whole_pairs():
    tok = h.tokenizer()
    pairs = [PreferencePair(f"Is {i} even?", f"yes {i}", f"no {i} no") for i in range(4)]
    enc = [p.__class__(p.chosen, p.rejected, (-1.0 * i, -2.0 * i)) for i, p in
           enumerate(encode_pairs(pairs, TEMPLATE, tok, 100))]  # fmt: skip
    batch = collate_pairs(enc)
    assert batch.n_targets == 4
    second = rank_slice(batch, World(rank=1, size=2))  # what rank 1 of 2 trains on
    assert second.n_targets == 2
    assert second.ref_logps.tolist() == [-2.0, -4.0, -3.0, -6.0]
    whole = collate_pairs(enc[2:])
    width = whole.inputs.shape[1]
    torch.testing.assert_close(second.inputs[:, :width], whole.inputs)


def _dpo_setup(files, lora):
    torch.manual_seed(0)
    model = load(files / "base").model
    for p in model.parameters():
        p.requires_grad_(True)
    if lora:
        apply_lora(model, rank=4, alpha=8)
    pairs = encode_pairs(parity_pairs(16, seed=3), TEMPLATE, h.tokenizer(), 100)
    return model, pairs


@pytest.mark.parametrize("lora", [True, False])
def test_dpo_steps_move_the_policy_and_never_the_reference(files, tmp_path, lora):
    """RELIABILITY.md A7: 3 DPO steps; reference bitwise unchanged, policy changed, loss finite,
    first loss ln 2 (policy == reference). Under LoRA the reference is the base weights, shared."""
    model, pairs = _dpo_setup(files, lora)
    reference = make_reference(model)
    assert isinstance(reference, AdaptersOff) == lora
    if lora:
        frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
        watched = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    else:
        frozen = {n: p.clone() for n, p in reference.named_parameters()}
        watched = {n: p.clone() for n, p in model.named_parameters()}
    losses = []

    def objective(m, b):
        out = dpo_loss(m, b, beta=0.1, reference=reference)
        losses.append(out.loss_sum.item() / out.n_targets)
        return out

    cfg = TrainConfig(max_steps=3, batch_size=4, lr=1e-2, warmup_steps=0, eval_every=0,
                      checkpoint_every=0, progress=False, dtype="float32", device="cpu")  # fmt: skip
    train(model, objective, ExampleSampler(pairs, 4, 0, collate_pairs), cfg, tmp_path)
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5)
    assert all(math.isfinite(x) for x in losses)
    now = dict(reference.named_parameters() if not lora else model.named_parameters())
    assert all(torch.equal(now[n], p) for n, p in frozen.items())  # bitwise
    moved = dict(model.named_parameters())
    assert any(not torch.equal(moved[n], p) for n, p in watched.items())


def test_precomputed_reference_gives_the_same_loss(files):
    model, pairs = _dpo_setup(files, lora=True)
    with torch.no_grad():  # move off the reference, so the loss is not just ln 2
        for layer in model.modules():
            if hasattr(layer, "lora_B"):
                layer.lora_B.normal_(std=0.05)
    reference = make_reference(model)
    live = [
        dpo_loss(model, b, beta=0.2, reference=reference) for b in in_order(pairs, 4, collate_pairs)
    ]
    pre = with_reference(pairs, reference, 3)  # another batch size: batching must not matter
    stored = [dpo_loss(model, b, beta=0.2) for b in in_order(pre, 4, collate_pairs)]
    for a, b in zip(live, stored, strict=True):
        torch.testing.assert_close(a.loss_sum, b.loss_sum, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="reference"):
        dpo_loss(model, collate_pairs(pairs[:2]), beta=0.1)


def test_reply_kl_is_zero_against_itself_and_positive_otherwise(files):
    model, _ = _dpo_setup(files, lora=True)
    rows = [PromptRow("Is 5 even or odd?"), PromptRow("Is 8 even or odd?")]
    replies = ["odd", "even then"]
    tok = h.tokenizer()
    same = reply_kl(model, AdaptersOff(model), tok, TEMPLATE, rows, replies)
    assert same["kl"] == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        for layer in model.modules():
            if hasattr(layer, "lora_B"):
                layer.lora_B.normal_(std=0.05)
    moved = reply_kl(model, AdaptersOff(model), tok, TEMPLATE, rows, replies)
    assert moved["kl"] > 1e-4 and moved["kl_per_token"] < moved["kl"]


def test_sampled_responses_are_cached_and_ranked(files, tmp_path, monkeypatch):
    from pellucid.infer.sampling import SamplingParams

    model, tok = load(files / "base").model, h.tokenizer()
    rows = [PromptRow("Say hi in exactly 2 words."), PromptRow("Say bye in exactly 1 word.")]
    params = SamplingParams(temperature=1.0, max_new_tokens=6, seed=5)
    first = sample_responses(model, tok, TEMPLATE, rows, 3, params, cache=tmp_path, model_id="m")
    assert [len(r) for r in first] == [3, 3]
    assert len(list(tmp_path.glob("responses-*.json"))) == 1

    def fail(*a, **k):
        raise AssertionError("sampled again instead of reading the cache")

    monkeypatch.setattr("pellucid.align.pairs.replies", fail)
    again = sample_responses(model, tok, TEMPLATE, rows, 3, params, cache=tmp_path, model_id="m")
    assert again == first
    oracle = get_oracle("words")
    for pair in oracle_pairs(oracle, rows, first):
        row = next(r for r in rows if r.prompt == pair.prompt)
        assert oracle.score(row.prompt, pair.chosen) > oracle.score(row.prompt, pair.rejected)
    monkeypatch.setattr("pellucid.align.pairs.replies", train_evaluate.replies)
    other = sample_responses(model, tok, TEMPLATE, rows, 3, params, cache=tmp_path, model_id="m2")
    assert len(other) == 2 and len(list(tmp_path.glob("responses-*.json"))) == 2


def _align_run(files, out, task, *extra, lora=True, data="pairs.jsonl"):
    run = finetune.load_finetune_config(
        task, str(files / "base"), str(files / data), lora=lora, assignments=[*QUIET, *extra]
    )
    return finetune.finetune(run, out)


def test_dpo_with_lora_defaults_to_a_tenth_of_the_sft_rate_and_flags_still_win():
    # at SFT's LoRA rate (1e-3) the README's DPO run left SmolLM2 worse than it started
    cfg = {t: finetune.load_finetune_config(t, "m", "d.jsonl", lora=True).train
           for t in ("sft", "reward", "dpo")}  # fmt: skip
    assert (cfg["sft"].lr, cfg["reward"].lr, cfg["dpo"].lr) == (1e-3, 1e-3, 1e-4)
    assert cfg["dpo"].min_lr == 1e-5
    assert finetune.load_finetune_config("dpo", "m", "d.jsonl").train.lr == 5e-5  # full: as SFT
    told = finetune.load_finetune_config("dpo", "m", "d.jsonl", lora=True,
                                         assignments=["train.lr=3e-4"]).train  # fmt: skip
    assert (told.lr, told.min_lr) == (3e-4, 1e-5)


def test_pairs_of_held_out_prompts_are_dropped_and_counted(files, tmp_path):
    # the count reaches the run's report: a merge once left it out and every reward/DPO run
    # failed building the run (_Prepared missing n_dropped)
    pairs = parity_pairs(160, seed=0)
    held = tmp_path / "held_prompts.jsonl"
    write_prompts(held, [PromptRow(p.prompt) for p in pairs[:3]])
    loaded = load(files / "base")
    d = read_pair_data(str(files / "pairs.jsonl"), str(held), held_pairs=False, val_fraction=0.1,
                       seed=0, tokenizer=loaded.tokenizer, template=loaded.chat_template(),
                       max_len=128)  # fmt: skip
    assert d.n_dropped == 3 and len(d.train) + len(d.val) == 157
    assert [r.prompt for r in d.held_rows] == [p.prompt for p in pairs[:3]]
    prep = finetune._prepare(finetune.load_finetune_config(
        "dpo", str(files / "base"), str(files / "pairs.jsonl"), lora=True,
        assignments=[*QUIET, f"finetune.eval_data={held}", "dpo.oracle=words"]))  # fmt: skip
    assert prep.n_dropped == 3 and prep.n_train == len(d.train)


@pytest.mark.slow
def test_reward_run_learns_pairs_and_is_a_model_spec(files, tmp_path, capsys):
    out = tmp_path / "rm"
    code = main(["reward", "train", "--model", str(files / "base"), "--data",
                 str(files / "pairs.jsonl"), "--eval-data", str(files / "held.jsonl"), "--out",
                 str(out), "--lora", *QUIET, "train.max_steps=40", "train.lr=3e-3"])  # fmt: skip
    assert code == 0
    meta = json.loads((out / "finetune.json").read_text())
    assert meta["task"] == "reward" and meta["method"] == "lora"
    after = json.loads((out / "eval.json").read_text())["after"]
    assert after["n"] == 40 and after["pairwise_accuracy"] >= 0.9
    capsys.readouterr()
    assert main(["eval", "--model", str(out), "--data", str(files / "held.jsonl"), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["pairwise_accuracy"] == pytest.approx(after["pairwise_accuracy"])
    assert got["margin"] == pytest.approx(after["margin"], rel=1e-4)
    assert main(["reward", "score", "--model", str(out), "--prompt", "Is 12345 even or odd?",
                 "--response", "odd", "--response", "I do not know.", "--json"]) == 0  # fmt: skip
    odd, refusal = json.loads(capsys.readouterr().out)["rewards"]
    assert odd > refusal
    capsys.readouterr()
    assert main(["reward", "score", "--model", str(files / "base"), "--prompt", "p",
                 "--response", "r"]) == 2  # fmt: skip
    assert "is not a reward model" in capsys.readouterr().err


@pytest.mark.slow
def test_dpo_run_resumes_and_reports_its_lineage(files, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say hi in exactly {n} words."}) + "\n"
                               for n in (1, 2, 3)))  # fmt: skip
    extra = ["train.max_steps=4", "train.checkpoint_every=2", "train.batch_size=4",
             "dpo.oracle=words", "dpo.max_new_tokens=4", f"finetune.eval_data={prompts}"]  # fmt: skip
    out = _align_run(files, tmp_path / "dpo", "dpo", *extra).run_dir
    scores = json.loads((out / "eval.json").read_text())
    assert scores["before"]["win_rate"] == 0.5 and scores["before"]["kl"] == pytest.approx(
        0, abs=1e-6
    )
    assert {"win_rate", "kl", "reward_accuracy", "margin"} <= set(scores["after"])
    assert "base model:" in (out / "report.md").read_text()
    straight = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    # resume from step 2 (the last checkpoint set aside) reproduces the same losses
    import shutil

    shutil.rmtree(out / "checkpoints" / "step_000004")
    assert main(["dpo", "--resume", str(out), "train.max_steps=4"]) == 0
    resumed = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in resumed if "loss" in r] == [
        r["loss"] for r in straight if "loss" in r
    ]
    capsys.readouterr()
    assert main(["report", str(out), "--n-tasks", "3", "--json"]) == 0
    line = json.loads(capsys.readouterr().out)
    assert [s["kind"] for s in line] == ["base", "dpo"]
    assert line[0]["win_rate"] == 0.5 and line[0]["kl"] == 0.0
    assert {"win_rate", "oracle_score", "exact_match", "kl", "bits_per_byte"} <= set(line[1])
    assert (out / "lineage.png").stat().st_size > 1000
    assert main(["report", str(out), "--n-tasks", "3"]) == 0  # cached: no model is loaded twice
    assert "| 1 | dpo (lora) |" in capsys.readouterr().out


@pytest.mark.slow
def test_full_dpo_with_precomputed_reference_keeps_no_copy(files, tmp_path):
    out = _align_run(files, tmp_path / "full", "dpo", "train.max_steps=2", "train.batch_size=4",
                     "dpo.precompute_ref=true", "train.lr=1e-4", lora=False).run_dir  # fmt: skip
    meta = json.loads((out / "finetune.json").read_text())
    assert meta["method"] == "full" and meta["task"] == "dpo"
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert not (load(out).model.tok_emb.weight == load(files / "base").model.tok_emb.weight).all()


def test_pairs_whose_prompt_is_held_out_are_dropped_and_counted(files, tmp_path):
    # The count reaches the run's report (finetune._Prepared.n_dropped): reward and DPO runs
    # crashed for want of it after the classification/SFT side gained the field.
    pairs = parity_pairs(160, seed=0)
    held = sorted({p.prompt for p in pairs})[:5]
    h.write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": q} for q in held])
    d = read_pair_data(str(files / "pairs.jsonl"), str(tmp_path / "prompts.jsonl"),
                       held_pairs=False, val_fraction=0.1, seed=0, tokenizer=h.tokenizer(),
                       template=ChatTemplate(CHATML), max_len=64, truncate=True)  # fmt: skip
    assert d.n_dropped == sum(p.prompt in held for p in pairs) > 0
    assert len(d.train) + len(d.val) + d.n_dropped == len(pairs)


def test_bad_pairs_file_fails_with_its_line(files, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n"
                   + json.dumps({"prompt": "p", "chosen": "a", "rejected": "a"}) + "\n")  # fmt: skip
    code = main(["dpo", "--model", str(files / "base"), "--data", str(bad), "--out",
                 str(tmp_path / "x"), "--lora", *QUIET])  # fmt: skip
    assert code == 2
    assert f"{bad}:2: fields 'chosen' and 'rejected' are the same text" in capsys.readouterr().err
    assert main(["dpo", "--model", str(files / "base"), "--data", str(bad), "dpo.beta=-1"]) == 2
    assert "dpo.beta" in capsys.readouterr().err


def test_lineage_walks_parents_and_reward_models(tmp_path):
    from pellucid.align.report import lineage
    from pellucid.errors import ConfigError

    def run(name, task, base, **extra):
        d = tmp_path / name
        d.mkdir()
        meta = {"format": "pellucid-finetune/1", "base": str(base), "base_sha256": "0" * 64,
                "task": task, "method": "full", **extra}  # fmt: skip
        (d / "finetune.json").write_text(json.dumps(meta))
        return d

    sft = run("sft", "sft", "smollm2-135m-instruct")
    rm = run("rm", "reward", sft)
    ppo = run("ppo", "ppo", sft, reward_model=str(rm))
    line = lineage(ppo)
    assert [(s.kind, s.spec) for s in line] == [
        ("base", "smollm2-135m-instruct"), ("sft", str(sft)), ("reward", str(rm)),
        ("ppo", str(ppo)),
    ]  # fmt: skip
    loop = run("loop", "dpo", tmp_path / "loop")
    with pytest.raises(ConfigError, match="loops back"):
        lineage(loop)
