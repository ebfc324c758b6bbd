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
/// memory as it is used, and hand freed pages back after 2 ms. On the 60 MB benchmark
/// dump (2 cores, `--connections 0`, 11 interleaved runs each: median wall, median and
/// largest peak RSS in KiB) 2 ms gives 0.175 s, 111,000 and 113,000; 10 ms 0.173 s,
/// 114,000 and 120,000 (the budget is 117,441: the faster the run, the more of what it
/// frees is still waiting); 1 ms 0.179 s and 110,000 / 111,000; purging at once 0.187 s
/// and 108,000 / 109,000. With the cross-check, 2 ms and 10 ms take the same time
/// (0.328 s) at 110,000 / 114,000 KiB.
extern "C" fn set_allocator_options() {
    // mimalloc's own environment variables still win.
    for (option, var, value) in [
        (
            MI_OPTION_ARENA_EAGER_COMMIT,
            "MIMALLOC_ARENA_EAGER_COMMIT",
            0,
        ),
        (MI_OPTION_PURGE_DELAY, "MIMALLOC_PURGE_DELAY", 2),
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
    let code = match lbaudit::cli::run(std::env::args_os()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("lbaudit: error: {e}");
            e.exit_code()
        }
    };
    let code = u8::try_from(code).unwrap_or(2);
    exit_now(code);
    std::process::ExitCode::from(code)
}

/// Ends the process at once with `code`, once stdout is flushed (stderr is not
/// buffered), without the allocator's clean-up at exit: mimalloc, linked statically,
/// collects and hands back every page it holds when the process ends (on the 60 MB
/// benchmark dump, 13 to 20 `madvise` calls and 2 to 3.5 ms after the report is
/// written), work the kernel does anyway as it takes the process's memory back.
#[cfg(unix)]
fn exit_now(code: u8) {
    use std::io::Write as _;
    if std::io::stdout().flush().is_ok() {
        // SAFETY: `_exit` ends the process; everything lbaudit wrote is flushed and
        // nothing else waits to run at exit (no files are left half-written: reports
        // and charts are written whole, then renamed into place).
        unsafe { libc::_exit(i32::from(code)) }
    }
}

#[cfg(not(unix))]
fn exit_now(_code: u8) {}
