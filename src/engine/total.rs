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

fn rewrite(
    plan: LogicalPlan,
    f: &dyn Fn(Expr) -> Result<Transformed<Expr>>,
) -> Result<LogicalPlan> {
    plan.transform_up_with_subqueries(|node| node.map_expressions(|e| e.transform_up(f)))
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
