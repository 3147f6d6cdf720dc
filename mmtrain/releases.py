"""Configs that earlier releases of mmtrain wrote (a checkpoint's, a run's
.hydra/config.yaml), in this release's keys: `upgrade`. Plain mappings in, plain mappings
out; the spec checks the result."""

from __future__ import annotations

import copy
from typing import Any

# Model keys added after 0.2.0; a run written before them trained without them.
FINE_TUNING_DEFAULTS = {
    "unfreeze_last_layers": None,
    "gradient_checkpointing": False,
    "lora": {"r": None, "alpha": None, "dropout": 0.0, "target_modules": None, "use_dora": False},
}


def upgrade(config: dict[str, Any]) -> dict[str, Any]:
    """A resolved config that mmtrain 0.1.0 wrote (a checkpoint's, a run's
    .hydra/config.yaml), in this release's keys; a config of this release comes back equal.

    0.1.0 kept hard negatives in the model group (model.hard_negatives,
    model.negative_sampler); the data pipeline draws them now (data.*). Its `shapes` took
    data.on_bad_sample, which only sources that read files take now.

    Before trainer.default_epochs, trainer.max_epochs (with a min_steps floor) was the
    default budget: such a config keeps the budget it trained with (`budget`).
    """
    config = copy.deepcopy(config)
    model, data = config.get("model") or {}, config.get("data") or {}
    trainer = config.get("trainer")
    if isinstance(trainer, dict) and "default_epochs" not in trainer and trainer.get("min_steps"):
        trainer["default_epochs"] = trainer.get("max_epochs") or 10
        trainer["max_epochs"] = None
    if model.get("name") in ("clip_fusion", "clip_contrastive"):  # before the fine-tuning keys
        for key, value in FINE_TUNING_DEFAULTS.items():
            model.setdefault(key, copy.deepcopy(value))
    if model.get("name"):  # model.tokenizer and model.trust_remote_code came after 0.2.0
        model.setdefault("tokenizer", None)
        model.setdefault("trust_remote_code", False)
    if isinstance(model.get("lora"), dict):  # before DoRA: plain LoRA
        model["lora"].setdefault("use_dora", False)
    if data.get("name") == "shapes":
        data.pop("on_bad_sample", None)
    if model.get("name") == "clip_fusion":  # 0.2.0 had no product fusion: its default, off
        model.setdefault("fusion_difference", False)
    if data:  # data.positive_label came after 0.2.0: null, the rule of this release
        data.setdefault("positive_label", None)
    if "hard_negatives" not in model and "hard_negatives" in data:
        return config  # written by this release
    for key in ("hard_negatives", "negative_sampler"):
        if key in model:
            data.setdefault(key, model.pop(key))
    if not data.get("hard_negatives") and data.get("name") in ("shapes", "manifest"):
        # Without negatives the sampler is never used: take this release's default of the
        # data option, so the run's config equals the one its overrides compose today.
        data["hard_negatives"] = 0
        data["negative_sampler"] = "shapes" if data["name"] == "shapes" else "perturb"
    return config
