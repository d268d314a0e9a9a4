"""The probe the weight-sync tests share: one fixed prompt + completion whose logprobs a vLLM
engine and the trainer must agree on after an optimizer step, and the 1-step trainer settings
whose step moves them visibly.

Used by test_vllm_multiprocess.py (colocated vLLM on CPU on each torchrun rank),
test_teacher_overlap.py (one process: its child checks the engine after a step) and
tests/gpu/test_vllm_server_cuda.py (`trl vllm-serve` on CUDA).
Those scripts run with this folder as sys.path[0]; under pytest, tests/conftest.py adds it.
"""

from __future__ import annotations

PROMPT_IDS = [4, 5, 13, 6, 7, 16]  # "12+34="
COMPLETION_IDS = [8, 10, 2, 5, 9]
ONE_STEP_CONFIG = {  # OPDConfig fields besides the models, output folder and vLLM mode
    "report_to": "none",
    "max_steps": 1,
    "per_device_train_batch_size": 8,
    "num_generations": 4,
    "max_completion_length": 6,
    "learning_rate": 1e-2,  # large, so one step visibly moves the logprobs
    "save_strategy": "no",
}


def trainer_logprobs(model) -> list[float]:
    """The trainer model's fp32 logprobs of COMPLETION_IDS after PROMPT_IDS."""
    import torch

    ids = torch.tensor([PROMPT_IDS + COMPLETION_IDS], device=model.device)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1).cpu()
    start = len(PROMPT_IDS) - 1
    rows = logprobs[start : start + len(COMPLETION_IDS)]
    return rows.gather(-1, torch.tensor(COMPLETION_IDS)[:, None])[:, 0].tolist()


def vllm_logprobs(llm) -> list[float]:
    """A vLLM engine's logprobs of COMPLETION_IDS after PROMPT_IDS."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
    output = llm.generate(
        [{"prompt_token_ids": PROMPT_IDS + COMPLETION_IDS}], params, use_tqdm=False
    )
    positions = output[0].prompt_logprobs[len(PROMPT_IDS) :]
    return [entry[token].logprob for entry, token in zip(positions, COMPLETION_IDS, strict=True)]


def build_colocate_trainer(student: str, teacher: str, output_dir: str):
    """A 1-step trainer with a colocated vLLM engine."""
    from datasets import Dataset

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
