"""Zero-shot classification with prompts, CLIP's recipe: each class is the mean of the
normalised text embeddings of its name in every prompt template ("a photo of a {}."),
normalised again, and an image is put in the class whose embedding is most similar.

Generic over any `EmbeddingModel` (`mmtrain.models.interface`): it embeds texts with
`embed_texts` and its forward returns `image_embeds`. The tokenizer, the class names and
the labels arrive as values from `mmtrain.assemble`.
"""

from __future__ import annotations

import logging
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from mmtrain.errors import UserError, read_text
from mmtrain.metrics import ZeroShotClasses
from mmtrain.models.interface import EmbeddingModel
from mmtrain.registry import register

# OpenAI's 80 ImageNet prompts (CLIP's notebook; open_clip's OPENAI_IMAGENET_TEMPLATES).
OPENAI_TEMPLATES = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)
# open_clip's SIMPLE_IMAGENET_TEMPLATES: 7 prompts, nearly as good and 11x cheaper.
SIMPLE_TEMPLATES = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)
log = logging.getLogger("mmtrain")
# A share of unknown prompt tokens above which zero-shot scores say little (warned once).
UNKNOWN_SHARE_WARNING = 0.1
BUILT_IN = {"openai": OPENAI_TEMPLATES, "simple": SIMPLE_TEMPLATES, "photo": ("a photo of a {}.",)}
PROMPTS_PER_BATCH = 256


def load_templates(templates: str | list[str], key: str = "zeroshot.templates") -> list[str]:
    """Prompt templates from a built-in set's name, a UTF-8 text file (one per line; blank
    lines and lines starting with # are skipped) or a list; each must hold one empty field
    `{}` (where the class name goes) and no other (`{{` and `}}` are literal braces). Checked
    when the spec is parsed, before anything is built."""
    if isinstance(templates, str) and templates in BUILT_IN:
        return list(BUILT_IN[templates])
    if isinstance(templates, str):
        path = Path(templates).expanduser()
        lines = [line.strip() for line in _read_text(path, key, templates).splitlines()]
        templates = [line for line in lines if line and not line.startswith("#")]
        where = f"{key}={path}"
    else:
        templates, where = [str(t) for t in templates], key
    if not templates:
        raise UserError(
            f"{where}: no prompt templates; give at least one, like 'a photo of a {{}}.'."
        )
    for template in templates:
        problem = _template_problem(template)
        if problem:
            raise UserError(
                f"{where}: the template {template!r} {problem}: it must contain {{}} exactly "
                "once (where the class name goes) and no other field, e.g. 'a photo of a {}.' "
                "(write {{ and }} for a literal brace)."
            )
    return templates


def _read_text(path: Path, key: str, given: str) -> str:
    """The text of a template file; a UserError naming the built-in sets when it is none
    (`mmtrain.errors.read_text` says why a file cannot be read)."""
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise UserError(
            f"{key}={given}: neither a built-in set ({', '.join(BUILT_IN)}) nor a file "
            f"({path.resolve()} {what}); give a set's name, a text file with one "
            "template per line, or a list like '[\"a photo of a {{}}.\"]'."
        )
    return read_text(path, f"{key}={given}")


def _template_problem(template: str) -> str | None:
    """What is wrong with a prompt template (None when it takes the class name once)."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as error:  # a lone { or }
        return f"is not a format string ({error})"
    fields = [name for _, name, _, _ in parts if name is not None]
    named = [name for name in fields if name]
    if named:
        return f"has the field {{{named[0]}}}, which a class name cannot fill"
    if len(fields) != 1:
        return f"has {len(fields)} fields {{}}"
    return None


@dataclass
class ZeroShotTask:
    """Everything zero-shot classification of one split needs besides the model."""

    class_names: list[str]  # in label-id order, as they go into the prompts
    templates: list[str]
    labels: torch.Tensor  # the class id of each row's image
    tokenizer: Any
    max_length: int

    @torch.no_grad()
    def class_embeddings(self, model: EmbeddingModel, device: torch.device) -> torch.Tensor:
        """[C, D]: per class, the renormalised mean of its prompts' text embeddings."""
        return prompt_embeddings(
            model, self.tokenizer, self.max_length, self.class_names, self.templates, device
        )

    def metric_names(self) -> list[str]:
        """What validation reports for it: top-5 only with more than 5 classes."""
        return ["zeroshot_top1", *(["zeroshot_top5"] if len(self.class_names) > 5 else [])]

    def classes(self, model: EmbeddingModel, device: torch.device) -> ZeroShotClasses:
        """The targets the metrics score against, embedded by `model` as it is now."""
        return ZeroShotClasses(self.class_embeddings(model, device), self.labels, self.class_names)


@torch.no_grad()
def prompt_embeddings(
    model: EmbeddingModel,
    tokenizer: Any,
    max_length: int,
    class_names: list[str],
    templates: list[str],
    device: torch.device,
) -> torch.Tensor:
    """[C, D] class embeddings: each name in every template, embedded, averaged, normalised."""
    training = model.training
    model.eval()
    prompts = [template.format(name) for name in class_names for template in templates]
    parts = []
    for start in range(0, len(prompts), PROMPTS_PER_BATCH):
        tokens = tokenizer(
            prompts[start : start + PROMPTS_PER_BATCH],
            padding="longest",
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        parts.append(
            model.embed_texts(tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
        )
    model.train(training)
    embeds = torch.cat(parts).float().view(len(class_names), len(templates), -1)
    return F.normalize(F.normalize(embeds, dim=-1).mean(1), dim=-1)


@register("zeroshot", "prompts")
def prompts(
    *,
    classes: tuple[torch.Tensor, list[str]] | None,
    tokenizer: Any,
    max_length: int,
    class_names: list[str] | None = None,
    templates: str | list[str] = "openai",
    reference: list[str] | None = None,
) -> ZeroShotTask | None:
    """Zero-shot classification of a split's images by prompts of its class names: the
    split's own label names, or `class_names` (the same classes in label-id order, e.g.
    readable names for ids). None when the split has no image classes. `reference`
    (labelled manifests scored the same way at every validation) is read by
    `mmtrain.assemble.references`."""
    prompt_templates = load_templates(templates)
    if classes is None:
        return None
    labels, names = classes
    if class_names is not None:
        if len(class_names) != len(names):
            raise UserError(
                f"zeroshot.class_names has {len(class_names)} names but the data has "
                f"{len(names)} classes ({', '.join(names[:20])}); give one name per class, in "
                "label-id order, or zeroshot.class_names=null to use the data's."
            )
        names = [str(name) for name in class_names]
    task = ZeroShotTask(list(names), prompt_templates, labels, tokenizer, max_length)
    warn_unknown_tokens(task)
    return task


def unknown_share(tokenizer: Any, prompts: list[str]) -> float:
    """The share of the prompts' tokens (special tokens aside) that `tokenizer` reads as
    unknown; 0 for a tokenizer without an unknown token (a byte-level BPE reads anything)."""
    unknown = getattr(tokenizer, "unk_token_id", None)
    if unknown is None or not prompts:
        return 0.0
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    total = sum(len(row) for row in ids)
    return sum(row.count(unknown) for row in ids) / total if total else 0.0


def warn_unknown_tokens(task: ZeroShotTask) -> float:
    """Warn (once, when the task is built) when many prompt tokens are unknown to the
    tokenizer, as for a word-level one built from the captions; return the share."""
    prompts = [template.format(name) for name in task.class_names for template in task.templates]
    share = unknown_share(task.tokenizer, prompts)
    if share > UNKNOWN_SHARE_WARNING:
        log.warning(
            "zero-shot: %.0f%% of the prompts' tokens (%d classes x %d templates) are unknown "
            "to the tokenizer (a tokenizer built from the training captions knows only their "
            "words), so the class embeddings say little and val/zeroshot_* stays near chance. "
            "Write class names and templates in the captions' words (zeroshot.class_names=[...], "
            "zeroshot.templates=FILE or a list like '[\"a picture of a {}\"]'), try "
            "zeroshot.templates=simple, or use a pretrained tokenizer (model.backbone=NAME).",
            100 * share, len(task.class_names), len(task.templates),
        )  # fmt: skip
    return share


@register("zeroshot", "none")
def no_zeroshot(
    *, classes: Any = None, tokenizer: Any = None, max_length: int = 0
) -> ZeroShotTask | None:
    """No zero-shot classification during validation and eval."""
    return None
