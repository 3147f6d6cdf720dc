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


# Weights of `image_keys`: below 2**24, so a key of an image up to 2**21 values (836 x 836 x 3)
# is an exact integer in float64, whatever the order of the sum.
KEY_WEIGHT_BITS = 24
KEY_COLUMNS = 4
_key_weights: dict[tuple[int, str], torch.Tensor] = {}


def image_keys(images: torch.Tensor) -> torch.Tensor:
    """[B, 4] int64 keys of a batch of uint8 images: equal for the same pixels, different
    for different ones (four random linear hashes: a chance collision is below 2**-90)."""
    flat = images.reshape(len(images), -1)
    key = (flat.shape[1], str(flat.device))
    if key not in _key_weights:
        generator = torch.Generator().manual_seed(flat.shape[1])
        weights = torch.randint(
            2**KEY_WEIGHT_BITS, (flat.shape[1], KEY_COLUMNS), generator=generator
        )
        _key_weights[key] = weights.double().to(flat.device)
    weights = _key_weights[key]
    with torch.autocast(flat.device.type, enabled=False):  # 32 images at a time in float64
        keys = [(part.double() @ weights).long() for part in flat.split(32)]
    return torch.cat(keys) if keys else flat.new_zeros((0, KEY_COLUMNS), dtype=torch.long)


def recall_at_k(
    images: torch.Tensor,
    texts: torch.Tensor,
    groups: torch.Tensor,
    ks: Iterable[int] = (1, 5),
    budget_bytes: int = BUDGET_BYTES,
    image_ids: torch.Tensor | None = None,
) -> dict[str, float]:
    """`recall@k_i2t` and `recall@k_t2i` of N image-text rows (row i of `images` goes with
    row i of `texts`), by the COCO/Flickr30k protocol.

    Rows with the same `image_ids` entry show one image (several captions per image);
    without `image_ids` every row is an image of its own. Image-to-text queries each unique
    image against every row's caption: a hit is any caption of that image. Text-to-image
    queries each caption against the unique images: a hit is its own image. Rows with the
    same `groups` entry have the same caption, so a retrieved caption (or image) that is
    described by the very text of the query's own is a hit too, not a miss.
    """
    ks = tuple(ks)
    groups = torch.unique(groups, return_inverse=True)[1]
    rows = torch.arange(len(groups), device=groups.device)
    if image_ids is None:
        image_ids = rows
    image_ids = torch.unique(image_ids, return_inverse=True)[1]
    count = int(image_ids.max()) + 1 if len(image_ids) else 0
    # The first row of each image holds its embedding.
    first = torch.full((count,), len(rows), device=rows.device)
    first = first.scatter_reduce(0, image_ids, rows, reduce="amin")
    unique = images[first]
    # (image, caption) pairs that are hits, as image x captions + caption: sorted, unique.
    span = int(groups.max()) + 1 if len(groups) else 1
    relevant = torch.unique(image_ids * span + groups)
    _, top = topk(unique, texts, max(ks), budget_bytes)  # [images, k] caption rows
    mine = torch.arange(count, device=top.device)
    i2t = torch.isin(mine[:, None] * span + groups[top], relevant)
    _, top = topk(texts, unique, max(ks), budget_bytes)  # [captions, k] images
    t2i = torch.isin(top * span + groups[:, None], relevant)
    hits = {"i2t": i2t, "t2i": t2i}
    return {
        f"recall@{k}_{way}": float(hits[way][:, :k].any(1).float().mean())
        for k in ks
        for way in ("i2t", "t2i")
    }
