//! `/score` request bodies (`{"data": [[...]]}`) parsed and turned into a tensor for each
//! datatype a model's input may have: no input may panic, and an accepted tensor has the
//! shape of the nesting. Needs no model (the model only supplies the datatype).
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_module::tensor::{SUPPORTED, DataType, data_tensor, parse_score_request};

fuzz_target!(|data: &[u8]| {
    let Ok(request) = parse_score_request(data) else {
        return;
    };
    for name in SUPPORTED.split(", ") {
        let dt = DataType::from_oip(name).expect("listed datatype");
        if let Ok(t) = data_tensor("input", dt, &request.data) {
            let shape = request.data.shape.as_deref().expect("accepted data has a shape");
            assert_eq!(t.shape(), shape);
            assert_eq!(t.datum_type(), dt.datum());
        }
    }
});
