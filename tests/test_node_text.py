"""What a node or a file on disk wrote reaches the operator's terminal escaped.

A node controls its device string and its error texts; a run folder's files can be
edited. Shown raw, an escape sequence could set the terminal title, erase table
lines and print a fake "ALL NODES OK"; a bidi or zero-width character could
reorder or hide what a table shows.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.app.error import Error

from server.record.store import RunStore
from strategies import replies
from strategies.records import pack_arrays
from strategies.validation import specs_from_arrays
from task import keys
from task.text import escape_unprintable

TITLE = "\x1b]0;pwned\x07"  # sets the terminal's title
ERASE = "\r\x1b[2K\x1b[1AALL NODES OK"  # erases the line above and prints over it
BIDI = "ok\u202etxt.exe\u200b"


def test_escape_unprintable_shows_every_control_bidi_and_zero_width_character():
    # Execute
    shown = escape_unprintable(TITLE + ERASE + BIDI + "\U000e0001")

    # Assert
    assert shown.isprintable()
    assert "\\x1b]0;pwned\\x07" in shown and "\\x0d\\x1b[2K" in shown
    assert "\\u202e" in shown and "\\u200b" in shown and "\\U000e0001" in shown
    assert escape_unprintable("cuda:0 café") == "cuda:0 café"
    assert escape_unprintable("x" * 50, limit=10) == "x" * 10


def sent_train_message(node_id: int) -> Message:
    return Message(RecordDict(), dst_node_id=node_id, message_type="train")


@pytest.mark.usefixtures("server_identity")
def test_a_nodes_error_text_and_device_are_escaped_at_the_reply_boundary():
    # Prepare: an error reply with a hostile reason, and a reply with a hostile device
    arrays = {"w": np.zeros(3, dtype=np.float32)}
    specs = specs_from_arrays(arrays)
    error_reply = Message(Error(code=0, reason=TITLE + ERASE), reply_to=sent_train_message(7))
    content = RecordDict(
        {
            keys.ARRAYS: pack_arrays({"w": np.ones(3, dtype=np.float32)}),
            keys.INFO: ConfigRecord({"device": TITLE + "cuda:0" + BIDI}),
        }
    )
    device_reply = Message(content, reply_to=sent_train_message(8))

    # Execute
    error_outcome, _ = replies.check_train_reply(error_reply, specs, replies.RoundReplyTracker(1))
    device_outcome, _ = replies.check_train_reply(device_reply, specs, replies.RoundReplyTracker(1))

    # Assert
    assert not error_outcome.accepted
    assert error_outcome.reason.isprintable() and "ALL NODES OK" in error_outcome.reason
    assert device_outcome.info["device"].isprintable()
    assert device_outcome.info["device"].startswith("\\x1b]0;pwned\\x07cuda:0")


def test_fedcoord_nodes_and_runs_print_no_control_sequence(tmp_path):
    # Prepare: a run whose node rows hold what a hostile node (or an edit) put there
    store = RunStore.create(tmp_path / "run-a", "run-a", {"seed": 1}, num_rounds=2)
    store.record_node_reply(11, partition_id=0, num_examples=5, device=TITLE, joined=True)
    store.record_node_fault(12, 1, "failed", ERASE + BIDI)
    store.close()

    # Execute: the command line as an operator runs it, in its own process
    outputs = [
        subprocess.run(
            [sys.executable, "-m", "server.ui.cli", "--runs-dir", str(tmp_path), *verb],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        for verb in (["nodes", "run-a"], ["runs"])
    ]

    # Assert
    nodes, runs = outputs
    assert nodes.returncode == 0, nodes.stderr
    assert "\\x1b]0;pwned\\x07" in nodes.stdout and "\\x0d\\x1b[2K" in nodes.stdout
    for output in outputs:
        text = output.stdout + output.stderr
        assert not [char for line in text.splitlines() for char in line if not char.isprintable()]
    assert "\\u202e" in nodes.stdout and "run-a" in runs.stdout


def test_characters_that_print_as_nothing_are_escaped_too():
    # Execute: variation selectors, a filler, the braille blank, a combining mark
    shown = escape_unprintable("cuda\u034f:0\ufe0f\U000e0100\u3164\u2800e\u0301")

    # Assert: each is visible as its escape; ordinary accented letters stay
    for escape in ("\\u034f", "\\ufe0f", "\\U000e0100", "\\u3164", "\\u2800", "\\u0301"):
        assert escape in shown
    assert escape_unprintable("café naïve") == "café naïve"
