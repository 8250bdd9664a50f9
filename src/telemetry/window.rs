//! Sliding windows per route and version: what the migration controller reads.
//!
//! A window is a ring of short slots (a sixtieth of its span, at least 50 ms). Each
//! slot counts requests, errors, compliance and hash judgements, and keeps an HDR
//! histogram of latencies; a figure over the last `d` merges the slots that `d`
//! covers, the current, partly filled one included. Recording takes the version's
//! lock for a few additions.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use acge_filters::{Exchange, Version};

/// What one finished exchange says about the version that answered it.
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    /// As logged: a body the upstream cut counts as 502.
    pub status: u16,
    /// Until the end of the answer's body.
    pub latency: Duration,
    /// Whether the acge filter judged the response compliant; None when it did not
    /// score it.
    pub compliant: Option<bool>,
    /// Whether the response carried the right constitutional hash; None when no hash
    /// filter checked it.
    pub hash_ok: Option<bool>,
}

impl Outcome {
    /// What an ended exchange says: its logged status and latency, and what the
    /// response phases found. None before the exchange has ended.
    pub fn of(ex: &Exchange) -> Option<Self> {
        let end = ex.end.as_ref()?;
        Some(Self {
            status: end.status.as_u16(),
            latency: end.latency,
            compliant: ex.findings.compliant,
            hash_ok: ex.findings.hash_consistent,
        })
    }

    /// 5xx answers, the proxy's own for a failed upstream included, are errors;
    /// 499 (the client went away) is not the version's fault.
    fn is_error(&self) -> bool {
        self.status >= 500
    }
}

/// A version's figures over a window. Shares are None where nothing was measured.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Figures {
    pub requests: u64,
    pub errors: u64,
    pub error_rate: Option<f64>,
    pub p95_ms: Option<f64>,
    /// Share of responses the acge filter judged compliant, of those it judged.
    pub compliance: Option<f64>,
    pub compliance_judged: u64,
    /// Share of responses with the right constitutional hash, of those checked.
    pub hash_consistency: Option<f64>,
    pub hash_checked: u64,
}

/// Latencies from 1 µs to 10 min, two significant digits.
fn histogram() -> Histogram<u32> {
    Histogram::new_with_bounds(1, 600_000_000, 2).expect("constant bounds are valid")
}

struct Slot {
    /// Which slot-length period since the origin this slot holds.
    period: u64,
    requests: u64,
    errors: u64,
    judged: u64,
    compliant: u64,
    hash_checked: u64,
    hash_ok: u64,
    latency: Option<Histogram<u32>>,
}

impl Slot {
    fn empty(period: u64) -> Self {
        Self {
            period,
            requests: 0,
            errors: 0,
            judged: 0,
            compliant: 0,
            hash_checked: 0,
            hash_ok: 0,
            latency: None,
        }
    }

    fn reset(&mut self, period: u64) {
        let mut latency = self.latency.take();
        if let Some(h) = &mut latency {
            h.reset();
        }
        *self = Self {
            latency,
            ..Self::empty(period)
        };
    }
}

pub struct Windows {
    origin: Instant,
    slot: Duration,
    /// Blue, green.
    versions: [Mutex<Vec<Slot>>; 2],
}

impl Windows {
    /// Windows that can answer for any span up to `span`.
    pub fn new(span: Duration) -> Self {
        let slot = (span / 60).max(Duration::from_millis(50));
        let len = (span.as_nanos() / slot.as_nanos()) as usize + 2;
        let ring = || Mutex::new((0..len).map(|_| Slot::empty(u64::MAX)).collect());
        Self {
            origin: Instant::now(),
            slot,
            versions: [ring(), ring()],
        }
    }

    fn period(&self, at: Instant) -> u64 {
        (at.saturating_duration_since(self.origin).as_nanos() / self.slot.as_nanos()) as u64
    }

    pub fn record(&self, version: Version, outcome: &Outcome) {
        let period = self.period(Instant::now());
        let mut ring = self.versions[version as usize]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let len = ring.len() as u64;
        let slot = &mut ring[(period % len) as usize];
        if slot.period != period {
            slot.reset(period);
        }
        slot.requests += 1;
        slot.errors += u64::from(outcome.is_error());
        if let Some(ok) = outcome.compliant {
            slot.judged += 1;
            slot.compliant += u64::from(ok);
        }
        if let Some(ok) = outcome.hash_ok {
            slot.hash_checked += 1;
            slot.hash_ok += u64::from(ok);
        }
        let micros = u64::try_from(outcome.latency.as_micros()).unwrap_or(u64::MAX);
        slot.latency
            .get_or_insert_with(histogram)
            .saturating_record(micros.max(1));
    }

    /// The version's figures over the last `over` (whole slots, the current one
    /// included), or since `since` when that is later.
    pub fn figures(&self, version: Version, over: Duration, since: Option<Instant>) -> Figures {
        let now = self.period(Instant::now());
        let covered = (over.as_nanos() / self.slot.as_nanos()) as u64;
        let mut first = now.saturating_sub(covered);
        if let Some(since) = since {
            first = first.max(self.period(since));
        }
        let ring = self.versions[version as usize]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut f = Figures::default();
        let (mut judged, mut compliant, mut checked, mut hash_ok) = (0, 0, 0, 0);
        let mut latency = histogram();
        for slot in ring.iter().filter(|s| (first..=now).contains(&s.period)) {
            f.requests += slot.requests;
            f.errors += slot.errors;
            judged += slot.judged;
            compliant += slot.compliant;
            checked += slot.hash_checked;
            hash_ok += slot.hash_ok;
            if let Some(h) = &slot.latency {
                latency.add(h).expect("same bounds");
            }
        }
        let share = |part: u64, whole: u64| (whole > 0).then(|| part as f64 / whole as f64);
        f.error_rate = share(f.errors, f.requests);
        f.p95_ms = (!latency.is_empty()).then(|| latency.value_at_quantile(0.95) as f64 / 1000.0);
        f.compliance = share(compliant, judged);
        f.compliance_judged = judged;
        f.hash_consistency = share(hash_ok, checked);
        f.hash_checked = checked;
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(ms: u64) -> Outcome {
        Outcome {
            status: 200,
            latency: Duration::from_millis(ms),
            compliant: Some(true),
            hash_ok: Some(true),
        }
    }

    #[test]
    fn figures_count_and_share_per_version() {
        let w = Windows::new(Duration::from_secs(10));
        for i in 0..100 {
            w.record(Version::Green, &ok(i));
        }
        w.record(
            Version::Green,
            &Outcome {
                status: 503,
                ..ok(1)
            },
        );
        w.record(
            Version::Green,
            &Outcome {
                compliant: Some(false),
                hash_ok: None,
                ..ok(1)
            },
        );
        w.record(Version::Blue, &ok(1));
        let g = w.figures(Version::Green, Duration::from_secs(10), None);
        assert_eq!(g.requests, 102);
        assert_eq!(g.errors, 1);
        assert_eq!(g.compliance_judged, 102);
        assert!((g.compliance.unwrap() - 101.0 / 102.0).abs() < 1e-9);
        assert_eq!(g.hash_checked, 101);
        assert_eq!(g.hash_consistency, Some(1.0));
        let p95 = g.p95_ms.unwrap();
        assert!((93.0..=96.0).contains(&p95), "p95 {p95}");
        assert_eq!(
            w.figures(Version::Blue, Duration::from_secs(10), None)
                .requests,
            1
        );
    }

    #[test]
    fn old_slots_leave_the_window() {
        let w = Windows::new(Duration::from_millis(200));
        w.record(Version::Green, &ok(1));
        assert_eq!(
            w.figures(Version::Green, Duration::from_millis(200), None)
                .requests,
            1
        );
        std::thread::sleep(Duration::from_millis(400));
        let f = w.figures(Version::Green, Duration::from_millis(200), None);
        assert_eq!(f, Figures::default(), "nothing measured: no shares at all");
        w.record(Version::Green, &ok(1));
        assert_eq!(
            w.figures(Version::Green, Duration::from_millis(200), None)
                .requests,
            1
        );
    }

    #[test]
    fn since_cuts_the_window() {
        let w = Windows::new(Duration::from_secs(10));
        w.record(Version::Green, &ok(1));
        std::thread::sleep(Duration::from_millis(400));
        let later = Instant::now();
        w.record(Version::Green, &ok(1));
        assert_eq!(
            w.figures(Version::Green, Duration::from_secs(10), Some(later))
                .requests,
            1
        );
    }
}
