"""In-process transformers teacher: small runs, self-distillation, tests, and the server backend.

`LocalTeacher(model, temperature).score(batch, top_k)` runs the teacher on
`teacher context + completion` for each row and returns the teacher's logprob of every sampled
completion token (and optionally its top-k). `score_sequences(request)` is the same on a ragged
`ScoreRequest`; `opd teacher serve --backend transformers` serves exactly that function, so the
server's scores are this in-process forward's. The teacher never receives gradients and only one
mini-batch (`batch_size` sequences) of logits exists at a time, over completion positions only:
the prompt's positions get no logits (4 sequences of 4096 + 256 tokens, 32k vocabulary: peak
+2291 MiB -> +291 MiB, same scores bit for bit).

A sequence's scores depend on its mini-batch neighbours by float rounding only, not bit for bit:
padding to the longest neighbour changes the matmul and attention shapes, so the summation order.
Measured on the tiny test teacher in float32 on CPU (alone vs in a batch of up to 16 sequences
of 1-500 tokens): at most 1.2e-6 at temperature 1, growing as 1 / temperature (4.8e-6 at 0.25);
GPU kernels and bfloat16 differ more. `batch_size=1` runs each sequence in its own forward, so
its scores are bit-identical whatever else the request holds.

Test: `pytest tests/unit/test_local_teacher.py`.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from opd.teacher.consistency import check_same_tokenizer
from opd.teacher.wire import (
    HIDDEN_DTYPES,
    ScoreRequest,
    SequenceScores,
    candidate_logprobs_with,
    score_batch_with,
)
from opd.types import RolloutBatch, TeacherScores


class LocalTeacher:
    """A frozen causal LM in this process: a `TeacherScorer` that is also a
    `FullDistributionTeacher` (`output_weight`, `completion_hidden_states`)."""

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        temperature: float = 1.0,
        batch_size: int = 16,
        tokenizer=None,
    ):
        self.model = model.eval().requires_grad_(False)
        self.temperature = temperature
        self.batch_size = batch_size
        self.tokenizer = tokenizer
        self.teacher_id = str(model.config.name_or_path or type(model).__name__)

    @classmethod
    def frozen_copy_of(cls, model: PreTrainedModel, **kwargs) -> LocalTeacher:
        """The student's own initial weights as a frozen teacher (OPSD self-distillation).

        A PEFT student's base model is the initial policy, so it is copied without adapters.
        """
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        teacher = cls(detached_copy(base), **kwargs)
        teacher.teacher_id = f"self:{teacher.teacher_id}"
        return teacher

    @classmethod
    def adapter_disabled_view_of(cls, peft_model, **kwargs) -> LocalTeacher:
        """A PEFT student's base model (its adapters off) as the teacher, sharing the student's
        weights: OPSD's initial policy under LoRA without a second copy of the model."""
        # Duck-typed: AdapterDisabledModel has what LocalTeacher uses of a model.
        teacher = cls(AdapterDisabledModel(peft_model), **kwargs)  # pyright: ignore[reportArgumentType]
        teacher.teacher_id = f"self:{teacher.teacher_id}"
        return teacher

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, device: str | torch.device = "cpu", **kwargs):
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch.float32)
        kwargs.setdefault("tokenizer", AutoTokenizer.from_pretrained(name_or_path))
        return cls(model.to(device), **kwargs)

    def check_student_tokenizer(self, student_tokenizer) -> None:
        if self.tokenizer is not None:
            check_same_tokenizer(student_tokenizer, self.tokenizer, teacher_name=self.teacher_id)

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    def score(self, batch: RolloutBatch, top_k: int = 0) -> TeacherScores:
        return score_batch_with(self, batch, top_k=top_k)

    @property
    def output_weight(self) -> torch.Tensor:
        """The lm_head weight `[V, H]` (full-vocabulary divergences from hidden states)."""
        return self.model.get_output_embeddings().weight

    @torch.no_grad()
    def completion_hidden_states(self, batch: RolloutBatch) -> torch.Tensor:
        """`[B, T, H]` final hidden state predicting each completion token after the teacher's
        context (0 past a row's end). With `output_weight`, the exact full-vocabulary teacher
        distribution without `[B, T, V]` logits: vOPD's full baseline, full JSD (OPSD)."""
        contexts = batch.teacher_context_ids
        completions = batch.completion_ids_BT.tolist()
        num_tokens = batch.completion_ids_BT.shape[1]
        rows = []
        for lo in range(0, len(contexts), self.batch_size):
            chunk = range(lo, min(lo + self.batch_size, len(contexts)))
            input_ids, attention_mask = _pack(
                [contexts[i] for i in chunk], [completions[i] for i in chunk], self.model.device
            )
            hidden = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                output_hidden_states=True,
                logits_to_keep=1,
            ).hidden_states[-1]
            for row, i in enumerate(chunk):
                start = len(contexts[i]) - 1
                rows.append(hidden[row, start : start + num_tokens])
        return torch.stack(rows)

    @property
    def hidden_size(self) -> int:
        """Width of the final hidden states `score_sequences` returns when asked."""
        return int(self.output_weight.shape[1])

    # A server may pass candidate sets to this backend (`opd teacher serve`'s limits read it).
    scores_candidates = True

    def score_candidates(
        self, batch: RolloutBatch, candidate_ids_BTC: torch.Tensor, *, temperature=None
    ) -> torch.Tensor:
        """float32 `[B, T, C]` the teacher's logprobs at `candidate_ids_BTC` (-1 pads; -inf
        there and at masked positions)."""
        return candidate_logprobs_with(self, batch, candidate_ids_BTC, temperature=temperature)

    @torch.no_grad()
    def score_sequences(self, request: ScoreRequest) -> SequenceScores:
        """Score every completion token of `request` (its own temperature and top-k, and the
        hidden states and candidate logprobs it asks for).

        Sequences go through the model sorted by length, so each mini-batch pads little (a
        server batch mixes short and long requests); results come back in request order.
        """
        contexts, completions = request.contexts(), request.completions()
        candidates = (
            None
            if request.candidate_ids_MC is None
            else request.candidate_ids_MC.split(request.completion_lengths_B.tolist())
        )
        order = sorted(range(len(contexts)), key=lambda i: len(contexts[i]) + len(completions[i]))
        per_sequence: list[dict[str, torch.Tensor]] = [{}] * len(contexts)
        for lo in range(0, len(order), self.batch_size):
            chunk = order[lo : lo + self.batch_size]
            input_ids, attention_mask = _pack(
                [contexts[i] for i in chunk], [completions[i] for i in chunk], self.model.device
            )
            # The logits at position p predict token p + 1: completion token t sits at
            # len(context) + t and is predicted by the logits one position earlier. Only the
            # positions from the shortest context's last token on get logits (`logits_to_keep`
            # as positions: the model's own head, soft-capping included): a long prompt costs no
            # `[T, V]` logits.
            first = min(len(contexts[i]) for i in chunk) - 1
            positions = torch.arange(first, input_ids.shape[1] - 1, device=input_ids.device)
            output = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                logits_to_keep=positions,
                output_hidden_states=bool(request.hidden_dtype),
            )
            for row, i in enumerate(chunk):
                start = len(contexts[i]) - 1
                span = slice(start - first, start - first + len(completions[i]))
                logprobs_TV = torch.log_softmax(
                    output.logits[row, span].float() / request.temperature, dim=-1
                )
                scores = _token_scores(logprobs_TV, completions[i], request.top_k)
                if request.hidden_dtype:
                    hidden_TH = output.hidden_states[-1][row, start : start + len(completions[i])]
                    scores["hidden_MH"] = hidden_TH.to(HIDDEN_DTYPES[request.hidden_dtype])
                if candidates is not None:
                    scores["candidate_logprobs_MC"] = _at_candidates(logprobs_TV, candidates[i])
                per_sequence[i] = {name: values.cpu() for name, values in scores.items()}
        return SequenceScores(
            completion_lengths_B=request.completion_lengths_B.clone(),
            **{name: torch.cat([s[name] for s in per_sequence]) for name in per_sequence[0]},
        )


def _token_scores(logprobs_TV: torch.Tensor, ids: list[int], top_k: int) -> dict[str, torch.Tensor]:
    """The sampled tokens' logprobs and, with `top_k`, the top-k (padded to K with id 0 / -inf
    when the vocabulary is smaller than K)."""
    ids_T = torch.tensor(ids, device=logprobs_TV.device)
    scores = {"sampled_logprobs_M": logprobs_TV.gather(-1, ids_T[:, None])[:, 0]}
    if top_k:
        topk = logprobs_TV.topk(min(top_k, logprobs_TV.shape[-1]), dim=-1)
        scores["topk_ids_MK"] = _pad_topk(topk.indices, top_k, 0)
        scores["topk_logprobs_MK"] = _pad_topk(topk.values, top_k, -torch.inf)
    return scores


def _at_candidates(logprobs_TV: torch.Tensor, candidate_ids_TC: torch.Tensor) -> torch.Tensor:
    """Logprobs at each position's candidate ids; -inf where the id is -1 (padding)."""
    candidate_ids_TC = candidate_ids_TC.to(logprobs_TV.device)
    values_TC = logprobs_TV.gather(-1, candidate_ids_TC.clamp(min=0))
    return values_TC.masked_fill(candidate_ids_TC < 0, -torch.inf)


class AdapterDisabledModel:
    """A PEFT model called with its adapters disabled and in eval mode: its base model.

    Deliberately not an `nn.Module` holding the student: `LocalTeacher` freezes and `eval()`s
    its model, which must not freeze the student being trained. Each call switches the student
    to eval mode (no dropout) and restores its mode afterwards.
    """

    def __init__(self, peft_model):
        self.peft_model = peft_model
        self.config = peft_model.config

    @property
    def device(self) -> torch.device:
        return self.peft_model.get_output_embeddings().weight.device

    def eval(self) -> AdapterDisabledModel:
        return self

    def requires_grad_(self, requires_grad: bool = True) -> AdapterDisabledModel:
        return self

    def get_output_embeddings(self):
        return self.peft_model.get_base_model().get_output_embeddings()

    def __call__(self, **inputs):
        was_training = self.peft_model.training
        self.peft_model.eval()
        try:
            with self.peft_model.disable_adapter():
                return self.peft_model(**inputs)
        finally:
            self.peft_model.train(was_training)


def detached_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A deep copy of `model` that runs its own weights.

    TRL's GRPOTrainer replaces the student's `forward` with a closure over the original bound
    method (`trl.trainer.utils.add_fused_lm_head`); `copy.deepcopy` keeps that closure, so the copy
    would silently keep calling the live student. Dropping the instance attribute restores the
    class's `forward` on the copy's own parameters.
    """
    import copy

    clone = copy.deepcopy(model)
    vars(clone).pop("forward", None)
    return clone


def _pack(
    contexts: list[list[int]], completions: list[list[int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded `[context + completion]` ids and attention mask.

    Right padding keeps every position id equal to the unpadded one, so scores match an
    unbatched forward up to float rounding (the module docstring has the measured tolerance).
    """
    sequences = [
        context + completion for context, completion in zip(contexts, completions, strict=True)
    ]
    width = max(len(sequence) for sequence in sequences)
    input_ids = torch.zeros(len(sequences), width, dtype=torch.long)
    attention_mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for i, sequence in enumerate(sequences):
        input_ids[i, : len(sequence)] = torch.tensor(sequence)
        attention_mask[i, : len(sequence)] = 1
    return input_ids.to(device), attention_mask.to(device)


def _pad_topk(values_MK: torch.Tensor, top_k: int, fill: float) -> torch.Tensor:
    """Pad the top-k axis to the requested K when the vocabulary is smaller than K."""
    missing = top_k - values_MK.shape[1]
    if missing <= 0:
        return values_MK
    padding = torch.full((values_MK.shape[0], missing), fill, dtype=values_MK.dtype)
    return torch.cat([values_MK, padding.to(values_MK.device)], dim=1)
