//! How a dataset's consent column records purposes, and the filter that
//! reads it.
//!
//! Purposes are stored delimited on both sides (",a,b,"), so that only a
//! whole purpose matches. The filter is a function of the sandbox's own: a
//! buyer's session does not know it, so a query cannot name it and step
//! around a prohibition written for `contains`.

use datafusion::arrow::array::{Array, AsArray, BooleanArray, StringViewArray};
use datafusion::arrow::buffer::BooleanBuffer;
use datafusion::arrow::datatypes::DataType;
use datafusion::common::Result;
use datafusion::logical_expr::{
    ColumnarValue, Expr, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, lit,
};
use std::sync::Arc;

/// The consent filter's name in plans.
pub const FILTER: &str = "fg_consented";

/// The consent filter, for sessions that run plans carrying it.
pub fn filter_function() -> ScalarUDF {
    ScalarUDF::from(Consented::new())
}

/// The consent filter: whether `column` names `purpose`, for a column that
/// repeats a few values over many rows (each person's consent, on each of
/// their visits). Where each distinct string is stored once
/// (the clustered copy), an equal string view holds the same string in the
/// same place, so answers are kept by view in a small table and taken over
/// instead of searched for again.
pub fn consented(column: Expr, purpose: &str) -> Expr {
    filter_function().call(vec![column, lit(needle(purpose))])
}

fn needle(purpose: &str) -> String {
    format!(",{purpose},")
}

/// The purposes named in one stored consent value.
pub fn purposes_in(consent: &str) -> impl Iterator<Item = &str> {
    consent.split(',').filter(|p| !p.is_empty())
}

/// The purpose `expr` filters for, if it is [`consented`] over a column
/// named `column`.
pub fn purpose_of<'a>(expr: &'a Expr, column: &str) -> Option<&'a str> {
    let Expr::ScalarFunction(call) = expr else {
        return None;
    };
    let [Expr::Column(c), Expr::Literal(delimited, _)] = call.args.as_slice() else {
        return None;
    };
    if call.func.name() != FILTER || c.name != column {
        return None;
    }
    let purpose = delimited
        .try_as_str()??
        .strip_prefix(',')?
        .strip_suffix(',')?;
    (!purpose.contains(',')).then_some(purpose)
}

/// Which rows of `views` consent to `purpose`: what [`consented`] answers,
/// with NULL as no.
pub fn mask(views: &StringViewArray, purpose: &str) -> BooleanArray {
    BooleanArray::new(contains_by_view(views, &needle(purpose)), None)
}

fn contains_by_view(views: &StringViewArray, needle: &str) -> BooleanBuffer {
    let nulls = views.nulls();
    // Answers by view in a small table indexed by the view's bits: a
    // lookup that almost always finds its view is a branch the processor
    // predicts, where comparing with the row before missed at every person
    // with another consent.
    let mut known: [(u128, Option<bool>); KNOWN_VIEWS] = [(0, None); KNOWN_VIEWS];
    BooleanBuffer::collect_bool(views.len(), |row| {
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
    })
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
        FILTER
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
            return Ok(ColumnarValue::Array(Arc::new(BooleanArray::new(
                contains_by_view(views, needle),
                views.nulls().cloned(),
            ))));
        }
        datafusion::functions::string::contains().invoke_with_args(args)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
