"""Recall@k in blocks of bounded memory, and embeddings gathered across ranks as tensors."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mmtrain import distributed
from mmtrain.metrics import RetrievalMetrics
from mmtrain.retrieval import block_rows, recall_at_k, topk


def full_matrix_recall(images, texts, keys, ks=(1, 5)):
    """The computation recall@k replaced: the whole N x N similarity and match matrices."""
    index = {key: i for i, key in enumerate(dict.fromkeys(keys))}
    groups = torch.tensor([index[key] for key in keys])
    similarity = images @ texts.T
    same = groups[:, None] == groups[None, :]
    values = {}
    for k in ks:
        k_eff = min(k, len(groups))
        top_texts = similarity.topk(k_eff, dim=1).indices
        top_images = similarity.topk(k_eff, dim=0).indices.T
        values[f"recall@{k}_i2t"] = float(same.gather(1, top_texts).any(1).float().mean())
        values[f"recall@{k}_t2i"] = float(same.gather(1, top_images).any(1).float().mean())
    return values


def noisy_pairs(n, dim, captions, seed=0):
    """n image-text pairs whose texts are their images plus noise; captions drawn from a
    pool of `captions`, so many rows share one (identical captions, identical text)."""
    generator = torch.Generator().manual_seed(seed)
    pool = torch.nn.functional.normalize(torch.randn(captions, dim, generator=generator), dim=-1)
    caption = torch.randint(captions, (n,), generator=generator)
    texts = pool[caption]
    images = texts + 0.8 * torch.randn(n, dim, generator=generator) / dim**0.5
    return torch.nn.functional.normalize(images, dim=-1), texts, caption


@pytest.mark.parametrize("budget", [4 * 300, 4 * 300 * 7, 4 * 300 * 1000])  # 1, 7, all rows
def test_block_recall_equals_the_full_matrix_with_duplicate_captions(budget):
    images, texts, caption = noisy_pairs(300, 16, captions=120)
    keys = [(int(c),) for c in caption]
    expected = full_matrix_recall(images, texts, keys)
    groups = torch.unique(caption, return_inverse=True)[1]
    got = recall_at_k(images, texts, groups, (1, 5), budget_bytes=budget)
    assert got == expected
    # Duplicates matter here: counting only a row's own caption as a hit scores lower.
    alone = recall_at_k(images, texts, torch.arange(300), (1, 5), budget_bytes=budget)
    assert alone["recall@1_i2t"] < got["recall@1_i2t"]
    assert 0.2 < got["recall@1_i2t"] < 1.0  # neither trivial nor hopeless


def test_topk_blocks_match_one_full_topk_and_bound_the_block():
    queries, keys = torch.randn(50, 8), torch.randn(40, 8)
    scores, indices = topk(queries, keys, 3, budget_bytes=4 * 40 * 6)  # 6 queries per block
    full = (queries @ keys.T).topk(3, dim=1)
    # A block's matmul may round the last bit differently from the full one; the order agrees.
    assert torch.equal(indices, full.indices) and torch.allclose(scores, full.values, atol=1e-6)
    assert block_rows(100_000) * 100_000 * 4 <= 256 * 2**20
    assert topk(queries, keys[:2], 5)[1].shape == (50, 2)  # k larger than the keys


def test_metrics_group_captions_by_tokens_whatever_the_batch_padding():
    images, texts, caption = noisy_pairs(96, 16, captions=40, seed=1)
    expected = full_matrix_recall(images, texts, [(int(c),) for c in caption])
    metrics = RetrievalMetrics(torch.device("cpu"))
    for start, width in ((0, 3), (32, 6), (64, 9)):  # each batch padded to its own length
        rows = slice(start, start + 32)
        ids = torch.zeros(32, width, dtype=torch.long)
        ids[:, 0], ids[:, 1] = 1, caption[rows] + 10  # [start, caption token, pad...]
        mask = torch.zeros_like(ids)
        mask[:, :2] = 1
        batch = {"input_ids": ids, "attention_mask": mask, "index": torch.arange(32) + start}
        output = {
            "loss": torch.tensor(1.0),
            "image_embeds": images[rows],
            "text_embeds": texts[rows],
        }
        metrics.update(output, batch)
    values = metrics.compute()
    assert {k: v for k, v in values.items() if k != "loss"} == expected
    assert torch.equal(metrics.gathered["rows"], torch.arange(96))


def _gather_worker(rank: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        rows = 3 if rank == 0 else 5  # unequal shares, as the last validation batch leaves
        mine = torch.arange(rows * 2, dtype=torch.float32).view(rows, 2) + 100 * rank
        gathered = distributed.gather_rows(mine)
        longest = distributed.maximum(rows, torch.device("cpu"))
        torch.save((gathered, longest), f"{folder}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_gather_rows_pads_unequal_ranks_and_cuts_the_padding_off(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_gather_worker, args=(port, str(tmp_path)), nprocs=2, start_method="spawn")
    results = {rank: torch.load(tmp_path / f"{rank}.pt") for rank in (0, 1)}
    expected = torch.cat([torch.arange(6.0).view(3, 2), torch.arange(10.0).view(5, 2) + 100])
    for rank in (0, 1):
        gathered, longest = results[rank]
        assert torch.equal(gathered, expected) and longest == 5


# --- several captions per image: the COCO/Flickr30k protocol ------------------------------

# Scores of 3 images (rows: A, B, C) against 5 captions (columns: a1, a2, b1, b2, c1), chosen
# by hand: every row and every column holds distinct values.
SCORES = torch.tensor(
    [
        [0.9, 0.1, 0.8, 0.3, 0.2],
        [0.7, 0.2, 0.6, 0.5, 0.4],
        [0.1, 0.3, 0.2, 0.4, 0.05],
    ]
)
IMAGE_OF_ROW = torch.tensor([0, 0, 1, 1, 2])  # rows a1, a2 show A; b1, b2 show B; c1 shows C
# By hand. Image to text, per image its captions ranked by score:
#   A: a1 .9, b1 .8            top-1 hit (a1), top-2 hit
#   B: a1 .7, b1 .6            top-1 miss,     top-2 hit (b1)
#   C: b2 .4, a2 .3            top-1 miss,     top-2 miss (c1 scores .05)
# Text to image, per caption the images ranked by score:
#   a1: A .9, B .7   hit, hit      a2: C .3, B .2   miss, miss     b1: A .8, B .6   miss, hit
#   b2: B .5, C .4   hit, hit      c1: B .4, A .2   miss, miss
BY_HAND = {
    "recall@1_i2t": 1 / 3,
    "recall@2_i2t": 2 / 3,
    "recall@1_t2i": 2 / 5,
    "recall@2_t2i": 3 / 5,
}


def test_several_captions_per_image_follow_the_coco_protocol_computed_by_hand():
    images = torch.eye(3)[IMAGE_OF_ROW]  # image u is axis u, so image u . text j = SCORES[u, j]
    texts = SCORES.T.contiguous()
    for budget in (4 * 5, 4 * 5 * 100):  # one query per block, and all at once
        got = recall_at_k(
            images, texts, torch.arange(5), (1, 2), budget_bytes=budget, image_ids=IMAGE_OF_ROW
        )
        assert got == pytest.approx(BY_HAND, abs=1e-7)
    # Each row an image of its own (before the protocol): A's two copies fill b1's top 2.
    per_row = recall_at_k(images, texts, torch.arange(5), (1, 2))
    assert per_row["recall@2_t2i"] == pytest.approx(2 / 5)


def test_validation_merges_rows_with_the_same_pixels_into_one_image():
    from mmtrain.retrieval import image_keys

    generator = torch.Generator().manual_seed(0)
    pictures = torch.randint(256, (3, 3, 8, 8), generator=generator, dtype=torch.uint8)
    keys = image_keys(pictures[IMAGE_OF_ROW])
    assert torch.equal(keys[0], keys[1]) and not torch.equal(keys[1], keys[2])
    changed = pictures[:1].clone()
    changed[0, 1, 4, 4] ^= 1  # one bit of one pixel
    assert not torch.equal(image_keys(changed)[0], image_keys(pictures[:1])[0])

    metrics = RetrievalMetrics(torch.device("cpu"))
    for rows in (slice(0, 3), slice(3, 5)):  # the rows of one image may be in two batches
        ids = torch.tensor([[1, 10 + i, 2] for i in range(5)])[rows]
        batch = {
            "images": pictures[IMAGE_OF_ROW][rows],
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "index": torch.arange(5)[rows],
        }
        output = {
            "loss": torch.tensor(1.0),
            "image_embeds": torch.eye(3)[IMAGE_OF_ROW][rows],
            "text_embeds": SCORES.T[rows],
        }
        metrics.update(output, batch)
    metrics.KS = (1, 2)
    values = metrics.compute()
    assert {k: v for k, v in values.items() if k != "loss"} == pytest.approx(BY_HAND, abs=1e-7)
