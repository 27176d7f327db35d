//! Open Inference Protocol request bodies (`POST /v2/models/{name}/infer`) parsed and turned
//! into tensors by what the request alone says, as the server does once the model accepts the
//! datatype and shape: no input may panic (an overflowing shape, an out-of-range value) and
//! an accepted tensor matches its declared shape and datatype. Needs no model.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_module::tensor::{DataType, parse_infer_request, request_tensor};

fuzz_target!(|data: &[u8]| {
    let Ok(request) = parse_infer_request(data) else {
        return;
    };
    for (index, input) in request.inputs.iter().enumerate() {
        if let Ok(t) = request_tensor(index, input) {
            let shape: Vec<usize> = input.shape.iter().map(|&d| d as usize).collect();
            assert_eq!(t.shape(), shape.as_slice());
            let dt = DataType::from_oip(&input.datatype).expect("accepted datatype");
            assert_eq!(t.datum_type(), dt.datum());
            assert_eq!(t.len(), input.data.values.len());
        }
    }
});
