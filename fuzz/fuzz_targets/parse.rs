//! The parser fuzz target: see `pipeline.rs` for what one input goes through.
#![no_main]

mod pipeline;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| pipeline::run(data));
