//! `-m statistic`: the kernel's integer form of a rule and its exact meaning.
//!
//! iptables (extensions/libxt_statistic.c) stores `--probability P` as
//! `q = lround(0x80000000 * P)` (P parsed with `strtod`), and the kernel
//! (net/netfilter/xt_statistic.c) matches when `(get_random_u32() & 0x7FFFFFFF) < q`.
//! `--every N --packet P` is stored as `every = N - 1`, `count = every - P`; each
//! packet that reaches the match does `count = (count == every) ? 0 : count + 1`
//! and matches when the new count is 0, so the k-th packet (0-based) matches iff
//! `k ≡ P (mod N)`.

use crate::model::Match;

/// 2^31: the denominator of a random-mode threshold.
pub const SCALE: u64 = 1 << 31;

/// A validated `-m statistic` match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Statistic {
    /// Matches when a uniform 31-bit draw is `< threshold` (inverted: `>=`).
    Random { threshold: u32, inverted: bool },
    /// Matches the packets `k ≡ packet (mod every)` among those reaching it (inverted: the others).
    Nth {
        every: u32,
        packet: u32,
        inverted: bool,
    },
}

impl Statistic {
    /// Probability, as the nearest f64, that the match is true for a packet that reaches it
    /// (the long-run share for `nth`).
    pub fn match_share(&self) -> f64 {
        match *self {
            Statistic::Random {
                threshold,
                inverted,
            } => {
                let p = f64::from(threshold) / SCALE as f64;
                if inverted { 1.0 - p } else { p }
            }
            Statistic::Nth {
                every, inverted, ..
            } => {
                let p = 1.0 / f64::from(every);
                if inverted { 1.0 - p } else { p }
            }
        }
    }

    /// The text iptables-save prints for this match's options (without `-m statistic`).
    pub fn to_save(&self) -> String {
        match *self {
            Statistic::Random {
                threshold,
                inverted,
            } => format!(
                "--mode random {}--probability {:.11}",
                if inverted { "! " } else { "" },
                f64::from(threshold) / SCALE as f64
            ),
            Statistic::Nth {
                every,
                packet,
                inverted,
            } => format!(
                "--mode nth {}--every {} --packet {}",
                if inverted { "! " } else { "" },
                every,
                packet
            ),
        }
    }
}

/// The kernel threshold for a `--probability` text, exactly as iptables computes it:
/// `lround(0x80000000 * strtod(text))`. Rust's `f64::from_str` is correctly rounded like
/// glibc's `strtod`; the product with 2^31 is exact in binary floating point, and
/// `f64::round` rounds halves away from zero like `lround`.
///
/// Returns `None` when the text is not a number in [0, 1].
pub fn threshold_from_text(text: &str) -> Option<u32> {
    if let Some(q) = short_decimal_threshold(text.as_bytes()) {
        return Some(q);
    }
    decimal_threshold(text)
}

/// [`threshold_from_text`] for the form iptables and kube-proxy print, `0.` and 1 to 19
/// digits, in integers: with `p = n / 10^d`, `2^31·p = q + r / 10^d`. The f64 that
/// `strtod` makes of the text is within 2^-53 of `p` (p < 1), so 2^31 times it is within
/// 2^-22 of `2^31·p` and rounds to the same integer unless `r / 10^d` is that close to
/// one half; then (and for any other form) `None`, and the float path decides.
fn short_decimal_threshold(t: &[u8]) -> Option<u32> {
    let digits = t.strip_prefix(b"0.")?;
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    // The digits, checked and summed in one pass (19 digits fit in a u64).
    let mut n = 0u64;
    for &c in digits {
        let d = c.wrapping_sub(b'0');
        if d > 9 {
            return None;
        }
        n = n * 10 + u64::from(d);
    }
    let d = digits.len() as u32;
    if d <= 14 {
        short_decimal_threshold_u64(n, d)
    } else {
        short_decimal_threshold_u128(n, d)
    }
}

/// [`short_decimal_threshold`] of the `d` digits `n` (`d <= 19`), in `u128`.
fn short_decimal_threshold_u128(n: u64, d: u32) -> Option<u32> {
    let den = 10u128.pow(d);
    let x = u128::from(n) << 31;
    let (q, r) = (x / den, x % den);
    // |r/den - 1/2| = |2r - den| / (2 den), which must exceed 2^-21.
    if (2 * r).abs_diff(den) << 20 <= den {
        return None;
    }
    u32::try_from(q + u128::from(2 * r > den)).ok()
}

/// [`short_decimal_threshold`] of the `d <= 14` digits `n`, in `u64`: with `10^d = 2^d·5^d`,
/// `2^31·n / 10^d = m / 5^d` for `m = n·2^(31-d) < 5^d·2^31 <= 5^14·2^31 < 2^64`, and
/// the remainder `r` of the `u128` form is `2^d` times the remainder `r'` of this one,
/// so the tests on `r / 10^d` are the same on `r' / 5^d`.
fn short_decimal_threshold_u64(n: u64, d: u32) -> Option<u32> {
    /// `5^d` for `d <= 14`.
    const POW5: [u64; 15] = {
        let mut t = [1u64; 15];
        let mut i = 1;
        while i < 15 {
            t[i] = t[i - 1] * 5;
            i += 1;
        }
        t
    };
    let den = *POW5.get(d as usize)?;
    let m = n << (31 - d);
    let (q, r) = (m / den, m % den);
    if (2 * r).abs_diff(den) << 20 <= den {
        return None;
    }
    u32::try_from(q + u64::from(2 * r > den)).ok()
}

/// [`threshold_from_text`] through `f64`, as iptables does it.
fn decimal_threshold(text: &str) -> Option<u32> {
    let t = text.trim();
    // strtod accepts more (hex floats, "inf"), but iptables prints plain decimals and
    // anything else in a dump is a mistake worth reporting.
    if t.is_empty()
        || !t
            .bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-'))
    {
        return None;
    }
    let p: f64 = t.parse().ok()?;
    if !(0.0..=1.0).contains(&p) {
        return None;
    }
    let q = (p * SCALE as f64).round();
    // p <= 1 so q <= 2^31, which fits in u32.
    Some(q as u32)
}

/// What is wrong with a statistic match: the column of the offending option and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatisticError {
    pub col: u32,
    pub text: String,
    pub message: String,
    pub hint: String,
}

/// Reads and validates the options of a `-m statistic` match.
pub fn from_match(m: &Match<'_>) -> Result<Statistic, StatisticError> {
    let err = |col: u32, text: &str, message: &str, hint: &str| StatisticError {
        col,
        text: text.to_string(),
        message: message.to_string(),
        hint: hint.to_string(),
    };
    let mode = m.opt("mode");
    let probability = m.opt("probability");
    let every = m.opt("every");
    let packet = m.opt("packet");
    let mode_name = match mode {
        Some(o) => o.value(),
        // iptables defaults to random mode when only --probability is given.
        None if probability.is_some() => "random",
        None => {
            return Err(err(
                m.col,
                "-m statistic",
                "statistic match without --mode",
                "add `--mode random --probability P` or `--mode nth --every N --packet P`",
            ));
        }
    };
    match mode_name {
        "random" => {
            let Some(p) = probability else {
                return Err(err(
                    m.col,
                    "-m statistic --mode random",
                    "random mode without --probability",
                    "add `--probability P` with P between 0 and 1",
                ));
            };
            let threshold = threshold_from_text(p.value()).ok_or_else(|| {
                err(
                    p.col,
                    p.value(),
                    "--probability must be a number between 0 and 1",
                    "write the probability as a decimal in [0, 1], e.g. 0.50000000000",
                )
            })?;
            Ok(Statistic::Random {
                threshold,
                inverted: p.negated,
            })
        }
        "nth" => {
            let Some(e) = every else {
                return Err(err(
                    m.col,
                    "-m statistic --mode nth",
                    "nth mode without --every",
                    "add `--every N` with N >= 1",
                ));
            };
            let n: u32 = match e.value().parse() {
                Ok(n) if n >= 1 => n,
                _ => {
                    return Err(err(
                        e.col,
                        e.value(),
                        "--every must be a whole number of at least 1",
                        "use `--every N` with N >= 1 (every 1 matches every packet)",
                    ));
                }
            };
            let pk: u32 = match packet {
                None => 0,
                Some(pk) => match pk.value().parse() {
                    Ok(v) if v < n => v,
                    _ => {
                        return Err(err(
                            pk.col,
                            pk.value(),
                            "--packet must be a whole number from 0 to every-1",
                            "use `--packet P` with 0 <= P < N",
                        ));
                    }
                },
            };
            Ok(Statistic::Nth {
                every: n,
                packet: pk,
                inverted: e.negated,
            })
        }
        other => Err(err(
            mode.map_or(m.col, |o| o.col),
            other,
            "unknown statistic mode",
            "use `--mode random` or `--mode nth`",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The integer path gives what the float path gives, whenever it answers, on
        /// every length of `0.` decimals (and answers for all but a sliver of them).
        #[test]
        fn integer_thresholds_are_the_float_ones(n in any::<u64>(), d in 1usize..=19) {
            let digits = format!("{:0>19}", n % 10u64.pow(19));
            let text = format!("0.{}", &digits[..d]);
            let fast = short_decimal_threshold(text.as_bytes());
            if let Some(q) = fast {
                prop_assert_eq!(Some(q), decimal_threshold(&text), "{}", text);
            }
        }
    }

    proptest! {
        /// The `u64` path for up to 14 digits gives what the `u128` form gives.
        #[test]
        fn u64_thresholds_are_the_u128_ones(n in any::<u64>(), d in 1u32..=14) {
            let n = n % 10u64.pow(d);
            prop_assert_eq!(
                short_decimal_threshold_u64(n, d),
                short_decimal_threshold_u128(n, d),
                "{} {}",
                n,
                d
            );
        }
    }

    #[test]
    fn integer_thresholds_near_halves_fall_back() {
        // Whatever the integer path answers is the float path's answer.
        for text in [
            "0.5",
            "0.00000000023283064365",
            "0.0000000002328306437",
            "0.0000000002",
            "0.3333333333",
            "0.33333333333",
            "0.1000000000",
            "0.9999999999",
            "0.0000000000",
            "0.99999999999999999999",
        ] {
            if let Some(q) = short_decimal_threshold(text.as_bytes()) {
                assert_eq!(Some(q), decimal_threshold(text), "{text}");
            }
            assert_eq!(threshold_from_text(text), decimal_threshold(text), "{text}");
        }
        // 2^31 * 0.0000000002328306436 = 0.49999999994…, within 2^-21 of a half:
        // declined, so f64 decides.
        assert_eq!(short_decimal_threshold(b"0.0000000002328306436"), None);
        assert_eq!(short_decimal_threshold(b"0.25"), Some(1 << 29));
    }

    #[test]
    fn thresholds_round_like_lround() {
        // 2^31 / 2 exactly.
        assert_eq!(threshold_from_text("0.50000000000"), Some(1 << 30));
        assert_eq!(threshold_from_text("0.5"), Some(1 << 30));
        // 2^31/3 = 715827882.67 -> 715827883; printed back as 0.33333333349.
        assert_eq!(threshold_from_text("0.33333333349"), Some(715_827_883));
        assert_eq!(threshold_from_text("0.3333333333"), Some(715_827_883));
        // The 5-decimal era: 0.33333 * 2^31 = 715820724.39 -> 715820724, printed 0.33332999982.
        assert_eq!(threshold_from_text("0.33333"), Some(715_820_724));
        assert_eq!(threshold_from_text("0.33332999982"), Some(715_820_724));
        assert_eq!(threshold_from_text("1"), Some(1 << 31));
        assert_eq!(threshold_from_text("0"), Some(0));
        assert_eq!(threshold_from_text("1.5"), None);
        assert_eq!(threshold_from_text("-0.1"), None);
        assert_eq!(threshold_from_text("abc"), None);
        assert_eq!(threshold_from_text("nan"), None);
    }

    #[test]
    fn printed_form_round_trips() {
        // For every threshold, the %.11f text parses back to the same threshold.
        for q in (0..=SCALE as u32).step_by(7_919) {
            let s = Statistic::Random {
                threshold: q,
                inverted: false,
            };
            let text = s.to_save();
            let p = text.rsplit(' ').next().unwrap();
            assert_eq!(threshold_from_text(p), Some(q), "{text}");
        }
    }
}
