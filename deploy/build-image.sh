#!/usr/bin/env bash
# Build the Dockerfile into an image without a Docker engine, start it, and prove it works:
# runs as a non-root user, its HEALTHCHECK passes, /embed answers. Prints the image size.
#
#   sudo deploy/build-image.sh            # or as root; `make image` runs it
#
# Uses buildah (vfs storage, chroot isolation). Where the Docker Hub or the PyTorch CPU wheel
# index cannot be reached (as on our build machines), it makes what the Dockerfile needs locally:
#   - BASE_IMAGE unset: a Debian bookworm base with python3 made by debootstrap, imported with
#     `FROM scratch` + `ADD rootfs.tar /`, passed as the PYTHON_IMAGE build argument;
#   - TORCH_WHEELS set (a folder holding a CPU torch wheel): a PEP 503 index of that folder plus
#     torchaudio from PyPI, served on loopback and passed as TORCH_INDEX_URL.
# With network access to both, run it with BASE_IMAGE=python:3.11-slim-bookworm and TORCH_WHEELS=
# to build exactly the Dockerfile's defaults.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-localhost/voice-embed:latest}
BASE_IMAGE=${BASE_IMAGE:-}
TORCH_WHEELS=${TORCH_WHEELS-/opt/wheels}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCHAUDIO_VERSION=${TORCHAUDIO_VERSION:-2.11.0}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
PORT=${PORT:-18080}
WORK=${WORK:-build/image}
export STORAGE_DRIVER=vfs BUILDAH_ISOLATION=chroot

log() { printf '[build-image] %s\n' "$*" >&2; }

need() {
  local missing=()
  for pkg in "$@"; do command -v "$pkg" >/dev/null || missing+=("$pkg"); done
  if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
  fi
}
need buildah debootstrap curl
mkdir -p "$WORK"

if [[ -z "$BASE_IMAGE" ]]; then
  BASE_IMAGE=localhost/debian-python:bookworm
  if ! buildah inspect --type image "$BASE_IMAGE" >/dev/null 2>&1; then
    log "debootstrap: Debian bookworm + python3 (a few minutes)"
    rm -rf "$WORK/rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
      bookworm "$WORK/rootfs" http://deb.debian.org/debian >"$WORK/debootstrap.log"
    chroot "$WORK/rootfs" apt-get clean
    rm -rf "$WORK/rootfs"/var/lib/apt/lists/* "$WORK/rootfs"/usr/share/doc/* "$WORK/rootfs"/usr/share/man/*
    tar -C "$WORK/rootfs" -cf "$WORK/rootfs.tar" .
    printf 'FROM scratch\nADD rootfs.tar /\nCMD ["python3"]\n' >"$WORK/Containerfile.base"
    buildah build --format docker -f "$WORK/Containerfile.base" -t "$BASE_IMAGE" "$WORK"
    rm -rf "$WORK/rootfs" "$WORK/rootfs.tar"
  fi
fi

build_args=(--build-arg "PYTHON_IMAGE=$BASE_IMAGE")
INDEX_PID=
cleanup() {
  [[ -n "$INDEX_PID" ]] && kill "$INDEX_PID" 2>/dev/null || true
  [[ -n "${CTR:-}" ]] && buildah rm "$CTR" >/dev/null 2>&1 || true
}
trap cleanup EXIT

if [[ -n "$TORCH_WHEELS" ]]; then
  log "local wheel index: torch from $TORCH_WHEELS, torchaudio $TORCHAUDIO_VERSION from PyPI"
  index="$WORK/index"
  rm -rf "$index" && mkdir -p "$index/simple" "$index/files"
  # torch's own dependencies come along, as they do on the PyTorch index.
  pip download -q --only-binary :all: --python-version 3.11 -d "$index/files" \
    "$(ls "$TORCH_WHEELS"/torch-"$TORCH_VERSION"*.whl | head -1)"
  pip download -q --no-deps --only-binary :all: --python-version 3.11 -d "$index/files" "torchaudio==$TORCHAUDIO_VERSION"
  python3 - "$index" <<'PY'
import html, pathlib, re, sys
root = pathlib.Path(sys.argv[1])
projects: dict[str, list[str]] = {}
for wheel in sorted((root / "files").glob("*.whl")):
    name = re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()
    projects.setdefault(name, []).append(wheel.name)
for name, files in projects.items():
    (root / "simple" / name).mkdir(parents=True, exist_ok=True)
    links = "".join(f'<a href="../../files/{html.escape(f)}">{html.escape(f)}</a>\n' for f in files)
    (root / "simple" / name / "index.html").write_text(f"<!DOCTYPE html><html><body>\n{links}</body></html>\n")
PY
  python3 -m http.server --bind 127.0.0.1 8765 --directory "$index" >/dev/null 2>&1 &
  INDEX_PID=$!
  # PyPI's torchaudio is built against CUDA torch; the Dockerfile drops its compiled ops.
  build_args+=(--build-arg TORCH_INDEX_URL=http://127.0.0.1:8765/simple
               --build-arg "TORCH_VERSION=$TORCH_VERSION" --build-arg "TORCHAUDIO_VERSION=$TORCHAUDIO_VERSION"
               --build-arg TORCHAUDIO_PURE_PYTHON=1)
fi
if [[ -f "$CA_BUNDLE" ]]; then
  build_args+=(--volume "$CA_BUNDLE:/etc/ssl/host-ca.crt:ro" --build-arg PIP_CERT=/etc/ssl/host-ca.crt)
fi

log "buildah build -> $IMAGE"
start=$(date +%s)
buildah build --format docker --network host "${build_args[@]}" -t "$IMAGE" .
log "built in $(( $(date +%s) - start )) s"
buildah rmi --prune >/dev/null 2>&1 || true  # the previous build's image, now untagged

# Start it as an engine would: the image's own user, environment and CMD.
CTR=$(buildah from "$IMAGE")
user=$(buildah inspect --format '{{.OCIv1.Config.User}}' "$IMAGE")
mapfile -t cmd < <(buildah inspect --format '{{range .OCIv1.Config.Cmd}}{{println .}}{{end}}' "$IMAGE" | sed '/^$/d')
mapfile -t health < <(buildah inspect --format '{{range .Docker.Config.Healthcheck.Test}}{{println .}}{{end}}' "$IMAGE" | sed '/^$/d')
log "image user: $user; CMD: ${cmd[*]}; HEALTHCHECK: ${health[0]:-none}"
[[ "$user" != "" && "$user" != "0" && "$user" != root* ]] || { log "FAIL: image runs as root"; exit 1; }

buildah run --network host -e "PORT=$PORT" "$CTR" -- "${cmd[@]}" >"$WORK/container.log" 2>&1 &
RUN_PID=$!
healthy=
for _ in $(seq 1 120); do
  if buildah run --network host -e "PORT=$PORT" "$CTR" -- "${health[@]:1}" >/dev/null 2>&1; then healthy=1; break; fi
  kill -0 "$RUN_PID" 2>/dev/null || break
  sleep 1
done
[[ -n "$healthy" ]] || { log "FAIL: HEALTHCHECK never passed"; tail -20 "$WORK/container.log" >&2; exit 1; }
log "HEALTHCHECK passed"
# The serving process itself (chroot isolation: no user namespace, so host uid = image uid).
server_pid=$(pgrep -f -n "^/opt/venv/bin/${cmd[0]} ${cmd[*]:1}$")
uid=$(ps -o uid= -p "$server_pid" | tr -d ' ')
log "serving process $server_pid runs as uid $uid"
[[ "$uid" != 0 ]] || { log "FAIL: runs as root"; exit 1; }

curl -sS --fail-with-body -F file=@samples/flite-slt.wav "http://127.0.0.1:$PORT/embed" >"$WORK/embed.json"
python3 - "$WORK/embed.json" <<'EOF'
import json, sys
body = json.load(open(sys.argv[1]))
assert len(body["embedding"]) == 256, body
print("[build-image] /embed answered: 256-d embedding, duration_s", body.get("duration_s"), file=sys.stderr)
EOF
kill -TERM "$RUN_PID" 2>/dev/null || true
wait "$RUN_PID" 2>/dev/null || true
size=$(buildah images --format '{{.Size}}' "$IMAGE")
log "OK: $IMAGE, size $size"
