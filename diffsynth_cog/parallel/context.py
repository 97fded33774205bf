"""What a pipeline holds after ``enable_parallel``: the layout, its groups, and the per-call steps.

:class:`ParallelContext` gives the pipeline's stages their distributed behaviour, each a small hook:

  * :meth:`check_call` - before any work, every rank of the generation compares the call's arguments;
  * :meth:`shared_seed` - ``seed=None`` becomes one fresh seed, the leader's, on every rank;
  * :meth:`encode_text` - T5 runs once per text: the texts of a call (negative and positive prompt) are
    spread over the generation's ranks, each encodes its own and broadcasts it (so with CFG 2 the two
    prompts encode at the same time on two GPUs);
  * :attr:`split` - the denoiser's token split (CFG halves x sequence shards);
  * :attr:`window_share` - the denoiser's window share over the window groups (``parallel.windows``; None without
    window groups), and :meth:`check_windows`, the call's windows checked against them before any work;
  * :meth:`spread_tiles` - the tiled VAE's tiles spread over the ranks (``parallel.vae``);
  * :attr:`is_leader` - the leader (the generation's first rank) returns the result, the others None;
    :attr:`shows_progress` - progress bars from rank 0 only.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from diffsynth_cog.configs import ULYSSES_TRANSPORTS as TRANSPORTS
from diffsynth_cog.denoise.windows import WindowSpec
from diffsynth_cog.models.tiling import tiles_run_by
from diffsynth_cog.parallel.call_check import check_same_call
from diffsynth_cog.parallel.comm import broadcast, broadcast_object
from diffsynth_cog.parallel.layout import ParallelError, ParallelLayout
from diffsynth_cog.parallel.mesh import ProcessMesh, build_mesh
from diffsynth_cog.parallel.peer import PeerExchange, group_timeout, peer_transport_available
from diffsynth_cog.parallel.ring import require_yunchang
from diffsynth_cog.parallel.split import ParallelSplit
from diffsynth_cog.parallel.vae import SpreadTiles, TileTimes
from diffsynth_cog.parallel.windows import WindowGroups, check_window_call
from diffsynth_cog.validators import POSITIVE_INT, one_of

logger = logging.getLogger(__name__)


class ParallelContext:
    """The distributed side of one pipeline (see the module docstring). Build it with :meth:`create`."""

    def __init__(
        self,
        mesh: ProcessMesh,
        device: torch.device,
        ulysses_head_chunks: int | None = None,
        peer: PeerExchange | None = None,
    ) -> None:
        self.mesh = mesh
        self.layout = mesh.layout
        self.device = device
        self.split = ParallelSplit(mesh, ulysses_head_chunks, peer)
        self.window_share = WindowGroups(mesh) if self.layout.windows > 1 else None
        self.tile_times = TileTimes()  # what the VAE's tiles took (seconds by tile shape): plans the next calls
        self._warned_unguided = False

    @classmethod
    def create(
        cls,
        num_heads: int,
        device: torch.device,
        layout: ParallelLayout | Callable[[int], ParallelLayout],
        *,
        timeout: timedelta | None = None,
        ulysses_head_chunks: int | None = None,
        ulysses_transport: str = "auto",
    ) -> ParallelContext:
        """The context of this rank for ``layout``, or for the layout that ``layout(world_size)`` gives (e.g.
        ``functools.partial(ParallelLayout.resolve, ring_degree=2)``). Collective: every rank calls it."""
        one_of(TRANSPORTS).require("ulysses_transport", ulysses_transport, ParallelError)
        if ulysses_head_chunks is not None:
            POSITIVE_INT.require("ulysses_head_chunks", ulysses_head_chunks, ParallelError)
        if not dist.is_available() or not dist.is_initialized():
            raise ParallelError(
                "enable_parallel needs an initialised torch.distributed process group: launch every rank with "
                "torchrun (e.g. torchrun --nproc_per_node 2 script.py) and call "
                "torch.distributed.init_process_group() first (backend 'nccl' for CUDA, 'gloo' for CPU)"
            )
        world = dist.get_world_size()
        if not isinstance(layout, ParallelLayout):
            layout = layout(world)
        if layout.world != world:
            raise ParallelError(f"the layout {layout.name()} needs {layout.world} ranks; the process group has {world}")
        layout.check_heads(num_heads)
        if layout.ring > 1:
            require_yunchang()  # before any process group or model work
        backend = dist.get_backend()
        if backend == "nccl" and device.type != "cuda":
            raise ParallelError(f"the process group uses NCCL but the pipeline's device is {device}; use a CUDA device")
        # the symmetric-memory exchange serves Ulysses alone, all heads at once, on GPUs under NCCL
        peer_fits = layout.ulysses > 1 and layout.ring == 1 and (ulysses_head_chunks or 1) == 1
        peer_runs_here = device.type == "cuda" and backend == "nccl"
        if ulysses_transport == "p2p" and not (peer_fits and peer_runs_here):
            raise ParallelError(
                "ulysses_transport='p2p' exchanges the heads of Ulysses alone (ulysses degree > 1, ring degree 1, "
                f"ulysses_head_chunks 1 or None) on CUDA devices under NCCL; got the layout {layout.name()}, "
                f"ulysses_head_chunks {ulysses_head_chunks}, {device} under {backend}: use 'nccl' or 'auto'"
            )
        timeout = timeout or group_timeout(dist.group.WORLD, device)  # new groups keep the launch's timeout
        mesh = build_mesh(layout, timeout=timeout)
        peer = None
        if ulysses_transport != "nccl" and peer_fits and peer_runs_here:
            if peer_transport_available(mesh.ulysses, device):  # collective: every rank decides alike
                peer = PeerExchange(mesh.ulysses, device, timeout)
            elif ulysses_transport == "p2p":
                raise ParallelError(
                    "ulysses_transport='p2p' needs the ranks of each Ulysses group on one host, with GPUs that map "
                    "each other's memory (NVLink or PCIe peer access; the log says what failed): use 'nccl' or 'auto'"
                )
        logger.info(
            "parallel generation: %s on %d ranks (%s%s)",
            layout.name(),
            layout.world,
            backend,
            ", Ulysses over symmetric memory" if peer is not None else "",
        )
        return cls(mesh, device, ulysses_head_chunks, peer)

    @property
    def ulysses_transport(self) -> str:
        """How Ulysses exchanges heads here: "p2p" (symmetric memory) or "nccl"."""
        return "p2p" if self.split.peer is not None else "nccl"

    # -- per call --------------------------------------------------------------------------------

    @property
    def is_leader(self) -> bool:
        """This rank returns the generation's result (the others return None)."""
        return self.mesh.is_leader

    @property
    def shows_progress(self) -> bool:
        """Progress bars (and one-off warnings) come from rank 0 only, whatever the groups."""
        return self.mesh.rank == 0

    @property
    def _group(self) -> dist.ProcessGroup | None:
        return self.mesh.generation

    def check_call(self, arguments: Mapping[str, Any]) -> None:
        """Raises ParallelError on every rank of the generation unless all passed equal arguments."""
        if self._group is not None:
            check_same_call(arguments, self._group, list(self.mesh.generation_ranks), self.device)

    def check_windows(self, windows: WindowSpec | None, latent_frames: int) -> None:
        """Raises ParallelError (on every rank alike) unless the window groups can share the call's windows."""
        check_window_call(self.layout, windows, latent_frames)

    def shared_seed(self, seed: int | None) -> int | None:
        """``seed``, or for None one fresh seed drawn by the leader and shared with the generation."""
        if seed is not None or self._group is None:
            return seed
        fresh = int.from_bytes(os.urandom(8), "little") >> 1 if self.is_leader else None
        seed = broadcast_object(fresh, self.mesh.leader, self._group, "sharing the fresh seed", self.device)
        logger.info("seed: %d", seed)
        return seed

    def note_guidance(self, guided: bool) -> None:
        if not guided and self.layout.cfg > 1 and not self._warned_unguided and self.shows_progress:
            self._warned_unguided = True
            logger.warning(
                "cfg_scale <= 1 leaves one batch row: the %d CFG halves compute the same call (no speed-up); "
                "enable_parallel(cfg_parallel=False) gives those ranks to the sequence split",
                self.layout.cfg,
            )

    def encode_text(
        self,
        encode: Callable[[Any], torch.Tensor],
        dtype: torch.dtype,
        prompt: Any,
        negative_prompt: Any,
        *,
        guided: bool,
        prompt_emb: torch.Tensor | None,
        negative_prompt_emb: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The call's prompt embeddings (and the negative ones with guidance) on every rank, each text
        encoded by one rank of the generation (T5 runs once per text): ``encode(text)`` -> [B, L, D] in ``dtype``."""
        if self._group is None:
            return prompt_emb, negative_prompt_emb
        todo = []  # (slot, text) of the embeddings to compute
        if prompt_emb is None:
            todo.append(("prompt", prompt))
        if guided and negative_prompt_emb is None:
            todo.append(("negative", negative_prompt))
        ranks = self.mesh.generation_ranks
        out = {"prompt": prompt_emb, "negative": negative_prompt_emb}
        owners = [ranks[(j * len(ranks)) // len(todo)] for j in range(len(todo))]
        for (slot, text), owner in zip(todo, owners, strict=True):
            if owner == self.mesh.rank:
                out[slot] = encode(text).contiguous()
        for (slot, _), owner in zip(todo, owners, strict=True):
            emb = out[slot]
            shape = torch.zeros(3, dtype=torch.int64, device=self.device)
            if emb is not None:
                shape.copy_(torch.tensor(emb.shape))
            broadcast(shape, owner, self._group, f"sharing the {slot} embeddings (shape)")
            if emb is None:
                emb = torch.empty(shape.tolist(), dtype=dtype, device=self.device)
            out[slot] = broadcast(emb, owner, self._group, f"sharing the {slot} embeddings")
        return out["prompt"], out["negative"]

    @contextlib.contextmanager
    def spread_tiles(self) -> Iterator[None]:
        """Inside the block, tiled VAE calls spread their tiles over the generation's ranks."""
        if self._group is None:
            yield
            return
        runner = SpreadTiles(self._group, self.mesh.generation_ranks, self.mesh.rank, self.device, self.tile_times)
        with tiles_run_by(runner):
            yield
