"""Long-video post-training: dataset indexes, the encoder "prepare" step and the latent cache.

Training a CogVideoX DiT on long clips needs only the DiT in the training process: the T5 text
encoder and the VAE encoder run once, ahead of time, over the whole dataset
(:func:`diffsynth_cog.training.prepare.prepare_cache`), and the trainer reads the cached latents and
prompt embeddings (:class:`diffsynth_cog.training.cache.LatentCacheDataset`).

Modules (import them directly; this package file stays free of heavy imports such as lightning):

* :mod:`diffsynth_cog.training.data`: dataset index formats (``metadata.json`` / ``metadata.csv`` /
  ``prompts.txt`` + ``videos.txt``), :class:`VideoSample`, :class:`VideoClipDataset`.
* :mod:`diffsynth_cog.training.prepare`: :func:`prepare_cache`, :func:`load_encoders`.
* :mod:`diffsynth_cog.training.encoders`: :func:`load_encoders` and each clip's encoding.
* :mod:`diffsynth_cog.training.cache_folder`: the cache folder's settings, checks and records as prepare writes them.
* :mod:`diffsynth_cog.training.cache_layout`: the cache's layout: :class:`CacheInfo` (``cache_info.json``), the
  records and the manifests, and reading them.
* :mod:`diffsynth_cog.training.cache`: :class:`LatentCacheDataset`, the trainer's dataset over the cache.
"""
