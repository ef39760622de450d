"""Declaring commands: every rule gives a clear CommandDeclarationError (a ValueError)."""

from __future__ import annotations

import pytest

from plexus import CommandDeclarationError, Plexus
from plexus.commands import coerce_params, declare, redact


def handler(run, **params):
    return params


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"name": "Power-Off"}, "command name 'Power-Off' is invalid"),
    ({"name": "x" * 65}, "is invalid"),
    ({"danger": "extreme"}, "danger must be one of normal, dangerous, critical"),
    ({"expires_in": 4}, "expires_in must be 5 to 3600 seconds"),
    ({"expires_in": 3601}, "expires_in must be 5 to 3600 seconds"),
    ({"concurrency": "queue"}, "concurrency must be accept or reject"),
    ({"params": {f"p{i}": {"type": "boolean"} for i in range(17)}}, "at most 16 parameters"),
    ({"params": {"Bad": {"type": "string"}}}, "parameter name 'Bad' is invalid"),
    ({"params": {"x": {"type": "float"}}}, "type must be one of string, integer"),
    ({"params": {"x": {"type": "string", "minimum": 1}}}, "unknown keyword(s) minimum"),
    ({"params": {"x": {"type": "boolean", "enum": ["a"]}}}, "unknown keyword(s) enum"),
    ({"params": {"x": {"type": "string", "maxLength": 0}}}, "maxLength must be an integer >= 1"),
    ({"params": {"x": {"type": "string", "enum": []}}}, "enum must be a list of 1 to 64"),
    ({"params": {"x": {"type": "integer", "minimum": 5, "maximum": 1}}}, "minimum is greater"),
    ({"params": {"x": {"type": "integer", "default": 1, "required": False}}},
     "either a default or required"),
    ({"params": {"x": {"type": "integer", "default": "3"}}},
     "the default is invalid: expected an integer, got a string"),
    ({"params": {"x": {"type": "integer", "default": 9, "maximum": 8}}},
     "the default is invalid: x must be at most 8"),
    ({"params": {"x": {"type": "string", "default": "c", "enum": ["a", "b"]}}},
     "must be one of a, b"),
])
def test_bad_declarations_name_the_rule(kwargs, message):
    kwargs = {"name": "power_off", **kwargs}
    with pytest.raises(CommandDeclarationError) as info:
        declare(handler=handler, **kwargs)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


def test_the_handler_must_accept_the_declared_params():
    def power_off(run, outlet):
        return outlet

    with pytest.raises(CommandDeclarationError, match="cannot be called as handler"):
        declare("power_off", power_off, params={"socket": {"type": "integer"}})
    declare("power_off", power_off, params={"outlet": {"type": "integer"}})


def test_manifest_entry():
    cmd = declare("power_off", handler, title="Power off", description="cuts power",
                  danger="critical", idempotent=True, expires_in=30,
                  params={"outlet": {"type": "integer", "minimum": 1, "maximum": 8},
                          "hard": {"type": "boolean", "default": False},
                          "note": {"type": "string", "required": False}})
    assert cmd.manifest() == {
        "name": "power_off", "danger": "critical", "idempotent": True, "expires_in_s": 30.0,
        "concurrency": "accept", "title": "Power off", "description": "cuts power",
        "params": {"outlet": {"type": "integer", "minimum": 1, "maximum": 8, "required": True},
                   "hard": {"type": "boolean", "default": False, "required": False},
                   "note": {"type": "string", "required": False}}}


def test_the_client_decorator_raises_at_decoration_and_returns_the_function(
        plexus_receiver):
    px = Plexus(api_key="plx_test", source_id="pod-07", gateway_url=plexus_receiver.url,
                ws_url=plexus_receiver.ws_url)
    try:
        with pytest.raises(CommandDeclarationError):
            px.command("Bad Name")(handler)
        assert px.link_state == "off"  # nothing valid declared: no link
        decorated = px.command("ok")(handler)
        assert decorated is handler
        with pytest.raises(CommandDeclarationError, match="already declared"):
            px.command("ok")(handler)
    finally:
        px.close(timeout=0)


def test_coercion_details():
    specs = declare("c", handler, params={
        "n": {"type": "number", "minimum": 0}, "i": {"type": "integer", "required": False},
        "b": {"type": "boolean", "default": True}}).params
    assert coerce_params(specs, {"n": "1.5", "i": " 7 "}) == {"n": 1.5, "i": 7, "b": True}
    assert coerce_params(specs, {"n": 1, "i": None}) == {"n": 1.0, "b": True}
    assert coerce_params(specs, {"n": 0, "b": "FALSE"}) == {"n": 0.0, "b": False}
    assert coerce_params(specs, {"n": 2, "i": "4.0"})["i"] == 4
    for bad in ({"n": "nan"}, {"n": "inf"}, {"n": True}, {"n": -1}, {"n": 1, "b": 2}):
        with pytest.raises(ValueError):
            coerce_params(specs, bad)
    with pytest.raises(ValueError, match="params must be an object, got an array"):
        coerce_params(specs, [1])
    assert coerce_params({}, None) == {}


def test_redact_hides_secret_looking_keys_also_inside_json_text():
    assert redact({"api_key": "plx_1", "password": "p", "nested": {"token": "t", "x": 1},
                   "config": '{"password": "hunter2", "port": 1}'}) == {
        "api_key": "***", "password": "***", "nested": {"token": "***", "x": 1},
        "config": '{"password":"***","port":1}'}


def test_redact_reads_key_names_in_any_case_and_leaves_the_rest_as_it_came():
    assert redact({"token": None, "Secret": "s", "AUTHORIZATION": "a", "credentials": "c",
                   "passwd": "p", 5: "five", "list": [{"key": 1}, 2], "port": 8080}) == {
        "token": None, "Secret": "***", "AUTHORIZATION": "***", "credentials": "***",
        "passwd": "***", 5: "five", "list": [{"key": "***"}, 2], "port": 8080}
    assert redact(' {"auth": 1, "x": [1]}') == '{"auth":"***","x":[1]}'
    assert redact("{not json") == "{not json"
    assert redact('[{"token": 1}]') == '[{"token": 1}]'  # only object text is read
    assert redact("plain") == "plain" and redact(3) == 3


def test_coerce_params_reads_a_spec_without_required_as_required():
    specs = {"x": {"type": "integer"}, "y": {"type": "integer", "default": 2}}
    with pytest.raises(ValueError, match="^missing required parameter: x$"):
        coerce_params(specs, {})
    assert coerce_params(specs, {"x": "1"}) == {"x": 1, "y": 2}


def test_a_declaration_defaults_to_an_ordinary_command():
    cmd = declare("noop", lambda run: None)
    assert (cmd.idempotent, cmd.moves_vehicle, cmd.danger, cmd.concurrency, cmd.expires_in) == (
        False, False, "normal", "accept", 30.0)
    assert cmd.manifest() == {"name": "noop", "params": {}, "danger": "normal",
                              "idempotent": False, "expires_in_s": 30.0,
                              "concurrency": "accept"}


def test_a_handler_missing_a_parameter_is_named_with_every_declared_one():
    with pytest.raises(CommandDeclarationError) as refused:
        declare("move", lambda run, x: None,
                params={"x": {"type": "integer"}, "y": {"type": "integer"}})
    assert str(refused.value) == (
        "command 'move': the handler cannot be called as handler(run, x=..., y=...): got an "
        "unexpected keyword argument 'y'")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"handler": "reboot"}, "command 'power_off': the handler must be callable, got 'reboot'"),
    ({"title": 5}, "command 'power_off': title must be a string, got 5"),
    ({"description": b"x"}, "command 'power_off': description must be a string, got b'x'"),
    ({"idempotent": "yes"}, "command 'power_off': idempotent must be true or false"),
    ({"expires_in": True}, "command 'power_off': expires_in must be 5 to 3600 seconds, got True"),
    ({"expires_in": "30"},
     "command 'power_off': expires_in must be 5 to 3600 seconds, got '30'"),
    ({"params": ["x"]}, "command 'power_off': params must be a mapping of name to spec"),
    ({"params": {f"p{i}": {"type": "boolean"} for i in range(17)}},
     "command 'power_off': at most 16 parameters, got 17"),
])
def test_each_declaration_refusal_is_worded_exactly(kwargs, message):
    with pytest.raises(CommandDeclarationError) as info:
        declare(**{"name": "power_off", "handler": handler, **kwargs})
    assert str(info.value) == message


def test_the_edges_of_a_declaration_are_accepted():
    sixteen = {f"p{i}": {"type": "boolean", "default": False} for i in range(16)}
    assert len(declare("most", handler, params=sixteen).params) == 16
    assert declare("longest", handler, expires_in=3600).expires_in == 3600.0
    assert declare("shortest", handler, expires_in=5).expires_in == 5.0
    assert declare("drive", handler, moves_vehicle=True).moves_vehicle is True
