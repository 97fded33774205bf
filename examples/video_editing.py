"""Video-to-video editing: re-render an existing clip with a new prompt.

    python examples/video_editing.py input.mp4
``denoising_strength`` sets how much of the schedule runs: low keeps the input's layout and motion,
1.0 ignores the input.
"""

import logging
import sys

import torch

from diffsynth_cog import CogVideoPipeline, ModelManager, download_models, load_video, save_video

logging.basicConfig(level=logging.INFO)
source = sys.argv[1] if len(sys.argv) > 1 else "video_49f.mp4"
model_dir = download_models(["CogVideoX-5B"])[0]
mm = ModelManager(torch_dtype=torch.bfloat16, device="cuda", file_path_list=[model_dir])
pipe = CogVideoPipeline.from_model_manager(mm)
frames = load_video(source, height=480, width=720, num_frames=49)
video = pipe(
    prompt="an astronaut riding a horse on Mars, watercolor painting.",
    input_video=frames,
    denoising_strength=0.7,
    num_frames=49,
    cfg_scale=7.0,
    num_inference_steps=50,
    seed=1,
    tiled=True,
)
save_video(video, "video_edited.mp4", fps=8, quality=5)
