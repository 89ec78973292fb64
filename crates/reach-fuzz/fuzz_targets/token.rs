//! Access tokens: the first byte picks raw text (any token a client could send in `hello`) or
//! structured claims signed here, whose verdict is checked against the rules (see
//! reach_fuzz::token).
#![no_main]

use std::sync::LazyLock;

use arbitrary::{Arbitrary, Unstructured};
use reach_gateway::auth::Credentials;

static CREDS: LazyLock<Credentials> = LazyLock::new(reach_fuzz::token::credentials);

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        reach_fuzz::token::raw(&CREDS, rest);
    } else if let Ok(t) = reach_fuzz::token::Token::arbitrary_take_rest(Unstructured::new(rest)) {
        reach_fuzz::token::signed(&CREDS, &t);
    }
});
