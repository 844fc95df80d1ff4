#!/usr/bin/env bash
# Counts the instructions each variant of the `overhead` benchmark runs per call, with
# valgrind's callgrind, in the benchmark's own binary. Each variant runs twice, with N and
# 2N calls; the difference divided by N is the cost of one call, set-up and start-up
# cancelled out. Needs valgrind. Usage: benches/instructions.sh [N]
set -euo pipefail
cd "$(dirname "$0")/.."

n="${1:-20000}"
bin=$(cargo bench --bench overhead --no-run --message-format=json 2>/dev/null |
    sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1)
if [[ -z "$bin" ]]; then
    echo "could not build the overhead benchmark; run 'cargo bench --bench overhead --no-run'" >&2
    exit 1
fi

instructions() { # variant, calls
    valgrind --tool=callgrind --callgrind-out-file=/dev/null "$bin" --calls "$1" "$2" 2>&1 |
        sed -n 's/.*Collected : \([0-9]*\).*/\1/p'
}

declare -A per_call
for variant in bare floor tower-http static scoped cached; do
    once=$(instructions "$variant" "$n")
    twice=$(instructions "$variant" $((2 * n)))
    per_call[$variant]=$(((twice - once) / n))
done

added() { echo $((per_call[$1] - per_call[bare])); }
ratio() { awk -v a="$(added "$1")" -v b="$(added "$2")" 'BEGIN { printf "%.3f", a / b }'; }

echo "| variant | instructions/call | added | ratio |"
echo "|---|---:|---:|---|"
echo "| bare | ${per_call[bare]} | | |"
echo "| floor | ${per_call[floor]} | $(added floor) | 1.000 |"
echo "| tower-http x2 | ${per_call[tower-http]} | $(added tower-http) | $(ratio tower-http floor) x floor |"
echo "| static | ${per_call[static]} | $(added static) | $(ratio static floor) x floor |"
echo "| scoped | ${per_call[scoped]} | $(added scoped) | $(ratio scoped floor) x floor |"
echo "| cached | ${per_call[cached]} | $(added cached) | $(ratio cached static) x static |"
