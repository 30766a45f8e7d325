//! The Flight SQL calls. A statement is decided by the same gate as HTTP
//! when its `FlightInfo` is asked for: a dry run that answers the schema
//! and outline, checks the quota and budget, and, when the sandbox is idle,
//! begins executing, since the `DoGet` follows a round trip later. Nothing
//! of it is observable until the ticket is redeemed, which takes the
//! decision up again if nothing it rests on changed (else gates anew) and
//! runs the rest of the pipeline — release, metering, the ledger entry on
//! disk — before the first batch leaves. Nothing here writes: updates,
//! ingest and Substrait plans are refused with `statement_not_allowed`.

use super::tickets::Refused;
use super::{Caller, FlightSql, status};
use crate::api::error::ApiError;
use crate::catalog::Dataset;
use crate::error::Error;
use crate::pipeline::{self, Outcome};
use crate::store::{Principal, Role};
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::sql::metadata::{SqlInfoData, SqlInfoDataBuilder};
use arrow_flight::sql::server::{FlightSqlService, PeekableFlightDataStream};
use arrow_flight::sql::{
    ActionClosePreparedStatementRequest, ActionCreatePreparedStatementRequest,
    ActionCreatePreparedStatementResult, ActionCreatePreparedSubstraitPlanRequest, Any,
    CommandGetCatalogs, CommandGetDbSchemas, CommandGetSqlInfo, CommandGetTableTypes,
    CommandGetTables, CommandPreparedStatementQuery, CommandPreparedStatementUpdate,
    CommandStatementIngest, CommandStatementQuery, CommandStatementSubstraitPlan,
    CommandStatementUpdate, DoPutPreparedStatementResult, ProstMessageExt, SqlInfo,
    TicketStatementQuery,
};
use arrow_flight::{
    Action, FlightDescriptor, FlightEndpoint, FlightInfo, HandshakeRequest, HandshakeResponse,
    IpcMessage, SchemaAsIpc, Ticket,
};
use base64::Engine;
use datafusion::arrow::datatypes::{Field, Schema};
use datafusion::arrow::ipc::writer::IpcWriteOptions;
use datafusion::arrow::record_batch::RecordBatch;
use futures::{Stream, TryStreamExt};
use prost::Message;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status, Streaming};

type DoGetStream = <FlightSql as FlightService>::DoGetStream;

/// Call headers a driver may send (ADBC: `adbc.flight.sql.rpc.call_header.<name>`)
/// to choose the grant or the purpose, as the HTTP body's fields do.
const GRANT_HEADER: &str = "x-frostglass-grant";
const PURPOSE_HEADER: &str = "x-frostglass-purpose";

fn sql_info() -> &'static SqlInfoData {
    static INFO: OnceLock<SqlInfoData> = OnceLock::new();
    INFO.get_or_init(|| {
        let mut b = SqlInfoDataBuilder::new();
        b.append(SqlInfo::FlightSqlServerName, "Frostglass");
        b.append(SqlInfo::FlightSqlServerVersion, env!("CARGO_PKG_VERSION"));
        b.append(SqlInfo::FlightSqlServerArrowVersion, "1.3");
        b.append(SqlInfo::FlightSqlServerReadOnly, true);
        b.append(SqlInfo::FlightSqlServerSql, true);
        b.append(SqlInfo::FlightSqlServerSubstrait, false);
        b.append(SqlInfo::FlightSqlServerTransaction, 0i32);
        b.append(SqlInfo::FlightSqlServerCancel, false);
        b.build().expect("static SQL info builds")
    })
}

fn ipc_schema(schema: &Schema) -> Result<prost::bytes::Bytes, Status> {
    let message: IpcMessage = SchemaAsIpc::new(schema, &IpcWriteOptions::default())
        .try_into()
        .map_err(|e: datafusion::arrow::error::ArrowError| {
            status(ApiError::internal(e.to_string()))
        })?;
    Ok(message.0)
}

fn refused_handle(r: Refused, what: &str) -> Status {
    status(match r {
        Refused::Unknown => ApiError::NotFound(format!(
            "no such {what}: unknown, already used, expired or not yours"
        )),
        Refused::TooMany => ApiError::Core(Error::ResourceLimit(format!(
            "too many open {what}s; close some first"
        ))),
    })
}

fn writes_refused() -> Status {
    Error::StatementNotAllowed(
        "the sandbox is read-only: only one SELECT per statement, no updates, ingest or Substrait plans"
            .into(),
    )
    .into()
}

/// One batch as a Flight stream (catalog answers).
fn one_batch<E: std::fmt::Display>(
    batch: Result<RecordBatch, E>,
) -> Result<Response<DoGetStream>, Status> {
    let batch = batch.map_err(|e| status(ApiError::internal(e.to_string())))?;
    let stream = FlightDataEncoderBuilder::new()
        .with_schema(batch.schema())
        .build(futures::stream::once(async { Ok(batch) }))
        .map_err(Status::from);
    Ok(Response::new(Box::pin(stream)))
}

/// A `FlightInfo` whose one endpoint's ticket is `command` itself (catalog calls).
fn info_for<M: ProstMessageExt>(
    command: M,
    schema: &Schema,
    descriptor: FlightDescriptor,
) -> Result<Response<FlightInfo>, Status> {
    let ticket = Ticket::new(command.as_any().encode_to_vec());
    let info = FlightInfo::new()
        .try_with_schema(schema)
        .map_err(|e| status(ApiError::internal(e.to_string())))?
        .with_endpoint(FlightEndpoint::new().with_ticket(ticket))
        .with_descriptor(descriptor);
    Ok(Response::new(info))
}

impl FlightSql {
    /// The principal of the call, admitted by the shared rate limit.
    fn caller<T>(&self, request: &Request<T>) -> Result<Principal, Status> {
        let principal = request
            .extensions()
            .get::<Caller>()
            .map(|c| c.0.clone())
            .ok_or_else(|| status(ApiError::Unauthenticated))?;
        let limits = &self.sandbox.settings.limits;
        self.throttle
            .admit(
                &principal.id,
                limits.requests_per_second,
                limits.request_burst,
            )
            .map_err(status)?;
        Ok(principal)
    }

    /// A statement as the pipeline takes it, with the grant and purpose the
    /// call's headers choose.
    fn statement<T>(request: &Request<T>, sql: String) -> pipeline::Request {
        let header = |name: &str| {
            request
                .metadata()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        pipeline::Request {
            sql,
            grant: header(GRANT_HEADER),
            purpose: header(PURPOSE_HEADER),
            dry_run: false,
            run_ahead: false,
            dp: Default::default(),
        }
    }

    /// The gate's decision on `statement` without reading data: its
    /// outline and the gate's output (a refusal is recorded and returned,
    /// as on HTTP). `run_ahead`: begin executing it if the sandbox is idle,
    /// for a ticket about to be redeemed; never for a statement only being
    /// prepared, which may never run (and whose execution, dropped with the
    /// decision, would hold a slot that its own `GetFlightInfo` then finds taken).
    async fn decide(
        &self,
        principal: &Principal,
        statement: &pipeline::Request,
        run_ahead: bool,
    ) -> Result<Box<pipeline::Decided>, Status> {
        let dry = pipeline::Request {
            dry_run: true,
            run_ahead,
            ..statement.clone()
        };
        let run = pipeline::run(
            self.sandbox.clone(),
            principal.clone(),
            dry,
            std::future::pending(),
        );
        match self.sandbox.runtime.spawn(run).await {
            Ok(Ok(Outcome::DryRun(decided))) => Ok(decided),
            Ok(Ok(_)) => Err(status(ApiError::internal("a dry run answered"))),
            Ok(Err(e)) => Err(e.into()),
            Err(e) => Err(status(ApiError::internal(e.to_string()))),
        }
    }

    /// A `FlightInfo` for an allowed statement: its schema, the outline as
    /// app_metadata, and a single-use ticket bound to the principal.
    async fn info_for_statement(
        &self,
        principal: &Principal,
        statement: pipeline::Request,
        descriptor: FlightDescriptor,
    ) -> Result<Response<FlightInfo>, Status> {
        let decided = self.decide(principal, &statement, true).await?;
        let metadata = serde_json::to_vec(&decided.outline).unwrap_or_default();
        let schema = decided.outline.schema.clone();
        let handle = self
            .tickets
            .issue(&principal.id, (statement, decided))
            .map_err(|r| refused_handle(r, "ticket"))?;
        let ticket = TicketStatementQuery {
            statement_handle: handle.into_bytes().into(),
        };
        let endpoint = FlightEndpoint::new()
            .with_ticket(Ticket::new(ticket.as_any().encode_to_vec()))
            .with_expiration_time(prost_types::Timestamp::from(
                std::time::SystemTime::now() + super::tickets::TICKET_TTL,
            ));
        let info = FlightInfo::new()
            .try_with_schema(&schema)
            .map_err(|e| status(ApiError::internal(e.to_string())))?
            .with_endpoint(endpoint)
            .with_descriptor(descriptor)
            .with_app_metadata(metadata);
        Ok(Response::new(info))
    }

    /// Runs a redeemed statement through the whole pipeline and streams the
    /// released batches. If the client goes away first, the dropped future
    /// tells the pipeline, which cancels the query and records `client_closed`.
    async fn execute(
        &self,
        principal: Principal,
        statement: pipeline::Request,
        decided: Box<pipeline::Decided>,
    ) -> Result<Response<DoGetStream>, Status> {
        let limits = &self.sandbox.settings.limits;
        let running = self
            .throttle
            .start(&principal.id, limits.max_concurrent_queries_per_principal)
            .map_err(status)?;
        let (client_here, client_gone) = tokio::sync::oneshot::channel::<()>();
        let run = pipeline::run_decided(
            self.sandbox.clone(),
            principal,
            statement,
            Some(decided),
            async move {
                let _ = client_gone.await;
            },
        );
        let outcome = self.sandbox.runtime.spawn(run).await;
        drop((client_here, running));
        let answer = match outcome.map_err(|e| status(ApiError::internal(e.to_string())))?? {
            Outcome::Answer(answer) => answer,
            Outcome::Held(query_id) => {
                return Err(Status::failed_precondition(
                    serde_json::json!({
                        "query_id": query_id,
                        "status": "held",
                        "message": "the answer waits for its owners' review; fetch it later at this location",
                        "location": format!("/v1/queries/{query_id}"),
                    })
                    .to_string(),
                ));
            }
            Outcome::DryRun(_) => return Err(status(ApiError::internal("a statement ran dry"))),
        };
        let metadata = serde_json::json!({
            "query_id": answer.query_id,
            "grant": answer.grant,
            "purpose": answer.purpose,
            "release": answer.release,
            "usage": answer.usage,
            "budget": answer.budget,
            "receipt": answer.receipt,
        });
        let stream = FlightDataEncoderBuilder::new()
            .with_schema(answer.schema.clone())
            .with_metadata(serde_json::to_vec(&metadata).unwrap_or_default().into())
            .build(futures::stream::iter(answer.batches.into_iter().map(Ok)))
            .map_err(Status::from);
        Ok(Response::new(Box::pin(stream)))
    }

    /// The datasets `principal` may list: a buyer those its active grants
    /// cover, an owner its own, auditors and admins all.
    async fn visible(&self, principal: &Principal) -> Result<Vec<Arc<Dataset>>, Status> {
        let catalog = self.sandbox.catalog.current();
        let all = catalog.datasets.values().cloned();
        Ok(match principal.role {
            Role::Buyer => {
                let store = self.sandbox.store.clone();
                let buyer = principal.id.clone();
                let grants = tokio::task::spawn_blocking(move || store.grants_of(&buyer))
                    .await
                    .map_err(|e| status(ApiError::internal(e.to_string())))?
                    .map_err(|e| status(e.into()))?;
                let now = crate::util::now_rfc3339();
                all.filter(|d| grants.iter().any(|g| g.is_active(&now) && g.covers(d.id())))
                    .collect()
            }
            Role::Owner => all
                .filter(|d| principal.org.as_deref() == Some(d.manifest.owner.as_str()))
                .collect(),
            Role::Auditor | Role::Admin => all.collect(),
        })
    }
}

/// A dataset's columns as fields, each with its class (and whether it is
/// the privacy unit) as field metadata.
fn table_schema(d: &Dataset) -> Schema {
    let fields: Vec<Field> = d
        .schema
        .fields()
        .iter()
        .map(|f| {
            let mut metadata = HashMap::new();
            let class = d
                .manifest
                .columns
                .iter()
                .find(|c| &c.name == f.name())
                .and_then(|c| serde_json::to_value(c.class).ok())
                .and_then(|v| v.as_str().map(str::to_string));
            if let Some(class) = class {
                metadata.insert("frostglass.class".to_string(), class);
            }
            if d.manifest.privacy_unit.as_deref() == Some(f.name().as_str()) {
                metadata.insert("frostglass.privacy_unit".to_string(), "true".to_string());
            }
            f.as_ref().clone().with_metadata(metadata)
        })
        .collect();
    Schema::new(fields)
}

#[tonic::async_trait]
impl FlightSqlService for FlightSql {
    type FlightService = FlightSql;

    async fn do_handshake(
        &self,
        request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<
        Response<Pin<Box<dyn Stream<Item = Result<HandshakeResponse, Status>> + Send>>>,
        Status,
    > {
        let header = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let key = match header.split_once(' ') {
            Some((scheme, encoded)) if scheme.eq_ignore_ascii_case("basic") => {
                base64::engine::general_purpose::STANDARD
                    .decode(encoded.trim())
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .and_then(|s| s.split_once(':').map(|(_, key)| key.to_string()))
            }
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => {
                Some(token.trim().to_string())
            }
            _ => None,
        }
        .ok_or_else(|| status(ApiError::Unauthenticated))?;
        super::principal_of_key(&self.sandbox.store, &key, &request)?;
        let bearer = MetadataValue::try_from(format!("Bearer {key}"))
            .map_err(|_| status(ApiError::Unauthenticated))?;
        let answer = HandshakeResponse {
            protocol_version: 0,
            payload: key.into_bytes().into(),
        };
        let mut response: Response<Pin<Box<dyn Stream<Item = _> + Send>>> =
            Response::new(Box::pin(futures::stream::iter([Ok(answer)])));
        response.metadata_mut().insert("authorization", bearer);
        Ok(response)
    }

    async fn get_flight_info_statement(
        &self,
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let principal = self.caller(&request)?;
        let statement = Self::statement(&request, query.query);
        self.info_for_statement(&principal, statement, request.into_inner())
            .await
    }

    async fn do_get_statement(
        &self,
        ticket: TicketStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let principal = self.caller(&request)?;
        let handle = String::from_utf8_lossy(&ticket.statement_handle).into_owned();
        let (statement, decided) = self
            .tickets
            .take(&principal.id, &handle)
            .map_err(|r| refused_handle(r, "ticket"))?;
        self.execute(principal, statement, decided).await
    }

    async fn do_action_create_prepared_statement(
        &self,
        query: ActionCreatePreparedStatementRequest,
        request: Request<Action>,
    ) -> Result<ActionCreatePreparedStatementResult, Status> {
        let principal = self.caller(&request)?;
        let statement = Self::statement(&request, query.query);
        let schema = self
            .decide(&principal, &statement, false)
            .await?
            .outline
            .schema;
        let handle = self
            .prepared
            .issue(&principal.id, statement)
            .map_err(|r| refused_handle(r, "prepared statement"))?;
        Ok(ActionCreatePreparedStatementResult {
            prepared_statement_handle: handle.into_bytes().into(),
            dataset_schema: ipc_schema(&schema)?,
            parameter_schema: ipc_schema(&Schema::empty())?,
        })
    }

    async fn get_flight_info_prepared_statement(
        &self,
        cmd: CommandPreparedStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let principal = self.caller(&request)?;
        let handle = String::from_utf8_lossy(&cmd.prepared_statement_handle).into_owned();
        let statement = self
            .prepared
            .get(&principal.id, &handle)
            .map_err(|r| refused_handle(r, "prepared statement"))?;
        self.info_for_statement(&principal, statement, request.into_inner())
            .await
    }

    async fn do_action_close_prepared_statement(
        &self,
        query: ActionClosePreparedStatementRequest,
        request: Request<Action>,
    ) -> Result<(), Status> {
        let principal = self.caller(&request)?;
        let handle = String::from_utf8_lossy(&query.prepared_statement_handle).into_owned();
        self.prepared
            .close(&principal.id, &handle)
            .map_err(|r| refused_handle(r, "prepared statement"))
    }

    async fn do_put_prepared_statement_query(
        &self,
        _query: CommandPreparedStatementQuery,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<DoPutPreparedStatementResult, Status> {
        self.caller(&request)?;
        Err(Error::InvalidRequest(
            "prepared statements take no parameters here: put the values in the SQL".into(),
        )
        .into())
    }

    async fn do_put_statement_update(
        &self,
        _ticket: CommandStatementUpdate,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<i64, Status> {
        self.caller(&request)?;
        Err(writes_refused())
    }

    async fn do_put_statement_ingest(
        &self,
        _ticket: CommandStatementIngest,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<i64, Status> {
        self.caller(&request)?;
        Err(writes_refused())
    }

    async fn do_put_substrait_plan(
        &self,
        _query: CommandStatementSubstraitPlan,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<i64, Status> {
        self.caller(&request)?;
        Err(writes_refused())
    }

    async fn get_flight_info_substrait_plan(
        &self,
        _query: CommandStatementSubstraitPlan,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.caller(&request)?;
        Err(writes_refused())
    }

    async fn do_action_create_prepared_substrait_plan(
        &self,
        _query: ActionCreatePreparedSubstraitPlanRequest,
        request: Request<Action>,
    ) -> Result<ActionCreatePreparedStatementResult, Status> {
        self.caller(&request)?;
        Err(writes_refused())
    }

    async fn get_flight_info_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.caller(&request)?;
        let schema = query.clone().into_builder(sql_info()).schema();
        info_for(query, &schema, request.into_inner())
    }

    async fn do_get_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        self.caller(&request)?;
        one_batch(query.into_builder(sql_info()).build())
    }

    async fn get_flight_info_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.caller(&request)?;
        let schema = query.into_builder().schema();
        info_for(query, &schema, request.into_inner())
    }

    async fn do_get_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        self.caller(&request)?;
        let mut builder = query.into_builder();
        builder.append(crate::engine::CATALOG);
        one_batch(builder.build())
    }

    async fn get_flight_info_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.caller(&request)?;
        let schema = query.clone().into_builder().schema();
        info_for(query, &schema, request.into_inner())
    }

    async fn do_get_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        self.caller(&request)?;
        let mut builder = query.into_builder();
        builder.append(crate::engine::CATALOG, crate::engine::SCHEMA);
        one_batch(builder.build())
    }

    async fn get_flight_info_tables(
        &self,
        query: CommandGetTables,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.caller(&request)?;
        let schema = query.clone().into_builder().schema();
        info_for(query, &schema, request.into_inner())
    }

    async fn do_get_tables(
        &self,
        query: CommandGetTables,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let principal = self.caller(&request)?;
        let mut datasets = self.visible(&principal).await?;
        datasets.sort_by(|a, b| a.id().cmp(b.id()));
        let mut builder = query.into_builder();
        for d in datasets {
            builder
                .append(
                    crate::engine::CATALOG,
                    crate::engine::SCHEMA,
                    d.id(),
                    "TABLE",
                    &table_schema(&d),
                )
                .map_err(|e| status(ApiError::internal(e.to_string())))?;
        }
        one_batch(builder.build())
    }

    async fn get_flight_info_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.caller(&request)?;
        let schema = query.into_builder().schema();
        info_for(query, &schema, request.into_inner())
    }

    async fn do_get_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        self.caller(&request)?;
        let mut builder = query.into_builder();
        builder.append("TABLE");
        one_batch(builder.build())
    }

    async fn do_get_fallback(
        &self,
        request: Request<Ticket>,
        _message: Any,
    ) -> Result<Response<DoGetStream>, Status> {
        self.caller(&request)?;
        Err(status(ApiError::invalid(
            "this ticket names nothing the sandbox serves",
        )))
    }

    async fn do_put_prepared_statement_update(
        &self,
        _query: CommandPreparedStatementUpdate,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<i64, Status> {
        self.caller(&request)?;
        Err(writes_refused())
    }

    /// Actions the sandbox does not serve, among them the session actions
    /// (`CloseSession`, which ADBC sends when it closes a connection): it
    /// keeps no sessions. `UNIMPLEMENTED`, the answer drivers expect for
    /// an action a server lacks, with the JSON error body of every refusal.
    async fn do_action_fallback(
        &self,
        request: Request<Action>,
    ) -> Result<Response<<Self as FlightService>::DoActionStream>, Status> {
        self.caller(&request)?;
        let refusal =
            ApiError::NotFound("the sandbox serves no such action (it keeps no sessions)".into());
        Err(Status::unimplemented(refusal.body().to_string()))
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}
