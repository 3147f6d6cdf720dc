"""The built-in components: importing this module once registers every one of them.

Each module below registers its factories with `@register(kind, name)` when it is imported;
this is the one place that imports them for that purpose (`mmtrain.build` and
`mmtrain list` import this module). A new built-in component module is added here.
Their heavy dependencies (transformers' models, torchmetrics) are imported when a
component is built, not here, so listing and checking stay fast.
"""

from mmtrain import loggers, optim
from mmtrain.data import augment, hf, manifest, negatives, shapes, shards
from mmtrain.models import classifier, contrastive, fusion, zeroshot

MODULES = (
    loggers,
    optim,
    augment,
    hf,
    manifest,
    negatives,
    shapes,
    shards,
    classifier,
    contrastive,
    fusion,
    zeroshot,
)
