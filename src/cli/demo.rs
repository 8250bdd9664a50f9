//! `acge-proxy demo`: the seven services behind the proxy, with their own traffic.

use std::path::PathBuf;

pub async fn demo(dir: PathBuf, traffic: u32) -> anyhow::Result<()> {
    acge_proxy::proxy::server::raise_descriptor_limit();
    let token = match std::env::var("ACGE_ADMIN_TOKEN") {
        Ok(t) if !t.trim().is_empty() => t.trim().to_string(),
        _ => format!("demo-{}", uuid::Uuid::new_v4().simple()),
    };
    let demo = acge_proxy::demo::start(token, &dir).await?;
    println!("{}", acge_proxy::demo::banner(&demo));
    let load =
        acge_proxy::demo::spawn_traffic(demo.proxy.proxy_addr, traffic, Some(demo.bearer.clone()));
    super::shutdown_signal().await;
    load.abort();
    demo.proxy.shutdown().await;
    Ok(())
}
