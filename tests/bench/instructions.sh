#!/usr/bin/env bash
# User-space instructions per request of a proxy, counted by callgrind: the same figure run after
# run, whatever else the machine is doing, where the timing harness (loopback-harness.sh) moves
# by 10% with the VM's noise. Kernel time (TCP, wake-ups) is not counted; compare with the
# harness's CPU per request for that.
#
#   tests/bench/instructions.sh [CONTENDER...]   CONTENDER: relay | streams | haproxy
#   env: N (20000 requests measured, after 2000 unmeasured), CONNS (4), STREAMS (32),
#        CACHE=1 (also simulate the caches: L1 data and last-level misses per request),
#        KEEP=DIR (keep each contender's callgrind file there, for callgrind_annotate)
#
# Four `icp-pod h2serve` backends and h2load on CPU 0, the proxy under callgrind on CPU 1, all on
# 127.0.0.1, with the bench's gRPC-shaped request. Needs release builds (cargo build --release
# -p interceptor -p interceptor-tests --bins), valgrind, h2load, haproxy, taskset. Every load is
# bounded by N and every process started here is stopped on exit.
set -euo pipefail
. "$(dirname "$0")/loopback-common.sh"
n=${N:-20000} conns=${CONNS:-4} streams=${STREAMS:-32}
for t in valgrind callgrind_control callgrind_annotate h2load taskset; do
  command -v "$t" >/dev/null || { echo "missing $t (valgrind, nghttp2-client, util-linux)" >&2; exit 1; }
done
start_backends 0
load() { taskset -c 0 h2load "-c$conns" "-m$streams" -n "$1" -d "$work/body" \
  -H 'content-type: application/grpc' -H 'te: trailers' http://127.0.0.1:19000/bench.Bench/Call; }
run() {
  local who=$1 proxy cmd
  case $who in
    relay|streams)
      cmd=("$bin/interceptor" proxy --listen 127.0.0.1:19000 --endpoints "$endpoints"
        --worker-threads 1 --h2-engine "$who") ;;
    haproxy)
      haproxy_config "$work/haproxy.cfg" 1
      cmd=(haproxy -f "$work/haproxy.cfg" -db) ;;
    *) echo "unknown contender $who" >&2; return 1 ;;
  esac
  local sim=()
  [ "${CACHE:-0}" = 1 ] && sim=(--cache-sim=yes)
  taskset -c 1 valgrind --tool=callgrind "${sim[@]}" --instr-atstart=no --callgrind-out-file="$work/$who.cg" \
    "${cmd[@]}" >"$work/$who.log" 2>&1 & proxy=$!
  pids+=("$proxy")
  local ok=""
  for _ in $(seq 100); do
    if load 10 2>/dev/null | grep -q '10 succeeded'; then ok=1; break; fi
    sleep 0.2
  done
  [ -n "$ok" ] || { echo "$who did not start: $(tail -3 "$work/$who.log")" >&2; return 1; }
  load 2000 >/dev/null
  callgrind_control -i on "$proxy" >/dev/null 2>&1
  local out
  out=$(load "$n" | grep 'requests:')
  callgrind_control -i off "$proxy" >/dev/null 2>&1
  callgrind_control -d "$proxy" >/dev/null 2>&1
  kill "$proxy"; wait "$proxy" 2>/dev/null || true
  local dump totals total
  dump=$(ls "$work/$who.cg."* | head -1)
  # Events: Ir, or with the cache simulation Ir Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw.
  totals=$(callgrind_annotate "$dump" 2>/dev/null | awk '/PROGRAM TOTALS/ {for (i = 1; i < NF; i++) if ($i ~ /^[0-9,]+$/) {gsub(",", "", $i); printf "%s ", $i}}')
  read -r -a t <<<"$totals"
  total=${t[0]}
  printf '%-8s c%s m%s: %6d instructions/request  (%s in %s requests)\n' \
    "$who" "$conns" "$streams" $((total / n)) "$total" "$n"
  if [ ${#t[@]} -ge 9 ]; then
    printf '         per request: L1 instruction misses %d, L1 data misses %d, last-level misses %d\n' \
      $((t[3] / n)) $(((t[4] + t[5]) / n)) $(((t[6] + t[7] + t[8]) / n))
  fi
  echo "         $out"
  if [ -n "${KEEP:-}" ]; then cp "$dump" "$KEEP/$who.callgrind"; fi
}
contenders=("$@")
[ ${#contenders[@]} -gt 0 ] || contenders=(relay haproxy)
for who in "${contenders[@]}"; do
  run "$who"
done
