"""The ``diffsynth-cog`` command line.

    diffsynth-cog download CogVideoX-5B ExVideo-CogVideoX-LoRA-129f-v1
    diffsynth-cog generate --prompt "an astronaut riding a horse on Mars." --num-frames 129 --output video.mp4
    diffsynth-cog prepare / train / export-lora    (long-video post-training, see train/README.md)

Defaults aim at the ExVideo use case: CogVideoX-5B with ExVideo-CogVideoX-LoRA-129f-v1, 129 frames at
480x720, cfg 7.0, fps 8. Missing models are downloaded from ModelScope into ``--models-dir`` first.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger("diffsynth_cog.cli")

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
DEFAULT_MODEL = "CogVideoX-5B"
DEFAULT_LORA = "ExVideo-CogVideoX-LoRA-129f-v1"
# Kept in step with diffsynth_cog.models.attention.BACKENDS (a test checks), so that building the
# parser does not import torch.
ATTENTION_BACKENDS = ("auto", "sdpa", "sdpa-cudnn", "fa3", "flash-attn", "fa3-fp8", "sage")


def setup_logging(verbose: bool = False) -> None:
    """Handlers live in entry points only, and only on rank 0 of a distributed run."""
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(
        level=level if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not verbose:  # the ModelScope client's retries log a warning each; our error says what failed
        logging.getLogger("urllib3").setLevel(logging.ERROR)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate a video from text (or edit a video, or animate an image)",
        description="Generate a video. With the defaults: CogVideoX-5B + the ExVideo 129-frame LoRA, 480x720, "
        "129 frames. Models missing under --models-dir are downloaded from ModelScope first.",
    )
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--output", default="video.mp4", help="mp4 file to write (default: video.mp4)")
    p.add_argument("--models-dir", default="models", help="where downloaded models live (default: models)")
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="a download preset (CogVideoX-2B, CogVideoX-5B, CogVideoX-5B-I2V) or a local model folder "
        f"(text_encoder/, tokenizer/, transformer/, vae/, scheduler/). Default: {DEFAULT_MODEL}",
    )
    p.add_argument(
        "--lora",
        default="auto",
        help="LoRA file or preset to merge; 'auto' = the ExVideo 129-frame LoRA when --num-frames > 49 with "
        "CogVideoX-5B, 'none' = no LoRA",
    )
    p.add_argument("--lora-alpha", type=float, default=1.0)
    p.add_argument("--num-frames", type=int, default=129, help="4k+1 frames (49 base, 129 with ExVideo)")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=720)
    p.add_argument("--steps", type=int, default=50, help="denoising steps (DiffSynth's ExVideo example uses 100)")
    p.add_argument("--cfg-scale", type=float, default=7.0)
    p.add_argument("--dynamic-cfg", action="store_true", help="guidance growing over the steps")
    p.add_argument(
        "--sampler",
        choices=["ddim", "dpm", "diffsynth"],
        default="ddim",
        help="ddim (default), dpm, or diffsynth: DiffSynth-Studio 1.1.x's own DDIM and seed conventions",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fps", type=int, default=8)
    p.add_argument("--quality", type=int, default=5, help="mp4 quality 1-10")
    p.add_argument("--input-image", help="image to animate (needs CogVideoX-5B-I2V)")
    p.add_argument("--input-video", help="video to edit (video-to-video)")
    p.add_argument("--denoising-strength", type=float, default=0.7, help="for --input-video (0, 1]")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--offload", choices=["none", "model", "sequential"], default="none", help="memory mode")
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
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_generate)


def _add_long_video(p: argparse.ArgumentParser) -> None:
    """Options for videos longer than the trained length (README "Longer videos")."""
    g = p.add_argument_group("longer videos")
    g.add_argument(
        "--riflex",
        type=int,
        nargs="*",
        metavar="K N_K",
        help="RIFLEx temporal RoPE (5B): alone = the published setting (k=2, N_k=20), or give K N_K",
    )
    g.add_argument(
        "--sparse-attention",
        metavar="SPEC",
        help="block-sparse attention mask (FlexAttention): window:W (+-W latent frames, text global, first frame a "
        "sink), window:W:nosink, radial, radial:DECAY",
    )
    g.add_argument(
        "--window-frames",
        type=int,
        metavar="F",
        help="denoise overlapping windows of F (4k+1) frames: any length at the memory of one window",
    )
    g.add_argument("--window-overlap", type=float, default=0.25, help="fraction of a window shared with the next")
    g.add_argument(
        "--extend-by",
        type=int,
        default=0,
        metavar="N",
        help="with --input-video: continue that video by N frames (a multiple of 4); writes the whole video",
    )
    g.add_argument("--context-frames", type=int, default=17, help="with --extend-by: frames of context (4k+1)")


def _long_video_options(args: argparse.Namespace) -> dict:
    """The pipeline keywords of the "longer videos" options, checked before any model is loaded."""
    from diffsynth_cog.sparse_attention import parse_attention
    from diffsynth_cog.windows import WindowSpec

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


def _add_download(sub: argparse._SubParsersAction) -> None:
    from diffsynth_cog.downloads import preset_names

    p = sub.add_parser(
        "download",
        help="download model presets from ModelScope",
        description=f"Download presets into --models-dir (DiffSynth-Studio's layout). Presets: {preset_names()}",
    )
    p.add_argument("names", nargs="+", help="preset names")
    p.add_argument("--models-dir", default="models")
    p.add_argument(
        "--endpoint", default=None, help="ModelScope endpoint (default: $MODELSCOPE_ENDPOINT or the public one)"
    )
    p.add_argument("--verify", action="store_true", help="re-check every local file against the repository")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_download)


def _add_upload(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "upload-lora",
        help="upload a trained LoRA file (or folder) to a ModelScope model repository",
        description="Creates the repository if needed (private by default) and uploads the LoRA. The token comes "
        "from --token or the MODELSCOPE_API_TOKEN environment variable.",
    )
    p.add_argument("path", help="the exported LoRA .safetensors file, or a folder")
    p.add_argument("--repo-id", required=True, help="owner/name on ModelScope")
    p.add_argument("--token", default=None)
    p.add_argument("--endpoint", default=None)
    p.add_argument("--visibility", choices=["private", "public"], default="private")
    p.set_defaults(func=cmd_upload)


def cmd_upload(args: argparse.Namespace) -> int:
    from diffsynth_cog.uploads import upload_lora

    token = args.token or os.environ.get("MODELSCOPE_API_TOKEN")
    url = upload_lora(args.path, args.repo_id, token=token, endpoint=args.endpoint, visibility=args.visibility)
    logger.info("uploaded %s -> %s", args.path, url)
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from diffsynth_cog.downloads import download_models

    paths = download_models(
        args.names,
        models_dir=args.models_dir,
        endpoint=args.endpoint,
        progress=not args.no_progress,
        verify=args.verify,
    )
    for name, path in zip(args.names, paths, strict=True):
        logger.info("%s -> %s", name, path)
    return 0


def _resolve_model(args: argparse.Namespace) -> Path:
    """A local model (a whole folder, or its transformer folder or file: the model folder around it is
    used), else a download preset."""
    local = Path(args.model).expanduser()
    if local.exists():
        from diffsynth_cog.loading.model_folder import resolve_model_folder

        folder = resolve_model_folder(local, part="transformer")
        return folder.root or folder.require("transformer")
    from diffsynth_cog.downloads import download_models, get_preset

    preset = get_preset(args.model)
    if args.no_download:
        return preset.result_path(args.models_dir)
    return download_models([args.model], models_dir=args.models_dir, progress=not args.no_progress)[0]


def _resolve_lora(args: argparse.Namespace, model_dir: Path) -> Path | None:
    choice = args.lora
    if choice == "none":
        return None
    if choice == "auto":
        if args.num_frames <= 49 or args.model != DEFAULT_MODEL:
            return None
        choice = DEFAULT_LORA
    if Path(choice).is_file():
        return Path(choice)
    from diffsynth_cog.downloads import download_models, get_preset

    if args.no_download:
        return get_preset(choice).result_path(args.models_dir)
    return download_models([choice], models_dir=args.models_dir, progress=not args.no_progress)[0]


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from diffsynth_cog import CogVideoPipeline, ModelManager, load_video, save_video
    from diffsynth_cog.configs import check_num_frames, check_size
    from diffsynth_cog.models.attention import set_attention_backend

    # First: bad sizes, a missing kernel package and bad long-video options fail before any download or loading.
    check_num_frames(args.num_frames)
    check_size(args.height, args.width)
    set_attention_backend(args.attention)
    options = _long_video_options(args)
    model_dir = _resolve_model(args)
    lora = _resolve_lora(args, model_dir)
    dtype = getattr(torch, DTYPES[args.dtype])
    load_device = "cpu" if args.offload != "none" else args.device
    manager = ModelManager(torch_dtype=dtype, device=load_device)
    manager.load_models([model_dir])
    if lora is not None:
        manager.load_lora(lora, lora_alpha=args.lora_alpha)
    if args.quantize != "none":
        from diffsynth_cog.quantization import quantize_dit

        dit = manager.fetch_model("cog_dit", require=True)
        dit.to(args.device if args.offload == "none" else "cpu")
        quantize_dit(dit, args.quantize)  # after the LoRA merge: quantized layers take no LoRA
    if args.compile:
        manager.fetch_model("cog_dit", require=True).compile_blocks()
    pipe = CogVideoPipeline.from_model_manager(manager, device=args.device)
    if args.offload == "model":
        pipe.enable_model_cpu_offload()
    elif args.offload == "sequential":
        pipe.enable_sequential_cpu_offload()
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
        save_video(frames, args.output, fps=args.fps, quality=args.quality)
        logger.info("wrote %s (%d frames: %d + %d new)", args.output, len(frames), len(video), args.extend_by)
        return 0
    input_video = None
    if args.input_video:
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
    save_video(frames, args.output, fps=args.fps, quality=args.quality)
    logger.info("wrote %s (%d frames)", args.output, len(frames))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffsynth-cog", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_download(sub)
    _add_upload(sub)
    from diffsynth_cog.info import add_info_command
    from diffsynth_cog.webui import add_webui_command

    add_info_command(sub)
    add_webui_command(sub)
    try:
        from diffsynth_cog.training.cli import add_training_commands
    except ImportError:  # training extras (lightning) not installed
        add_training_commands = None
    if add_training_commands is not None:
        add_training_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    from diffsynth_cog.errors import DiffSynthCogError

    try:
        return int(args.func(args) or 0)
    except (DiffSynthCogError, ValueError, FileNotFoundError) as e:
        logger.error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
