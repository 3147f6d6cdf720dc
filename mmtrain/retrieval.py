"""Retrieval over embeddings in bounded memory: each query's top-k keys, a block of queries
at a time.

The full similarity matrix of 100,000 image-text pairs is 40 GB in float32; scoring
`block_rows` queries at a time keeps the extra memory near `budget_bytes` (256 MiB by
default), whatever the number of pairs. Used by the validation metrics (recall@k) and by
`mmtrain predict` (the top-k candidates of each image or text).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

BUDGET_BYTES = 256 * 2**20


def block_rows(keys: int, budget_bytes: int = BUDGET_BYTES) -> int:
    """Queries per block so that one block's [rows, keys] float32 scores fit the budget."""
    return max(1, budget_bytes // (4 * max(keys, 1)))


def topk(
    queries: torch.Tensor, keys: torch.Tensor, k: int, budget_bytes: int = BUDGET_BYTES
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores and indices `[Q, min(k, K)]` of each query's most similar keys (dot product),
    best first."""
    k = min(k, len(keys))
    rows = block_rows(len(keys), budget_bytes)
    scores, indices = [], []
    for start in range(0, len(queries), rows):
        block = queries[start : start + rows] @ keys.T  # [rows, K]: the only large buffer
        top = block.topk(k, dim=1)
        scores.append(top.values)
        indices.append(top.indices)
        del block
    if not scores:
        empty = queries.new_zeros((0, k))
        return empty, empty.long()
    return torch.cat(scores), torch.cat(indices)


def recall_at_k(
    images: torch.Tensor,
    texts: torch.Tensor,
    groups: torch.Tensor,
    ks: Iterable[int] = (1, 5),
    budget_bytes: int = BUDGET_BYTES,
) -> dict[str, float]:
    """`recall@k_i2t` and `recall@k_t2i` of N paired embeddings (row i of `images` goes with
    row i of `texts`). A retrieved item is a hit when its `groups` entry equals the query's:
    rows with the same caption share a group, so a duplicate caption is not a miss."""
    ks = tuple(ks)
    hits = {}
    for way, queries, keys in (("i2t", images, texts), ("t2i", texts, images)):
        _, top = topk(queries, keys, max(ks), budget_bytes)
        hits[way] = groups[top] == groups[:, None]  # [N, k]: small, whatever N
    return {
        f"recall@{k}_{way}": float(hits[way][:, :k].any(1).float().mean())
        for k in ks
        for way in ("i2t", "t2i")
    }
