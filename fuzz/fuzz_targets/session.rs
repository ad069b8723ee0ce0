//! libFuzzer's entry point for the `session` target ([`vublk_fuzz::session`]).

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vublk_fuzz::session::run(data));
