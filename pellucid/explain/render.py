"""Views of the explain data (trace.explain's dict): terminal tables, matplotlib figures, HTML.

Each view only lays out what the dict holds; none computes anything about the model, so the
terminal, the PNG files, the HTML report and the web page always agree.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from pellucid.files import atomic_write

# --- terminal -------------------------------------------------------------------------------------


def _show(text: str) -> str:
    """A token's text with whitespace made visible and other control characters escaped."""
    text = text.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥")
    return "".join(f"\\x{ord(c):02x}" if ord(c) < 32 or ord(c) == 127 else c for c in text)


def _tops(rows: list[dict], n: int = 5, key: str = "prob") -> str:
    return "  ".join(f"{_show(r['text'])} {r[key]:.3f}" for r in rows[:n])


def terminal(data: dict[str, Any], console: Console) -> None:
    """Print the whole walk-through as tables, in pipeline order."""
    m = data["model"]
    console.rule(f"[bold]explain[/] {data['prompt']!r}")
    console.print(
        f"model: {m['n_layer']} layers, {m['n_head']} heads ({m['n_kv_head']} KV), width {m['n_embd']}, "
        f"vocab {m['vocab_size']}, {m['pos']} positions, {m['norm']}, {m['mlp']}, {m['params']:,} parameters"
    )
    t = Table(title="1. tokenization: text -> ids")
    for col in ("#", "token", "id", "bytes", "|embedding|", "nearest tokens (cosine)"):
        t.add_column(col)
    emb = data["embeddings"]
    for tok, norm, near in zip(data["tokens"], emb["norms"], emb["nearest"], strict=True):
        nearest = "  ".join(f"{_show(n['text'])} {n['cosine']:.2f}" for n in near[:4])
        t.add_row(
            str(tok["index"]),
            _show(tok["text"]),
            str(tok["id"]),
            tok["bytes"],
            f"{norm:.3f}",
            nearest,
        )
    console.print(t)
    p = data["positions"]
    if p["scheme"] == "rope":
        angles = p["angles_last"]
        console.print(
            f"2. positions: RoPE (theta {p['theta']:g}); {p['pairs']}; at position {p['last_position']} the "
            f"{len(angles)} pairs turn by {angles[0]:.3f} rad (fastest) .. {angles[-1]:.2e} rad (slowest)"
        )
    else:
        console.print(
            f"2. positions: {p['scheme']}; position vector norms {[round(n, 2) for n in p['norms']]}"
        )
    t = Table(title="3. attention: what the last token looks at (every head: --json, --html)")
    for col in ("layer", "mean over heads: top 3", "sharpest head: its top token"):
        t.add_column(col)
    tokens = [_show(x["text"]) for x in data["tokens"]]
    for layer in data["attention"]:
        heads = layer["heads"]
        mean = [sum(h["weights"][-1][i] for h in heads) / len(heads) for i in range(len(tokens))]
        top = sorted(range(len(tokens)), key=mean.__getitem__, reverse=True)[:3]
        sharp = max(heads, key=lambda h: h["top_last"][0]["weight"])
        best = sharp["top_last"][0]
        t.add_row(
            str(layer["layer"]),
            "  ".join(f"{tokens[i]} {mean[i]:.2f}" for i in top),
            f"head {sharp['head']}: {_show(best['text'])} {best['weight']:.2f}",
        )
    console.print(t)
    t = Table(title="4. logit lens: the prediction after each layer")
    t.add_column("after")
    t.add_column("top tokens (probability)")
    for row in data["logit_lens"]:
        t.add_row(row["label"], _tops(row["top"]))
    console.print(t)
    nt = data["next_token"]
    t = Table(title="5. output: logits -> probabilities -> filters -> choice")
    for col in ("stage", "value", "tokens kept", "top tokens after renormalizing"):
        t.add_column(col)
    for s in nt["stages"]:
        t.add_row(
            s["name"],
            "" if s.get("value") is None else str(s["value"]),
            str(s["kept"]),
            _tops(s["top"]),
        )
    console.print(t)
    c = nt["chosen"]
    console.print(
        f"chosen: {_show(c['text'])!r} (id {c['id']}), p = {c['prob']:.4f} after sampling filters"
    )
    cost = data["cost"]
    shapes = ", ".join(
        f"{x['name']} {x['shape'][0]}x{x['shape'][1]}" for x in cost["block_matrices"]
    )
    console.print(
        f"6. cost: per block {shapes}; {cost['forward_flops_per_token'] / 1e6:.1f} MFLOP per token forward; "
        f"KV cache {cost['kv_cache_bytes_per_token']:,} bytes per token"
    )
    if "steps" in data:
        t = Table(title="7. generation: one new token per step, the KV cache grows")
        for col in (
            "step",
            "token",
            "logprob",
            "computed",
            "cache tokens",
            "cache bytes",
            "alternatives",
        ):
            t.add_column(col)
        for s in data["steps"]:
            alts = _tops(s["top"], 3, "logprob")
            t.add_row(
                str(s["step"]),
                _show(s["text"]),
                f"{s['logprob']:.3f}",
                str(s["new_tokens_computed"]),
                str(s["kv_cache_tokens"]),
                f"{s['kv_cache_bytes']:,}",
                alts,
            )
        console.print(t)


# --- figures ----------------------------------------------------------------------------------------


def figures(data: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """(name, matplotlib Figure) for each plot: attention per layer, logit lens, probabilities."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [_show(t["text"]) for t in data["tokens"]]
    for layer in data["attention"]:
        heads = layer["heads"]
        cols = min(len(heads), 6)
        rows = -(-len(heads) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.4 * rows), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, h in zip(axes.flat, heads, strict=False):
            ax.imshow(h["weights"], cmap="viridis", vmin=0, vmax=1)
            ax.set_title(f"head {h['head']}", fontsize=8)
            if len(labels) <= 16:
                ax.axis("on")
                ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
                ax.set_yticks(range(len(labels)), labels, fontsize=6)
        fig.suptitle(f"attention weights, layer {layer['layer']} (row: query, column: key)")
        fig.tight_layout()
        yield f"attention_layer{layer['layer']:02d}", fig
    lens = data["logit_lens"]
    fig, ax = plt.subplots(figsize=(6, 0.3 * len(lens) + 1))
    ax.imshow([[r["top"][0]["prob"]] for r in lens], cmap="magma", vmin=0, vmax=1, aspect="auto")
    ax.set_yticks(
        range(len(lens)), [f"{r['label']}: {_show(r['top'][0]['text'])}" for r in lens], fontsize=7
    )
    ax.set_xticks([])
    ax.set_title("logit lens: top token after each layer (colour: its probability)")
    fig.tight_layout()
    yield "logit_lens", fig
    top = data["next_token"]["top"]
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.barh([_show(r["text"]) for r in top][::-1], [r["prob"] for r in top][::-1])
    ax.set_xlabel("probability")
    ax.set_title("next-token distribution (softmax of the logits)")
    fig.tight_layout()
    yield "next_token", fig


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def save_pngs(data: dict[str, Any], folder: Path) -> list[Path]:
    """Write every figure as folder/NAME.png (atomically); return the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in figures(data):
        atomic_write(folder / f"{name}.png", _png(fig))
        paths.append(folder / f"{name}.png")
    return paths


# --- HTML -------------------------------------------------------------------------------------------

_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}
th{background:#f3f3f3}img{max-width:100%}code{background:#f3f3f3;padding:0 3px}"""


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(fig: Any, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(_png(fig)).decode()}">'


def to_html(data: dict[str, Any]) -> str:
    """One self-contained HTML page (inline CSS and PNG plots, no scripts, no network)."""
    figs = dict(figures(data))
    emb = data["embeddings"]
    tok_rows = [
        [
            t["index"],
            _show(t["text"]),
            t["id"],
            t["bytes"],
            n,
            "  ".join(f"{_show(x['text'])} {x['cosine']:.2f}" for x in near[:4]),
        ]
        for t, n, near in zip(data["tokens"], emb["norms"], emb["nearest"], strict=True)
    ]
    p = data["positions"]
    pos = f"RoPE, theta {p['theta']:g}: {p['pairs']}" if p["scheme"] == "rope" else p["scheme"]
    attn = "".join(
        f'<h3 id="attention-{k[-2:]}">{html.escape(k)}</h3>{_img(f, k)}'
        for k, f in figs.items()
        if k.startswith("attention")
    )
    lens_rows = [[r["label"], _tops(r["top"])] for r in data["logit_lens"]]
    stage_rows = [
        [s["name"], s.get("value", ""), s["kept"], _tops(s["top"])]
        for s in data["next_token"]["stages"]
    ]
    cost = data["cost"]
    cost_rows = [
        [x["name"], f"{x['shape'][0]} x {x['shape'][1]}", f"{x['flops_per_token']:,}"]
        for x in cost["block_matrices"]
    ]
    c = data["next_token"]["chosen"]
    sections = [
        f"<h1>explain: <code>{html.escape(data['prompt'])}</code></h1>",
        f"<p>{html.escape(json.dumps(data['model']))}</p>",
        '<h2 id="tokens">1. Tokens and embeddings</h2>'
        + _table(["#", "token", "id", "bytes", "|embedding|", "nearest"], tok_rows),
        f'<h2 id="positions">2. Positions</h2><p>{html.escape(pos)}</p>',
        f'<h2 id="attention">3. Attention</h2>{attn}',
        f'<h2 id="logit-lens">4. Logit lens</h2>{_img(figs["logit_lens"], "logit lens")}'
        + _table(["after", "top tokens"], lens_rows),
        f'<h2 id="next-token">5. Next token</h2>{_img(figs["next_token"], "next-token probabilities")}'
        + _table(["stage", "value", "kept", "top after renormalizing"], stage_rows)
        + f"<p>chosen: <b>{html.escape(_show(c['text']))}</b> (id {c['id']}, p = {c['prob']:.4f})</p>",
        '<h2 id="cost">6. Cost</h2>'
        + _table(["matrix", "shape", "FLOPs per token"], cost_rows)
        + f"<p>KV cache: {cost['kv_cache_bytes_per_token']:,} bytes per token; "
        f"{cost['forward_flops_per_token'] / 1e6:.1f} MFLOP per token forward</p>",
    ]
    if "steps" in data:
        rows = [
            [s["step"], _show(s["text"]), s["logprob"], s["kv_cache_tokens"], s["kv_cache_bytes"]]
            for s in data["steps"]
        ]
        sections.append(
            '<h2 id="steps">7. Generation steps</h2>'
            + _table(["step", "token", "logprob", "cache tokens", "cache bytes"], rows)
        )
    body = "\n".join(sections)
    return f'<!doctype html><html><head><meta charset="utf-8"><title>pellucid explain</title><style>{_CSS}</style></head><body>{body}</body></html>'


def save_html(data: dict[str, Any], path: Path) -> None:
    """Write the HTML report atomically."""
    atomic_write(path, to_html(data).encode("utf-8"))


def terminal_train(data: dict[str, Any], console: Console) -> None:
    """Print explain_train's data: loss per position, gradients, AdamW updates, dropout."""
    console.rule(f"[bold]one training step[/] on {data['text']!r}")
    t = Table(title=f"1. cost: cross-entropy per position (mean = loss = {data['loss']:.4f})")
    for col in ("#", "input", "target", "p(target)", "-log p"):
        t.add_column(col)
    for r in data["loss_per_position"]:
        t.add_row(
            str(r["index"]),
            _show(r["input"]),
            _show(r["target"]),
            f"{r['prob']:.4f}",
            f"{r['loss']:.3f}",
        )
    console.print(t)
    t = Table(
        title=f"2-3. backpropagation and the AdamW step (lr {data['lr']:g}, weight decay {data['weight_decay']:g})"
    )
    for col in ("part", "|gradient|", "|W|", "|update|", "|update| / |W|"):
        t.add_column(col)
    grads = {g["part"]: g["norm"] for g in data["grad_norms"]}
    for u in data["updates"]:
        t.add_row(
            u["part"],
            f"{grads.get(u['part'], 0):.4g}",
            f"{u['weight_norm']:.4g}",
            f"{u['update_norm']:.4g}",
            f"{u['ratio']:.2e}",
        )
    console.print(t)
    t = Table(
        title=f"4. dropout (p = {data['dropout']:g}): activations zeroed during the forward pass"
    )
    for col in ("module", "zeroed", "of", "fraction"):
        t.add_column(col)
    for d in data["dropout_zeroed"]:
        t.add_row(
            d["module"] or "(model)",
            f"{d['zeroed']:,}",
            f"{d['elements']:,}",
            f"{d['fraction']:.3f}",
        )
    console.print(t)
