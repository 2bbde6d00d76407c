//! libFuzzer's target: every input goes through the compiled core's fuzz entry.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    _core::fuzzing::fuzz_one(data);
});
