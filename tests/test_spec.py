"""Chain specs: malformed specs are refused naming the field; good ones round-trip."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors import _spec
from actors._spec import (
    ChainSpec,
    ChainSpecError,
    Command,
    StepListCommand,
    StepResult,
    StepSpec,
    command_class,
    register_command,
    validate_spec,
)


@pytest.fixture
def isolated_commands(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Registrations made by a test do not outlive it."""
    monkeypatch.setattr(_spec, "_COMMANDS", dict(_spec._COMMANDS))
    yield


class _Noop(Command):
    def next_step(self, results: Sequence[StepResult]) -> StepSpec | None:
        return None


def _good() -> dict[str, Any]:
    """A valid spec as a mapping; each table row breaks one field of it."""
    return {
        "pool": "pool-1",
        "command_type": "live_storage_migration",
        "params": {"image": "img-1", "size": 3, "sparse": True, "tags": ["a", "b"]},
        "steps": [
            {"verb": "createVolume", "revert_verb": "deleteVolume", "exclusive": ["img-1"]},
            {"verb": "syncImageData", "shared": ["img-0"], "exclusive": ["img-1"]},
            {
                "verb": "copyImage",
                "params": {"dst": "img-2"},
                "revert_verb": "deleteImage",
                "revert_params": {"img": "img-2"},
                "name": "copy",
            },
        ],
        "deadline_s": 600,
        "task_timeout_s": 60.5,
    }


def _with(path: Sequence[str | int], value: Any) -> dict[str, Any]:
    data = _good()
    target: Any = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return data


def _without(*path: str | int) -> dict[str, Any]:
    data = _good()
    target: Any = data
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return data


# (test id, the mapping given to ChainSpec.from_dict, the field the error must name)
MALFORMED: list[tuple[str, dict[str, Any], str]] = [
    ("missing pool", _without("pool"), "pool"),
    ("empty pool", _with(["pool"], ""), "pool"),
    ("pool not a string", _with(["pool"], 7), "pool"),
    ("pool with a trailing newline", _with(["pool"], "pool-1\n"), "pool"),
    ("missing command_type", _without("command_type"), "command_type"),
    ("command_type with a space", _with(["command_type"], "live migration"), "command_type"),
    ("command_type too long", _with(["command_type"], "x" * 129), "command_type"),
    ("steps and command both given", _with(["command"], "noop"), "steps"),
    ("neither steps nor command", _without("steps"), "steps"),
    ("empty steps", _with(["steps"], []), "steps"),
    ("steps a string", _with(["steps"], "createVolume"), "steps"),
    ("a step that is not a mapping", _with(["steps", 1], "syncImageData"), "steps[1]"),
    ("steps[2].verb missing", _without("steps", 2, "verb"), "steps[2].verb"),
    ("steps[0].verb empty", _with(["steps", 0, "verb"], ""), "steps[0].verb"),
    ("unknown field in a step", _with(["steps", 1, "colour"], "red"), "steps[1].colour"),
    ("params with a non-str key", _with(["params"], {1: "x"}), "params"),
    ("params not a mapping", _with(["params"], ["a"]), "params"),
    ("params an empty list", _with(["params"], []), "params"),
    ("step params an empty list", _with(["steps", 0, "params"], []), "steps[0].params"),
    ("params value object()", _with(["params", "obj"], object()), "params.obj"),
    ("params value nan", _with(["params", "ratio"], float("nan")), "params.ratio"),
    ("params value inf", _with(["params", "ratio"], float("inf")), "params.ratio"),
    ("params nested non-plain", _with(["params", "tags"], ["a", {1, 2}]), "params.tags[1]"),
    ("params nested non-str key", _with(["params", "deep"], {"k": {2: "v"}}), "params.deep.k"),
    (
        "step params value object()",
        _with(["steps", 2, "params", "dst"], object()),
        "steps[2].params.dst",
    ),
    (
        "revert_params without revert_verb",
        _with(["steps", 1, "revert_params"], {"img": "img-1"}),
        "steps[1].revert_params",
    ),
    (
        "revert_params with a nan",
        _with(["steps", 2, "revert_params", "x"], float("nan")),
        "steps[2].revert_params.x",
    ),
    ("revert_verb empty", _with(["steps", 0, "revert_verb"], ""), "steps[0].revert_verb"),
    (
        "resource both shared and exclusive",
        _with(["steps", 1, "shared"], ["img-1"]),
        "steps[1].shared",
    ),
    ("exclusive a string", _with(["steps", 0, "exclusive"], "img-1"), "steps[0].exclusive"),
    ("an empty resource name", _with(["steps", 0, "exclusive"], [""]), "steps[0].exclusive[0]"),
    ("negative deadline_s", _with(["deadline_s"], -1), "deadline_s"),
    ("zero deadline_s", _with(["deadline_s"], 0), "deadline_s"),
    ("nan deadline_s", _with(["deadline_s"], float("nan")), "deadline_s"),
    ("infinite deadline_s", _with(["deadline_s"], float("inf")), "deadline_s"),
    ("bool deadline_s", _with(["deadline_s"], True), "deadline_s"),
    ("string task_timeout_s", _with(["task_timeout_s"], "60"), "task_timeout_s"),
    ("negative task_timeout_s", _with(["task_timeout_s"], -0.5), "task_timeout_s"),
    ("chain_id with a slash", _with(["chain_id"], "a/b"), "chain_id"),
    ("chain_id with a trailing newline", _with(["chain_id"], "chain-1\n"), "chain_id"),
    ("unknown field", _with(["colour"], "red"), "colour"),
]


@pytest.mark.parametrize(
    ("data", "field"), [(d, f) for _, d, f in MALFORMED], ids=[i for i, _, _ in MALFORMED]
)
def test_malformed_spec_is_refused_naming_the_field(data: dict[str, Any], field: str) -> None:
    with pytest.raises(ChainSpecError) as info:
        ChainSpec.from_dict(data)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    assert info.value.problem


def test_unknown_command_is_refused_naming_the_command_field() -> None:
    data = _without("steps")
    data["command"] = "no.such.command"
    with pytest.raises(ChainSpecError) as info:
        ChainSpec.from_dict(data)
    assert info.value.field == "command"
    assert "no.such.command" in str(info.value)


def test_spec_for_a_pool_the_runtime_does_not_serve_is_refused() -> None:
    spec = ChainSpec.from_dict(_good())
    with pytest.raises(ChainSpecError) as info:
        validate_spec(spec, pools=["pool-2", "pool-3"])
    assert info.value.field == "pool"
    assert "pool-1" in str(info.value)
    assert "pool-2" in str(info.value)
    assert validate_spec(spec, pools=["pool-1"]) is spec


def test_validate_spec_refuses_what_is_not_a_chain_spec() -> None:
    with pytest.raises(ChainSpecError) as info:
        validate_spec(_good())
    assert info.value.field == "spec"


def test_from_dict_refuses_what_is_not_a_mapping() -> None:
    with pytest.raises(ChainSpecError) as info:
        ChainSpec.from_dict(["pool-1"])  # type: ignore[arg-type]
    assert info.value.field == "spec"


def test_step_spec_built_in_code_is_validated_like_one_from_a_mapping() -> None:
    spec = ChainSpec(
        pool="pool-1",
        command_type="t",
        steps=[StepSpec("a"), StepSpec("b"), StepSpec("c", revert_params={"x": 1})],
    )
    with pytest.raises(ChainSpecError) as info:
        validate_spec(spec)
    assert info.value.field == "steps[2].revert_params"


def test_spec_error_is_a_value_error() -> None:
    assert issubclass(ChainSpecError, ValueError)


def test_valid_spec_is_accepted_unchanged() -> None:
    spec = ChainSpec.from_dict(_good())
    assert spec.pool == "pool-1"
    assert spec.steps is not None and len(spec.steps) == 3
    assert spec.steps[0].exclusive == ("img-1",)
    assert spec.steps[2].revert_params == {"img": "img-2"}
    assert spec.deadline_s == 600


def test_spec_round_trips_through_to_dict_and_from_dict() -> None:
    spec = ChainSpec.from_dict(_good())
    again = ChainSpec.from_dict(spec.to_dict())
    assert again == spec
    assert again.to_dict() == spec.to_dict()


def test_spec_built_in_code_round_trips_through_its_dict() -> None:
    spec = ChainSpec(
        pool="pool-1",
        command_type="t",
        params={"n": 1},
        steps=[StepSpec("a", {"x": [1, 2]}, "ra", None, ("i",), ("j",), "first")],
        deadline_s=5.0,
        chain_id="chain-7",
    )
    assert ChainSpec.from_dict(spec.to_dict()) == spec


def test_command_spec_round_trips(isolated_commands: None) -> None:
    register_command("test_spec.noop")(_Noop)
    spec = ChainSpec(pool="pool-1", command_type="t", command="test_spec.noop")
    assert validate_spec(spec) is spec
    assert ChainSpec.from_dict(spec.to_dict()) == spec
    assert isinstance(spec.make_command(), _Noop)


def test_step_list_spec_makes_a_step_list_command() -> None:
    spec = ChainSpec.from_dict(_good())
    cmd = spec.make_command()
    assert isinstance(cmd, StepListCommand)
    assert spec.steps is not None
    assert cmd.next_step([]) == spec.steps[0]
    done = [StepResult(i, s.verb, s.params, f"t{i}") for i, s in enumerate(spec.steps)]
    assert cmd.next_step(done[:2]) == spec.steps[2]
    assert cmd.next_step(done) is None


def test_register_command_refuses_a_different_class_under_a_taken_name(
    isolated_commands: None,
) -> None:
    register_command("test_spec.taken")(_Noop)
    register_command("test_spec.taken")(_Noop)  # the same class again is fine

    class Other(_Noop):
        pass

    with pytest.raises(ValueError, match=r"test_spec\.taken"):
        register_command("test_spec.taken")(Other)
    assert command_class("test_spec.taken") is _Noop


def test_register_command_refuses_a_class_that_is_not_a_command(isolated_commands: None) -> None:
    with pytest.raises(TypeError):
        register_command("test_spec.notcmd")(dict)  # type: ignore[type-var]


def test_register_command_refuses_an_invalid_name() -> None:
    with pytest.raises(ValueError, match="not a valid name"):
        register_command("has space")


def test_command_class_names_the_missing_command() -> None:
    with pytest.raises(KeyError, match=r"test_spec\.absent"):
        command_class("test_spec.absent")


def test_params_are_kept_as_given(isolated_commands: None) -> None:
    params: Mapping[str, Any] = {"a": {"b": [1, 2.5, None, b"raw", True]}}
    spec = ChainSpec(pool="p", command_type="t", params=params, steps=[StepSpec("v", params)])
    assert validate_spec(spec).params == params


@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5) | st.binary(max_size=3)
    | st.floats(allow_nan=True, allow_infinity=True) | st.sets(st.integers(), max_size=2),
    lambda inner: st.lists(inner, max_size=3) | st.tuples(inner, inner)
    | st.dictionaries(st.text(max_size=3) | st.integers(), inner, max_size=3),
    max_leaves=12,
))
@settings(max_examples=300, deadline=None)
def test_the_fast_plain_data_check_never_accepts_what_the_precise_one_refuses(
    value: object,
) -> None:
    from actors._spec import _check_plain, _plain

    try:
        _check_plain(value, "params", 0)
        precise_ok = True
    except ChainSpecError:
        precise_ok = False
    if _plain(value, 0):
        assert precise_ok
    if not precise_ok:
        assert not _plain(value, 0)


def test_nesting_depth_is_judged_the_same_on_the_fast_and_the_precise_paths() -> None:
    from actors._spec import _check_plain, _plain

    def nested(levels: int, leaf: object) -> object:
        value = leaf
        for _ in range(levels):
            value = [value]
        return value

    for levels in (15, 16, 17):
        for leaf in (1, [], {}, [1]):
            value = {"a": nested(levels, leaf)}
            try:
                _check_plain(value, "params", 0)
                precise = True
            except ChainSpecError:
                precise = False
            assert _plain(value, 0) == precise, (levels, leaf)
    assert not _plain({"a": nested(16, 1)}, 0)
