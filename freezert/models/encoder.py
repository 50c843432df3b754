"""A small pre-LN transformer encoder classifier (BERT-like shape, learned positions, mean pooling)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["EncoderBlock", "Embeddings", "TransformerEncoderClassifier", "transformer_encoder"]


class Embeddings(nn.Module):
    """Token embedding + learned positional embedding, then LayerNorm and Dropout."""

    def __init__(self, vocab_size: int, d_model: int, max_len: int, dropout: float = 0.0):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.drop(self.norm(self.tok(input_ids) + self.pos(pos)))


class EncoderBlock(nn.Module):
    """Pre-LN block: x + Attn(LN(x)), then x + MLP(LN(x)) with a GELU MLP."""

    def __init__(self, d_model: int, nhead: int, dim_ff: int, dropout: float = 0.0):
        super().__init__()
        if d_model % nhead:
            raise ValueError(f"d_model={d_model} is not divisible by nhead={nhead}")
        self.nhead = nhead
        self.dropout = dropout
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, dim_ff)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(dim_ff, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``attn_mask``: boolean (B, 1, 1, L), True = may be attended to; or additive float; or None."""
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.nhead, d // self.nhead).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, n, d)))
        return x + self.drop(self.fc2(self.act(self.fc1(self.ln2(x)))))


class TransformerEncoderClassifier(nn.Module):
    """``embed`` -> ``layers`` (ModuleList of EncoderBlock) -> ``norm`` -> masked mean pool -> ``head``."""

    def __init__(
        self,
        vocab_size: int = 1000,
        d_model: int = 128,
        nhead: int = 4,
        num_layers: int = 12,
        dim_ff: int = 256,
        num_classes: int = 4,
        max_len: int = 512,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.embed = Embeddings(vocab_size, d_model, max_len, dropout)
        self.layers = nn.ModuleList(EncoderBlock(d_model, nhead, dim_ff, dropout) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``input_ids`` (B, L) long; ``attention_mask`` (B, L), 1 = real token, 0 = padding. Returns logits."""
        x = self.embed(input_ids)
        mask = None
        if attention_mask is not None:
            keep = attention_mask.to(torch.bool)
            mask = keep[:, None, None, :]  # (B, 1, 1, L): every query may attend to the kept keys
        for layer in self.layers:
            x = layer(x, mask)
        x = self.norm(x)
        if attention_mask is None:
            pooled = x.mean(1)
        else:
            w = keep.to(x.dtype).unsqueeze(-1)
            pooled = (x * w).sum(1) / w.sum(1).clamp_min(1.0)
        return self.head(pooled)


def transformer_encoder(
    vocab_size: int = 1000,
    d_model: int = 128,
    nhead: int = 4,
    num_layers: int = 12,
    dim_ff: int = 256,
    num_classes: int = 4,
    max_len: int = 512,
    dropout: float = 0.0,
) -> TransformerEncoderClassifier:
    """A randomly initialised ``TransformerEncoderClassifier`` (dropout 0 by default: deterministic)."""
    return TransformerEncoderClassifier(vocab_size, d_model, nhead, num_layers, dim_ff, num_classes, max_len, dropout)
