"""``diffsynth-cog generate``'s checks, all before any download or model load: :func:`check_generate_args`.

The run's plan (:class:`GeneratePlan`): the output (``--output``, or ``--output-dir`` and every line of
``--prompts``, with line numbers), the input video opened and measured (a resize or a cut logged once, a short
video refused), the option pairs (``--denoising-strength`` without a video, ``--quantize fp8`` off CUDA, the
parallel layout under torchrun), the model and the LoRA (``cli.checks``), then the pipeline's own call checks
against the transformer's config (RIFLEx, TeaCache's calibration, windows), for the video or every batch line.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from diffsynth_cog.cli.checks import (
    GENERATE_CHECKS,
    LoRAChoice,
    ModelChoice,
    OptionError,
    check_options,
    choose_lora,
    choose_model,
    resolve_device,
)
from diffsynth_cog.configs import DiTConfig, check_number, check_size
from diffsynth_cog.errors import shorten
from diffsynth_cog.families import get_family

if TYPE_CHECKING:
    from diffsynth_cog.parallel.layout import ParallelLayout
    from diffsynth_cog.parallel.prompts import PromptJob
    from diffsynth_cog.pipeline.options import GenerationOptions

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GeneratePlan:
    """What :func:`check_generate_args` settled: the device, the model and LoRA to fetch, the generation options
    (with the input video's frames, loaded and measured) and, for ``--prompts``, the checked lines."""

    device: str
    model: ModelChoice
    lora: LoRAChoice
    options: GenerationOptions
    jobs: list[PromptJob] | None = None

    @property
    def input_video(self) -> list | None:
        return self.options.inputs.input_video


def apply_model_defaults(args: argparse.Namespace) -> None:
    """Fills --height / --width / --num-frames / --fps left unset with the chosen model's defaults (its family's:
    768x1360, 81 frames, 16 fps on CogVideoX 1.5; 480x720, 8 fps and the ExVideo length on 1.0)."""
    try:
        family = get_family(choose_model(args.model).family)
    except ValueError:  # a bad --model is reported by check_generate_args, after the options' own checks
        family = get_family("cogvideox-5b")
    defaults = family.defaults() | {"num_frames": family.generate_frames}
    for name, value in defaults.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)


def check_generate_args(args: argparse.Namespace, options: GenerationOptions) -> GeneratePlan:
    """Every check of ``diffsynth-cog generate`` that needs no download and no model weights (module docstring),
    on the options ``cli.generate.generation_options`` built from ``args``.

    ``args.device`` is replaced by the device picked (``auto``), ``args.output`` by its default. Raises
    OptionError (or the checks' own errors) with a message; nothing is written.
    """
    check_options(args, GENERATE_CHECKS)
    check_size(args.height, args.width)
    jobs = _check_outputs(args)
    model = choose_model(args.model)
    check_input_rules(args, model.family)
    if args.input_video:
        options = dataclasses.replace(
            options, inputs=dataclasses.replace(options.inputs, input_video=measure_input_video(args, model.config))
        )
    lora = choose_lora(args.lora, model, args.num_frames, args.models_dir)
    args.device = resolve_device(args.device)
    if args.quantize == "fp8" and not args.device.startswith("cuda"):
        raise OptionError(
            f"--quantize fp8 runs fp8 matmuls, which need a CUDA GPU of compute capability >= 8.9 (Ada, Hopper); "
            f"this run is on {args.device}: use --quantize int8 (half the DiT memory) or none"
        )
    _check_layout(args, model, batch=jobs is not None)
    plan = GeneratePlan(device=args.device, model=model, lora=lora, options=options, jobs=jobs)
    _check_with_model(args, plan)
    return plan


def check_input_rules(args: argparse.Namespace, family: str | None) -> None:
    """The rules between the inputs and the options (the command line's and the web UI's): a denoising strength
    needs an input video, colour matching a continuation, an image-to-video model its image and an image such a
    model (``family``: the model's family name; None skips the image rules: the pipeline checks them)."""
    if args.denoising_strength is not None and not args.input_video:
        raise OptionError(
            f"--denoising-strength {args.denoising_strength} sets how much of an --input-video is kept: give the "
            "video, or drop the option (a video from text is denoised from pure noise)"
        )
    _check_color_match(args)
    if family is None:
        return
    i2v = get_family(family).is_i2v
    if i2v and not args.input_image:
        raise OptionError(f"--model {args.model} is an image-to-video model: pass --input-image")
    if args.input_image:
        if not i2v:
            raise OptionError(
                "--input-image needs an image-to-video model (--model CogVideoX-5B-I2V or CogVideoX1.5-5B-I2V); "
                f"{args.model} is {family}"
            )
        from diffsynth_cog.io.video import load_image

        load_image(args.input_image)  # a missing or unreadable image fails here, not after loading


def _check_color_match(args: argparse.Namespace) -> None:
    """``--color-match`` goes with ``--extend-by``, and needs OpenCV (the evaluate extras) before anything loads."""
    if not getattr(args, "color_match", False):
        return
    if not args.extend_by:
        raise OptionError("--color-match matches the new frames of a continuation to its context: add --extend-by")
    from diffsynth_cog.pipeline.continuation import require_color_matching

    require_color_matching()


def _check_outputs(args: argparse.Namespace) -> list[PromptJob] | None:
    """``--output`` (one video) or ``--output-dir`` and every line of ``--prompts``, before anything is loaded."""
    from diffsynth_cog.io.atomic import check_output_path
    from diffsynth_cog.io.video import check_video_path

    if (args.prompt is None) == (args.prompts is None):
        raise OptionError("give exactly one of --prompt TEXT and --prompts FILE")
    if args.prompts is not None:
        if args.output is not None:
            raise OptionError(
                f"--output {args.output} names one video, and --prompts makes one per line: they are written to "
                f"--output-dir ({args.output_dir}); a JSON line may name its own 'output'. Drop --output"
            )
        return check_prompt_lines(args)
    args.output = "video.mp4" if args.output is None else args.output
    if not args.prompt.strip():
        logger.warning("the prompt is empty: the video follows no text")
    logger.info("prompt: %r", shorten(args.prompt))
    output = check_video_path(args.output)
    raw = args.num_frames * args.height * args.width * 3
    check_output_path(output, what="--output", overwrite=getattr(args, "overwrite", True), needed_bytes=raw // 100)
    if output.exists():
        logger.info("--overwrite: %s will be replaced once the new video is complete", output)
    return None


def check_prompt_lines(args: argparse.Namespace) -> list[PromptJob]:
    """Every line of ``--prompts`` checked up front: the whole batch is refused, naming each bad line, before the
    first video (a skipped line would be missing from a batch that ran for hours; a re-run resumes after a fix).
    Outputs must stay inside ``--output-dir`` unless ``--allow-outside-output-dir``; their folders are checked."""
    from diffsynth_cog.configs import check_num_frames
    from diffsynth_cog.io.atomic import check_output_path
    from diffsynth_cog.io.video import check_video_path
    from diffsynth_cog.parallel.prompts import read_prompt_file

    output_dir = Path(args.output_dir).expanduser()
    check_output_path(output_dir / "video.mp4", what="--output-dir")
    jobs = read_prompt_file(args.prompts, output_dir)
    problems = []
    inside = output_dir.resolve()
    for job in jobs:
        where = f"{args.prompts}:{job.line}"
        try:
            if job.num_frames is not None:
                check_num_frames(job.num_frames, name="num_frames")
            if job.seed is not None:
                check_number(job.seed, name="seed", low=-1, high=2**64 - 1, integer=True, hint="-1 = a random seed")
            if not getattr(args, "allow_outside_output_dir", False) and not job.output.resolve().is_relative_to(inside):
                raise OptionError(
                    f"output {job.output} is outside --output-dir {output_dir}; write it inside, or pass "
                    "--allow-outside-output-dir"
                )
            check_output_path(check_video_path(job.output), what="output")
        except ValueError as error:
            problems.append(f"{where}: {error}")
    if problems:
        raise OptionError(
            f"the prompt file has {len(problems)} bad line(s); nothing was generated:\n  " + "\n  ".join(problems)
        )
    return jobs


def measure_input_video(args: argparse.Namespace, config: DiTConfig | None) -> list:
    """``--input-video``, opened and measured before any model loads: its frames at --height x --width, cut to
    --num-frames (or, with --extend-by, whole); every resize or cut is logged once, a short video refused.
    ``config``: the model's transformer config (None: CogVideoX 1.0's temporal factor)."""
    from diffsynth_cog.io.video import load_video
    from diffsynth_cog.pipeline.continuation import check_extension

    path = args.input_video
    first = load_video(path, num_frames=1)[0]
    frames = load_video(path, height=args.height, width=args.width)
    if first.size != (args.width, args.height):
        logger.info(
            "--input-video %s: resized from %dx%d to %dx%d (scaled to cover, centre-cropped)",
            path, first.size[0], first.size[1], args.width, args.height,
        )  # fmt: skip
    compression = config.temporal_compression_ratio if config is not None else get_family("cogvideox-5b").vae_temporal
    if args.extend_by:
        try:
            check_extension(len(frames), args.context_frames, args.extend_by, compression)
        except ValueError as error:
            raise OptionError(
                f"--input-video {path} ({len(frames)} frames), --extend-by / --context-frames: {error}"
            ) from None
        return frames
    if len(frames) < args.num_frames:
        raise OptionError(
            f"--input-video {path} has {len(frames)} frames; --num-frames {args.num_frames} needs at least that "
            "many (pass a smaller --num-frames, 8k+1)"
        )
    if len(frames) > args.num_frames:
        logger.info("--input-video %s: using its first %d of %d frames", path, args.num_frames, len(frames))
    return frames[: args.num_frames]


def _check_layout(args: argparse.Namespace, model: ModelChoice, batch: bool) -> None:
    """Under torchrun: the parallel degrees against the world size and the model's heads, before any load."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 or model.config is None:
        return
    try:
        parallel_layout(args, world, batch=batch, config=model.config).check_heads(model.config.num_attention_heads)
    except ValueError as error:
        raise OptionError(
            f"{error} (--cfg-parallel / --ulysses / --ring / --window-parallel / --group-size on {world} processes)"
        ) from None


def _check_with_model(args: argparse.Namespace, plan: GeneratePlan) -> None:
    """The pipeline's own call checks against the transformer's config (RIFLEx on 2B, TeaCache without a
    calibration, windows on I2V, ...), for the video or for every line of a batch."""
    from diffsynth_cog.pipeline.checks import check_call, check_family_call, check_parts

    config = plan.model.config
    if config is None:
        return
    if args.extend_by:
        check_family_call(config.family, plan.options)  # continuation: video-to-video, refused on 1.5
        check_parts(config, plan.options.long_video)
        return
    if plan.jobs is None:
        check_call(config, plan.options)
        return
    problems = []
    for job in plan.jobs:
        try:
            check_call(config, plan.options.replace(**job_options(job)))
        except ValueError as error:
            problems.append(f"{args.prompts}:{job.line}: {error}")
    if problems:
        raise OptionError(
            f"the prompt file has {len(problems)} bad line(s); nothing was generated:\n  " + "\n  ".join(problems)
        )


def parallel_layout(
    args: argparse.Namespace, world: int, batch: bool, config: DiTConfig | None = None
) -> ParallelLayout:
    """enable_parallel's layout from the options (``cli.generate._add_parallel_options``; a batch of prompts uses
    just the ranks the degrees ask for per video). With the transformer's ``config`` the windows of a step are
    counted (``--window-parallel auto`` needs them) and window groups are checked against them."""
    from diffsynth_cog.parallel.layout import ParallelError, ParallelLayout
    from diffsynth_cog.parallel.windows import windows_per_step

    frames = args.context_frames + args.extend_by if args.extend_by else args.num_frames
    count = 1 if config is None else windows_per_step(config, frames, args.window_frames, args.window_overlap)
    layout = ParallelLayout.from_options(
        world,
        cfg_parallel=args.cfg_parallel,
        ulysses=args.ulysses,
        ring=args.ring,
        group_size=args.group_size,
        batch=batch,
        guided=args.cfg_scale > 1,
        windows=args.window_parallel,
        windows_per_step=count,
    )
    if layout.windows > 1 and not args.window_frames:
        raise ParallelError(f"--window-parallel {layout.windows} spreads temporal windows: give --window-frames F")
    if config is not None and count < layout.windows:
        raise ParallelError(
            f"--window-parallel {layout.windows}: a step of {frames} frames in windows of {args.window_frames} has "
            f"{count} window(s); use at most {count} window groups, shorter windows or more overlap"
        )
    return layout


def job_options(job) -> dict:  # noqa: ANN001
    """The options a prompt file's line sets (its prompt; its negative prompt, seed, frames where given)."""
    values = {"prompt": job.prompt, "negative_prompt": job.negative_prompt, "seed": job.seed}
    values["num_frames"] = job.num_frames
    return {k: v for k, v in values.items() if v is not None}
