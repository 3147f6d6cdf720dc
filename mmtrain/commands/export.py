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
from pathlib import Path

from mmtrain import assemble
from mmtrain.commands.arguments import parse_args

log = logging.getLogger("mmtrain")


def export_run(args: list[str]) -> Path:
    """`mmtrain export run=RUN_DIR out=DIR`: a folder `AutoModel.from_pretrained` and
    `AutoTokenizer.from_pretrained` load, plus the head (safetensors) and its config."""
    from safetensors.torch import save_file

    own, overrides = parse_args(args, ("run", "out"), ("checkpoint",), __doc__)
    run = assemble.trained(own["run"], overrides, own.get("checkpoint"))
    out = Path(own["out"]).expanduser()
    before = _modified(out) if out.is_dir() else None
    out.mkdir(parents=True, exist_ok=True)
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
    (out / "mmtrain_head.json").write_text(json.dumps(description, indent=2) + "\n")
    shareable(out, before)
    log.info("exported %s to %s", run.checkpoint, out)
    return out


def _modified(folder: Path) -> dict[Path, int]:
    """Every path under `folder` with its modification time (ns)."""
    return {path: path.lstat().st_mtime_ns for path in folder.rglob("*")}


def shareable(folder: Path, before: dict[Path, int] | None) -> None:
    """Make what the export wrote under `folder` (new or changed since `before`; all of it
    when the export created `folder`) readable by others, as a model folder is shared:
    0644 files, 0755 folders (safetensors writes 0600). Other files are left as they were."""
    for path, modified in _modified(folder).items():
        if path.is_symlink() or (before is not None and before.get(path) == modified):
            continue
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    if before is None:
        os.chmod(folder, 0o755)
