"""Cross-tokenizer alignment (opd/teacher/alignment.py): hand-checked spans on local tokenizers.

Three tokenizers, all built here (no download): the demo's char-level one (one token per char,
its alphabet extended with é ö 日 本 語 🙂), a byte-level BPE, and a SentencePiece-style
(Metaspace) BPE with byte fallback whose alphabet lacks "語", "b" and ",". Both BPEs are trained on
CORPUS in milliseconds. Each test first asserts the token strings its expected spans rely on.

Char positions of SENTENCE = "héllo wörld 日本 🙂":
h0 é1 l2 l3 o4 _5 w6 ö7 r8 l9 d10 _11 日12 本13 _14 🙂15 (16 chars).

Test: `pytest -n 0 -q tests/unit/test_alignment.py`.
"""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast, PythonBackend

from opd.demo.tiny import ALPHABET, build_char_tokenizer
from opd.teacher.alignment import (
    AlignedSpan,
    CompletionAlignment,
    HFTeacherTokens,
    _repair_offsets,
    align_completion,
    align_completions,
    align_ends,
    offsets_from_token_strs,
)

SENTENCE = "héllo wörld 日本 🙂"
CORPUS = [
    "the answer is 42.", "the answer is 24.", "is it 42?", "hello world", "hello there",
    "héllo wörld", "wörld héllo", "olé café", "日本 🙂", "so  it\n\nis", "is  it\n\nso",
    "so   it", "is   so",
]  # fmt: skip


def _byte_level(trim_offsets: bool = False) -> PreTrainedTokenizerFast:
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    specials = ["<|eos|>", "<|pad|>", "<bos>"]
    trainer = trainers.BpeTrainer(
        vocab_size=256 + len(specials) + 40,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(CORPUS, trainer)
    if trim_offsets:  # RoBERTa-style: whitespace trimmed out of the offsets
        core.post_processor = processors.ByteLevel(trim_offsets=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<bos>"],
    )


def _metaspace() -> PreTrainedTokenizerFast:
    """Llama-style: '▁' for a space, a dummy '▁' before the text, '<0xNN>' byte fallback."""
    core = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    core.decoder = decoders.Sequence([*steps, decoders.Strip(" ", 1, 0)])  # drop the dummy space
    specials = ["<unk>", "</s>", "<pad>"]
    trainer = trainers.BpeTrainer(
        vocab_size=len(specials) + 60, special_tokens=specials, limit_alphabet=30,
        show_progress=False,
    )  # fmt: skip
    core.train_from_iterator(CORPUS, trainer)
    state = json.loads(core.to_str())  # the trainer adds no byte tokens: append all 256
    for byte in range(256):
        state["model"]["vocab"].setdefault(f"<0x{byte:02X}>", len(state["model"]["vocab"]))
    core = Tokenizer.from_str(json.dumps(state))
    return PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def char() -> PreTrainedTokenizerFast:
    return build_char_tokenizer(ALPHABET + "éö日本語🙂")


@pytest.fixture(scope="module")
def byte_level() -> PreTrainedTokenizerFast:
    return _byte_level()


@pytest.fixture(scope="module")
def metaspace() -> PreTrainedTokenizerFast:
    return _metaspace()


def _ids(tokenizer, text: str, eos: bool = True) -> list[int]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return [*ids, tokenizer.eos_token_id] if eos else ids


def _strs(tokenizer, text: str) -> list[str]:
    return tokenizer.convert_ids_to_tokens(_ids(tokenizer, text, eos=False))


def _spans(*quads: tuple[int, int, int, int]) -> list[AlignedSpan]:
    return [AlignedSpan(*quad) for quad in quads]


def _transposed(spans: list[AlignedSpan]) -> list[AlignedSpan]:
    return [AlignedSpan(s.teacher_lo, s.teacher_hi, s.student_lo, s.student_hi) for s in spans]


def _align(student, text: str, teacher) -> CompletionAlignment:
    return align_completion(_ids(student, text), student, HFTeacherTokens(teacher))


BYTE_LEVEL_SENTENCE = ["hÃ©llo", "Ġ", "wÃ¶rld", "Ġ", "æĹ", "¥æ", "ľ", "¬", "Ġ", "ðŁ", "Ļ", "Ĥ"]
# 日 = E6 97 A5 and 本 = E6 9C AC: "¥æ" finishes 日 and starts 本; 🙂 is three pieces.


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("char", "the answer is 42"),
        ("byte_level", "the answer is 42."),
        ("metaspace", "héllo wörld"),
    ],
)
def test_identical_tokenizers_give_the_same_ids_one_to_one(name, text, request):
    tokenizer = request.getfixturevalue(name)
    ids = _ids(tokenizer, text)
    alignment = align_completion(ids, tokenizer, HFTeacherTokens(tokenizer))
    assert alignment.teacher_ids == ids
    assert alignment.spans == [AlignedSpan(i, i + 1, i, i + 1) for i in range(len(ids))]


def test_identical_byte_level_keeps_the_pieces_of_split_chars_together(byte_level):
    assert _strs(byte_level, SENTENCE) == BYTE_LEVEL_SENTENCE
    ids = _ids(byte_level, SENTENCE)
    alignment = align_completion(ids, byte_level, HFTeacherTokens(byte_level))
    assert alignment.teacher_ids == ids
    one_to_one = [(i, i + 1, i, i + 1) for i in (0, 1, 2, 3, 8, 12)]
    assert alignment.spans == _spans(*sorted([*one_to_one, (4, 8, 4, 8), (9, 12, 9, 12)]))


def test_char_student_with_a_bpe_teacher(char, byte_level):
    text = "the answer is 42"
    assert _strs(byte_level, text) == ["the", "Ġanswer", "Ġis", "Ġ42"]
    alignment = _align(char, text, byte_level)
    assert alignment.teacher_ids == _ids(byte_level, text)  # ends with the teacher's EOS
    assert alignment.spans == _spans(
        (0, 3, 0, 1), (3, 10, 1, 2), (10, 13, 2, 3), (13, 16, 3, 4), (16, 17, 4, 5)
    )
    # One teacher token for two student tokens.
    assert _align(char, "42", byte_level).spans == _spans((0, 2, 0, 1), (2, 3, 1, 2))


def test_whitespace_merges(char, byte_level, metaspace):
    assert _strs(byte_level, "a   b") == ["a", "ĠĠ", "Ġ", "b"]
    assert _align(char, "a   b", byte_level).spans == _spans(
        (0, 1, 0, 1), (1, 3, 1, 2), (3, 4, 2, 3), (4, 5, 3, 4), (5, 6, 4, 5)
    )
    text = "so  it\n\nis"  # the teacher's "▁it\n\n" is three student tokens: Ġit Ċ Ċ
    assert _strs(byte_level, text) == ["so", "Ġ", "Ġit", "Ċ", "Ċ", "is"]
    assert _strs(metaspace, text) == ["▁so", "▁", "▁it\n\n", "is"]
    assert _align(byte_level, text, metaspace).spans == _spans(
        (0, 1, 0, 1), (1, 2, 1, 2), (2, 5, 2, 3), (5, 6, 3, 4), (6, 7, 4, 5)
    )


# char student vs byte-level teacher on SENTENCE. HF ends 日本's pieces "æĹ" "¥æ" "ľ" "¬" at
# 13, 14, 14, 14, but "¥æ" holds 本's first byte: no span may close after 日 (char 12), so 日本 is
# one span of 2 chars and 4 pieces; 🙂's 3 pieces are one span with its char.
CHAR_VS_BYTE_LEVEL = _spans(
    (0, 5, 0, 1), (5, 6, 1, 2), (6, 11, 2, 3), (11, 12, 3, 4), (12, 14, 4, 8),
    (14, 15, 8, 9), (15, 16, 9, 12), (16, 17, 12, 13),
)  # fmt: skip


def test_a_token_straddling_two_chars_on_the_teacher_side(char, byte_level):
    assert _strs(byte_level, SENTENCE) == BYTE_LEVEL_SENTENCE
    assert _align(char, SENTENCE, byte_level).spans == CHAR_VS_BYTE_LEVEL


def test_a_token_straddling_two_chars_on_the_student_side(char, byte_level):
    """token_char_offsets ends "¥æ" at 日 (13); the student side must still not close there."""
    alignment = _align(byte_level, SENTENCE, char)
    assert alignment.teacher_ids == _ids(char, SENTENCE)
    assert alignment.spans == _transposed(CHAR_VS_BYTE_LEVEL)


def test_byte_fallback_pieces_of_one_char(char, byte_level, metaspace):
    text = "héllo wörld 語"  # 語 = E8 AA 9E, not in the metaspace alphabet
    assert _strs(metaspace, text) == ["▁héllo", "▁wörld", "▁", "<0xE8>", "<0xAA>", "<0x9E>"]
    assert _strs(byte_level, text) == ["hÃ©llo", "Ġ", "wÃ¶rld", "Ġ", "è", "ª", "ŀ"]
    char_vs_metaspace = _spans((0, 5, 0, 1), (5, 11, 1, 2), (11, 12, 2, 3), (12, 13, 3, 6))
    assert _align(char, text, metaspace).spans == [*char_vs_metaspace, AlignedSpan(13, 14, 6, 7)]
    assert _align(metaspace, text, char).spans == _transposed(
        [*char_vs_metaspace, AlignedSpan(13, 14, 6, 7)]
    )
    # Byte pieces on both sides: 3 <-> 3.
    assert _align(metaspace, text, byte_level).spans == _spans(
        (0, 1, 0, 1), (1, 2, 1, 3), (2, 3, 3, 4), (3, 6, 4, 7), (6, 7, 7, 8)
    )


def test_a_span_where_the_two_tokenizations_cross(byte_level, metaspace):
    """ "Ġ|world" vs "▁w|o|rld": no shared boundary inside " world", so one 2 <-> 3 span."""
    text = "hello world, hello there"
    assert _strs(byte_level, text) == ["hello", "Ġ", "world", ",", "Ġ", "hello", "Ġthe", "re"]
    assert _strs(metaspace, text) == [
        "▁hello", "▁w", "o", "rld", "<0x2C>", "▁hello", "▁the", "r", "e",
    ]  # fmt: skip
    assert _align(byte_level, text, metaspace).spans == _spans(
        (0, 1, 0, 1), (1, 3, 1, 4), (3, 4, 4, 5), (4, 6, 5, 6), (6, 7, 6, 7), (7, 8, 7, 9),
        (8, 9, 9, 10),
    )  # fmt: skip


def test_special_tokens_mapped_joined_and_eos(char, byte_level):
    """<pad> (teacher has only <|pad|>) is teacherless (student_only, outside every span);
    <bos> maps by its text; EOS to EOS."""
    pad, bos, eos = char.pad_token_id, char.bos_token_id, char.eos_token_id
    ids = [pad, *_ids(char, "42", eos=False), bos, *_ids(char, " is", eos=False), pad, eos]
    alignment = align_completion(ids, char, HFTeacherTokens(byte_level))
    teacher_bos = byte_level.convert_tokens_to_ids("<bos>")
    expected_ids = [*_ids(byte_level, "42", eos=False), teacher_bos]
    expected_ids += [*_ids(byte_level, " is", eos=False), byte_level.eos_token_id]
    assert alignment.teacher_ids == expected_ids
    assert _strs(byte_level, "42") == ["42"] and _strs(byte_level, " is") == ["Ġis"]
    assert alignment.spans == _spans((1, 3, 0, 1), (3, 4, 1, 2), (4, 7, 2, 3), (8, 9, 3, 4))
    assert alignment.student_only == (0, 7) and alignment.num_student == 9


def test_completions_without_teacher_tokens(char, byte_level):
    teacher = HFTeacherTokens(byte_level)
    assert align_completion([], char, teacher) == CompletionAlignment([], [])
    only_pads = align_completion([char.pad_token_id] * 2, char, teacher)
    assert only_pads == CompletionAlignment([], [], student_only=(0, 1))
    with pytest.raises(ValueError, match="starts a gap or overlap"):  # 0 is in both
        CompletionAlignment([7], [AlignedSpan(0, 1, 0, 1)], student_only=(0,))
    with pytest.raises(ValueError, match="overlaps or leaves a gap"):  # 2 is skipped
        CompletionAlignment([7], [AlignedSpan(0, 1, 0, 1)], student_only=(1, 3))
    no_eos = HFTeacherTokens(PreTrainedTokenizerFast(tokenizer_object=byte_level.backend_tokenizer))
    with pytest.raises(ValueError, match="has no EOS token"):
        align_completion(_ids(char, "42"), char, no_eos)


def test_align_ends_edge_cases():
    assert align_ends([], []) == []
    with pytest.raises(ValueError, match="Cannot align 0 student to 1 teacher tokens"):
        align_ends([], [1])
    with pytest.raises(ValueError, match="student token ends are not monotone"):
        align_ends([2, 1], [2])
    # [1,3) straddles the teacher boundary 2: no close there.
    assert align_ends([1, 3], [2, 3]) == _spans((0, 2, 0, 2))
    # Tokens sharing an end (pieces of one char) stay in one span.
    assert align_ends([1, 1, 2], [1, 2]) == _spans((0, 2, 0, 1), (2, 3, 1, 2))
    # An empty-extent token at the start waits for a boundary both sides share.
    assert align_ends([0, 2], [2]) == _spans((0, 2, 0, 1))
    # Leftovers of either side join the last span.
    assert align_ends([1, 2], [1]) == _spans((0, 2, 0, 1))
    assert align_ends([1], [1, 1, 3]) == _spans((0, 1, 0, 3))
    assert align_ends([2], [1]) == _spans((0, 1, 0, 1))  # no shared boundary at all
    # Interleaved boundaries never meet until the end: one 5 <-> 5 span.
    assert align_ends([2, 4, 6, 8, 10], [3, 5, 7, 9, 10]) == _spans((0, 5, 0, 5))


def test_offsets_from_byte_level_token_strs(byte_level):
    # 日本's four pieces and 🙂's three share one extent each.
    expected = [(0, 5), (5, 6), (6, 11), (11, 12), *[(12, 14)] * 4, (14, 15), *[(15, 16)] * 3]
    assert offsets_from_token_strs(BYTE_LEVEL_SENTENCE, SENTENCE) == expected
    # The same ends as the (repaired) Hugging Face offsets, on several texts.
    teacher = HFTeacherTokens(byte_level)
    texts = [SENTENCE, "so  it\n\nis", "a   b  ", "héllo wörld 語"]
    for text, (ids, hf_offsets) in zip(texts, teacher.encode_offsets(texts), strict=True):
        offsets = offsets_from_token_strs(byte_level.convert_ids_to_tokens(ids), text)
        assert [end for _, end in offsets] == [end for _, end in hf_offsets], text


def test_offsets_from_metaspace_token_strs(char, metaspace):
    text = "héllo wörld 語"  # the dummy "▁" of "▁héllo" is not in the text
    strs = ["▁héllo", "▁wörld", "▁", "<0xE8>", "<0xAA>", "<0x9E>"]
    expected = [(0, 5), (5, 11), (11, 12), (12, 13), (12, 13), (12, 13)]
    assert offsets_from_token_strs(strs, text) == expected
    assert HFTeacherTokens(metaspace).encode_offsets([text])[0][1] == expected
    # A dummy "▁" alone becomes an empty extent; HF gives it "a"'s (0, 1). Same spans either way.
    text = "a   b"
    assert _strs(metaspace, text) == ["▁", "a", "▁", "▁", "▁", "<0x62>"]
    offsets = offsets_from_token_strs(_strs(metaspace, text), text)
    assert offsets == [(0, 0), (0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
    char_ends = list(range(1, 6))
    assert align_ends(char_ends, [end for _, end in offsets]) == _spans(
        (0, 1, 0, 2), (1, 2, 2, 3), (2, 3, 3, 4), (3, 4, 4, 5), (4, 5, 5, 6)
    )
    hf_ends = [end for _, end in HFTeacherTokens(metaspace).encode_offsets([text])[0][1]]
    assert align_ends(char_ends, hf_ends) == align_ends(char_ends, [e for _, e in offsets])


def test_offsets_from_plain_token_strs_and_a_mismatch(char):
    assert offsets_from_token_strs(_strs(char, "日本 ok"), "日本 ok") == [
        (0, 1), (1, 2), (2, 3), (3, 4), (4, 5),
    ]  # fmt: skip
    # Read as byte-level, "Ã©" would be "é"; the text is literally "Ã©", so plain wins.
    assert offsets_from_token_strs(["Ã", "©"], "Ã©") == [(0, 1), (1, 2)]
    with pytest.raises(ValueError, match="do not spell the text's 4 bytes"):
        offsets_from_token_strs(["he", "llo"], "help")


def test_trimmed_whitespace_offsets_align_like_untrimmed(char, byte_level):
    trimmed = _byte_level(trim_offsets=True)
    raw = trimmed("a   b  ", add_special_tokens=False, return_offsets_mapping=True)
    assert raw["offset_mapping"] == [(0, 1), (3, 3), (4, 4), (4, 5), (7, 7)]  # trimmed
    for text in ["a   b  ", "the answer is 42", SENTENCE]:
        assert _align(char, text, trimmed) == _align(char, text, byte_level), text


def test_repair_offsets_by_hand():
    """Ends clipped to 5 and made monotone, the last end at 5; token 1 is overlapped by its
    successor (start 1 < end 2), so it takes the successor's end."""
    offsets = [(0, 1), (2, 2), (1, 1), (3, 9)]
    assert _repair_offsets(offsets, 5) == [(0, 1), (2, 2), (1, 2), (3, 5)]
    assert _repair_offsets([(0, 3), (2, 4), (3, 4)], 4) == [(0, 4), (2, 4), (3, 4)]


def test_a_slow_tokenizer_is_refused():
    class CharSlow(PythonBackend):  # a real Python ("slow") tokenizer: no offsets
        def __init__(self):
            self._vocab = {"<eos>": 0, "a": 1}
            super().__init__(eos_token="<eos>")

        def get_vocab(self):
            return dict(self._vocab)

        @property
        def vocab_size(self):
            return len(self._vocab)

        def _tokenize(self, text):
            return list(text)

        def _convert_token_to_id(self, token):
            return self._vocab[token]

    with pytest.raises(ValueError, match="slow tokenizer without char offsets"):
        HFTeacherTokens(CharSlow())


def test_batched_alignment_encodes_once(char, byte_level):
    calls = []

    class Counting(HFTeacherTokens):
        def encode_offsets(self, texts):
            calls.append(list(texts))
            return super().encode_offsets(texts)

    teacher = Counting(byte_level)
    rows = [
        _ids(char, "the answer is 42"),
        [],
        [char.bos_token_id, *_ids(char, "42", eos=False), char.pad_token_id, *_ids(char, " is")],
    ]
    batched = align_completions(rows, char, teacher)
    assert calls == [["the answer is 42", "42", " is"]]
    assert batched == [align_completion(row, char, HFTeacherTokens(byte_level)) for row in rows]


def test_student_span_starts(char, byte_level):
    alignment = _align(char, "the answer is 42", byte_level)
    starts = alignment.student_span_starts(19)  # 17 tokens, 2 of padding
    assert [i for i, start in enumerate(starts) if start] == [0, 3, 10, 13, 16]
    assert len(starts) == 19
    with pytest.raises(ValueError, match="num_student=16 < the 17 aligned tokens"):
        alignment.student_span_starts(16)


def test_invalid_spans_are_refused():
    with pytest.raises(ValueError, match="two non-empty ranges"):
        AlignedSpan(0, 0, 0, 1)
    with pytest.raises(ValueError, match="tile both sides"):
        CompletionAlignment([1, 2], _spans((0, 1, 0, 1), (2, 3, 1, 2)))
    with pytest.raises(ValueError, match="cover 1 of 2 teacher ids"):
        CompletionAlignment([1, 2], _spans((0, 1, 0, 1)))
