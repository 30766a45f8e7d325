//! Total expressions: over protected data a runtime error is an oracle (an
//! error or an answer says whether some row holds a value), so every plan a
//! buyer's session executes is rewritten so that the partial operators it
//! may contain cannot fail: division and modulo by zero give NULL, `abs`
//! of the smallest integer wraps like the other integer arithmetic, and
//! every cast — written or inserted by type coercion — is a `TRY_CAST`,
//! which gives NULL where a cast would fail or narrow. Functions that can
//! still fail are refused over protected data by the policy check
//! (`policy::check`, rule `partial_function`).

use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::error::Result;
use datafusion::functions::expr_fn::nullif;
use datafusion::logical_expr::expr::{Cast, ScalarFunction, TryCast};
use datafusion::logical_expr::expr_rewriter::NamePreserver;
use datafusion::logical_expr::{BinaryExpr, Expr, LogicalPlan, Operator, lit, when};
use datafusion::optimizer::AnalyzerRule;

/// Before type coercion, so the literals it adds get the operands' types.
#[derive(Debug)]
pub struct TotalOperators;

/// After type coercion, so implicit casts are caught too.
#[derive(Debug)]
pub struct TryCasts;

impl AnalyzerRule for TotalOperators {
    fn analyze(&self, plan: LogicalPlan, _: &ConfigOptions) -> Result<LogicalPlan> {
        rewrite(plan, &total_operator)
    }

    fn name(&self) -> &str {
        "frostglass_total_operators"
    }
}

impl AnalyzerRule for TryCasts {
    fn analyze(&self, plan: LogicalPlan, _: &ConfigOptions) -> Result<LogicalPlan> {
        rewrite(plan, &try_cast)
    }

    fn name(&self) -> &str {
        "frostglass_try_casts"
    }
}

/// Rewrites every expression, keeping each one's name as DataFusion's own
/// type coercion does: a node above refers to `x % Int64(3)` by that name,
/// and must still find it once it reads `x % nullif(3, 0)`.
fn rewrite(
    plan: LogicalPlan,
    f: &dyn Fn(Expr) -> Result<Transformed<Expr>>,
) -> Result<LogicalPlan> {
    plan.transform_up_with_subqueries(|node| {
        let names = NamePreserver::new(&node);
        node.map_expressions(|e| {
            let name = names.save(&e);
            Ok(e.transform_up(f)?.update_data(|e| name.restore(e)))
        })
    })
    .map(|t| t.data)
}

fn total_operator(e: Expr) -> Result<Transformed<Expr>> {
    Ok(match e {
        Expr::BinaryExpr(BinaryExpr {
            left,
            op: op @ (Operator::Divide | Operator::Modulo),
            right,
        }) => Transformed::yes(Expr::BinaryExpr(BinaryExpr {
            left,
            op,
            right: Box::new(nullif(*right, lit(0))),
        })),
        Expr::ScalarFunction(ScalarFunction { func, args })
            if func.name() == "abs" && args.len() == 1 =>
        {
            let x = &args[0];
            Transformed::yes(
                when(x.clone().lt(lit(0)), Expr::Negative(Box::new(x.clone())))
                    .otherwise(x.clone())?,
            )
        }
        other => Transformed::no(other),
    })
}

fn try_cast(e: Expr) -> Result<Transformed<Expr>> {
    Ok(match e {
        Expr::Cast(Cast { expr, field }) => {
            Transformed::yes(Expr::TryCast(TryCast { expr, field }))
        }
        other => Transformed::no(other),
    })
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::Int64Array;
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::arrow::record_batch::RecordBatch;
    use datafusion::datasource::MemTable;
    use std::sync::Arc;

    /// A grouping by a rewritten expression is still found by the
    /// projection above it (it failed to plan before names were kept).
    #[tokio::test]
    async fn a_group_by_a_rewritten_expression_still_plans() {
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(Int64Array::from(vec![1, 2, 4]))],
        )
        .unwrap();
        let table = MemTable::try_new(schema, vec![vec![batch]]).unwrap();
        let engine = crate::engine::Engine::new(crate::config::Limits::default());
        let state = engine
            .session_with(vec![("t".into(), Arc::new(table))])
            .unwrap();
        for (sql, groups) in [
            // 1, 2, 4 → 1, 2, 1
            (
                "SELECT x % 3 AS k, SUM(x) AS s FROM t GROUP BY x % 3 ORDER BY k",
                2,
            ),
            // 1, 2, 4 → 0, 1, 2
            (
                "SELECT abs(x) / 2 AS k, COUNT(*) AS n FROM t GROUP BY abs(x) / 2 ORDER BY k",
                3,
            ),
        ] {
            let plan = engine
                .plan(&state, engine.parse(sql).unwrap())
                .await
                .unwrap();
            let plan = engine.optimize(&state, &plan).expect(sql);
            let (batches, _) = engine.execute(&state, &plan, 10).await.expect(sql);
            let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
            assert_eq!(rows, groups, "{sql}");
        }
    }
}
