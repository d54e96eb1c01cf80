//! Runnable examples for Starling; each example is a file in this folder.
