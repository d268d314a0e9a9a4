"""Every shipped recipe parses, and runs 2 steps through the real CLI on the demo models.

Recipes are written for GPUs and real models; the 2-step run swaps in the demo's locally built
models and task (the overrides each recipe's header documents), so the plumbing is exercised on
CPU with vLLM rollouts.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from opd.cli import main

RECIPES = sorted((Path(__file__).parents[2] / "recipes").glob("*.yaml"))
CPU_OVERRIDES = [
    "--model_name_or_path", "demo:student", "--teacher_model_name_or_path", "demo:teacher",
    "--dataset_name", "demo:arithmetic", "--dataset_chat_template", "false", "--bf16", "false",
    "--max_completion_length", "4",
]  # fmt: skip


def test_recipes_exist():
    assert RECIPES, "no recipes found"


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.stem)
def test_recipe_parses(recipe, tmp_path):
    args = ["distill", "--config", str(recipe), "--bf16", "false", "--output_dir", str(tmp_path)]
    assert main([*args, "--dry_run", "true"]) == 0
    assert recipe.read_text().startswith("#"), "a recipe opens with a comment: purpose, launch"


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.stem)
def test_recipe_runs_two_steps_on_cpu(recipe, tmp_path):
    command = [sys.executable, "-m", "opd.cli", "distill", "--config", str(recipe),
               *CPU_OVERRIDES, "--max_steps", "2", "--output_dir", str(tmp_path)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    history = json.loads((tmp_path / "opd_results.json").read_text())["log_history"]
    assert max(entry.get("step", 0) for entry in history) == 2
