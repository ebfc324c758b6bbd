//! The command line: argument parsing, input, output, and error rendering.

use crate::audit::{Adjustment, AuditOptions};
use crate::balance::{self, Balancer, Candidate};
use crate::check::{self, CheckOptions};
use crate::error::{Error, InputError, Result};
use crate::eval::{self, Mode, Packet};
use crate::expect::Expectations;
use crate::graph::Graph;
use crate::model::{Ruleset, Warning};
use crate::parse::{self, ParseOptions};
use crate::report::{self, TextFormat, fmt_prob};
use crate::select::Selection;
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::borrow::Cow;
use std::io::{IsTerminal, Read, Write};
use std::net::IpAddr;

#[derive(Debug, Parser)]
#[command(
    name = "lbaudit",
    version,
    about = "Does this load balancer split traffic the way it should? Exact endpoint probabilities from iptables-save output.",
    after_help = "With no command, `report` runs. Input is a file, `-` for standard input, or piped standard input.\nExit codes: 0 pass, 1 a fairness check failed, 2 usage, input or I/O error."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Every load balancer's endpoints with their exact probabilities (the default command).
    Report(ReportArgs),
    /// The outcome distribution of one connection, with the chain path of each outcome.
    Trace(TraceArgs),
    /// Simulate new connections through the rules, connection by connection, the way the
    /// kernel decides, and test the counts (the report with a larger simulation).
    Simulate(ReportArgs),
    /// A fairness gate: exit 0 when every selected balancer passes, 1 when any fails.
    Check(CheckArgs),
    /// Charts: endpoints of one balancer, an overview of many, or a cascade (SVG or PNG).
    Plot(crate::plot::PlotArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CheckFormat {
    /// Failing balancers with reasons, then a summary line (the default).
    Text,
    /// JUnit XML: one testcase per balancer.
    Junit,
    /// A summary table for a pipeline's summary page.
    Markdown,
    /// The report JSON with a verdict per balancer and overall.
    Json,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub input: InputArgs,
    /// Largest allowed relative deviation of an endpoint's probability from the intended one.
    #[arg(long, value_name = "X", default_value_t = 1e-3)]
    pub max_skew: f64,
    /// Do not fail balancers where some traffic reaches no endpoint.
    #[arg(long)]
    pub allow_unmatched: bool,
    /// Significance level of the Monte-Carlo and counter tests (Holm-adjusted).
    #[arg(long, value_name = "A", default_value_t = 1e-3)]
    pub alpha: f64,
    /// Fail balancers with fewer endpoints than this.
    #[arg(long, value_name = "K", default_value_t = 0)]
    pub min_endpoints: usize,
    /// Output format.
    #[arg(long, short = 'f', value_enum, default_value_t = CheckFormat::Text)]
    pub format: CheckFormat,
    /// Write the formatted report to FILE; the text summary still goes to stdout.
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: Option<String>,
    #[command(flatten)]
    pub select: SelectArgs,
    #[command(flatten)]
    pub audit: AuditArgs,
}

/// The most simulated clients (`--clients`).
pub const MAX_CLIENTS: u64 = 100_000_000;

/// Monte-Carlo and counter tests.
#[derive(Debug, Args, Clone)]
pub struct AuditArgs {
    /// Simulated connections per balancer (`0` turns the simulation off). Default for
    /// `report`: a budget of 15,000,000 rule evaluations spread over the balancers.
    #[arg(long, value_name = "N")]
    pub connections: Option<u64>,
    /// Seed of the simulation (the same seed gives the same counts on any machine).
    #[arg(long, value_name = "S", default_value_t = crate::audit::DEFAULT_SEED)]
    pub seed: u64,
    /// Simulate K clients (each connection from one of them) so that session affinity
    /// can recognise returning clients.
    #[arg(long, value_name = "K")]
    pub clients: Option<u64>,
    /// Correction of p-values across balancers.
    #[arg(long, value_enum, default_value_t = Adjustment::Holm)]
    pub adjust: Adjustment,
    /// Do not test the counters of an `iptables-save -c` dump.
    #[arg(long)]
    pub no_observed: bool,
    /// Intended weights: a CSV of balancer-glob,endpoint,weight (default: uniform).
    #[arg(long, value_name = "FILE")]
    pub expect: Option<String>,
}

impl AuditArgs {
    /// The audit options, reading the expectations file if one is named.
    pub fn options(&self, default_connections: Option<u64>) -> Result<AuditOptions> {
        let expectations = match &self.expect {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
                    path: path.clone(),
                    source,
                })?;
                Some(Expectations::parse(&text, path)?)
            }
            None => None,
        };
        if self.clients.is_some_and(|k| k > MAX_CLIENTS) {
            return Err(Error::Usage(format!(
                "--clients: at most {MAX_CLIENTS} clients (each keeps its own affinity records)"
            )));
        }
        Ok(AuditOptions {
            connections: self.connections.or(default_connections),
            seed: self.seed,
            clients: self.clients,
            adjustment: self.adjust,
            observed: !self.no_observed,
            expectations,
            progress: std::io::stderr().is_terminal(),
            balancers: None,
            alpha: crate::stats::MC_DESIGN_ALPHA,
        })
    }
}

/// Where the rules come from and how strictly to read them.
#[derive(Debug, Args, Clone)]
pub struct InputArgs {
    /// iptables-save, `iptables -S` or `iptables-save | grep …` output; `-` for stdin.
    #[arg(value_name = "FILE")]
    pub file: Option<String>,
    /// Skip lines that cannot be parsed (with a warning each) instead of failing.
    #[arg(long)]
    pub lenient: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReportFormat {
    /// A readable table (the default).
    Table,
    Json,
    Csv,
    Markdown,
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    #[command(flatten)]
    pub input: InputArgs,
    /// Output format.
    #[arg(long, short = 'f', value_enum, default_value_t = ReportFormat::Table)]
    pub format: ReportFormat,
    #[command(flatten)]
    pub select: SelectArgs,
    #[command(flatten)]
    pub audit: AuditArgs,
}

/// Which balancers to look at.
#[derive(Debug, Args, Clone, Default)]
pub struct SelectArgs {
    /// Only balancers whose name or chain matches this glob (`*`, `?`); repeatable.
    #[arg(long, value_name = "GLOB")]
    pub balancer: Vec<String>,
    /// Only kube-proxy services of this namespace; repeatable.
    #[arg(long, value_name = "NS")]
    pub namespace: Vec<String>,
    /// Leave out balancers whose name or chain matches this glob; repeatable.
    #[arg(long, value_name = "GLOB")]
    pub exclude: Vec<String>,
}

#[derive(Debug, Args)]
pub struct TraceArgs {
    #[command(flatten)]
    pub input: InputArgs,
    /// Destination address, optionally with a port: `10.96.0.10:53`, `[fd00::1]:443`.
    #[arg(long, value_name = "IP[:PORT]")]
    pub dst: String,
    /// Protocol of the connection.
    #[arg(long, default_value = "tcp")]
    pub proto: String,
    /// Source address (left open when not given).
    #[arg(long, value_name = "IP[:PORT]")]
    pub src: Option<String>,
    /// Incoming interface.
    #[arg(long, value_name = "IFACE")]
    pub in_interface: Option<String>,
    /// The destination is an address of this node (for node ports).
    #[arg(long)]
    pub local: bool,
    /// Table to walk.
    #[arg(long, default_value = "nat")]
    pub table: String,
    /// Chain to start from (default: PREROUTING, or KUBE-SERVICES in a fragment).
    #[arg(long)]
    pub chain: Option<String>,
    /// Output format.
    #[arg(long, short = 'f', value_enum, default_value_t = ReportFormat::Table)]
    pub format: ReportFormat,
}

/// The input text, decoded, with its name.
pub struct Input {
    pub name: String,
    pub bytes: Bytes,
}

/// The input's bytes: read into memory, or (a large regular file on Unix) mapped.
pub enum Bytes {
    Read(Vec<u8>),
    #[cfg(unix)]
    Mapped(Mapped),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Read(v) => v,
            #[cfg(unix)]
            Bytes::Mapped(m) => m.as_slice(),
        }
    }
}

impl Input {
    /// Reads FILE, `-`, or piped stdin.
    pub fn read(file: Option<&str>) -> Result<Input> {
        match file {
            Some("-") => read_stdin(),
            Some(path) => read_file(path)
                .map(|bytes| Input {
                    name: path.to_string(),
                    bytes,
                })
                .map_err(|source| Error::Io {
                    path: path.to_string(),
                    source,
                }),
            None if !std::io::stdin().is_terminal() => read_stdin(),
            None => Err(Error::Usage(
                "no input: give a dump file, `-` for standard input, or pipe `iptables-save` into lbaudit"
                    .into(),
            )),
        }
    }
}

/// Files at least this large are mapped rather than read (Unix).
const MAP_MIN: u64 = 1 << 20;

/// Reads a whole file. A large regular file is mapped into memory instead (as ripgrep
/// does): no copy, no freshly zeroed pages, and the pages are brought in by the threads
/// that first read them. A smaller one, or one that cannot be mapped, is read into a
/// buffer backed by transparent huge pages where the kernel offers them on request.
fn read_file(path: &str) -> std::io::Result<Bytes> {
    use std::io::Read as _;
    let mut f = std::fs::File::open(path)?;
    let meta = f.metadata()?;
    #[cfg(unix)]
    if meta.is_file()
        && meta.len() >= MAP_MIN
        && let Some(m) = Mapped::new(&f, meta.len())
    {
        return Ok(Bytes::Mapped(m));
    }
    let size = usize::try_from(meta.len()).unwrap_or(0);
    let mut bytes = Vec::with_capacity(size + 1);
    crate::memory::advise_huge(&mut bytes);
    f.read_to_end(&mut bytes)?;
    Ok(Bytes::Read(bytes))
}

/// A read-only, private mapping of a whole file.
///
/// If another program truncates the file while lbaudit reads it, reading the vanished
/// pages raises SIGBUS and ends the process (with no partial output, as the report is
/// printed after the input is read); that is the price of mapping, which every reader
/// that maps files (ripgrep, git) pays.
#[cfg(unix)]
pub struct Mapped {
    ptr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is read-only and owned by this value; sharing `&[u8]` views of it
// between threads is as safe as sharing a `&[u8]` of a vector.
#[cfg(unix)]
unsafe impl Send for Mapped {}
#[cfg(unix)]
unsafe impl Sync for Mapped {}

#[cfg(unix)]
impl Mapped {
    /// Maps `len` bytes of `f`; `None` when the system declines (the caller reads).
    fn new(f: &std::fs::File, len: u64) -> Option<Mapped> {
        use std::os::fd::AsRawFd as _;
        let len = usize::try_from(len).ok()?;
        // SAFETY: a fresh read-only private mapping of an open file; the result is
        // checked before use and unmapped on drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                f.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return None;
        }
        // Pages the kernel reads in for the mapping then come in 2 MiB folios, which it
        // maps as huge pages (a file already cached keeps the folios it has: a freshly
        // written one mostly has large ones).
        // SAFETY: the mapping just made, of `len` bytes.
        unsafe { crate::memory::advise_huge_pages(ptr.cast(), len) };
        Some(Mapped { ptr, len })
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is a live mapping of `len` readable bytes owned by `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.cast::<u8>(), self.len) }
    }
}

#[cfg(unix)]
impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping made in `new`, once; no view outlives `self`.
        unsafe {
            libc::munmap(self.ptr, self.len);
        }
    }
}

fn read_stdin() -> Result<Input> {
    let mut bytes = Vec::new();
    std::io::stdin()
        .read_to_end(&mut bytes)
        .map_err(|source| Error::Io {
            path: "<stdin>".into(),
            source,
        })?;
    Ok(Input {
        name: "-".into(),
        bytes: Bytes::Read(bytes),
    })
}

/// Decodes input bytes, attaching the source name to errors.
pub fn decode<'b>(input: &'b Input, lenient: bool) -> Result<(Cow<'b, str>, Vec<Warning>)> {
    parse::decode(&input.bytes, lenient).map_err(|e| with_source(e, input, None))
}

fn with_source(e: InputError, input: &Input, text: Option<&str>) -> Error {
    let rendered = render_input_error(&e, &input.name, text);
    Error::Located { error: e, rendered }
}

/// Renders an input error with the offending line and a caret under the column.
pub fn render_input_error(e: &InputError, name: &str, text: Option<&str>) -> String {
    let mut s = format!("{name}:{}", e.line);
    if e.col > 0 {
        s.push_str(&format!(":{}", e.col));
    }
    s.push_str(&format!(": {}", e.message));
    if !e.text.is_empty() {
        s.push_str(&format!(" (at `{}`)", e.text.escape_debug()));
    }
    if let Some(line) = text.and_then(|t| t.lines().nth(e.line.saturating_sub(1) as usize)) {
        let line = line.trim_end_matches('\r');
        let shown: String = line.chars().take(160).collect();
        s.push_str(&format!("\n  | {shown}"));
        if e.col > 0 && (e.col as usize) <= 160 {
            let pad: String = line
                .chars()
                .take(e.col as usize - 1)
                .map(|c| if c == '\t' { '\t' } else { ' ' })
                .collect();
            s.push_str(&format!("\n  | {pad}^"));
        }
    }
    if !e.hint.is_empty() {
        s.push_str(&format!("\n  hint: {}", e.hint));
    }
    s
}

/// Parses and resolves; returns the ruleset, the graph's warnings and the balancers.
pub fn analyse<'t>(
    text: &'t str,
    input: &Input,
    lenient: bool,
    mut warnings: Vec<Warning>,
) -> Result<(Ruleset<'t>, Vec<Warning>)> {
    let rs = parse::parse(text, &ParseOptions { lenient })
        .map_err(|e| with_source(e, input, Some(text)))?;
    warnings.extend(rs.warnings.iter().cloned());
    Ok((rs, warnings))
}

/// Resolves the graph and lists the places that may be balancers, sorted as
/// balancers are listed.
pub fn candidates<'r, 'a>(
    rs: &'r Ruleset<'a>,
    text: &str,
    input: &Input,
    lenient: bool,
    warnings: &mut Vec<Warning>,
) -> Result<(Graph<'r, 'a>, Vec<Candidate<'a>>)> {
    // The balancers are listed while the graph's loops are looked for.
    let (graph, found) = Graph::build_with(rs, lenient, balance::candidates)
        .map_err(|e| with_source(e, input, Some(text)))?;
    warnings.extend(graph.warnings.iter().cloned());
    Ok((graph, found))
}

/// Runs the command line; returns the exit code.
pub fn run<I, T>(args: I) -> Result<i32>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let mut args: Vec<std::ffi::OsString> = args.into_iter().map(Into::into).collect();
    // `report` is the default command.
    let first = args.get(1).and_then(|a| a.to_str()).unwrap_or("");
    let known = [
        "report",
        "trace",
        "simulate",
        "check",
        "plot",
        "help",
        "-h",
        "--help",
        "-V",
        "--version",
    ];
    if !known.contains(&first) {
        args.insert(1.min(args.len()), "report".into());
    }
    let cli = match Cli::try_parse_from(&args) {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return Ok(code);
        }
    };
    match cli.command {
        Command::Report(a) => cmd_report(&a),
        Command::Trace(a) => cmd_trace(&a),
        Command::Simulate(a) => {
            let opts = a.audit.options(Some(1_000_000))?;
            print_report(&a.input, &a.select, &opts, a.format)?;
            Ok(0)
        }
        Command::Check(a) => cmd_check(&a),
        Command::Plot(a) => crate::plot::cmd_plot(&a),
    }
}

/// Is colour wanted on stdout?
pub fn color_stdout() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Writes the whole output at once (nothing partial on error).
pub fn emit(s: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(s.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        // A closed pipe (`lbaudit | head`) is not an error worth reporting.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(source) => Err(Error::Io {
            path: "<stdout>".into(),
            source,
        }),
    }
}

/// Writes to stdout through a buffer; a closed pipe is not an error.
pub fn emit_with(f: impl FnOnce(&mut dyn Write) -> std::io::Result<()>) -> Result<()> {
    // A small buffer: what is written in large pieces (a JSON report's batches, tens
    // of kilobytes each) then goes to stdout directly rather than through it.
    let mut out = std::io::BufWriter::with_capacity(1 << 13, std::io::stdout().lock());
    match f(&mut out).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(source) => Err(Error::Io {
            path: "<stdout>".into(),
            source,
        }),
    }
}

fn cmd_report(a: &ReportArgs) -> Result<i32> {
    let opts = a.audit.options(None)?;
    print_report(&a.input, &a.select, &opts, a.format)?;
    Ok(0)
}

/// Prints the report in `format` while its balancers are analysed, a window at a time,
/// never built as a whole (see `report::write_json_windowed` and
/// `report::write_text_windowed`).
fn print_report(
    input: &InputArgs,
    select: &SelectArgs,
    opts: &AuditOptions,
    format: ReportFormat,
) -> Result<()> {
    let text = match format {
        ReportFormat::Json => None,
        ReportFormat::Table => Some(TextFormat::Table {
            color: color_stdout(),
        }),
        ReportFormat::Csv => Some(TextFormat::Csv),
        ReportFormat::Markdown => Some(TextFormat::Markdown),
    };
    with_candidates(input, select, |input, rs, graph, chosen, warnings| {
        let window = report::default_window();
        let source = &input.name;
        emit_with(|w| match text {
            None => {
                report::write_json_windowed(w, source, rs, graph, chosen, opts, warnings, window)
            }
            Some(format) => report::write_text_windowed(
                w, format, source, rs, graph, chosen, opts, warnings, window,
            ),
        })
    })
}

fn cmd_check(a: &CheckArgs) -> Result<i32> {
    let skew_ok = a.max_skew.is_finite() && a.max_skew >= 0.0;
    if !(skew_ok && a.alpha > 0.0 && a.alpha < 1.0) {
        return Err(Error::Usage(
            "--max-skew must be >= 0 and --alpha between 0 and 1".into(),
        ));
    }
    let opts = AuditOptions {
        alpha: a.alpha,
        ..a.audit.options(Some(0))?
    };
    let check = CheckOptions {
        max_skew: a.max_skew,
        allow_unmatched: a.allow_unmatched,
        alpha: a.alpha,
        min_endpoints: a.min_endpoints,
    };
    let filtered = Selection::new(&a.select)?.is_filtered();
    let format = match a.format {
        CheckFormat::Text => check::Format::Text,
        CheckFormat::Junit => check::Format::Junit,
        CheckFormat::Markdown => check::Format::Markdown,
        CheckFormat::Json => check::Format::Json,
    };
    let color = color_stdout();
    // Balancers are checked and printed a window at a time (see `check::Stream`).
    let done = with_candidates(&a.input, &a.select, |input, rs, graph, chosen, warnings| {
        let window = report::default_window();
        let stdout_error = |source| Error::Io {
            path: "<stdout>".into(),
            source,
        };
        // Checks every balancer, the JSON written to `json` as it is made (errors in
        // writing it reported by `io`); a selection that matches none is a usage error.
        let check_to = |mut json: Option<&mut dyn Write>,
                        io: &dyn Fn(std::io::Error) -> Error|
         -> Result<check::Checked> {
            let done = crate::report::audited_windows(
                graph,
                chosen,
                &opts,
                window,
                "checking",
                |info| {
                    // (Reborrowed, the trait object's bound shortened to the borrow's.)
                    let json: Option<&mut dyn Write> = match &mut json {
                        Some(w) => Some(&mut **w),
                        None => None,
                    };
                    Ok(check::Stream::new(check.clone(), format, color, json, info))
                },
                |stream, batches| stream.window(batches),
            )
            .and_then(|stream| stream.finish(&input.name, rs, warnings))
            .map_err(io)?;
            if done.checked == 0 && filtered {
                return Err(Error::Usage(crate::select::NONE_MATCHED.into()));
            }
            // (The JSON of a check without balancers is written whole, here.)
            if let (Some(w), Some(f)) = (json, &done.formatted) {
                w.write_all(f.as_bytes()).map_err(io)?;
            }
            Ok(done)
        };
        if format != check::Format::Json {
            let done = check_to(None, &stdout_error)?;
            let formatted = done.formatted.as_deref().unwrap_or(&done.text);
            match &a.output {
                Some(path) => {
                    write_atomic(path, formatted.as_bytes())?;
                    emit(&done.text)?;
                }
                None => emit(formatted)?,
            }
            return Ok(done);
        }
        // The JSON is written as it is made, to the file or to stdout.
        match &a.output {
            Some(path) => {
                let mut file = AtomicFile::create(path)?;
                let io = |source| Error::Io {
                    path: path.clone(),
                    source,
                };
                let done = check_to(Some(&mut file), &io)?;
                file.commit()?;
                emit(&done.text)?;
                Ok(done)
            }
            None => {
                let mut out = Stdout::new();
                let done = check_to(Some(&mut out), &stdout_error)?;
                out.flush().map_err(stdout_error)?;
                Ok(done)
            }
        }
    })?;
    let tests = done.checked;
    if done.monte_carlo
        && !crate::stats::Budget::for_tests_at(tests, a.alpha).reaches(tests, a.alpha)
    {
        let most = crate::stats::MC_MAX_REPLICATES;
        eprintln!(
            "lbaudit: warning: --alpha {:e} over {tests} balancers: the small-count tests' Monte-Carlo p-values cannot go below 1/({most} + 1) ({most} samples at most), above the correction's smallest threshold alpha/{tests} = {:.3e}, so those tests cannot fail; use a larger --alpha or check fewer balancers (--balancer, --namespace)",
            a.alpha,
            a.alpha / tests as f64
        );
    }
    if done.checked == 0 {
        eprintln!("lbaudit: warning: no load balancers found in the input");
    }
    Ok(if done.failed == 0 { 0 } else { 1 })
}

/// Standard output through a buffer, for output written as it is made: once the
/// reader has gone (a closed pipe: `lbaudit check --format json | head`), the rest is
/// dropped without an error, so that the work and its exit code still complete.
struct Stdout {
    out: std::io::BufWriter<std::io::StdoutLock<'static>>,
    closed: bool,
}

impl Stdout {
    fn new() -> Self {
        Stdout {
            out: std::io::BufWriter::with_capacity(1 << 16, std::io::stdout().lock()),
            closed: false,
        }
    }

    /// `r`, or nothing written when the pipe closed.
    fn unless_closed<T>(&mut self, r: std::io::Result<T>, nothing: T) -> std::io::Result<T> {
        match r {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                self.closed = true;
                Ok(nothing)
            }
            r => r,
        }
    }
}

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.closed {
            return Ok(buf.len());
        }
        let r = self.out.write(buf);
        self.unless_closed(r, buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.closed {
            return Ok(());
        }
        let r = self.out.flush();
        self.unless_closed(r, ())
    }
}

/// A file written through a temporary file in the same folder, renamed over it once
/// complete ([`AtomicFile::commit`]), so that an error never leaves a half-written file
/// behind: dropped before that, the temporary file is removed.
pub struct AtomicFile {
    path: String,
    tmp: std::path::PathBuf,
    file: Option<std::io::BufWriter<std::fs::File>>,
}

impl AtomicFile {
    /// Starts writing `path`.
    pub fn create(path: &str) -> Result<AtomicFile> {
        let p = std::path::Path::new(path);
        let dir = p
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."));
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("out");
        let tmp = dir.join(format!(".{name}.lbaudit-{}.tmp", std::process::id()));
        let file = std::fs::File::create(&tmp).map_err(|source| Error::Io {
            path: path.to_string(),
            source,
        })?;
        Ok(AtomicFile {
            path: path.to_string(),
            tmp,
            file: Some(std::io::BufWriter::with_capacity(1 << 16, file)),
        })
    }

    /// An error in writing the file, as the CLI reports it.
    pub fn error(&self, source: std::io::Error) -> Error {
        Error::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// Puts the file in place.
    pub fn commit(mut self) -> Result<()> {
        let Some(file) = self.file.take() else {
            return Ok(());
        };
        // (Written out and closed before the rename.)
        let closed = file.into_inner().map_err(|e| e.into_error()).map(drop);
        closed
            .and_then(|()| std::fs::rename(&self.tmp, &self.path))
            .map_err(|e| self.error(e))
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &mut self.file {
            Some(f) => f.write(buf),
            None => Err(std::io::Error::other("file already committed")),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.as_mut().map_or(Ok(()), |f| f.flush())
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        // Not committed, or the rename failed: an error on the way.
        if self.file.take().is_some() || self.tmp.exists() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Writes a file through a temporary file in the same folder and a rename, so that an
/// error never leaves a half-written file behind.
pub fn write_atomic(path: &str, bytes: &[u8]) -> Result<()> {
    let mut file = AtomicFile::create(path)?;
    file.write_all(bytes).map_err(|e| file.error(e))?;
    file.commit()
}

/// Reads, parses and analyses the input, and hands the pieces to `f`.
pub fn with_analysis<T>(
    input_args: &InputArgs,
    select: &SelectArgs,
    f: impl FnOnce(&Input, &Ruleset<'_>, &Graph<'_, '_>, Vec<Balancer>, Vec<Warning>) -> Result<T>,
) -> Result<T> {
    with_candidates(input_args, select, |input, rs, graph, chosen, warnings| {
        let chosen = balance::analyse_all(graph, chosen);
        f(input, rs, graph, chosen, warnings)
    })
}

/// Reads and parses the input, resolves the graph, and hands `f` the candidates that
/// the selection keeps, unanalysed.
pub fn with_candidates<T>(
    input_args: &InputArgs,
    select: &SelectArgs,
    f: impl FnOnce(&Input, &Ruleset<'_>, &Graph<'_, '_>, &[Candidate], Vec<Warning>) -> Result<T>,
) -> Result<T> {
    let input = Input::read(input_args.file.as_deref())?;
    let (text, warnings) = decode(&input, input_args.lenient)?;
    let (rs, mut warnings) = analyse(&text, &input, input_args.lenient, warnings)?;
    let (graph, found) = candidates(&rs, &text, &input, input_args.lenient, &mut warnings)?;
    let selection = Selection::new(select)?;
    // (Without a selection every candidate is kept: none of their names is read again.)
    let chosen: Vec<Candidate> = if selection.is_filtered() {
        found
            .into_iter()
            .filter(|c| selection.matches_candidate(c))
            .collect()
    } else {
        found
    };
    let out = f(&input, &rs, &graph, &chosen, warnings);
    // Large inputs: leave the parsed rules and the input (its mapping: unmapped by the
    // process's exit, without the TLB shootdowns `munmap` needs while other threads
    // run) to the OS at exit.
    std::mem::forget(graph);
    std::mem::forget(rs);
    drop(text);
    std::mem::forget(input);
    out
}

/// `IP`, `IP:PORT`, `[v6]:PORT` or a bare IPv6 address.
pub fn parse_addr_port(s: &str) -> Option<(IpAddr, Option<u16>)> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some((ip, None));
    }
    if let Some(rest) = s.strip_prefix('[') {
        let (ip, port) = rest.split_once("]:")?;
        return Some((ip.parse().ok()?, Some(port.parse().ok()?)));
    }
    let (ip, port) = s.rsplit_once(':')?;
    Some((ip.parse().ok()?, Some(port.parse().ok()?)))
}

#[derive(serde::Serialize)]
struct TraceOutcome {
    outcome: String,
    probability: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    exact: Option<String>,
    path: Vec<String>,
    paths: u32,
}

#[derive(serde::Serialize)]
struct TraceReport {
    table: String,
    chain: String,
    connection: String,
    outcomes: Vec<TraceOutcome>,
    warnings: Vec<Warning>,
}

fn cmd_trace(a: &TraceArgs) -> Result<i32> {
    let (dst, dport) = parse_addr_port(&a.dst).ok_or_else(|| {
        Error::Usage(format!(
            "--dst {}: expected IP or IP:PORT (e.g. 10.96.0.10:53, [fd00::1]:443)",
            a.dst
        ))
    })?;
    let (src, sport) = match &a.src {
        Some(s) => {
            let (ip, port) = parse_addr_port(s)
                .ok_or_else(|| Error::Usage(format!("--src {s}: expected IP or IP:PORT")))?;
            (Some(ip), port)
        }
        None => (None, None),
    };
    let input = Input::read(a.input.file.as_deref())?;
    let (text, warnings) = decode(&input, a.input.lenient)?;
    let (rs, mut warnings) = analyse(&text, &input, a.input.lenient, warnings)?;
    let graph =
        Graph::build(&rs, a.input.lenient).map_err(|e| with_source(e, &input, Some(&text)))?;
    warnings.extend(graph.warnings.iter().cloned());
    let t = rs
        .tables
        .iter()
        .position(|t| t.name == a.table)
        .ok_or_else(|| {
            Error::Usage(format!(
                "table {} is not in the input (tables: {})",
                a.table,
                rs.tables
                    .iter()
                    .map(|t| t.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
    let chain_name = match &a.chain {
        Some(c) => c.clone(),
        None => ["PREROUTING", "OUTPUT", "KUBE-SERVICES"]
            .iter()
            .find(|n| {
                graph
                    .chain_index(t, n)
                    .is_some_and(|c| !rs.tables[t].chains[c].rules.is_empty())
            })
            .map(|s| s.to_string())
            .ok_or_else(|| {
                Error::Usage("no PREROUTING, OUTPUT or KUBE-SERVICES rules to start from; name a chain with --chain".into())
            })?,
    };
    let c = graph
        .chain_index(t, &chain_name)
        .ok_or_else(|| Error::Usage(format!("chain {chain_name} is not in table {}", a.table)))?;
    let packet = Packet {
        src,
        dst: Some(dst),
        proto: Some(eval::proto_name(&a.proto)),
        sport,
        dport,
        in_iface: a.in_interface.clone(),
        out_iface: None,
        dst_local: Some(a.local),
    };
    let dist = eval::evaluate(&graph, t, c, packet, Mode::Trace, true)
        .map_err(|e| Error::Usage(e.to_string()))?;
    warnings.extend(dist.warnings.iter().cloned());
    warnings.sort();
    warnings.dedup();
    let table = &rs.tables[t];
    let outcomes: Vec<TraceOutcome> = dist
        .outcomes
        .iter()
        .map(|o| TraceOutcome {
            outcome: o.outcome.label(),
            probability: o.prob.to_f64(),
            exact: o
                .prob
                .exact()
                .filter(|p| p.bits() < 1200)
                .map(ToString::to_string),
            path: o
                .path
                .iter()
                .map(|s| format!("{}:{}", table.chains[s.chain].name, s.line))
                .collect(),
            paths: o.paths,
        })
        .collect();
    let report = TraceReport {
        table: a.table.clone(),
        chain: chain_name,
        connection: format!(
            "{} {} -> {}",
            eval::proto_name(&a.proto),
            a.src.as_deref().unwrap_or("*"),
            a.dst
        ),
        outcomes,
        warnings,
    };
    let out = match a.format {
        ReportFormat::Json => serde_json::to_string_pretty(&report).expect("serialises") + "\n",
        ReportFormat::Csv => {
            let mut w = csv::Writer::from_writer(Vec::new());
            let _ = w.write_record(["outcome", "probability", "path"]);
            for o in &report.outcomes {
                let _ = w.write_record([
                    o.outcome.as_str(),
                    &o.probability.to_string(),
                    &o.path.join(" -> "),
                ]);
            }
            String::from_utf8(w.into_inner().unwrap_or_default()).unwrap_or_default()
        }
        ReportFormat::Table | ReportFormat::Markdown => {
            let md = a.format == ReportFormat::Markdown;
            let mut s = if md {
                "| outcome | probability | path |\n|---|---:|---|\n".to_string()
            } else {
                format!(
                    "{} from {} {}:\n",
                    report.connection, report.table, report.chain
                )
            };
            for o in &report.outcomes {
                if md {
                    s += &format!(
                        "| {} | {} | {} |\n",
                        o.outcome,
                        fmt_prob(o.probability),
                        o.path.join(" → ")
                    );
                } else {
                    s += &format!(
                        "  {:>16}  {}\n  {:>16}  via {}\n",
                        fmt_prob(o.probability),
                        o.outcome,
                        "",
                        if o.path.is_empty() {
                            "(no jump)".to_string()
                        } else {
                            o.path.join(" -> ")
                        }
                    );
                }
            }
            if !report.warnings.is_empty() {
                s += "warnings:\n";
                for w in &report.warnings {
                    s += &format!("  line {}: {}\n", w.line, w.message);
                }
            }
            s
        }
    };
    emit(&out)?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A large file is mapped, a small one read; both give the file's bytes.
    #[test]
    fn large_files_are_mapped_small_ones_read() {
        let dir = std::env::temp_dir().join(format!("lbaudit-map-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let line = b"-A KUBE-SVC-X -m statistic --mode random --probability 0.5 -j KUBE-SEP-Y\n";
        let large: Vec<u8> = line
            .iter()
            .copied()
            .cycle()
            .take(MAP_MIN as usize + 5 * line.len())
            .collect();
        for (name, bytes, mapped) in [("large", &large[..], true), ("small", &line[..], false)] {
            let path = dir.join(name);
            std::fs::write(&path, bytes).unwrap();
            let input = Input::read(path.to_str()).unwrap();
            assert_eq!(&*input.bytes, bytes, "{name}");
            assert_eq!(
                matches!(input.bytes, Bytes::Read(_)),
                !(mapped && cfg!(unix)),
                "{name}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
