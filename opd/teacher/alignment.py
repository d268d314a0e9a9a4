"""Cross-tokenizer alignment: the student's completion as teacher tokens, matched span by span.

A teacher with a different tokenizer cannot score the student's token ids. So the completion is
decoded to text, re-tokenized with the teacher's tokenizer, and the two token sequences are cut
into aligned spans: the shortest runs of student tokens and of teacher tokens that spell the same
text. The trainer compares the teacher's summed logprobs over a span with the student's, as ALM
compares chunk likelihoods (Minixhofer et al., arXiv:2503.20083, s.3).

Rules of `align_completion` (`student_ids` are the valid completion tokens only, no padding):

- The ids are split into runs at the student's special tokens (`all_special_ids`). A run of
  ordinary tokens is decoded with `skip_special_tokens=True`; its student char offsets come from
  `token_char_offsets`, its teacher ids and offsets from `teacher.encode_offsets(text)`, and the
  two are cut by `align_ends`. Each run is tokenized on its own, so a SentencePiece decoder's
  dropped leading space at a run start stays dropped on the teacher side too.
- A span closes only at a char boundary where both sides have a token boundary at the same byte:
  a token that ends inside a multi-byte char (a byte piece, a BPE merge across a char) is given the
  end of the token that finishes that char, so a char's bytes never fall into two spans.
- The student's EOS (`eos_token_id`) becomes the teacher's EOS as a 1:1 span (ValueError when the
  teacher has none). Another special token becomes `teacher.special_token_id(its text)` as a 1:1
  span when the teacher has it; otherwise it has no teacher token and is listed in
  `student_only`, outside every span (the scorer gives it its own penalty: joined to a span, a
  token the teacher never sees would only add its own -logprob to the span's reward, which a
  policy learns to exploit). A run whose text the teacher encodes to nothing is listed the same
  way; so is every token of a completion without any teacher token.
- With the student's own tokenizer as teacher, a canonically tokenized completion comes back as
  itself with 1:1 spans, except that the tokens spelling one split char form one n:n span.

Offsets of a served tokenizer (vLLM's `/tokenize` gives ids and token strings, not offsets) come
from `offsets_from_token_strs`, which reads byte-level, SentencePiece and plain vocabularies.

Test: `pytest -n 0 -q tests/unit/test_alignment.py`.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Protocol

from opd.objectives.spans import token_char_offsets

Offsets = list[tuple[int, int]]


@dataclass(frozen=True)
class AlignedSpan:
    """Student tokens `[student_lo, student_hi)` spell the same text as teacher tokens
    `[teacher_lo, teacher_hi)` (indices into the completion; both ranges non-empty)."""

    student_lo: int
    student_hi: int
    teacher_lo: int
    teacher_hi: int

    def __post_init__(self) -> None:
        if not (0 <= self.student_lo < self.student_hi and 0 <= self.teacher_lo < self.teacher_hi):
            raise ValueError(f"An aligned span needs two non-empty ranges, got {self}.")


@dataclass(frozen=True)
class CompletionAlignment:
    """One completion's teacher tokens and its spans."""

    teacher_ids: list[int]
    """The completion as teacher ids (re-tokenized text, special tokens mapped)."""
    spans: list[AlignedSpan]
    """In order; with `student_only` they tile `[0, n_student)`, and they tile
    `[0, len(teacher_ids))` exactly."""
    student_only: tuple[int, ...] = ()
    """Student positions the teacher has no token for (a special token it lacks, text it
    encodes to nothing), in order: not part of any span."""

    def __post_init__(self) -> None:
        student_at = teacher_at = 0
        only = list(self.student_only)
        for span in self.spans:
            while only and only[0] == student_at:
                student_at, only = student_at + 1, only[1:]
            if (span.student_lo, span.teacher_lo) != (student_at, teacher_at):
                raise ValueError(f"Spans must tile both sides: {span} starts a gap or overlap.")
            student_at, teacher_at = span.student_hi, span.teacher_hi
        if only != list(range(student_at, student_at + len(only))):
            raise ValueError(f"student_only {self.student_only} overlaps or leaves a gap.")
        if teacher_at != len(self.teacher_ids):
            raise ValueError(f"Spans cover {teacher_at} of {len(self.teacher_ids)} teacher ids.")

    @property
    def num_student(self) -> int:
        """How many student tokens the spans and `student_only` cover."""
        last_span = self.spans[-1].student_hi if self.spans else 0
        return max(last_span, self.student_only[-1] + 1 if self.student_only else 0)

    def student_span_starts(self, num_student: int) -> list[bool]:
        """Per position of `num_student` (>= the aligned tokens; the rest is padding): True at
        the first student token of each span."""
        if num_student < self.num_student:
            raise ValueError(f"num_student={num_student} < the {self.num_student} aligned tokens.")
        starts_T = [False] * num_student
        for span in self.spans:
            starts_T[span.student_lo] = True
        return starts_T


class TeacherTokens(Protocol):
    """What alignment needs of the teacher's tokenizer (local, or a server's `/tokenize`)."""

    name: str
    eos_token_id: int | None

    def encode_offsets(self, texts: list[str]) -> list[tuple[list[int], Offsets]]:
        """Per text: its ids (no added special tokens) and their `[start, end)` char offsets."""
        ...

    def special_token_id(self, content: str) -> int | None:
        """The id of a special (added) token by its text, else None."""
        ...


class HFTeacherTokens:
    """`TeacherTokens` over a local Hugging Face fast tokenizer."""

    def __init__(self, tokenizer, name: str = "") -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                f"{type(tokenizer).__name__} is a slow tokenizer without char offsets; "
                "load the teacher's tokenizer as a fast one (use_fast=True, a tokenizer.json)."
            )
        self.tokenizer = tokenizer
        self.name = name or tokenizer.name_or_path
        self.eos_token_id = tokenizer.eos_token_id

    def encode_offsets(self, texts: list[str]) -> list[tuple[list[int], Offsets]]:
        if not texts:
            return []
        encoded = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        rows = zip(texts, encoded["input_ids"], encoded["offset_mapping"], strict=True)
        return [(list(ids), _repair_offsets(offsets, len(text))) for text, ids, offsets in rows]

    def special_token_id(self, content: str) -> int | None:
        added = self.tokenizer.get_added_vocab()
        if content in added:
            return added[content]
        if content in self.tokenizer.all_special_tokens:
            return self.tokenizer.convert_tokens_to_ids(content)
        return None


def _repair_offsets(offsets_N: Offsets, num_chars: int) -> Offsets:
    """Hugging Face offsets made fit for `align_ends`: ends clipped to the text and monotone
    (trim_offsets shrinks whitespace tokens to an empty extent), the last end at the text's end,
    and a token that its successor overlaps (it ends inside a char the successor completes: HF
    gives both the whole char) takes the successor's end."""
    ends_N, end = [], 0
    for _, token_end in offsets_N:
        end = min(max(token_end, end), num_chars)
        ends_N.append(end)
    if ends_N and num_chars:
        ends_N[-1] = num_chars
    for i in range(len(ends_N) - 2, -1, -1):
        if offsets_N[i + 1][0] < ends_N[i]:
            ends_N[i] = ends_N[i + 1]
    return [(min(max(s, 0), e), e) for (s, _), e in zip(offsets_N, ends_N, strict=True)]


def _byte_level_table() -> dict[str, int]:
    """GPT-2's `bytes_to_unicode`, inverted: the printable bytes '!'..'~', '¡'..'¬', '®'..'ÿ'
    stand for themselves, the others for chr(256 + n) in byte order ('Ġ' a space, 'Ċ' a newline)."""
    kept = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {chr(b): b for b in kept}
    shifted = [b for b in range(256) if chr(b) not in table]
    table.update({chr(256 + n): b for n, b in enumerate(shifted)})
    return table


_BYTE_LEVEL = _byte_level_table()
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_bytes(token_strs: list[str]) -> list[bytes] | None:
    if any(char not in _BYTE_LEVEL for token in token_strs for char in token):
        return None
    return [bytes(_BYTE_LEVEL[char] for char in token) for token in token_strs]


def _metaspace_bytes(token_strs: list[str]) -> list[bytes]:
    return [
        bytes([int(match[1], 16)])
        if (match := _BYTE_FALLBACK.fullmatch(token))
        else token.replace("▁", " ").encode()
        for token in token_strs
    ]


def _spelled(pieces: list[bytes], text_bytes: bytes) -> list[bytes] | None:
    """`pieces` when they spell `text_bytes`; with the dummy prefix space an encoder adds at the
    start dropped from the first non-empty piece; else None."""
    joined = b"".join(pieces)
    if joined == text_bytes:
        return pieces
    if joined == b" " + text_bytes:
        first = next(i for i, piece in enumerate(pieces) if piece)
        return [*pieces[:first], pieces[first][1:], *pieces[first + 1 :]]
    return None


def offsets_from_token_strs(token_strs: list[str], text: str) -> Offsets:
    """`[start, end)` char offsets in `text` of tokens known only by their vocabulary strings
    (`convert_ids_to_tokens`, vLLM's `/tokenize` with `return_token_strs=True`).

    The strings are read as GPT-2 byte-level (the `bytes_to_unicode` alphabet), then as
    SentencePiece ('▁' a space, '<0xNN>' a byte fallback), then as plain text (a char-level
    vocabulary); the first reading whose bytes are `text.encode()` (allowing one dummy leading
    space) wins. Tokens between two consecutive char boundaries (byte pieces of one char, a token
    ending inside a char with the one finishing it) share one extent, so a span never splits a
    char (token_char_offsets gives such pieces the completing token's extent the same way).

    Raises:
        ValueError: no reading spells the text.
    """
    text_bytes = text.encode()
    for reading in (_byte_level_bytes, _metaspace_bytes, lambda strs: [s.encode() for s in strs]):
        pieces = reading(token_strs)
        spelled = None if pieces is None else _spelled(pieces, text_bytes)
        if spelled is not None:
            return _char_offsets(spelled, text)
    raise ValueError(
        f"The {len(token_strs)} token strings do not spell the text's {len(text_bytes)} bytes "
        "as byte-level, SentencePiece or plain strings; offsets need a tokenizer whose tokens "
        "spell the text."
    )


def _char_offsets(pieces: list[bytes], text: str) -> Offsets:
    char_at_byte, at = {}, 0  # byte offset of each char boundary -> its char index
    for i, char in enumerate(text):
        char_at_byte[at] = i
        at += len(char.encode())
    char_at_byte[at] = len(text)
    offsets_N: Offsets = []
    group, start, byte_end = 0, 0, 0
    for piece in pieces:
        byte_end += len(piece)
        group += 1
        if byte_end in char_at_byte:
            end = char_at_byte[byte_end]
            offsets_N.extend([(start, end)] * group)
            group, start = 0, end
    assert group == 0, "the pieces spell the text, so the last one ends on a char boundary"
    return offsets_N


def align_ends(student_ends: list[int], teacher_ends: list[int]) -> list[AlignedSpan]:
    """Cut two tokenizations of one text into spans at the boundaries they share.

    A span closes at a boundary b when the last token consumed on each side ends exactly at b
    (each side consumes every token ending at or before b first, so tokens sharing an end, the
    pieces of one char, stay together) and both sides consumed at least one token. Tokens left
    over on one side at the end join the last span.

    Args:
        student_ends, teacher_ends: each token's end char offset, monotone non-decreasing.

    Returns:
        The spans, in order, tiling both index ranges; [] when both are empty.
    """
    for side, ends in (("student", student_ends), ("teacher", teacher_ends)):
        if any(b < a for a, b in itertools.pairwise(ends)):
            raise ValueError(f"The {side} token ends are not monotone: {ends}.")
    if not student_ends and not teacher_ends:
        return []
    if not student_ends or not teacher_ends:
        raise ValueError(
            f"Cannot align {len(student_ends)} student to {len(teacher_ends)} teacher tokens."
        )
    spans: list[AlignedSpan] = []
    s = t = s_lo = t_lo = 0
    while s < len(student_ends) and t < len(teacher_ends):
        boundary = min(student_ends[s], teacher_ends[t])
        while s < len(student_ends) and student_ends[s] <= boundary:
            s += 1
        while t < len(teacher_ends) and teacher_ends[t] <= boundary:
            t += 1
        if s > s_lo and t > t_lo and student_ends[s - 1] == teacher_ends[t - 1] == boundary:
            spans.append(AlignedSpan(s_lo, s, t_lo, t))
            s_lo, t_lo = s, t
    s_hi, t_hi = len(student_ends), len(teacher_ends)
    if (s_lo < s_hi and t_lo < t_hi) or not spans:
        spans.append(AlignedSpan(s_lo, s_hi, t_lo, t_hi))
    elif s_lo < s_hi or t_lo < t_hi:
        last = spans.pop()
        spans.append(AlignedSpan(last.student_lo, s_hi, last.teacher_lo, t_hi))
    return spans


def _student_ends(run: list[int], student_tokenizer) -> list[int]:
    """Each token's end in `decode(run)`, where a token ending inside a multi-byte char takes
    the end of the token that finishes the char (token_char_offsets ends it at its last whole
    char, which is no byte boundary). Such a token's decode ends in U+FFFD, alone and from the
    last clean boundary; only tokens whose single decode does need the second one."""
    ends_N = [end for _, end in token_char_offsets(run, student_tokenizer)]
    singles_N = student_tokenizer.batch_decode([[i] for i in run], skip_special_tokens=True)
    clean_N, window = [], 0  # window: the first token after the last clean boundary
    for i, single in enumerate(singles_N):
        if single.endswith("\ufffd"):
            single = student_tokenizer.decode(run[window : i + 1], skip_special_tokens=True)
        clean_N.append(not single.endswith("\ufffd"))
        window = i + 1 if clean_N[-1] else window
    for i in range(len(ends_N) - 2, -1, -1):
        if not clean_N[i]:
            ends_N[i] = ends_N[i + 1]
    return ends_N


@dataclass
class _Piece:
    """A run of ordinary student tokens and its text, or one special token and its teacher id."""

    student_ids: list[int]
    text: str = ""
    teacher_id: int | None = None


def _split_pieces(student_ids: list[int], tokenizer, teacher: TeacherTokens) -> list[_Piece]:
    special_ids, eos_id = set(tokenizer.all_special_ids), tokenizer.eos_token_id
    pieces: list[_Piece] = []
    run: list[int] = []
    for token_id in [*student_ids, None]:  # None: flushes the last run
        if token_id is not None and token_id not in special_ids and token_id != eos_id:
            run.append(token_id)
            continue
        if run:
            pieces.append(_Piece(run, tokenizer.decode(run, skip_special_tokens=True)))
            run = []
        if token_id is None:
            break
        if token_id == eos_id:
            if teacher.eos_token_id is None:
                raise ValueError(f"The teacher tokenizer {teacher.name!r} has no EOS token.")
            pieces.append(_Piece([token_id], teacher_id=teacher.eos_token_id))
        else:
            content = tokenizer.convert_ids_to_tokens(token_id)
            pieces.append(_Piece([token_id], teacher_id=teacher.special_token_id(content)))
    return pieces


def _piece_alignment(
    piece: _Piece, encoded, student_tokenizer
) -> tuple[list[int], list[AlignedSpan]] | None:
    """The piece's teacher ids and local spans; None when it has no teacher token."""
    if not piece.text:
        return None if piece.teacher_id is None else ([piece.teacher_id], [AlignedSpan(0, 1, 0, 1)])
    teacher_ids, teacher_offsets = next(encoded)
    if len(teacher_ids) != len(teacher_offsets):
        raise ValueError(f"{len(teacher_ids)} teacher ids but {len(teacher_offsets)} offsets.")
    if not teacher_ids:
        return None
    student_ends = _student_ends(piece.student_ids, student_tokenizer)
    return list(teacher_ids), align_ends(student_ends, [end for _, end in teacher_offsets])


def _assemble(pieces: list[_Piece], encoded, student_tokenizer) -> CompletionAlignment:
    spans: list[list[int]] = []  # [student_lo, student_hi, teacher_lo, teacher_hi]
    teacher_ids: list[int] = []
    student_only: list[int] = []  # no teacher token: scored apart (cross_tokenizer.py)
    num_student = 0
    for piece in pieces:
        aligned = _piece_alignment(piece, encoded, student_tokenizer)
        if aligned is None:
            student_only += range(num_student, num_student + len(piece.student_ids))
        else:
            s0, t0 = num_student, len(teacher_ids)
            for span in aligned[1]:
                spans.append([s0 + span.student_lo, s0 + span.student_hi])
                spans[-1] += [t0 + span.teacher_lo, t0 + span.teacher_hi]
            teacher_ids += aligned[0]
        num_student += len(piece.student_ids)
    return CompletionAlignment(
        teacher_ids, [AlignedSpan(*span) for span in spans], student_only=tuple(student_only)
    )


def align_completions(
    student_ids_B: list[list[int]], student_tokenizer, teacher: TeacherTokens
) -> list[CompletionAlignment]:
    """`align_completion` of each row, with one `encode_offsets` call for the whole batch."""
    pieces_B = [_split_pieces(ids, student_tokenizer, teacher) for ids in student_ids_B]
    texts = [piece.text for pieces in pieces_B for piece in pieces if piece.text]
    encoded = teacher.encode_offsets(texts) if texts else []
    if len(encoded) != len(texts):
        raise ValueError(f"The teacher encoded {len(encoded)} of {len(texts)} texts.")
    encoded_iter = iter(encoded)
    return [_assemble(pieces, encoded_iter, student_tokenizer) for pieces in pieces_B]


def align_completion(
    student_ids: list[int], student_tokenizer, teacher: TeacherTokens
) -> CompletionAlignment:
    """The completion `student_ids` (valid tokens only) as teacher ids, with its aligned spans
    (the rules are in the module docstring).

    Args:
        student_ids: the completion's student token ids, without padding.
        student_tokenizer: the student's Hugging Face tokenizer.
        teacher: the teacher's tokenizer.
    """
    return align_completions([student_ids], student_tokenizer, teacher)[0]
