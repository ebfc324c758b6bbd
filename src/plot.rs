//! Charts (being written).

use crate::cli::{AuditArgs, InputArgs, SelectArgs};

/// Which chart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PlotKind {
    Endpoints,
    Overview,
    Cascade,
}

/// `lbaudit plot` arguments.
#[derive(Debug, clap::Args)]
pub struct PlotArgs {
    #[command(flatten)]
    pub input: InputArgs,
    /// Output file: `.svg` or `.png`.
    #[arg(short = 'o', long)]
    pub output: String,
    #[arg(long, value_enum)]
    pub kind: Option<PlotKind>,
    #[arg(long, default_value_t = 1000)]
    pub width: u32,
    #[arg(long, default_value_t = 600)]
    pub height: u32,
    #[arg(long)]
    pub title: Option<String>,
    #[arg(long, default_value_t = 1e-3)]
    pub max_skew: f64,
    #[command(flatten)]
    pub select: SelectArgs,
    #[command(flatten)]
    pub audit: AuditArgs,
}

/// Runs `lbaudit plot`.
pub fn cmd_plot(a: &PlotArgs) -> crate::Result<i32> {
    let _ = a;
    unimplemented!("plot being written")
}
