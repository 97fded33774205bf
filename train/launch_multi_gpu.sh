#!/usr/bin/env bash
# Long-video LoRA post-training of CogVideoX-5B on several GPUs of one node, DeepSpeed ZeRO-2
# (ExVideo's recipe: rank 64 on all eight Linear layers of every block, 129 frames at 480x720).
#
#   train/launch_multi_gpu.sh DATASET [extra `diffsynth-cog train` arguments, e.g. --resume]
#
# Environment: NGPU (default: every GPU nvidia-smi lists), JOB (default
# train/exvideo_129f_multi_gpu.json), MODELS_DIR (default models). Run from the repository root.
# torchrun starts one process per GPU for both stages: prepare shards the clips by rank (each
# process writes its own manifest), train runs one Lightning/DeepSpeed rank per process.
set -euo pipefail

DATASET=${1:?usage: $0 DATASET [train arguments...]}
shift
JOB=${JOB:-train/exvideo_129f_multi_gpu.json}
MODELS_DIR=${MODELS_DIR:-models}
NGPU=${NGPU:-$(nvidia-smi -L | wc -l)}

job_field() { python -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$JOB" "$1"; }
MODEL=$(job_field model)
CACHE=$(job_field cache_dir)

# 1. CogVideoX-5B from ModelScope (once, before the processes start).
diffsynth-cog download CogVideoX-5B --models-dir "$MODELS_DIR"

# 2. T5 + VAE over the dataset, one shard per GPU (rank i encodes clips i, i + NGPU, ...).
torchrun --standalone --nproc_per_node "$NGPU" -m diffsynth_cog.cli prepare \
    --dataset "$DATASET" --model "$MODEL" --cache "$CACHE" --num-frames 129 --height 480 --width 720

# 3. ZeRO-2 training: optimizer states and gradients sharded over the NGPU ranks.
torchrun --standalone --nproc_per_node "$NGPU" -m diffsynth_cog.cli train \
    --config "$JOB" --set devices="$NGPU" "$@"
