//! How fast a dataset's lifetime ε is burning: what was left at the end of
//! each day, and when it runs out at the pace of the last week.

use serde::Serialize;

/// Days the pace is measured over, today included.
pub const PACE_DAYS: i64 = 7;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Day {
    pub day: String,
    pub spent: f64,
    /// Left at the end of the day.
    pub remaining: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BurnDown {
    pub by_day: Vec<Day>,
    /// ε per day over the last [`PACE_DAYS`] days.
    pub pace_per_day: f64,
    /// The day the budget runs out at that pace (`YYYY-MM-DD`); none when
    /// nothing was spent lately or nothing is left.
    pub projected_exhaustion: Option<String>,
}

/// The burn-down of a budget of `limit` of which `spent` is used, from the
/// ε charged per day (`by_day`, oldest first; entries already archived are
/// missing from it and count as spent before its first day).
pub fn burn_down(
    limit: f64,
    spent: f64,
    by_day: &[(String, f64)],
    today: chrono::NaiveDate,
) -> BurnDown {
    let listed: f64 = by_day.iter().map(|(_, e)| e).sum();
    let mut used = (spent - listed).max(0.0);
    let days = by_day
        .iter()
        .map(|(day, e)| {
            used += e;
            Day {
                day: day.clone(),
                spent: *e,
                remaining: (limit - used).max(0.0),
            }
        })
        .collect();
    let first = today - chrono::Duration::days(PACE_DAYS - 1);
    let recent: f64 = by_day
        .iter()
        .filter(|(day, _)| {
            chrono::NaiveDate::parse_from_str(day, "%Y-%m-%d")
                .is_ok_and(|d| d >= first && d <= today)
        })
        .map(|(_, e)| e)
        .sum();
    let pace = recent / PACE_DAYS as f64;
    let remaining = (limit - spent).max(0.0);
    let projected_exhaustion = (pace > 0.0 && remaining > 0.0).then(|| {
        // The tolerance keeps float error from adding a day to an exact quotient.
        let days = (remaining / pace - 1e-9).ceil().min(36_500.0) as i64;
        (today + chrono::Duration::days(days))
            .format("%Y-%m-%d")
            .to_string()
    });
    BurnDown {
        by_day: days,
        pace_per_day: pace,
        projected_exhaustion,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn day(s: &str) -> chrono::NaiveDate {
        chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap()
    }

    #[test]
    fn remaining_steps_down_and_the_pace_of_the_last_week_projects_the_end() {
        let spent_per_day = vec![
            ("2026-10-01".to_string(), 5.0),
            ("2026-11-25".to_string(), 0.7),
            ("2026-11-30".to_string(), 0.7),
        ];
        // 1.0 was spent in entries archived before the first listed day.
        let b = burn_down(20.0, 7.4, &spent_per_day, day("2026-11-30"));
        let remaining: Vec<f64> = b.by_day.iter().map(|d| d.remaining).collect();
        assert_eq!(remaining.len(), 3);
        assert!((remaining[0] - 14.0).abs() < 1e-9, "{remaining:?}");
        assert!((remaining[2] - 12.6).abs() < 1e-9, "{remaining:?}");
        // 1.4 in the last 7 days: 0.2 a day, 12.6 left: 63 days.
        assert!((b.pace_per_day - 0.2).abs() < 1e-9);
        assert_eq!(b.projected_exhaustion.as_deref(), Some("2027-02-01"));
    }

    #[test]
    fn no_projection_without_recent_spending_or_without_budget_left() {
        let old = vec![("2026-01-01".to_string(), 1.0)];
        assert_eq!(
            burn_down(5.0, 1.0, &old, day("2026-11-30")).projected_exhaustion,
            None
        );
        let recent = vec![("2026-11-30".to_string(), 5.0)];
        assert_eq!(
            burn_down(5.0, 5.0, &recent, day("2026-11-30")).projected_exhaustion,
            None
        );
    }
}
