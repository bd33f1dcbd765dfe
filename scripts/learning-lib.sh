# Shared by both modes of scripts/learning-eval.sh (offline `train` and `--stream` through `serve`):
# the group-wise EuroSAT-MS split, the evaluation of a model against it and the results table.
# Source it; it expects `bin` (the dinostream binary), `py` (Python 3), `data` and `out` to be set.

# Write OUT/bank.csv and OUT/query.csv (filename,label): every 5th `spatial_group` of
# DATA/eurosat-ms/labels.csv is query, the rest bank.
learning_split() {
  "$py" - "$data/eurosat-ms/labels.csv" "$out" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
split = {"bank": [], "query": []}
for r in rows:
    split["query" if int(r["spatial_group"]) % 5 == 0 else "bank"].append(r)
for name, part in split.items():
    with open(f"{sys.argv[2]}/{name}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", "label"])
        w.writerows([r["filename"], r["label"]] for r in part)
groups = {n: len({r["spatial_group"] for r in p}) for n, p in split.items()}
print(f"split: bank {len(split['bank'])} tiles in {groups['bank']} groups, "
      f"query {len(split['query'])} tiles in {groups['query']} groups")
PY
}

# k-NN and linear-probe accuracy of one feature extractor on the split, into OUT/eval-NAME.txt.
#   learning_evaluate NAME (--model M.onnx | --baseline band-stats)
learning_evaluate() {
  local name=$1; shift
  "$bin" eval --bank "$data/eurosat-ms" --labels "$out/bank.csv" --query "$data/eurosat-ms" \
    --query-labels "$out/query.csv" --layout eurosat13 "$@" | tee "$out/eval-$name.txt"
}

# The markdown table (OUT/learning.md) of the overall accuracies of the evaluated NAMEs, in order.
learning_table() {
  echo "| features | k-NN | linear |" | tee "$out/learning.md"
  echo "| --- | --- | --- |" | tee -a "$out/learning.md"
  local name
  for name in "$@"; do
    awk -v n="$name" '$1 == "overall" {printf "| %s | %s | %s |\n", n, $2, $3}' "$out/eval-$name.txt" \
      | tee -a "$out/learning.md"
  done
}
