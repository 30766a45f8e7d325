//! The functions a buyer's SQL may call, registered one by one.
//!
//! DataFusion's `with_default_features()` registers whatever its enabled
//! cargo features bring, and other crates switch more of them on (Ballista
//! turns on nested, crypto, regex and encoding functions): the sandbox's
//! function surface would grow with the dependency tree. Instead the
//! session gets exactly the functions named here; a name missing from the
//! build is an error found by the tests, not a silently smaller surface.

use datafusion::execution::session_state::SessionStateBuilder;
use datafusion::logical_expr::planner::ExprPlanner;
use std::sync::Arc;

/// Functions of the sandbox's own that its rewrites put into plans. A
/// buyer's session does not know them (a query cannot name one and step
/// around a prohibition written for `contains`); cluster nodes do, to run
/// the plans that carry them.
#[cfg(all(test, feature = "ballista"))]
pub const INTERNAL: &[&str] = &[crate::catalog::consent::FILTER];

/// Makes the sandbox's own functions known to a cluster node's session.
#[cfg(feature = "ballista")]
pub fn register_internal(state: &mut datafusion::execution::session_state::SessionState) {
    use datafusion::execution::FunctionRegistry;
    // Registering a scalar function replaces one of the same name and does
    // not fail.
    let _ = state.register_udf(Arc::new(crate::catalog::consent::filter_function()));
}

pub const SCALAR: &[&str] = &[
    "abs",
    "acos",
    "acosh",
    "arrow_cast",
    "arrow_field",
    "arrow_metadata",
    "arrow_try_cast",
    "arrow_typeof",
    "ascii",
    "asin",
    "asinh",
    "atan",
    "atan2",
    "atanh",
    "bit_length",
    "btrim",
    "cast_to_type",
    "cbrt",
    "ceil",
    "character_length",
    "chr",
    "coalesce",
    "concat",
    "concat_ws",
    "contains",
    "cos",
    "cosh",
    "cot",
    "current_date",
    "current_time",
    "date_bin",
    "date_part",
    "date_trunc",
    "decode",
    "degrees",
    "encode",
    "ends_with",
    "exp",
    "factorial",
    "file_row_index",
    "find_in_set",
    "floor",
    "from_unixtime",
    "gcd",
    "get_field",
    "greatest",
    "initcap",
    "input_file_name",
    "isnan",
    "iszero",
    "lcm",
    "least",
    "left",
    "levenshtein",
    "ln",
    "log",
    "log10",
    "log2",
    "lower",
    "lpad",
    "ltrim",
    "make_date",
    "make_time",
    "named_struct",
    "nanvl",
    "now",
    "nullif",
    "nvl",
    "nvl2",
    "octet_length",
    "overlay",
    "pi",
    "power",
    "radians",
    "random",
    "regexp_count",
    "regexp_instr",
    "regexp_like",
    "regexp_match",
    "regexp_replace",
    "repeat",
    "replace",
    "reverse",
    "right",
    "round",
    "rpad",
    "rtrim",
    "signum",
    "sin",
    "sinh",
    "split_part",
    "sqrt",
    "starts_with",
    "strpos",
    "struct",
    "substr",
    "substr_index",
    "tan",
    "tanh",
    "to_char",
    "to_date",
    "to_hex",
    "to_local_time",
    "to_time",
    "to_timestamp",
    "to_timestamp_micros",
    "to_timestamp_millis",
    "to_timestamp_nanos",
    "to_timestamp_seconds",
    "to_unixtime",
    "translate",
    "trunc",
    "try_cast_to_type",
    "union_extract",
    "union_tag",
    "upper",
    "uuid",
    "version",
    "with_metadata",
];

pub const AGGREGATE: &[&str] = &[
    "any_value",
    "approx_distinct",
    "approx_median",
    "approx_percentile_cont",
    "approx_percentile_cont_with_weight",
    "array_agg",
    "avg",
    "bit_and",
    "bit_or",
    "bit_xor",
    "bool_and",
    "bool_or",
    "corr",
    "count",
    "covar_pop",
    "covar_samp",
    "first_value",
    "grouping",
    "last_value",
    "max",
    "median",
    "min",
    "nth_value",
    "percentile_cont",
    "regr_avgx",
    "regr_avgy",
    "regr_count",
    "regr_intercept",
    "regr_r2",
    "regr_slope",
    "regr_sxx",
    "regr_sxy",
    "regr_syy",
    "stddev",
    "stddev_pop",
    "string_agg",
    "sum",
    "var",
    "var_pop",
];

pub const WINDOW: &[&str] = &[
    "cume_dist",
    "dense_rank",
    "first_value",
    "lag",
    "last_value",
    "lead",
    "nth_value",
    "ntile",
    "percent_rank",
    "rank",
    "row_number",
];

/// `builder` with the allowed functions and the expression planners that
/// turn SQL syntax into them (`a || b`, `EXTRACT`, `POSITION`, ...); none of
/// the nested-type planners (array literals, field access).
pub fn register(builder: SessionStateBuilder) -> SessionStateBuilder {
    use datafusion::functions::{core, datetime, unicode};
    let planners: Vec<Arc<dyn ExprPlanner>> = vec![
        Arc::new(core::planner::CoreFunctionPlanner::default()),
        Arc::new(datetime::planner::DatetimeFunctionPlanner),
        Arc::new(unicode::planner::UnicodeFunctionPlanner),
        Arc::new(datafusion::functions_aggregate::planner::AggregateFunctionPlanner),
        Arc::new(datafusion::functions_window::planner::WindowFunctionPlanner),
    ];
    builder
        .with_expr_planners(planners)
        .with_scalar_functions(allowed(
            datafusion::functions::all_default_functions(),
            SCALAR,
            |f| f.name(),
        ))
        .with_aggregate_functions(allowed(
            datafusion::functions_aggregate::all_default_aggregate_functions(),
            AGGREGATE,
            |f| f.name(),
        ))
        .with_window_functions(allowed(
            datafusion::functions_window::all_default_window_functions(),
            WINDOW,
            |f| f.name(),
        ))
}

fn allowed<F>(available: Vec<Arc<F>>, names: &[&str], name: impl Fn(&F) -> &str) -> Vec<Arc<F>> {
    available
        .into_iter()
        .filter(|f| names.contains(&name(f)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn names<'a>(list: impl Iterator<Item = &'a str>) -> BTreeSet<String> {
        list.map(str::to_string).collect()
    }

    /// Runs in the default build and in the `ballista` build, whose
    /// DataFusion has its default features on: both sessions hold exactly
    /// the allow-list.
    #[test]
    fn the_session_holds_exactly_the_allowed_functions() {
        let engine = crate::engine::Engine::new(crate::config::Limits::default());
        let state = engine.session_with(Vec::new()).expect("a session");
        let scalar = names(state.scalar_functions().values().map(|f| f.name()));
        let aggregate = names(state.aggregate_functions().values().map(|f| f.name()));
        let window = names(state.window_functions().values().map(|f| f.name()));
        assert_eq!(scalar, names(SCALAR.iter().copied()));
        assert_eq!(aggregate, names(AGGREGATE.iter().copied()));
        assert_eq!(window, names(WINDOW.iter().copied()));
        assert!(state.higher_order_functions().is_empty());
        assert_eq!(state.expr_planners().len(), 5);
    }

    /// With nested functions compiled in (the `ballista` build), they are
    /// still not callable; in the default build they do not exist at all.
    #[tokio::test]
    async fn functions_outside_the_list_are_unknown_to_a_query() {
        let engine = crate::engine::Engine::new(crate::config::Limits::default());
        let state = engine.session_with(Vec::new()).expect("a session");
        for sql in [
            "SELECT make_array(1, 2)",
            "SELECT sha256('a')",
            "SELECT [1, 2]",
            "SELECT fg_consented('a', 'b')",
        ] {
            let statement = engine.parse(sql).expect("parses");
            assert!(
                engine.plan(&state, statement).await.is_err(),
                "{sql} planned"
            );
        }
    }
}
