//! `lbaudit plot`: charts of the report, as SVG or PNG.
//!
//! Three charts:
//! - `endpoints`: one balancer's endpoints, as bars of their exact probabilities (up to a
//!   few dozen endpoints) or as a sorted deviation plot with the tolerance band (more);
//! - `overview`: every balancer's largest relative skew on a log scale, sorted, with the
//!   `--max-skew` line;
//! - `cascade`: one balancer's statistic rules, each rule's conditional probability
//!   `q/2^31` against the ideal `1/(n−i)`, and the effective deviation per endpoint.
//!
//! Everything is drawn in pixel coordinates with plotters' primitives so that the
//! layout (label sizes, label thinning, truncation) is decided here, from the measured
//! width of each text in the embedded font. Text in PNG files is drawn with that font
//! (DejaVu Sans, through ab_glyph: no system font libraries); SVG files name it and fall
//! back to the viewer's sans-serif. The same input and flags give byte-identical files.

use crate::audit;
use crate::balance::Balancer;
use crate::cli::{self, AuditArgs, InputArgs, SelectArgs};
use crate::error::{Error, Result};
use crate::graph::Graph;
use crate::report::{BalancerReport, Report, fmt_dev, fmt_prob};
use crate::select::Selection;
use crate::statistic::{self, Statistic};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{FontDesc, FontFamily, FontStyle, FontTransform, RGBAColor};
use std::cell::RefCell;
use std::collections::BTreeSet;
use std::path::Path;

/// DejaVu Sans 2.37 (licence in `src/font/LICENSE`), drawn into PNG files.
static FONT: &[u8] = include_bytes!("font/DejaVuSans.ttf");

/// The font family: registered under this name for PNG text, and written as the SVG
/// `font-family` (the embedded font's metrics, with the viewer's sans-serif as fallback).
const FAMILY: &str = "DejaVu Sans, sans-serif";

/// Skews below this are drawn at it on the overview's log axis (zero included).
pub const SKEW_FLOOR: f64 = 1e-12;

/// Past this many endpoints, `endpoints` draws the sorted deviation plot instead of bars.
pub const MAX_BARS: usize = 40;

/// Which chart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PlotKind {
    /// One balancer's endpoints: exact probabilities (bars), or sorted relative
    /// deviations past a few dozen endpoints (the default for one balancer).
    Endpoints,
    /// Every selected balancer's largest relative skew, sorted, on a log scale (the
    /// default for several balancers).
    Overview,
    /// One balancer's statistic rules: each rule's error against the ideal 1/(n−i) and
    /// the effective deviation of each endpoint.
    Cascade,
}

/// `lbaudit plot` arguments.
#[derive(Debug, clap::Args)]
pub struct PlotArgs {
    #[command(flatten)]
    pub input: InputArgs,
    /// Output file; the format follows the extension: `.svg` or `.png`.
    #[arg(short = 'o', long, value_name = "FILE")]
    pub output: String,
    /// Chart (default: `endpoints` for one balancer, `overview` for several).
    #[arg(long, value_enum)]
    pub kind: Option<PlotKind>,
    /// Width in pixels.
    #[arg(long, default_value_t = 1000)]
    pub width: u32,
    /// Height in pixels.
    #[arg(long, default_value_t = 600)]
    pub height: u32,
    /// Title (default: the balancer's name, or a description of the chart).
    #[arg(long)]
    pub title: Option<String>,
    /// Tolerance drawn on the charts: the largest allowed relative deviation.
    #[arg(long, value_name = "X", default_value_t = 1e-3)]
    pub max_skew: f64,
    #[command(flatten)]
    pub select: SelectArgs,
    #[command(flatten)]
    pub audit: AuditArgs,
}

/// Image format, from the output file's extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Svg,
    Png,
}

impl ImageFormat {
    /// `.svg` or `.png` (any case); `None` for anything else.
    pub fn from_path(path: &str) -> Option<Self> {
        let ext = Path::new(path).extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "svg" => Some(Self::Svg),
            "png" => Some(Self::Png),
            _ => None,
        }
    }
}

/// How large to draw, and what to mark.
#[derive(Debug, Clone, PartialEq)]
pub struct PlotOptions {
    pub width: u32,
    pub height: u32,
    pub title: Option<String>,
    pub max_skew: f64,
}

/// A balancer's row of the overview: its largest relative skew ([`largest_skew`]) and
/// its name.
pub type OverviewRow = (f64, String);

/// What a chart shows.
#[derive(Debug, Clone, Copy)]
pub enum Chart<'r> {
    /// `overview`: each balancer's row, in any order ([`overview_rows`]).
    Overview(&'r [OverviewRow]),
    /// `endpoints`: the report's first balancer.
    Endpoints(&'r Report),
    /// `cascade`: the report's first balancer and its statistic rules ([`cascade`]).
    Cascade(&'r Report, &'r [CascadeRule]),
}

/// The report's first balancer, which the charts of one balancer draw.
fn first(report: &Report) -> std::result::Result<&BalancerReport, PlotError> {
    (report.balancers.first()).ok_or_else(|| PlotError::Draw("no balancer to plot".into()))
}

/// The overview's rows of the report's balancers ([`Chart::Overview`]).
pub fn overview_rows(report: &Report) -> Vec<OverviewRow> {
    report.balancers.iter().map(overview_row).collect()
}

/// A balancer's row of the overview.
fn overview_row(b: &BalancerReport) -> OverviewRow {
    (largest_skew(b), b.name.clone())
}

/// One statistic rule of a balancer's chain, for the cascade chart.
#[derive(Debug, Clone, PartialEq)]
pub struct CascadeRule {
    /// Input line of the rule.
    pub line: u32,
    /// Probability that the rule matches a connection that reaches it: `q/2^31` for
    /// random mode (`1 − q/2^31` inverted), `1/N` for nth mode.
    pub conditional: f64,
    /// The stored threshold q (random mode).
    pub threshold: Option<u32>,
    /// The conditional probability that gives the intended split: `1/(n−i)` for rule i
    /// of a uniform cascade of n endpoints; `None` when no finite value exists (a rule
    /// that leads to endpoints earlier rules already served).
    pub ideal: Option<f64>,
    /// `conditional / ideal − 1`.
    pub relative_error: Option<f64>,
}

/// The statistic rules of a balancer's chain that lead to its endpoints, in order.
pub fn statistic_rules(graph: &Graph<'_, '_>, b: &Balancer) -> Vec<(u32, Statistic)> {
    let chain = graph.chain(b.table_index, b.chain_index);
    let all: Vec<(u32, Statistic)> = chain
        .rules
        .iter()
        .filter(|r| r.statistic())
        .filter_map(|r| {
            let rule = r.parse();
            let m = rule.find_match("statistic")?;
            statistic::from_match(m).ok().map(|s| (r.line, s))
        })
        .collect();
    let via: BTreeSet<u32> = b
        .endpoints
        .iter()
        .flat_map(|e| e.via.iter().copied())
        .collect();
    let on_path: Vec<(u32, Statistic)> = all
        .iter()
        .filter(|(line, _)| via.contains(line))
        .copied()
        .collect();
    if on_path.is_empty() {
        // Non-terminating cascades (MARK) do not lead through the rules that decide:
        // take the chain's statistic rules from the balancer's first one on.
        all.into_iter()
            .filter(|(line, _)| *line >= b.line)
            .collect()
    } else {
        on_path
    }
}

/// Each statistic rule with its conditional probability and the ideal one.
///
/// Rule j leads to the endpoints whose `via` holds its line (or, when none does, to
/// endpoint j). Its ideal conditional probability is the intended share of the
/// endpoints it leads to that no earlier rule served, over the intended share of all
/// endpoints no earlier rule served: `1/(n−j)` in a uniform kube-proxy cascade.
pub fn cascade(rules: &[(u32, Statistic)], b: &BalancerReport) -> Vec<CascadeRule> {
    let n = b.endpoints.len();
    let uniform = b.expected_split == "uniform";
    let weight = |i: usize| {
        if uniform {
            1.0
        } else {
            b.endpoints[i].expected
        }
    };
    let mut served = vec![false; n];
    let mut remaining: f64 = (0..n).map(weight).sum();
    rules
        .iter()
        .enumerate()
        .map(|(j, &(line, stat))| {
            let mut targets: Vec<usize> = (0..n)
                .filter(|&i| b.endpoints[i].via.contains(&line))
                .collect();
            if targets.is_empty() && j < n {
                targets.push(j);
            }
            let mass: f64 = targets
                .iter()
                .filter(|&&i| !served[i])
                .map(|&i| weight(i))
                .sum();
            let ideal = (mass > 0.0 && remaining > 0.0).then(|| mass / remaining);
            for &i in &targets {
                served[i] = true;
            }
            remaining -= mass;
            let conditional = stat.match_share();
            CascadeRule {
                line,
                conditional,
                threshold: match stat {
                    Statistic::Random { threshold, .. } => Some(threshold),
                    Statistic::Nth { .. } => None,
                },
                ideal,
                relative_error: ideal.map(|i| conditional / i - 1.0),
            }
        })
        .collect()
}

/// Runs `lbaudit plot`.
pub fn cmd_plot(a: &PlotArgs) -> Result<i32> {
    let format = ImageFormat::from_path(&a.output).ok_or_else(|| {
        Error::Usage(format!(
            "-o {}: the output must end in .svg or .png (the format follows the extension)",
            a.output
        ))
    })?;
    if !(200..=20_000).contains(&a.width)
        || !(150..=20_000).contains(&a.height)
        || u64::from(a.width) * u64::from(a.height) > 50_000_000
    {
        return Err(Error::Usage(format!(
            "--width {} --height {}: each must be from 200 (150 for the height) to 20000 pixels, and 50 million pixels at most in all",
            a.width, a.height
        )));
    }
    if !(a.max_skew.is_finite() && a.max_skew >= 0.0) {
        return Err(Error::Usage("--max-skew must be a number >= 0".into()));
    }
    let audit_opts = a.audit.options(Some(0))?;
    let filtered = Selection::new(&a.select)?.is_filtered();
    let opts = PlotOptions {
        width: a.width,
        height: a.height,
        title: a.title.clone(),
        max_skew: a.max_skew,
    };
    let none = || {
        Error::Usage(if filtered {
            crate::select::NONE_MATCHED.into()
        } else {
            "no load balancers found in the input: nothing to plot".into()
        })
    };
    let draw = |chart: &Chart<'_>| -> Result<i32> {
        let scratch = scratch_path(&a.output);
        let bytes = render(chart, &opts, format, &scratch).map_err(|e| match e {
            PlotError::TooSmall(m) => Error::Usage(m),
            PlotError::Draw(m) => Error::Io {
                path: a.output.clone(),
                source: std::io::Error::other(m),
            },
        })?;
        cli::write_atomic(&a.output, &bytes)?;
        Ok(0)
    };
    cli::with_candidates(&a.input, &a.select, |input, rs, graph, chosen, warnings| {
        if chosen.is_empty() {
            return Err(none());
        }
        // One balancer's chart: its report, with its audit.
        let one = |kind: PlotKind, balancers: Vec<Balancer>| -> Result<i32> {
            if balancers.len() > 1 {
                let names: Vec<&str> = balancers.iter().take(5).map(|b| b.name.as_str()).collect();
                return Err(Error::Usage(format!(
                    "--kind {} draws one balancer, and {} are selected ({}{}); choose one with --balancer GLOB",
                    kind_name(kind),
                    balancers.len(),
                    names.join(", "),
                    if balancers.len() > 5 { ", …" } else { "" }
                )));
            }
            let b = balancers.first().ok_or_else(none)?;
            if b.endpoints.is_empty() {
                return Err(Error::Usage(format!("{} has no endpoints to plot", b.name)));
            }
            let rules = if kind == PlotKind::Cascade {
                let rules = statistic_rules(graph, b);
                if rules.is_empty() {
                    return Err(Error::Usage(format!(
                        "--kind cascade: {} has no statistic rules (chain {})",
                        b.name, b.chain
                    )));
                }
                rules
            } else {
                Vec::new()
            };
            let (audits, info) = audit::run(graph, &balancers, &audit_opts);
            let report = Report::new(&input.name, rs, &balancers, Some(&audits), info, warnings);
            if kind == PlotKind::Cascade {
                draw(&Chart::Cascade(
                    &report,
                    &cascade(&rules, &report.balancers[0]),
                ))
            } else {
                draw(&Chart::Endpoints(&report))
            }
        };
        match a.kind {
            Some(kind @ (PlotKind::Endpoints | PlotKind::Cascade)) => {
                one(kind, crate::balance::analyse_all(graph, chosen))
            }
            // The overview (or, without --kind, one balancer's endpoints if only one
            // is found): each balancer's row, a window at a time, so that a large
            // dump's report is never held whole.
            _ => {
                let window = crate::report::default_window();
                let (rows, lone) =
                    overview_streamed(graph, chosen, &audit_opts, window).map_err(|source| {
                        Error::Io {
                            path: a.output.clone(),
                            source,
                        }
                    })?;
                match (rows.len(), lone) {
                    (0, _) => Err(none()),
                    (1, Some(b)) if a.kind.is_none() => one(PlotKind::Endpoints, vec![b]),
                    _ => draw(&Chart::Overview(&rows)),
                }
            }
        }
    })
}

/// The overview's rows of the candidates' balancers ([`overview_rows`] of their report,
/// in its order), analysed and audited `window` at a time; and the balancer if there is
/// only one. A row reads only the intended split from a balancer's audit, so neither a
/// simulation nor the counters' test is run for it.
fn overview_streamed(
    graph: &Graph<'_, '_>,
    candidates: &[crate::balance::Candidate],
    opts: &audit::AuditOptions,
    window: usize,
) -> std::io::Result<(Vec<OverviewRow>, Option<Balancer>)> {
    use rayon::prelude::*;
    let opts = audit::AuditOptions {
        connections: Some(0),
        observed: false,
        ..opts.clone()
    };
    crate::report::audited_windows(
        graph,
        candidates,
        &opts,
        window,
        "charting",
        |_| Ok((Vec::new(), None)),
        |(rows, lone): &mut (Vec<OverviewRow>, Option<Balancer>), batches| {
            if rows.is_empty()
                && let Some(b) = batches.iter().find_map(|(b, _)| b.first())
            {
                *lone = Some(b.clone());
            }
            let some: Vec<Vec<OverviewRow>> = batches
                .par_iter()
                .map(|(balancers, audits)| {
                    (balancers.iter().zip(audits))
                        .map(|(b, a)| overview_row(&BalancerReport::from_balancer(b, Some(a))))
                        .collect()
                })
                .collect();
            rows.extend(some.into_iter().flatten());
            if rows.len() > 1 {
                *lone = None;
            }
            Ok(())
        },
    )
}

fn kind_name(kind: PlotKind) -> &'static str {
    match kind {
        PlotKind::Endpoints => "endpoints",
        PlotKind::Overview => "overview",
        PlotKind::Cascade => "cascade",
    }
}

/// A PNG is encoded by plotters into a file: a hidden one beside the output.
fn scratch_path(output: &str) -> std::path::PathBuf {
    let p = Path::new(output);
    let dir = p
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("out");
    dir.join(format!(".{name}.lbaudit-{}.render.png", std::process::id()))
}

/// Renders `chart`. PNG images are encoded through the file `scratch` (which must end
/// in `.png`; it is removed again).
pub fn render(
    chart: &Chart<'_>,
    opts: &PlotOptions,
    format: ImageFormat,
    scratch: &Path,
) -> std::result::Result<Vec<u8>, PlotError> {
    register();
    let size = (opts.width, opts.height);
    match format {
        ImageFormat::Svg => {
            let mut svg = String::new();
            {
                let area = SVGBackend::with_string(&mut svg, size).into_drawing_area();
                draw_chart(&area, chart, opts, false)?;
                area.present().map_err(fail)?;
            }
            Ok(svg.into_bytes())
        }
        ImageFormat::Png => {
            struct Remove<'a>(&'a Path);
            impl Drop for Remove<'_> {
                fn drop(&mut self) {
                    let _ = std::fs::remove_file(self.0);
                }
            }
            let _remove = Remove(scratch);
            {
                let area = BitMapBackend::new(scratch, size).into_drawing_area();
                draw_chart(&area, chart, opts, true)?;
                area.present().map_err(fail)?;
            }
            std::fs::read(scratch).map_err(fail)
        }
    }
}

/// Registers the embedded font once.
fn register() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // The embedded font is a valid TrueType file; a test checks that text measures.
        let _ = plotters::style::register_font(FAMILY, FontStyle::Normal, FONT);
    });
}

/// Why a chart could not be drawn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlotError {
    /// The image is too small for the chart (a usage error).
    TooSmall(String),
    /// The backend failed (writing the PNG, a font problem).
    Draw(String),
}

impl std::fmt::Display for PlotError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PlotError::TooSmall(m) | PlotError::Draw(m) => f.write_str(m),
        }
    }
}

impl From<String> for PlotError {
    fn from(m: String) -> Self {
        PlotError::Draw(m)
    }
}

type Draw = std::result::Result<(), PlotError>;

fn fail(e: impl std::fmt::Display) -> PlotError {
    PlotError::Draw(e.to_string())
}

fn draw_chart<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    chart: &Chart<'_>,
    opts: &PlotOptions,
    png: bool,
) -> Draw {
    let canvas = Canvas::new(area, opts, png);
    canvas.draw_chart(chart)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Colours.

const INK: RGBColor = RGBColor(33, 33, 33);
const MUTED: RGBColor = RGBColor(96, 96, 96);
const GRID: RGBColor = RGBColor(226, 226, 226);
const FRAME: RGBColor = RGBColor(150, 150, 150);
const BAR: RGBColor = RGBColor(76, 132, 196);
const PASS: RGBColor = RGBColor(45, 105, 185);
const FAIL: RGBColor = RGBColor(205, 40, 40);
const ZERO: RGBColor = RGBColor(120, 120, 120);
const EXPECTED: RGBColor = RGBColor(20, 20, 20);
const SIMULATED: RGBColor = RGBColor(125, 45, 170);
const OBSERVED: RGBColor = RGBColor(225, 115, 0);
const BAND: RGBColor = RGBColor(60, 170, 90);
const RULE: RGBColor = RGBColor(210, 110, 20);

// ---------------------------------------------------------------------------------------
// Numbers as text.

/// A p-value: two significant digits.
fn fmt_p(p: f64) -> String {
    if p >= 0.01 {
        format!("{p:.2}")
    } else if p == 0.0 {
        "0".into()
    } else {
        format!("{p:.1e}")
    }
}

/// A skew (an absolute relative deviation), as the report writes deviations, unsigned.
fn fmt_skew(d: f64) -> String {
    let s = fmt_dev(d);
    s.strip_prefix('+')
        .map_or_else(|| s.clone(), str::to_string)
}

/// A whole number with thousands separators.
fn fmt_count(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A threshold as typed (`1e-3`, `0.05`).
fn fmt_threshold(x: f64) -> String {
    if x == 0.0 {
        return "0".into();
    }
    let e = x.abs().log10().floor() as i32;
    if (-2..=3).contains(&e) {
        let s = format!("{x}");
        if s.len() <= 8 {
            return s;
        }
    }
    let m = x / 10f64.powi(e);
    let ms = format!("{m:.3}");
    let ms = ms.trim_end_matches('0').trim_end_matches('.');
    format!("{ms}e{e}")
}

/// Tick positions: multiples of a step of 1, 2 or 5 × 10^k, at most about `max` of them.
fn ticks(lo: f64, hi: f64, max: usize, integer: bool) -> (Vec<f64>, f64) {
    let range = (hi - lo).max(f64::MIN_POSITIVE);
    let raw = range / max.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let mut step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw * (1.0 - 1e-9))
        .unwrap_or(10.0 * mag);
    if integer {
        step = step.max(1.0).round();
    }
    let first = (lo / step - 1e-9).ceil() as i64;
    let last = (hi / step + 1e-9).floor() as i64;
    ((first..=last).map(|k| k as f64 * step).collect(), step)
}

/// A tick label: fixed decimals for ordinary magnitudes, `4e-3` style for small ones.
fn fmt_tick(v: f64, step: f64, max_abs: f64) -> String {
    if v.abs() < step * 1e-6 {
        return "0".into();
    }
    let step_exp = (step.log10() + 1e-9).floor() as i32;
    let max_exp = (max_abs.max(step).log10() + 1e-9).floor() as i32;
    if step_exp >= -3 && max_exp < 6 {
        let d = (-step_exp).max(0) as usize;
        minus(format!("{v:.d$}"))
    } else {
        // Each tick with its own exponent: 5e-4, 1e-3, 1.5e-3.
        let e = (v.abs().log10() + 1e-9).floor() as i32;
        let d = (e - step_exp).max(0) as usize;
        let m = format!("{:.d$}", v / 10f64.powi(e));
        let m = if m.contains('.') {
            m.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            m
        };
        minus(format!("{m}e{e}"))
    }
}

/// A typographic minus sign in front of a negative tick label.
fn minus(s: String) -> String {
    match s.strip_prefix('-') {
        Some(rest) => format!("\u{2212}{rest}"),
        None => s,
    }
}

/// A power of ten as a label: `1e-6`, `0.01`, `1`, `100`.
fn fmt_decade(e: i32) -> String {
    match e {
        -2 => "0.01".into(),
        -1 => "0.1".into(),
        0..=3 => 10u32.pow(e as u32).to_string(),
        _ => format!("1e{e}"),
    }
}

// ---------------------------------------------------------------------------------------
// Font metrics, read from the embedded font's own tables.
//
// plotters' ab_glyph text places each glyph at the pen position without its side
// bearing (and rounds the pen to whole pixels), which makes PNG text look uneven. PNG
// text is therefore drawn glyph by glyph at positions computed here; the same advance
// widths measure every text of both formats, so that the layout is the same.

/// Advance widths and left side bearings of the embedded font.
struct Metrics {
    /// Ascender minus descender (hhea), in font units: ab_glyph scales this to the
    /// pixel size.
    height: f64,
    ascent: f64,
    /// cmap groups: (first char, last char, first glyph).
    groups: Vec<(u32, u32, u32)>,
    /// hmtx: (advance, left side bearing) per glyph.
    hmetrics: Vec<(u16, i16)>,
    /// Where the glyph outlines are: loca, its format (long offsets or not), glyf.
    loca: usize,
    long_loca: bool,
    glyf: usize,
}

fn be16(d: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*d.get(at)?, *d.get(at + 1)?]))
}

fn be32(d: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes([
        *d.get(at)?,
        *d.get(at + 1)?,
        *d.get(at + 2)?,
        *d.get(at + 3)?,
    ]))
}

impl Metrics {
    fn get() -> &'static Metrics {
        static M: std::sync::OnceLock<Metrics> = std::sync::OnceLock::new();
        M.get_or_init(|| {
            Metrics::parse(FONT).expect("the embedded font has cmap, hhea and hmtx tables")
        })
    }

    fn parse(d: &[u8]) -> Option<Metrics> {
        let tables = be16(d, 4)? as usize;
        let table = |tag: &[u8; 4]| -> Option<usize> {
            (0..tables).find_map(|i| {
                let r = 12 + 16 * i;
                (d.get(r..r + 4)? == tag).then(|| be32(d, r + 8).map(|o| o as usize))?
            })
        };
        let hhea = table(b"hhea")?;
        let ascent = f64::from(be16(d, hhea + 4)? as i16);
        let descent = f64::from(be16(d, hhea + 6)? as i16);
        let n_metrics = be16(d, hhea + 34)? as usize;
        let hmtx = table(b"hmtx")?;
        let hmetrics = (0..n_metrics)
            .map(|i| Some((be16(d, hmtx + 4 * i)?, be16(d, hmtx + 4 * i + 2)? as i16)))
            .collect::<Option<Vec<_>>>()?;
        let cmap = table(b"cmap")?;
        let mut groups = None;
        let mut bmp = None;
        for i in 0..be16(d, cmap + 2)? as usize {
            let r = cmap + 4 + 8 * i;
            let (platform, encoding) = (be16(d, r)?, be16(d, r + 2)?);
            let sub = cmap + be32(d, r + 4)? as usize;
            match (platform, encoding, be16(d, sub)?) {
                (3, 10, 12) | (0, 4, 12) if groups.is_none() => {
                    let n = be32(d, sub + 12)? as usize;
                    groups = (0..n)
                        .map(|g| {
                            let at = sub + 16 + 12 * g;
                            Some((be32(d, at)?, be32(d, at + 4)?, be32(d, at + 8)?))
                        })
                        .collect::<Option<Vec<_>>>();
                }
                (3, 1, 4) | (0, 3, 4) if bmp.is_none() => bmp = Some(sub),
                _ => {}
            }
        }
        let groups = match (groups, bmp) {
            (Some(g), _) => g,
            (None, Some(sub)) => format4_groups(d, sub)?,
            _ => return None,
        };
        let head = table(b"head")?;
        Some(Metrics {
            height: ascent - descent,
            ascent,
            groups,
            hmetrics,
            loca: table(b"loca")?,
            long_loca: be16(FONT, head + 50)? == 1,
            glyf: table(b"glyf")?,
        })
    }

    fn glyph(&self, c: char) -> usize {
        let c = c as u32;
        let i = self.groups.partition_point(|g| g.1 < c);
        match self.groups.get(i) {
            Some(&(first, _, g)) if first <= c => (g + c - first) as usize,
            _ => 0,
        }
    }

    /// (advance, left side bearing) of a char in pixels at a font size.
    fn h(&self, c: char, size: f64) -> (f64, f64) {
        let g = self.glyph(c);
        let (adv, _) = self.hmetrics[g.min(self.hmetrics.len() - 1)];
        let lsb = match self.hmetrics.get(g) {
            Some(&(_, lsb)) => lsb,
            None => 0,
        };
        let k = size / self.height;
        (f64::from(adv) * k, f64::from(lsb) * k)
    }

    /// The top of a glyph's outline (yMax, font units above the baseline); `None` for a
    /// glyph without outline.
    fn top(&self, g: usize) -> Option<i16> {
        let d = FONT;
        let (start, end) = if self.long_loca {
            (be32(d, self.loca + 4 * g)?, be32(d, self.loca + 4 * g + 4)?)
        } else {
            (
                u32::from(be16(d, self.loca + 2 * g)?) * 2,
                u32::from(be16(d, self.loca + 2 * g + 2)?) * 2,
            )
        };
        (end > start).then_some(())?;
        be16(d, self.glyf + start as usize + 8).map(|v| v as i16)
    }

    fn width(&self, text: &str, size: f64) -> f64 {
        text.chars().map(|c| self.h(c, size).0).sum()
    }
}

/// A cmap format 4 subtable as (first, last, first glyph) runs of consecutive glyphs.
fn format4_groups(d: &[u8], sub: usize) -> Option<Vec<(u32, u32, u32)>> {
    let segs = be16(d, sub + 6)? as usize / 2;
    let ends = sub + 14;
    let starts = ends + 2 * segs + 2;
    let deltas = starts + 2 * segs;
    let offsets = deltas + 2 * segs;
    let mut out: Vec<(u32, u32, u32)> = Vec::new();
    for s in 0..segs {
        let (end, start) = (be16(d, ends + 2 * s)?, be16(d, starts + 2 * s)?);
        let delta = be16(d, deltas + 2 * s)?;
        let ro = be16(d, offsets + 2 * s)? as usize;
        for c in start..=end {
            if c == 0xFFFF {
                break;
            }
            let g = if ro == 0 {
                c.wrapping_add(delta)
            } else {
                let at = offsets + 2 * s + ro + 2 * (c - start) as usize;
                match be16(d, at)? {
                    0 => 0,
                    g => g.wrapping_add(delta),
                }
            };
            let (c, g) = (u32::from(c), u32::from(g));
            match out.last_mut() {
                Some(last) if last.1 + 1 == c && last.2 + (c - last.0) == g => last.1 = c,
                _ if g != 0 => out.push((c, c, g)),
                _ => {}
            }
        }
    }
    Some(out)
}

// ---------------------------------------------------------------------------------------
// The canvas: text measured and placed by us, every text box recorded.

/// A drawn text's box, in pixels (for the layout tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextBox {
    pub x0: i32,
    pub y0: i32,
    pub x1: i32,
    pub y1: i32,
    pub text: String,
}

impl TextBox {
    fn overlaps(&self, o: &TextBox) -> bool {
        self.x0 < o.x1 && o.x0 < self.x1 && self.y0 < o.y1 && o.y0 < self.y1
    }
}

/// Problems of a layout: text boxes that overlap or leave the image.
pub fn layout_problems(boxes: &[TextBox], width: u32, height: u32) -> Vec<String> {
    let mut out = Vec::new();
    for (i, b) in boxes.iter().enumerate() {
        if b.x0 < 0 || b.y0 < 0 || b.x1 > width as i32 || b.y1 > height as i32 {
            out.push(format!("cut off: {b:?}"));
        }
        for o in &boxes[i + 1..] {
            if b.overlaps(o) {
                out.push(format!("overlap: {b:?} and {o:?}"));
            }
        }
    }
    out
}

/// The text boxes a chart would draw (SVG layout), for tests of the layout.
pub fn text_boxes(
    chart: &Chart<'_>,
    opts: &PlotOptions,
) -> std::result::Result<Vec<TextBox>, PlotError> {
    register();
    let mut svg = String::new();
    let area = SVGBackend::with_string(&mut svg, (opts.width, opts.height)).into_drawing_area();
    let canvas = Canvas::new(&area, opts, false);
    canvas.draw_chart(chart)?;
    Ok(canvas.boxes.into_inner())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Rot {
    None,
    /// Reading upwards.
    Up,
}

#[derive(Clone, Copy)]
enum Marker {
    Bar,
    Line,
    Dashed,
    Band,
    Circle,
    HollowCircle,
    Triangle,
    Diamond,
    /// A small dot, for dense scatters.
    Dot,
    /// A point with a vertical interval.
    PointBar,
    DiamondBar,
}

struct Canvas<'a, DB: DrawingBackend> {
    area: &'a DrawingArea<DB, Shift>,
    w: i32,
    h: i32,
    /// Scale of fonts and spacing relative to a 1000×600 image.
    s: f64,
    png: bool,
    opts: &'a PlotOptions,
    boxes: RefCell<Vec<TextBox>>,
}

/// A plot rectangle in pixels and the data ranges it shows.
#[derive(Clone, Copy, Debug)]
struct Panel {
    x0: i32,
    y0: i32,
    x1: i32,
    y1: i32,
    xlo: f64,
    xhi: f64,
    ylo: f64,
    yhi: f64,
}

impl Panel {
    fn px(&self, x: f64) -> i32 {
        let t = (x - self.xlo) / (self.xhi - self.xlo);
        (f64::from(self.x0) + t * f64::from(self.x1 - self.x0)).round() as i32
    }
    fn py(&self, y: f64) -> i32 {
        let t = (y - self.ylo) / (self.yhi - self.ylo);
        (f64::from(self.y1) - t * f64::from(self.y1 - self.y0)).round() as i32
    }
    fn clamp_y(&self, y: i32) -> i32 {
        y.clamp(self.y0, self.y1)
    }
}

/// Ticks of an axis with their labels.
struct Ticks {
    at: Vec<f64>,
    labels: Vec<String>,
}

impl<'a, DB: DrawingBackend> Canvas<'a, DB> {
    fn new(area: &'a DrawingArea<DB, Shift>, opts: &'a PlotOptions, png: bool) -> Self {
        let (w, h) = (opts.width as i32, opts.height as i32);
        let s = (f64::from(w) / 1000.0)
            .min(f64::from(h) / 600.0)
            .clamp(0.8, 4.0);
        Self {
            area,
            w,
            h,
            s,
            png,
            opts,
            boxes: RefCell::new(Vec::new()),
        }
    }

    /// Fails with a usage message when a plot area would be smaller than `need` pixels.
    fn room(&self, have: i32, need: i32, chart: &str) -> Draw {
        if have >= need {
            return Ok(());
        }
        Err(PlotError::TooSmall(format!(
            "{}x{} pixels is too small for the {chart} chart: give a larger --height or --width",
            self.w, self.h
        )))
    }

    /// A length scaled to the image.
    fn u(&self, px: f64) -> i32 {
        (px * self.s).round() as i32
    }

    fn size_title(&self) -> f64 {
        22.0 * self.s
    }
    fn size_sub(&self) -> f64 {
        15.0 * self.s
    }
    fn size_label(&self) -> f64 {
        14.0 * self.s
    }
    fn size_tick(&self) -> f64 {
        13.0 * self.s
    }

    /// Height of a line of text of that size.
    fn line_h(&self, size: f64) -> i32 {
        size.ceil() as i32
    }

    fn font(&self, size: f64) -> FontDesc<'static> {
        FontDesc::new(FontFamily::Name(FAMILY), size, FontStyle::Normal)
    }

    /// Width of a text in pixels, with a margin for viewers whose sans-serif is wider.
    fn text_w(&self, text: &str, size: f64) -> i32 {
        (Metrics::get().width(text, size) * 1.04).ceil() as i32 + 1
    }

    /// The text, shortened with `…` to fit `max` pixels.
    fn fit(&self, text: &str, size: f64, max: i32) -> String {
        if self.text_w(text, size) <= max {
            return text.to_string();
        }
        let chars: Vec<char> = text.chars().collect();
        let (mut lo, mut hi) = (0usize, chars.len());
        while lo < hi {
            let mid = (lo + hi).div_ceil(2);
            let t: String = chars[..mid].iter().collect::<String>() + "…";
            if self.text_w(&t, size) <= max {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        if lo == 0 {
            return String::new();
        }
        chars[..lo].iter().collect::<String>() + "…"
    }

    /// Draws a text anchored at `(x, y)` and records its box.
    #[allow(clippy::too_many_arguments)]
    fn text(
        &self,
        text: &str,
        x: i32,
        y: i32,
        size: f64,
        color: &RGBColor,
        h: HPos,
        v: VPos,
        rot: Rot,
    ) -> Draw {
        if text.is_empty() {
            return Ok(());
        }
        let tw = self.text_w(text, size);
        let th = self.line_h(size);
        let dx = match h {
            HPos::Left => 0,
            HPos::Center => -tw / 2,
            HPos::Right => -tw,
        };
        let dy = match v {
            VPos::Top => 0,
            VPos::Center => -th / 2,
            VPos::Bottom => -th,
        };
        let b = match rot {
            Rot::None => TextBox {
                x0: x + dx,
                y0: y + dy,
                x1: x + dx + tw,
                y1: y + dy + th,
                text: text.to_string(),
            },
            Rot::Up => TextBox {
                x0: x + dy,
                y0: y - dx - tw,
                x1: x + dy + th,
                y1: y - dx,
                text: text.to_string(),
            },
        };
        self.boxes.borrow_mut().push(b);
        if !self.png {
            let font = match rot {
                Rot::None => self.font(size),
                Rot::Up => self.font(size).transform(FontTransform::Rotate270),
            };
            let style = TextStyle::from(font).color(color).pos(Pos::new(h, v));
            return self.area.draw_text(text, &style, (x, y)).map_err(fail);
        }
        // PNG: glyph by glyph. In the text's own frame, the line box is `th` high with
        // the baseline at the font's ascent; plotters draws a glyph with its ink's left
        // edge at the given x and its baseline size/2 below the given y.
        let mtx = Metrics::get();
        let real_w = mtx.width(text, size);
        let ox = match h {
            HPos::Left => 0.0,
            HPos::Center => -real_w / 2.0,
            HPos::Right => -real_w,
        };
        let baseline = (f64::from(dy) + mtx.ascent * size / mtx.height).round() as i32;
        let font = match rot {
            Rot::None => self.font(size),
            Rot::Up => self.font(size).transform(FontTransform::Rotate270),
        };
        let style = TextStyle::from(font)
            .color(color)
            .pos(Pos::new(HPos::Left, VPos::Top));
        let k = size / mtx.height;
        let mut pen = ox;
        let mut buf = [0u8; 4];
        for c in text.chars() {
            let (adv, lsb) = mtx.h(c, size);
            if let Some(top) = mtx.top(mtx.glyph(c)) {
                // plotters puts the glyph's first pixel row at y + trunc(size/2 + fy),
                // where fy = floor(-top·k) is that row relative to the baseline (ab_glyph's
                // pixel bounds); the row belongs at baseline + fy.
                let fy = (-f64::from(top) * k).floor();
                let plotters_row = (size as f32 / 2.0 + fy as f32) as i32;
                let ty = baseline + fy as i32 - plotters_row;
                let tx = (pen + lsb).round() as i32;
                let at = match rot {
                    Rot::None => (x + tx, y + ty),
                    Rot::Up => (x + ty, y - tx),
                };
                self.area
                    .draw_text(c.encode_utf8(&mut buf), &style, at)
                    .map_err(fail)?;
            }
            pen += adv;
        }
        Ok(())
    }

    fn path(&self, pts: Vec<(i32, i32)>, color: RGBAColor, width: u32) -> Draw {
        if pts.len() < 2 {
            return Ok(());
        }
        if !self.png || width <= 1 {
            return self
                .area
                .draw(&PathElement::new(pts, color.stroke_width(width)))
                .map_err(fail);
        }
        // plotters' bitmap backend draws thick, nearly vertical segments with spikes far
        // past their ends: draw thin copies side by side instead.
        let w = width as i32;
        for dx in 0..w {
            for dy in 0..w {
                let moved: Vec<(i32, i32)> = pts
                    .iter()
                    .map(|&(x, y)| (x + dx - (w - 1) / 2, y + dy - (w - 1) / 2))
                    .collect();
                self.area
                    .draw(&PathElement::new(moved, color.stroke_width(1)))
                    .map_err(fail)?;
            }
        }
        Ok(())
    }

    fn dashed(&self, a: (i32, i32), b: (i32, i32), color: RGBAColor, width: u32) -> Draw {
        let dash = f64::from(self.u(7.0).max(3));
        let gap = f64::from(self.u(5.0).max(2));
        let (dx, dy) = (f64::from(b.0 - a.0), f64::from(b.1 - a.1));
        let len = (dx * dx + dy * dy).sqrt();
        if len == 0.0 {
            return Ok(());
        }
        let mut t = 0.0;
        while t < len {
            let t1 = (t + dash).min(len);
            let p = |t: f64| {
                (
                    a.0 + (dx * t / len).round() as i32,
                    a.1 + (dy * t / len).round() as i32,
                )
            };
            self.path(vec![p(t), p(t1)], color, width)?;
            t += dash + gap;
        }
        Ok(())
    }

    fn rect(&self, a: (i32, i32), b: (i32, i32), color: RGBAColor, filled: bool) -> Draw {
        let style = if filled {
            color.filled()
        } else {
            color.stroke_width(1)
        };
        self.area.draw(&Rectangle::new([a, b], style)).map_err(fail)
    }

    fn marker(&self, m: Marker, x: i32, y: i32, color: RGBColor) -> Draw {
        let r = self.u(4.0).max(2);
        let c = color.to_rgba();
        let res = match m {
            Marker::Circle | Marker::PointBar => {
                self.area.draw(&Circle::new((x, y), r, c.filled()))
            }
            Marker::Dot => self.area.draw(&Circle::new(
                (x, y),
                ((f64::from(r) * 0.5).round() as i32).max(1),
                c.filled(),
            )),
            Marker::HollowCircle => self.area.draw(&Circle::new(
                (x, y),
                r,
                c.stroke_width(self.u(1.5).max(1) as u32),
            )),
            Marker::Triangle => {
                let r = r + 1;
                self.area.draw(&Polygon::new(
                    vec![(x, y - r), (x - r, y + r * 3 / 4), (x + r, y + r * 3 / 4)],
                    c.filled(),
                ))
            }
            Marker::Diamond | Marker::DiamondBar => {
                let r = r + 1;
                self.area.draw(&Polygon::new(
                    vec![(x, y - r), (x + r, y), (x, y + r), (x - r, y)],
                    c.filled(),
                ))
            }
            Marker::Bar => self.area.draw(&Rectangle::new(
                [(x - r - 2, y - r - 1), (x + r + 2, y + r + 1)],
                c.filled(),
            )),
            Marker::Line | Marker::Dashed | Marker::Band => Ok(()),
        };
        res.map_err(fail)
    }

    /// A vertical interval with whiskers.
    fn interval(&self, x: i32, y_lo: i32, y_hi: i32, color: RGBColor) -> Draw {
        let c = color.to_rgba();
        let wsk = self.u(3.0).max(2);
        let lw = self.u(1.3).max(1) as u32;
        self.path(vec![(x, y_lo), (x, y_hi)], c, lw)?;
        self.path(vec![(x - wsk, y_lo), (x + wsk, y_lo)], c, lw)?;
        self.path(vec![(x - wsk, y_hi), (x + wsk, y_hi)], c, lw)
    }

    // -----------------------------------------------------------------------------------
    // Header: title, subtitle lines, legend. Returns the y below it.

    /// Lays the subtitle's parts out in lines that fit the width.
    fn wrap(&self, parts: &[String], size: f64, max: i32) -> Vec<String> {
        let mut lines: Vec<String> = Vec::new();
        let mut cur = String::new();
        for p in parts {
            let cand = if cur.is_empty() {
                p.clone()
            } else {
                format!("{cur}  ·  {p}")
            };
            if cur.is_empty() || self.text_w(&cand, size) <= max {
                cur = cand;
            } else {
                lines.push(std::mem::take(&mut cur));
                cur = p.clone();
            }
        }
        if !cur.is_empty() {
            lines.push(cur);
        }
        lines.into_iter().map(|l| self.fit(&l, size, max)).collect()
    }

    fn header(
        &self,
        title: &str,
        sub: &[String],
        legend: &[(Marker, RGBColor, String)],
    ) -> std::result::Result<i32, PlotError> {
        let m = self.u(16.0);
        let max = self.w - 2 * m;
        let title = self.fit(
            self.opts.title.as_deref().unwrap_or(title),
            self.size_title(),
            max,
        );
        let mut y = self.u(12.0);
        self.text(
            &title,
            m,
            y,
            self.size_title(),
            &INK,
            HPos::Left,
            VPos::Top,
            Rot::None,
        )?;
        y += self.line_h(self.size_title()) + self.u(6.0);
        for line in self.wrap(sub, self.size_sub(), max) {
            self.text(
                &line,
                m,
                y,
                self.size_sub(),
                &MUTED,
                HPos::Left,
                VPos::Top,
                Rot::None,
            )?;
            y += self.line_h(self.size_sub()) + self.u(3.0);
        }
        if !legend.is_empty() {
            y += self.u(4.0);
            let size = self.size_label();
            let lh = self.line_h(size);
            let sym = self.u(22.0);
            let mut x = m;
            for (marker, color, label) in legend {
                let label = self.fit(label, size, max - sym - self.u(6.0));
                let item_w = sym + self.u(6.0) + self.text_w(&label, size);
                if x > m && x + item_w > self.w - m {
                    x = m;
                    y += lh + self.u(6.0);
                }
                let cy = y + lh / 2;
                self.legend_symbol(*marker, x, cy, sym, *color)?;
                self.text(
                    &label,
                    x + sym + self.u(6.0),
                    cy,
                    size,
                    &INK,
                    HPos::Left,
                    VPos::Center,
                    Rot::None,
                )?;
                x += item_w + self.u(18.0);
            }
            y += lh;
        }
        Ok(y + self.u(10.0))
    }

    fn legend_symbol(&self, m: Marker, x: i32, cy: i32, w: i32, color: RGBColor) -> Draw {
        let c = color.to_rgba();
        let lw = self.u(2.0).max(1) as u32;
        match m {
            Marker::Line => self.path(vec![(x, cy), (x + w, cy)], c, lw),
            Marker::Dashed => self.dashed((x, cy), (x + w, cy), c, lw),
            Marker::Band => {
                let hh = self.u(6.0);
                self.rect((x, cy - hh), (x + w, cy + hh), color.mix(0.18), true)?;
                self.dashed((x, cy - hh), (x + w, cy - hh), color.mix(0.8), 1)?;
                self.dashed((x, cy + hh), (x + w, cy + hh), color.mix(0.8), 1)
            }
            Marker::PointBar | Marker::DiamondBar => {
                let hh = self.u(7.0);
                self.interval(x + w / 2, cy + hh, cy - hh, color)?;
                self.marker(m, x + w / 2, cy, color)
            }
            _ => self.marker(m, x + w / 2, cy, color),
        }
    }

    // -----------------------------------------------------------------------------------
    // Axes.

    fn y_ticks(&self, lo: f64, hi: f64, plot_h: i32) -> Ticks {
        let lh = self.line_h(self.size_tick());
        let mut max = (plot_h / (lh * 3)).clamp(2, 10) as usize;
        let (mut at, mut step) = ticks(lo, hi, max, false);
        // At least three ticks when they can stand a line and a half apart.
        while at.len() < 3 && max < 10 {
            max += 1;
            let (a, s) = ticks(lo, hi, max, false);
            let spacing = f64::from(plot_h) * s / (hi - lo);
            if spacing < f64::from(lh) * 1.5 {
                break;
            }
            (at, step) = (a, s);
        }
        let max_abs = lo.abs().max(hi.abs());
        let labels = at.iter().map(|&v| fmt_tick(v, step, max_abs)).collect();
        Ticks { at, labels }
    }

    /// Integer ticks for a 1-based position axis, thinned to fit the width.
    fn x_int_ticks(&self, lo: f64, hi: f64, plot_w: i32) -> Ticks {
        let widest = self.text_w(&format!("{}", hi.round() as i64), self.size_tick());
        let max = (plot_w / (widest + self.u(24.0))).clamp(1, 12) as usize;
        let (mut at, _) = ticks(lo, hi, max, true);
        at.retain(|&v| v >= 1.0);
        if at.is_empty() {
            at.push(lo.max(1.0).round());
        }
        let labels = at.iter().map(|&v| format!("{}", v as i64)).collect();
        Ticks { at, labels }
    }

    fn y_label_w(&self, t: &Ticks) -> i32 {
        t.labels
            .iter()
            .map(|l| self.text_w(l, self.size_tick()))
            .max()
            .unwrap_or(0)
    }

    /// Frame, horizontal grid and y tick labels, y axis title.
    fn y_axis(&self, p: &Panel, t: &Ticks, title: &str) -> Draw {
        for (v, l) in t.at.iter().zip(&t.labels) {
            let y = p.py(*v);
            self.path(vec![(p.x0, y), (p.x1, y)], GRID.to_rgba(), 1)?;
            self.path(vec![(p.x0 - self.u(4.0), y), (p.x0, y)], FRAME.to_rgba(), 1)?;
            self.text(
                l,
                p.x0 - self.u(7.0),
                y,
                self.size_tick(),
                &INK,
                HPos::Right,
                VPos::Center,
                Rot::None,
            )?;
        }
        let wl = self.y_label_w(t);
        let x = p.x0 - self.u(7.0) - wl - self.u(8.0) - self.line_h(self.size_label()) / 2;
        let title = self.fit(title, self.size_label(), p.y1 - p.y0);
        self.text(
            &title,
            x,
            (p.y0 + p.y1) / 2,
            self.size_label(),
            &INK,
            HPos::Center,
            VPos::Center,
            Rot::Up,
        )
    }

    fn x_axis_ticks(&self, p: &Panel, t: &Ticks) -> Draw {
        for (v, l) in t.at.iter().zip(&t.labels) {
            let x = p.px(*v);
            self.path(vec![(x, p.y1), (x, p.y1 + self.u(4.0))], FRAME.to_rgba(), 1)?;
            self.text(
                l,
                x,
                p.y1 + self.u(6.0),
                self.size_tick(),
                &INK,
                HPos::Center,
                VPos::Top,
                Rot::None,
            )?;
        }
        Ok(())
    }

    fn x_title(&self, p: &Panel, y: i32, title: &str) -> Draw {
        let title = self.fit(title, self.size_label(), p.x1 - p.x0);
        self.text(
            &title,
            (p.x0 + p.x1) / 2,
            y,
            self.size_label(),
            &INK,
            HPos::Center,
            VPos::Top,
            Rot::None,
        )
    }

    fn frame(&self, p: &Panel) -> Draw {
        self.rect((p.x0, p.y0), (p.x1, p.y1), FRAME.to_rgba(), false)
    }

    /// Left edge of a panel: margin, rotated y title, tick labels.
    fn left_edge(&self, t: &Ticks) -> i32 {
        self.u(16.0)
            + self.line_h(self.size_label())
            + self.u(8.0)
            + self.y_label_w(t)
            + self.u(7.0)
    }

    /// Height of horizontal tick labels plus the axis title under them.
    fn x_axis_h(&self) -> i32 {
        self.u(6.0) + self.line_h(self.size_tick()) + self.u(8.0) + self.line_h(self.size_label())
    }

    // -----------------------------------------------------------------------------------
    // Charts.

    fn draw_chart(&self, chart: &Chart<'_>) -> Draw {
        self.area.fill(&WHITE).map_err(fail)?;
        match *chart {
            Chart::Overview(rows) => self.overview(rows),
            Chart::Endpoints(report) => {
                let b = first(report)?;
                let n = b.endpoints.len() + usize::from(b.unmatched > 0.0);
                if n <= MAX_BARS && self.bars_fit(b) {
                    self.bars(report, b)
                } else {
                    self.deviations(report, b)
                }
            }
            Chart::Cascade(report, rules) => self.cascade(first(report)?, rules),
        }
    }

    /// Subtitle parts about a balancer: size, skew, leak, tests.
    fn balancer_facts(&self, report: &Report, b: &BalancerReport) -> Vec<String> {
        let uniform = b.expected_split == "uniform";
        let mut parts = vec![format!(
            "n = {} endpoint{}",
            fmt_count(b.endpoints.len() as u64),
            if b.endpoints.len() == 1 { "" } else { "s" }
        )];
        parts.push(format!(
            "largest relative skew {}{} (--max-skew {})",
            fmt_skew(largest_skew(b)),
            if uniform {
                ""
            } else {
                " against the intended split"
            },
            fmt_threshold(self.opts.max_skew)
        ));
        if b.unmatched > 0.0 {
            parts.push(format!(
                "{} of connections reach no endpoint",
                fmt_prob(b.unmatched)
            ));
        }
        if let Some(s) = &b.simulation {
            parts.push(format!(
                "simulation: {} connections, p = {}",
                fmt_count(s.connections),
                fmt_p(s.p_value)
            ));
        }
        if let Some(o) = &b.observed {
            parts.push(format!(
                "counters: {} connections, p = {}",
                fmt_count(o.connections),
                fmt_p(o.p_value)
            ));
        }
        if !uniform {
            parts.push(format!("intended split from {}", b.expected_split));
        }
        let _ = report;
        parts
    }

    /// Can the bars chart label every category (possibly rotated)?
    fn bars_fit(&self, b: &BalancerReport) -> bool {
        let n = b.endpoints.len() + usize::from(b.unmatched > 0.0);
        let plot_w = self.w - self.u(16.0) * 2 - self.u(90.0);
        plot_w / n.max(1) as i32 >= self.line_h(self.size_tick()) + self.u(4.0)
    }

    /// Bars of the exact probabilities, with the expected share and measured shares.
    fn bars(&self, report: &Report, b: &BalancerReport) -> Draw {
        let mut labels: Vec<String> = b.endpoints.iter().map(|e| e.endpoint.clone()).collect();
        let mut probs: Vec<f64> = b.endpoints.iter().map(|e| e.probability).collect();
        if b.unmatched > 0.0 {
            labels.push("(no endpoint)".into());
            probs.push(b.unmatched);
        }
        let n = labels.len();
        let has_sim = b.endpoints.iter().any(|e| e.simulated_share.is_some());
        let has_obs = b.endpoints.iter().any(|e| e.observed_share.is_some());
        let expected: Vec<f64> = b.endpoints.iter().map(|e| e.expected).collect();
        let same_expected = expected.windows(2).all(|w| w[0] == w[1]);

        let mut legend = vec![(Marker::Bar, BAR, "exact probability".to_string())];
        legend.push((
            Marker::Dashed,
            EXPECTED,
            if same_expected {
                format!("expected share {}", fmt_prob(expected[0]))
            } else {
                "expected share (per endpoint)".into()
            },
        ));
        if has_sim {
            legend.push((
                Marker::PointBar,
                SIMULATED,
                "simulated share, 95% interval".into(),
            ));
        }
        if has_obs {
            legend.push((
                Marker::DiamondBar,
                OBSERVED,
                "share in the counters, 95% interval".into(),
            ));
        }
        let top = self.header(&b.name, &self.balancer_facts(report, b), &legend)?;

        // y range: everything drawn, plus room above.
        let mut ymax = probs.iter().chain(&expected).copied().fold(0.0, f64::max);
        for e in &b.endpoints {
            for iv in [e.simulated_interval, e.observed_interval]
                .into_iter()
                .flatten()
            {
                ymax = ymax.max(iv[1]);
            }
        }
        let ymax = if ymax > 0.0 {
            (ymax * 1.1).min(1.05)
        } else {
            1.0
        };
        let m = self.u(16.0);
        let approx_h = self.h - top - self.u(120.0);
        let yt = self.y_ticks(0.0, ymax, approx_h);
        let x0 = self.left_edge(&yt);
        let x1 = self.w - m;
        let slot = f64::from(x1 - x0) / n as f64;

        // Category labels: horizontal when they fit the slot, else reading upwards.
        let size = self.size_tick();
        let widest = labels
            .iter()
            .map(|l| self.text_w(l, size))
            .max()
            .unwrap_or(0);
        let horizontal = f64::from(widest) <= slot - f64::from(self.u(6.0));
        let max_label = (self.h / 3).max(self.u(40.0));
        let label_h = if horizontal {
            self.line_h(size)
        } else {
            widest.min(max_label)
        };
        let y1 = self.h - m - self.line_h(self.size_label()) - self.u(8.0) - label_h - self.u(8.0);
        self.room(y1 - top, self.u(60.0), "endpoints")?;
        self.room(x1 - x0, self.u(150.0), "endpoints")?;
        let p = Panel {
            x0,
            y0: top,
            x1,
            y1,
            xlo: -0.5,
            xhi: n as f64 - 0.5,
            ylo: 0.0,
            yhi: ymax,
        };
        self.y_axis(&p, &yt, "probability of a new connection")?;

        let bar_w = (slot * 0.62).min(f64::from(self.u(150.0)));
        // Measured shares stand right of the bar's middle (simulated left, counters right,
        // when both), so that the value written up the middle stays clear of them.
        let measured = has_sim || has_obs;
        let off = if measured { bar_w * 0.3 } else { 0.0 };
        let sim_dx = if has_obs { -off } else { off }.round() as i32;
        let obs_dx = off.round() as i32;
        let reach = self.u(5.0) + 1;
        for (i, &prob) in probs.iter().enumerate() {
            let cx = p.px(i as f64);
            let hw = (bar_w / 2.0).round() as i32;
            let color = if i >= b.endpoints.len() { FAIL } else { BAR };
            if prob > 0.0 {
                self.rect(
                    (cx - hw, p.py(prob)),
                    (cx + hw, p.y1),
                    color.to_rgba(),
                    true,
                )?;
            }
            // The value inside the bar, when it fits.
            let v = fmt_prob(prob);
            let vs = self.size_tick();
            let bar_h = p.y1 - p.py(prob);
            let tw = self.text_w(&v, vs);
            let free = if measured {
                obs_dx - reach - self.u(2.0)
            } else {
                hw - self.u(3.0)
            };
            if tw / 2 <= free && bar_h >= self.line_h(vs) + self.u(8.0) {
                self.text(
                    &v,
                    cx,
                    p.y1 - self.u(5.0),
                    vs,
                    &WHITE,
                    HPos::Center,
                    VPos::Bottom,
                    Rot::None,
                )?;
            } else if self.line_h(vs) / 2 + self.u(1.0) <= free && bar_h >= tw + self.u(10.0) {
                self.text(
                    &v,
                    cx,
                    p.y1 - self.u(5.0),
                    vs,
                    &WHITE,
                    HPos::Left,
                    VPos::Center,
                    Rot::Up,
                )?;
            }
        }
        // The expected share.
        let lw = self.u(2.0).max(1) as u32;
        if same_expected {
            let y = p.py(expected[0]);
            self.dashed((p.x0, y), (p.x1, y), EXPECTED.to_rgba(), lw)?;
        } else {
            for (i, &e) in expected.iter().enumerate() {
                let cx = p.px(i as f64);
                let hw = (slot * 0.45).round() as i32;
                let y = p.py(e);
                self.dashed((cx - hw, y), (cx + hw, y), EXPECTED.to_rgba(), lw)?;
            }
        }
        // Measured shares.
        for (i, e) in b.endpoints.iter().enumerate() {
            let cx = p.px(i as f64);
            if let (Some(s), Some(iv)) = (e.simulated_share, e.simulated_interval) {
                let x = cx + sim_dx;
                self.interval(x, p.clamp_y(p.py(iv[0])), p.clamp_y(p.py(iv[1])), SIMULATED)?;
                self.marker(Marker::Circle, x, p.py(s), SIMULATED)?;
            }
            if let (Some(s), Some(iv)) = (e.observed_share, e.observed_interval) {
                let x = cx + obs_dx;
                self.interval(x, p.clamp_y(p.py(iv[0])), p.clamp_y(p.py(iv[1])), OBSERVED)?;
                self.marker(Marker::Diamond, x, p.py(s), OBSERVED)?;
            }
        }
        self.frame(&p)?;
        // Category labels.
        for (i, l) in labels.iter().enumerate() {
            let cx = p.px(i as f64);
            self.path(
                vec![(cx, p.y1), (cx, p.y1 + self.u(4.0))],
                FRAME.to_rgba(),
                1,
            )?;
            if horizontal {
                self.text(
                    l,
                    cx,
                    p.y1 + self.u(6.0),
                    size,
                    &INK,
                    HPos::Center,
                    VPos::Top,
                    Rot::None,
                )?;
            } else {
                let l = self.fit(l, size, max_label);
                self.text(
                    &l,
                    cx,
                    p.y1 + self.u(6.0),
                    size,
                    &INK,
                    HPos::Right,
                    VPos::Center,
                    Rot::Up,
                )?;
            }
        }
        self.x_title(
            &p,
            p.y1 + self.u(6.0) + label_h + self.u(8.0),
            "endpoint (in the order of the rules)",
        )
    }

    /// Relative deviations of many endpoints, sorted, with the tolerance band.
    fn deviations(&self, report: &Report, b: &BalancerReport) -> Draw {
        let max_skew = self.opts.max_skew;
        let mut devs: Vec<(f64, &str)> = b
            .endpoints
            .iter()
            .filter_map(|e| deviation(b, e).map(|d| (d, e.endpoint.as_str())))
            .collect();
        devs.sort_by(|a, b| a.0.total_cmp(&b.0).then_with(|| a.1.cmp(b.1)));
        let n = devs.len();
        let outside = devs.iter().filter(|d| d.0.abs() > max_skew).count();
        let mut sub = self.balancer_facts(report, b);
        sub.insert(
            2,
            format!(
                "{} endpoint{} outside the band",
                fmt_count(outside as u64),
                if outside == 1 { "" } else { "s" }
            ),
        );
        let mut legend = vec![
            (
                Marker::Line,
                PASS,
                "relative deviation of the exact probability, sorted".to_string(),
            ),
            (
                Marker::Band,
                BAND,
                format!("±{} tolerance (--max-skew)", fmt_threshold(max_skew)),
            ),
        ];
        if outside > 0 {
            legend.push((Marker::Circle, FAIL, "outside the tolerance".into()));
        }
        let top = self.header(&b.name, &sub, &legend)?;
        let biggest = devs.iter().map(|d| d.0.abs()).fold(0.0, f64::max);
        let mut ymax = biggest.max(max_skew) * 1.18;
        if ymax == 0.0 {
            ymax = 1e-3;
        }
        let m = self.u(16.0);
        let y1 = self.h - m - self.x_axis_h();
        let yt = self.y_ticks(-ymax, ymax, y1 - top);
        let x0 = self.left_edge(&yt);
        let last_w = self.text_w(&n.to_string(), self.size_tick());
        let x1 = self.w - m - last_w / 2;
        self.room(y1 - top, self.u(60.0), "endpoints")?;
        self.room(x1 - x0, self.u(150.0), "endpoints")?;
        let p = Panel {
            x0,
            y0: top,
            x1,
            y1,
            xlo: 0.5,
            xhi: n as f64 + 0.5,
            ylo: -ymax,
            yhi: ymax,
        };
        self.y_axis(
            &p,
            &yt,
            if b.expected_split == "uniform" {
                "relative deviation n·p − 1"
            } else {
                "relative deviation p/expected − 1"
            },
        )?;
        let xt = self.x_int_ticks(p.xlo, p.xhi, x1 - x0);
        self.x_axis_ticks(&p, &xt)?;
        self.band(&p, max_skew)?;
        self.path(
            vec![(p.x0, p.py(0.0)), (p.x1, p.py(0.0))],
            FRAME.to_rgba(),
            1,
        )?;
        let pts: Vec<(i32, i32)> = devs
            .iter()
            .enumerate()
            .map(|(i, d)| (p.px(i as f64 + 1.0), p.py(d.0)))
            .collect();
        let lw = self.u(2.0).max(1) as u32;
        if n == 1 {
            self.marker(Marker::Circle, pts[0].0, pts[0].1, PASS)?;
        }
        self.path(pts.clone(), PASS.to_rgba(), lw)?;
        // Endpoints outside the band: markers, or a red stroke when there are very many.
        let out: Vec<(i32, i32)> = devs
            .iter()
            .zip(&pts)
            .filter(|(d, _)| d.0.abs() > max_skew)
            .map(|(_, p)| *p)
            .collect();
        if out.len() <= 400 {
            for (x, y) in &out {
                self.marker(Marker::Circle, *x, *y, FAIL)?;
            }
        } else {
            let lo: Vec<(i32, i32)> = devs
                .iter()
                .zip(&pts)
                .filter(|(d, _)| d.0 < -max_skew)
                .map(|(_, p)| *p)
                .collect();
            let hi: Vec<(i32, i32)> = devs
                .iter()
                .zip(&pts)
                .filter(|(d, _)| d.0 > max_skew)
                .map(|(_, p)| *p)
                .collect();
            self.path(lo, FAIL.to_rgba(), lw + 2)?;
            self.path(hi, FAIL.to_rgba(), lw + 2)?;
        }
        self.frame(&p)?;
        // Name the two extremes.
        if n >= 2 {
            let size = self.size_tick();
            let (dlo, nlo) = devs[0];
            let (dhi, nhi) = devs[n - 1];
            let room = (p.x1 - p.x0) / 2 - self.u(12.0);
            let hi_text = self.fit(&format!("{nhi}  {}", fmt_dev(dhi)), size, room);
            let lo_text = self.fit(&format!("{nlo}  {}", fmt_dev(dlo)), size, room);
            let (xh, yh) = pts[n - 1];
            let (xl, yl) = pts[0];
            let gap = self.u(8.0);
            // The curve rises: above-left of its last point and below-right of its first
            // there is nothing but the band.
            let lh = self.line_h(size);
            let yh = (yh - gap).clamp(p.y0 + gap + lh, p.y1 - gap);
            let yl = (yl + gap).clamp(p.y0 + gap, p.y1 - gap - lh);
            self.text(
                &hi_text,
                xh - gap,
                yh,
                size,
                &INK,
                HPos::Right,
                VPos::Bottom,
                Rot::None,
            )?;
            self.text(
                &lo_text,
                xl + gap,
                yl,
                size,
                &INK,
                HPos::Left,
                VPos::Top,
                Rot::None,
            )?;
        }
        self.x_title(
            &p,
            p.y1 + self.u(6.0) + self.line_h(self.size_tick()) + self.u(8.0),
            &format!(
                "endpoints sorted by relative deviation (rank, of {})",
                fmt_count(n as u64)
            ),
        )
    }

    /// The tolerance band ±x of a deviation panel.
    fn band(&self, p: &Panel, x: f64) -> Draw {
        let (a, b) = (p.clamp_y(p.py(x)), p.clamp_y(p.py(-x)));
        self.rect((p.x0, a), (p.x1, b.max(a + 1)), BAND.mix(0.16), true)?;
        self.dashed((p.x0, a), (p.x1, a), BAND.mix(0.85), 1)?;
        self.dashed((p.x0, b), (p.x1, b), BAND.mix(0.85), 1)
    }

    /// Every balancer's largest skew on a log scale.
    fn overview(&self, rows: &[OverviewRow]) -> Draw {
        let max_skew = self.opts.max_skew;
        let mut rows: Vec<(f64, &str)> = rows.iter().map(|(x, n)| (*x, n.as_str())).collect();
        rows.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.cmp(b.1)));
        let n = rows.len();
        let failing = rows.iter().filter(|r| r.0 > max_skew).count();
        let floored = rows.iter().filter(|r| r.0 < SKEW_FLOOR).count();
        let any_tiny = rows.iter().any(|r| r.0 > 0.0 && r.0 < SKEW_FLOOR);
        let mut sub = vec![
            format!(
                "{} balancer{}",
                fmt_count(n as u64),
                if n == 1 { "" } else { "s" }
            ),
            format!(
                "{} above --max-skew {}",
                fmt_count(failing as u64),
                fmt_threshold(max_skew)
            ),
        ];
        if failing > 0 {
            let worst: Vec<String> = rows
                .iter()
                .take(3.min(failing))
                .map(|r| format!("{} ({})", r.1, fmt_skew(r.0)))
                .collect();
            sub.push(format!("worst: {}", worst.join(", ")));
        }
        let mut legend = vec![
            (
                Marker::Triangle,
                FAIL,
                "above --max-skew (fails)".to_string(),
            ),
            (Marker::Circle, PASS, "within --max-skew".to_string()),
            (
                Marker::Dashed,
                FAIL,
                format!("--max-skew {}", fmt_threshold(max_skew)),
            ),
        ];
        if floored > 0 {
            legend.push((
                Marker::HollowCircle,
                ZERO,
                format!(
                    "skew 0{} (drawn at {})",
                    if any_tiny { " or below 1e-12" } else { "" },
                    fmt_threshold(SKEW_FLOOR)
                ),
            ));
        }
        let top = self.header("Largest relative skew per balancer", &sub, &legend)?;
        let clamp = |v: f64| v.max(SKEW_FLOOR).log10();
        let mut vmin = rows
            .iter()
            .map(|r| clamp(r.0))
            .fold(f64::INFINITY, f64::min);
        let mut vmax = rows
            .iter()
            .map(|r| clamp(r.0))
            .fold(f64::NEG_INFINITY, f64::max);
        let thr = clamp(max_skew);
        vmin = vmin.min(thr);
        vmax = vmax.max(thr);
        let mut lo = vmin.floor();
        let mut hi = (vmax + 0.35).ceil();
        if hi - lo < 2.0 {
            hi += 1.0;
            lo -= 1.0;
        }
        let (ylo, yhi) = (lo - 0.3, hi + 0.15);
        let m = self.u(16.0);
        // Decade ticks, every k-th so that they do not crowd.
        let lh = self.line_h(self.size_tick());
        let approx_h = self.h - top - self.u(110.0);
        let max_t = (approx_h / (lh * 2)).max(2);
        let decades = (hi - lo) as i32;
        let every = (decades + max_t - 1) / max_t.max(1);
        let every = every.max(1);
        let at: Vec<f64> = (lo as i32..=hi as i32)
            .filter(|e| (e - lo as i32) % every == 0)
            .map(f64::from)
            .collect();
        let yt = Ticks {
            labels: at.iter().map(|&e| fmt_decade(e as i32)).collect(),
            at,
        };
        let x0 = self.left_edge(&yt);
        // Names under each balancer when they fit (reading upwards), else ranks.
        let size = self.size_tick();
        let x1_names = self.w - m;
        let slot = f64::from(x1_names - x0) / n as f64;
        let names = n <= 60 && slot >= f64::from(lh + self.u(4.0));
        let max_label = (self.h / 3).max(self.u(40.0));
        let label_h = if names {
            rows.iter()
                .map(|r| self.text_w(r.1, size))
                .max()
                .unwrap_or(0)
                .min(max_label)
        } else {
            lh
        };
        let x1 = if names {
            x1_names
        } else {
            self.w - m - self.text_w(&n.to_string(), size) / 2
        };
        let y1 = self.h - m - self.line_h(self.size_label()) - self.u(8.0) - label_h - self.u(8.0);
        self.room(y1 - top, self.u(60.0), "overview")?;
        self.room(x1 - x0, self.u(150.0), "overview")?;
        let p = Panel {
            x0,
            y0: top,
            x1,
            y1,
            xlo: 0.5,
            xhi: n as f64 + 0.5,
            ylo,
            yhi,
        };
        self.y_axis(&p, &yt, "largest relative skew (log scale)")?;
        if names {
            for (i, r) in rows.iter().enumerate() {
                let x = p.px(i as f64 + 1.0);
                self.path(vec![(x, p.y1), (x, p.y1 + self.u(4.0))], FRAME.to_rgba(), 1)?;
                let l = self.fit(r.1, size, max_label);
                self.text(
                    &l,
                    x,
                    p.y1 + self.u(6.0),
                    size,
                    &INK,
                    HPos::Right,
                    VPos::Center,
                    Rot::Up,
                )?;
            }
        } else {
            let xt = self.x_int_ticks(p.xlo, p.xhi, x1 - x0);
            self.x_axis_ticks(&p, &xt)?;
        }
        // Failing region shaded when markers would be too many to see one by one.
        let many = n > 1500;
        if many && failing > 0 {
            let xf = p.px(failing as f64 + 0.5);
            self.rect((p.x0, p.y0), (xf.max(p.x0 + 1), p.y1), FAIL.mix(0.07), true)?;
        }
        let ty = p.py(thr);
        self.dashed(
            (p.x0, ty),
            (p.x1, ty),
            FAIL.mix(0.9),
            self.u(1.5).max(1) as u32,
        )?;
        let pts: Vec<(i32, i32)> = rows
            .iter()
            .enumerate()
            .map(|(i, r)| (p.px(i as f64 + 1.0), p.py(clamp(r.0))))
            .collect();
        if many {
            // One line per class: markers for each of 30,000 balancers would be a smear.
            let lw = self.u(2.5).max(2) as u32;
            let split = failing.min(n);
            let zero_from = n - floored;
            self.path(pts[..split].to_vec(), FAIL.to_rgba(), lw)?;
            self.path(
                pts[split.saturating_sub(1).min(zero_from)..zero_from.max(split)].to_vec(),
                PASS.to_rgba(),
                lw,
            )?;
            self.path(
                pts[zero_from.saturating_sub(1).max(split)..].to_vec(),
                ZERO.to_rgba(),
                lw,
            )?;
            // Mark the ends of each class so the colours carry their markers too.
            for (i, r) in rows.iter().enumerate() {
                let edge = i == 0
                    || i + 1 == n
                    || i == split
                    || i + 1 == split
                    || i == zero_from
                    || i + 1 == zero_from;
                if edge {
                    let (mk, c) = class_marker(r.0, max_skew);
                    self.marker(mk, pts[i].0, pts[i].1, c)?;
                }
            }
        } else {
            for (i, r) in rows.iter().enumerate() {
                let (mk, c) = class_marker(r.0, max_skew);
                self.marker(mk, pts[i].0, pts[i].1, c)?;
            }
        }
        self.frame(&p)?;
        let title = if names {
            "balancers, sorted by largest relative skew".to_string()
        } else {
            format!(
                "balancers, sorted by largest relative skew (rank, of {})",
                fmt_count(n as u64)
            )
        };
        self.x_title(&p, p.y1 + self.u(6.0) + label_h + self.u(8.0), &title)
    }

    /// Rule errors and endpoint deviations of one cascade, in two panels.
    fn cascade(&self, b: &BalancerReport, rules: &[CascadeRule]) -> Draw {
        let max_skew = self.opts.max_skew;
        let n = b.endpoints.len();
        let uniform = b.expected_split == "uniform";
        let devs: Vec<Option<f64>> = b.endpoints.iter().map(|e| deviation(b, e)).collect();
        let worst_rule = rules
            .iter()
            .enumerate()
            .filter_map(|(j, r)| r.relative_error.map(|e| (j, e)))
            .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()).then(b.0.cmp(&a.0)));
        let mut sub = vec![format!(
            "n = {} endpoints, {} statistic rule{}",
            fmt_count(n as u64),
            fmt_count(rules.len() as u64),
            if rules.len() == 1 { "" } else { "s" }
        )];
        if let Some((j, e)) = worst_rule {
            let r = &rules[j];
            let ideal = r.ideal.unwrap_or(0.0);
            let ideal_text =
                if uniform && ideal > 0.0 && (1.0 / ideal - (1.0 / ideal).round()).abs() < 1e-6 {
                    format!("1/{}", (1.0 / ideal).round() as u64)
                } else {
                    fmt_prob(ideal)
                };
            sub.push(format!(
                "largest rule error {} at rule {} (line {}): {:.11} for {}",
                fmt_dev(e),
                j + 1,
                r.line,
                r.conditional,
                ideal_text
            ));
        }
        sub.push(format!(
            "largest effective skew {} (--max-skew {})",
            fmt_skew(largest_skew(b)),
            fmt_threshold(max_skew)
        ));
        let mut legend = vec![
            (Marker::Circle, RULE, "rule: relative error".to_string()),
            (
                Marker::Circle,
                PASS,
                "endpoint: relative deviation".to_string(),
            ),
            (
                Marker::Band,
                BAND,
                format!("±{} tolerance", fmt_threshold(max_skew)),
            ),
        ];
        if devs.iter().flatten().any(|d| d.abs() > max_skew) {
            legend.push((
                Marker::Circle,
                FAIL,
                "endpoint outside the tolerance".into(),
            ));
        }
        let top = self.header(&b.name, &sub, &legend)?;
        let m = self.u(16.0);
        let k = n.max(rules.len()).max(1);
        let gap = self.u(14.0);
        let panel_title_h = self.line_h(self.size_label()) + self.u(6.0);
        let avail = self.h - top - m - 2 * self.x_axis_h() - gap - 2 * panel_title_h;
        let ph = avail / 2;
        self.room(ph, self.u(60.0), "cascade")?;
        // Top panel: rule errors.
        let rule_max = rules
            .iter()
            .filter_map(|r| r.relative_error)
            .map(f64::abs)
            .fold(0.0, f64::max);
        let r_y = if rule_max > 0.0 {
            rule_max * 1.18
        } else {
            max_skew.max(1e-9)
        };
        let dev_max = devs.iter().flatten().map(|d| d.abs()).fold(0.0, f64::max);
        let d_y = dev_max.max(max_skew) * 1.18;
        let d_y = if d_y > 0.0 { d_y } else { 1e-3 };
        let yt_r = self.y_ticks(-r_y, r_y, ph);
        let yt_d = self.y_ticks(-d_y, d_y, ph);
        let x0 = self.left_edge(&yt_r).max(self.left_edge(&yt_d));
        let last_w = self.text_w(&k.to_string(), self.size_tick());
        let x1 = self.w - m - last_w / 2;
        let xlo = 0.5;
        let xhi = k as f64 + 0.5;
        let p1 = Panel {
            x0,
            y0: top + panel_title_h,
            x1,
            y1: top + panel_title_h + ph,
            xlo,
            xhi,
            ylo: -r_y,
            yhi: r_y,
        };
        let p2_top = p1.y1 + self.x_axis_h() + gap + panel_title_h;
        let p2 = Panel {
            y0: p2_top,
            y1: p2_top + ph,
            ylo: -d_y,
            yhi: d_y,
            ..p1
        };
        let lw = self.u(2.0).max(1) as u32;
        let dots = k <= 200;
        let size = self.size_label();
        // Panel 1.
        // "1/(n−i)" names the ideal only when it is one: a cascade of one rule per
        // endpoint with a uniform intended split.
        let one_per_endpoint = uniform
            && rules.iter().enumerate().all(|(j, r)| {
                r.ideal
                    .is_some_and(|i| j < n && (i * (n - j) as f64 - 1.0).abs() < 1e-12)
            });
        let ideal_name = if one_per_endpoint {
            "the ideal 1/(n−i)"
        } else {
            "the ideal conditional share"
        };
        self.text(
            &self.fit(
                &format!("Each statistic rule i: its probability q/2^31 against {ideal_name}"),
                size,
                p1.x1 - p1.x0,
            ),
            p1.x0,
            top,
            size,
            &INK,
            HPos::Left,
            VPos::Top,
            Rot::None,
        )?;
        self.y_axis(&p1, &yt_r, "relative error")?;
        let xt = self.x_int_ticks(xlo, xhi, x1 - x0);
        self.x_axis_ticks(&p1, &xt)?;
        self.path(
            vec![(p1.x0, p1.py(0.0)), (p1.x1, p1.py(0.0))],
            FRAME.to_rgba(),
            1,
        )?;
        let pts: Vec<(i32, i32)> = rules
            .iter()
            .enumerate()
            .filter_map(|(j, r)| r.relative_error.map(|e| (p1.px(j as f64 + 1.0), p1.py(e))))
            .collect();
        // Few points: a line through markers; many: small dots (a line would zigzag
        // into a solid block).
        if dots {
            self.path(pts.clone(), RULE.to_rgba(), lw)?;
        }
        for (x, y) in &pts {
            let mk = if dots { Marker::Circle } else { Marker::Dot };
            self.marker(mk, *x, *y, RULE)?;
        }
        self.frame(&p1)?;
        self.x_title(
            &p1,
            p1.y1 + self.u(6.0) + self.line_h(self.size_tick()) + self.u(8.0),
            "statistic rule (position in the cascade)",
        )?;
        // Panel 2.
        self.text(
            &self.fit(
                "Each endpoint i: its effective probability p against the intended share",
                size,
                p2.x1 - p2.x0,
            ),
            p2.x0,
            p2.y0 - panel_title_h,
            size,
            &INK,
            HPos::Left,
            VPos::Top,
            Rot::None,
        )?;
        self.y_axis(&p2, &yt_d, "relative deviation")?;
        self.x_axis_ticks(&p2, &xt)?;
        self.band(&p2, max_skew)?;
        self.path(
            vec![(p2.x0, p2.py(0.0)), (p2.x1, p2.py(0.0))],
            FRAME.to_rgba(),
            1,
        )?;
        let pts: Vec<(i32, i32, bool)> = devs
            .iter()
            .enumerate()
            .filter_map(|(i, d)| d.map(|d| (p2.px(i as f64 + 1.0), p2.py(d), d.abs() > max_skew)))
            .collect();
        if dots {
            self.path(pts.iter().map(|p| (p.0, p.1)).collect(), PASS.to_rgba(), lw)?;
        }
        for (x, y, out) in &pts {
            let mk = if dots { Marker::Circle } else { Marker::Dot };
            self.marker(mk, *x, *y, if *out { FAIL } else { PASS })?;
        }
        self.frame(&p2)?;
        self.x_title(
            &p2,
            p2.y1 + self.u(6.0) + self.line_h(self.size_tick()) + self.u(8.0),
            "endpoint (position in the cascade)",
        )
    }
}

fn class_marker(skew: f64, max_skew: f64) -> (Marker, RGBColor) {
    if skew > max_skew {
        (Marker::Triangle, FAIL)
    } else if skew < SKEW_FLOOR {
        (Marker::HollowCircle, ZERO)
    } else {
        (Marker::Circle, PASS)
    }
}

/// An endpoint's relative deviation from its intended share, as `lbaudit check` computes
/// it: the exact `n·p − 1` for a uniform split, `p/expected − 1` otherwise (`None` for an
/// endpoint the expectations give nothing).
pub fn deviation(b: &BalancerReport, e: &crate::report::EndpointReport) -> Option<f64> {
    if b.expected_split == "uniform" {
        Some(e.relative_deviation)
    } else if e.expected == 0.0 {
        None
    } else {
        Some(e.probability / e.expected - 1.0)
    }
}

/// The largest |deviation| of a balancer (the report's `max_relative_skew` when uniform).
pub fn largest_skew(b: &BalancerReport) -> f64 {
    if b.expected_split == "uniform" {
        return b.max_relative_skew;
    }
    b.endpoints
        .iter()
        .filter_map(|e| deviation(b, e))
        .map(f64::abs)
        .fold(0.0, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::audit::AuditOptions;
    use crate::graph::Graph;
    use crate::parse::{self, ParseOptions};

    /// A kube-proxy service of n endpoints whose probabilities are written with `decimals`.
    fn kube_service(n: usize, decimals: usize) -> String {
        let mut s = String::from(
            "-A KUBE-SERVICES -d 10.96.0.50/32 -p tcp -m comment --comment \"demo/big:http cluster IP\" -m tcp --dport 80 -j KUBE-SVC-DEMO\n",
        );
        for i in 0..n {
            let ip = format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255);
            s += &format!(
                "-A KUBE-SEP-E{i} -p tcp -m comment --comment \"demo/big:http\" -m tcp -j DNAT --to-destination {ip}:8080\n"
            );
            if i + 1 < n {
                let p = 1.0 / (n - i) as f64;
                s += &format!(
                    "-A KUBE-SVC-DEMO -m comment --comment \"demo/big:http\" -m statistic --mode random --probability {p:.decimals$} -j KUBE-SEP-E{i}\n"
                );
            } else {
                s += &format!(
                    "-A KUBE-SVC-DEMO -m comment --comment \"demo/big:http\" -j KUBE-SEP-E{i}\n"
                );
            }
        }
        s
    }

    /// k generic two-way balancers with a spread of skews (some exactly fair).
    fn many_balancers(k: usize) -> String {
        let ps = [
            "0.50000000000",
            "0.50001",
            "0.5001",
            "0.4999",
            "0.49999999",
            "0.5",
            "0.51",
        ];
        let mut s = String::new();
        for j in 0..k {
            let net = format!("10.{}.{}", (j >> 8) & 255, j & 255);
            s += &format!(
                "-A LB{j} -m statistic --mode random --probability {} -j DNAT --to-destination {net}.1:80\n-A LB{j} -j DNAT --to-destination {net}.2:80\n",
                ps[j % ps.len()]
            );
        }
        s
    }

    fn fixture(name: &str) -> String {
        std::fs::read_to_string(format!("{}/fixtures/{name}", env!("CARGO_MANIFEST_DIR")))
            .expect("fixture")
    }

    #[test]
    fn overview_streamed_gives_the_whole_reports_rows() {
        // Kube-proxy services, generic balancers, intended weights, counters (with their
        // test), and chains of statistic rules no traffic reaches (candidates that are no
        // balancer), in windows down to one balancer.
        let unreached = "*nat\n:PREROUTING ACCEPT [0:0]\n:LB - [0:0]\n:DEAD - [0:0]\n-A PREROUTING -j LB\n-A PREROUTING -j DEAD\n-A LB -m statistic --mode nth --every 2 --packet 0 -j DNAT --to-destination 10.0.0.1:80\n-A LB -j DNAT --to-destination 10.0.0.2:80\n-A DEAD -j ACCEPT\n-A DEAD -m statistic --mode nth --every 2 --packet 0 -j DNAT --to-destination 10.0.0.3:80\nCOMMIT\n";
        let weights = crate::expect::Expectations::parse(
            &fixture("expect/mark-cascade.csv"),
            "mark-cascade.csv",
        )
        .expect("weights");
        let cases = [
            (fixture("kube-modern.txt"), None, 1),
            (fixture("kube-2018-large.txt"), None, 1),
            (many_balancers(61), None, 1),
            (fixture("mark-cascade.txt"), Some(weights), 1),
            (fixture("ex280-10-endpoints-counters.txt"), None, 1),
            (fixture("counters-skewed.txt"), None, 1),
            (unreached.to_string(), None, 2),
            // 40 candidates that are no balancer before 90 that are: windows of none.
            (crate::testing::unreached_then_services(), None, 130),
        ];
        for (text, expectations, candidates) in cases {
            let rs = parse::parse(&text, &ParseOptions { lenient: false }).expect("parses");
            let graph = Graph::build(&rs, false).expect("resolves");
            let found = crate::balance::candidates(&graph);
            assert!(found.len() >= candidates);
            // (The whole report simulates and tests the counters; the rows need neither.)
            let opts = AuditOptions {
                connections: Some(500),
                expectations,
                ..AuditOptions::default()
            };
            let balancers = crate::balance::analyse_all(&graph, &found);
            match candidates {
                2 => assert_eq!(
                    (found.len(), balancers.len()),
                    (2, 1),
                    "DEAD is no balancer"
                ),
                130 => assert_eq!((found.len(), balancers.len()), (130, 90)),
                _ => {}
            }
            let (audits, info) = audit::run(&graph, &balancers, &opts);
            let whole = Report::new("t", &rs, &balancers, Some(&audits), info, Vec::new());
            let rows = overview_rows(&whole);
            assert_eq!(rows.len(), balancers.len());
            for window in [1, 2, 3, 1000] {
                let (streamed, lone) =
                    overview_streamed(&graph, &found, &opts, window).expect("streams");
                assert_eq!(streamed, rows, "window {window}");
                // The balancer is kept only when it is the only one.
                assert_eq!(
                    lone.map(|b| b.name),
                    (balancers.len() == 1).then(|| balancers[0].name.clone()),
                    "window {window}"
                );
            }
        }
    }

    /// The report of a text (one balancer chosen by a name prefix when given) and the
    /// cascade of its first balancer.
    fn report(text: &str, only: Option<&str>, connections: u64) -> (Report, Vec<CascadeRule>) {
        let rs = parse::parse(text, &ParseOptions { lenient: false }).expect("parses");
        let graph = Graph::build(&rs, false).expect("resolves");
        let balancers: Vec<Balancer> = crate::balance::find(&graph)
            .into_iter()
            .filter(|b| only.is_none_or(|o| b.name.starts_with(o)))
            .collect();
        let opts = AuditOptions {
            connections: Some(connections),
            ..AuditOptions::default()
        };
        let (audits, info) = audit::run(&graph, &balancers, &opts);
        let report = Report::new("test", &rs, &balancers, Some(&audits), info, Vec::new());
        let rules = statistic_rules(&graph, &balancers[0]);
        let c = cascade(&rules, &report.balancers[0]);
        (report, c)
    }

    fn assert_layout(name: &str, report: &Report, rules: &[CascadeRule], kind: PlotKind) {
        for (w, h) in [(1000, 600), (640, 400), (1600, 900), (400, 300)] {
            let opts = PlotOptions {
                width: w,
                height: h,
                title: None,
                max_skew: 1e-3,
            };
            let rows = overview_rows(report);
            let chart = match kind {
                PlotKind::Overview => Chart::Overview(&rows),
                PlotKind::Endpoints => Chart::Endpoints(report),
                PlotKind::Cascade => Chart::Cascade(report, rules),
            };
            let boxes = match text_boxes(&chart, &opts) {
                Ok(b) => b,
                // The smallest size may be too small for a chart: a usage error, fine.
                Err(PlotError::TooSmall(_)) if w < 640 => continue,
                Err(e) => panic!("{name} {w}x{h}: {e}"),
            };
            assert!(boxes.len() >= 5, "{name} {w}x{h}: {boxes:?}");
            let problems = layout_problems(&boxes, w, h);
            assert!(
                problems.is_empty(),
                "{name} {w}x{h}:\n{}",
                problems.join("\n")
            );
        }
    }

    #[test]
    fn no_text_overlaps_or_leaves_the_image() {
        for n in [2, 10, 41, 100, 5000] {
            let (r, c) = report(&kube_service(n, 5), None, 0);
            assert_layout(&format!("{n} endpoints"), &r, &c, PlotKind::Endpoints);
            if n <= 100 {
                assert_layout(&format!("{n} endpoints"), &r, &c, PlotKind::Cascade);
            }
        }
        let (r, c) = report(&fixture("ex280-10-endpoints-counters.txt"), None, 20_000);
        assert_layout("counters", &r, &c, PlotKind::Endpoints);
        let (r, c) = report(&fixture("kube-2018-large.txt"), Some("batch/crawler"), 0);
        assert_layout("kube-2018 cascade", &r, &c, PlotKind::Cascade);
        for k in [3, 30, 61, 30_000] {
            let (r, c) = report(&many_balancers(k), None, 0);
            assert_layout(&format!("{k} balancers"), &r, &c, PlotKind::Overview);
        }
        let (r, c) = report(&fixture("kube-modern.txt"), None, 0);
        assert_layout("kube-modern", &r, &c, PlotKind::Overview);
    }

    #[test]
    fn bars_then_sorted_deviations() {
        // Up to MAX_BARS endpoints every endpoint is named under its bar; past it, only
        // the two extremes are, beside the sorted curve.
        let opts = PlotOptions {
            width: 1000,
            height: 600,
            title: None,
            max_skew: 1e-3,
        };
        let (r, _) = report(&kube_service(10, 10), None, 0);
        let boxes = text_boxes(&Chart::Endpoints(&r), &opts).expect("draws");
        for e in &r.balancers[0].endpoints {
            assert!(boxes.iter().any(|b| b.text == e.endpoint), "{}", e.endpoint);
        }
        let (r, _) = report(&kube_service(100, 5), None, 0);
        let boxes = text_boxes(&Chart::Endpoints(&r), &opts).expect("draws");
        let named = r.balancers[0]
            .endpoints
            .iter()
            .filter(|e| {
                boxes
                    .iter()
                    .any(|b| b.text.starts_with(&format!("{}  ", e.endpoint)))
            })
            .count();
        assert_eq!(named, 2);
    }

    #[test]
    fn cascade_rules_against_the_ideal() {
        // 5-decimal era: rule i of n is written %0.5f of 1/(n−i).
        let (r, c) = report(&kube_service(400, 5), None, 0);
        assert_eq!(c.len(), 399);
        for (i, rule) in c.iter().enumerate() {
            let ideal = 1.0 / (400 - i) as f64;
            assert!((rule.ideal.unwrap() - ideal).abs() < 1e-15 * ideal.max(1e-3));
            let q = rule.threshold.unwrap();
            assert_eq!(rule.conditional, f64::from(q) / 2f64.powi(31));
        }
        // 1/319 and 1/320 are both written 0.00313.
        assert_eq!(c[80].threshold, c[81].threshold);
        assert!(largest_skew(&r.balancers[0]) > 1e-3);
        // 10 decimals: every rule within 2^-31 relative of its ideal times (n − i).
        let (_, c) = report(&kube_service(400, 10), None, 0);
        assert!(c.iter().all(|r| r.relative_error.unwrap().abs() < 1e-6));
    }

    #[test]
    fn font_measures_text() {
        register();
        let f = FontDesc::new(FontFamily::Name(FAMILY), 20.0, FontStyle::Normal);
        let (w, _) = f.box_size("10.0.0.1:80").expect("the embedded font loads");
        assert!(w > 60 && w < 160, "{w}");
        // Our advance widths agree with ab_glyph's (same scale, kerning aside).
        let text = "Mmil 0123456789.:/-";
        let (w, _) = f.resize(400.0).box_size(text).expect("measures");
        let ours = Metrics::get().width(text, 400.0);
        assert!((f64::from(w) - ours).abs() < 0.01 * ours, "{w} vs {ours}");
        assert_eq!(Metrics::get().glyph('A'), 36);
        assert_eq!(Metrics::get().glyph('\u{10FFFF}'), 0);
    }

    #[test]
    fn tick_steps_and_labels() {
        let (at, step) = ticks(0.0, 0.56, 6, false);
        assert_eq!(step, 0.1);
        assert_eq!(at.len(), 6);
        assert_eq!(fmt_tick(0.30000000000000004, 0.1, 0.56), "0.3");
        let (at, step) = ticks(-5.9e-3, 5.9e-3, 6, false);
        assert_eq!(step, 2e-3);
        assert_eq!(fmt_tick(at[0], step, 5.9e-3), "\u{2212}0.004");
        let (at, step) = ticks(-5.9e-7, 5.9e-7, 6, false);
        assert_eq!(fmt_tick(at[0], step, 5.9e-7), "\u{2212}4e-7");
        assert_eq!(fmt_tick(5e-4, 5e-4, 1.1e-3), "5e-4");
        assert_eq!(fmt_tick(10.0 * 1e-4, 5e-4, 1.1e-3), "1e-3");
        assert_eq!(fmt_tick(3.0 * 5e-4, 5e-4, 1.6e-3), "1.5e-3");
        assert_eq!(fmt_tick(0.0, step, 5.9e-3), "0");
        assert_eq!(fmt_decade(-12), "1e-12");
        assert_eq!(fmt_decade(-1), "0.1");
        assert_eq!(fmt_threshold(1e-3), "1e-3");
        assert_eq!(fmt_threshold(0.05), "0.05");
        assert_eq!(fmt_threshold(2.5e-7), "2.5e-7");
        assert_eq!(fmt_count(1_000_000), "1,000,000");
        assert_eq!(fmt_count(999), "999");
        let (at, _) = ticks(0.5, 5000.5, 8, true);
        assert!(at.iter().all(|v| v.fract() == 0.0));
    }

    #[test]
    fn formats_from_extensions() {
        assert_eq!(ImageFormat::from_path("a/b.svg"), Some(ImageFormat::Svg));
        assert_eq!(ImageFormat::from_path("b.PNG"), Some(ImageFormat::Png));
        assert_eq!(ImageFormat::from_path("b.pdf"), None);
        assert_eq!(ImageFormat::from_path("png"), None);
    }
}
