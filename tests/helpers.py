"""Helpers several test modules share: random word pairs, a model moved off its
initialisation, and running the CLI the way a user's shell would."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import torch
from typer.testing import CliRunner

from prefprune.cli import app
from prefprune.model import RewardModel, RewardModelConfig

WORDS = [
    "apple", "river", "stone", "cloud", "quick", "slow", "bright", "dark", "happy", "sad",
    "green", "blue", "window", "garden", "music", "paper", "ocean", "mountain", "silver",
    "orange", "table", "number", "seven", "later", "never", "always", "maybe", "honest",
]
FIXTURES = Path(__file__).parent / "fixtures"
WIDE = {"COLUMNS": "200"}  # rich wraps and truncates at the default width of 80


def pairs(n: int, seed: int, prefix: str = "p") -> datasets.Dataset:
    """``n`` canonical pairs of random words (prompts 1–13 words, responses 1–8), with a
    worker and a confidence column as source metadata."""
    rng = np.random.default_rng(seed)

    def text(low: int, high: int) -> str:
        return " ".join(rng.choice(WORDS, size=int(rng.integers(low, high))))

    return datasets.Dataset.from_dict({
        "id": [f"{prefix}{i}" for i in range(n)],
        "prompt": [text(1, 14) for _ in range(n)],
        "chosen": [text(1, 9) for _ in range(n)],
        "rejected": [text(1, 9) for _ in range(n)],
        "worker": [f"w{i % 3}" for i in range(n)],
        "confidence": [float(i % 4) for i in range(n)],
    })


def perturbed_model(backbone: Path | str, *, seed: int = 1, scale: float = 0.2,
                    **config) -> RewardModel:
    """A model whose θ is moved away from initialisation: LoRA's B starts at zero, which would
    hide bugs that only show when every trainable parameter matters. LoRA adapts every layer
    unless ``lora_layers`` says otherwise: the gradient and curvature tests cover them all."""
    config.setdefault("lora_layers", 0)
    model = RewardModel.create(RewardModelConfig(backbone=str(backbone), **config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in model.trainable_parameters():
            param.copy_(scale * torch.randn(param.shape, generator=generator))
    model.model.eval()
    return model


def tiny_scoring_model(backbone: Path | str) -> RewardModel:
    """The small perturbed model the influence tests check against dense ground truth."""
    return perturbed_model(backbone, seed=5, scale=0.3, max_length=32, lora_r=1,
                           target_modules=("query",))


def run_cli(*args: object):
    """Invoke ``prefprune`` with a wide terminal; the result has stdout and stderr."""
    return CliRunner().invoke(app, [str(a) for a in args], env=WIDE)


def assert_one_error_line(result, code: int) -> str:
    """The command failed with ``code`` and said why in exactly one ``error:`` line."""
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if not line.startswith("warning: ")]
    assert len(errors) == 1 and errors[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output + result.stderr
    return errors[0]
