"""A neural language model after Bengio et al. (2003): the last n tokens' vectors -> MLP -> softmax.

    x_t = [e(w_{t-n+1}); ...; e(w_t)]            (n * d,)   e: the skip-gram vectors, frozen
    P(w_{t+1} = . | w_{t-n+1..t}) = softmax(b + U tanh(c + H x_t))

Unlike an n-gram table it generalises across contexts: two histories whose tokens have similar
vectors get similar predictions, even if one of them was never seen. It maps (B, T) ids to
(B, T, V) logits like the transformer, so it trains with the same `lm_loss` and windows, and is
evaluated by the same code on the same validation tokens; the first n - 1 positions of a window
see zero vectors where the window has no tokens yet.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class BengioLM(nn.Module):
    """Frozen embeddings (V, d) -> concat of the last `n` -> Linear(n d, hidden) -> tanh -> V."""

    def __init__(self, vectors: Tensor, n: int, hidden: int) -> None:
        super().__init__()
        V, d = vectors.shape
        self.n = n
        self.emb = nn.Embedding.from_pretrained(vectors.detach().float().clone(), freeze=True)
        self.hidden = nn.Linear(n * d, hidden)
        self.out = nn.Linear(hidden, V)

    def forward(self, ids: Tensor) -> Tensor:
        """ids: (B, T) int64 -> (B, T, V) logits of the token after each position."""
        x = F.pad(self.emb(ids), (0, 0, self.n - 1, 0))  # (B, T + n - 1, d), zeros before the start
        ctx = x.unfold(1, self.n, 1)  # (B, T, d, n): positions t-n+1 .. t
        ctx = ctx.transpose(-1, -2).flatten(2)  # (B, T, n * d), oldest token first
        return self.out(torch.tanh(self.hidden(ctx)))

    def num_params(self) -> int:
        """All parameters, the frozen vectors included."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, context: int) -> float:
        """Training FLOPs per token: 6 x the trained weights (the frozen table costs a lookup)."""
        return 6.0 * sum(p.numel() for p in self.parameters() if p.requires_grad)
