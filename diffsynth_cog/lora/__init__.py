"""LoRA for the CogVideoX DiT, in two halves.

Inference (:mod:`.reader`, :mod:`.layouts`, :mod:`.files`, :mod:`.merge`): ``merge_lora`` reads a LoRA
file (DiffSynth-Studio or diffusers/PEFT layout, safetensors only), checks all of it against the model's
Linear layers and folds it into their weights; ``restore_base_weights`` undoes any number of merges bitwise.

Training (:mod:`.layers`, :mod:`.export`): ``inject_lora`` swaps Linear layers for trainable
``LoRALinear``; ``lora_state_dict`` / ``ema_lora_state_dicts`` / ``export_lora`` turn the trained
layers into checkpoints, ExVideo's EMA and a DiffSynth-Studio- or diffusers-layout file that
``merge_lora``, DiffSynth-Studio and diffusers load back.
"""

from diffsynth_cog.errors import LoRAError
from diffsynth_cog.lora.export import (
    LORA_EXPORT_FORMATS,
    ema_lora_state_dicts,
    export_lora,
    load_lora_state_dict,
    lora_state_dict,
)
from diffsynth_cog.lora.files import DIFFSYNTH, DIFFUSERS, TRAINED_ATTENTION_KEY, LoRAMergeReport, trained_attention
from diffsynth_cog.lora.layers import (
    BLOCK_LINEAR_TARGETS,
    LoRALinear,
    TargetSpec,
    inject_lora,
    lora_layers,
    lora_parameters,
)
from diffsynth_cog.lora.merge import merge_lora, merged_loras, restore_base_weights

__all__ = [
    "BLOCK_LINEAR_TARGETS",
    "DIFFSYNTH",
    "DIFFUSERS",
    "LORA_EXPORT_FORMATS",
    "LoRAError",
    "LoRALinear",
    "LoRAMergeReport",
    "TRAINED_ATTENTION_KEY",
    "TargetSpec",
    "ema_lora_state_dicts",
    "export_lora",
    "inject_lora",
    "load_lora_state_dict",
    "lora_layers",
    "lora_parameters",
    "lora_state_dict",
    "merge_lora",
    "merged_loras",
    "restore_base_weights",
    "trained_attention",
]
