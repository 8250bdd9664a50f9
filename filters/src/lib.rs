//! The filter contract of acge-proxy: what a filter is, the context it sees, and the
//! ordered chain a route runs; and the built-in filters.
//!
//! This crate owns the contract ([`Filter`], [`Exchange`], [`Chain`], [`Verdict`]), the
//! registry of built-in filters ([`registry`]) and the filters themselves ([`hash`],
//! [`acge`], [`audit`]). It does not own the data plane: the proxy calls
//! [`Chain::on_request`] before it picks blue or green, [`Chain::on_response`] before
//! any answer goes back (the upstream's, or one the proxy or a filter made), and
//! [`Chain::on_log`] exactly once when the exchange is over, also when the client went
//! away or the upstream failed.

pub mod acge;
pub mod audit;
mod chain;
mod exchange;
pub mod hash;
pub mod jwt;
pub mod metrics;
pub mod policy;
pub mod registry;

pub use chain::{
    answer_of, json_error, json_response, Chain, Filter, LocalResponse, LogError, Verdict,
};
pub use exchange::{
    Answer, Attributes, Compliance, End, Ending, Exchange, Findings, RequestHead, RequestId,
    Source, Version, CLIENT_CLOSED_REQUEST,
};
