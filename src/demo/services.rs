//! The seven governance services: names, legacy ports, route prefixes and the ACGE
//! endpoint each green version adds.

/// One governance service: its name, its legacy port, its route prefix and the ACGE
/// endpoint the green version adds.
#[derive(Debug, Clone, Copy)]
pub struct Service {
    pub name: &'static str,
    pub legacy_port: u16,
    pub path_prefix: &'static str,
    pub acge_endpoint: &'static str,
}

pub const SERVICES: [Service; 7] = [
    Service {
        name: "auth",
        legacy_port: 8000,
        path_prefix: "/api/v1/auth",
        acge_endpoint: "/api/v1/auth/acge/validate",
    },
    Service {
        name: "ac",
        legacy_port: 8001,
        path_prefix: "/api/v1/constitutional",
        acge_endpoint: "/api/v1/constitutional/acge/analyze",
    },
    Service {
        name: "integrity",
        legacy_port: 8002,
        path_prefix: "/api/v1/integrity",
        acge_endpoint: "/api/v1/integrity/acge/audit",
    },
    Service {
        name: "fv",
        legacy_port: 8003,
        path_prefix: "/api/v1/verification",
        acge_endpoint: "/api/v1/verification/acge/prove",
    },
    Service {
        name: "gs",
        legacy_port: 8004,
        path_prefix: "/api/v1/governance",
        acge_endpoint: "/api/v1/governance/acge/synthesize",
    },
    Service {
        name: "pgc",
        legacy_port: 8005,
        path_prefix: "/api/v1/policy",
        acge_endpoint: "/api/v1/policy/acge/compile",
    },
    Service {
        name: "ec",
        legacy_port: 8006,
        path_prefix: "/api/v1/evolution",
        acge_endpoint: "/api/v1/evolution/acge/optimize",
    },
];
