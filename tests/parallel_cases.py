"""What each rank runs in the distributed CPU tests (tests/test_parallel.py): tiny pipelines and scenarios.

Module-level functions, so that spawned processes can import them. Every scenario computes the
one-process result in the same process first (``disable_parallel``), then the parallel one, and
returns numbers for the test to check.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from PIL import Image
from tiny_models import randomize_

from diffsynth_cog.configs import DiTConfig, VAEConfig
from diffsynth_cog.denoise.step_cache import StepCache
from diffsynth_cog.models.dit import CogDiT
from diffsynth_cog.models.vae import CogVAE
from diffsynth_cog.pipeline.cog_video import CogVideoPipeline

HEIGHT, WIDTH, FRAMES = 32, 48, 17  # 4 x 6 latents, 5 latent frames: 7 text + 30 video = 37 tokens (prime)
TEXT_TOKENS = 7
PRESETS = {
    # tiny, with the real presets' structure; heads: 5B's 48 divide by 2 and 4, 2B's 30 by 2 and 3, not 4
    "5b": dict(num_attention_heads=4, in_channels=4, use_rotary_positional_embeddings=True),
    "2b": dict(num_attention_heads=6, in_channels=4, use_rotary_positional_embeddings=False),
    "5b-i2v": dict(
        num_attention_heads=4,
        in_channels=8,
        use_rotary_positional_embeddings=True,
        use_learned_positional_embeddings=True,
    ),
}


def tiny_pipeline(
    preset: str, seed: int = 0, text_folder: str | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> CogVideoPipeline:
    config = DiTConfig(
        attention_head_dim=16,
        out_channels=4,
        time_embed_dim=16,
        text_embed_dim=32,
        num_layers=2,
        sample_width=6,
        sample_height=4,
        sample_frames=9,
        max_text_seq_length=TEXT_TOKENS,
        patch_size=2,
        temporal_compression_ratio=4,
        **PRESETS[preset],
    )
    dit = randomize_(CogDiT(config), seed).eval()
    vae = CogVAE(
        VAEConfig(
            block_out_channels=(8, 8, 16, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            sample_height=32,
            sample_width=48,
        )
    )
    randomize_(vae, seed, scale=0.1).eval()
    text_encoder = None
    if text_folder is not None:
        from diffsynth_cog.loading.text_encoder_loader import load_text_encoder

        text_encoder = load_text_encoder(text_folder, max_length=TEXT_TOKENS)
    preset_name = "cogvideox-2b" if preset == "2b" else "cogvideox-5b"
    from diffsynth_cog.schedulers import scheduler_preset

    for model in (dit, vae, text_encoder):
        if model is not None:
            model.to(device, dtype)
    return CogVideoPipeline(
        dit, text_encoder, vae.encoder, vae.decoder, scheduler_preset(preset_name), device=device, torch_dtype=dtype
    )


def call_inputs(kind: str = "t2v", seed: int = 0) -> dict[str, Any]:
    """The arguments of one test generation (3 steps, final latents)."""
    g = torch.Generator().manual_seed(seed)
    kwargs: dict[str, Any] = dict(
        prompt_emb=torch.randn(1, TEXT_TOKENS, 32, generator=g),
        negative_prompt_emb=torch.randn(1, TEXT_TOKENS, 32, generator=g),
        height=HEIGHT,
        width=WIDTH,
        num_frames=FRAMES,
        num_inference_steps=3,
        seed=11,
        output_type="latent",
        progress_bar=False,
        tiled=True,
    )
    if kind == "i2v":
        pixels = (torch.rand(HEIGHT, WIDTH, 3, generator=g) * 255).to(torch.uint8).numpy()
        kwargs["input_image"] = Image.fromarray(pixels)
    elif kind == "v2v":
        kwargs["input_video"] = torch.rand(1, 3, FRAMES, HEIGHT, WIDTH, generator=g) * 2 - 1
        kwargs["denoising_strength"] = 0.7
    return kwargs


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


_PIPES: dict[str, CogVideoPipeline] = {}
_CONTEXTS: dict[tuple, Any] = {}


def _pipe(preset: str, text_folder: str | None = None) -> CogVideoPipeline:
    key = f"{preset}:{text_folder}"
    if key not in _PIPES:
        _PIPES[key] = tiny_pipeline(preset, text_folder=text_folder)
    return _PIPES[key]


def _enable(pipe: CogVideoPipeline, layout: dict[str, Any]) -> None:
    """enable_parallel, reusing the process groups of a layout seen before (new_group is collective and slow)."""
    key = (id(pipe), tuple(sorted(layout.items())))
    if key not in _CONTEXTS:
        pipe.enable_parallel(**layout)
        _CONTEXTS[key] = pipe.parallel
    pipe.parallel = _CONTEXTS[key]


def generations(rank: int, world: int, cases: list[dict[str, Any]]) -> dict[str, Any]:
    """Each case: {name, preset, layout (enable_parallel kwargs), kind (t2v/i2v/v2v), call (overrides)}.
    Returns per case: the relative difference of the leader's final latents from the one-process run here,
    and whether this rank got a result."""
    out = {}
    for case in cases:
        pipe = _pipe(case["preset"])
        kwargs = {**call_inputs(case.get("kind", "t2v")), **case.get("call", {})}
        threshold = kwargs.pop("step_cache", None)
        caches = [StepCache(threshold) if threshold is not None else None for _ in range(2)]
        pipe.disable_parallel()
        expected = pipe(**kwargs, step_cache=caches[0])
        _enable(pipe, case["layout"])
        got = pipe(**kwargs, step_cache=caches[1])
        out[case["name"]] = {
            "rel": None if got is None else rel(got, expected),
            "returned": got is not None,
            "split": pipe.parallel.split.name,
            "skipped": [None if c is None else c.stats()["skipped_steps"] for c in caches],
        }
        pipe.disable_parallel()
    return out


def vae_roundtrip(rank: int, world: int) -> dict[str, Any]:
    """Tiled decode and encode, one process vs spread over the ranks."""
    pipe = _pipe("5b")
    g = torch.Generator().manual_seed(5)
    latents = torch.randn(1, 4, 5, 8, 12, generator=g)  # 64 x 96 px: several tiles of the tiny VAE (16 x 24 px)
    video = torch.rand(1, 3, FRAMES, 64, 96, generator=g) * 2 - 1
    decoded = pipe.decode_latents(latents, tiled=True, progress=False)
    encoded = pipe.encode_video(video, tiled=True, generator=torch.Generator().manual_seed(3))
    untiled = pipe.decode_latents(latents[..., :4, :6], tiled=False, progress=False)
    _enable(pipe, {"cfg_parallel": False})
    p_decoded = pipe.decode_latents(latents, tiled=True, progress=False)
    p_encoded = pipe.encode_video(video, tiled=True, generator=torch.Generator().manual_seed(3))
    p_untiled = pipe.decode_latents(latents[..., :4, :6], tiled=False, progress=False)
    timed = pipe.decode_latents(latents, tiled=True, progress=False)  # planned by the first call's tile times
    times = dict(pipe.parallel.tile_times.seconds)
    pipe.disable_parallel()
    return {
        "decode_equal": torch.equal(decoded, p_decoded),
        "timed_decode_equal": torch.equal(decoded, timed),
        "tile_times": times,
        "encode_equal": torch.equal(encoded, p_encoded),
        "untiled_equal": torch.equal(untiled, p_untiled),
        "decode_shape": tuple(p_decoded.shape),
    }


def text_once(rank: int, world: int, text_folder: str) -> dict[str, Any]:
    """Prompts through T5: each text encoded by one rank; the result equals the one-process run."""
    pipe = _pipe("5b", text_folder)
    calls: list[str] = []
    original = pipe.encode_prompt

    def counting(prompt):  # noqa: ANN001, ANN202
        calls.append(prompt)
        return original(prompt)

    pipe.encode_prompt = counting  # type: ignore[method-assign]
    kwargs = {**call_inputs(), "prompt": "a red fox running in the snow", "negative_prompt": "blurry"}
    del kwargs["prompt_emb"], kwargs["negative_prompt_emb"]
    expected = pipe(**kwargs)
    calls.clear()
    _enable(pipe, {"cfg_parallel": True})
    got = pipe(**kwargs)
    pipe.disable_parallel()
    return {"calls": list(calls), "rel": None if got is None else rel(got, expected)}


def mismatched_calls(rank: int, world: int) -> dict[str, Any]:
    """Rank 1 asks for another seed, then another prompt embedding: every rank must refuse, naming it."""
    pipe = _pipe("5b")
    _enable(pipe, {"cfg_parallel": False})
    errors = {}
    for name, change in (("seed", {"seed": 12}), ("prompt_emb", {"prompt_emb": torch.zeros(1, TEXT_TOKENS, 32)})):
        kwargs = {**call_inputs(), **(change if rank == 1 else {})}
        try:
            pipe(**kwargs)
            errors[name] = None
        except Exception as e:  # noqa: BLE001
            errors[name] = f"{type(e).__name__}: {e}"
    pipe.disable_parallel()
    return errors


def rank_stops(rank: int, world: int, hang_s: float, timeout_s: float | None) -> dict[str, Any]:
    """The last rank stops answering in the middle of the second step (sleeps ``hang_s``, then exits); the
    others must fail with a clear error after about the process groups' timeout (``timeout_s`` given to
    enable_parallel, or with None the launch's, which the new groups keep), not wait for it."""
    from datetime import timedelta

    pipe = _pipe("5b")
    pipe.enable_parallel(cfg_parallel=False, timeout=None if timeout_s is None else timedelta(seconds=timeout_s))

    def stop(i, t, x):  # noqa: ANN001, ANN202
        if rank == world - 1 and i == 1:
            time.sleep(hang_s)
            os._exit(3)

    start = time.monotonic()
    try:
        pipe(**call_inputs(), callback=stop)
        error = None
    except Exception as e:  # noqa: BLE001
        error = f"{type(e).__name__}: {e}"
    return {"error": error, "seconds": time.monotonic() - start}


def bad_layouts(rank: int, world: int) -> dict[str, str]:
    """Layouts that cannot work: each must be refused with a message (on every rank, before any work)."""
    errors = {}
    for name, preset, layout in (
        ("product", "5b", {"cfg_parallel": True, "ulysses_degree": world, "ring_degree": 1}),
        ("heads", "2b", {"cfg_parallel": False, "ulysses_degree": 4, "ring_degree": world // 4}),
        ("p2p-ring", "5b", {"cfg_parallel": False, "ulysses_degree": 2, "ring_degree": 2, "ulysses_transport": "p2p"}),
        ("p2p-cpu", "5b", {"cfg_parallel": False, "ulysses_transport": "p2p"}),
    ):
        try:
            _pipe(preset).enable_parallel(**layout)
            errors[name] = "accepted"
        except Exception as e:  # noqa: BLE001
            errors[name] = f"{type(e).__name__}: {e}"
    return errors


def compositions(rank: int, world: int) -> dict[str, Any]:
    """The split composes with the other parts and modes: DiT tiles, int8 weights, compiled blocks."""
    from diffsynth_cog.models.tiling import TileSpec
    from diffsynth_cog.quantization import quantize_dit

    out = {}
    pipe = tiny_pipeline("5b", seed=1)
    tiles = {"dit_tiled": TileSpec((16, 32), (0.0, 0.5))}
    for name, layout, extra in (
        ("dit-tiles-u2", {"cfg_parallel": False}, tiles),
        ("dit-tiles-ring2", {"cfg_parallel": False, "ulysses_degree": 1, "ring_degree": 2}, tiles),
    ):
        kwargs = {**call_inputs(), **extra}
        pipe.disable_parallel()
        expected = pipe(**kwargs)
        _enable(pipe, layout)
        got = pipe(**kwargs)
        out[name] = None if got is None else rel(got, expected)
    quantize_dit(pipe.dit, "int8")
    eager = {}
    for name, layout in (
        ("int8-u2", {"cfg_parallel": False}),
        ("int8-ring2", {"ring_degree": 2, "cfg_parallel": False, "ulysses_degree": 1}),
    ):
        pipe.disable_parallel()
        eager[name] = expected = pipe(**call_inputs())
        _enable(pipe, layout)
        got = pipe(**call_inputs())
        out[name] = None if got is None else rel(got, expected)
    # fullgraph: the sequence-parallel attention is one opaque op, so no collective breaks a block's graph
    pipe.dit.compile_blocks(backend="aot_eager", fullgraph=True)
    for name, layout in (
        ("compiled-int8-u2", {"cfg_parallel": False}),
        ("compiled-int8-ring2", {"ring_degree": 2, "cfg_parallel": False, "ulysses_degree": 1}),
    ):
        _enable(pipe, layout)
        got = pipe(**call_inputs())
        out[name] = None if got is None else rel(got, eager[name.removeprefix("compiled-")])
    pipe.disable_parallel()
    return out


TWO_RANK_CASES = [
    dict(name="cfg2", preset="5b", layout={"cfg_parallel": True}),
    dict(name="ulysses2", preset="5b", layout={"cfg_parallel": False}),
    dict(name="ring2", preset="5b", layout={"cfg_parallel": False, "ulysses_degree": 1, "ring_degree": 2}),
    dict(name="2b-ulysses2", preset="2b", layout={"cfg_parallel": False}),
    # the default exchanges all heads at once: 2 pipelined groups of heads, and 3 of 1 head each
    dict(name="ulysses2-two-head-groups", preset="5b", layout={"cfg_parallel": False, "ulysses_head_chunks": 2}),
    dict(name="2b-ulysses2-three-head-groups", preset="2b", layout={"cfg_parallel": False, "ulysses_head_chunks": 3}),
    dict(
        name="2b-ring2-dpm",
        preset="2b",
        layout={"cfg_parallel": False, "ring_degree": 2, "ulysses_degree": 1},
        call={"sampler": "dpm"},
    ),
    dict(name="i2v-ulysses2", preset="5b-i2v", kind="i2v", layout={"cfg_parallel": False}),
    # a window computed frame by frame over the gathered (padded: 37 tokens) sequence
    dict(
        name="window-frame-ulysses2", preset="5b", layout={"cfg_parallel": False}, call={"attention": "window:1:frame"}
    ),
    dict(name="v2v-cfg2", preset="5b", kind="v2v", layout={"cfg_parallel": True}),
    dict(
        name="v2v-ring2", preset="5b", kind="v2v", layout={"cfg_parallel": False, "ulysses_degree": 1, "ring_degree": 2}
    ),
    dict(
        name="step-cache-ulysses2",
        preset="5b",
        layout={"cfg_parallel": False},
        call={"step_cache": 1.0, "num_inference_steps": 8},
    ),
]

FOUR_RANK_CASES = [
    dict(name="cfg2xulysses2", preset="5b", layout={"cfg_parallel": True}),
    dict(name="cfg2xring2", preset="5b", layout={"cfg_parallel": True, "ulysses_degree": 1, "ring_degree": 2}),
    dict(name="ulysses2xring2", preset="5b", layout={"cfg_parallel": False, "ulysses_degree": 2, "ring_degree": 2}),
    dict(name="ulysses4", preset="5b", layout={"cfg_parallel": False}),
    dict(name="2b-ring4", preset="2b", layout={"cfg_parallel": False, "ulysses_degree": 1, "ring_degree": 4}),
    dict(name="2b-cfg2xulysses2-dpm", preset="2b", layout={"cfg_parallel": True}, call={"sampler": "dpm"}),
    dict(
        name="i2v-cfg2xring2",
        preset="5b-i2v",
        kind="i2v",
        layout={"cfg_parallel": True, "ulysses_degree": 1, "ring_degree": 2},
    ),
    dict(
        name="v2v-ulysses2xring2",
        preset="5b",
        kind="v2v",
        layout={"cfg_parallel": False, "ulysses_degree": 2, "ring_degree": 2},
    ),
    dict(
        name="step-cache-cfg2xulysses2",
        preset="5b",
        layout={"cfg_parallel": True},
        call={"step_cache": 1.0, "num_inference_steps": 8},
    ),
    dict(name="unguided-cfg2xulysses2", preset="5b", layout={"cfg_parallel": True}, call={"cfg_scale": 1.0}),
    dict(name="2-groups-of-ulysses2", preset="5b", layout={"cfg_parallel": False, "group_size": 2}),
]


def ulysses_exchanges(rank: int, world: int) -> dict[str, float]:
    """The pipelined Ulysses round trip (``ulysses_attention``) against attention over the whole sequence in one
    process: uneven token shards, a batch of 2, 6 heads (3 per rank) cut into 1, 2 (uneven) and 3 groups; and
    against the differentiable exchange the trainer uses. Returns rel errors by name."""
    import torch.distributed as dist
    import torch.nn.functional as F

    from diffsynth_cog.parallel.layout import shard_bounds
    from diffsynth_cog.parallel.ulysses import heads_to_tokens, tokens_to_heads, ulysses_attention

    def attend(q, k, v):  # [B, L, H, D], strided inputs welcome (as the kernels)
        return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 37, 6, 8, generator=g) for _ in range(3))  # 37 tokens: shards of 19 and 18
    whole = attend(q, k, v)
    bounds = shard_bounds(37, world)
    lengths = [e - s for s, e in bounds]
    start, end = bounds[rank]
    mine = [t[:, start:end] for t in (q, k, v)]
    group = dist.group.WORLD
    out = {}
    for chunks in (1, 2, 3):
        got = ulysses_attention(*mine, attend, lengths, rank, group, head_chunks=chunks)
        out[f"chunks{chunks}"] = rel(got, whole[:, start:end])
    heads = tokens_to_heads(mine, lengths, group)
    out["differentiable"] = rel(heads_to_tokens(attend(*heads), lengths, rank, group), whole[:, start:end])
    return out


def two_rank_session(rank: int, world: int, text_folder: str) -> dict[str, Any]:
    return {
        "ulysses": ulysses_exchanges(rank, world),
        "generations": generations(rank, world, TWO_RANK_CASES),
        "vae": vae_roundtrip(rank, world),
        "text": text_once(rank, world, text_folder),
        "mismatch": mismatched_calls(rank, world),
        "compositions": compositions(rank, world),
    }


def four_rank_session(rank: int, world: int) -> dict[str, Any]:
    return {"generations": generations(rank, world, FOUR_RANK_CASES), "bad_layouts": bad_layouts(rank, world)}


def gpu_session(rank: int, world: int, device_type: str = "cuda") -> dict[str, Any]:
    """On CUDA with NCCL: fp32 layouts against the one-GPU latents (exact), then bf16 with the default kernel
    (FlashAttention-3 on Hopper when installed, else cuDNN) eager and with fullgraph-compiled blocks."""
    if device_type == "cuda":
        torch.cuda.set_device(rank)
    device = f"cuda:{rank}" if device_type == "cuda" else device_type
    out: dict[str, Any] = {}
    layouts = {
        "cfg2": {"cfg_parallel": True},
        "ulysses2": {"cfg_parallel": False},  # over symmetric memory where the GPUs map each other's memory
        "ulysses2-nccl": {"cfg_parallel": False, "ulysses_transport": "nccl"},
        "ring2": {"cfg_parallel": False, "ulysses_degree": 1, "ring_degree": 2},
    }
    truth = None  # the one-GPU fp32 latents: bf16 runs are judged by their distance to them
    for dtype in (torch.float32, torch.bfloat16):
        pipe = tiny_pipeline("5b", device=device, dtype=dtype)
        kind = str(dtype).removeprefix("torch.")
        kwargs = call_inputs()
        expected = pipe(**kwargs)
        truth = expected.float().cpu() if truth is None else truth
        out[f"{kind}-single-vs-fp32"] = rel(expected.cpu(), truth)
        for name, layout in layouts.items():
            _enable(pipe, layout)
            got = pipe(**kwargs)
            if got is not None:
                out[f"{name}-transport"] = pipe.parallel.ulysses_transport
                out[f"{kind}-{name}"] = rel(got.cpu(), expected.cpu())
                out[f"{kind}-{name}-vs-fp32"] = rel(got.cpu(), truth)
            pipe.disable_parallel()
        decoded = pipe.decode_latents(expected, tiled=True, progress=False)
        _enable(pipe, layouts["ulysses2"])
        out[f"{kind}-vae-decode-equal"] = torch.equal(
            decoded, pipe.decode_latents(expected, tiled=True, progress=False)
        )
        pipe.disable_parallel()
    # compiled blocks in one graph around the sequence-parallel op (one compile: Ulysses only)
    pipe.dit.compile_blocks(fullgraph=True)
    _enable(pipe, layouts["ulysses2"])
    got = pipe(**kwargs)
    if got is not None:
        out["bfloat16-compiled-ulysses2-vs-fp32"] = rel(got.cpu(), truth)
    pipe.disable_parallel()
    return out


def peer_agreement(rank: int, world: int) -> dict[str, bool]:
    """How the ranks decide on the symmetric-memory transport (run on gloo: the decision, not the transfer)."""
    import socket

    import torch.distributed as dist

    from diffsynth_cog.parallel import peer

    group, cpu = dist.new_group(list(range(world))), torch.device("cpu")

    def fails() -> None:
        raise RuntimeError("no peer access")

    out = {
        "one-host": peer.agree_on_peer_transport(group, cpu, lambda: None),
        "trial-fails-on-the-last-rank": peer.agree_on_peer_transport(
            group, cpu, fails if rank == world - 1 else (lambda: None)
        ),
    }
    socket.gethostname = lambda: f"host{rank}"  # this process only
    out["two-hosts"] = peer.agree_on_peer_transport(group, cpu, lambda: None)
    out["no-group-here"] = peer.agree_on_peer_transport(None, cpu, lambda: None)
    return out
