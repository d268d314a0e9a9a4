"""The demo's BPE tokenizer (`opd.demo.bpe`), its tiny model folder and `demo:teacher-bpe`.

The tokenizer must split text differently from the student's char tokenizer (numbers are one
token, the special ids differ) yet decode back to the exact text, and SFT must label the answer
and EOS. The name test uses a complete cache folder made here, not a trained teacher (training
takes ~30 s; `python -m opd.demo.pretrain --bpe` does it).

Run: `pytest -n 0 -q tests/unit/test_demo_bpe.py`.
"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd.demo import pretrain
from opd.demo.bpe import build_bpe_tokenizer, build_tiny_bpe_model, save_tiny_bpe, task_texts
from opd.demo.tiny import ALPHABET, build_char_tokenizer
from opd.models import is_built_name, resolve_model_name, served_model_name


@pytest.fixture(scope="module")
def tokenizer():
    """The BPE teacher's tokenizer: built from the demo's train split."""
    return build_bpe_tokenizer(task_texts(pretrain.demo_splits()[0]))


def _tokens(tokenizer, text: str) -> list[str]:
    return tokenizer.convert_ids_to_tokens(tokenizer(text)["input_ids"])


def test_every_alphabet_string_decodes_to_itself(tokenizer):
    texts = [*ALPHABET, ALPHABET, "37+5=42", "99+9=108", "  a  b. c,d:#? ", "7-3*2=1"]
    for text in texts:
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text, text
    # What greedy_accuracy grades: the completion decoded without EOS and padding.
    answer_ids = [*tokenizer("42")["input_ids"], tokenizer.eos_token_id, tokenizer.pad_token_id]
    assert tokenizer.batch_decode([answer_ids], skip_special_tokens=True) == ["42"]


def test_numbers_are_one_token_and_other_characters_are_not_merged(tokenizer):
    assert _tokens(tokenizer, "37+5=42") == ["37", "+", "5", "=", "42"]
    assert _tokens(tokenizer, "100+8=") == ["100", "+", "8", "="]
    assert _tokens(tokenizer, "ab  c") == ["a", "b", " ", " ", "c"]
    # Every two-digit number is a first operand of the train split, so each was merged, and so
    # is every answer of the train split (the three-digit ones too).
    assert all(len(_tokens(tokenizer, str(n))) == 1 for n in range(10, 100))
    assert all(len(_tokens(tokenizer, a)) == 1 for a in pretrain.demo_splits()[0]["answer"])


def test_special_tokens_differ_from_the_char_tokenizer(tokenizer):
    char = build_char_tokenizer()
    bpe_ids = (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    char_ids = (char.pad_token_id, char.bos_token_id, char.eos_token_id)
    assert bpe_ids == (1, 2, 0) and char_ids == (0, 1, 2)
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.padding_side == "left"
    # No BOS/EOS added: a prompt is its text's tokens alone.
    assert _tokens(tokenizer, "37+5=") == ["37", "+", "5", "="]


def test_same_texts_give_the_same_tokenizer(tokenizer):
    again = build_bpe_tokenizer(task_texts(pretrain.demo_splits()[0]))
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


def test_sft_examples_label_the_answer_token_and_eos(tokenizer):
    rows = Dataset.from_dict({"prompt": ["37+5=", "1+2+3="], "answer": ["42", "6"]})
    input_ids_NL, labels_NL = pretrain.encode_sft_examples(tokenizer, rows)
    ids = tokenizer.convert_tokens_to_ids
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    assert input_ids_NL.tolist() == [
        [*ids(["37", "+", "5", "=", "42"]), eos, pad, pad],
        [*ids(["1", "+", "2", "+", "3", "=", "6"]), eos],
    ]
    assert labels_NL.tolist() == [
        [-100, -100, -100, -100, ids("42"), eos, -100, -100],
        [-100] * 6 + [ids("6"), eos],
    ]


def test_save_tiny_bpe_writes_a_folder_transformers_loads(tmp_path):
    """AutoTokenizer must load the saved tokenizer.json as written: for a Qwen2 model folder it
    would rebuild Qwen2's own (one token per digit, spaces lost); vLLM loads it the same way."""
    path = save_tiny_bpe(tmp_path / "tiny-bpe")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == "llama"
    assert _tokens(tokenizer, "37+5=42") == ["37", "+", "5", "=", "42"]
    assert tokenizer.decode(tokenizer(" a  b. 7")["input_ids"]) == " a  b. 7"
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.hidden_size // model.config.num_attention_heads == 64
    special = (model.config.eos_token_id, model.config.pad_token_id, model.config.bos_token_id)
    assert special == (0, 1, 2)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id == 0
    logits = model(input_ids=torch.tensor([tokenizer("37+5=")["input_ids"]])).logits
    assert logits.shape == (1, 4, len(tokenizer))


def test_number_tokens_start_from_shared_place_vectors(tokenizer):
    """`init_number_embeddings`: e("42") = U[2] + T[4] and e("40") = U[0] + T[4], so both minus
    their units token ("2", "0") are T[4]; "37" shares no place vector with "42"."""
    model = build_tiny_bpe_model(tokenizer, seed=0)
    row = dict(zip(["42", "2", "40", "0", "37"], model.get_input_embeddings().weight[
        tokenizer.convert_tokens_to_ids(["42", "2", "40", "0", "37"])
    ].detach(), strict=True))  # fmt: skip
    torch.testing.assert_close(row["42"] - row["2"], row["40"] - row["0"])
    assert not torch.allclose(row["42"] - row["2"], row["37"] - row["2"], atol=1e-3)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_demo_teacher_bpe_resolves_to_its_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("OPD_CACHE_DIR", str(tmp_path))
    folder = pretrain.default_cache_dir() / "teacher-bpe"
    folder.mkdir(parents=True)
    (folder / pretrain.MARKER).write_text("{}")  # a complete cache: nothing is trained
    assert is_built_name("demo:teacher-bpe") and not is_built_name("demo:teacher-bp")
    assert resolve_model_name("demo:teacher-bpe") == str(folder)
    assert served_model_name(str(folder)) == "demo:teacher-bpe"
    # Only the BPE teacher was asked for: the other demo models were not built.
    assert sorted(p.name for p in folder.parent.iterdir()) == ["teacher-bpe"]
