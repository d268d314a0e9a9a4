"""MOPD's peer contexts (`opd/teacher/peer_context.py`), on hand-written groups.

Test: `pytest tests/unit/test_peer_context.py`.
"""

from __future__ import annotations

import pytest

from opd.teacher.peer_context import PeerContextSettings, groups_with_success, peer_contexts
from opd.types import PeerContext

OK, NO = "Correct solution:", "A known failed solution (avoid repeating this mistake):"


def settings(peers=PeerContext.CONTRASTIVE, **fields) -> PeerContextSettings:
    return PeerContextSettings(peers=peers, success_label=OK, failure_label=NO, **fields)


def test_a_four_member_group_with_known_rewards_gives_exactly_the_expected_contexts():
    """Rewards [1, 0, 1, 0]; up to 2 successes and 1 failure of the *other* members, in group
    order, successes first; the row's own completion never appears in its context."""
    completions = ["a=2", "a=3", "b=2", "c=9"]
    contexts = peer_contexts(
        completions, [True, False, True, False], group_size=4,
        settings=settings(max_successes=2, max_failures=1),
    )  # fmt: skip
    assert contexts == [
        f"{OK}\nb=2\n\n{NO}\na=3",  # row 0: peers 1 (fail), 2 (success), 3 (fail)
        f"{OK}\na=2\n\n{OK}\nb=2\n\n{NO}\nc=9",  # row 1: both successes, the other failure
        f"{OK}\na=2\n\n{NO}\na=3",
        f"{OK}\na=2\n\n{OK}\nb=2\n\n{NO}\na=3",
    ]


def test_successes_only_and_numbered_labels():
    contexts = peer_contexts(
        ["x", "y", "z", "w"], [True, True, True, False], group_size=4,
        settings=PeerContextSettings(
            peers=PeerContext.SUCCESSES, max_successes=2, success_label="Solution {n}:"
        ),
    )  # fmt: skip
    assert contexts[3] == "Solution 1:\nx\n\nSolution 2:\ny"  # no failure block, numbered
    assert contexts[0] == "Solution 1:\ny\n\nSolution 2:\nz"


def test_rows_whose_peers_hold_no_success_fall_back_to_the_reference_or_none():
    """The lone success's peers all failed: it falls back too; a group with no success uses
    the reference solution as it is (OPSD's context), and without one gets None."""
    contexts = peer_contexts(
        ["s", "f1", "f2", "f3", "g1", "g2", "g3", "g4"], [True] + [False] * 7,
        group_size=4, settings=settings(), references_G=["ref A"] * 4 + [None] * 4,
    )  # fmt: skip
    assert contexts[0] == "ref A"  # the only success: no *peer* success
    assert contexts[1] == f"{OK}\ns\n\n{NO}\nf2"
    assert contexts[4:] == [None] * 4


def test_without_peers_the_context_is_the_reference_exactly():
    """group_size 1 (no peers) or max_successes 0: every row's context is its reference, which
    is what OPSD puts in the template (the trainer-level equality: test_guidance_methods.py)."""
    references = ["first solution", "second solution"]
    for group_size, fields in ((1, {}), (2, {"max_successes": 0})):
        contexts = peer_contexts(
            ["a", "b"], [True, True], group_size=group_size, settings=settings(**fields),
            references_G=references,
        )  # fmt: skip
        assert contexts == references


def test_peer_text_is_stripped_and_empty_references_count_as_none():
    contexts = peer_contexts(
        ["  a  \n", "b"], [True, False], group_size=2, settings=settings(), references_G=["", ""]
    )
    assert contexts == [None, f"{OK}\na"]


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="multiple of group_size=4"):
        peer_contexts(["a"] * 3, [True] * 3, group_size=4, settings=settings())
    with pytest.raises(ValueError, match="2 references for 4 rows"):
        peer_contexts(["a"] * 4, [True] * 4, group_size=4, settings=settings(),
                      references_G=["r"] * 2)  # fmt: skip
    with pytest.raises(ValueError, match="successes' or 'contrastive"):
        PeerContextSettings(peers=PeerContext.NONE)


def test_groups_with_success():
    assert groups_with_success([True, False, False, False, False, False], group_size=2) == 1 / 3
    assert groups_with_success([], group_size=2) == 0.0
