import re

import pytest

from mmtrain import registry
from mmtrain.errors import UserError


@registry.register("test_kind", "adder")
def adder(a: int, b: int = 2, *, scale: float = 1.0):
    """Adds."""
    return (a + b) * scale


def test_build_binds_config_and_runtime_keywords():
    assert registry.build("test_kind", {"name": "adder", "a": 1, "b": 3}, scale=2.0) == 8.0


def test_unknown_name_lists_registered_names_and_suggests():
    with pytest.raises(UserError) as error:
        registry.build("test_kind", {"name": "addr", "a": 1})
    message = str(error.value)
    assert "Unknown test_kind 'addr'" in message
    assert "Did you mean 'adder'?" in message
    assert "Registered test_kind names: adder" in message


def test_unknown_key_names_the_key_and_accepted_ones():
    with pytest.raises(UserError) as error:
        registry.build("test_kind", {"name": "adder", "a": 1, "bb": 3})
    message = str(error.value)
    assert "Unknown key 'bb'" in message and "Did you mean 'b'?" in message
    assert "Accepted keys: a, b, scale" in message


def test_missing_key_is_named():
    with pytest.raises(UserError, match="Missing key 'a' for test_kind 'adder'"):
        registry.build("test_kind", {"name": "adder", "b": 1})


@registry.register("test_kind", "typed")
def typed(count: int = 1, rate: float = 0.5, label: str | None = None, flag: bool = False):
    """Annotated keys."""
    return count, rate, label, flag


@pytest.mark.parametrize(
    ("options", "wanted"),
    [
        ({"count": "3"}, "Key 'count' of test_kind 'typed' must be an integer (got '3')"),
        ({"count": 2.5}, "must be an integer (got 2.5)"),
        ({"count": True}, "must be an integer (got True)"),
        ({"rate": "fast"}, "Key 'rate' of test_kind 'typed' must be a number (got 'fast')"),
        ({"label": 7}, "Key 'label' of test_kind 'typed' must be a string or null (got 7)"),
        ({"flag": "yes"}, "must be true or false (got 'yes')"),
    ],
)
def test_a_value_of_the_wrong_type_is_named(options, wanted):
    with pytest.raises(UserError, match=re.escape(wanted)):
        registry.check("test_kind", {"name": "typed", **options})


def test_values_that_fit_their_annotations_pass():
    built = registry.build("test_kind", {"name": "typed", "count": 3, "rate": 1, "label": None})
    assert built == (3, 1, None, False)


def test_runtime_key_in_config_is_refused():
    with pytest.raises(UserError, match="supplied by mmtrain at run time"):
        registry.check("test_kind", {"name": "adder", "a": 1, "scale": 3}, runtime=["scale"])


def test_duplicate_registration_raises():
    with pytest.raises(ValueError, match="already registered"):
        registry.register("test_kind", "adder")(lambda: None)


def test_names_are_sorted_and_complete():
    import mmtrain.components  # noqa: F401  (registers the built-in components)

    assert registry.names("fusion") == [
        "concat",
        "cross_attention",
        "cross_attention_concat",
        "product",
    ]
    assert registry.names("scheduler") == ["constant", "cosine"]
    assert "clip_fusion" in registry.names("model")
