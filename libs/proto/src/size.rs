//! Human-readable sizes ("20GiB", "512 MiB", "80GB") for flags and inventories.

/// Parses a size into bytes; plain numbers are bytes.
pub fn parse_bytes(s: &str) -> Result<i64, String> {
    let trimmed = s.trim();
    if trimmed.starts_with('-') {
        return Err(format!("{s:?} is negative; sizes are like \"20GiB\""));
    }
    let size: bytesize::ByteSize = trimmed
        .parse()
        .map_err(|e| format!("{s:?} is not a size like \"20GiB\": {e}"))?;
    i64::try_from(size.as_u64()).map_err(|_| format!("{s:?} is too large"))
}

/// Bytes as "20 GiB".
pub fn format_bytes(bytes: i64) -> String {
    bytesize::ByteSize::b(bytes.max(0).unsigned_abs())
        .display()
        .iec()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        assert_eq!(parse_bytes("20GiB"), Ok(20 << 30));
        assert_eq!(parse_bytes("512 MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("1024"), Ok(1024));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("-5GiB").unwrap_err().contains("negative"));
        assert!(parse_bytes("").is_err());
        assert_eq!(format_bytes(20 << 30), "20.0 GiB");
    }
}
