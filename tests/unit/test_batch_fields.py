"""`OPDBatchFields`: opd's loss inputs survive TRL's shuffle and split of the batch dict, row for
row, and read back through the one seam (`pack_into` / `unpack`)."""

from __future__ import annotations

from pathlib import Path

import torch
from trl.trainer.utils import shuffle_sequence_dict, split_tensor_dict

import opd
from opd.types import OPDBatchFields

B, T, K = 4, 3, 2


def _fields_of_row(row: int) -> dict[str, torch.Tensor]:
    """Values that name their row, so a misaligned slice shows."""
    return {
        "keep_mask_BT": torch.tensor([True, row % 2 == 0, False]),
        "offpolicy_B": torch.tensor(row == 3),
        "teacher_topk_ids_BTK": torch.full((T, K), row),
        "teacher_topk_logprobs_BTK": torch.full((T, K), -float(row)),
    }


def test_fields_travel_with_their_rows_through_trls_shuffle_and_split():
    rows = [_fields_of_row(row) for row in range(B)]
    fields = OPDBatchFields(**{name: torch.stack([r[name] for r in rows]) for name in rows[0]})
    # TRL's own keys: rows first, and a 0-d count that every micro-batch keeps whole
    batch = {"completion_ids": torch.arange(B)[:, None].expand(B, T), "num_items": torch.tensor(7)}
    fields.pack_into(batch)
    torch.manual_seed(0)
    micro_batches = split_tensor_dict(shuffle_sequence_dict(batch), num_chunks=2)
    seen = []
    for micro in micro_batches:
        unpacked = OPDBatchFields.unpack(micro)
        assert unpacked.teacher_hidden_BTH is None  # never packed: stays out of the dict
        for i, row in enumerate(micro["completion_ids"][:, 0].tolist()):
            expected = _fields_of_row(row)
            assert unpacked.keep_mask_BT[i].equal(expected["keep_mask_BT"])
            assert bool(unpacked.offpolicy_B[i]) == bool(expected["offpolicy_B"])
            assert unpacked.teacher_topk_ids_BTK[i].equal(expected["teacher_topk_ids_BTK"])
            assert unpacked.teacher_topk_logprobs_BTK[i].equal(
                expected["teacher_topk_logprobs_BTK"]
            )
            seen.append(row)
    assert sorted(seen) == list(range(B))


def test_only_the_seam_names_the_keys():
    package = Path(opd.__file__).parent
    for key in OPDBatchFields.batch_keys():
        naming = [
            path.relative_to(package).as_posix()
            for path in package.rglob("*.py")
            if f'"{key}"' in path.read_text()
        ]
        assert naming == ["types.py"], key
