#!/usr/bin/env bash
# Does it learn from a stream? The streaming mode of scripts/learning-eval.sh: start `dinostream
# serve` on its own state/watch/exports folders under OUT, drop the EuroSAT-MS bank tiles of the
# group split (and optionally the BigEarthNet folders) into the watched folder in a given order at a
# given rate for a fixed time, stop the service with SIGTERM (it checkpoints and publishes), then
# evaluate exports/latest.onnx exactly as the offline mode evaluates its trained teacher, beside the
# starting model (the random init, or the imported --init model serve published at step 0) and the
# band statistics. "final - start" is the gain (negative: forgetting).
#   scripts/learning-eval.sh --stream DATA OUT [options] [-- flags for serve and the step-0 train]
#     --time T              serve and drop for T (s/m/h; default 3m), then SIGTERM
#     --max-steps N         serve.max_steps: serve stops itself at step N (whichever comes first)
#     --order O             shuffled (default) | class (grouped by label) | scene (by spatial_group)
#     --seed N              seed of the order (default 0)
#     --rate R              tiles per minute (default 60), or `burst` (all at once)
#     --model P             model preset (default vit-micro-p8)
#     --batch-size N        train.batch_size
#     --policy P            stream.replay_policy (reservoir | fifo | min-redundancy, passed through)
#     --init FILE --init-bands SET   start from pretrained weights (README, "Starting from pretrained weights")
#     --bigearthnet         drop DATA/bigearthnet-s2 folders too
#     --set 'KEY = VALUE'   one more config line as a TOML dotted key (e.g. 'serve.rehearsal = "off"')
#   e.g. scripts/learning-eval.sh --stream ../shared/data out-stream --time 3m --order class --rate 100
# Flags after `--` go to serve and to the step-0 `train` that makes the random start (e.g. --device cuda).
# Writes OUT/serve.toml, OUT/serve.log, OUT/drops.csv, OUT/serve/{incoming,state,exports},
# the eval-*.txt files, OUT/learning.md (the offline mode's table) and OUT/stream.md (settings + table).
# Env: DINOSTREAM (the binary, default target/release/dinostream), PYTHON (split and dropper).
set -euo pipefail
here=$(dirname "$0")
data=${1:?DATA folder}; out=${2:?OUT folder}; shift 2
time=3m max_steps= order=shuffled seed=0 rate=60 preset=vit-micro-p8 batch= policy= init= init_bands=
bigearthnet= sets=()
while (( $# )); do
  case $1 in
    --time) time=$2; shift 2 ;;
    --max-steps) max_steps=$2; shift 2 ;;
    --order) order=$2; shift 2 ;;
    --seed) seed=$2; shift 2 ;;
    --rate) rate=$2; shift 2 ;;
    --model) preset=$2; shift 2 ;;
    --batch-size) batch=$2; shift 2 ;;
    --policy) policy=$2; shift 2 ;;
    --init) init=$(realpath "$2"); shift 2 ;;
    --init-bands) init_bands=$2; shift 2 ;;
    --bigearthnet) bigearthnet=--bigearthnet; shift ;;
    --set) sets+=("$2"); shift 2 ;;
    --) shift; break ;;
    *) echo "learning-eval.sh --stream: unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
case $time in
  *h) secs=$(( ${time%h} * 3600 )) ;; *m) secs=$(( ${time%m} * 60 )) ;; *s) secs=${time%s} ;; *) secs=$time ;;
esac
if [[ -n $init && -z $init_bands ]]; then
  echo "learning-eval.sh --stream: --init needs --init-bands (the file's channel names)" >&2; exit 2
fi
bin=$(realpath "${DINOSTREAM:-target/release/dinostream}")
py=${PYTHON:-python3}
mkdir -p "$out"
out=$(realpath "$out")
# shellcheck source=learning-lib.sh
source "$here/learning-lib.sh"

learning_split
work=$out/serve
rm -rf "$work"
mkdir -p "$work/incoming"
{
  echo "# written by scripts/learning-eval.sh --stream"
  echo "tile.layout = \"eurosat13\""
  echo "model.preset = \"$preset\""
  echo "stream.watch_dir = \"$work/incoming\""
  echo "serve.state_dir = \"$work/state\""
  echo "serve.exports_dir = \"$work/exports\""
  echo "export.keep = 1000000"
  [[ -n $batch ]] && echo "train.batch_size = $batch"
  [[ -n $policy ]] && echo "stream.replay_policy = \"$policy\""
  [[ -n $max_steps ]] && echo "serve.max_steps = $max_steps"
  for line in "${sets[@]}"; do echo "$line"; done
} > "$out/serve.toml"
init_flags=()
[[ -n $init ]] && init_flags=(--init "$init" --init-bands "$init_bands")

# The service, then the drops; SIGTERM after the time (or serve stops itself at --max-steps).
"$bin" serve --config "$out/serve.toml" "${init_flags[@]}" "$@" > "$out/serve.log" 2>&1 &
serve_pid=$!
"$py" "$here/stream-drop.py" "$data" "$out/bank.csv" "$work/incoming" --order "$order" --seed "$seed" \
  --rate "$rate" $bigearthnet --log "$out/drops.csv" &
drop_pid=$!
load_start=$(uptime | sed 's/.*load average: //')
echo "serve (pid $serve_pid) for ${secs} s, log $out/serve.log; load average $load_start"
end=$(( SECONDS + secs ))
while (( SECONDS < end )) && kill -0 "$serve_pid" 2> /dev/null; do sleep 1; done
kill "$drop_pid" 2> /dev/null || true
wait "$drop_pid" 2> /dev/null || true
kill -TERM "$serve_pid" 2> /dev/null || true
serve_rc=0
wait "$serve_pid" || serve_rc=$?
load_end=$(uptime | sed 's/.*load average: //')
echo "serve exited $serve_rc; load average $load_end"
tail -3 "$out/serve.log"
if [[ ! -f $work/exports/latest.onnx ]]; then
  echo "no $work/exports/latest.onnx: serve published nothing (see $out/serve.log)" >&2; exit 1
fi
cp "$work/exports/latest.onnx" "$out/streamed.onnx"

# The start: serve's own step-0 export of an imported model, else the same config's random init.
start_model() {
  local name=$1; shift
  "$bin" train --config "$out/serve.toml" --data "$data/eurosat-ms" --steps 0 \
    --checkpoint "$out/$name" "$@" > /dev/null
  "$bin" export --checkpoint "$out/$name" --out "$out/$name.onnx"
}
rows=(streamed start)
if [[ -n $init ]]; then
  if [[ -f $work/exports/dinostream-step0.onnx ]]; then
    cp "$work/exports/dinostream-step0.onnx" "$out/start.onnx"
  else
    start_model start "${init_flags[@]}" "$@"
  fi
  start_model random "$@"
  rows+=(random)
else
  start_model start "$@"
fi
rows+=(band-stats)

for name in "${rows[@]}"; do
  if [[ $name == band-stats ]]; then
    learning_evaluate band-stats --baseline band-stats
  else
    learning_evaluate "$name" --model "$out/$name.onnx"
  fi
done
learning_table "${rows[@]}"

overall() { awk '$1 == "overall" {gsub("%", ""); print $2, $3}' "$out/eval-$1.txt"; }
read -r knn_end lin_end <<< "$(overall streamed)"
read -r knn_start lin_start <<< "$(overall start)"
served=$("$py" - "$work/exports/latest.json" "$work/state/status.json" <<'PY'
import json, sys
step = json.load(open(sys.argv[1]))["metadata"]["training_step"]
status = json.load(open(sys.argv[2]))
print(f"published step {step}, {status['tiles_trained']} tiles trained as fresh, "
      f"{status['samples_per_sec']:.1f} samples/s at the end")
PY
)
dropped=$(( $(wc -l < "$out/drops.csv") - 1 ))
{
  echo "streaming: $preset, order $order (seed $seed), rate $rate, ${secs} s, ${dropped} tiles dropped," \
    "policy ${policy:-default}, start ${init:-random init}${batch:+, batch $batch}${max_steps:+, max steps $max_steps};" \
    "$served; serve exit $serve_rc; load average $load_start at the start, $load_end at SIGTERM"
  echo
  cat "$out/learning.md"
  echo
  awk -v a="$knn_end" -v b="$knn_start" -v c="$lin_end" -v d="$lin_start" \
    'BEGIN {printf "final - start: k-NN %+.1f points, linear %+.1f points\n", a - b, c - d}'
} > "$out/stream.md"
echo; cat "$out/stream.md"
