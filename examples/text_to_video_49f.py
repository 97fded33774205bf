"""CogVideoX-5B text-to-video, 49 frames (the base model's length).

    python examples/text_to_video_49f.py
Downloads CogVideoX-5B into ./models on first use (about 20 GB).
"""

import logging

import torch

from diffsynth_cog import CogVideoPipeline, ModelManager, download_models, save_video

logging.basicConfig(level=logging.INFO)
model_dir = download_models(["CogVideoX-5B"])[0]
mm = ModelManager(torch_dtype=torch.bfloat16, device="cuda")
mm.load_models([model_dir / "text_encoder", model_dir / "transformer", model_dir / "vae"])
pipe = CogVideoPipeline.from_model_manager(mm)
video = pipe(
    prompt="an astronaut riding a horse on Mars.",
    negative_prompt="",
    height=480,
    width=720,
    num_frames=49,
    cfg_scale=6.0,
    num_inference_steps=50,
    sampler="dpm",  # the official 5B demo's sampler
    seed=0,
    tiled=True,
)
save_video(video, "video_49f.mp4", fps=8, quality=5)
