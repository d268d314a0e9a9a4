"""Model names that opd builds itself, resolved to local folders, for every command that loads a
model (`opd distill`, `opd eval`, `opd rollout`, `opd teacher precompute`, `opd teacher serve`):

    demo:student, demo:teacher    the embedded demo's tiny models, trained once and cached
                                  (`opd/demo/pretrain.py`)
    pypi:<model>                  real small models assembled from PyPI packages, cached
                                  (`opd/demo/pypi_models.py`)

Any other name (a local folder, a hub name) is kept as given. Only loading uses the folder: what
a command records (a resolved config, a shard manifest) keeps the name the user gave, so a record
reads `demo:teacher`, not a cache path that differs between machines.

Test: `pytest tests/unit/test_pypi_models.py tests/unit/test_precompute_settings.py`.
"""

from __future__ import annotations

from collections.abc import Iterable

DEMO_STUDENT, DEMO_TEACHER = "demo:student", "demo:teacher"


def is_built_name(name: str | None) -> bool:
    """Whether `name` is one that opd builds itself (`demo:student`, `demo:teacher`, `pypi:*`)."""
    from opd.demo.pypi_models import is_pypi_model

    return name in (DEMO_STUDENT, DEMO_TEACHER) or is_pypi_model(name)


def resolve_model_names(names: Iterable[str | None]) -> dict[str, str]:
    """`{name: local folder}` for each `demo:*` or `pypi:*` name in `names`, building as needed."""
    from opd.demo.pypi_models import is_pypi_model, prepare_pypi_model

    names = set(names)
    local_paths: dict[str, str] = {}
    if names & {DEMO_STUDENT, DEMO_TEACHER}:
        from opd.demo.pretrain import prepare_demo_models

        teacher_path, student_path = prepare_demo_models()
        local_paths = {DEMO_STUDENT: str(student_path), DEMO_TEACHER: str(teacher_path)}
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
