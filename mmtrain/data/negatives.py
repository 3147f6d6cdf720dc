"""Hard-negative texts for contrastive models (`data.hard_negatives=K`).

The data pipeline draws them (in the training collate), so they are data components: a
sampler is registered under kind "negatives" as `fn(text, rng, k, negatives) -> list[str]`,
K texts that should *not* match the image `text` describes. `rng` is a `random.Random`
seeded by (seed, epoch, row index), so negatives are reproducible and resume exactly;
`negatives` is the row's own list of negative texts when the data provides one.
"""

from __future__ import annotations

import random

from mmtrain import registry
from mmtrain.data import augment
from mmtrain.data.shapes import COLOURS, POSITIONS, SHAPES
from mmtrain.errors import UserError
from mmtrain.registry import register

KIND = "negatives"


def _swap_one(text: str, rng: random.Random) -> str | None:
    """`text` with one shapes attribute (colour, shape or position) replaced, if it has one."""
    options = []
    for values in (list(COLOURS), list(SHAPES), list(POSITIONS)):
        present = [value for value in values if value in text]
        if present:
            options.append((present[0], [value for value in values if value != present[0]]))
    if not options:
        return None
    old, others = rng.choice(options)
    return text.replace(old, rng.choice(others), 1)


@register(KIND, "shapes")
def shapes(text: str, rng: random.Random, k: int, negatives: list[str] | None = None) -> list[str]:
    """Captions of `shapes` with one attribute swapped: the negatives of the matching task."""
    found: list[str] = []
    for _ in range(20 * k):
        candidate = _swap_one(text, rng)
        if candidate is None:
            raise UserError(
                f"data.negative_sampler=shapes needs captions naming a shapes colour, shape or position; "
                f"{text!r} names none. Use data.negative_sampler=perturb for other data."
            )
        if candidate not in found:
            found.append(candidate)
        if len(found) == k:
            break
    while len(found) < k:  # fewer distinct swaps exist than asked for
        found.append(rng.choice(found))
    return found


@register(KIND, "perturb")
def perturb(text: str, rng: random.Random, k: int, negatives: list[str] | None = None) -> list[str]:
    """The text augmentations, strongly: words swapped and dropped, characters changed."""
    out = []
    for _ in range(k):
        changed = text
        for _attempt in range(5):
            changed = augment.word_swap(text, rng, p=0.5)
            changed = augment.word_dropout(changed, rng, p=0.2)
            changed = augment.char_noise(changed, rng, p=0.05)
            if changed != text:
                break
        out.append(changed)
    return out


@register(KIND, "manifest")
def manifest(
    text: str, rng: random.Random, k: int, negatives: list[str] | None = None
) -> list[str]:
    """K of the row's own negatives (the manifest's negatives column), drawn with replacement
    when the row has fewer."""
    if not negatives:
        raise UserError(
            "data.negative_sampler=manifest needs a negatives column in the manifest "
            f"(set data.negative_column); the row of {text!r} has none."
        )
    return (
        rng.sample(negatives, k)
        if len(negatives) >= k
        else [rng.choice(negatives) for _ in range(k)]
    )


class NegativeSampler:
    """`(text, epoch, index, negatives) -> K texts`, deterministic in (seed, epoch, index)."""

    def __init__(self, name: str, k: int, seed: int):
        self.fn, self.name, self.k, self.seed = registry.get(KIND, name), name, k, seed

    def __call__(
        self, text: str, epoch: int, index: int, negatives: list[str] | None = None
    ) -> list[str]:
        rng = random.Random(f"{self.seed}:{epoch}:{index}:negatives")
        return self.fn(text, rng, self.k, negatives)
