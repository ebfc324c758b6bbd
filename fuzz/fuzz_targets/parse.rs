//! The parser fuzz target: see `pipeline.rs` for what one input goes through.
//!
//! Traces (`lbaudit trace`) run only with LBAUDIT_FUZZ_TRACE=1: on some small inputs a
//! trace takes tens of seconds before giving up (fuzz/README.md, findings), which stalls
//! a run that is after panics.
#![no_main]

mod pipeline;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| pipeline::run(data, trace_enabled()));

fn trace_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("LBAUDIT_FUZZ_TRACE").is_some_and(|v| v == "1"))
}
