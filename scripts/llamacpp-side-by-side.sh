#!/usr/bin/env bash
# scripts/llamacpp-side-by-side.sh - vlmd's bench_text and llama.cpp's
# llama-bench on the same files, interleaved, medians side by side.
#
# The machines we measure on drift by 30-40% within minutes, so the two
# engines run alternately (vlmd, llama.cpp, vlmd, llama.cpp, ... for ROUNDS
# rounds) on the same files and thread count, one repetition per run, and
# the medians over the rounds are compared. This script builds nothing:
# pass the llama-bench you built yourself (see bench/README.md).
#
#   scripts/llamacpp-side-by-side.sh /path/to/llama-bench [MODEL.gguf ...]
#
# Without model files it uses the standard set in $VLM_MODELS_DIR (default
# /work/models): tinyllama-q4_0, tinyllama-q8_0, tinyllama-q4_k_m and
# llava7b-q4_k_m .gguf, whichever exist.
#
# Environment: VLM_BUILD_DIR (default: build), THREADS (2), ROUNDS (3),
# PP (512), TG (128), LB_ARGS (extra llama-bench flags, e.g. "-rtr 1" for
# ik_llama.cpp's run-time repacking), LB_NAME (the other engine's name in
# the table, default llama.cpp).
set -euo pipefail

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
}

if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
    usage
    [ $# -ge 1 ] && exit 0 || exit 2
fi

llama_bench=$1
shift
if [ ! -x "$llama_bench" ]; then
    echo "llamacpp-side-by-side: $llama_bench is not an executable llama-bench" >&2
    exit 2
fi

src_dir=$(cd "$(dirname "$0")/.." && pwd)
build_dir=${VLM_BUILD_DIR:-$src_dir/build}
bench_text=$build_dir/bench/bench_text
bench_limits=$build_dir/bench/bench_limits
threads=${THREADS:-2}
rounds=${ROUNDS:-3}
pp=${PP:-512}
tg=${TG:-128}
lb_name=${LB_NAME:-llama.cpp}
read -r -a lb_args <<< "${LB_ARGS:-}"
py=python3
[ -x /usr/bin/python3 ] && py=/usr/bin/python3

for exe in "$bench_text" "$bench_limits"; do
    if [ ! -x "$exe" ]; then
        echo "llamacpp-side-by-side: $exe not built (ninja -C $build_dir bench/bench_text bench/bench_limits)" >&2
        exit 2
    fi
done

models=("$@")
if [ ${#models[@]} -eq 0 ]; then
    dir=${VLM_MODELS_DIR:-/work/models}
    for name in tinyllama-q4_0 tinyllama-q8_0 tinyllama-q4_k_m llava7b-q4_k_m; do
        if [ -r "$dir/$name.gguf" ]; then
            models+=("$dir/$name.gguf")
        else
            echo "llamacpp-side-by-side: skipping $dir/$name.gguf (absent)" >&2
        fi
    done
fi
if [ ${#models[@]} -eq 0 ]; then
    echo "llamacpp-side-by-side: no model files (see bench/README.md)" >&2
    exit 2
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
results=$tmp/results.tsv   # engine, model, round, pp t/s, tg t/s, peak RSS bytes
: > "$results"

time_cmd=()
if [ -x /usr/bin/time ]; then time_cmd=(/usr/bin/time -f '%M' -o "$tmp/rss"); fi

"$bench_limits" -t "$threads" --reps 10 > "$tmp/limits.before"

for round in $(seq 1 "$rounds"); do
    for model in "${models[@]}"; do
        name=$(basename "$model")
        echo "round $round/$rounds: $name: vlmd" >&2
        # A: vlmd. The tsv columns are documented in bench_text's header line.
        if "$bench_text" -m "$model" -t "$threads" -p "$pp" -n "$tg" -r 1 --no-limits -o tsv \
                > "$tmp/a.tsv" 2> "$tmp/a.err"; then
            awk -F'\t' -v r="$round" -v m="$name" 'NR == 2 { printf "vlmd\t%s\t%s\t%s\t%s\t%s\n", m, r, $4, $7, $10 }' \
                "$tmp/a.tsv" >> "$results"
        else
            echo "  vlmd failed: $(tail -n 1 "$tmp/a.err")" >&2
        fi
        echo "round $round/$rounds: $name: $lb_name" >&2
        # B: llama.cpp, same file, threads, prompt and generation lengths.
        rm -f "$tmp/rss"
        if "${time_cmd[@]}" "$llama_bench" -m "$model" -t "$threads" -p "$pp" -n "$tg" -r 1 "${lb_args[@]}" -o csv \
                > "$tmp/b.csv" 2> "$tmp/b.err"; then
            rss_kb=$(tail -n 1 "$tmp/rss" 2> /dev/null || echo 0)
            "$py" - "$tmp/b.csv" "$name" "$round" "$rss_kb" >> "$results" <<'EOF'
import csv, sys
path, name, rnd, rss_kb = sys.argv[1:5]
pp = tg = 0.0
for row in csv.DictReader(open(path)):
    if int(row["n_prompt"]) > 0 and int(row["n_gen"]) == 0:
        pp = float(row["avg_ts"])
    elif int(row["n_gen"]) > 0 and int(row["n_prompt"]) == 0:
        tg = float(row["avg_ts"])
rss = int(rss_kb) * 1024 if rss_kb.strip().isdigit() else 0
print(f"llama.cpp\t{name}\t{rnd}\t{pp}\t{tg}\t{rss}")
EOF
        else
            echo "  llama-bench failed: $(tail -n 1 "$tmp/b.err")" >&2
        fi
    done
done

"$bench_limits" -t "$threads" --reps 10 > "$tmp/limits.after"

echo "# before: $(grep -E '^(triad|sgemm)' "$tmp/limits.before" | sed 's/  */ /g' | paste -sd';')"
echo "# after:  $(grep -E '^(triad|sgemm)' "$tmp/limits.after" | sed 's/  */ /g' | paste -sd';')"
echo "# $(grep -E '^(cpu|microarchitecture)' "$tmp/limits.before" | sed 's/  */ /g' | paste -sd';')"
echo "# llama-bench ($lb_name): $llama_bench ${lb_args[*]}; $threads threads; pp$pp / tg$tg; medians of $rounds interleaved rounds"
"$py" - "$results" "$pp" "$tg" "$lb_name" <<'EOF'
import sys, statistics
path, pp, tg, other = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
rows = [l.rstrip("\n").split("\t") for l in open(path) if l.strip()]
models = []
for r in rows:
    if r[1] not in models:
        models.append(r[1])
def med(engine, model, col):
    v = [float(r[col]) for r in rows if r[0] == engine and r[1] == model and float(r[col]) > 0]
    return statistics.median(v) if v else 0.0
def ratio(a, b):
    return f"{a / b:6.2f}x" if a > 0 and b > 0 else "     -"
print(f"{'model':<26} | {'pp'+pp+' vlmd':>11} {other[:10]:>10} {'ratio':>7} | "
      f"{'tg'+tg+' vlmd':>11} {other[:10]:>10} {'ratio':>7} | {'RSS MiB vlmd':>12} {other[:10]:>10}")
for m in models:
    a_pp, b_pp = med("vlmd", m, 3), med("llama.cpp", m, 3)
    a_tg, b_tg = med("vlmd", m, 4), med("llama.cpp", m, 4)
    a_rss, b_rss = med("vlmd", m, 5) / 2**20, med("llama.cpp", m, 5) / 2**20
    print(f"{m:<26} | {a_pp:11.2f} {b_pp:10.2f} {ratio(a_pp, b_pp):>7} | "
          f"{a_tg:11.2f} {b_tg:10.2f} {ratio(a_tg, b_tg):>7} | {a_rss:12.0f} {b_rss:10.0f}")
print(f"(ratio = vlmd / {other}; above 1 means vlmd is faster)")
EOF
