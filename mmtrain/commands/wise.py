"""mmtrain wise run=RUN_DIR alpha=A[,B,...] [out=DIR]

Weight-space ensembles (WiSE-FT, Wortsman et al. 2022) of a fine-tuned run: its towers at
(1 - alpha) x the starting backbone (the run's model.backbone) + alpha x the fine-tuned
weights; new layers (fusion, head) as trained; LoRA adapters merged first. alpha=0 is the
start, alpha=1 the fine-tuned run. One alpha writes a run directory (default
RUN_DIR/wise_ALPHA) that eval, predict and export take; several write DIR/alpha_A/ for
each, wise.json (each alpha's validation metrics) and wise.png (default DIR: RUN_DIR/wise).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from mmtrain import assemble
from mmtrain.commands.arguments import parse_args
from mmtrain.errors import UserError
from mmtrain.evaluation import evaluate, fresh_metrics, reference_metrics
from mmtrain.spec import of_run

log = logging.getLogger("mmtrain")


def alphas_of(text: str) -> list[float]:
    """alpha=0.5 or alpha=0.25,0.5,0.75 as numbers in [0, 1]; a UserError otherwise."""
    values = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            value = math.nan
        if not 0 <= value <= 1:  # also NaN
            raise UserError(
                f"alpha={text}: {part.strip()!r} is not a number in [0, 1]; give the share of "
                "the fine-tuned weights, e.g. alpha=0.5 or alpha=0.25,0.5,0.75 (0 is the "
                "starting backbone, 1 the fine-tuned run)."
            )
        values.append(value)
    return values


def free_folder(out: Path, what: str) -> Path:
    """`out`, refused when it already holds a run or an average's results (nothing is
    overwritten)."""
    for name in (".hydra", "checkpoints", "wise.json", "soup.json"):
        if (out / name).exists():
            raise UserError(
                f"out={out} already holds {name}; choose a new folder for the {what} "
                "(nothing was written)."
            )
    return out


def val_metrics(
    run: assemble.Trained, split: Any, references: list[tuple[str, Any, Any]] = ()
) -> dict[str, float]:
    """`run`'s validation metrics on `split`, as `mmtrain eval` scores them, and zero-shot
    accuracy on the `references` (`assemble.references`: zeroshot.reference)."""
    net, device, autocast = run.on_device()
    task = assemble.zeroshot(run.spec, split, run.tokenizer, run.text_length())
    metrics = evaluate(net, fresh_metrics(net, device, task), run.batches(split), device, autocast)
    batches = [(name, run.batches(data), task) for name, data, task in references]
    return (metrics or {}) | (reference_metrics(net, batches, device, autocast) or {})


def plot_along_alpha(rows: list[dict[str, Any]], monitor: str, path: Path) -> Path:
    """wise.png: the target metric and the zero-shot (reference) accuracies along alpha."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [monitor] + sorted(
        {n for row in rows for n in row["metrics"] if "zeroshot_top1" in n} - {monitor}
    )
    figure, axes = plt.subplots(figsize=(6, 4))
    for name in names:
        points = [(row["alpha"], row["metrics"][name]) for row in rows if name in row["metrics"]]
        axes.plot(*zip(*points, strict=True), marker="o", label=name)
    axes.set_xlabel("alpha (0: starting backbone, 1: fine-tuned)")
    axes.set_ylabel("validation metric")
    axes.set_title("WiSE-FT: target and reference along alpha")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def wise_run(args: list[str]) -> list[Path]:
    """`mmtrain wise`: the run directories of each alpha's weight-space ensemble."""
    own, overrides = parse_args(args, ("run", "alpha"), ("out", "checkpoint"), __doc__)
    alphas = alphas_of(own["alpha"])
    path = Path(own["run"]).expanduser()
    backbone = of_run(path, overrides).model.options.get("backbone")
    if backbone is None:  # said before any weight is loaded
        raise UserError(
            f"run={path} was trained from scratch (model.backbone=null): it has no pretrained "
            "starting weights to interpolate with; WiSE-FT needs a run that fine-tuned "
            "model.backbone=NAME_OR_DIR."
        )
    default = path / (f"wise_{alphas[0]:g}" if len(alphas) == 1 else "wise")
    out = free_folder(Path(own.get("out") or default).expanduser(), "weight-space ensembles")
    run = assemble.trained(str(path), overrides, own.get("checkpoint"))
    start, tuned = assemble.starting_state(run), assemble.plain_state(run)
    split, refs = None, []
    if len(alphas) > 1:  # scored: the run's validation split and its reference sets
        split = run.data()["val"]
        refs = assemble.references(run.spec, run.shape, run.tokenizer, run.text_length())
    rows, written = [], []
    for alpha in alphas:
        where = out if len(alphas) == 1 else out / f"alpha_{alpha:g}"
        averaged = assemble.with_weights(run, assemble.interpolated(start, tuned, alpha))
        made_of = {"method": "wise", "alpha": alpha, "run": str(run.checkpoint), "start": backbone}
        written.append(assemble.save_averaged(averaged, free_folder(where, "ensemble"), made_of))
        if split is not None:
            metrics = val_metrics(averaged, split, refs)
            rows.append({"alpha": alpha, "run": str(where), "metrics": metrics})
            log.info("alpha %g: %s %.4f", alpha, run.spec.monitor, metrics.get(run.spec.monitor))
    if rows:
        (out / "wise.json").write_text(json.dumps(rows, indent=1) + "\n")
        plot_along_alpha(rows, run.spec.monitor, out / "wise.png")
        log.info("wrote %s and %s", out / "wise.json", out / "wise.png")
    return written
