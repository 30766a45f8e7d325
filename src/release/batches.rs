//! Run-time work on released batches: thresholds, key order, and filling
//! the placeholders of the plan above the release.

use super::*;
use crate::engine::Optimized;

/// Replaces each placeholder with a table of its released rows (which,
/// like the placeholder, takes no filter: the optimised plan stands).
pub fn fill(upper: &Optimized, released: Vec<(String, Arc<MemTable>)>) -> Result<Optimized, Error> {
    upper.with_sources(|scan| {
        released
            .iter()
            .find(|(slot, _)| scan.table_name.table() == slot)
            .map(|(_, table)| provider_as_source(table.clone()))
    })
}

/// Puts released groups in the order of their keys. The engine hands them
/// out in hash-table order, which follows the data — including groups that
/// were held back — so that order is not allowed to reach a buyer.
pub fn in_key_order(
    batches: Vec<RecordBatch>,
    groups: usize,
    schema: &SchemaRef,
) -> Result<Vec<RecordBatch>, Error> {
    use datafusion::arrow::compute::{
        SortColumn, concat_batches, lexsort_to_indices, take_record_batch,
    };
    let all = concat_batches(schema, &batches).map_err(internal)?;
    if groups == 0 || all.num_rows() < 2 {
        return Ok(vec![all]);
    }
    let keys: Vec<SortColumn> = all.columns()[..groups]
        .iter()
        .map(|c| SortColumn {
            values: c.clone(),
            options: None,
        })
        .collect();
    let order = lexsort_to_indices(&keys, None).map_err(internal)?;
    Ok(vec![take_record_batch(&all, &order).map_err(internal)?])
}

/// Drops every group covering fewer than `min_group_size` units and the hidden count column.
pub fn threshold(
    batches: Vec<RecordBatch>,
    min_group_size: u64,
    schema: &SchemaRef,
) -> Result<Released, Error> {
    let mut out = Vec::with_capacity(batches.len());
    let (mut released_groups, mut suppressed_groups) = (0u64, 0u64);
    for batch in batches {
        let last = batch
            .num_columns()
            .checked_sub(1)
            .ok_or_else(|| internal("release batch without columns"))?;
        let units = batch
            .column(last)
            .as_any()
            .downcast_ref::<Int64Array>()
            .ok_or_else(|| internal("unit count is not Int64"))?;
        let keep: BooleanArray = units
            .iter()
            .map(|n| Some(n.is_some_and(|n| n >= 0 && n as u64 >= min_group_size)))
            .collect();
        let kept = keep.true_count() as u64;
        released_groups += kept;
        suppressed_groups += batch.num_rows() as u64 - kept;
        let filtered = filter_record_batch(&batch, &keep).map_err(internal)?;
        let columns = filtered.columns()[..last].to_vec();
        out.push(RecordBatch::try_new(schema.clone(), columns).map_err(internal)?);
    }
    Ok(Released {
        batches: out,
        released_groups,
        suppressed_groups,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::StringArray;
    use datafusion::arrow::datatypes::{DataType, Field, Schema};

    #[test]
    fn released_groups_leave_in_key_order_not_hash_order() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("g", DataType::Utf8, true),
            Field::new("n", DataType::Int64, true),
        ]));
        let batch = |g: Vec<&str>, n: Vec<i64>| {
            RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(StringArray::from(g)),
                    Arc::new(Int64Array::from(n)),
                ],
            )
            .unwrap()
        };
        let out = in_key_order(
            vec![batch(vec!["c", "a"], vec![3, 1]), batch(vec!["b"], vec![2])],
            1,
            &schema,
        )
        .unwrap();
        let g = out[0]
            .column(0)
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap();
        let n = out[0]
            .column(1)
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap();
        assert_eq!(g.iter().flatten().collect::<Vec<_>>(), vec!["a", "b", "c"]);
        assert_eq!(n.iter().flatten().collect::<Vec<_>>(), vec![1, 2, 3]);
    }

    #[test]
    fn threshold_drops_small_groups_and_the_hidden_column() {
        let out_schema = Arc::new(Schema::new(vec![
            Field::new("g", DataType::Utf8, true),
            Field::new("n", DataType::Int64, true),
        ]));
        let in_schema = Arc::new(Schema::new(vec![
            Field::new("g", DataType::Utf8, true),
            Field::new("n", DataType::Int64, true),
            Field::new(UNITS, DataType::Int64, true),
        ]));
        let batch = RecordBatch::try_new(
            in_schema,
            vec![
                Arc::new(StringArray::from(vec!["a", "b", "c", "d"])),
                Arc::new(Int64Array::from(vec![100, 3, 50, 9])),
                Arc::new(Int64Array::from(vec![Some(20), Some(3), Some(10), None])),
            ],
        )
        .unwrap();
        let r = threshold(vec![batch], 10, &out_schema).unwrap();
        assert_eq!((r.released_groups, r.suppressed_groups), (2, 2));
        let b = &r.batches[0];
        assert_eq!(b.num_columns(), 2);
        let g = b.column(0).as_any().downcast_ref::<StringArray>().unwrap();
        assert_eq!(g.iter().flatten().collect::<Vec<_>>(), vec!["a", "c"]);
    }
}
