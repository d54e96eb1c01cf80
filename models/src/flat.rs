//! The one bridge between burn modules and the protocol: a module's parameters as one flat `f32`
//! vector laid out on a [`ModelShape`], in both directions.
//!
//! Parameters are visited in declaration order, each tensor row-major, and concatenated; the
//! result is padded with zeros to whole rows of `row_len`. For matrix factorisation the global
//! module is the item table, so row `i` is item `i`. For the two-tower model the item table comes
//! first (rows `0..items`), followed by the shared dense weights packed into extra rows.
//! Loading keeps every parameter's id, device and `require_grad`, so optimizer state stays attached.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::prelude::*;
use starling_proto::update::{ModelShape, UpdateError};

/// Why a flat vector could not be loaded into a module.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum FlatError {
    /// The vector's length does not match the module's padded shape.
    #[error("flat vector has {got} values, module needs {want}")]
    Length {
        /// Values given.
        got: usize,
        /// Values needed (padded).
        want: usize,
    },
    /// A value is NaN or infinite.
    #[error("flat vector holds a non-finite value at {0}")]
    NonFinite(usize),
    /// The module has no parameters or `row_len` is zero.
    #[error(transparent)]
    Shape(#[from] UpdateError),
}

struct Count(usize);

impl ModuleVisitor for Count {
    fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
        self.0 += p.lazy_shape().num_elements();
    }
}

struct Flatten(Vec<f32>);

impl ModuleVisitor for Flatten {
    fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
        if let Ok(v) = p.val().into_data().try_into_vec::<f32>() {
            self.0.extend(v);
        }
    }
}

struct Unflatten<'a> {
    src: &'a [f32],
    pos: usize,
}

impl ModuleMapper for Unflatten<'_> {
    fn map_float<const D: usize>(&mut self, p: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let shape = p.lazy_shape();
        let n = shape.num_elements();
        let device = p.lazy_device();
        let values = self.src[self.pos..self.pos + n].to_vec();
        self.pos += n;
        let tensor = Tensor::from_data(TensorData::new(values, shape), &device);
        let id = p.id;
        p.transform_for_load(tensor, id)
    }
}

/// Number of float parameters in `module`.
pub fn param_count<M: Module>(module: &M) -> usize {
    let mut c = Count(0);
    module.visit(&mut c);
    c.0
}

/// The shape `module` occupies with rows of `row_len` (the last row zero-padded).
pub fn shape_of<M: Module>(module: &M, row_len: u32) -> Result<ModelShape, FlatError> {
    let n = param_count(module);
    let rows = n.div_ceil(row_len.max(1) as usize);
    Ok(ModelShape::new(u32::try_from(rows).unwrap_or(u32::MAX), row_len)?)
}

/// `module`'s parameters as a flat vector of `shape_of(module, row_len).len()` values.
pub fn to_flat<M: Module>(module: &M, row_len: u32) -> Result<Vec<f32>, FlatError> {
    let shape = shape_of(module, row_len)?;
    let mut f = Flatten(Vec::with_capacity(shape.len()));
    module.visit(&mut f);
    f.0.resize(shape.len(), 0.0);
    Ok(f.0)
}

/// Loads a flat vector (as produced by [`to_flat`]) back into `module`.
pub fn load_flat<M: Module>(module: M, row_len: u32, flat: &[f32]) -> Result<M, FlatError> {
    let shape = shape_of(&module, row_len)?;
    if flat.len() != shape.len() {
        return Err(FlatError::Length { got: flat.len(), want: shape.len() });
    }
    if let Some(i) = flat.iter().position(|v| !v.is_finite()) {
        return Err(FlatError::NonFinite(i));
    }
    Ok(module.map(&mut Unflatten { src: flat, pos: 0 }))
}
