//! The functions a buyer's SQL may call, registered one by one.
//!
//! DataFusion's `with_default_features()` registers whatever its enabled
//! cargo features bring, and other crates switch more of them on (Ballista
//! turns on nested, crypto, regex and encoding functions): the sandbox's
//! function surface would grow with the dependency tree. Instead the
//! session gets exactly the functions named here; a name missing from the
//! build is an error found by the tests, not a silently smaller surface.

use datafusion::arrow::array::{Array, AsArray, BooleanArray};
use datafusion::arrow::buffer::BooleanBuffer;
use datafusion::arrow::datatypes::DataType;
use datafusion::common::Result;
use datafusion::execution::session_state::SessionStateBuilder;
use datafusion::logical_expr::planner::ExprPlanner;
use datafusion::logical_expr::{
    ColumnarValue, Expr, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, lit,
};
use std::sync::Arc;

const CONSENTED: &str = "fg_consented";

/// Functions of the sandbox's own that its rewrites put into plans. A
/// buyer's session does not know them (a query cannot name one and step
/// around a prohibition written for `contains`); cluster nodes do, to run
/// the plans that carry them.
#[cfg(all(test, feature = "ballista"))]
pub const INTERNAL: &[&str] = &[CONSENTED];

/// Makes the sandbox's own functions known to a cluster node's session.
#[cfg(feature = "ballista")]
pub fn register_internal(state: &mut datafusion::execution::session_state::SessionState) {
    use datafusion::execution::FunctionRegistry;
    // Registering a scalar function replaces one of the same name and does
    // not fail.
    let _ = state.register_udf(Arc::new(ScalarUDF::from(Consented::new())));
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

/// The consent filter: whether `column` names `needle` (`contains`), for a
/// column that repeats a few values over many rows (each person's consent,
/// on each of their visits). Where each distinct string is stored once (the
/// clustered copy), an equal string view holds the same string in the same
/// place, so answers are kept by view in a small table and taken over
/// instead of searched for again.
pub fn consented(column: Expr, needle: &str) -> Expr {
    ScalarUDF::from(Consented::new()).call(vec![column, lit(needle)])
}

/// The slots of the consent filter's answers by view: the combinations of
/// purposes people consent to are few.
const KNOWN_VIEWS: usize = 64;

/// A view's slot, from all its bits: a long string's length, prefix, buffer
/// and offset, or a short string's bytes.
fn known_slot(view: u128) -> usize {
    let folded = (view as u64) ^ ((view >> 64) as u64);
    let folded = folded ^ (folded >> 29) ^ (folded >> 47);
    (folded as usize) % KNOWN_VIEWS
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct Consented {
    signature: Signature,
}

impl Consented {
    fn new() -> Consented {
        Consented {
            signature: datafusion::functions::string::contains()
                .signature()
                .clone(),
        }
    }
}

impl ScalarUDFImpl for Consented {
    fn name(&self) -> &str {
        CONSENTED
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(DataType::Boolean)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        if let [ColumnarValue::Array(column), ColumnarValue::Scalar(needle)] = args.args.as_slice()
            && let Some(views) = column.as_string_view_opt()
            && let Some(Some(needle)) = needle.try_as_str()
        {
            let nulls = views.nulls();
            // Answers by view in a small table indexed by the view's bits: a
            // lookup that almost always finds its view is a branch the
            // processor predicts, where comparing with the row before missed
            // at every person with another consent.
            let mut known: [(u128, Option<bool>); KNOWN_VIEWS] = [(0, None); KNOWN_VIEWS];
            let answers = BooleanBuffer::collect_bool(views.len(), |row| {
                if nulls.is_some_and(|n| n.is_null(row)) {
                    return false;
                }
                let view = views.views()[row];
                let slot = &mut known[known_slot(view)];
                match *slot {
                    (seen, Some(answer)) if seen == view => answer,
                    _ => {
                        let answer = views.value(row).contains(needle);
                        *slot = (view, Some(answer));
                        answer
                    }
                }
            });
            return Ok(ColumnarValue::Array(Arc::new(BooleanArray::new(
                answers,
                nulls.cloned(),
            ))));
        }
        datafusion::functions::string::contains().invoke_with_args(args)
    }
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

    /// The consent filter's shortcut (an equal view, an answer kept) must
    /// answer as `contains` does: strings that share a length and a prefix
    /// but differ after it, the same string stored twice, nulls between,
    /// more distinct strings than it keeps answers for.
    #[test]
    fn consented_answers_as_contains_does_on_repeated_and_lookalike_values() {
        use datafusion::arrow::array::{ArrayRef, StringViewBuilder};
        use datafusion::arrow::datatypes::Field;
        let values = [
            Some(",research,insurance,planning,"),
            Some(",research,insurance,planning,"),
            Some(",research,insurance,plannin_,"),
            None,
            Some(",research,insurance,planning,"),
            Some(",resea,"),
            Some(",resea,"),
            Some(",marketing,insurance,planning,"),
            Some(",research,insurance,planning,"),
        ];
        // More distinct strings than the filter keeps answers for, repeated
        // out of order: answers are found again after being pushed out.
        let many: Vec<String> = (0..3 * KNOWN_VIEWS)
            .map(|i| match i % 3 {
                0 => format!(",research,planning,{i:04},"),
                _ => format!(",research,plannin_,{i:04},"),
            })
            .collect();
        let values: Vec<Option<&str>> = values
            .into_iter()
            .chain(many.iter().map(|s| Some(s.as_str())))
            .chain(many.iter().rev().step_by(2).map(|s| Some(s.as_str())))
            .chain(values)
            .collect();
        let needle = ",planning,";
        for dedup in [true, false] {
            let mut builder = StringViewBuilder::new();
            if dedup {
                builder = builder.with_deduplicate_strings();
            }
            values.iter().for_each(|v| builder.append_option(*v));
            let column: ArrayRef = Arc::new(builder.finish());
            let args = ScalarFunctionArgs {
                args: vec![
                    ColumnarValue::Array(column.clone()),
                    ColumnarValue::Scalar(needle.into()),
                ],
                arg_fields: vec![
                    Arc::new(Field::new("c", DataType::Utf8View, true)),
                    Arc::new(Field::new("n", DataType::Utf8, false)),
                ],
                number_rows: values.len(),
                return_field: Arc::new(Field::new("r", DataType::Boolean, true)),
                config_options: Default::default(),
            };
            let ColumnarValue::Array(got) = Consented::new().invoke_with_args(args).unwrap() else {
                panic!("an array answer");
            };
            let expected: BooleanArray = values
                .iter()
                .map(|v| v.map(|s| s.contains(needle)))
                .collect();
            assert_eq!(got.as_boolean(), &expected, "dedup {dedup}");
        }
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
