"""One rank of the ZeRO-3 lm_head check, run by `torchrun` from `test_zero3.py`.

Each case trains a tiny model for 2 SGD steps with a loss built the way opd's loss builds it:
the final hidden states from a `logits_to_keep=1` forward, the lm_head weight from
`full_lm_head_weight`, and `opd.kernels.fused_linear_token_stats`. Each step also takes the
weight once under `no_grad` first, as the trainer's stats pass does. The same steps run in this
process on an unsharded copy with the whole batch; `rank<N>.json` gets, per case, the largest
difference of any parameter after the steps, of the no-grad weight from the unsharded one,
and whether the lm_head really is partitioned between steps.

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 tests/integration/zero3_worker.py OUT_DIR
"""

from __future__ import annotations

import importlib
import json
import os
import sys

os.environ.setdefault("OPD_KERNELS", "torch")

import deepspeed
import torch
import torch.distributed as dist
from transformers import Qwen2Config, Qwen2ForCausalLM

from opd.kernels import fused_linear_token_stats
from opd.trainer.sharding import full_lm_head_weight

VOCAB, ROWS, LENGTH, STEPS, LR = 64, 4, 10, 2, 1.0
# (name, tie_word_embeddings, stage3_param_persistence_threshold): 0 partitions every parameter;
# DeepSpeed's default (1e5 elements) keeps this small lm_head whole on every rank ("persistent").
CASES = [("tied", True, 0), ("untied", False, 0), ("tied_persistent", True, 100_000)]


def tiny_model(tied: bool) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=128, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, intermediate_size=256, tie_word_embeddings=tied,
        attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config)


def step_loss(model, lm_head_model, ids_BL: torch.Tensor, world: int) -> torch.Tensor:
    """Summed -logprob of each next token over this rank's rows, scaled so that the average of
    the ranks' gradients (what ZeRO does) is the gradient of the global token mean."""
    output = model(input_ids=ids_BL, output_hidden_states=True, logits_to_keep=1)
    hidden_NH = output.hidden_states[-1][:, :-1].reshape(-1, output.hidden_states[-1].shape[-1])
    weight_VH = full_lm_head_weight(lm_head_model)
    stats = fused_linear_token_stats(hidden_NH, weight_VH, ids_BL[:, 1:].reshape(-1))
    return -stats["logprob"].sum() * world / (ROWS * (LENGTH - 1))


def run_case(tied: bool, threshold: int, ids_BL: torch.Tensor) -> dict[str, float]:
    rank, world = dist.get_rank(), dist.get_world_size()
    reference = tiny_model(tied)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=LR)
    model = tiny_model(tied)
    config = {
        "train_micro_batch_size_per_gpu": ROWS // world,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": threshold},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,  # DeepSpeed clips at 1.0 by default; the reference does not
    }
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    rows = slice(rank * ROWS // world, (rank + 1) * ROWS // world)
    nograd_diff = 0.0
    for _ in range(STEPS):
        with torch.no_grad():  # the trainer's stats pass: the weight, no graph
            whole = full_lm_head_weight(engine.module)
        nograd_diff = max(nograd_diff, _max_diff(whole, reference.lm_head.weight))
        engine.backward(step_loss(engine, engine.module, ids_BL[rows], world))
        engine.step()
        step_loss(reference, reference, ids_BL, 1).backward()
        reference_optimizer.step()
        reference_optimizer.zero_grad()
    partitioned = engine.module.get_output_embeddings().weight.numel() == 0
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        trained = {name: p.detach().clone() for name, p in engine.module.named_parameters()}
        lm_head = engine.module.get_output_embeddings().weight.detach().clone()
    expected = dict(reference.named_parameters())
    assert trained.keys() == expected.keys()
    moved = max(_max_diff(expected[n], tiny_model(tied).get_parameter(n)) for n in expected)
    return {
        "param_diff": max(_max_diff(trained[n], expected[n]) for n in expected),
        "lm_head_diff": _max_diff(lm_head, reference.lm_head.weight),
        "nograd_weight_diff": nograd_diff,
        "reference_moved": moved,
        "partitioned": partitioned,
    }


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).abs().max())


def main(out_dir: str) -> None:
    # The shared-memory all-reduce op only speeds up CPU collectives; skipping it spares a C++
    # build (about 90 s, and a compiler) on the first run. gloo does the same collectives.
    # (`deepspeed.comm.torch` as an attribute is the torch package: fetch the module by name.)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")
    ids_BL = torch.randint(3, VOCAB, (ROWS, LENGTH), generator=torch.Generator().manual_seed(1))
    report = {name: run_case(tied, threshold, ids_BL) for name, tied, threshold in CASES}
    with open(os.path.join(out_dir, f"rank{dist.get_rank()}.json"), "w") as file:
        json.dump(report, file)


if __name__ == "__main__":
    main(sys.argv[1])
