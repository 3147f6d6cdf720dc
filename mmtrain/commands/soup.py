"""mmtrain soup RUN_OR_SWEEP_DIR ... [greedy=true] out=DIR

Model soups (Wortsman et al. 2022): the average of the weights of runs fine-tuned from one
pretrained backbone with one architecture (LoRA adapters merged first). A sweep directory
stands for each of its runs. The uniform soup averages every run; greedy=true orders the
runs by their validation metric (scored on the first run's validation split) and keeps
each one whose addition does not make the soup's metric worse. The soup is a run directory
(config, tokenizer, labels.json, checkpoints/best.pt, averaged.json) that eval, predict and
export take.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mmtrain import assemble
from mmtrain.commands.arguments import parse_args
from mmtrain.commands.wise import free_folder, val_metrics
from mmtrain.data.source import load_class_names
from mmtrain.errors import UserError
from mmtrain.spec import RunSpec, of_run

log = logging.getLogger("mmtrain")
# Model keys that change how a run trains (or starts), not the shapes of its weights.
TRAINING_ONLY = ("freeze", "unfreeze_last_layers", "gradient_checkpointing", "lora", "dropout")
TRAINING_ONLY += ("contrastive_weight", "position_init")


def runs_in(folders: list[str]) -> list[Path]:
    """The run directories named: each folder is a run (.hydra/config.yaml) or a sweep
    whose numbered job folders are runs."""
    runs: list[Path] = []
    for name in folders:
        folder = Path(name).expanduser()
        if (folder / ".hydra" / "config.yaml").is_file():
            runs.append(folder)
            continue
        jobs = [p for p in folder.glob("*") if (p / ".hydra" / "config.yaml").is_file()]
        if not jobs:
            raise UserError(
                f"{folder} is neither a run directory (with .hydra/config.yaml) nor a sweep "
                "directory holding runs; name runs of `mmtrain train` or a multirun folder."
            )
        runs += sorted(jobs, key=lambda p: (not p.name.isdigit(), p.name.zfill(9)))
    if len(runs) < 2:
        raise UserError(
            f"A soup averages at least two runs; {', '.join(folders)} hold {len(runs)}."
        )
    return runs


def _architecture(spec: RunSpec) -> dict[str, Any]:
    return {k: v for k, v in spec.model.options.items() if k not in TRAINING_ONLY}


def check_souppable(runs: list[Path], specs: list[RunSpec], labels: list[Any]) -> None:
    """Refuse runs that do not share a pretrained backbone, an architecture and classes,
    naming the first difference."""
    first, reference = specs[0], _architecture(specs[0])
    if first.model.options.get("backbone") is None:
        raise UserError(
            f"{runs[0]} was trained from scratch (model.backbone=null): runs from different "
            "random starts share no weights to average. Soups average runs fine-tuned from one "
            "pretrained model.backbone."
        )
    for run, spec, names in zip(runs[1:], specs[1:], labels[1:], strict=True):
        if spec.model.name != first.model.name:
            raise UserError(
                f"{run} trained model={spec.model.name} but {runs[0]} model={first.model.name}: "
                "a soup averages runs of one model and backbone."
            )
        options = _architecture(spec)
        for key in sorted(set(options) | set(reference)):
            if options.get(key) != reference.get(key):
                raise UserError(
                    f"{run} has model.{key}={options.get(key)} but {runs[0]} has "
                    f"model.{key}={reference.get(key)}: a soup averages runs of one backbone "
                    "and architecture; leave that run out."
                )
        if names != labels[0]:
            raise UserError(
                f"{run} has other classes (labels.json) than {runs[0]}: a soup averages runs "
                "of one task."
            )


def better(value: float, than: float, mode: str) -> bool:
    """Whether `value` is at least as good as `than` for a metric of `mode`."""
    return value >= than if mode == "max" else value <= than


def soup_run(args: list[str]) -> Path:
    """`mmtrain soup`: the run directory of the soup of the named runs."""
    folders = [a for a in args if "=" not in a and not a.startswith("-")]
    own, overrides = parse_args(
        [a for a in args if a not in folders], ("out",), ("greedy",), __doc__
    )
    if own.get("greedy", "false") not in ("true", "false"):
        raise UserError(f"greedy={own['greedy']}: give greedy=true or greedy=false.")
    greedy = own.get("greedy") == "true"
    runs = runs_in(folders)
    specs = [of_run(run, overrides) for run in runs]
    check_souppable(runs, specs, [load_class_names(run) for run in runs])
    out = free_folder(Path(own["out"]).expanduser(), "soup")
    loaded = [assemble.trained(str(run), overrides) for run in runs]
    states = [assemble.plain_state(run) for run in loaded]
    monitor, mode = specs[0].monitor, specs[0].mode
    split = loaded[0].data()["val"]
    scores = [
        val_metrics(assemble.with_weights(run, state), split)[monitor]
        for run, state in zip(loaded, states, strict=True)
    ]
    order = sorted(range(len(runs)), key=lambda i: scores[i], reverse=mode == "max")
    kept = order if not greedy else [order[0]]
    soup = assemble.with_weights(
        loaded[order[0]], assemble.uniform_average([states[i] for i in kept])
    )
    if greedy:
        best = scores[order[0]]
        for i in order[1:]:
            trial = assemble.with_weights(
                loaded[order[0]], assemble.uniform_average([states[j] for j in [*kept, i]])
            )
            score = val_metrics(trial, split)[monitor]
            log.info("greedy soup: %s %s %.4f", runs[i], monitor, score)
            if better(score, best, mode):
                kept, best, soup = [*kept, i], score, trial
    first = loaded[0]
    refs = assemble.references(first.spec, first.shape, first.tokenizer, first.text_length())
    metrics = val_metrics(soup, split, refs)  # with zero-shot on zeroshot.reference
    log.info("soup of %d runs: %s %.4f", len(kept), monitor, metrics[monitor])
    made_of = {
        "method": "greedy soup" if greedy else "uniform soup",
        "runs": [str(runs[i]) for i in kept],
        "monitor": monitor,
        "mode": mode,
        "candidates": {str(runs[i]): scores[i] for i in order},
        "metrics": metrics,
    }
    return assemble.save_averaged(soup, out, made_of)
