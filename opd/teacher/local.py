"""In-process transformers teacher: for small runs, self-distillation and tests.

`LocalTeacher(model, temperature).score(batch, top_k)` runs the teacher on
`teacher context + completion` for each row, in mini-batches of `batch_size` rows, and returns
the teacher's logprob of every sampled completion token (and optionally its top-k). The teacher
never receives gradients and only one mini-batch of logits exists at a time.

Test: `pytest tests/unit/test_local_teacher.py`.
"""

from __future__ import annotations

import time

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from opd.types import RolloutBatch, TeacherScores


class LocalTeacher:
    """A frozen causal LM in this process that implements `TeacherScorer`."""

    def __init__(self, model: PreTrainedModel, *, temperature: float = 1.0, batch_size: int = 16):
        self.model = model.eval().requires_grad_(False)
        self.temperature = temperature
        self.batch_size = batch_size
        self.teacher_id = str(model.config.name_or_path or type(model).__name__)

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, device: str | torch.device = "cpu", **kwargs):
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch.float32)
        return cls(model.to(device), **kwargs)

    @torch.no_grad()
    def score(self, batch: RolloutBatch, top_k: int = 0) -> TeacherScores:
        start = time.perf_counter()
        num_rows, num_tokens = batch.completion_ids_BT.shape
        device = self.model.device
        sampled_BT = torch.zeros(num_rows, num_tokens, dtype=torch.float32)
        topk_ids_BTK = torch.zeros(num_rows, num_tokens, top_k, dtype=torch.int64)
        topk_logprobs_BTK = torch.full((num_rows, num_tokens, top_k), -torch.inf)
        for lo in range(0, num_rows, self.batch_size):
            rows = range(lo, min(lo + self.batch_size, num_rows))
            input_ids, attention_mask, starts = _pack_rows(batch, rows, device)
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
            for i, row in enumerate(rows):
                # The logits at position p predict token p + 1: completion token t sits at
                # starts[i] + t and is predicted by the logits one position earlier.
                row_logits_TV = logits[i, starts[i] - 1 : starts[i] - 1 + num_tokens].float()
                logprobs_TV = torch.log_softmax(row_logits_TV / self.temperature, dim=-1)
                ids_T = batch.completion_ids_BT[row].to(device)
                sampled_BT[row] = logprobs_TV.gather(-1, ids_T[:, None])[:, 0].cpu()
                if top_k:
                    values, indices = logprobs_TV.topk(min(top_k, logprobs_TV.shape[-1]), dim=-1)
                    topk_logprobs_BTK[row, :, : values.shape[-1]] = values.cpu()
                    topk_ids_BTK[row, :, : indices.shape[-1]] = indices.cpu()
        mask_BT = batch.completion_mask_BT.cpu()
        sampled_BT = sampled_BT * mask_BT
        return TeacherScores(
            sampled_logprobs_BT=sampled_BT,
            completion_mask_BT=mask_BT,
            topk_ids_BTK=topk_ids_BTK if top_k else None,
            topk_logprobs_BTK=topk_logprobs_BTK if top_k else None,
            teacher_id=self.teacher_id,
            temperature=self.temperature,
            metrics={"teacher/latency_s": time.perf_counter() - start},
        )


def _pack_rows(
    batch: RolloutBatch, rows: range, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Right-padded `[context + completion]` ids for `rows`, with where each completion starts.

    Right padding keeps every position id equal to the unpadded one, so scores match an
    unbatched forward exactly.
    """
    contexts = [batch.teacher_context_ids[row] for row in rows]
    if any(len(context) == 0 for context in contexts):
        raise ValueError("the teacher needs a non-empty context before each completion")
    num_tokens = batch.completion_ids_BT.shape[1]
    width = max(len(context) for context in contexts) + num_tokens
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (row, context) in enumerate(zip(rows, contexts, strict=True)):
        length = len(context)
        input_ids[i, :length] = torch.tensor(context)
        input_ids[i, length : length + num_tokens] = batch.completion_ids_BT[row]
        attention_mask[i, : length + num_tokens] = 1
    starts = [len(context) for context in contexts]
    return input_ids.to(device), attention_mask.to(device), starts
