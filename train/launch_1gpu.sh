#!/usr/bin/env bash
# Long-video LoRA post-training of CogVideoX-5B on one GPU (129 frames at 480x720).
#
#   train/launch_1gpu.sh DATASET [extra `diffsynth-cog train` arguments, e.g. --resume]
#
# DATASET: a folder with metadata.json / metadata.csv (DiffSynth-Studio) or prompts.txt + videos.txt.
# Environment: JOB (default train/exvideo_129f_1gpu.json), MODELS_DIR (default models).
# Run from the repository root: the job's paths are relative to it. Each stage can be re-run: the
# download and the prepare step skip finished work; add --resume to continue an interrupted run.
set -euo pipefail

DATASET=${1:?usage: $0 DATASET [train arguments...]}
shift
JOB=${JOB:-train/exvideo_129f_1gpu.json}
MODELS_DIR=${MODELS_DIR:-models}

job_field() { python -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$JOB" "$1"; }
MODEL=$(job_field model)
CACHE=$(job_field cache_dir)

# 1. CogVideoX-5B from ModelScope (skipped when already complete).
diffsynth-cog download CogVideoX-5B --models-dir "$MODELS_DIR"

# 2. T5 + VAE once over the dataset: one safetensors record per clip in the cache.
diffsynth-cog prepare --dataset "$DATASET" --model "$MODEL" --cache "$CACHE" \
    --num-frames 129 --height 480 --width 720

# 3. Train the LoRA (checkpoints, logs and the exported LoRA go to the job's output_dir).
diffsynth-cog train --config "$JOB" "$@"
