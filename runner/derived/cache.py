"""The derived set-up's seed-independent steps, kept on disk and shared by every later run.

The weights' per-matrix geometry (rows 2, 4, 10-14), the residual scales (row 15), the
adapters' starting frames and the noise probe (row 8, its masks from a seed of its own) depend
on the weights, the data and the run's options, never on its seed; the seeds of one experiment
compute them once. An entry lives under
``<runs_dir>/cache/derived/<key>/``: ``records.json`` (the values, with what they were computed
from) and, for tensors, ``tensors.safetensors`` (read back with the strides they had). The key is the sha256 of everything the values
depend on: this format's version, the source of the code that computes them, the library
versions, the machine (CPU model, BLAS, GPU), torch's thread count, the backend, device and
dtype, the model's config and the bytes of every weight tensor, and the step's own inputs. A
change to any of them is another key, so an entry is never read for inputs it was not computed
from. Entries are written whole (a temporary folder, then one rename) and read back bit for bit;
an entry that does not read back as written is reported in one warning line and recomputed.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from runner.hardware import cpu_facts

CACHE_VERSION = 1
CACHE_DIR = Path("cache") / "derived"
RECORDS, TENSORS = "records.json", "tensors.safetensors"
# The source whose change can change a cached value: the derivations, the frames, the backends'
# forward passes (residual scales) and this file.
CODE_PACKAGES = ("geometry", "runner/derived", "runner/models")
LIBRARIES = ("torch", "numpy", "scipy", "transformers", "safetensors", "jax", "jaxlib", "mlx")
LOG = logging.getLogger("runner.derived.cache")


@dataclass(frozen=True)
class CacheEntry:
    records: Any  # the step's JSON values
    tensors: dict[str, torch.Tensor]  # empty for a step without tensors


class SetupCache:
    """The cache of one set-up: ``lookup`` and ``store`` a step's values by its inputs.

    ``identity`` returns what every step depends on (the model, the machine, the options); it is
    called once, at the first lookup, so hashing the weights counts as set-up time.
    ``random_forward``: the model's own forward draws random numbers, so what it measures
    depends on the seed and is not cached. ``outcomes`` records each step looked up: "hit" or
    "miss"."""

    def __init__(self, root: str | Path, identity: Callable[[], dict],
                 random_forward: bool = False):
        self.root = Path(root)
        self.random_forward = random_forward
        self._identity = identity
        self._fingerprint: str | None = None
        self.outcomes: dict[str, str] = {}

    @classmethod
    def for_run(cls, runs_dir: str | Path, model, *, backend: str, device: str,
                dtype: str) -> SetupCache:
        """The cache under ``<runs_dir>/cache/derived`` for a set-up on ``model`` (the torch
        model; the MLX and JAX backends copy their weights from it)."""
        return cls(Path(runs_dir) / CACHE_DIR,
                   lambda: run_identity(model, backend=backend, device=device, dtype=dtype),
                   random_forward=backend == "torch" and random_forward(model))

    @property
    def summary(self) -> str:
        """"hit" when every step looked up was found, "miss" when none was, else "partial"."""
        found = set(self.outcomes.values())
        return found.pop() if len(found) == 1 else "partial" if found else "miss"

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = digest_json(self._identity())
        return self._fingerprint

    def key(self, step: str, inputs: dict) -> str:
        return digest_json({"identity": self.fingerprint(), "step": step, "inputs": inputs})

    def lookup(self, step: str, inputs: dict, parse: Callable[[CacheEntry], Any]) -> Any:
        """``parse(entry)`` of the entry stored for ``step`` at ``inputs``, or None: none yet,
        or one that does not read or parse (then one warning line says why)."""
        folder = self.root / self.key(step, inputs)
        value = None
        if folder.exists():
            try:
                value = parse(read_entry(folder, step, inputs))
            except (OSError, ValueError, KeyError, TypeError, IndexError, RuntimeError) as err:
                LOG.warning("ignoring the derived set-up cache entry %s (%s: %s); recomputing",
                            folder, type(err).__name__, err)
                value = None
        self.outcomes[step] = "hit" if value is not None else "miss"
        return value

    def store(self, step: str, inputs: dict, records: Any,
              tensors: dict[str, torch.Tensor] | None = None) -> None:
        """Write the entry whole (a temporary folder renamed into place); a store that fails
        (a full disk, a read-only runs folder) costs the next run a recomputation, nothing
        else."""
        folder = self.root / self.key(step, inputs)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name[:16]}-", dir=self.root))
        except OSError as err:
            LOG.warning("not caching the derived set-up's %s (%s)", step, err)
            return
        try:
            write_entry(tmp, step, inputs, records, tensors or {})
            _rename_into_place(tmp, folder)
        except OSError as err:
            LOG.warning("not caching the derived set-up's %s (%s)", step, err)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _rename_into_place(tmp: Path, folder: Path) -> None:
    """Rename ``tmp`` to ``folder``; an entry already there (another run of the same inputs
    stored it first, or an unreadable one) is replaced."""
    try:
        os.rename(tmp, folder)
    except OSError:
        shutil.rmtree(folder, ignore_errors=True)
        os.rename(tmp, folder)


def write_entry(folder: Path, step: str, inputs: dict, records: Any,
                tensors: dict[str, torch.Tensor]) -> None:
    meta = {"format": CACHE_VERSION, "step": step, "inputs": inputs, "records": records}
    if tensors:
        path = folder / TENSORS
        save_file({k: t.detach().cpu().contiguous() for k, t in tensors.items()}, str(path))
        meta["tensors_sha256"] = file_sha256(path)
        meta["tensor_strides"] = {k: list(t.stride()) for k, t in tensors.items()}
    (folder / RECORDS).write_text(json.dumps(meta, sort_keys=True))


def read_entry(folder: Path, step: str, inputs: dict) -> CacheEntry:
    """The entry in ``folder``; ValueError when it is not the entry of (step, inputs) in this
    format, or its tensors are not the bytes that were written."""
    meta = json.loads((folder / RECORDS).read_text())
    if (meta.get("format"), meta.get("step"), meta.get("inputs")) != (CACHE_VERSION, step,
                                                                       inputs):
        raise ValueError("its format, step or inputs differ from the key's")
    tensors: dict[str, torch.Tensor] = {}
    if "tensors_sha256" in meta:
        path = folder / TENSORS
        if file_sha256(path) != meta["tensors_sha256"]:
            raise ValueError(f"{TENSORS} is not the file that was written")
        # fresh allocations, as computed tensors are, with the strides they were computed with:
        # a kernel may round differently on a view into the file's buffer at another alignment,
        # and torch picks a product's kernel by its operands' strides (a rank-1 frame is a
        # column of the QR's column-major Q, strides (1, m); a contiguous copy has (1, 1), and
        # with it the tail start's certificate, one short prompt at a time, summed in another
        # order than in a run that computed its frames)
        strides = meta["tensor_strides"]
        tensors = {k: torch.empty_strided(t.shape, tuple(strides[k]), dtype=t.dtype).copy_(t)
                   for k, t in load_file(str(path)).items()}
    return CacheEntry(meta["records"], tensors)


# -- what the values depend on -------------------------------------------------------------------


def run_identity(model, *, backend: str, device: str, dtype: str) -> dict:
    """Everything a cached value depends on besides the step's own inputs."""
    facts = cpu_facts()
    return {
        "format": CACHE_VERSION,
        "code": code_digest(),
        "libraries": {name: _version(name) for name in LIBRARIES},
        "machine": {"cpu_model": facts["cpu_model"], "blas": facts["blas"],
                    "gpu": _gpu_name(device)},
        "threads": torch.get_num_threads(),
        "backend": backend, "device": device, "dtype": dtype,
        "model_config": model.config.to_json_string(),
        "weights": weights_digest(model),
    }


def random_forward(model, training: bool | None = None) -> bool:
    """Whether the torch model's own forward draws random numbers: dropout (a module or a
    config probability) in training mode; ``training``: in that mode (default: the model's
    current one)."""
    if not (model.training if training is None else training):
        return False
    config = model.config.to_dict()
    return (any(k.endswith("dropout") and isinstance(v, float) and v > 0
                for k, v in config.items())
            or any(isinstance(getattr(m, "p", None), float) and m.p > 0
                   for m in model.modules() if "dropout" in type(m).__name__.lower()))


def weights_digest(model) -> str:
    """sha256 over every tensor of the model's state dict: its name, dtype, shape and bytes (a
    tensor tied to an earlier one, as lm_head to the embeddings, is recorded as that one)."""
    h = hashlib.sha256()
    seen: dict[tuple, str] = {}
    for name, t in model.state_dict().items():
        t = t.detach()
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
                 tuple(t.stride()), t.dtype)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if ident in seen:
            h.update(f"same as {seen[ident]}|".encode())
            continue
        seen[ident] = name
        flat = t.cpu().contiguous().reshape(-1)
        h.update(flat.view(torch.uint8).numpy().data if flat.numel() else b"")
    return h.hexdigest()


def code_digest() -> str:
    """sha256 of the source files of CODE_PACKAGES (path and bytes)."""
    root = Path(__file__).resolve().parents[2]
    h = hashlib.sha256()
    for package in CODE_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def tensor_digest(*tensors: torch.Tensor) -> str:
    """sha256 of the tensors' dtypes, shapes and bytes (e.g. a calibration batch)."""
    h = hashlib.sha256()
    for t in tensors:
        flat = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(flat.view(torch.uint8).numpy().data if flat.numel() else b"")
    return h.hexdigest()


def digest_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _gpu_name(device: str) -> str | None:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return None
