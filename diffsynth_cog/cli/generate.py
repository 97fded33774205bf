"""``diffsynth-cog generate``: its options, and the run (one video, or a prompt file spread over rank groups).

    diffsynth-cog generate --prompt "an astronaut riding a horse on Mars." --num-frames 129 --output video.mp4
    torchrun --nproc_per_node 2 -m diffsynth_cog.cli generate --prompt "..."    (one video on 2 GPUs)
    torchrun --nproc_per_node 8 -m diffsynth_cog.cli generate --prompts prompts.txt --output-dir videos

Every input is checked (``cli_checks.check_generate_args``) before any download or model load. Imported when the
command line starts, so nothing heavy (torch, the models) is imported at the top.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from diffsynth_cog.cli.checks import ATTENTION_BACKENDS, DEFAULT_MODEL, DTYPES
from diffsynth_cog.configs import ULYSSES_TRANSPORTS as TRANSPORTS

if TYPE_CHECKING:
    from diffsynth_cog.parallel.layout import ParallelLayout

logger = logging.getLogger("diffsynth_cog.cli.main")


def add_generate_command(sub: argparse._SubParsersAction) -> None:
    """Registers ``generate`` on the command line's sub-parsers."""
    p = sub.add_parser(
        "generate",
        help="generate a video from text (or edit a video, or animate an image)",
        description="Generate a video. With the defaults: CogVideoX-5B + the ExVideo 129-frame LoRA, 480x720, "
        "129 frames. Models missing under --models-dir are downloaded from ModelScope first.",
    )
    p.add_argument(
        "--prompt",
        help="what the video shows (T5 reads about 226 tokens of it); required unless --prompts (default: none)",
    )
    p.add_argument(
        "--prompts",
        metavar="FILE",
        help="a batch instead of --prompt: one prompt per line, or JSON lines {prompt, negative_prompt, seed, "
        "num_frames, output}; outputs that exist are skipped (a re-run resumes); under torchrun spread over groups "
        "of --group-size ranks (default: none, one video from --prompt)",
    )
    p.add_argument("--negative-prompt", default="", help="what guidance steers away from (default: empty)")
    p.add_argument(
        "--output", default="video.mp4", help="video file to write: .mp4, .mkv or .mov (H.264); see --overwrite"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --output (it stays until the new video is complete); without it an existing "
        "file is refused before anything is loaded",
    )
    p.add_argument("--output-dir", default="videos", help="where --prompts writes its videos")
    p.add_argument("--models-dir", default="models", help="where downloaded models live")
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="a download preset (CogVideoX-2B, CogVideoX-5B, CogVideoX-5B-I2V) or a local model folder "
        "(text_encoder/, tokenizer/, transformer/, vae/, scheduler/)",
    )
    p.add_argument(
        "--lora",
        default="auto",
        help="LoRA .safetensors file or preset to merge; 'auto' = the ExVideo 129-frame LoRA when --num-frames > 49 "
        "with a CogVideoX-5B model (a preset or a local folder; taken from --models-dir, else downloaded), "
        "'none' = no LoRA",
    )
    p.add_argument("--lora-alpha", type=float, default=1.0, help="strength of the merged LoRA")
    p.add_argument("--num-frames", type=int, default=129, help="8k+1 frames (49 base, 129 with ExVideo)")
    p.add_argument("--height", type=int, default=480, help="pixels, a multiple of 16")
    p.add_argument("--width", type=int, default=720, help="pixels, a multiple of 16")
    p.add_argument("--steps", type=int, default=50, help="denoising steps (DiffSynth's ExVideo example uses 100)")
    p.add_argument("--cfg-scale", type=float, default=7.0, help="classifier-free guidance, >= 0 (<= 1 turns it off)")
    p.add_argument("--dynamic-cfg", action="store_true", help="guidance growing over the steps")
    p.add_argument(
        "--sampler",
        choices=["ddim", "dpm", "diffsynth"],
        default="ddim",
        help="ddim, dpm, or diffsynth: DiffSynth-Studio 1.1.x's own DDIM and seed conventions",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    p.add_argument("--fps", type=int, default=8, help="frames per second of the written video")
    p.add_argument("--quality", type=int, default=5, help="video quality 1-10 (10: near lossless)")
    p.add_argument("--input-image", help="image to animate (needs CogVideoX-5B-I2V; default: none)")
    p.add_argument("--input-video", help="video to edit (video-to-video; default: none)")
    p.add_argument("--denoising-strength", type=float, default=0.7, help="for --input-video, in (0, 1]")
    p.add_argument(
        "--device",
        default="auto",
        help="auto (the GPU when torch sees one, else the CPU, and says which), cpu, cuda or cuda:N",
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="weights' dtype")
    p.add_argument(
        "--offload",
        choices=["none", "model", "sequential"],
        default="none",
        help="memory mode: model = each model on the GPU only while it runs, sequential = block by block",
    )
    p.add_argument("--no-tiled-vae", action="store_true", help="decode without spatial tiling (more memory)")
    p.add_argument(
        "--quantize",
        choices=["none", "fp8", "int8"],
        default="none",
        help="DiT linear layers in fp8 (faster on Hopper/Ada, ~2%% error) or int8 weights (half the DiT memory)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile each DiT block (faster after warm-up)")
    p.add_argument(
        "--attention",
        choices=list(ATTENTION_BACKENDS),
        default="auto",
        help="attention kernel: auto picks FlashAttention-3 on Hopper when installed (pip install fa3-fwd), else "
        "cuDNN; fa3-fp8 is a faster fp8 approximation (Hopper), sage an 8-bit one",
    )
    p.add_argument(
        "--step-cache",
        type=float,
        default=0.0,
        help="skip DiT steps whose output should barely change, below this threshold (0 = off, exact); TeaCache "
        "(0.1-0.3) on CogVideoX-5B, else the first-block cache (0.05-0.2)",
    )
    p.add_argument(
        "--step-cache-method",
        choices=["auto", "teacache", "first-block"],
        default="auto",
        help="auto: TeaCache where the model has a calibration (CogVideoX-5B), else first-block",
    )
    _add_long_video(p)
    p.add_argument("--no-download", action="store_true", help="never download; fail if models are missing")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_parallel_options(p)
    p.set_defaults(func=cmd_generate)


def _add_long_video(p: argparse.ArgumentParser) -> None:
    """Options for videos longer than the trained length (README "Longer videos")."""
    g = p.add_argument_group("longer videos")
    g.add_argument(
        "--riflex",
        type=int,
        nargs="*",
        metavar="K N_K",
        help="RIFLEx temporal RoPE (5B): alone = the published setting (k=2, N_k=20), or give K N_K (default: off)",
    )
    g.add_argument(
        "--sparse-attention",
        metavar="SPEC",
        help="block-sparse attention mask (FlexAttention): window:W (+-W latent frames, text global, first frame a "
        "sink), window:W:nosink, radial, radial:DECAY, decided per 128-token block; append :token for the "
        "token-exact mask, e.g. window:2:token (default: dense attention)",
    )
    g.add_argument(
        "--window-frames",
        type=int,
        metavar="F",
        help="denoise overlapping windows of F (4k+1) frames: any length at the memory of one window (default: no "
        "windows)",
    )
    g.add_argument("--window-overlap", type=float, default=0.25, help="fraction of a window shared with the next")
    g.add_argument(
        "--extend-by",
        type=int,
        default=0,
        metavar="N",
        help="with --input-video: continue that video by N frames (a multiple of 8); writes the whole video (default 0: no)",
    )
    g.add_argument(
        "--context-frames", type=int, default=17, help="with --extend-by: frames of context (8k+1; default 17)"
    )


def _long_video_options(args: argparse.Namespace) -> dict:
    """The pipeline keywords of the "longer videos" options, checked before any model is loaded."""
    from diffsynth_cog.denoise.masks import parse_attention
    from diffsynth_cog.denoise.windows import WindowSpec

    options: dict = {}
    if args.riflex is not None:
        if len(args.riflex) not in (0, 2):
            raise ValueError(f"--riflex takes no value or two (K N_K); got {args.riflex}")
        options["riflex"] = tuple(args.riflex) if args.riflex else True
    if args.sparse_attention:
        options["attention"] = parse_attention(args.sparse_attention)
    if args.window_frames:
        options["windows"] = WindowSpec(args.window_frames, args.window_overlap)
    if args.extend_by and not args.input_video:
        raise ValueError("--extend-by continues a video: give it with --input-video")
    if args.step_cache:
        options["step_cache"] = f"{args.step_cache_method}:{args.step_cache}"
    return options


def _add_parallel_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "several GPUs (launch with torchrun --nproc_per_node N -m diffsynth_cog.cli generate ...)",
        "Every rank shares each video by default: CFG halves on two rank groups when the group size is even, the "
        "token sequence split over the rest (Ulysses).",
    )
    g.add_argument(
        "--cfg-parallel",
        choices=["auto", "on", "off"],
        default="auto",
        help="the unconditional / conditional halves on two rank groups (auto: when the ranks of a video are even)",
    )
    g.add_argument("--ulysses", type=int, default=None, help="Ulysses degree (default: the ranks that are left)")
    g.add_argument("--ring", type=int, default=1, help="ring-attention degree (default 1)")
    g.add_argument(
        "--window-parallel",
        type=_window_groups,
        default=1,
        metavar="N|auto",
        help="with --window-frames: N window groups each run a share of every step's windows, CFG / Ulysses inside "
        "each; auto: window groups when the video has at least as many windows as groups and they are faster "
        "(default 1)",
    )
    g.add_argument(
        "--ulysses-transport",
        choices=TRANSPORTS,
        default="auto",
        help="how Ulysses moves heads: p2p (copy engines into the other GPUs' memory; one host), nccl (all-to-all; "
        "any link), auto (p2p where it works, default)",
    )
    g.add_argument(
        "--group-size",
        type=int,
        default=None,
        help="ranks per video (default: all with --prompt; with --prompts, the product of the degrees given, or 1)",
    )
    g.add_argument(
        "--dist-timeout",
        type=float,
        default=600.0,
        help="seconds a rank waits for the others before the run stops with an error (default 600)",
    )


def _window_groups(value: str) -> int | str:
    """--window-parallel: a number of window groups, or "auto"."""
    if value == "auto" or value.isdigit() and int(value) >= 1:
        return value if value == "auto" else int(value)
    raise argparse.ArgumentTypeError(f"a number of window groups >= 1 or 'auto'; got {value!r}")


def _parallel_layout(args: argparse.Namespace, world: int, batch: bool, windows_per_step: int = 1) -> ParallelLayout:
    """enable_parallel's layout from the options (see _add_parallel_options); ``windows_per_step`` for
    ``--window-parallel auto``."""
    from diffsynth_cog.parallel.layout import ParallelLayout

    return ParallelLayout.from_options(
        world,
        cfg_parallel=args.cfg_parallel,
        ulysses=args.ulysses,
        ring=args.ring,
        group_size=args.group_size,
        batch=batch,
        guided=args.cfg_scale > 1,
        windows=args.window_parallel,
        windows_per_step=windows_per_step,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from diffsynth_cog.cli.checks import check_generate_args
    from diffsynth_cog.models.attention import set_attention_backend
    from diffsynth_cog.parallel.launch import init_distributed, shutdown_distributed
    from diffsynth_cog.parallel.prompts import read_prompt_file

    # First: every input (a missing kernel package, bad long-video options, a bad prompt file) fails before any
    # download or loading.
    if (args.prompt is None) == (args.prompts is None):
        raise ValueError("give exactly one of --prompt TEXT and --prompts FILE")
    jobs = read_prompt_file(args.prompts, args.output_dir) if args.prompts else None
    set_attention_backend(args.attention)
    options = _long_video_options(args)
    plan = check_generate_args(args)
    launch = init_distributed(args.device, timedelta(seconds=args.dist_timeout))
    try:
        return _generate(args, launch, plan, options, jobs)
    finally:
        shutdown_distributed()


def _generate(args: argparse.Namespace, launch, plan, options: dict, jobs: list | None) -> int:  # noqa: ANN001
    """Loads the models (rank 0 first under torchrun) and makes the video(s) of ``cmd_generate``."""
    import torch

    from diffsynth_cog import CogVideoPipeline, ModelManager
    from diffsynth_cog.cli.checks import fetch_models
    from diffsynth_cog.parallel.launch import main_rank_first

    args.device = launch.device  # cuda:LOCAL_RANK under torchrun
    model_dir, lora = main_rank_first(  # rank 0 downloads, the others then find the files
        lambda: fetch_models(
            plan.model,
            plan.lora,
            models_dir=args.models_dir,
            download=not args.no_download,
            progress=not args.no_progress,
        )
    )
    dtype = getattr(torch, DTYPES[args.dtype])
    load_device = "cpu" if args.offload != "none" else args.device
    manager = ModelManager(torch_dtype=dtype, device=load_device)
    manager.load_models([model_dir])
    if lora is not None:
        manager.load_lora(lora, lora_alpha=args.lora_alpha)
        _hint_trained_attention(lora, args.sparse_attention)
    if args.quantize != "none":
        from diffsynth_cog.quantization import quantize_dit

        dit = manager.fetch_model("cog_dit", require=True)
        dit.to(args.device if args.offload == "none" else "cpu")
        quantize_dit(dit, args.quantize)  # after the LoRA merge: quantized layers take no LoRA
    if args.compile:
        manager.fetch_model("cog_dit", require=True).compile_blocks()
    pipe = CogVideoPipeline.from_model_manager(manager, device=args.device, offload=args.offload)
    if launch.distributed:
        from diffsynth_cog.parallel.windows import windows_per_step

        frames = args.context_frames + args.extend_by if args.extend_by else args.num_frames
        count = windows_per_step(pipe.dit.config, frames, args.window_frames, args.window_overlap)
        layout = _parallel_layout(args, launch.world, batch=jobs is not None, windows_per_step=count)
        pipe.enable_parallel(layout, ulysses_transport=args.ulysses_transport)
    if jobs is None:
        _generate_one(pipe, args, options, plan.input_video)
    else:
        _generate_batch(pipe, args, jobs, options)
    return 0


def _hint_trained_attention(lora, given: str | None) -> None:  # noqa: ANN001
    """Logs a hint when the LoRA was trained under a sparse mask that this run does not use."""
    from diffsynth_cog.lora import trained_attention

    try:
        trained = trained_attention(lora)
    except Exception:  # noqa: BLE001 - a hint only; the LoRA itself loaded
        return
    if trained and trained != given:
        logger.warning(
            "the LoRA was trained with attention %r; add --sparse-attention %s to run it as it was trained "
            "(this run uses %s)",
            trained,
            trained,
            repr(given) if given else "dense attention",
        )


def _generate_one(pipe, args: argparse.Namespace, options: dict, input_video=None) -> None:  # noqa: ANN001
    """One video from the options; written by the rank that gets the result (the only one, or a group's first)."""
    from diffsynth_cog import load_video

    common = dict(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        cfg_scale=args.cfg_scale,
        use_dynamic_cfg=args.dynamic_cfg,
        num_inference_steps=args.steps,
        sampler=args.sampler,
        seed=args.seed,
        tiled=not args.no_tiled_vae,
        progress_bar=not args.no_progress,
        **options,
    )
    if args.extend_by:
        video = load_video(args.input_video, height=args.height, width=args.width)
        frames = pipe.extend_video(video, args.extend_by, context_frames=args.context_frames, **common)
        if frames is None:  # another rank of this video's group writes it
            return
        save_or_rescue(frames, args.output, fps=args.fps, quality=args.quality)
        logger.info("wrote %s (%d frames: %d + %d new)", args.output, len(frames), len(video), args.extend_by)
        return
    if input_video is None and args.input_video:
        input_video = load_video(args.input_video, height=args.height, width=args.width, num_frames=args.num_frames)
    frames = pipe(
        input_image=args.input_image,
        input_video=input_video,
        denoising_strength=args.denoising_strength if input_video is not None else 1.0,
        height=args.height,
        width=args.width,
        num_frames=args.num_frames,
        **common,
    )
    if frames is None:  # another rank of this video's group writes it
        return
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    save_or_rescue(frames, args.output, fps=args.fps, quality=args.quality)
    logger.info("wrote %s (%d frames)", args.output, len(frames))


def _generate_batch(pipe, args: argparse.Namespace, jobs: list, options: dict) -> None:  # noqa: ANN001
    """The jobs of a prompt file whose outputs do not exist yet, spread over the rank groups."""
    from diffsynth_cog.parallel.prompts import jobs_to_do, run_jobs

    todo = jobs_to_do(jobs, pipe.device)
    ctx = pipe.parallel
    group, groups = (ctx.mesh.coords.group, ctx.layout.groups) if ctx is not None else (0, 1)
    logger.info(
        "%d prompts: %d done already, %d to generate by %d group(s)",
        len(jobs),
        len(jobs) - len(todo),
        len(todo),
        groups,
    )

    def generate(job) -> None:  # noqa: ANN001
        logger.info("prompt %d (line %d) -> %s", job.index, job.line, job.output)
        overrides = {"prompt": job.prompt, "output": str(job.output)}
        overrides |= {k: v for k, v in (("seed", job.seed), ("num_frames", job.num_frames)) if v is not None}
        if job.negative_prompt is not None:
            overrides["negative_prompt"] = job.negative_prompt
        _generate_one(pipe, argparse.Namespace(**{**vars(args), **overrides}), options)

    mine = run_jobs(todo, generate, group=group, groups=groups)
    logger.info("this rank's group generated %d of the %d videos left", len(mine), len(todo))


def save_or_rescue(frames: Sequence, output: str | os.PathLike[str], **options) -> Path:
    """``save_video``; when the output cannot be written at the end of a long run (the disk filled up meanwhile),
    the frames go to the temporary folder instead, and the error says where: a generation is never lost."""
    import tempfile

    from diffsynth_cog.errors import WriteError
    from diffsynth_cog.io.video import VideoWriteError, save_video

    try:
        return save_video(frames, output, **options)
    except (WriteError, VideoWriteError) as error:
        rescue = Path(tempfile.gettempdir()) / f"diffsynth-cog-{os.getpid()}-{Path(output).name}"
        try:
            save_video(frames, rescue, **options)
        except (OSError, ValueError):
            raise error from None
        raise WriteError(f"{error}. The generated video was saved to {rescue} instead", error.errno) from None
