//! The migration stream decoder on arbitrary input: errors, never panics.
#![no_main]

use drover_hypervisor::migration::wire::{read_frame, read_preamble};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut input = data;
    // Frames are also decoded without a preamble, to reach them with short inputs.
    let _ = read_preamble(&mut input);
    while read_frame(&mut input).is_ok() {}
});
