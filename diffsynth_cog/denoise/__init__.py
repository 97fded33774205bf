"""One denoising step: the DiT call (`denoiser`) composed of orthogonal parts.

Each part is a module: attention masks (`masks`), step skipping (`step_cache`, `teacache`), temporal
windows (`windows`), RIFLEx positions (`riflex`); the spatial tiles and the token split's interface are
declared in `denoiser`, the split itself lives in `diffsynth_cog.parallel`.
"""
