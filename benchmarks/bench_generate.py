"""A whole 129-frame 480x720 generation at full CogVideoX-5B size (random weights), per memory mode.

Ours in each memory mode, then diffusers' CogVideoXPipeline on the SAME weights (our tensors are
handed to the reference models with ``assign=True`` once ours is done), default and model CPU
offload. Reports per-step time (CFG batch), text-encode and VAE-decode time, and peak memory.
The text encoder is a full-size T5-XXL encoder with random weights; the tokenizer is a small
sentencepiece model (tokenization cost is negligible; prompts are padded to 226 tokens either way).

    python benchmarks/bench_generate.py --tokenizer PATH --frames 129 --steps 2
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, peak_gib, reset_peak, write_json  # noqa: E402

from diffsynth_cog.configs import dit_preset, vae_preset  # noqa: E402
from diffsynth_cog.loading.convert import account_keys, model_shapes  # noqa: E402
from diffsynth_cog.loading.dit_loader import dit_rename  # noqa: E402
from diffsynth_cog.loading.text_encoder_loader import load_tokenizer  # noqa: E402
from diffsynth_cog.loading.vae_loader import vae_rename  # noqa: E402
from diffsynth_cog.models.dit import CogDiT  # noqa: E402
from diffsynth_cog.models.text_encoder import CogTextEncoder  # noqa: E402
from diffsynth_cog.models.vae import CogVAE  # noqa: E402
from diffsynth_cog.pipeline.cog_video import CogVideoPipeline  # noqa: E402

logger = logging.getLogger("bench_generate")
PROMPT = "an astronaut riding a horse on Mars."


def t5_xxl_encoder(device: str, dtype: torch.dtype):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=32128,
        d_model=4096,
        d_kv=64,
        d_ff=10240,
        num_layers=24,
        num_heads=64,
        feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
    )
    with torch.device(device):
        return T5EncoderModel(config).to(dtype).eval().requires_grad_(False)


class StepTimer:
    """Per-step wall time from the step callback (synchronised, so it is the step's true duration)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.last = 0.0

    def start(self) -> None:
        torch.cuda.synchronize()
        self.last = time.perf_counter()

    def tick(self) -> None:
        torch.cuda.synchronize()
        now = time.perf_counter()
        self.times.append(now - self.last)
        self.last = now


def run_ours(pipe: CogVideoPipeline, mode: str, args: argparse.Namespace) -> dict:
    pipe.offloader.set_mode(mode)
    reset_peak()
    timer = StepTimer()
    start = time.perf_counter()
    emb = pipe.encode_prompt(PROMPT)
    neg = pipe.encode_prompt("")
    t_text = time.perf_counter() - start
    timer.start()
    latents = pipe(
        prompt_emb=emb,
        negative_prompt_emb=neg,
        num_frames=args.frames,
        num_inference_steps=args.steps,
        cfg_scale=7.0,
        seed=0,
        output_type="latent",
        progress_bar=False,
        callback=lambda i, t, x: timer.tick(),
    )
    t0 = time.perf_counter()
    pipe.decode_latents(latents, tiled=True, progress=False)
    torch.cuda.synchronize()
    t_decode = time.perf_counter() - t0
    return {
        "step_s": timer.times,
        "text_encode_s": round(t_text, 2),
        "vae_decode_tiled_s": round(t_decode, 2),
        "total_s": round(time.perf_counter() - start, 2),
        "peak_GiB": round(peak_gib(), 2),
    }


def to_reference(dit: CogDiT, vae: CogVAE):
    """diffusers models holding our (same) tensors."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel

    dit_cfg = {k: v for k, v in dit.config.to_dict().items() if k != "rope_theta"}
    with torch.device("meta"):
        ref_dit = CogVideoXTransformer3DModel(**dit_cfg)
        ref_vae = AutoencoderKLCogVideoX(scaling_factor=vae.config.scaling_factor)
    out = []
    for ours, ref, rename in ((dit, ref_dit, dit_rename), (vae, ref_vae, vae_rename)):
        theirs = model_shapes(ref)
        report = account_keys(theirs, model_shapes(ours), rename, source="ours -> reference")
        report.raise_if_bad()
        sd = ours.state_dict()
        ref.load_state_dict({k: sd[v] for k, v in report.used.items()}, assign=True, strict=True)
        out.append(ref.eval())
    return out


def run_reference(ref_pipe, mode: str, args: argparse.Namespace) -> dict:
    if mode == "model":
        ref_pipe.enable_model_cpu_offload()
    ref_pipe.vae.enable_tiling()
    reset_peak()
    timer = StepTimer()
    start = time.perf_counter()
    emb, neg = ref_pipe.encode_prompt(PROMPT, "", do_classifier_free_guidance=True, device=torch.device("cuda"))
    t_text = time.perf_counter() - start

    def tick(pipe, i, t, kwargs):
        timer.tick()
        return {}

    timer.start()
    latents = ref_pipe(
        prompt_embeds=emb,
        negative_prompt_embeds=neg,
        num_frames=args.frames,
        num_inference_steps=args.steps,
        guidance_scale=7.0,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
        callback_on_step_end=tick,
    ).frames
    t0 = time.perf_counter()
    with torch.no_grad():
        ref_pipe.vae.decode(latents.transpose(1, 2).to(torch.bfloat16) / ref_pipe.vae.config.scaling_factor)
    torch.cuda.synchronize()
    t_decode = time.perf_counter() - t0
    return {
        "step_s": timer.times,
        "text_encode_s": round(t_text, 2),
        "vae_decode_tiled_s": round(t_decode, 2),
        "total_s": round(time.perf_counter() - start, 2),
        "peak_GiB": round(peak_gib(), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="a T5 tokenizer folder (spiece.model ...)")
    parser.add_argument("--frames", type=int, default=129)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=["none", "model", "sequential"])
    parser.add_argument("--reference-modes", nargs="*", default=["none", "model"])
    parser.add_argument("--quantize", choices=["none", "fp8", "int8"], default="none", help="our DiT's linears")
    parser.add_argument("--json", default="bench_generate.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dtype = torch.bfloat16
    torch.manual_seed(0)
    with torch.device("cuda"):
        dit = CogDiT(dit_preset("cogvideox-5b")).to(dtype).eval().requires_grad_(False)
        vae = CogVAE(vae_preset("cogvideox-5b")).to(dtype).eval().requires_grad_(False)
    if args.quantize != "none":
        from diffsynth_cog.quantization import quantize_dit

        quantize_dit(dit, args.quantize)
        args.reference_modes = []  # the reference cannot take quantized weights
    t5 = t5_xxl_encoder("cuda", dtype)
    tokenizer = load_tokenizer(Path(args.tokenizer))
    text_encoder = CogTextEncoder(t5, tokenizer)
    pipe = CogVideoPipeline(dit, text_encoder, vae.encoder, vae.decoder, device="cuda", torch_dtype=dtype)
    result = {**environment(), "frames": args.frames, "steps": args.steps, "quantize": args.quantize}
    result |= {"ours": {}, "reference": {}}
    for mode in args.modes:
        result["ours"][mode] = run_ours(pipe, mode, args)
        logger.info("ours %s: %s", mode, result["ours"][mode])
        write_json(args.json, result)
    pipe.offloader.set_mode("none")
    if args.reference_modes:
        from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline

        ref_dit, ref_vae = to_reference(dit, vae)
        del pipe, dit, vae
        gc.collect()
        ref_pipe = CogVideoXPipeline(
            tokenizer=tokenizer,
            text_encoder=t5,
            vae=ref_vae,
            transformer=ref_dit,
            scheduler=CogVideoXDDIMScheduler(
                beta_start=0.00085,
                beta_end=0.012,
                beta_schedule="scaled_linear",
                prediction_type="v_prediction",
                rescale_betas_zero_snr=True,
                set_alpha_to_one=True,
                timestep_spacing="trailing",
                snr_shift_scale=1.0,
            ),
        )
        ref_pipe.set_progress_bar_config(disable=True)
        for mode in args.reference_modes:
            result["reference"][mode] = run_reference(ref_pipe, mode, args)
            logger.info("reference %s: %s", mode, result["reference"][mode])
            write_json(args.json, result)
    write_json(args.json, result)
    logger.info("done: %s", result)


if __name__ == "__main__":
    main()
