"""The measured arm `family_geometry`: is weight space flat and activation space curved, in two
model families? (claim weight_euclidean_activation_curved; docs/derivations.md, "Weight space
Euclidean, activation space curved").

For each of two models (the run's `model` and `task.other_model`, a Hugging Face directory, GGUF
file or hub id of another architecture) it takes two point clouds in the same space R^hidden at
the middle decoder block m = ceil(L / 2):

- weights: `task.points` rows (seeded draw) of the block's linear maps that read the residual
  stream (every nn.Linear of the block whose input width is the hidden size);
- activations: `task.points` token states at block m's output, on the held-out split of the
  configured data (the sampling of task=dimension_profile, all tokens but the first).

and measures each cloud's geodesic excess (`geodesic_excess`): the median over point pairs of
d_graph / d_euclid - 1, with d_graph the shortest path in the symmetrised k-nearest-neighbour
graph (k = `task.neighbours`, Isomap's geodesic estimate; Tenenbaum, de Silva & Langford 2000).
The raw excess also grows with the number of dimensions a cloud spreads over, so each cloud is
measured against a flat null, a Gaussian sample with its own mean and covariance
(`curvature_excess`): about 0 for a flat cloud, larger for a curved or folded one. The row records, per model, both excesses and
their gap (activations minus weights), and `min_gap`, the smaller gap of the two families.

Without a second model the trial cannot run here: it raises ModelError and task=claims records
it as SKIPPED with that reason. A second model that does not load, or one of the same model
type, is a configuration error (one line, nothing written).
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from rich.console import Console
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import shortest_path

from runner.config.schema import Architecture, ModelConfig, ModelSource, RunConfig
from runner.errors import ConfigError, ModelError, UserError
from runner.hardware import setup_hardware
from runner.ledger import stable_hash, utc_now, write_trial
from runner.models.loading import LoadedModel, block_linears, load_model
from runner.tasks.dimension_profile import (
    data_file_sha256,
    held_out_examples,
    residual_states,
    sample_positions,
)
from runner.trial import ClaimTag, Provenance, TrialRow, config_hash

MAX_PAIRS = 20_000  # point pairs the median reads (seeded draw; its sampling error ~ 1/sqrt)


def family_geometry_hash(cfg: RunConfig) -> str:
    """The config hash of one trial: the run's config and the measurement's options."""
    return stable_hash({"config": config_hash(cfg), "family_geometry": _options(cfg)})


def family_geometry_trial(cfg: RunConfig, claim: ClaimTag, provenance: Provenance) -> None:
    """Measure both models and write the trial's row (runner.tasks.measured)."""
    progress = Console(stderr=True)
    started, wall_start = utc_now(), time.perf_counter()
    _check_options(cfg)
    hw = setup_hardware(cfg.hardware, backends=("torch",), task="family_geometry")

    # 1. The two models; a second family must be given, and must be another architecture.
    first = load_model(cfg.model, dtype=hw.dtype, device=hw.torch_device)
    other = other_model_config(cfg)  # unset: ModelError, a SKIPPED trial
    try:
        second = load_model(other, dtype=hw.dtype, device=hw.torch_device)
    except ModelError as err:  # a given path that does not load is a mistake, not "absent"
        raise ConfigError(f"task.other_model: {err}") from None
    if second.model_type == first.model_type:
        raise ConfigError(f"task.other_model={cfg.task.other_model}: model type "
                         f"{second.model_type}, the same family as model={cfg.model.id}; "
                         "the claim needs two families")

    # 2. Both clouds of each model, and their geodesic excess.
    measured = [measure_model(cfg, loaded, hw.torch_device, progress)
                for loaded in (first, second)]
    summary = {"models": measured, "min_gap": min(m["gap"] for m in measured)}
    for m in measured:
        progress.print(f"{m['model_id']} ({m['model_type']}) block {m['layer']}: geodesic "
                       f"excess weights {m['weight_excess']:.3f}, activations "
                       f"{m['activation_excess']:.3f}")

    # 3. The trial row.
    metrics = {"wall_seconds": time.perf_counter() - wall_start, **_options(cfg),
               "family_geometry": summary}
    row = TrialRow.measured(cfg, hw, provenance, arm="family_geometry",
                            chash=family_geometry_hash(cfg), started=started, loaded=first,
                            claim=claim, metrics=metrics, data_sha256=data_file_sha256(cfg))
    write_trial(cfg.results_dir, row.as_dict())


def other_model_config(cfg: RunConfig) -> ModelConfig:
    """`task.other_model` as a model=hf config; ModelError (a SKIPPED trial) when unset."""
    if not cfg.task.other_model:
        raise ModelError("no second model family: the claim compares two (give "
                         "task.other_model=/path/to/model of another architecture than "
                         f"model={cfg.model.id}; only one family is embedded)")
    return ModelConfig(id="hf", source=ModelSource.pretrained, architecture=Architecture.auto,
                       path=cfg.task.other_model)


def measure_model(cfg: RunConfig, loaded: LoadedModel, device: str, progress: Console) -> dict:
    """Weight rows and token states at the middle block, and the geodesic excess of each."""
    rng = np.random.default_rng([cfg.seed, 2])
    n_blocks = loaded.model.config.num_hidden_layers
    layer = math.ceil(n_blocks / 2)  # 1-based: the output of block `layer`
    weights = weight_rows(loaded.model, layer, cfg.task.points, rng)
    examples = held_out_examples(cfg, loaded.tokenizer)
    positions = sample_positions(examples, cfg.task.points, cfg.task.pooling, rng)
    states = residual_states(loaded.model, examples, positions,
                             loaded.tokenizer.pad_token_id or 0, device, progress)[layer]
    w = curvature_excess(weights, cfg.task.neighbours, rng)
    a = curvature_excess(states, cfg.task.neighbours, rng)
    return {"model_id": loaded.model_id, "model_type": loaded.model_type,
            "model_sha256": loaded.sha256, "layer": layer, "weight_points": len(weights),
            "activation_points": len(states), "weight_excess": w, "activation_excess": a,
            "gap": a - w}


def weight_rows(model, layer: int, points: int, rng: np.random.Generator) -> np.ndarray:
    """(min(points, rows), hidden) float64: rows of block `layer`'s linear maps that read the
    residual stream (input width = hidden size), a seeded draw without replacement."""
    hidden = model.config.hidden_size
    linears = block_linears(model)
    index = str(layer - 1)  # block_linears names blocks 0-based: "...layers.<i>.<module>"
    rows = [m.weight.detach().double().cpu() for name, m in linears.items()
            if f".{index}." in f".{name}." and m.weight.shape[1] == hidden]
    if not rows:
        raise UserError(f"model type {model.config.model_type}: block {layer} has no linear "
                        f"map reading the {hidden}-wide residual stream")
    stacked = torch.cat(rows).numpy()
    chosen = rng.choice(len(stacked), size=min(points, len(stacked)), replace=False)
    return stacked[np.sort(chosen)]


def curvature_excess(x: np.ndarray, k: int, rng: np.random.Generator) -> float:
    """The cloud's geodesic excess above that of a flat cloud like it: a Gaussian sample with
    the same size, mean and covariance (so the same spread over dimensions).

    The kNN-graph excess grows with the number of dimensions a cloud spreads over even when it
    is flat (a flat Gaussian of intrinsic dimension 20 in R^576, 1000 points, k = 10, gives
    about 0.8), so alone it would rank a high-dimensional flat cloud as "curved"; subtracting
    this null leaves what curvature adds. A flat cloud gives about 0, a curved one more."""
    centred = np.asarray(x, dtype=np.float64) - np.mean(x, axis=0)
    n = len(centred)
    flat = rng.standard_normal((n, n)) @ centred / math.sqrt(max(n - 1, 1))  # cov = sample cov
    return geodesic_excess(x, k, rng) - geodesic_excess(flat, k, rng)


def geodesic_excess(x: np.ndarray, k: int, rng: np.random.Generator) -> float:
    """median over point pairs of d_graph / d_euclid - 1 on the symmetrised kNN graph.

    **Source**: Isomap's geodesic distance estimate (Tenenbaum, de Silva & Langford 2000,
    Science 290:2319): shortest paths through the k-nearest-neighbour graph with Euclidean edge
    lengths. The ratio is >= 1 for every connected pair (a path is never shorter than the
    chord), so the excess is >= 0; it is invariant to rotation, translation and scale of the
    cloud. Pairs in different components of the graph are left out; coinciding points are kept
    once. At most MAX_PAIRS pairs (seeded draw) enter the median.
    """
    x = np.unique(np.asarray(x, dtype=np.float64), axis=0)
    n = len(x)
    if n <= k:
        raise UserError(f"{n} distinct points: need more than task.neighbours={k}")
    sq = np.sum(x * x, axis=1)
    d = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * (x @ x.T), 0.0))  # (n, n)
    np.fill_diagonal(d, np.inf)
    nearest = np.argpartition(d, k, axis=1)[:, :k]  # (n, k)
    rows = np.repeat(np.arange(n), k)
    graph = csr_matrix((d[rows, nearest.ravel()], (rows, nearest.ravel())), shape=(n, n))
    geo = shortest_path(graph, method="D", directed=False)  # (n, n), inf across components
    i, j = np.triu_indices(n, 1)
    if len(i) > MAX_PAIRS:
        pick = rng.choice(len(i), size=MAX_PAIRS, replace=False)
        i, j = i[pick], j[pick]
    ratio = geo[i, j] / d[i, j]
    ratio = ratio[np.isfinite(ratio)]
    if ratio.size == 0:
        raise UserError(f"the {k}-nearest-neighbour graph connects no pair of points")
    return float(np.median(ratio) - 1.0)


def _options(cfg: RunConfig) -> dict:
    return {"points": cfg.task.points, "pooling": cfg.task.pooling.value,
            "neighbours": cfg.task.neighbours,
            "other_model": cfg.task.other_model, "max_pairs": MAX_PAIRS}


def _check_options(cfg: RunConfig) -> None:
    if cfg.task.neighbours < 2:
        raise UserError(f"task.neighbours={cfg.task.neighbours}: need at least 2")
