"""Sequence-parallel training (DeepSpeed-Ulysses' design): one sample's tokens split over a group of ranks.

With ``sequence_parallel = S`` the ``W`` ranks form ``G = W / S`` groups of ``S`` consecutive ranks
(rank ``r`` is shard ``r % S`` of group ``r // S``). A group trains one sample at a time: every rank
of it reads the same batch and draws the same timesteps and noise (:func:`data_parallel_coords` gives
the data loader and the seeds the group's index instead of the rank), embeds the whole call, keeps one
contiguous shard of the ``[text, video]`` tokens (any count: shards differ by at most one token) and
runs the blocks on it. Attention is Ulysses (``parallel.sequence``): an all-to-all trades the token
shard for a share of the heads over every token, the call's attention (dense, or a sparse mask on the
whole sequence) runs, a second all-to-all brings the outputs back. The output patches are
all-gathered, so every rank computes the same loss over the whole sample. Backward runs the same
exchanges in reverse: the all-to-all's adjoint is the reverse all-to-all, the all-gather's adjoint a
reduce-scatter (``parallel.comm``, ``parallel.split``). Ring attention has no backward and is refused.

Gradients. Every rank holds the whole LoRA, ``theta``. The group's loss ``L`` (a mean over all the
sample's tokens) is one scalar function of S copies of it, ``L(theta_1, ..., theta_S)``: copy ``s``
is the one rank ``s`` applies to its tokens. The gradient a rank's backward pass computes is the
partial ``dL/dtheta_s`` - the terms of its share of the tokens, each already divided by the sample's
whole token count (the mean is inside L, not per shard), with the attention's cross-token terms
brought back by the reverse all-to-all. Since all copies are the same parameter,
``dL/dtheta = sum_s dL/dtheta_s``: the sequence group must SUM its gradients (an average would divide
the gradient by S; nothing is counted twice because each token's terms live on exactly one rank).

Where that sum happens: each of the S ranks evaluates the same loss, so the all-gather's adjoint (a
sum over the group of each rank's gradient at this rank's patches) hands rank ``s`` exactly
``S * dL/dpatches_s``, and its LoRA gradient is ``S * dL/dtheta_s``. The strategy's own gradient
mean over all ``W = G * S`` ranks (DDP's all-reduce, or DeepSpeed ZeRO-2's reduce-scatter, both over
the whole world by default) then gives ``1/(G S) * sum_g sum_s S dL_g/dtheta_s = 1/G sum_g dL_g/dtheta``:
the sum over each sequence group and the mean over the data-parallel groups, in the one collective the
strategy runs anyway. So no process group of the strategy changes: DDP and ZeRO-2 keep the whole
world as their data-parallel group (ZeRO-2 then shards optimizer states and gradients over all W
ranks), and gradient clipping and accumulation see the true gradients.
"""

from __future__ import annotations

import logging

import torch.distributed as dist

from diffsynth_cog.parallel.layout import ParallelError, ParallelLayout
from diffsynth_cog.parallel.mesh import build_mesh
from diffsynth_cog.parallel.split import ParallelSplit
from diffsynth_cog.validators import divisors

logger = logging.getLogger(__name__)


def check_degree(degree: int, num_heads: int, world: int | None = None) -> None:
    """Raises ParallelError unless the Ulysses degree divides the heads (and the world size, if given)."""
    ParallelLayout(ulysses=degree).check_heads(num_heads)
    if world is not None and world % degree:
        raise ParallelError(
            f"sequence_parallel {degree} does not divide the {world} ranks of this run; valid: {divisors(world)}"
        )


def data_parallel_coords(rank: int, world: int, degree: int) -> tuple[int, int]:
    """(group index, number of groups) of ``rank``: what the data loader and the seeds use as the rank."""
    if degree < 1 or world % degree:
        raise ParallelError(f"sequence_parallel {degree} does not divide the {world} ranks of this run")
    return rank // degree, world // degree


def sequence_parallel_split(degree: int, num_heads: int) -> ParallelSplit:
    """The token split of a training run with Ulysses degree ``degree`` (collective: every rank calls it)."""
    if not dist.is_available() or not dist.is_initialized():
        raise ParallelError(
            f"sequence_parallel {degree} needs the ranks of a distributed run (e.g. devices: {degree} with strategy "
            "'auto' or 'deepspeed_stage_2'); torch.distributed is not initialised here"
        )
    world = dist.get_world_size()
    check_degree(degree, num_heads, world)
    layout = ParallelLayout.resolve(
        world, cfg_parallel=False, ulysses_degree=degree, group_size=degree, num_heads=num_heads
    )
    split = ParallelSplit(build_mesh(layout))
    if dist.get_rank() == 0:
        logger.info("sequence-parallel training: %s on %d ranks", layout.name(), world)
    return split
