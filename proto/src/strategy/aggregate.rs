//! Aggregation rules: how one round's accepted updates become a single delta.

use super::{Aggregate, AggregateError, Aggregator};
use crate::update::{ModelShape, Update};

/// Which rule combines the round's updates.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub enum AggregationRule {
    /// Weighted mean `Σ wᵢΔᵢ / Σ wᵢ` (FedAvg). Streams in O(model size) memory.
    WeightedMean,
    /// Weighted mean per row over the clients that sent that row: `Σ_{i∋r} wᵢΔᵢ / Σ_{i∋r} wᵢ`.
    /// For sparse embedding updates this stops rows from shrinking by (clients touching it)/(all
    /// clients). Dense updates count for every row. Streams in O(model size) memory.
    RowWeightedMean,
    /// Coordinate-wise median (unweighted; robust to a minority of outliers). Holds every update.
    Median,
    /// Coordinate-wise trimmed mean (unweighted): drop the `⌊β·n⌋` largest and smallest values of
    /// each coordinate, average the rest. `β` in `[0, 0.5)`. Holds every update.
    TrimmedMean {
        /// Fraction trimmed from each end.
        beta: f64,
    },
}

impl AggregationRule {
    /// A fresh aggregator for a model of `shape`.
    pub fn aggregator(self, shape: ModelShape) -> Box<dyn Aggregator> {
        match self {
            AggregationRule::WeightedMean => Box::new(WeightedMean::new(shape, false)),
            AggregationRule::RowWeightedMean => Box::new(WeightedMean::new(shape, true)),
            AggregationRule::Median => Box::new(Coordinatewise::new(shape, None)),
            AggregationRule::TrimmedMean { beta } => Box::new(Coordinatewise::new(shape, Some(beta))),
        }
    }
}

pub(crate) fn check_weight(w: f64) -> Result<(), AggregateError> {
    if w.is_finite() && w > 0.0 { Ok(()) } else { Err(AggregateError::InvalidWeight(w)) }
}

pub(crate) fn check_shape(update: &Update, shape: ModelShape) -> Result<(), AggregateError> {
    if update.shape() != shape {
        return Err(AggregateError::ShapeMismatch { got: update.shape(), want: shape });
    }
    Ok(())
}

/// Streaming weighted mean, optionally per row.
#[derive(Debug)]
pub struct WeightedMean {
    shape: ModelShape,
    acc: Vec<f64>,
    row_weights: Option<Vec<f64>>,
    total_weight: f64,
    count: usize,
}

impl WeightedMean {
    /// A weighted mean over a model of `shape`; `per_row` selects [`AggregationRule::RowWeightedMean`].
    pub fn new(shape: ModelShape, per_row: bool) -> Self {
        Self {
            shape,
            acc: vec![0.0; shape.len()],
            row_weights: per_row.then(|| vec![0.0; shape.rows as usize]),
            total_weight: 0.0,
            count: 0,
        }
    }
}

impl Aggregator for WeightedMean {
    fn accept(&mut self, update: Update, weight: f64) -> Result<(), AggregateError> {
        check_shape(&update, self.shape)?;
        check_weight(weight)?;
        update.add_to(&mut self.acc, weight);
        if let Some(rw) = &mut self.row_weights {
            match update.rows() {
                Some(rows) => rows.iter().for_each(|&r| rw[r as usize] += weight),
                None => rw.iter_mut().for_each(|x| *x += weight),
            }
        }
        self.total_weight += weight;
        self.count += 1;
        Ok(())
    }

    fn accept_sum(&mut self, sum: Vec<f64>, contributors: usize) -> Result<(), AggregateError> {
        if sum.len() != self.acc.len() {
            return Err(AggregateError::ModelLength { got: sum.len(), want: self.acc.len() });
        }
        let weight = contributors as f64;
        for (a, s) in self.acc.iter_mut().zip(&sum) {
            *a += s;
        }
        if let Some(rw) = &mut self.row_weights {
            // A sum of dense vectors: every row had every contributor.
            rw.iter_mut().for_each(|x| *x += weight);
        }
        self.total_weight += weight;
        self.count += contributors;
        Ok(())
    }

    fn accepted(&self) -> usize {
        self.count
    }

    fn into_partial(self: Box<Self>) -> Result<super::PartialAggregate, AggregateError> {
        Ok(super::PartialAggregate {
            sum: self.acc,
            row_weights: self.row_weights,
            total_weight: self.total_weight,
            count: self.count as u64,
            centred_bits: 0.0,
        })
    }

    fn merge_partial(&mut self, p: super::PartialAggregate) -> Result<(), AggregateError> {
        p.check(self.acc.len(), self.row_weights.as_ref().map(Vec::len))?;
        super::partial::add_into(&mut self.acc, &p.sum);
        if let (Some(rw), Some(add)) = (&mut self.row_weights, &p.row_weights) {
            super::partial::add_into(rw, add);
        }
        self.total_weight += p.total_weight;
        self.count += p.count as usize;
        Ok(())
    }

    fn finish(self: Box<Self>, _rng: &mut dyn rand::Rng) -> Result<Aggregate, AggregateError> {
        if self.count == 0 {
            return Err(AggregateError::Empty);
        }
        let row_len = self.shape.row_len as usize;
        let delta: Vec<f32> = match &self.row_weights {
            None => self.acc.iter().map(|&a| (a / self.total_weight) as f32).collect(),
            Some(rw) => self
                .acc
                .chunks_exact(row_len)
                .zip(rw)
                .flat_map(|(row, &w)| row.iter().map(move |&a| if w > 0.0 { (a / w) as f32 } else { 0.0 }))
                .collect(),
        };
        if delta.iter().any(|v| !v.is_finite()) {
            return Err(AggregateError::NonFinite);
        }
        Ok(Aggregate { delta, contributors: self.count, total_weight: self.total_weight, privacy: None })
    }
}

/// Coordinate-wise median or trimmed mean. Holds all updates densely: O(n × model size).
#[derive(Debug)]
pub struct Coordinatewise {
    shape: ModelShape,
    trim: Option<f64>,
    updates: Vec<Vec<f32>>,
    total_weight: f64,
}

impl Coordinatewise {
    /// Median when `trim` is `None`, else trimmed mean with that β.
    pub fn new(shape: ModelShape, trim: Option<f64>) -> Self {
        Self { shape, trim, updates: Vec::new(), total_weight: 0.0 }
    }
}

impl Aggregator for Coordinatewise {
    fn accept(&mut self, update: Update, weight: f64) -> Result<(), AggregateError> {
        check_shape(&update, self.shape)?;
        check_weight(weight)?;
        self.updates.push(update.to_dense());
        self.total_weight += weight;
        Ok(())
    }

    fn accepted(&self) -> usize {
        self.updates.len()
    }

    fn finish(self: Box<Self>, _rng: &mut dyn rand::Rng) -> Result<Aggregate, AggregateError> {
        let n = self.updates.len();
        if n == 0 {
            return Err(AggregateError::Empty);
        }
        let cut = match self.trim {
            None => 0,
            Some(beta) => {
                if !(0.0..0.5).contains(&beta) {
                    return Err(AggregateError::Other(format!("trimmed-mean beta {beta} not in [0, 0.5)")));
                }
                let cut = (beta * n as f64).floor() as usize;
                if n <= 2 * cut {
                    return Err(AggregateError::TooFew { needed: 2 * cut + 1, got: n });
                }
                cut
            }
        };
        let len = self.shape.len();
        let mut delta = Vec::with_capacity(len);
        let mut column = vec![0.0f32; n];
        for j in 0..len {
            for (c, u) in column.iter_mut().zip(&self.updates) {
                *c = u[j];
            }
            column.sort_unstable_by(f32::total_cmp);
            let v = match self.trim {
                None => {
                    if n % 2 == 1 {
                        column[n / 2]
                    } else {
                        ((f64::from(column[n / 2 - 1]) + f64::from(column[n / 2])) / 2.0) as f32
                    }
                }
                Some(_) => {
                    let kept = &column[cut..n - cut];
                    (kept.iter().map(|&x| f64::from(x)).sum::<f64>() / kept.len() as f64) as f32
                }
            };
            delta.push(v);
        }
        Ok(Aggregate { delta, contributors: n, total_weight: self.total_weight, privacy: None })
    }
}
