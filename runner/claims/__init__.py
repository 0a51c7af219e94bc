"""The claims engine: pre-registered claims, their decision rules, and verdicts from the ledger.

- `claim`: `Claim` (+ `Kind`, `Direction`, `StatTest`, `Arm`); `Claim.rule_hash` is the stable
  hash of the decision rule, `core_rule` the rule less what an experiment sets.
- `loading`: `load_claim`, `load_claims`, `claim_from_record`, with one-line errors.
- `schema`: all of the above, and the rule syntax, in one import.
- `paths`: metric paths into trial rows (`metrics.val_loss_final`, `curves.steps[*].x`) and
  the invariants written over them.
- `stats`: scipy-backed paired tests, TOST, correlations, trials-needed estimates.
- `arms`: which arm a trial row belongs to; one configuration per arm.
- `verdicts`: `decide(claim, rows) -> Verdict` (VALIDATED / DISPROVEN / INCONCLUSIVE /
  PROVEN / SKIPPED, DESIGN.md §5).
- `checks`: registered computations for by-construction claims.
"""

from runner.claims.checks import CHECKS, CheckResult, register_check
from runner.claims.claim import Arm, Claim, Direction, Kind, StatTest
from runner.claims.loading import load_claim, load_claims
from runner.claims.verdicts import (
    Verdict,
    VerdictWord,
    claim_rows,
    decide,
    decide_all,
    decide_on,
)
from runner.config.paths import CLAIM_DIR

__all__ = [
    "CHECKS", "CLAIM_DIR", "Arm", "CheckResult", "Claim", "Direction", "Kind", "StatTest",
    "Verdict", "VerdictWord", "claim_rows", "decide", "decide_all", "decide_on", "load_claim", "load_claims",
    "register_check",
]
