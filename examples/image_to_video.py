"""Image-to-video with CogVideoX-5B-I2V: animate a still image.

    python examples/image_to_video.py image.png
The I2V model works at its training size, 480x720; model CPU offload keeps peak memory low.
"""

import logging
import sys

import torch

from diffsynth_cog import CogVideoPipeline, ModelManager, download_models, save_video

logging.basicConfig(level=logging.INFO)
image = sys.argv[1] if len(sys.argv) > 1 else "image.png"
model_dir = download_models(["CogVideoX-5B-I2V"])[0]
mm = ModelManager(torch_dtype=torch.bfloat16, device="cpu", file_path_list=[model_dir])
pipe = CogVideoPipeline.from_model_manager(mm, device="cuda")
pipe.enable_model_cpu_offload()
video = pipe(
    prompt="the scene comes alive, gentle camera pan.",
    input_image=image,
    height=480,
    width=720,
    num_frames=49,
    cfg_scale=6.0,
    num_inference_steps=50,
    sampler="dpm",
    seed=0,
    tiled=True,
)
save_video(video, "video_i2v.mp4", fps=8, quality=5)
