"""Use `OPDTrainer` directly, the way TRL's example scripts use `GRPOTrainer`.

    python scripts/train_opd.py \
        --model_name_or_path Qwen/Qwen3-1.7B --teacher_model_name_or_path Qwen/Qwen3-8B \
        --dataset_name prompts.jsonl --output_dir runs/opd --use_vllm true --max_steps 100

Any `OPDConfig` field is a flag (`--learning_rate 5e-5`, `--opd_kl_coef 1.0`), and `--config
recipe.yaml` works as with `trl grpo`. The dataset needs a `prompt` column. With no model given the
demo models are used, so `python scripts/train_opd.py --max_steps 5` runs on a CPU.
"""

import sys
from dataclasses import dataclass, field

from trl import TrlParser

from opd import OPDConfig, OPDTrainer
from opd.commands.distill import resolve_demo_models
from opd.data import load_prompt_dataset

DEMO_DEFAULTS = ["--teacher_model_name_or_path", "demo:teacher", "--output_dir", "opd-runs/example"]


@dataclass
class ScriptArguments:
    model_name_or_path: str = field(default="demo:student", metadata={"help": "Student model."})
    dataset_name: str = field(default="demo:arithmetic", metadata={"help": "Prompt dataset."})


def main() -> None:
    parser = TrlParser((ScriptArguments, OPDConfig))
    # Flags given later win, so these only fill in what the user left out.
    script_args, training_args = parser.parse_args_and_config(DEMO_DEFAULTS + sys.argv[1:])
    resolve_demo_models(script_args, training_args)  # "demo:*" names -> locally built models

    dataset = load_prompt_dataset(script_args.dataset_name)
    trainer = OPDTrainer(
        model=script_args.model_name_or_path,
        args=training_args,
        train_dataset=dataset,
    )
    trainer.train()
    trainer.save_model(training_args.output_dir)


if __name__ == "__main__":
    main()
