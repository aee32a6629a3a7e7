#!/usr/bin/env bash
# Run qmath_jax on a Cloud TPU VM, a pod slice, or several slices (Multislice).
#
#   launch/tpu_vm.sh create  --name qm --zone us-east5-a --accelerator-type v5p-128
#   launch/tpu_vm.sh install --name qm --zone us-east5-a
#   launch/tpu_vm.sh fetch   --name qm --zone us-east5-a \
#       --src gs://BUCKET/Qwen2.5-Math-72B --dest /dev/shm
#   launch/tpu_vm.sh run     --name qm --zone us-east5-a --config sft_72b \
#       --workdir gs://BUCKET/runs/sft_72b -- \
#       --config.init.hf_dir=/dev/shm/Qwen2.5-Math-72B \
#       --config.data.sources=/dev/shm/sft_cot.jsonl=3,/dev/shm/sft_tir.jsonl=1
#   launch/tpu_vm.sh delete  --name qm --zone us-east5-a
#
# Every command reaches all hosts (`--worker=all`, and `--node=all` for a queued resource).
# `--dry-run` prints the gcloud commands instead of running them. Run with no arguments for
# the full usage.
set -euo pipefail

SCRIPT="$(basename "${BASH_SOURCE[0]}")"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly SCRIPT REPO_ROOT
# \$HOME is expanded by the remote shell, on every host.
readonly REMOTE_DIR="\$HOME/qmath_jax"
readonly REMOTE_LOG="\$HOME/qmath_jax_run.log"
readonly REMOTE_PID="\$HOME/qmath_jax_run.pid"
readonly REMOTE_TAR='qmath_jax_src.tar.gz'  # lands in the remote home directory
# gcsfs lets etils.epath read and write gs:// paths: Orbax's checkpoint metadata and every
# other workdir file (qmath_jax/fileio.py); google-cloud-storage lets tensorboardX write
# its event files there.
readonly EXTRA_PIP="gcsfs google-cloud-storage"

usage() {
  cat <<EOF
Usage: $SCRIPT COMMAND --name NAME --zone ZONE [flags] [-- LAUNCH_ARGS...]

Commands:
  create    create a TPU VM or pod slice (gcloud compute tpus tpu-vm create), or a queued
            resource with --queued / --num-slices N (gcloud compute tpus queued-resources
            create; N > 1 is Multislice), and wait until it is ACTIVE
  install   copy this checkout (or clone --repo URL) to every host and pip install -e ".[tpu]"
  fetch     copy --src (a gs:// file or folder: an HF checkpoint, data) into --dest on every host
  run       run one config on every host at once; LAUNCH_ARGS after -- go to qmath_jax.launch
  logs      show the end of worker 0's log of a --detach run (-f to follow)
  stop      send SIGTERM to a --detach run on every host (it checkpoints, then exits)
  ssh       run --command CMD on every host
  status    describe the TPU VM or queued resource
  delete    delete the TPU VM, or the queued resource and all its slices

Flags:
  --name NAME              TPU VM name; for a queued resource its id and slice prefix
  --zone ZONE              e.g. us-east5-a (v5p), us-east1-d (v6e), us-central2-b (v4)
  --project PROJECT        default: gcloud's configured project
  --accelerator-type TYPE  create: v5p-128, v5litepod-256, v6e-256, v4-64, ...
  --version VERSION        create: runtime version; default from TYPE: v5p -> v2-alpha-tpuv5,
                           v5litepod -> v2-alpha-tpuv5-lite, v6e -> v2-alpha-tpuv6e,
                           v4 and older -> tpu-ubuntu2204-base
  --num-slices N           create: N slices of TYPE in one queued resource (default 1); run
                           then needs -- --config.mesh.dcn_data=N
  --queued                 create: a queued resource even for one slice (waits for capacity)
  --spot | --reserved      create: spot capacity / a reservation
  --no-wait                create: return once the queued-resource request is accepted
  --repo URL [--ref REF]   install: git clone URL (at REF) instead of copying this checkout
  --src GS_PATH --dest DIR fetch: source and destination folder on every host
  --config NAME            run: a config in configs/ (e.g. sft_72b) or a path on the hosts
  --workdir DIR            run: gs://BUCKET/runs/NAME (every host must reach it)
  --detach                 run: start in the background (log in ~/qmath_jax_run.log) and return
  --command CMD            ssh: the command
  -f                       logs: follow
  --dry-run                print the gcloud commands, run nothing

Resume: run the same 'run' command again; the newest checkpoint in --workdir is restored.
EOF
}

die() {
  echo "$SCRIPT: error: $*" >&2
  echo "Run '$SCRIPT' with no arguments for usage." >&2
  exit 2
}

# Prints a command (shell-quoted) and runs it unless --dry-run.
run_cmd() {
  printf '+'
  printf ' %q' "$@"
  printf '\n'
  if [[ "$DRY_RUN" == 0 ]]; then
    "$@"
  fi
}

need_value() {  # need_value FLAG VALUE: a flag's value must be present
  [[ -n "${2:-}" && "${2:0:2}" != "--" ]] || die "$1 needs a value"
}

runtime_version_for() {  # the runtime version Cloud TPU documents for JAX on this type
  case "$1" in
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v5litepod-*) echo "v2-alpha-tpuv5-lite" ;;
    v2-* | v3-* | v4-*) echo "tpu-ubuntu2204-base" ;;
    *) die "no default runtime version for accelerator type '$1'; pass --version" ;;
  esac
}

gcloud_scope() {  # the flags every gcloud call shares
  SCOPE=(--zone "$ZONE")
  if [[ -n "$PROJECT" ]]; then SCOPE+=(--project "$PROJECT"); fi
}

# A queued resource (Multislice or --queued) is reached through queued-resources ssh/scp,
# which address all its slices; a plain TPU VM through tpu-vm ssh/scp.
is_queued() {
  if [[ "$DRY_RUN" == 1 ]]; then
    [[ "$QUEUED" == 1 || "$NUM_SLICES" -gt 1 ]]
    return
  fi
  gcloud compute tpus queued-resources describe "$NAME" "${SCOPE[@]}" \
    --format='value(name)' >/dev/null 2>&1
}

on_all_hosts() {  # on_all_hosts REMOTE_COMMAND
  if is_queued; then
    run_cmd gcloud compute tpus queued-resources ssh "$NAME" "${SCOPE[@]}" \
      --node=all --worker=all --command "$1"
  else
    run_cmd gcloud compute tpus tpu-vm ssh "$NAME" "${SCOPE[@]}" --worker=all --command "$1"
  fi
}

on_worker0() {
  if is_queued; then
    run_cmd gcloud compute tpus queued-resources ssh "$NAME" "${SCOPE[@]}" \
      --node=0 --worker=0 --command "$1"
  else
    run_cmd gcloud compute tpus tpu-vm ssh "$NAME" "${SCOPE[@]}" --worker=0 --command "$1"
  fi
}

copy_to_all_hosts() {  # copy_to_all_hosts LOCAL_FILE (lands in the remote home directory)
  if is_queued; then
    run_cmd gcloud compute tpus queued-resources scp "$1" "$NAME": "${SCOPE[@]}" \
      --node=all --worker=all
  else
    run_cmd gcloud compute tpus tpu-vm scp "$1" "$NAME": "${SCOPE[@]}" --worker=all
  fi
}

cmd_create() {
  [[ -n "$ACCEL" ]] || die "create needs --accelerator-type (e.g. v5p-128)"
  local version="$VERSION"
  if [[ -z "$version" ]]; then version="$(runtime_version_for "$ACCEL")"; fi
  local capacity=()
  if [[ "$SPOT" == 1 ]]; then capacity+=(--spot); fi
  if [[ "$RESERVED" == 1 ]]; then capacity+=(--reserved); fi
  if [[ "$QUEUED" == 0 && "$NUM_SLICES" == 1 ]]; then
    run_cmd gcloud compute tpus tpu-vm create "$NAME" "${SCOPE[@]}" \
      --accelerator-type "$ACCEL" --version "$version" "${capacity[@]}"
    return
  fi
  local nodes=(--node-id "$NAME")
  if [[ "$NUM_SLICES" -gt 1 ]]; then nodes=(--node-count "$NUM_SLICES" --node-prefix "$NAME"); fi
  run_cmd gcloud compute tpus queued-resources create "$NAME" "${SCOPE[@]}" \
    --accelerator-type "$ACCEL" --runtime-version "$version" "${nodes[@]}" "${capacity[@]}"
  if [[ "$NO_WAIT" == 0 ]]; then wait_active; fi
}

wait_active() {  # polls the queued resource until ACTIVE; fails on a terminal state
  local state=""
  while true; do
    if [[ "$DRY_RUN" == 1 ]]; then
      echo "(dry run: would poll 'queued-resources describe' until state ACTIVE)"
      return
    fi
    state="$(gcloud compute tpus queued-resources describe "$NAME" "${SCOPE[@]}" \
      --format='value(state.state)')"
    echo "$(date +%H:%M:%S) queued resource $NAME: $state"
    case "$state" in
      ACTIVE) return ;;
      FAILED | SUSPENDED | SUSPENDING | DELETING)
        die "queued resource $NAME is $state; see 'gcloud compute tpus queued-resources describe $NAME'" ;;
    esac
    sleep 30
  done
}

source_tarball() {  # writes this checkout's files (tracked + untracked, not ignored) to $1
  if git -C "$REPO_ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git -C "$REPO_ROOT" ls-files -z --cached --others --exclude-standard |
      tar -C "$REPO_ROOT" --null -T - -czf "$1"
  else
    tar -C "$REPO_ROOT" --exclude=.git --exclude=runs --exclude='*.egg-info' -czf "$1" .
  fi
}

cmd_install() {
  local pip="python3 -m pip install -q"
  local get
  if [[ -n "$REPO" ]]; then
    local branch=""
    if [[ -n "$REF" ]]; then branch="--branch $(printf '%q' "$REF")"; fi
    get="rm -rf $REMOTE_DIR && git clone -q --depth 1 $branch $(printf '%q' "$REPO") $REMOTE_DIR"
  else
    TMP_DIR="$(mktemp -d)"
    trap 'rm -rf "$TMP_DIR"' EXIT
    local tarball="$TMP_DIR/$REMOTE_TAR"
    if [[ "$DRY_RUN" == 0 ]]; then source_tarball "$tarball"; fi
    echo "source: $REPO_ROOT -> $tarball"
    copy_to_all_hosts "$tarball"
    get="rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar -xzf \$HOME/$REMOTE_TAR -C $REMOTE_DIR"
  fi
  on_all_hosts "set -e; $get && cd $REMOTE_DIR && $pip -U pip && $pip -e '.[tpu]' $EXTRA_PIP \
&& python3 -c 'import jax, qmath_jax; print(\"jax\", jax.__version__, \"ready on\", __import__(\"socket\").gethostname())'"
}

cmd_fetch() {
  [[ "$SRC" == gs://* ]] || die "fetch needs --src gs://BUCKET/PATH"
  [[ -n "$DEST" ]] || die "fetch needs --dest DIR (e.g. /dev/shm: host RAM, for 72B weights)"
  local dest
  dest="$(printf '%q' "$DEST")"
  on_all_hosts "set -e; mkdir -p $dest && gcloud storage cp --recursive $(printf '%q' "$SRC") $dest \
&& du -sh $dest/$(printf '%q' "$(basename "$SRC")")"
}

cmd_run() {
  [[ -n "$CONFIG" ]] || die "run needs --config NAME (e.g. sft_72b)"
  [[ -n "$WORKDIR" ]] || die "run needs --workdir (gs://BUCKET/runs/NAME)"
  if [[ "$WORKDIR" != gs://* ]]; then
    echo "warning: --workdir $WORKDIR is not a gs:// path; on a multi-host slice every host" \
      "must write to the same place, so use gs://BUCKET/..." >&2
  fi
  local launch
  launch="$(printf '%q ' python3 -m qmath_jax.launch --config "$CONFIG" --workdir "$WORKDIR" \
    "${LAUNCH_ARGS[@]}")"
  if [[ "$DETACH" == 1 ]]; then
    # nohup's PID is the run's (it execs python), so 'stop' signals the run itself.
    on_all_hosts "cd $REMOTE_DIR || exit 1; nohup $launch > $REMOTE_LOG 2>&1 < /dev/null & \
echo \$! > $REMOTE_PID; echo started pid \$(cat $REMOTE_PID) on \$(hostname)"
  else
    on_all_hosts "set -o pipefail; cd $REMOTE_DIR && $launch 2>&1 | tee $REMOTE_LOG"
  fi
}

cmd_logs() {
  local follow=""
  if [[ "$FOLLOW" == 1 ]]; then follow="-f"; fi
  on_worker0 "tail -n 200 $follow $REMOTE_LOG"
}

cmd_stop() {
  # SIGTERM: the trainer saves a checkpoint, then the run exits; rerun 'run' to resume.
  on_all_hosts "if [ -f $REMOTE_PID ]; then kill -TERM \$(cat $REMOTE_PID) \
&& echo sent SIGTERM to \$(cat $REMOTE_PID) on \$(hostname); fi"
}

cmd_status() {
  if is_queued; then
    run_cmd gcloud compute tpus queued-resources describe "$NAME" "${SCOPE[@]}"
  else
    run_cmd gcloud compute tpus tpu-vm describe "$NAME" "${SCOPE[@]}"
  fi
}

cmd_delete() {
  if is_queued; then
    run_cmd gcloud compute tpus queued-resources delete "$NAME" "${SCOPE[@]}" --force --quiet
  else
    run_cmd gcloud compute tpus tpu-vm delete "$NAME" "${SCOPE[@]}" --quiet
  fi
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
    create | install | fetch | run | logs | stop | ssh | status | delete) ;;
    *) die "unknown command '$COMMAND'" ;;
  esac
  NAME="" ZONE="" PROJECT="" ACCEL="" VERSION="" NUM_SLICES=1 QUEUED=0 SPOT=0 RESERVED=0
  NO_WAIT=0 REPO="" REF="" SRC="" DEST="" CONFIG="" WORKDIR="" DETACH=0 SSH_COMMAND=""
  FOLLOW=0 DRY_RUN=0
  LAUNCH_ARGS=()
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --name) need_value "$1" "${2:-}"; NAME="$2"; shift 2 ;;
      --zone) need_value "$1" "${2:-}"; ZONE="$2"; shift 2 ;;
      --project) need_value "$1" "${2:-}"; PROJECT="$2"; shift 2 ;;
      --accelerator-type) need_value "$1" "${2:-}"; ACCEL="$2"; shift 2 ;;
      --version) need_value "$1" "${2:-}"; VERSION="$2"; shift 2 ;;
      --num-slices) need_value "$1" "${2:-}"; NUM_SLICES="$2"; shift 2 ;;
      --queued) QUEUED=1; shift ;;
      --spot) SPOT=1; shift ;;
      --reserved) RESERVED=1; shift ;;
      --no-wait) NO_WAIT=1; shift ;;
      --repo) need_value "$1" "${2:-}"; REPO="$2"; shift 2 ;;
      --ref) need_value "$1" "${2:-}"; REF="$2"; shift 2 ;;
      --src) need_value "$1" "${2:-}"; SRC="$2"; shift 2 ;;
      --dest) need_value "$1" "${2:-}"; DEST="$2"; shift 2 ;;
      --config) need_value "$1" "${2:-}"; CONFIG="$2"; shift 2 ;;
      --workdir) need_value "$1" "${2:-}"; WORKDIR="$2"; shift 2 ;;
      --detach) DETACH=1; shift ;;
      --command) need_value "$1" "${2:-}"; SSH_COMMAND="$2"; shift 2 ;;
      -f) FOLLOW=1; shift ;;
      --dry-run) DRY_RUN=1; shift ;;
      --) shift; LAUNCH_ARGS=("$@"); break ;;
      *) die "unknown flag '$1' (arguments for qmath_jax.launch go after --)" ;;
    esac
  done
  [[ -n "$NAME" ]] || die "--name is required"
  [[ -n "$ZONE" ]] || die "--zone is required"
  [[ "$NUM_SLICES" =~ ^[1-9][0-9]*$ ]] || die "--num-slices must be a positive integer"
  [[ "$SPOT" == 0 || "$RESERVED" == 0 ]] || die "--spot and --reserved exclude each other"
  if [[ ${#LAUNCH_ARGS[@]} -gt 0 && "$COMMAND" != run ]]; then
    die "arguments after -- are for 'run' only"
  fi
  if [[ "$DRY_RUN" == 0 ]] && ! command -v gcloud >/dev/null 2>&1; then
    die "gcloud not found: install the Google Cloud CLI (https://cloud.google.com/sdk)"
  fi
  gcloud_scope
  case "$COMMAND" in
    ssh)
      [[ -n "$SSH_COMMAND" ]] || die "ssh needs --command CMD"
      on_all_hosts "$SSH_COMMAND" ;;
    *) "cmd_$COMMAND" ;;
  esac
}

# Sourcing the file (tests) defines the functions without running a command.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  main "$@"
fi
