//! The web console under `/console/`: a sign-in page, one page per role
//! (owner, auditor, buyer) and the script that renders them. The pages hold
//! no data: the script fetches everything from the same `/v1` API every
//! client uses, authenticated by the session cookie, so the console shows a
//! principal nothing its key would not get. Sessions live on the server
//! ([`session::Sessions`]).

pub mod session;

use super::error::ApiError;
use super::throttle::Throttle;
use crate::app::Sandbox;
use crate::store::{Principal, Role};
use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;
use serde_json::json;
use session::{Session, Sessions};

/// For every response: scripts and styles from this origin only (none
/// inline), no frames, no other origin to talk to or post forms to.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

const SIGN_IN_PAGE: &str = include_str!("assets/sign-in.html");
const VIEW_PAGE: &str = include_str!("assets/view.html");
const SCRIPT: &str = include_str!("assets/console.js");
const STYLE: &str = include_str!("assets/console.css");

/// Sign-in attempts per second one address may make, and their burst.
const SIGN_INS_PER_SECOND: f64 = 2.0;
const SIGN_IN_BURST: f64 = 10.0;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/console", web::get().to(to_index))
        .route("/console/", web::get().to(index))
        .route("/console/session", web::post().to(sign_in))
        .route("/console/session", web::get().to(whoami))
        .route("/console/session", web::delete().to(sign_out))
        .route("/console/console.js", web::get().to(script))
        .route("/console/console.css", web::get().to(style))
        .route("/console/{view}", web::get().to(view));
}

/// The views, and who may open each.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum View {
    Owner,
    Auditor,
    Buyer,
}

impl View {
    fn of(name: &str) -> Option<View> {
        match name {
            "owner" => Some(View::Owner),
            "auditor" => Some(View::Auditor),
            "buyer" => Some(View::Buyer),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            View::Owner => "owner",
            View::Auditor => "auditor",
            View::Buyer => "buyer",
        }
    }

    /// The same roles the view's API routes admit.
    fn admits(self, role: Role) -> bool {
        match self {
            View::Owner => role == Role::Owner,
            View::Auditor => matches!(role, Role::Auditor | Role::Admin),
            View::Buyer => role == Role::Buyer,
        }
    }

    fn home_of(role: Role) -> View {
        match role {
            Role::Owner => View::Owner,
            Role::Buyer => View::Buyer,
            Role::Auditor | Role::Admin => View::Auditor,
        }
    }
}

/// The session a request's cookie names, with its id.
pub fn session_of(req: &HttpRequest) -> Option<(String, Session)> {
    let sessions = req.app_data::<web::Data<Sessions>>()?;
    let id = req
        .headers()
        .get_all(header::COOKIE)
        .filter_map(|h| h.to_str().ok())
        .find_map(session::id_in)?
        .to_string();
    let session = sessions.find(&id)?;
    Some((id, session))
}

/// Whether a request comes from a page of this server's own origin. A
/// browser names the origin of every cross-origin request and of every
/// POST or DELETE; a request without `Origin` is not from a browser page
/// (or is a same-origin GET) and has no ambient cookie to abuse.
pub fn same_origin(req: &HttpRequest) -> bool {
    let Some(origin) = req.headers().get(header::ORIGIN) else {
        return true;
    };
    let info = req.connection_info();
    origin
        .to_str()
        .is_ok_and(|o| o == format!("{}://{}", info.scheme(), info.host()))
}

/// A state change made with a session must come from this origin and echo
/// the session's CSRF token: a form or script on another site can make the
/// browser send the cookie (another port is the same site) but can neither
/// set that header nor read the token.
pub fn guard_state_change(req: &HttpRequest, session: &Session) -> Result<(), ApiError> {
    let echoed = req
        .headers()
        .get(session::CSRF_HEADER)
        .and_then(|h| h.to_str().ok())
        .is_some_and(|t| session.csrf_matches(t));
    if echoed && same_origin(req) {
        Ok(())
    } else {
        Err(ApiError::CrossSite)
    }
}

fn html(status: actix_web::http::StatusCode, body: String) -> HttpResponse {
    HttpResponse::build(status)
        .content_type("text/html; charset=utf-8")
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .body(body)
}

fn see_other(location: &str) -> HttpResponse {
    HttpResponse::SeeOther()
        .insert_header((header::LOCATION, location))
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .finish()
}

/// The sign-in page, with `problem` (a fixed sentence, never input) shown.
fn sign_in_page(status: actix_web::http::StatusCode, problem: Option<&str>) -> HttpResponse {
    let page = match problem {
        Some(p) => SIGN_IN_PAGE.replace(
            "<p id=\"problem\" hidden></p>",
            &format!("<p id=\"problem\" role=\"alert\">{p}</p>"),
        ),
        None => SIGN_IN_PAGE.to_string(),
    };
    html(status, page)
}

/// The signed-in principal of a request's session, if the session and its key are still good.
async fn signed_in(sandbox: &Sandbox, req: &HttpRequest) -> Option<Principal> {
    let (_, session) = session_of(req)?;
    let cert = req.conn_data::<super::auth::ClientCert>().cloned();
    super::principal_of(sandbox, session.key_hash, cert)
        .await
        .ok()
}

async fn to_index() -> HttpResponse {
    see_other("/console/")
}

async fn index(sandbox: web::Data<Sandbox>, req: HttpRequest) -> HttpResponse {
    match signed_in(&sandbox, &req).await {
        Some(p) => see_other(&format!("/console/{}", View::home_of(p.role).name())),
        None => sign_in_page(actix_web::http::StatusCode::OK, None),
    }
}

async fn view(
    sandbox: web::Data<Sandbox>,
    req: HttpRequest,
    name: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let view = View::of(&name).ok_or_else(|| ApiError::NotFound("no such console view".into()))?;
    let Some(principal) = signed_in(&sandbox, &req).await else {
        return Ok(see_other("/console/"));
    };
    if !view.admits(principal.role) {
        let home = View::home_of(principal.role).name();
        return Ok(html(
            actix_web::http::StatusCode::FORBIDDEN,
            VIEW_PAGE
                .replace("{{view}}", "refused")
                .replace("{{title}}", "Not your view")
                .replace("{{home}}", home),
        ));
    }
    let title = match view {
        View::Owner => "Owner",
        View::Auditor => "Auditor",
        View::Buyer => "Buyer",
    };
    Ok(html(
        actix_web::http::StatusCode::OK,
        VIEW_PAGE
            .replace("{{view}}", view.name())
            .replace("{{title}}", title)
            .replace("{{home}}", view.name()),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SignIn {
    key: String,
}

/// Sign in with an API key, as JSON `{"key": …}` or a form field `key`:
/// opens a server-side session and sets its cookie.
async fn sign_in(
    sandbox: web::Data<Sandbox>,
    sessions: web::Data<Sessions>,
    throttle: web::Data<Throttle>,
    req: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let is_json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|h| h.to_str().ok())
        .is_some_and(|t| t.starts_with("application/json"));
    // A form posted from another site must not sign the browser in as
    // someone else (login CSRF).
    if !same_origin(&req) {
        return Err(ApiError::CrossSite);
    }
    let peer = req
        .peer_addr()
        .map_or_else(|| "unknown".to_string(), |a| a.ip().to_string());
    throttle.admit(
        &format!("console sign-in from {peer}"),
        SIGN_INS_PER_SECOND,
        SIGN_IN_BURST,
    )?;
    let form: Result<SignIn, String> = if is_json {
        serde_json::from_slice(&body).map_err(|e| e.to_string())
    } else {
        serde_urlencoded::from_bytes(&body).map_err(|e| e.to_string())
    };
    let refuse = |status, sentence: &'static str, error: ApiError| {
        if is_json {
            Err(error)
        } else {
            Ok(sign_in_page(status, Some(sentence)))
        }
    };
    let form = match form {
        Ok(f) if !f.key.trim().is_empty() && f.key.len() <= 256 => f,
        Ok(_) | Err(_) => {
            return refuse(
                actix_web::http::StatusCode::BAD_REQUEST,
                "Enter an API key.",
                ApiError::invalid(
                    "the body must hold an API key: {\"key\": \"…\"} or a form field key",
                ),
            );
        }
    };
    let key_hash = crate::auth::key_hash(form.key.trim());
    let cert = req.conn_data::<super::auth::ClientCert>().cloned();
    let principal = match super::principal_of(&sandbox, key_hash.clone(), cert).await {
        Ok(p) => p,
        Err(ApiError::Unauthenticated) => {
            return refuse(
                actix_web::http::StatusCode::UNAUTHORIZED,
                "That key was not accepted.",
                ApiError::Unauthenticated,
            );
        }
        Err(e) => return Err(e),
    };
    let (id, session) = sessions.open(key_hash).map_err(|e| match e {
        session::SessionError::Full => ApiError::Core(crate::error::Error::Overloaded),
        session::SessionError::Random => ApiError::internal(e.to_string()),
    })?;
    let secure = if sandbox.settings.tls.is_some() {
        "; Secure"
    } else {
        ""
    };
    let cookie = format!(
        "{}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        session::COOKIE,
        sessions.max_age().as_secs()
    );
    let home = View::home_of(principal.role).name();
    tracing::info!(principal = %principal.id, "console sign-in");
    if is_json {
        Ok(HttpResponse::Ok()
            .insert_header((header::SET_COOKIE, cookie))
            .insert_header((header::CACHE_CONTROL, "no-store"))
            .json(json!({
                "principal": principal.id,
                "role": principal.role.as_str(),
                "view": format!("/console/{home}"),
                "csrf": session.csrf,
            })))
    } else {
        Ok(HttpResponse::SeeOther()
            .insert_header((header::SET_COOKIE, cookie))
            .insert_header((header::LOCATION, format!("/console/{home}")))
            .insert_header((header::CACHE_CONTROL, "no-store"))
            .finish())
    }
}

/// Who the session is, and the CSRF token its page sends with state changes.
async fn whoami(sandbox: web::Data<Sandbox>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let (_, session) = session_of(&req).ok_or(ApiError::Unauthenticated)?;
    let cert = req.conn_data::<super::auth::ClientCert>().cloned();
    let principal = super::principal_of(&sandbox, session.key_hash.clone(), cert).await?;
    Ok(HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(json!({
            "principal": principal.id,
            "role": principal.role.as_str(),
            "org": principal.org,
            "view": format!("/console/{}", View::home_of(principal.role).name()),
            "csrf": session.csrf,
        })))
}

/// Sign out: the session ends on the server and the cookie is cleared.
async fn sign_out(
    sessions: web::Data<Sessions>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let (id, session) = session_of(&req).ok_or(ApiError::Unauthenticated)?;
    guard_state_change(&req, &session)?;
    sessions.close(&id);
    Ok(HttpResponse::Ok()
        .insert_header((
            header::SET_COOKIE,
            format!(
                "{}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0",
                session::COOKIE
            ),
        ))
        .json(json!({ "signed_out": true })))
}

fn asset(content_type: &str, body: &'static str) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(content_type)
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .body(body)
}

async fn script() -> HttpResponse {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

async fn style() -> HttpResponse {
    asset("text/css; charset=utf-8", STYLE)
}
