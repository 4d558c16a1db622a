#!/usr/bin/env bash
# A Docker engine for `make images` and kind, on machines that have none running.
#
#   hack/docker.sh up      use a working engine if there is one, else start a private one
#   hack/docker.sh env     print `export DOCKER_HOST=...` for the engine in use
#   hack/docker.sh down    stop the private engine (its image store is kept for next time)
#
# The private engine is Debian's docker.io (installed with apt when missing; needs root),
# with its own data root, exec root and socket under ${THAW_DOCKER_DIR:-~/.cache/thaw/docker}:
# no system service is touched. Its default runtime is a runc wrapper that drops
# CAP_SYS_RESOURCE from each container's capability sets: some VMs (these development
# machines) lack that capability in their bounding set, and `docker run --privileged`, which
# kind uses for every node, otherwise fails with "unable to apply caps".
#
# dockerd's firewall rules (FORWARD policy DROP, br_netfilter) would cut the test bed's
# process-node bridge; the node agent accepts its own bridge's traffic
# (testbed/node_agent.py), so both run on one machine.
set -euo pipefail

DIR=${THAW_DOCKER_DIR:-$HOME/.cache/thaw/docker}
SOCK=$DIR/docker.sock
PID=$DIR/dockerd.pid
log() { printf '[docker %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

answers() { docker -H "$1" info >/dev/null 2>&1; }

private_running() { [ -f "$PID" ] && kill -0 "$(cat "$PID")" 2>/dev/null && answers "unix://$SOCK"; }

existing_engine() {
  # A DOCKER_HOST the caller set, or the system socket, that answers and is not ours.
  if [ -n "${DOCKER_HOST:-}" ] && [ "$DOCKER_HOST" != "unix://$SOCK" ] && answers "$DOCKER_HOST"; then
    echo "$DOCKER_HOST"
  elif [ -S /var/run/docker.sock ] && answers unix:///var/run/docker.sock; then
    echo unix:///var/run/docker.sock
  else
    return 1
  fi
}

write_wrapper() {
  local runc
  runc=$(command -v runc || echo /usr/sbin/runc)
  cat > "$DIR/runc-wrapper" <<PY
#!/usr/bin/env python3
"""runc, minus CAP_SYS_RESOURCE in the OCI spec it is given (written by hack/docker.sh)."""
import json, os, sys

args = sys.argv[1:]

def value(flag):
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None

def strip(path, key):
    with open(path) as f:
        spec = json.load(f)
    caps = (spec.get("process") or {}).get("capabilities") if key == "process" else spec.get("capabilities")
    if caps:
        for name, values in caps.items():
            caps[name] = [c for c in values or [] if c != "CAP_SYS_RESOURCE"]
        with open(path, "w") as f:
            json.dump(spec, f)

bundle = value("--bundle") or value("-b")
if bundle and os.path.exists(os.path.join(bundle, "config.json")) and ("create" in args or "run" in args):
    strip(os.path.join(bundle, "config.json"), "process")
process = value("--process") or value("-p")
if process and "exec" in args and os.path.exists(process):
    strip(process, "exec")
os.execv("$runc", ["runc", *args])
PY
  chmod +x "$DIR/runc-wrapper"
}

install_engine() {
  command -v dockerd >/dev/null && return
  if [ "$(id -u)" != 0 ]; then
    log "no Docker engine is running and dockerd is not installed; installing it needs root"
    log "(or point DOCKER_HOST at a running engine)"
    exit 1
  fi
  if ! command -v apt-get >/dev/null; then
    log "no Docker engine is running, dockerd is not installed, and there is no apt-get to install"
    log "Debian's docker.io: install Docker, or point DOCKER_HOST at a running engine"
    exit 1
  fi
  log "installing docker.io (Debian) ..."
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io >/dev/null
}

up() {
  local host
  if host=$(existing_engine); then
    log "using the running engine at $host"
    echo "export DOCKER_HOST=$host"
    return
  fi
  mkdir -p "$DIR"
  if private_running; then
    log "private engine already running (pid $(cat "$PID"))"
    echo "export DOCKER_HOST=unix://$SOCK"
    return
  fi
  install_engine
  if [ "$(id -u)" != 0 ]; then
    log "no Docker engine answers (DOCKER_HOST=${DOCKER_HOST:-unset}, /var/run/docker.sock) and starting"
    log "a private dockerd needs root: run as root, or point DOCKER_HOST at a running engine"
    exit 1
  fi
  write_wrapper
  rm -f "$SOCK" "$PID"
  # dockerd sets the FORWARD policy to DROP and loads br_netfilter; `down` puts both back.
  if command -v iptables >/dev/null; then iptables -S FORWARD | head -1 | awk '{print $3}' > "$DIR/forward-policy"; fi
  sysctl -n net.bridge.bridge-nf-call-iptables > "$DIR/bridge-nf" 2>/dev/null || echo 0 > "$DIR/bridge-nf"
  log "starting dockerd (data root $DIR/data)"
  setsid dockerd --data-root "$DIR/data" --exec-root "$DIR/exec" -p "$PID" -H "unix://$SOCK" \
    --add-runtime "thaw-runc=$DIR/runc-wrapper" --default-runtime thaw-runc \
    >"$DIR/dockerd.log" 2>&1 </dev/null &
  for _ in $(seq 1 60); do
    answers "unix://$SOCK" && break
    sleep 1
  done
  if ! answers "unix://$SOCK"; then
    log "dockerd did not answer within 60 s; its log:"
    tail -20 "$DIR/dockerd.log" >&2
    exit 1
  fi
  log "private engine running (pid $(cat "$PID"))"
  echo "export DOCKER_HOST=unix://$SOCK"
}

down() {
  if [ ! -f "$PID" ]; then
    log "no private engine to stop"
    return
  fi
  local pid
  pid=$(cat "$PID")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
  fi
  # dockerd's containerd child exits with it; give it a moment before anything restarts.
  sleep 2
  rm -f "$PID" "$SOCK"
  if [ -s "$DIR/forward-policy" ] && command -v iptables >/dev/null; then
    iptables -P FORWARD "$(cat "$DIR/forward-policy")" || true
  fi
  if [ -s "$DIR/bridge-nf" ]; then sysctl -q -w "net.bridge.bridge-nf-call-iptables=$(cat "$DIR/bridge-nf")" || true; fi
  rm -f "$DIR/forward-policy" "$DIR/bridge-nf"
  log "private engine stopped (image store kept in $DIR/data; firewall policy restored)"
}

env_() {
  local host
  if host=$(existing_engine); then echo "export DOCKER_HOST=$host"
  elif private_running; then echo "export DOCKER_HOST=unix://$SOCK"
  else log "no engine running: hack/docker.sh up"; exit 1
  fi
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  env) env_ ;;
  *) echo "usage: hack/docker.sh up|down|env" >&2; exit 2 ;;
esac
