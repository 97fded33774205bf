"""One denoising step: the DiT call (`denoiser`) composed of orthogonal parts.

Each part is a module: attention masks (`masks`, their geometry and FlexAttention block masks in
`block_masks`), step skipping (`step_cache`, `teacache`), temporal windows (`windows`), RIFLEx positions
(`riflex`); the spatial tiles and the token split's interface are declared in `denoiser`, the split itself lives
in `diffsynth_cog.parallel`.

Registries (what the command line and the web UI offer): ``MASKS`` (``masks``: attention mask specs),
``STEP_SKIPPERS`` (``step_cache``: step-skipping methods by name). Importing this package fills them with every
built-in entry; a part in a new module joins them with one import line here.
"""

from diffsynth_cog.denoise import teacache as _teacache  # noqa: F401 - registers its method in STEP_SKIPPERS
from diffsynth_cog.denoise.masks import MASKS, register_mask
from diffsynth_cog.denoise.step_cache import STEP_SKIPPERS, register_step_skipper

__all__ = ["MASKS", "STEP_SKIPPERS", "register_mask", "register_step_skipper"]
