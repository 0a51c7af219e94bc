"""`python -m runner.report` (what `make results` runs)."""

from runner.report.cli import main

main()
