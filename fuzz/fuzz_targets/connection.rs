// SPDX-License-Identifier: MIT
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| gpa_fuzz::connection(data));
