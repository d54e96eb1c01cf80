//! Loader for the MovieLens ratings releases: `u.data` (ml-100k), `ratings.dat` (ml-1m, ml-10m)
//! and `ratings.csv` (ml-latest, ml-20m, ml-25m), with sparse ids remapped densely.

use super::Interaction;
use std::io::BufRead;
use std::path::{Path, PathBuf};

/// Why a ratings file could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A line does not have four tab- (or whitespace-) separated fields of the right types.
    #[error("{path}:{line}: {reason}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// The file holds no interactions.
    #[error("{0} holds no interactions")]
    Empty(PathBuf),
}

/// The interactions of a ratings file, with ids remapped densely: user `k` is the `k`-th smallest
/// user id in the file (`user_ids[k]`), and likewise for items. MovieLens-100K's ids are already
/// dense from 1, so there the remap is `id - 1`; the larger releases (ml-latest, ml-25m) skip
/// ids, and without the remap every missing id would be an "item" nobody ever interacted with.
#[derive(Clone, Debug, PartialEq)]
pub struct Ratings {
    /// Every row, in file order.
    pub interactions: Vec<Interaction>,
    /// Distinct users.
    pub n_users: u32,
    /// Distinct items.
    pub n_items: u32,
    /// The file's id of each dense user id.
    pub user_ids: Vec<u64>,
    /// The file's id of each dense item id.
    pub item_ids: Vec<u64>,
}

/// The formats [`parse`] reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `u.data`: `user<TAB>item<TAB>rating<TAB>timestamp` (any whitespace).
    Whitespace,
    /// `ratings.csv` (ml-latest, ml-20m, ml-25m, …): `userId,movieId,rating,timestamp`, with a
    /// header line.
    Csv,
    /// `ratings.dat` (ml-1m, ml-10m): `user::item::rating::timestamp`.
    DoubleColon,
}

impl Format {
    /// The format of a file whose first non-empty line is `line`.
    pub fn sniff(line: &str) -> Self {
        if line.contains("::") {
            Format::DoubleColon
        } else if line.contains(',') {
            Format::Csv
        } else {
            Format::Whitespace
        }
    }

    fn fields<'a>(&self, line: &'a str) -> Vec<&'a str> {
        match self {
            Format::Whitespace => line.split_whitespace().collect(),
            Format::Csv => line.split(',').map(str::trim).collect(),
            Format::DoubleColon => line.split("::").map(str::trim).collect(),
        }
    }
}

/// Loads a ratings file in any of the [`Format`]s (sniffed from its first line).
pub fn load(path: impl AsRef<Path>) -> Result<Ratings, LoadError> {
    let path = path.as_ref();
    let file = std::fs::File::open(path).map_err(|source| LoadError::Io { path: path.into(), source })?;
    parse(std::io::BufReader::new(file), path)
}

/// Parses ratings text from `reader` (format sniffed from the first non-empty line; a CSV header
/// is skipped); `path` is only used in error messages.
pub fn parse(reader: impl BufRead, path: &Path) -> Result<Ratings, LoadError> {
    let mut rows: Vec<(u64, u64, f32, i64)> = Vec::new();
    let mut format = None;
    for (i, line) in reader.lines().enumerate() {
        let line_no = i + 1;
        let line = line.map_err(|source| LoadError::Io { path: path.into(), source })?;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let bad = |reason: String| LoadError::Malformed { path: path.into(), line: line_no, reason };
        let f = *format.get_or_insert_with(|| Format::sniff(line));
        let fields = f.fields(line);
        if fields.len() != 4 {
            return Err(bad(format!("expected 4 fields, found {}", fields.len())));
        }
        if f == Format::Csv && rows.is_empty() && fields[0].parse::<u64>().is_err() {
            continue; // the header
        }
        let id = |s: &str, what: &str| s.parse::<u64>().map_err(|e| bad(format!("{what} id {s:?}: {e}")));
        let user = id(fields[0], "user")?;
        let item = id(fields[1], "item")?;
        let rating: f32 = fields[2].parse().map_err(|e| bad(format!("rating {:?}: {e}", fields[2])))?;
        if !rating.is_finite() {
            return Err(bad(format!("rating {:?} is not finite", fields[2])));
        }
        let timestamp: i64 = fields[3].parse().map_err(|e| bad(format!("timestamp {:?}: {e}", fields[3])))?;
        rows.push((user, item, rating, timestamp));
    }
    if rows.is_empty() {
        return Err(LoadError::Empty(path.into()));
    }
    let dense = |ids: Vec<u64>| -> (Vec<u64>, std::collections::HashMap<u64, u32>) {
        let mut ids = ids;
        ids.sort_unstable();
        ids.dedup();
        let map = ids.iter().enumerate().map(|(k, &id)| (id, k as u32)).collect();
        (ids, map)
    };
    let (user_ids, users) = dense(rows.iter().map(|r| r.0).collect());
    let (item_ids, items) = dense(rows.iter().map(|r| r.1).collect());
    if user_ids.len() > u32::MAX as usize || item_ids.len() > u32::MAX as usize {
        return Err(LoadError::Malformed { path: path.into(), line: 0, reason: "more than 2^32 ids".into() });
    }
    let interactions = rows
        .into_iter()
        .map(|(u, i, rating, timestamp)| Interaction { user: users[&u], item: items[&i], rating, timestamp })
        .collect();
    Ok(Ratings {
        interactions,
        n_users: user_ids.len() as u32,
        n_items: item_ids.len() as u32,
        user_ids,
        item_ids,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_reports_line_numbers() {
        let text = "1\t2\t5\t100\n3\t1\t4\t90\n\n";
        let r = parse(text.as_bytes(), Path::new("x")).unwrap();
        // Users 1 and 3 become 0 and 1; items 1 and 2 become 0 and 1.
        assert_eq!((r.n_users, r.n_items), (2, 2));
        assert_eq!(r.interactions[1], Interaction { user: 1, item: 0, rating: 4.0, timestamp: 90 });
        assert_eq!((r.user_ids.clone(), r.item_ids.clone()), (vec![1, 3], vec![1, 2]));
        let err = parse("1\t2\t5\t100\n1\tx\t3\t5\n".as_bytes(), Path::new("f")).unwrap_err();
        assert!(matches!(err, LoadError::Malformed { line: 2, .. }), "{err}");
        assert!(matches!(parse("1\t1\t1\n".as_bytes(), Path::new("f")), Err(LoadError::Malformed { .. })));
        assert!(matches!(parse("".as_bytes(), Path::new("f")), Err(LoadError::Empty(_))));
        assert!(matches!(
            parse("userId,movieId,rating,timestamp\n".as_bytes(), Path::new("f")),
            Err(LoadError::Empty(_))
        ));
        assert!(matches!(load("/definitely/missing/u.data"), Err(LoadError::Io { .. })));
        assert!(matches!(
            parse("1,2,NaN,5\n".as_bytes(), Path::new("f")),
            Err(LoadError::Malformed { line: 1, .. })
        ));
    }

    #[test]
    fn csv_and_dat_releases_are_read_and_sparse_ids_remapped_densely() {
        let csv = "userId,movieId,rating,timestamp\n7,318,4.5,1000\n7,100000,3.0,1001\n42,318,5.0,900\n";
        let r = parse(csv.as_bytes(), Path::new("ratings.csv")).unwrap();
        assert_eq!((r.n_users, r.n_items), (2, 2), "two users, two items: no phantom ids");
        assert_eq!(r.item_ids, vec![318, 100000]);
        assert_eq!(r.interactions[1], Interaction { user: 0, item: 1, rating: 3.0, timestamp: 1001 });
        assert_eq!(r.interactions[2].user, 1);
        let dat = "1::1193::5::978300760\n1::661::3::978302109\n";
        let r = parse(dat.as_bytes(), Path::new("ratings.dat")).unwrap();
        assert_eq!((r.n_users, r.n_items, r.item_ids.clone()), (1, 2, vec![661, 1193]));
        assert_eq!(r.interactions[0].item, 1);
        // A header anywhere but the top is an error, not skipped.
        let late = "7,318,4.5,1000\nuserId,movieId,rating,timestamp\n";
        assert!(matches!(parse(late.as_bytes(), Path::new("f")), Err(LoadError::Malformed { line: 2, .. })));
    }
}
