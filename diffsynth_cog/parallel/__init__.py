"""Generation on several GPUs: one video shared by many ranks, or a batch of videos over rank groups.

Launch with torchrun; every rank builds the pipeline on its own GPU, then::

    torch.distributed.init_process_group("nccl")
    pipe.enable_parallel(cfg_parallel=True, ulysses_degree=None, ring_degree=1)
    video = pipe(prompt=..., num_frames=129)  # the same call on every rank; rank 0 gets it, others None

The parts, one concept per module:
  * ``layout``     - degrees (groups x CFG x ring x Ulysses), their checks, the token shards;
  * ``mesh``       - the process groups of a layout;
  * ``split``      - the denoiser's TokenSplit: CFG rows x token shards, gather of the outputs;
  * ``sequence``   - the attention of a token shard (Ulysses, then ring or the call's own attention);
  * ``ulysses`` / ``ring`` / ``block_attention`` - the all-to-all, the ring, the per-block kernels;
  * ``peer``       - the Ulysses exchange over symmetric memory (copy engines, one host);
  * ``vae``        - the tiled VAE's tiles spread over the ranks;
  * ``call_check`` - every rank must make the same call;
  * ``context``    - what the pipeline holds: the hooks of its stages;
  * ``launch``     - torchrun's environment -> process group and device (for scripts and the CLI);
  * ``prompts``    - a file of prompts spread over rank groups, resumable.
"""

from diffsynth_cog.parallel.context import ParallelContext
from diffsynth_cog.parallel.layout import ParallelError, ParallelLayout, shard_bounds

__all__ = ["ParallelContext", "ParallelError", "ParallelLayout", "shard_bounds"]
