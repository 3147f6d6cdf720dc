"""The one rule check of a config value (mmtrain.rules): every group's keys are judged by
their annotation, with one wording, and values are held as their keys take them."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

import pytest

from mmtrain import registry, rules
from mmtrain.errors import UserError
from mmtrain.rules import Bounds

Rate = Annotated[float, Bounds(gt=0)] | Literal["auto"]


@pytest.mark.parametrize(
    ("hint", "value", "held"),
    [
        (Rate, "auto", "auto"),
        (Rate, 1, 1.0),  # an integer where a number is asked: a float
        (Literal["auto", "32", "bf16", "16"], 16, "16"),  # YAML's 16: the word "16"
        (Annotated[int, Bounds(ge=1)] | None, None, None),
        (Annotated[Sequence[float], Bounds(ge=0, lt=1)], [0.9, 0.999], [0.9, 0.999]),
        (tuple[float, float], (1, 2), (1.0, 2.0)),
        (list[str] | None, ["a", "b"], ["a", "b"]),
        (dict[str, str], {"a": "b"}, {"a": "b"}),
    ],
)
def test_values_that_keep_their_rule_are_held_as_the_key_takes_them(hint, value, held):
    assert rules.conform(value, hint) == held
    assert type(rules.conform(value, hint)) is type(held)


@pytest.mark.parametrize(
    ("hint", "value", "wanted"),
    [
        (Rate, "fast", "a positive number or auto"),
        (Rate, -1, "a positive number or auto"),
        (Rate, float("nan"), "a finite positive number or auto"),
        (Annotated[int, Bounds(ge=1)] | None, 0, "a positive integer or null"),
        (Annotated[int, Bounds(ge=0)], -2, "an integer >= 0"),
        (Annotated[int, Bounds(ge=0)], 2.5, "an integer >= 0"),
        (Annotated[int, Bounds(ge=0)], True, "an integer >= 0"),  # a bool is no integer
        (Annotated[float, Bounds(ge=0, le=1)], 2, "a number >= 0 and <= 1"),
        (Literal["max", "min", "auto"], "best", "one of: max, min, auto"),
        (Annotated[Sequence[float], Bounds(ge=0, lt=1)], [0.9, 2], "a list of numbers, each >= 0 and < 1"),
        (list[str] | None, "abc", "a list of strings or null"),
        (dict[str, str] | None, "abc", "a mapping or null"),
        (bool, "yes", "true or false"),
        (str | None, 7, "a string or null"),
        (tuple[float, float], [0.9], "a list of 2 numbers"),  # a fixed length is a rule too
        (Rate, 10**400, "a finite positive number or auto"),  # beyond a float: no OverflowError
        (rules.Seed, -1, "an integer >= 0 and <= 4294967295"),  # what numpy's generator takes
        (Annotated[int, Bounds(ge=1)], 10**400, "a positive integer (below 9,223,372,036,854,775,808)"),
    ],
)  # fmt: skip
def test_a_value_that_breaks_its_rule_says_what_the_key_takes(hint, value, wanted):
    with pytest.raises(rules.Mismatch) as error:
        rules.conform(value, hint)
    assert str(error.value) == wanted and error.value.value is value
    assert len(error.value.shown) <= 70  # a 400-digit number is not echoed whole


@dataclass(frozen=True)
class Adapter:
    """A schema: a mapping of its own keys, each with its rule."""

    rank: Annotated[int, Bounds(ge=1)] | None = None
    kind: Literal["lora", "dora"] = "lora"


@registry.register("test_rules", "nested")
def nested(adapter: Adapter | None = None, scale: Rate = "auto") -> tuple:
    """A factory with a schema key."""
    return adapter, scale


def test_a_schema_key_is_checked_key_by_key_and_built_as_its_dataclass():
    assert registry.build("test_rules", {"name": "nested", "adapter": {"rank": 2}, "scale": 2}) == (
        Adapter(rank=2),
        2.0,
    )
    with pytest.raises(UserError, match=re.escape(
        "Key 'adapter.rank' of test_rules 'nested' must be a positive integer or null (got 0)."
    )):  # fmt: skip
        registry.check("test_rules", {"name": "nested", "adapter": {"rank": 0}})
    with pytest.raises(UserError, match=re.escape(
        "Unknown key 'adapter.rnak' for test_rules 'nested'. Did you mean 'rank'? "
        "Accepted keys of adapter: rank, kind."
    )):  # fmt: skip
        registry.check("test_rules", {"name": "nested", "adapter": {"rnak": 2}})
    with pytest.raises(UserError, match="must be a mapping of its keys .rank, kind. or null"):
        registry.check("test_rules", {"name": "nested", "adapter": "big"})
