"""The claims engine: pre-registered claims, their decision rules, and verdicts from the ledger.

- `schema`: `Claim` (+ `Kind`, `Direction`, `StatTest`, `Arm`), `load_claim`, `load_claims`;
  `Claim.rule_hash` is the stable hash of the decision rule.
- `paths`: metric paths into trial rows (`metrics.val_loss_final`, `curves.steps[*].x`).
- `stats`: scipy-backed paired tests, TOST, correlations, trials-needed estimates.
- `verdicts`: `decide(claim, rows) -> Verdict` (VALIDATED / DISPROVEN / INCONCLUSIVE /
  PROVEN / SKIPPED, DESIGN.md §5).
- `checks`: registered computations for by-construction claims.
"""

from runner.claims.checks import CHECKS, CheckResult, register_check
from runner.claims.schema import (
    CLAIM_DIR,
    Arm,
    Claim,
    Direction,
    Kind,
    StatTest,
    load_claim,
    load_claims,
)
from runner.claims.verdicts import (
    Verdict,
    VerdictWord,
    claim_rows,
    decide,
    decide_all,
    decide_on,
)

__all__ = [
    "CHECKS", "CLAIM_DIR", "Arm", "CheckResult", "Claim", "Direction", "Kind", "StatTest",
    "Verdict", "VerdictWord", "claim_rows", "decide", "decide_all", "decide_on", "load_claim", "load_claims",
    "register_check",
]
