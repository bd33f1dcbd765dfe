//! Redundancy among stored patches, for the `min-redundancy` replay policy (MinRed: Purushwalkam,
//! Morgado, Gupta, "The Challenges of Continuous Self-Supervised Learning", ECCV 2022): each slot
//! may hold the l2-normalised teacher cls embedding of its patch, and the index keeps, for every
//! embedded slot, the cosine similarity to its nearest embedded neighbour. The most redundant slot
//! is the one with the highest such similarity.
//!
//! Updates cost one pass over the slots (`O(N d)`): a new embedding is compared with every other,
//! and only slots whose nearest neighbour changed or left are rescanned. All sums run in a fixed
//! order, so the same updates give the same choices on every run (a resumed run rebuilds the index
//! from the stored embeddings and reaches the same values).

/// Stored embeddings and their nearest-neighbour similarities, slot by slot.
#[derive(Debug, Clone, Default)]
pub struct Redundancy {
    embeddings: Vec<Option<Vec<f32>>>,
    /// Per embedded slot: (cosine similarity, index) of its nearest embedded neighbour.
    nearest: Vec<Option<(f32, usize)>>,
}

impl Redundancy {
    /// An index over `embeddings` (slot by slot; `None`: not trained since it was stored).
    pub fn from_embeddings(embeddings: Vec<Option<Vec<f32>>>) -> Redundancy {
        let n = embeddings.len();
        let mut index = Redundancy { embeddings, nearest: vec![None; n] };
        for i in 0..n {
            index.nearest[i] = index.scan(i);
        }
        index
    }

    /// The embeddings, slot by slot (for a checkpoint).
    pub fn embeddings(&self) -> &[Option<Vec<f32>>] {
        &self.embeddings
    }

    /// Make room for slot `i` (a new slot when `i` is the current length).
    fn ensure(&mut self, i: usize) {
        if i >= self.embeddings.len() {
            self.embeddings.resize(i + 1, None);
            self.nearest.resize(i + 1, None);
        }
    }

    /// Slot `i` now holds a patch that has no embedding yet (stored, or replaced by a new one).
    pub fn clear(&mut self, i: usize) {
        self.ensure(i);
        if self.embeddings[i].take().is_some() {
            self.nearest[i] = None;
            self.rescan_neighbours_of(i);
        }
    }

    /// Slot `i`'s patch was just embedded as `embedding` (any length > 0; normalised here).
    pub fn set(&mut self, i: usize, embedding: &[f32]) {
        self.clear(i);
        let norm = dot(embedding, embedding).sqrt().max(1e-12);
        self.embeddings[i] = Some(embedding.iter().map(|v| v / norm).collect());
        self.nearest[i] = self.scan(i);
        let e = self.embeddings[i].as_deref().expect("set just above");
        for j in 0..self.embeddings.len() {
            let Some(other) = self.embeddings[j].as_deref().filter(|_| j != i) else { continue };
            let s = dot(e, other);
            if self.nearest[j].is_none_or(|(best, _)| s > best) {
                self.nearest[j] = Some((s, i));
            }
        }
    }

    /// Remove slot `i`; the last slot takes its index (as `Vec::swap_remove`).
    pub fn swap_remove(&mut self, i: usize) {
        if i >= self.embeddings.len() {
            return;
        }
        self.clear(i);
        let last = self.embeddings.len() - 1;
        self.embeddings.swap_remove(i);
        self.nearest.swap_remove(i);
        for (_, n) in self.nearest.iter_mut().flatten() {
            if *n == last {
                *n = i;
            }
        }
    }

    /// The most redundant slot: the highest similarity to its nearest neighbour (lowest index on
    /// ties); `None` while fewer than two slots are embedded.
    pub fn most_redundant(&self) -> Option<usize> {
        let mut best: Option<(f32, usize)> = None;
        for (i, nearest) in self.nearest.iter().enumerate() {
            if let Some((s, _)) = nearest
                && best.is_none_or(|(b, _)| *s > b)
            {
                best = Some((*s, i));
            }
        }
        best.map(|(_, i)| i)
    }

    /// Nearest embedded neighbour of slot `i` by a full pass.
    fn scan(&self, i: usize) -> Option<(f32, usize)> {
        let e = self.embeddings[i].as_deref()?;
        let mut best: Option<(f32, usize)> = None;
        for (j, other) in self.embeddings.iter().enumerate() {
            let Some(other) = other.as_deref().filter(|_| j != i) else { continue };
            let s = dot(e, other);
            if best.is_none_or(|(b, _)| s > b) {
                best = Some((s, j));
            }
        }
        best
    }

    /// Slots whose nearest neighbour was `i` (which changed or left) look again.
    fn rescan_neighbours_of(&mut self, i: usize) {
        for j in 0..self.nearest.len() {
            if self.nearest[j].is_some_and(|(_, n)| n == i) {
                self.nearest[j] = self.scan(j);
            }
        }
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(angle: f32) -> [f32; 2] {
        [angle.cos(), angle.sin()]
    }

    #[test]
    fn the_slot_closest_to_another_is_the_most_redundant_and_updates_match_a_rebuild() {
        let mut index = Redundancy::default();
        assert_eq!(index.most_redundant(), None);
        for (i, angle) in [0.0, 1.0, 2.0, 1.05, 3.0].into_iter().enumerate() {
            index.set(i, &unit(angle));
        }
        assert!(matches!(index.most_redundant(), Some(1 | 3)), "1.0 and 1.05 are the closest pair");
        index.set(3, &[2.0 * 3.0f32.cos(), 2.0 * 3.0f32.sin()]); // now a twin of slot 4 (normalised)
        assert!(matches!(index.most_redundant(), Some(3 | 4)));
        index.clear(4);
        let rebuilt = Redundancy::from_embeddings(index.embeddings().to_vec());
        assert_eq!(rebuilt.most_redundant(), index.most_redundant());
        let sims = |r: &Redundancy| r.nearest.iter().map(|n| n.map(|(s, _)| s)).collect::<Vec<_>>();
        assert_eq!(sims(&rebuilt), sims(&index));
        index.swap_remove(1); // slot 3 (the twin of nothing now) moves to 1
        let rebuilt = Redundancy::from_embeddings(index.embeddings().to_vec());
        assert_eq!(index.embeddings().len(), 4);
        assert_eq!((sims(&index), index.most_redundant()), (sims(&rebuilt), rebuilt.most_redundant()));
    }
}
