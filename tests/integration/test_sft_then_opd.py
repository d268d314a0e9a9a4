"""The sequential SFT -> OPD baseline end to end through the real CLI (`opd.cli.main`, in this
process): the two commands in the header of recipes/sft_then_opd-tiny.yaml, run as written
there (only their output folders moved to tmp), then checked by value:

- `opd sft` moves the weights by two Adam steps at its learning rate (bound below) and lowers the
  NLL of the demo's answers; a rerun skips (one line), one with other settings is refused;
- its loss covers the trace tokens only, text or chat: step 1's logged loss on a file of 8 rows
  (one batch) equals the NLL computed here from the prompt and trace ids;
- `opd distill --model_name_or_path <sft>` starts from the SFT model: its weights lie within two
  OPD steps of the SFT weights and farther than that from the initial student.

Adam's bound, used below. Adam moves a weight at step k by lr_k |m_k| / (sqrt(v_k) + eps), with
bias-corrected moments m_k, v_k of its gradients g_1, g_2, ... (beta1 0.9, beta2 0.999; weight
decay 0 in both stages):
    step 1: m = g_1, v = g_1^2, so the move is at most lr_1;
    step 2: m = (0.09 g_1 + 0.1 g_2) / 0.19, v = (0.000999 g_1^2 + 0.001 g_2^2) / 0.001999, and by
            Cauchy-Schwarz |m| / sqrt(v) <= sqrt((0.09/0.19)^2 / (0.000999/0.001999)
            + (0.1/0.19)^2 / (0.001/0.001999)) = sqrt(0.448979 + 0.553739) = 1.001358.
Two steps move a weight by at most lr_1 + 1.001358 lr_2, and a weight whose two gradients agree
moves by nearly that. SFT (lr 1e-5, linear decay over 2 steps: lr_2 = 5e-6): 1.50068e-5. OPD
(constant 1e-6): 2.00136e-6. fp32 rounding adds up to 2 ulps of the weight.
"""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from opd.cli import main

TINY = Path(__file__).parents[2] / "recipes" / "sft_then_opd-tiny.yaml"
ADAM_STEP2 = 1.001358  # the bound on step 2's |m| / sqrt(v), module docstring
SFT_BOUND = 1e-5 + ADAM_STEP2 * 5e-6  # 1.50068e-5
OPD_BOUND = 1e-6 + ADAM_STEP2 * 1e-6  # 2.00136e-6


def _header_command(command: str) -> list[str]:
    """`opd.cli.main`'s argv for the `opd <command> ...` line of the tiny recipe's header (its
    recipe path made absolute: the tests may run from any folder)."""
    for line in TINY.read_text().splitlines():
        words = shlex.split(line.lstrip("# "))
        if line.startswith("#   ") and words[:2] == ["opd", command]:
            config = words.index("--config") + 1
            assert words[config] == f"recipes/{TINY.name}"
            return [*words[1:config], str(TINY), *words[config + 1 :]]
    raise AssertionError(f"no `opd {command}` line in the header of {TINY}")


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def _max_move(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[key] - b[key]).abs().max().item() for key in a)


def _max_excess(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], bound: float) -> float:
    """The largest |a - b| beyond `bound` plus 2 ulps of the weight (<= 0: all within)."""
    ulp = torch.finfo(torch.float32).eps
    return max(
        ((a[k] - b[k]).abs() - bound - 2 * ulp * torch.maximum(a[k].abs(), b[k].abs())).max().item()
        for k in a
    )


def _answer_nll(model_dir: Path, rows) -> float:
    """Mean NLL of the answer and EOS tokens given the prompt (the demo's own SFT loss)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd.demo.pretrain import encode_sft_examples, sft_loss

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    input_ids_NL, labels_NL = encode_sft_examples(AutoTokenizer.from_pretrained(model_dir), rows)
    with torch.no_grad():
        return sft_loss(model, input_ids_NL, labels_NL).item()


@pytest.fixture(scope="module")
def student_dir() -> Path:
    from opd.models import resolve_model_name

    return Path(str(resolve_model_name("demo:student")))


@pytest.fixture(scope="module")
def stages(tmp_path_factory) -> dict[str, Any]:
    """Both stages as the header gives them: `opd sft` into tmp, then `opd distill` from it."""
    folder = tmp_path_factory.mktemp("sft_then_opd")
    sft_args = [*_header_command("sft"), "--sft_output_dir", str(folder / "sft")]
    assert main(sft_args) == 0
    distill_args = [*_header_command("distill"), "--model_name_or_path", str(folder / "sft"),
                    "--output_dir", str(folder / "opd")]  # fmt: skip
    assert main(distill_args) == 0
    return {"sft": folder / "sft", "opd": folder / "opd", "sft_args": sft_args}


def test_sft_moves_the_weights_by_two_adam_steps(stages, student_dir):
    initial, sft = _weights(student_dir), _weights(stages["sft"])
    assert _max_excess(sft, initial, SFT_BOUND) <= 0
    # One step would move no weight past 1e-5; two at a constant 1e-5 could reach 2e-5 (> bound).
    # Measured: 1.5020e-5.
    assert _max_move(sft, initial) >= 1.4e-5
    marker = json.loads((stages["sft"] / "opd_sft.json").read_text())
    assert [row["learning_rate"] for row in marker["log_history"] if "loss" in row] == [1e-5, 5e-6]


def test_sft_lowers_the_answers_nll(stages, student_dir):
    from opd.demo.pretrain import demo_splits

    train = demo_splits()[0]
    before, after = _answer_nll(student_dir, train), _answer_nll(stages["sft"], train)
    # Measured on the 700 training rows: 0.4908 -> 0.4884 (seed 0).
    assert after < before - 1e-3, (before, after)


def test_distill_starts_from_the_sft_model(stages, student_dir):
    import yaml

    initial, sft, distilled = (_weights(p) for p in (student_dir, stages["sft"], stages["opd"]))
    # Two OPD steps from the SFT model stay within OPD's bound of it, and moved it ...
    assert _max_excess(distilled, sft, OPD_BOUND) <= 0
    assert _max_move(distilled, sft) >= 0.5e-6
    # ... while the initial student is farther than that bound: it was not the starting point.
    assert _max_move(distilled, initial) >= 1.4e-5 - OPD_BOUND
    resolved = yaml.safe_load((stages["opd"] / "opd_config.yaml").read_text())
    assert resolved["model_name_or_path"] == str(stages["sft"])
    history = json.loads((stages["opd"] / "opd_results.json").read_text())["log_history"]
    assert max(row.get("step", 0) for row in history) == 2


def test_sft_rerun_skips_and_other_settings_are_refused(stages, capsys):
    model = stages["sft"] / "model.safetensors"
    written = model.stat().st_mtime_ns
    capsys.readouterr()
    assert main(stages["sft_args"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "skipped" in out[0] and str(stages["sft"]) in out[0], out
    assert model.stat().st_mtime_ns == written
    assert main([*stages["sft_args"], "--sft_max_steps", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[0]] and err[0].startswith("opd sft: error: sft_output_dir"), err
    assert "sft_max_steps: 2 in the folder vs 3 now" in err[0]
    assert model.stat().st_mtime_ns == written


# A chat template over the demo tokenizer's alphabet; the assistant turn ends with EOS.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
TRACE_ROWS = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in
              [(37, 5), (12, 9), (80, 3), (45, 7), (99, 1), (10, 0), (64, 8), (23, 4)]]  # fmt: skip


def _completion_nll(model_dir: Path, pairs: list[tuple[list[int], list[int]]]) -> float:
    """Mean NLL of the completion tokens of `(prompt_ids, completion_ids)` pairs, batched as one
    right-padded batch (causal attention: padding after a token does not change its logit)."""
    from transformers import AutoModelForCausalLM

    from opd.demo.pretrain import sft_loss

    length = max(len(prompt) + len(completion) for prompt, completion in pairs)
    input_ids_NL = torch.zeros(len(pairs), length, dtype=torch.long)
    labels_NL = torch.full((len(pairs), length), -100, dtype=torch.long)
    for row, (prompt, completion) in enumerate(pairs):
        input_ids_NL[row, : len(prompt) + len(completion)] = torch.tensor(prompt + completion)
        labels_NL[row, len(prompt) : len(prompt) + len(completion)] = torch.tensor(completion)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return sft_loss(model, input_ids_NL, labels_NL).item()


def _expected_pairs(tokenizer, chat: bool) -> list[tuple[list[int], list[int]]]:
    """Prompt and completion ids as `opd distill` shows the prompt: text through the tokenizer
    (the trace then EOS), or chat messages through the chat template (the assistant turn)."""
    pairs = []
    for row in TRACE_ROWS:
        if not chat:
            completion = [*tokenizer(row["answer"])["input_ids"], tokenizer.eos_token_id]
            pairs.append((tokenizer(row["prompt"])["input_ids"], completion))
            continue
        messages = [{"role": "user", "content": row["prompt"]}]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
        reply = [{"role": "assistant", "content": row["answer"]}]
        full = tokenizer.apply_chat_template(messages + reply)["input_ids"]
        assert full[: len(prompt)] == prompt and full[-1] == tokenizer.eos_token_id
        pairs.append((prompt, full[len(prompt) :]))
    return pairs


@pytest.mark.parametrize("chat", [False, True], ids=["text", "chat"])
def test_sft_trains_on_the_trace_tokens_only(chat, tmp_path, student_dir):
    """8 rows and 16 per batch: step 1's batch is the whole file, so its logged loss is the mean
    NLL of the trace tokens of all 8 rows under the initial student: the answer then EOS (TRL
    appends it to text), or the assistant turn the chat template renders; prompts left out."""
    from transformers import AutoTokenizer

    data = tmp_path / "traces.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in TRACE_ROWS))
    recipe, student = TINY, student_dir
    if chat:  # the demo student with a chat template, and the recipe's prompts as chat messages
        student = tmp_path / "chat_student"
        shutil.copytree(student_dir, student)
        tokenizer = AutoTokenizer.from_pretrained(student)
        tokenizer.chat_template = CHAT_TEMPLATE
        tokenizer.save_pretrained(student)
        recipe = tmp_path / "recipe.yaml"
        text = TINY.read_text().replace(
            "dataset_chat_template: false", "dataset_chat_template: true"
        )
        recipe.write_text(text)
    args = ["sft", "--config", str(recipe), "--model_name_or_path", str(student),
            "--dataset_name", str(data), "--sft_max_steps", "1",
            "--sft_output_dir", str(tmp_path / "sft")]  # fmt: skip
    assert main(args) == 0
    history = json.loads((tmp_path / "sft" / "opd_sft.json").read_text())["log_history"]
    expected_pairs = _expected_pairs(AutoTokenizer.from_pretrained(student), chat)
    assert history[0]["loss"] == pytest.approx(_completion_nll(student, expected_pairs), rel=1e-5)


def test_sft_dataset_pairs_prompts_with_traces():
    from datasets import Dataset

    from opd.arguments import ConfigError
    from opd.commands.sft import build_sft_dataset

    text = build_sft_dataset(Dataset.from_dict({"prompt": ["1+1="], "answer": ["2"]}), "answer")
    assert text.to_list() == [{"prompt": "1+1=", "completion": "2"}]
    chat_prompt = [{"role": "user", "content": "1+1="}]
    chat = Dataset.from_dict({"prompt": [chat_prompt], "solution": ["2"]})
    assert build_sft_dataset(chat, "solution").to_list() == [
        {"prompt": chat_prompt, "completion": [{"role": "assistant", "content": "2"}]}
    ]
    with pytest.raises(ConfigError, match=r"not a column of the dataset \(columns: prompt, "):
        build_sft_dataset(chat, "answer")
    with pytest.raises(ConfigError, match="row 1 holds ''"):
        build_sft_dataset(Dataset.from_dict({"prompt": ["a", "b"], "t": ["x", ""]}), "t")


def test_sft_bad_trace_column_is_one_line(tmp_path, capsys):
    args = ["sft", "--config", str(TINY), "--sft_trace_column", "trace",
            "--sft_output_dir", str(tmp_path / "sft")]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["opd sft: error: sft_trace_column='trace' is not a column of the dataset "
                   "(columns: prompt, answer, route); set sft_trace_column (or the recipe's "
                   "opd_trace_column) to the column holding the expert traces."]  # fmt: skip
    assert not (tmp_path / "sft").exists()
