"""Video continuation: keep a clip's first latent frames fixed while the rest is generated.

To extend a video by N frames, its last K frames (the *context*) become the start of a new clip of
K + N frames that goes through the video-to-video path: the context is encoded by the VAE, and the
denoising loop pins those latent frames to the encoding, re-noised to each step's noise level
(:class:`KeptFrames`, a loop-level part applied after every sampler step), while the frames after it
are generated. The model thus sees the real context at the right noise level at every step and has
to continue it; after the last step the context latents are exactly the encoding.

``CogVideoPipeline.extend_video`` builds the clip (context + placeholder frames repeating the last
frame, which only matter for ``denoising_strength < 1``), runs it with ``keep_frames=K`` and returns
the original video followed by the N new frames (the original frames are returned untouched).

Frame arithmetic: the causal VAE turns pixel frame 0 into latent frame 0 and every later group of 4
into one latent frame, so K = 4a + 1 context frames are exactly a + 1 latent frames, and N must be a
multiple of 8 for K + N to be a frame count the VAE honours (8k + 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from diffsynth_cog.configs import check_num_frames, frame_multiple
from diffsynth_cog.schedulers import Sampler, add_noise

Frames = Sequence[Image.Image] | np.ndarray | torch.Tensor  # PIL frames, [F, H, W, 3] in [0, 1], [3, F, H, W]


def kept_latent_frames(keep_frames: int, compression: int = 4) -> int:
    """Latent frames that hold exactly the first ``keep_frames`` (4k+1) pixel frames."""
    if keep_frames < 1 or (keep_frames - 1) % compression:
        raise ValueError(f"keep_frames must be {compression}k+1 pixel frames (e.g. 9, 17); got {keep_frames}")
    return (keep_frames - 1) // compression + 1


def check_extension(num_frames: int, context_frames: int, extend_by: int, compression: int = 4) -> None:
    """``extend_by`` new frames after ``context_frames`` of a ``num_frames`` video: checked before any work.

    The clip generated (context + new frames) must be a frame count the VAE honours (``configs.check_num_frames``:
    8k+1), so the context is 8k+1 frames and the extension a multiple of 8."""
    step = frame_multiple(compression)
    check_num_frames(context_frames, step, name="context_frames")
    kept_latent_frames(context_frames, compression)
    if context_frames > num_frames:
        raise ValueError(f"context_frames={context_frames} exceeds the video's {num_frames} frames")
    if extend_by < step or extend_by % step:
        raise ValueError(
            f"extend_by must be a positive multiple of {step} (so the clip stays {step}k+1 frames); got {extend_by}"
        )


@dataclass
class KeptFrames:
    """Loop-level part: after every step, latent frames ``[:n]`` are the clean ``latents`` noised to the next
    step's level with fixed ``noise``; after the last step, the clean latents themselves.

    latents, noise: [B, C, n, h, w] float32 on the loop's device; ``sampler``: the loop's sampler.
    """

    latents: torch.Tensor
    noise: torch.Tensor
    sampler: Sampler

    def __post_init__(self) -> None:
        if self.latents.shape != self.noise.shape:
            raise ValueError(f"kept latents {list(self.latents.shape)} and noise {list(self.noise.shape)} differ")
        self._timesteps: Sequence[int] = self.sampler.timesteps.tolist()

    @property
    def count(self) -> int:
        return self.latents.shape[2]

    def level(self, step: int) -> torch.Tensor:
        """The kept frames as the loop holds them before step ``step`` (``len(timesteps)``: after the last)."""
        if step >= len(self._timesteps):
            return self.latents
        alphas = self.sampler.alphas_cumprod.float()
        return add_noise(self.latents, self.noise, int(self._timesteps[step]), alphas)

    def impose(self, latents: torch.Tensor, step: int) -> torch.Tensor:
        """``latents`` [B, C, T, h, w] with its first frames replaced by the kept ones at step ``step``'s level."""
        if latents.shape[2] < self.count:
            raise ValueError(f"latents have {latents.shape[2]} frames; {self.count} are kept")
        out = latents.clone()
        out[:, :, : self.count] = self.level(step).to(out.dtype)
        return out

    def __call__(self, index: int, latents: torch.Tensor) -> torch.Tensor:
        """After step ``index``: the latents the next step starts from."""
        return self.impose(latents, index + 1)


def require_color_matching() -> None:
    """``color_match=True`` needs the ``evaluate`` extras (OpenCV): checked before anything is encoded or loaded.
    Raises ModuleNotFoundError naming the module (the command line turns it into its extras message)."""
    try:
        import diffsynth_cog.evaluate.color  # noqa: F401
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            f"color_match needs OpenCV, from the 'evaluate' extras (no module {error.name!r}): "
            "pip install 'diffsynth-cog[evaluate]'",
            name=error.name,
        ) from None


def match_new_frames(new: Frames, decoded_context: Frames, context: Frames) -> Frames:
    """The new frames of a continuation with their colours moved by the one Lab transform that takes the
    generated clip's re-decoded context (``decoded_context``) onto the real ``context`` frames:
    ``evaluate.color.match_color``, measured on frames that show the same content. Each of the three is PIL
    frames, a float array [F, H, W, 3] in [0, 1] or pixels [3, F, H, W] in [-1, 1]; the new frames come back
    as they came (PIL frames, or a float array of their dtype).

    The VAE round trip and the model shift a generated clip's colours as a whole, the context included; matching
    on the context undoes that shift before it accumulates over continuations, and keeps the new frames' own
    changes of colour (a light going out). A clean re-decode changes nothing (below a grey level)."""
    from diffsynth_cog.evaluate.color import match_color

    matched = match_color(to_uint8(new), reference=to_uint8(context), source=to_uint8(decoded_context))
    if isinstance(new, np.ndarray):
        return (matched / 255.0).astype(new.dtype)
    return [Image.fromarray(frame) for frame in matched]


def to_uint8(frames: Frames) -> np.ndarray:
    """PIL frames, a float array [F, H, W, 3] in [0, 1] or pixels [3, F, H, W] in [-1, 1] -> uint8 [F, H, W, 3]."""
    if isinstance(frames, torch.Tensor):
        return ((frames.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
    if isinstance(frames, np.ndarray):
        return (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return np.stack([np.asarray(frame.convert("RGB")) for frame in frames])
