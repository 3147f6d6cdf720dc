"""mmtrain export run=RUN_DIR out=DIR [checkpoint=PATH]

A folder that transformers loads (CLIPModel, SiglipModel or VisionTextDualEncoderModel,
AutoTokenizer, the image processor) from a finished run's best checkpoint (else last.pt, or
checkpoint=PATH), plus the head's weights (head.safetensors; with the sigmoid loss on two
towers, also the loss's logit_bias) and its description (mmtrain_head.json).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mmtrain import assemble
from mmtrain.commands.arguments import parse_args
from mmtrain.errors import UserError

log = logging.getLogger("mmtrain")
HEAD_FILE = "mmtrain_head.json"  # every export has it: the mark of an earlier export


def export_run(args: list[str]) -> Path:
    """`mmtrain export run=RUN_DIR out=DIR`: a folder `AutoModel.from_pretrained` and
    `AutoTokenizer.from_pretrained` load, plus the head (safetensors) and its config."""
    own, overrides = parse_args(args, ("run", "out"), ("checkpoint",), __doc__)
    final = Path(own["out"]).expanduser()
    _check_folder(final)
    run = assemble.trained(own["run"], overrides, own.get("checkpoint"))
    final.parent.mkdir(parents=True, exist_ok=True)
    # Written into a new folder beside it, then put in place: nothing of an earlier export
    # (a head.safetensors the new model has no use for) stays beside the new one.
    out = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        _write_export(run, out)
        _replace(final, out)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    log.info("exported %s to %s", run.checkpoint, final)
    return final


def _check_folder(out: Path) -> None:
    """`out` must be new, empty, or an earlier mmtrain export (which is replaced whole)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"out={out} is a file; give a folder to export into.")
    if out.is_dir() and any(out.iterdir()) and not (out / HEAD_FILE).is_file():
        raise UserError(
            f"out={out} is a folder that holds other files and no earlier mmtrain export "
            f"({HEAD_FILE}); export into a new or empty folder."
        )


def _replace(final: Path, new: Path) -> None:
    """Put the folder `new` where `final` is, an earlier export there removed."""
    if final.is_dir() and any(final.iterdir()):
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
        new.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        log.info("replaced the earlier export in %s", final)
    else:
        if final.is_dir():
            final.rmdir()
        new.rename(final)


def _write_export(run: Any, out: Path) -> None:
    """The export's files, into the folder `out`."""
    from safetensors.torch import save_file

    # LoRA adapters are merged into the weights: the export loads as a plain model.
    backbone, processor = run.transformers_parts()
    backbone.save_pretrained(out)
    run.tokenizer.save_pretrained(out)
    processor.save_pretrained(out)
    head = {
        name: tensor.contiguous()
        for name, tensor in run.model.state_dict().items()
        if not name.startswith("clip.")
    }
    model = run.spec.model
    description = {
        "mmtrain_model": model.name,
        "model_config": {
            "name": model.name,
            **{k: v for k, v in model.options.items() if k not in ("backbone", "backbone_config")},
        },
        "class_names": run.class_names,
        "checkpoint": str(run.checkpoint),
        "step": run.step,
        "head_weights": "head.safetensors" if head else None,
        "inputs": "uint8 images normalised with the processor's mean/std; text from the tokenizer",
    }
    if head:
        save_file(head, out / "head.safetensors")
    (out / HEAD_FILE).write_text(json.dumps(description, indent=2) + "\n")
    shareable(out)


def shareable(folder: Path) -> None:
    """Make the export readable by others, as a model folder is shared: 0644 files, 0755
    folders (safetensors writes 0600, and the export is first written to a private temporary
    folder)."""
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
