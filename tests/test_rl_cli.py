"""`pellucid rlhf` end to end on a tiny base: GRPO and PPO runs, the run directory as a model spec,
resuming, and bad input reported in one line."""

import json

import finetune_helpers as fh
import pytest

from pellucid.align.report import lineage
from pellucid.cli import main
from pellucid.errors import ConfigError, DataError
from pellucid.rlhf import load_rlhf_config, rlhf

SMALL = ["rl.iterations=2", "rl.prompts_per_iteration=4", "rl.group_size=2", "rl.max_new_tokens=4",
         "train.batch_size=4", "eval_max=4"]  # fmt: skip


@pytest.fixture
def base(tmp_path):
    fh.write_jsonl(tmp_path / "p.jsonl", fh.parity_rows(24, 0))
    return fh.base_run(tmp_path / "base")


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_rlhf_runs_and_resumes(base, tmp_path, capsys, algo):
    out = tmp_path / algo
    args = ["rlhf", "--policy", str(base), "--prompts", str(tmp_path / "p.jsonl"), "--algo", algo]
    assert main([*args, "--lora", "--out", str(out), "--json", *SMALL]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert set(scores) == {"before", "after"} and "kl" in scores["after"]
    assert 0 <= scores["after"]["exact_match"] <= 1
    for name in (
        "config.json",
        "finetune.json",
        "metrics.jsonl",
        "rl.png",
        "eval.json",
        "report.md",
    ):
        assert (out / name).is_file(), name
    report = (out / "report.md").read_text()
    assert str(base.resolve()) in report and "rollout" in report and "update" in report
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 * 4  # 2 iterations x 8 replies x 2 epochs / 4 replies a step
    for key in ("entropy", "kl", "reward", "clip_frac"):
        assert all(key in r for r in records), key
    if algo == "ppo":
        assert all("value_error" in r for r in records)
    # finetune.json names the parent, so `pellucid report` finds the whole line.
    assert [stage.kind for stage in lineage(str(out))] == ["base", algo]
    # The run directory is a model spec: the policy, its adapters merged (PPO's value head aside).
    gen = ["generate", "--model", str(out), "Is 3 even or odd?", "--max-new-tokens", "3"]
    assert main(gen) == 0
    # Two more iterations from the last checkpoint: the steps continue where they stopped.
    assert main(["rlhf", "--resume", str(out), "rl.iterations=4"]) == 0
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 17))
    assert [r["iteration"] for r in records[8:]] == [2] * 4 + [3] * 4
    assert "per iteration (mean of this session's 2)" in (out / "report.md").read_text()
    # Resuming a finished run trains nothing; its report says so (it said "rollout 0.0 s").
    assert main(["rlhf", "--resume", str(out)]) == 0
    assert "none ran in this session" in (out / "report.md").read_text()


def test_task_reward_needs_answers(tmp_path):
    fh.write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Say hi."}] * 10)
    run = load_rlhf_config("x", "tasks", str(tmp_path / "p.jsonl"), assignments=SMALL)
    with pytest.raises(DataError, match=r"p\.jsonl: row 1 has no 'answer'"):
        rlhf(run, tmp_path / "out")


def test_batch_must_divide_the_replies_of_an_iteration():
    with pytest.raises(ConfigError, match="must divide the replies per iteration"):
        load_rlhf_config("x", "tasks", "p.jsonl", assignments=[*SMALL, "train.batch_size=3"])


def test_grpo_needs_groups_and_bad_values_are_named(capsys):
    with pytest.raises(ConfigError, match="group_size"):
        load_rlhf_config("x", "tasks", "p.jsonl", algo="grpo", assignments=["rl.group_size=1"])
    assert main(["rlhf", "--prompts", "p.jsonl", "rl.clip=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pellucid: error:") and "rl.clip" in err and "\n" not in err


def test_unknown_oracle_fails_before_loading_a_model(tmp_path, base):
    code = main(["rlhf", "--policy", str(base), "--prompts", str(tmp_path / "p.jsonl"),
                 "--reward", "oracle:sentencez", "--out", str(tmp_path / "o")])  # fmt: skip
    assert code == 2


def test_a_reward_spec_that_is_no_reward_model_is_refused(base, tmp_path, capsys):
    code = main(["rlhf", "--policy", str(base), "--prompts", str(tmp_path / "p.jsonl"),
                 "--reward", str(base), "--out", str(tmp_path / "o"), *SMALL])  # fmt: skip
    assert code == 2
    assert "is not a reward model" in capsys.readouterr().err
