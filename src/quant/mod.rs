//! The quantization simulator: fake-quantize a checkpoint's weights once at load (weight-only, as the
//! Core AI exporters do) so the oracle can predict a quantized bundle before it is exported.
pub mod apply;
pub mod kmeans;
pub mod linear;
pub mod locate;
pub mod scheme;
pub mod search;
pub mod sensitivity;
