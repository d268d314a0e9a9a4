"""Run `opd distill` several times in one process: one launch (one import of TRL) for several runs.

Launched by `tests/integration/test_crash_resume.py`, under `torchrun`, with the argv of each
run (what follows `opd`) as one JSON list:

    torchrun --nproc_per_node 2 tests/integration/crash_resume_worker.py \
        '[["distill", "--output_dir", "A", ...], ["distill", "--output_dir", "B", ...]]'

Each run goes through `opd.cli.main`, the entry point of the `opd` command; the first failing
run's exit code ends the process. The test's runs pass `--write_report false`: it compares
weights and logs, not plots.
"""

from __future__ import annotations

import json
import sys

from opd.cli import main

if __name__ == "__main__":
    for argv in json.loads(sys.argv[1]):
        code = main(argv)
        if code != 0:
            sys.exit(code)
