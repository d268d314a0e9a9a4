"""A teacher of another tokenizer: re-tokenize, score in the teacher's tokens, map back.

`CrossTokenizerTeacher(inner, tokens, student_tokenizer)` wraps any `TeacherScorer` (local,
`opd teacher serve`, stock vLLM) so that it scores a student of another tokenizer:

1. the trainer renders each prompt with the TEACHER's tokenizer and chat template
   (`render_prompt_ids`, into `RolloutBatch.teacher_prompt_ids`);
2. each completion's valid student tokens are decoded and re-tokenized with the teacher's
   tokenizer, and the two sequences are aligned by character offsets into spans
   (`opd/teacher/alignment.py`; EOS and special tokens mapped explicitly);
3. the inner teacher scores the teacher-side ids after the teacher-side prompt;
4. `scores_at_student_positions` returns `TeacherScores` on the student's positions: each
   span's teacher logprobs SUMMED at the span's last student token, the teacher's top-k (its
   own ids) at the span's first student token, and `span_start_BT`. The trainer turns the span
   sums into per-token rewards with `teacher_span_rule` and maps the top-k ids through the
   vocabularies (`opd/objectives/cross_vocab.py`), so the composer and the loss are unchanged.
   A student token the teacher has no token for is its own span scored `UNSPELLABLE_LOGPROB`.
5. with the teacher's vocabulary at hand, the credit inside the text is refined
   (`BoundaryCredit`): the part of a teacher token's logprob that says where it ends moves to
   the span whose student token decides it, and a teacher token spelt by several student
   tokens is split into one teacher logprob per student token by its prefix probabilities.

The completion text is tokenized on its own, after the teacher's prompt, as TRL's GOLD trainer
does: the prompt/completion boundary is a token boundary on both sides. A span's first tokens
on both sides are predicted from the same text, so their next-token distributions compare.

The tokenizer the teacher side uses is local (`LocalTeacherTokens`, a Hugging Face tokenizer)
or the stock vLLM server's own (`ServedTeacherTokens`: `/tokenize` with token strings,
`/detokenize`). `check_student_tokenizer` keeps what must still match: both chat or both plain
prompts, and text the student writes that the teacher spells back unchanged; it prints that
cross-tokenizer mode is on and how the tokenizers differ.

Test: `pytest tests/unit/test_cross_tokenizer.py tests/integration/test_cross_tokenizer_cli.py`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from dataclasses import dataclass
from typing import Any

import torch

from opd.arguments import ConfigError
from opd.teacher.alignment import (
    CompletionAlignment,
    HFTeacherTokens,
    align_completions,
    offsets_from_token_strs,
)
from opd.teacher.consistency import tokenizer_fingerprint
from opd.teacher.context import Prompt, rendered_prompt_ids
from opd.teacher.protocol import TeacherScorer
from opd.types import RolloutBatch, SpanRule, TeacherScores

# Text any teacher of a general-purpose student should spell back unchanged: letters, digits,
# punctuation, whitespace runs and non-ASCII. A student whose vocabulary cannot write some of it
# (the demo's small alphabet) is probed with what it can write.
# What the shard manifest of a cross-tokenizer set records as its alignment (`opd/teacher/
# alignment.py`); bump when the alignment rules change.
ALIGNMENT_RULE = (
    "char-offsets-v1: the completion's valid student tokens decoded (special tokens skipped) "
    "and re-tokenized alone by the teacher; spans close where both tokenizations end at the "
    "same character; EOS maps to the teacher's EOS, other special tokens by their text"
)
# The teacher's logprob of a student token it has no token for (a special token its tokenizer
# lacks, e.g. a sampled BOS or pad): e^-20 ~ 2e-9, below what a model gives any real token. Such
# a token is its own span, so its reward is -20 - lp_student: a penalty. Joined to a span, or
# left out with advantage 0, it would be free, and the demo's student learnt within 100 steps
# to answer with 4 special tokens (509 of 512 rows) to dodge the teacher's judgement.
UNSPELLABLE_LOGPROB = -20.0
# End-of-turn texts of common chat families, tried after the student's own EOS text when a stock
# vLLM server is the only view of the teacher's tokenizer.
EOS_CANDIDATES = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>", "<eos>", "<|end|>")
PROBE_TEXT = "The answer: 42 + 3.5 = 45.5, so x = (7 * 6)!\n\n  naïve café 日本 🙂 #1."


class LocalTeacherTokens(HFTeacherTokens):
    """The teacher's Hugging Face tokenizer in this process: alignment offsets, prompt
    rendering with its own chat template, decoding for the start-up probe."""

    def __init__(self, tokenizer, name: str = ""):
        super().__init__(tokenizer, name=name or str(tokenizer.name_or_path))
        self.tokenizer = tokenizer

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def render_prompt_ids(self, prompts: list[Prompt], **render_kwargs) -> list[list[int]]:
        return rendered_prompt_ids(prompts, self.tokenizer, **render_kwargs)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def describe(self) -> str:
        return describe_tokenizer(self.name, self.tokenizer)


class ServedTeacherTokens:
    """A stock vLLM server's tokenizer, reached through `/tokenize` (ids and token strings,
    from which the alignment offsets are computed) and `/detokenize`.

    vLLM does not report the EOS id: it is the first of the student's EOS text and the common
    end-of-turn texts (`EOS_CANDIDATES`) that the server tokenizes to one token of that very
    text inside the model's vocabulary (a tokenizer may list added tokens past the model's
    rows), named in the start-up line; to pin it, set `teacher_tokenizer_name_or_path` to a
    local copy of the teacher's tokenizer instead.
    """

    def __init__(self, vllm_teacher, student_tokenizer):
        self.vllm = vllm_teacher
        self.name = f"{vllm_teacher.model} at {vllm_teacher.urls[0]} (/tokenize)"
        self.eos_token, self.eos_token_id = None, None
        if vllm_teacher.vocab_size is None:
            vllm_teacher.vocab_size = vllm_teacher._probe_vocab_size() or 0
        rows = vllm_teacher.vocab_size or float("inf")  # the model's rows: none beyond them
        for text in (student_tokenizer.eos_token, *EOS_CANDIDATES):
            token_id = self.special_token_id(text or "")
            if token_id is not None and token_id < rows:
                self.eos_token, self.eos_token_id = text, token_id
                break
        if self.eos_token_id is None:
            raise ConfigError(
                f"the vLLM teacher {vllm_teacher.model!r} tokenizes none of "
                f"{[student_tokenizer.eos_token, *EOS_CANDIDATES]} to one token, and vLLM does "
                "not report its EOS: set teacher_tokenizer_name_or_path to the teacher's tokenizer."
            )

    def _tokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.vllm._post("/tokenize", {"model": self.vllm.model, **body}).json()

    def encode_offsets(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        encoded = []
        for text in texts:
            answer = self._tokenize(
                {"prompt": text, "add_special_tokens": False, "return_token_strs": True}
            )
            ids = [int(i) for i in answer["tokens"]]
            encoded.append((ids, offsets_from_token_strs(answer["token_strs"], text)))
        return encoded

    def special_token_id(self, content: str) -> int | None:
        if not content:
            return None
        answer = self._tokenize(
            {"prompt": content, "add_special_tokens": False, "return_token_strs": True}
        )
        if len(answer["tokens"]) == 1 and answer["token_strs"][0] == content:
            return int(answer["tokens"][0])
        return None

    @property
    def has_chat_template(self) -> bool:
        return self.vllm.probe_chat_ids() is not None

    def render_prompt_ids(
        self, prompts: list[Prompt], *, chat_template_kwargs=None, tools=None, **_
    ) -> list[list[int]]:
        rendered = []
        for prompt in prompts:
            if isinstance(prompt, str):  # as TRL: the tokenizer adds its special tokens
                body: dict[str, Any] = {"prompt": prompt, "add_special_tokens": True}
            else:
                body = {"messages": prompt, "add_generation_prompt": True}
                body["add_special_tokens"] = False
                if tools:
                    body["tools"] = tools
                if chat_template_kwargs:
                    body["chat_template_kwargs"] = chat_template_kwargs
            rendered.append([int(i) for i in self._tokenize(body)["tokens"]])
        return rendered

    def decode(self, ids: list[int]) -> str:
        answer = self.vllm._post("/detokenize", {"model": self.vllm.model, "tokens": ids})
        return answer.json()["prompt"]

    def describe(self) -> str:
        return f"{self.name} (eos {self.eos_token!r} = {self.eos_token_id})"


class CrossTokenizerTeacher:
    """A `TeacherScorer` for a student of another tokenizer (see the module docstring)."""

    def __init__(self, inner: TeacherScorer, tokens, student_tokenizer, *, rule=SpanRule.ALL):
        self.inner = inner
        self.tokens = tokens
        self.student_tokenizer = student_tokenizer
        self.rule = SpanRule(rule)
        self.teacher_id = inner.teacher_id
        teacher_tokenizer = getattr(tokens, "tokenizer", None)  # None: a served /tokenize only
        self.boundary = (
            None
            if teacher_tokenizer is None
            else BoundaryCredit.of(student_tokenizer, teacher_tokenizer)
        )

    def check_student_tokenizer(self, student_tokenizer) -> None:
        print(check_cross_tokenizer(student_tokenizer, self.tokens, rule=self.rule))

    def render_prompt_ids(self, prompts: list[Prompt], **render_kwargs) -> list[list[int]]:
        """The teacher's prompt ids: its own tokenizer and chat template (never the student's
        `chat_template` override, which is written for the student's tokens)."""
        render_kwargs.pop("chat_template", None)
        return self.tokens.render_prompt_ids(prompts, **render_kwargs)

    def align(self, batch: RolloutBatch) -> list[CompletionAlignment]:
        """Each row's alignment. A row the alignment rejects (e.g. a served tokenizer whose
        token strings do not spell the text) has every token teacherless: penalised as
        unspellable, never left free (`scores_at_student_positions`)."""
        lengths_B = valid_lengths_B(batch.completion_mask_BT)
        student_ids_B = [
            row[:length].tolist()
            for row, length in zip(batch.completion_ids_BT, lengths_B, strict=True)
        ]
        try:
            return align_completions(student_ids_B, self.student_tokenizer, self.tokens)
        except ValueError:  # some row has no teacher token: align row by row
            return [self._align_row(ids) for ids in student_ids_B]

    def _align_row(self, student_ids: list[int]) -> CompletionAlignment:
        try:
            return align_completions([student_ids], self.student_tokenizer, self.tokens)[0]
        except ValueError:
            return CompletionAlignment([], [], student_only=tuple(range(len(student_ids))))

    def score(self, batch: RolloutBatch, top_k: int = 0) -> TeacherScores:
        if batch.teacher_prompt_ids is None:
            raise ValueError(
                "a cross-tokenizer teacher scores after its own prompt: "
                "RolloutBatch.teacher_prompt_ids must hold the teacher-rendered prompt ids."
            )
        alignments = self.align(batch)
        teacher_batch = teacher_side_batch(batch, alignments)
        asked_k = top_k if self.boundary is None else max(top_k, BOUNDARY_TOP_K)
        scores = self.inner.score(teacher_batch, top_k=asked_k)
        shape_BT = tuple(batch.completion_ids_BT.shape)
        if self.boundary is None:
            return scores_at_student_positions(scores, alignments, shape_BT)
        boundary_BT = self.boundary.terms_BT(scores, teacher_batch.completion_ids_BT)
        totals_BT, carried = shifted_span_sums(
            scores, alignments, boundary_BT, self._shifts(batch, alignments)
        )
        values_B = self._split_spans(batch, alignments, scores, totals_BT, carried)
        scores = dataclasses.replace(keep_top_k(scores, top_k), sampled_logprobs_BT=totals_BT)
        return scores_at_student_positions(
            scores, alignments, shape_BT, span_sums_at_first=True, token_values_B=values_B
        )

    def _split_spans(self, batch, alignments, scores, totals_BT, carried):
        """Per row, `{span index: a teacher logprob per student token}` for each span whose
        student tokens spell one teacher token: token j gets the teacher's probability of the
        text of tokens 1..j minus that of 1..j-1 (`BoundaryCredit.prefix_logprobs`), the first
        also the boundary carried in, the last the rest of the span's (shifted) total."""
        values_B = []
        for row, alignment in enumerate(alignments):
            values = {}
            for index, span in enumerate(alignment.spans):
                if span.teacher_hi - span.teacher_lo != 1 or span.student_hi - span.student_lo < 2:
                    continue
                position = span.teacher_lo
                token_id = alignment.teacher_ids[position]
                candidates = teacher_candidates(scores, row, position, token_id)
                student_ids = batch.completion_ids_BT[row, span.student_lo : span.student_hi]
                masses = self.boundary.prefix_logprobs(student_ids.tolist(), token_id, candidates)
                if masses is None:
                    continue
                carried_in = carried.get((row, index), 0.0)
                kept = totals_BT[row, position] - carried_in
                steps = [masses[0] + carried_in]
                steps += [b - a for a, b in itertools.pairwise(masses)]
                values[index] = [float(v) for v in [*steps, kept - masses[-1]]]
            values_B.append(values)
        return values_B

    def _shifts(self, batch: RolloutBatch, alignments) -> list[list[bool]] | None:
        """Per row and span: whether its boundary term moves to the next span (its last
        student token has no longer student token it is a prefix of)."""
        if self.boundary is None:
            return None
        ids_BT = batch.completion_ids_BT
        return [
            [not self.boundary.student_extends(int(ids_BT[row, span.student_hi - 1]))
             for span in alignment.spans]
            for row, alignment in enumerate(alignments)
        ]  # fmt: skip


def valid_lengths_B(completion_mask_BT: torch.Tensor) -> list[int]:
    """Tokens up to and including each row's last valid one (environment tokens inside a
    multi-turn completion are text too, so they are aligned, not dropped)."""
    positions_BT = torch.arange(1, completion_mask_BT.shape[1] + 1).expand_as(completion_mask_BT)
    return (positions_BT * (completion_mask_BT != 0)).amax(dim=1).tolist()


def teacher_side_batch(batch: RolloutBatch, alignments: list[CompletionAlignment]) -> RolloutBatch:
    """The rollout in the teacher's tokens: its prompts, the re-tokenized completions."""
    num_tokens = max([len(a.teacher_ids) for a in alignments] + [1])
    ids_BT = torch.zeros(len(alignments), num_tokens, dtype=torch.int64)
    mask_BT = torch.zeros(len(alignments), num_tokens, dtype=torch.int64)
    for row, alignment in enumerate(alignments):
        ids_BT[row, : len(alignment.teacher_ids)] = torch.tensor(alignment.teacher_ids)
        mask_BT[row, : len(alignment.teacher_ids)] = 1
    return RolloutBatch(
        prompt_ids=batch.teacher_context_ids,
        completion_ids_BT=ids_BT,
        completion_mask_BT=mask_BT,
        policy_version=batch.policy_version,
        teacher_route_B=batch.teacher_route_B,
    )


def scores_at_student_positions(
    scores: TeacherScores,
    alignments: list[CompletionAlignment],
    shape_BT: tuple[int, int],
    *,
    span_sums_at_first: bool = False,
    token_values_B: list[dict[int, list[float]]] | None = None,
) -> TeacherScores:
    """Teacher-token scores on the student's `[B, T]` positions (see `TeacherScores.span_start_BT`):
    per span, the sum of its teacher tokens' logprobs at its last student token, the top-k of
    its first teacher token at its first student token.

    With `span_sums_at_first`, `scores.sampled_logprobs_BT` already holds each span's total at
    its first teacher position (`shifted_span_sums`); `token_values_B` (per row, span index ->
    one value per student token) turns a span into one span per student token."""
    span_BT = torch.zeros(shape_BT, dtype=torch.float32)
    start_BT = torch.zeros(shape_BT, dtype=torch.bool)
    mask_BT = torch.zeros(shape_BT, dtype=torch.int64)
    k = scores.top_k
    ids_BTK = torch.zeros((*shape_BT, k), dtype=torch.int64) if k else None
    logprobs_BTK = torch.full((*shape_BT, k), float("-inf")) if k else None
    for row, alignment in enumerate(alignments):
        for position in alignment.student_only:  # its own span, at the teacher's floor
            span_BT[row, position] = UNSPELLABLE_LOGPROB
            start_BT[row, position] = True
            mask_BT[row, position] = 1
        split = token_values_B[row] if token_values_B is not None else {}
        for index, span in enumerate(alignment.spans):
            teacher = slice(span.teacher_lo, span.teacher_hi)
            if span_sums_at_first:
                total = scores.sampled_logprobs_BT[row, span.teacher_lo]
            else:
                total = scores.sampled_logprobs_BT[row, teacher].sum()
            span_BT[row, span.student_hi - 1] = total
            if index in split:  # one span per student token
                span_BT[row, span.student_lo : span.student_hi] = torch.tensor(split[index])
                start_BT[row, span.student_lo : span.student_hi] = True
            start_BT[row, span.student_lo] = True
            mask_BT[row, span.student_lo : span.student_hi] = 1
            if k:
                ids_BTK[row, span.student_lo] = scores.topk_ids_BTK[row, span.teacher_lo]
                logprobs_BTK[row, span.student_lo] = scores.topk_logprobs_BTK[row, span.teacher_lo]
    num_student = max(int(mask_BT.sum()), 1)
    num_teacher = sum(len(a.teacher_ids) for a in alignments)
    metrics = {
        **scores.metrics,
        "teacher/cross_unspellable_fraction": sum(len(a.student_only) for a in alignments)
        / num_student,
        "teacher/cross_spans_per_token": sum(len(a.spans) + len(a.student_only) for a in alignments)
        / num_student,
        "teacher/cross_split_tokens": sum(
            len(v) for values in token_values_B or [] for v in values.values()
        )
        / num_student,
        "teacher/cross_teacher_tokens_per_token": num_teacher / num_student,
    }
    return TeacherScores(
        sampled_logprobs_BT=span_BT,
        completion_mask_BT=mask_BT,
        topk_ids_BTK=ids_BTK,
        topk_logprobs_BTK=logprobs_BTK,
        teacher_id=scores.teacher_id,
        temperature=scores.temperature,
        metrics=metrics,
        span_start_BT=start_BT,
    )


def check_cross_tokenizer(student_tokenizer, tokens, *, rule=SpanRule.ALL) -> str:
    """Raise ConfigError naming what must still match between a student and a teacher of
    another tokenizer; else the line that says cross-tokenizer mode is on and what differs."""
    problems = []
    student_chat = bool(getattr(student_tokenizer, "chat_template", None))
    if student_chat != tokens.has_chat_template:
        has, lacks = ("student", "teacher") if student_chat else ("teacher", "student")
        problems.append(
            f"the {has}'s tokenizer has a chat template and the {lacks}'s has none (both must "
            "render the same conversation)"
        )
    if tokens.eos_token_id is None:
        problems.append("the teacher's tokenizer has no EOS token to map the student's EOS to")
    probe = student_tokenizer.decode(
        student_tokenizer.encode(PROBE_TEXT, add_special_tokens=False), skip_special_tokens=True
    )
    try:
        spelled = tokens.decode(tokens.encode_offsets([probe])[0][0])
    except ValueError as error:  # a served tokenizer whose token strings do not spell it
        spelled = f"<unreadable: {error}>"
    if spelled != probe:
        problems.append(
            f"the teacher's tokenizer spells the student's text {probe!r} back as {spelled!r} "
            "(it cannot score what the student writes)"
        )
    if problems:
        raise ConfigError(
            f"teacher_cross_tokenizer: the teacher {tokens.name!r} and the student cannot be "
            "aligned: " + "; ".join(problems) + "."
        )
    return (
        f"opd: cross-tokenizer mode is on: student {describe_tokenizer('', student_tokenizer)} "
        f"vs teacher {tokens.describe()}; completions are re-tokenized with the teacher's "
        f"tokenizer and aligned by character offsets, span rule {rule.value!r}."
    )


def describe_tokenizer(name: str, tokenizer) -> str:
    """'<name> (vocab 50, eos '<eos>' = 2, vocab sha 1a2b...)'."""
    print_ = tokenizer_fingerprint(tokenizer)
    name = name or str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
    return (
        f"{name} (vocab {print_['vocab_size']}, eos {tokenizer.eos_token!r} = "
        f"{print_['eos_token_id']}, vocab sha {print_['vocab_sha256']})"
    )


# How many of the teacher's top entries `BoundaryCredit` reads at a span's last teacher token.
BOUNDARY_TOP_K = 16


@dataclass(frozen=True)
class BoundaryCredit:
    """Which student token decides where a teacher token ends.

    A teacher token's probability also says where it ends: in a vocabulary with "4" and "42",
    p("4") is the probability that the number is 4 and stops there. A character-level student
    decides that only at its NEXT token (a digit or EOS). Left on the span, that part of the
    teacher's judgement rewards or penalises the wrong student token: on the demo (a character
    student, a BPE teacher whose numbers are one token) the student's EOS after one digit went
    unpunished and the student collapsed to one-digit answers within 10 steps.

    So a span's last teacher token t's logprob is split: its boundary term
    `b = log p(t) - log sum_{v: string(v) starts with string(t)} p(v)` (over the teacher's top
    `BOUNDARY_TOP_K` and t itself) moves to the next span, and the span keeps
    `log sum p(v)`: the teacher's probability of the text alone. It moves only when the span's
    last student token has no longer student token it is a prefix of (else the student's own
    token choice made the same decision). With one tokenizer on both sides b is exactly 0
    whenever it would move, so the same-tokenizer path is unchanged bit for bit.
    """

    teacher_strings: tuple[str, ...]
    """The teacher's token strings by id (its vocabulary's own spelling)."""
    student_extended: frozenset[int]
    """Student ids whose token string is a proper prefix of another student token's."""
    teacher_specials: frozenset[int]
    teacher_text: Any = None
    """`id -> the text the teacher token spells alone` (None: no within-span split)."""
    student_text: Any = None
    """`ids -> the text the student ids spell`."""

    @classmethod
    def of(cls, student_tokenizer, teacher_tokenizer) -> BoundaryCredit:
        teacher_vocab = teacher_tokenizer.get_vocab()
        strings = [""] * (max(teacher_vocab.values()) + 1)
        for text, token_id in teacher_vocab.items():
            strings[token_id] = text
        return cls(
            tuple(strings),
            frozenset(extended_ids(student_tokenizer.get_vocab())),
            frozenset(teacher_tokenizer.all_special_ids),
            teacher_text=functools.lru_cache(maxsize=1 << 16)(
                lambda token_id: teacher_tokenizer.decode([token_id])
            ),
            student_text=lambda ids: student_tokenizer.decode(ids, skip_special_tokens=True),
        )

    def prefix_logprobs(
        self, student_ids: list[int], teacher_id: int, candidates: list[tuple[int, torch.Tensor]]
    ) -> list[torch.Tensor] | None:
        """`log sum_{v spells a text starting with the student's first j tokens} p(v)` for
        j = 1 .. m-1, where the m student ids spell the one teacher token `teacher_id` and
        `candidates` holds (id, logprob) of the teacher's top-k and `teacher_id` at its
        position: the teacher's probability of each student prefix of its token. None when the
        texts do not agree (then the span keeps one reward)."""
        if self.teacher_text is None or teacher_id in self.teacher_specials:
            return None
        if self.student_text(student_ids) != self.teacher_text(teacher_id):
            return None
        texts = [(self.teacher_text(candidate), value) for candidate, value in candidates]
        masses = []
        for j in range(1, len(student_ids)):
            prefix = self.student_text(student_ids[:j])
            if not prefix:
                return None
            values = [value for text, value in texts if text.startswith(prefix)]
            masses.append(torch.logsumexp(torch.stack(values), dim=0))
        return masses

    def student_extends(self, student_id: int) -> bool:
        return student_id in self.student_extended

    def terms_BT(self, scores: TeacherScores, teacher_ids_BT: torch.Tensor) -> torch.Tensor:
        """float32 `[B, T_teacher]` b of each teacher token (0 for special tokens and where the
        top-k holds no longer token)."""
        terms_BT = torch.zeros_like(scores.sampled_logprobs_BT)
        mask_BT = scores.completion_mask_BT.bool()
        for row, position in mask_BT.nonzero().tolist():
            token_id = int(teacher_ids_BT[row, position])
            if token_id in self.teacher_specials or token_id >= len(self.teacher_strings):
                continue
            text = self.teacher_strings[token_id]
            [(_, sampled), *others] = teacher_candidates(scores, row, position, token_id)
            longer = [
                value
                for candidate, value in others
                if candidate < len(self.teacher_strings)
                and candidate not in self.teacher_specials
                and self.teacher_strings[candidate].startswith(text)
            ]
            if longer:
                mass = torch.logsumexp(torch.stack([sampled, *longer]), dim=0)
                terms_BT[row, position] = sampled - mass
        return terms_BT


def teacher_candidates(
    scores: TeacherScores, row: int, position: int, token_id: int
) -> list[tuple[int, torch.Tensor]]:
    """`(id, logprob)` of the sampled teacher token at a position first, then its top-k entries
    other than that token (padding and negative ids left out)."""
    pairs = zip(
        scores.topk_ids_BTK[row, position].tolist(),
        scores.topk_logprobs_BTK[row, position],
        strict=True,
    )
    return [(token_id, scores.sampled_logprobs_BT[row, position])] + [
        (int(candidate), value)
        for candidate, value in pairs
        if candidate != token_id and candidate >= 0 and value > float("-inf")
    ]


def extended_ids(vocab: dict[str, int]) -> list[int]:
    """The ids whose string is a proper prefix of another string of `vocab` (sorted strings: a
    string's extensions follow it directly)."""
    ordered = sorted(vocab)
    return [
        vocab[text]
        for text, following in itertools.pairwise(ordered)
        if following.startswith(text) and following != text
    ]


def shifted_span_sums(scores, alignments, boundary_BT, shift_B):
    """Each span's teacher sum after the boundary shifts, at its first teacher position (the
    other positions of a span are left as they were, unread), and `{(row, span index): the
    boundary term the span received from the one before}`."""
    out_BT = scores.sampled_logprobs_BT.clone()
    received = {}
    for row, alignment in enumerate(alignments):
        carried = None
        for index, span in enumerate(alignment.spans):
            total = scores.sampled_logprobs_BT[row, span.teacher_lo : span.teacher_hi].sum()
            if carried is not None:  # the previous span's boundary: this span decides it
                total = total + carried
                received[(row, index)] = carried
            carried = None
            last = span.teacher_hi - 1
            is_last_span = index == len(alignment.spans) - 1
            if shift_B[row][index] and not is_last_span and boundary_BT[row, last] != 0:
                carried = boundary_BT[row, last]
                total = total - carried
            out_BT[row, span.teacher_lo] = total
    return out_BT, received


def keep_top_k(scores: TeacherScores, top_k: int) -> TeacherScores:
    """`scores` with its top-k cut to `top_k` entries (the lists are sorted, so their head)."""
    if scores.top_k == top_k:
        return scores
    if top_k == 0:
        return dataclasses.replace(scores, topk_ids_BTK=None, topk_logprobs_BTK=None)
    return dataclasses.replace(
        scores,
        topk_ids_BTK=scores.topk_ids_BTK[..., :top_k],
        topk_logprobs_BTK=scores.topk_logprobs_BTK[..., :top_k],
    )
