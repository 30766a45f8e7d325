//! Public partitions: the groups of a DP release known before any data is
//! read, from the public domains the manifests declare. Each group key must
//! be an expression of one column with a declared domain (`district`,
//! `floor(age / 10) * 10`); the key's values are that expression evaluated
//! over the domain, by the engine's own expression code, so they are exactly
//! the values the engine groups by. The groups are the cross product of the
//! keys' values. Nothing here reads the data.

use super::split::base_column;
use crate::catalog::Catalog;
use datafusion::arrow::array::{ArrayRef, RecordBatch, UInt32Array};
use datafusion::arrow::compute::take;
use datafusion::arrow::datatypes::{Field, Schema};
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{Column, DFSchema, ExprSchema, ScalarValue};
use datafusion::logical_expr::{Aggregate, Expr, LogicalPlan};
use datafusion::prelude::SessionContext;
use std::collections::HashSet;
use std::sync::Arc;

/// The group keys' values; the released groups are their cross product.
#[derive(Debug, Clone)]
pub struct Partitions {
    keys: Vec<ArrayRef>,
}

const DOMAIN_COLUMN: &str = "__fg_domain";

thread_local! {
    /// Plans key expressions over a domain; holds no tables.
    static EXPRESSIONS: SessionContext = SessionContext::new();
}

impl Partitions {
    /// The public partitions of `agg` over `input`, when every group key has
    /// a public domain and there are at most `max_groups` groups; `None`
    /// otherwise (groups are then selected from the data, with noise).
    pub fn of(
        agg: &Aggregate,
        input: &LogicalPlan,
        catalog: &Catalog,
        max_groups: u64,
    ) -> Option<Partitions> {
        let mut keys = Vec::with_capacity(agg.group_expr.len());
        let mut groups: u64 = 1;
        for (i, g) in agg.group_expr.iter().enumerate() {
            let values = key_values(g, input, catalog)?;
            let wanted = agg.schema.field(i).data_type();

            if values.data_type() != wanted {
                return None;
            }
            groups = groups.checked_mul(values.len() as u64)?;
            if groups > max_groups {
                return None;
            }
            keys.push(values);
        }
        Some(Partitions { keys })
    }

    pub fn groups(&self) -> usize {
        self.keys.iter().map(|k| k.len()).product()
    }

    /// The group keys of groups `range` in cross-product order, one column
    /// per key (the last key varies fastest).
    pub fn key_columns(&self, range: std::ops::Range<usize>) -> Result<Vec<ArrayRef>, String> {
        let mut columns = Vec::with_capacity(self.keys.len());
        let mut stride = self.groups();
        for key in &self.keys {
            stride /= key.len().max(1);
            let indices = UInt32Array::from_iter_values(
                range.clone().map(|g| ((g / stride) % key.len()) as u32),
            );
            columns.push(take(key, &indices, None).map_err(|e| e.to_string())?);
        }
        Ok(columns)
    }

    /// The key in row `row` of `columns` (an engine batch's group columns,
    /// or [`Partitions::key_columns`]), comparable across the two.
    pub fn key(&self, columns: &[ArrayRef], row: usize) -> Option<Vec<ScalarValue>> {
        columns
            .iter()
            .map(|c| ScalarValue::try_from_array(c, row).ok())
            .collect()
    }
}

/// The distinct values of group key `key` over its column's declared domain.
fn key_values(key: &Expr, input: &LogicalPlan, catalog: &Catalog) -> Option<ArrayRef> {
    let columns = key.column_refs();

    let [column] = columns.into_iter().collect::<Vec<&Column>>()[..] else {
        return None;
    };
    let (table, name) = base_column(input, column)?;
    let domain = catalog
        .get(&table)?
        .manifest
        .column(&name)?
        .domain
        .as_ref()?;
    let data_type = input.schema().field_from_column(column).ok()?.data_type();
    let declared = domain.array(data_type).ok()?;
    let schema = Schema::new(vec![Field::new(DOMAIN_COLUMN, data_type.clone(), true)]);
    let over_domain = key
        .clone()
        .transform(|e| {
            Ok(match e {
                Expr::Column(c) if &c == column => {
                    Transformed::yes(Expr::Column(Column::from_name(DOMAIN_COLUMN)))
                }
                other => Transformed::no(other),
            })
        })
        .ok()?
        .data;
    let df_schema = DFSchema::try_from(schema.clone()).ok()?;
    // The key as planned, before type coercion (`floor` of an integer):
    // coerced here as the engine coerces it.
    let physical = EXPRESSIONS
        .with(|ctx| ctx.create_physical_expr(over_domain, &df_schema))
        .ok()?;
    let batch = RecordBatch::try_new(Arc::new(schema), vec![declared]).ok()?;
    let values = physical
        .evaluate(&batch)
        .ok()?
        .into_array(batch.num_rows())
        .ok()?;
    distinct(&values)
}

/// The distinct non-null values of `values`, in first-seen order.
fn distinct(values: &ArrayRef) -> Option<ArrayRef> {
    let mut seen = HashSet::new();
    let keep: Vec<u32> = (0..values.len())
        .filter(|&i| {
            values.is_valid(i)
                && ScalarValue::try_from_array(values, i).is_ok_and(|v| seen.insert(v))
        })
        .map(|i| i as u32)
        .collect();
    take(values, &UInt32Array::from(keep), None).ok()
}
