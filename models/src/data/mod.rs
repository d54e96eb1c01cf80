//! Behaviour data: interactions, the MovieLens loader, the synthetic population, and the
//! leave-one-out split used by every evaluation.

pub mod events;
pub mod movielens;
pub mod synthetic;

/// One user–item interaction (0-based ids).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Interaction {
    /// The user.
    pub user: u32,
    /// The item.
    pub item: u32,
    /// Explicit rating, if any (implicit feedback ignores it).
    pub rating: f32,
    /// Seconds since the Unix epoch.
    pub timestamp: i64,
}

/// A leave-one-out split: per user, the latest interaction is held out for testing.
#[derive(Clone, Debug, PartialEq)]
pub struct LeaveOneOut {
    /// Number of users.
    pub n_users: u32,
    /// Number of items.
    pub n_items: u32,
    /// Per user, the training items, sorted and deduplicated.
    pub train: Vec<Vec<u32>>,
    /// Per user, the held-out test item (`None` for a user with fewer than two interactions).
    pub test: Vec<Option<u32>>,
}

impl LeaveOneOut {
    /// Splits `interactions`: per user the interaction with the latest timestamp is the test item,
    /// ties going to the larger item id; the rest is training data. Users with a single
    /// interaction keep it for training and have no test item.
    pub fn split(interactions: &[Interaction], n_users: u32, n_items: u32) -> Self {
        let mut per_user: Vec<Vec<(i64, u32)>> = vec![Vec::new(); n_users as usize];
        for x in interactions {
            if x.user < n_users && x.item < n_items {
                per_user[x.user as usize].push((x.timestamp, x.item));
            }
        }
        let mut train = Vec::with_capacity(n_users as usize);
        let mut test = Vec::with_capacity(n_users as usize);
        for mut rows in per_user {
            let held = if rows.len() >= 2 {
                let latest = rows.iter().copied().max().map(|(_, i)| i);
                // Remove exactly one occurrence of the latest (timestamp, item).
                if let Some(pos) = rows.iter().position(|&r| Some(r) == rows.iter().copied().max()) {
                    rows.swap_remove(pos);
                }
                latest
            } else {
                None
            };
            let mut items: Vec<u32> = rows.into_iter().map(|(_, i)| i).collect();
            items.sort_unstable();
            items.dedup();
            train.push(items);
            test.push(held);
        }
        Self { n_users, n_items, train, test }
    }

    /// Total training pairs.
    pub fn train_pairs(&self) -> usize {
        self.train.iter().map(Vec::len).sum()
    }

    /// How many times each item appears in the training data.
    pub fn item_counts(&self) -> Vec<u32> {
        let mut counts = vec![0u32; self.n_items as usize];
        for items in &self.train {
            for &i in items {
                counts[i as usize] += 1;
            }
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn x(user: u32, item: u32, timestamp: i64) -> Interaction {
        Interaction { user, item, rating: 1.0, timestamp }
    }

    #[test]
    fn latest_is_held_out_and_ties_go_to_the_larger_item() {
        let data = [x(0, 1, 10), x(0, 2, 30), x(0, 3, 20), x(1, 4, 50), x(1, 2, 50), x(1, 0, 1), x(2, 1, 5)];
        let s = LeaveOneOut::split(&data, 3, 5);
        assert_eq!(s.test, vec![Some(2), Some(4), None]);
        assert_eq!(s.train, vec![vec![1, 3], vec![0, 2], vec![1]]);
        assert_eq!(s.train_pairs(), 5);
        assert_eq!(s.item_counts(), vec![1, 2, 1, 1, 0]);
    }
}
