"""The copy-engine Ulysses exchange (``parallel.peer``): where every chunk lands, checked on the CPU by running
every rank's copies in one process (the GPUs' symmetric memory is exercised by tests/test_gpu_parallel.py)."""

from __future__ import annotations

import pytest
import torch

from diffsynth_cog.models.attention import attention
from diffsynth_cog.parallel.peer import copy_inputs, copy_outputs, from_peer_layout, to_peer_layout, token_offsets

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("lengths", [(5, 4), (3, 7), (4, 4, 3, 3)], ids=["uneven2", "skewed2", "four"])
def test_simulated_peer_exchange_equals_attention_over_the_whole_sequence(lengths):
    u, batch, dim = len(lengths), 2, 8
    heads, total = 2 * u, sum(lengths)
    hc = heads // u
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, total, heads, dim, generator=g) for _ in range(3))
    shards = [slice(start, start + n) for start, n in zip(token_offsets(lengths), lengths, strict=True)]
    sends = [[to_peer_layout(t[:, shard], u) for t in (q, k, v)] for shard in shards]  # what each rank's block makes
    recv = [torch.full((3, batch, total, hc, dim), float("nan")) for _ in range(u)]  # each rank's receive buffer
    for row in range(batch):
        for rank in range(u):
            copy_inputs(recv, sends[rank], lengths, rank, row)
    for rank in range(u):  # every rank now holds q, k, v of the whole sequence for its share of the heads
        for s, t in enumerate((q, k, v)):
            assert torch.equal(recv[rank][s], t[:, :, rank * hc : (rank + 1) * hc])
    outs = [attention(*recv[rank].unbind(0), "sdpa") for rank in range(u)]
    back = [torch.full((u, batch, n, hc, dim), float("nan")) for n in lengths]
    for row in range(batch):
        for rank in range(u):
            copy_outputs(back, outs[rank][row], lengths, rank, row)
    want = attention(q, k, v, "sdpa")
    for rank, shard in enumerate(shards):
        torch.testing.assert_close(from_peer_layout(back[rank]), want[:, shard], rtol=1e-5, atol=1e-6)


def test_peer_layout_puts_each_ranks_heads_first_and_round_trips():
    t = torch.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)  # [B, n, H, D]
    packed = to_peer_layout(t, 2)
    assert packed.shape == (2, 2, 3, 2, 5) and packed.is_contiguous()
    assert torch.equal(packed[1, 0, 2], t[0, 2, 2:4])  # rank 1's heads (2, 3) of row 0, token 2
    assert torch.equal(from_peer_layout(packed), t)


def test_ranks_take_the_peer_transport_only_if_every_group_is_on_one_host_and_maps(tmp_path):
    from parallel_cases import peer_agreement
    from parallel_harness import ok, run_ranks

    for result in ok(run_ranks(2, peer_agreement, tmp_path, timeout=120)):
        assert result == {
            "one-host": True,
            "trial-fails-on-the-last-rank": False,  # every rank falls back, not only the one that failed
            "two-hosts": False,
            "no-group-here": True,
        }
