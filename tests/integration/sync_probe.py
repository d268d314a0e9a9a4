"""The probe the weight-sync tests share: one fixed prompt + completion whose logprobs a vLLM
engine and the trainer must agree on after an optimizer step, and the 1-step trainer settings
whose step moves them visibly.

Used by test_vllm_weight_sync.py (colocated vLLM on CPU, also per torchrun rank in
test_vllm_multiprocess.py) and tests/gpu/test_vllm_server_cuda.py (`trl vllm-serve` on CUDA).
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
