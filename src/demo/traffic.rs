//! The demo's own traffic, so that the migration controller has something to judge.

use std::net::SocketAddr;

use bytes::Bytes;
use http::Request;
use http_body_util::BodyExt;
use serde_json::json;
use tokio::task::JoinHandle;

use super::services::{Service, SERVICES};

/// Sends the demo's own traffic: `rps` requests a second to each service's ACGE
/// endpoint through the proxy (benign JSON, 50 clients per service by `x-user-id`),
/// so that the migration controller has something to judge. The auth service's
/// requests carry `bearer` (the jwt filter checks them); the policy compiler's are
/// compile requests the pgc policy allows. Runs until aborted.
pub fn spawn_traffic(proxy: SocketAddr, rps: u32, bearer: Option<String>) -> JoinHandle<()> {
    tokio::spawn(async move {
        if rps == 0 {
            return;
        }
        let bearer: Option<std::sync::Arc<str>> = bearer.map(Into::into);
        let mut tasks = Vec::new();
        for service in SERVICES {
            tasks.push(tokio::spawn(service_traffic(
                proxy,
                service,
                rps,
                bearer.clone(),
            )));
        }
        for t in tasks {
            let _ = t.await;
        }
    })
}

async fn service_traffic(
    proxy: SocketAddr,
    service: Service,
    rps: u32,
    bearer: Option<std::sync::Arc<str>>,
) {
    // Several clients, each on its own connection, so that a slow green (a latency
    // fault) does not throttle the whole service's traffic.
    const CLIENTS: u32 = 8;
    let period = std::time::Duration::from_secs_f64(f64::from(CLIENTS) / f64::from(rps));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| tokio::spawn(client_traffic(proxy, service, period, c, bearer.clone())))
        .collect();
    for c in clients {
        let _ = c.await;
    }
}

async fn client_traffic(
    proxy: SocketAddr,
    service: Service,
    period: std::time::Duration,
    client: u32,
    bearer: Option<std::sync::Arc<str>>,
) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut sender = None;
    for n in 0u64.. {
        tick.tick().await;
        if sender.is_none() {
            sender = connect(proxy).await;
        }
        let Some(s) = &mut sender else { continue };
        let user = format!("user-{}", (n * 8 + u64::from(client)) % 50);
        let mut body =
            json!({"actor": user, "action": "read", "target": "own profile", "request": n});
        let mut req = Request::post(service.acge_endpoint)
            .header("host", proxy.to_string())
            .header("content-type", "application/json")
            .header("x-user-id", &user);
        match service.name {
            "auth" => {
                if let Some(b) = &bearer {
                    req = req.header("authorization", format!("Bearer {b}"));
                }
            }
            "pgc" => {
                req = req.header("x-user-roles", "policy-compiler");
                body["constitutional_hash"] = json!(crate::config::DEFAULT_CONSTITUTION_HASH);
                body["rules"] = json!([{"id": format!("rule-{n}"), "effect": "allow"}]);
            }
            _ => {}
        }
        let req = req
            .body(http_body_util::Full::new(Bytes::from(body.to_string())))
            .expect("a valid request");
        match s.send_request(req).await {
            Ok(res) => {
                let _ = res.into_body().collect().await;
            }
            Err(_) => sender = None,
        }
    }
}

async fn connect(
    proxy: SocketAddr,
) -> Option<hyper::client::conn::http1::SendRequest<http_body_util::Full<Bytes>>> {
    let stream = tokio::net::TcpStream::connect(proxy).await.ok()?;
    let (sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .ok()?;
    tokio::spawn(conn);
    Some(sender)
}
