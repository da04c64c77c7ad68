# Sourced by loopback-harness.sh and instructions.sh: the release binaries, a scratch directory,
# cleanup of every process started (on any exit), the bench's gRPC-shaped request body, four
# `icp-pod h2serve` backends on 127.0.0.1:19001-19004, and HAProxy's configuration in front of
# them. The proxy under test listens on 127.0.0.1:19000.
root=$(git -C "$(dirname "${BASH_SOURCE[0]}")" rev-parse --show-toplevel)
bin=$root/target/release
work=$(mktemp -d)
pids=()
halt_poll=/sys/module/haltpoll/parameters/guest_halt_poll_ns halt_poll_found=
cleanup() {
  kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"
  if [ -n "$halt_poll_found" ]; then echo "$halt_poll_found" > "$halt_poll"; fi
}
trap cleanup EXIT
# HALT_POLL_NS=NS: the guest's halt polling (KVM guests, cpuidle haltpoll) at NS for this run;
# the value found is put back on exit. The kernel's default is 200000; 0 turns it off.
if [ -n "${HALT_POLL_NS:-}" ]; then
  [ -w "$halt_poll" ] || { echo "HALT_POLL_NS: $halt_poll is not writable (not a KVM guest with the haltpoll driver, or not root)" >&2; exit 1; }
  halt_poll_found=$(cat "$halt_poll")
  echo "$HALT_POLL_NS" > "$halt_poll"
fi
for f in "$bin/interceptor" "$bin/icp-pod"; do
  [ -x "$f" ] || { echo "missing $f: cargo build --release -p interceptor -p interceptor-tests --bins" >&2; exit 1; }
done
# A gRPC-shaped request: a 7-byte message behind the 5-byte length prefix.
printf '\x00\x00\x00\x00\x07bench!!' > "$work/body"
ports=(19001 19002 19003 19004)
endpoints=$(printf '127.0.0.1:%s,' "${ports[@]}"); endpoints=${endpoints%,}

# start_backends CPUS: the four backends, pinned to CPUS.
start_backends() {
  local p
  for p in "${ports[@]}"; do
    taskset -c "$1" "$bin/icp-pod" h2serve --port "$p" ${BACKEND_STACK:+--stack "$BACKEND_STACK"} >/dev/null 2>&1 & pids+=($!)
  done
}

# haproxy_config FILE THREADS: HAProxy as the bench configures it, h2 both sides, round robin.
haproxy_config() {
  local p
  { printf 'global\n  nbthread %s\n' "$2"
    printf 'defaults\n  mode http\n  timeout connect 1s\n  timeout client 30s\n  timeout server 30s\n'
    printf 'frontend f\n  bind 127.0.0.1:19000 proto h2\n  default_backend b\nbackend b\n  balance roundrobin\n  http-reuse always\n'
    for p in "${ports[@]}"; do printf '  server s%s 127.0.0.1:%s proto h2\n' "$p" "$p"; done
  } > "$1"
}
