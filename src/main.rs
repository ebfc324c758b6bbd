//! The `lbaudit` binary: runs the library's command line and maps the result to an exit code.

// Parsing a large dump makes millions of small allocations; mimalloc is markedly
// faster at that than the system allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    match lbaudit::cli::run(std::env::args_os()) {
        Ok(code) => std::process::ExitCode::from(u8::try_from(code).unwrap_or(2)),
        Err(e) => {
            eprintln!("lbaudit: error: {e}");
            std::process::ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2))
        }
    }
}
