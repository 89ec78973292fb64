//! Whole REST requests through the real router over a real SQLite file (see
//! reach_fuzz::request).
#![no_main]

use std::sync::LazyLock;

use arbitrary::{Arbitrary, Unstructured};
use reach_fuzz::request::{Call, Fixture};

static FIXTURE: LazyLock<Fixture> = LazyLock::new(Fixture::new);

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(call) = Call::arbitrary_take_rest(Unstructured::new(data)) {
        reach_fuzz::request::call(&FIXTURE, &call);
    }
});
