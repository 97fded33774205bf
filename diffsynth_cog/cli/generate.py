"""``diffsynth-cog generate``: its options, and the run (one video, or a prompt file spread over rank groups).

    diffsynth-cog generate --prompt "an astronaut riding a horse on Mars." --num-frames 129 --output video.mp4
    torchrun --nproc_per_node 2 -m diffsynth_cog.cli generate --prompt "..."    (one video on 2 GPUs)
    torchrun --nproc_per_node 8 -m diffsynth_cog.cli generate --prompts prompts.txt --output-dir videos

Every input is checked (``cli.generate_checks.check_generate_args``) before any download or model load. Imported when the
command line starts, so nothing heavy (torch, the models) is imported at the top.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

from diffsynth_cog.cli.checks import DEFAULT_MODEL, DTYPES
from diffsynth_cog.cli.generate_checks import job_options, parallel_layout
from diffsynth_cog.configs import ULYSSES_TRANSPORTS as TRANSPORTS
from diffsynth_cog.pipeline.options import ATTENTION_BACKENDS

logger = logging.getLogger("diffsynth_cog.cli.main")

# options group -> the help section its command-line options are listed under
_SECTIONS = {"inputs": None, "sampling": "sampling", "memory": "memory", "long_video": "longer videos", "output": None}


def add_generate_command(sub: argparse._SubParsersAction) -> None:
    """Registers ``generate`` on the command line's sub-parsers: the generation options from the fields of
    ``pipeline.options`` (each field's :class:`~diffsynth_cog.pipeline.options.Flag`), then the run's own."""
    from diffsynth_cog.hub.presets import PRESETS
    from diffsynth_cog.pipeline.options import option_fields

    models = ", ".join(name for name, preset in PRESETS.items() if preset.family is not None)
    p = sub.add_parser(
        "generate",
        help="generate a video from text (or edit a video, or animate an image)",
        description="Generate a video. With the defaults: CogVideoX-5B + the ExVideo 129-frame LoRA, 480x720, "
        "129 frames. Models missing under --models-dir are downloaded from ModelScope first. Every option is "
        "checked before any download or model load.",
    )
    sections = {name: p.add_argument_group(title) if title else p for name, title in _SECTIONS.items()}
    for group, f in option_fields():
        for flag in f.metadata["flags"]:
            kwargs = dict(flag.kwargs)
            if flag.registry is not None:
                kwargs.setdefault("metavar", "NAME")
            sections[group].add_argument(*flag.names, dest=flag.dest, help=flag.help, **kwargs)
    _add_run_options(p, models)
    memory = sections["memory"]
    memory.add_argument(
        "--offload",
        choices=["none", "model", "sequential"],
        default="none",
        help="memory mode: model = each model on the GPU only while it runs, sequential = block by block",
    )
    memory.add_argument(
        "--quantize",
        choices=["none", "fp8", "int8"],
        default="none",
        help="DiT linear layers in fp8 (faster on Hopper/Ada, ~2%% error; needs a CUDA GPU) or int8 weights (half "
        "the DiT memory)",
    )
    memory.add_argument("--compile", action="store_true", help="torch.compile each DiT block (faster after warm-up)")
    _add_extension(sections["long_video"])
    p.add_argument("--no-download", action="store_true", help="never download; fail if models are missing")
    _add_parallel_options(p)
    p.set_defaults(func=cmd_generate)
    _record_given_options(p)


def _record_given_options(p: argparse.ArgumentParser) -> None:
    """Makes the parser set ``args.given_options``, the destinations the command line gave (``--like`` fills
    the others): the arguments are parsed a second time with every default suppressed."""
    parse = p.parse_known_args

    def parse_known_args(args=None, namespace=None):  # noqa: ANN001, ANN202 - argparse's own signature
        namespace, extras = parse(args, namespace)
        defaults = [(action, action.default) for action in p._actions]
        try:
            for action, _ in defaults:
                action.default = argparse.SUPPRESS
            given, _ = parse(args, None)
        finally:
            for action, default in defaults:
                action.default = default
        namespace.given_options = frozenset(vars(given)) - set(p._defaults)
        return namespace, extras

    p.parse_known_args = parse_known_args


def _add_run_options(p: argparse.ArgumentParser, models: str) -> None:
    """The run's own options: the batch, the output, the model and LoRA, the device."""
    p.add_argument(
        "--prompts",
        metavar="FILE",
        help="a batch instead of --prompt: one prompt per line, or JSON lines {prompt, negative_prompt, seed, "
        "num_frames, output}; every line is checked before the first video (a bad line refuses the batch, naming "
        "it); outputs stay inside --output-dir and those that exist are skipped (a re-run resumes); under "
        "torchrun spread over groups of --group-size ranks (default: none, one video from --prompt)",
    )
    p.add_argument(
        "--output", help="video file to write: .mp4, .mkv or .mov (H.264); see --overwrite (default: video.mp4)"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --output (it stays until the new video is complete); without it an existing "
        "file is refused before anything is loaded",
    )
    p.add_argument("--output-dir", default="videos", help="where --prompts writes its videos")
    p.add_argument(
        "--allow-outside-output-dir",
        action="store_true",
        help="let a --prompts line's output be an absolute path or leave --output-dir with '..'",
    )
    p.add_argument("--models-dir", default="models", help="where downloaded models live")
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"a download preset ({models}) or a local model folder (text_encoder/, tokenizer/, transformer/, "
        "vae/, scheduler/)",
    )
    p.add_argument(
        "--lora",
        default="auto",
        help="LoRA .safetensors file or preset to merge; 'auto' = the ExVideo 129-frame LoRA when --num-frames > 49 "
        "with a CogVideoX-5B model (a preset or a local folder; taken from --models-dir, else downloaded), "
        "'none' = no LoRA",
    )
    p.add_argument("--lora-alpha", type=float, default=1.0, help="strength of the merged LoRA")
    p.add_argument(
        "--fps",
        type=int,
        default=None,
        help="frames per second of the written video (default: the model's: 8 on CogVideoX 1.0, 16 on 1.5)",
    )
    p.add_argument("--quality", type=int, default=5, help="video quality 1-10 (10: near lossless)")
    p.add_argument(
        "--device",
        default="auto",
        help="auto (the GPU when torch sees one, else the CPU, and says which), cpu, cuda or cuda:N",
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="weights' dtype")
    p.add_argument(
        "--like",
        metavar="VIDEO",
        help="reproduce VIDEO: every option not given here comes from the settings it carries (in its metadata, "
        "or the .json beside it); the options given win (default: none)",
    )
    p.add_argument(
        "--save-settings",
        action="store_true",
        help="also write the video's settings to a .json beside it (they are always in the video's metadata)",
    )


def _add_extension(g: argparse._ArgumentGroup) -> None:
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
    g.add_argument(
        "--color-match",
        action="store_true",
        help="with --extend-by: correct the new frames' colours by the shift the generated clip shows on its "
        "context (against colour drift over continuations; needs the evaluate extras, OpenCV; default: off)",
    )


def generation_options(args: argparse.Namespace, input_video: list | None = None):  # noqa: ANN201
    """The :class:`~diffsynth_cog.pipeline.options.GenerationOptions` of the parsed arguments (strings parsed
    here, once: the attention mask, the step cache, the windows; the choices checked against their registries).
    ``input_video``: its frames (``check_generate_args`` loads and measures them). Raises ValueError naming the
    option."""
    from diffsynth_cog.denoise.masks import parse_attention
    from diffsynth_cog.denoise.windows import WindowSpec
    from diffsynth_cog.pipeline import options as o

    for flag in o.cli_flags():
        value = getattr(args, flag.dest, None)
        if flag.registry is not None and value is not None:
            flag.registry.check(value, flag.names[0])
    attention = parse_attention(args.attention)
    if args.sparse_attention:
        if not isinstance(attention, str):
            raise ValueError(f"--attention {args.attention} is a mask already; drop --sparse-attention")
        attention = parse_attention(args.sparse_attention)
        if isinstance(attention, str):
            raise ValueError(f"--sparse-attention {args.sparse_attention} is a kernel; give it with --attention")
    elif isinstance(attention, str):
        attention = None  # the kernel is the process's (set_attention_backend), as for every model call
    if args.extend_by and not args.input_video:
        raise ValueError("--extend-by continues a video: give it with --input-video")
    if args.riflex is not None and len(args.riflex) not in (0, 2):
        raise ValueError(f"--riflex takes no value or two (K N_K); got {args.riflex}")
    strength = args.denoising_strength
    # an edited video keeps some of itself by default; a continued one starts its new frames from noise
    default_strength = DEFAULT_STRENGTH if args.input_video and not args.extend_by else 1.0
    return o.GenerationOptions(
        inputs=o.Inputs(
            prompt=args.prompt,
            negative_prompt=args.negative_prompt,
            input_image=args.input_image,
            input_video=input_video,
            height=args.height,
            width=args.width,
            num_frames=args.num_frames,
        ),
        sampling=o.Sampling(
            sampler=args.sampler,
            conventions=args.conventions,
            num_inference_steps=args.num_inference_steps,
            cfg_scale=args.cfg_scale,
            use_dynamic_cfg=args.use_dynamic_cfg,
            seed=args.seed,
            denoising_strength=strength if strength is not None else default_strength,
        ),
        memory=o.Memory(tiled=args.tiled, dit_tiled=args.dit_tiled),
        long_video=o.LongVideo(
            attention=attention,
            step_cache=o.StepCacheSpec(args.step_cache, args.step_cache_method) if args.step_cache else None,
            windows=WindowSpec(args.window_frames, args.window_overlap) if args.window_frames else None,
            riflex=(tuple(args.riflex) or True) if args.riflex is not None else None,
        ),
        output=o.Output(progress_bar=args.progress_bar),
    )


DEFAULT_STRENGTH = 0.7  # --denoising-strength with --input-video (not --extend-by) when not given


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


def cmd_generate(args: argparse.Namespace) -> int:
    from diffsynth_cog.cli.generate_checks import apply_model_defaults, check_generate_args
    from diffsynth_cog.models.attention import set_attention_backend
    from diffsynth_cog.parallel.launch import init_distributed, shutdown_distributed

    # First: every input (a missing kernel package, bad long-video options, a bad prompt file, an input video that
    # is too short) fails before any download or loading, on rank 0 only under torchrun.
    try:
        if getattr(args, "like", None):
            from diffsynth_cog.cli.generate_like import apply_like

            apply_like(args)
        if args.attention in ATTENTION_BACKENDS.names():
            set_attention_backend(args.attention)
        apply_model_defaults(args)
        plan = check_generate_args(args, generation_options(args))
    except ValueError:
        if os.environ.get("RANK", "0") != "0":  # every rank finds the same problem; rank 0 says it
            return 2
        raise
    launch = init_distributed(args.device, timedelta(seconds=args.dist_timeout))
    try:
        return _generate(args, launch, plan)
    finally:
        shutdown_distributed()


def _generate(args: argparse.Namespace, launch, plan) -> int:  # noqa: ANN001
    """Loads the models (rank 0 first under torchrun) and makes the video(s) of ``cmd_generate``."""
    import torch

    from diffsynth_cog.cli.checks import fetch_models
    from diffsynth_cog.parallel.launch import main_rank_first
    from diffsynth_cog.pipeline.cog_video import CogVideoPipeline
    from diffsynth_cog.pipeline.model_manager import ModelManager

    args.device = launch.device  # cuda:LOCAL_RANK under torchrun
    model_dir, lora = main_rank_first(  # rank 0 downloads, the others then find the files
        lambda: fetch_models(
            plan.model,
            plan.lora,
            models_dir=args.models_dir,
            download=not args.no_download,
            progress=args.progress_bar,
        )
    )
    dtype = getattr(torch, DTYPES[args.dtype])
    load_device = "cpu" if args.offload != "none" else args.device
    manager = ModelManager(torch_dtype=dtype, device=load_device)
    manager.load_models([model_dir])
    mask = args.sparse_attention or (None if args.attention in ATTENTION_BACKENDS.names() else args.attention)
    if lora is not None:
        manager.load_lora(lora, lora_alpha=args.lora_alpha)
        _hint_trained_attention(lora, mask)
    elif mask and torch.device(args.device).type == "cuda":
        _hint_frame_window(mask)
    if args.quantize != "none":
        from diffsynth_cog.quantization import quantize_dit

        dit = manager.fetch_model("cog_dit", require=True)
        dit.to(args.device if args.offload == "none" else "cpu")
        quantize_dit(dit, args.quantize)  # after the LoRA merge: quantized layers take no LoRA
    if args.compile:
        manager.fetch_model("cog_dit", require=True).compile_blocks()
    pipe = CogVideoPipeline.from_model_manager(manager, device=args.device, offload=args.offload)
    if launch.distributed:
        layout = parallel_layout(args, launch.world, batch=plan.jobs is not None, config=pipe.dit.config)
        pipe.enable_parallel(layout, ulysses_transport=args.ulysses_transport)
    if plan.jobs is None:
        _generate_one(pipe, args, plan.options, args.output)
    else:
        _generate_batch(pipe, args, plan.jobs, plan.options)
    return 0


def _hint_trained_attention(lora, given: str | None) -> None:  # noqa: ANN001
    """Logs a hint when the LoRA was trained under a sparse mask (its spec, as the training job gave it) that this
    run's mask spec ``given`` (None: dense) is not."""
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


def _hint_frame_window(spec: str) -> None:
    """Logs a hint when a temporal window runs on a GPU as a FlexAttention mask: the same window, token-exact, one
    dense-kernel call per latent frame (``:frame``), measured faster (BENCHMARKS.md, session 10). Not given with a
    LoRA, whose trained mask is the one to run (``_hint_trained_attention``)."""
    from diffsynth_cog.denoise.masks import TemporalWindowAttention, parse_attention

    part = parse_attention(spec)
    if isinstance(part, TemporalWindowAttention) and part.granularity != "frame" and part.spec is not None:
        frame = part.spec.removesuffix(":token") + ":frame"
        logger.info(
            "%s runs as a FlexAttention mask; --sparse-attention %s computes the same window token-exact, one "
            "dense-kernel call per latent frame (temporal patch on 1.5), usually faster on a GPU (FlashAttention-3 on Hopper)",
            spec,
            frame,
        )


def _generate_one(pipe, args: argparse.Namespace, options, output: str) -> None:  # noqa: ANN001
    """One video from the options; written by the rank that gets the result (the only one, or a group's first)."""
    if args.extend_by:
        video = options.inputs.input_video
        keywords = {k: v for k, v in options.flat().items() if k not in EXTENSION_SETS}
        frames = pipe.extend_video(
            video, args.extend_by, context_frames=args.context_frames, color_match=args.color_match, **keywords
        )
        if frames is None:  # another rank of this video's group writes it
            return
        save_or_rescue(frames, output, **_write_options(pipe, args))
        logger.info("wrote %s (%d frames: %d + %d new)", output, len(frames), len(video), args.extend_by)
        return
    frames = pipe.generate(options)
    if frames is None:  # another rank of this video's group writes it
        return
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    save_or_rescue(frames, output, **_write_options(pipe, args))
    logger.info("wrote %s (%d frames)", output, len(frames))


def file_settings(pipe, args: argparse.Namespace) -> dict:  # noqa: ANN001
    """The settings written into the video just made: the pipeline's (``pipe.last_settings``), with the fps
    written and the run's own options, which ``--like`` reads back (the web UI writes the same)."""
    from diffsynth_cog.cli.generate_like import command_settings

    return {**pipe.last_settings, "fps": args.fps, "command": command_settings(args)}


def _write_options(pipe, args: argparse.Namespace) -> dict:  # noqa: ANN001
    """save_video's options: fps, quality, the video's settings (:func:`file_settings`), in a sidecar too with
    --save-settings."""
    settings = file_settings(pipe, args)
    return {"fps": args.fps, "quality": args.quality, "settings": settings, "sidecar": args.save_settings}


# the options extend_video sets itself (from the video and the extension)
EXTENSION_SETS = ("input_video", "num_frames", "height", "width", "keep_frames", "input_image", "output_type")


def _generate_batch(pipe, args: argparse.Namespace, jobs: list, options) -> None:  # noqa: ANN001
    """The jobs of a prompt file whose outputs do not exist yet, spread over the rank groups (every line was
    checked before the models loaded)."""
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
        _generate_one(pipe, args, options.replace(**job_options(job)), str(job.output))

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
