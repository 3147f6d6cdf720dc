"""Every registered model keeps the contract its registration states (mmtrain.models.interface):
the traits it is registered with are its own, and it follows the protocols they name."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, build_parts
from conftest import compose_train as _compose

import mmtrain.components  # noqa: F401, I001  (registers the built-in components)
from mmtrain import registry
from mmtrain.models.interface import EmbeddingModel, FeatureCachingModel, Metrics, Model
from mmtrain.spec import traits_of

MODELS = registry.names("model")
SIGLIP = [o for o in TINY if "projection_dim" not in o]


@pytest.mark.parametrize("name", MODELS)
def test_a_model_follows_the_protocols_its_traits_name(name):
    tiny = SIGLIP if name.startswith("siglip") else TINY
    extra = ["model.backbone_config.model_type=siglip"] if name.startswith("siglip") else []
    parts = build_parts(_compose([f"model={name}", *tiny, *extra]))
    model, traits = parts.model, traits_of(name)
    assert type(model).traits == traits  # registered with the class's own traits
    assert isinstance(model, Model)
    assert isinstance(model, EmbeddingModel) == traits.embeds
    assert isinstance(model, FeatureCachingModel) == traits.accumulates_features
    metrics = model.metrics(torch.device("cpu"))
    assert isinstance(metrics, Metrics)
    assert traits.monitor[0].removeprefix("val/") in traits.metric_names
    ids = {id(p) for p in model.parameters()}
    assert {id(p) for p in model.backbone_parameters()} <= ids
    assert set(model.layer_depths()) <= ids
