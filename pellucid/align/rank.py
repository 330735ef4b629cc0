"""Collecting rankings: sample K replies per prompt, rank them (a person, or an oracle standing in),
and move rankings out of and into the store as preference pairs.

    model_id = sample_into(store, model, tok, template, "smollm2-135m-instruct", rows, 4, params)
    rank_with_oracle(store, model_id, get_oracle("sentences"))   # or a person: `pellucid rank`
    export_pairs(store, "pairs.jsonl")   # every pair each ranking implies, for reward / DPO

Sampling goes through the one Engine (train/evaluate.replies, as align/pairs.sample_responses
does): reply j to prompt i is seeded `seed + i*K + j`, so the same file, model and seed give the
same replies however they are batched, and a prompt already sampled (a run stopped and started
again) is not sampled twice. Each batch's sample sets are committed as soon as it is done.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pellucid.align.oracle import Oracle, pairs_from_ranking, rank
from pellucid.align.pairs import conversation
from pellucid.align.store import Store
from pellucid.data.preferences import PromptRow, read_pairs, write_pairs
from pellucid.errors import DataError
from pellucid.infer.sampling import SamplingParams
from pellucid.train.evaluate import replies

if TYPE_CHECKING:
    from torch import nn

    from pellucid.tokenizer.bpe import Tokenizer
    from pellucid.tokenizer.chat import ChatTemplate


def sample_into(
    store: Store,
    model: nn.Module,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    spec: str,
    rows: Sequence[PromptRow],
    k: int,
    params: SamplingParams,
    *,
    batch_prompts: int = 8,
    on_progress: Callable[[int, int], None] | None = None,
) -> int:
    """Sample `k` replies to each row's prompt (as one user message in the chat template) and
    store them; returns the store's id for (spec, sampling settings).

    Prompts not sampled yet go through the Engine `batch_prompts` at a time (k rows each, one
    batch); each prompt's set is committed as soon as its batch is done. on_progress(done, n)
    is called after each batch.
    """
    if k < 2:
        raise DataError(f"--k must be at least 2 (a ranking compares replies), got {k}")
    if not rows:
        raise DataError("no prompts to rank")
    model_id = store.add_model(spec, {"k": k, **asdict(params)})
    prompt_ids = [store.add_prompt(row.prompt, row.answer) for row in rows]
    todo = [i for i, pid in enumerate(prompt_ids) if not store.responses(pid, model_id)]
    done = len(rows) - len(todo)
    for run in _runs(todo, batch_prompts):
        # reply j to prompt i is row i*k + j, seeded seed + i*k + j (evaluate.replies' rule)
        seed = None if params.seed is None else params.seed + run[0] * k
        convs = [conversation(rows[i].prompt) for i in run for _ in range(k)]
        texts = replies(model, tokenizer, template, convs, replace(params, seed=seed), len(convs))
        for n, i in enumerate(run):
            store.add_responses(prompt_ids[i], model_id, texts[n * k : (n + 1) * k])
        done += len(run)
        if on_progress is not None:
            on_progress(done, len(rows))
    return model_id


def _runs(positions: Sequence[int], size: int) -> Iterator[list[int]]:
    """Runs of consecutive positions, at most `size` long: [0, 1, 2, 5, 6], 2 -> [0, 1] [2] [5, 6]."""
    run: list[int] = []
    for i in positions:
        if run and (i != run[-1] + 1 or len(run) == size):
            yield run
            run = []
        run.append(i)
    if run:
        yield run


def ranks_from_groups(groups: Sequence[Sequence[Any]]) -> dict[Any, int]:
    """Best-first groups of tied items -> item: rank. [[b], [a, c]] -> {b: 0, a: 1, c: 1}.
    Each item may appear once; DataError otherwise."""
    ranks: dict[Any, int] = {}
    for r, group in enumerate(groups):
        if not group:
            raise DataError(f"group {r + 1} of the order is empty")
        for item in group:
            if item in ranks:
                raise DataError(f"{item!r} appears twice in the order")
            ranks[item] = r
    return ranks


def parse_order(text: str, k: int) -> list[int]:
    """A typed order of replies 1..k, best first, '=' for a tie -> the rank of each reply.

    >>> parse_order("2 1=3 4", 4)   # 2 is best, 1 and 3 tie, 4 is last
    [1, 0, 1, 2]
    """
    groups = []
    for word in text.replace(">", " ").replace(",", " ").split():
        try:
            group = [int(n) for n in word.split("=")]
        except ValueError:
            raise DataError(f"{word!r} is not a reply number (1-{k}) or a tie like 1=3") from None
        if any(not 1 <= n <= k for n in group):
            raise DataError(f"reply numbers go from 1 to {k}; got {word!r}")
        groups.append(group)
    ranks = ranks_from_groups(groups)
    if len(ranks) != k:
        missing = sorted(set(range(1, k + 1)) - set(ranks))
        raise DataError(f"give every reply a place; missing: {' '.join(map(str, missing))}")
    return [ranks[n] for n in range(1, k + 1)]


def rank_with_oracle(
    store: Store, model_id: int, oracle: Oracle, on_prompt: Callable[[], None] | None = None
) -> int:
    """Let `oracle` rank every prompt of this model's samples it has not ranked yet (as ranker
    `oracle:NAME`, its stated preference kept with each ranking); returns how many it ranked."""
    ranker, n = f"oracle:{oracle.name}", 0
    while True:
        prompt, _ = store.next_prompt(ranker, model_id)
        if prompt is None:
            return n
        responses = store.responses(prompt.id, model_id)
        ranks = rank(oracle, prompt.text, [r.text for r in responses], prompt.answer)
        by_id = {r.id: x for r, x in zip(responses, ranks, strict=True)}
        store.save_ranking(prompt.id, model_id, ranker, by_id, note=oracle.description)
        n += 1
        if on_prompt is not None:
            on_prompt()


def export_pairs(store: Store, out: str | Path, ranker: str | None = None) -> dict[str, int]:
    """Write every pair the store's rankings imply (of `ranker` only, if given) to `out` as JSONL.

    A pair with an empty reply on either side is left out (the pair format needs text on both
    sides); returns {"rankings", "pairs", "left_out_empty"}.
    """
    pairs, rankings, empty = [], 0, 0
    for ranking in store.rankings(ranker):
        rankings += 1
        for pair in pairs_from_ranking(ranking.prompt, ranking.responses, ranking.ranks):
            if pair.chosen and pair.rejected:
                pairs.append(pair)
            else:
                empty += 1
    write_pairs(out, pairs)
    return {"rankings": rankings, "pairs": len(pairs), "left_out_empty": empty}


def import_pairs(store: Store, path: str | Path, ranker: str | None = None) -> int:
    """Read a pairs JSONL file into the store, each pair a ranking of its two replies, by
    `ranker` (default `import:FILENAME`). All or nothing: a bad line (or a pair the store
    refuses) raises DataError naming its line, and nothing is stored. Returns the pair count."""
    pairs = read_pairs(path)  # every line checked before anything is written
    items = [
        (f"{path}:{n}", p.prompt, [p.chosen, p.rejected], [0, 1])
        for n, p in enumerate(pairs, start=1)  # json_lines allows no blank line: n is the line
    ]
    return store.import_rankings(items, ranker or f"import:{Path(path).name}", Path(path).name)
