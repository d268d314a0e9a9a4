"""TCOD depth curriculum (METHODS.md s.10): hand-computed schedule values and depth masks in token
and step units."""

from __future__ import annotations

import pytest
import torch

from opd.objectives.curriculum import DepthSchedule, curriculum_depth, depth_mask_BT


@pytest.mark.parametrize(
    ("step", "expected"),
    # D = 1 + floor(3 * s / 6) = 1 + floor(s / 2): the paper's k_start = 1, eta = 2, k_max = 4.
    [(0, 1), (1, 1), (2, 2), (3, 2), (5, 3), (6, 4), (100, 4)],
)
def test_depth_staircase(step, expected):
    schedule = DepthSchedule(start=1, end=4, ramp_steps=6)
    assert curriculum_depth(step, schedule) == expected


def test_depth_when_ramp_does_not_divide():
    # D = floor(3 * s / 7): s = 2 -> 0 (6/7); 3 -> 1 (9/7); 5 -> 2 (15/7); 6 -> 2 (18/7); 7 -> 3.
    schedule = DepthSchedule(start=0, end=3, ramp_steps=7, unit="tokens")
    assert [curriculum_depth(s, schedule) for s in (2, 3, 5, 6, 7)] == [0, 1, 2, 2, 3]


def test_depth_without_ramp_is_end():
    schedule = DepthSchedule(start=2, end=5, ramp_steps=0)
    assert curriculum_depth(0, schedule) == 5


@pytest.mark.parametrize(
    "kwargs",
    [
        {"start": 3, "end": 2, "ramp_steps": 1},
        {"start": -1, "end": 2, "ramp_steps": 1},
        {"start": 1, "end": 2, "ramp_steps": -1},
        {"start": 1, "end": 2, "ramp_steps": 1, "unit": "turns"},
    ],
)
def test_schedule_rejects_bad_values(kwargs):
    with pytest.raises(ValueError, match="TCOD"):
        DepthSchedule(**kwargs)


def test_negative_step_and_depth_are_rejected():
    with pytest.raises(ValueError, match="step"):
        curriculum_depth(-1, DepthSchedule(start=1, end=2, ramp_steps=1))
    with pytest.raises(ValueError, match="depth"):
        depth_mask_BT(torch.ones(1, 2), -1)


# Row 0: two masked prompt tokens on the left; row 1: right padding; row 2: a masked hole.
TOKEN_MASK_BT = torch.tensor(
    [
        [0, 0, 1, 1, 1, 1],
        [1, 1, 1, 0, 0, 0],
        [1, 0, 1, 1, 0, 1],
    ]
)


def test_token_depth_mask():
    # depth 3 keeps the first 3 valid tokens: row 0 -> positions 2, 3, 4; row 1 -> 0, 1, 2 (all
    # of its valid tokens); row 2 -> 0, 2, 3 (the hole at 1 is skipped, not counted).
    expected = torch.tensor(
        [
            [0.0, 0.0, 1.0, 1.0, 1.0, 0.0],
            [1.0, 1.0, 1.0, 0.0, 0.0, 0.0],
            [1.0, 0.0, 1.0, 1.0, 0.0, 0.0],
        ]
    )
    torch.testing.assert_close(depth_mask_BT(TOKEN_MASK_BT, 3), expected)


def test_token_depth_mask_extremes():
    torch.testing.assert_close(depth_mask_BT(TOKEN_MASK_BT, 0), torch.zeros(3, 6))
    torch.testing.assert_close(depth_mask_BT(TOKEN_MASK_BT, 99), TOKEN_MASK_BT.float())


# Row 0, three steps: tokens 0-2 (end at 2), then environment output at 3-4 (masked; a stray end
# on 3 is ignored), tokens 5-6 (end at 6), tokens 7-8 (the last step runs to the last valid token).
# Row 1: a masked token on the left and padding on the right; steps {1}, {2, 3, 4}, {5}.
STEP_MASK_BT = torch.tensor(
    [
        [1, 1, 1, 0, 0, 1, 1, 1, 1],
        [0, 1, 1, 1, 1, 1, 0, 0, 0],
    ]
)
STEP_END_BT = torch.tensor(
    [
        [0, 0, 1, 1, 0, 0, 1, 0, 0],
        [0, 1, 0, 0, 1, 0, 0, 1, 0],
    ]
).bool()


@pytest.mark.parametrize(
    ("depth", "expected"),
    [
        (0, [[0, 0, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0, 0]]),
        (1, [[1, 1, 1, 0, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0, 0, 0, 0]]),
        (2, [[1, 1, 1, 0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 1, 0, 0, 0, 0]]),
        (3, [[1, 1, 1, 0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 0, 0, 0]]),
        (4, [[1, 1, 1, 0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 0, 0, 0]]),
    ],
)
def test_step_depth_mask(depth, expected):
    got = depth_mask_BT(STEP_MASK_BT, depth, step_end_BT=STEP_END_BT)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float32))


def test_every_token_a_step_matches_token_units():
    # With a step end on every token, D steps are D tokens.
    every_end_BT = torch.ones_like(TOKEN_MASK_BT, dtype=torch.bool)
    for depth in (1, 2, 4):
        torch.testing.assert_close(
            depth_mask_BT(TOKEN_MASK_BT, depth, step_end_BT=every_end_BT),
            depth_mask_BT(TOKEN_MASK_BT, depth),
        )
