"""Student/teacher tokenizer check: a mismatch fails early and says what differs."""

from __future__ import annotations

import pytest

from opd.config import ConfigError
from opd.demo.tiny import ALPHABET, build_char_tokenizer
from opd.teacher.consistency import check_same_tokenizer, tokenizer_fingerprint


def test_same_tokenizer_passes():
    check_same_tokenizer(build_char_tokenizer(), build_char_tokenizer())


def test_different_vocabulary_is_named():
    teacher = build_char_tokenizer(ALPHABET + "!")
    with pytest.raises(ConfigError, match=r"vocab_size: student 49 vs teacher 50") as error:
        check_same_tokenizer(build_char_tokenizer(), teacher, teacher_name="big-teacher")
    assert "'big-teacher'" in str(error.value) and "vocab_sha256" in str(error.value)


def test_different_chat_template_is_named():
    teacher = build_char_tokenizer()
    teacher.chat_template = "{{ messages[0]['content'] }}"
    with pytest.raises(ConfigError, match="chat_template_sha256") as error:
        check_same_tokenizer(build_char_tokenizer(), teacher)
    assert "vocab" not in str(error.value).split("(")[1].split(")")[0]


def test_same_vocabulary_different_order_is_a_mismatch():
    # Same characters, different ids: token ids would mean different things to the two models.
    student = build_char_tokenizer("ab")
    teacher = build_char_tokenizer("ba")
    assert (
        tokenizer_fingerprint(student)["vocab_size"] == tokenizer_fingerprint(teacher)["vocab_size"]
    )
    with pytest.raises(ConfigError, match="vocab_sha256"):
        check_same_tokenizer(student, teacher)


def test_trainer_refuses_a_mismatched_teacher_before_building_vllm(tiny_student, tmp_path):
    from datasets import Dataset

    from opd import OPDConfig, OPDTrainer

    teacher_dir = tmp_path / "teacher"
    build_char_tokenizer(ALPHABET + "!").save_pretrained(teacher_dir)
    args = OPDConfig(output_dir=str(tmp_path), teacher_model_name_or_path=str(teacher_dir),
                     report_to="none", use_vllm=True)  # fmt: skip
    with pytest.raises(ConfigError, match="does not share the student's tokenizer"):
        OPDTrainer(
            model=str(tiny_student), args=args, train_dataset=Dataset.from_dict({"prompt": ["1"]})
        )
