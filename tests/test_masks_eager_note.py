"""Masked attention on the CPU (FlexAttention's eager path) says once, in our one log line, why it runs
uncompiled, instead of PyTorch's 8-line "called without torch.compile" warning in every process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CALLS = """
import logging, sys, torch
from torch.nn.attention.flex_attention import create_block_mask
from diffsynth_cog.denoise.masks import flex_attention_call

logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
mask = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, 256, 256, device="cpu")
q, k, v = (torch.randn(1, 2, 256, 16) for _ in range(3))
for _ in range(3):
    out = flex_attention_call(q, k, v, mask)
reference = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
print(float((out - reference).abs().max()))
"""


def test_eager_flex_attention_says_once_why_and_prints_no_pytorch_warning() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "default"}
    result = subprocess.run([sys.executable, "-c", CALLS], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "without torch.compile" not in result.stderr and "SOLUTION" not in result.stderr
    notes = [line for line in result.stderr.splitlines() if "FlexAttention uncompiled" in line]
    assert len(notes) == 1 and notes[0].startswith("INFO diffsynth_cog.denoise.masks: ")
    assert float(result.stdout.strip()) < 1e-5  # and it still computes the masked attention
