"""The files `opd eval` writes, and how a rerun resumes from them.

    output_dir/
      summary.json              {"settings", "models": {label: {"model", "results", "metrics"}},
                                 "complete"}: written first with the settings, then after each
                                model, `complete` once every model is done
      student_results.jsonl     one JSON line per example: index, prompt, answer, completions,
                                correct (null: ungradable gold), num_tokens, truncated, pass@k
      teacher_results.jsonl     the same for the teacher, when one is evaluated

Nothing is lost on a crash: each chunk's lines are appended in one write and fsync'd, and
summary.json is replaced atomically. A rerun into the same folder with the same settings reads
the finished examples back (a partial last line, left by a kill mid-write, is dropped) and
samples only the others; a folder holding other settings (those `opd eval` records, named by
the argument that sets them) is refused, since its results would mix with the new ones. A model
may be added: a teacher next to a finished student is evaluated, the student's results reused.
A finished example whose prompt is not the dataset's any more is refused too.

Test: `pytest tests/integration/test_eval.py -k resume`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from opd.arguments import ConfigError
from opd.evaluation.generate import GeneratedSample
from opd.evaluation.metrics import example_pass_at_k
from opd.shards import atomic_write_bytes, plan_differences

PROG = "opd eval"
SUMMARY_NAME = "summary.json"
RESULTS_SUFFIX = "_results.jsonl"


def results_name(label: str) -> str:
    return f"{label}{RESULTS_SUFFIX}"


class EvalStore:
    """The output folder of one evaluation: its settings, results files and summary."""

    def __init__(self, folder: str | Path, settings: dict[str, Any], labels: dict[str, str]):
        """`settings["models"]` maps labels to model names; `labels` names a settings key by the
        argument that sets it, for the refusal message."""
        self.folder = Path(folder)
        # Through JSON, so the comparison with a stored record sees the same types.
        self.settings = json.loads(json.dumps(settings))
        self.labels = labels

    def start(self) -> None:
        """Take the folder: check a previous run's settings, then record this run's."""
        self.folder.mkdir(parents=True, exist_ok=True)
        summary_path = self.folder / SUMMARY_NAME
        if summary_path.exists():
            self._check_settings(json.loads(summary_path.read_text())["settings"])
        elif list(self.folder.glob(f"*{RESULTS_SUFFIX}")):
            raise ConfigError(
                f"output_dir {self.folder} holds results files but no {SUMMARY_NAME}, so their "
                "settings are unknown; use a new output_dir."
            )
        self.write_summary({}, complete=False)

    def _check_settings(self, stored: dict[str, Any]) -> None:
        # A model the folder has not evaluated yet is left out of the comparison: adding it
        # changes none of the folder's results. One it has evaluated must be there, unchanged.
        evaluated = {
            label: name
            for label, name in self.settings["models"].items()
            if label in stored["models"]
        }
        now = self.settings | {"models": evaluated}
        differences = plan_differences(stored, now, labels=self.labels)
        if differences:
            raise ConfigError(
                f"output_dir {self.folder} already holds an evaluation with different settings ("
                + "; ".join(differences)
                + "). Use a new output_dir (or delete this one to start over)."
            )

    def finished(self, label: str, prompts: list) -> dict[int, dict[str, Any]]:
        """The records of `label`'s finished examples by index, checked against `prompts`."""
        path = self.folder / results_name(label)
        if not path.exists():
            return {}
        records: dict[int, dict[str, Any]] = {}
        for number, record in enumerate(read_records(path), start=1):
            index = record["index"]
            if not 0 <= index < len(prompts) or record["prompt"] != prompts[index]:
                raise ConfigError(
                    f"{path} line {number}: example {index} is not the dataset's example "
                    f"{index} any more (the data changed); use a new output_dir."
                )
            records[index] = record
        return records

    def append(self, label: str, records: list[dict[str, Any]]) -> None:
        """Append one chunk's records to `label`'s results file, durably."""
        lines = "".join(json.dumps(record) + "\n" for record in records)
        with open(self.folder / results_name(label), "a") as file:
            file.write(lines)
            file.flush()
            os.fsync(file.fileno())

    def write_summary(self, models: dict[str, Any], *, complete: bool) -> dict[str, Any]:
        summary = {"settings": self.settings, "models": models, "complete": complete}
        atomic_write_bytes(
            self.folder / SUMMARY_NAME, (json.dumps(summary, indent=2) + "\n").encode()
        )
        return summary


def example_record(
    index: int, prompt, gold, samples: list[GeneratedSample], grader, ks: list[int]
) -> dict[str, Any]:
    """One example's line in a results file: its n graded samples and their pass@k for each k
    in `ks`. `correct` is None when the grader cannot parse the gold."""
    texts = [sample.text for sample in samples]
    rewards = grader(texts, answer=[gold] * len(texts))
    correct = None if None in rewards else [reward == 1.0 for reward in rewards]
    pass_at = {f"pass@{k}": None for k in ks} if correct is None else example_pass_at_k(correct, ks)
    return {
        "index": index,
        "prompt": prompt,
        "answer": gold,
        "completions": texts,
        "correct": correct,
        "num_tokens": [sample.num_tokens for sample in samples],
        "truncated": [sample.truncated for sample in samples],
        **pass_at,
    }


def read_records(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of a results file. A partial last line (a crash mid-write) is cut off the
    file; an unreadable line anywhere else is an error."""
    data = path.read_bytes()
    complete_end = data.rfind(b"\n") + 1
    if complete_end < len(data):
        print(f"{PROG}: {path} ends with a partial line (interrupted write); dropping it.")
        with open(path, "r+b") as file:
            file.truncate(complete_end)
    records = []
    for number, line in enumerate(data[:complete_end].splitlines(), start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise ConfigError(
                f"{path} line {number} is not valid JSON ({error}); delete the file to "
                "evaluate that model again."
            ) from error
    return records
