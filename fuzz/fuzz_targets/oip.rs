//! Open Inference Protocol request bodies (`POST /v2/models/{name}/infer`) parsed and turned
//! into tensors by what the request alone says, as the server does once the model accepts the
//! datatype and shape: no input may panic (an overflowing shape, an out-of-range value, binary
//! sizes that do not add up) and an accepted tensor matches its declared shape and datatype.
//! Bodies are tried whole as JSON, and split as the binary tensor data extension does (the
//! first byte is the JSON header's length). Needs no model.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use outpost_module::tensor::binary::{attach, split};
use outpost_module::tensor::{DataType, InferRequest, parse_infer_request, request_tensor};

fn check(request: &InferRequest) {
    for (index, input) in request.inputs.iter().enumerate() {
        if let Ok(t) = request_tensor(index, input) {
            let shape: Vec<usize> = input.shape.iter().map(|&d| d as usize).collect();
            assert_eq!(t.shape(), shape.as_slice());
            let dt = DataType::from_oip(&input.datatype).expect("accepted datatype");
            assert_eq!(t.datum_type(), dt.datum());
            match (&input.raw, &input.data) {
                (Some(raw), _) => assert_eq!(raw.len(), t.len() * dt.size()),
                (None, Some(data)) => assert_eq!(t.len(), data.values.len()),
                (None, None) => panic!("a tensor without data"),
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = parse_infer_request(data) {
        check(&request);
    }
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let body = Bytes::copy_from_slice(rest);
    let Ok((json, binary)) = split(&body, &n.to_string()) else {
        return;
    };
    if let Ok(mut request) = parse_infer_request(&json)
        && attach(&mut request, binary).is_ok()
    {
        check(&request);
    }
});
