//! The `lbaudit` binary: runs the library's command line and maps the result to an exit code.

// Parsing a large dump makes millions of small allocations; mimalloc is markedly
// faster at that than the system allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (position 15 of `mi_option_e` in both of the
/// mimalloc versions libmimalloc-sys ships; the Rust bindings lack the constant).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() -> std::process::ExitCode {
    // lbaudit is a short-lived process: never hand freed memory back to the OS only to
    // fault it in again (on a 60 MB dump that page clearing took half the run time).
    // SAFETY: sets a process-wide allocator option before any other thread exists.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    match lbaudit::cli::run(std::env::args_os()) {
        Ok(code) => std::process::ExitCode::from(u8::try_from(code).unwrap_or(2)),
        Err(e) => {
            eprintln!("lbaudit: error: {e}");
            std::process::ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2))
        }
    }
}
