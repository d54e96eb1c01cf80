//! Starling's recommendation models. (Filled in by the models issue.)
