"""The trainer stage: `OPDTrainer` (TRL's `GRPOTrainer` with a teacher's per-token advantage).

opd_trainer.py  OPDTrainer: __init__ and phase 1 (generate, score, advantages, selection)
step.py         StepState: one generation step's values, passed between the phases
loss.py         phase 2: the loss on the kept positions (fused lm_head), its normalisation
methods.py      method hooks: traces, correctness, privileged prompts, routes, SOD, TIP
metrics.py      the logged per-step signals, gathered over processes
console.py      one compact console line per logging step, under the progress bar
build.py        what the trainer builds and checks besides TRL's parts
trl_seams.py    every private touch of TRL / its vLLM engine (pinned by test_trl_surface.py)
"""

from opd.trainer.opd_trainer import OPDTrainer, no_outcome_reward

__all__ = ["OPDTrainer", "no_outcome_reward"]
