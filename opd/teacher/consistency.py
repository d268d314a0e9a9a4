"""Start-up check that the student and the teacher speak the same tokens.

OPD compares the student's and the teacher's logprobs of the *same token ids*; if the tokenizers,
EOS ids or chat templates differ, training runs and silently learns garbage. This compares them
before the first step and fails with a message that says what differs.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from transformers import PreTrainedTokenizerBase

from opd.arguments import ConfigError


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """What must agree between student and teacher, as comparable values (hashes, ids)."""
    vocab = tokenizer.get_vocab()
    vocab_hash = hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()[:16]
    template = getattr(tokenizer, "chat_template", None) or ""
    eos_ids = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else -1
    return {
        "vocab_size": len(vocab),
        "vocab_sha256": vocab_hash,
        "eos_token_id": eos_ids,
        "chat_template_sha256": hashlib.sha256(str(template).encode()).hexdigest()[:16],
    }


def check_same_tokenizer(
    student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase, *, teacher_name: str = ""
) -> None:
    """Raise ConfigError naming every field in which the two tokenizers differ."""
    compare_fingerprints(
        tokenizer_fingerprint(student), tokenizer_fingerprint(teacher), teacher_name=teacher_name
    )


def compare_fingerprints(
    student_print: dict[str, Any],
    teacher_print: dict[str, Any],
    *,
    teacher_name: str = "",
    source: str = "",
) -> None:
    """Raise ConfigError naming every fingerprint field in which student and teacher differ.

    `teacher_print` may come from a server's `/info` or a shard manifest (`source` says which);
    fields it lacks are not compared.
    """
    differences = [
        f"{key}: student {student_print[key]!r} vs teacher {teacher_print[key]!r}"
        for key in student_print
        if key in teacher_print and student_print[key] != teacher_print[key]
    ]
    if differences:
        where = f" ({source})" if source else ""
        raise ConfigError(
            f"The teacher {teacher_name!r}{where} does not share the student's tokenizer ("
            + "; ".join(differences)
            + "). OPD compares logprobs of the same token ids, so both models must use the same "
            "tokenizer, EOS token and chat template: pick a teacher from the student's family, "
            "or set teacher_cross_tokenizer: true to align the two tokenizers by text."
        )
