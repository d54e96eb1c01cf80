//! Update encodings on the wire. All of them decode to one validated [`Update`].
//!
//! - [`EncodingKind::Dense`]: every `f32`.
//! - [`EncodingKind::RowSparse`]: only the rows a client touched (an embedding model touches a few
//!   item rows out of thousands), with their indices.
//! - [`EncodingKind::Quantized8`]: row-sparse or dense, each value stochastically rounded to a
//!   signed 8-bit code with one `f32` scale per row. Stochastic rounding keeps the decoded value
//!   unbiased (its expectation equals the original), so averages over many clients stay right.
//!
//! Decoding validates everything a peer could get wrong: the declared shape must equal the model's,
//! the size must be within the limit, rows must be in range and strictly increasing, lengths must
//! agree, and every value (and scale) must be finite.

use crate::update::{ModelShape, Update, UpdateError, check_rows};
use rand::RngExt;
use serde::{Deserialize, Serialize};

/// The encodings a client can send an update in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum EncodingKind {
    /// Every value as `f32`.
    Dense,
    /// Touched rows only, as `f32`.
    RowSparse,
    /// Touched rows only, 8-bit stochastic quantisation with a per-row scale.
    Quantized8,
}

/// An update as it travels on the wire.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum EncodedUpdate {
    /// Every value.
    Dense {
        /// Declared shape.
        shape: ModelShape,
        /// `shape.rows × shape.row_len` values.
        #[serde(with = "crate::codec::packed::vec")]
        values: Vec<f32>,
    },
    /// Only some rows.
    RowSparse {
        /// Declared shape.
        shape: ModelShape,
        /// Rows present, strictly increasing.
        #[serde(with = "crate::codec::packed::vec")]
        rows: Vec<u32>,
        /// `rows.len() × shape.row_len` values.
        #[serde(with = "crate::codec::packed::vec")]
        values: Vec<f32>,
    },
    /// Quantised rows: value = `code × scale[row position]`.
    Quantized8 {
        /// Declared shape.
        shape: ModelShape,
        /// Rows present (strictly increasing), or `None` for all rows.
        #[serde(with = "crate::codec::packed::opt_vec")]
        rows: Option<Vec<u32>>,
        /// One non-negative finite scale per row present.
        #[serde(with = "crate::codec::packed::vec")]
        scales: Vec<f32>,
        /// One code per value, in `-127..=127`.
        #[serde(with = "crate::codec::packed::vec")]
        codes: Vec<i8>,
    },
}

impl EncodedUpdate {
    /// Encodes `update` as `kind`. Quantisation draws its rounding from `rng`.
    ///
    /// A dense update encoded as row-sparse (or quantised) keeps only rows with a non-zero value.
    pub fn encode(update: &Update, kind: EncodingKind, rng: &mut dyn rand::Rng) -> Self {
        let shape = update.shape();
        match kind {
            EncodingKind::Dense => EncodedUpdate::Dense { shape, values: update.to_dense() },
            EncodingKind::RowSparse => {
                let (rows, values) = nonzero_rows(update);
                EncodedUpdate::RowSparse { shape, rows, values }
            }
            EncodingKind::Quantized8 => {
                let (rows, values) = nonzero_rows(update);
                let row_len = shape.row_len as usize;
                let mut scales = Vec::with_capacity(rows.len());
                let mut codes = Vec::with_capacity(values.len());
                for chunk in values.chunks_exact(row_len) {
                    let max = chunk.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                    let scale = if max > 0.0 { max / 127.0 } else { 0.0 };
                    scales.push(scale);
                    for &v in chunk {
                        codes.push(quantize(v, scale, rng));
                    }
                }
                EncodedUpdate::Quantized8 { shape, rows: Some(rows), scales, codes }
            }
        }
    }

    /// Which encoding this is.
    pub fn kind(&self) -> EncodingKind {
        match self {
            EncodedUpdate::Dense { .. } => EncodingKind::Dense,
            EncodedUpdate::RowSparse { .. } => EncodingKind::RowSparse,
            EncodedUpdate::Quantized8 { .. } => EncodingKind::Quantized8,
        }
    }

    /// The shape the sender declared.
    pub fn declared_shape(&self) -> ModelShape {
        match self {
            EncodedUpdate::Dense { shape, .. }
            | EncodedUpdate::RowSparse { shape, .. }
            | EncodedUpdate::Quantized8 { shape, .. } => *shape,
        }
    }

    /// Number of values carried (codes for quantised updates).
    pub fn value_count(&self) -> usize {
        match self {
            EncodedUpdate::Dense { values, .. } | EncodedUpdate::RowSparse { values, .. } => values.len(),
            EncodedUpdate::Quantized8 { codes, .. } => codes.len(),
        }
    }

    /// Validates and decodes into an [`Update`] for a model of shape `expected`, refusing
    /// updates of more than `max_values` values.
    pub fn decode(self, expected: ModelShape, max_values: usize) -> Result<Update, UpdateError> {
        let declared = self.declared_shape();
        if declared != expected {
            return Err(UpdateError::ShapeMismatch {
                got_rows: declared.rows,
                got_row_len: declared.row_len,
                want_rows: expected.rows,
                want_row_len: expected.row_len,
            });
        }
        let count = self.value_count();
        if count > max_values {
            return Err(UpdateError::TooLarge { got: count, limit: max_values });
        }
        match self {
            EncodedUpdate::Dense { shape, values } => Update::dense(shape, values),
            EncodedUpdate::RowSparse { shape, rows, values } => Update::sparse(shape, rows, values),
            EncodedUpdate::Quantized8 { shape, rows, scales, codes } => {
                let row_len = shape.row_len as usize;
                let n_rows = match &rows {
                    Some(r) => {
                        check_rows(shape, r)?;
                        r.len()
                    }
                    None => shape.rows as usize,
                };
                if scales.len() != n_rows {
                    return Err(UpdateError::LengthMismatch { expected: n_rows, got: scales.len() });
                }
                let expected_codes = n_rows * row_len;
                if codes.len() != expected_codes {
                    return Err(UpdateError::LengthMismatch { expected: expected_codes, got: codes.len() });
                }
                if let Some(position) = scales.iter().position(|s| !s.is_finite() || *s < 0.0) {
                    return Err(UpdateError::BadScale { position });
                }
                let mut values = Vec::with_capacity(codes.len());
                for (chunk, &scale) in codes.chunks_exact(row_len).zip(&scales) {
                    values.extend(chunk.iter().map(|&c| f32::from(c) * scale));
                }
                match rows {
                    Some(rows) => Update::sparse(shape, rows, values),
                    None => Update::dense(shape, values),
                }
            }
        }
    }
}

/// Stochastic rounding of `v / scale` to an integer code in `-127..=127`.
fn quantize(v: f32, scale: f32, rng: &mut dyn rand::Rng) -> i8 {
    if scale == 0.0 {
        return 0;
    }
    let q = (v / scale).clamp(-127.0, 127.0);
    let floor = q.floor();
    let frac = q - floor;
    let up = rng.random::<f32>() < frac;
    (floor + if up { 1.0 } else { 0.0 }).clamp(-127.0, 127.0) as i8
}

/// The rows of `update` holding at least one non-zero value, with their values.
fn nonzero_rows(update: &Update) -> (Vec<u32>, Vec<f32>) {
    let mut rows = Vec::new();
    let mut values = Vec::new();
    for (row, vals) in update.iter_rows() {
        if vals.iter().any(|&v| v != 0.0) {
            rows.push(row);
            values.extend_from_slice(vals);
        }
    }
    (rows, values)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn rng() -> rand_chacha::ChaCha8Rng {
        rand_chacha::ChaCha8Rng::seed_from_u64(7)
    }

    #[test]
    fn sparse_drops_zero_rows_and_round_trips() {
        let shape = ModelShape::new(3, 2).unwrap();
        let u = Update::dense(shape, vec![0.0, 0.0, 1.0, -2.0, 0.0, 0.0]).unwrap();
        let e = EncodedUpdate::encode(&u, EncodingKind::RowSparse, &mut rng());
        assert_eq!(e, EncodedUpdate::RowSparse { shape, rows: vec![1], values: vec![1.0, -2.0] });
        let d = e.decode(shape, 100).unwrap();
        assert_eq!(d.to_dense(), u.to_dense());
    }

    #[test]
    fn decode_checks_shape_size_and_scales() {
        let shape = ModelShape::new(3, 2).unwrap();
        let other = ModelShape::new(2, 3).unwrap();
        let e = EncodedUpdate::Dense { shape: other, values: vec![0.0; 6] };
        assert!(matches!(e.decode(shape, 100), Err(UpdateError::ShapeMismatch { .. })));
        let e = EncodedUpdate::Dense { shape, values: vec![0.0; 6] };
        assert_eq!(e.decode(shape, 5), Err(UpdateError::TooLarge { got: 6, limit: 5 }));
        let e = EncodedUpdate::Quantized8 {
            shape,
            rows: Some(vec![0]),
            scales: vec![f32::NAN],
            codes: vec![1, 2],
        };
        assert_eq!(e.decode(shape, 100), Err(UpdateError::BadScale { position: 0 }));
        let e = EncodedUpdate::Quantized8 { shape, rows: None, scales: vec![1.0; 3], codes: vec![1; 5] };
        assert_eq!(e.decode(shape, 100), Err(UpdateError::LengthMismatch { expected: 6, got: 5 }));
    }

    #[test]
    fn quantisation_is_bounded_and_unbiased() {
        let shape = ModelShape::new(1, 4).unwrap();
        let orig = vec![0.3f32, -1.27, 0.001, 0.9];
        let u = Update::dense(shape, orig.clone()).unwrap();
        let mut r = rng();
        let trials = 4000;
        let mut mean = [0.0f64; 4];
        for _ in 0..trials {
            let d = EncodedUpdate::encode(&u, EncodingKind::Quantized8, &mut r)
                .decode(shape, 100)
                .unwrap()
                .to_dense();
            for (i, (&a, &b)) in d.iter().zip(&orig).enumerate() {
                assert!((a - b).abs() <= 1.27 / 127.0 + 1e-6, "error beyond one step");
                mean[i] += f64::from(a) / f64::from(trials);
            }
        }
        for (m, &o) in mean.iter().zip(&orig) {
            assert!((m - f64::from(o)).abs() < 2e-3, "mean {m} vs {o}");
        }
    }
}
