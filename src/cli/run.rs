//! `acge-proxy run --config FILE`: serve until SIGTERM or Ctrl-C, then drain.

use acge_proxy::config::ValidConfig;
use acge_proxy::control::admin::TokenSource;

pub async fn run(config: ValidConfig) -> anyhow::Result<()> {
    acge_proxy::proxy::server::raise_descriptor_limit();
    let token = TokenSource::from_config(&config);
    let running = acge_proxy::start(config, acge_proxy::StartOptions::new(token)).await?;
    super::shutdown_signal().await;
    tracing::info!("shutting down: draining in-flight requests");
    running.shutdown().await;
    Ok(())
}
