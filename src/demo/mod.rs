//! The demo: the seven governance services, each in a blue and a green flavour, on
//! loopback, behind the proxy with `config/demo.yaml` (embedded in the binary).
//!
//! [`services`] lists the services, [`backend`] is the stand-in for each version,
//! [`faults`] the knobs that provoke each of the migration's rollbacks (served on the
//! admin port through the admin API's extension point), [`traffic`] the demo's own
//! load. This module is not on the request path of a real deployment.

pub mod backend;
pub mod faults;
pub mod services;
pub mod traffic;

use std::net::SocketAddr;
use std::sync::Arc;

pub use backend::{spawn_backend, spawn_backend_with, Backend};
pub use faults::{Fault, Faults};
pub use services::{Service, SERVICES};
pub use traffic::spawn_traffic;

use crate::config::{Config, ValidConfig};
use crate::control::admin::TokenSource;
use crate::proxy::split::Version;
use crate::StartOptions;

/// The demo's config, embedded so that `acge-proxy demo` needs no files.
pub const DEMO_CONFIG: &str = include_str!("../../config/demo.yaml");

/// The pgc route's policies (config/policies), embedded too, written under the demo's
/// directory at start.
const DEMO_POLICIES: &[(&str, &str)] = &[
    ("pgc.rego", include_str!("../../config/policies/pgc.rego")),
    (
        "pgc_test.rego",
        include_str!("../../config/policies/pgc_test.rego"),
    ),
];

/// Who the demo's tokens come from, and for.
pub const DEMO_ISSUER: &str = "https://auth.acgs.demo";
pub const DEMO_AUDIENCE: &str = "acgs";

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("the embedded demo config is invalid:\n{0}")]
    Config(#[from] crate::config::ConfigErrors),
    #[error("cannot start the {service} {version} backend on {address}: {source}")]
    Backend {
        service: String,
        version: &'static str,
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Start(#[from] crate::StartError),
    #[error("cannot write the demo's {what} under {dir}: {source}")]
    Files {
        what: &'static str,
        dir: String,
        source: std::io::Error,
    },
}

/// Splits a demo cluster name (`auth-green`) into its service and version.
fn cluster_role(name: &str) -> Option<(&str, Version)> {
    let (service, version) = name.rsplit_once('-')?;
    match version {
        "blue" => Some((service, Version::Blue)),
        "green" => Some((service, Version::Green)),
        _ => None,
    }
}

/// A running demo: backends and proxy.
pub struct Demo {
    pub backends: Vec<Backend>,
    pub proxy: crate::Running,
    pub token: String,
    /// A token the demo signed (valid a day), for the auth route's jwt filter.
    pub bearer: String,
}

/// Starts every backend the demo config names, then the proxy, keeping state (the
/// audit log) under `dir`.
pub async fn start(token: String, dir: &std::path::Path) -> Result<Demo, DemoError> {
    let mut config = Config::from_yaml(DEMO_CONFIG, "config/demo.yaml (embedded)")?.into_inner();
    if let Some(audit) = &mut config.filters.audit {
        audit.dir = dir.join("audit");
    }
    // The auth route's tokens: a key made now, its JWKS where the jwt filter reads it.
    let issuer = acge_filters::jwt::Issuer::generate("demo-1", DEMO_ISSUER);
    let files = |what| {
        move |source| DemoError::Files {
            what,
            dir: dir.display().to_string(),
            source,
        }
    };
    std::fs::create_dir_all(dir.join("policies")).map_err(files("policies"))?;
    std::fs::write(dir.join("jwks.json"), issuer.jwks().to_string()).map_err(files("JWKS"))?;
    for (name, text) in DEMO_POLICIES {
        std::fs::write(dir.join("policies").join(name), text).map_err(files("policies"))?;
    }
    if let Some(jwt) = &mut config.filters.jwt {
        jwt.jwks_file = dir.join("jwks.json");
    }
    if let Some(policy) = &mut config.filters.policy {
        policy.dir = dir.join("policies");
    }
    let bearer = issuer.token(
        "demo-user",
        DEMO_AUDIENCE,
        &config.constitution.hash,
        &["privacy", "rule_of_law", "transparency"],
        std::time::Duration::from_secs(24 * 3600),
    );
    if let Some(acge) = &mut config.filters.acge {
        // Relative to config/ as for any config file; the embedded file's config/ is
        // the one in the tree the binary was built from.
        let config_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        if acge.model.is_relative() {
            acge.model = config_dir.join(&acge.model);
        }
        if let Some(second) = &mut acge.second {
            if second.model.is_relative() {
                second.model = config_dir.join(&second.model);
            }
        }
    }
    if let Some(m) = &mut config.migration {
        if let Some(state) = &mut m.state_file {
            if state.is_relative() {
                *state = dir.join(&*state);
            }
        }
    }
    let faults = Arc::new(Faults::default());
    let mut backends = Vec::new();
    for (name, cluster) in &config.clusters {
        let Some((service, version)) = cluster_role(name) else {
            continue;
        };
        let Some(service) = SERVICES.iter().find(|s| s.name == service) else {
            continue;
        };
        for endpoint in &cluster.endpoints {
            if let Ok(address) = endpoint.parse::<SocketAddr>() {
                backends.push(
                    spawn_backend_with(service.name, version, address, faults.clone()).await?,
                );
            }
        }
    }
    let mut options = StartOptions::new(TokenSource::Fixed(token.clone()));
    options.admin_routes.push(faults::admin_routes(faults));
    let config = ValidConfig::new(config, &[])?;
    let proxy = crate::start(config, options).await?;
    Ok(Demo {
        backends,
        proxy,
        token,
        bearer,
    })
}

/// What the demo prints once it is up: where things are and what to try.
pub fn banner(demo: &Demo) -> String {
    let proxy = demo.proxy.proxy_addr;
    let admin = demo.proxy.admin_addr;
    let token = &demo.token;
    let bearer = &demo.bearer;
    let audit = demo
        .proxy
        .audit()
        .map(|a| a.dir().display().to_string())
        .unwrap_or_default();
    let mut routes = String::new();
    for route in demo.proxy.routes.load().iter() {
        let service = SERVICES.iter().find(|s| s.name == &*route.name);
        routes.push_str(&format!(
            "  {:<10} {:<24} green {:>3}%   try {}\n",
            route.name,
            route.path_prefix,
            route.splitter.green_weight(),
            service.map(|s| s.acge_endpoint).unwrap_or("")
        ));
    }
    format!(
        "acge-proxy demo: 7 services × blue/green on loopback, proxy on {proxy}, admin on {admin}\n\n\
         routes:\n{routes}\n\
         send a request (see x-acge-backend and x-acge-response-compliance); the auth route\n\
         checks a token (jwt filter), this one the demo signed:\n  \
         curl -si http://{proxy}/api/v1/auth/acge/validate -H 'content-type: application/json' -H 'Authorization: Bearer {bearer}' -d '{{\"user\":\"alice\"}}'\n\n\
         the pgc route runs the Rego policy in DIR/policies (policy filter); without the role it answers 403 with the reasons:\n  \
         curl -si http://{proxy}/api/v1/policy/acge/compile -H 'content-type: application/json' -H 'x-user-roles: policy-compiler' -d '{{\"constitutional_hash\":\"cdd01ef066bc6cf2\",\"rules\":[]}}'\n\n\
         move auth to 50% green:\n  \
         curl -s -X PUT http://{admin}/routes/auth/weights -H 'Authorization: Bearer {token}' -d '{{\"green\": 50}}'\n\n\
         see the weights and the metrics:\n  \
         curl -s http://{admin}/weights\n  curl -s http://{admin}/metrics | grep acge_\n\n\
         the migration controller walks every route from shadow to 100 % green on the\n\
         demo's own traffic; watch it, and roll auth back with a fault on its green:\n  \
         acge-proxy migration status --admin {admin} --watch\n  \
         curl -s -X PUT http://{admin}/demo/faults -H 'Authorization: Bearer {token}' -d '{{\"service\": \"auth\", \"version\": \"green\", \"error_rate\": 0.2}}'\n\n\
         every exchange is in the audit log; after the demo, verify it:\n  \
         acge-proxy audit verify {audit}\n\n\
         Ctrl-C stops the demo.\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_config_is_valid_and_covers_every_service() {
        let config = Config::from_yaml(DEMO_CONFIG, "demo.yaml").unwrap();
        for s in SERVICES {
            let route = config.routes.iter().find(|r| r.name == s.name).unwrap();
            assert_eq!(route.matcher.path_prefix, s.path_prefix);
            assert_eq!(route.green_weight, 10);
            assert_eq!(cluster_role(&route.blue), Some((s.name, Version::Blue)));
            assert_eq!(cluster_role(&route.green), Some((s.name, Version::Green)));
        }
        assert_eq!(config.listener.address, "127.0.0.1:15001");
        assert_eq!(config.admin.address, "127.0.0.1:15000");
    }
}
