"""mmtrain export run=RUN_DIR out=DIR [checkpoint=PATH]

A folder that transformers loads (CLIPModel, AutoTokenizer, the image processor) from a
finished run's best checkpoint (else last.pt, or checkpoint=PATH), plus the head's weights
(head.safetensors) and its description (mmtrain_head.json).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from mmtrain.commands.load import load_run, parse_args
from mmtrain.config import plain

log = logging.getLogger("mmtrain")


def export_run(args: list[str]) -> Path:
    """`mmtrain export run=RUN_DIR out=DIR`: a folder `CLIPModel.from_pretrained` and
    `AutoTokenizer.from_pretrained` load, plus the head (safetensors) and its config."""
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor

    own, overrides = parse_args(args, ("run", "out"), ("checkpoint",), __doc__)
    run = load_run(own["run"], overrides, own.get("checkpoint"))
    out = Path(own["out"]).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    run.model.clip.save_pretrained(out)
    run.tokenizer.save_pretrained(out)
    size = run.spec.image_size
    CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(run.spec.image_mean),
        image_std=list(run.spec.image_std),
    ).save_pretrained(out)
    head = {
        name: tensor.contiguous()
        for name, tensor in run.model.state_dict().items()
        if not name.startswith("clip.")
    }
    model_cfg = plain(run.cfg.model)
    description = {
        "mmtrain_model": model_cfg["name"],
        "model_config": {
            k: v for k, v in model_cfg.items() if k not in ("backbone", "backbone_config")
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
    log.info("exported %s to %s", run.checkpoint, out)
    return out
