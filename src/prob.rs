//! Exact probabilities.
//!
//! Every probability the evaluator produces is a product and sum of factors
//! `q / 2^31` (random mode) and `1 / N`, `(N - 1) / N` (nth mode), so it is a rational
//! `num / (odd · 2^shift)` with `odd` odd. [`Prob`] keeps that form exactly, with
//! arbitrary-precision integers, and converts to the nearest `f64` only at the end.

use num_bigint::{BigInt, BigUint, Sign};
use num_integer::Integer;
use num_traits::{One, ToPrimitive, Zero};
use std::borrow::Cow;
use std::cmp::Ordering;
use std::fmt;

/// An exact non-negative rational `num / (odd · 2^shift)`, kept in lowest terms.
#[derive(PartialEq, Eq, Hash)]
pub struct Prob {
    num: BigUint,
    odd: BigUint,
    shift: u64,
}

impl Clone for Prob {
    fn clone(&self) -> Self {
        Self {
            num: self.num.clone(),
            odd: self.odd.clone(),
            shift: self.shift,
        }
    }

    /// Reuses the allocations of `self` (the walk recycles its long weights).
    fn clone_from(&mut self, source: &Self) {
        self.num.clone_from(&source.num);
        self.odd.clone_from(&source.odd);
        self.shift = source.shift;
    }
}

impl Prob {
    pub fn zero() -> Self {
        Self {
            num: BigUint::zero(),
            odd: BigUint::one(),
            shift: 0,
        }
    }

    pub fn one() -> Self {
        Self {
            num: BigUint::one(),
            odd: BigUint::one(),
            shift: 0,
        }
    }

    /// `num / den` for machine integers (den > 0).
    pub fn ratio(num: u64, den: u64) -> Self {
        assert!(den > 0, "zero denominator");
        let tz = den.trailing_zeros();
        let mut p = Self {
            num: BigUint::from(num),
            odd: BigUint::from(den >> tz),
            shift: u64::from(tz),
        };
        p.normalize();
        p
    }

    pub fn is_zero(&self) -> bool {
        self.num.is_zero()
    }

    pub fn is_one(&self) -> bool {
        self.shift == 0 && self.odd.is_one() && self.num.is_one()
    }

    /// Is the denominator a power of two (a dyadic rational)?
    pub fn is_dyadic(&self) -> bool {
        self.odd.is_one()
    }

    fn normalize(&mut self) {
        if self.num.is_zero() {
            self.odd = BigUint::one();
            self.shift = 0;
            return;
        }
        let tz = self.num.trailing_zeros().unwrap_or(0).min(self.shift);
        if tz > 0 {
            self.num >>= tz;
            self.shift -= tz;
        }
        if !self.odd.is_one() {
            let g = self.num.gcd(&self.odd);
            if !g.is_one() {
                self.num /= &g;
                self.odd /= &g;
            }
        }
    }

    /// `self · a / b` for machine integers (b > 0).
    pub fn mul_ratio(&self, a: u64, b: u64) -> Self {
        assert!(b > 0, "zero denominator");
        if a == 0 || self.num.is_zero() {
            return Self::zero();
        }
        let (a, b_odd, shift) = self.cancel_twos(a, b);
        let mut p = Self {
            num: &self.num * a,
            odd: if b_odd == 1 {
                self.odd.clone()
            } else {
                &self.odd * b_odd
            },
            shift,
        };
        p.normalize();
        p
    }

    /// `self ·= a / b` for machine integers (b > 0), in place.
    pub fn mul_ratio_assign(&mut self, a: u64, b: u64) {
        assert!(b > 0, "zero denominator");
        if a == 0 || self.num.is_zero() {
            *self = Self::zero();
            return;
        }
        let (a, b_odd, shift) = self.cancel_twos(a, b);
        self.num *= a;
        if b_odd != 1 {
            self.odd *= b_odd;
        }
        self.shift = shift;
        self.normalize();
    }

    /// For `self · a / b`: the factors 2 of `a` that cancel against the denominator's power
    /// of two right away, so that the product needs no shift to be in lowest terms (a
    /// numerator over a shift is odd). Returns `(a', odd part of b, new shift)`.
    fn cancel_twos(&self, a: u64, b: u64) -> (u64, u64, u64) {
        let shift = self.shift + u64::from(b.trailing_zeros());
        let t = u64::from(a.trailing_zeros()).min(shift);
        (a >> t, b >> b.trailing_zeros(), shift - t)
    }

    /// `self · other`.
    pub fn mul(&self, other: &Prob) -> Self {
        let mut p = Self {
            num: &self.num * &other.num,
            odd: &self.odd * &other.odd,
            shift: self.shift + other.shift,
        };
        p.normalize();
        p
    }

    /// `self + other`.
    pub fn add(&self, other: &Prob) -> Self {
        if other.num.is_zero() {
            return self.clone();
        }
        if self.num.is_zero() {
            return other.clone();
        }
        let shift = self.shift.max(other.shift);
        let (num, odd) = if self.odd == other.odd {
            (
                (&self.num << (shift - self.shift)) + (&other.num << (shift - other.shift)),
                self.odd.clone(),
            )
        } else {
            (
                ((&self.num * &other.odd) << (shift - self.shift))
                    + ((&other.num * &self.odd) << (shift - other.shift)),
                &self.odd * &other.odd,
            )
        };
        let mut p = Self { num, odd, shift };
        p.normalize();
        p
    }

    /// `self += other`, in place when the odd parts agree (always, for random-mode walks).
    pub fn add_assign(&mut self, other: &Prob) {
        if other.num.is_zero() {
            return;
        }
        if self.num.is_zero() {
            self.clone_from(other);
            return;
        }
        if self.odd != other.odd {
            *self = self.add(other);
            return;
        }
        if self.shift >= other.shift {
            let d = self.shift - other.shift;
            if d == 0 {
                self.num += &other.num;
            } else {
                self.num += &other.num << d;
            }
        } else {
            self.num <<= other.shift - self.shift;
            self.num += &other.num;
            self.shift = other.shift;
        }
        self.normalize();
    }

    /// `self - other`, or `None` when `other > self`.
    pub fn checked_sub(&self, other: &Prob) -> Option<Self> {
        let shift = self.shift.max(other.shift);
        let l = (&self.num * &other.odd) << (shift - self.shift);
        let r = (&other.num * &self.odd) << (shift - other.shift);
        if r > l {
            return None;
        }
        let mut p = Self {
            num: l - r,
            odd: &self.odd * &other.odd,
            shift,
        };
        p.normalize();
        Some(p)
    }

    /// `1 - self`, or `None` when `self > 1`.
    pub fn complement(&self) -> Option<Self> {
        let den = self.denominator();
        if self.num > den {
            return None;
        }
        let mut p = Self {
            num: den - &self.num,
            odd: self.odd.clone(),
            shift: self.shift,
        };
        p.normalize();
        Some(p)
    }

    fn denominator(&self) -> BigUint {
        &self.odd << self.shift
    }

    /// The exact value as `(numerator, denominator)`.
    pub fn to_fraction(&self) -> (BigUint, BigUint) {
        (self.num.clone(), self.denominator())
    }

    /// The nearest `f64` (ties to even), computed from the exact value: in machine words
    /// when the numbers fit (a numerator of up to 256 bits over a power of two, as in
    /// kube-proxy cascades of up to eight rules; up to 128 bits over a denominator whose
    /// odd part has up to 120), with big integers otherwise.
    pub fn to_f64(&self) -> f64 {
        self.to_f64_small().unwrap_or_else(|| self.to_f64_general())
    }

    /// [`Prob::to_f64`] in machine words, when the numbers fit.
    fn to_f64_small(&self) -> Option<f64> {
        let shift = i64::from(u32::try_from(self.shift).ok()?);
        if self.odd.is_one() {
            let (hi, lo) = wide(&self.num)?;
            return Some(round_u256(hi, lo, -shift));
        }
        let num = small(&self.num)?;
        if num == 0 {
            return Some(0.0);
        }
        ratio_to_f64(num, small(&self.odd)?, -shift)
    }

    /// [`Prob::to_f64`] with big integers, for any value.
    fn to_f64_general(&self) -> f64 {
        nearest_f64(&BigInt::from(self.num.clone()), &self.odd, self.shift)
    }

    /// The nearest `f64` to `n · self − 1`: the relative deviation of this probability
    /// from the ideal share `1/n`, computed exactly before rounding: in machine words when
    /// the numbers fit (a numerator of up to 192 bits over a power of two of up to 2^255;
    /// `n · num` and the denominator below 2^128, its odd part of up to 120 bits), with
    /// big integers otherwise.
    pub fn relative_deviation(&self, n: u64) -> f64 {
        self.relative_deviation_small(n)
            .unwrap_or_else(|| self.relative_deviation_general(n))
    }

    /// [`Prob::relative_deviation`] in machine words, when the numbers fit:
    /// `(n · num − den) / den` with both terms below 2^256 for a power of two `den`, below
    /// 2^128 otherwise.
    fn relative_deviation_small(&self, n: u64) -> Option<f64> {
        if self.odd.is_one() {
            let num = wide(&self.num)?;
            if self.shift >= 256 || num.0 >> 64 != 0 {
                return None;
            }
            return Some(deviation_u256(num, n, self.shift as u32));
        }
        let num = small(&self.num)?;
        let odd = small(&self.odd)?;
        if self.shift >= 128 || u64::from(odd.leading_zeros()) < self.shift {
            return None;
        }
        let den = odd << self.shift;
        let scaled = num.checked_mul(u128::from(n))?;
        let (mag, negative) = if scaled >= den {
            (scaled - den, false)
        } else {
            (den - scaled, true)
        };
        if mag == 0 {
            return Some(0.0);
        }
        let v = ratio_to_f64(mag, odd, -(self.shift as i64))?;
        Some(if negative { -v } else { v })
    }

    /// [`Prob::relative_deviation`] with big integers, for any value.
    fn relative_deviation_general(&self, n: u64) -> f64 {
        let scaled = BigInt::from(&self.num * n);
        let den = BigInt::from(self.denominator());
        nearest_f64(&(scaled - den), &self.odd, self.shift)
    }

    /// Number of bits in the numerator and denominator (a measure of the exact form's size).
    pub fn bits(&self) -> u64 {
        self.num.bits() + self.odd.bits() + self.shift
    }
}

/// A rigorous approximation of a non-negative number: the value lies in
/// `[mant · 2^exp, (mant + err) · 2^exp]`. `mant` has 128 significant bits (its top bit is
/// set) unless the value is exactly 0, so the relative error is below `err · 2^-127`;
/// every operation truncates and counts what it dropped in `err` (units in the last
/// place), so the bound stays one-sided and rigorous. A conversion from an exact value
/// adds at most 1, an addition the operands' errors plus at most 1; an outcome of a walk
/// sums at most one conversion per branch, and walks stop at [`crate::eval::STEP_LIMIT`]
/// (2·10^8) rule evaluations, so `err` stays below 2^30 and the relative error below
/// 2^-97 (6·10^-30), far under 1e-12.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Approx {
    mant: u128,
    exp: i64,
    err: u64,
}

impl Approx {
    pub const ZERO: Approx = Approx {
        mant: 0,
        exp: 0,
        err: 0,
    };

    /// The exact value truncated to 128 significant bits.
    pub fn from_prob(p: &Prob) -> Self {
        if p.num.is_zero() {
            return Self::ZERO;
        }
        let shift = i64::try_from(p.shift).expect("shift fits i64");
        // value = q · 2^-(k + shift) (+ a remainder below one unit when `inexact`)
        let (q, k, inexact) = if p.odd.is_one() {
            (Cow::Borrowed(&p.num), 0, false)
        } else {
            // At least 129 bits of quotient, so that truncation below drops a bit.
            let k = (129 + p.odd.bits() as i64 - p.num.bits() as i64).max(0);
            let (q, r) = (&p.num << k as u64).div_rem(&p.odd);
            (Cow::Owned(q), k, !r.is_zero())
        };
        let b = q.bits() as i64;
        if b <= 128 {
            debug_assert!(!inexact);
            let m = q.to_u128().expect("fits") << (128 - b);
            return Self {
                mant: m,
                exp: -(k + shift) - (128 - b),
                err: 0,
            };
        }
        let drop = (b - 128) as u64;
        let mant = (q.as_ref() >> drop).to_u128().expect("128 bits");
        let dropped = inexact || q.trailing_zeros().is_some_and(|tz| tz < drop);
        Self {
            mant,
            exp: drop as i64 - k - shift,
            err: u64::from(dropped),
        }
    }

    pub fn is_zero(&self) -> bool {
        self.mant == 0 && self.err == 0
    }

    /// Is the value certainly exactly `mant · 2^exp` (no error)?
    pub fn is_exact(&self) -> bool {
        self.err == 0
    }

    /// The sum, with the error of both operands and of the alignment counted.
    #[must_use]
    pub fn add(&self, other: &Approx) -> Approx {
        if other.is_zero() {
            return *self;
        }
        if self.is_zero() {
            return *other;
        }
        let (a, b) = if self.exp >= other.exp {
            (self, other)
        } else {
            (other, self)
        };
        let d = a.exp.abs_diff(b.exp);
        let (shifted, lost) = if d >= 128 {
            (0, b.mant != 0)
        } else {
            (b.mant >> d, d > 0 && b.mant & ((1u128 << d) - 1) != 0)
        };
        let b_err = if d >= 64 {
            u64::from(b.err != 0)
        } else {
            (b.err >> d) + u64::from(b.err & ((1u64 << d) - 1) != 0)
        };
        let err = a.err.saturating_add(b_err).saturating_add(u64::from(lost));
        match a.mant.overflowing_add(shifted) {
            (sum, false) => Approx {
                mant: sum,
                exp: a.exp,
                err,
            },
            (sum, true) => {
                // The carry is bit 128: keep the top 128 bits of carry:sum.
                let low = u64::from(sum & 1 == 1);
                Approx {
                    mant: (sum >> 1) | (1u128 << 127),
                    exp: a.exp + 1,
                    err: err.saturating_add(low).div_ceil(2),
                }
            }
        }
    }

    /// An upper bound of the relative error |value − estimate| / value.
    pub fn relative_error_bound(&self) -> f64 {
        if self.err == 0 {
            return 0.0;
        }
        // err / mant, rounded up generously (both conversions are within 2^-52).
        self.err as f64 / self.mant as f64 * (1.0 + 1e-15)
    }

    /// A value at least as large as the upper end, as `(mant, exp)`.
    fn upper(&self) -> (BigUint, i64) {
        (BigUint::from(self.mant) + self.err, self.exp)
    }

    /// The f64 nearest to the value and whether it is certainly the correctly rounded one:
    /// `true` when both ends of the interval round to the same f64. Otherwise (the interval
    /// holds a rounding boundary: about one value in 2^70 for a fresh truncation) the f64
    /// nearest to the lower end is returned, within one ulp of the correct one.
    pub fn to_f64_checked(&self) -> (f64, bool) {
        let lo = round_u128(self.mant, self.exp, false);
        if self.err == 0 {
            return (lo, true);
        }
        let hi = match self.mant.checked_add(u128::from(self.err)) {
            Some(m) => round_u128(m, self.exp, false),
            None => {
                // 2^128 + m: its top 128 bits, and the dropped last bit (a half) as the
                // sticky fraction.
                let m = self.mant.wrapping_add(u128::from(self.err));
                round_u128((m >> 1) | (1 << 127), self.exp + 1, m & 1 == 1)
            }
        };
        (lo, lo == hi)
    }

    /// [`Approx::to_f64_checked`] with big integers (the reference for tests).
    #[cfg(test)]
    fn f64_checked_general(&self) -> (f64, bool) {
        let lo = round_scaled(&BigUint::from(self.mant), self.exp, false);
        if self.err == 0 {
            return (lo, true);
        }
        let (m, e) = self.upper();
        let hi = round_scaled(&m, e, false);
        (lo, lo == hi)
    }

    /// See [`Approx::to_f64_checked`].
    pub fn to_f64(&self) -> f64 {
        self.to_f64_checked().0
    }

    /// The f64 nearest to `n · value − 1`, and whether it is certainly the correctly
    /// rounded one (as for [`Approx::to_f64_checked`]; when the interval holds a boundary,
    /// the value from the lower end).
    pub fn relative_deviation_checked(&self, n: u64) -> (f64, bool) {
        // n · value < 2^(64 + 129 + exp): when far below 2^-60, n·value − 1 rounds to −1.
        if self.exp + 193 < -60 {
            return (-1.0, true);
        }
        if self.exp > 0 {
            // Not a probability (a value of 2^127 or more): big integers.
            return self.relative_deviation_checked_general(n);
        }
        // n·m·2^exp − 1 with 2^-exp ≤ 2^253 (and n·m < 2^192).
        let e = self.exp.unsigned_abs() as u32;
        let dev = |m: u128| deviation_u256((0, m), n, e);
        let lo = dev(self.mant);
        if self.err == 0 {
            return (lo, true);
        }
        let Some(upper) = self.mant.checked_add(u128::from(self.err)) else {
            return self.relative_deviation_checked_general(n);
        };
        let hi = dev(upper);
        (lo, lo == hi)
    }

    /// [`Approx::relative_deviation_checked`] with big integers, for any exponent.
    fn relative_deviation_checked_general(&self, n: u64) -> (f64, bool) {
        // n · value < 2^(64 + 129 + exp): when far below 2^-60, n·value − 1 rounds to −1.
        if self.exp + 193 < -60 {
            return (-1.0, true);
        }
        let dev = |m: &BigUint| -> f64 {
            // n·m·2^exp − 1 = (n·m·2^max(exp,0) − 2^max(−exp,0)) · 2^min(exp,0)
            let scaled = BigInt::from(m * n) << self.exp.max(0) as u64;
            let one = BigInt::one() << (-self.exp).max(0) as u64;
            let d = scaled - one;
            let v = round_scaled(d.magnitude(), self.exp.min(0), false);
            if d.sign() == Sign::Minus { -v } else { v }
        };
        let lo = dev(&BigUint::from(self.mant));
        if self.err == 0 {
            return (lo, true);
        }
        let hi = dev(&self.upper().0);
        (lo, lo == hi)
    }

    /// See [`Approx::relative_deviation_checked`].
    pub fn relative_deviation(&self, n: u64) -> f64 {
        self.relative_deviation_checked(n).0
    }

    /// Does the interval contain `p`? (For tests of the bound.)
    pub fn contains(&self, p: &Prob) -> bool {
        let at = |m: BigUint| -> Prob {
            if self.exp >= 0 {
                Prob {
                    num: m << self.exp as u64,
                    odd: BigUint::one(),
                    shift: 0,
                }
            } else {
                let mut q = Prob {
                    num: m,
                    odd: BigUint::one(),
                    shift: self.exp.unsigned_abs(),
                };
                q.normalize();
                q
            }
        };
        let lo = at(BigUint::from(self.mant));
        let hi = at(self.upper().0);
        lo <= *p && *p <= hi
    }
}

/// A walk's branch weight: exactly a [`Prob`], kept in machine words while it is a
/// dyadic `num / 2^shift` whose numerator fits in 128 bits (every weight of a random-mode
/// cascade of up to four rules), so that the walk's many small products and sums need no
/// big integers. [`Weight::to_prob`] gives the same `Prob` that `Prob`'s own arithmetic
/// would have: both are exact and in lowest terms.
#[derive(Clone, Debug)]
pub(crate) enum Weight {
    /// `num / 2^shift` in lowest terms (`num` odd, or `shift` 0).
    Dyadic { num: u128, shift: u64 },
    /// Any other value (boxed: a walk moves its weights around).
    Exact(Box<Prob>),
}

impl Weight {
    pub(crate) fn zero() -> Self {
        Weight::Dyadic { num: 0, shift: 0 }
    }

    pub(crate) fn one() -> Self {
        Weight::Dyadic { num: 1, shift: 0 }
    }

    /// `num / 2^shift` in lowest terms.
    fn dyadic(num: u128, shift: u64) -> Self {
        if num == 0 {
            return Weight::zero();
        }
        let t = u64::from(num.trailing_zeros()).min(shift);
        Weight::Dyadic {
            num: num >> t,
            shift: shift - t,
        }
    }

    /// The exact value.
    pub(crate) fn to_prob(&self) -> Prob {
        match self {
            Weight::Dyadic { num, shift } => Prob {
                num: BigUint::from(*num),
                odd: BigUint::one(),
                shift: *shift,
            },
            Weight::Exact(p) => Prob::clone(p),
        }
    }

    /// The exact value, taken.
    pub(crate) fn into_prob(self) -> Prob {
        match self {
            Weight::Exact(p) => *p,
            w => w.to_prob(),
        }
    }

    /// `self ·= a / b` for machine integers (b > 0), as [`Prob::mul_ratio_assign`].
    pub(crate) fn mul_ratio_assign(&mut self, a: u64, b: u64) {
        if let Weight::Dyadic { num, shift } = *self
            && b.is_power_of_two()
            && let Some(n) = num.checked_mul(u128::from(a))
            && let Some(s) = shift.checked_add(u64::from(b.trailing_zeros()))
        {
            *self = Weight::dyadic(n, s);
            return;
        }
        match self {
            Weight::Exact(p) => p.mul_ratio_assign(a, b),
            w => {
                let mut p = w.to_prob();
                p.mul_ratio_assign(a, b);
                *w = Weight::Exact(Box::new(p));
            }
        }
    }

    /// `self += other`, as [`Prob::add_assign`].
    pub(crate) fn add_assign(&mut self, other: &Weight) {
        if let (Weight::Dyadic { num: a, shift: sa }, Weight::Dyadic { num: b, shift: sb }) =
            (&*self, other)
        {
            // Over the larger power of two: the other numerator is shifted left.
            let (a, b, s, d) = if sa >= sb {
                (*a, *b, *sa, sa - sb)
            } else {
                (*b, *a, *sb, sb - sa)
            };
            if d < 128
                && u64::from(b.leading_zeros()) >= d
                && let Some(n) = a.checked_add(b << d)
            {
                *self = Weight::dyadic(n, s);
                return;
            }
        }
        match (&mut *self, other) {
            (Weight::Exact(p), Weight::Exact(q)) => p.add_assign(q),
            (Weight::Exact(p), q) => p.add_assign(&q.to_prob()),
            (w, q) => {
                let mut p = w.to_prob();
                match q {
                    Weight::Exact(q) => p.add_assign(q),
                    q => p.add_assign(&q.to_prob()),
                }
                *w = Weight::Exact(Box::new(p));
            }
        }
    }
}

/// Outcome probabilities longer than this (in [`Prob::bits`]) are kept as an [`Approx`].
/// Exact forms of up to 1,200 bits are printed in reports, so those stay exact.
pub const KEEP_EXACT_BITS: u64 = 4096;

/// A recorded probability: exact while its exact form is short (at most
/// [`KEEP_EXACT_BITS`]), otherwise a 128-bit [`Approx`] with a proven error bound. An
/// outcome of a long cascade has an exact form of about 31 bits per rule before it:
/// keeping all of them exact takes memory quadratic in the cascade's length.
#[derive(Clone, Debug, PartialEq)]
pub enum CompactProb {
    Exact(Prob),
    Approx(Approx),
}

impl CompactProb {
    pub fn zero() -> Self {
        Self::Exact(Prob::zero())
    }

    /// `p`, exact when it has at most [`KEEP_EXACT_BITS`].
    pub fn new(p: Prob) -> Self {
        Self::with_limit(p, KEEP_EXACT_BITS)
    }

    /// `p`, exact when it has at most `max_bits`.
    pub fn with_limit(p: Prob, max_bits: u64) -> Self {
        if p.bits() <= max_bits {
            Self::Exact(p)
        } else {
            Self::Approx(Approx::from_prob(&p))
        }
    }

    /// `self += p` (exact while the sum stays within [`KEEP_EXACT_BITS`]).
    pub fn add_exact(&mut self, p: &Prob) {
        self.add_exact_with_limit(p, KEEP_EXACT_BITS);
    }

    pub fn add_exact_with_limit(&mut self, p: &Prob, max_bits: u64) {
        match self {
            Self::Exact(x) => {
                x.add_assign(p);
                if x.bits() > max_bits {
                    *self = Self::Approx(Approx::from_prob(x));
                }
            }
            Self::Approx(a) => *a = a.add(&Approx::from_prob(p)),
        }
    }

    /// The exact value, when it was kept.
    pub fn exact(&self) -> Option<&Prob> {
        match self {
            Self::Exact(p) => Some(p),
            Self::Approx(_) => None,
        }
    }

    pub fn approx(&self) -> Approx {
        match self {
            Self::Exact(p) => Approx::from_prob(p),
            Self::Approx(a) => *a,
        }
    }

    pub fn is_zero(&self) -> bool {
        match self {
            Self::Exact(p) => p.is_zero(),
            Self::Approx(a) => a.is_zero(),
        }
    }

    pub fn is_one(&self) -> bool {
        match self {
            Self::Exact(p) => p.is_one(),
            Self::Approx(a) => a.is_exact() && a.mant == 1 << 127 && a.exp == -127,
        }
    }

    /// The nearest f64: correctly rounded from the exact value, or from the approximation
    /// whenever its bound decides it (see [`Approx::to_f64_checked`]).
    pub fn to_f64(&self) -> f64 {
        match self {
            Self::Exact(p) => p.to_f64(),
            Self::Approx(a) => a.to_f64(),
        }
    }

    /// `n · p − 1` as the nearest f64 (see [`Prob::relative_deviation`] and
    /// [`Approx::relative_deviation_checked`]).
    pub fn relative_deviation(&self, n: u64) -> f64 {
        match self {
            Self::Exact(p) => p.relative_deviation(n),
            Self::Approx(a) => a.relative_deviation(n),
        }
    }
}

impl fmt::Display for CompactProb {
    /// The exact `num/den`, or `~` and the nearest f64 for an approximation.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(p) => p.fmt(f),
            Self::Approx(a) => write!(f, "~{:e}", a.to_f64()),
        }
    }
}

impl PartialOrd for Prob {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Prob {
    fn cmp(&self, other: &Self) -> Ordering {
        // a/(oa·2^sa) vs b/(ob·2^sb)  <=>  a·ob·2^(s-sa) vs b·oa·2^(s-sb)
        let s = self.shift.max(other.shift);
        let l = (&self.num * &other.odd) << (s - self.shift);
        let r = (&other.num * &self.odd) << (s - other.shift);
        l.cmp(&r)
    }
}

impl fmt::Debug for Prob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Prob({self})")
    }
}

impl fmt::Display for Prob {
    /// `num/den` (or `0`, `1`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.num.is_zero() {
            return f.write_str("0");
        }
        if self.is_one() {
            return f.write_str("1");
        }
        let mut text = Vec::with_capacity(64);
        self.write_text(&mut text);
        f.write_str(std::str::from_utf8(&text).map_err(|_| fmt::Error)?)
    }
}

impl Prob {
    /// Appends the text of `Display` (`num/den`, `0` or `1`) to `out`, with digits
    /// computed in machine words (no big-integer division) when numerator and
    /// denominator have at most 1,280 bits (every exact form a report prints
    /// does), through the big integers' decimal conversion otherwise.
    pub fn write_text(&self, out: &mut Vec<u8>) {
        if self.num.is_zero() {
            out.push(b'0');
            return;
        }
        if self.is_one() {
            out.push(b'1');
            return;
        }
        let (num_bits, den_bits) = (self.num.bits(), self.odd.bits() + self.shift);
        if num_bits <= 128 && den_bits <= 128 {
            // Most kube-proxy probabilities: up to four rules of 31 bits.
            if let (Some(num), Some(odd)) = (self.num.to_u128(), self.odd.to_u128()) {
                push_u128(out, num);
                out.push(b'/');
                push_u128(out, odd << self.shift);
                return;
            }
        }
        if num_bits <= Limbs::BITS && den_bits <= Limbs::BITS {
            Limbs::new(&self.num, 0).write_decimal(out);
            out.push(b'/');
            Limbs::new(&self.odd, self.shift).write_decimal(out);
            return;
        }
        use std::io::Write as _;
        // Writing to a Vec cannot fail.
        let _ = write!(out, "{}/{}", self.num, self.denominator());
    }
}

/// A number of at most [`Limbs::BITS`] bits as little-endian 32-bit limbs, for printing.
struct Limbs {
    limbs: [u32; Limbs::LEN],
    /// Limbs in use: the top one is not 0 (none for 0).
    len: usize,
}

impl Limbs {
    const LEN: usize = 40;
    const BITS: u64 = 32 * Self::LEN as u64;

    /// `n · 2^shift`, which has at most [`Limbs::BITS`] bits.
    fn new(n: &BigUint, shift: u64) -> Self {
        debug_assert!(n.bits() + shift <= Self::BITS);
        let mut limbs = [0; Self::LEN];
        let (mut at, bit) = ((shift / 32) as usize, (shift % 32) as u32);
        let mut carry = 0;
        for d in n.iter_u32_digits() {
            if bit == 0 {
                limbs[at] = d;
            } else {
                limbs[at] = (d << bit) | carry;
                carry = d >> (32 - bit);
            }
            at += 1;
        }
        if carry != 0 {
            limbs[at] = carry;
            at += 1;
        }
        while at > 0 && limbs[at - 1] == 0 {
            at -= 1;
        }
        Self { limbs, len: at }
    }

    /// The value, when it fits in 64 bits.
    fn low(&self) -> Option<u64> {
        match self.len {
            0 => Some(0),
            1 => Some(u64::from(self.limbs[0])),
            2 => Some((u64::from(self.limbs[1]) << 32) | u64::from(self.limbs[0])),
            _ => None,
        }
    }

    /// Appends the decimal digits (no leading zeros; `0` for 0).
    fn write_decimal(mut self, out: &mut Vec<u8>) {
        const BLOCK: u64 = 1_000_000_000;
        // Blocks of 9 digits from the bottom while the value needs more than 64 bits:
        // each a division of the limbs by 10^9 in 64-bit words.
        let mut blocks = [0u32; (Limbs::BITS as usize * 30103 / 100_000) / 9 + 1];
        let mut n = 0;
        let top = loop {
            if let Some(v) = self.low() {
                break v;
            }
            let mut rem = 0u64;
            for limb in self.limbs[..self.len].iter_mut().rev() {
                let cur = (rem << 32) | u64::from(*limb);
                *limb = (cur / BLOCK) as u32;
                rem = cur % BLOCK;
            }
            blocks[n] = rem as u32;
            n += 1;
            while self.len > 0 && self.limbs[self.len - 1] == 0 {
                self.len -= 1;
            }
        };
        push_u64(out, top);
        for &b in blocks[..n].iter().rev() {
            push_block(out, b);
        }
    }
}

/// "00" to "99".
const DIGIT_PAIRS: &[u8; 200] = b"\
    0001020304050607080910111213141516171819\
    2021222324252627282930313233343536373839\
    4041424344454647484950515253545556575859\
    6061626364656667686970717273747576777879\
    8081828384858687888990919293949596979899";

/// The decimal digits of `n` (no leading zeros; `0` for 0).
pub(crate) fn push_u64(out: &mut Vec<u8>, n: u64) {
    let mut buf = [0u8; 20];
    let len = write_u64(&mut buf, n);
    out.extend_from_slice(&buf[..len]);
}

/// 10^8: the numbers [`digits8`] converts.
const E8: u64 = 100_000_000;

/// The eight decimal digits of `n` < 10^8 (with leading zeros) as the bytes 0 to 9, the
/// first digit in the lowest byte: four lanes of 16 bits split into eight of 8 bits, each
/// a division by a constant done as a multiplication and a shift (exact below 10^4 and
/// 10^2; P.-A. Khuong's method, as Lemire describes it, "Converting integers to
/// fix-digit representations quickly", 2021).
#[inline(always)]
fn digits8(n: u32) -> u64 {
    debug_assert!(u64::from(n) < E8);
    let merged = u64::from(n / 10_000) | (u64::from(n % 10_000) << 32);
    let hundreds_high = ((merged * 10_486) >> 20) & ((0x7f << 32) | 0x7f);
    let hundreds = ((merged - 100 * hundreds_high) << 16) + hundreds_high;
    let tens = ((hundreds * 103) >> 10) & ((0xf << 48) | (0xf << 32) | (0xf << 16) | 0xf);
    tens + ((hundreds - 10 * tens) << 8)
}

/// ASCII zeros in every byte of a word.
const ZEROS8: u64 = u64::from_ne_bytes([b'0'; 8]);

/// The eight digits of `n` < 10^8 (with leading zeros) as text, in memory order.
#[inline(always)]
fn ascii8(n: u32) -> [u8; 8] {
    (digits8(n) | ZEROS8).to_le_bytes()
}

/// Writes the digits of `n` < 10^8 (no leading zeros; `0` for 0) at the start of `dst`
/// (all eight bytes are written); returns how many there are.
#[inline(always)]
fn write_below_e8(dst: &mut [u8; 8], n: u32) -> usize {
    let raw = digits8(n);
    // Leading zeros are the low zero bytes (all but the last digit for 0).
    let zeros = (raw.trailing_zeros() / 8).min(7);
    *dst = ((raw | ZEROS8) >> (8 * zeros)).to_le_bytes();
    8 - zeros as usize
}

/// Writes the decimal digits of `n` (no leading zeros; `0` for 0) at the start of `dst`;
/// returns how many there are (bytes after them may be overwritten).
#[inline(always)]
pub(crate) fn write_u64(dst: &mut [u8; 20], n: u64) -> usize {
    if n < E8 {
        // Most numbers: line numbers, ports, counts (inlined, without a call).
        return write_below_e8(dst.first_chunk_mut().expect("20 bytes"), n as u32);
    }
    write_u64_long(dst, n)
}

/// [`write_u64`] for `n` of at least 10^8.
#[inline(never)]
fn write_u64_long(dst: &mut [u8; 20], n: u64) -> usize {
    let head = dst.first_chunk_mut::<8>().expect("20 bytes");
    let (high, low) = (n / E8, (n % E8) as u32);
    let at = if high < E8 {
        write_below_e8(head, high as u32)
    } else {
        // Below 2^64 < 1845 · 10^16.
        let k = write_below_e8(head, (high / E8) as u32);
        dst[k..k + 8].copy_from_slice(&ascii8((high % E8) as u32));
        k + 8
    };
    dst[at..at + 8].copy_from_slice(&ascii8(low));
    at + 8
}

/// Writes the 19 decimal digits of `n` < 10^19, with leading zeros.
#[inline]
fn write_block19(dst: &mut [u8; 19], n: u64) {
    let (top, rest) = (n / (E8 * E8), n % (E8 * E8));
    // The top three digits: the last three bytes of eight moved to the front.
    dst[..8].copy_from_slice(&((digits8(top as u32) | ZEROS8) >> 40).to_le_bytes());
    dst[3..11].copy_from_slice(&ascii8((rest / E8) as u32));
    dst[11..].copy_from_slice(&ascii8((rest % E8) as u32));
}

/// The decimal digits of `n` (no leading zeros; `0` for 0).
fn push_u128(out: &mut Vec<u8>, n: u128) {
    const E19: u128 = 10_000_000_000_000_000_000;
    if let Ok(n) = u64::try_from(n) {
        return push_u64(out, n);
    }
    // Below 2^128 < 10^39: at most two blocks of 19 digits under the top.
    let (high, low) = (n / E19, (n % E19) as u64);
    if let Ok(high) = u64::try_from(high) {
        push_u64(out, high);
    } else {
        push_u64(out, (high / E19) as u64);
        push_block19(out, (high % E19) as u64);
    }
    push_block19(out, low);
}

/// The 19 decimal digits of `n` < 10^19, with leading zeros.
fn push_block19(out: &mut Vec<u8>, n: u64) {
    let mut buf = [0u8; 19];
    write_block19(&mut buf, n);
    out.extend_from_slice(&buf);
}

/// The 9 decimal digits of `n` < 10^9, with leading zeros.
fn push_block(out: &mut Vec<u8>, mut n: u32) {
    let mut buf = [0u8; 9];
    for at in [7, 5, 3, 1] {
        let d = (n % 100) as usize * 2;
        n /= 100;
        buf[at..at + 2].copy_from_slice(&DIGIT_PAIRS[d..d + 2]);
    }
    buf[0] = b'0' + n as u8;
    out.extend_from_slice(&buf);
}

/// `x` as a machine word, when it fits in 128 bits.
fn small(x: &BigUint) -> Option<u128> {
    let mut digits = x.iter_u64_digits();
    match digits.len() {
        0 => Some(0),
        1 => digits.next().map(u128::from),
        2 => {
            let lo = digits.next()?;
            let hi = digits.next()?;
            Some((u128::from(hi) << 64) | u128::from(lo))
        }
        _ => None,
    }
}

/// The f64 nearest (ties to even) to `num / den · 2^exp` for `num, den > 0`, in machine
/// words: `None` when `den` has more than 120 bits (the long division below would take
/// too many steps). [`nearest_f64`] for numbers that fit.
fn ratio_to_f64(num: u128, den: u128, exp: i64) -> Option<f64> {
    debug_assert!(num > 0 && den > 0);
    let den_bits = 128 - den.leading_zeros();
    if den_bits > 120 {
        return None;
    }
    // num / den = (q + r / den) · 2^-k with q of at least 64 bits (f64's 53, the rounding
    // bit and more) and r < den the remainder, whose being non-zero is the sticky bit.
    // First the numerator with its top bit at 2^127: q > 2^(127 − den_bits).
    let lz = num.leading_zeros();
    let top = num << lz;
    let mut q = top / den;
    let mut r = top - q * den;
    let mut k = i64::from(lz);
    // Then (for denominators of more than 64 bits) long division in digits of the bits a
    // remainder has room for: r < den, so r · 2^step < 2^128, and q < 2^63 stays below
    // 2^128 too.
    let step = 128 - den_bits;
    while q >> 63 == 0 {
        let t = r << step;
        let d = t / den;
        q = (q << step) | d;
        r = t - d * den;
        k += i64::from(step);
    }
    Some(round_u128(q, exp - k, r != 0))
}

/// The f64 nearest (ties to even) to `(mag + s) · 2^exp`, where `s` is a number in
/// `(0, 1)` when `sticky` and 0 otherwise: [`round_scaled`] for a machine-word `mag`,
/// with the bits of the result put together directly. With `sticky`, `mag` needs a bit
/// below the result's last one (callers pass at least 64 significant bits).
fn round_u128(mag: u128, exp: i64, sticky: bool) -> f64 {
    if mag == 0 {
        return 0.0;
    }
    let b = i64::from(128 - mag.leading_zeros());
    // Value of the leading bit: 2^lead.
    let lead = b - 1 + exp;
    if lead > 1023 {
        return f64::INFINITY;
    }
    // Significant bits the result can hold: 53, fewer for subnormals (ulp 2^-1074).
    let normal = lead >= -1022;
    let keep = if normal { 53 } else { lead + 1074 + 1 };
    if keep < 0 {
        return 0.0;
    }
    // The result is `top · ulp` with `top` < 2^53 (or = 2^53 after rounding up). For a
    // normal result `top` carries the implicit bit, which adds one to the exponent field
    // below: the bits are `(lead + 1022) << 52` plus `top`, a carry of the rounding going
    // into the exponent (up to infinity). For a subnormal one they are `top`, which may
    // round up to the smallest normal number.
    let drop = b - keep;
    let top = if drop <= 0 {
        // `mag` fits: exact.
        debug_assert!(!sticky, "sticky rounding needs spare bits");
        (mag << (-drop) as u32) as u64
    } else {
        let drop = drop as u32; // 1..=128
        let top = if drop >= 128 { 0 } else { (mag >> drop) as u64 };
        let half = (mag >> (drop - 1)) & 1 == 1;
        let below = sticky || mag & ((1u128 << (drop - 1)) - 1) != 0;
        top + u64::from(half && (below || top & 1 == 1))
    };
    let base = if normal {
        ((lead + 1022) as u64) << 52
    } else {
        0
    };
    f64::from_bits(base + top)
}

/// `x` as the high and low halves of a 256-bit number, when it fits.
fn wide(x: &BigUint) -> Option<(u128, u128)> {
    let mut digits = x.iter_u64_digits();
    if digits.len() > 4 {
        return None;
    }
    let mut half = || {
        let lo = digits.next().unwrap_or(0);
        let hi = digits.next().unwrap_or(0);
        (u128::from(hi) << 64) | u128::from(lo)
    };
    let lo = half();
    Some((half(), lo))
}

/// The f64 nearest (ties to even) to `n · m / 2^e − 1` for `m < 2^192` (as the high and
/// low halves of a 256-bit number) and `e < 256`: `(n·m − 2^e) · 2^-e` in 256 bits.
fn deviation_u256(m: (u128, u128), n: u64, e: u32) -> f64 {
    debug_assert!(m.0 >> 64 == 0 && e < 256);
    let scaled = mul_u192_u64(m, n);
    let one = if e < 128 {
        (0, 1u128 << e)
    } else {
        (1u128 << (e - 128), 0)
    };
    let exp = -i64::from(e);
    if scaled >= one {
        let (hi, lo) = sub_u256(scaled, one);
        round_u256(hi, lo, exp)
    } else {
        let (hi, lo) = sub_u256(one, scaled);
        -round_u256(hi, lo, exp)
    }
}

/// `m · n` for `m < 2^192`, as the high and low halves of a 256-bit number.
fn mul_u192_u64(m: (u128, u128), n: u64) -> (u128, u128) {
    debug_assert!(m.0 >> 64 == 0);
    let n = u128::from(n);
    let low = (m.1 as u64 as u128) * n;
    let mid = (m.1 >> 64) * n;
    let (lo, carry) = low.overflowing_add(mid << 64);
    // The high half: below 2^128 as m · n < 2^256.
    ((mid >> 64) + u128::from(carry) + m.0 * n, lo)
}

/// `a − b` for 256-bit numbers `(high, low)` with `a ≥ b`.
fn sub_u256(a: (u128, u128), b: (u128, u128)) -> (u128, u128) {
    let (lo, borrow) = a.1.overflowing_sub(b.1);
    (a.0 - b.0 - u128::from(borrow), lo)
}

/// The f64 nearest (ties to even) to `(hi · 2^128 + lo) · 2^exp`: its top 128 bits, the
/// ones below as sticky bit.
fn round_u256(hi: u128, lo: u128, exp: i64) -> f64 {
    if hi == 0 {
        return round_u128(lo, exp, false);
    }
    let s = 128 - hi.leading_zeros(); // 1..=128 bits to drop
    if s == 128 {
        return round_u128(hi, exp + 128, lo != 0);
    }
    let top = (hi << (128 - s)) | (lo >> s);
    round_u128(top, exp + i64::from(s), lo & ((1u128 << s) - 1) != 0)
}

/// Nearest f64 to `num / (odd · 2^shift)` for a signed numerator, ties to even.
fn nearest_f64(num: &BigInt, odd: &BigUint, shift: u64) -> f64 {
    let (sign, mag) = (num.sign(), num.magnitude());
    if mag.is_zero() {
        return 0.0;
    }
    // Scale so that the integer quotient has at least 66 significant bits (more than
    // f64's 53 plus the rounding bit), then round once with the remainder as sticky bit.
    let nb = mag.bits() as i64;
    let ob = odd.bits() as i64;
    let k = (66 + ob - nb).max(0) as u64;
    let (q, r) = if odd.is_one() {
        (mag << k, BigUint::zero())
    } else {
        (mag << k).div_rem(odd)
    };
    let v = round_scaled(&q, -(k as i64) - shift as i64, !r.is_zero());
    if sign == Sign::Minus { -v } else { v }
}

/// The f64 nearest (ties to even) to `(mag + s) · 2^exp`, where `s` is a number in
/// `(0, 1)` when `sticky` and 0 otherwise: a single correct rounding, subnormal results
/// included.
fn round_scaled(mag: &BigUint, exp: i64, sticky: bool) -> f64 {
    let b = mag.bits() as i64;
    if b == 0 {
        // Only a sticky fraction below 2^exp: rounds to 0 unless 2^exp is large, which
        // never happens for the values rounded here (probabilities and deviations).
        return 0.0;
    }
    // Value of the leading bit: 2^lead.
    let lead = b - 1 + exp;
    if lead > 1023 {
        return f64::INFINITY;
    }
    // Significant bits the result can hold: 53, fewer for subnormals (ulp 2^-1074).
    let keep = if lead >= -1022 { 53 } else { lead + 1074 + 1 };
    if keep < 0 {
        return 0.0;
    }
    let drop = b - keep;
    if drop <= 0 {
        // `mag` fits: exact. (With a sticky fraction the half-ulp test needs a bit below
        // the last kept one; callers pass at least 64 significant bits then.)
        debug_assert!(!sticky, "sticky rounding needs spare bits");
        return ldexp(mag.to_u64().map_or(f64::INFINITY, |m| m as f64), exp);
    }
    let drop = drop as u64;
    let mut top = (mag >> drop).to_u64().unwrap_or(u64::MAX);
    let half = mag.bit(drop - 1);
    let below = sticky || mag.trailing_zeros().is_some_and(|tz| tz < drop - 1);
    if half && (below || top & 1 == 1) {
        top += 1;
    }
    ldexp(top as f64, exp + drop as i64)
}

/// `x · 2^e`, exact while the result is representable (x holds at most 54 significant bits
/// and is an integer; the steps below never pass through a smaller magnitude than the
/// result, so no step rounds).
fn ldexp(mut x: f64, mut e: i64) -> f64 {
    while e > 1000 {
        x *= 2f64.powi(1000);
        e -= 1000;
        if x.is_infinite() {
            return x;
        }
    }
    while e < -1000 {
        x *= 2f64.powi(-1000);
        e += 1000;
        if x == 0.0 {
            return x;
        }
    }
    x * 2f64.powi(e as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simple_values() {
        assert_eq!(Prob::one().to_f64(), 1.0);
        assert_eq!(Prob::zero().to_f64(), 0.0);
        assert_eq!(Prob::ratio(1, 2).to_f64(), 0.5);
        assert_eq!(Prob::ratio(1, 3).to_f64(), 1.0 / 3.0);
        assert_eq!(Prob::ratio(2, 9).to_f64(), 2.0 / 9.0);
        assert_eq!(Prob::ratio(6, 4).to_string(), "3/2");
        assert!(Prob::ratio(4, 4).is_one());
    }

    #[test]
    fn cascade_sums_to_one() {
        // A 3-endpoint kube-proxy cascade in the 10-decimal era.
        let q0 = 715_827_883u64;
        let q1 = 1u64 << 30;
        let s = 1u64 << 31;
        let one = Prob::one();
        let p0 = one.mul_ratio(q0, s);
        let rest = one.mul_ratio(s - q0, s);
        let p1 = rest.mul_ratio(q1, s);
        let p2 = rest.mul_ratio(s - q1, s);
        assert!(p0.add(&p1).add(&p2).is_one());
        assert_eq!(p0.to_string(), "715827883/2147483648");
        assert_eq!(p1, p2);
        // (2^31 - q0) / 2^32 = 1431655765 / 4294967296
        assert_eq!(p1.to_string(), "1431655765/4294967296");
        assert_eq!(p1.to_f64(), 1_431_655_765.0 / 4_294_967_296.0);
    }

    #[test]
    fn relative_deviation_is_exact() {
        // n·p − 1 for p = 715827883/2^31, n = 3: (2147483649 − 2147483648)/2147483648 = 2^-31.
        let p = Prob::ratio(715_827_883, 1 << 31);
        assert_eq!(p.relative_deviation(3), 2f64.powi(-31));
        let p = Prob::ratio(1_431_655_765, 1 << 32);
        // 3·1431655765 = 4294967295 → −1/2^32
        assert_eq!(p.relative_deviation(3), -(2f64.powi(-32)));
        assert_eq!(Prob::ratio(1, 4).relative_deviation(4), 0.0);
    }

    #[test]
    fn nearest_rounding_ties_to_even() {
        // 2^53 + 1 over 1: exactly halfway between two doubles -> even (2^53).
        let p = Prob::ratio((1u64 << 53) + 1, 1);
        assert_eq!(p.to_f64(), 9_007_199_254_740_992.0);
        // 2^53 + 3 -> 2^53 + 4
        let p = Prob::ratio((1u64 << 53) + 3, 1);
        assert_eq!(p.to_f64(), 9_007_199_254_740_996.0);
        // Just above half: (2^54 + 2 + 1)/2 = 2^53 + 1.5 -> 2^53 + 2
        let p = Prob::ratio((1u64 << 54) + 3, 2);
        assert_eq!(p.to_f64(), 9_007_199_254_740_994.0);
    }

    #[test]
    fn long_cascade_is_exact() {
        // 200 rules of probability 1/2: the last endpoint has 2^-199, and all sum to 1.
        let s = 1u64 << 31;
        let mut rest = Prob::one();
        let mut total = Prob::zero();
        for _ in 0..199 {
            total = total.add(&rest.mul_ratio(s / 2, s));
            rest = rest.mul_ratio(s / 2, s);
        }
        assert_eq!(rest.to_f64(), 2f64.powi(-199));
        assert!(total.add(&rest).is_one());
    }

    #[test]
    fn ordering_and_complement() {
        assert!(Prob::ratio(1, 3) < Prob::ratio(1, 2));
        assert!(Prob::ratio(2, 6) == Prob::ratio(1, 3));
        assert_eq!(Prob::ratio(1, 3).complement(), Some(Prob::ratio(2, 3)));
        assert_eq!(Prob::ratio(4, 3).complement(), None);
    }

    /// `num / den` for big integers (den > 0), in lowest terms.
    fn fraction(num: BigUint, den: BigUint) -> Prob {
        let tz = den.trailing_zeros().expect("den > 0");
        let mut p = Prob {
            num,
            odd: den >> tz,
            shift: tz,
        };
        p.normalize();
        p
    }

    /// The text through the big integers' decimal conversion only (`Display` before the
    /// machine-integer fast path).
    fn bigint_text(p: &Prob) -> String {
        if p.num.is_zero() {
            "0".to_string()
        } else if p.is_one() {
            "1".to_string()
        } else {
            format!("{}/{}", p.num, p.denominator())
        }
    }

    fn check_text(p: &Prob) {
        let want = bigint_text(p);
        assert_eq!(p.to_string(), want);
        let mut out = b"x".to_vec();
        p.write_text(&mut out);
        assert_eq!(&out[1..], want.as_bytes());
    }

    #[test]
    fn fraction_text_at_the_edges_of_machine_integers() {
        let big = |n: u128| BigUint::from(n);
        let mut edges = vec![1u128, 2, 3, 9, 10, 11, 99, 100, 101, 999, 1000];
        for k in [9u32, 18, 19, 20, 27, 38] {
            let p = 10u128.pow(k);
            edges.extend([p - 1, p, p + 1]);
        }
        for k in [31u32, 32, 33, 63, 64, 65, 96, 127] {
            let p = 1u128 << k;
            edges.extend([p - 1, p, p + 1]);
        }
        edges.extend([u128::from(u64::MAX), u128::MAX - 1, u128::MAX]);
        for &n in &edges {
            for &d in &edges {
                check_text(&fraction(big(n), big(d)));
                check_text(&fraction(big(n), big(d) << 1u32));
                check_text(&fraction(big(n) << 7u32, big(d)));
                // Around the limit of the machine-word digits (1280 bits), and past it
                // (the big-integer path).
                for k in [1100u32, 1152, 1153, 1160, 1200] {
                    check_text(&fraction(big(n), big(d) << k));
                    check_text(&fraction(big(n) << k, big(d) << (k + 100)));
                }
            }
        }
        check_text(&Prob::zero());
        check_text(&Prob::one());
        let ten = BigUint::from(10u32);
        for k in [19u32, 38, 100, 385, 386, 400] {
            let p = ten.pow(k);
            check_text(&fraction(&p - 1u32, p.clone() << 3u32));
            check_text(&fraction(p.clone() + 1u32, (&p << 2u32) + 1u32));
        }
        assert_eq!(
            Prob::ratio(715_827_883, 1 << 31).to_string(),
            "715827883/2147483648"
        );
    }

    proptest::proptest! {
        /// The machine-word text is the big-integer text, for any fraction of numbers of
        /// up to 45 limbs of 32 bits (both paths) and any products of kube-proxy factors.
        #[test]
        fn fraction_text_fast_path_is_the_bigint_text(
            num in proptest::collection::vec(proptest::prelude::any::<u32>(), 0..45),
            den in proptest::collection::vec(proptest::prelude::any::<u32>(), 1..45),
            small in proptest::prelude::any::<(u128, u128)>(),
            shift in 0u32..1300,
            factors in proptest::collection::vec(1u64..(1 << 31), 0..12),
            every in 2u64..40,
        ) {
            let den = BigUint::new(den).max(BigUint::one());
            check_text(&fraction(BigUint::new(num.clone()), den.clone()));
            check_text(&fraction(BigUint::new(num), den << shift));
            let (n, d) = small;
            check_text(&fraction(BigUint::from(n), BigUint::from(d.max(1))));
            check_text(&fraction(BigUint::from(n >> 64), BigUint::from((d >> 64).max(1)) << shift));
            let mut p = Prob::one();
            for q in factors {
                p.mul_ratio_assign(q, 1 << 31);
                check_text(&p);
                check_text(&p.complement().expect("at most 1"));
                check_text(&p.mul_ratio(every - 1, every));
            }
        }
    }

    /// A small deterministic generator for the tests below (xorshift64*).
    struct Gen(u64);

    impl Gen {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// Checks an approximation of `p` against `p`: the bound holds, is below 1e-12
    /// relative, and the f64 and relative deviation are the correctly rounded ones.
    fn check_approx(a: &Approx, p: &Prob, n: u64) {
        assert!(a.contains(p), "{a:?} does not contain {p}");
        assert!(a.relative_error_bound() < 1e-12, "{a:?}");
        let (f, decided) = a.to_f64_checked();
        assert!(decided, "{a:?}: f64 not decided");
        assert_eq!(f, p.to_f64(), "{a:?} vs {p}");
        let (d, decided) = a.relative_deviation_checked(n);
        assert!(decided, "{a:?}: deviation not decided");
        assert_eq!(d, p.relative_deviation(n), "{a:?} vs {p}, n = {n}");
    }

    #[test]
    fn subnormal_results_round_once() {
        let half = |k: u32| {
            let mut p = Prob::one();
            for _ in 0..k {
                p.mul_ratio_assign(1, 2);
            }
            p
        };
        // The smallest subnormal, and half of it (a tie: to even, i.e. 0).
        assert_eq!(half(1074).to_f64(), f64::from_bits(1));
        assert_eq!(half(1075).to_f64(), 0.0);
        // 3·2^-1076 is 0.75 of the smallest subnormal: up to it. 2^-1075 + 2^-1200 is just
        // above the tie: up too (rounding first to 53 bits, then to the subnormal grid, made
        // it an exact tie and gave 0).
        assert_eq!(half(1076).mul_ratio(3, 1).to_f64(), f64::from_bits(1));
        assert_eq!(half(1075).add(&half(1200)).to_f64(), f64::from_bits(1));
        // 2^-1022 + 2^-1074 − 2^-1100: just below the second-smallest normal number's
        // neighbourhood; rounds to 2^-1022 + 2^-1074 (the ulp there is 2^-1074).
        let x = half(1022)
            .add(&half(1074))
            .checked_sub(&half(1100))
            .expect("positive");
        assert_eq!(x.to_f64(), f64::from_bits((1u64 << 52) + 1));
        // Approximations of subnormal values round the same way.
        let a = Approx::from_prob(&x);
        assert_eq!(a.to_f64_checked(), (x.to_f64(), true));
    }

    #[test]
    fn approximations_of_random_values_bound_and_round_correctly() {
        let mut g = Gen(0x1234_5678_9abc_def1);
        for round in 0..400 {
            // A random product of random-mode and nth-mode factors: long dyadic and
            // non-dyadic values.
            let mut p = Prob::one();
            for _ in 0..(round % 60 + 1) {
                if g.below(4) == 0 {
                    let every = g.below(9) + 2;
                    p.mul_ratio_assign(every - 1, every);
                } else {
                    p.mul_ratio_assign(g.below(1 << 31) + 1, 1 << 31);
                }
            }
            let a = Approx::from_prob(&p);
            check_approx(&a, &p, g.below(10_000) + 1);
            // Sums of approximations keep a valid bound.
            let mut q = Prob::one();
            for _ in 0..(round % 40 + 1) {
                q.mul_ratio_assign(g.below(1 << 31) + 1, 1 << 31);
            }
            let sum = a.add(&Approx::from_prob(&q));
            let exact = p.add(&q);
            assert!(sum.contains(&exact), "{sum:?} vs {exact}");
            assert!(sum.relative_error_bound() < 1e-12);
            let (f, decided) = sum.to_f64_checked();
            assert!(!decided || f == exact.to_f64());
        }
    }

    #[test]
    fn exact_and_approximate_cascades_agree() {
        // kube-proxy cascades of n endpoints (probability 1/(n-i), %.10f and %0.5f era)
        // and nth-mode ones: every endpoint kept exact and forced into an approximation
        // gives the same f64 and relative deviation, within a proven bound below 1e-12.
        for (n, digits) in [(300u64, 10), (300, 5), (64, 0)] {
            let mut rest = Prob::one();
            let mut total_exact = Prob::zero();
            let mut total_approx = CompactProb::zero();
            for i in 0..n {
                let p = if i + 1 == n {
                    rest.clone()
                } else if digits == 0 {
                    let every = n - i;
                    let p = rest.mul_ratio(1, every);
                    rest.mul_ratio_assign(every - 1, every);
                    p
                } else {
                    let text = format!("{:.*}", digits, 1.0 / (n - i) as f64);
                    let q = (text.parse::<f64>().unwrap() * (1u64 << 31) as f64).round() as u64;
                    let p = rest.mul_ratio(q, 1 << 31);
                    rest.mul_ratio_assign((1 << 31) - q, 1 << 31);
                    p
                };
                let forced = CompactProb::with_limit(p.clone(), 0);
                let CompactProb::Approx(a) = &forced else {
                    panic!("not approximated")
                };
                check_approx(a, &p, n);
                assert_eq!(forced.to_f64(), CompactProb::new(p.clone()).to_f64());
                total_exact.add_assign(&p);
                total_approx.add_exact_with_limit(&p, 0);
            }
            assert!(total_exact.is_one());
            let a = total_approx.approx();
            assert!(a.contains(&Prob::one()), "{a:?}");
            assert_eq!(a.to_f64(), 1.0);
        }
    }

    #[test]
    fn compact_probabilities_stay_exact_while_short() {
        let p = Prob::ratio(1, 3);
        let mut c = CompactProb::new(p.clone());
        assert_eq!(c.exact(), Some(&p));
        c.add_exact(&Prob::ratio(2, 3));
        assert!(c.is_one());
        assert_eq!(c.to_string(), "1");
        // A long value is approximated; adding to it keeps the bound.
        let mut long = Prob::one();
        for _ in 0..200 {
            long.mul_ratio_assign(715_827_883, 1 << 31);
        }
        assert!(long.bits() > KEEP_EXACT_BITS);
        let mut c = CompactProb::new(long.clone());
        assert!(c.exact().is_none());
        assert!(!c.is_zero() && !c.is_one());
        assert_eq!(c.to_f64(), long.to_f64());
        c.add_exact(&Prob::ratio(1, 4));
        assert!(c.approx().contains(&long.add(&Prob::ratio(1, 4))));
        assert!(c.to_string().starts_with('~'));
        // Far below 1/n, n·p − 1 is −1 to the last bit.
        let mut tiny = long.clone();
        for _ in 0..40 {
            tiny.mul_ratio_assign(3, 1 << 31);
        }
        check_approx(&Approx::from_prob(&tiny), &tiny, 5);
        assert_eq!(Approx::from_prob(&tiny).relative_deviation(5), -1.0);
    }

    /// The machine-word conversions of `p` (whichever apply) give the bits of the
    /// big-integer ones, for `to_f64` and for the deviation from `1/n`.
    fn check_conversions(p: &Prob, n: u64) {
        let want = p.to_f64_general();
        assert_eq!(p.to_f64().to_bits(), want.to_bits(), "to_f64 of {p}");
        if let Some(v) = p.to_f64_small() {
            assert_eq!(v.to_bits(), want.to_bits(), "to_f64 of {p}");
        }
        let want = p.relative_deviation_general(n);
        let got = p.relative_deviation(n);
        assert_eq!(got.to_bits(), want.to_bits(), "deviation of {p}, n = {n}");
        if let Some(v) = p.relative_deviation_small(n) {
            assert_eq!(v.to_bits(), want.to_bits(), "deviation of {p}, n = {n}");
        }
    }

    /// `num / den` for machine words (den > 0).
    fn fraction_u128(num: u128, den: u128) -> Prob {
        fraction(BigUint::from(num), BigUint::from(den))
    }

    /// The same for an approximation: the machine-word f64 and deviation (and whether
    /// the bound decides them) are the big-integer ones.
    fn check_approx_conversions(a: &Approx, n: u64) {
        let (got, want) = (a.to_f64_checked(), a.f64_checked_general());
        assert_eq!(
            (got.0.to_bits(), got.1),
            (want.0.to_bits(), want.1),
            "{a:?}"
        );
        let got = a.relative_deviation_checked(n);
        let want = a.relative_deviation_checked_general(n);
        assert_eq!(
            (got.0.to_bits(), got.1),
            (want.0.to_bits(), want.1),
            "{a:?}, n = {n}"
        );
    }

    #[test]
    fn kube_proxy_values_take_the_machine_word_path() {
        for p in [
            Prob::ratio(119_304_647, 1 << 30),
            fraction(
                BigUint::from(2_200_782_290_611_071_186_095_056_365u128),
                BigUint::from(19_807_040_628_566_084_398_385_987_584u128),
            ),
            Prob::ratio(1, 3),
            Prob::ratio(2, 9).mul_ratio(715_827_883, 1 << 31),
        ] {
            assert!(p.to_f64_small().is_some(), "{p}");
            assert!(p.relative_deviation_small(100_000).is_some(), "{p}");
            check_conversions(&p, 3);
        }
        // Cascades of up to six rules of 31 bits: numerators of up to 186 bits.
        let mut rest = Prob::one();
        for q in [
            715_827_883u64,
            1_073_741_824,
            1_431_655_765,
            3,
            (1 << 31) - 1,
            12_345,
        ] {
            rest.mul_ratio_assign((1 << 31) - q, 1 << 31);
            let p = rest.mul_ratio(q, 1 << 31);
            for p in [&p, &rest] {
                assert!(p.to_f64_small().is_some(), "{p}");
                assert!(p.relative_deviation_small(7).is_some(), "{p}");
                check_conversions(p, 7);
            }
        }
        assert!(rest.bits() > 2 * 128);
        assert_eq!(
            Prob::ratio(119_304_647, 1 << 30).to_f64(),
            119_304_647.0 / 1_073_741_824.0
        );
    }

    #[test]
    fn conversions_at_the_edges_of_machine_words() {
        let mut nums = vec![0u128, 1, 2, 3, (1 << 53) - 1, 1 << 53, (1 << 53) + 1];
        for k in [63u32, 64, 65, 96, 120, 121, 127] {
            nums.extend([(1u128 << k) - 1, 1 << k, (1 << k) + 1]);
        }
        nums.extend([u128::MAX - 1, u128::MAX]);
        let mut odds = vec![1u128, 3, 5, u128::from(u64::MAX), u128::MAX];
        for k in [64u32, 65, 100, 119, 120, 121, 127] {
            odds.extend([(1u128 << k) - 1, (1 << k) + 1]);
        }
        let shifts = [
            0u32, 1, 7, 31, 63, 64, 65, 94, 127, 128, 129, 500, 1000, 1074, 1100,
        ];
        let ns = [0u64, 1, 2, 3, 7, 99_999, 100_000, u64::MAX];
        let big = |x: u128| BigUint::from(x);
        for &num in &nums {
            for &odd in &odds {
                for &shift in &shifts {
                    // Numerators just past 128 bits, too (the big-integer path).
                    for num in [big(num), big(num) + (big(1) << 128u32)] {
                        let p = fraction(num, big(odd) << shift);
                        for &n in &ns {
                            check_conversions(&p, n);
                        }
                    }
                }
            }
        }
        // u128 boundaries of n·num and of the denominator.
        for (num, den) in [
            (u128::MAX / 3, 1u128 << 127),
            (u128::MAX / 3 + 1, 1 << 127),
            ((1 << 126) + 1, 3 << 126),
            (1, u128::MAX),
            (u128::MAX, (1 << 127) + 1),
        ] {
            for n in [1u64, 2, 3, 4] {
                check_conversions(&fraction_u128(num, den), n);
            }
        }
        // Approximations whose upper end passes 2^128.
        for err in [1u64, 2, 3, u64::MAX] {
            for exp in [
                -2000i64, -1200, -1100, -1075, -1074, -300, -253, -200, -128, -127, 0, 5,
            ] {
                for mant in [u128::MAX, u128::MAX - 1, u128::MAX - u128::from(u64::MAX)] {
                    for n in [1u64, 2, 3, 1000] {
                        check_approx_conversions(&Approx { mant, exp, err }, n);
                    }
                }
            }
        }
        check_approx_conversions(&Approx::ZERO, 4);
        // 256-bit roundings whose top 128 bits end on a tie (bit 74 the half), decided by
        // the low half.
        for hi in [
            (1u128 << 127) | (1 << 74),
            (1 << 127) | (3 << 74),
            u128::MAX,
            1 << 127,
        ] {
            for lo in [0, 1, 1 << 127, u128::MAX] {
                for exp in [-1400, -1330, -1200, -300, 0] {
                    let x = (BigUint::from(hi) << 128u32) | BigUint::from(lo);
                    assert_eq!(
                        round_u256(hi, lo, exp).to_bits(),
                        round_scaled(&x, exp, false).to_bits(),
                        "{x} · 2^{exp}"
                    );
                }
            }
        }
    }

    #[test]
    fn exact_ties_round_to_even() {
        // 54 significant bits, the last one set: exactly halfway between two doubles, at
        // every scale (normal and subnormal), in the value and in the deviation.
        let mut g = Gen(0x0dd_ba11);
        for _ in 0..2000 {
            let m = (1u128 << 52) | u128::from(g.below(1 << 52));
            let tie = (m << 1) | 1;
            // The double a tie goes to: (2m or 2m + 2) · 2^-s, whichever has an even m.
            let even = (m + (m & 1)) as f64;
            let shift = g.below(1180) as u32;
            let p = fraction(BigUint::from(tie), BigUint::one() << shift);
            check_conversions(&p, g.below(100_000) + 1);
            if shift < 1000 {
                assert_eq!(p.to_f64(), ldexp(even, 1 - i64::from(shift)), "{p}");
            }
            // n·p − 1 = ±tie / 2^s for p = (2^s ± tie) / (n · 2^s).
            let n = g.below(100_000) + 1;
            let s = 55 + g.below(128 - 55 - 17) as u32;
            let den = u128::from(n) << s;
            for num in [(1 << s) + tie, (1 << s) - tie] {
                let p = fraction_u128(num, den);
                assert!(p.relative_deviation_small(n).is_some(), "{p}");
                assert_eq!(
                    p.relative_deviation(n).abs(),
                    even * 2f64.powi(1 - s as i32)
                );
                check_conversions(&p, n);
            }
        }
    }

    #[test]
    fn approximate_deviation_ties_use_the_bits_below_the_top_128() {
        // n·m − 2^E = ±(T · 2^j + l) with T a tie of 54 bits and 0 ≤ l < n, at least 2^128
        // (j ≥ 75), and m < 2^128 (2^E < 2^127 · n): halfway when l = 0, just past it otherwise (the bits below the top
        // 128 of the 256-bit difference decide).
        let mut g = Gen(0xfeed_5eed);
        for _ in 0..3000 {
            let n = g.below(100_000) + 16;
            let t = (1u64 << 53) | g.below(1 << 53) | 1;
            let j = 75 + g.below(u64::from(60 - n.leading_zeros())) as u32;
            let tie = BigUint::from(t) << j;
            let nb = BigUint::from(n);
            for negative in [false, true] {
                let e = if negative { j + 56 } else { 128 };
                let one = BigUint::one() << e;
                let m = if negative {
                    (&one - &tie) / &nb
                } else {
                    (&one + &tie + &nb - 1u32) / &nb
                };
                let mant = m.to_u128().expect("below 2^128");
                let a = Approx {
                    mant,
                    exp: -i64::from(e),
                    err: 0,
                };
                check_approx_conversions(&a, n);
                // Independently: the tie goes to the even neighbour, anything past it away
                // from zero.
                let past = (&nb * &m) != (if negative { &one - &tie } else { &one + &tie });
                let t53 = (t >> 1) + u64::from(past || (t >> 1) & 1 == 1);
                let want = ldexp(t53 as f64, i64::from(j) + 1 - i64::from(e));
                let got = a.relative_deviation(n);
                assert_eq!(got, if negative { -want } else { want }, "{a:?}, n = {n}");
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// The machine-word rounding is the big-integer one.
        #[test]
        fn round_u128_is_round_scaled(
            mag in proptest::prelude::any::<u128>(),
            cut in 0u32..128,
            exp in -1400i64..1100,
            sticky in proptest::prelude::any::<bool>(),
        ) {
            let mag = mag >> cut;
            // A sticky fraction needs spare bits (as callers guarantee).
            let sticky = sticky && mag >> 63 != 0;
            let got = round_u128(mag, exp, sticky);
            let want = round_scaled(&BigUint::from(mag), exp, sticky);
            proptest::prop_assert_eq!(got.to_bits(), want.to_bits());
        }

        /// The same for 256-bit numbers (the top 128 bits and a sticky bit).
        #[test]
        fn round_u256_is_round_scaled(
            hi in proptest::prelude::any::<u128>(),
            lo in proptest::prelude::any::<u128>(),
            cut in 0u32..256,
            near in 0u32..32,
            exp in -1500i64..900,
        ) {
            let x = ((BigUint::from(hi) << 128u32) | BigUint::from(lo)) >> cut;
            // Often only the top 53 to 56 bits, and maybe the last one: ties and just past.
            let x = if near < 16 && x.bits() > 56 {
                let z = x.bits() - 53 - u64::from(near % 4);
                ((&x >> z) << z) + (near / 4 % 2)
            } else {
                x
            };
            let hi = (&x >> 128u32).to_u128().expect("fits");
            let lo = (&x & BigUint::from(u128::MAX)).to_u128().expect("fits");
            proptest::prop_assert_eq!(
                round_u256(hi, lo, exp).to_bits(),
                round_scaled(&x, exp, false).to_bits()
            );
        }

        /// Random fractions of machine words (and a little past them), dyadic and not,
        /// near 0, near 1 and near 1/n: the machine-word conversions are the big-integer
        /// ones.
        #[test]
        fn conversions_are_the_bigint_ones(
            num in proptest::prelude::any::<u128>(),
            num_cut in 0u32..128,
            odd in proptest::prelude::any::<u128>(),
            odd_cut in 0u32..128,
            shift in 0u32..200,
            far in 0u32..1200,
            n in 1u64..=100_000,
            delta in 0u128..1000,
            every in 2u64..200,
            wide_shift in 0u32..140,
            factors in proptest::collection::vec(1u64..=(1 << 31), 0..10),
        ) {
            let num = num >> num_cut;
            let odd = (odd >> odd_cut) | 1;
            let big = |x: u128| BigUint::from(x);
            // Any numerator over odd · 2^shift, and over a power of two, or far below.
            check_conversions(&fraction(big(num), big(odd) << shift), n);
            check_conversions(&fraction(big(num), BigUint::one() << shift), n);
            check_conversions(&fraction(big(num), big(odd) << far), n);
            check_conversions(&fraction(big(num), BigUint::one() << far), n);
            // Near 1 and near 1/n (the deviation near 0), where the denominator fits.
            let den = (odd >> (odd_cut.max(shift) / 2)).max(1) << (shift % 64);
            for num in [den.saturating_sub(delta), den + delta] {
                check_conversions(&fraction_u128(num, den), n);
            }
            let share = den / u128::from(n);
            for num in [share.saturating_sub(delta), share + delta] {
                check_conversions(&fraction_u128(num, den), n);
            }
            // Products of kube-proxy and nth-mode factors.
            let p = Prob::ratio(num as u64 >> 33, 1 << 31).mul_ratio(every - 1, every);
            check_conversions(&p, every);
            check_conversions(&p.complement().unwrap_or_else(Prob::zero), n);
            // Numerators of up to 268 bits over powers of two, and near 1, as in long
            // kube-proxy cascades.
            let w = (big(num) << wide_shift) + big(odd);
            check_conversions(&fraction(w.clone(), BigUint::one() << (shift + wide_shift)), n);
            check_conversions(&fraction(w.clone(), BigUint::one() << far), n);
            let den = BigUint::one() << (w.bits() as u32 + shift % 3);
            check_conversions(&fraction(&den - BigUint::from(delta).min(den.clone()), den.clone()), n);
            check_conversions(&fraction(&den / n + delta, den), n);
            let mut rest = Prob::one();
            for q in factors {
                let p = rest.mul_ratio(q, 1 << 31);
                rest.mul_ratio_assign((1 << 31) - q, 1 << 31);
                check_conversions(&p, n);
                check_conversions(&rest, n);
                check_conversions(&p.mul_ratio(1, every), every);
            }
        }

        /// An independent oracle: for a, b < 2^53 (exact doubles), IEEE division is the
        /// correctly rounded quotient; so is (n·a − b) / b when n·a < 2^53.
        #[test]
        fn conversions_are_ieee_division(
            a in 0u64..(1 << 53),
            b in 1u64..(1 << 53),
            small_a in 0u64..(1 << 36),
            small_b in 1u64..(1 << 36),
            n in 1u64..=100_000,
            k in 0i32..=1023,
        ) {
            proptest::prop_assert_eq!(
                Prob::ratio(a, b).to_f64().to_bits(),
                (a as f64 / b as f64).to_bits()
            );
            let p = Prob::ratio(small_a, small_b);
            let exact = (n * small_a) as i64 - small_b as i64;
            proptest::prop_assert_eq!(
                p.relative_deviation(n).to_bits(),
                (exact as f64 / small_b as f64).to_bits()
            );
            // Power-of-two denominators down into the subnormals.
            let p = fraction(BigUint::from(a), BigUint::one() << k as u32);
            proptest::prop_assert_eq!(
                p.to_f64().to_bits(),
                (a as f64 / 2f64.powi(k)).to_bits()
            );
        }

        /// Approximations: the machine-word f64 and deviation are the big-integer ones.
        #[test]
        fn approximate_conversions_are_the_bigint_ones(
            mant in proptest::prelude::any::<u128>(),
            normalized in proptest::prelude::any::<bool>(),
            exp in -1300i64..20,
            err in proptest::prelude::any::<u64>(),
            err_cut in 0u32..64,
            n in 1u64..=100_000,
            any_n in proptest::prelude::any::<u64>(),
        ) {
            let mant = if normalized { mant | (1 << 127) } else { mant };
            for err in [0, err >> err_cut, err] {
                let a = Approx { mant, exp, err };
                check_approx_conversions(&a, n);
                check_approx_conversions(&a, any_n);
                // Near the ideal share 1/n: exp around −127 − log2(n).
                let near = Approx { mant, exp: -127 - i64::from(64 - n.leading_zeros()) + exp % 2, err };
                check_approx_conversions(&near, n);
            }
        }
    }

    /// A sequence of walk operations on a weight: multiply by `a / b`, or add a weight
    /// made from a seed.
    #[derive(Debug, Clone)]
    enum WeightOp {
        Mul(u64, u64),
        Add(u64, u64),
    }

    fn weight_op() -> impl proptest::strategy::Strategy<Value = WeightOp> {
        use proptest::prelude::*;
        let den = prop_oneof![
            Just(1u64 << 31),
            Just(2u64),
            Just(1u64),
            1u64..10,
            (0u32..63).prop_map(|k| 1u64 << k),
        ];
        prop_oneof![
            (0u64..(1 << 32), den.clone()).prop_map(|(a, b)| WeightOp::Mul(a % (b + 1), b)),
            (0u64..(1 << 32), den).prop_map(|(a, b)| WeightOp::Add(a % (b + 1), b)),
        ]
    }

    proptest::proptest! {
        /// `Weight` (machine words while dyadic and short) gives exactly the `Prob` of
        /// the same operations, through the change to big integers and after it.
        #[test]
        fn weight_arithmetic_is_prob_arithmetic(
            ops in proptest::collection::vec(weight_op(), 0..40),
        ) {
            let mut w = Weight::one();
            let mut p = Prob::one();
            for op in ops {
                match op {
                    WeightOp::Mul(a, b) => {
                        w.mul_ratio_assign(a, b);
                        p.mul_ratio_assign(a, b);
                    }
                    WeightOp::Add(a, b) => {
                        let mut x = Weight::one();
                        x.mul_ratio_assign(a, b);
                        w.add_assign(&x);
                        p.add_assign(&Prob::ratio(a, b));
                    }
                }
                proptest::prop_assert_eq!(w.to_prob(), p.clone());
            }
            proptest::prop_assert_eq!(w.into_prob(), p);
        }
    }

    #[test]
    fn weights_of_a_long_cascade_leave_machine_words_exactly() {
        // 40 rules of a kube-proxy cascade: the weights pass 128 bits after four.
        let s = 1u64 << 31;
        let (mut w, mut p) = (Weight::one(), Prob::one());
        let (mut wt, mut pt) = (Weight::zero(), Prob::zero());
        for i in 0..40u64 {
            let q = s / (40 - i);
            let (mut wq, mut pq) = (w.clone(), p.clone());
            wq.mul_ratio_assign(q, s);
            pq.mul_ratio_assign(q, s);
            wt.add_assign(&wq);
            pt.add_assign(&pq);
            w.mul_ratio_assign(s - q, s);
            p.mul_ratio_assign(s - q, s);
            assert_eq!(w.to_prob(), p);
            assert_eq!(wt.to_prob(), pt);
        }
        assert!(matches!(w, Weight::Exact(_)));
        wt.add_assign(&w);
        assert!(wt.into_prob().is_one());
    }
}

impl Prob {
    /// Appends the same text as [`Prob::write_text`], faster for the fractions reports
    /// print most (see [`Prob::write_text_dyadic_into`]).
    pub fn write_text_dyadic_fast(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.resize(start + DYADIC_TEXT_ROOM, 0);
        match self.write_text_dyadic_into(&mut out[start..]) {
            Some(len) => out.truncate(start + len),
            None => {
                out.truncate(start);
                self.write_text(out);
            }
        }
    }

    /// Writes the text of [`Prob::write_text`] at the start of `dst` and returns its
    /// length, for `0`, `1` and the fractions over a power of two (every kube-proxy
    /// probability) whose numerator has at most 1,280 bits, when `dst` has room
    /// ([`DYADIC_TEXT_ROOM`] bytes are enough); `None` for the others. The denominator
    /// is copied from a table (`pow2_text`) and the numerator's digits are computed 19 at
    /// a time in 64-bit words (`write_words_decimal`). Bytes after the text may be
    /// overwritten.
    pub fn write_text_dyadic_into(&self, dst: &mut [u8]) -> Option<usize> {
        if self.num.is_zero() || self.is_one() {
            *dst.first_mut()? = if self.num.is_zero() { b'0' } else { b'1' };
            return Some(1);
        }
        if !self.odd.is_one() {
            return None;
        }
        let den = pow2_text(self.shift)?;
        let at = if let Some(n) = self.num.to_u64() {
            write_u64(dst.first_chunk_mut()?, n)
        } else if self.num.bits() <= 64 * 4 {
            // Most numerators that need more than a word: small arrays, quickly cleared.
            let mut words = [0u64; 4];
            let len = fill_words(&mut words, &self.num);
            write_words_decimal(dst, &mut words[..len], &mut [0; 5])?
        } else if self.num.bits() <= 64 * WORDS_MAX as u64 {
            let mut words = [0u64; WORDS_MAX];
            let len = fill_words(&mut words, &self.num);
            write_words_decimal(dst, &mut words[..len], &mut [0; BLOCKS_MAX])?
        } else {
            return None;
        };
        let end = at + 1 + den.len();
        let (slash, rest) = dst.get_mut(at..end)?.split_first_mut()?;
        *slash = b'/';
        rest.copy_from_slice(den);
        Some(end)
    }
}

/// The texts of recently written fractions over a power of two (numerator of at most
/// 128 bits, denominator at most `2^128`), by numerator and shift: a table of 1,024
/// slots, each fraction in the slot they hash to, replacing the one there. Balancers
/// with as many endpoints have the same probabilities (kube-proxy writes the same rule
/// probabilities): most exact forms of a report are copied from here.
pub struct DyadicTexts {
    slots: Box<[DyadicSlot]>,
}

/// A fraction `num / 2^shift` and its text (79 bytes at most: it fits).
#[derive(Clone)]
struct DyadicSlot {
    num: u128,
    shift: u64,
    len: usize,
    text: [u8; DyadicTexts::TEXT],
}

impl Default for DyadicTexts {
    fn default() -> Self {
        Self::new()
    }
}

/// Slots of the tables of recently computed values (1,024): [`DyadicTexts`] and the
/// report's tables of float texts and endpoint values.
pub(crate) const KEPT_SLOTS_LOG2: u32 = 10;

/// The slot of a table of [`KEPT_SLOTS_LOG2`] bits for a key that hashes to `hash`
/// (Fibonacci hashing: the top bits of the product).
#[inline(always)]
pub(crate) fn kept_slot(hash: u64) -> usize {
    (hash.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - KEPT_SLOTS_LOG2)) as usize
}

/// A hash of the [`Prob::dyadic_key`] `(num, shift)`, for [`kept_slot`].
#[inline(always)]
pub(crate) fn dyadic_hash(num: u128, shift: u64) -> u64 {
    (num as u64) ^ ((num >> 64) as u64).rotate_left(17) ^ shift
}

impl DyadicTexts {
    /// Room for a kept text: 39 digits, a slash and 39 digits.
    const TEXT: usize = 96;

    /// Every slot empty (its shift is never looked up).
    pub fn new() -> Self {
        let empty = DyadicSlot {
            num: 0,
            shift: u64::MAX,
            len: 0,
            text: [0; Self::TEXT],
        };
        DyadicTexts {
            slots: vec![empty; 1 << KEPT_SLOTS_LOG2].into_boxed_slice(),
        }
    }
}

impl CompactProb {
    /// `(num, shift)` for an exact `num / 2^shift` whose numerator has at most 128 bits
    /// and `shift` at most 128: a key of the value, for tables of what was computed
    /// from it.
    pub fn dyadic_key(&self) -> Option<(u128, u64)> {
        self.exact()?.dyadic_key()
    }
}

impl Prob {
    /// `(num, shift)` when the value is `num / 2^shift` with a numerator of at most 128
    /// bits and `shift` at most 128: a key of the value, for tables of what was
    /// computed from it.
    pub fn dyadic_key(&self) -> Option<(u128, u64)> {
        if self.odd.is_one() && self.shift <= 128 {
            small(&self.num).map(|num| (num, self.shift))
        } else {
            None
        }
    }

    /// [`Prob::write_text_dyadic_into`], the text copied from `kept` when it holds it
    /// (and kept there when it is short).
    pub fn write_text_dyadic_kept(&self, dst: &mut [u8], kept: &mut DyadicTexts) -> Option<usize> {
        let Some((num, _)) = self.dyadic_key() else {
            return self.write_text_dyadic_into(dst);
        };
        let slot = kept
            .slots
            .get_mut(kept_slot(dyadic_hash(num, self.shift)))?;
        if slot.num == num && slot.shift == self.shift {
            // The whole slot (a copy of known size), then the length.
            dst.get_mut(..DyadicTexts::TEXT)?
                .copy_from_slice(&slot.text);
            return Some(slot.len);
        }
        let len = self.write_text_dyadic_into(dst)?;
        if let Some(text) = dst.get(..len).filter(|_| len <= DyadicTexts::TEXT) {
            slot.text[..len].copy_from_slice(text);
            (slot.num, slot.shift, slot.len) = (num, self.shift, len);
        }
        Some(len)
    }
}

/// Room for any text [`Prob::write_text_dyadic_into`] writes: a numerator of up to
/// 1,280 bits (386 digits, written 19 at a time: at most 20 + 20 · 19 bytes), the slash
/// and the text of `2^1280` (386 digits).
pub const DYADIC_TEXT_ROOM: usize = 20 + 20 * 19 + 1 + 386;

/// 64-bit words of the longest numerator [`Prob::write_text_dyadic_fast`] converts
/// itself (1,280 bits, as [`Limbs`]).
const WORDS_MAX: usize = 20;

/// 10^19, the largest power of ten below 2^64; its top bit is set.
const E19: u64 = 10_000_000_000_000_000_000;

/// The reciprocal of [`E19`] for [`div_e19`]: ⌊(2^128 − 1) / E19⌋ − 2^64.
const E19_INV: u64 = (u128::MAX / E19 as u128 - (1u128 << 64)) as u64;

/// `(hi · 2^64 + lo) / E19` and its remainder, for `hi < E19`: a division by an
/// invariant normalised divisor with its precomputed reciprocal (Möller and Granlund,
/// "Improved division by invariant integers", 2011, algorithm 4): one 128-bit product
/// instead of a call to the 128-bit division.
#[inline]
fn div_e19(hi: u64, lo: u64) -> (u64, u64) {
    debug_assert!(hi < E19);
    let q = u128::from(E19_INV) * u128::from(hi) + ((u128::from(hi) + 1) << 64 | u128::from(lo));
    let (mut q1, q0) = ((q >> 64) as u64, q as u64);
    let mut r = lo.wrapping_sub(q1.wrapping_mul(E19));
    if r > q0 {
        q1 = q1.wrapping_sub(1);
        r = r.wrapping_add(E19);
    }
    if r >= E19 {
        q1 += 1;
        r -= E19;
    }
    (q1, r)
}

/// Blocks of 19 digits under the top word of a number of [`WORDS_MAX`] words.
const BLOCKS_MAX: usize = WORDS_MAX * 64 * 30103 / 100_000 / 19 + 1;

/// Copies the 64-bit words of `n` (which fit) into `words`; returns how many there are.
fn fill_words(words: &mut [u64], n: &BigUint) -> usize {
    let mut len = 0;
    for (slot, w) in words.iter_mut().zip(n.iter_u64_digits()) {
        *slot = w;
        len += 1;
    }
    len
}

/// Writes the decimal digits of the number whose little-endian 64-bit words are `words`
/// (no leading zeros, `0` for 0) at the start of `dst` and returns how many there are
/// (`None` when `dst` is too short), with room in `blocks` for its 19-digit blocks under
/// the top word (up to `words.len() · 64 · log10(2) / 19 + 1` of them). The words are
/// used up.
fn write_words_decimal(dst: &mut [u8], words: &mut [u64], blocks: &mut [u64]) -> Option<usize> {
    // Blocks of 19 digits from the bottom while the value needs more than one word.
    let mut n = 0;
    let mut len = words.len();
    while len > 0 && words[len - 1] == 0 {
        len -= 1;
    }
    while len > 1 {
        let mut rem = 0;
        for w in words[..len].iter_mut().rev() {
            (*w, rem) = div_e19(rem, *w);
        }
        *blocks.get_mut(n)? = rem;
        n += 1;
        // At least 2^64 before: the quotient is not 0.
        while words[len - 1] == 0 {
            len -= 1;
        }
    }
    let mut at = write_u64(dst.first_chunk_mut()?, if len == 0 { 0 } else { words[0] });
    for &b in blocks[..n].iter().rev() {
        write_block19(dst.get_mut(at..)?.first_chunk_mut()?, b);
        at += 19;
    }
    Some(at)
}

/// Powers of two up to this exponent have their decimal text in [`pow2_text`]'s table
/// (every denominator of an exact fraction a report prints: at most 1,200 bits).
const POW2_TEXT_MAX: u64 = 1280;

/// The decimal text of `2^k`, for `k` up to [`POW2_TEXT_MAX`]: from a table of all of
/// them (about 250 kB), made on first use by doubling.
pub(crate) fn pow2_text(k: u64) -> Option<&'static [u8]> {
    static TABLE: std::sync::OnceLock<(Vec<u8>, Vec<usize>)> = std::sync::OnceLock::new();
    let k = usize::try_from(k)
        .ok()
        .filter(|&k| k as u64 <= POW2_TEXT_MAX)?;
    let (text, ends) = TABLE.get_or_init(|| {
        const BLOCK: u32 = 1_000_000_000;
        // 2^k in blocks of 9 digits, little-endian.
        let mut blocks: Vec<u32> = vec![1];
        let mut text = Vec::with_capacity(260_000);
        let mut ends = Vec::with_capacity(POW2_TEXT_MAX as usize + 1);
        for _ in 0..=POW2_TEXT_MAX {
            let (top, rest) = blocks.split_last().expect("not empty");
            push_u64(&mut text, u64::from(*top));
            for &b in rest.iter().rev() {
                push_block(&mut text, b);
            }
            ends.push(text.len());
            let mut carry = 0;
            for b in &mut blocks {
                let d = *b * 2 + carry;
                (*b, carry) = (d % BLOCK, d / BLOCK);
            }
            if carry != 0 {
                blocks.push(carry);
            }
        }
        (text, ends)
    });
    let start = if k == 0 { 0 } else { ends[k - 1] };
    Some(&text[start..ends[k]])
}

#[cfg(test)]
mod dyadic_text_tests {
    use super::*;

    /// [`Prob::write_text_dyadic_fast`]'s bytes, after others already in the buffer.
    fn fast_text(p: &Prob) -> Vec<u8> {
        let mut out = b"x".to_vec();
        p.write_text_dyadic_fast(&mut out);
        out.split_off(1)
    }

    fn slow_text(p: &Prob) -> Vec<u8> {
        let mut out = Vec::new();
        p.write_text(&mut out);
        out
    }

    /// `num / 2^shift` in lowest terms (or `num / (odd · 2^shift)`).
    fn fraction(num: BigUint, odd: BigUint, shift: u64) -> Prob {
        let mut p = Prob { num, odd, shift };
        p.normalize();
        p
    }

    #[test]
    fn powers_of_two_and_edges_are_the_plain_text() {
        for k in 0..=POW2_TEXT_MAX {
            let two_k = BigUint::one() << k;
            assert_eq!(pow2_text(k).unwrap(), two_k.to_string().as_bytes(), "2^{k}");
        }
        assert_eq!(pow2_text(POW2_TEXT_MAX + 1), None);
        let ten = BigUint::from(10u32);
        let mut nums = vec![BigUint::zero(), BigUint::one()];
        for k in 1..=70u32 {
            let p = ten.pow(k);
            nums.extend([&p - 1u32, p.clone(), &p + 1u32]);
        }
        for k in [
            63u32, 64, 65, 127, 128, 129, 255, 256, 257, 1279, 1280, 1281, 1300,
        ] {
            let p = BigUint::one() << k;
            nums.extend([&p - 1u32, p.clone(), &p + 1u32]);
        }
        for num in &nums {
            for shift in [0, 1, 31, 64, 65, 200, 1280, 1281, 1400] {
                let p = fraction(num.clone(), BigUint::one(), shift);
                assert_eq!(fast_text(&p), slow_text(&p), "{num} / 2^{shift}");
                let p = fraction(num.clone(), BigUint::from(3u32), shift);
                assert_eq!(fast_text(&p), slow_text(&p), "{num} / 3·2^{shift}");
            }
        }
    }

    #[test]
    fn division_by_ten_to_the_19_is_the_plain_division() {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for i in 0..200_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let hi = match i % 4 {
                0 => x % E19,
                1 => E19 - 1 - (x % 1000),
                2 => x % 1000,
                _ => x >> (i % 64),
            } % E19;
            let lo = if i % 8 == 0 {
                u64::MAX - (i % 3)
            } else {
                x.rotate_left(29)
            };
            let n = (u128::from(hi) << 64) | u128::from(lo);
            let want = ((n / u128::from(E19)) as u64, (n % u128::from(E19)) as u64);
            assert_eq!(div_e19(hi, lo), want, "{hi} {lo}");
        }
    }

    /// [`write_u64`]'s text of `n`.
    fn u64_text(n: u64) -> String {
        let mut buf = [0u8; 20];
        let len = write_u64(&mut buf, n);
        String::from_utf8(buf[..len].to_vec()).expect("digits")
    }

    /// Every number of up to eight digits, and each power of ten and its neighbours, as
    /// `format!` writes them; 19-digit blocks with their leading zeros.
    #[test]
    fn integer_digits_are_formats() {
        for n in (0..E8).step_by(7).chain(0..100_000) {
            assert_eq!(u64_text(n), n.to_string());
        }
        for k in 0..20 {
            let p = 10u64.pow(k);
            for n in [p - 1, p, p + 1, p.wrapping_mul(7) / 3] {
                assert_eq!(u64_text(n), n.to_string());
            }
        }
        assert_eq!(u64_text(u64::MAX), u64::MAX.to_string());
        for n in [0, 1, 99, E19 - 1, E19 / 3, 10u64.pow(16), 10u64.pow(16) - 1] {
            let mut buf = [0u8; 19];
            write_block19(&mut buf, n);
            assert_eq!(buf.to_vec(), format!("{n:019}").into_bytes());
        }
    }

    proptest::proptest! {
        /// Kept texts are the texts written: fractions written again and again (slots
        /// reused and replaced), short and long, over powers of two and not.
        #[test]
        fn kept_dyadic_texts_are_the_texts(
            nums in proptest::collection::vec(proptest::collection::vec(proptest::prelude::any::<u32>(), 0..6), 1..40),
            picks in proptest::collection::vec((proptest::prelude::any::<proptest::sample::Index>(), 0u64..140, 0u32..4), 0..300),
        ) {
            let mut kept = DyadicTexts::new();
            for (i, shift, odd) in picks {
                let num = BigUint::new(nums[i.index(nums.len())].clone());
                let p = fraction(num, BigUint::from(2 * odd + 1), shift);
                let (mut a, mut b) = ([0u8; DYADIC_TEXT_ROOM], [0u8; DYADIC_TEXT_ROOM]);
                let got = p.write_text_dyadic_kept(&mut a, &mut kept).map(|n| a[..n].to_vec());
                let want = p.write_text_dyadic_into(&mut b).map(|n| b[..n].to_vec());
                proptest::prop_assert_eq!(got, want);
            }
        }

        /// [`write_u64`] and [`write_block19`] are `format!` on any number.
        #[test]
        fn integer_digits_are_formats_anywhere(n in proptest::prelude::any::<u64>(), shift in 0u32..64) {
            let n = n >> shift;
            proptest::prop_assert_eq!(u64_text(n), n.to_string());
            let mut buf = [0u8; 19];
            write_block19(&mut buf, n % E19);
            proptest::prop_assert_eq!(buf.to_vec(), format!("{:019}", n % E19).into_bytes());
        }

        /// The fast text is `write_text`'s for fractions over powers of two (and others)
        /// with numerators of up to 45 limbs of 32 bits and kube-proxy cascades.
        #[test]
        fn dyadic_fast_text_is_write_text(
            num in proptest::collection::vec(proptest::prelude::any::<u32>(), 0..45),
            shift in 0u64..1400,
            odd in proptest::prelude::any::<u32>(),
            factors in proptest::collection::vec(1u64..(1 << 31), 0..40),
            every in 2u64..40,
        ) {
            let num = BigUint::new(num);
            let p = fraction(num.clone(), BigUint::one(), shift);
            proptest::prop_assert_eq!(fast_text(&p), slow_text(&p));
            let p = fraction(num, BigUint::from(odd | 1), shift);
            proptest::prop_assert_eq!(fast_text(&p), slow_text(&p));
            let mut p = Prob::one();
            for q in factors {
                p.mul_ratio_assign(q, 1 << 31);
                proptest::prop_assert_eq!(fast_text(&p), slow_text(&p));
                let c = p.complement().expect("at most 1");
                proptest::prop_assert_eq!(fast_text(&c), slow_text(&c));
                let m = p.mul_ratio(every - 1, every);
                proptest::prop_assert_eq!(fast_text(&m), slow_text(&m));
            }
        }
    }
}
