//! The exact per-(unit, group) values a DP release is computed from: from
//! rows (`dp`) or read off a unit summary (`summary`).

use datafusion::logical_expr::Expr;

/// One exact per-(unit, group) value a release is computed from.
#[derive(Debug, Clone, PartialEq)]
pub enum Component {
    /// The unit's rows in the group.
    Rows,
    /// Its non-NULL values of a column.
    Count(Expr),
    /// The sum of its values of a column, each clamped to the declared bounds.
    ClampedSum { arg: Expr, lo: f64, hi: f64 },
}
