//! Tensors as clients send them and as tract runs them.
//!
//! Owns the Open Inference Protocol (v2) JSON tensor forms (request and response), the
//! datatype names of that protocol, the flattening of nested JSON arrays, and the conversion
//! of checked values into tract [`Tensor`](tract_onnx::prelude::Tensor)s and back. Checking a request against a model's
//! inputs lives in [`crate::model`]; this module only knows about one tensor at a time.
//!
//! Layout: `request` (the JSON forms clients send, parsed and flattened), `datatype` (OIP
//! datatypes and the shapes that can exist), `convert` (values to tract tensors, checked),
//! `output` (tensors back to JSON), `binary` (the binary tensor data extension), `error` (what goes back as a 400, and which field).

pub mod binary;
mod convert;
mod datatype;
mod error;
mod output;
mod request;

pub use convert::{
    data_tensor, request_datatype, request_shape, request_tensor, tensor_from_scalars,
};
pub use datatype::{DataType, SUPPORTED, checked_len};
pub use error::{Origin, TensorError};
pub use output::{InferResponse, OutputData, ResponseOutput, nest, output_data};
pub use request::{
    FlatData, InferRequest, RequestInput, RequestOutput, Scalar, ScoreRequest, parse_infer_request,
    parse_score_request,
};
