//! `acge-proxy run --config FILE [--takeover SOCKET]`: serve until SIGTERM or Ctrl-C,
//! then drain. `SIGHUP` reloads the config file and the listener's certificates. With
//! `--takeover`, take the sockets over from the proxy offering them there (a restart
//! without a gap), and offer them there in turn.

use std::path::PathBuf;

use acge_proxy::config::reload::Trigger;
use acge_proxy::config::ValidConfig;
use acge_proxy::control::admin::TokenSource;
use acge_proxy::proxy::server::handover;

pub async fn run(config: ValidConfig, takeover: Option<PathBuf>) -> anyhow::Result<()> {
    acge_proxy::proxy::server::raise_descriptor_limit();
    let token = TokenSource::from_config(&config);
    let mut options = acge_proxy::StartOptions::new(token);
    let inherited = match &takeover {
        Some(path) => {
            let path = path.clone();
            tokio::task::spawn_blocking(move || handover::take(&path)).await??
        }
        None => None,
    };
    if let Some(i) = &inherited {
        tracing::info!(from_pid = i.pid, "took the listening sockets over");
        options.inherited = Some((i.proxy.try_clone()?, i.admin.try_clone()?));
    }
    let running = acge_proxy::start(config, options).await?;
    if let Some(i) = inherited {
        // From here the old process stops accepting and drains.
        tokio::task::spawn_blocking(move || i.confirm()).await??;
        tracing::info!("the previous process is draining");
    }
    let offer = match &takeover {
        Some(path) => Some((path.clone(), running.sockets()?)),
        None => None,
    };
    let offered = async move {
        match offer {
            Some((path, sockets)) => handover::offer(path, sockets).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(offered);
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
            handed = &mut offered => {
                handed?;
                running.hand_over().await;
                return Ok(());
            }
        }
    }
    tracing::info!("shutting down: draining in-flight requests");
    running.shutdown().await;
    Ok(())
}
