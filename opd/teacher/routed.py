"""`RoutedTeacher`: several teachers behind one `TeacherScorer`, each row scored by its own (MOPD).

Multi-teacher on-policy distillation sends every example to the teacher that knows its domain
(math to a math teacher, code to a code teacher). The rollout names each row's teacher in
`RolloutBatch.teacher_route_B`; `score` splits the batch by route, lets each teacher score its
own rows (prompts, privileged contexts, sampler logprobs and stop reasons selected with them),
and scatters the results back into one `TeacherScores` of the full `[B, T]`, so the loss never
knows there was more than one teacher.

Test: `pytest tests/unit/test_routed_teacher.py`.
"""

from __future__ import annotations

import dataclasses

import torch

from opd.arguments import ConfigError
from opd.teacher.protocol import TeacherScorer
from opd.types import RolloutBatch, TeacherScores


class RoutedTeacher:
    """A `TeacherScorer` that forwards each row to the teacher its route names."""

    def __init__(self, teachers: dict[str, TeacherScorer]):
        if not teachers:
            raise ConfigError("a RoutedTeacher needs at least one route (NAME=TEACHER).")
        self.teachers = dict(teachers)
        self.teacher_id = (
            "routed("
            + ",".join(f"{name}={teacher.teacher_id}" for name, teacher in self.teachers.items())
            + ")"
        )

    def check_student_tokenizer(self, student_tokenizer) -> None:
        """Every route's teacher scores the student's token ids, so each must tokenize alike."""
        for teacher in self.teachers.values():
            teacher.check_student_tokenizer(student_tokenizer)

    def score(self, batch: RolloutBatch, top_k: int = 0) -> TeacherScores:
        # An empty batch still goes through one teacher, which gives the scores their shapes.
        rows_by_route = self._rows_by_route(batch) or {next(iter(self.teachers)): []}
        scores_by_route = {
            name: self.teachers[name].score(select_rows(batch, rows), top_k=top_k)
            for name, rows in rows_by_route.items()
        }
        merged = _scatter_scores(len(batch.prompt_ids), rows_by_route, scores_by_route)
        metrics = _average_metrics([scores.metrics for scores in scores_by_route.values()])
        for name in self.teachers:
            metrics[f"teacher/route_{name}_rows"] = float(len(rows_by_route.get(name, [])))
        return dataclasses.replace(merged, teacher_id=self.teacher_id, metrics=metrics)

    def _rows_by_route(self, batch: RolloutBatch) -> dict[str, list[int]]:
        """Row indices per route, in route order of first appearance; rejects unknown routes.

        A row without a known teacher cannot be scored, and silently dropping it would train on
        a zero teacher signal, so both a missing route list and an unknown name are errors.
        """
        available = ", ".join(self.teachers)
        if batch.teacher_route_B is None:
            raise ConfigError(
                "the batch has no teacher_route_B, but the teacher is routed (teacher_routes); "
                f"set teacher_route_column so each example names one of: {available}."
            )
        unknown = sorted(set(batch.teacher_route_B) - set(self.teachers))
        if unknown:
            raise ConfigError(
                f"unknown teacher route(s) {unknown}; the available routes are: {available}."
            )
        rows_by_route: dict[str, list[int]] = {}
        for row, name in enumerate(batch.teacher_route_B):
            rows_by_route.setdefault(name, []).append(row)
        return rows_by_route


def select_rows(batch: RolloutBatch, rows: list[int]) -> RolloutBatch:
    """The sub-batch of `rows`: every per-row field selected alike, scalars kept.

    By the contract in `opd/types.py` every list and tensor field of `RolloutBatch` has one entry
    per row, so selecting them generically keeps fields added later consistent too. The sub-batch
    has no routes: it goes to exactly one teacher.
    """
    selected = {}
    for field in dataclasses.fields(batch):
        value = getattr(batch, field.name)
        if isinstance(value, torch.Tensor):
            selected[field.name] = value[torch.tensor(rows, dtype=torch.long, device=value.device)]
        elif isinstance(value, list):
            selected[field.name] = [value[row] for row in rows]
    return dataclasses.replace(batch, **(selected | {"teacher_route_B": None}))


def _scatter_scores(
    num_rows: int,
    rows_by_route: dict[str, list[int]],
    scores_by_route: dict[str, TeacherScores],
) -> TeacherScores:
    """One `[B, T]` (and `[B, T, K]`) `TeacherScores` from each route's scores of its rows."""
    _check_routes_agree(scores_by_route)
    parts = [(rows_by_route[name], scores) for name, scores in scores_by_route.items()]
    first = parts[0][1]

    def scatter(field: str) -> torch.Tensor:
        return _scatter_rows(num_rows, [(rows, getattr(scores, field)) for rows, scores in parts])

    return TeacherScores(
        sampled_logprobs_BT=scatter("sampled_logprobs_BT"),
        completion_mask_BT=scatter("completion_mask_BT"),
        topk_ids_BTK=scatter("topk_ids_BTK") if first.top_k else None,
        topk_logprobs_BTK=scatter("topk_logprobs_BTK") if first.top_k else None,
        temperature=first.temperature,
    )


def _scatter_rows(num_rows: int, parts: list[tuple[list[int], torch.Tensor]]) -> torch.Tensor:
    """Rows `rows` of the result are `tensor`, for each part; dtype and device of the first.

    The routes partition the batch, so every row is written exactly once.
    """
    first = parts[0][1]
    full = first.new_empty((num_rows, *first.shape[1:]))
    for rows, tensor in parts:
        index = torch.tensor(rows, dtype=torch.long, device=full.device)
        full[index] = tensor.to(full.device, full.dtype)
    return full


def _check_routes_agree(scores_by_route: dict[str, TeacherScores]) -> None:
    """The merged scores have one top-k width and one temperature, so all routes must match."""
    widths = {name: scores.top_k for name, scores in scores_by_route.items()}
    if len(set(widths.values())) > 1:
        raise ValueError(f"the routed teachers returned different top-k widths: {widths}")
    temperatures = {name: scores.temperature for name, scores in scores_by_route.items()}
    if len(set(temperatures.values())) > 1:
        raise ConfigError(
            f"the routed teachers score at different temperatures {temperatures}; the loss "
            "needs one: give every route the same teacher_temperature."
        )


def _average_metrics(metrics_list: list[dict[str, float]]) -> dict[str, float]:
    """Each key's mean over the routes that reported it (latency, token counts, ...)."""
    values_by_key: dict[str, list[float]] = {}
    for metrics in metrics_list:
        for key, value in metrics.items():
            values_by_key.setdefault(key, []).append(float(value))
    return {key: sum(values) / len(values) for key, values in values_by_key.items()}
