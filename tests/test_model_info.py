"""task=model_info and task=lora_svd on tiny random models (PEFT as the oracle for dW)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from support import compose_config

from runner.app import main, run_job
from runner.config.load import to_run_config
from runner.models.loading import load_model
from runner.tasks.lora_svd import AdapterError

# A training run just long enough to move B away from 0 (adapter reload check skipped: it is
# covered by test_train_e2e).
TINY_TRAIN = ["+experiment=quickstart", "task=train", "budget.max_tokens=400", "budget.eval_every=50",
              "budget.eval_examples=4", "data.max_examples=40", "verify_adapter=false"]


def _finite(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def test_model_info_writes_every_layer_and_all_15_records(tmp_path: Path, capsys) -> None:
    report = run_job(compose_config(["task=model_info", "model=tiny_llama", f"runs_dir={tmp_path}",
                                     "task.top=3"]))
    files = list((tmp_path / "model_info").glob("tiny_llama-*.json"))
    assert len(files) == 1 and files[0].name == f"tiny_llama-{report['model_sha256'][:12]}.json"
    stored = json.loads(files[0].read_text())
    # 2 blocks x (q, k, v, o, gate, up, down)
    assert len(stored["layers"]) == stored["n_matrices"] == 14
    assert sorted(stored["derived"], key=int) == [str(i) for i in range(1, 16)]
    for i in ("8", "15"):  # need gradients / activations: deferred, and the table says why
        assert stored["derived"][i]["value"] == "deferred" and "needs" in stored["deferred"][i]
    assert stored["n_train"] > 0 and stored["derive_seconds"] > 0
    assert len(stored["derived"]["11"]["value"]) == 14
    out = capsys.readouterr().out
    assert "3 of 14 matrices" in out and "deferred: needs" in out and str(files[0]) in out.replace("\n", "")


@pytest.fixture(scope="module")
def trained_adapter(tmp_path_factory) -> Path:
    """A PEFT adapter from a tiny quickstart training run (adamw on q_proj, v_proj)."""
    tmp = tmp_path_factory.mktemp("lora")
    row = run_job(compose_config([*TINY_TRAIN, f"results_dir={tmp}/results", f"runs_dir={tmp}/runs"]))
    return Path(row["adapter_path"])


def test_lora_svd_reports_every_adapted_module(trained_adapter: Path, tmp_path: Path) -> None:
    report = run_job(compose_config(["task=lora_svd", "model=tiny_llama", f"runs_dir={tmp_path}",
                                     f"task.adapter={trained_adapter}"]))
    config = json.loads((trained_adapter / "adapter_config.json").read_text())
    # one row per adapted module: 2 blocks x the configured targets
    assert report["n_modules"] == 2 * len(config["target_modules"]) == len(report["modules"])
    for row in report["modules"].values():
        for key in ("delta_norm", "delta_erank", "delta_stable_rank", "sigma_k", "weyl_ratio",
                    "overlap_out", "overlap_in", "chance_out", "chance_in"):
            assert _finite(row[key]), (row["module"], key, row[key])
        assert row["delta_norm"] > 0 and 1 <= row["delta_erank"] <= row["r"]
        assert 0 <= row["overlap_out"] <= 1 and 0 <= row["overlap_in"] <= 1
    assert len(list((tmp_path / "lora_svd").glob("tiny_llama-*.json"))) == 1


def test_lora_svd_update_matches_peft_merge(tmp_path: Path) -> None:
    """Oracle: PEFT's merged weight minus the base weight is our dW, with rank/alpha patterns
    and rsLoRA scaling in play."""
    from peft import LoraConfig, PeftModel, get_peft_model

    cfg = to_run_config(compose_config(["model=tiny_llama"]))
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], use_rslora=True,
                      rank_pattern={"model.layers.1.mlp.down_proj": 2},
                      alpha_pattern={"model.layers.0.self_attn.q_proj": 3})
    peft_model = get_peft_model(load_model(cfg.model).model, lora)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # PEFT starts B at 0; any non-zero update will do
    peft_model.save_pretrained(tmp_path / "adapter")

    report = run_job(compose_config(["task=lora_svd", "model=tiny_llama", f"runs_dir={tmp_path}",
                                     f"task.adapter={tmp_path / 'adapter'}"]))
    base = load_model(cfg.model).model
    base_w = {n: m.weight.detach().clone() for n, m in base.named_modules() if hasattr(m, "weight")}
    merged = PeftModel.from_pretrained(base, tmp_path / "adapter").merge_and_unload()
    merged_w = dict(merged.named_modules())
    assert len(report["modules"]) == 4
    for name, row in report["modules"].items():
        delta = (merged_w[name].weight.detach() - base_w[name]).double()
        s = torch.linalg.svdvals(delta)[: row["r"]]
        # float32 merge vs float64 factored SVD: agree to float32 rounding of ||dW||
        torch.testing.assert_close(torch.tensor(row["delta_singular_values"], dtype=s.dtype), s,
                                   atol=1e-5 * float(s[0]), rtol=0)
    assert report["modules"]["model.layers.1.mlp.down_proj"]["r"] == 2
    assert report["modules"]["model.layers.0.self_attn.q_proj"]["scaling"] == pytest.approx(3 / 2)


@pytest.mark.parametrize(("adapter", "message"), [
    (None, "task.adapter: missing required value"),
    ("/nonexistent/adapter", "no such directory"),
])
def test_lora_svd_bad_adapter_is_a_user_error(tmp_path: Path, adapter, message) -> None:
    overrides = ["task=lora_svd", f"runs_dir={tmp_path}"]
    if adapter:
        overrides.append(f"task.adapter={adapter}")
    with pytest.raises(AdapterError, match=message) as info:
        run_job(compose_config(overrides))
    assert "\n" not in str(info.value)


def test_lora_svd_not_an_adapter_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 8}')
    with pytest.raises(AdapterError, match="adapter_model.safetensors not found"):
        run_job(compose_config(["task=lora_svd", f"task.adapter={tmp_path}"]))


def test_cli_bad_adapter_path_fails_with_one_line(tmp_path: Path, capsys) -> None:
    """The real entry point (precheck, Hydra, dispatch), in-process: one line, exit code 2."""
    with pytest.raises(SystemExit) as info:
        main(["task=lora_svd", "task.adapter=/nonexistent/x", f"runs_dir={tmp_path}",
              f"hydra.run.dir={tmp_path}/hydra", "hydra.output_subdir=null"])
    assert info.value.code == AdapterError.exit_code != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["error: task.adapter=/nonexistent/x: no such directory"]
