"""task=dimension_profile: intrinsic dimension of the residual stream, layer by layer.

    python -m runner task=dimension_profile model=smollm2_135m [task.points=1000]
        [task.pooling=all_tokens|last_token] [task.resamples=1000] [seed=0]

Runs the base model on the held-out split of the configured data and reads the residual stream
at L + 1 places: the input embeddings (layer 0) and the output of every decoder block (layers
1..L, read by forward hooks on the blocks, so the last one is before the final norm). At each
layer it estimates the intrinsic dimension of `task.points` token states with TwoNN (maximum-
likelihood form, percentile bootstrap interval over the points' neighbour ratios) and with the
Levina-Bickel MLE (k = 20, MacKay-Ghahramani form) as a cross-check (geometry.intrinsic_dimension).

Pooling. `all_tokens` (default) samples the token states uniformly, without replacement, from
every (example, position) pair of the held-out split except position 0, with a generator seeded
by `seed`. The held-out split has a few hundred examples, too few last-token states for TwoNN to
resolve dimensions of 10-20 (its estimate is biased down when N is not much larger than a few
powers of d); every token state is a point of the representation the model computes, which is
what "compresses in the middle layers" speaks of. Position 0 is left out: its state depends on
its token alone (no context), and as the attention sink it carries norms orders of magnitude
above the rest. States that coincide (the same token after the same prefix, e.g. a templated
prompt's opening) are kept once by the estimators; the count is reported per layer.
`last_token` takes each example's last state (one point per example).

Prints a table, writes `<runs_dir>/dimension_profile/<model id>-<sha12>-<pooling>-s<seed>.json`
and a PNG beside it, and writes one trial row to the ledger for the claim `semantic_highway`
(conf/claim/semantic_highway.yaml; its rule is registered before the trial) with the profile under
`metrics.id_profile` and the claim's decision quantities under `metrics.semantic_highway`.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import track
from rich.table import Table

from geometry.intrinsic_dimension import (
    LEVINA_BICKEL_K,
    count_distinct,
    levina_bickel_dimension,
    twonn_estimate,
)
from runner.claims import decide_on, load_claim
from runner.claims.registration import register_rule
from runner.config.paths import resolve_data_path
from runner.config.schema import Pooling, RunConfig
from runner.data import Example, encode_record, is_val, read_jsonl
from runner.errors import UserError
from runner.hardware import HardwareInfo, setup_hardware
from runner.ledger import (
    read_trials,
    stable_hash,
    utc_now,
    write_trial,
)
from runner.models.loading import LoadedModel, load_model
from runner.tasks.model_info import _console, _resolve, write_report
from runner.trial import ClaimTag, Provenance, TrialRow, config_hash

CLAIM_ID = "semantic_highway"
CLAIM_ARM = "profile"
CONFIDENCE = 0.95
BATCH = 8  # examples per forward pass (memory only)


@dataclass(frozen=True)
class LayerDimension:
    """One row of the profile: layer 0 is the embeddings, layer i the output of block i.

    The estimates are None where the layer has too few distinct states (e.g. the embeddings
    under last-token pooling, where every example ends with the same token); `note` says why.
    """

    layer: int
    twonn: float | None
    ci_low: float | None
    ci_high: float | None
    mle: float | None
    n_points: int  # distinct states
    n_duplicates: int
    note: str = ""


def dimension_profile_task(cfg: RunConfig) -> dict:
    """Profile the model's intrinsic dimension per layer; print, plot, and record a trial."""
    console = _console()
    _check_options(cfg)
    provenance = Provenance.read(cfg.results_dir, allow_dirty=cfg.allow_dirty,
                                 what="task=dimension_profile")

    # 1. The claim's rule is registered before any state is read (pre-registration).
    claim = _register_claim(cfg)

    # 2-5. The profile, its report, figure and trial row; then the claim's verdict so far.
    report = measure_profile(cfg, ClaimTag(claim.id, claim.rule_hash, CLAIM_ARM), provenance)
    _print_verdict(cfg, claim, console)
    return report


def profile_trial(cfg: RunConfig, claim: ClaimTag, provenance: Provenance) -> None:
    """One trial of a measured arm `trainer: dimension_profile` (task=claims): the profile of
    seed `cfg.seed`, recorded for `claim` (runner.tasks.measured)."""
    _check_options(cfg)
    measure_profile(cfg, claim, provenance)


def measure_profile(cfg: RunConfig, claim: ClaimTag, provenance: Provenance) -> dict:
    """Steps 2-5 of the task: the profile, printed, plotted, and written as a trial row."""
    console, progress = _console(), Console(stderr=True)
    started, wall_start = utc_now(), time.perf_counter()

    # 2. The base model and the held-out examples.
    hw = setup_hardware(cfg.hardware, backends=("torch",), task="dimension_profile")
    loaded = load_model(cfg.model, dtype=hw.dtype, device=hw.torch_device)
    examples = held_out_examples(cfg, loaded.tokenizer)

    # 3. Token states at seeded positions, every layer, one forward pass per batch.
    rng = np.random.default_rng([cfg.seed, 0])
    positions = sample_positions(examples, cfg.task.points, cfg.task.pooling, rng)
    progress.print(f"model {loaded.model_id} sha256 {loaded.sha256[:12]}  data {cfg.data.id}: "
                   f"{len(positions)} token states ({cfg.task.pooling.value}) from "
                   f"{len(examples)} held-out examples")
    states = residual_states(loaded.model, examples, positions,
                             loaded.tokenizer.pad_token_id or 0, hw.torch_device, progress)

    # 4. Both estimators per layer, the bootstrap draws shared by all layers.
    draws = np.random.default_rng([cfg.seed, 1]).random((cfg.task.resamples, len(positions)))
    profile = [layer_dimension(i, x, draws)
               for i, x in enumerate(track(states, description="intrinsic dimension",
                                           console=progress))]
    summary = highway_summary(profile)
    wall = time.perf_counter() - wall_start

    # 5. Report, figure and trial row.
    console.print(profile_table(profile, loaded.model_id, cfg.task.pooling))
    stem = f"{loaded.model_id}-{loaded.sha256[:12]}-{cfg.task.pooling.value}-s{cfg.seed}"
    out = Path(cfg.runs_dir) / "dimension_profile"
    report = {"task": "dimension_profile", "created_at": utc_now(),
              "git_commit": provenance.git_commit,
              "model_id": loaded.model_id, "model_sha256": loaded.sha256,
              "data_id": cfg.data.id, "held_out_examples": len(examples),
              **_options(cfg), "seed": cfg.seed, "wall_seconds": wall,
              "profile": [asdict(p) for p in profile], "semantic_highway": summary}
    path = write_report(out, stem, report)
    figure = plot_profile(profile, out / f"{stem}.png", f"{loaded.model_id} ({cfg.task.pooling.value}, "
                          f"{len(positions)} states, seed {cfg.seed})")
    row = profile_row(cfg, hw, loaded, claim, profile, summary, started, wall, provenance)
    write_trial(cfg.results_dir, row)
    console.print(f"{len(profile)} layers in {wall:.1f}s; wrote {path} and {figure}")
    return report


# ---------------------------------------------------------------------------------------------
# Steps


def _options(cfg: RunConfig) -> dict:
    return {"points": cfg.task.points, "pooling": cfg.task.pooling.value,
            "resamples": cfg.task.resamples, "confidence": CONFIDENCE,
            "levina_bickel_k": LEVINA_BICKEL_K}


def _check_options(cfg: RunConfig) -> None:
    if cfg.task.points < LEVINA_BICKEL_K + 1:
        raise UserError(f"task.points={cfg.task.points}: need at least {LEVINA_BICKEL_K + 1} "
                        f"states (Levina-Bickel reads {LEVINA_BICKEL_K} neighbours)")
    if cfg.task.resamples < 100:
        raise UserError(f"task.resamples={cfg.task.resamples}: need at least 100 for a "
                        f"{CONFIDENCE:.0%} percentile interval")


def held_out_examples(cfg: RunConfig, tokenizer) -> list[Example]:
    """The validation split of the configured data (the same content-hash split as training)."""
    path = _resolve(cfg.data.path)
    records = read_jsonl(path)
    if cfg.data.max_examples is not None:
        records = records[: cfg.data.max_examples]
    examples = [encode_record(rec, tokenizer, max_seq_len=cfg.data.max_seq_len,
                              where=f"{path}:{n}")
                for n, rec in records if is_val(rec, cfg.data.val_fraction)]
    if not examples:
        raise UserError(f"{cfg.data.path}: no held-out examples (val_fraction="
                        f"{cfg.data.val_fraction})")
    return examples


def sample_positions(examples: list[Example], points: int, pooling: Pooling,
                     rng: np.random.Generator) -> list[tuple[int, int]]:
    """(example, position) pairs, sorted; see the module docstring for the pooling rule."""
    if pooling is Pooling.last_token:
        candidates = [(e, len(ex.input_ids) - 1) for e, ex in enumerate(examples)]
    else:
        candidates = [(e, t) for e, ex in enumerate(examples) for t in range(1, len(ex.input_ids))]
    if len(candidates) < LEVINA_BICKEL_K + 1:
        raise UserError(f"only {len(candidates)} token states in the held-out split "
                        f"({pooling.value}); need at least {LEVINA_BICKEL_K + 1}")
    chosen = rng.choice(len(candidates), size=min(points, len(candidates)), replace=False)
    return sorted(candidates[i] for i in chosen)


def decoder_blocks(model) -> torch.nn.ModuleList:
    """The model's list of decoder blocks: the ModuleList of num_hidden_layers modules."""
    n = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n and \
                name.rsplit(".", 1)[-1] == "layers":
            return module
    raise UserError(f"model type {model.config.model_type}: no list of {n} decoder blocks "
                    "named 'layers' to read the residual stream from")


@torch.no_grad()
def residual_states(model, examples: list[Example], positions: list[tuple[int, int]],
                    pad_id: int, device: str, progress: Console) -> list[np.ndarray]:
    """(len(positions), hidden) float32 states at layers 0..L (embeddings, then each block)."""
    blocks = decoder_blocks(model)
    captured: list[torch.Tensor] = []

    def keep(_module, _inputs, output):
        captured.append(output[0] if isinstance(output, tuple) else output)

    hooks = [model.get_input_embeddings().register_forward_hook(keep)]
    hooks += [b.register_forward_hook(keep) for b in blocks]
    wanted: dict[int, list[int]] = {}
    for e, t in positions:
        wanted.setdefault(e, []).append(t)
    order = sorted(wanted)
    layers: list[list[torch.Tensor]] = [[] for _ in range(len(blocks) + 1)]
    model.eval()
    try:
        for start in track(range(0, len(order), BATCH), description="forward (held-out)",
                           console=progress):
            batch = order[start:start + BATCH]
            width = max(len(examples[e].input_ids) for e in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, e in enumerate(batch):
                seq = examples[e].input_ids
                ids[row, :len(seq)] = torch.tensor(seq)
                mask[row, :len(seq)] = 1
            captured.clear()
            model(input_ids=ids.to(device), attention_mask=mask.to(device))
            rows = torch.tensor([r for r, e in enumerate(batch) for _ in wanted[e]])
            cols = torch.tensor([t for e in batch for t in wanted[e]])
            for layer, hidden in enumerate(captured):  # (B, T, hidden)
                layers[layer].append(hidden[rows, cols].float().cpu())
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(parts).numpy() for parts in layers]


def layer_dimension(layer: int, states: np.ndarray, draws: np.ndarray) -> LayerDimension:
    """TwoNN (with interval) and Levina-Bickel at one layer, in float64."""
    x = states.astype(np.float64)
    n_points = count_distinct(x)
    if n_points < LEVINA_BICKEL_K + 1:
        return LayerDimension(layer, None, None, None, None, n_points, x.shape[0] - n_points,
                              note=f"{n_points} distinct states: too few to estimate")
    est = twonn_estimate(x, draws, CONFIDENCE)
    return LayerDimension(layer=layer, twonn=est.d, ci_low=est.ci_low, ci_high=est.ci_high,
                          mle=levina_bickel_dimension(x, LEVINA_BICKEL_K),
                          n_points=est.n_points, n_duplicates=est.n_duplicates)


def highway_summary(profile: list[LayerDimension]) -> dict:
    """The decision quantities of the claim `semantic_highway` (conf/claim/semantic_highway.yaml).

    Blocks 1..L; first = block 1, last = block L, middle = blocks i with L/3 < i <= 2L/3, and
    m = the middle block with the lowest TwoNN estimate. compression_ratio = (upper end of m's
    interval) / min(lower ends of first's and last's intervals): below 1 the intervals are
    disjoint, and the claim asks for at most 0.8. With fewer than 3 blocks there is no middle
    third and the ratio is None (the claim reads no value); the same where one of these layers
    has no estimate.
    """
    blocks = profile[1:]
    n = len(blocks)
    middle = [p for p in blocks if n / 3 < p.layer <= 2 * n / 3] if n >= 3 else []
    if not middle or any(p.twonn is None for p in (blocks[0], blocks[-1], *middle)):
        return {"blocks": n, "compression_ratio": None, "mle_compression_ratio": None}
    first, last = blocks[0], blocks[-1]
    mid = min(middle, key=lambda p: p.twonn)
    mid_mle = min(middle, key=lambda p: p.mle)
    return {
        "blocks": n, "first_layer": first.layer, "last_layer": last.layer,
        "middle_layers": [middle[0].layer, middle[-1].layer], "middle_min_layer": mid.layer,
        "first": first.twonn, "middle_min": mid.twonn, "last": last.twonn,
        "compression_ratio": mid.ci_high / min(first.ci_low, last.ci_low),
        "point_ratio": mid.twonn / min(first.twonn, last.twonn),
        "mle_compression_ratio": mid_mle.mle / min(first.mle, last.mle),
    }


# ---------------------------------------------------------------------------------------------
# Output


def profile_table(profile: list[LayerDimension], model_id: str, pooling: Pooling) -> Table:
    table = Table(title=f"intrinsic dimension per layer: {model_id} ({pooling.value}; layer 0 = "
                        "embeddings, i = output of block i)")
    for col in ("layer", "TwoNN d", f"{CONFIDENCE:.0%} CI", f"MLE d (k={LEVINA_BICKEL_K})",
                "points", "duplicates"):
        table.add_column(col, justify="right")
    for p in profile:
        if p.twonn is None:
            table.add_row(str(p.layer), "-", p.note, "-", str(p.n_points), str(p.n_duplicates))
            continue
        table.add_row(str(p.layer), f"{p.twonn:.2f}", f"[{p.ci_low:.2f}, {p.ci_high:.2f}]",
                      f"{p.mle:.2f}", str(p.n_points), str(p.n_duplicates))
    return table


def plot_profile(profile: list[LayerDimension], path: Path, title: str) -> Path:
    """d per layer, both estimators, TwoNN's interval as a band; byte-stable PNG (Agg, fixed
    size and dpi, no software/date metadata)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [p.layer for p in profile]

    def values(key: str) -> list[float]:  # NaN breaks the line where a layer has no estimate
        return [math.nan if getattr(p, key) is None else getattr(p, key) for p in profile]

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    try:
        ax.fill_between(layers, values("ci_low"), values("ci_high"),
                        color="tab:blue", alpha=0.25, linewidth=0,
                        label=f"TwoNN {CONFIDENCE:.0%} bootstrap CI")
        ax.plot(layers, values("twonn"), "o-", color="tab:blue", label="TwoNN (MLE)")
        ax.plot(layers, values("mle"), "s--", color="tab:orange",
                label=f"Levina-Bickel MLE (k={LEVINA_BICKEL_K})")
        ax.set(xlabel="layer (0 = embeddings)", ylabel="intrinsic dimension", title=title)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100, metadata={"Software": None})
    finally:
        plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# The claim: rule registration, trial row, verdict


def _register_claim(cfg: RunConfig):

    claim = load_claim(CLAIM_ID)
    register_rule(cfg.results_dir, claim)
    return claim


def data_file_sha256(cfg: RunConfig) -> str:
    """The sha256 of the data file the measurement read (as task=claims registers it)."""
    return hashlib.sha256(Path(resolve_data_path(cfg.data.path)).read_bytes()).hexdigest()


def profile_hash(cfg: RunConfig) -> str:
    """The config hash of a profile trial: the run's config and the profile's options."""
    return stable_hash({"config": config_hash(cfg), "profile": _options(cfg)})


def profile_row(cfg: RunConfig, hw: HardwareInfo, loaded: LoadedModel, claim: ClaimTag,
                profile: list[LayerDimension], summary: dict, started: str, wall: float,
                provenance: Provenance) -> dict:
    """One ledger row: the profile under metrics.id_profile, the decision quantities under
    metrics.semantic_highway, tagged with the claim's id, rule hash and arm."""
    metrics = {"wall_seconds": wall, **_options(cfg),
               "id_profile": [asdict(p) for p in profile], "semantic_highway": summary}
    return TrialRow.measured(cfg, hw, provenance, arm="dimension_profile",
                             chash=profile_hash(cfg), started=started, loaded=loaded,
                             claim=claim, metrics=metrics,
                             data_sha256=data_file_sha256(cfg)).as_dict()


def _print_verdict(cfg: RunConfig, claim, console: Console) -> None:

    rows = [r for r in read_trials(cfg.results_dir) if r.get("experiment") == cfg.experiment]
    v = decide_on(claim, rows, cfg.hardware.name)
    console.print(f"claim {claim.id} (experiment {cfg.experiment}, seeds 0..{claim.trials - 1}): "
                  f"{v.verdict.value} -- {v.reason}")
