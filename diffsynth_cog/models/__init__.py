"""Model definitions: the CogVideoX DiT, the 3D causal VAE and the T5 text encoder wrapper."""
