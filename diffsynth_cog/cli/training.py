"""The post-training stages of the ``diffsynth-cog`` command line.

    diffsynth-cog prepare --dataset data/ --model models/CogVideoX-5b --cache cache/129f
    diffsynth-cog train --config train/exvideo_129f_1gpu.json [--resume]
    diffsynth-cog export-lora --checkpoint runs/x/checkpoints --output x.safetensors [--ema 0.9]

This module is imported every time the command line starts (to register the sub-commands), so it
imports nothing heavy at the top: Lightning, the models and the encoders load inside the commands.
See train/README.md for whole jobs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any

from diffsynth_cog.cli.checks import DTYPES
from diffsynth_cog.io.json_files import read_json

logger = logging.getLogger(__name__)

# export-lora --format choices: diffsynth_cog.lora.LORA_EXPORT_FORMATS, spelled out to keep torch out of start-up.
_LORA_FORMATS = ("diffsynth", "diffusers")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


# --------------------------------------------------------------------------------------------- prepare
def _add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare",
        help="encode a video dataset once (T5 + VAE) into a latent cache for training",
        description="Run the T5 text encoder and the VAE encoder over every clip of a dataset and write one "
        "safetensors record per clip (scaled latents + prompt embeddings) plus a manifest into --cache. "
        "Interrupted runs continue where they stopped. Shard over several processes with --rank/--world-size "
        "(default: $RANK/$WORLD_SIZE, as torchrun sets them).",
    )
    p.add_argument(
        "--dataset",
        required=True,
        help="dataset folder or index file (metadata.json, metadata.csv, or prompts.txt + videos.txt)",
    )
    p.add_argument(
        "--model", required=True, help="CogVideoX model folder (text_encoder/, tokenizer/, vae/, transformer/)"
    )
    p.add_argument(
        "--cache", required=True, help="folder of the latent cache (new, or an earlier cache: edited clips are redone)"
    )
    p.add_argument("--num-frames", type=int, default=129, help="frames per clip, 8k+1")
    p.add_argument("--height", type=int, default=480, help="pixels, a multiple of 16")
    p.add_argument("--width", type=int, default=720, help="pixels, a multiple of 16")
    p.add_argument("--frame-interval", type=int, default=1, help="take every n-th frame of the source video")
    p.add_argument("--rank", type=int, default=None, help="this process's shard (default: $RANK or 0)")
    p.add_argument("--world-size", type=int, default=None, help="number of shards (default: $WORLD_SIZE or 1)")
    p.add_argument(
        "--device", default="auto", help="auto (cuda:$LOCAL_RANK when CUDA is available, else cpu), cpu or cuda:N"
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="encoder weights and cache dtype")
    p.add_argument("--no-tiled", action="store_true", help="encode without spatial tiling (more memory)")
    p.add_argument(
        "--sample-posterior", action="store_true", help="store one seeded VAE posterior draw instead of its mean"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of --sample-posterior's draws")
    p.add_argument(
        "--image-latents",
        choices=("auto", "yes", "no"),
        default="auto",
        help="also store each clip's first frame encoded alone, as an image: the condition of image-to-video "
        "training (default auto: when the model's transformer is an image-to-video one)",
    )
    p.add_argument("--num-workers", type=int, default=2, help="video decoding processes")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prepare)


def cmd_prepare(args: argparse.Namespace) -> int:
    import torch

    from diffsynth_cog.cli.checks import check_model_folder, check_options, number, resolve_device
    from diffsynth_cog.configs import check_num_frames, check_size
    from diffsynth_cog.loading.model_folder import resolve_model_folder
    from diffsynth_cog.training.data import load_dataset_index
    from diffsynth_cog.training.prepare import check_cache_dir, check_clip, load_encoders, prepare_cache

    rank = args.rank if args.rank is not None else _env_int("RANK", 0)
    world_size = args.world_size if args.world_size is not None else _env_int("WORLD_SIZE", 1)
    # Everything that can be checked before the encoders load: numbers, the dataset index, the cache folder,
    # the model's parts, the device.
    check_options(
        args,
        {
            "num_frames": lambda value, option: check_num_frames(value, name=option),
            "frame_interval": number(low=1, integer=True),
            "num_workers": number(low=0, integer=True),
        },
    )
    check_size(args.height, args.width)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= --rank < --world-size; got rank {rank}, world size {world_size}")
    load_dataset_index(args.dataset)
    check_cache_dir(args.cache)
    check_model_folder(resolve_model_folder(args.model), parts=("text_encoder", "tokenizer", "vae"))
    device = resolve_device(args.device)
    dtype = getattr(torch, DTYPES[args.dtype])
    dit_config = resolve_model_folder(args.model).dit_config  # the family's clip rules and image-latent scale
    check_clip(dit_config, args.num_frames, args.height, args.width)
    image_latents = args.image_latents == "yes"
    if args.image_latents == "auto":
        image_latents = dit_config is not None and dit_config.in_channels == 2 * dit_config.out_channels
        if image_latents:
            logger.info("%s is an image-to-video model: storing first-frame image latents", args.model)
    encoders = load_encoders(args.model, device=device, dtype=dtype)
    summary = prepare_cache(
        args.dataset,
        args.cache,
        encoders.text_encoder,
        encoders.vae_encoder,
        num_frames=args.num_frames,
        height=args.height,
        width=args.width,
        frame_interval=args.frame_interval,
        tiled=not args.no_tiled,
        sample_posterior=args.sample_posterior,
        seed=args.seed,
        rank=rank,
        world_size=world_size,
        device=device,
        dtype=dtype,
        num_workers=args.num_workers,
        model_paths=encoders.paths,
        progress=not args.no_progress,
        image_latents=image_latents,
        dit_config=dit_config,
    )
    if summary.nothing_usable and world_size == 1:  # a rank of several cannot tell: the others' clips may be fine
        from diffsynth_cog.training.prepare import NoUsableClipsError

        raise NoUsableClipsError(
            summary.unusable_message(args.dataset, (args.num_frames - 1) * args.frame_interval + 1)
        )
    logger.info("prepare rank %d/%d -> %s: %s", rank, world_size, args.cache, summary.describe())
    return 0


# --------------------------------------------------------------------------------------------- train
def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--set expects KEY=VALUE, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw  # a bare string such as a path
    return key.strip(), value


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a long-video LoRA on a latent cache (Lightning; DeepSpeed ZeRO-2 on several GPUs)",
        description="Train the LoRA of a job file (see train/*.json and train/README.md). Checkpoints, logs and the "
        "exported LoRA go to the job's output_dir. Several GPUs: set devices in the job (Lightning starts one "
        "process per GPU) or launch with torchrun.",
    )
    p.add_argument("--config", required=True, help="job file (JSON)")
    p.add_argument(
        "--resume",
        nargs="?",
        const="last",
        default=None,
        help="continue the run in output_dir (from last.ckpt), or from the given checkpoint (default: a new run; "
        "an output_dir with checkpoints is refused)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a job field (VALUE is JSON, e.g. --set learning_rate=1e-4 --set max_steps=200; default: none)",
    )
    p.add_argument("--no-export", action="store_true", help="do not export the LoRA at the end")
    p.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    p.set_defaults(func=cmd_train)


def load_job(path: str | os.PathLike[str], overrides: list[str] | None = None):
    """The TrainConfig of a job file with ``KEY=VALUE`` overrides applied (validated as a whole)."""
    from diffsynth_cog.training.config import TrainConfig, TrainConfigError

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"training config not found: {p}")
    values = read_json(p, TrainConfigError)
    for text in overrides or []:
        key, value = _parse_override(text)
        values[key] = value
    return TrainConfig.from_dict(values, source=str(p))


def cmd_train(args: argparse.Namespace) -> int:
    from diffsynth_cog.cli.console import adopt_library_loggers
    from diffsynth_cog.io.atomic import check_output_path
    from diffsynth_cog.training.trainer import run_training

    adopt_library_loggers()
    config = load_job(args.config, args.overrides)
    check_output_path(config.checkpoint_dir / "last.ckpt", what="output_dir")
    resume: bool | str = False if args.resume is None else (True if args.resume == "last" else args.resume)
    result = run_training(config, resume=resume, progress=not args.no_progress, export=not args.no_export)
    if result.lora_path is not None:
        logger.info("trained %d steps; LoRA written to %s", result.global_step, result.lora_path)
    return 0


# --------------------------------------------------------------------------------------------- export
def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export-lora",
        help="write the LoRA of training checkpoints as a DiffSynth- or diffusers-format safetensors file",
        description="Read Lightning .ckpt files or DeepSpeed checkpoint folders (or a run's checkpoints/ folder) "
        "and write the LoRA in the model family's layout unless --format says otherwise (CogVideoX 1.0: diffsynth, "
        "1.5: diffusers). --format diffsynth: DiffSynth-Studio's module names, scale folded into B, "
        "loadable with ModelManager.load_lora here or in DiffSynth-Studio. --format diffusers: diffusers' names "
        "and the PEFT LoraConfig in the header, loadable with CogVideoXPipeline.load_lora_weights (and here). "
        "Ranks, alphas and targets are recorded in the header. With --ema, average all given checkpoints "
        "oldest first (ExVideo's EMA; gamma 0.9).",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        nargs="+",
        help="checkpoint file(s)/folder(s), or <output_dir>/checkpoints (its newest, or all with --ema)",
    )
    p.add_argument("--output", required=True, help="the .safetensors file to write (see --overwrite)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --output (it stays until the new file is complete)",
    )
    p.add_argument(
        "--ema",
        type=float,
        default=None,
        metavar="GAMMA",
        help="EMA over the checkpoints, e.g. 0.9 (default: the newest checkpoint alone)",
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the written tensors")
    p.add_argument(
        "--format",
        choices=_LORA_FORMATS,
        default=None,
        help="key layout: diffsynth (DiffSynth-Studio, ExVideo) or diffusers (CogVideoXPipeline.load_lora_weights); "
        "default: the family's (diffsynth on CogVideoX 1.0, diffusers on 1.5, which DiffSynth-Studio does not have)",
    )
    p.add_argument(
        "--include-paths",
        action="store_true",
        help="record the training's full local paths (model, cache_dir, output_dir) in the file's header "
        "(default: their names only, so a published LoRA does not show your folders)",
    )
    p.set_defaults(func=cmd_export_lora)


def cmd_export_lora(args: argparse.Namespace) -> int:
    import torch

    from diffsynth_cog.cli.console import adopt_library_loggers
    from diffsynth_cog.io.atomic import check_output_path

    if Path(args.output).suffix != ".safetensors":
        raise ValueError(f"--output {args.output}: a LoRA is written as a .safetensors file")
    if args.ema is not None and not 0.0 <= args.ema <= 1.0:  # NaN included
        raise ValueError(f"--ema must be in [0, 1] (0.9 is ExVideo's); got {args.ema}")
    check_output_path(args.output, what="--output", overwrite=args.overwrite)
    from diffsynth_cog.training.checkpoints import export_lora_from_checkpoints

    adopt_library_loggers()
    path = export_lora_from_checkpoints(
        args.checkpoint,
        args.output,
        ema_gamma=args.ema,
        dtype=getattr(torch, DTYPES[args.dtype]),
        format=args.format,
        include_paths=args.include_paths,
    )
    logger.info("wrote %s", path)
    return 0


def add_training_commands(subparsers: argparse._SubParsersAction) -> None:
    """Registers ``prepare``, ``train`` and ``export-lora`` on the ``diffsynth-cog`` parser."""
    _add_prepare(subparsers)
    _add_train(subparsers)
    _add_export(subparsers)
