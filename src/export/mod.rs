//! ONNX export of the teacher backbone and its verified publication.
//!
//! - [`onnx_pb`]: prost structs for the subset of `onnx.proto` we write (no `protoc` at build time).
//! - [`graph`]: [`ExportSpec`] + weights by name -> ONNX `ModelProto`.
//! - [`publish`]: write, check in ONNX Runtime against reference outputs, then atomically publish
//!   `latest.onnx`.

pub mod checkpoint;
pub mod graph;
pub mod onnx_pb;
pub mod publish;

pub use checkpoint::from_checkpoint;
pub use graph::{ExportSpec, NamedTensors, Tensor, build_model, export_bytes};
