"""JSONL training data: three record shapes, answer-only loss masks, a content-hash split.

One record per line, blank lines skipped, shapes may be mixed in one file; other keys in a
record are ignored:

* ``{"text": str}`` -- plain text, loss on every token (then EOS).
* ``{"prompt": str, "completion": str}`` -- ``prompt`` and ``completion`` are joined verbatim
  (no separator is added: end the prompt with one) and EOS follows; loss only on the
  completion and EOS.
* ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`` -- rendered
  with the tokenizer's chat template; loss only on the assistant turns' content and the
  template's end-of-turn EOS token (not on role headers, nor on text after that EOS).

A record longer than ``max_seq_len`` tokens is cut to its first ``max_seq_len`` tokens, and the
cut is reported (`DatasetSplits.truncated_records`, one line at load, recorded on the trial).
A cut record keeps no EOS: the EOS marks where a text really ends, and an EOS placed at the cut
would teach the model to stop mid-sentence; its loss simply stops at the cut. A record whose
prompt alone fills the window has nothing left to train on and is refused.

Labels are aligned with ``input_ids`` (the model shifts them, as transformers does) and are
-100 where masked. ``labels[0]`` is always -100: nothing predicts the first token, so the count
of unmasked labels is exactly the number of loss terms (``Batch.n_tokens``).

The held-out split is a pure function of each record's content: sha256 of its canonical JSON
(sorted keys, no whitespace, UTF-8) read as a fraction in [0, 1); the record is validation
when that fraction is below ``val_fraction``. It does not depend on the file's line order, on
other records, or on the seed.

Every problem with the data raises `DataError` whose one-line message starts with
``path:line:`` (or ``path:`` for file-level problems), e.g.
``data/x.jsonl:17: missing field 'completion'``.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from runner.errors import UserError

IGNORE_INDEX = -100
CHAT_ROLES = ("system", "user", "assistant")
SHAPES = ('{"text"}', '{"prompt","completion"}', '{"messages":[...]}')


class DataError(UserError, ValueError):
    """A problem with a data file; the message names the file and line: ``path:17: problem``."""


@dataclass(frozen=True)
class Example:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]  # IGNORE_INDEX (-100) where masked
    truncated: bool = field(default=False, compare=False)  # cut to max_seq_len (no EOS kept)

    @property
    def n_tokens(self) -> int:
        """Number of tokens that carry loss."""
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


@dataclass(frozen=True)
class DatasetSplits:
    train: tuple[Example, ...]
    val: tuple[Example, ...]
    retention: tuple[Example, ...]
    sha256: str  # of the raw bytes of the data file
    retention_sha256: str | None = None  # of the raw bytes of the retention file, if any
    replayed: int = 0  # the last `replayed` training examples are replayed retention examples

    @property
    def own_train(self) -> tuple[Example, ...]:
        """The training examples of the data file (without the replayed ones)."""
        return self.train[: len(self.train) - self.replayed]

    @property
    def truncated_records(self) -> int:
        """Records of the data file (train and validation) cut to max_seq_len."""
        return sum(e.truncated for e in self.own_train + self.val)

    @property
    def truncated_share(self) -> float:
        return self.truncated_records / max(len(self.own_train) + len(self.val), 1)

    def truncation_line(self, path: str | Path, max_seq_len: int) -> str | None:
        """One line reporting the records cut to max_seq_len, or None when none was."""
        cut_retention = sum(e.truncated for e in self.retention)
        if not self.truncated_records and not cut_retention:
            return None
        line = (f"{path}: {self.truncated_records} of {len(self.train) + len(self.val)} records "
                f"({self.truncated_share:.1%}) are longer than max_seq_len={max_seq_len} tokens "
                "and were cut (no EOS at the cut; loss stops there)")
        if cut_retention:
            line += f"; retention: {cut_retention} of {len(self.retention)} cut"
        return line


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # (B, T) long, right-padded with pad_id
    labels: torch.Tensor  # (B, T) long, -100 on padding and masked positions
    attention_mask: torch.Tensor  # (B, T) long, 1 on real tokens
    n_tokens: int  # unmasked label tokens in the batch


# ---------------------------------------------------------------------------------------------
# Reading and validation
# ---------------------------------------------------------------------------------------------


def _shape(rec: dict[str, Any], where: str) -> str:
    """Validate one record and return its shape: "text", "prompt_completion" or "chat"."""
    present = [k for k in ("text", "prompt", "completion", "messages") if k in rec]
    kinds = {("prompt_completion" if k in ("prompt", "completion") else
              "chat" if k == "messages" else "text") for k in present}
    if not kinds:
        keys = ", ".join(repr(k) for k in sorted(rec)) or "none"
        raise DataError(f"{where}: unknown record shape (keys: {keys}); expected one of "
                        + ", ".join(SHAPES))
    if len(kinds) > 1:
        raise DataError(f"{where}: ambiguous record with fields "
                        + ", ".join(repr(k) for k in present) + "; use exactly one shape")
    kind = kinds.pop()

    def need_str(key: str, nonempty: bool) -> None:
        if key not in rec:
            raise DataError(f"{where}: missing field {key!r}")
        if not isinstance(rec[key], str):
            raise DataError(f"{where}: field {key!r} must be a string, "
                            f"got {type(rec[key]).__name__}")
        if nonempty and not rec[key]:
            raise DataError(f"{where}: field {key!r} is empty")

    if kind == "text":
        need_str("text", True)
    elif kind == "prompt_completion":
        need_str("prompt", False)
        need_str("completion", True)
    else:
        msgs = rec["messages"]
        if not isinstance(msgs, list):
            raise DataError(f"{where}: field 'messages' must be a list, got {type(msgs).__name__}")
        if not msgs:
            raise DataError(f"{where}: field 'messages' is empty")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict):
                raise DataError(f"{where}: messages[{i}] must be an object, got {type(m).__name__}")
            for key in ("role", "content"):
                if key not in m:
                    raise DataError(f"{where}: messages[{i}] missing field {key!r}")
                if not isinstance(m[key], str):
                    raise DataError(f"{where}: messages[{i}].{key} must be a string, "
                                    f"got {type(m[key]).__name__}")
            if m["role"] not in CHAT_ROLES:
                raise DataError(f"{where}: messages[{i}] has unknown role {m['role']!r} "
                                f"(expected one of {', '.join(CHAT_ROLES)})")
            if m["role"] == "system" and i != 0:
                raise DataError(f"{where}: messages[{i}] is a system message; only the first "
                                "message may be one")
        first = 1 if msgs[0]["role"] == "system" else 0
        if first >= len(msgs) or msgs[first]["role"] != "user":
            raise DataError(f"{where}: messages[{first}] must be a user message (a chat starts "
                            "with an optional system message, then a user message)")
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"{where}: chat has no assistant turn (nothing to train on)")
    return kind


def _read(path: str | Path) -> tuple[bytes, list[tuple[int, dict]]]:
    path = str(path)
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not a JSONL file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    records: list[tuple[int, dict]] = []
    for n, line_bytes in enumerate(raw.split(b"\n"), start=1):
        try:
            line = line_bytes.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{n}: not valid UTF-8 (byte {e.start + 1})") from None
        if n == 1:
            line = line.removeprefix("\ufeff")
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: invalid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(rec, dict):
            raise DataError(f"{path}:{n}: record must be a JSON object, got {_json_type(rec)}")
        _shape(rec, f"{path}:{n}")
        records.append((n, rec))
    if not records:
        raise DataError(f"{path}: empty file (no records)")
    return raw, records


def _json_type(v: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """Parse and validate a JSONL data file: ``[(line_no, record), ...]`` in file order."""
    return _read(path)[1]


def record_shape(record: dict) -> str:
    """"text", "prompt_completion" or "chat" for a valid record (raises DataError otherwise)."""
    return _shape(record, "<record>")


def canonical_json(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def split_fraction(record: dict) -> float:
    """The record's position in [0, 1) from the sha256 of its canonical JSON."""
    digest = hashlib.sha256(canonical_json(record).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def is_val(record: dict, val_fraction: float) -> bool:
    return split_fraction(record) < val_fraction


# ---------------------------------------------------------------------------------------------
# Tokenization and masks
# ---------------------------------------------------------------------------------------------


def _encode(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))


def _render(tokenizer, messages, add_generation_prompt: bool, where: str) -> str:
    try:
        text = tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as e:  # no template, or the template rejects the messages
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{where}: cannot apply the tokenizer's chat template: {msg}") from None
    if not isinstance(text, str):
        raise DataError(f"{where}: the tokenizer's chat template did not return text")
    return text


def _chat_segments(tokenizer, msgs: list[dict], where: str) -> list[tuple[str, bool]]:
    """Split the rendered chat into (text, trainable) pieces by rendering growing prefixes."""
    segments: list[tuple[str, bool]] = []
    prev = ""
    for i, m in enumerate(msgs):
        full = _render(tokenizer, msgs[: i + 1], False, where)
        if m["role"] == "assistant":
            header = _render(tokenizer, msgs[:i], True, where)
            if not (header.startswith(prev) and full.startswith(header)):
                raise DataError(f"{where}: the chat template is not prefix-stable at messages[{i}]; "
                                "cannot locate the assistant turn")
            segments.append((header[len(prev):], False))
            segments.append((full[len(header):], True))
        else:
            if not full.startswith(prev):
                raise DataError(f"{where}: the chat template is not prefix-stable at messages[{i}]; "
                                "cannot locate the assistant turns")
            segments.append((full[len(prev):], False))
        prev = full
    return segments


def encode_record(record: dict, tokenizer, *, max_seq_len: int, where: str = "<record>") -> Example:
    """Tokenize one validated record into an Example (truncated to max_seq_len tokens)."""
    kind = _shape(record, where)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError(f"{where}: the tokenizer has no EOS token")
    ids: list[int] = []
    train: list[bool] = []
    if kind == "text":
        ids = _encode(tokenizer, record["text"], True)
        if not ids or ids[-1] != eos:
            ids.append(eos)
        train = [True] * len(ids)
    elif kind == "prompt_completion":
        p = _encode(tokenizer, record["prompt"], True)
        c = _encode(tokenizer, record["completion"], False)
        if not c or c[-1] != eos:
            c.append(eos)
        ids, train = p + c, [False] * len(p) + [True] * len(c)
    else:
        for text, trainable in _chat_segments(tokenizer, record["messages"], where):
            seg = _encode(tokenizer, text, False)
            mask = [trainable] * len(seg)
            if trainable and eos in seg:  # nothing after the end-of-turn token carries loss
                last = len(seg) - 1 - seg[::-1].index(eos)
                mask = [j <= last for j in range(len(seg))]
            ids += seg
            train += mask
    truncated = len(ids) > max_seq_len
    ids, train = ids[:max_seq_len], train[:max_seq_len]
    labels = [t if keep and j > 0 else IGNORE_INDEX for j, (t, keep) in enumerate(zip(ids, train, strict=False))]
    if all(x == IGNORE_INDEX for x in labels):
        raise DataError(f"{where}: every label is masked after truncation to max_seq_len="
                        f"{max_seq_len} ({len(ids)} tokens, none to train on)")
    return Example(input_ids=tuple(ids), labels=tuple(labels), truncated=truncated)


# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------


def load_examples(path: str | Path, tokenizer, *, max_seq_len: int) -> tuple[tuple[Example, ...], str]:
    """Every record of a file as Examples (file order) and the sha256 of the file's bytes."""
    raw, records = _read(path)
    exs = tuple(encode_record(r, tokenizer, max_seq_len=max_seq_len, where=f"{path}:{n}")
                for n, r in records)
    return exs, hashlib.sha256(raw).hexdigest()


def load_splits(
    path: str | Path,
    tokenizer,
    *,
    max_seq_len: int,
    val_fraction: float,
    retention_path: str | Path | None,
    max_examples: int | None = None,
    replay_fraction: float | None = None,
) -> DatasetSplits:
    """Read, validate and tokenize a data file; split train/val by content hash.

    ``max_examples`` keeps only the first that many records of the data file (file order)
    before the split. The retention file (any shape) is read whole, unless ``replay_fraction``
    is set: then it is split in two by content hash (`replay_split`), one half evaluated as the
    retention set and the other replayed in training, as ``replay_fraction`` of the training
    examples.
    """
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be >= 2, got {max_seq_len}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples must be >= 1, got {max_examples}")
    raw, records = _read(path)
    if max_examples is not None:
        records = records[:max_examples]
    train: list[Example] = []
    val: list[Example] = []
    for n, rec in records:
        ex = encode_record(rec, tokenizer, max_seq_len=max_seq_len, where=f"{path}:{n}")
        (val if is_val(rec, val_fraction) else train).append(ex)
    if not train:
        raise DataError(f"{path}: no training examples left after holding out "
                        f"val_fraction={val_fraction} of {len(records)} records")
    retention: tuple[Example, ...] = ()
    retention_sha = None
    replay: tuple[Example, ...] = ()
    if replay_fraction is not None:
        retention, replay, retention_sha = replay_split(
            path, retention_path, tokenizer, max_seq_len, replay_fraction, len(train))
    elif retention_path is not None:
        retention, retention_sha = load_examples(retention_path, tokenizer, max_seq_len=max_seq_len)
    return DatasetSplits(train=tuple(train) + replay, val=tuple(val), retention=retention,
                         sha256=hashlib.sha256(raw).hexdigest(), retention_sha256=retention_sha,
                         replayed=len(replay))


REPLAY_HELD_OUT = 0.5  # share of the retention records kept out of replay (evaluated)


def replay_count(replay_fraction: float, n_train: int) -> int:
    """Replayed examples that make up `replay_fraction` of n_train + replayed."""
    return round(replay_fraction * n_train / (1.0 - replay_fraction))


def replay_split(path, retention_path, tokenizer, max_seq_len: int, replay_fraction: float,
                 n_train: int) -> tuple[tuple[Example, ...], tuple[Example, ...], str]:
    """(evaluated retention, replayed, sha256 of the retention file).

    A retention record is evaluated when its content-hash fraction (`split_fraction`) is below
    REPLAY_HELD_OUT, else it may be replayed, so the retention loss is always measured on
    records training never saw. The replayed examples are the first `replay_count` of the
    replay half in file order (deterministic, seed-free).
    """
    if not 0.0 < replay_fraction < 1.0:
        raise DataError(f"{path}: data.replay_fraction must be in (0, 1), got {replay_fraction}")
    if retention_path is None:
        raise DataError(f"{path}: data.replay_fraction needs data.retention_path (the records "
                        "to replay)")
    raw, records = _read(retention_path)
    held, pool = [], []
    for n, rec in records:
        ex = encode_record(rec, tokenizer, max_seq_len=max_seq_len, where=f"{retention_path}:{n}")
        (held if is_val(rec, REPLAY_HELD_OUT) else pool).append(ex)
    need = replay_count(replay_fraction, n_train)
    if need > len(pool):
        raise DataError(f"{retention_path}: data.replay_fraction={replay_fraction} needs {need} "
                        f"replayed records; the replay half has {len(pool)}")
    return tuple(held), tuple(pool[:need]), hashlib.sha256(raw).hexdigest()


# ---------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------


def epoch_order(n: int, *, seed: int, epoch: int) -> list[int]:
    """A permutation of range(n) that depends only on (n, seed, epoch)."""
    key = hashlib.sha256(f"modelcypher-batches:{seed}:{epoch}".encode()).digest()
    order = list(range(n))
    random.Random(int.from_bytes(key[:8], "big")).shuffle(order)
    return order


def collate(examples: Sequence[Example], *, pad_id: int) -> Batch:
    """Right-pad to the longest example: pad_id / -100 / attention 0 on padding."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        labels[i, :n] = torch.tensor(e.labels, dtype=torch.long)
        mask[i, :n] = 1
    return Batch(input_ids=ids, labels=labels, attention_mask=mask,
                 n_tokens=int((labels != IGNORE_INDEX).sum()))


def batches(
    examples: Sequence[Example],
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    pad_id: int,
    shuffle: bool = True,
    drop_last: bool = False,
    skip: int = 0,
) -> Iterator[Batch]:
    """Batches over ``examples``, shuffled by (seed, epoch) unless ``shuffle=False``; the first
    ``skip`` batches of the epoch are not built (a resumed run has already trained on them)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = epoch_order(len(examples), seed=seed, epoch=epoch) if shuffle else range(len(examples))
    order = list(order)
    for start in range(skip * batch_size, len(order), batch_size):
        idx = order[start : start + batch_size]
        if drop_last and len(idx) < batch_size:
            return
        yield collate([examples[i] for i in idx], pad_id=pad_id)
