//! The presence engine and its outboxes driven by arbitrary sequences of socket, REST and
//! backplane events, read by model clients whose view must match the truth (see
//! reach_fuzz::engine).
#![no_main]

use arbitrary::{Arbitrary, Unstructured};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(script) = reach_fuzz::engine::Script::arbitrary_take_rest(Unstructured::new(data)) {
        reach_fuzz::engine::run(&script);
    }
});
