"""TRACE's span masks and token routing, hand-computed (METHODS.md s.11, arXiv:2605.10194).

The offsets run on a real byte-level BPE tokenizer built here from an explicit vocabulary and
merge list (no training, no download), chosen so that one sentence holds every hard case:

    "the café 東京 👍 ok" -> the | Ġ | cafÃ | © | Ġ | æĿ± | ä º ¬ | Ġ | ð Ł ĳ į | Ġok | <eos>

"cafÃ" ends inside "é" (bytes C3 A9), "京" is three one-byte tokens, "👍" four, and <eos> is a
special token. Character positions: t0 h1 e2 _3 c4 a5 f6 é7 _8 東9 京10 _11 👍12 _13 o14 k15.

Test: `pytest -n 0 -q tests/unit/test_spans.py`.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from opd.objectives.spans import (
    SpanMasks,
    annotated_span_masks,
    char_spans_to_mask,
    divergence_span_masks,
    kl_anneal_coefficient,
    route_term_masks,
    token_char_offsets,
)

SENTENCE = "the café 東京 👍 ok"
MERGES = [
    ("t", "h"), ("th", "e"), ("c", "a"), ("ca", "f"), ("caf", "Ã"),  # "cafÃ": stops inside é
    ("æ", "Ŀ"), ("æĿ", "±"),  # 東 (E6 9D B1) is one token; 京 stays three bytes
    ("Ġ", "o"), ("Ġo", "k"), ("Ġ", "Ġ"),
]  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {
        piece: i for i, piece in enumerate(["<eos>", *sorted(pre_tokenizers.ByteLevel.alphabet())])
    }
    for left, right in MERGES:
        vocab[left + right] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=MERGES))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>")


def _ids(tokenizer, text: str, eos: bool = True) -> list[int]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return [*ids, tokenizer.eos_token_id] if eos else ids


def test_offsets_of_multibyte_chars_and_special_token(tokenizer):
    ids = _ids(tokenizer, SENTENCE)
    pieces = [
        "the",
        "Ġ",
        "cafÃ",
        "©",
        "Ġ",
        "æĿ±",
        "ä",
        "º",
        "¬",
        "Ġ",
        "ð",
        "Ł",
        "ĳ",
        "į",
        "Ġok",
        "<eos>",
    ]
    assert tokenizer.convert_ids_to_tokens(ids) == pieces
    # "cafÃ" covers "caf" only (its half of é is not text yet), "©" completes é; the byte pieces
    # of 京 and 👍 share the extent of the char they spell; <eos> is empty at the end.
    expected = [(0, 3), (3, 4), (4, 7), (7, 8), (8, 9), (9, 10), (10, 11), (10, 11), (10, 11),
                (11, 12), (12, 13), (12, 13), (12, 13), (12, 13), (13, 16), (16, 16)]  # fmt: skip
    offsets = token_char_offsets(ids, tokenizer)
    assert offsets == expected
    # Consecutive distinct extents tile the decoded text.
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert text == SENTENCE
    distinct = [o for i, o in enumerate(offsets) if i == 0 or o != offsets[i - 1]]
    assert "".join(text[start:end] for start, end in distinct) == text
    assert distinct[0][0] == 0 and distinct[-1][1] == len(text)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(distinct))


def test_offsets_of_whitespace_runs_and_a_special_token_mid_completion(tokenizer):
    ids = _ids(tokenizer, "a   b\n\n c")
    assert tokenizer.convert_ids_to_tokens(ids) == [
        "a",
        "ĠĠ",
        "Ġ",
        "b",
        "Ċ",
        "Ċ",
        "Ġ",
        "c",
        "<eos>",
    ]
    assert token_char_offsets(ids, tokenizer) == [
        (0, 1), (1, 3), (3, 4), (4, 5), (5, 6), (6, 7), (7, 8), (8, 9), (9, 9)
    ]  # fmt: skip
    ids = _ids(tokenizer, "the", eos=True) + _ids(tokenizer, " ok", eos=False)
    assert token_char_offsets(ids, tokenizer) == [(0, 3), (3, 3), (3, 6)]
    # The mid-text <eos> lies strictly inside (0, 6) yet has no text: never marked.
    assert char_spans_to_mask(ids, [(0, 6, "key")], tokenizer, kind="key") == [True, False, True]
    assert token_char_offsets([], tokenizer) == []


def test_span_marks_every_token_it_touches(tokenizer):
    ids = _ids(tokenizer, SENTENCE)
    n = len(ids)

    def marked(spans, kind="key"):
        return [i for i, m in enumerate(char_spans_to_mask(ids, spans, tokenizer, kind=kind)) if m]

    assert marked([(2, 5, "key")]) == [0, 1, 2]  # "e c": straddles "the" | "Ġ" | "cafÃ"
    assert marked([(7, 8, "key")]) == [3]  # é belongs to "©", not to "cafÃ"
    assert marked([(10, 11, "key")]) == [6, 7, 8]  # 京: all three byte tokens
    assert marked([(12, 13, "error")], kind="error") == [10, 11, 12, 13]  # 👍: four bytes
    assert marked([(12, 13, "error")], kind="key") == []  # other kind ignored
    assert marked([(5, 5, "key")]) == []  # an empty span overlaps nothing
    assert marked([(0, 16, "key")]) == list(range(n - 1))  # <eos> (empty extent) never
    assert marked([(0, 1, "key"), (15, 16, "key")]) == [0, 14]


@pytest.mark.parametrize(
    ("spans", "kind", "message"),
    [
        ([(-1, 2, "key")], "key", r"not a range inside .*\[0, 16\]"),
        ([(3, 2, "key")], "key", r"Span \[3, 2\)"),
        ([(0, 17, "key")], "key", r"Span \[0, 17\)"),
        ([(0, 1, "bogus")], "key", r"'bogus' is not one of"),
        ([(0, 1, "key")], "bogus", r"'bogus' is not one of"),
    ],
)
def test_bad_spans_raise(tokenizer, spans, kind, message):
    with pytest.raises(ValueError, match=message):
        char_spans_to_mask(_ids(tokenizer, SENTENCE), spans, tokenizer, kind=kind)


def test_annotated_span_masks_decode_only_valid_tokens(tokenizer):
    the, space_ok, caf, eos = (
        _ids(tokenizer, s, eos=False)[0] for s in ("the", " ok", "caf", "<eos>")
    )
    # Row 1 has a masked "caf" in the middle: decoded, it would shift " ok" to [6, 9).
    ids_BT = torch.tensor([[the, space_ok, eos, eos], [the, caf, space_ok, eos]])
    mask_BT = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 0]])
    spans_B = [[(0, 3, "key")], [(3, 6, "error"), (0, 1, "key")]]
    masks = annotated_span_masks(spans_B, ids_BT, mask_BT, tokenizer)
    assert masks.key_BT.dtype == torch.bool
    assert masks.key_BT.tolist() == [[True, False, False, False], [True, False, False, False]]
    assert masks.error_BT.tolist() == [[False] * 4, [False, False, True, False]]
    with pytest.raises(ValueError, match="spans for 1 rows, the batch has 2"):
        annotated_span_masks(spans_B[:1], ids_BT, mask_BT, tokenizer)
    with pytest.raises(ValueError, match=r"Span \[0, 9\)"):  # row 0's text is "the ok"
        annotated_span_masks([[(0, 9, "key")], []], ids_BT, mask_BT, tokenizer)


# Row 1's masked 0.99 would both move the threshold and join cols 1..4 into one run.
DIVERGENCE_BT = torch.tensor([[0.1, 0.9, 0.8, 0.2, 0.7, 0.6], [0.3, 0.85, 0.92, 0.99, 0.88, 0.2]])
DIVERGENCE_MASK_BT = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 1, 1]])
CORRECT_B = torch.tensor([True, False])


def _rows(mask_BT: torch.Tensor) -> list[list[int]]:
    return [row.nonzero().flatten().tolist() for row in mask_BT]


def test_divergence_spans_threshold_runs_and_kinds():
    # 11 valid values sorted: .1 .2 .2 .3 .6 .7 .8 .85 .88 .9 .92; q=0.5 -> index 5 -> 0.7.
    # High: row 0 cols 1,2 (run of 2), 4 (run of 1); row 1 cols 1,2 (run of 2), 4 (the masked
    # col 3 breaks the run).
    masks = divergence_span_masks(
        DIVERGENCE_BT, DIVERGENCE_MASK_BT, CORRECT_B, quantile=0.5, min_tokens=2
    )
    assert _rows(masks.key_BT) == [[1, 2], []]  # correct row -> key
    assert _rows(masks.error_BT) == [[], [1, 2]]  # incorrect row -> error
    masks = divergence_span_masks(
        DIVERGENCE_BT, DIVERGENCE_MASK_BT, CORRECT_B, quantile=0.5, min_tokens=1
    )
    assert _rows(masks.key_BT) == [[1, 2, 4], []]
    assert _rows(masks.error_BT) == [[], [1, 2, 4]]
    # q=0.75 -> index 7.5 -> (0.85 + 0.88) / 2 = 0.865 (linear interpolation).
    masks = divergence_span_masks(
        DIVERGENCE_BT, DIVERGENCE_MASK_BT, CORRECT_B, quantile=0.75, min_tokens=1
    )
    assert _rows(masks.key_BT) == [[1], []]
    assert _rows(masks.error_BT) == [[], [2, 4]]
    # q=0 -> every valid token; runs are the valid stretches: row 1 has 3 + 2.
    masks = divergence_span_masks(
        DIVERGENCE_BT, DIVERGENCE_MASK_BT, CORRECT_B, quantile=0.0, min_tokens=3
    )
    assert _rows(masks.key_BT) == [[0, 1, 2, 3, 4, 5], []]
    assert _rows(masks.error_BT) == [[], [0, 1, 2]]


def test_divergence_spans_edge_cases():
    none = divergence_span_masks(
        DIVERGENCE_BT, torch.zeros(2, 6), CORRECT_B, quantile=0.5, min_tokens=1
    )
    assert not none.key_BT.any() and not none.error_BT.any()
    for bad in ({"quantile": 1.5, "min_tokens": 1}, {"quantile": -0.1, "min_tokens": 1}):
        with pytest.raises(ValueError, match=r"quantile must be in \[0, 1\]"):
            divergence_span_masks(DIVERGENCE_BT, DIVERGENCE_MASK_BT, CORRECT_B, **bad)
    with pytest.raises(ValueError, match="min_tokens must be >= 1"):
        divergence_span_masks(
            DIVERGENCE_BT, DIVERGENCE_MASK_BT, CORRECT_B, quantile=0.5, min_tokens=0
        )


def test_kl_anneal_coefficient():
    values = [
        kl_anneal_coefficient(s, warmup_steps=10, decay_steps=4)
        for s in (0, 9, 10, 11, 12, 13, 14, 99)
    ]
    assert values == [1.0, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    assert [kl_anneal_coefficient(s, warmup_steps=10, decay_steps=0) for s in (9, 10, 11)] == [
        1.0,
        0.0,
        0.0,
    ]
    assert kl_anneal_coefficient(0, warmup_steps=0, decay_steps=2) == 1.0
    assert kl_anneal_coefficient(1, warmup_steps=0, decay_steps=2) == 0.5
    with pytest.raises(ValueError, match="must be >= 0"):
        kl_anneal_coefficient(0, warmup_steps=-1, decay_steps=0)


# 2x3: key spans on row 0 (correct), error spans on row 1 (incorrect); row 1 col 2 is masked.
SPANS = SpanMasks(
    key_BT=torch.tensor([[True, True, False], [False, False, False]]),
    error_BT=torch.tensor([[False, False, False], [True, False, True]]),
)
ROUTE_MASK_BT = torch.tensor([[1, 1, 1], [1, 1, 0]])
FORWARD_HALF = [[0.5, 0.5, 0.0], [0.0, 0.0, 0.0]]
REVERSE_HALF = [[0.0, 0.0, 0.0], [0.5, 0.0, 0.0]]
ZEROS = [[0.0] * 3] * 2
VALID = [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]


@pytest.mark.parametrize(
    ("kl_coef", "forward_on_key", "reverse_on_error", "outcome", "reverse", "forward"),
    [
        (0.5, True, False, [[0.0, 0.0, 1.0], [1.0, 1.0, 0.0]], ZEROS, FORWARD_HALF),
        (0.5, True, True, [[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]], REVERSE_HALF, FORWARD_HALF),
        (0.5, False, True, [[1.0, 1.0, 1.0], [0.0, 1.0, 0.0]], REVERSE_HALF, ZEROS),
        (0.5, False, False, VALID, ZEROS, ZEROS),
        (0.0, True, True, VALID, ZEROS, ZEROS),  # annealed away: plain GRPO
        (1.0, True, True, [[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]], [[0.0] * 3, [1.0, 0.0, 0.0]],
         [[1.0, 1.0, 0.0], [0.0] * 3]),
    ],
)  # fmt: skip
def test_route_term_masks(kl_coef, forward_on_key, reverse_on_error, outcome, reverse, forward):
    masks = route_term_masks(
        SPANS,
        ROUTE_MASK_BT,
        kl_coef,
        forward_on_key=forward_on_key,
        reverse_on_error=reverse_on_error,
    )
    for got, expected in (
        (masks.outcome_BT, outcome),
        (masks.reverse_kl_BT, reverse),
        (masks.forward_kl_BT, forward),
    ):
        assert got.dtype == torch.float32
        assert got.tolist() == expected


def test_route_term_masks_token_in_both_spans_and_bad_coefficient():
    both = SpanMasks(key_BT=torch.tensor([[True, False]]), error_BT=torch.tensor([[True, True]]))
    masks = route_term_masks(both, torch.ones(1, 2), 0.5, reverse_on_error=True)
    assert masks.outcome_BT.tolist() == [[0.0, 0.0]]
    assert masks.forward_kl_BT.tolist() == [[0.5, 0.0]]
    assert masks.reverse_kl_BT.tolist() == [[0.5, 0.5]]
    with pytest.raises(ValueError, match=r"kl_coef must be in \[0, 1\]"):
        route_term_masks(both, torch.ones(1, 2), 1.5)


def test_the_threshold_is_torch_quantile_also_beyond_its_input_limit():
    from opd.objectives.spans import _quantile

    values = torch.rand(1001, generator=torch.Generator().manual_seed(0))
    for q in (0.0, 0.3, 0.5, 0.8, 0.999, 1.0):
        torch.testing.assert_close(_quantile(values, q), torch.quantile(values, q))
    large = torch.arange(2**24 + 1, dtype=torch.float32)  # torch.quantile refuses this size
    assert float(_quantile(large, 0.5)) == 2**23


def _metaspace_tokenizer() -> PreTrainedTokenizerFast:
    """A SentencePiece-style word-piece tokenizer: '▁' marks a space and the decoder drops the
    one a decode starts with (what breaks a naive one-token-at-a-time detokenizer)."""
    vocab = {"<unk>": 0, "<eos>": 1, "▁the": 2, "▁ca": 3, "fé": 4, "▁ok": 5, "▁": 6, "ok": 7}
    core = Tokenizer(models.WordPiece(vocab=vocab, unk_token="<unk>", continuing_subword_prefix=""))
    core.pre_tokenizer = pre_tokenizers.Metaspace()
    core.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", unk_token="<unk>")


def test_the_incremental_offsets_equal_the_whole_prefix_ones(tokenizer):
    """The linear detokenizer gives the offsets of the quadratic definition, without falling
    back, on byte-level BPE (split multi-byte chars, merged whitespace, a mid-text special
    token) and on a SentencePiece-style decoder (leading-space handling)."""
    from opd.objectives.spans import _incremental_offsets, _prefix_offsets

    metaspace = _metaspace_tokenizer()
    cases = [
        (tokenizer, _ids(tokenizer, SENTENCE)),
        (tokenizer, _ids(tokenizer, "a   b\n\n c 東京東京 👍👍")),
        (tokenizer, [*_ids(tokenizer, "the"), tokenizer.eos_token_id, *_ids(tokenizer, " ok")]),
        (metaspace, [*metaspace.encode("the café ok ok", add_special_tokens=False), 1]),
    ]
    for tok, ids in cases:
        text = tok.decode(ids, skip_special_tokens=True)
        incremental = _incremental_offsets(ids, tok, text)
        assert incremental is not None, text
        assert incremental == _prefix_offsets(ids, tok, text), text
    assert metaspace.decode(cases[-1][1], skip_special_tokens=True) == "the café ok ok"


def test_a_decoder_whose_windows_disagree_falls_back_to_whole_prefixes(tokenizer):
    """A (contrived) decoder that reverses its output: short windows cannot rebuild the text,
    so the offsets are the quadratic definition's."""
    from opd.objectives.spans import _decoded_offsets, _incremental_offsets, _prefix_offsets

    class Reversing:
        def decode(self, ids, skip_special_tokens=True):
            return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)[::-1]

    ids = _ids(tokenizer, "the ok", eos=False)
    reversing = Reversing()
    text = reversing.decode(ids)
    assert _incremental_offsets(ids, reversing, text) is None
    assert _decoded_offsets(ids, reversing) == (text, _prefix_offsets(ids, reversing, text))
