//! The admin listener: the console, the admin API and `/metrics` on one
//! address, behind the admin token.
//!
//! Every route but `/healthz` needs the admin token (unless
//! `admin.require_token` is off): `Authorization: Bearer <token>`, or HTTP
//! Basic with the token as the password, which is what a browser sends
//! after asking for it. A change (anything but GET and HEAD) sent by a page
//! of another site is refused (CSRF), and the console's forms carry a
//! token of their own besides ([`crate::console::csrf`]).

use std::net::TcpListener;

use actix_web::body::BoxBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header;
use actix_web::middleware::{from_fn, Next};
use actix_web::{web, App, HttpServer, ResponseError};
use base64::Engine;
use protocol::secret::{bearer_token, find_token};
use telemetry::lifecycle::{serve_until, OnShutdown};
use tokio_util::sync::CancellationToken;

use crate::admin::routes::{self, Access, AdminError, AdminState};
use crate::console;

/// Serves the admin routes on `listener` until `shutdown`.
pub async fn serve(
    state: AdminState,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let state = web::Data::new(state);
    tracing::info!(address = %listener.local_addr()?, "Admin API and console listening.");
    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .wrap(from_fn(require_token))
            .app_data(web::JsonConfig::default().error_handler(|error, _| {
                AdminError::Invalid(format!("invalid JSON body: {error}")).into()
            }))
            .app_data(web::QueryConfig::default().error_handler(|error, _| {
                AdminError::Invalid(format!("invalid query: {error}")).into()
            }))
            .configure(routes::api)
            .configure(console::routes::pages)
    })
    // Operators' requests only: one worker is plenty.
    .workers(1)
    .disable_signals()
    .shutdown_timeout(1)
    .listen(listener)?
    .run();
    serve_until(server, shutdown, OnShutdown::Finish).await
}

/// Lets a request through only with the admin token (see the module docs).
async fn require_token(
    request: ServiceRequest,
    next: Next<BoxBody>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    if request.path() == "/healthz" {
        return next.call(request).await;
    }
    let state = request
        .app_data::<web::Data<AdminState>>()
        .expect("the admin state is registered");
    let allowed = match &state.access {
        Access::Open => true,
        Access::Closed => false,
        Access::Token(digest) => request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(presented_token)
            .is_some_and(|token| find_token(&token, [digest]).is_some()),
    };
    if !allowed {
        Ok(request.into_response(AdminError::Unauthorized.error_response()))
    } else if is_cross_site_change(&request) {
        Ok(request.into_response(AdminError::CrossSite.error_response()))
    } else {
        next.call(request).await
    }
}

/// A browser sends stored Basic credentials with any site's form POST, so
/// a change (anything but GET/HEAD) coming from another origin is refused:
/// that page could otherwise replay, purge or pause (CSRF). Scripts send no
/// `Origin` and are not affected.
fn is_cross_site_change(request: &ServiceRequest) -> bool {
    use actix_web::http::Method;
    if matches!(*request.method(), Method::GET | Method::HEAD) {
        return false;
    }
    let headers = request.headers();
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(site) = text("sec-fetch-site") {
        return !matches!(site, "same-origin" | "none");
    }
    match (text("origin"), text("host")) {
        (Some(origin), Some(host)) => {
            let origin_host = origin.split_once("://").map(|(_, rest)| rest);
            origin_host != Some(host)
        }
        (Some(_), None) => true,
        (None, _) => false,
    }
}

/// The token of a `Bearer` credential, or the password of a `Basic` one.
fn presented_token(authorization: &str) -> Option<String> {
    if let Some(token) = bearer_token(authorization) {
        return Some(token.to_owned());
    }
    let (scheme, credentials) = authorization.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(credentials.trim())
        .ok()?;
    let (_user, password) = std::str::from_utf8(&decoded).ok()?.split_once(':')?;
    Some(password.to_owned())
}
