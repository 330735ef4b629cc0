"""Heads over the trunk's hidden states: a classifier and a scalar head (reward, value).

A decoder sees the whole text only at its last token (causal attention), so that token's final
hidden state is the sequence's summary (LLMs-from-scratch ch06; HF's *ForSequenceClassification).
Rows are padded on either side; `segments` marks real tokens (!= 0) and keeps padding out of
attention, so right and left padding give the same answer.

    >>> clf = Classifier(Transformer(cfg), n_labels=2)
    >>> clf(ids, segments=(ids != pad).long()).shape     # (B, n_labels)
    >>> rm = ScalarHead(Transformer(cfg))                # one number per position
    >>> rm(ids).shape, rm.reward(ids, segments=seg).shape  # (B, T), (B,)

A reward model reads its scalar at the last real token of prompt + reply (the whole text seen);
a PPO value head reads it at every position.
"""

from __future__ import annotations

from torch import Tensor, nn

from pellucid.model.transformer import Transformer


def last_real_index(segments: Tensor) -> Tensor:
    """(B, T) segment ids, 0 on padding -> (B,) int64 index of each row's last non-padding token.

    >>> last_real_index(torch.tensor([[1, 1, 0], [0, 1, 1]]))
    tensor([1, 2])
    """
    T = segments.shape[1]
    real = (segments != 0).int()  # (B, T)
    return T - 1 - real.flip(-1).argmax(dim=-1)


def head_flops(
    trunk: Transformer, head: nn.Linear, context_len: int | None, lm_head: bool = False
) -> float:
    """Training FLOPs per token of trunk -> hidden states -> a small trained linear head; the
    trunk's own output head counts only where it runs too (`lm_head`: PPO's policy)."""
    return trunk.flops_per_token(context_len, head=lm_head) + 6.0 * head.weight.numel()


class Classifier(nn.Module):
    """trunk (a Transformer) -> hidden state of the last real token -> linear head -> class logits."""

    def __init__(self, trunk: Transformer, n_labels: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.cfg = trunk.cfg
        self.head = nn.Linear(trunk.cfg.n_embd, n_labels, bias=True)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, ids: Tensor, *, segments: Tensor) -> Tensor:
        """ids (B, T) int64, segments (B, T) int64 (1 real, 0 padding) -> (B, n_labels) float32."""
        # Padding in its own segment: real tokens never attend to it, and their positions start
        # at 0 on the first real token whichever side the padding is on.
        hidden = self.trunk.forward_hidden(ids, segments=segments)  # (B, T, C)
        rows = hidden[range(ids.shape[0]), last_real_index(segments)]  # (B, C)
        return self.head(rows).float()

    def flops_per_token(self, context_len: int | None = None) -> float:
        """Training FLOPs per token: the trunk's without its output head (never run here)."""
        return head_flops(self.trunk, self.head, context_len)


class ScalarHead(nn.Module):
    """trunk (a Transformer) -> Linear(n_embd, 1) at every position: one float per token.

    value_head=True: PPO's value head, on a policy whose output head runs too (it counts in the
    FLOPs); a reward model's never runs.
    """

    def __init__(self, trunk: Transformer, value_head: bool = False) -> None:
        super().__init__()
        self.trunk, self.value_head = trunk, value_head
        self.cfg = trunk.cfg
        self.head = nn.Linear(trunk.cfg.n_embd, 1, bias=True)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, ids: Tensor, *, segments: Tensor | None = None) -> Tensor:
        """ids (B, T) int64, segments (B, T) int64 or None (all real) -> (B, T) float32."""
        hidden = self.trunk.forward_hidden(ids, segments=segments)  # (B, T, C)
        return self.head(hidden).squeeze(-1).float()

    def reward(self, ids: Tensor, *, segments: Tensor) -> Tensor:
        """The value at each row's last real token: (B, T) ids and segments -> (B,) float32."""
        values = self(ids, segments=segments)  # (B, T)
        return values[range(ids.shape[0]), last_real_index(segments)]

    def flops_per_token(self, context_len: int | None = None) -> float:
        """Training FLOPs per token: the trunk's, its output head only under a value head."""
        return head_flops(self.trunk, self.head, context_len, lm_head=self.value_head)


def train_last_blocks(model: Classifier, n: int) -> None:
    """Train only the head, the final norm and the last `n` blocks (n < 0: everything)."""
    if n < 0:
        return
    for p in model.trunk.parameters():
        p.requires_grad_(False)
    keep = [model.trunk.norm, *list(model.trunk.blocks)[len(model.trunk.blocks) - n :]]
    for module in keep:
        for p in module.parameters():
            p.requires_grad_(True)
