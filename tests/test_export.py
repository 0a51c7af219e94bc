"""Adapters that travel: the saved adapter names its base model and carries a model card, and
task=export writes a merged Hugging Face folder and an mlx-lm folder whose logits equal the
PEFT-wrapped model's (oracles: PEFT, transformers' loader, mlx-lm's loader)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support import ROOT, compose_config, logits_of, probe_ids

from runner.app import run_job
from runner.errors import UserError
from runner.models.tokenizers import ByteTokenizer
from runner.tasks.export import LOGITS_TOLERANCE, byte_tokenizer_as_hf, mlx_config
from runner.training.adapter import model_card

ROPE_THETA = 100000.0  # SmolLM2's RoPE base; mlx-lm's default (10000) must not be used instead
TRAIN = ["+experiment=quickstart", "task=train", "model=hf", "model.tokenizer=bytes",
         "budget.max_tokens=1500", "budget.eval_every=5", "budget.eval_examples=4",
         "data.max_examples=60", "verify_adapter=false", "trainer.lr=0.05",
         "trainer.target_modules=[q_proj,v_proj,down_proj]"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A tiny random Llama saved as a local model folder, with SmolLM2's RoPE base."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    folder = tmp_path_factory.mktemp("models") / "tiny-rope-llama"
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=True,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def trained(base_dir: Path, tmp_path_factory) -> dict:
    """One adamw trial on the tiny model; its row, run folder and ledger/run overrides."""
    root = tmp_path_factory.mktemp("trial")
    overrides = [f"results_dir={root / 'results'}", f"runs_dir={root / 'runs'}"]
    row = run_job(compose_config([*TRAIN, f"model.path={base_dir}", *overrides]))
    return {"row": row, "adapter": Path(row["adapter_path"]), "overrides": overrides,
            "model": ["model=hf", f"model.path={base_dir}", "model.tokenizer=bytes"]}


@pytest.fixture(scope="module")
def exported(trained: dict) -> dict:
    report = run_job(compose_config(["task=export", *trained["model"],
                                     f"task.adapter={trained['adapter'].parent}",
                                     *trained["overrides"]]))
    return {**report, "output": Path(report["output"])}


def _peft_model(base_dir: Path, adapter: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter)).eval()


# ---------------------------------------------------------------------------------------------
# The saved adapter


def test_adapter_names_its_base_model_and_carries_its_card(trained: dict) -> None:
    row, adapter = trained["row"], trained["adapter"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny-rope-llama" == row["model_id"]
    card = (adapter / "README.md").read_text()
    assert card.startswith("---\nbase_model: tiny-rope-llama\n")
    for fact in (row["run_id"], row["model_sha256"], row["data_id"], row["data_sha256"],
                 f"| trainer | {row['arm']} |", row["config_hash"],
                 "None: no claim's pre-registered rule asked for this trial.",
                 "| lr | 0.05 |", "| target_modules | [q_proj, v_proj, down_proj] |"):
        assert fact in card, fact
    assert not list(adapter.parent.glob(".adapter-*"))  # the temporary folder was renamed


def test_derived_adapter_names_its_base_model_and_its_derived_values(
        tmp_path: Path) -> None:
    """The derived trainer's export (runner.derived.export) is saved the same way, and its card
    lists the derived values of the trial's record."""
    row = run_job(compose_config([
        "+experiment=quickstart", "task=train", "trainer=derived", "budget.max_tokens=300",
        "budget.eval_every=5", "budget.eval_examples=4", "data.max_examples=40",
        "verify_adapter=false", f"results_dir={tmp_path / 'results'}",
        f"runs_dir={tmp_path / 'runs'}"]))
    adapter = Path(row["adapter_path"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny_llama"
    card = (adapter / "README.md").read_text()
    assert "## Derived hyperparameters" in card
    derived = row["derived"]["derived"]
    ranks = derived["11"]["value"]
    assert f"| 11 | lora_rank | {len(ranks)} modules: {min(ranks)} to {max(ranks)}," in card
    assert f"| 8 | batch_size | {derived['8']['value']} |" in card


def test_model_card_of_a_claim_trial_is_byte_stable() -> None:
    """A committed SmolLM2 claim trial: the card names the hub id, the claim and where its
    verdict is kept, rounds every derived float, and the same row gives the same bytes."""
    path = next(p for p in sorted((ROOT / "results" / "trials").glob("*.json"))
                if "derived" in p.name and json.loads(p.read_text()).get("claim_id")
                and json.loads(p.read_text()).get("model_id") == "smollm2_135m")
    row = json.loads(path.read_text())
    card = model_card(row)
    assert card == model_card(copy.deepcopy(row))
    assert card.startswith("---\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\n")
    assert f"`{row['claim_id']}`" in card and "docs/claims.md" in card
    lr = row["derived"]["derived"]["1"]["value"]
    assert f"| 1 | learning_rate | {lr:.4g} |" in card and repr(lr) not in card


# ---------------------------------------------------------------------------------------------
# task=export


def test_merged_hf_folder_has_the_peft_models_logits(base_dir: Path, trained: dict,
                                                     exported: dict) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = exported["output"] / "hf"
    assert (hf / "model.safetensors").is_file() and (hf / "README.md").is_file()
    merged = AutoModelForCausalLM.from_pretrained(hf).eval()
    peft_model = _peft_model(base_dir, trained["adapter"])
    ids = probe_ids(merged)
    reference = logits_of(peft_model, ids)
    # float32 merge: only the summation order differs from the unmerged PEFT forward
    assert float((logits_of(merged, ids) - reference).abs().max()) <= 1e-5
    # ... and the adapter did move the model (a base-only export would fail the check above)
    with peft_model.disable_adapter():
        assert float((logits_of(peft_model, ids) - reference).abs().max()) > 100 * LOGITS_TOLERANCE
    # The byte tokenizer travels as its Hugging Face equivalent.
    tokenizer, ours = AutoTokenizer.from_pretrained(hf), ByteTokenizer()
    text = "<|user|>Grüße, def f(x):\n\treturn x</s>"
    assert tokenizer(text)["input_ids"] == ours.encode(text)
    assert tokenizer.decode(ours.encode(text, add_special_tokens=False)) == text
    manifest = json.loads((exported["output"] / "export.json").read_text())
    assert manifest["max_abs_logit_diff"]["hf"] <= 1e-5
    assert manifest["base_model"] == "tiny-rope-llama"


def test_byte_tokenizer_equivalent_on_every_byte() -> None:
    ours, theirs = ByteTokenizer(), byte_tokenizer_as_hf(ByteTokenizer())
    text = bytes(range(1, 128)).decode() + "é中🙂" + "".join(ours.all_special_tokens)
    assert theirs(text)["input_ids"] == ours.encode(text)
    assert theirs.pad_token_id == ours.pad_token_id and theirs.eos_token_id == ours.eos_token_id


def test_mlx_folder_loads_in_mlx_lm_with_torchs_logits(base_dir: Path, trained: dict,
                                                      exported: dict) -> None:
    pytest.importorskip("mlx_lm")
    import mlx.core as mx
    import numpy as np
    from mlx_lm import load

    mlx_dir = exported["output"] / "mlx"
    config = json.loads((mlx_dir / "config.json").read_text())
    assert config["rope_theta"] == ROPE_THETA and "rope_parameters" not in config
    reference = logits_of(_peft_model(base_dir, trained["adapter"]), ids := probe_ids_of(512))

    def mlx_logits(folder: Path) -> torch.Tensor:
        model, tokenizer = load(str(folder))
        return torch.from_numpy(np.array(model(mx.array(ids.numpy())).astype(mx.float32)))

    assert float((mlx_logits(mlx_dir) - reference).abs().max()) <= LOGITS_TOLERANCE
    # transformers' own config (RoPE base under rope_parameters) is what mlx-lm misreads:
    # the check above is the one that catches it.
    assert float((mlx_logits(exported["output"] / "hf") - reference).abs().max()) \
        > LOGITS_TOLERANCE
    assert exported["max_abs_logit_diff"]["mlx"] <= LOGITS_TOLERANCE


def probe_ids_of(vocab_size: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab_size, (2, 40), generator=gen)


def test_mlx_config_moves_the_rope_parameters_to_the_top_level() -> None:
    llama3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    out = mlx_config({"model_type": "llama", "rope_parameters": llama3})
    assert out["rope_theta"] == 500000.0 and "rope_parameters" not in out
    assert out["rope_scaling"] == {k: v for k, v in llama3.items() if k != "rope_theta"}
    plain = mlx_config({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}})
    assert plain == {"rope_theta": 1e4}


# ---------------------------------------------------------------------------------------------
# Bad input: one line, nothing written


def test_bad_adapters_are_refused_and_nothing_is_written(trained: dict,
                                                         tmp_path: Path) -> None:
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (tmp_path / "absent", trained["model"], "no such directory"),
        (empty, trained["model"], "adapter_config.json not found"),
        # trained on the tiny hf model, merged into tiny_llama: the recorded base differs
        (trained["adapter"], ["model=tiny_llama"],
         "trained on base model tiny-rope-llama, but model=tiny_llama is tiny_llama"),
    ]
    for adapter, model, message in cases:
        with pytest.raises(UserError, match=message):
            run_job(compose_config(["task=export", *model, f"task.adapter={adapter}",
                                    f"task.output={out}", *trained["overrides"]]))
        assert not out.exists() and not list(tmp_path.glob(".out-*"))
    taken = tmp_path / "taken"
    taken.mkdir()
    with pytest.raises(UserError, match="already exists"):
        run_job(compose_config(["task=export", *trained["model"],
                                f"task.adapter={trained['adapter']}", f"task.output={taken}",
                                *trained["overrides"]]))
    assert list(taken.iterdir()) == []


def test_missing_adapter_is_one_line_and_a_nonzero_exit(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "runner", "task=export", f"task.adapter={tmp_path / 'nope'}",
         f"runs_dir={tmp_path / 'runs'}", f"hydra.run.dir={tmp_path}/hydra",
         "hydra.output_subdir=null"],
        capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: task.adapter={tmp_path / 'nope'}: no such directory")
    assert not (tmp_path / "runs" / "export").exists()


def test_gguf_holds_the_merged_weights(trained: dict, tmp_path: Path) -> None:
    """model.gguf: gguf's reader finds every merged tensor under llama.cpp's name (q/k rows in
    llama.cpp's rotary order), the RoPE base, and transformers' GGUF loader gives the merged
    model's logits."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    from runner.tasks.export_gguf import from_gguf_layout

    out = tmp_path / "export"
    report = run_job(compose_config(["task=export", *trained["model"], f"task.output={out}",
                                     f"task.adapter={trained['adapter']}",
                                     "task.formats=[hf,gguf]", *trained["overrides"]]))
    assert not (out / "mlx").exists() and report["max_abs_logit_diff"]["gguf"] <= 1e-5
    merged = load_file(out / "hf" / "model.safetensors")
    config = json.loads((out / "hf" / "config.json").read_text())
    reader = gguf.GGUFReader(str(out / "model.gguf"))
    assert reader.fields["llama.rope.freq_base"].contents() == ROPE_THETA
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    stored = {t.name: np.asarray(t.data) for t in reader.tensors}
    assert len(stored) == len(merged)
    for name, weight in merged.items():
        tensor = stored[names.get_name(name, try_suffixes=(".weight", ".bias"))]
        assert np.array_equal(from_gguf_layout(name, tensor, config), weight), name
    # q_proj really is reordered (the inverse above is not the identity on it)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not np.array_equal(stored["blk.0.attn_q.weight"], merged[q])
    from_gguf = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf").eval()
    from_hf = AutoModelForCausalLM.from_pretrained(out / "hf").eval()
    ids = probe_ids(from_hf)
    assert torch.equal(logits_of(from_gguf, ids), logits_of(from_hf, ids))  # same float32 graph


@pytest.mark.slow
def test_smollm2_export_matches_torch_in_mlx_lm(tmp_path: Path) -> None:
    """The embedded SmolLM2-135M (RoPE base 100000, 30 blocks) with a random LoRA on every
    projection: the merged folders reproduce PEFT's logits, mlx-lm's within 1e-3."""
    pytest.importorskip("mlx_lm")
    from peft import LoraConfig, get_peft_model

    from runner.config.load import to_run_config
    from runner.models.loading import load_model
    from runner.training.adapter import base_model_id, save_adapter

    cfg = to_run_config(compose_config(["model=smollm2_135m"]))
    loaded = load_model(cfg.model)
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                      "up_proj", "down_proj"])
    model = get_peft_model(loaded.model, lora)
    adapter = tmp_path / "run" / "adapter"
    save_adapter(model, adapter, base_model_id(cfg.model))
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    report = run_job(compose_config([
        "task=export", "model=smollm2_135m", f"task.adapter={adapter.parent}",
        "task.formats=[hf,mlx,gguf]", f"task.output={tmp_path / 'export'}",
        f"runs_dir={tmp_path / 'runs'}"]))
    diffs = report["max_abs_logit_diff"]
    # a random LoRA on 30 blocks: the merge's float32 reordering moves logits by about 1e-4
    assert max(diffs[f] for f in ("hf", "mlx", "gguf")) <= LOGITS_TOLERANCE
    mlx_config = json.loads((tmp_path / "export" / "mlx" / "config.json").read_text())
    assert mlx_config["rope_theta"] == 100000.0
