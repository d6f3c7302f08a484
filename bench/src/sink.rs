//! The fast destination: answers 200 at once, checks each destination's
//! per-user order, and measures how long each event took from the load
//! generator's send to its arrival here.

use std::collections::HashMap;
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use serde::Deserialize;
use telemetry::lifecycle::{serve_until, OnShutdown};
use tokio_util::sync::CancellationToken;

use crate::check::OrderCheck;
use crate::load::unix_micros;

/// What one destination (one sink path) received.
#[derive(Debug, Default)]
pub struct Received {
    pub order: OrderCheck,
    /// Per delivery, microseconds from the client's send to arrival here.
    pub latencies_us: Vec<u32>,
    /// Requests the sink could not read as a benchmark event.
    pub unreadable: u64,
}

#[derive(Default)]
pub struct Sink {
    paths: Mutex<HashMap<String, Received>>,
}

#[derive(Deserialize)]
struct Delivery {
    #[serde(rename = "userId")]
    user_id: String,
    payload: Payload,
}

#[derive(Deserialize)]
pub struct Payload {
    pub seq: u64,
    #[serde(rename = "sentAt")]
    pub sent_at_us: u64,
}

impl Sink {
    /// Deliveries in order to `path` so far.
    pub fn in_order(&self, path: &str) -> u64 {
        self.lock().get(path).map_or(0, |r| r.order.in_order)
    }

    /// Everything received so far, leaving the sink empty for the next phase.
    pub fn take(&self) -> HashMap<String, Received> {
        std::mem::take(&mut *self.lock())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Received>> {
        self.paths.lock().expect("sink lock is never poisoned")
    }

    fn record(&self, path: &str, body: &[u8]) {
        let arrived = unix_micros();
        let delivery = serde_json::from_slice::<Delivery>(body).ok();
        let mut paths = self.lock();
        let received = match paths.get_mut(path) {
            Some(received) => received,
            None => paths.entry(path.to_owned()).or_default(),
        };
        match delivery {
            Some(delivery) => {
                received
                    .order
                    .observe(&delivery.user_id, delivery.payload.seq);
                received.latencies_us.push(
                    u32::try_from(arrived.saturating_sub(delivery.payload.sent_at_us))
                        .unwrap_or(u32::MAX),
                );
            }
            None => received.unreadable += 1,
        }
    }
}

/// Serves the sink on `listener` (any path) until `shutdown`.
pub fn serve(
    listener: TcpListener,
    sink: Arc<Sink>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let sink = web::Data::from(sink);
    let server = HttpServer::new(move || {
        App::new()
            .app_data(sink.clone())
            .default_service(web::post().to(receive))
    })
    .workers(2)
    .disable_signals()
    .shutdown_timeout(1)
    .listen(listener)?
    .run();
    tokio::spawn(serve_until(server, shutdown, OnShutdown::Drop));
    Ok(())
}

async fn receive(request: HttpRequest, body: web::Bytes, sink: web::Data<Sink>) -> HttpResponse {
    sink.record(request.path(), &body);
    HttpResponse::Ok().finish()
}
