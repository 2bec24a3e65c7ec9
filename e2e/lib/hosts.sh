# Hosts of the local cluster: network namespaces on this machine, each with its own
# address on a bridge that also reaches the API server, its own Node object (there
# is no kubelet: this script makes it) and its own drover-agent running inside it.
# Sourced by e2e/cluster after common.sh; needs root (ip netns).
#
# Layout of one host, $DROVER_STATE/hosts/NAME/:
#   address     its IPv4 address            agent.cmd   the agent's command line, one word a line
#   agent.pid   the agent's pid             agent.log   the agent's output (appended across starts)
#   run/        its runtime dir (models /run, a tmpfs: wiped by `host stop`)
#   lib/        its state dir (models /var/lib: kept across stop/start)
#   off         present while it is powered off (`host stop` .. `host start`)
#   isolated    present while its network is cut (`host isolate` .. `host heal`)
# shellcheck shell=bash

HOSTS_DIR="$DROVER_STATE/hosts"
HOSTS_KUBECONFIG="$HOSTS_DIR/kubeconfig"
NETWORK_FILE="$DROVER_STATE/network"

# The network a cluster's hosts live on. Chosen by the environment when the cluster
# is first brought up, then recorded in its state so that later commands (and
# `down`) act on the same bridge and namespaces whatever their environment says.
load_network() { # warn|quiet: whether to say that the environment is overruled
  BRIDGE=${DROVER_BRIDGE:-drover0}
  HOST_NET=${DROVER_HOST_NET:-10.77.0}
  NETNS_PREFIX=${DROVER_NETNS_PREFIX:-drover-}
  if [ -f "$NETWORK_FILE" ]; then
    local want="$BRIDGE $HOST_NET $NETNS_PREFIX"
    # shellcheck source=/dev/null
    . "$NETWORK_FILE"
    [ "$want" = "$BRIDGE $HOST_NET $NETNS_PREFIX" ] || [ "$1" = quiet ] ||
      log "note: this cluster's hosts use bridge $BRIDGE, network $HOST_NET.0/24, netns prefix $NETNS_PREFIX (recorded in $NETWORK_FILE); DROVER_BRIDGE/DROVER_HOST_NET/DROVER_NETNS_PREFIX are ignored"
  fi
  [[ $HOST_NET =~ ^(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])(\.(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])){2}$ ]] ||
    die "DROVER_HOST_NET must be the first three octets of an IPv4 /24, e.g. 10.77.0 (got '$HOST_NET')"
  # Root-side veths are named BRIDGE-OCTET: at most 11 + 4 characters (IFNAMSIZ - 1).
  [[ $BRIDGE =~ ^[A-Za-z0-9_.]{1,11}$ ]] ||
    die "DROVER_BRIDGE must be 1-11 letters, digits, '_' or '.' (its veths are named BRIDGE-N, at most 15 characters); got '$BRIDGE'"
  [[ $NETNS_PREFIX =~ ^[A-Za-z0-9_.-]*$ ]] || die "DROVER_NETNS_PREFIX may hold letters, digits, '_', '.', '-' only; got '$NETNS_PREFIX'"
  GATEWAY="$HOST_NET.1"
}

record_network() {
  mkdir -p "$DROVER_STATE"
  [ -f "$NETWORK_FILE" ] && return 0
  printf 'BRIDGE=%s\nHOST_NET=%s\nNETNS_PREFIX=%s\n' "$BRIDGE" "$HOST_NET" "$NETNS_PREFIX" >"$NETWORK_FILE"
}

# Where drover-agent, drover-vmm and drover-monitor are: DROVER_BIN_DIR, else cargo's
# debug output directory of this checkout.
BIN_DIR_SET=${DROVER_BIN_DIR:+1}
if [ -n "${DROVER_BIN_DIR:-}" ]; then
  BIN_DIR=$DROVER_BIN_DIR
else
  BIN_DIR=${CARGO_TARGET_DIR:-target}
  [[ $BIN_DIR == /* ]] || BIN_DIR="$REPO_DIR/$BIN_DIR"
  BIN_DIR="$BIN_DIR/debug"
fi

# `up` builds the agent and the VMM unless DROVER_BIN_DIR names binaries built elsewhere.
build_binaries() {
  [ -n "$BIN_DIR_SET" ] && return 0
  command -v cargo >/dev/null || die "cargo not found (needed to build drover-agent and drover-vmm; install Rust, see README), or set DROVER_BIN_DIR to a directory holding them"
  local out start=${EPOCHREALTIME/./}
  log "building drover-agent, drover-vmm and drover-operator (cargo build --bins -p drover-node-agent -p drover-hypervisor -p drover-operator)"
  out=$(cd "$REPO_DIR" && cargo build --quiet --bins -p drover-node-agent -p drover-hypervisor -p drover-operator 2>&1) ||
    { printf '%s\n' "$out" >&2; die "cargo build failed"; }
  log "built in $(( (${EPOCHREALTIME/./} - start) / 1000 )) ms"
}

need_host_prereqs() {
  [ "$(id -u)" = 0 ] || die "hosts are network namespaces: run e2e/cluster as root (or use 'up --bare' without --hosts)"
  command -v ip >/dev/null || die "'ip' (iproute2) is missing: run e2e/install-prereqs, or apt-get install iproute2"
  command -v flock >/dev/null || die "'flock' (util-linux) is missing: apt-get install util-linux"
}

ns_of() { echo "$NETNS_PREFIX$1"; }
netns_exists() { [ -e "/var/run/netns/$1" ]; }
veth_of() { echo "$BRIDGE-${1##*.}"; } # root-side veth of the host with address $1

kc() { "$TOOLS_BIN/kubectl" --kubeconfig "$KUBECONFIG_PATH" "$@"; }

# --- the bridge ----------------------------------------------------------------------
# The bridge carries its cluster's state directory as its alias, so that a second
# cluster with the same settings is refused instead of sharing (and colliding on)
# the network, and `down` removes only a bridge its own cluster made.
bridge_owner() { cat "/sys/class/net/$BRIDGE/ifalias" 2>/dev/null || true; }

ensure_bridge() {
  local err owner
  if [ -e "/sys/class/net/$BRIDGE" ]; then
    owner=$(bridge_owner)
    if [ "$owner" != "drover-e2e $DROVER_STATE" ]; then
      [[ $owner == "drover-e2e "* ]] && [ -d "${owner#drover-e2e }/hosts" ] &&
        die "bridge $BRIDGE belongs to the cluster in ${owner#drover-e2e }: set DROVER_BRIDGE, DROVER_HOST_NET and DROVER_NETNS_PREFIX to other values for this one"
      [[ -z $owner || $owner == "drover-e2e "* ]] || die "$BRIDGE exists and is not a Drover bridge (alias '$owner'): set DROVER_BRIDGE"
      log "taking over bridge $BRIDGE, left behind by ${owner:-an unknown cluster}"
    fi
  else
    err=$(ip link add "$BRIDGE" type bridge 2>&1) || [ -e "/sys/class/net/$BRIDGE" ] ||
      die "cannot create bridge $BRIDGE: $err (is the 'bridge' kernel module available? modprobe bridge)"
  fi
  local clash
  clash=$(ip -4 -o addr show | awk -v br="$BRIDGE" -v net="$HOST_NET." '$2 != br && index($4, net) == 1 { print $2 " (" $4 ")" }')
  [ -z "$clash" ] || die "the hosts' network $HOST_NET.0/24 is in use already by $clash: set DROVER_HOST_NET (and DROVER_BRIDGE, DROVER_NETNS_PREFIX) to other values"
  ip link set "$BRIDGE" alias "drover-e2e $DROVER_STATE"
  [[ $(ip -4 addr show dev "$BRIDGE") == *"inet $GATEWAY/"* ]] || ip addr add "$GATEWAY/24" dev "$BRIDGE" ||
    die "cannot give bridge $BRIDGE the address $GATEWAY/24"
  ip link set "$BRIDGE" up
}

remove_bridge() {
  local l
  [ "$(bridge_owner)" = "drover-e2e $DROVER_STATE" ] || return 0
  for l in $(ip -o link show master "$BRIDGE" 2>/dev/null | awk -F': ' '{print $2}' | sed 's/@.*//'); do
    ip link del "$l" 2>/dev/null || true
  done
  ip link del "$BRIDGE" 2>/dev/null || true
}

# --- processes inside a host ---------------------------------------------------------
pid_alive() { # a process that exists and is not a zombie
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [ "${stat%% *}" != Z ]
}

agent_running() {
  local f="$HOSTS_DIR/$1/agent.pid"
  [ -f "$f" ] && pid_alive "$(cat "$f")"
}

# SIGKILL every process in the namespace until none is left (one may fork while we kill).
kill_netns() {
  local ns=$1 pids i
  for ((i = 0; i < 100; i++)); do
    pids=$(ip netns pids "$ns" 2>/dev/null) || return 0
    [ -z "$pids" ] && return 0
    # shellcheck disable=SC2086 # a list of pids
    kill -KILL $pids 2>/dev/null || true
    sleep 0.05
  done
  die "processes still run in network namespace $ns after SIGKILL: $pids"
}

start_agent() {
  local name=$1 dir="$HOSTS_DIR/$1" cmd=()
  mapfile -t cmd <"$dir/agent.cmd"
  [ -x "${cmd[0]}" ] || die "${cmd[0]} does not exist: build it (cargo build -p drover-node-agent -p drover-hypervisor) or set DROVER_BIN_DIR"
  mkdir -p "$dir/run" "$dir/lib"
  printf '[drover-e2e] %s: starting %s\n' "$(date -u +%FT%TZ)" "${cmd[*]}" >>"$dir/agent.log"
  # Its own session, like the control plane's processes; no lock fd leaks into it.
  setsid ip netns exec "$(ns_of "$name")" "${cmd[@]}" >>"$dir/agent.log" 2>&1 </dev/null 9>&- &
  echo $! >"$dir/agent.pid"
  # Return once it is inside the namespace (`host stop` finds it there), or gone.
  local pid=$! want i
  want="net:[$(stat -L -c %i "/var/run/netns/$(ns_of "$name")")]"
  for ((i = 0; i < 500; i++)); do
    [ "$(readlink "/proc/$pid/ns/net" 2>/dev/null || true)" = "$want" ] && return 0
    pid_alive "$pid" || return 0
    sleep 0.01
  done
  die "the agent of host '$name' (pid $pid) did not enter its network namespace in 5 s"
}

# The root-side veth is up only while the host is powered on and not isolated.
apply_link_state() {
  local name=$1 dir="$HOSTS_DIR/$1" state=up
  [ -e "$dir/off" ] || [ -e "$dir/isolated" ] && state=down
  ip link set "$(veth_of "$(cat "$dir/address")")" "$state"
}

host_dir() { # name -> its directory; dies if there is no such host
  [ -f "$HOSTS_DIR/$1/address" ] || die "no host '$1' (e2e/cluster host list)"
  echo "$HOSTS_DIR/$1"
}

# --- commands ------------------------------------------------------------------------
host_add() {
  local name=${1:-} want='' octet ip used f dir ns veth arch
  [ -n "$name" ] || die "usage: e2e/cluster host add NAME"
  [[ ${#name} -le 63 && $name =~ ^[a-z0-9]([-a-z0-9]*[a-z0-9])?$ ]] ||
    die "host name '$name' is not a DNS label (lowercase letters, digits, '-'; at most 63 characters)"
  need_host_prereqs
  if ! [ -f "$KUBECONFIG_PATH" ] || ! running kube-apiserver; then die "the control plane is not running: e2e/cluster up first"; fi
  [ -f "$HOSTS_KUBECONFIG" ] || die "no $HOSTS_KUBECONFIG: this cluster was started by an older e2e/cluster; run e2e/cluster up again"
  cert_covers_gateway || die "the API server's certificate does not name $GATEWAY: run e2e/cluster up again (it re-issues it)"
  [ -x "$BIN_DIR/drover-agent" ] ||
    die "no drover-agent in $BIN_DIR: build it (cargo build -p drover-node-agent -p drover-hypervisor) or set DROVER_BIN_DIR"
  dir="$HOSTS_DIR/$name"
  ns=$(ns_of "$name")

  # Pick the address and create the bridge under a lock: hosts may be added in parallel.
  mkdir -p "$HOSTS_DIR"
  exec 9>"$HOSTS_DIR/.lock"
  flock 9
  [ -e "$dir" ] && die "host '$name' exists already"
  netns_exists "$ns" && die "network namespace $ns exists already (left from another cluster? ip netns del $ns)"
  used=' '
  for f in "$HOSTS_DIR"/*/address; do [ -f "$f" ] && used+="$(cat "$f") "; done
  [[ $name =~ ^host-([0-9]{1,3})$ ]] && want=$((10 + 10#${BASH_REMATCH[1]}))
  if [ -n "$want" ] && [ "$want" -le 254 ] && [[ $used != *" $HOST_NET.$want "* ]]; then
    octet=$want
  else
    for ((octet = 11; octet <= 254; octet++)); do [[ $used == *" $HOST_NET.$octet "* ]] || break; done
    [ "$octet" -le 254 ] || die "no free address left in $HOST_NET.0/24"
  fi
  ip="$HOST_NET.$octet"
  mkdir -p "$dir/run" "$dir/lib"
  echo "$ip" >"$dir/address"
  ensure_bridge
  exec 9>&-

  # From here on, a failure takes the half-made host away again.
  local node_made=0
  trap 'host_teardown "$name" >/dev/null 2>&1; [ "$node_made" = 0 ] || kc delete node "$name" --wait=false >/dev/null 2>&1' EXIT
  veth=$(veth_of "$ip")
  ip link del "$veth" 2>/dev/null || true # left from a host whose namespace went away
  ip netns add "$ns"
  ip link add "$veth" type veth peer name eth0 netns "$ns"
  ip link set "$veth" master "$BRIDGE" up
  ip -n "$ns" link set lo up
  ip -n "$ns" addr add "$ip/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" route add default via "$GATEWAY"

  case $(uname -m) in x86_64) arch=amd64 ;; aarch64) arch=arm64 ;; *) arch=$(uname -m) ;; esac
  # Raw POSTs: kubectl without discovery takes a third of the time of `kubectl apply`.
  # drover-system holds the agents' Leases; it is made, or found made, alongside.
  local ns_out="$dir/.namespace.out" node_out ns_pid
  kc create --raw /api/v1/namespaces -f - <<<'{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"drover-system"}}' >"$ns_out" 2>&1 &
  ns_pid=$!
  node_out=$(kc create --raw /api/v1/nodes -f - 2>&1 <<NODE
{"apiVersion": "v1", "kind": "Node",
 "metadata": {"name": "$name", "labels": {"kubernetes.io/hostname": "$name", "kubernetes.io/os": "linux",
   "kubernetes.io/arch": "$arch", "drover.dev/host": "true"}},
 "status": {"addresses": [{"type": "InternalIP", "address": "$ip"}, {"type": "Hostname", "address": "$name"}]}}
NODE
) || { wait "$ns_pid" || true; die "creating Node $name failed: $node_out"; }
  node_made=1
  wait "$ns_pid" || grep -q AlreadyExists "$ns_out" || { cat "$ns_out" >&2; die "creating namespace drover-system failed"; }
  rm -f "$ns_out"

  local extra=()
  read -ra extra <<<"${DROVER_AGENT_ARGS:-}"
  printf '%s\n' "$BIN_DIR/drover-agent" --kubeconfig "$HOSTS_KUBECONFIG" --node-name "$name" --address "$ip" \
    --namespace drover-system --runtime-dir "$dir/run" --state-dir "$dir/lib" "${extra[@]}" >"$dir/agent.cmd"
  start_agent "$name"
  trap - EXIT
  echo "$ip"
}

# Kills its processes and removes its network and state; the Node is the caller's.
host_teardown() {
  local name=$1 dir="$HOSTS_DIR/$1" ns
  ns=$(ns_of "$name")
  if netns_exists "$ns"; then
    kill_netns "$ns"
    # Deleting the root side takes the pair away at once; the namespace itself is
    # freed asynchronously, and its veth with it.
    [ -f "$dir/address" ] && ip link del "$(veth_of "$(cat "$dir/address")")" 2>/dev/null
    ip netns del "$ns"
  fi
  rm -rf "$dir"
}

host_remove() {
  local name=${1:-}
  [ -n "$name" ] || die "usage: e2e/cluster host remove NAME"
  need_host_prereqs
  host_dir "$name" >/dev/null
  host_teardown "$name"
  if [ -f "$KUBECONFIG_PATH" ] && running kube-apiserver; then
    kc delete node "$name" --ignore-not-found --wait=false >/dev/null || die "deleting Node $name failed"
  fi
}

# Power failure: every process of the host dies at once and its /run is gone; /var/lib stays.
host_stop() {
  local name=${1:-} dir
  [ -n "$name" ] || die "usage: e2e/cluster host stop NAME"
  need_host_prereqs
  dir=$(host_dir "$name")
  : >"$dir/off"
  apply_link_state "$name" # a machine without power answers nobody, not even ARP
  agent_running "$name" && kill -KILL "$(cat "$dir/agent.pid")" 2>/dev/null
  kill_netns "$(ns_of "$name")"
  rm -rf "$dir/run" "$dir/agent.pid"
  mkdir -p "$dir/run"
}

host_start() {
  local name=${1:-} dir
  [ -n "$name" ] || die "usage: e2e/cluster host start NAME"
  need_host_prereqs
  dir=$(host_dir "$name")
  agent_running "$name" && die "the agent of host '$name' runs already (pid $(cat "$dir/agent.pid"))"
  rm -f "$dir/off"
  apply_link_state "$name"
  start_agent "$name"
}

host_isolate() {
  local name=${1:-} dir
  [ -n "$name" ] || die "usage: e2e/cluster host isolate NAME"
  need_host_prereqs
  dir=$(host_dir "$name")
  : >"$dir/isolated"
  apply_link_state "$name"
}

host_heal() {
  local name=${1:-} dir
  [ -n "$name" ] || die "usage: e2e/cluster host heal NAME"
  need_host_prereqs
  dir=$(host_dir "$name")
  rm -f "$dir/isolated"
  apply_link_state "$name"
}

host_names() {
  local d
  for d in "$HOSTS_DIR"/*/address; do [ -f "$d" ] && basename "$(dirname "$d")"; done
  return 0
}

host_list() {
  local name dir power agent network pid
  printf '%-24s %-15s %-5s %-8s %-9s %s\n' NAME ADDRESS POWER AGENT NETWORK PID
  for name in $(host_names); do
    dir="$HOSTS_DIR/$name"
    power=on agent=exited network=connected pid=-
    [ -e "$dir/off" ] && power=off agent=-
    agent_running "$name" && agent=running pid=$(cat "$dir/agent.pid")
    [ -e "$dir/off" ] && network=-
    [ -e "$dir/isolated" ] && network=isolated
    printf '%-24s %-15s %-5s %-8s %-9s %s\n' "$name" "$(cat "$dir/address")" "$power" "$agent" "$network" "$pid"
  done
}

# Every host, its namespace, veth and the bridge; used by `down`.
hosts_down() {
  local name
  if [ "$(id -u)" != 0 ]; then
    [ -z "$(host_names)" ] || die "this cluster has hosts: run e2e/cluster down as root"
    return 0
  fi
  for name in $(host_names); do host_teardown "$name"; done
  remove_bridge
}

cmd_host() {
  local sub=${1:-}
  shift || true
  load_network warn
  case $sub in
    add) host_add "$@" ;;
    remove | rm) host_remove "$@" ;;
    list | ls) host_list ;;
    stop) host_stop "$@" ;;
    start) host_start "$@" ;;
    isolate) host_isolate "$@" ;;
    heal) host_heal "$@" ;;
    *) usage >&2; exit 2 ;;
  esac
}
