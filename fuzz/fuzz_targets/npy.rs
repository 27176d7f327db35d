//! `.npy` files (batch inputs): no header or payload may panic (an overflowing shape, a
//! truncated file), and what is read writes back (unless its shape needs a header longer
//! than a version 1.0 file holds) and reads again with the same shape and datatype.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_module::npy::{self, NpyError};

fuzz_target!(|data: &[u8]| {
    let Ok(t) = npy::read(data) else {
        return;
    };
    let bytes = match npy::write(&t) {
        Ok(b) => b,
        // Thousands of dimensions written out in full exceed the 64 KiB header of version 1.0.
        Err(NpyError::Header(_)) => return,
        Err(e) => panic!("a tensor read from .npy does not write back: {e}"),
    };
    let again = npy::read(&bytes).expect("what was written reads back");
    assert_eq!(again.shape(), t.shape());
    assert_eq!(again.datum_type(), t.datum_type());
});
