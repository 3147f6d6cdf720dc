"""mmtrain eval run=RUN_DIR [split=val|test] [checkpoint=PATH] [OVERRIDES]
mmtrain eval out=DIR [split=val|test] [GROUP=OPTION ...] [OVERRIDES]

A finished run's metrics on one split (default val), with its best checkpoint (else
last.pt, or checkpoint=PATH): printed as a table and written to RUN_DIR/eval_SPLIT.json,
with pictures beside it: a classifier's confusion matrix (confusion_SPLIT.png, and
per-class precision/recall/F1 in the JSON); a contrastive model's retrieval gallery
(retrieval_SPLIT.png) and, when the split has image classes, its zero-shot confusion matrix
(zeroshot_confusion_SPLIT.png). Config overrides of the run may follow, e.g.
data.batch_size=256, data.test=test.csv or zeroshot.templates=simple.

Without run=, the model is built from the config (conf/ plus the overrides) and evaluated
untrained, into out=DIR: a pretrained backbone's zero-shot and retrieval scores, e.g.
  mmtrain eval out=zs model=clip_contrastive model.backbone=DIR data=manifest \
    data.train=train.csv data.val=val.csv
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from mmtrain import assemble
from mmtrain.commands import pictures
from mmtrain.commands.arguments import parse_args
from mmtrain.data.source import SplitData
from mmtrain.errors import UserError
from mmtrain.evaluation import evaluate, fresh_metrics, reference_metrics
from mmtrain.metrics import (
    ClassificationMetrics,
    RetrievalMetrics,
    confusion_matrix,
    per_class_scores,
)
from mmtrain.retrieval import topk
from mmtrain.runlog import write_json
from mmtrain.spec import parse

log = logging.getLogger("mmtrain")
GALLERY_CAPTIONS = 4
GALLERY_K = 5


def evaluate_run(args: list[str], config_path: str | None = None) -> dict[str, float]:
    """`mmtrain eval run=RUN_DIR|out=DIR [split=val|test] [checkpoint=PATH] [overrides]`."""
    own, overrides = parse_args(
        args, (), ("run", "out", "split", "checkpoint"), __doc__, groups=True
    )
    split_name = own.get("split", "val")
    if "run" in own:
        choices = [o for o in overrides if "." not in o.partition("=")[0]]
        if choices or "out" in own:
            raise UserError(
                f"{(choices or ['out=...'])[0]}: with run=, eval uses the run's own config and "
                "writes into the run directory; group choices and out= are for evaluating a "
                "model that was never trained (leave run= out)."
            )
        run = assemble.trained(own["run"], overrides, own.get("checkpoint"))
        splits = run.data()
    elif "out" in own:
        spec = parse(_compose(overrides, config_path))
        run, splits = assemble.untrained(spec, Path(own["out"]).expanduser())
    else:
        raise UserError(
            "Missing run=...: give run=RUN_DIR (a finished `mmtrain train` run), or out=DIR "
            "and the model's config (model=clip_contrastive model.backbone=...) to evaluate "
            "a model without training it."
        )
    if split_name not in splits:
        raise UserError(
            f"split={split_name}: the run's data has no such split (it has {', '.join(splits)}); for a manifest, set data.{split_name}=PATH."
        )
    split = splits[split_name]
    model, device, autocast = run.on_device()
    task = assemble.zeroshot(run.spec, split, run.tokenizer, run.text_length())
    scorer = fresh_metrics(model, device, task)
    metrics = evaluate(model, scorer, run.batches(split), device, autocast)
    references = assemble.references(run.spec, run.shape, run.tokenizer, run.text_length())
    batches = [(name, run.batches(data), task) for name, data, task in references]
    metrics |= reference_metrics(model, batches, device, autocast) or {}
    metrics = {name.replace("val/", f"{split_name}/"): value for name, value in metrics.items()}
    result: dict[str, Any] = {
        "split": split_name,
        "checkpoint": str(run.checkpoint) if run.checkpoint else None,
        "step": run.step,
        "metrics": metrics,
    }
    result |= _pictures(run, split, split_name, scorer)
    write_json(run.path / f"eval_{split_name}.json", result)
    source = run.checkpoint.name if run.checkpoint else "untrained"
    table = Table(title=f"{run.path} - {split_name} split, {source} (step {run.step})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in metrics.items():
        table.add_row(name, f"{value:.4f}")
    Console().print(table)
    log.info("wrote %s and %s", run.path / f"eval_{split_name}.json", ", ".join(result["pictures"]))
    return metrics


def _compose(overrides: list[str], config_path: str | None) -> Any:
    """conf/ (or `config_path`) composed with `overrides`, as `mmtrain train` composes it."""
    from hydra import compose, initialize_config_dir, initialize_config_module

    path = config_path or str(Path(__file__).resolve().parents[2] / "conf")
    if path.startswith("pkg://"):
        context = initialize_config_module(path.removeprefix("pkg://"), version_base=None)
    else:
        context = initialize_config_dir(path, version_base=None)
    with context:
        return compose("train", overrides=list(overrides))


def _pictures(run: assemble.Trained, split: SplitData, name: str, scorer: Any) -> dict[str, Any]:
    """The pictures of this evaluation, and the per-class scores that go with them."""
    found: dict[str, Any] = {"pictures": []}
    where = f"{run.path.name}, {name} split"
    if isinstance(scorer, ClassificationMetrics):
        confusion = scorer.confusion.compute().cpu()
        names = run.class_names or [str(i) for i in range(len(confusion))]
        found["per_class"] = per_class_scores(confusion, names)
        path = run.path / f"confusion_{name}.png"
        pictures.plot_confusion(confusion, names, path, f"confusion matrix ({where})")
        found["pictures"].append(path.name)
    gathered = scorer.gathered if isinstance(scorer, RetrievalMetrics) else {}
    if "rows" in gathered:  # a contrastive model
        path = run.path / f"retrieval_{name}.png"
        _gallery(split, gathered, path, f"text-to-image retrieval ({where})")
        found["pictures"].append(path.name)
    if "zeroshot_top" in gathered:
        names = scorer.zeroshot.names
        confusion = confusion_matrix(
            gathered["zeroshot_labels"], gathered["zeroshot_top"][:, 0], len(names)
        )
        found["zeroshot_per_class"] = per_class_scores(confusion, names)
        path = run.path / f"zeroshot_confusion_{name}.png"
        pictures.plot_confusion(confusion, names, path, f"zero-shot confusion matrix ({where})")
        found["pictures"].append(path.name)
    return found


def _gallery(split: SplitData, gathered: dict[str, torch.Tensor], path: Path, title: str) -> None:
    """A few captions, spread over the split, with their top-5 images; the own one marked."""
    rows = gathered["rows"].cpu()
    count = min(GALLERY_CAPTIONS, len(rows))
    chosen = torch.linspace(0, len(rows) - 1, count).round().long()
    scores, top = topk(gathered["texts"][chosen], gathered["images"], GALLERY_K)
    top, scores = top.cpu(), scores.cpu()

    def image_of(row: int) -> int:  # rows may share an image (several captions per image)
        return row if split.index is None else int(split.index[row])

    images = torch.stack([torch.stack([split.image(int(rows[j])) for j in line]) for line in top])
    correct = torch.tensor(
        [
            [image_of(int(rows[j])) == image_of(int(rows[c])) for j in line]
            for c, line in zip(chosen, top, strict=True)
        ]
    )
    captions = [
        split.texts[int(rows[c])]
        + ("" if hit.any() else f"\n(own image not in the top {GALLERY_K})")
        for c, hit in zip(chosen, correct, strict=True)
    ]
    pictures.plot_gallery(captions, images, correct, scores, path, title)
