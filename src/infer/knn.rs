//! Frozen-feature evaluation: DINO's weighted k-NN classifier (`eval_knn.py`: cosine similarity,
//! top k = 20, votes weighted by `exp(sim / T)`, T = 0.07), a linear probe (multinomial logistic
//! regression by full-batch gradient descent), per-class accuracy, and the band-statistics
//! baseline features (per-band mean and std) to read the results against.

/// DINO's defaults.
pub const K: usize = 20;
/// Temperature of the k-NN vote weights.
pub const TEMPERATURE: f32 = 0.07;

/// Rows of `[n, d]` scaled to unit length (`x / max(||x||, 1e-12)`), in place.
pub fn l2_normalize_rows(values: &mut [f32], d: usize) {
    for row in values.chunks_mut(d.max(1)) {
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        row.iter_mut().for_each(|x| *x /= norm);
    }
}

/// Weighted k-NN: the class of each query row. `bank` and `query` are `[_, d]` and already
/// L2-normalised; `labels[i]` is the class of bank row `i`.
pub fn knn_predict(
    bank: &[f32],
    labels: &[usize],
    query: &[f32],
    d: usize,
    classes: usize,
    k: usize,
    t: f32,
) -> Vec<usize> {
    query
        .chunks(d)
        .map(|q| {
            let mut sims: Vec<(f32, usize)> = bank
                .chunks(d)
                .zip(labels)
                .map(|(b, &l)| (b.iter().zip(q).map(|(x, y)| x * y).sum(), l))
                .collect();
            sims.sort_by(|a, b| b.0.total_cmp(&a.0));
            let mut votes = vec![0.0f32; classes];
            for &(sim, label) in sims.iter().take(k) {
                votes[label] += (sim / t).exp();
            }
            argmax(&votes)
        })
        .collect()
}

/// Index of the largest value (the first on ties).
pub fn argmax(values: &[f32]) -> usize {
    values.iter().enumerate().fold(0, |best, (i, v)| if *v > values[best] { i } else { best })
}

/// Multinomial logistic regression on standardised features.
#[derive(Debug, Clone)]
pub struct LinearProbe {
    mean: Vec<f32>,
    std: Vec<f32>,
    /// `[classes, d]`.
    weights: Vec<f32>,
    bias: Vec<f32>,
    classes: usize,
}

impl LinearProbe {
    /// Fit on `[n, d]` features with full-batch gradient descent (`epochs` steps, step size `lr`,
    /// L2 penalty `weight_decay` on the weights).
    pub fn fit(
        x: &[f32],
        labels: &[usize],
        d: usize,
        classes: usize,
        epochs: usize,
        lr: f32,
        weight_decay: f32,
    ) -> Self {
        let n = labels.len().max(1);
        let (mean, std) = column_stats(x, d);
        let xs = standardize(x, &mean, &std);
        let mut probe =
            LinearProbe { mean, std, weights: vec![0.0; classes * d], bias: vec![0.0; classes], classes };
        for _ in 0..epochs {
            let mut grad_w = vec![0.0f32; classes * d];
            let mut grad_b = vec![0.0f32; classes];
            for (row, &label) in xs.chunks(d).zip(labels) {
                let mut p = probe.logits(row);
                softmax(&mut p);
                p[label] -= 1.0;
                for c in 0..classes {
                    grad_b[c] += p[c];
                    grad_w[c * d..(c + 1) * d].iter_mut().zip(row).for_each(|(g, x)| *g += p[c] * x);
                }
            }
            for (w, g) in probe.weights.iter_mut().zip(&grad_w) {
                *w -= lr * (g / n as f32 + weight_decay * *w);
            }
            probe.bias.iter_mut().zip(&grad_b).for_each(|(b, g)| *b -= lr * g / n as f32);
        }
        probe
    }

    /// The class of each `[_, d]` row.
    pub fn predict(&self, x: &[f32]) -> Vec<usize> {
        let d = self.mean.len();
        standardize(x, &self.mean, &self.std).chunks(d).map(|row| argmax(&self.logits(row))).collect()
    }

    fn logits(&self, row: &[f32]) -> Vec<f32> {
        let d = row.len();
        (0..self.classes)
            .map(|c| {
                self.bias[c]
                    + self.weights[c * d..(c + 1) * d].iter().zip(row).map(|(w, x)| w * x).sum::<f32>()
            })
            .collect()
    }
}

/// Per-column mean and std (std floored at 1e-6) of `[n, d]`.
fn column_stats(x: &[f32], d: usize) -> (Vec<f32>, Vec<f32>) {
    let n = (x.len() / d.max(1)).max(1) as f32;
    let mut mean = vec![0.0f32; d];
    x.chunks(d).for_each(|r| mean.iter_mut().zip(r).for_each(|(m, v)| *m += v / n));
    let mut var = vec![0.0f32; d];
    x.chunks(d)
        .for_each(|r| var.iter_mut().zip(r).zip(&mean).for_each(|((s, v), m)| *s += (v - m).powi(2) / n));
    (mean, var.into_iter().map(|v| v.sqrt().max(1e-6)).collect())
}

fn standardize(x: &[f32], mean: &[f32], std: &[f32]) -> Vec<f32> {
    x.chunks(mean.len().max(1))
        .flat_map(|r| r.iter().zip(mean).zip(std).map(|((v, m), s)| (v - m) / s))
        .collect()
}

fn softmax(values: &mut [f32]) {
    let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    values.iter_mut().for_each(|v| *v = (*v - max).exp());
    let sum: f32 = values.iter().sum();
    values.iter_mut().for_each(|v| *v /= sum);
}

/// Overall and per-class accuracy.
#[derive(Debug, Clone, PartialEq)]
pub struct Accuracy {
    /// Fraction of correct predictions.
    pub overall: f64,
    /// `(correct, total)` per class index.
    pub per_class: Vec<(usize, usize)>,
}

/// Compare `predicted` with `truth` over `classes` classes.
pub fn accuracy(predicted: &[usize], truth: &[usize], classes: usize) -> Accuracy {
    let mut per_class = vec![(0, 0); classes];
    for (&p, &t) in predicted.iter().zip(truth) {
        per_class[t].1 += 1;
        per_class[t].0 += usize::from(p == t);
    }
    let correct: usize = per_class.iter().map(|c| c.0).sum();
    Accuracy { overall: correct as f64 / truth.len().max(1) as f64, per_class }
}

/// Baseline features of one `[C, H*W]` patch: each band's mean, then each band's std.
pub fn band_stat_features(data: &[f32], channels: usize) -> Vec<f32> {
    let per = data.len() / channels.max(1);
    let (means, stds): (Vec<f32>, Vec<f32>) = data
        .chunks(per.max(1))
        .map(|plane| {
            let mean = plane.iter().sum::<f32>() / per as f32;
            let var = plane.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / per as f32;
            (mean, var.sqrt())
        })
        .unzip();
    means.into_iter().chain(stds).collect()
}

/// k-NN and linear-probe accuracy of one evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalReport {
    /// Weighted k-NN (k = [`K`], T = [`TEMPERATURE`]).
    pub knn: Accuracy,
    /// Linear probe trained on the bank.
    pub linear: Accuracy,
}

/// Evaluate `[_, d]` features: a linear probe fit on the bank (300 full-batch steps, lr 0.5,
/// weight decay 1e-4, standardised features) and weighted k-NN on L2-normalised features.
pub fn evaluate(
    bank: &[f32],
    bank_labels: &[usize],
    query: &[f32],
    query_labels: &[usize],
    d: usize,
    classes: usize,
) -> EvalReport {
    let probe = LinearProbe::fit(bank, bank_labels, d, classes, 300, 0.5, 1e-4);
    let linear = accuracy(&probe.predict(query), query_labels, classes);
    let (mut bank, mut query) = (bank.to_vec(), query.to_vec());
    l2_normalize_rows(&mut bank, d);
    l2_normalize_rows(&mut query, d);
    let predicted = knn_predict(&bank, bank_labels, &query, d, classes, K, TEMPERATURE);
    EvalReport { knn: accuracy(&predicted, query_labels, classes), linear }
}

/// Multi-label weighted k-NN (BigEarthNet): per query row, the vote-weighted mean of the top-`k`
/// neighbours' 0/1 targets. `bank_targets` is `[bank rows, classes]`; returns `[query rows, classes]`.
pub fn knn_multilabel_scores(
    bank: &[f32],
    bank_targets: &[f32],
    query: &[f32],
    d: usize,
    classes: usize,
    k: usize,
    t: f32,
) -> Vec<f32> {
    let mut scores = Vec::with_capacity(query.len() / d.max(1) * classes);
    for q in query.chunks(d) {
        let mut sims: Vec<(f32, usize)> =
            bank.chunks(d).enumerate().map(|(i, b)| (b.iter().zip(q).map(|(x, y)| x * y).sum(), i)).collect();
        sims.sort_by(|a, b| b.0.total_cmp(&a.0));
        let mut row = vec![0.0f32; classes];
        let mut total = 0.0f32;
        for &(sim, i) in sims.iter().take(k) {
            let w = (sim / t).exp();
            total += w;
            row.iter_mut().zip(&bank_targets[i * classes..(i + 1) * classes]).for_each(|(r, y)| *r += w * y);
        }
        scores.extend(row.into_iter().map(|r| r / total.max(f32::MIN_POSITIVE)));
    }
    scores
}

/// Micro-averaged average precision: all (score, target) pairs ranked together, the mean of the
/// precision at each positive. `None` without positives.
pub fn micro_average_precision(scores: &[f32], targets: &[f32]) -> Option<f64> {
    let mut pairs: Vec<(f32, bool)> = scores.iter().zip(targets).map(|(s, t)| (*s, *t > 0.5)).collect();
    pairs.sort_by(|a, b| b.0.total_cmp(&a.0));
    let (mut hits, mut sum) = (0usize, 0.0f64);
    for (rank, (_, positive)) in pairs.iter().enumerate() {
        if *positive {
            hits += 1;
            sum += hits as f64 / (rank + 1) as f64;
        }
    }
    (hits > 0).then(|| sum / hits as f64)
}

/// Micro-averaged F1 of `scores >= threshold` against 0/1 `targets`.
pub fn micro_f1(scores: &[f32], targets: &[f32], threshold: f32) -> f64 {
    let (mut tp, mut fp, mut fneg) = (0usize, 0usize, 0usize);
    for (s, t) in scores.iter().zip(targets) {
        match (*s >= threshold, *t > 0.5) {
            (true, true) => tp += 1,
            (true, false) => fp += 1,
            (false, true) => fneg += 1,
            (false, false) => {}
        }
    }
    if tp == 0 { 0.0 } else { 2.0 * tp as f64 / (2 * tp + fp + fneg) as f64 }
}

/// One labelled file of an evaluation set.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelledFile {
    /// Path relative to the set's folder (`AnnualCrop/AnnualCrop_1.tif`, or a BigEarthNet patch folder).
    pub filename: String,
    /// Class names: one for EuroSAT, any number for BigEarthNet.
    pub labels: Vec<String>,
}

/// Read a labels CSV: `filename` and `label` columns (the `eurosat-ms/labels.csv` format), or
/// `patch` and `labels_19` with `|`-separated labels (the `bigearthnet-s2/labels.csv` format).
/// Other columns are ignored; quoted fields are not supported.
pub fn read_labels(text: &str) -> Result<Vec<LabelledFile>, String> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<&str> = lines.next().ok_or("empty labels file")?.split(',').map(str::trim).collect();
    let column = |names: [&str; 2]| {
        header
            .iter()
            .position(|h| names.contains(h))
            .ok_or(format!("no `{}` column in {header:?}", names.join("` or `")))
    };
    let (file_col, label_col) = (column(["filename", "patch"])?, column(["label", "labels_19"])?);
    lines
        .enumerate()
        .map(|(i, line)| {
            let fields: Vec<&str> = line.split(',').map(str::trim).collect();
            match (fields.get(file_col), fields.get(label_col)) {
                (Some(f), Some(l)) => Ok(LabelledFile {
                    filename: f.to_string(),
                    labels: l.split('|').map(str::to_string).collect(),
                }),
                _ => Err(format!("line {}: fewer than {} fields", i + 2, file_col.max(label_col) + 1)),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knn_votes_follow_the_nearest_neighbours() {
        let mut bank = vec![1.0, 0.0, 0.9, 0.1, 0.0, 1.0, 0.1, 0.9];
        l2_normalize_rows(&mut bank, 2);
        let labels = [0, 0, 1, 1];
        let mut query = vec![1.0, 0.05, 0.05, 1.0];
        l2_normalize_rows(&mut query, 2);
        assert_eq!(knn_predict(&bank, &labels, &query, 2, 2, 3, TEMPERATURE), vec![0, 1]);
    }

    #[test]
    fn linear_probe_separates_two_clusters() {
        let x = vec![0.0, 0.1, 0.2, 0.0, 0.1, 0.2, 5.0, 5.1, 5.2, 4.9, 5.1, 5.0];
        let labels = [0, 0, 0, 1, 1, 1];
        let probe = LinearProbe::fit(&x, &labels, 2, 2, 200, 0.5, 0.0);
        assert_eq!(probe.predict(&x), labels.to_vec());
    }

    #[test]
    fn accuracy_counts_per_class() {
        let acc = accuracy(&[0, 1, 1, 2], &[0, 1, 2, 2], 3);
        assert_eq!(acc.overall, 0.75);
        assert_eq!(acc.per_class, vec![(1, 1), (1, 1), (1, 2)]);
    }

    #[test]
    fn band_stats_features_are_means_then_stds() {
        assert_eq!(band_stat_features(&[1.0, 3.0, 2.0, 2.0], 2), vec![2.0, 2.0, 1.0, 0.0]);
    }

    #[test]
    fn labels_csv_is_read_by_column_name() {
        let text = "filename,label,label_index\nA/a.tif,Forest,1\nB/b.tif,River,8\n";
        let rows = read_labels(text).unwrap();
        assert_eq!(rows[1], LabelledFile { filename: "B/b.tif".into(), labels: vec!["River".into()] });
        let ben = read_labels("patch,version,labels_19\nS2A_1,v1,Arable land|Marine waters\n").unwrap();
        assert_eq!(ben[0].labels, ["Arable land", "Marine waters"]);
        assert!(read_labels("file,class\n").unwrap_err().contains("filename"));
    }

    #[test]
    fn evaluate_scores_separable_directions_perfectly_and_shuffled_labels_worse() {
        // Three classes along three axes with small deterministic jitter.
        let rows = |n: usize, offset: usize| -> (Vec<f32>, Vec<usize>) {
            let mut x = Vec::new();
            let mut y = Vec::new();
            for i in 0..n {
                let c = (i + offset) % 3;
                let mut row = vec![0.1 * ((i * 7 % 5) as f32 / 5.0); 3];
                row[c] += 1.0;
                x.extend(row);
                y.push(c);
            }
            (x, y)
        };
        let (xb, yb) = rows(30, 0);
        let (xq, yq) = rows(12, 1);
        let report = evaluate(&xb, &yb, &xq, &yq, 3, 3);
        assert_eq!((report.knn.overall, report.linear.overall), (1.0, 1.0));
        let shuffled: Vec<usize> = yb.iter().map(|c| (c + 1) % 3).collect();
        assert_eq!(evaluate(&xb, &shuffled, &xq, &yq, 3, 3).knn.overall, 0.0);
    }

    #[test]
    fn multilabel_knn_scores_and_micro_metrics() {
        // Threshold 0.5: tp 3, fp 1, fn 0, so micro F1 = 2*3 / (2*3 + 1 + 0) = 6/7;
        // the micro AP over ranks [+, -, +, +] is (1/1 + 2/3 + 3/4) / 3.
        let targets = [1.0, 0.0, 1.0, 1.0, 0.0, 0.0];
        let scores = [0.9, 0.8, 0.7, 0.6, 0.2, 0.1];
        assert!(
            (micro_average_precision(&scores, &targets).unwrap() - (1.0 + 2.0 / 3.0 + 0.75) / 3.0).abs()
                < 1e-12
        );
        assert!((micro_f1(&scores, &targets, 0.5) - 6.0 / 7.0).abs() < 1e-12);
        assert_eq!(micro_average_precision(&scores, &[0.0; 6]), None);
        let bank = [1.0, 0.0, 0.0, 1.0];
        let bank_targets = [1.0, 0.0, 0.0, 1.0];
        let s = knn_multilabel_scores(&bank, &bank_targets, &[1.0, 0.0], 2, 2, 1, TEMPERATURE);
        assert_eq!(s, vec![1.0, 0.0]);
    }
}
