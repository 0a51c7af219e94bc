"""`model=hf`: any Hugging Face causal LM by path, on tiny models saved locally with random
weights; every broken directory fails with one line and writes nothing; the derived trainer's
module selection follows the model's structure; the LFM2 experiments run through model.path."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch
from support import ROOT, compose_config
from torch import nn

from runner.app import main, precheck, run_job
from runner.config.load import to_run_config
from runner.derived import candidate_linears
from runner.derived.spec import block_of
from runner.errors import ConfigError, HardwareUnavailable, ModelError
from runner.models.loading import load_model, model_id_of

FAST = ["task=train", "budget.max_tokens=1500", "budget.eval_every=5", "budget.eval_examples=8",
        "data.max_examples=80", "hardware.threads=1",
        "verify_adapter=false"]
SHAPE = dict(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
             pad_token_id=0, bos_token_id=1, eos_token_id=2)


def tiny_config(model_type: str):
    import transformers as tf

    if model_type == "lfm2":
        return tf.Lfm2Config(**SHAPE, layer_types=["conv", "full_attention"])
    if model_type == "gpt2":  # its blocks hold Conv1D, not nn.Linear: nothing to adapt
        return tf.GPT2Config(vocab_size=320, n_embd=32, n_layer=2, n_head=4, bos_token_id=1,
                             eos_token_id=2)
    extra = {"head_dim": 8} if model_type.startswith("gemma") else {}
    return tf.AutoConfig.for_model(model_type, **SHAPE, **extra)


def save_tokenizer(path: Path) -> None:
    """A byte-level BPE trained on the embedded data, saved as the directory's tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    lines = (ROOT / "data/stdlib_docs/train.jsonl").read_text().splitlines()[:300]
    texts = [" ".join(map(str, json.loads(line).values())) for line in lines]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=SHAPE["vocab_size"], special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(path)


def save_tiny(path: Path, model_type: str, *, tokenizer: bool = True) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config(model_type)).save_pretrained(
        path, safe_serialization=True)
    if tokenizer:
        save_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {t: save_tiny(root / f"tiny-{t}", t) for t in ("llama", "qwen2", "lfm2", "mistral")}


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch) -> dict[str, Path]:
    """Ledger, runs and model cache under tmp_path, so a test can prove nothing was written."""
    paths = {k: tmp_path / k for k in ("results", "runs", "cache", "hydra")}
    monkeypatch.setenv("MODELCYPHER_CACHE", str(paths["cache"]))
    return paths


def _ledger(isolated: dict[str, Path]) -> list[str]:
    return [f"results_dir={isolated['results']}", f"runs_dir={isolated['runs']}"]


# ---------------------------------------------------------------------------------------------
# Training any architecture by path


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "lfm2", "mistral"])
def test_hf_dir_trains_with_the_derived_trainer(model_type: str, tiny_dirs, isolated) -> None:
    path = tiny_dirs[model_type]
    row = run_job(compose_config(["+experiment=quickstart", *FAST, "trainer=derived", "model=hf",
                                  f"model.path={path}", *_ledger(isolated)]))
    stored = [json.loads(f.read_text()) for f in (isolated["results"] / "trials").glob("*.json")]
    assert [r["run_id"] for r in stored] == [row["run_id"]]
    # The trial names the model by its directory and hashes the weights the user gave.
    weights = hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
    assert row["model_id"] == path.name and row["model_sha256"] == weights
    # Every Linear but the head is a candidate whose spectrum the derivation read.
    assert set(row["derived"]["layers"]) == set(_linears_but_head(model_type))
    assert any(g["target"] for g in row["derived"]["layers"].values())
    m = row["metrics"]
    assert m["steps"] > 0 and m["val_loss_final"] == pytest.approx(m["val_loss_final"])  # finite
    assert not (isolated["cache"]).exists()  # a local directory is used in place, not copied


def test_hf_dir_trains_a_baseline_with_the_byte_tokenizer(tmp_path: Path, isolated) -> None:
    path = save_tiny(tmp_path / "gemma-no-tokenizer", "gemma", tokenizer=False)
    row = run_job(compose_config(["+experiment=quickstart", *FAST, "trainer=adamw", "model=hf",
                                  f"model.path={path}", "model.tokenizer=bytes",
                                  *_ledger(isolated)]))
    assert row["model_id"] == "gemma-no-tokenizer" and row["metrics"]["steps"] > 0


def _linears_but_head(model_type: str) -> list[str]:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config(model_type))
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]


# ---------------------------------------------------------------------------------------------
# Module selection: from the structure, and unchanged for the committed architectures


def _by_name(model) -> list[str]:
    """The selection by name that the committed trials were made with."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]


def _by_name_block(name: str) -> str:
    head, _, rest = name.partition(".layers.")
    return f"{head}.layers.{rest.split('.', 1)[0]}"


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_lfm2"])
def test_selection_is_unchanged_on_the_committed_configs(model: str) -> None:
    loaded = load_model(to_run_config(compose_config([f"model={model}"])).model)
    chosen = candidate_linears(loaded.model)
    assert list(chosen) == _by_name(loaded.model)  # same modules, same order
    assert [block_of(n) for n in chosen] == [_by_name_block(n) for n in chosen]


def test_selection_is_unchanged_on_smollm2_shape() -> None:
    """SmolLM2-135M's architecture (Llama, 30 blocks, tied embeddings), built without memory."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         tie_word_embeddings=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    chosen = candidate_linears(model)
    assert list(chosen) == _by_name(model) and len(chosen) == 30 * 7
    assert {block_of(n) for n in chosen} == {f"model.layers.{i}" for i in range(30)}


def test_selection_follows_the_structure_not_the_names() -> None:
    """Blocks under another name are found; embeddings, head and outside Linears are not."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mix = nn.Linear(8, 8)
            self.experts = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])

    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.adapter_in = nn.ModuleList([nn.Linear(8, 8)])  # fewer parameters: not the blocks
            self.h = nn.ModuleList([Block() for _ in range(2)])
            self.head = nn.Linear(8, 10)

    chosen = candidate_linears(Toy())
    assert list(chosen) == [f"h.{i}.{m}" for i in range(2)
                            for m in ("mix", "experts.0", "experts.1", "experts.2")]
    assert {block_of(n) for n in chosen} == {"h.0", "h.1"}


# ---------------------------------------------------------------------------------------------
# Broken directories: exit 2, one line naming the problem and the path, nothing written


def _fail_cli(path, isolated, capsys, *extra: str) -> str:
    capsys.readouterr()  # what building the directory printed
    with pytest.raises(SystemExit) as info:
        main(["+experiment=quickstart", *FAST, "trainer=derived", "model=hf",
              f"model.path={path}", *extra, *_ledger(isolated),
              f"hydra.run.dir={isolated['hydra']}", "hydra.output_subdir=null"])
    assert info.value.code == ModelError.exit_code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    # One error line, last; before it only the run's phase lines ("loading model ..."), no trace.
    assert errors == lines[-1:] and str(path) in errors[0], lines
    assert all(line.startswith("loading model") for line in lines[:-1]), lines
    # No trial, no run folder, no cache entry (on a dirty tree the ledger keeps the diff that
    # the run's provenance names, read before the model: that is not the model's doing).
    assert not (isolated["results"] / "trials").exists()
    assert not isolated["runs"].exists() and not isolated["cache"].exists()
    return errors[0]


def _break_missing(d: Path) -> Path:
    return d / "absent"


def _break_no_weights(d: Path) -> Path:
    (d / "model.safetensors").unlink()
    return d


def _break_truncated(d: Path) -> Path:
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    return d


def _break_config(d: Path) -> Path:
    (d / "config.json").write_text('{"model_type": "llama", ')
    return d


def _break_nan(d: Path) -> Path:
    from safetensors.torch import load_file, save_file

    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    return d


class _Trap:
    """Unpickling this creates the file `marker`: proof that a loader unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _break_pickle(d: Path) -> Path:
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(d.parent / "unpickled")))
    return d


def _break_unknown_type(d: Path) -> Path:
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "model_type": "no_such_model"}))
    return d


def _break_remote_code(d: Path) -> Path:
    config = json.loads((d / "config.json").read_text())
    auto_map = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (d / "config.json").write_text(json.dumps({**config, "model_type": "custom_lm",
                                               "auto_map": auto_map}))
    (d / "modeling_custom.py").write_text(f"open({str(d.parent / 'ran')!r}, 'w')\n")
    return d


def _break_missing_tensor(d: Path) -> Path:
    from safetensors.torch import load_file, save_file

    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.0.self_attn.q_proj.weight"]
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    return d


def _break_tokenizer(d: Path) -> Path:
    for f in d.glob("tokenizer*"):
        f.unlink()
    return d


BROKEN = {  # how a directory breaks -> what the one line must say
    "missing": (_break_missing, "no such directory or .gguf file"),
    "no_weights": (_break_no_weights, "no *.safetensors weights"),
    "truncated": (_break_truncated, "model.safetensors is truncated or corrupt"),
    "invalid_config": (_break_config, "config.json is not valid JSON"),
    "nan": (_break_nan, "weight model.layers.1.mlp.up_proj.weight holds NaN or inf"),
    "pickle_only": (_break_pickle, "only pickle weights (pytorch_model.bin)"),
    "unknown_type": (_break_unknown_type, "model_type 'no_such_model' is unknown to transformers"),
    "remote_code": (_break_remote_code, "its code is run only with model.trust_remote_code=true"),
    "missing_tensor": (_break_missing_tensor, "model.layers.0.self_attn.q_proj.weight"),
    "no_tokenizer": (_break_tokenizer, "no tokenizer files"),
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_broken_dir_fails_with_one_line_and_writes_nothing(kind: str, tmp_path: Path,
                                                           isolated, capsys) -> None:
    breaker, expected = BROKEN[kind]
    path = breaker(save_tiny(tmp_path / "model", "llama", tokenizer=kind == "no_tokenizer"))
    extra = [] if kind == "no_tokenizer" else ["model.tokenizer=bytes"]
    line = _fail_cli(path, isolated, capsys, *extra)
    assert expected in line, line
    assert not (tmp_path / "unpickled").exists()  # the pickle was never loaded
    assert not (tmp_path / "ran").exists()  # nor the directory's own code run


def test_model_without_linear_blocks_is_named(tmp_path: Path, isolated, capsys) -> None:
    path = save_tiny(tmp_path / "gpt2", "gpt2", tokenizer=False)
    line = _fail_cli(path, isolated, capsys, "model.tokenizer=bytes")
    assert "model_type 'gpt2' cannot be adapted: no nn.Linear inside its decoder blocks" in line


def test_named_config_refuses_another_architecture(tiny_dirs) -> None:
    cfg = to_run_config(compose_config(["model=lfm2_350m", f"model.path={tiny_dirs['qwen2']}"]))
    with pytest.raises(ModelError, match="model_type 'qwen2' but model=lfm2_350m expects lfm2; "
                                         "use model=hf"):
        load_model(cfg.model)


def test_hub_id_offline_is_one_line(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = to_run_config(compose_config(["model=hf", "model.path=no-such-org/no-such-model"]))
    with pytest.raises(ModelError, match="no-such-org/no-such-model: hub id not in the local "
                                         "cache and HF_HUB_OFFLINE is set") as info:
        load_model(cfg.model)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# Config-time errors: before any work


@pytest.mark.parametrize("model", ["smollm2_135m", "tiny_llama", "tiny_lfm2"])
def test_path_on_a_config_without_one_names_model_hf(model: str) -> None:
    with pytest.raises(ConfigError) as info:
        precheck([f"model={model}", "model.path=/some/dir"])
    assert str(info.value) == (
        f"model.path: model={model} does not load from a path (it uses its "
        f"{'embedded' if model == 'smollm2_135m' else 'random'} weights); to train your own "
        "model use model=hf model.path=/some/dir")


def test_model_hf_needs_a_path() -> None:
    with pytest.raises(ConfigError, match="model.path: missing required value: model=hf"):
        precheck(["model=hf"])


def test_model_ids_of_the_sources(tmp_path: Path) -> None:
    def of(path: str) -> str:
        return model_id_of(to_run_config(compose_config(["model=hf", f"model.path={path}"])).model)

    snapshot = tmp_path / "models--Org--Name" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (tmp_path / "m.Q4.gguf").write_bytes(b"GGUF")
    assert of("Org/Name") == "Org/Name"
    assert of(str(snapshot)) == "Org/Name"
    assert of(str(tmp_path / "m.Q4.gguf")) == "m.Q4"
    assert of(str(tmp_path)) == tmp_path.name


def test_array_backend_refuses_an_architecture_it_lacks(tiny_dirs, isolated) -> None:
    cfg = compose_config(["+experiment=quickstart", *FAST, "trainer=derived", "model=hf",
                          f"model.path={tiny_dirs['qwen2']}", "hardware=jax_cpu",
                          *_ledger(isolated)])
    with pytest.raises(HardwareUnavailable, match="hardware=jax_cpu: the jax backend implements "
                                                  "model_type llama, lfm2, not 'qwen2'"):
        run_job(cfg)
    assert not (isolated["results"] / "trials").exists()


# ---------------------------------------------------------------------------------------------
# The LFM2 headline experiments


@pytest.mark.parametrize("experiment,name", [("lfm2_350m", "LFM2-350M"),
                                             ("lfm2_1_2b", "LFM2-1.2B")])
def test_lfm2_experiment_without_weights_is_one_line_exit_2(experiment: str, name: str,
                                                           tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main([f"+experiment={experiment}", f"results_dir={tmp_path}/results",
              f"hydra.run.dir={tmp_path}/hydra", "hydra.output_subdir=null"])
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"model.path=/path/to/{name}" in lines[0], lines
    assert not any(tmp_path.iterdir())


def test_lfm2_experiment_runs_on_a_tiny_lfm2_dir(tiny_dirs, isolated) -> None:
    """The headline experiment end to end, its LFM2-350M stand-in a tiny saved LFM2."""
    verdicts = run_job(compose_config([
        "+experiment=lfm2_350m", f"model.path={tiny_dirs['lfm2']}", "data.max_examples=60",
        "data.max_seq_len=64", "budget.eval_examples=8", "hardware.threads=1",
        "claim_overrides.trials=3", "+claim_overrides.budget={max_tokens: 600, eval_every: 5}",
        "allow_dirty=true",  # CI runs from a clean tree; a working copy need not be
        *_ledger(isolated)]))
    readings = ["derived", "derived_uniform", "derived_tail_start", "derived_matched_mass",
                "derived_seed_code"]
    assert [v.claim_id for v in verdicts] == [f"lfm2_{r}_beats_sgd" for r in readings]
    rows = [json.loads(f.read_text()) for f in (isolated["results"] / "trials").glob("*.json")]
    trained = [r for r in rows if not r.get("shared_from")]  # sgd trains once, shared by all
    assert sorted((r["claim_arm"], r["seed"]) for r in trained) == sorted(
        (arm, seed) for arm in [*readings, "sgd"] for seed in range(3))
    assert all(r["metrics"]["steps"] > 0 for r in trained)
    assert {r["model_id"] for r in rows} == {"lfm2_350m"}
    assert {r["experiment"] for r in rows} == {"lfm2_350m"}
