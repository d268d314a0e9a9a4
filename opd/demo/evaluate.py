"""Before/after metrics for the embedded demo: task accuracy and exact reverse KL.

Contract: `evaluate_models(student, teacher, tokenizer, dataset, max_new_tokens=...)` returns

- `accuracy`: the student's greedy completions graded by `task.accuracy_reward`;
- `teacher_accuracy`: the same for the teacher;
- `reverse_kl`: the exact full-vocabulary reverse KL, mean over the student's completion tokens,
  `KL_t = sum_v p_s(v) (log p_s(v) - log p_t(v))`, where both models score the student's own
  GREEDY completions (deterministic, so before/after numbers need no seed and are comparable;
  the EOS token counts, padding after it does not).

The experiments (`scripts/experiments/`) also measure the reverse KL on the student's *sampled*
completions (`sampled_reverse_kl`: the sampled-token k1 and the exact value, each with its
standard error over sequences) and cache one model's held-out numbers (`held_out_metrics`).

Plain transformers `generate` and forward passes, left padding with attention masks, no grad.
Models are evaluated in eval mode and restored to their previous mode. About a second for 200
prompts with the demo's tiny models on a 2-core CPU.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from opd.demo.task import accuracy_reward


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and attention mask, both `[B, P]` int64."""
    enc = tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def completion_mask(completion_ids_BT: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 for each completion token up to and including the first EOS, 0 after it. `[B, T]`."""
    is_eos_BT = (completion_ids_BT == eos_id).int()
    # Tokens strictly after the first EOS have a positive count of earlier EOS tokens.
    eos_before_BT = torch.cumsum(is_eos_BT, dim=1) - is_eos_BT
    return (eos_before_BT == 0).long()


@torch.no_grad()
def generate_completions(
    model: PreTrainedModel,
    prompt_ids_BP: torch.Tensor,
    prompt_mask_BP: torch.Tensor,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    **sampling,
) -> torch.Tensor:
    """Completions `[B, T]` (T <= max_new_tokens), padded with `pad_id` after EOS: greedy, or
    sampled with `generate`'s sampling options (`do_sample=True`, ...)."""
    out_BL = model.generate(
        input_ids=prompt_ids_BP,
        attention_mask=prompt_mask_BP,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        **({"do_sample": False} | sampling),
    )
    return out_BL[:, prompt_ids_BP.shape[1] :]


@torch.no_grad()
def sample_completions(
    student: PreTrainedModel,
    prompt_ids_BP: torch.Tensor,
    prompt_mask_BP: torch.Tensor,
    tokenizer,
    max_new_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Student samples at temperature 1 over the full vocabulary: ids and mask, both `[B, T]`."""
    ids = (tokenizer.eos_token_id, tokenizer.pad_token_id)
    full_vocabulary = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
    completion_ids_BT = generate_completions(
        student, prompt_ids_BP, prompt_mask_BP, max_new_tokens, *ids, **full_vocabulary
    )
    return completion_ids_BT, completion_mask(completion_ids_BT, tokenizer.eos_token_id)


def completion_logprobs(
    model: PreTrainedModel,
    prompt_ids_BP: torch.Tensor,
    prompt_mask_BP: torch.Tensor,
    completion_ids_BT: torch.Tensor,
    completion_mask_BT: torch.Tensor,
) -> torch.Tensor:
    """Full-vocabulary log-probs at each completion position, `[B, T, V]` float32."""
    input_ids_BL = torch.cat([prompt_ids_BP, completion_ids_BT], dim=1)
    attention_BL = torch.cat([prompt_mask_BP, completion_mask_BT], dim=1)
    logits_BLV = model(input_ids=input_ids_BL, attention_mask=attention_BL).logits
    # The logits at position i predict token i + 1: completion token t sits at P + t.
    num_prompt = prompt_ids_BP.shape[1]
    logits_BTV = logits_BLV[:, num_prompt - 1 : -1, :].float()
    return torch.log_softmax(logits_BTV, dim=-1)


def exact_reverse_kl(
    student_logprobs_BTV: torch.Tensor, teacher_logprobs_BTV: torch.Tensor, mask_BT: torch.Tensor
) -> torch.Tensor:
    """Per-token `sum_v p_s (log p_s - log p_t)`, `[B, T]`, zero where `mask_BT` is 0."""
    student_probs_BTV = student_logprobs_BTV.exp()
    kl_BT = (student_probs_BTV * (student_logprobs_BTV - teacher_logprobs_BTV)).sum(dim=-1)
    return kl_BT * mask_BT


def _greedy_correct(
    model, tokenizer, prompt_ids_BP, prompt_mask_BP, answers: list[str], max_new_tokens: int
) -> tuple[float, torch.Tensor]:
    """Number of correct greedy completions, and the completions `[B, T]`."""
    completion_ids_BT = generate_completions(
        model,
        prompt_ids_BP,
        prompt_mask_BP,
        max_new_tokens,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    texts = tokenizer.batch_decode(completion_ids_BT, skip_special_tokens=True)
    return sum(accuracy_reward(texts, answers)), completion_ids_BT


@torch.no_grad()
def greedy_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    *,
    max_new_tokens: int,
    batch_size: int = 256,
) -> float:
    """Fraction of `dataset` rows whose greedy completion is graded correct."""
    was_training = model.training
    model.eval()
    correct = 0.0
    for start in range(0, len(dataset), batch_size):
        batch = dataset[start : start + batch_size]
        prompt_ids_BP, prompt_mask_BP = encode_prompts(tokenizer, batch["prompt"])
        correct += _greedy_correct(
            model, tokenizer, prompt_ids_BP, prompt_mask_BP, batch["answer"], max_new_tokens
        )[0]
    model.train(was_training)
    return correct / len(dataset)


@torch.no_grad()
def _evaluate_batch(student, teacher, tokenizer, batch: dict, max_new_tokens: int) -> dict:
    prompt_ids_BP, prompt_mask_BP = encode_prompts(tokenizer, batch["prompt"])
    prompt_args = (prompt_ids_BP, prompt_mask_BP, batch["answer"], max_new_tokens)
    student_correct, student_ids_BT = _greedy_correct(student, tokenizer, *prompt_args)
    teacher_correct, _ = _greedy_correct(teacher, tokenizer, *prompt_args)
    scores = {"student_correct": student_correct, "teacher_correct": teacher_correct}
    mask_BT = completion_mask(student_ids_BT, tokenizer.eos_token_id)
    args = (prompt_ids_BP, prompt_mask_BP, student_ids_BT, mask_BT)
    kl_BT = exact_reverse_kl(
        completion_logprobs(student, *args), completion_logprobs(teacher, *args), mask_BT
    )
    scores["kl_sum"] = kl_BT.sum().item()
    scores["num_tokens"] = mask_BT.sum().item()
    return scores


def evaluate_models(
    student: PreTrainedModel,
    teacher: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    *,
    max_new_tokens: int,
    batch_size: int = 256,
) -> dict[str, float]:
    """Greedy accuracy of both models and the student's exact reverse KL on `dataset`.

    Args:
        dataset: rows with `prompt` (str) and `answer` (str).
        max_new_tokens: completion budget for greedy decoding (EOS included).
        batch_size: prompts per forward pass.

    Returns:
        `{"accuracy", "teacher_accuracy", "reverse_kl", "num_prompts"}`; `reverse_kl` is the mean
        over the student's completion tokens (EOS included), in nats.
    """
    modes = (student.training, teacher.training)
    student.eval()
    teacher.eval()
    totals = {"student_correct": 0.0, "teacher_correct": 0.0, "kl_sum": 0.0, "num_tokens": 0.0}
    for start in range(0, len(dataset), batch_size):
        batch = dataset[start : start + batch_size]
        scores = _evaluate_batch(student, teacher, tokenizer, batch, max_new_tokens)
        for key, value in scores.items():
            totals[key] += value
    student.train(modes[0])
    teacher.train(modes[1])
    return {
        "accuracy": totals["student_correct"] / len(dataset),
        "teacher_accuracy": totals["teacher_correct"] / len(dataset),
        "reverse_kl": totals["kl_sum"] / max(totals["num_tokens"], 1.0),
        "num_prompts": float(len(dataset)),
    }


@torch.no_grad()
def sampled_reverse_kl(
    student, teacher, tokenizer, prompts: list[str], samples: int, *, seed: int,
    max_new_tokens: int,
) -> dict[str, float]:  # fmt: skip
    """Per-token reverse KL to `teacher` on `samples` seeded temperature-1 completions of the
    student per prompt: the sampled-token k1 `lp_s - lp_t` and the exact full-vocabulary value,
    each a mean over all completion tokens with its delta-method standard error over sequences.
    """
    prompt_ids_BP, prompt_mask_BP = encode_prompts(tokenizer, prompts)
    prompt_ids_BP = prompt_ids_BP.repeat_interleave(samples, dim=0)
    prompt_mask_BP = prompt_mask_BP.repeat_interleave(samples, dim=0)
    torch.manual_seed(seed)  # generate() samples from the global RNG
    completion_ids_BT, mask_BT = sample_completions(
        student, prompt_ids_BP, prompt_mask_BP, tokenizer, max_new_tokens=max_new_tokens
    )
    args = (prompt_ids_BP, prompt_mask_BP, completion_ids_BT, mask_BT)
    student_BTV = completion_logprobs(student, *args)
    teacher_BTV = completion_logprobs(teacher, *args)
    ids_BT1 = completion_ids_BT.unsqueeze(-1)
    k1_BT = (student_BTV.gather(-1, ids_BT1) - teacher_BTV.gather(-1, ids_BT1)).squeeze(-1)
    exact_BT = exact_reverse_kl(student_BTV, teacher_BTV, mask_BT.float())
    counts_B = mask_BT.double().sum(1)
    result = {}
    for name, values_BT in (("k1", k1_BT * mask_BT), ("exact", exact_BT)):
        sums_B = values_BT.double().sum(1)
        mean = float(sums_B.sum() / counts_B.sum())
        result[name] = mean
        result[f"{name}_se"] = float(
            ((sums_B - mean * counts_B) ** 2).sum().sqrt() / counts_B.sum()
        )
    return result


def held_out_metrics(
    model_path: str, result_path: Path, *, teacher, tokenizer, held_out: Dataset, samples: int,
    seed: int, max_new_tokens: int, reverse_kl: str,
) -> dict:  # fmt: skip
    """One model's held-out greedy accuracy (with its binomial SE) and sampled reverse KL, cached
    as JSON in `result_path` (a rerun reads it). `reverse_kl` ('k1' or 'exact') names the value
    reported as `reverse_kl` / `reverse_kl_se`; the exact value is kept as `reverse_kl_exact`."""
    if result_path.is_file():
        return json.loads(result_path.read_text())
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    accuracy = greedy_accuracy(student, tokenizer, held_out, max_new_tokens=max_new_tokens)
    kl = sampled_reverse_kl(
        student, teacher, tokenizer, list(held_out["prompt"]), samples, seed=seed,
        max_new_tokens=max_new_tokens,
    )  # fmt: skip
    result = {
        "model": model_path,
        "accuracy": accuracy,
        "accuracy_se": math.sqrt(accuracy * (1 - accuracy) / len(held_out)),
        "reverse_kl": kl[reverse_kl],
        "reverse_kl_se": kl[f"{reverse_kl}_se"],
        "reverse_kl_exact": kl["exact"],
    }
    result_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.write_text(json.dumps(result, indent=1))
    return result
