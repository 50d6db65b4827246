//! Serial number arithmetic (RFC 1982, as RFC 7143 §4.2.2.1 requires for CmdSN, StatSN,
//! DataSN and R2TSN comparisons).

/// A 32-bit sequence number compared with RFC 1982 serial arithmetic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SerialNumber(pub u32);

impl SerialNumber {
    /// `self < other` in serial arithmetic.
    pub fn lt(self, other: SerialNumber) -> bool {
        self.0 != other.0 && (other.0.wrapping_sub(self.0) as i32) > 0
    }

    /// `self > other` in serial arithmetic.
    pub fn gt(self, other: SerialNumber) -> bool {
        other.lt(self)
    }

    /// `self <= other`.
    pub fn le(self, other: SerialNumber) -> bool {
        self == other || self.lt(other)
    }

    /// The next number, wrapping.
    pub fn next(self) -> SerialNumber {
        SerialNumber(self.0.wrapping_add(1))
    }

    /// Adds `n`, wrapping.
    pub fn plus(self, n: u32) -> SerialNumber {
        SerialNumber(self.0.wrapping_add(n))
    }

    /// Whether `self` lies in the window `[low, high]` (inclusive, serial arithmetic).
    pub fn in_window(self, low: SerialNumber, high: SerialNumber) -> bool {
        low.le(self) && self.le(high)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps() {
        assert!(SerialNumber(u32::MAX).lt(SerialNumber(0)));
        assert!(SerialNumber(5).lt(SerialNumber(6)));
        assert!(!SerialNumber(6).lt(SerialNumber(6)));
        assert!(SerialNumber(0).in_window(SerialNumber(u32::MAX - 1), SerialNumber(3)));
        assert!(!SerialNumber(4).in_window(SerialNumber(u32::MAX - 1), SerialNumber(3)));
    }
}
