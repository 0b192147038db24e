#!/usr/bin/env bash
# A local multi-node Ray cluster on ONE machine: one head node plus N worker nodes, each a separate
# `ray start` with its own resources and temp dir, so scheduling, runtime-env shipping and `ray job submit`
# behave as on a real cluster. Used by tests/test_cluster.py and for trying jobs before renting GPUs.
#
#   cluster/local.sh start [--workers N] [--cpus-per-node C] [--object-store-mb M]
#   cluster/local.sh status
#   cluster/local.sh stop
#
# Why it looks the way it does (measured with ray 2.60):
# * `ray stop` kills every Ray process on the machine (other people's tests, an embedded ray.init()), so
#   stop only ever signals what this script started. Each node runs as `setsid ray start --block`, which makes
#   the `ray start` process the leader of a new session; everything the node spawns (GCS, raylet, dashboard,
#   agents, and the raylet's workers, which get their own process groups) stays in that session.
#   Job drivers are the exception (the job supervisor starts them in sessions of their own), so stop also
#   follows parent links. SIGTERM to a leader shuts its node down; stop then kills whatever is left of the
#   sessions and their descendants (recorded with start times, since pids get reused) and checks that
#   nothing remains. The node logs stay in the state dir; Ray's temp dir is removed.
# * Default ports are NOT Ray's 6379/8265: an embedded ray.init() on this machine takes 8265, a developer's
#   own `ray start --head` takes 6379, and `ray job submit` against the wrong cluster would be a silent
#   mistake. The head's Ray Client port must lie outside the worker port range (10002-19999), and every node
#   needs its own dashboard-agent port (default 52365 would collide), so all of them are set here.
# * Ray 2.60 replaces a loopback --node-ip-address by the machine's routable IP and the GCS/raylet listen on
#   all interfaces whatever we pass, so nodes cannot be confined to 127.0.0.1. The dashboard (the job API that
#   runs arbitrary code) IS bound to 127.0.0.1, and token auth guards the rest.
# * RAY_AUTH_MODE=token everywhere: once any ray.init() has written ~/.ray/auth_token, clients without the
#   mode are refused. `ray start --head` in token mode refuses to create a token, so we create one if missing.
# * Ray keeps Unix sockets under its temp dir, whose path must stay short (< 108 bytes), hence /tmp.
#
# Environment: MINIGPT_CLUSTER_DIR (state, default <repo>/.ray-local), MINIGPT_RAY_PORT (GCS, 6390),
# MINIGPT_RAY_CLIENT_PORT (6391), MINIGPT_DASHBOARD_PORT (8275), MINIGPT_AGENT_PORT (first dashboard-agent
# port, one per node, 52375), MINIGPT_CLUSTER_TIMEOUT (seconds to wait for start, 90), MINIGPT_CLUSTER_DRAIN_S
# (seconds a stopping node lets running tasks finish, 2).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -x "$REPO/.venv/bin/ray" ]]; then
    export PATH="$REPO/.venv/bin:$PATH"
fi
STATE="${MINIGPT_CLUSTER_DIR:-$REPO/.ray-local}"
GCS_PORT="${MINIGPT_RAY_PORT:-6390}"
CLIENT_PORT="${MINIGPT_RAY_CLIENT_PORT:-6391}"
DASH_PORT="${MINIGPT_DASHBOARD_PORT:-8275}"
AGENT_PORT="${MINIGPT_AGENT_PORT:-52375}"
TIMEOUT="${MINIGPT_CLUSTER_TIMEOUT:-90}"
# On SIGTERM a 2.60 node first drains for up to 30 s, waiting for running tasks; `stop` means stop here.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="${MINIGPT_CLUSTER_DRAIN_S:-2}"
NODES_FILE="$STATE/nodes"      # one line per node: name pid starttime temp_dir
export RAY_AUTH_MODE=token
export RAY_USAGE_STATS_ENABLED=0
unset RAY_ADDRESS               # never let an inherited address turn the head start into a join

STARTING=0

die() {
    echo "local.sh: $*" >&2
    if [[ "$STARTING" == 1 ]]; then
        STARTING=0
        echo "local.sh: stopping what was started" >&2
        cmd_stop >&2 || true
    fi
    exit 1
}

usage() {
    sed -n '6,8p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

# "pid ppid session state starttime" for every process; the command name may contain spaces and
# parentheses, so fields are counted from the last ')'.
proc_table() {
    cat /proc/[0-9]*/stat 2>/dev/null | awk '{
        i = length($0); while (i > 0 && substr($0, i, 1) != ")") i--;
        n = split(substr($0, i + 2), f, " ");
        print $1, f[2], f[4], f[1], f[20] }' || true
}

proc_state() {  # "state starttime" of a pid (starttime in clock ticks since boot), empty if gone
    local line
    line="$(cat "/proc/$1/stat" 2>/dev/null)" || return 0
    awk '{ i = length($0); while (i > 0 && substr($0, i, 1) != ")") i--;
           split(substr($0, i + 2), f, " "); print f[1], f[20] }' <<<"$line"
}

start_time() { local s; s="$(proc_state "$1")"; echo "${s#* }"; }

leader_alive() {  # pid starttime: alive, not a zombie, and still the process we recorded (pids get reused)
    [[ -n "$1" ]] || return 1
    local s
    s="$(proc_state "$1")"
    [[ -n "$s" && "${s%% *}" != Z && "${s#* }" == "$2" ]]
}

# Live (non-zombie) processes in the given sessions plus all their descendants, as "pid:starttime" words.
cluster_procs() {
    proc_table | awk -v sids=" $* " '
        { pid[NR] = $1; ppid[NR] = $2; sid[NR] = $3; st[NR] = $4; t[NR] = $5 }
        END {
            for (i = 1; i <= NR; i++) if (index(sids, " " sid[i] " ") && st[i] != "Z") mine[pid[i]] = 1;
            do { added = 0
                 for (i = 1; i <= NR; i++) if (!(pid[i] in mine) && (ppid[i] in mine) && st[i] != "Z") { mine[pid[i]] = 1; added = 1 }
            } while (added)
            for (i = 1; i <= NR; i++) if (pid[i] in mine) printf "%s:%s ", pid[i], t[i]
        }'
}

port_in_use() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

auth_token() {
    if [[ -n "${RAY_AUTH_TOKEN:-}" ]]; then
        printf '%s' "$RAY_AUTH_TOKEN"
    elif [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]]; then
        cat "$RAY_AUTH_TOKEN_PATH"
    else
        cat "$HOME/.ray/auth_token"
    fi
}

ensure_token() {
    if [[ -z "${RAY_AUTH_TOKEN:-}" && ! -s "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ]]; then
        ray get-auth-token --generate >/dev/null 2>&1 || die "could not generate a Ray auth token"
    fi
}

alive_nodes() {  # number of ALIVE nodes the head's state API reports (0 when unreachable)
    curl -sf --max-time 5 -H "Authorization: Bearer $(auth_token)" \
        "http://127.0.0.1:$DASH_PORT/api/v0/nodes?limit=1000" 2>/dev/null \
        | grep -o '"state": *"ALIVE"' | wc -l || true
}

launch_node() {  # name tempdir args...: start one node in its own session, record it
    local name="$1" tmp="$2"; shift 2
    mkdir -p "$tmp"
    setsid ray start --block --temp-dir="$tmp" --disable-usage-stats "$@" \
        </dev/null >"$STATE/$name.log" 2>&1 &
    local pid=$!
    local t=""
    for _ in 1 2 3 4 5 6 7 8 9 10; do t="$(start_time "$pid")"; [[ -n "$t" ]] && break; sleep 0.05; done
    [[ -n "$t" ]] || die "$name exited at once; see $STATE/$name.log"
    echo "$name $pid $t $tmp" >>"$NODES_FILE"
}

wait_for() {  # description, then a command that succeeds when ready; fails fast when a node died
    local what="$1"; shift
    local deadline=$((SECONDS + TIMEOUT))
    until "$@"; do
        while read -r name pid t _; do
            leader_alive "$pid" "$t" || die "$name died while waiting for $what; last lines of $STATE/$name.log:
$(tail -n 15 "$STATE/$name.log" 2>/dev/null)"
        done <"$NODES_FILE"
        ((SECONDS < deadline)) || die "timed out after ${TIMEOUT}s waiting for $what"
        sleep 0.3
    done
}

head_ready() { curl -sf --max-time 2 "http://127.0.0.1:$DASH_PORT/api/gcs_healthz" >/dev/null 2>&1; }
all_joined() { [[ "$(alive_nodes)" -ge "$1" ]]; }

cmd_start() {
    local workers=1 cpus=1 store_mb=256
    while (($#)); do
        case "$1" in
            --workers) workers="${2:?--workers needs a number}"; shift 2 ;;
            --cpus-per-node) cpus="${2:?--cpus-per-node needs a number}"; shift 2 ;;
            --object-store-mb) store_mb="${2:?--object-store-mb needs a number}"; shift 2 ;;
            -h|--help) usage ;;
            *) die "unknown start option '$1' (expected --workers N, --cpus-per-node C, --object-store-mb M)" ;;
        esac
    done
    [[ "$workers" =~ ^[0-9]+$ ]] || die "--workers must be a whole number, got '$workers'"
    [[ "$cpus" =~ ^[1-9][0-9]*$ ]] || die "--cpus-per-node must be a positive whole number, got '$cpus'"
    [[ "$store_mb" =~ ^[0-9]+$ ]] && ((store_mb >= 80)) || die "--object-store-mb must be >= 80 (Ray's minimum), got '$store_mb'"
    command -v ray >/dev/null || die "no 'ray' on PATH (expected $REPO/.venv/bin/ray)"
    command -v curl >/dev/null || die "curl is required to probe the dashboard"
    command -v setsid >/dev/null || die "setsid (util-linux) is required"

    mkdir -p "$STATE"
    if [[ -s "$NODES_FILE" ]]; then
        while read -r name pid t _; do
            leader_alive "$pid" "$t" && die "already running ($name pid $pid); run '$0 stop' first"
        done <"$NODES_FILE"
        cmd_stop >/dev/null  # a stale record: clean its leftovers before reusing the state dir
    fi
    local p
    for p in "$GCS_PORT" "$CLIENT_PORT" "$DASH_PORT" $(seq "$AGENT_PORT" $((AGENT_PORT + workers))); do
        port_in_use "$p" && die "port $p on 127.0.0.1 is in use; choose others with MINIGPT_RAY_PORT, MINIGPT_RAY_CLIENT_PORT, MINIGPT_DASHBOARD_PORT, MINIGPT_AGENT_PORT"
    done
    ensure_token

    local tmp store=$((store_mb * 1024 * 1024)) t0=$SECONDS
    tmp="$(mktemp -d /tmp/minigpt-ray.XXXXXX)"
    : >"$NODES_FILE"
    echo "$tmp" >"$STATE/tmp_root"
    STARTING=1

    launch_node head "$tmp/head" --head --port="$GCS_PORT" --ray-client-server-port="$CLIENT_PORT" \
        --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$DASH_PORT" \
        --dashboard-agent-listen-port="$AGENT_PORT" --num-cpus="$cpus" --num-gpus=0 \
        --resources='{"minigpt_head": 1}' --object-store-memory="$store"
    wait_for "the head's dashboard on port $DASH_PORT" head_ready

    local i
    for ((i = 1; i <= workers; i++)); do
        launch_node "worker$i" "$tmp/worker$i" --address="127.0.0.1:$GCS_PORT" \
            --dashboard-agent-listen-port=$((AGENT_PORT + i)) --num-cpus="$cpus" --num-gpus=0 \
            --resources='{"minigpt_worker": 1}' --object-store-memory="$store"
    done
    wait_for "$((workers + 1)) nodes to join" all_joined $((workers + 1))
    STARTING=0

    cat >"$STATE/env" <<EOF
# source this file to talk to the local cluster started by cluster/local.sh
export RAY_AUTH_MODE=token
export RAY_ADDRESS=http://127.0.0.1:$DASH_PORT
export MINIGPT_RAY_GCS_ADDRESS=127.0.0.1:$GCS_PORT
EOF
    echo "local Ray cluster up in $((SECONDS - t0))s: head + $workers worker node(s), $cpus CPU(s) each"
    echo "  dashboard:    http://127.0.0.1:$DASH_PORT"
    echo "  RAY_ADDRESS:  http://127.0.0.1:$DASH_PORT   (for ray job submit; GCS: 127.0.0.1:$GCS_PORT)"
    echo "  submit:       RAY_AUTH_MODE=token RAY_ADDRESS=http://127.0.0.1:$DASH_PORT ray job submit --runtime-env ray_config.yaml -- python -m minigpt run jobs/demo.yaml"
    echo "  or:           source $STATE/env"
    echo "  stop:         $0 stop"
}

cmd_status() {
    if [[ ! -s "$NODES_FILE" ]]; then
        echo "not running (no record in $STATE)"
        return 3
    fi
    local up=0 total=0
    while read -r name pid t _; do
        total=$((total + 1))
        if leader_alive "$pid" "$t"; then
            up=$((up + 1)); echo "$name: running (pid $pid)"
        else
            echo "$name: stopped (was pid $pid)"
        fi
    done <"$NODES_FILE"
    if ((up == 0)); then
        echo "not running"
        return 3
    fi
    echo "dashboard: http://127.0.0.1:$DASH_PORT  alive nodes reported by Ray: $(alive_nodes)"
    ((up == total)) || return 1
}

cmd_stop() {
    if [[ ! -s "$NODES_FILE" ]]; then
        echo "not running (no record in $STATE)"
        return 0
    fi
    local t0=$SECONDS sids=() names=() pids=() starts=() name pid t tmp
    while read -r name pid t tmp; do
        names+=("$name"); pids+=("$pid"); starts+=("$t")
        # A dead leader's session can still hold its children; its id is only unsafe to use if the pid now
        # belongs to someone else.
        if leader_alive "$pid" "$t" || [[ ! -e "/proc/$pid" ]]; then sids+=("$pid"); fi
    done <"$NODES_FILE"
    # Snapshot before signalling: once a leader exits its children are re-parented, but keep the session id.
    local before
    before="$(cluster_procs "${sids[@]}")"

    # Workers first, so the head does not spend its shutdown waiting on nodes that are leaving anyway.
    local i n=${#pids[@]}
    for ((i = n - 1; i >= 0; i--)); do
        leader_alive "${pids[i]}" "${starts[i]}" && kill -TERM "${pids[i]}" 2>/dev/null || true
        if [[ "${names[i]}" == head ]]; then
            local deadline=$((SECONDS + 15))
            while leader_alive "${pids[i]}" "${starts[i]}" && ((SECONDS < deadline)); do sleep 0.1; done
        fi
    done
    local deadline=$((SECONDS + 15))
    while ((SECONDS < deadline)); do
        local any=0
        for ((i = 0; i < n; i++)); do leader_alive "${pids[i]}" "${starts[i]}" && any=1; done
        ((any)) || break
        sleep 0.1
    done

    # Whatever survived the graceful shutdown: the snapshot (checked by start time) and the sessions now.
    local left
    left="$(survivors "$before" "${sids[@]}")"
    if [[ -n "$left" ]]; then
        kill -TERM $left 2>/dev/null || true
        sleep 2
        left="$(survivors "$before" "${sids[@]}")"
        [[ -z "$left" ]] || kill -KILL $left 2>/dev/null || true
        sleep 0.5
        left="$(survivors "$before" "${sids[@]}")"
    fi
    if [[ -n "$left" ]]; then
        echo "local.sh: processes still alive after stop: $left" >&2
        return 1
    fi
    if [[ -s "$STATE/tmp_root" ]]; then
        tmp="$(cat "$STATE/tmp_root")"
        # Only ever delete what start created.
        [[ "$tmp" == /tmp/minigpt-ray.* && -d "$tmp" ]] && rm -rf "$tmp"
    fi
    rm -f "$NODES_FILE" "$STATE/tmp_root" "$STATE/env"
    echo "stopped ${n} node(s) in $((SECONDS - t0))s; no process of theirs is left"
}

survivors() {  # snapshot "pid:start ..." and session ids -> pids still alive that belong to the cluster
    local snapshot="$1"; shift
    local now
    now="$(cluster_procs "$@")"
    local out=() entry
    for entry in $snapshot $now; do
        local pid="${entry%%:*}" t="${entry#*:}"
        [[ " ${out[*]} " == *" $pid "* ]] && continue
        leader_alive "$pid" "$t" && out+=("$pid")
    done
    echo "${out[*]}"
}

case "${1:-}" in
    start) shift; cmd_start "$@" ;;
    stop) shift; cmd_stop ;;
    status) shift; cmd_status ;;
    *) usage ;;
esac
