//! The control plane: what operators and the migration controller touch. The admin
//! API ([`admin`]) reads and moves weights and serves metrics; the migration controller
//! ([`migration`]) walks routes from blue to green on the figures the data plane
//! leaves in each route's windows, and mirrors requests at the shadow step.
//!
//! Arrows run one way: control reads and sets the data plane's route handles; the
//! data plane never calls into control (the mirror plugs in through
//! [`crate::proxy::route::Mirror`]).

pub mod admin;
pub mod migration;
