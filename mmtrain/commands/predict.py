"""mmtrain predict run=RUN_DIR input=MANIFEST output=FILE.jsonl|.csv|.npy|.safetensors
    [checkpoint=PATH] [k=5] [candidates=TEXTS.txt] [class_names=a,b,c|NAMES.txt] [embed=both]

One prediction per row of the input manifest (CSV or JSONL, image and text columns; labels
are not needed), in the input's order. A classifier: the predicted label and each class's
probability. A contrastive model: the image-text similarity, the k input images that best
match the row's text (top_images, by input row), and with candidates= (candidate texts, one
per line) or class_names= (class names put into the run's zero-shot prompt templates) the k
best of those for the row's image (top_texts / top_classes).

output=FILE.npy or .safetensors (contrastive models) writes the embeddings instead, one row
per input row, in order: embed=images|texts|both (both: safetensors only, tensors
image_embeds and text_embeds). data.on_bad_sample=skip predicts the other rows when some are
bad and marks those with their reason (NaN rows in an embedding file).
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmtrain import assemble
from mmtrain.commands.arguments import parse_args
from mmtrain.errors import UserError, read_text
from mmtrain.retrieval import topk

log = logging.getLogger("mmtrain")
ROW_FORMATS = (".jsonl", ".csv")
EMBEDDING_FORMATS = (".npy", ".safetensors")
EMBED = {"images": ("image_embeds",), "texts": ("text_embeds",)}
EMBED["both"] = EMBED["images"] + EMBED["texts"]


def predict_run(args: list[str]) -> Path:
    """`mmtrain predict run=RUN_DIR input=MANIFEST output=FILE`: one output row per input row,
    in order (bad rows under data.on_bad_sample=skip get their reason), or with
    output=.npy|.safetensors one embedding row per input row.

    The input is read as a manifest: with the run's own manifest settings (columns, image
    root, cache) when it trained on one, else with the defaults, and with any `data.KEY=`
    override that the manifest source takes (data.on_bad_sample=skip, data.image_root=...).
    Other overrides apply to the run's config (data.batch_size=256).
    """
    own, overrides = parse_args(
        args,
        ("run", "input", "output"),
        ("checkpoint", "k", "candidates", "class_names", "embed"),
        __doc__,
    )
    output = Path(own["output"]).expanduser()
    if output.suffix.lower() not in ROW_FORMATS + EMBEDDING_FORMATS:
        raise UserError(
            f"output={own['output']}: the format follows the extension; use .jsonl or .csv "
            "(predictions), or .npy or .safetensors (a contrastive model's embeddings)."
        )
    wanted = _contrastive_options(own, output)
    source = Path(own["input"]).expanduser()
    if not source.is_file():
        raise UserError(
            f"input={own['input']}: no such file ({source.resolve()}); give the CSV or JSONL "
            "manifest of the rows to predict (image and text columns; labels are not needed)."
        )
    run, split, policy = assemble.prediction_input(
        own["run"], source, overrides, own.get("checkpoint")
    )
    if split.bad_rows and policy == "error":
        listing = "\n".join(f"  {row}" for row in split.bad_rows)
        raise UserError(
            f"{len(split.bad_rows)} bad row(s) in {source}:\n{listing}\nFix or remove them, or "
            "add data.on_bad_sample=skip to predict the other rows (the skipped ones are "
            "marked in the output with their reason)."
        )
    embeds = run.spec.traits.embeds
    if not embeds and (output.suffix.lower() in EMBEDDING_FORMATS or wanted.used):
        raise UserError(
            f"{wanted.used[0] if wanted.used else 'output=' + own['output']}: only a "
            f"contrastive model's predictions have embeddings and candidates; run {run.path} "
            f"trained {run.spec.model.name!r}, whose predictions are labels (output=FILE.jsonl)."
        )
    model, device, autocast = run.on_device()
    results, outputs = _predictions(run, split, model, device, autocast)
    kept = split.index.tolist() if split.index is not None else list(range(len(split)))
    if output.suffix.lower() in EMBEDDING_FORMATS:
        total = len(split) + len(split.bad_rows)
        arrays = {
            name: _in_input_order(torch.cat(outputs[name]), kept, total)
            for name in EMBED[wanted.embed]
        }
        _write_embeddings(arrays, output)
        log.info("wrote %s of %d rows to %s", " and ".join(arrays), total, output)
        return output
    if embeds:
        images, texts = torch.cat(outputs["image_embeds"]), torch.cat(outputs["text_embeds"])
        for row, extra in zip(
            results, _matches(run, model, device, images, texts, kept, wanted), strict=True
        ):
            row.update(extra)
    rows = _with_skipped_rows(results, split, set(kept))
    _write_rows(rows, output)
    log.info("wrote %d predictions to %s", len(rows), output)
    return output


def _predictions(
    run: assemble.Trained, split: Any, model: Any, device: torch.device, autocast: Any
) -> tuple[list[dict[str, Any]], dict[str, list[torch.Tensor]]]:
    """Per kept row its prediction, and (an embedding model's) the embeddings of each batch."""
    results: list[dict[str, Any]] = []
    outputs: dict[str, list[torch.Tensor]] = {"image_embeds": [], "text_embeds": []}
    with torch.no_grad():
        for batch in run.batches(split):
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast():
                out = model(**{k: v for k, v in batch.items() if k != "labels"})
            results += _prediction_rows(out, run.class_names)
            if run.spec.traits.embeds:
                for name, values in outputs.items():
                    values.append(out[name].float().cpu())
    return results, outputs


def _with_skipped_rows(
    results: list[dict[str, Any]], split: Any, kept: set[int]
) -> list[dict[str, Any]]:
    """Rows kept and rows dropped (data.on_bad_sample=skip) back in the input's order."""
    predictions, dropped = iter(results), iter(sorted(split.bad_rows, key=lambda row: row.line))
    rows: list[dict[str, Any]] = []
    for position in range(len(split) + len(split.bad_rows)):
        if position in kept:
            rows.append({"row": position, "status": "ok", **next(predictions)})
        else:
            bad = next(dropped)
            rows.append(
                {"row": position, "status": "skipped", "reason": bad.reason, "line": bad.line}
            )
    return rows


def _prediction_rows(
    out: dict[str, torch.Tensor], class_names: list[str] | None
) -> list[dict[str, Any]]:
    if "logits" in out:
        probs = out["logits"].float().softmax(-1).cpu()
        names = class_names or [str(i) for i in range(probs.shape[1])]
        return [
            {
                "label": names[int(p.argmax())],
                **{f"prob_{name}": round(float(v), 6) for name, v in zip(names, p, strict=True)},
            }
            for p in probs
        ]
    return [{"similarity": round(float(s), 6)} for s in out["similarity"].float().cpu()]


@dataclass
class ContrastiveOptions:
    """predict's keys for contrastive models, checked before anything is built."""

    k: int = 5
    candidates: list[str] | None = None  # candidate texts, top_texts per image
    class_names: list[str] | None = None  # class names, top_classes per image (via prompts)
    embed: str = "both"
    used: list[str] = field(default_factory=list)  # the keys given, for messages


def _contrastive_options(own: dict[str, str], output: Path) -> ContrastiveOptions:
    options = ContrastiveOptions(
        used=[f"{key}={own[key]}" for key in ("candidates", "class_names", "embed") if key in own]
    )
    if "k" in own:
        if not own["k"].isdigit() or int(own["k"]) < 1:
            raise UserError(f"k={own['k']}: give a positive whole number of matches, e.g. k=5.")
        options.k = int(own["k"])
    if "candidates" in own:
        options.candidates = _names(own["candidates"], "candidates", file_only=True)
    if "class_names" in own:
        options.class_names = _names(own["class_names"], "class_names")
    options.embed = own.get("embed", "both")
    if options.embed not in EMBED:
        raise UserError(f"embed={options.embed}: choose images, texts or both.")
    if output.suffix.lower() == ".npy" and options.embed == "both":
        raise UserError(
            f"output={output}: a .npy file holds one array; add embed=images or embed=texts, "
            "or write both to a .safetensors file."
        )
    return options


def _names(value: str, key: str, file_only: bool = False) -> list[str]:
    """Lines of a text file (blank lines skipped), or a comma-separated list."""
    path = Path(value).expanduser()
    if path.is_file():
        text = read_text(path, f"{key}={value}")
        names = [line.strip() for line in text.splitlines() if line.strip()]
    elif file_only or value.endswith(".txt"):
        raise UserError(
            f"{key}={value}: no such file ({path.resolve()}); give a text file with one "
            f"{'candidate text' if file_only else 'class name'} per line"
            + ("." if file_only else ", or the names separated by commas (class_names=cat,dog).")
        )
    else:
        names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise UserError(f"{key}={value}: no names in it; give at least one.")
    return names


def _in_input_order(values: torch.Tensor, kept: list[int], total: int) -> torch.Tensor:
    """Rows of the kept input rows at their input positions; dropped rows are NaN."""
    ordered = torch.full((total, values.shape[1]), float("nan"))
    ordered[torch.tensor(kept, dtype=torch.long)] = values
    return ordered


def _write_embeddings(arrays: dict[str, torch.Tensor], output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.suffix.lower() == ".npy":
        import numpy as np

        np.save(output, next(iter(arrays.values())).numpy())
        return
    from safetensors.torch import save_file

    save_file({name: value.contiguous() for name, value in arrays.items()}, str(output))


def _matches(
    run: assemble.Trained,
    model: torch.nn.Module,
    device: torch.device,
    images: torch.Tensor,
    texts: torch.Tensor,
    kept: list[int],
    options: ContrastiveOptions,
) -> list[dict[str, Any]]:
    """Per row: the input images that best match its text (by input row), and the candidate
    texts or classes that best match its image (blocks of bounded memory,
    `mmtrain.retrieval`)."""
    scores, top = topk(texts, images, options.k)
    extra = [
        {"top_images": [kept[i] for i in line.tolist()], "top_image_scores": _rounded(values)}
        for line, values in zip(top, scores, strict=True)
    ]
    for key, names, templates in (
        ("texts", options.candidates, ["{}"]),
        ("classes", options.class_names, run.spec.prompt_templates()),
    ):
        if names is None:
            continue
        keys = run.prompt_embeddings(names, templates, device).cpu()
        scores, top = topk(images, keys, options.k)
        for row, line, values in zip(extra, top, scores, strict=True):
            row[f"top_{key}"] = [names[i] for i in line.tolist()]
            row[f"top_{key[:-1] if key == 'texts' else 'class'}_scores"] = _rounded(values)
    return extra


def _rounded(values: torch.Tensor) -> list[float]:
    return [round(float(v), 6) for v in values]


def _write_rows(rows: list[dict[str, Any]], output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.suffix.lower() == ".jsonl":
        output.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with output.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(
            {key: json.dumps(v) if isinstance(v, list) else v for key, v in row.items()}
            for row in rows
        )
