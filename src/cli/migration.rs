//! `acge-proxy migration status [--watch]`: the controller's state, as a table.

use anyhow::Context;
use bytes::Bytes;
use clap::Subcommand;
use http::{Request, StatusCode};
use http_body_util::BodyExt;

#[derive(Subcommand)]
pub enum MigrationCommand {
    /// Per route: step, weight, each gate's figure against its threshold, time in
    /// step, state.
    Status {
        /// The proxy's admin address.
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin: std::net::SocketAddr,
        /// Print again every second until interrupted.
        #[arg(long)]
        watch: bool,
    },
}

pub async fn migration_status(admin: std::net::SocketAddr, watch: bool) -> anyhow::Result<()> {
    loop {
        let body = get(admin, "/migration")
            .await
            .with_context(|| format!("GET http://{admin}/migration"))?;
        let status: serde_json::Value =
            serde_json::from_slice(&body).context("the admin API's answer is not JSON")?;
        if watch {
            print!("\x1b[2J\x1b[H");
        }
        print!("{}", render_status(&status));
        if !watch {
            return Ok(());
        }
        tokio::select! {
            () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            () = super::shutdown_signal() => return Ok(()),
        }
    }
}

/// GETs `path` from an admin API at `addr`; the body of a 200, or an error that
/// carries the status and the body.
async fn get(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<Bytes> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = Request::get(path)
        .header(http::header::HOST, addr.to_string())
        .body(http_body_util::Empty::<Bytes>::new())?;
    let res = sender.send_request(req).await?;
    let status = res.status();
    let body = res.into_body().collect().await?.to_bytes();
    if status != StatusCode::OK {
        anyhow::bail!("{status}: {}", String::from_utf8_lossy(&body));
    }
    Ok(body)
}

/// `GET /migration`'s answer as a table for people (`acge-proxy migration status`).
pub fn render_status(status: &serde_json::Value) -> String {
    use std::fmt::Write;
    let fmt_gate = |g: &serde_json::Value| {
        let name = g["name"].as_str().unwrap_or("?");
        let mark = if g["passed"].as_bool() == Some(true) {
            "ok"
        } else {
            "BREACH"
        };
        let limit = if g["breach_when"] == "above" {
            "≤"
        } else {
            "≥"
        };
        match g["value"].as_f64() {
            Some(v) => format!("{name} {v:.3} ({limit} {}) {mark}", g["threshold"]),
            None => format!("{name} n/a"),
        }
    };
    let mut out = String::new();
    let steps = status["steps"].to_string();
    let _ = writeln!(
        out,
        "steps {steps}, interval {} s, min {} green requests\n",
        status["interval_s"], status["min_requests"]
    );
    if let Some(routes) = status["routes"].as_object() {
        for (name, r) in routes {
            let _ = writeln!(
                out,
                "{name:<10} {:<12} step {} (green {:>3}%{}), {} s in step, green {} / blue {} requests",
                r["state"].as_str().unwrap_or("?"),
                r["step"],
                r["weight"],
                if r["shadow"].as_bool() == Some(true) { ", shadow" } else { "" },
                r["time_in_step_s"],
                r["green"]["requests"],
                r["blue"]["requests"],
            );
            let gates: Vec<String> = r["gates"]
                .as_array()
                .into_iter()
                .flatten()
                .map(fmt_gate)
                .collect();
            let _ = writeln!(out, "           {}", gates.join(" · "));
            for key in ["holding", "note"] {
                if let Some(text) = r[key].as_str() {
                    let _ = writeln!(out, "           {key}: {text}");
                }
            }
            if let Some(rb) = r["last_rollback"].as_object() {
                let _ = writeln!(
                    out,
                    "           last rollback: {} at step {} (green {}%)",
                    rb["reason"], rb["step"], rb["weight"]
                );
            }
        }
    }
    out
}
