//! Metering and prices. Money is exact: decimal strings are parsed into
//! integer millionths, never floats.

use serde::Serialize;

const SCALE: i128 = 1_000_000;

/// What one query used and costs.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Usage {
    pub rows_scanned: u64,
    pub bytes_scanned: u64,
    pub cpu_ms: u64,
    pub wall_ms: u64,
    pub groups_released: u64,
    pub groups_suppressed: u64,
    pub cells_released: u64,
    pub epsilon: f64,
    pub charge: String,
    pub currency: Option<String>,
}

/// Parses a non-negative decimal with up to six fractional digits into millionths.
pub fn parse_money(s: &str) -> Option<i128> {
    let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
    if whole.is_empty()
        || frac.len() > 6
        || !whole
            .bytes()
            .chain(frac.bytes())
            .all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let whole: i128 = whole.parse().ok()?;
    let frac: i128 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<6}").parse().ok()?
    };
    Some(whole * SCALE + frac)
}

/// Formats millionths with at least two and at most six decimals.
pub fn format_money(micros: i128) -> String {
    let whole = micros / SCALE;
    let frac = format!("{:06}", (micros % SCALE).abs());
    let trimmed = frac.trim_end_matches('0');
    let frac = if trimmed.len() < 2 {
        &frac[..2]
    } else {
        trimmed
    };
    format!("{whole}.{frac}")
}

/// The price of scanning `rows` of a dataset: per query plus per million rows, rounded half up to millionths.
pub fn price(per_query: &str, per_million_rows: &str, rows: u64) -> Option<i128> {
    let base = parse_money(per_query)?;
    let per_million = parse_money(per_million_rows)?;
    Some(base + (per_million * rows as i128 + SCALE / 2) / SCALE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_round_trips_exactly() {
        assert_eq!(parse_money("0.50"), Some(500_000));
        assert_eq!(parse_money("12"), Some(12_000_000));
        assert_eq!(parse_money("0.000001"), Some(1));
        assert_eq!(parse_money("1.0000001"), None);
        assert_eq!(parse_money("-1"), None);
        assert_eq!(parse_money("1e3"), None);
        assert_eq!(format_money(700_000), "0.70");
        assert_eq!(format_money(1_234_567), "1.234567");
        assert_eq!(format_money(0), "0.00");
    }

    #[test]
    fn price_is_per_query_plus_rows() {
        // 0.50 + 2.00 per million x 100,000 rows = 0.70
        assert_eq!(
            price("0.50", "2.00", 100_000).map(format_money).as_deref(),
            Some("0.70")
        );
        // 0.1 + 0.3 x 1 row = 0.1000003 -> rounds to 0.100000
        assert_eq!(
            price("0.1", "0.3", 1).map(format_money).as_deref(),
            Some("0.10")
        );
        assert_eq!(
            price("0.1", "0.3", 2).map(format_money).as_deref(),
            Some("0.100001")
        );
    }
}
