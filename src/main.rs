//! The `lbaudit` binary: runs the library's command line and maps the result to an exit code.

// Parsing a large dump makes millions of small allocations; mimalloc is markedly
// faster at that than the system allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_arena_eager_commit` and `mi_option_purge_delay` (positions 4
/// and 15 of `mi_option_e` in both of the mimalloc versions libmimalloc-sys ships; the
/// Rust bindings lack the constants).
const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Sets mimalloc's options before mimalloc starts: its own start-up runs as an ELF
/// constructor of priority 101 and reserves the first arena then, so options that
/// shape arenas must be set earlier, from a constructor of priority 100.
///
/// Peak memory is one of lbaudit's promises (at most twice the input): commit arena
/// memory as it is used, and hand freed pages back after 10 ms. On the 60 MB
/// benchmark dump (2 cores) `report --format json` then peaks at 106-110 MB with or
/// without the cross-check; after 50 ms it peaked anywhere from 110 to 118 MB (the
/// 63 MB dump with counters: 114-123 MB, past 2x) at the same CPU time. Never purging
/// peaked at 124 MB (146 MB with eager commit), and purging at once cost a third more
/// CPU in TLB shootdowns between the threads when the cross-check held every balancer.
extern "C" fn set_allocator_options() {
    // mimalloc's own environment variables still win.
    for (option, var, value) in [
        (
            MI_OPTION_ARENA_EAGER_COMMIT,
            "MIMALLOC_ARENA_EAGER_COMMIT",
            0,
        ),
        (MI_OPTION_PURGE_DELAY, "MIMALLOC_PURGE_DELAY", 10),
    ] {
        if std::env::var_os(var).is_none() {
            // SAFETY: runs before any other code of the process, on its only thread.
            unsafe { libmimalloc_sys::mi_option_set(option, value) };
        }
    }
}

#[cfg(target_os = "linux")]
#[used]
#[unsafe(link_section = ".init_array.00100")]
static SET_ALLOCATOR_OPTIONS: extern "C" fn() = set_allocator_options;

fn main() -> std::process::ExitCode {
    // Elsewhere (no ELF constructors), set them as early as Rust can.
    #[cfg(not(target_os = "linux"))]
    set_allocator_options();
    match lbaudit::cli::run(std::env::args_os()) {
        Ok(code) => std::process::ExitCode::from(u8::try_from(code).unwrap_or(2)),
        Err(e) => {
            eprintln!("lbaudit: error: {e}");
            std::process::ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2))
        }
    }
}
