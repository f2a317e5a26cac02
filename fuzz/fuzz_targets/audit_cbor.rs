#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| containerssh::fuzzing::fuzz_audit_cbor(data));
