//! Kubernetes resource quantities (`100m`, `2`, `512Mi`, `1.5Gi`, `1e3`), kept exactly as
//! thousandths so CPU millicores and memory bytes both fit.

/// Why a quantity did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    #[error(
        "invalid quantity {0:?}: expected a number with an optional suffix (m, k, M, G, Ki, Mi, Gi, ...)"
    )]
    Invalid(String),
    #[error("quantity {0:?} is negative; resources here cannot be")]
    Negative(String),
    #[error("quantity {0:?} is too large")]
    Overflow(String),
}

/// A non-negative quantity in thousandths of its unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Quantity {
    millis: u128,
}

impl Quantity {
    /// A quantity of whole units.
    pub fn from_units(units: u64) -> Quantity {
        Quantity {
            millis: u128::from(units) * 1000,
        }
    }

    /// A quantity in thousandths of a unit (millicores for CPU).
    pub fn from_millis(millis: u64) -> Quantity {
        Quantity {
            millis: u128::from(millis),
        }
    }

    /// Thousandths of the unit.
    pub fn millis(self) -> u128 {
        self.millis
    }

    /// Whole units, rounded up as Kubernetes does (`100m` CPU is 1 when asked in units).
    pub fn units_ceil(self) -> u128 {
        self.millis.div_ceil(1000)
    }

    /// `self - other`, never below zero.
    #[must_use]
    pub fn saturating_sub(self, other: Quantity) -> Quantity {
        Quantity {
            millis: self.millis.saturating_sub(other.millis),
        }
    }

    /// Parses a quantity; fractions are rounded up to the next thousandth.
    pub fn parse(text: &str) -> Result<Quantity, QuantityError> {
        let s = text.trim();
        let invalid = || QuantityError::Invalid(text.to_owned());
        let overflow = || QuantityError::Overflow(text.to_owned());
        if s.starts_with('-') {
            return Err(QuantityError::Negative(text.to_owned()));
        }
        let s = s.strip_prefix('+').unwrap_or(s);
        let number_len = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (number, suffix) = s.split_at(number_len);
        let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
        if whole.is_empty() && frac.is_empty() {
            return Err(invalid());
        }
        if frac.contains('.') || frac.len() > 30 || whole.len() > 30 {
            return Err(invalid());
        }
        // mantissa / 10^frac_len is the number.
        let digits = format!("{whole}{frac}");
        let mantissa: u128 = digits.parse().map_err(|_| invalid())?;
        let frac_len = u32::try_from(frac.len()).map_err(|_| invalid())?;

        // value * multiplier_num / multiplier_den, in thousandths.
        let (num, den): (u128, u128) = match suffix {
            "" => (1000, 1),
            "m" => (1, 1),
            "k" => (1000u128.pow(2), 1),
            "M" => (1000u128.pow(3), 1),
            "G" => (1000u128.pow(4), 1),
            "T" => (1000u128.pow(5), 1),
            "P" => (1000u128.pow(6), 1),
            "E" => (1000u128.pow(7), 1),
            "Ki" => (1000 << 10, 1),
            "Mi" => (1000 << 20, 1),
            "Gi" => (1000 << 30, 1),
            "Ti" => (1000 << 40, 1),
            "Pi" => (1000 << 50, 1),
            "Ei" => (1000 << 60, 1),
            e if e.starts_with(['e', 'E']) => {
                let exp: i32 = e[1..].parse().map_err(|_| invalid())?;
                if exp.unsigned_abs() > 30 {
                    return Err(overflow());
                }
                if exp >= 0 {
                    (1000 * 10u128.pow(exp.unsigned_abs()), 1)
                } else {
                    (1000, 10u128.pow(exp.unsigned_abs()))
                }
            }
            _ => return Err(invalid()),
        };
        let scaled = mantissa.checked_mul(num).ok_or_else(overflow)?;
        let divisor = 10u128.pow(frac_len).checked_mul(den).ok_or_else(overflow)?;
        Ok(Quantity {
            millis: scaled.div_ceil(divisor),
        })
    }
}
