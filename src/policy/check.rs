//! Enforces the policies on a resolved DataFusion [`LogicalPlan`], not on SQL
//! text: every node is visited, including subqueries, and every column use is
//! traced back to the dataset column it comes from (its lineage) so that an
//! alias, a CTE, a cast or a derived table cannot launder a classified column.
//!
//! A column's *site* is decided where its value is looked at: grouped,
//! filtered (any comparison or condition counts, even inside an aggregate
//! argument or a CASE), joined on, aggregated, ordered by, or returned. Plain
//! projections below those points only carry lineage forward.

use super::{Policies, Site, strip_alias};
use crate::catalog::{Catalog, ColumnClass};
use crate::error::{Error, Refusal};
use datafusion::common::{Column, DFSchema};
use datafusion::logical_expr::utils::split_conjunction;
use datafusion::logical_expr::{
    Aggregate, Distinct, Expr, GroupingSet, LogicalPlan, Operator, Subquery,
    expr::{AggregateFunction, ScalarFunction, WindowFunction},
};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// Who asks, under which grant: what the plan check needs beyond the plan.
pub struct Requester<'a> {
    pub region: &'a str,
    /// The grant records an approved cross-border assessment.
    pub cross_border_assessment: bool,
}

/// What the check learned about an allowed plan.
#[derive(Debug, Default)]
pub struct Analysis {
    pub datasets: BTreeSet<String>,
}

/// One dataset column a value derives from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct SourceCol {
    dataset: Arc<str>,
    column: Arc<str>,
    class: ColumnClass,
    joinable: bool,
    guarded: bool,
    consent: bool,
    /// Which table scan it was read by, so a self-join's sides differ.
    scan: usize,
}

/// The raw dataset columns an output field of a plan node derives from.
/// Aggregate outputs have none: from there on values are aggregates.
/// `.1`: whether the value was computed from them (an expression below,
/// in a derived table or CTE), not merely passed on.
#[derive(Debug, Clone, Default)]
struct Lineage(Vec<SourceCol>, bool);

impl Lineage {
    fn merge(&mut self, other: &Lineage) {
        for s in &other.0 {
            if !self.0.contains(s) {
                self.0.push(s.clone());
            }
        }
        self.1 |= other.1;
    }
}

struct NodeInfo {
    fields: Vec<Lineage>,
}

struct Scope<'p> {
    schema: &'p DFSchema,
    fields: &'p [Lineage],
}

pub fn check(
    plan: &LogicalPlan,
    catalog: &Catalog,
    policies: &Policies,
    requester: &Requester<'_>,
) -> Result<Analysis, Error> {
    let mut checker = Checker {
        catalog,
        policies,
        requester,
        scans: 0,
        guarded_scans: 0,
        outer: Vec::new(),
        analysis: Analysis::default(),
        used: BTreeMap::new(),
        quasi: BTreeSet::new(),
        aggregates_above: 0,
    };
    let root = checker.plan(plan)?;
    checker.root_output(plan.schema(), &root)?;
    if let Some(dataset) = unaggregated_guarded_rows(plan, catalog) {
        return Err(Refusal::new(
            "aggregation_required",
            format!(
                "the query returns a row for each row of dataset '{dataset}'; only aggregates of it may be released"
            ),
        )
        .with("table", dataset)
        .with("site", Site::Output.as_str())
        .into());
    }
    super::bans::query_wide_rules(
        policies,
        catalog,
        &checker.quasi,
        &checker.used,
        &checker.analysis.datasets,
    )?;
    Ok(checker.analysis)
}

/// A protected dataset whose rows reach the output with no aggregate in
/// between, even when none of its columns does: `SELECT 1 FROM t` still
/// answers with t's exact row count.
fn unaggregated_guarded_rows(plan: &LogicalPlan, catalog: &Catalog) -> Option<String> {
    match plan {
        LogicalPlan::Aggregate(_) => None,
        LogicalPlan::TableScan(_) => catalog.guarded_scan(plan).map(|d| d.id().to_string()),
        other => other
            .inputs()
            .into_iter()
            .find_map(|input| unaggregated_guarded_rows(input, catalog)),
    }
}

struct Checker<'a> {
    catalog: &'a Catalog,
    policies: &'a Policies,
    requester: &'a Requester<'a>,
    scans: usize,
    guarded_scans: usize,
    /// Schemas of enclosing plans, for correlated subqueries.
    outer: Vec<(DFSchema, Vec<Lineage>)>,
    analysis: Analysis,
    /// Columns used per dataset, for prohibited combinations.
    used: BTreeMap<String, BTreeSet<String>>,
    /// Quasi-identifiers grouped or filtered by.
    quasi: BTreeSet<(Arc<str>, Arc<str>)>,
    /// How many aggregates enclose the node being visited.
    aggregates_above: usize,
}

fn unsupported(what: &str) -> Error {
    Refusal::new(
        "unsupported_query_shape",
        format!("{what} is not supported in the sandbox"),
    )
    .into()
}

impl<'a> Checker<'a> {
    fn plan(&mut self, plan: &LogicalPlan) -> Result<NodeInfo, Error> {
        let pass = |this: &mut Self, input: &LogicalPlan| this.plan(input);
        match plan {
            LogicalPlan::TableScan(scan) => self.table_scan(scan),
            LogicalPlan::Projection(p) => {
                let input = self.plan(&p.input)?;
                let scope = Scope {
                    schema: p.input.schema(),
                    fields: &input.fields,
                };
                let mut fields = Vec::with_capacity(p.expr.len());
                for e in &p.expr {
                    self.expr(e, Site::Passthrough, &scope)?;
                    fields.push(self.lineage(e, &scope)?);
                }
                Ok(NodeInfo { fields })
            }
            LogicalPlan::Filter(f) => {
                let input = self.plan(&f.input)?;
                let scope = Scope {
                    schema: f.input.schema(),
                    fields: &input.fields,
                };
                self.predicate(&f.predicate, &scope)?;
                Ok(input)
            }
            LogicalPlan::Join(j) => {
                let left = self.plan(&j.left)?;
                let right = self.plan(&j.right)?;
                let mut all = left.fields.clone();
                all.extend(right.fields.iter().cloned());
                let (ls, rs) = (j.left.schema(), j.right.schema());
                let joined = ls
                    .as_ref()
                    .clone()
                    .join(rs)
                    .map_err(|e| Error::Internal(e.to_string()))?;
                let scope = Scope {
                    schema: &joined,
                    fields: &all,
                };
                for (l, r) in &j.on {
                    // USING and ON keys alike: a key is a join key only
                    // between two catalog scans, else it is the filter it is.
                    let site = if self.joins_two_scans(l, r, &scope)? {
                        Site::JoinKey
                    } else {
                        Site::Filter
                    };
                    self.expr(l, site, &scope)?;
                    self.expr(r, site, &scope)?;
                }
                if let Some(filter) = &j.filter {
                    self.predicate(filter, &scope)?;
                }
                let n = j.schema.fields().len();
                let fields = if n == all.len() {
                    all
                } else if n == left.fields.len() {
                    left.fields
                } else if n == right.fields.len() {
                    right.fields
                } else {
                    // A mark join: the extra column says whether the other side matched.
                    let mut mark = Lineage::default();
                    right.fields.iter().for_each(|f| mark.merge(f));
                    let mut fields = left.fields;
                    fields.resize(n, mark);
                    fields
                };
                Ok(NodeInfo { fields })
            }
            LogicalPlan::Aggregate(a) => self.aggregate(a),
            LogicalPlan::Window(w) => {
                let input = self.plan(&w.input)?;
                if input.fields.iter().any(|f| f.0.iter().any(|s| s.guarded)) {
                    return Err(Refusal::new(
                        "window_over_guarded_data",
                        "window functions over rows of a protected dataset are not allowed; aggregate first",
                    )
                    .into());
                }
                let scope = Scope {
                    schema: w.input.schema(),
                    fields: &input.fields,
                };
                let mut fields = input.fields.clone();
                for e in &w.window_expr {
                    self.window_expr(e, &scope)?;
                    fields.push(self.lineage(e, &scope)?);
                }
                Ok(NodeInfo { fields })
            }
            LogicalPlan::Sort(s) => {
                if s.fetch.is_some() {
                    self.no_row_selection_below_release(&s.input)?;
                }
                let input = self.plan(&s.input)?;
                let scope = Scope {
                    schema: s.input.schema(),
                    fields: &input.fields,
                };
                for sort in &s.expr {
                    self.expr(&sort.expr, Site::OrderBy, &scope)?;
                }
                Ok(input)
            }
            LogicalPlan::Limit(l) => {
                for e in [&l.skip, &l.fetch].into_iter().flatten() {
                    if !matches!(e.as_ref(), Expr::Literal(..)) {
                        return Err(unsupported("a LIMIT or OFFSET that is not a literal"));
                    }
                }
                self.no_row_selection_below_release(&l.input)?;
                pass(self, &l.input)
            }
            LogicalPlan::Distinct(d) => {
                let input_plan = match d {
                    Distinct::All(input) => input.as_ref(),
                    Distinct::On(on) => on.input.as_ref(),
                };
                let input = self.plan(input_plan)?;
                if input.fields.iter().any(|f| f.0.iter().any(|s| s.guarded)) {
                    return Err(Refusal::new(
                        "distinct_over_guarded_data",
                        "DISTINCT over rows of a protected dataset lists values of single persons; use GROUP BY",
                    )
                    .into());
                }
                match d {
                    Distinct::All(_) => Ok(input),
                    Distinct::On(_) => Err(unsupported("DISTINCT ON")),
                }
            }
            LogicalPlan::Union(u) => {
                let mut fields: Vec<Lineage> = vec![Lineage::default(); u.schema.fields().len()];
                for input in &u.inputs {
                    let info = self.plan(input)?;
                    for (merged, f) in fields.iter_mut().zip(&info.fields) {
                        merged.merge(f);
                    }
                }
                Ok(NodeInfo { fields })
            }
            LogicalPlan::SubqueryAlias(a) => pass(self, &a.input),
            LogicalPlan::Subquery(s) => pass(self, &s.subquery),
            LogicalPlan::Repartition(r) => pass(self, &r.input),
            LogicalPlan::Values(v) => {
                for row in &v.values {
                    for e in row {
                        if !matches!(e, Expr::Literal(..) | Expr::Cast(_) | Expr::Negative(_)) {
                            return Err(unsupported("a VALUES list with expressions"));
                        }
                    }
                }
                Ok(NodeInfo {
                    fields: vec![Lineage::default(); v.schema.fields().len()],
                })
            }
            LogicalPlan::EmptyRelation(e) => Ok(NodeInfo {
                fields: vec![Lineage::default(); e.schema.fields().len()],
            }),
            LogicalPlan::RecursiveQuery(_) => {
                Err(Refusal::new("recursive_query", "recursive queries are not allowed").into())
            }
            LogicalPlan::Unnest(_) => Err(unsupported("UNNEST")),
            LogicalPlan::Explain(_)
            | LogicalPlan::Analyze(_)
            | LogicalPlan::Statement(_)
            | LogicalPlan::Dml(_)
            | LogicalPlan::Ddl(_)
            | LogicalPlan::Copy(_)
            | LogicalPlan::DescribeTable(_)
            | LogicalPlan::Extension(_) => Err(Error::StatementNotAllowed(
                "only a single SELECT query is allowed".into(),
            )),
        }
    }

    fn table_scan(
        &mut self,
        scan: &datafusion::logical_expr::TableScan,
    ) -> Result<NodeInfo, Error> {
        let name = scan.table_name.table();
        let dataset = self
            .catalog
            .get(name)
            .ok_or_else(|| Error::UnknownTable(name.to_string()))?
            .clone();
        super::access::dataset_access(self.policies, self.requester, &dataset)?;
        let scan_id = self.scans;
        self.scans += 1;
        let guarded = dataset.manifest.is_guarded();
        if guarded {
            self.guarded_scans += 1;
        }
        self.analysis.datasets.insert(dataset.id().to_string());
        let dataset_id: Arc<str> = Arc::from(dataset.id());
        let mut fields = Vec::with_capacity(scan.projected_schema.fields().len());
        for field in scan.projected_schema.fields() {
            let spec = dataset.manifest.column(field.name()).ok_or_else(|| {
                Error::Internal(format!(
                    "column {} of {} has no classification",
                    field.name(),
                    dataset.id()
                ))
            })?;
            fields.push(Lineage(
                vec![SourceCol {
                    dataset: dataset_id.clone(),
                    column: Arc::from(spec.name.as_str()),
                    class: spec.class,
                    joinable: spec.joinable,
                    guarded,
                    consent: dataset.manifest.consent_column.as_deref() == Some(spec.name.as_str()),
                    scan: scan_id,
                }],
                false,
            ));
        }
        if !scan.filters.is_empty() {
            let scope = Scope {
                schema: &scan.projected_schema,
                fields: &fields,
            };
            for f in &scan.filters {
                self.predicate(f, &scope)?;
            }
        }
        Ok(NodeInfo { fields })
    }

    fn aggregate(&mut self, a: &Aggregate) -> Result<NodeInfo, Error> {
        self.aggregates_above += 1;
        let input = self.plan(&a.input);
        self.aggregates_above -= 1;
        let input = input?;
        let scope = Scope {
            schema: a.input.schema(),
            fields: &input.fields,
        };
        for g in &a.group_expr {
            self.expr(g, Site::GroupBy, &scope)?;
        }
        let releases = unaggregated_guarded_rows(&a.input, self.catalog).is_some();
        for e in &a.aggr_expr {
            match strip_alias(e) {
                Expr::AggregateFunction(f) => {
                    self.aggregate_function(f, &scope)?;
                    if releases {
                        self.release_aggregate_function(f, &scope)?;
                    }
                }
                _ => {
                    return Err(unsupported(
                        "an aggregate expression that is not a function call",
                    ));
                }
            }
        }
        // From here on values are aggregates: their lineage stops.
        Ok(NodeInfo {
            fields: vec![Lineage::default(); a.schema.fields().len()],
        })
    }

    fn aggregate_function(
        &mut self,
        f: &AggregateFunction,
        scope: &Scope<'_>,
    ) -> Result<(), Error> {
        let base = f.func.name().to_ascii_lowercase();
        let name = if f.params.distinct {
            format!("{base}_distinct")
        } else {
            base
        };
        self.banned_function(&name, &f.params.args, scope)?;
        for arg in &f.params.args {
            self.expr(arg, Site::AggregateArg, scope)?;
            for source in self.lineage(arg, scope)?.0 {
                let rule = self.policies.classification.rule(source.class);
                if !rule.allows_aggregate(&name)
                    || self
                        .column_spec(&source)
                        .is_some_and(|c| c.narrows_out_aggregate(&name))
                {
                    return Err(Refusal::new(
                        "aggregate_not_allowed",
                        format!(
                            "aggregate {name} may not take {} column {}.{}",
                            source.class.as_str(),
                            source.dataset,
                            source.column
                        ),
                    )
                    .with("function", name.clone())
                    .with("table", source.dataset.to_string())
                    .with("column", source.column.to_string())
                    .with("class", source.class.as_str())
                    .with("site", Site::AggregateArg.as_str())
                    .into());
                }
            }
        }
        if let Some(filter) = &f.params.filter {
            self.predicate(filter, scope)?;
        }
        for sort in &f.params.order_by {
            self.expr(&sort.expr, Site::OrderBy, scope)?;
        }
        Ok(())
    }

    /// What a release aggregate may take: bare columns and literals (an
    /// expression over protected rows could fail on one person's value, or
    /// change what a person contributes); and a sensitive measure only where
    /// the release adds noise.
    fn release_aggregate_function(
        &self,
        f: &AggregateFunction,
        scope: &Scope<'_>,
    ) -> Result<(), Error> {
        let name = f.func.name().to_ascii_lowercase();
        for arg in &f.params.args {
            // A column a derived table or CTE computed counts as the
            // expression it is.
            let bare = match strip_alias(arg) {
                Expr::Literal(..) => true,
                Expr::Column(_) => !self.lineage(arg, scope)?.1,
                _ => false,
            };
            if !bare {
                return Err(Refusal::new(
                    "aggregate_argument_not_bare",
                    format!(
                        "aggregate {name} over rows of a protected dataset takes columns and literals only; compute before it in a filter or group key, or after it on the released values"
                    ),
                )
                .with("function", name.clone())
                .with("site", Site::AggregateArg.as_str())
                .into());
            }
            if name == "count" {
                continue;
            }
            for source in self.lineage(arg, scope)?.0 {
                let noised = self
                    .catalog
                    .get(&source.dataset)
                    .is_some_and(|d| d.manifest.release.dp.is_some());
                if source.class == ColumnClass::Sensitive && !noised {
                    return Err(Refusal::new(
                        "sensitive_measure_requires_dp",
                        format!(
                            "{name} of sensitive column {}.{} would be released exactly: its dataset is released with a threshold, not with differential privacy",
                            source.dataset, source.column
                        ),
                    )
                    .with("function", name.clone())
                    .with("table", source.dataset.to_string())
                    .with("column", source.column.to_string())
                    .with("class", source.class.as_str())
                    .into());
                }
            }
        }
        Ok(())
    }

    fn window_expr(&mut self, e: &Expr, scope: &Scope<'_>) -> Result<(), Error> {
        match strip_alias(e) {
            Expr::WindowFunction(w) => {
                let WindowFunction { params, .. } = w.as_ref();
                for arg in &params.args {
                    self.expr(arg, Site::Passthrough, scope)?;
                }
                for p in &params.partition_by {
                    self.expr(p, Site::GroupBy, scope)?;
                }
                for s in &params.order_by {
                    self.expr(&s.expr, Site::OrderBy, scope)?;
                }
                Ok(())
            }
            _ => Err(unsupported(
                "a window expression that is not a window function",
            )),
        }
    }

    /// A condition: equalities between columns of two different table scans
    /// are join keys; everything else is a filter.
    fn predicate(&mut self, predicate: &Expr, scope: &Scope<'_>) -> Result<(), Error> {
        for conjunct in split_conjunction(predicate) {
            match self.join_equality(conjunct, scope)? {
                Some((l, r)) => {
                    self.expr(l, Site::JoinKey, scope)?;
                    self.expr(r, Site::JoinKey, scope)?;
                }
                None => self.expr(conjunct, Site::Filter, scope)?,
            }
        }
        Ok(())
    }

    fn join_equality<'e>(
        &self,
        e: &'e Expr,
        scope: &Scope<'_>,
    ) -> Result<Option<(&'e Expr, &'e Expr)>, Error> {
        let Expr::BinaryExpr(b) = e else {
            return Ok(None);
        };
        if b.op != Operator::Eq {
            return Ok(None);
        }
        let (Expr::Column(_), Expr::Column(_)) = (strip_alias(&b.left), strip_alias(&b.right))
        else {
            return Ok(None);
        };
        Ok(self
            .joins_two_scans(&b.left, &b.right, scope)?
            .then_some((b.left.as_ref(), b.right.as_ref())))
    }

    /// Whether `l = r` joins two catalog scans: both sides read dataset
    /// columns (a constant, `VALUES` or a CTE of literals is no scan), from
    /// different scans, and an identifier meets only joinable identifiers —
    /// equating one with anything else (an open dataset's column the buyer
    /// then filters) is an identifier filter.
    fn joins_two_scans(&self, l: &Expr, r: &Expr, scope: &Scope<'_>) -> Result<bool, Error> {
        let (ls, rs) = (self.lineage(l, scope)?, self.lineage(r, scope)?);
        let scans = |lin: &Lineage| lin.0.iter().map(|s| s.scan).collect::<BTreeSet<_>>();
        let (lscans, rscans) = (scans(&ls), scans(&rs));
        if lscans.is_empty() || rscans.is_empty() || !lscans.is_disjoint(&rscans) {
            return Ok(false);
        }
        let identifier = |lin: &Lineage| lin.0.iter().any(|s| s.class == ColumnClass::Identifier);
        let joinable_identifiers = |lin: &Lineage| {
            lin.0
                .iter()
                .all(|s| s.class == ColumnClass::Identifier && s.joinable)
        };
        Ok((!identifier(&ls) || joinable_identifiers(&rs))
            && (!identifier(&rs) || joinable_identifiers(&ls)))
    }

    /// `LIMIT`, `OFFSET` or a top-N below a release choose which persons
    /// contribute by comparing them with each other: the noise and
    /// thresholds assume no row's presence depends on another's.
    fn no_row_selection_below_release(&self, input: &LogicalPlan) -> Result<(), Error> {
        if self.aggregates_above == 0 {
            return Ok(());
        }
        match unaggregated_guarded_rows(input, self.catalog) {
            None => Ok(()),
            Some(dataset) => Err(Refusal::new(
                "row_selection_below_release",
                format!(
                    "LIMIT, OFFSET and ORDER BY … LIMIT may not pick rows of dataset '{dataset}' before they are aggregated; apply them to the aggregates"
                ),
            )
            .with("table", dataset)
            .into()),
        }
    }

    fn resolve(&self, c: &Column, scope: &Scope<'_>) -> Result<Lineage, Error> {
        let i = scope.schema.index_of_column(c).map_err(|_| {
            Error::SqlError(format!(
                "column '{}' cannot be resolved here",
                c.flat_name()
            ))
        })?;
        Ok(scope.fields.get(i).cloned().unwrap_or_default())
    }

    fn resolve_outer(&self, c: &Column) -> Result<Lineage, Error> {
        for (schema, fields) in self.outer.iter().rev() {
            if let Ok(i) = schema.index_of_column(c) {
                return Ok(fields.get(i).cloned().unwrap_or_default());
            }
        }
        Err(Error::SqlError(format!(
            "outer column '{}' cannot be resolved",
            c.flat_name()
        )))
    }

    /// The union of the lineage of every column `e` reads (subqueries excluded: they are checked on their own).
    fn lineage(&self, e: &Expr, scope: &Scope<'_>) -> Result<Lineage, Error> {
        let mut out = Lineage::default();
        let mut failure = None;
        let _ = e.apply(|node| {
            let found = match node {
                Expr::Column(c) => Some(self.resolve(c, scope)),
                Expr::OuterReferenceColumn(_, c) => Some(self.resolve_outer(c)),
                _ => None,
            };
            match found {
                Some(Ok(lin)) => out.merge(&lin),
                Some(Err(err)) => {
                    failure = Some(err);
                    return Ok(TreeNodeRecursion::Stop);
                }
                None => {}
            }
            Ok(TreeNodeRecursion::Continue)
        });
        if !matches!(
            strip_alias(e),
            Expr::Column(_) | Expr::OuterReferenceColumn(..)
        ) {
            out.1 = true;
        }
        match failure {
            Some(err) => Err(err),
            None => Ok(out),
        }
    }

    fn use_sources(&mut self, lineage: Lineage, site: Site) -> Result<(), Error> {
        for source in lineage.0 {
            self.use_source(&source, site)?;
        }
        Ok(())
    }

    fn use_source(&mut self, s: &SourceCol, site: Site) -> Result<(), Error> {
        if site == Site::Passthrough {
            return Ok(());
        }
        if s.consent {
            return Err(Refusal::new(
                "consent_column_reserved",
                format!(
                    "column {}.{} records consent and is applied by the sandbox, not by queries",
                    s.dataset, s.column
                ),
            )
            .with("table", s.dataset.to_string())
            .with("column", s.column.to_string())
            .into());
        }
        self.used
            .entry(s.dataset.to_string())
            .or_default()
            .insert(s.column.to_string());
        if s.class == ColumnClass::QuasiIdentifier && matches!(site, Site::GroupBy | Site::Filter) {
            self.quasi.insert((s.dataset.clone(), s.column.clone()));
        }
        let rule = self.policies.classification.rule(s.class);
        if rule.allows(site, s.joinable) {
            return Ok(());
        }
        let rule_id = match (s.class, site) {
            (ColumnClass::Identifier, Site::JoinKey) if !s.joinable => {
                "identifier_not_joinable".to_string()
            }
            _ => format!("{}_in_{}", s.class.as_str(), site.as_str()),
        };
        Err(Refusal::new(
            rule_id,
            format!(
                "{} column {}.{} may not be used in {}",
                s.class.as_str(),
                s.dataset,
                s.column,
                site.as_str()
            ),
        )
        .with("table", s.dataset.to_string())
        .with("column", s.column.to_string())
        .with("class", s.class.as_str())
        .with("site", site.as_str())
        .into())
    }

    fn column_spec(&self, s: &SourceCol) -> Option<&crate::catalog::ColumnSpec> {
        self.catalog
            .get(&s.dataset)
            .and_then(|d| d.manifest.column(&s.column))
    }

    fn banned_function(&self, name: &str, args: &[Expr], scope: &Scope<'_>) -> Result<(), Error> {
        for ban in &self.policies.prohibitions.functions {
            if !ban.function.eq_ignore_ascii_case(name) {
                continue;
            }
            let hit = match &ban.on_classes {
                None => true,
                Some(classes) => {
                    let mut hit = false;
                    for a in args {
                        hit |= self
                            .lineage(a, scope)?
                            .0
                            .iter()
                            .any(|s| classes.contains(&s.class));
                    }
                    hit
                }
            };
            if hit {
                return Err(Refusal::new(
                    "prohibited_function",
                    format!("function {name} is prohibited: {}", ban.reason),
                )
                .with("function", name.to_string())
                .with("prohibition", ban.id.clone())
                .with("reason", ban.reason.clone())
                .into());
            }
        }
        Ok(())
    }

    fn scalar_function(
        &mut self,
        f: &ScalarFunction,
        site: Site,
        scope: &Scope<'_>,
    ) -> Result<(), Error> {
        let name = f.func.name().to_ascii_lowercase();
        self.banned_function(&name, &f.args, scope)?;
        for arg in &f.args {
            for s in self.lineage(arg, scope)?.0 {
                let narrowed = self
                    .column_spec(&s)
                    .is_some_and(|c| c.narrows_out_function(&name));
                if narrowed
                    || !self
                        .policies
                        .classification
                        .rule(s.class)
                        .allows_function(&name)
                {
                    return Err(Refusal::new(
                        "function_not_allowed",
                        format!(
                            "function {name} may not be applied to {} column {}.{}",
                            s.class.as_str(),
                            s.dataset,
                            s.column
                        ),
                    )
                    .with("function", name.clone())
                    .with("table", s.dataset.to_string())
                    .with("column", s.column.to_string())
                    .with("class", s.class.as_str())
                    .into());
                }
            }
        }
        self.total_over_guarded(&name, &f.args, scope)?;
        for arg in &f.args {
            self.expr(arg, site, scope)?;
        }
        Ok(())
    }

    /// Over rows of a protected dataset only functions that cannot fail are
    /// evaluated (a failure would say whether some row holds a value); a
    /// function's mode argument (`date_trunc('month', …)`) must be a literal.
    fn total_over_guarded(
        &self,
        name: &str,
        args: &[Expr],
        scope: &Scope<'_>,
    ) -> Result<(), Error> {
        let mut guarded = false;
        for arg in args {
            guarded |= self.lineage(arg, scope)?.0.iter().any(|s| s.guarded);
        }
        if !guarded {
            return Ok(());
        }
        let total = TOTAL_FUNCTIONS.contains(&name);
        let literal_mode = !MODE_FIRST.contains(&name)
            || args.first().is_some_and(|a| matches!(a, Expr::Literal(..)));
        if total && literal_mode {
            return Ok(());
        }
        Err(Refusal::new(
            "partial_function",
            format!(
                "function {name} can fail on some values and may not be applied to rows of a protected dataset{}",
                if total { " with a non-literal mode argument" } else { "" }
            ),
        )
        .with("function", name.to_string())
        .into())
    }

    fn subquery(&mut self, sq: &Subquery, scope: &Scope<'_>) -> Result<(), Error> {
        let before = self.guarded_scans;
        self.outer
            .push((scope.schema.clone(), scope.fields.to_vec()));
        let result = self.plan(&sq.subquery);
        self.outer.pop();
        result?;
        if self.guarded_scans > before {
            return Err(Refusal::new(
                "subquery_on_guarded_data",
                "subqueries may not read a protected dataset: their rows would escape the release threshold; use a JOIN",
            )
            .into());
        }
        Ok(())
    }

    /// Checks one expression evaluated at `site`. Conditions anywhere (a
    /// comparison inside SUM, a CASE WHEN) are filters on what they read.
    fn expr(&mut self, e: &Expr, site: Site, scope: &Scope<'_>) -> Result<(), Error> {
        let cond = Site::Filter;
        match e {
            Expr::Column(c) => {
                let lin = self.resolve(c, scope)?;
                self.use_sources(lin, site)
            }
            Expr::OuterReferenceColumn(_, c) => {
                let lin = self.resolve_outer(c)?;
                self.use_sources(lin, site)
            }
            Expr::Literal(..) => Ok(()),
            Expr::Alias(a) => self.expr(&a.expr, site, scope),
            Expr::BinaryExpr(b) => {
                let s = if is_condition(b.op) { cond } else { site };
                self.expr(&b.left, s, scope)?;
                self.expr(&b.right, s, scope)
            }
            Expr::Like(l) | Expr::SimilarTo(l) => {
                // A pattern read from protected rows can be malformed, and
                // fail: patterns over them are literals.
                if !matches!(l.pattern.as_ref(), Expr::Literal(..)) {
                    self.total_over_guarded("like", std::slice::from_ref(&l.pattern), scope)?;
                }
                self.expr(&l.expr, cond, scope)?;
                self.expr(&l.pattern, cond, scope)
            }
            Expr::Not(x)
            | Expr::IsNotNull(x)
            | Expr::IsNull(x)
            | Expr::IsTrue(x)
            | Expr::IsFalse(x)
            | Expr::IsUnknown(x)
            | Expr::IsNotTrue(x)
            | Expr::IsNotFalse(x)
            | Expr::IsNotUnknown(x) => self.expr(x, cond, scope),
            Expr::Between(b) => {
                for x in [&b.expr, &b.low, &b.high] {
                    self.expr(x, cond, scope)?;
                }
                Ok(())
            }
            Expr::InList(l) => {
                self.expr(&l.expr, cond, scope)?;
                for x in &l.list {
                    self.expr(x, cond, scope)?;
                }
                Ok(())
            }
            Expr::Negative(x) => self.expr(x, site, scope),
            Expr::Cast(c) => self.expr(&c.expr, site, scope),
            Expr::TryCast(c) => self.expr(&c.expr, site, scope),
            Expr::Case(c) => {
                if let Some(base) = &c.expr {
                    self.expr(base, cond, scope)?;
                }
                for (when, then) in &c.when_then_expr {
                    self.expr(when, cond, scope)?;
                    self.expr(then, site, scope)?;
                }
                if let Some(other) = &c.else_expr {
                    self.expr(other, site, scope)?;
                }
                Ok(())
            }
            Expr::ScalarFunction(f) => self.scalar_function(f, site, scope),
            Expr::Exists(x) => self.subquery(&x.subquery, scope),
            Expr::InSubquery(x) => {
                self.expr(&x.expr, cond, scope)?;
                self.subquery(&x.subquery, scope)
            }
            Expr::SetComparison(x) => {
                self.expr(&x.expr, cond, scope)?;
                self.subquery(&x.subquery, scope)
            }
            Expr::ScalarSubquery(sq) => self.subquery(sq, scope),
            Expr::GroupingSet(g) => {
                let exprs: Vec<&Expr> = match g {
                    GroupingSet::Rollup(v) | GroupingSet::Cube(v) => v.iter().collect(),
                    GroupingSet::GroupingSets(sets) => sets.iter().flatten().collect(),
                };
                for x in exprs {
                    self.expr(x, site, scope)?;
                }
                Ok(())
            }
            Expr::AggregateFunction(_) | Expr::WindowFunction(_) => Err(unsupported(
                "an aggregate or window function in this position",
            )),
            Expr::Placeholder(_) => Err(Error::InvalidRequest(
                "query parameters ($1) are not supported".into(),
            )),
            Expr::ScalarVariable(..) => Err(unsupported("session variables")),
            Expr::Unnest(_) => Err(unsupported("UNNEST")),
            #[allow(deprecated)]
            Expr::Wildcard { .. } => Err(unsupported("an unexpanded wildcard")),
            Expr::HigherOrderFunction(_) | Expr::Lambda(_) | Expr::LambdaVariable(_) => {
                Err(unsupported("lambda functions"))
            }
        }
    }

    /// What leaves the sandbox: rows of protected datasets never do.
    fn root_output(&mut self, schema: &DFSchema, root: &NodeInfo) -> Result<(), Error> {
        for (field, lineage) in schema.fields().iter().zip(&root.fields) {
            if let Some(s) = lineage.0.iter().find(|s| s.guarded) {
                return Err(Refusal::new(
                    "aggregation_required",
                    format!(
                        "output column '{}' returns rows of dataset '{}'; only aggregates of it may be released",
                        field.name(),
                        s.dataset
                    ),
                )
                .with("table", s.dataset.to_string())
                .with("column", s.column.to_string())
                .with("site", Site::Output.as_str())
                .into());
            }
            self.use_sources(lineage.clone(), Site::Output)?;
        }
        Ok(())
    }
}

use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};

/// Scalar functions that return a value (possibly NULL, NaN or an
/// infinity) for every input, so they may run over protected rows. `abs`
/// is made total by the engine (see `engine::total`); casts and division
/// are too.
const TOTAL_FUNCTIONS: &[&str] = &[
    "abs",
    "btrim",
    "trim",
    "ltrim",
    "rtrim",
    "lower",
    "upper",
    "initcap",
    "coalesce",
    "nullif",
    "nvl",
    "ifnull",
    "floor",
    "ceil",
    "round",
    "trunc",
    "signum",
    "sqrt",
    "cbrt",
    "exp",
    "ln",
    "log2",
    "log10",
    "isnan",
    "iszero",
    "greatest",
    "least",
    "date_trunc",
    "datetrunc",
    "date_part",
    "datepart",
    "length",
    "char_length",
    "character_length",
    "octet_length",
    "bit_length",
    "starts_with",
    "ends_with",
    "strpos",
    "instr",
    "contains",
    "concat",
    "concat_ws",
    "reverse",
];

/// Functions whose first argument names a mode (a unit, a field).
const MODE_FIRST: &[&str] = &["date_trunc", "datetrunc", "date_part", "datepart"];

/// Operators whose result says something about a value rather than computing with it.
fn is_condition(op: Operator) -> bool {
    !matches!(
        op,
        Operator::Plus
            | Operator::Minus
            | Operator::Multiply
            | Operator::Divide
            | Operator::Modulo
            | Operator::And
            | Operator::Or
            | Operator::StringConcat
    )
}
