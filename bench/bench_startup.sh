#!/usr/bin/env bash
# Whole-process time of one control query: `vtpmctl caps unix:PATH` next to
# `swtpm_ioctl --unix PATH -c`, measured with hyperfine -N (no shell) after a
# warm-up. Both clients ask the same swtpm server; `vtpmctl caps` is also run
# against a vtpmctl server. Prints hyperfine's table and the medians.
#
#   bench/bench_startup.sh [--runs N] [--warmup N] [--importtime] [--json FILE] [--smoke]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
py=${PYTHON:-$repo/.venv/bin/python}
vtpmctl=${VTPMCTL:-$(dirname "$py")/vtpmctl}
runs=50
warmup=5
importtime=0
json=""
while (($#)); do
    case $1 in
        --runs) runs=$2; shift 2 ;;
        --warmup) warmup=$2; shift 2 ;;
        --importtime) importtime=1; shift ;;
        --json) json=$2; shift 2 ;;
        --smoke) runs=3; warmup=1; shift ;;
        -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
        *) echo "bench_startup: unknown argument $1" >&2; exit 2 ;;
    esac
done
for tool in hyperfine swtpm swtpm_ioctl; do
    command -v "$tool" >/dev/null || { echo "bench_startup: $tool is not installed" >&2; exit 1; }
done
[[ -x $vtpmctl ]] || { echo "bench_startup: no $vtpmctl; run scripts/setup" >&2; exit 1; }

wd=$(mktemp -d /tmp/vb-start-XXXXXX)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    done
    rm -rf "$wd"
}
trap cleanup EXIT

mkdir "$wd/swtpm" "$wd/vtpmctl"
swtpm socket --tpm2 --tpmstate "dir=$wd/swtpm" --ctrl "type=unixio,path=$wd/s.ctrl" \
    --server "type=unixio,path=$wd/s.data" --flags not-need-init,startup-clear \
    >"$wd/swtpm.log" 2>&1 &
pids+=($!)
"$vtpmctl" serve --state "$wd/vtpmctl" --ctrl "unix:$wd/v.ctrl" --data "unix:$wd/v.data" \
    --flags not-need-init,startup-clear >"$wd/vtpmctl.log" 2>&1 &
pids+=($!)
for sock in s v; do
    for _ in $(seq 150); do [[ -S $wd/$sock.ctrl ]] && break; sleep 0.1; done
    [[ -S $wd/$sock.ctrl ]] || { echo "bench_startup: server $sock did not start" >&2;
                                 cat "$wd"/*.log >&2; exit 1; }
done
# Each command must work before it is timed.
"$vtpmctl" caps "unix:$wd/s.ctrl" >/dev/null
"$vtpmctl" caps "unix:$wd/v.ctrl" >/dev/null
swtpm_ioctl --unix "$wd/s.ctrl" -c >/dev/null

echo "machine: $(nproc) CPUs, $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)"
hyperfine -N --warmup "$warmup" --runs "$runs" --export-json "$wd/hf.json" \
    -n "vtpmctl caps (swtpm server)" "$vtpmctl caps unix:$wd/s.ctrl" \
    -n "swtpm_ioctl -c (swtpm server)" "swtpm_ioctl --unix $wd/s.ctrl -c" \
    -n "vtpmctl caps (vtpmctl server)" "$vtpmctl caps unix:$wd/v.ctrl"
"$py" - "$wd/hf.json" <<'EOF'
import json, statistics, sys
res = json.load(open(sys.argv[1]))["results"]
med = {r["command"]: statistics.median(r["times"]) * 1000 for r in res}
for name, ms in med.items():
    print(f"median {name:32s} {ms:7.1f} ms")
ours, theirs = med["vtpmctl caps (swtpm server)"], med["swtpm_ioctl -c (swtpm server)"]
print(f"vtpmctl caps / swtpm_ioctl -c: {ours / theirs:.1f}x")
EOF
if [[ -n $json ]]; then cp "$wd/hf.json" "$json"; fi
if ((importtime)); then
    echo "slowest imports of vtpmctl caps (python -X importtime, cumulative us):"
    "$py" -X importtime "$vtpmctl" caps "unix:$wd/v.ctrl" 2>&1 >/dev/null \
        | awk -F'|' '/import time:/ && $2 ~ /[0-9]/ {print $2 "|" $3}' | sort -rn | head -25
fi
