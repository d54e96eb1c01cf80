//! Loader for the MovieLens `u.data` format: `user<TAB>item<TAB>rating<TAB>timestamp`, 1-based ids.

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

/// The interactions of a `u.data`-format file, with 0-based ids (`user - 1`, `item - 1`).
#[derive(Clone, Debug, PartialEq)]
pub struct Ratings {
    /// Every row, in file order.
    pub interactions: Vec<Interaction>,
    /// Largest user id + 1.
    pub n_users: u32,
    /// Largest item id + 1.
    pub n_items: u32,
}

/// Loads a `u.data`-format file.
pub fn load(path: impl AsRef<Path>) -> Result<Ratings, LoadError> {
    let path = path.as_ref();
    let file = std::fs::File::open(path).map_err(|source| LoadError::Io { path: path.into(), source })?;
    parse(std::io::BufReader::new(file), path)
}

/// Parses `u.data`-format text from `reader`; `path` is only used in error messages.
pub fn parse(reader: impl BufRead, path: &Path) -> Result<Ratings, LoadError> {
    let mut interactions = Vec::new();
    let (mut n_users, mut n_items) = (0u32, 0u32);
    for (i, line) in reader.lines().enumerate() {
        let line_no = i + 1;
        let line = line.map_err(|source| LoadError::Io { path: path.into(), source })?;
        if line.trim().is_empty() {
            continue;
        }
        let bad = |reason: String| LoadError::Malformed { path: path.into(), line: line_no, reason };
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() != 4 {
            return Err(bad(format!("expected 4 fields, found {}", fields.len())));
        }
        let id = |s: &str, what: &str| -> Result<u32, LoadError> {
            match s.parse::<u32>() {
                Ok(0) => Err(bad(format!("{what} id 0 (ids are 1-based)"))),
                Ok(v) => Ok(v - 1),
                Err(e) => Err(bad(format!("{what} id {s:?}: {e}"))),
            }
        };
        let user = id(fields[0], "user")?;
        let item = id(fields[1], "item")?;
        let rating: f32 = fields[2].parse().map_err(|e| bad(format!("rating {:?}: {e}", fields[2])))?;
        if !rating.is_finite() {
            return Err(bad(format!("rating {:?} is not finite", fields[2])));
        }
        let timestamp: i64 = fields[3].parse().map_err(|e| bad(format!("timestamp {:?}: {e}", fields[3])))?;
        n_users = n_users.max(user + 1);
        n_items = n_items.max(item + 1);
        interactions.push(Interaction { user, item, rating, timestamp });
    }
    if interactions.is_empty() {
        return Err(LoadError::Empty(path.into()));
    }
    Ok(Ratings { interactions, n_users, n_items })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_reports_line_numbers() {
        let text = "1\t2\t5\t100\n3\t1\t4\t90\n\n";
        let r = parse(text.as_bytes(), Path::new("x")).unwrap();
        assert_eq!((r.n_users, r.n_items), (3, 2));
        assert_eq!(r.interactions[1], Interaction { user: 2, item: 0, rating: 4.0, timestamp: 90 });
        let err = parse("1\t2\t5\t100\n1\tx\t3\t5\n".as_bytes(), Path::new("f")).unwrap_err();
        assert!(matches!(err, LoadError::Malformed { line: 2, .. }), "{err}");
        assert!(matches!(
            parse("0\t1\t1\t1\n".as_bytes(), Path::new("f")),
            Err(LoadError::Malformed { line: 1, .. })
        ));
        assert!(matches!(parse("1\t1\t1\n".as_bytes(), Path::new("f")), Err(LoadError::Malformed { .. })));
        assert!(matches!(parse("".as_bytes(), Path::new("f")), Err(LoadError::Empty(_))));
        assert!(matches!(load("/definitely/missing/u.data"), Err(LoadError::Io { .. })));
    }
}
