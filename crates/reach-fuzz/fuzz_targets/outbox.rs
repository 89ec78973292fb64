//! The per-connection outbox driven by arbitrary operation sequences and checked against a
//! model of its documented rules (see reach_fuzz::outbox).
#![no_main]

use arbitrary::{Arbitrary, Unstructured};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(script) = reach_fuzz::outbox::Script::arbitrary_take_rest(Unstructured::new(data)) {
        reach_fuzz::outbox::run(&script);
    }
});
