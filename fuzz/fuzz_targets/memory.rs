//! libFuzzer's entry point for the `memory` target ([`vublk_fuzz::memory`]).

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vublk_fuzz::memory::run(data));
