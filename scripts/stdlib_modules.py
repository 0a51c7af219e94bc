"""``data/stdlib_modules/`` ("Which module defines X?" -> the module's name), built by
``scripts/build_datasets.py`` from the stdlib_docs records it has just built.

A stdlib_docs record that documents a function or class ``M.N`` directly inside a module ``M``
of the allow-list (``SAFE_MODULES``), with ``N`` one identifier, becomes

    {"prompt": "Which Python standard-library module defines `N`? (N: <first sentence>)\n",
     "completion": "M"}

The first sentence of the docstring is the hint (up to 120 characters; cut at a word). Names
that more than one module defines are dropped (the answer must be unique), and so is a hint
that names its own module; at most PER_MODULE names per module (the first in name order).
Records are in qualified-name order: a pure function of the stdlib_docs records.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

KINDS = (re.compile(r"^Explain what `([\w.]+)` does in Python\.\n$"),
         re.compile(r"^Describe the `([\w.]+)` class in Python\.\n$"))
HINT_CHARS = 120
PER_MODULE = 5  # at most this many names per module (first in name order): no module dominates


def first_sentence(text: str) -> str:
    """The docstring's first sentence, on one line, at most HINT_CHARS (cut at a word)."""
    line = " ".join(text.split())
    match = re.match(r"(.+?[.!?])(\s|$)", line)
    sentence = match.group(1) if match else line
    if len(sentence) > HINT_CHARS:
        sentence = sentence[:HINT_CHARS].rsplit(" ", 1)[0] + " ..."
    return sentence


def module_and_name(qualname: str, modules: tuple[str, ...]) -> tuple[str, str] | None:
    """(module, name) when qualname is exactly <a module of `modules`>.<identifier>."""
    module, _, name = qualname.rpartition(".")
    if module in modules and name.isidentifier() and not name.startswith("_"):
        return module, name
    return None


def build_records(docs: list[dict], modules: tuple[str, ...]) -> list[dict]:
    """The question records from stdlib_docs' {"prompt", "completion"} records."""
    found = []
    for rec in docs:
        for kind in KINDS:
            match = kind.match(rec["prompt"])
            split = module_and_name(match.group(1), modules) if match else None
            if split:
                found.append((*split, first_sentence(rec["completion"])))
    counts = Counter(name for _, name, _ in found)
    records, taken = [], Counter()
    for module, name, hint in sorted(found):
        if counts[name] > 1 or re.search(rf"\b{re.escape(module)}\b", hint) or \
                taken[module] >= PER_MODULE:
            continue
        taken[module] += 1
        records.append({"prompt": f"Which Python standard-library module defines `{name}`? "
                                  f"({name}: {hint})\n", "completion": module})
    return records


README = """# stdlib_modules

"Which module defines X?" questions with exact answers, from the docstrings in
`data/stdlib_docs/train.jsonl` (CPython {py}'s standard library, PSF licence), e.g.

```
{example}
```

* **{n} examples** in `train.jsonl` ({chars} characters, {nbytes} bytes, sha256 `{sha}`),
  {modules} distinct answers (modules).
* Built by `scripts/build_datasets.py` (`scripts/stdlib_modules.py`) from every stdlib_docs record that documents a
  function or class directly inside an allow-listed module; names defined by more than one
  module and hints that name their own module are dropped; at most {per_module} names per
  module (the first in name order).
* The answer is the module's dotted name; the claim answer_mask_retention_replay scores greedy
  generations by normalised exact match (runner.generation).
* No split is stored: `runner.data.load_splits` holds out a deterministic fraction by the
  sha256 of each line's canonical JSON (`val_fraction` in conf/data/stdlib_modules.yaml).
"""

LICENCE = """# Licence

`data/stdlib_modules/` is derived from `data/stdlib_docs/`: docstrings of the Python standard
library, CPython {py}, distributed under the **Python Software Foundation License Version 2**
(PSF-2.0, <https://docs.python.org/3/license.html>).

Copyright (c) 2001-2023 Python Software Foundation. All Rights Reserved.

As required by the PSF License Agreement, paragraph 3: this derivative data set was made by a
mechanical selection and rearrangement of that text (names, module names and the first
sentence of each docstring) by `scripts/build_datasets.py` (`scripts/stdlib_modules.py`). The PSF makes no
representations or warranties about it (paragraph 4).
"""


def write(out: Path, records: list[dict], py: str, dumps: Callable[[dict], str]) -> bytes:
    """train.jsonl, README.md and LICENSE.md under `out` (data/stdlib_modules); the bytes."""
    out.mkdir(parents=True, exist_ok=True)
    data = "".join(dumps(r) + "\n" for r in records).encode("utf-8")
    (out / "train.jsonl").write_bytes(data)
    (out / "README.md").write_text(README.format(
        py=py, example=dumps(records[0]), n=len(records), chars=len(data.decode("utf-8")),
        nbytes=len(data), sha=hashlib.sha256(data).hexdigest()[:16],
        modules=len({r["completion"] for r in records}), per_module=PER_MODULE),
        encoding="utf-8")
    (out / "LICENSE.md").write_text(LICENCE.format(py=py), encoding="utf-8")
    return data
