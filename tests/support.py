"""Helpers shared by the tests: compose the real configs under conf/ as the command line does."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from runner.config.paths import CONF_DIR
from runner.config.schema import register_configs

ROOT = Path(__file__).resolve().parent.parent

register_configs()


def compose_config(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        return compose(config_name="config", overrides=overrides)


def probe_ids(model):
    """A fixed (2, 20) batch of token ids (own generator: the global random state is untouched)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, model.config.vocab_size, (2, 20), generator=gen)


def logits_of(model, ids):
    """The model's logits on `ids` (no attention padding), without gradients."""
    import torch

    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
