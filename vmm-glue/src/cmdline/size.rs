//! Byte sizes: parsed the way vublk parses them, printed the way both VMMs read them.
//!
//! Input takes the suffixes `K`, `M`, `G`, `T` (powers of 1024), as `vublk --null` does.
//! Output uses the largest of `K`, `M`, `G` that divides the size exactly, else plain bytes:
//! QEMU's size parser and cloud-hypervisor's `ByteSized` both read these suffixes as powers of
//! 1024, and cloud-hypervisor's knows no `T`.

/// Parses `4096`, `512K`, `4G`, `1T` (case-insensitive suffix, powers of 1024).
pub fn parse(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (digits, shift) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 10),
        Some('M') => (&t[..t.len() - 1], 20),
        Some('G') => (&t[..t.len() - 1], 30),
        Some('T') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("'{text}' is not a size (a number with an optional K, M, G or T)"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("'{text}' is too large"))
}

/// Prints `bytes` with the largest exact suffix of `K`, `M`, `G`.
pub fn format(bytes: u64) -> String {
    for (suffix, shift) in [("G", 30), ("M", 20), ("K", 10)] {
        let unit = 1u64 << shift;
        if bytes != 0 && bytes % unit == 0 {
            return format!("{}{suffix}", bytes / unit);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_suffixes_as_powers_of_1024() {
        assert_eq!(parse("4096"), Ok(4096));
        assert_eq!(parse("512K"), Ok(512 << 10));
        assert_eq!(parse("4g"), Ok(4 << 30));
        assert_eq!(parse("1T"), Ok(1 << 40));
        assert!(parse("4X").is_err());
        assert!(parse("").is_err());
        assert!(parse("16777216T").is_err());
    }

    #[test]
    fn prints_the_largest_exact_suffix_up_to_g() {
        assert_eq!(format(4 << 30), "4G");
        assert_eq!(format(1 << 40), "1024G");
        assert_eq!(format(1536 << 20), "1536M");
        assert_eq!(format(12 << 10), "12K");
        assert_eq!(format(1000), "1000");
        assert_eq!(format(0), "0");
    }
}
