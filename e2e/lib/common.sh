# Shared by the e2e scripts: where things live, and small helpers.
# shellcheck shell=bash

E2E_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck disable=SC2034 # REPO_DIR and TOOLS_BIN are for the scripts that source this
REPO_DIR=$(cd "$E2E_DIR/.." && pwd)
# shellcheck source=lib/versions.sh
. "$E2E_DIR/lib/versions.sh"

# Built binaries are cached outside the tracked tree and reused across runs and
# checkouts; the directory name carries every pinned version, so a bump rebuilds.
DROVER_CACHE=${DROVER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/drover}
TOOLS_DIR="$DROVER_CACHE/tools/kube-$KUBE_VERSION-etcd-$ETCD_VERSION-helm-$HELM_VERSION"
# shellcheck disable=SC2034
TOOLS_BIN="$TOOLS_DIR/bin"

# Runtime state of the running control plane (certificates, etcd data, logs, pids).
DROVER_STATE=${DROVER_STATE:-${XDG_RUNTIME_DIR:-/tmp}/drover-e2e}

log() { printf '[drover-e2e] %s\n' "$*" >&2; }
die() { printf '[drover-e2e] error: %s\n' "$*" >&2; exit 1; }
