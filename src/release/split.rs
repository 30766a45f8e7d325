//! The split: each release aggregate of a plan becomes a job run on its own
//! (with its hidden unit count) and a placeholder the rest of the plan reads.

use super::*;

/// `use_summaries`: read release aggregates off the datasets' unit
/// summaries where they cover the query (the same answer, from fewer rows).
pub fn split(
    plan: &LogicalPlan,
    catalog: &Catalog,
    policies: &Policies,
    use_summaries: bool,
    tightening: &dp::Tightening,
) -> Result<ReleasePlan, Error> {
    let mut splitter = Splitter {
        catalog,
        policies,
        use_summaries,
        tightening,
        jobs: Vec::new(),
    };
    let (upper, unreleased) = splitter.visit(plan)?;
    if unreleased {
        // The policy check refuses row-level output of protected data first;
        // reaching this means the two disagree, which must not release anything.
        return Err(Error::Internal(
            "protected rows reached the output unreleased".into(),
        ));
    }
    Ok(ReleasePlan {
        upper,
        jobs: splitter.jobs,
    })
}

struct Splitter<'a> {
    catalog: &'a Catalog,
    policies: &'a Policies,
    use_summaries: bool,
    tightening: &'a dp::Tightening,
    jobs: Vec<ReleaseJob>,
}

/// A subtree with the privacy unit threaded through it.
struct Threaded {
    plan: LogicalPlan,
    /// Present when personal rows flow through: the unit's column name and
    /// the output columns that hold it verbatim.
    unit: Option<(String, HashSet<Column>)>,
    /// Protected non-personal rows flow through: the threshold counts rows.
    rows_guarded: bool,
    datasets: BTreeSet<String>,
}

impl Splitter<'_> {
    /// Returns the rewritten subtree and whether protected rows leave it unaggregated.
    fn visit(&mut self, plan: &LogicalPlan) -> Result<(LogicalPlan, bool), Error> {
        if let LogicalPlan::TableScan(_) = plan {
            let guarded = self.catalog.guarded_scan(plan).is_some();
            return Ok((plan.clone(), guarded));
        }
        let mut inputs = Vec::new();
        let mut unreleased = false;
        let mut changed = false;
        for input in plan.inputs() {
            let (new, guarded) = self.visit(input)?;
            changed |= &new != input;
            unreleased |= guarded;
            inputs.push(new);
        }
        if let (LogicalPlan::Aggregate(agg), true) = (plan, unreleased) {
            let input = inputs.remove(0);
            if reads_a_release(&input) {
                // Its input would be another release's output, which is
                // known only once that release has run.
                return Err(refuse(
                    "nested_release",
                    "an aggregate of protected rows may not read another release (an aggregate of protected data in a join or subquery below it); run them as separate queries",
                ));
            }
            return Ok((self.release_aggregate(agg, input)?, false));
        }
        let rebuilt = if changed {
            plan.with_new_exprs(plan.expressions(), inputs)
                .map_err(internal)?
        } else {
            plan.clone()
        };
        Ok((rebuilt, unreleased))
    }

    fn release_aggregate(
        &mut self,
        agg: &Aggregate,
        input: LogicalPlan,
    ) -> Result<LogicalPlan, Error> {
        let threaded = self.thread(&input)?;
        let datasets = threaded.datasets.clone();
        let summary = self
            .use_summaries
            .then(|| summary::Source::find(&input, self.catalog))
            .flatten();
        let mut min_group_size = 1;
        let mut max_groups: Option<u64> = None;
        for id in &datasets {
            if let Some(d) = self.catalog.get(id).filter(|d| d.manifest.is_guarded()) {
                min_group_size = min_group_size.max(self.policies.min_group_size(&d.manifest));
                if let Some(m) = d.manifest.release.max_groups {
                    max_groups = Some(max_groups.map_or(m, |x| x.min(m)));
                }
            }
        }
        let dp_params = dp::Params::strictest(
            datasets
                .iter()
                .filter_map(|id| self.catalog.get(id))
                .filter_map(|d| d.manifest.release.dp.as_ref()),
        );
        let (job_plan, kind) = match (&threaded.unit, threaded.rows_guarded, dp_params) {
            (Some(_), true, _) => {
                return Err(refuse(
                    "unsupported_query_shape",
                    "personal and non-personal protected datasets cannot be combined in one aggregate",
                ));
            }
            (Some((_, aliases)), false, Some(params)) => {
                let params = params.tightened(self.tightening)?;
                let unit_col = unit_column(&threaded.plan)?;
                let aliases = aliases.clone();
                let one_group_per_unit = self.one_group_per_unit(agg, &input);
                let (plan, job) = dp::plan(
                    agg,
                    threaded.plan,
                    dp::Unit {
                        column: unit_col,
                        aliases: &aliases,
                    },
                    params,
                    min_group_size,
                    self.catalog,
                    dp::Shape {
                        one_group_per_unit,
                        summary: summary.as_ref(),
                        max_groups: max_groups.unwrap_or(u64::MAX),
                        streams_by_unit: streams_by_unit(&input),
                    },
                )?;
                (plan, JobKind::Dp(job))
            }
            (Some(_), _, _)
                if let Some(plan) = summary
                    .as_ref()
                    .and_then(|s| s.threshold(agg, &input, UNITS)) =>
            {
                (plan, JobKind::Threshold { counts_rows: false })
            }
            (unit, _, _) => {
                let units = match unit {
                    Some(_) => {
                        count_distinct(Expr::Column(unit_column(&threaded.plan)?)).alias(UNITS)
                    }
                    None => count(lit(1i64)).alias(UNITS),
                };
                let counts_rows = unit.is_none();
                let mut aggr_expr = agg.aggr_expr.clone();
                aggr_expr.push(units);
                let plan = LogicalPlan::Aggregate(
                    Aggregate::try_new(Arc::new(threaded.plan), agg.group_expr.clone(), aggr_expr)
                        .map_err(internal)?,
                );
                (plan, JobKind::Threshold { counts_rows })
            }
        };
        let slot = format!("{SLOT_PREFIX}{}", self.jobs.len());
        let schema = Arc::new(agg.schema.as_arrow().clone());
        let placeholder = slot_scan(&slot, Arc::new(EmptyTable::new(schema.clone())), agg)?;
        self.jobs.push(ReleaseJob {
            slot,
            plan: job_plan,
            schema,
            min_group_size,
            max_groups,
            datasets,
            kind,
            groups: agg.group_expr.len(),
        });
        Ok(placeholder)
    }

    /// Whether every group key is a function of columns that hold one value
    /// per privacy unit (measured at registration, on the data as it still
    /// is), so each unit falls into exactly one group and the per-unit group
    /// bound holds without being enforced. Columns are traced back to the
    /// table column they are, verbatim; anything computed or renamed on the
    /// way does not count.
    fn one_group_per_unit(&self, agg: &Aggregate, input: &LogicalPlan) -> bool {
        use datafusion::common::tree_node::TreeNodeRecursion;
        let mut all = true;
        for g in &agg.group_expr {
            if matches!(g, Expr::GroupingSet(_)) {
                return false;
            }
            let _ = g.apply(|e| {
                if let Expr::Column(c) = e {
                    let constant = base_column(input, c).and_then(|(table, column)| {
                        self.catalog
                            .get(&table)
                            .map(|d| d.is_unit_constant(&column))
                    });
                    all &= constant == Some(true);
                }
                Ok(TreeNodeRecursion::Continue)
            });
        }
        all
    }

    /// Rewrites the input of a release aggregate so every row carries its
    /// privacy unit in a hidden column, through projections, aliases,
    /// filters, joins and unions.
    fn thread(&self, plan: &LogicalPlan) -> Result<Threaded, Error> {
        match plan {
            LogicalPlan::TableScan(scan) => {
                let dataset = self.catalog.get(scan.table_name.table());
                let mut datasets = BTreeSet::new();
                let Some(dataset) = dataset else {
                    return Ok(Threaded {
                        plan: plan.clone(),
                        unit: None,
                        rows_guarded: false,
                        datasets,
                    });
                };
                datasets.insert(dataset.id().to_string());
                let m = &dataset.manifest;
                match &m.privacy_unit {
                    Some(unit) => {
                        let unit_col = Column::new(Some(scan.table_name.clone()), unit);
                        let mut exprs: Vec<Expr> = plan
                            .schema()
                            .columns()
                            .into_iter()
                            .map(Expr::Column)
                            .collect();
                        exprs.push(
                            Expr::Column(unit_col.clone())
                                .alias_qualified(Some(scan.table_name.clone()), UNIT),
                        );
                        let projected = project(exprs, plan.clone())?;
                        let aliases = HashSet::from([
                            unit_col,
                            Column::new(Some(scan.table_name.clone()), UNIT),
                        ]);
                        Ok(Threaded {
                            plan: projected,
                            unit: Some((unit.clone(), aliases)),
                            rows_guarded: false,
                            datasets,
                        })
                    }
                    None => Ok(Threaded {
                        plan: plan.clone(),
                        unit: None,
                        rows_guarded: m.is_guarded(),
                        datasets,
                    }),
                }
            }
            LogicalPlan::Projection(p) => {
                let t = self.thread(&p.input)?;
                let Some((name, aliases)) = &t.unit else {
                    return t.rebuild_single(plan);
                };
                let mut exprs = p.expr.clone();
                exprs.push(Expr::Column(unit_column(&t.plan)?));
                let projected = project(exprs, t.plan.clone())?;
                let mut out = HashSet::new();
                for (i, e) in p.expr.iter().enumerate() {
                    if let Expr::Column(c) = strip_alias(e)
                        && aliases.contains(c)
                    {
                        out.insert(Column::from(projected.schema().qualified_field(i)));
                    }
                }
                out.insert(unit_column(&projected)?);
                Ok(Threaded {
                    plan: projected,
                    unit: Some((name.clone(), out)),
                    ..t
                })
            }
            LogicalPlan::SubqueryAlias(a) => {
                let t = self.thread(&a.input)?;
                let alias = a.alias.clone();
                let plan = LogicalPlan::SubqueryAlias(
                    SubqueryAlias::try_new(Arc::new(t.plan), alias.clone()).map_err(internal)?,
                );
                let unit = t.unit.map(|(name, aliases)| {
                    let requalified = aliases
                        .into_iter()
                        .map(|c| Column::new(Some(alias.clone()), c.name))
                        .collect();
                    (name, requalified)
                });
                Ok(Threaded {
                    plan,
                    unit,
                    rows_guarded: t.rows_guarded,
                    datasets: t.datasets,
                })
            }
            // A comma join: the unit equality sits in the WHERE above the cross join.
            LogicalPlan::Filter(f) => match f.input.as_ref() {
                LogicalPlan::Join(j) => self
                    .thread_join(j, &split_conjunction(&f.predicate))?
                    .rebuild_single(plan),
                input => self.thread(input)?.rebuild_single(plan),
            },
            LogicalPlan::Sort(_) | LogicalPlan::Limit(_) | LogicalPlan::Repartition(_) => {
                let input = plan.inputs()[0];
                self.thread(input)?.rebuild_single(plan)
            }
            LogicalPlan::Join(j) => self.thread_join(j, &[]),
            LogicalPlan::Union(u) => {
                let threaded: Vec<Threaded> = u
                    .inputs
                    .iter()
                    .map(|i| self.thread(i))
                    .collect::<Result<_, _>>()?;
                let with_unit = threaded.iter().filter(|t| t.unit.is_some()).count();
                if with_unit != 0 && with_unit != threaded.len() {
                    return Err(refuse(
                        "unsupported_query_shape",
                        "a UNION must combine personal data only with personal data of the same privacy unit",
                    ));
                }
                let names: BTreeSet<&String> = threaded
                    .iter()
                    .filter_map(|t| t.unit.as_ref().map(|u| &u.0))
                    .collect();
                if names.len() > 1 {
                    return Err(refuse(
                        "unsupported_query_shape",
                        "a UNION combines different privacy units",
                    ));
                }
                let name = names.into_iter().next().cloned();
                let rows_guarded = threaded.iter().any(|t| t.rows_guarded);
                let datasets = threaded
                    .iter()
                    .flat_map(|t| t.datasets.iter().cloned())
                    .collect();
                let inputs = threaded.into_iter().map(|t| Arc::new(t.plan)).collect();
                let plan =
                    LogicalPlan::Union(Union::try_new_with_loose_types(inputs).map_err(internal)?);
                let unit = match name {
                    Some(name) => Some((name, HashSet::from([unit_column(&plan)?]))),
                    None => None,
                };
                Ok(Threaded {
                    plan,
                    unit,
                    rows_guarded,
                    datasets,
                })
            }
            // Subtrees without protected rows (values, aggregates of open data) need no unit.
            LogicalPlan::Aggregate(_) | LogicalPlan::Values(_) | LogicalPlan::EmptyRelation(_) => {
                Ok(Threaded {
                    plan: plan.clone(),
                    unit: None,
                    rows_guarded: false,
                    datasets: BTreeSet::new(),
                })
            }
            LogicalPlan::Subquery(s) => self.thread(&s.subquery),
            _ => Err(refuse(
                "unsupported_query_shape",
                "this query shape cannot be released",
            )),
        }
    }

    /// `conditions` are conjuncts of a filter directly above the join, which
    /// may hold its key equality (`FROM a, b WHERE a.unit = b.unit`).
    fn thread_join(&self, j: &Join, conditions: &[&Expr]) -> Result<Threaded, Error> {
        let left = self.thread(&j.left)?;
        let right = self.thread(&j.right)?;
        let rows_guarded = left.rows_guarded || right.rows_guarded;
        let mut datasets = left.datasets.clone();
        datasets.extend(right.datasets.iter().cloned());
        let both = match (&left.unit, &right.unit) {
            (Some(l), Some(r)) => {
                if l.0 != r.0 || !joined_on_unit(j, conditions, &l.1, &r.1) {
                    return Err(refuse(
                        "join_without_privacy_unit",
                        "two personal datasets may only be joined on their common privacy unit",
                    ));
                }
                true
            }
            _ => false,
        };
        let unit = left.unit.clone().or_else(|| right.unit.clone());
        let joined = LogicalPlan::Join(
            Join::try_new(
                Arc::new(left.plan),
                Arc::new(right.plan),
                j.on.clone(),
                j.filter.clone(),
                j.join_type,
                j.join_constraint,
                j.null_equality,
                j.null_aware,
            )
            .map_err(internal)?,
        );
        let kept = |t: &Option<(String, HashSet<Column>)>| {
            t.as_ref()
                .is_none_or(|(_, a)| a.iter().any(|c| joined.schema().has_column(c)))
        };
        if !kept(&left.unit) || !kept(&right.unit) {
            return Err(refuse(
                "unsupported_query_shape",
                "a semi or anti join over personal data cannot be released",
            ));
        }
        let Some((name, mut aliases)) = unit else {
            return Ok(Threaded {
                plan: joined,
                unit: None,
                rows_guarded,
                datasets,
            });
        };
        if let Some((_, r)) = &right.unit {
            aliases.extend(r.iter().cloned());
        }
        let plan = if both {
            // Keep one hidden unit column (they are equal): the left side's.
            let right_unit = unit_columns(&joined)
                .pop()
                .ok_or_else(|| internal("joined unit column missing"))?;
            aliases.remove(&right_unit);
            let exprs = joined
                .schema()
                .columns()
                .into_iter()
                .filter(|c| *c != right_unit)
                .map(Expr::Column)
                .collect();
            project(exprs, joined)?
        } else {
            joined
        };
        Ok(Threaded {
            plan,
            unit: Some((name, aliases)),
            rows_guarded,
            datasets,
        })
    }
}

impl Threaded {
    /// Rebuilds a single-input node over the threaded input; its schema follows the input's.
    fn rebuild_single(self, original: &LogicalPlan) -> Result<Threaded, Error> {
        let plan = original
            .with_new_exprs(original.expressions(), vec![self.plan])
            .map_err(internal)?;
        Ok(Threaded { plan, ..self })
    }
}

/// The table column that `column` of `plan`'s output is, unchanged, if any:
/// followed through bare projections, aliases, filters, sorts, limits and joins.
pub(super) fn base_column(plan: &LogicalPlan, column: &Column) -> Option<(String, String)> {
    match plan {
        LogicalPlan::TableScan(scan) => {
            let i = plan.schema().index_of_column(column).ok()?;
            Some((
                scan.table_name.table().to_string(),
                scan.projected_schema.field(i).name().clone(),
            ))
        }
        LogicalPlan::Projection(p) => {
            let i = plan.schema().index_of_column(column).ok()?;
            match strip_alias(p.expr.get(i)?) {
                Expr::Column(inner) => base_column(&p.input, inner),
                _ => None,
            }
        }
        LogicalPlan::SubqueryAlias(a) => {
            let i = plan.schema().index_of_column(column).ok()?;
            let inner = Column::from(a.input.schema().qualified_field(i));
            base_column(&a.input, &inner)
        }
        LogicalPlan::Filter(_)
        | LogicalPlan::Sort(_)
        | LogicalPlan::Limit(_)
        | LogicalPlan::Repartition(_) => base_column(plan.inputs()[0], column),
        LogicalPlan::Join(j) => {
            if j.left.schema().index_of_column(column).is_ok() {
                base_column(&j.left, column)
            } else {
                base_column(&j.right, column)
            }
        }
        _ => None,
    }
}

fn project(exprs: Vec<Expr>, input: LogicalPlan) -> Result<LogicalPlan, Error> {
    Ok(LogicalPlan::Projection(
        Projection::try_new(exprs, Arc::new(input)).map_err(internal)?,
    ))
}

/// Whether `plan` reads one table's copy clustered by unit through
/// filters and projections only, so that its rows reach a release unit by
/// unit. (Anything else still gives the right answer by the streamed
/// operator's requirements, but through a shuffle and a sort.)
fn streams_by_unit(plan: &LogicalPlan) -> bool {
    match plan {
        LogicalPlan::Projection(p) => streams_by_unit(&p.input),
        LogicalPlan::Filter(f) => streams_by_unit(&f.input),
        LogicalPlan::SubqueryAlias(a) => streams_by_unit(&a.input),
        LogicalPlan::TableScan(scan) => datafusion::datasource::source_as_provider(&scan.source)
            .is_ok_and(|p| {
                p.downcast_ref::<crate::catalog::clustered::ClusteredTable>()
                    .is_some()
            }),
        _ => false,
    }
}

fn unit_columns(plan: &LogicalPlan) -> Vec<Column> {
    plan.schema()
        .columns()
        .into_iter()
        .filter(|c| c.name == UNIT)
        .collect()
}

fn unit_column(plan: &LogicalPlan) -> Result<Column, Error> {
    let mut found = unit_columns(plan);
    match found.len() {
        1 => Ok(found.remove(0)),
        n => Err(internal(format!(
            "expected one hidden unit column, found {n}"
        ))),
    }
}

/// Whether the join's equi-keys, or an equality in its filter or in the
/// conditions above it, connect the units of both sides.
fn joined_on_unit(
    j: &Join,
    conditions: &[&Expr],
    left: &HashSet<Column>,
    right: &HashSet<Column>,
) -> bool {
    let connects = |a: &Expr, b: &Expr| match (strip_alias(a), strip_alias(b)) {
        (Expr::Column(x), Expr::Column(y)) => {
            (left.contains(x) && right.contains(y)) || (left.contains(y) && right.contains(x))
        }
        _ => false,
    };
    let is_unit_equality = |c: &&Expr| match c {
        Expr::BinaryExpr(b) if b.op == datafusion::logical_expr::Operator::Eq => {
            connects(&b.left, &b.right)
        }
        _ => false,
    };
    let in_on = j.on.iter().any(|(a, b)| connects(a, b));
    let in_filter = j
        .filter
        .as_ref()
        .is_some_and(|f| split_conjunction(f).iter().any(is_unit_equality));
    in_on || in_filter || conditions.iter().any(is_unit_equality)
}

/// The answer's name of each column the plan above the releases passes on
/// unchanged (`count(Int64(1)) AS visits` → `count(Int64(1))` ↦ `visits`):
/// read from its outermost projection.
pub fn output_names(upper: &LogicalPlan) -> std::collections::HashMap<String, String> {
    let mut plan = upper;
    while !matches!(plan, LogicalPlan::Projection(_)) {
        match plan.inputs().first() {
            Some(input) => plan = input,
            None => return Default::default(),
        }
    }
    let mut names = std::collections::HashMap::new();
    if let LogicalPlan::Projection(p) = plan {
        for (e, field) in p.expr.iter().zip(p.schema.fields()) {
            if let Expr::Column(c) = strip_alias(e) {
                names.insert(c.name.clone(), field.name().clone());
            }
        }
    }
    names
}

/// Placeholders of released outputs are scans of tables named so.
const SLOT_PREFIX: &str = "__fg_release_";

/// Whether the plan scans the placeholder of a release.
fn reads_a_release(plan: &LogicalPlan) -> bool {
    plan.exists(|node| {
        Ok(matches!(node, LogicalPlan::TableScan(scan)
            if scan.table_name.table().starts_with(SLOT_PREFIX)))
    })
    .unwrap_or(true)
}

/// A scan of `provider` under the name `slot`, projected back to exactly the
/// aggregate's output schema (names and qualifiers), so the plan above it is unchanged.
fn slot_scan(
    slot: &str,
    provider: Arc<dyn TableProvider>,
    agg: &Aggregate,
) -> Result<LogicalPlan, Error> {
    let scan = LogicalPlanBuilder::scan(slot, provider_as_source(provider), None)
        .and_then(|b| b.build())
        .map_err(internal)?;
    let slot_ref = TableReference::bare(slot);
    let exprs = agg
        .schema
        .iter()
        .map(|(qualifier, field)| {
            Expr::Column(Column::new(Some(slot_ref.clone()), field.name()))
                .alias_qualified(qualifier.cloned(), field.name())
        })
        .collect();
    project(exprs, scan)
}

#[cfg(test)]
mod base_column_tests {
    use super::*;
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::prelude::SessionContext;

    /// The group keys of the first aggregate of `sql`, traced to their table columns.
    async fn traced(sql: &str) -> Vec<Option<(String, String)>> {
        let ctx = SessionContext::new();
        let schema = Arc::new(Schema::new(vec![
            Field::new("person_id", DataType::Int64, true),
            Field::new("district", DataType::Utf8, true),
            Field::new("visit_date", DataType::Utf8, true),
        ]));
        ctx.register_table("city_health", Arc::new(EmptyTable::new(schema)))
            .unwrap();
        let plan = ctx.state().create_logical_plan(sql).await.unwrap();
        let mut found = None;
        let _ = plan.apply(|node| {
            if let LogicalPlan::Aggregate(a) = node {
                found = Some(a.clone());
                return Ok(datafusion::common::tree_node::TreeNodeRecursion::Stop);
            }
            Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
        });
        let agg = found.unwrap();
        agg.group_expr
            .iter()
            .map(|g| match g {
                Expr::Column(c) => base_column(&agg.input, c),
                _ => None,
            })
            .collect()
    }

    fn column(t: &str, c: &str) -> Option<(String, String)> {
        Some((t.to_string(), c.to_string()))
    }

    #[tokio::test]
    async fn group_keys_are_traced_only_when_they_are_the_table_column_itself() {
        assert_eq!(
            traced("SELECT district, COUNT(*) FROM city_health GROUP BY district").await,
            vec![column("city_health", "district")]
        );
        assert_eq!(
            traced("SELECT c.district, COUNT(*) FROM city_health c WHERE c.person_id > 3 GROUP BY c.district").await,
            vec![column("city_health", "district")]
        );
        assert_eq!(
            traced("WITH t AS (SELECT district AS d FROM city_health) SELECT d, COUNT(*) FROM t GROUP BY d").await,
            vec![column("city_health", "district")],
            "a plain rename is still the same column"
        );
        // Renaming another column to a constant column's name must not pass for it.
        assert_eq!(
            traced("SELECT district, COUNT(*) FROM (SELECT visit_date AS district FROM city_health) t GROUP BY district").await,
            vec![column("city_health", "visit_date")]
        );
        assert_eq!(
            traced("SELECT d, COUNT(*) FROM (SELECT upper(district) AS d FROM city_health) t GROUP BY d").await,
            vec![None],
            "computed keys are not traced"
        );
    }
}
