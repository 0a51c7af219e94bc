"""task=lora_svd: read a trained LoRA adapter against the base model's geometry.

    python -m runner task=lora_svd model=smollm2_135m task.adapter=runs/<run id>/adapter

For every adapted Linear W (out x in) with PEFT factors B (out x r), A (r x in):

    dW = scaling * B A,  scaling = alpha / r   (alpha / sqrt(r) with use_rslora),

r and alpha taken from PEFT's rank_pattern / alpha_pattern when a pattern matches the module.
It reports dW's singular values (geometry.factored_svd, without forming dW), its effective and
stable rank, the Weyl ratio ||dW||_2 / sigma_k(W) (<= 1 means no singular value of W moved by
more than sigma_k: derivations 5 and 10), and the principal-angle overlap of dW's top singular
subspaces with W's top-k ones (k = W's structural rank) next to the chance level. A rich table
and `<runs_dir>/lora_svd/<model id>-<sha12>-<adapter sha12>.json` (written atomically).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.table import Table

import geometry
from geometry.provenance import jsonable
from runner.config.schema import RunConfig
from runner.errors import UserError
from runner.hardware import setup_hardware
from runner.ledger import git_commit, utc_now
from runner.models.loading import load_model, sha256_file
from runner.tasks.model_info import _console, write_report

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# PEFT's saved key: base_model.model.<module>.lora_A.weight (older files: .lora_A.<adapter>.weight)
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.[^.]+)?\.weight$")


class AdapterError(UserError):
    """An adapter directory is missing, unreadable, or does not fit the base model."""


@dataclass(frozen=True)
class AdapterFactors:
    """One adapted module: PEFT's factors and the scaling PEFT applies to B A."""

    module: str
    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (out, r)
    r: int
    alpha: float
    scaling: float


@dataclass(frozen=True)
class UpdateGeometry:
    """dW = scaling B A read against its base matrix W (see the module docstring)."""

    module: str
    shape: tuple[int, int]
    r: int
    scaling: float
    delta_norm: float  # ||dW||_2 = s_1(dW)
    delta_erank: float  # Roy-Vetterli effective rank of dW's singular values
    delta_stable_rank: float
    delta_singular_values: tuple[float, ...]
    k: int  # W's structural rank
    sigma_k: float
    weyl_ratio: float  # ||dW||_2 / sigma_k(W)
    d: int  # dimension of dW's top subspace compared: clamp(floor(erank(dW)), 1, r)
    overlap_out: float  # left (output-space) subspaces
    overlap_in: float  # right (input-space) subspaces
    chance_out: float
    chance_in: float


def lora_svd_task(cfg: RunConfig) -> dict:
    """Analyse every module of the adapter at `task.adapter`; print and write the report."""
    console = _console()

    # 1. Read the adapter first: a bad path fails in one line before any model is loaded.
    adapter_dir = check_adapter_dir(cfg.task.adapter)
    config = read_adapter_config(adapter_dir)
    factors = read_factors(adapter_dir, config)

    # 2. The base model, and each adapted module's base weight.
    hw = setup_hardware(cfg.hardware, backends=("torch",), task="lora_svd")
    loaded = load_model(cfg.model, dtype=hw.dtype, device=hw.device)
    weights = base_weights(loaded.model, factors, cfg.model.id)

    # 3. dW against W, module by module.
    rows = [update_geometry(f, weights[f.module]) for f in factors]

    # 4. Print, write, and say where.
    adapter_sha = sha256_file(adapter_dir / WEIGHTS_FILE)
    report = {
        "task": "lora_svd", "created_at": utc_now(), "git_commit": git_commit(),
        "model_id": loaded.model_id, "model_sha256": loaded.sha256,
        "adapter": str(adapter_dir), "adapter_sha256": adapter_sha,
        "peft": {k: config.get(k) for k in ("r", "lora_alpha", "use_rslora", "rank_pattern",
                                            "alpha_pattern", "target_modules")},
        "n_modules": len(rows),
        "max_weyl_ratio": max(r.weyl_ratio for r in rows),
        "modules": {r.module: jsonable(asdict(r)) for r in rows},
    }
    console.print(update_table(rows, cfg.task.top))
    stem = f"{loaded.model_id}-{loaded.sha256[:12]}-{adapter_sha[:12]}"
    path = write_report(Path(cfg.runs_dir) / "lora_svd", stem, report)
    console.print(f"{len(rows)} adapted modules; max ||dW||_2 / sigma_k = {report['max_weyl_ratio']:.4g}")
    console.print(f"wrote {path}")
    return report


# ---------------------------------------------------------------------------------------------
# Reading the adapter (PEFT's file format, read with safetensors only)


def check_adapter_dir(path: str | None) -> Path:
    if not path:
        raise AdapterError("task.adapter: missing required value (set task.adapter=/path/to/adapter, "
                           f"a PEFT directory with {CONFIG_FILE} and {WEIGHTS_FILE})")
    adapter_dir = Path(path).expanduser()
    if not adapter_dir.is_dir():
        raise AdapterError(f"task.adapter={path}: no such directory")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (adapter_dir / name).is_file():
            raise AdapterError(f"task.adapter={path}: {name} not found (not a PEFT LoRA adapter)")
    return adapter_dir


def read_adapter_config(adapter_dir: Path) -> dict:
    try:
        config = json.loads((adapter_dir / CONFIG_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterError(f"{adapter_dir / CONFIG_FILE}: cannot read ({err})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise AdapterError(f"{adapter_dir / CONFIG_FILE}: peft_type {kind!r} is not LORA")
    if config.get("use_dora"):
        raise AdapterError(f"{adapter_dir / CONFIG_FILE}: DoRA adapters are not plain B A updates "
                           "(use_dora=true is not supported)")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), int | float) or config[key] <= 0:
            raise AdapterError(f"{adapter_dir / CONFIG_FILE}: {key} must be a positive number")
    return config


def pattern_value(patterns: dict, module: str, default):
    """PEFT's rule (peft.utils.other.get_pattern_key): the first key that matches the end of the
    module name as a regular expression, else the default."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_factors(adapter_dir: Path, config: dict) -> list[AdapterFactors]:
    """Every (A, B) pair in the weights file, in module order, with PEFT's scaling."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(adapter_dir / WEIGHTS_FILE)
    except (OSError, SafetensorError) as err:
        raise AdapterError(f"{adapter_dir / WEIGHTS_FILE}: cannot read ({err})") from None
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match:
            pairs.setdefault(match["module"], {})[match["factor"]] = tensor
    if not pairs:
        raise AdapterError(f"{adapter_dir / WEIGHTS_FILE}: no lora_A/lora_B weights found")
    factors = []
    for module in sorted(pairs):
        ab = pairs[module]
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{adapter_dir / WEIGHTS_FILE}: {module} has lora_{next(iter(ab))} only")
        r = int(pattern_value(config.get("rank_pattern"), module, config["r"]))
        alpha = float(pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"]))
        if ab["A"].shape[0] != r or ab["B"].shape[1] != r:
            raise AdapterError(f"{adapter_dir / WEIGHTS_FILE}: {module} has factors "
                               f"{tuple(ab['B'].shape)} x {tuple(ab['A'].shape)} but r={r} in {CONFIG_FILE}")
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        factors.append(AdapterFactors(module, ab["A"], ab["B"], r, alpha, scaling))
    return factors


def base_weights(model, factors: list[AdapterFactors], model_id: str) -> dict[str, torch.Tensor]:
    """The base Linear weight of every adapted module; the adapter must fit this model."""
    modules = dict(model.named_modules())
    weights = {}
    for f in factors:
        module = modules.get(f.module)
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
            raise AdapterError(f"adapter module {f.module} is not a Linear of model {model_id} "
                               "(adapter trained on another model?)")
        if tuple(weight.shape) != (f.b.shape[0], f.a.shape[1]):
            raise AdapterError(f"adapter module {f.module}: dW is {f.b.shape[0]}x{f.a.shape[1]} but "
                               f"the base weight is {weight.shape[0]}x{weight.shape[1]} in {model_id}")
        weights[f.module] = weight.detach()
    return weights


# ---------------------------------------------------------------------------------------------
# The geometry of one update


def update_geometry(f: AdapterFactors, w: torch.Tensor) -> UpdateGeometry:
    """dW = scaling B A against W: spectra, Weyl ratio and top-subspace overlaps (float64)."""
    # 1. dW's thin SVD from the factors; W's full SVD (its top-k frames and sigma_k).
    dw = geometry.factored_svd(f.scaling * f.b.double().cpu(), f.a.double().cpu())
    u_w, s_w, vt_w = torch.linalg.svd(w.double().cpu(), full_matrices=False)
    st = geometry.structural_rank(s_w)
    s = dw.s
    norm = float(s[0])
    # 2. dW's ranks (undefined for an untrained adapter whose B is still 0).
    erank = geometry.effective_rank(s) if norm > 0 else math.nan
    srank = geometry.stable_rank(s) if norm > 0 else math.nan
    # 3. Overlap of dW's top-d subspaces with W's top-k ones, d = clamp(floor(erank), 1, r).
    d = min(max(int(erank), 1), f.r) if norm > 0 else 1
    m, n = w.shape
    overlap_out = geometry.subspace_overlap(dw.u[:, :d], u_w[:, :st.k]) if norm > 0 else math.nan
    overlap_in = geometry.subspace_overlap(dw.vt[:d].T, vt_w[:st.k].T) if norm > 0 else math.nan
    return UpdateGeometry(
        module=f.module, shape=(m, n), r=f.r, scaling=f.scaling, delta_norm=norm,
        delta_erank=erank, delta_stable_rank=srank,
        delta_singular_values=tuple(float(x) for x in s), k=st.k, sigma_k=st.sigma_k,
        weyl_ratio=norm / st.sigma_k, d=d, overlap_out=overlap_out, overlap_in=overlap_in,
        chance_out=geometry.random_subspace_overlap(d, st.k, m),
        chance_in=geometry.random_subspace_overlap(d, st.k, n),
    )


def update_table(rows: list[UpdateGeometry], top: int) -> Table:
    shown = rows if top <= 0 else rows[:top]
    table = Table(title=f"LoRA update dW = scaling * B A vs base W ({len(shown)} of {len(rows)} modules)")
    for col in ("module", "shape", "r", "scaling", "||dW||_2", "erank dW", "stable rank dW",
                "k", "sigma_k", "||dW||/sigma_k", "d", "overlap out (chance)", "overlap in (chance)"):
        table.add_column(col, justify="left" if col == "module" else "right",
                         overflow="fold" if col == "module" else "ellipsis")
    for g in shown:
        table.add_row(g.module, f"{g.shape[0]}x{g.shape[1]}", str(g.r), f"{g.scaling:.3g}",
                      f"{g.delta_norm:.3g}", f"{g.delta_erank:.2f}", f"{g.delta_stable_rank:.2f}",
                      str(g.k), f"{g.sigma_k:.3g}", f"{g.weyl_ratio:.3g}", str(g.d),
                      f"{g.overlap_out:.3f} ({g.chance_out:.3f})",
                      f"{g.overlap_in:.3f} ({g.chance_in:.3f})")
    return table
