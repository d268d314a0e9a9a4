"""`scripts/experiments/cross_tokenizer_demo.py` at a tiny size end to end, and its resume.

Tiny size: 1 step of batch 16 per arm, seed 0, 8 held-out prompts. What would fail if the script
were wrong:

- each arm's resolved `opd_config.yaml` holds its teacher and mode: same the character-level
  demo teacher without cross-tokenizer mode, cross and cross_hybrid the BPE teacher with it,
  only cross_hybrid a divergence term (GOLD + ULD);
- the cross arms' logs show spans covering several student tokens (a BPE number token);
- the BPE teacher's logprob of the initial student's greedy answers is recomputed here
  independently (re-tokenized answer + EOS after the BPE prompt) and equals the table's;
- a second invocation trains nothing (no model rewritten) and prints the same table.

Test: `pytest tests/integration/test_cross_tokenizer_script.py` (about 20 s on 2 CPU cores).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "experiments" / "cross_tokenizer_demo.py"
ARGV = ["--steps", "1", "--batch_size", "16", "--seeds", "0", "--eval_prompts", "8"]


def _load_script():
    spec = importlib.util.spec_from_file_location("cross_tokenizer_demo", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _table(printed: str) -> str:
    return printed[printed.index("model  ") : printed.index("total wall time")]


def _bpe_logprob_of_initial_answers(prompts: int) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd.demo.pretrain import (
        MAX_NEW_TOKENS,
        demo_splits,
        prepare_bpe_teacher,
        prepare_demo_models,
    )

    student_path, bpe_path = prepare_demo_models()[1], prepare_bpe_teacher()
    student = AutoModelForCausalLM.from_pretrained(student_path, dtype=torch.float32).eval()
    bpe = AutoModelForCausalLM.from_pretrained(bpe_path, dtype=torch.float32).eval()
    student_tokenizer = AutoTokenizer.from_pretrained(student_path)
    bpe_tokenizer = AutoTokenizer.from_pretrained(bpe_path)
    total = 0.0
    for prompt in demo_splits()[1]["prompt"][:prompts]:
        ids = student_tokenizer(prompt, return_tensors="pt")["input_ids"]
        answer_ids = student.generate(ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                      eos_token_id=student_tokenizer.eos_token_id,
                                      pad_token_id=student_tokenizer.pad_token_id)  # fmt: skip
        answer = student_tokenizer.decode(answer_ids[0, ids.shape[1] :], skip_special_tokens=True)
        prompt_ids = bpe_tokenizer(prompt)["input_ids"]
        completion = bpe_tokenizer(answer)["input_ids"] + [bpe_tokenizer.eos_token_id]
        with torch.no_grad():
            logits = bpe(input_ids=torch.tensor([prompt_ids + completion])).logits[0]
        logprobs = logits[len(prompt_ids) - 1 : -1].log_softmax(-1)
        total += float(logprobs.gather(-1, torch.tensor(completion)[:, None]).sum())
    return total / prompts


def test_the_experiment_runs_resumes_and_measures_what_it_says(tmp_path, capsys):
    script = _load_script()
    out = tmp_path / "out"
    script.main([*ARGV, "--output_dir", str(out)])
    first = _table(capsys.readouterr().out)
    runs = out / "s1-b16-lr0.001" / "seed0"
    for arm, teacher, cross, divergence in (
        ("same", "demo:teacher", False, "none"),
        ("cross", "demo:teacher-bpe", True, "none"),
        ("cross_hybrid", "demo:teacher-bpe", True, "jsd"),
    ):
        config = yaml.safe_load((runs / arm / "opd_config.yaml").read_text())
        assert config["teacher_model_name_or_path"] == teacher, arm
        assert config["teacher_cross_tokenizer"] is cross, arm
        assert config["opd_divergence"] == divergence, arm
        history = json.loads((runs / arm / "opd_results.json").read_text())["log_history"]
        spans = [e["teacher/cross_spans_per_token"] for e in history if "loss" in e and cross]
        assert all(0 < value < 1 for value in spans), arm
    results = json.loads((out / "results.json").read_text())
    before = results["fixed"]["student before"]["bpe_logprob"]
    assert before == pytest.approx(_bpe_logprob_of_initial_answers(8), abs=1e-4)
    assert results["fixed"]["demo:teacher-bpe"]["accuracy"] > 0.9

    models = sorted(out.rglob("model.safetensors"))
    stamps = [path.stat().st_mtime_ns for path in models]
    script.main([*ARGV, "--output_dir", str(out)])
    assert _table(capsys.readouterr().out) == first
    assert [path.stat().st_mtime_ns for path in models] == stamps  # nothing retrained
