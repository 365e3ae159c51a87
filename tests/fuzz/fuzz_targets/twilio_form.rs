#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| precall_fuzz_targets::twilio_form(data));
