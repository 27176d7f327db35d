//! `outpost-infer`: on-device ONNX inference. The model server arrives with its own issue;
//! until then the binary only says what it is.

fn main() {
    println!("outpost-infer {}", env!("CARGO_PKG_VERSION"));
}
