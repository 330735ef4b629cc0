"""The ladder's outputs: ladder.json, ladder.png (bits per byte by rung and against training time)
and ladder.html (one self-contained page: the table, then the samples side by side).

    ladder.json   {"rungs": [{"name", "kind", "bits_per_byte", "seconds", "size", "sample"}, ...]}

in ladder order, the transformer last; `bits_per_byte` is null for the vectors (not a language
model), `size` counts parameters or table entries, `sample` is the continuations of the prompts.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path

from pellucid.files import atomic_open, atomic_write
from pellucid.history.ladder import Rung

JSON_FILE, PNG_FILE, HTML_FILE = "ladder.json", "ladder.png", "ladder.html"


def write_outputs(out_dir: Path, rungs: Sequence[Rung]) -> None:
    """Write the three files into `out_dir` (each atomically)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {"rungs": [r.to_json() for r in rungs]}
    atomic_write(out_dir / JSON_FILE, json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    plot(rungs, out_dir / PNG_FILE)
    atomic_write(out_dir / HTML_FILE, page(rungs))


def plot(rungs: Sequence[Rung], path: Path) -> None:
    """Left: bits per byte of each rung, as bars. Right: bits per byte against training seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [r for r in rungs if r.bits_per_byte is not None]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    names = [r.name for r in scored]
    colors = [
        f"C{('uniform', 'unigram', 'ngram', 'neural', 'transformer').index(r.kind)}" for r in scored
    ]
    left.barh(names, [r.bits_per_byte for r in scored], color=colors)
    left.invert_yaxis()  # the ladder reads top to bottom, first rung first
    for i, r in enumerate(scored):
        left.text(r.bits_per_byte, i, f" {r.bits_per_byte:.3f}", va="center", fontsize=8)
    left.set(xlabel="validation bits per byte (lower is better)", title="the ladder")
    left.grid(axis="x", alpha=0.3)
    for r, c in zip(scored, colors, strict=True):
        right.plot(r.seconds, r.bits_per_byte, "o", color=c)
        right.annotate(
            r.name.split(" (")[0],  # "4-gram", not "4-gram (Kneser-Ney)": the points crowd
            (r.seconds, r.bits_per_byte),
            fontsize=7,
            xytext=(4, 3),
            textcoords="offset points",
        )
    right.set_xscale("symlog", linthresh=1.0)  # 0 s (the uniform rung) to minutes
    right.set(
        xlabel="training time (s)",
        ylabel="bits per byte",
        title="bits per byte against training time",
    )
    right.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse}td,th{padding:.3em .8em;border-bottom:1px solid #ddd;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.row{display:flex;gap:1em;overflow-x:auto;padding-bottom:1em}
.card{flex:0 0 22em;border:1px solid #ccc;border-radius:6px;padding:.6em;background:#fafafa}
.card h3{font-size:.95em;margin:0 0 .4em}pre{white-space:pre-wrap;font-size:.8em;margin:0}
b.p{background:#ffe9a8}
"""


def _cell(value: object) -> str:
    return f'<td class="n">{html.escape(str(value))}</td>'


def page(rungs: Sequence[Rung]) -> str:
    """The HTML page; every piece of text from a rung is escaped."""
    e = html.escape
    rows = "".join(
        f"<tr><td>{e(r.name)}</td><td>{e(r.kind)}</td>"
        + _cell("-" if r.bits_per_byte is None else f"{r.bits_per_byte:.4f}")
        + _cell(f"{r.seconds:.1f}")
        + _cell(f"{r.size:,}")
        + "</tr>"
        for r in rungs
    )
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>pellucid ladder</title>",
        f"<style>{_STYLE}</style></head><body><h1>The ladder</h1>",
        "<p>Every rung on the same tokens, scored in validation bits per byte.</p>",
        "<table><tr><th>rung</th><th>kind</th><th>bits/byte</th><th>seconds</th><th>size</th></tr>",
        rows,
        "</table>",
    ]
    prompts = next((r.samples for r in rungs if r.samples), [])
    for i, (prompt, _) in enumerate(prompts):
        cards = "".join(
            f"<div class='card'><h3>{e(r.name)}</h3><pre><b class='p'>{e(r.samples[i][0])}</b>"
            f"{e(r.samples[i][1])}</pre></div>"
            for r in rungs
            if len(r.samples) > i
        )
        parts.append(f"<h2>Prompt {e(repr(prompt))}</h2><div class='row'>{cards}</div>")
    for r in rungs:
        if r.text:
            parts.append(f"<h2>{e(r.name)}</h2><pre>{e(r.text)}</pre>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
