//! Purpose-bound consent: the rows a query may see at all.

use super::*;

/// Narrows every scan of a dataset with a consent column to the rows whose
/// data subject consented to `purpose`. The filter sits directly on the scan,
/// under everything the query wrote, so no query shape can step around it.
/// Returns the datasets it narrowed.
pub fn filter_consent(
    plan: LogicalPlan,
    catalog: &Catalog,
    purpose: &str,
) -> Result<(LogicalPlan, BTreeSet<String>), Error> {
    // `contains`, answered once per distinct stored value (see `consented`);
    // `strpos` would compute a character position for every row, several
    // times slower.
    use crate::catalog::consent::consented;
    use datafusion::logical_expr::Filter;
    let mut filtered = BTreeSet::new();
    let rewritten = plan
        .transform_up_with_subqueries(|node| {
            let LogicalPlan::TableScan(scan) = &node else {
                return Ok(Transformed::no(node));
            };
            let Some(dataset) = catalog.get(scan.table_name.table()) else {
                return Ok(Transformed::no(node));
            };
            let Some(consent) = &dataset.manifest.consent_column else {
                return Ok(Transformed::no(node));
            };
            filtered.insert(dataset.id().to_string());
            let column = Expr::Column(Column::new(Some(scan.table_name.clone()), consent));
            let predicate = consented(column, purpose);
            let filter = Filter::try_new(predicate, Arc::new(node))?;
            Ok(Transformed::yes(LogicalPlan::Filter(filter)))
        })
        .map_err(internal)?;
    Ok((rewritten.data, filtered))
}
