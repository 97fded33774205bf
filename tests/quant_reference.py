"""The quantizers of ``diffsynth_cog.quantization.layers`` spelled out independently, in numpy fp32.

Every step is one numpy fp32 operation (one IEEE rounding), written without torch, and the e4m3fn
encoding is done here by searching the table of all e4m3fn values (round to nearest, ties to the
even code), not by torch's cast. The tests compare the library's codes and scales with these bit
for bit:

* scale = max(amax(|row|), fp32(1e-12)) * fp32(1/448)   (fp8; fp32(1/127) for int8)
* fp8 weights:      codes = e4m3(clip(x / scale, -448, 448))
* fp8 activations:  scale rounded up to a power of two, codes = e4m3(x / scale) (exact division)
* int8:             codes = clip(rint(w / scale), -127, 127)    (rint: half to even)
"""

from __future__ import annotations

import numpy as np
import torch

F32 = np.float32
FP8_STEP = F32(1) / F32(448)  # the fp32 number nearest 1/448 (numpy fp32 division rounds once)
INT8_STEP = F32(1) / F32(127)
MIN_AMAX = F32(1e-12)
E4M3_MAX = 448.0


def e4m3fn_table() -> np.ndarray:
    """The value of every non-negative finite e4m3fn code 0..126 (0x7F is NaN), ascending, float64."""
    codes = np.arange(127)
    exponent, mantissa = codes >> 3, (codes & 7) / 8
    subnormal = mantissa * 2.0**-6  # exponent field 0
    normal = (1 + mantissa) * np.exp2(exponent - 7.0)  # bias 7
    return np.where(exponent == 0, subnormal, normal)


def encode_e4m3fn(v: np.ndarray) -> np.ndarray:
    """fp32 values -> e4m3fn codes (uint8): nearest value, ties to the even code; |v| <= 464."""
    v = np.asarray(v, dtype=F32)
    mag = np.abs(v).astype(np.float64)  # exact
    assert not np.isnan(mag).any() and (mag <= 464).all(), "beyond e4m3fn's round-to-448 range"
    table = e4m3fn_table()
    hi = np.minimum(np.searchsorted(table, mag), 126)  # first code whose value >= mag (448 above the top)
    lo = np.maximum(hi - 1, 0)
    below, above = mag - table[lo], table[hi] - mag  # exact in float64
    code = np.where((above < below) | ((above == below) & (hi % 2 == 0)), hi, lo).astype(np.uint8)
    return code | (np.signbit(v).astype(np.uint8) << 7)


def row_scales(x: np.ndarray, step: np.float32) -> np.ndarray:
    """[M, K] fp32 -> [M, 1] fp32: max(amax of the row, 1e-12) * step, one fp32 multiplication."""
    amax = np.abs(x).max(axis=1, keepdims=True)
    return np.maximum(amax, MIN_AMAX) * step


def round_up_to_power_of_two(s: np.ndarray) -> np.ndarray:
    mantissa, exponent = np.frexp(s)  # s = mantissa * 2^exponent, mantissa in [0.5, 1)
    return np.where(mantissa == 0.5, s, np.ldexp(F32(1), exponent)).astype(F32)


def fp8_rows(x: torch.Tensor, power_of_two: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (any float dtype) -> (codes [M, K] float8_e4m3fn, scales [M, 1] fp32)."""
    x32 = x.detach().float().numpy()  # bf16 -> fp32 is exact
    scale = row_scales(x32, FP8_STEP)
    if power_of_two:
        scale = round_up_to_power_of_two(scale)
        q = x32 / scale  # exact: a power of two
    else:
        q = np.clip(x32 / scale, F32(-E4M3_MAX), F32(E4M3_MAX))
    codes = torch.from_numpy(encode_e4m3fn(q)).view(torch.float8_e4m3fn)
    return codes, torch.from_numpy(scale)


def int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] (any float dtype) -> (codes [N, K] int8, scales [N, 1] fp32)."""
    w32 = w.detach().float().numpy()
    scale = row_scales(w32, INT8_STEP)
    codes = np.clip(np.rint(w32 / scale), -127, 127).astype(np.int8)
    return torch.from_numpy(codes), torch.from_numpy(scale)
