"""The CogVideoX diffusion transformer (CogVideoX 1.0: 2B, 5B, 5B-I2V; CogVideoX 1.5: 5B, 5B-I2V) in one file.

Text tokens and video tokens run through every block side by side and meet in one full 3D
attention over ``[text, video]``. Each block modulates the two streams separately (adaptive
LayerNorm-Zero: shift / scale / gate per stream, from the timestep embedding).

Positions:
  * 2B: a fixed 3D sin-cos table added to the video tokens after patchifying.
  * 5B: 3D RoPE on the video tokens' queries and keys (head dim split t:h:w = 1/4 : 3/8 : 3/8).
  * 5B-I2V: RoPE plus a learned table over ``[text, video]`` at the training shape.
  * 1.5: RoPE on integer coordinates sliced from the max grid; patches span 2 latent frames (a Linear
    over (t, h, w) patches); the I2V model adds an ``ofs`` embedding to the time embedding.
Both tables and RoPE are built from the latent shape of each call, against the config's base
grid, so any number of latent frames works (33 for 129 pixel frames; a whole number of temporal
patches on 1.5).

Module names follow DiffSynth-Studio's (``blocks.N.attn1.to_q``, ``blocks.N.ff.0``, ...), so
ExVideo LoRA files address our layers directly.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from diffsynth_cog.configs import DiTConfig
from diffsynth_cog.families import Family
from diffsynth_cog.models.attention import Attend, check_backend, choose_backend, dense_attention
from diffsynth_cog.models.positions import rope_table, sincos_table
from diffsynth_cog.models.tokens import DiTState, TokenLayout


def timestep_embedding(timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool, shift: float) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: [B] -> [B, dim] float32."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(10000) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / (half - shift)
    )
    angles = timesteps.float()[:, None] * freqs[None, :]
    emb = torch.cat([angles.cos(), angles.sin()] if flip_sin_to_cos else [angles.sin(), angles.cos()], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates (even, odd) channel pairs of x [B, L, H, D] by the angles in cos/sin [L, D] (float32 math).

    Text positions carry cos=1, sin=0, so one call covers the whole [text, video] sequence and no
    slice of q/k has to be copied out and back in.
    """
    pairs = x.unflatten(-1, (-1, 2))  # [B, L, H, D/2, 2]
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)  # (a, b) -> (-b, a)
    return (x.float() * cos[:, None, :] + rotated.float() * sin[:, None, :]).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Layers


class AdaLayerNormZero(nn.Module):
    """LayerNorm whose shift/scale (and residual gates) come from the timestep embedding, with
    separate parameters for the video stream and the text stream."""

    def __init__(self, cond_dim: int, dim: int, eps: float) -> None:
        super().__init__()
        self.linear = nn.Linear(cond_dim, 6 * dim)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(
        self, video: torch.Tensor, text: torch.Tensor, cond: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        # video [B, Lv, D], text [B, Lt, D], cond [B, C] -> modulated streams and their gates [B, 1, D]
        shift, scale, gate, t_shift, t_scale, t_gate = self.linear(F.silu(cond))[:, None, :].chunk(6, dim=-1)
        video = self.norm(video) * (1 + scale) + shift
        text = self.norm(text) * (1 + t_scale) + t_shift
        return video, text, gate, t_gate


class AdaLayerNormOut(nn.Module):
    """Final modulation before the output projection (shift, scale only)."""

    def __init__(self, cond_dim: int, dim: int, eps: float) -> None:
        super().__init__()
        self.linear = nn.Linear(cond_dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale = self.linear(F.silu(cond))[:, None, :].chunk(2, dim=-1)
        return self.norm(x) * (1 + scale) + shift


class SelfAttention(nn.Module):
    """Multi-head self-attention with per-head LayerNorm on q and k, and optional RoPE."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, bias: bool) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        inner = num_heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=bias)
        self.to_k = nn.Linear(dim, inner, bias=bias)
        self.to_v = nn.Linear(dim, inner, bias=bias)
        self.norm_q = nn.LayerNorm(head_dim, eps=1e-6)
        self.norm_k = nn.LayerNorm(head_dim, eps=1e-6)
        self.to_out = nn.Linear(inner, dim, bias=True)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, attend: Attend) -> torch.Tensor:
        # x [B, L, D]; rope: cos/sin [L, head_dim] or None; attend: the call's attention part
        heads = (self.num_heads, self.head_dim)
        q = self.norm_q(self.to_q(x).unflatten(-1, heads))  # [B, L, H, Dh]
        k = self.norm_k(self.to_k(x).unflatten(-1, heads))
        v = self.to_v(x).unflatten(-1, heads)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = attend(q, k, v)  # [B, L, H, Dh]
        return self.to_out(out.flatten(2))  # [B, L, D]


class CogDiTBlock(nn.Module):
    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        dim = config.inner_dim
        self.norm1 = AdaLayerNormZero(config.time_embed_dim, dim, config.norm_eps)
        self.attn1 = SelfAttention(dim, config.num_attention_heads, config.attention_head_dim, config.attention_bias)
        self.norm2 = AdaLayerNormZero(config.time_embed_dim, dim, config.norm_eps)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))

    def forward(
        self,
        video: torch.Tensor,
        text: torch.Tensor,
        cond: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        attend: Attend,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # video [B, Lv, D], text [B, Lt, D], cond [B, time_embed_dim]
        n_text = text.shape[1]
        v, t, gate, t_gate = self.norm1(video, text, cond)
        out = self.attn1(torch.cat([t, v], dim=1), rope, attend)  # [B, Lt + Lv, D]
        video = video + gate * out[:, n_text:]
        text = text + t_gate * out[:, :n_text]

        v, t, gate, t_gate = self.norm2(video, text, cond)
        out = self.ff(torch.cat([t, v], dim=1))  # [B, Lt + Lv, D]
        video = video + gate * out[:, n_text:]
        text = text + t_gate * out[:, :n_text]
        return video, text


class CogDiT(nn.Module):
    """CogVideoX transformer.

    ``dit(latents, timestep, prompt_emb)``:
      latents    [B, in_channels, T, H, W]  (T latent frames, H/W latent rows/cols)
      timestep   [B] (or a scalar), in 0..num_train_timesteps-1
      prompt_emb [B, L, text_embed_dim]
    returns the v-prediction [B, out_channels, T, H, W].
    """

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = config
        dim, p = config.inner_dim, config.patch_size
        if config.patch_size_t is None:
            self.patch_embed: nn.Module = nn.Conv2d(config.in_channels, dim, kernel_size=p, stride=p)
        else:  # 1.5: (C, t, h, w) patches flattened through a Linear (with a bias, as the reference builds it)
            self.patch_embed = nn.Linear(config.patch_in_dim, dim)
        self.text_proj = nn.Linear(config.text_embed_dim, dim)
        if config.use_learned_positional_embeddings:
            # Learned table over [text, video] tokens at the training shape.
            n = config.max_text_seq_length + config.sample_latent_frames * (config.sample_height // p) * (
                config.sample_width // p
            )
            self.pos_embedding = nn.Parameter(torch.zeros(1, n, dim))
        self.time_embed = nn.Sequential(
            nn.Linear(dim, config.time_embed_dim), nn.SiLU(), nn.Linear(config.time_embed_dim, config.time_embed_dim)
        )
        if config.ofs_embed_dim:  # 1.5 I2V: a second timestep-style embedding of the ``ofs`` value
            d = config.ofs_embed_dim
            self.ofs_embed = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.blocks = nn.ModuleList([CogDiTBlock(config) for _ in range(config.num_layers)])
        self.norm_final = nn.LayerNorm(dim, eps=config.norm_eps)
        self.norm_out = AdaLayerNormOut(config.time_embed_dim, dim, config.norm_eps)
        self.proj_out = nn.Linear(dim, config.patch_out_dim)
        self.gradient_checkpointing = False
        self.attention_backend: str | None = None  # None: the process default

    @property
    def family(self) -> Family:
        """The released family of this transformer (``families``): factors, rules and defaults."""
        return self.config.family

    def set_attention_backend(self, name: str | None) -> None:
        """This model's attention kernel (one of ``models.attention.BACKENDS``; None = the process default).
        A ``with attention_backend(...)`` block still overrides it for the calls inside."""
        self.attention_backend = None if name is None else check_backend(name)

    def attention_kernel(self) -> str:
        """The kernel a call made now uses: the per-call choice, else this model's, else the process default
        (the one place a DiT call's dense kernel is resolved; the denoiser reads it from here)."""
        return choose_backend(self.attention_backend)

    def compile_blocks(self, **compile_kwargs: object) -> None:
        """Regional ``torch.compile``: each block is compiled (they share one graph), the rest stays
        eager. Fuses the elementwise work around the matmuls and attention; same math.

        Static shapes by default (``dynamic=False``): a generation keeps one shape, and a new one (another
        length, a parallel layout's share, a tile) compiles its own graph instead of a symbolic one."""
        compile_kwargs.setdefault("dynamic", False)
        for block in self.blocks:
            block.compile(**compile_kwargs)

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block in the backward pass (non-reentrant, so frozen bases work)."""
        self.gradient_checkpointing = enabled

    def _check_inputs(self, latents: torch.Tensor, timestep: torch.Tensor, prompt_emb: torch.Tensor) -> None:
        c = self.config
        if latents.ndim != 5:
            raise ValueError(f"latents must be [B, C, T, H, W], got shape {list(latents.shape)}")
        b, ch, t, h, w = latents.shape
        if ch != c.in_channels:
            raise ValueError(f"latents have {ch} channels, this DiT expects in_channels={c.in_channels}")
        if t % c.temporal_patch:
            raise ValueError(
                f"latents have {t} frames; this DiT ({self.family.label}) takes whole temporal patches of "
                f"{c.temporal_patch} latent frames: pad the latents (the pipeline pads to "
                f"{self.family.padded_latent_frames(t)})"
            )
        if h % c.patch_size or w % c.patch_size:
            raise ValueError(f"latent height/width {h}x{w} must be multiples of patch_size {c.patch_size}")
        if prompt_emb.ndim != 3 or prompt_emb.shape[0] != b or prompt_emb.shape[2] != c.text_embed_dim:
            raise ValueError(f"prompt_emb must be [B={b}, L, {c.text_embed_dim}], got shape {list(prompt_emb.shape)}")
        if timestep.numel() not in (1, b):
            raise ValueError(f"timestep must be a scalar or have B={b} entries, got shape {list(timestep.shape)}")
        if c.use_learned_positional_embeddings:
            if (h, w) != (c.sample_height, c.sample_width):
                raise ValueError(
                    f"this DiT has learned position embeddings for {c.sample_height}x{c.sample_width} latents "
                    f"({c.sample_height * self.family.vae_spatial}x{c.sample_width * self.family.vae_spatial} px); "
                    f"got {h}x{w}"
                )
            if prompt_emb.shape[1] != c.max_text_seq_length:
                raise ValueError(
                    f"learned position embeddings need exactly {c.max_text_seq_length} text tokens, "
                    f"got {prompt_emb.shape[1]}"
                )

    def _positions(
        self,
        t: int,
        h: int,
        w: int,
        n_text: int,
        device: torch.device,
        dtype: torch.dtype,
        riflex: tuple[int, int] | None = None,
    ):
        """Additive position table for [text, video] (or None) and the RoPE cos/sin (or None)."""
        c = self.config
        additive = None
        if c.use_learned_positional_embeddings and t == c.sample_latent_frames:
            additive = self.pos_embedding.to(dtype)  # [1, Lt + Lv, D]
        elif c.uses_sincos_positions:
            # 2B; and I2V at other lengths, where the reference falls back to the sin-cos table
            # of the new shape instead of its learned one (kept for parity, see the tests).
            video_table = sincos_table(c, t, h, w).to(device=device, dtype=dtype)
            additive = torch.cat([video_table.new_zeros(n_text, video_table.shape[1]), video_table])[None]
        rope = None
        if c.use_rotary_positional_embeddings:
            cos, sin = rope_table(c, t, h, w, riflex)
            # Text tokens get the identity rotation (cos=1, sin=0).
            cos = torch.cat([cos.new_ones(n_text, cos.shape[1]), cos]).to(device)
            sin = torch.cat([sin.new_zeros(n_text, sin.shape[1]), sin]).to(device)
            rope = (cos, sin)
        return additive, rope

    def patchify(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, T, H, W] -> video tokens [B, (T/pt)*gh*gw, D], temporal patch by temporal patch,
        row by row; a 1.5 patch's features are ordered (C, t, row, col), as the reference flattens them."""
        b, ch, t, h, w = latents.shape
        p, pt = self.config.patch_size, self.config.temporal_patch
        if self.config.patch_size_t is None:
            video = self.patch_embed(latents.transpose(1, 2).flatten(0, 1))  # [B*T, D, gh, gw]
            return video.unflatten(0, (b, t)).flatten(3).transpose(2, 3).flatten(1, 2)
        patches = latents.reshape(b, ch, t // pt, pt, h // p, p, w // p, p)
        patches = patches.permute(0, 2, 4, 6, 1, 3, 5, 7).flatten(4)  # [B, T/pt, gh, gw, C*pt*p*p]
        return self.patch_embed(patches.flatten(1, 3))

    def conditioning(self, timestep: torch.Tensor, batch: int, ofs: float | torch.Tensor | None) -> torch.Tensor:
        """The timestep embedding [B, time_embed_dim] (plus the ``ofs`` embedding on 1.5 I2V; ``ofs`` None: the
        family's value, 2.0)."""
        c = self.config
        dtype = self.proj_out.weight.dtype
        cond = timestep_embedding(timestep.reshape(-1).expand(batch), c.inner_dim, c.flip_sin_to_cos, c.freq_shift)
        cond = self.time_embed(cond.to(dtype))  # [B, time_embed_dim]
        if c.ofs_embed_dim:
            if ofs is None:
                ofs = self.family.image.ofs if self.family.image is not None else None
            if ofs is None:
                raise ValueError(f"this DiT has an ofs embedding (ofs_embed_dim={c.ofs_embed_dim}): pass ofs")
            ofs = torch.as_tensor(ofs, dtype=torch.float32, device=timestep.device).reshape(-1)
            emb = timestep_embedding(ofs, c.ofs_embed_dim, c.flip_sin_to_cos, c.freq_shift)
            cond = cond + self.ofs_embed(emb.to(dtype))
        return cond

    def embed(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        prompt_emb: torch.Tensor,
        attend: Attend | None = None,
        *,
        riflex: tuple[int, int] | None = None,
        ofs: float | torch.Tensor | None = None,
    ) -> DiTState:
        """Inputs -> token streams, timestep conditioning and positions (everything the blocks need).

        ``attend``: the attention part of this call (default: dense attention with the kernel chosen
        per call, per model or per process, see ``models.attention``). ``riflex``: (k, N_k) of RIFLEx for
        the temporal RoPE (``diffsynth_cog.denoise.riflex``; RoPE models only), None = the trained positions.
        ``ofs``: the 1.5 I2V model's ``ofs`` value (None: the family's, 2.0; ignored by other models)."""
        c = self.config
        timestep = torch.as_tensor(timestep, device=latents.device)
        self._check_inputs(latents, timestep, prompt_emb)
        b, _, t, h, w = latents.shape
        p, pt = c.patch_size, c.temporal_patch
        gt, gh, gw = t // pt, h // p, w // p
        dtype = self.proj_out.weight.dtype
        latents, prompt_emb = latents.to(dtype), prompt_emb.to(dtype)

        cond = self.conditioning(timestep, b, ofs)
        video = self.patchify(latents)  # [B, gt*gh*gw, D]
        text = self.text_proj(prompt_emb)  # [B, Lt, D]
        n_text = text.shape[1]

        if riflex is not None and not c.use_rotary_positional_embeddings:
            raise ValueError(
                "riflex applies to RoPE transformers only (CogVideoX-5B), see diffsynth_cog.denoise.riflex"
            )
        additive, rope = self._positions(gt, gh, gw, n_text, latents.device, dtype, riflex)
        if additive is not None:
            text = text + additive[:, :n_text]
            video = video + additive[:, n_text:]
        if attend is None:
            attend = dense_attention(self.attention_kernel())
        layout = TokenLayout(n_text=n_text, grid=(gt, gh, gw), patch_t=pt)
        return DiTState(video=video, text=text, cond=cond, rope=rope, shape=(b, t, h, w), layout=layout, attend=attend)

    def run_blocks(self, state: DiTState, start: int = 0, stop: int | None = None) -> DiTState:
        """Blocks ``start:stop`` on the token streams (all of them by default)."""
        video, text = state.video, state.text
        for block in self.blocks[start:stop]:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                video, text = torch.utils.checkpoint.checkpoint(
                    block, video, text, state.cond, state.rope, state.attend, use_reentrant=False
                )
            else:
                video, text = block(video, text, state.cond, state.rope, state.attend)
        return dataclasses.replace(state, video=video, text=text)

    def project(self, state: DiTState) -> torch.Tensor:
        """Video tokens -> output patches [B, Lv, C_out*pt*p*p], channels ordered (C_out, p_row, p_col) on 1.0,
        (C_out, t, p_row, p_col) on 1.5 (the reference's orders)."""
        return self.proj_out(self.norm_out(self.norm_final(state.video), state.cond))

    def unpatchify(self, patches: torch.Tensor, shape: tuple[int, int, int, int]) -> torch.Tensor:
        """Output patches [B, (T/pt)*gh*gw, C_out*pt*p*p] of latents of ``shape`` (B, T, H, W) -> [B, C_out, T, H, W]."""
        c, p = self.config, self.config.patch_size
        b, t, h, w = shape
        if c.patch_size_t is None:
            video = patches.reshape(b, t, h // p, w // p, c.out_channels, p, p)
            video = video.permute(0, 4, 1, 2, 5, 3, 6)  # [B, C_out, T, gh, p, gw, p]
            return video.reshape(b, c.out_channels, t, h, w)
        pt = c.patch_size_t
        video = patches.reshape(b, t // pt, h // p, w // p, c.out_channels, pt, p, p)
        video = video.permute(0, 4, 1, 5, 2, 6, 3, 7)  # [B, C_out, T/pt, pt, gh, p, gw, p]
        return video.reshape(b, c.out_channels, t, h, w)

    def head(self, state: DiTState) -> torch.Tensor:
        """Video tokens -> v-prediction [B, C_out, T, H, W]."""
        return self.unpatchify(self.project(state), state.shape)

    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        prompt_emb: torch.Tensor,
        ofs: float | torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.head(self.run_blocks(self.embed(latents, timestep, prompt_emb, ofs=ofs)))
