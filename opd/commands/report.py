"""`opd report RUN_DIR`: plot a run's logged metrics as PNGs plus one HTML page.

    opd report opd-runs/tip_q3                      # writes opd-runs/tip_q3/report/
    opd report opd-runs/tip_q3 --output_dir /tmp/r  # elsewhere

What is drawn and from which files: `opd.report.write`.

Test: `pytest tests/integration/test_report.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

from opd.arguments import ConfigError, help_field

PROG = "opd report"
DESCRIPTION = (
    "Plot a run's logged metrics (reverse KL, entropy, reward, length, truncation, kept tokens, "
    "top-k mass, importance ratios, teacher latency; the TIP scatter for a TIP run) as PNGs plus "
    "one HTML page."
)
POSITIONAL = "run_dir"  # `opd report RUN_DIR` as well as `opd report --run_dir RUN_DIR`


@dataclass
class ReportArguments:
    """Arguments of `opd report`."""

    run_dir: str = help_field(help="The run's output_dir.")
    output_dir: str | None = help_field(None, "Where to write (default RUN_DIR/report).")


def run(args: ReportArguments) -> None:
    from opd.report.run_log import ReportError
    from opd.report.write import write_report

    try:
        paths = write_report(args.run_dir, args.output_dir)
    except ReportError as error:
        raise ConfigError(str(error)) from error
    for path in paths:
        print(path)
