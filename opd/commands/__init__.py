"""The commands of `opd`, one module each: its arguments dataclass(es) and `run(...)`.

`opd.cli` is the only argv parser: it fills the dataclasses and applies one error and exit-code
policy. The stage folders (`opd.teacher`, `opd.rollout`, `opd.evaluation`, `opd.report`,
`opd.trainer`) hold library code only and never import from here.
"""
