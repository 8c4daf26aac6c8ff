# Shared helpers for the scripts/e2e-* proofs (sourced, not run). Each proof:
#   - runs non-interactively as root and exits non-zero on failure;
#   - keeps everything it makes in one run dir (target/e2e/NAME.XXXX) and one network namespace,
#     and removes them (and its QEMU processes) on exit, also on failure or Ctrl-C;
#   - waits on conditions with deadlines (e2e_wait_until), never on fixed sleeps;
#   - prints the time of each phase ("e2e-NAME: phase ... 12s (total 40s)").
# Environment: E2E_KEEP=1 keeps the run dir (logs, disks) even on success; on failure it is always
# kept and its path printed. E2E_ACCEL=kvm|tcg (default: kvm when usable, else tcg).
# shellcheck shell=bash disable=SC2015

e2e_repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
e2e_guest_exec="$e2e_repo/qemu/guest-exec"
e2e_name=${e2e_name:?set e2e_name before sourcing scripts/lib/e2e.sh}
e2e_t0=$SECONDS
e2e_tphase=$SECONDS
e2e_run=""
e2e_netns=""
e2e_pids=()
e2e_ok=0

e2e_log() { echo "e2e-$e2e_name: $*" >&2; }
e2e_die() { e2e_log "FAIL: $*"; exit 1; }
e2e_phase() {
    printf 'e2e-%s: phase %-40s %4ss (total %ss)\n' "$e2e_name" "$1" "$((SECONDS - e2e_tphase))" "$((SECONDS - e2e_t0))" >&2
    e2e_tphase=$SECONDS
}

e2e_need() {
    [ "$(id -u)" -eq 0 ] || e2e_die "must run as root (network namespace, taps, QEMU)"
    local t
    for t in "$@"; do command -v "$t" >/dev/null || e2e_die "$t not found: run scripts/install-host-deps"; done
}

# e2e_wait_until TIMEOUT_S INTERVAL_S DESCRIPTION CMD [ARG...]: run CMD until it succeeds.
e2e_wait_until() {
    local timeout=$1 interval=$2 what=$3 deadline
    shift 3
    deadline=$((SECONDS + timeout))
    until "$@"; do
        [ "$SECONDS" -lt "$deadline" ] || { e2e_log "timed out after ${timeout}s waiting for: $what"; return 1; }
        e2e_check_vms
        sleep "$interval"
    done
}

e2e_accel_args() {
    local accel=${E2E_ACCEL:-auto}
    if [ "$accel" = auto ]; then
        accel=tcg
        if [ -r /dev/kvm ] && [ -w /dev/kvm ] && grep -qwE 'vmx|svm' /proc/cpuinfo &&
            { [ -d /sys/module/kvm_intel ] || [ -d /sys/module/kvm_amd ]; }; then accel=kvm; fi
    fi
    if [ "$accel" = kvm ]; then echo "-accel kvm -cpu host"; else echo "-accel tcg -cpu max"; fi
}

# UEFI firmware for one VM: read-only OVMF code + a private copy of the variable store in the run dir.
e2e_uefi_args() {
    local code=/usr/share/OVMF/OVMF_CODE_4M.fd vars=/usr/share/OVMF/OVMF_VARS_4M.fd
    [ -f "$code" ] && [ -f "$vars" ] || e2e_die "OVMF not found: run scripts/install-host-deps"
    cp "$vars" "$e2e_run/efivars.fd"
    echo "-drive if=pflash,format=raw,unit=0,readonly=on,file=$code -drive if=pflash,format=raw,unit=1,file=$e2e_run/efivars.fd"
}

# A fresh run dir under target/e2e (short enough for unix socket paths).
e2e_mkrun() {
    mkdir -p "$e2e_repo/target/e2e"
    e2e_run=$(mktemp -d "$e2e_repo/target/e2e/$e2e_name.XXXX")
    [ ${#e2e_run} -le 80 ] || e2e_die "run dir path too long for unix sockets: $e2e_run"
}

# e2e_netns_create PREFIX/LEN: a namespace with bridge br0 (host side PREFIX.1) and tap0 on it.
e2e_netns_create() {
    local prefix=$1
    e2e_netns="cos-e2e-$e2e_name-$$"
    ip netns add "$e2e_netns"
    ip -n "$e2e_netns" link set lo up
    ip -n "$e2e_netns" link add br0 type bridge stp_state 0 forward_delay 0
    ip -n "$e2e_netns" addr add "$prefix" dev br0
    ip -n "$e2e_netns" link set br0 up
    ip -n "$e2e_netns" tuntap add dev tap0 mode tap
    ip -n "$e2e_netns" link set tap0 master br0 up
}

# e2e_qemu_start LOG PIDFILE QEMU-ARGS...: start QEMU in the background (inside the netns if any).
e2e_qemu_start() {
    local log=$1 pidfile=$2 deadline
    shift 2
    local pre=()
    if [ -n "$e2e_netns" ]; then pre=(ip netns exec "$e2e_netns"); fi
    rm -f "$pidfile"
    "${pre[@]}" qemu-system-x86_64 -pidfile "$pidfile" "$@" </dev/null >>"$log" 2>&1 &
    e2e_pids+=("$!")
    deadline=$((SECONDS + 20))
    until [ -s "$pidfile" ]; do
        kill -0 "$!" 2>/dev/null || { cat "$log" >&2; e2e_die "QEMU exited at start; see $log"; }
        [ "$SECONDS" -lt "$deadline" ] || e2e_die "QEMU did not start within 20s; see $log"
        sleep 0.2
    done
    e2e_pids+=("$(cat "$pidfile")")
}

# Fail fast when a watched VM died or its kernel panicked (called while waiting).
e2e_check_vms() {
    local p
    for p in "${e2e_vm_pids_to_watch[@]}"; do
        kill -0 "$p" 2>/dev/null || e2e_die "QEMU (pid $p) exited unexpectedly"
    done
    if [ -n "$e2e_serial_to_watch" ] && grep -aq 'Kernel panic' "$e2e_serial_to_watch" 2>/dev/null; then
        grep -a -B3 -m1 'Kernel panic' "$e2e_serial_to_watch" >&2 || true
        e2e_die "the guest kernel panicked; see $e2e_serial_to_watch"
    fi
}
e2e_vm_pids_to_watch=()
e2e_serial_to_watch=""
# e2e_watch_vm PIDFILE [SERIAL_LOG]
e2e_watch_vm() { e2e_vm_pids_to_watch=("$(cat "$1")"); e2e_serial_to_watch=${2:-}; }
e2e_unwatch_vms() { e2e_vm_pids_to_watch=(); e2e_serial_to_watch=""; }

# e2e_gexec SOCK TIMEOUT CMD...: run a command in the guest through qemu-guest-agent.
e2e_gexec() {
    local sock=$1 timeout=$2
    shift 2
    "$e2e_guest_exec" --timeout "$timeout" "$sock" -- "$@"
}

# Wait for `systemctl is-system-running` = running; on another state print the failed units.
e2e_wait_running() {
    local sock=$1 timeout=$2 state
    state=$(e2e_gexec "$sock" "$timeout" systemctl is-system-running --wait 2>&1) || true
    if [ "$state" != running ]; then
        e2e_log "system state: ${state:-no answer from the guest agent}"
        e2e_gexec "$sock" 20 systemctl list-units --failed --no-legend --plain 2>/dev/null | sed 's/^/  failed: /' >&2 || true
        return 1
    fi
}

# Ask QEMU (by pidfile) to stop; SIGTERM, then SIGKILL after a bounded wait.
e2e_kill_pids() {
    local p deadline
    for p in "$@"; do kill -TERM "$p" 2>/dev/null || true; done
    deadline=$((SECONDS + 10))
    for p in "$@"; do
        while kill -0 "$p" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
        kill -KILL "$p" 2>/dev/null || true
    done
    for p in "$@"; do wait "$p" 2>/dev/null || true; done
}

e2e_cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ "${#e2e_pids[@]}" -gt 0 ]; then e2e_kill_pids "${e2e_pids[@]}"; fi
    if [ -n "$e2e_netns" ] && ip netns list | grep -qw "^$e2e_netns"; then ip netns delete "$e2e_netns"; fi
    if [ -n "$e2e_run" ] && [ -d "$e2e_run" ]; then
        if [ "$e2e_ok" = 1 ] && [ "${E2E_KEEP:-0}" != 1 ]; then
            rm -rf "$e2e_run"
        else
            e2e_log "logs and disks kept in $e2e_run"
        fi
    fi
    if [ "$e2e_ok" = 1 ] && [ "$rc" = 0 ]; then
        e2e_log "PASS in $((SECONDS - e2e_t0))s"
    else
        [ "$rc" != 0 ] || rc=1
        e2e_log "FAILED (exit $rc) after $((SECONDS - e2e_t0))s"
    fi
    exit "$rc"
}
trap e2e_cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
