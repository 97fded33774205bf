"""ExVideo: CogVideoX-5B extended to 129 frames with ExVideo-CogVideoX-LoRA-129f-v1 (DiffSynth's example).

python examples/exvideo_129f.py
"""

import logging

import torch

from diffsynth_cog import CogVideoPipeline, ModelManager, download_models, save_video

logging.basicConfig(level=logging.INFO)
download_models(["CogVideoX-5B", "ExVideo-CogVideoX-LoRA-129f-v1"])
mm = ModelManager(torch_dtype=torch.bfloat16, device="cuda")
mm.load_models(
    [
        "models/CogVideo/CogVideoX-5b/text_encoder",
        "models/CogVideo/CogVideoX-5b/transformer",
        "models/CogVideo/CogVideoX-5b/vae/diffusion_pytorch_model.safetensors",
    ]
)
mm.load_lora("models/lora/ExVideo-CogVideoX-LoRA-129f-v1.safetensors", lora_alpha=1.0)
pipe = CogVideoPipeline.from_model_manager(mm)
video = pipe(
    prompt="an astronaut riding a horse on Mars.",
    negative_prompt="",
    height=480,
    width=720,
    num_frames=129,
    cfg_scale=7.0,
    num_inference_steps=100,
    seed=6,
    tiled=True,
)
save_video(video, "video_129f.mp4", fps=8, quality=5)
