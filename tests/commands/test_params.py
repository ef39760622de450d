"""The exact message of every parameter a run is refused for (``bad_params``): the
operator reads it on the dashboard, so each names the parameter, what it must be
and what came. Pure functions, no link."""

from __future__ import annotations

import pytest

from plexus.commands import ParamError, coerce_params, declare


def handler(run, **params):
    return None


SPECS = declare("c", handler, params={
    "i": {"type": "integer", "required": False, "minimum": -5, "maximum": 5},
    "n": {"type": "number", "required": False, "minimum": 0.5},
    "b": {"type": "boolean", "required": False},
    "s": {"type": "string", "required": False, "maxLength": 3},
    "e": {"type": "string", "required": False, "enum": ["low", "high"]},
}).params


@pytest.mark.parametrize("params,message", [
    ([1], "params must be an object, got an array"),
    ("x", "params must be an object, got a string"),
    (7, "params must be an object, got a number"),
    (True, "params must be an object, got a boolean"),
    ({"zz": 1, "aa": 2}, "unknown parameter(s): aa, zz"),
    ({"i": True}, "i must be an integer, got a boolean"),
    ({"i": "seven"}, "i must be an integer, got 'seven'"),
    ({"i": 1.5}, "i must be an integer, got 1.5"),
    ({"i": "1.5"}, "i must be an integer, got 1.5"),
    ({"i": [1]}, "i must be an integer, got an array"),
    ({"i": {"a": 1}}, "i must be an integer, got an object"),
    ({"i": 6}, "i must be at most 5, got 6"),
    ({"i": -6}, "i must be at least -5, got -6"),
    ({"n": True}, "n must be a number, got a boolean"),
    ({"n": [1]}, "n must be a number, got an array"),
    ({"n": "x" * 100}, "n must be a number, got " + repr("x" * 100)[:60]),
    ({"n": "inf"}, "n must be a number, got 'inf'"),
    ({"n": 0.25}, "n must be at least 0.5, got 0.25"),
    ({"b": 2}, "b must be true or false, got 2"),
    ({"b": "yes"}, "b must be true or false, got 'yes'"),
    ({"b": [True]}, "b must be true or false, got an array"),
    ({"s": 5}, "s must be a string, got a number"),
    ({"s": False}, "s must be a string, got a boolean"),
    ({"s": {"k": 1}}, "s must be a string, got an object"),
    ({"s": "abcd"}, "s must be at most 3 characters, got 4"),
    ({"e": "mid"}, "e must be one of low, high, got 'mid'"),
])
def test_every_refusal_names_the_parameter_and_what_came(params, message):
    with pytest.raises(ParamError) as refused:
        coerce_params(SPECS, params)
    assert str(refused.value) == message


def test_a_value_of_no_json_kind_is_named_by_its_type():
    with pytest.raises(ParamError) as refused:
        coerce_params(SPECS, {"s": b"raw"})
    assert str(refused.value) == "s must be a string, got bytes"


@pytest.mark.parametrize("kind,default,message", [
    ("integer", "x", "expected an integer, got a string"),
    ("number", True, "expected a number, got a boolean"),
    ("boolean", 1, "expected a boolean, got a number"),
    ("string", 3, "expected a string, got a number"),
    ("string", None, "expected a string, got null"),
])
def test_a_default_of_the_wrong_kind_is_refused_at_declaration(kind, default, message):
    with pytest.raises(ValueError) as refused:
        declare("c", handler, params={"p": {"type": kind, "default": default}})
    assert str(refused.value).endswith(f"the default is invalid: {message}")


def declare_param(spec: dict):
    return declare("c", handler, params={"p": spec}).params["p"]


AT = "command 'c': parameter 'p': "


@pytest.mark.parametrize("spec,message", [
    ({"type": "string", "title": 1}, "title must be a string"),
    ({"type": "integer", "enum": ["a"], "pattern": "x"},
     "unknown keyword(s) enum, pattern for type integer (allowed: default, description, "
     "maximum, minimum, required, title, type, unit)"),
    ({"type": "string", "description": None}, "description must be a string"),
    ({"type": "number", "unit": 3}, "unit must be a string"),
    ({"type": "string", "maxLength": True}, "maxLength must be an integer >= 1"),
    ({"type": "string", "maxLength": 2.0}, "maxLength must be an integer >= 1"),
    ({"type": "string", "enum": [f"c{i}" for i in range(65)]},
     "enum must be a list of 1 to 64 strings"),
    ({"type": "string", "enum": "ab"}, "enum must be a list of 1 to 64 strings"),
    ({"type": "string", "enum": ["a", 1]}, "enum must be a list of 1 to 64 strings"),
    ({"type": "integer", "minimum": "0"}, "minimum must be a number"),
    ({"type": "number", "maximum": True}, "maximum must be a number"),
    ({"type": "number", "minimum": 2.5, "maximum": 2.0}, "minimum is greater than maximum"),
    ({"type": "boolean", "required": "no"}, "required must be true or false"),
    ({"type": "boolean", "required": True, "default": True},
     "give either a default or required, not both (a default makes it optional)"),
])
def test_every_declaration_refusal_is_named_exactly(spec, message):
    with pytest.raises(ValueError) as refused:
        declare_param(spec)
    assert str(refused.value) == AT + message


def test_the_edges_of_each_declaration_rule_are_accepted():
    assert declare_param({"type": "string", "maxLength": 1})["maxLength"] == 1
    assert declare_param({"type": "string", "enum": ("only",)})["enum"] == ["only"]
    assert len(declare_param({"type": "string",
                              "enum": [f"c{i}" for i in range(64)]})["enum"]) == 64
    assert declare_param({"type": "integer", "minimum": 3, "maximum": 3})["maximum"] == 3
    assert declare_param({"type": "number", "unit": "m/s", "title": "Speed",
                          "description": "target"})["unit"] == "m/s"
    assert declare_param({"type": "string", "default": "abc", "maxLength": 3})["required"] \
        is False


def test_a_string_of_exactly_max_length_is_taken():
    assert coerce_params(SPECS, {"s": "abc"}) == {"s": "abc"}


def test_a_spec_that_is_not_a_mapping_is_named():
    with pytest.raises(ValueError) as refused:
        declare("c", handler, params={"p": ["string"]})
    assert str(refused.value) == AT + "the spec must be a mapping, got ['string']"


def test_accepted_values_are_converted():
    assert coerce_params(SPECS, {"b": 1, "i": "3", "n": "2"}) == {"b": True, "i": 3, "n": 2.0}
    assert coerce_params(SPECS, {"b": 0, "i": 4.0}) == {"b": False, "i": 4}
    free = declare("c", handler, params={"config": {"type": "string"}}).params
    assert coerce_params(free, {"config": {"a": [1, None]}}, objects_as_json=True) == \
        {"config": '{"a":[1,null]}'}
