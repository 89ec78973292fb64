//! REST query strings and form bodies (see reach_fuzz::form).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    reach_fuzz::form::params(data);
});
