//! One request's life, the same for every route: ingress → route → request phases →
//! split → mirror → upstream → response phases → the answer, whose body's end runs the
//! log phases.
//!
//! A route without filters is the same code with nothing to do: no body is buffered
//! and no log future is made. Every failure is a [`ProxyError`] answered through the
//! response phases like any other answer, so the audit log sees refusals too. This
//! module does not accept connections (`server/`), choose weights (`split.rs`) or
//! implement filters (`acge-filters`).

use std::net::SocketAddr;
use std::time::Instant;

use acge_filters::{answer_of, Answer, Exchange, Source};
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};
use tokio::sync::oneshot;

use super::body::{self, declared_length, full_body, read_whole, Body, Bounds};
use super::error::ProxyError;
use super::ingress;
use super::log::{Finish, LoggedBody, Open};
use super::route::{BlueAnswer, Mirrored};
use super::server::InFlight;
use super::split::OVERRIDE_HEADER;
use super::upstream::headers::X_REQUEST_ID;
use super::upstream::Forwarded;
use super::Proxy;
use crate::telemetry;

/// Serves one request. Every outcome, including each failure, is a response.
pub(super) async fn run(
    proxy: &Proxy,
    req: Request<Incoming>,
    peer: SocketAddr,
    in_flight: InFlight,
) -> Response<LoggedBody> {
    let started = Instant::now();
    let (parts, body) = req.into_parts();
    let request_id = ingress::request_id(&parts.headers);
    let mut res = match proxy.ingress.admit(parts) {
        Ok(head) => {
            let routes = proxy.routes.load();
            match routes.find(head.uri.path()) {
                Some(route) => {
                    let route = route.clone();
                    drop(routes);
                    let body = body.map_err(Into::into).boxed_unsync();
                    let fwd = Forwarded {
                        client: peer.ip(),
                        proto: proxy.forwarded_proto.clone(),
                        request_id: request_id.header().clone(),
                    };
                    let mut ex =
                        Exchange::new(route.name.clone(), request_id.clone(), started, head);
                    if !route.allows_override {
                        ingress::strip_override(&mut ex.request.headers);
                    }
                    let finish = Finish::new(Open {
                        route,
                        pending: proxy.pending_logs.clone(),
                        ex,
                        status: StatusCode::OK,
                        _in_flight: in_flight,
                        leases: Vec::new(),
                    });
                    exchange(proxy, finish, body, fwd).await
                }
                None => unrouted(ProxyError::NoRoute {
                    path: head.uri.path().to_string(),
                }),
            }
        }
        Err(e) => unrouted(e),
    };
    res.headers_mut()
        .insert(X_REQUEST_ID, request_id.header().clone());
    res
}

/// A refusal before any route was chosen: counted under `route=""`.
fn unrouted(e: ProxyError) -> Response<LoggedBody> {
    telemetry::unrouted(e.status().as_u16());
    body::local(e.into_response()).map(LoggedBody::from)
}

async fn exchange(
    proxy: &Proxy,
    mut finish: Finish,
    body: Body,
    fwd: Forwarded,
) -> Response<LoggedBody> {
    let route = finish.route.clone();
    let declared = declared_length(&finish.ex.request.headers);
    let bounds = Bounds {
        limit: route.max_body_bytes,
        timeout: proxy.body_timeout,
        upstream: false,
    };
    let mut streaming = Some(body);
    if route.chain.wants_body() {
        let whole = read_whole(
            streaming.take().expect("not taken yet"),
            declared,
            bounds,
            &proxy.budget,
        );
        match whole.await {
            Ok((bytes, lease)) => {
                finish.ex.request_body = Some(bytes);
                finish.leases.push(lease);
            }
            Err(e) => return answer(proxy, finish, local(e), None).await,
        }
    }
    if let Some(refusal) = route.chain.on_request(&mut finish.ex).await {
        return answer(proxy, finish, answer_of(refusal), None).await;
    }
    let version = match route.splitter.choose(&finish.ex.request.headers) {
        Ok(choice) => choice.version,
        Err(e) => return answer(proxy, finish, local(e.into()), None).await,
    };
    finish.ex.version = Some(version);

    // Forked after the request phases: green gets the request as the filters left it,
    // and never one they refused.
    let mut blue_tap = None;
    // The body's length, when it is known: held, declared, or none at all.
    let body_length = match (&finish.ex.request_body, &streaming) {
        (Some(bytes), _) => Some(bytes.len() as u64),
        (None, Some(stream)) if stream.is_end_stream() => Some(0),
        _ => declared,
    };
    if let Some(start) = route
        .mirror
        .as_ref()
        .and_then(|m| m.admit(body_length, route.max_body_bytes))
    {
        let bytes = match (&finish.ex.request_body, streaming.take()) {
            (Some(bytes), _) => bytes.clone(),
            (None, Some(stream)) => match read_whole(stream, declared, bounds, &proxy.budget).await
            {
                Ok((bytes, lease)) => {
                    finish.ex.request_body = Some(bytes.clone());
                    finish.leases.push(lease);
                    bytes
                }
                Err(e) => return answer(proxy, finish, local(e), None).await,
            },
            (None, None) => Bytes::new(),
        };
        let (tx, rx) = oneshot::channel();
        blue_tap = Some(tx);
        start(
            route.clone(),
            Mirrored {
                exchange: finish.ex.fork_for_shadow(),
                body: bytes,
                forwarded: fwd.clone(),
                blue: rx,
            },
        );
    }

    let upstream_body = match (finish.ex.request_body.clone(), streaming) {
        (Some(bytes), _) => {
            // A filter may have replaced it; hyper counts the one that goes.
            finish.ex.request.headers.remove(CONTENT_LENGTH);
            full_body(bytes)
        }
        (None, Some(stream)) => stream,
        (None, None) => body::empty_body(),
    };
    let sent = route
        .cluster(version)
        .send(&finish.ex.request, upstream_body, &fwd)
        .await;
    match sent {
        Ok(res) => {
            let (parts, body) = res.into_parts();
            let answer = Answer {
                status: parts.status,
                headers: parts.headers,
                body: None,
                source: Source::Upstream(version),
            };
            self::answer(proxy, finish, answer, Some((body, blue_tap))).await
        }
        Err(e) => {
            route.metrics.upstream_error(version, e.kind());
            let mut failed = local(ProxyError::Upstream(e));
            // Says which version failed, as the demo backends' x-acge-backend would.
            failed.headers.insert(
                HeaderName::from_static(OVERRIDE_HEADER),
                HeaderValue::from_static(version.as_str()),
            );
            if let Some(tap) = blue_tap {
                let _ = tap.send(BlueAnswer {
                    status: failed.status.as_u16(),
                    body: None,
                });
            }
            answer(proxy, finish, failed, None).await
        }
    }
}

fn local(e: ProxyError) -> Answer {
    answer_of(e.into_response())
}

/// An upstream's body still to come, and the mirror waiting for blue's answer.
type Upstream = (Body, Option<oneshot::Sender<BlueAnswer>>);

/// Runs the response phases over `answer` and hands the client its response, whose
/// body's end ends the exchange.
async fn answer(
    proxy: &Proxy,
    mut finish: Finish,
    mut answer: Answer,
    upstream: Option<Upstream>,
) -> Response<LoggedBody> {
    let route = finish.route.clone();
    let (mut streaming, blue_tap) = match upstream {
        Some((body, tap)) => (Some(body), tap),
        None => (None, None),
    };
    let wants_whole = route.chain.wants_response_body()
        || (blue_tap.is_some()
            && declared_length(&answer.headers).is_some_and(|n| n <= route.max_body_bytes));
    if wants_whole {
        if let Some(stream) = streaming.take() {
            let bounds = Bounds {
                limit: route.max_body_bytes,
                timeout: proxy.body_timeout,
                upstream: true,
            };
            match read_whole(
                stream,
                declared_length(&answer.headers),
                bounds,
                &proxy.budget,
            )
            .await
            {
                Ok((bytes, lease)) => {
                    answer.body = Some(bytes);
                    finish.leases.push(lease);
                }
                Err(e) => {
                    if let Some(version) = answer.upstream() {
                        let kind = match e {
                            ProxyError::ResponseTooLarge { .. } => "upstream_response_too_large",
                            _ => super::upstream::BODY_CUT,
                        };
                        route.metrics.upstream_error(version, kind);
                    }
                    answer = local(e);
                }
            }
        }
    }
    finish.ex.response = Some(answer);
    if !route.chain.is_empty() {
        route.chain.on_response(&mut finish.ex).await;
    }
    let answer = finish
        .ex
        .response
        .as_mut()
        .expect("the response phases leave an answer");
    if let Some(tap) = blue_tap {
        let _ = tap.send(BlueAnswer {
            status: answer.status.as_u16(),
            body: answer.body.clone(),
        });
    }
    let mut res = Response::new(());
    *res.status_mut() = answer.status;
    *res.headers_mut() = std::mem::take(&mut answer.headers);
    let body = match (&answer.body, answer.source, streaming) {
        (Some(bytes), _, _) => {
            // Filters may have replaced or rewritten it; hyper counts the new one.
            res.headers_mut().remove(CONTENT_LENGTH);
            full_body(bytes.clone())
        }
        (None, Source::Upstream(_), Some(stream)) => stream,
        _ => body::empty_body(),
    };
    finish.status = answer.status;
    if body.is_end_stream() {
        // Nothing to hold back: the exchange ends before its head goes out.
        finish.end_now().await;
        return res.map(|()| LoggedBody::from(body));
    }
    res.map(|()| LoggedBody::new(body, finish))
}
