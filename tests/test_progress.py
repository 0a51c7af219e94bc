"""What a run shows: phase lines, periodic plain lines off a terminal, and the run folder's log."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from support import ROOT

from runner.progress import Heartbeat, eta, format_seconds


def test_heartbeat_every_n_steps_or_seconds_whichever_first() -> None:
    now = [0.0]
    beat = Heartbeat(every=5, seconds=10.0, clock=lambda: now[0])
    due = []
    for step in range(1, 13):
        now[0] += 1.0 if step < 8 else 6.0  # steps 8..12 are slow: 6 s each
        if beat.due(step):
            due.append(step)
    # 5 and 10 by count; 9 (t=19, 14 s after step 5) and 12 (t=37, 12 s after 10) by time
    assert due == [5, 9, 10, 12]


def test_eta_is_the_time_left_at_the_rate_so_far() -> None:
    assert eta(1000, 4000, 30.0) == "eta 1m30s"
    assert eta(0, 4000, 3.0) == "eta ?"
    assert format_seconds(12.34) == "12.3s" and format_seconds(3725) == "1h02m"


def test_run_folder_log_keeps_every_line_off_a_terminal(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "runner", "+experiment=quickstart", "task=train",
         "trainer=derived", "budget.max_tokens=600", "budget.eval_every=2",
         "budget.eval_examples=4", "data.max_examples=60", "verify_adapter=false",
         f"results_dir={tmp_path / 'results'}", f"runs_dir={tmp_path / 'runs'}",
         f"hydra.run.dir={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    screen = proc.stderr.splitlines()
    for phase in ("loading model tiny_llama ...", "reading data", "deriving: hyperparameters",
                  "probing the noise scale", "eval step 0 ", "eval step 2 ", "train ",
                  "saving the adapter", "done budget"):
        assert any(line.startswith(phase) for line in screen), (phase, proc.stderr)
    assert any(" eta " in line for line in screen if line.startswith("train "))
    logged = [line.split(" - ", 1)[1] for line in (out / "app.log").read_text().splitlines()
              if "[runner.console]" in line]
    # Every printed line is in the log (the bars' final render aside); none twice on stdout.
    assert [line for line in screen if not line.startswith("train ━")] == logged
    assert "runner.console" not in proc.stdout
