# Shared by slurm/local/up, down and lose-node (sourced, not run): the namespace nodes of the test cluster.
# Node i is host name node<i> at 10.213.0.<10+i> in network namespace pgnode<i>, its end of a veth pair named
# eth0; the other end (pgnode<i>-h) hangs on bridge pgbr0 (10.213.0.1), which slurmctld, on this machine, is
# reached on. /etc/hosts maps the names, between two marker lines, as a real cluster's DNS would.
PG_BRIDGE=pgbr0 PG_BRIDGE_ADDR=10.213.0.1 PG_PREFIX=24
PG_HOSTS_BEGIN='# >>> pixelgen slurm/local nodes' PG_HOSTS_END='# <<< pixelgen slurm/local nodes'
pg_node_name() { echo "node$1"; }
pg_node_addr() { echo "10.213.0.$(( 10 + $1 ))"; }
pg_netns() { echo "pgnode$1"; }
pg_namespaces() { ip netns list 2>/dev/null | awk '$1 ~ /^pgnode[0-9]+$/ {print $1}'; }

pg_hosts_remove() {
    grep -qF "$PG_HOSTS_BEGIN" /etc/hosts || return 0
    # /etc/hosts may be a bind mount (containers): rewrite it in place rather than replace it.
    local kept; kept=$(sed "\\|^$PG_HOSTS_BEGIN\$|,\\|^$PG_HOSTS_END\$|d" /etc/hosts)
    printf '%s\n' "$kept" >/etc/hosts
}

pg_hosts_write() {  # pg_hosts_write N
    local block="$PG_HOSTS_BEGIN" i
    for i in $(seq "$1"); do block+=$'\n'"$(pg_node_addr "$i") $(pg_node_name "$i")"; done
    block+=$'\n'"$PG_HOSTS_END"
    if grep -qF "$PG_HOSTS_BEGIN" /etc/hosts && [ "$(sed -n "\\|^$PG_HOSTS_BEGIN\$|,\\|^$PG_HOSTS_END\$|p" /etc/hosts)" = "$block" ]; then
        return 0
    fi
    pg_hosts_remove
    printf '%s\n' "$block" >>/etc/hosts
}

pg_link_up() {  # pg_link_up I: create (or repair) node I's namespace, veth pair and address; idempotent
    local ns; ns=$(pg_netns "$1")
    if ! ip link show "$PG_BRIDGE" >/dev/null 2>&1; then
        ip link add "$PG_BRIDGE" type bridge
        ip addr add "$PG_BRIDGE_ADDR/$PG_PREFIX" dev "$PG_BRIDGE"
    fi
    ip link set "$PG_BRIDGE" up
    ip netns list | awk '{print $1}' | grep -qx "$ns" || ip netns add "$ns"
    if ! ip -n "$ns" link show eth0 >/dev/null 2>&1; then
        ip link del "$ns-h" 2>/dev/null || true
        ip link add "$ns-h" type veth peer name eth0 netns "$ns"
        ip -n "$ns" addr add "$(pg_node_addr "$1")/$PG_PREFIX" dev eth0
    fi
    ip link set "$ns-h" master "$PG_BRIDGE" up
    ip -n "$ns" link set lo up
    ip -n "$ns" link set eth0 up
    ip -n "$ns" route replace default via "$PG_BRIDGE_ADDR"
}

pg_kill_namespace() {  # pg_kill_namespace NS: SIGKILL every process in it (its slurmd, its job steps)
    local pids; pids=$(ip netns pids "$1" 2>/dev/null || true)
    [ -z "$pids" ] || kill -KILL $pids 2>/dev/null || true
    for _ in $(seq 50); do [ -z "$(ip netns pids "$1" 2>/dev/null)" ] && return 0; sleep 0.1; done
    return 1
}

pg_remove_all() {  # every namespace node, link, the bridge and the hosts lines: nothing left behind
    local ns
    for ns in $(pg_namespaces); do
        pg_kill_namespace "$ns" || echo "processes left in $ns: $(ip netns pids "$ns" | tr '\n' ' ')" >&2
        ip link del "$ns-h" 2>/dev/null || true
        ip netns del "$ns"
    done
    ip link del "$PG_BRIDGE" 2>/dev/null || true
    pg_hosts_remove
}
