"""Attention backend selection, the FlashAttention-3 plumbing and the fp8 quantization.

FlashAttention-3 needs a Hopper GPU, so here a stand-in module with FA3's call signature (exact
attention on de-quantized inputs) replaces it: what is proved is our side of the call (routing,
the training fallback, the per-head scales and how descales are passed), not the kernel.
The kernel itself is measured against fp32 on the GPU (benchmarks/bench_attention.py).
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from diffsynth_cog.models import attention as attn


def exact(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """fp32 reference; [B, L, H, D] in and out."""
    q, k, v = (t.float().transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)


class StandInFA3(types.ModuleType):
    """Has FlashAttention-3's ``flash_attn_func``; records what it was called with."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.calls: list[dict] = []

    def flash_attn_func(self, q, k, v, q_descale=None, k_descale=None, v_descale=None):  # noqa: ANN001, ANN201
        self.calls.append({"dtype": q.dtype, "descales": (q_descale, k_descale, v_descale)})
        if q.dtype == torch.float8_e4m3fn:
            # FA3 semantics: real value = stored fp8 value * descale[b, h]
            q, k, v = (t.float() * d[:, None, :, None] for t, d in ((q, q_descale), (k, k_descale), (v, v_descale)))
        return exact(q, k, v).to(torch.bfloat16), None  # FA3 returns (out, softmax_lse)


@pytest.fixture
def fa3(monkeypatch: pytest.MonkeyPatch) -> StandInFA3:
    module = StandInFA3("fa3_fwd_interface")  # the forward-only wheel's module name
    monkeypatch.setattr(attn, "_fa3_module", lambda: module)
    yield module
    attn.set_attention_backend("auto")


def qkv(requires_grad: bool = False, scale: float = 1.0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 40, 3, 16, generator=g) for _ in range(3))
    q = q * scale
    return tuple(t.to(torch.bfloat16).requires_grad_(requires_grad) for t in (q, k, v))


def test_unknown_backend_is_rejected_with_the_valid_names() -> None:
    with pytest.raises(ValueError, match="valid:.*sdpa-cudnn"):
        attn.set_attention_backend("cudnn")
    assert attn.get_attention_backend() == "auto"


def test_fa3_backends_need_flashattention3_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attn, "_fa3_module", lambda: None)
    for name in ("fa3", "fa3-fp8"):
        with pytest.raises(ValueError, match="fa3-fwd"):
            attn.set_attention_backend(name)
    assert attn.get_attention_backend() == "auto"


def test_auto_uses_sdpa_off_gpu_even_when_fa3_is_installed(fa3: StandInFA3) -> None:
    assert attn.resolve_backend(torch.device("cpu")) == "sdpa"
    q, k, v = qkv()
    torch.testing.assert_close(attn.attention(q, k, v).float(), exact(q, k, v), atol=2e-2, rtol=0)
    assert fa3.calls == []


def test_fa3_inference_calls_the_kernel_with_bf16_and_no_scales(fa3: StandInFA3) -> None:
    q, k, v = qkv()
    out = attn._fa3(q, k, v)
    assert fa3.calls == [{"dtype": torch.bfloat16, "descales": (None, None, None)}]
    assert out.shape == q.shape and out.dtype == torch.bfloat16


def test_forward_only_fa3_hands_training_calls_to_sdpa(fa3: StandInFA3) -> None:
    q, k, v = qkv(requires_grad=True)
    out = attn._fa3(q, k, v)
    out.float().sum().backward()
    assert fa3.calls == [] and q.grad is not None
    with torch.no_grad():  # the same tensors without a recorded graph go to the kernel
        attn._fa3(q, k, v)
    assert len(fa3.calls) == 1


def test_fa3_fp8_passes_fp8_tensors_with_per_head_descales_and_stays_close(fa3: StandInFA3) -> None:
    q, k, v = qkv(scale=3.0)
    with torch.no_grad():
        out = attn._fa3_fp8(q, k, v)
    (call,) = fa3.calls
    assert call["dtype"] == torch.float8_e4m3fn
    assert all(d.shape == (2, 3) and d.dtype == torch.float32 for d in call["descales"])
    err = ((out.float() - exact(q, k, v)).norm() / exact(q, k, v).norm()).item()
    assert err < 0.08, err  # e4m3 keeps 3 mantissa bits; a wrong scale would be off by orders


def test_fa3_fp8_centres_keys_so_a_shared_key_offset_costs_no_accuracy(fa3: StandInFA3) -> None:
    q, k, v = qkv()
    g = torch.Generator().manual_seed(7)
    k = (k.float() + 8.0 * torch.randn(1, 1, 3, 16, generator=g)).bfloat16()  # same offset for every key
    want = exact(q, k, v)
    with torch.no_grad():
        centred = attn._fa3_fp8(q, k, v)
        plain = attn._fa3_op(
            *(attn.quantize_fp8_per_head(t)[0] for t in (q, k, v)),
            *[attn.quantize_fp8_per_head(t)[1] for t in (q, k, v)],
        )
    err_centred = ((centred.float() - want).norm() / want.norm()).item()
    err_plain = ((plain.float() - want).norm() / want.norm()).item()
    assert err_centred < 0.08 and err_centred < err_plain / 2, (err_centred, err_plain)


def test_fa3_fp8_refuses_to_train(fa3: StandInFA3) -> None:
    q, k, v = qkv(requires_grad=True)
    with pytest.raises(RuntimeError, match="inference only"):
        attn._fa3_fp8(q, k, v)


def test_fp8_quantization_uses_the_full_range_of_every_head() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 64, 4, 8, generator=g)
    x = x * torch.tensor([1e-3, 1.0, 30.0, 500.0])[None, None, :, None]  # heads of very different size
    x8, descale = attn.quantize_fp8_per_head(x)
    assert x8.dtype == torch.float8_e4m3fn and descale.shape == (2, 4)
    assert torch.allclose(x8.float().abs().amax(dim=(1, 3)), torch.full((2, 4), attn.FP8_MAX))
    back = x8.float() * descale[:, None, :, None]
    rel = (back - x).abs() / x.abs().amax(dim=(1, 3), keepdim=True)
    assert rel.max() < 2**-4  # half an e4m3 step at the top of the range, relative to the head's max


def test_fa3_op_has_a_shape_only_fake_so_compile_can_trace_it() -> None:
    with FakeTensorMode():
        q = torch.empty(2, 40, 3, 16, dtype=torch.float8_e4m3fn)
        d = torch.empty(2, 3)
        out = torch.ops.diffsynth_cog.fa3(q, q, q, d, d, d)
        assert out.shape == q.shape and out.dtype == torch.bfloat16
        q16 = torch.empty(2, 40, 3, 16, dtype=torch.bfloat16)
        assert torch.ops.diffsynth_cog.fa3(q16, q16, q16).dtype == torch.bfloat16


def test_fa3_probe_is_a_constant_to_the_compiler_so_fullgraph_blocks_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ``auto`` backend asks whether FA3 imports; a compiled block must not trace that question (the import
    machinery is untraceable in some torch versions: a graph break, or an error under ``fullgraph=True``)."""
    calls: list[str] = []

    def module() -> None:
        torch._dynamo.graph_break()  # what an untraceable probe is to the compiler: an error under fullgraph
        calls.append("probe")
        return None

    monkeypatch.setattr(attn, "_fa3_module", module)

    def probe(x: torch.Tensor) -> torch.Tensor:
        return x + 1 if attn.fa3_available() else x - 1

    x = torch.zeros(2)
    out = torch.compile(probe, backend="eager", fullgraph=True)(x)
    assert torch.equal(out, x - 1)
    assert calls  # asked in plain Python while tracing
