//! Exact probabilities.
//!
//! Every probability the evaluator produces is a product and sum of factors
//! `q / 2^31` (random mode) and `1 / N`, `(N - 1) / N` (nth mode), so it is a rational
//! `num / (odd · 2^shift)` with `odd` odd. [`Prob`] keeps that form exactly, with
//! arbitrary-precision integers, and converts to the nearest `f64` only at the end.

use num_bigint::{BigInt, BigUint, Sign};
use num_integer::Integer;
use num_traits::{One, ToPrimitive, Zero};
use std::cmp::Ordering;
use std::fmt;

/// An exact non-negative rational `num / (odd · 2^shift)`, kept in lowest terms.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Prob {
    num: BigUint,
    odd: BigUint,
    shift: u64,
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
        let tz = b.trailing_zeros();
        let b_odd = b >> tz;
        let mut p = Self {
            num: &self.num * a,
            odd: if b_odd == 1 {
                self.odd.clone()
            } else {
                &self.odd * b_odd
            },
            shift: self.shift + u64::from(tz),
        };
        p.normalize();
        p
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

    /// `self += other`.
    pub fn add_assign(&mut self, other: &Prob) {
        *self = self.add(other);
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

    /// The nearest `f64` (ties to even), computed from the exact value.
    pub fn to_f64(&self) -> f64 {
        nearest_f64(&BigInt::from(self.num.clone()), &self.odd, self.shift)
    }

    /// The nearest `f64` to `n · self − 1`: the relative deviation of this probability
    /// from the ideal share `1/n`, computed exactly before rounding.
    pub fn relative_deviation(&self, n: u64) -> f64 {
        let scaled = BigInt::from(&self.num * n);
        let den = BigInt::from(self.denominator());
        nearest_f64(&(scaled - den), &self.odd, self.shift)
    }

    /// Number of bits in the numerator and denominator (a measure of the exact form's size).
    pub fn bits(&self) -> u64 {
        self.num.bits() + self.odd.bits() + self.shift
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
        write!(f, "{}/{}", self.num, self.denominator())
    }
}

/// Nearest f64 to `num / (odd · 2^shift)` for a signed numerator, ties to even.
fn nearest_f64(num: &BigInt, odd: &BigUint, shift: u64) -> f64 {
    let (sign, mag) = (num.sign(), num.magnitude());
    if mag.is_zero() {
        return 0.0;
    }
    // Scale so that the integer quotient has at least 66 significant bits.
    let nb = mag.bits() as i64;
    let ob = odd.bits() as i64;
    let k = (66 + ob - nb).max(0) as u64;
    let (q, r) = (mag << k).div_rem(odd);
    let qb = q.bits();
    // Keep 64 bits and fold everything below into a sticky bit, so that the single
    // rounding of u64 -> f64 below is the correct rounding of the exact value.
    let drop = qb - 64;
    let top = (&q >> drop).to_u64().unwrap_or(u64::MAX);
    let below_nonzero = q.trailing_zeros().is_some_and(|tz| tz < drop);
    let sticky = below_nonzero || !r.is_zero();
    let mant = top | u64::from(sticky);
    let exp = drop as i64 - k as i64 - shift as i64;
    let v = ldexp(mant as f64, exp);
    if sign == Sign::Minus { -v } else { v }
}

/// `x · 2^e`, exact while the result is a normal f64.
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
}
