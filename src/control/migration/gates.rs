//! The migration's gates: what green's figures over a window must be for its traffic
//! to grow, and what sends it back to blue.

use serde::Serialize;

use crate::config::RollbackThresholds;
use crate::telemetry::window::Figures;

/// A gate's verdict over a window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Gate {
    pub name: &'static str,
    /// None: not applicable (nothing measures it on this route) or nothing measured.
    pub value: Option<f64>,
    pub threshold: f64,
    /// `above` or `below`: the side of the threshold that breaches.
    pub breach_when: &'static str,
    pub passed: bool,
}

/// The four gates over `figures`: compliance, p95, error rate, hash consistency. A
/// gate with nothing to judge passes (a route without the acge filter has no
/// compliance figure).
pub fn judge(f: &Figures, t: &RollbackThresholds) -> Vec<Gate> {
    let gate = |name, value: Option<f64>, threshold, above: bool| Gate {
        name,
        value,
        threshold,
        breach_when: if above { "above" } else { "below" },
        passed: value.is_none_or(|v| {
            if above {
                v <= threshold
            } else {
                v >= threshold
            }
        }),
    };
    vec![
        gate("compliance", f.compliance, t.compliance_below, false),
        gate("p95_ms", f.p95_ms, t.p95_above_ms, true),
        gate("error_rate", f.error_rate, t.error_rate_above, true),
        gate(
            "hash_consistency",
            f.hash_consistency,
            t.hash_consistency_below,
            false,
        ),
    ]
}

/// The first gate that does not pass.
pub fn first_breach(f: &Figures, t: &RollbackThresholds) -> Option<Gate> {
    judge(f, t).into_iter().find(|g| !g.passed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thresholds() -> RollbackThresholds {
        RollbackThresholds::default()
    }

    fn healthy() -> Figures {
        Figures {
            requests: 1000,
            errors: 5,
            error_rate: Some(0.005),
            p95_ms: Some(120.0),
            compliance: Some(0.99),
            compliance_judged: 1000,
            hash_consistency: Some(1.0),
            hash_checked: 1000,
        }
    }

    #[test]
    fn healthy_figures_pass_every_gate() {
        let gates = judge(&healthy(), &thresholds());
        assert_eq!(gates.len(), 4);
        assert!(gates.iter().all(|g| g.passed), "{gates:?}");
        assert_eq!(first_breach(&healthy(), &thresholds()), None);
    }

    #[test]
    fn each_gate_breaches_on_its_own_side_of_its_threshold() {
        type Breach = fn(&mut Figures);
        let cases: [(&str, Breach); 4] = [
            ("compliance", |f| f.compliance = Some(0.949)),
            ("p95_ms", |f| f.p95_ms = Some(2000.5)),
            ("error_rate", |f| f.error_rate = Some(0.0101)),
            ("hash_consistency", |f| f.hash_consistency = Some(0.999)),
        ];
        for (name, breach) in cases {
            let mut f = healthy();
            breach(&mut f);
            let g = first_breach(&f, &thresholds()).expect(name);
            assert_eq!(g.name, name);
            assert!(!g.passed);
        }
    }

    #[test]
    fn thresholds_themselves_pass() {
        let mut f = healthy();
        f.compliance = Some(0.95);
        f.p95_ms = Some(2000.0);
        f.error_rate = Some(0.01);
        f.hash_consistency = Some(1.0);
        assert_eq!(first_breach(&f, &thresholds()), None);
    }

    #[test]
    fn a_gate_with_nothing_measured_passes_but_says_so() {
        let f = Figures::default();
        let gates = judge(&f, &thresholds());
        assert!(gates.iter().all(|g| g.passed && g.value.is_none()));
    }

    #[test]
    fn the_first_breach_is_reported_in_gate_order() {
        let mut f = healthy();
        f.error_rate = Some(0.5);
        f.compliance = Some(0.1);
        assert_eq!(first_breach(&f, &thresholds()).unwrap().name, "compliance");
    }
}
