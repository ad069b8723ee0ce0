//! libFuzzer's entry point for the `inflight` target ([`vublk_fuzz::inflight`]).

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vublk_fuzz::inflight::run(data));
