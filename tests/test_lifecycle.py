import itertools

import pytest

from server.record import lifecycle
from server.record.lifecycle import InvalidTransitionError, next_state, validate_command


@pytest.mark.parametrize(
    ("state", "action", "expected"),
    [
        ("running", "pause", "paused"),
        ("paused", "resume", "running"),
        ("running", "stop", "stopping"),
        ("paused", "stop", "stopping"),
        ("stopping", "stopped", "stopped"),
        ("running", "all-rounds-done", "completed"),
        ("running", "error", "failed"),
        ("stopped", "restart", "running"),
        ("failed", "restart", "running"),
        ("interrupted", "restart", "running"),
    ],
)
def test_valid_transitions(state, action, expected):
    assert next_state(state, action) == expected


@pytest.mark.parametrize(
    ("state", "command"),
    [
        ("completed", "resume"),
        ("completed", "pause"),
        ("stopped", "pause"),
        ("stopped", "resume"),
        ("stopped", "stop"),
        ("failed", "stop"),
        ("paused", "pause"),
        ("running", "resume"),
        ("stopping", "pause"),
        ("stopping", "resume"),
        ("interrupted", "pause"),
        ("interrupted", "stop"),
    ],
)
def test_invalid_commands_are_refused_with_a_reason(state, command):
    # Execute / Assert
    with pytest.raises(InvalidTransitionError) as error:
        validate_command(state, command)
    assert f"cannot {command} a run that is {state}" in str(error.value)


def test_final_states_accept_no_command_and_say_how_to_restart():
    for state, command in itertools.product(lifecycle.FINAL_STATES, lifecycle.COMMANDS):
        with pytest.raises(InvalidTransitionError, match="resume=true"):
            validate_command(state, command)


def test_unknown_command_lists_the_valid_ones():
    with pytest.raises(InvalidTransitionError, match="valid: pause, resume, stop"):
        validate_command("running", "restart-now")


def test_every_state_is_reachable_from_running():
    # Prepare
    reachable = {"running"}
    frontier = ["running"]

    # Execute: breadth-first over the transition table
    while frontier:
        state = frontier.pop()
        for (source, _), target in lifecycle.TRANSITIONS.items():
            if source == state and target not in reachable:
                reachable.add(target)
                frontier.append(target)

    # Assert
    assert reachable == set(lifecycle.STATES)
