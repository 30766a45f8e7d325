#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = frostglass::fuzzing::sql_gate(data);
});
