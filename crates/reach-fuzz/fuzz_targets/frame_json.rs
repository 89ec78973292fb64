//! Client frames in the `reach.v1.json` encoding: any message payload decodes to a frame that
//! round-trips through both encodings, or to a documented refusal (see reach_fuzz::client_frame).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    reach_fuzz::client_frame(data, reach_proto::Encoding::Json);
});
