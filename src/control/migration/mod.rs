//! The migration controller: walks each route from blue to green through the
//! configured steps, judging green by its recent figures, and backs out on its own.
//!
//! Every `TICK`, for each route it runs:
//! - **rollback**, continuously: over the last `rollback_window_s`, once green has at
//!   least `rollback_min_requests` there, any gate breached (compliance below, p95
//!   above, error rate above, hash consistency below its threshold) sets green to 0 at
//!   once, and the route stays rolled back until an operator resumes it;
//! - **progress**: once a step has lasted `interval_s`, and the last interval holds at
//!   least `min_requests` green requests and every gate passes, the next step. Too few
//!   requests hold the step (the state says so).
//!
//! Step 0 (a weight of 0) is the shadow step: requests are mirrored to green
//! ([`shadow`]) and green's shadow answers are what its gates ([`gates`]) read. Progress
//! is kept in `state_file` ([`state`]: written atomically, off the runtime), so a
//! restarted proxy resumes where it was. Each step, rollback and operator action goes
//! to the audit log when one is configured. The controller itself is in [`controller`].

mod controller;
pub mod gates;
pub mod shadow;
mod state;

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use controller::Controller;
pub use shadow::Shadow;
pub use state::MigrationError;

/// How often the controller looks at the windows.
pub const TICK: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Running,
    Paused,
    Complete,
    RolledBack,
}

/// What an operator asks of a route's controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Pause,
    Resume,
    Promote,
    Rollback,
}

impl Action {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pause" => Self::Pause,
            "resume" => Self::Resume,
            "promote" => Self::Promote,
            "rollback" => Self::Rollback,
            _ => return None,
        })
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::Promote => "promote",
            Self::Rollback => "rollback",
        }
    }
}

/// Why an operator action was refused.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    #[error("no route named `{0}` is under migration")]
    UnknownRoute(String),
    #[error("{0}")]
    NotNow(String),
}

/// A rollback, as kept in the state and told to operators.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Rollback {
    pub at_ms: u64,
    /// The gate that breached, or `operator`.
    pub reason: String,
    pub step: usize,
    pub weight: u8,
    #[serde(default)]
    pub figures: serde_json::Value,
}

fn state_str(s: State) -> &'static str {
    match s {
        State::Running => "running",
        State::Paused => "paused",
        State::Complete => "complete",
        State::RolledBack => "rolled back",
    }
}
