"""`--reward_funcs` resolution (`opd.rewards.build_reward_funcs`): built-in names and import paths
as `trl grpo --reward_funcs my_module.my_reward` takes them, and the one-line errors.

Real modules written to tmp_path and put on sys.path; the CLI errors go through `opd.cli.main`
with `--dry_run` (no model loads). The 1-step training run with an imported reward is
`tests/integration/test_distill_user_inputs.py`.
"""

from __future__ import annotations

import sys
import textwrap

import pytest

from opd.cli import main
from opd.config import ConfigError
from opd.demo.task import accuracy_reward
from opd.rewards import build_reward_funcs, format_reward, math_accuracy_reward

MODULE = "opd_test_user_rewards"  # unique: sys.modules is shared by the tests of a process
SOURCE = """
def length_bonus(completions, **kwargs):
    return [len(c) / 10 for c in completions]

def needs_answer(completions, answer, **kwargs):
    return [float(c == a) for c, a in zip(completions, answer)]

def positional(completions):
    return [0.0] * len(completions)

def positional_only(completions, /, **kwargs):
    return [0.0] * len(completions)

NOT_A_FUNCTION = 3
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """`MODULE` (flat) and `opd_test_pkg.sub` (a package) on sys.path, forgotten afterwards."""
    (tmp_path / f"{MODULE}.py").write_text(textwrap.dedent(SOURCE))
    package = tmp_path / "opd_test_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "sub.py").write_text(textwrap.dedent(SOURCE))
    (tmp_path / "opd_test_broken.py").write_text("import opd_test_not_installed_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for name in (MODULE, "opd_test_pkg", "opd_test_pkg.sub", "opd_test_broken"):
        sys.modules.pop(name, None)


def test_built_in_names_map_to_the_functions():
    funcs = build_reward_funcs(["math_accuracy", "format", "demo_accuracy"])
    assert funcs == [math_accuracy_reward, format_reward, accuracy_reward]


@pytest.mark.usefixtures("user_module")
def test_import_paths_resolve_to_the_module_functions():
    flat, nested = build_reward_funcs([f"{MODULE}.length_bonus", "opd_test_pkg.sub.length_bonus"])
    assert flat is sys.modules[MODULE].length_bonus
    assert nested is sys.modules["opd_test_pkg.sub"].length_bonus
    assert flat(completions=["abcd"], prompts=["p"], trainer_state=None) == [0.4]


def test_trl_reward_by_import_path():
    from trl.rewards import think_format_reward

    assert build_reward_funcs(["trl.rewards.think_format_reward"]) == [think_format_reward]


@pytest.mark.usefixtures("user_module")
@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("nope", r"^reward_funcs: unknown 'nope'; give a built-in \(demo_accuracy, math_accuracy"),
        (
            "opd_test_missing.fn",
            r"^reward_funcs: cannot import module 'opd_test_missing' \(for 'opd_test_missing\.fn"
            r"'\): No module named 'opd_test_missing'; put its folder on PYTHONPATH",
        ),
        (  # a module that imports but fails on its own import: no PYTHONPATH hint
            "opd_test_broken.fn",
            r"^reward_funcs: cannot import module 'opd_test_broken' .*: No module named "
            r"'opd_test_not_installed_anywhere'\.$",
        ),
        (f"{MODULE}.missing", rf"^reward_funcs: module '{MODULE}' has no attribute 'missing'\.$"),
        (f"{MODULE}.NOT_A_FUNCTION", r"is a int, not a function"),
        (
            f"{MODULE}.positional",
            r"^reward_funcs: '.*positional' cannot take TRL's reward call \(got an unexpected "
            r"keyword argument 'prompts'\); .* def positional\(completions, \*\*kwargs\)",
        ),
        (  # TRL passes `completions` by keyword
            f"{MODULE}.positional_only",
            r"cannot take TRL's reward call \('completions' parameter is positional only",
        ),
    ],
)
def test_bad_reward_names_fail_in_one_line(name, message):
    with pytest.raises(ConfigError, match=message) as raised:
        build_reward_funcs([name])
    assert "\n" not in str(raised.value)


@pytest.mark.usefixtures("user_module")
def test_columns_known_check_required_parameters():
    """Once the dataset is loaded its columns are known: a required `answer` must be one (at
    start-up, with the columns unknown, the same function passes)."""
    [func] = build_reward_funcs([f"{MODULE}.needs_answer"], columns=["answer"])
    assert func is sys.modules[MODULE].needs_answer
    assert build_reward_funcs([f"{MODULE}.needs_answer"]) == [func]
    with pytest.raises(ConfigError, match="missing a required argument: 'answer'"):
        build_reward_funcs([f"{MODULE}.needs_answer"], columns=["solution"])


@pytest.mark.usefixtures("user_module")
def test_cli_bad_reward_path_exits_2_naming_the_module(tmp_path, capsys):
    """Checked at start-up, under --dry_run too: no model is built or loaded."""
    args = ["distill", "--reward_funcs", "format", "opd_test_missing.fn", "--dry_run", "true",
            "--output_dir", str(tmp_path / "run")]  # fmt: skip
    assert main(args) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("opd distill: error: reward_funcs: cannot import module ")
    assert "'opd_test_missing'" in error and "\n" not in error
    assert not (tmp_path / "run").exists()  # refused before the run folder is written
    good = ["distill", "--reward_funcs", f"{MODULE}.length_bonus", "--dry_run", "true",
            "--output_dir", str(tmp_path / "good")]  # fmt: skip
    assert main(good) == 0


def test_a_module_in_the_working_directory_imports(tmp_path, monkeypatch):
    """As with `trl grpo`: `my_rewards.py` beside the command needs no PYTHONPATH (the `opd`
    console script's sys.path starts at its bin folder, not the working directory)."""
    (tmp_path / "opd_test_cwd_rewards.py").write_text(textwrap.dedent(SOURCE))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "opd_test_cwd_rewards", raising=False)
    [func] = build_reward_funcs(["opd_test_cwd_rewards.length_bonus"])
    assert func(completions=["ab"]) == [0.2]
    assert sys.path[-1] == str(tmp_path)  # appended: never shadows an installed module
    sys.modules.pop("opd_test_cwd_rewards")
