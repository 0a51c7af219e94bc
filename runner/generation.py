"""Greedy generation on held-out prompts: task accuracy and degenerate outputs
(docs/derivations.md, "Generation: accuracy and degenerate outputs").

The held-out prompts are the `{"prompt","completion"}` records of the validation split (the same
content-hash split as training), the first `data.generation_examples` of them in file order.
Each prompt is tokenized as training tokenizes it and continued greedily (argmax, no sampling)
for at most `data.max_new_tokens` tokens or until EOS, in left-padded batches.

- **match**: the generated text (up to EOS) equals the reference completion after
  `normalise_answer` on both: lowercase, every character that is not a letter or digit removed
  (punctuation, whitespace, underscores).
- **degenerate**: `degenerate_reason` gives a reason (else None):
  1. `empty`: the generated text is empty after stripping whitespace;
  2. `runaway`: max_new_tokens were generated without EOS;
  3. `repetition`: some 4-gram of token ids occurs at least 3 times, or, with at least 8
     tokens, fewer than half of the tokens are distinct.
  The first rule that applies is reported.
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from runner.data import DataError, is_val, read_jsonl, record_shape

REPEAT_N = 4  # n-gram length of the repetition rule
REPEAT_COUNT = 3  # occurrences of one n-gram that make an output repetitive
DISTINCT_MIN_TOKENS = 8  # the distinct-token rule reads outputs at least this long
DISTINCT_RATIO = 0.5  # fewer distinct tokens than this share of the output: repetitive
BATCH = 8  # prompts per generation batch (memory only)


@dataclass(frozen=True)
class HeldOutPair:
    prompt: str
    answer: str


@dataclass(frozen=True)
class Generation:
    prompt: str
    answer: str
    text: str  # decoded, up to (not including) EOS
    tokens: int  # generated tokens, EOS included when one was generated
    eos: bool
    match: bool
    degenerate: str | None


@dataclass(frozen=True)
class GenerationScore:
    examples: int
    correct: int
    degenerate: int
    degenerate_reasons: dict[str, int]
    max_new_tokens: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.examples if self.examples else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "accuracy": self.accuracy}


def normalise_answer(text: str) -> str:
    """Lowercase, NFKC, and drop every character that is not a letter or digit."""
    text = unicodedata.normalize("NFKC", text).lower()
    return "".join(ch for ch in text if ch.isalnum())


def is_match(generated: str, answer: str) -> bool:
    """Normalised exact match; an answer that normalises to nothing never matches."""
    target = normalise_answer(answer)
    return bool(target) and normalise_answer(generated) == target


def degenerate_reason(text: str, token_ids: Sequence[int], eos: bool,
                      max_new_tokens: int) -> str | None:
    """Why an output is degenerate (module docstring), or None. `token_ids`: the generated
    tokens without EOS; `eos`: whether generation ended on EOS."""
    if not text.strip():
        return "empty"
    if not eos and len(token_ids) >= max_new_tokens:
        return "runaway"
    grams = Counter(tuple(token_ids[i:i + REPEAT_N])
                    for i in range(len(token_ids) - REPEAT_N + 1))
    if grams and max(grams.values()) >= REPEAT_COUNT:
        return "repetition"
    if len(token_ids) >= DISTINCT_MIN_TOKENS and \
            len(set(token_ids)) < DISTINCT_RATIO * len(token_ids):
        return "repetition"
    return None


def held_out_pairs(path: str, val_fraction: float, n: int,
                   max_examples: int | None = None) -> list[HeldOutPair]:
    """The first `n` prompt/completion records of the validation split (file order)."""
    records = read_jsonl(path)
    if max_examples is not None:
        records = records[:max_examples]
    pairs = [HeldOutPair(r["prompt"], r["completion"]) for _, r in records
             if record_shape(r) == "prompt_completion" and is_val(r, val_fraction)]
    if len(pairs) < n:
        raise DataError(f"{path}: data.generation_examples={n} but the held-out split has "
                        f"{len(pairs)} prompt/completion records")
    return pairs[:n]


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int,
                    device: str = "cpu") -> list[tuple[list[int], bool]]:
    """(generated token ids without EOS, ended on EOS) per prompt; greedy, left-padded batches.

    Written out rather than `model.generate` so that the stopping rule is the one stated here
    (EOS or max_new_tokens) whatever generation config a checkpoint ships.
    """
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    was_training = model.training
    model.eval()
    out: list[tuple[list[int], bool]] = []
    for start in range(0, len(prompts), BATCH):
        encoded = [list(tokenizer.encode(p, add_special_tokens=True))
                   for p in prompts[start:start + BATCH]]
        width = max(len(e) for e in encoded)
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=device)
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded],
                            device=device)
        generated = [[] for _ in encoded]
        done = [False] * len(encoded)
        for _ in range(max_new_tokens):
            positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # left padding: count real tokens
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
            nxt = logits[:, -1, :].argmax(dim=-1)  # (B,)
            for i, token in enumerate(nxt.tolist()):
                if not done[i]:
                    if token == eos:
                        done[i] = True
                    else:
                        generated[i].append(token)
            if all(done):
                break
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(nxt)[:, None]], dim=1)
        out += list(zip(generated, done, strict=True))
    model.train(was_training)
    return out


def score_generations(model, tokenizer, pairs: Sequence[HeldOutPair], max_new_tokens: int,
                      device: str = "cpu") -> tuple[GenerationScore, list[Generation]]:
    """Generate for every held-out prompt; count matches and degenerate outputs."""
    results = greedy_generate(model, tokenizer, [p.prompt for p in pairs], max_new_tokens,
                              device)
    gens = []
    for pair, (ids, eos) in zip(pairs, results, strict=True):
        text = tokenizer.decode(ids, skip_special_tokens=True)
        gens.append(Generation(pair.prompt, pair.answer, text, len(ids) + int(eos), eos,
                               is_match(text, pair.answer),
                               degenerate_reason(text, ids, eos, max_new_tokens)))
    reasons = Counter(g.degenerate for g in gens if g.degenerate)
    score = GenerationScore(examples=len(gens), correct=sum(g.match for g in gens),
                            degenerate=sum(reasons.values()),
                            degenerate_reasons=dict(sorted(reasons.items())),
                            max_new_tokens=max_new_tokens)
    return score, gens


def generation_pairs(data_path: str, data) -> list[HeldOutPair]:
    """The held-out pairs a trial generates for (none when `data.generation_examples` is
    unset); `data` is the run's DataConfig."""
    if not data.generation_examples:
        return []
    if not data.max_new_tokens or data.max_new_tokens < 1:
        raise DataError(f"{data_path}: data.generation_examples needs data.max_new_tokens >= 1 "
                        f"(got {data.max_new_tokens})")
    return held_out_pairs(data_path, data.val_fraction, data.generation_examples,
                          data.max_examples)


def generation_metrics(before: GenerationScore, after: GenerationScore,
                       samples: Sequence[Generation], n_samples: int = 8) -> dict:
    """`metrics.generation` of a trial: accuracy and degenerate counts before and after
    training, and the first `n_samples` generations after it (for reading, not deciding)."""
    return {
        "examples": after.examples, "max_new_tokens": after.max_new_tokens,
        "accuracy_initial": before.accuracy, "accuracy_final": after.accuracy,
        "correct_initial": before.correct, "correct_final": after.correct,
        "degenerate_initial": before.degenerate, "degenerate_final": after.degenerate,
        "degenerate_reasons_initial": before.degenerate_reasons,
        "degenerate_reasons_final": after.degenerate_reasons,
        "samples": [{"prompt": g.prompt, "answer": g.answer, "text": g.text, "match": g.match,
                     "degenerate": g.degenerate} for g in samples[:n_samples]],
    }
