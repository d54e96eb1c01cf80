//! Model updates as the engine sees them: a validated delta to the global parameters.
//!
//! The global part of every model is viewed as one row-major matrix of `f32` described by a
//! [`ModelShape`]. An embedding table maps naturally onto it (one row per item); a model with
//! dense, non-row parameters appends them as extra rows (see `docs/protocol.md`).
//!
//! An [`Update`] is either dense (every coordinate) or row-sparse (only the rows a client touched).
//! Constructors validate everything — shape, row order, finiteness — so code that holds an
//! `Update` never has to check again.

use serde::{Deserialize, Serialize};

/// Shape of a model's global parameters, viewed as a `rows × row_len` matrix of `f32`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ModelShape {
    /// Number of rows (for an embedding table: the number of items, plus any extra rows).
    pub rows: u32,
    /// Number of `f32` values in each row (for an embedding table: its dimension).
    pub row_len: u32,
}

impl ModelShape {
    /// A shape of `rows × row_len`; both must be non-zero and the total must fit in memory limits
    /// of a 64-bit `usize`.
    pub fn new(rows: u32, row_len: u32) -> Result<Self, UpdateError> {
        if rows == 0 || row_len == 0 {
            return Err(UpdateError::EmptyShape);
        }
        Ok(Self { rows, row_len })
    }

    /// Total number of parameters.
    pub fn len(&self) -> usize {
        self.rows as usize * self.row_len as usize
    }

    /// Always false for a shape made by [`ModelShape::new`]; provided for clippy's `len` convention.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why an update was not accepted as well-formed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UpdateError {
    /// A shape with zero rows or zero-length rows.
    #[error("model shape must have at least one row and one column")]
    EmptyShape,
    /// The update's shape is not the model's.
    #[error("shape mismatch: update is {got_rows}x{got_row_len}, model is {want_rows}x{want_row_len}")]
    ShapeMismatch {
        /// Rows declared by the update.
        got_rows: u32,
        /// Row length declared by the update.
        got_row_len: u32,
        /// Rows of the model.
        want_rows: u32,
        /// Row length of the model.
        want_row_len: u32,
    },
    /// The number of values does not match the declared rows.
    #[error("expected {expected} values, got {got}")]
    LengthMismatch {
        /// Values implied by the shape and row list.
        expected: usize,
        /// Values present.
        got: usize,
    },
    /// A row index is outside the model.
    #[error("row {row} is out of range (model has {rows} rows)")]
    RowOutOfRange {
        /// The offending row index.
        row: u32,
        /// Rows in the model.
        rows: u32,
    },
    /// Row indices must be strictly increasing (sorted, no duplicates).
    #[error("row indices are not strictly increasing at position {position}")]
    RowsNotSorted {
        /// Position in the row list where the order breaks.
        position: usize,
    },
    /// A value is NaN or infinite.
    #[error("non-finite value at index {index}")]
    NonFinite {
        /// Index into the value array.
        index: usize,
    },
    /// The update is larger than the configured limit.
    #[error("update has {got} values, limit is {limit}")]
    TooLarge {
        /// Values in the update.
        got: usize,
        /// Configured maximum.
        limit: usize,
    },
    /// A quantisation scale is negative or not finite.
    #[error("invalid quantisation scale for row position {position}")]
    BadScale {
        /// Position of the row whose scale is invalid.
        position: usize,
    },
}

/// A validated delta to the global parameters: dense, or row-sparse.
#[derive(Clone, Debug, PartialEq)]
pub struct Update {
    shape: ModelShape,
    rows: Option<Vec<u32>>,
    values: Vec<f32>,
}

impl Update {
    /// A dense update: one value per parameter.
    pub fn dense(shape: ModelShape, values: Vec<f32>) -> Result<Self, UpdateError> {
        if values.len() != shape.len() {
            return Err(UpdateError::LengthMismatch { expected: shape.len(), got: values.len() });
        }
        check_finite(&values)?;
        Ok(Self { shape, rows: None, values })
    }

    /// A row-sparse update: `rows` strictly increasing, `values` holds `rows.len() * row_len`
    /// values, row after row. Rows not listed are zero.
    pub fn sparse(shape: ModelShape, rows: Vec<u32>, values: Vec<f32>) -> Result<Self, UpdateError> {
        check_rows(shape, &rows)?;
        let expected = rows.len() * shape.row_len as usize;
        if values.len() != expected {
            return Err(UpdateError::LengthMismatch { expected, got: values.len() });
        }
        check_finite(&values)?;
        Ok(Self { shape, rows: Some(rows), values })
    }

    /// An all-zero update (no rows).
    pub fn zero(shape: ModelShape) -> Self {
        Self { shape, rows: Some(Vec::new()), values: Vec::new() }
    }

    /// The model shape this update applies to.
    pub fn shape(&self) -> ModelShape {
        self.shape
    }

    /// The rows present, or `None` for a dense update.
    pub fn rows(&self) -> Option<&[u32]> {
        self.rows.as_deref()
    }

    /// The stored values (all of them for dense; the listed rows, in order, for sparse).
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// Whether every parameter is present.
    pub fn is_dense(&self) -> bool {
        self.rows.is_none()
    }

    /// Number of rows carried.
    pub fn row_count(&self) -> usize {
        match &self.rows {
            Some(r) => r.len(),
            None => self.shape.rows as usize,
        }
    }

    /// Iterates over `(row index, row values)` for the rows carried.
    pub fn iter_rows(&self) -> impl Iterator<Item = (u32, &[f32])> + '_ {
        let row_len = self.shape.row_len as usize;
        let rows = self.rows.as_deref();
        self.values.chunks_exact(row_len).enumerate().map(move |(i, chunk)| {
            let row = match rows {
                Some(r) => r[i],
                None => i as u32,
            };
            (row, chunk)
        })
    }

    /// L2 norm of the whole update, computed in `f64`.
    pub fn l2_norm(&self) -> f64 {
        self.values.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>().sqrt()
    }

    /// Multiplies every value by `factor` (which must be finite).
    pub fn scale(&mut self, factor: f32) {
        debug_assert!(factor.is_finite());
        for v in &mut self.values {
            *v *= factor;
        }
    }

    /// Adds `weight × self` into a dense accumulator of the model's length.
    ///
    /// # Panics
    /// If `acc.len()` differs from the shape's length (a programming error, not peer input).
    pub fn add_to(&self, acc: &mut [f64], weight: f64) {
        assert_eq!(acc.len(), self.shape.len(), "accumulator length must match the model shape");
        let row_len = self.shape.row_len as usize;
        for (row, vals) in self.iter_rows() {
            let start = row as usize * row_len;
            for (a, &v) in acc[start..start + row_len].iter_mut().zip(vals) {
                *a += weight * f64::from(v);
            }
        }
    }

    /// The dense view of this update.
    pub fn to_dense(&self) -> Vec<f32> {
        match &self.rows {
            None => self.values.clone(),
            Some(_) => {
                let mut out = vec![0.0f32; self.shape.len()];
                let row_len = self.shape.row_len as usize;
                for (row, vals) in self.iter_rows() {
                    let start = row as usize * row_len;
                    out[start..start + row_len].copy_from_slice(vals);
                }
                out
            }
        }
    }

    /// Consumes the update, returning `(rows, values)`.
    pub fn into_parts(self) -> (ModelShape, Option<Vec<u32>>, Vec<f32>) {
        (self.shape, self.rows, self.values)
    }
}

pub(crate) fn check_rows(shape: ModelShape, rows: &[u32]) -> Result<(), UpdateError> {
    for (i, &r) in rows.iter().enumerate() {
        if r >= shape.rows {
            return Err(UpdateError::RowOutOfRange { row: r, rows: shape.rows });
        }
        if i > 0 && rows[i - 1] >= r {
            return Err(UpdateError::RowsNotSorted { position: i });
        }
    }
    Ok(())
}

pub(crate) fn check_finite(values: &[f32]) -> Result<(), UpdateError> {
    // Branch-free over blocks (the compiler vectorises it: an exponent of all ones is NaN or ±∞);
    // the position is searched only when a block fails.
    const BLOCK: usize = 256;
    for (b, block) in values.chunks(BLOCK).enumerate() {
        let bad =
            block.iter().fold(0u32, |acc, v| acc | u32::from((v.to_bits() & 0x7f80_0000) == 0x7f80_0000));
        if bad != 0 {
            let index = b * BLOCK + block.iter().position(|v| !v.is_finite()).unwrap_or(0);
            return Err(UpdateError::NonFinite { index });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> ModelShape {
        ModelShape::new(4, 2).unwrap()
    }

    #[test]
    fn sparse_validation() {
        assert!(Update::sparse(shape(), vec![0, 2], vec![1.0; 4]).is_ok());
        assert_eq!(
            Update::sparse(shape(), vec![2, 2], vec![1.0; 4]),
            Err(UpdateError::RowsNotSorted { position: 1 })
        );
        assert_eq!(
            Update::sparse(shape(), vec![4], vec![1.0; 2]),
            Err(UpdateError::RowOutOfRange { row: 4, rows: 4 })
        );
        assert_eq!(
            Update::sparse(shape(), vec![1], vec![1.0; 3]),
            Err(UpdateError::LengthMismatch { expected: 2, got: 3 })
        );
        assert_eq!(
            Update::sparse(shape(), vec![1], vec![1.0, f32::NAN]),
            Err(UpdateError::NonFinite { index: 1 })
        );
        assert_eq!(
            Update::dense(shape(), vec![0.0; 7]),
            Err(UpdateError::LengthMismatch { expected: 8, got: 7 })
        );
    }

    #[test]
    fn dense_view_and_accumulate() {
        let u = Update::sparse(shape(), vec![1, 3], vec![1.0, 2.0, 3.0, 4.0]).unwrap();
        assert_eq!(u.to_dense(), vec![0.0, 0.0, 1.0, 2.0, 0.0, 0.0, 3.0, 4.0]);
        let mut acc = vec![0.0f64; 8];
        u.add_to(&mut acc, 0.5);
        assert_eq!(acc, vec![0.0, 0.0, 0.5, 1.0, 0.0, 0.0, 1.5, 2.0]);
        assert!((u.l2_norm() - 30f64.sqrt()).abs() < 1e-12);
    }
}
