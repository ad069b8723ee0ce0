//! libFuzzer's entry point for the `request` target ([`vublk_fuzz::request`]).

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vublk_fuzz::request::run(data));
