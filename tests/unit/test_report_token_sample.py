"""The TIP token sample the trainer writes for the report's scatter (opd_tip_tokens.jsonl)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from opd.objectives.tip import batch_quantile
from opd.report.token_sample import MAX_TOKENS, append_tip_token_sample, is_sampled_step

VOCAB = 50


def _batch(num_rows: int = 8, length: int = 100):
    """Distinct h per valid token (spaced 1e-3 apart, so the 3-decimal rounding keeps them
    apart), j = 1 - h, the last 10 positions of each row padded, every 3rd token kept."""
    mask_BT = torch.ones(num_rows, length)
    mask_BT[:, -10:] = 0
    h_BT = torch.arange(num_rows * length, dtype=torch.float32).reshape(num_rows, length) * 1e-3
    entropy_BT = h_BT * math.log(VOCAB)
    jsd_BT = (1 - h_BT) * math.log(2)
    keep_BT = (torch.arange(num_rows * length).reshape(num_rows, length) % 3 == 0) & mask_BT.bool()
    return entropy_BT, jsd_BT, mask_BT, keep_BT, h_BT


def _write(tmp_path, step, entropy_BT, jsd_BT, mask_BT, keep_BT, seed=0):
    return append_tip_token_sample(
        tmp_path, step=step, rule="q3", entropy_BT=entropy_BT, divergence_BT=jsd_BT,
        mask_BT=mask_BT, keep_BT=keep_BT, vocab_size=VOCAB, entropy_quantile=0.5,
        divergence_quantile=0.8, seed=seed,
    )  # fmt: skip


def test_sample_values_flags_and_thresholds(tmp_path):
    entropy_BT, jsd_BT, mask_BT, keep_BT, h_BT = _batch()
    path = _write(tmp_path, 1, entropy_BT, jsd_BT, mask_BT, keep_BT)
    (record,) = [json.loads(line) for line in path.read_text().splitlines()]
    assert record["step"] == 1 and record["rule"] == "q3" and record["num_valid"] == 720
    assert len(record["h"]) == len(record["j"]) == len(record["kept"]) == MAX_TOKENS
    # Each sampled token is a valid one, with its own j and kept flag.
    valid_N = mask_BT.bool().flatten()
    valid_h = {round(v, 3): i for i, v in enumerate(h_BT.flatten().tolist()) if valid_N[i]}
    for h, j, kept in zip(record["h"], record["j"], record["kept"], strict=True):
        index = valid_h[h]  # KeyError: a padded token was sampled
        assert j == pytest.approx(1 - h, abs=2e-3)
        assert kept == int(keep_BT.flatten()[index])
    assert len(set(record["h"])) == MAX_TOKENS  # without replacement
    h_N = h_BT.flatten()[valid_N]
    assert record["h_threshold"] == pytest.approx(float(batch_quantile(h_N, 0.5)), abs=1e-4)
    assert record["j_threshold"] == pytest.approx(float(batch_quantile(1 - h_N, 0.8)), abs=1e-4)


def test_seeded_small_and_entropy_only(tmp_path):
    entropy_BT, jsd_BT, mask_BT, keep_BT, _ = _batch()
    first = _write(tmp_path / "a", 1, entropy_BT, jsd_BT, mask_BT, keep_BT).read_text()
    again = _write(tmp_path / "b", 1, entropy_BT, jsd_BT, mask_BT, keep_BT).read_text()
    other = _write(tmp_path / "c", 1, entropy_BT, jsd_BT, mask_BT, keep_BT, seed=1).read_text()
    assert first == again and first != other
    assert len(first) < 4500, "one line per step stays a few KB"
    path = append_tip_token_sample(
        tmp_path, step=1, rule="entropy_sample", entropy_BT=entropy_BT, divergence_BT=None,
        mask_BT=mask_BT, keep_BT=keep_BT, vocab_size=VOCAB, entropy_quantile=0.5,
        divergence_quantile=0.8, seed=0,
    )  # fmt: skip
    record = json.loads(path.read_text())
    assert record["j"] is None and record["j_threshold"] is None and len(record["h"]) == 256


def test_step_one_starts_a_fresh_file_later_steps_append(tmp_path):
    entropy_BT, jsd_BT, mask_BT, keep_BT, _ = _batch(num_rows=2, length=20)
    for step in (1, 2, 3):
        path = _write(tmp_path, step, entropy_BT, jsd_BT, mask_BT, keep_BT)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    assert len(json.loads(path.read_text().splitlines()[0])["h"]) == 2 * 10  # all valid tokens
    _write(tmp_path, 1, entropy_BT, jsd_BT, mask_BT, keep_BT)  # a new run in the same folder
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1]


def test_unsampled_steps_and_empty_batches_write_nothing(tmp_path):
    entropy_BT, jsd_BT, mask_BT, keep_BT, _ = _batch(num_rows=2, length=20)
    assert _write(tmp_path, 105, entropy_BT, jsd_BT, mask_BT, keep_BT) is None
    assert _write(tmp_path, 1, entropy_BT, jsd_BT, torch.zeros_like(mask_BT), keep_BT) is None
    assert not (tmp_path / "opd_tip_tokens.jsonl").exists()


def test_sampled_steps_thin_out_logarithmically():
    sampled = [step for step in range(1, 10_001) if is_sampled_step(step)]
    assert sampled[:99] == list(range(1, 100))
    assert sampled[99:102] == [100, 110, 120]
    assert 1000 in sampled and 1010 not in sampled and 1100 in sampled
    assert len(sampled) == 99 + 90 + 90 + 1
    assert not is_sampled_step(0)
