"""Rebuild ``data/wordnet_glosses/`` from the WordNet 3.0 database files.

The second embedded data set: real, human-written English definitions, a different register
from the standard library's docstrings, used by the confirmatory experiment
(``conf/experiment/smollm2_confirm.yaml``). WordNet installs offline as the Debian package
``wordnet-base`` (``apt-get install wordnet-base``, or ``apt-get download wordnet-base`` and
``dpkg-deb -x``); its database files are read directly, no WordNet library is needed.

Each record is ``{"prompt": 'What does the noun "bank" mean?\\n', "completion": <gloss>}`` for
the first (most frequent) sense of a lemma that is sense-tagged in WordNet's concordance
(``tagsense_cnt >= 1`` in ``index.<pos>``): the gloss as WordNet writes it, the definition then
its usage examples. 3,000 lemmas are kept, chosen by the sha256 of ``pos:lemma`` (no hand
selection), and written in that order.

    python scripts/build_wordnet.py [--wordnet /usr/share/wordnet] [--out data]
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

POS = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}
KEEP = 3000
MIN_WORDS = 4  # a definition shorter than this is a cross-reference, not prose


def first_senses(wordnet: Path, pos: str) -> list[tuple[str, str]]:
    """(lemma, offset of its most frequent synset) for every sense-tagged lemma of `pos`."""
    out = []
    for line in (wordnet / f"index.{pos}").read_text(encoding="utf-8").splitlines():
        if line.startswith("  "):  # the licence header
            continue
        fields = line.split()
        lemma, p_cnt = fields[0], int(fields[3])
        sense_cnt_at = 4 + p_cnt
        tagsense_cnt = int(fields[sense_cnt_at + 1])
        if tagsense_cnt >= 1 and lemma.isascii() and any(c.isalpha() for c in lemma):
            out.append((lemma, fields[sense_cnt_at + 2]))
    return out


def glosses(wordnet: Path, pos: str) -> dict[str, str]:
    """Synset offset -> gloss (definition and examples), from data.<pos>."""
    out = {}
    for line in (wordnet / f"data.{pos}").read_text(encoding="utf-8").splitlines():
        if line.startswith("  ") or " | " not in line:
            continue
        offset, gloss = line.split(" ", 1)[0], line.split(" | ", 1)[1].strip()
        out[offset] = gloss
    return out


def records(wordnet: Path) -> list[dict[str, str]]:
    candidates = []
    for pos, name in POS.items():
        by_offset = glosses(wordnet, pos)
        for lemma, offset in first_senses(wordnet, pos):
            gloss = by_offset[offset]
            definition = gloss.split('; "', 1)[0]
            if len(definition.split()) < MIN_WORDS:
                continue
            word = lemma.replace("_", " ")
            key = hashlib.sha256(f"{pos}:{lemma}".encode()).hexdigest()
            candidates.append((key, {"prompt": f'What does the {name} "{word}" mean?\n',
                                     "completion": gloss}))
    candidates.sort(key=lambda kv: kv[0])
    return [rec for _, rec in candidates[:KEEP]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wordnet", type=Path, default=Path("/usr/share/wordnet"))
    parser.add_argument("--out", type=Path, default=Path("data"))
    args = parser.parse_args()
    recs = records(args.wordnet)
    out = args.out / "wordnet_glosses"
    out.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
                   + "\n" for r in recs)
    (out / "train.jsonl").write_text(text, encoding="utf-8")
    data = text.encode()
    by_pos = {name: sum(f" {name} " in r["prompt"] for r in recs) for name in POS.values()}
    (out / "README.md").write_text(f"""# wordnet_glosses

Real, human-written English definitions from WordNet 3.0 (Princeton University), as
`{{"prompt", "completion"}}` pairs (JSONL, keys sorted), e.g.

```
{text.splitlines()[0]}
```

* **{len(recs)} examples** in `train.jsonl` ({len(text)} characters, {len(data)} bytes):
  {", ".join(f"{n} {k}s" for k, n in by_pos.items())}.
* Source: the database files of the Debian package `wordnet-base` (WordNet 3.0), read by
  `scripts/build_wordnet.py`.
* Selection: the first (most frequent) sense of every lemma that is sense-tagged in WordNet's
  concordance, with a definition of at least {MIN_WORDS} words; {KEEP} of them by the sha256 of
  `pos:lemma`, in that order. The completion is the gloss as WordNet writes it: the
  definition, then its usage examples in quotes.
* Prompts: `What does the <part of speech> "<word>" mean?` and a newline.
* sha256 of `train.jsonl`: `{hashlib.sha256(data).hexdigest()}`.
* Licence: WordNet 3.0 licence, see `LICENSE.md`.
""", encoding="utf-8")
    print(f"wrote {out / 'train.jsonl'}: {len(recs)} records")


if __name__ == "__main__":
    main()
