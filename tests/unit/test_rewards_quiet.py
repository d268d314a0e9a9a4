"""math-verify's "Timeout is disabled" warning stays out of the log (`opd/rewards.py`).

math-verify shows it once per process, guarded by a module flag; the test re-arms the flags so
that the warning's code path runs again, whatever ran earlier in this process.
"""

from __future__ import annotations

import logging

import math_verify.grader
import math_verify.parser

from opd.rewards import math_accuracy_reward


def test_math_reward_logs_no_timeout_warning(monkeypatch, caplog, capsys):
    monkeypatch.setattr(math_verify.parser, "TIMEOUT_WARNING_SHOWN", False)
    monkeypatch.setattr(math_verify.grader, "TIMEOUT_WARNING_SHOWN", False)
    with caplog.at_level(logging.DEBUG):  # the root logger: everything that propagates
        rewards = math_accuracy_reward([r"\boxed{72}", "#### 71"], answer=["#### 72", "72"])
    assert rewards == [1.0, 0.0]
    # both warnings' code paths ran (parse and verify set the flags)...
    assert math_verify.parser.TIMEOUT_WARNING_SHOWN and math_verify.grader.TIMEOUT_WARNING_SHOWN
    # ...and neither reached a handler or the console
    assert not [r for r in caplog.records if "Timeout is disabled" in r.getMessage()]
    assert "Timeout is disabled" not in "".join(capsys.readouterr())
