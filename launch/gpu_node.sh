#!/usr/bin/env bash
# Run qmath_jax on NVIDIA GPUs: one process per node drives all the node's GPUs.
#
# One node:
#   launch/gpu_node.sh install                       # pip install -e ".[gpu]" (jax[cuda12])
#   launch/gpu_node.sh check                         # the GPUs JAX sees
#   launch/gpu_node.sh run --config sft_tiny --workdir runs/sft_tiny -- --config.train.steps=50
#
# Several nodes, started by hand (or by any scheduler) on every node, same command except
# the rank; node 0's address is the coordinator:
#   launch/gpu_node.sh multinode --coordinator 10.0.0.1:8476 --num-nodes 2 --node-rank 0 \
#       --config sft_7b --workdir /shared/runs/sft_7b -- --config.init.hf_dir=/shared/Qwen2.5-Math-7B
#   launch/gpu_node.sh multinode --coordinator 10.0.0.1:8476 --num-nodes 2 --node-rank 1 \
#       --config sft_7b --workdir /shared/runs/sft_7b -- --config.init.hf_dir=/shared/Qwen2.5-Math-7B
# Under SLURM use launch/slurm_gpu.sbatch instead (srun starts one task per node).
#
# `--dry-run` prints the environment and command instead of running them.
set -euo pipefail

SCRIPT="$(basename "$0")"
REPO_ROOT="$(cd "$(dirname "$0")/.." && pwd)"
readonly SCRIPT REPO_ROOT

usage() {
  cat <<EOF
Usage: $SCRIPT COMMAND [flags] [-- LAUNCH_ARGS...]

Commands:
  install     pip install -e ".[gpu]" (jax[cuda12]) from this checkout into --python
  check       print the devices JAX sees (all local GPUs should be listed)
  run         run one config on this node: one process, all local GPUs
  multinode   run one config as one process of a multi-node job (this node's GPUs);
              sets JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID

Flags:
  --config NAME          run/multinode: a config in configs/ (e.g. sft_7b) or a .py path
  --workdir DIR          run/multinode: the run directory (multinode: on a file system
                         every node shares, e.g. NFS / Lustre); default runs/<config name>
  --coordinator H:PORT   multinode: node 0's address and a free port
  --num-nodes N          multinode: number of nodes (processes)
  --node-rank R          multinode: this node's rank, 0 .. N-1 (0 runs the coordinator)
  --gpus N               use the first N GPUs of each node (default: all)
  --python PY            the Python interpreter (default: python3)
  --dry-run              print what would run, run nothing
  LAUNCH_ARGS            after --: passed to qmath_jax.launch, e.g. --config.train.steps=10

Resume: rerun the same command; the newest checkpoint in --workdir is restored. A SIGTERM
(preemption, scheduler time limit) makes the run save a checkpoint and exit 0.
EOF
}

die() {
  echo "$SCRIPT: error: $*" >&2
  echo "Run '$SCRIPT' with no arguments for usage." >&2
  exit 2
}

need_value() {
  [[ -n "${2:-}" && "${2:0:2}" != "--" ]] || die "$1 needs a value"
}

run_cmd() {  # prints a command (shell-quoted) and runs it unless --dry-run
  printf '+'
  printf ' %q' "$@"
  printf '\n'
  if [[ "$DRY_RUN" == 0 ]]; then
    "$@"
  fi
}

count_gpus() {  # the number of GPUs on this node, from --gpus or nvidia-smi
  if [[ -n "$GPUS" ]]; then
    echo "$GPUS"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L | grep -c '^GPU '
  else
    die "nvidia-smi not found: install the NVIDIA driver, or pass --gpus N"
  fi
}

launch_cmd() {  # the qmath_jax.launch command line, into the array LAUNCH
  [[ -n "$CONFIG" ]] || die "$COMMAND needs --config NAME (e.g. sft_7b)"
  LAUNCH=("$PYTHON" -m qmath_jax.launch --config "$CONFIG")
  if [[ -n "$WORKDIR" ]]; then LAUNCH+=(--workdir "$WORKDIR"); fi
  LAUNCH+=("${LAUNCH_ARGS[@]}")
}

cmd_install() {
  run_cmd "$PYTHON" -m pip install -U pip
  run_cmd "$PYTHON" -m pip install -e "${REPO_ROOT}[gpu]"
  cmd_check
}

cmd_check() {
  run_cmd "$PYTHON" -c 'import jax; d = jax.devices(); print(len(d), "devices:", d)'
}

cmd_run() {
  launch_cmd
  # One process sees every local GPU and the config's mesh spans them (mesh.data=-1
  # etc.); --gpus N keeps the first N.
  if [[ -n "$GPUS" ]]; then
    run_cmd env CUDA_VISIBLE_DEVICES="$(seq -s, 0 $((GPUS - 1)))" "${LAUNCH[@]}"
  else
    run_cmd "${LAUNCH[@]}"
  fi
}

cmd_multinode() {
  [[ "$COORDINATOR" =~ ^[^:]+:[0-9]+$ ]] || die "multinode needs --coordinator HOST:PORT"
  [[ "$NUM_NODES" =~ ^[1-9][0-9]*$ ]] || die "multinode needs --num-nodes N (N >= 1)"
  [[ "$NODE_RANK" =~ ^[0-9]+$ && "$NODE_RANK" -lt "$NUM_NODES" ]] ||
    die "multinode needs --node-rank R with 0 <= R < --num-nodes ($NUM_NODES)"
  launch_cmd
  local n
  n="$(count_gpus)"
  echo "process $NODE_RANK of $NUM_NODES, $n GPU(s), coordinator $COORDINATOR"
  # JAX_LOCAL_DEVICE_IDS keeps every local GPU in this process: when JAX also detects a
  # SLURM or Open MPI environment it would otherwise give each process a single GPU.
  run_cmd env JAX_COORDINATOR_ADDRESS="$COORDINATOR" JAX_NUM_PROCESSES="$NUM_NODES" \
    JAX_PROCESS_ID="$NODE_RANK" JAX_LOCAL_DEVICE_IDS="$(seq -s, 0 $((n - 1)))" \
    "${LAUNCH[@]}"
}

main() {
  if [[ $# -eq 0 ]]; then
    usage
    exit 2
  fi
  COMMAND="$1"
  shift
  case "$COMMAND" in
    -h | --help | help) usage; exit 0 ;;
    install | check | run | multinode) ;;
    *) die "unknown command '$COMMAND'" ;;
  esac
  CONFIG="" WORKDIR="" COORDINATOR="" NUM_NODES="" NODE_RANK="" GPUS="" PYTHON=python3
  DRY_RUN=0
  LAUNCH_ARGS=()
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --config) need_value "$1" "${2:-}"; CONFIG="$2"; shift 2 ;;
      --workdir) need_value "$1" "${2:-}"; WORKDIR="$2"; shift 2 ;;
      --coordinator) need_value "$1" "${2:-}"; COORDINATOR="$2"; shift 2 ;;
      --num-nodes) need_value "$1" "${2:-}"; NUM_NODES="$2"; shift 2 ;;
      --node-rank) need_value "$1" "${2:-}"; NODE_RANK="$2"; shift 2 ;;
      --gpus) need_value "$1" "${2:-}"; GPUS="$2"; shift 2 ;;
      --python) need_value "$1" "${2:-}"; PYTHON="$2"; shift 2 ;;
      --dry-run) DRY_RUN=1; shift ;;
      --) shift; LAUNCH_ARGS=("$@"); break ;;
      *) die "unknown flag '$1' (arguments for qmath_jax.launch go after --)" ;;
    esac
  done
  if [[ -n "$GPUS" && ! "$GPUS" =~ ^[1-9][0-9]*$ ]]; then
    die "--gpus must be a positive integer"
  fi
  if [[ ${#LAUNCH_ARGS[@]} -gt 0 && "$COMMAND" != run && "$COMMAND" != multinode ]]; then
    die "arguments after -- are for 'run' and 'multinode' only"
  fi
  "cmd_$COMMAND"
}

main "$@"
