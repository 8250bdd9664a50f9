//! `acge-proxy run --config FILE`: serve until SIGTERM or Ctrl-C, then drain. `SIGHUP`
//! reloads the config file and the listener's certificates.

use acge_proxy::config::reload::Trigger;
use acge_proxy::config::ValidConfig;
use acge_proxy::control::admin::TokenSource;

pub async fn run(config: ValidConfig) -> anyhow::Result<()> {
    acge_proxy::proxy::server::raise_descriptor_limit();
    let token = TokenSource::from_config(&config);
    let running = acge_proxy::start(config, acge_proxy::StartOptions::new(token)).await?;
    let stop = super::shutdown_signal();
    tokio::pin!(stop);
    let mut hangup = super::hangup_signal()?;
    loop {
        tokio::select! {
            () = &mut stop => break,
            Some(()) = hangup.recv() => {
                tracing::info!("SIGHUP: reloading the config and the listener certificates");
                running.reload(Trigger::Signal).await;
                running.reload_certificates().await;
            }
        }
    }
    tracing::info!("shutting down: draining in-flight requests");
    running.shutdown().await;
    Ok(())
}
