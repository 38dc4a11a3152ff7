#!/bin/bash
# One machine, several GPUs (or CPU processes): torchrun starts one rank per GPU.
#   scripts/single_node_multigpu.sh                       # all visible GPUs, the defaults below
#   NPROC=4 STAGE=sft OVERRIDES="+experiment=dolly deepspeed=zero2" scripts/single_node_multigpu.sh
# The same as `rlhf sft ... launcher.nproc_per_node=4`, spelled out for scripts that want torchrun's flags.
# SIGTERM or SIGUSR1 to torchrun reaches every rank: they checkpoint at the next step and exit 75; run the
# script again to resume.
set -euo pipefail
STAGE=${STAGE:-sft}
OVERRIDES=${OVERRIDES:-"+experiment=dolly"}
NPROC=${NPROC:-$(python3 -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
MASTER_PORT=${MASTER_PORT:-29500}
VENV=${VENV:-$(dirname "$0")/../.venv}
source "$VENV/bin/activate"
# shellcheck disable=SC2086
exec torchrun --standalone --nproc_per_node="$NPROC" --master_port="$MASTER_PORT" \
  --signals_to_handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown_timeout=600 \
  -m rlhf_cli "$STAGE" $OVERRIDES
